"""The C fast path (sshrpc._codec) against the reference codec (sshrpc._etf):
equal bytes for generated values, equal values or the same error for
generated and mutated byte strings, and the C path's own machinery (atom
cache, stream buffers, threads, frame encoding)."""

from __future__ import annotations

import collections
import enum
import functools
import inspect
import os
import pickle
import struct
import subprocess
import sys
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sshrpc

if not sshrpc.c_accelerated:
    pytest.skip("the C codec is not in use (pure-Python mode)", allow_module_level=True)

from sshrpc import (
    Atom,
    BitString,
    ImproperList,
    Map,
    Pid,
    Port,
    Reference,
    TermError,
    _codec,
    _etf,
)
from sshrpc._codec import lib

# The reference codec raises the recursion limit (never lowers it), which
# hypothesis notices and reports.
pytestmark = pytest.mark.filterwarnings("ignore:The recursion limit will not be reset")

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

atoms = st.text(st.characters(exclude_categories=("Cs",)), max_size=12).map(Atom) | st.sampled_from(
    [Atom("true"), Atom("undefined"), Atom("é"), Atom("x" * 255)]
)
opaques = st.sampled_from(
    [
        Pid.new("a@b", 1, 2, 3),
        Pid.new("é@host", 7),
        Reference.new("a@b", (1, 2, 3)),
        Port(b"Y" + b"w\x03a@b" + struct.pack(">II", 1, 2)),
    ]
)
bitstrings = st.builds(BitString, st.binary(min_size=1, max_size=5), st.integers(1, 7))
ints = st.integers() | st.integers(-(2**2100), 2**2100) | st.integers(0, 255)
floats = st.floats(allow_nan=False, allow_infinity=False)
scalars = (
    ints
    | floats
    | atoms
    | st.binary(max_size=40)
    | st.text(max_size=8)
    | st.booleans()
    | st.none()
    | bitstrings
    | opaques
)
hashables = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3).map(tuple), max_leaves=4
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(inner, max_size=6)
        | st.lists(inner, max_size=6).map(tuple)
        | st.lists(st.integers(0, 255), min_size=1, max_size=20)
        | st.dictionaries(hashables, inner, max_size=5)
        | st.lists(st.tuples(inner | hashables, inner), max_size=4).map(Map)
        | st.builds(ImproperList, st.lists(inner, min_size=1, max_size=4), scalars)
    )


values = st.recursive(scalars, _containers, max_leaves=25)


def same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (floats bit for bit)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            same(k, k2) and same(a[k], b[k2]) for k, k2 in zip(a, b, strict=True)
        )
    if isinstance(a, Map):
        return same(a.pairs, b.pairs)
    if isinstance(a, ImproperList):
        return same(a.items, b.items) and same(a.tail, b.tail)
    if isinstance(a, float):
        return struct.pack(">d", a) == struct.pack(">d", b)
    return bool(a == b)


def expected(value: Any) -> Any:
    """What ``decode(encode(value))`` gives: the mapping's one-way parts."""
    if isinstance(value, Atom):
        return {"true": True, "false": False, "undefined": None}.get(value, value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, tuple):
        return tuple(expected(v) for v in value)
    if isinstance(value, list):
        return [expected(v) for v in value]
    if isinstance(value, ImproperList):
        return ImproperList(expected(value.items), expected(value.tail))
    if isinstance(value, dict | Map):
        return _etf._make_map([(expected(k), expected(v)) for k, v in value.items()])
    return value


def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(*args)
    except TermError as exc:
        return "TermError", exc.detail
    except TypeError as exc:
        return "TypeError", str(exc)


def assert_same_outcome(data: bytes) -> None:
    ref = outcome(_etf.decode, data)
    fast = outcome(_codec.decode, data)
    assert ref[0] == fast[0], (data, ref, fast)
    if ref[0] == "ok":
        assert same(ref[1], fast[1]), (data, ref, fast)
    else:
        assert ref[1] == fast[1], (data, ref, fast)


@SETTINGS
@given(values)
def test_encode_same_bytes_and_round_trip(value: Any) -> None:
    data = _etf.encode(value)
    assert _codec.encode(value) == data
    assert _codec.encode_frame(value) == struct.pack(">I", len(data)) + data
    assert _codec.encode(value, compressed=True) == _etf.encode(value, compressed=True)
    want = expected(value)
    assert same(_codec.decode(data), want)
    assert same(_etf.decode(data), want)


@SETTINGS
@given(
    values, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4), st.data()
)
def test_mutated_terms_same_outcome(value: Any, flips: list[tuple[int, int]], data: Any) -> None:
    raw = bytearray(_etf.encode(value))
    for where, byte in flips:
        raw[where % len(raw)] = byte
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    assert_same_outcome(bytes(raw))


@SETTINGS
@given(st.binary(max_size=40))
def test_random_bytes_same_outcome(tail: bytes) -> None:
    assert_same_outcome(b"\x83" + tail)
    assert_same_outcome(tail)


@SETTINGS
@given(values)
def test_compressed_same_value(value: Any) -> None:
    packed = _etf.encode(value, compressed=True)
    assert same(_codec.decode(packed), _etf.decode(packed))


def test_encode_errors_match_reference() -> None:
    class Opaque:
        pass

    cyclic: list[Any] = [1]
    cyclic.append(cyclic)
    bad_values = [float("nan"), [float("inf")], Atom("a" * 256), cyclic, "\ud800", Atom("\udc00")]
    bad_values += [Opaque(), [1, {1}], 1j, {Atom("k"): object()}]
    for bad in bad_values:
        ref = _kind(_etf.encode, bad)
        assert ref[0] in ("TermError", "TypeError", "UnicodeEncodeError")
        assert _kind(_codec.encode, bad) == ref
        assert _kind(_codec.encode_frame, bad) == ref


def _kind(fn: Any, value: Any) -> tuple[str, str]:
    try:
        fn(value)
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return "ok", ""


def test_large_terms_use_the_big_buffers() -> None:
    value = [list(range(100_000)), b"x" * (1 << 20), [Atom(f"a{i}") for i in range(5000)]]
    data = _etf.encode(value)
    assert _codec.encode(value) == data
    assert _codec.encode_frame(value)[4:] == data
    assert same(_codec.decode(data), _etf.decode(data))
    assert _codec.encode(1) == b"\x83a\x01"


def test_atom_cache_overflow_and_reuse() -> None:
    names = [Atom(f"cache_test_{i}") for i in range(_codec.ATOM_CACHE + 500)]
    data = _etf.encode(names)
    for _ in range(2):
        assert same(_codec.decode(data), names)
        # the transcoder path's own per-thread cache
        assert same(_codec._decode_cost(data, 1000, 8192, 2**26, 2**26, False)[0], names)
    assert same(_codec.decode(_etf.encode((names[0], names[-1]))), (names[0], names[-1]))


def test_error_inside_the_unpickler_leaves_a_working_decoder() -> None:
    bad_float = b"c" + b"nope" + b"\x00" * 27
    data = b"\x83h\x03" + _etf.encode(Atom("fresh_one"))[1:] + bad_float + b"a\x01"
    with pytest.raises(TermError, match="FLOAT_EXT is not a number"):
        _codec.decode(data)
    value = (Atom("fresh_one"), Atom("fresh_two"))
    assert same(_codec.decode(_etf.encode(value)), value)
    assert same(_transcoded(_etf.encode(value)), value)
    # A malformed term after new atoms: those atoms are not half-cached.
    with pytest.raises(TermError):
        _codec.decode(b"\x83h\x02" + _etf.encode(Atom("fresh_three"))[1:] + b"\xff")
    assert same(_codec.decode(_etf.encode(Atom("fresh_three"))), Atom("fresh_three"))
    assert same(_transcoded(_etf.encode(Atom("fresh_three"))), Atom("fresh_three"))


def test_threads_share_nothing() -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(200):
                value = (Atom(f"t{n}_{i % 37}"), [i, b"x" * (i % 3000)], {Atom("k"): n})
                data = _codec.encode(value)
                assert data == _etf.encode(value)
                assert same(_codec.decode(data), value)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert not any(t.is_alive() for t in threads)


def test_public_names_are_the_fast_path() -> None:
    assert sshrpc.encode is _codec.encode
    assert sshrpc.decode is _codec.decode
    assert lib.sshrpc_c_version() == _codec.C_VERSION


def test_limits_outside_the_c_range_use_the_reference() -> None:
    with pytest.raises(TermError):
        _codec.decode(b"\x83n\x01\x00\x01", max_big_bytes=-1)
    with pytest.raises(TermError):
        _codec.decode(b"\x83h\x00", max_depth=-1)
    assert _codec.decode(b"\x83h\x00", max_depth=2**70) == ()


# -- the decode budget (max_cost) ----------------------------------------------

budget_values = (
    values
    | st.lists(st.integers(-(2**31), 2**31 - 1) | st.integers(0, 255), min_size=8, max_size=30)
    | st.lists(floats, min_size=8, max_size=30)
)


def cost_outcome(fn: Any, data: bytes, max_cost: int) -> tuple[str, Any]:
    try:
        return "ok", fn(data, max_cost=max_cost)
    except TermError as exc:
        return "TermError", (exc.detail, exc.offset)


def assert_same_budget(data: bytes, max_cost: int) -> None:
    ref = cost_outcome(_etf.decode_cost, data, max_cost)
    fast = cost_outcome(_codec.decode_cost, data, max_cost)
    assert ref[0] == fast[0], (data, max_cost, ref, fast)
    if ref[0] == "ok":
        assert ref[1][1] == fast[1][1], (data, max_cost, ref, fast)  # the same cost
        assert same(ref[1][0], fast[1][0])
    else:
        assert ref[1] == fast[1], (data, max_cost, ref, fast)


@SETTINGS
@given(budget_values, st.data())
def test_budget_same_cost_and_same_error(value: Any, data: Any) -> None:
    raw = _etf.encode(value)
    _, cost = _etf.decode_cost(raw)
    for budget in (cost, max(0, cost - 1), data.draw(st.integers(0, cost + 8))):
        assert_same_budget(raw, budget)
    assert_same_budget(_etf.encode(value, compressed=True), data.draw(st.integers(0, cost)))


@SETTINGS
@given(
    budget_values,
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3),
    st.integers(0, 2000),
)
def test_budget_mutated_terms_same_outcome(
    value: Any, flips: list[tuple[int, int]], budget: int
) -> None:
    raw = bytearray(_etf.encode(value))
    for where, byte in flips:
        raw[where % len(raw)] = byte
    assert_same_budget(bytes(raw), budget)


NON_CANONICAL = [
    b"\x83l\x00\x00\x00\x01a\x01l\x00\x00\x00\x01a\x02j",  # a list tail that is a list
    b"\x83l\x00\x00\x00\x01a\x01k\x00\x02\x01\x02",  # a STRING_EXT tail
    b"\x83l\x00\x00\x00\x00a\x07",  # no elements: the tail
    b"\x83l\x00\x00\x00\x01a\x01a\x02",  # improper
    b"\x83l\x00\x00\x00\x08" + b"b\x00\x00\x01\x00" * 8 + b"j",  # a packed int list
    b"\x83l\x00\x00\x00\x08" + b"F?\xf0\x00\x00\x00\x00\x00\x00" * 8 + b"j",
    b"\x83l\x00\x00\x00\x02jjj",
]


@pytest.mark.parametrize("raw", NON_CANONICAL)
def test_budget_non_canonical_lists(raw: bytes) -> None:
    _, cost = _etf.decode_cost(raw)
    for budget in range(cost + 2):
        assert_same_budget(raw, budget)


def test_budget_fun_ext_pid_index_uniq() -> None:
    pid = Pid.new("a@b", 1, 2, 3).raw
    for index in (b"a\x01", b"b\x00\x00\x01\x00", b"j", b"n\x01\x00\x05"):
        # One free variable; a bad index is an error that the budget may precede.
        raw = b"\x83u\x00\x00\x00\x01" + pid + b"w\x01m" + index + b"a\x02" + b"j"
        for budget in range(0, 1200, 7):
            assert_same_budget(raw, budget)


def test_budget_error_names_the_limit_and_offset() -> None:
    raw = b"\x83h\x02w\x04pingl\x00\x00\x00\x03jjjj"
    _, cost = _etf.decode_cost(raw)
    assert cost == 64 + 80 + 256 + 3 * 72 + 72
    assert _codec.decode_cost(raw) == _etf.decode_cost(raw)
    with pytest.raises(TermError) as info:
        _codec.decode(raw, max_cost=cost - 1)
    assert info.value.detail == f"term exceeds the decode budget of {cost - 1}"
    assert info.value.offset == len(raw) - 1  # the tail's NIL went over


def test_budget_ordinary_traffic_fits_the_protocol_default() -> None:
    """A 1 MiB list of ints and a 1 MiB binary fit 4 MiB, the budget the
    protocol gives 1 MiB frames; a 1 MiB list of empty lists does not."""
    budget = 4 * 1024 * 1024
    ints = _codec.encode(list(range(1000, 1000 + 1024 * 1024 // 5)))
    assert len(ints) >= 1024 * 1024
    assert _codec.decode_cost(ints, max_cost=budget)[1] < budget
    assert _etf.decode_cost(ints, max_cost=budget)[1] < budget
    small = _codec.encode([7, 200] * (1024 * 1024 // 4 - 8))  # SMALL_INTEGER_EXT
    assert len(small) >= 1024 * 1024 - 64
    assert _codec.decode_cost(small, max_cost=budget)[1] < budget
    big = _codec.encode(b"x" * 1024 * 1024)
    assert _codec.decode(big, max_cost=budget) == b"x" * 1024 * 1024
    nils = b"\x83l" + struct.pack(">I", 1024 * 1024) + b"j" * (1024 * 1024 + 1)
    with pytest.raises(TermError, match="decode budget"):
        _codec.decode(nils, max_cost=budget)
    packed = _codec.encode([[]] * (1024 * 1024), compressed=True)
    assert len(packed) < 2048  # the amplification of issue 11
    with pytest.raises(TermError, match=r"decode budget .*\(in the inflated term\)"):
        _codec.decode(packed, max_cost=budget)


# -- the direct encoder (csrc/pyenc.c) and the paths behind it -----------------


@SETTINGS
@given(values)
def test_each_encode_path_same_bytes(value: Any) -> None:
    """The direct encoder and the pickle transcoder each give the reference's
    bytes whenever they answer (None hands the value on)."""
    data = _etf.encode(value)
    direct = _codec._direct(value, _etf.DEFAULT_MAX_DEPTH, 0)
    assert direct is None or direct == data
    framed = _codec._direct(value, _etf.DEFAULT_MAX_DEPTH, 4)
    assert framed is None or framed == struct.pack(">I", len(data)) + data
    assert sys.getrecursionlimit() <= _codec._PICKLE_MAX_RECURSION  # so the pickle path runs
    transcoded = _codec._encode_c(value, _etf.DEFAULT_MAX_DEPTH, 0)
    assert transcoded is None or transcoded == data


def test_direct_encoder_is_in_use() -> None:
    assert _codec._direct is not _codec._no_direct
    value = (Atom("call"), 1, Atom("mod"), Atom("fun"), [1, b"x"], {Atom("k"): "v"}, None)
    assert _codec._direct(value, 1000, 0) == _etf.encode(value)


EDGE_INTS = [0, 255, 256, -1, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**63 - 1, -(2**63)]


@pytest.mark.parametrize(
    "value",
    [
        *EDGE_INTS,
        [0] * 65535,
        [0] * 65536,
        [255, 256],
        [1, -1],
        [1, True],
        tuple(range(256)),
        (),
        [],
        {},
        {(1, Atom("a")): [1], 2: 3.5, b"k": "v", "é": Atom("é" * 200)},
        Atom("é" * 255),
        "text " * 2000,
        [b"y" * 5000] * 10,
        -0.0,
        1e308,
    ],
)
def test_direct_encoder_edges(value: Any) -> None:
    data = _etf.encode(value)
    assert _codec._direct(value, 1000, 0) == data
    assert _codec._direct(value, 1000, 4) == struct.pack(">I", len(data)) + data
    assert _codec.encode(value) == data


class _Color(enum.IntEnum):
    RED = 1


class _Name(str):
    pass


class _Key(Atom):
    pass


_Point = collections.namedtuple("_Point", "x y")
_deep: Any = []
for _ in range(300):
    _deep = [_deep, 1]


@pytest.mark.parametrize(
    "value",
    [
        _Color.RED,
        [_Color.RED],
        _Name("s"),
        {_Name("k"): 1},
        _Key("k"),
        _Point(1, 2),
        2**64,
        -(2**63) - 1,
        2**63,
        [2**100],
        [b"z" * (64 * 1024)],
        Map([(1, 2)]),
        ImproperList([1], 2),
        bytearray(b"ab"),
        [memoryview(b"ab")],
        BitString(b"\x80", 1),
        _deep,
        Atom("a" * 256),
        "\ud800",
        [float("inf")],
    ],
)
def test_direct_encoder_hands_on_what_it_does_not_handle(value: Any) -> None:
    """Subclasses, big ints, big binaries, sshrpc types, deep nesting and
    values the reference rejects: the direct encoder answers None and the
    public functions give the reference's bytes or error."""
    assert _codec._direct(value, 1000, 0) is None
    assert _kind(_codec.encode, value) == _kind(_etf.encode, value)
    if _kind(_etf.encode, value)[0] == "ok":
        assert _codec.encode(value) == _etf.encode(value)
        assert _codec.encode_frame(value)[4:] == _etf.encode(value)


def test_direct_encoder_depth_limit() -> None:
    value = ((1,),)
    assert _codec._direct(value, 1, 0) is None
    assert _kind(_codec.encode, value) == _kind(_etf.encode, value)
    with pytest.raises(TermError):
        _codec.encode(value, max_depth=1)
    assert _codec.encode(value, max_depth=2) == _etf.encode(value)
    limit = sys.getrecursionlimit()
    try:
        for max_depth in (-1, 2**70):
            assert _codec._direct(value, max_depth, 0) is None
            fast = functools.partial(_codec.encode, max_depth=max_depth)
            ref = functools.partial(_etf.encode, max_depth=max_depth)
            assert _kind(fast, value) == _kind(ref, value)
    finally:
        sys.setrecursionlimit(limit)  # the reference raised it for 2**70
    assert _codec._direct(value, 1000, 3) is None


_DEEP_AFTER_HIGH_LIMIT = """
import sshrpc
from sshrpc import TermError, _etf
_etf.encode([], max_depth=10**6)  # the reference raises the recursion limit
deep = []
for _ in range(10**5):
    deep = [deep]
try:
    sshrpc.encode(deep)
except TermError as exc:
    print("TermError", exc)
print(len(sshrpc.encode(deep, max_depth=10**6)))
"""


@pytest.mark.parametrize("direct", ["0", "1"])
def test_deep_value_after_a_high_recursion_limit_does_not_crash(direct: str) -> None:
    """Regression: once the reference had raised the recursion limit (any
    encode with a large max_depth), the pickle path recursed on the C stack
    as deep as the value went and a 100,000-deep list killed the process."""
    env = {**os.environ, "SSHRPC_NO_DIRECT_ENCODE": direct}
    env.pop("SSHRPC_PURE_PYTHON", None)
    proc = subprocess.run(
        [sys.executable, "-c", _DEEP_AFTER_HIGH_LIMIT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("TermError value nested deeper than the limit 1000")
    assert lines[1] == str(len(_etf.encode([[]], max_depth=3)) + 6 * (10**5 - 1))


def test_a_bad_string_float_does_not_poison_the_atom_cache() -> None:
    """A term that the C transcoder accepts but whose string float is bad
    must not leave its new atoms in the thread's cache: every later term
    with that atom decoded as a missing memo entry (``UnpicklingError``),
    so one peer's frame broke other peers' frames in the same node."""
    name = "fresh_atom_for_the_float_test"
    atom = b"w" + bytes([len(name)]) + name.encode()
    bad_float = b"c" + b"not-a-number".ljust(31, b"\0")
    with pytest.raises(TermError, match="FLOAT_EXT is not a number"):
        _codec.decode(b"\x83h\x02" + atom + bad_float)
    assert _codec.decode(b"\x83" + atom) == Atom(name)
    assert _codec.decode(b"\x83h\x02" + atom + atom) == (Atom(name), Atom(name))
    # The transcoder path itself (the direct decoder answers the terms above).
    assert _transcoded(b"\x83" + atom) == Atom(name)
    assert _transcoded(b"\x83h\x02" + atom + atom) == (Atom(name), Atom(name))


def _transcoded(data: bytes) -> Any:
    return _codec._decode_cost(data, 1000, 8192, 2**26, 2**26, False)[0]


# -- the direct decoder (csrc/pydec.c) and the path behind it -------------------


def ref_pair(data: bytes, **limits: int) -> tuple[str, Any]:
    try:
        return "ok", _etf.decode_cost(data, **limits)
    except TermError as exc:
        return "TermError", (exc.detail, exc.offset)


def assert_direct_agrees(data: bytes, max_depth: int = 1000, max_cost: int = 2**26) -> None:
    """The direct decoder answers the reference's value and cost, or hands
    the bytes on (NotImplemented); the transcoder path alone and the public
    functions give the reference's outcome either way."""
    limits = {"max_depth": max_depth, "max_cost": max_cost}
    ref = ref_pair(data, **limits)
    got = _codec._direct_decode(data, max_depth, _etf.DEFAULT_MAX_BIG_BYTES, max_cost, True)
    if got is not NotImplemented:
        assert ref[0] == "ok", (data, ref, got)
        assert ref[1][1] == got[1], (data, ref, got)  # the same cost
        assert same(ref[1][0], got[0]), (data, ref, got)
        value = _codec._direct_decode(data, max_depth, _etf.DEFAULT_MAX_BIG_BYTES, max_cost, False)
        assert same(value, got[0])
    for fn in (
        lambda: _codec._decode_cost(
            data, max_depth, _etf.DEFAULT_MAX_BIG_BYTES, 2**26, max_cost, False
        ),
        lambda: _codec.decode_cost(data, **limits),
    ):
        try:
            fast: tuple[str, Any] = "ok", fn()
        except TermError as exc:
            fast = "TermError", (exc.detail, exc.offset)
        assert ref[0] == fast[0], (data, ref, fast)
        if ref[0] == "ok":
            assert ref[1][1] == fast[1][1] and same(ref[1][0], fast[1][0]), (data, ref, fast)
        else:
            assert ref[1] == fast[1], (data, ref, fast)


@SETTINGS
@given(budget_values, st.data())
def test_each_decode_path_same_value_and_cost(value: Any, data: Any) -> None:
    raw = _etf.encode(value)
    _, cost = _etf.decode_cost(raw)
    assert_direct_agrees(raw)
    assert_direct_agrees(raw, max_cost=data.draw(st.integers(0, cost)))
    assert_direct_agrees(raw, max_depth=data.draw(st.integers(0, 6)))


@SETTINGS
@given(
    budget_values,
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
    st.data(),
)
def test_each_decode_path_mutated_terms(
    value: Any, flips: list[tuple[int, int]], data: Any
) -> None:
    raw = bytearray(_etf.encode(value))
    for where, byte in flips:
        raw[where % len(raw)] = byte
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    assert_direct_agrees(bytes(raw))


@SETTINGS
@given(st.binary(max_size=40))
def test_each_decode_path_random_bytes(tail: bytes) -> None:
    assert_direct_agrees(b"\x83" + tail)


def test_direct_decoder_is_in_use() -> None:
    assert _codec._direct_decode is not _codec._no_direct_decode
    assert type(sshrpc.decode).__name__ == "builtin_function_or_method"
    value = (Atom("call"), 1, Atom("mod"), Atom("fun"), [1, b"x"], {Atom("k"): b"v"}, None)
    data = _etf.encode(value)
    assert same(_codec._direct_decode(data, 1000, 8192, 2**26, True), _etf.decode_cost(data))


def _atom(tag: int, raw: bytes) -> bytes:
    head = (
        bytes([tag, len(raw)]) if tag in (115, 119) else bytes([tag]) + struct.pack(">H", len(raw))
    )
    return head + raw


DIRECT_EDGES = [
    *(_etf.encode(i)[1:] for i in EDGE_INTS),
    b"n\x08\x00" + b"\xff" * 8,  # 2**64 - 1
    b"n\x08\x01" + b"\x00" * 7 + b"\x80",  # -(2**63)
    b"n\x00\x01",  # a bignum of no digits, with a sign: 0
    b"n\x01\x00\x05",  # a bignum that fits a small integer
    b"F\x80" + b"\x00" * 7,  # -0.0
    *(
        _atom(tag, name)
        for tag in (100, 115, 118, 119)
        for name in (b"true", b"false", b"undefined", b"nil", b"")
    ),
    _atom(100, b"\xe9t\xe9"),  # Latin-1
    _atom(115, b"\xff" * 255),
    _atom(119, "é".encode() * 127),
    _atom(118, "😀".encode() * 255),  # 1,020 bytes, 255 characters
    b"k\x00\x03\x00\x01\xff",  # STRING_EXT
    b"k\x00\x00",
    b"l\x00\x00\x00\x00j",  # no elements, a NIL tail: []
    b"h\x00",
    b"i\x00\x00\x00\x02a\x01a\x02",  # LARGE_TUPLE_EXT
    b"t\x00\x00\x00\x00",
    b"t\x00\x00\x00\x03" + _atom(119, b"a") + b"a\x01" + b"m\x00\x00\x00\x00a\x02" + b"a\x01a\x03",
    b"t\x00\x00\x00\x02" + _atom(100, b"true") + b"j" + _atom(119, b"undefined") + b"j",
    b"m\x00\x00\x00\x00",
]


@pytest.mark.parametrize("body", DIRECT_EDGES)
def test_direct_decoder_edges(body: bytes) -> None:
    data = b"\x83" + body
    assert _codec._direct_decode(data, 1000, 8192, 2**26, True) is not NotImplemented
    assert_direct_agrees(data)


_pid = Pid.new("a@b", 1, 2, 3).raw
HANDED_ON = [
    b"",
    b"\x83",
    b"\x84a\x01",  # not version 131
    b"\x83a",  # truncated
    b"\x83a\x01\x00",  # trailing bytes
    _etf.encode([1, 2], compressed=True),
    b"\x83" + _pid,
    b"\x83h\x01" + _pid,
    b"\x83l\x00\x00\x00\x01a\x01a\x02",  # improper
    b"\x83l\x00\x00\x00\x01a\x01l\x00\x00\x00\x01a\x02j",  # a list tail to join
    b"\x83l\x00\x00\x00\x01a\x01k\x00\x01\x02",  # a STRING_EXT tail
    b"\x83l\x00\x00\x00\x00a\x07",  # no elements: the tail itself
    b"\x83n\x09\x00" + b"\x01" * 9,  # past 64 bits
    b"\x83n\x08\x01" + b"\x01" + b"\x00" * 6 + b"\x80",  # -(2**63) - 1
    b"\x83n\x01\x02\x01",  # bad sign
    b"\x83o\x00\x00\x00\x01\x00\x01",  # LARGE_BIG_EXT
    b"\x83F\x7f\xf0" + b"\x00" * 6,  # infinity
    b"\x83c" + b"1.5".ljust(31, b"\0"),  # string float
    b"\x83" + _atom(119, b"\xff"),  # not UTF-8
    b"\x83" + _atom(100, b"a" * 256),  # 256 characters
    b"\x83" + _atom(118, "é".encode() * 256),
    b"\x83t\x00\x00\x00\x02a\x01a\x00" + _atom(119, b"true") + b"a\x00",  # 1 and true
    b"\x83t\x00\x00\x00\x02a\x01a\x00F?\xf0\x00\x00\x00\x00\x00\x00a\x00",  # 1 and 1.0
    b"\x83t\x00\x00\x00\x02" + _atom(100, b"\xe9") + b"a\x00" + _atom(119, "é".encode()) + b"a\x00",
    b"\x83t\x00\x00\x00\x01h\x01a\x01a\x00",  # a tuple key
    b"\x83t\x00\x00\x00\x01ja\x00",  # a list key
    b"\x83t\x00\x00\x00\x01t\x00\x00\x00\x00a\x00",  # a map key
    b"\x83M\x00\x00\x00\x01\x03\xe0",  # a bitstring
    b"\x83h\xff",  # claims more than there is
    b"\x83l\xff\xff\xff\xff",
    b"\x83t\xff\xff\xff\xff",
    b"\x83m\xff\xff\xff\xff",
    b"\x83k\xff\xff",
    b"\x83" + b"h\x01" * 257 + b"j",  # deeper than the C recursion bound
    b"\x83" + b"l\x00\x00\x00\x01" * 300 + b"j" * 301,
]


@pytest.mark.parametrize("data", HANDED_ON)
def test_direct_decoder_hands_on_what_it_does_not_handle(data: bytes) -> None:
    assert _codec._direct_decode(data, 1000, 8192, 2**26, True) is NotImplemented
    assert _codec._direct_decode(data, 1000, 8192, 2**26, False) is NotImplemented
    assert_direct_agrees(data)
    assert outcome(_codec.decode, data) == outcome(_etf.decode, data) or same(
        _codec.decode(data), _etf.decode(data)
    )


def test_direct_decoder_limits() -> None:
    data = _etf.encode(((1,), [2], {Atom("k"): b"v"}, 2**40))
    _, cost = _etf.decode_cost(data)
    assert _codec._direct_decode(data, 2, 8192, cost, True) == _etf.decode_cost(data)
    assert _codec._direct_decode(data, 1, 8192, cost, True) is NotImplemented
    assert _codec._direct_decode(data, 2, 8192, cost - 1, True) is NotImplemented
    assert _codec._direct_decode(data, 2, 5, cost, True) is NotImplemented  # 2**40: 6 bytes
    assert _codec._direct_decode(data, 2, 6, cost, True) is not NotImplemented
    for bad in (-1, 2**63, 2**70, 1.5, "1000", None):
        assert _codec._direct_decode(data, bad, 8192, cost, True) is NotImplemented  # type: ignore[arg-type]
        assert _codec._direct_decode(data, 2, 8192, bad, True) is NotImplemented  # type: ignore[arg-type]
    for limits in ({"max_depth": 1}, {"max_cost": cost - 1}, {"max_big_bytes": 5}):
        want = ref_pair(data, **limits)
        try:
            mine: tuple[str, Any] = "ok", _codec.decode_cost(data, **limits)
        except TermError as exc:
            mine = "TermError", (exc.detail, exc.offset)
        assert want[0] == "TermError" and mine == want


def test_public_decode_arguments() -> None:
    """The builtins take the Python signature: any other call goes to the
    Python function, which answers or raises the same error."""
    data = _etf.encode((Atom("a"), [1]))
    want = _etf.decode(data)
    for fn in (_codec.decode, lambda *a, **k: _codec.decode_cost(*a, **k)[0]):
        assert same(fn(data), want)
        assert same(fn(data=data), want)
        assert same(fn(bytearray(data)), want)
        assert same(fn(memoryview(data), max_inflated=10), want)
        assert same(fn(data, max_depth=2, max_big_bytes=0, max_cost=10**6, max_inflated=0), want)
        with pytest.raises(TermError, match="deeper than the limit 0"):
            fn(data, max_depth=0)
        with pytest.raises(TypeError, match="decode needs bytes, not str"):
            fn("x")
        with pytest.raises(TypeError):
            fn()
        with pytest.raises(TypeError):
            fn(data, 5)
        with pytest.raises(TypeError, match="max_dept"):
            fn(data, max_dept=5)
        with pytest.raises(TypeError):
            fn(data, data=data)
    for fn, ref in ((_codec.decode, _etf.decode), (_codec.decode_cost, _etf.decode_cost)):
        assert (fn.__module__, fn.__name__) == ("sshrpc._codec", ref.__name__)
        assert pickle.loads(pickle.dumps(fn)) is fn  # by name, as a Python function would
        ours, theirs = inspect.signature(fn).parameters, inspect.signature(ref).parameters
        assert [(p.name, p.kind, p.default) for p in ours.values()] == [
            (p.name, p.kind, p.default) for p in theirs.values()
        ]


def test_direct_decoder_atom_cache_is_bounded() -> None:
    """A peer sending new atoms grows no cache past its bound: decoding
    20,000 fresh atoms, then 20,000 more, leaves Python's heap as it was
    after the first batch (the first 4,096 per process stay cached)."""
    import tracemalloc

    def batch(prefix: str) -> None:
        for i in range(20_000):
            name = f"{prefix}{i}"
            data = b"\x83w" + bytes([len(name)]) + name.encode()
            assert _codec.decode(data) == name

    batch("bound_a_")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        batch("bound_b_")
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after - before < 64 * 1024, after - before


def test_direct_decoder_does_not_leak() -> None:
    """Every path out of the direct decoder drops what it built: 100,000
    decodes of handled terms and of terms it hands on part-way leave the
    heap flat."""
    import tracemalloc

    terms = [
        _etf.encode(
            (Atom("call"), 1, Atom("mod"), Atom("fun"), [1, b"x" * 3000], {Atom("k"): 2.5})
        ),
        _etf.encode([list(range(300)), (1.5, -(2**63)), "text", [Atom("x")] * 5, {b"k": []}]),
        b"\x83h\x03a\x01l\x00\x00\x00\x02a\x01" + _pid + b"j",  # a pid deep inside
        b"\x83t\x00\x00\x00\x02a\x01a\x00" + _atom(119, b"true") + b"a\x00",  # keys collide
        b"\x83l\x00\x00\x00\x02m\x00\x00\x00\x01xa\x01a\x02",  # improper
        b"\x83h\x02m\x00\x00\x00\x01x",  # truncated after an item
    ]
    direct = _codec._direct_decode

    def loop(n: int) -> None:
        for _ in range(n):
            for data in terms:
                direct(data, 1000, 8192, 2**26, True)
                direct(data, 1000, 8192, 2**26, False)

    loop(1000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        loop(100_000 // len(terms))
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after - before < 16 * 1024, after - before
    blocks = sys.getallocatedblocks()
    loop(20_000 // len(terms))
    assert sys.getallocatedblocks() - blocks < 100


_NO_DIRECT_DECODE = """
import sshrpc
from sshrpc import _codec
assert _codec._direct_decode is _codec._no_direct_decode
assert sshrpc.decode is _codec._decode_py, sshrpc.decode
data = sshrpc.encode((sshrpc.Atom("a"), [1, 2.5], {b"k": None}))
print(sshrpc.decode(data), _codec.decode_cost(data)[1])
"""


def test_without_the_direct_decoder() -> None:
    """``SSHRPC_NO_DIRECT_DECODE=1``: the transcoder path alone, same values."""
    env = {**os.environ, "SSHRPC_NO_DIRECT_DECODE": "1"}
    env.pop("SSHRPC_PURE_PYTHON", None)
    proc = subprocess.run(
        [sys.executable, "-c", _NO_DIRECT_DECODE],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = _etf.encode((Atom("a"), [1, 2.5], {b"k": None}))
    value, cost = _etf.decode_cost(data)
    assert proc.stdout.split() == f"{value} {cost}".split()
