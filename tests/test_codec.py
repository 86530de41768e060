"""The C fast path (sshrpc._codec) against the reference codec (sshrpc._etf):
equal bytes for generated values, equal values or the same error for
generated and mutated byte strings, and the C path's own machinery (atom
cache, stream buffers, threads, frame encoding)."""

from __future__ import annotations

import collections
import enum
import functools
import os
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
    assert same(_codec.decode(_etf.encode((names[0], names[-1]))), (names[0], names[-1]))


def test_error_inside_the_unpickler_leaves_a_working_decoder() -> None:
    bad_float = b"c" + b"nope" + b"\x00" * 27
    data = b"\x83h\x03" + _etf.encode(Atom("fresh_one"))[1:] + bad_float + b"a\x01"
    with pytest.raises(TermError, match="FLOAT_EXT is not a number"):
        _codec.decode(data)
    value = (Atom("fresh_one"), Atom("fresh_two"))
    assert same(_codec.decode(_etf.encode(value)), value)
    # A malformed term after new atoms: those atoms are not half-cached.
    with pytest.raises(TermError):
        _codec.decode(b"\x83h\x02" + _etf.encode(Atom("fresh_three"))[1:] + b"\xff")
    assert same(_codec.decode(_etf.encode(Atom("fresh_three"))), Atom("fresh_three"))


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
