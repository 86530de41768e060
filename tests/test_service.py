"""The service registry and error mapping (no I/O)."""

from __future__ import annotations

import pytest

import sshrpc
from sshrpc import Atom
from sshrpc.service import Service, error_term, flatten_services


def test_export_kinds_and_arities():
    svc = Service("calc")

    @svc.export
    def add(a, b):
        return a + b

    @svc.export
    async def neg(a, scale=1):
        return -a * scale

    @svc.export(name="items")
    async def gen(n):
        yield n

    @svc.export
    def total(*xs):
        return sum(xs)

    assert add(1, 2) == 3  # unchanged locally
    assert svc.functions["add"].kind == "sync"
    assert svc.functions["neg"].kind == "async"
    assert svc.functions["items"].kind == "stream"
    assert svc.lookup("add", 2) is not None
    assert svc.lookup("add", 3) is None
    assert svc.lookup("neg", 1) is not None and svc.lookup("neg", 2) is not None
    assert svc.lookup("neg", 0) is None
    assert svc.lookup("total", 0) is not None and svc.lookup("total", 40) is not None
    assert svc.lookup("gen", 1) is None  # exported under another name
    assert svc.functions["neg"].arity_text == "1..2"
    assert svc.functions["total"].arity_text == "0.."


def test_export_rejects_duplicates_and_keyword_only():
    svc = Service("s")

    @svc.export
    def f():
        return 1

    with pytest.raises(ValueError, match="already exported"):
        svc.export(f)
    with pytest.raises(TypeError, match="keyword-only"):

        @svc.export
        def g(*, x):
            return x

    with pytest.raises(ValueError):
        Service("")


def test_flatten_services():
    a, b = Service("a"), Service("b")
    assert flatten_services([a, [b]]) == {"a": a, "b": b}
    with pytest.raises(TypeError):
        flatten_services([a, "b"])
    with pytest.raises(ValueError, match="two services"):
        flatten_services([a, Service("a")])


def test_error_terms():
    assert error_term(sshrpc.Error((Atom("badarith"), 1))) == (
        "error",
        (Atom("badarith"), 1),
        {},
    )
    assert error_term(sshrpc.Exit(Atom("killed")))[:2] == ("exit", "killed")
    assert error_term(sshrpc.Throw([1]))[:2] == ("throw", [1])
    cls, reason, details = error_term(ZeroDivisionError("division by zero"))
    assert (cls, reason, details) == ("error", (Atom("ZeroDivisionError"), b"division by zero"), {})
    assert isinstance(reason[0], Atom)
    try:
        raise KeyError("k")
    except KeyError as exc:
        _, _, details = error_term(exc, traces=True)
    assert details["trace"] and all(isinstance(x, bytes) for x in details["trace"])
    # encodable as a term
    sshrpc.encode((cls, reason, details))


def test_inline_is_for_sync_functions_only():
    svc = Service("calc")

    @svc.export(inline=True)
    def add(a, b):
        return a + b

    assert svc.lookup("add", 2).inline
    assert svc.lookup("add", 2).kind == "sync"
    assert add(1, 2) == 3

    with pytest.raises(TypeError, match="inline=True is for plain"):

        @svc.export(inline=True)
        async def neg(a):
            return -a

    with pytest.raises(TypeError, match="inline=True is for plain"):

        @svc.export(inline=True)
        async def items(n):
            yield n

    assert sorted(svc.functions) == ["add"]
