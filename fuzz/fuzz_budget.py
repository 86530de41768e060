"""Fuzz target: the decode budget (issue 11: bound work, not just bytes).

An input is ``Budget:24, Term``: a budget of 0..2**24-1 cost units and a term
(version byte included, compressed or not).  Properties (an
``AssertionError`` or any exception other than ``TermError`` is a finding):

- both decoders (the reference and the C fast path) give the same outcome
  under the budget: the same value and the same cost, or a ``TermError``
  with the same message and offset;
- a decoded term's cost is within the budget, and the cost is the sum of
  ``TERM_COST`` over its tags (so every tag was paid for);
- the work the term becomes is bounded by its cost: the number of Python
  containers and objects in the value is at most cost / 6 (every tag costs
  at least 6), so a cheap frame can never be a costly one, however well it
  compresses;
- a budget one unit below the cost fails with the budget error (and only
  that error: the term was otherwise valid).

Run it with ``python fuzz/run.py budget`` (docs/fuzzing.md).
"""

from __future__ import annotations

import zlib
from typing import Any

from fuzz_common import MAX_INFLATED, same

import sshrpc._codec
import sshrpc._etf
from sshrpc import ImproperList, Map, TermError

MIN_TAG_COST = min(c for c in sshrpc._etf.TERM_COST if c)


def _decode(fn: Any, term: bytes, budget: int) -> Any:
    try:
        return fn(term, max_cost=budget, max_inflated=MAX_INFLATED)
    except TermError as exc:
        return exc


def _objects(value: Any) -> int:
    """Values in ``value``, itself included (containers and leaves)."""
    count, stack = 0, [value]
    while stack:
        x = stack.pop()
        count += 1
        if type(x) is list or type(x) is tuple:
            stack.extend(x)
        elif type(x) is dict:
            for k, v in x.items():
                stack += (k, v)
        elif type(x) is Map:
            for k, v in x.pairs:
                stack += (k, v)
        elif type(x) is ImproperList:
            stack += (*x.items, x.tail)
            count -= 1  # the items and the tail are the tags
    return count


def test_one_input(data: bytes) -> None:
    if len(data) < 4:
        return
    budget = int.from_bytes(data[:3], "big")
    term = data[3:]
    ref = _decode(sshrpc._etf.decode_cost, term, budget)
    fast = _decode(sshrpc._codec.decode_cost, term, budget)
    if isinstance(ref, TermError) or isinstance(fast, TermError):
        assert isinstance(ref, TermError) and isinstance(fast, TermError), (term, ref, fast)
        assert (ref.detail, ref.offset) == (fast.detail, fast.offset), (term, ref, fast)
        return
    (ref_value, ref_cost), (fast_value, fast_cost) = ref, fast
    assert same(ref_value, fast_value), (term, ref_value, fast_value)
    assert ref_cost == fast_cost <= budget, (term, ref_cost, fast_cost, budget)
    assert _objects(ref_value) * MIN_TAG_COST <= ref_cost, (term, ref_value, ref_cost)
    if ref_cost:
        under = _decode(sshrpc._codec.decode_cost, term, ref_cost - 1)
        assert isinstance(under, TermError) and "decode budget" in under.detail, (term, under)


def seeds() -> list[bytes]:
    """Issue 11's shapes: lists of empty lists, plain and compressed (the
    1 KB frame that was 86 MiB of objects), lists of atoms, tuples, pids,
    string floats, maps with unhashable keys; each with budgets around its
    cost."""
    from sshrpc import Atom, Pid
    from sshrpc._etf import encode

    nils = b"\x83l" + (3000).to_bytes(4, "big") + b"j" * 3001
    values = [
        [Atom("ok")] * 50,
        [(1,)] * 50,
        [Pid.new("a@b", 1)] * 20,
        [Map([([], 1)])] * 20,
        list(range(1000, 1100)),
    ]
    terms = [nils, b"\x83P" + (len(nils) - 1).to_bytes(4, "big") + zlib.compress(nils[1:])]
    terms += [encode(v) for v in values]
    terms.append(b"\x83l\x00\x00\x00\x02" + (b"c" + b"1.5".ljust(31, b"\0")) * 2 + b"j")
    out = []
    for term in terms:
        _, cost = sshrpc._etf.decode_cost(term, max_inflated=MAX_INFLATED)
        for budget in (cost, cost - 1, cost // 2):
            out.append(budget.to_bytes(3, "big") + term)
    return out
