"""The ETF codec specification (PROTOCOL.md section 8), run against the
pure-Python reference codec and the C fast path alike: every tag in both
directions, canonical output, every error, the limits, hostile lengths.

tracemalloc sees Python allocations only; the C transcoder allocates in
proportion to input it has read (csrc/README.md), which the same hostile
inputs exercise under the sanitizer build."""

from __future__ import annotations

import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import pytest

from sshrpc import (
    Atom,
    BitString,
    Export,
    Fun,
    ImproperList,
    Map,
    Pid,
    Port,
    Reference,
    TermError,
    _codec,
    _etf,
)

CODECS = {"reference": (_etf.encode, _etf.decode), "C": (_codec.encode, _codec.decode)}


@pytest.fixture(params=sorted(CODECS))
def codec(request: pytest.FixtureRequest) -> tuple[Callable[..., bytes], Callable[..., Any]]:
    return CODECS[request.param]


def same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(
            same(k, k2) and same(a[k], b[k2]) for k, k2 in zip(a, b, strict=True)
        )
    if isinstance(a, Map):
        return same(a.pairs, b.pairs)
    if isinstance(a, ImproperList):
        return same(a.items, b.items) and same(a.tail, b.tail)
    if isinstance(a, float):
        return struct.pack(">d", a) == struct.pack(">d", b)
    return bool(a == b)


def atom(name: str) -> bytes:
    raw = name.encode()
    return bytes([119, len(raw)]) + raw


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


NODE = atom("n@h")
PID = Pid.new("n@h", 1, 2, 3)

# (value, canonical bytes without the version byte): both directions.
CANONICAL: list[tuple[Any, bytes]] = [
    (0, b"a\x00"),
    (255, b"a\xff"),
    (256, b"b\x00\x00\x01\x00"),
    (-1, b"b\xff\xff\xff\xff"),
    (2**31 - 1, b"b\x7f\xff\xff\xff"),
    (-(2**31), b"b\x80\x00\x00\x00"),
    (2**31, b"n\x04\x00\x00\x00\x00\x80"),
    (-(2**31) - 1, b"n\x04\x01\x01\x00\x00\x80"),
    (2**64, b"n\x09\x00" + b"\x00" * 8 + b"\x01"),
    (-(2**2040), b"o" + u32(256) + b"\x01" + b"\x00" * 255 + b"\x01"),
    (1.5, b"F" + struct.pack(">d", 1.5)),
    (-0.0, b"F" + struct.pack(">d", -0.0)),
    (Atom("ok"), atom("ok")),
    (Atom(""), atom("")),
    (Atom("é" * 200), b"v\x01\x90" + "é".encode() * 200),
    (True, atom("true")),
    (False, atom("false")),
    (None, atom("undefined")),
    (b"", b"m" + u32(0)),
    (b"\x00\xff", b"m" + u32(2) + b"\x00\xff"),
    (BitString(b"\xf0", 4), b"M" + u32(1) + b"\x04\xf0"),
    ((), b"h\x00"),
    ((1, Atom("a")), b"h\x02a\x01" + atom("a")),
    (tuple(range(256)), b"i" + u32(256) + b"".join(_etf.encode(i)[1:] for i in range(256))),
    ([], b"j"),
    ([1, 2, 255], b"k\x00\x03\x01\x02\xff"),
    ([0] * 65535, b"k\xff\xff" + b"\x00" * 65535),
    ([0] * 65536, b"l" + u32(65536) + b"a\x00" * 65536 + b"j"),
    ([256], b"l" + u32(1) + b"b\x00\x00\x01\x00j"),
    ([True], b"l" + u32(1) + atom("true") + b"j"),
    ([[]], b"l" + u32(1) + b"jj"),
    (ImproperList([1], Atom("t")), b"l" + u32(1) + b"a\x01" + atom("t")),
    ({}, b"t" + u32(0)),
    ({Atom("a"): 1, b"k": [2]}, b"t" + u32(2) + atom("a") + b"a\x01m" + u32(1) + b"kk\x00\x01\x02"),
    (Map([(1, 2), (1.0, 3)]), b"t" + u32(2) + b"a\x01a\x02F" + struct.pack(">d", 1.0) + b"a\x03"),
    (PID, b"X" + NODE + struct.pack(">III", 1, 2, 3)),
    (Reference.new("n@h", (1, 2, 3), 4), b"Z\x00\x03" + NODE + struct.pack(">IIII", 4, 1, 2, 3)),
    (Port(b"x" + NODE + struct.pack(">QI", 7, 1)), b"x" + NODE + struct.pack(">QI", 7, 1)),
    (Port(b"Y" + NODE + struct.pack(">II", 7, 1)), b"Y" + NODE + struct.pack(">II", 7, 1)),
    (Export(b"q" + atom("m") + atom("f") + b"a\x02"), b"q" + atom("m") + atom("f") + b"a\x02"),
]

_NEW_FUN_BODY = (
    b"\x00" + b"\x11" * 16 + u32(0) + u32(0) + atom("m") + b"a\x00a\x00" + bytes(PID.raw)
)
_NEW_FUN = b"p" + u32(4 + len(_NEW_FUN_BODY)) + _NEW_FUN_BODY
_OLD_FUN = b"u" + u32(1) + bytes(PID.raw) + atom("m") + b"a\x01b\x00\x00\x01\x00" + b"a\x07"
CANONICAL += [(Fun(_NEW_FUN), _NEW_FUN), (Fun(_OLD_FUN), _OLD_FUN)]


@pytest.mark.parametrize(("value", "raw"), CANONICAL, ids=lambda x: repr(x)[:30])
def test_canonical_both_directions(codec: Any, value: Any, raw: bytes) -> None:
    encode, decode = codec
    assert encode(value) == b"\x83" + raw
    assert same(decode(b"\x83" + raw), value)


def _float_ext(text: bytes) -> bytes:
    return b"c" + text + b"\x00" * (31 - len(text))


# (bytes without the version byte, expected value): forms only decoded.
DECODE_ONLY: list[tuple[bytes, Any]] = [
    (_float_ext(b"1.50000000000000000000e+00"), 1.5),
    (_float_ext(b"-2.5e-3"), -0.0025),
    (b"d\x00\x02ok", Atom("ok")),
    (b"s\x02ok", Atom("ok")),
    (b"s\x01\xe9", Atom("é")),
    (b"d\x00\x04true", True),
    (b"v\x00\x02ok", Atom("ok")),
    (b"s\x09undefined", None),
    (b"n\x01\x00\x05", 5),
    (b"n\x00\x00", 0),
    (b"n\x08\x01" + b"\x05" + b"\x00" * 7, -5),
    (b"o" + u32(1) + b"\x00\x07", 7),
    (b"i" + u32(1) + b"a\x01", (1,)),
    (b"k\x00\x00", []),
    (b"l" + u32(2) + b"a\x01a\x02k\x00\x01\x03", [1, 2, 3]),
    (b"l" + u32(1) + b"a\x01l" + u32(1) + b"a\x02j", [1, 2]),
    (b"l" + u32(1) + b"a\x01l" + u32(1) + b"a\x02a\x03", ImproperList([1, 2], 3)),
    (b"l" + u32(0) + b"a\x09", 9),
    (b"l" + u32(0) + b"j", []),
    (b"l" + u32(1) + b"a\x01l" + u32(0) + b"a\x03", ImproperList([1], 3)),
    (b"M" + u32(2) + b"\x08ab", b"ab"),
    (b"M" + u32(1) + b"\x03\xff", BitString(b"\xe0", 3)),
    (b"t" + u32(2) + b"a\x01a\x02w\x04truea\x03", Map([(1, 2), (True, 3)])),
    (
        b"t" + u32(2) + atom("a") + b"a\x01" + atom("a") + b"a\x02",
        Map([(Atom("a"), 1), (Atom("a"), 2)]),
    ),
    (b"t" + u32(1) + b"t" + u32(0) + b"a\x01", Map([({}, 1)])),
    (b"t" + u32(1) + b"l" + u32(1) + b"a\x01a\x02" + b"a\x01", Map([(ImproperList([1], 2), 1)])),
    (b"t" + u32(2) + b"h\x01a\x01a\x01h\x01a\x02a\x02", {(1,): 1, (2,): 2}),
]

OLD_OPAQUE = [
    b"g" + atom("n@h") + struct.pack(">IIB", 1, 2, 3),
    b"g" + b"d\x00\x03n@h" + struct.pack(">IIB", 1, 2, 3),
    b"f" + atom("n@h") + struct.pack(">IB", 1, 2),
    b"e" + atom("n@h") + struct.pack(">IB", 1, 2),
    b"r\x00\x02" + atom("n@h") + b"\x01" + struct.pack(">II", 1, 2),
]


@pytest.mark.parametrize(("raw", "value"), DECODE_ONLY, ids=lambda x: repr(x)[:30])
def test_decode_only_forms(codec: Any, raw: bytes, value: Any) -> None:
    _, decode = codec
    assert same(decode(b"\x83" + raw), value)


@pytest.mark.parametrize("raw", OLD_OPAQUE)
def test_old_opaque_tags_reencode_byte_for_byte(codec: Any, raw: bytes) -> None:
    encode, decode = codec
    value = decode(b"\x83" + raw)
    assert type(value) in (Pid, Port, Reference)
    assert value.raw == raw
    assert encode(value) == b"\x83" + raw
    assert value.node == "n@h"


def test_compressed_both_directions(codec: Any) -> None:
    encode, decode = codec
    value = [list(range(300)), b"x" * 1000, Atom("a")]
    plain = encode(value)
    packed = encode(value, compressed=True)
    assert packed[:2] == b"\x83P" and struct.unpack(">I", packed[2:6])[0] == len(plain) - 1
    assert zlib.decompress(packed[6:]) == plain[1:]
    assert same(decode(packed), value)
    assert encode(value, compressed=9)[6:] == zlib.compress(plain[1:], 9)


def test_none_and_str_mapping(codec: Any) -> None:
    encode, decode = codec
    assert decode(encode(None)) is None
    assert encode("héllo") == encode("héllo".encode())
    assert same(decode(encode("héllo")), "héllo".encode())
    assert same(decode(encode(Atom("héllo"))), Atom("héllo"))


def test_map_rules(codec: Any) -> None:
    encode, decode = codec
    value = decode(
        b"\x83t"
        + u32(3)
        + b"a\x01a\x01F"
        + struct.pack(">d", 1.0)
        + b"a\x02"
        + atom("true")
        + b"a\x03"
    )
    assert same(value, Map([(1, 1), (1.0, 2), (True, 3)]))
    assert encode(value) == encode(Map([(1, 1), (1.0, 2), (True, 3)]))
    assert same(decode(encode({1: 1, 2.5: 2, Atom("x"): 3})), {1: 1, 2.5: 2, Atom("x"): 3})
    assert same(decode(encode({Atom("1"): 1, b"1": 2, 1: 3})), {Atom("1"): 1, b"1": 2, 1: 3})
    assert same(decode(encode({2**70: 1, -(2**70): 2})), {2**70: 1, -(2**70): 2})
    assert same(decode(encode(Map([(False, 1), (0.0, 2)]))), Map([(False, 1), (0.0, 2)]))


def test_subclasses_and_unsupported(codec: Any) -> None:
    import enum

    class Color(enum.IntEnum):
        RED = 1

    class Name(enum.StrEnum):
        CALL = "call"

    encode, _ = codec
    assert encode(Color.RED) == encode(1)
    assert encode([Name.CALL, Atom("call")]) == encode([b"call", Atom("call")])
    assert encode(bytearray(b"ab")) == encode(memoryview(b"ab")) == encode(b"ab")
    for bad in (object(), {1, 2}, 1j, [object()]):
        with pytest.raises(TypeError, match="cannot encode"):
            encode(bad)


@pytest.mark.parametrize(
    "bad", [float("nan"), float("inf"), [float("-inf")], Atom("a" * 256), "deep", "cycle"]
)
def test_encode_term_errors(codec: Any, bad: Any) -> None:
    encode, _ = codec
    if bad == "deep":
        bad = []
        for _ in range(1001):
            bad = [bad]
    elif bad == "cycle":
        bad = [1]
        bad.append(bad)
    with pytest.raises(TermError):
        encode(bad)
    assert encode(Atom("é" * 255))


def test_depth_limit(codec: Any) -> None:
    encode, decode = codec
    for opener, closer in ((b"l" + u32(1), b"j"), (b"h\x01", b""), (b"t" + u32(1) + b"a\x01", b"")):
        for depth, ok in ((1000, True), (1001, False), (200_000, False)):
            data = b"\x83" + opener * depth + b"j" + closer * depth
            if ok:
                assert decode(data) is not None
            else:
                with pytest.raises(TermError, match="nesting deeper than the limit 1000"):
                    decode(data)
    value: Any = []
    for _ in range(999):
        value = [value]
    assert same(decode(encode(value)), value)
    assert decode(b"\x83h\x01h\x00", max_depth=2) == ((),)
    with pytest.raises(TermError):
        decode(b"\x83h\x01h\x00", max_depth=1)
    with pytest.raises(TermError):
        encode(((),), max_depth=1)


def test_bignum_limit(codec: Any) -> None:
    _, decode = codec
    assert decode(b"\x83o" + u32(8192) + b"\x00" + b"\x01" * 8192) > 0
    with pytest.raises(TermError, match="above the limit 8192"):
        decode(b"\x83o" + u32(8193) + b"\x00" + b"\x01" * 8193)
    with pytest.raises(TermError, match="above the limit 4"):
        decode(b"\x83n\x05\x00" + b"\x01" * 5, max_big_bytes=4)
    with pytest.raises(TermError, match="sign byte"):
        decode(b"\x83n\x01\x02\x01")


def _corpus() -> list[bytes]:
    return [b"\x83" + raw for _, raw in CANONICAL if len(raw) < 5000] + [
        b"\x83" + raw for raw, _ in DECODE_ONLY
    ]


def test_truncation_at_every_offset(codec: Any) -> None:
    _, decode = codec
    for data in _corpus():
        for cut in range(len(data)):
            with pytest.raises(TermError):
                decode(data[:cut])


def test_trailing_bytes_and_bad_headers(codec: Any) -> None:
    _, decode = codec
    with pytest.raises(TermError, match=r"1 trailing bytes after the term at byte 3"):
        decode(b"\x83a\x01\x00")
    with pytest.raises(TermError, match="empty input"):
        decode(b"")
    with pytest.raises(TermError, match="expected version byte 131, found 130"):
        decode(b"\x82a\x01")
    with pytest.raises(TermError, match="unknown tag 0 at byte 1"):
        decode(b"\x83\x00")
    with pytest.raises(TermError, match="unknown tag 255 at byte 3"):
        decode(b"\x83h\x01\xff")
    with pytest.raises(TypeError):
        decode("text")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"F\x7f\xf0" + b"\x00" * 6, "not finite"),
        (_float_ext(b"inf"), "not finite"),
        (_float_ext(b"one"), "FLOAT_EXT is not a number"),
        (b"v\x00\x02\xff\xfe", "not valid UTF-8"),
        (b"v\x00\x03\xed\xa0\x80", "not valid UTF-8"),
        (b"d\x01\x00" + b"a" * 256, "longer than 255"),
        (b"M" + u32(0) + b"\x03", "BIT_BINARY_EXT needs"),
        (b"M" + u32(1) + b"\x09\x00", "BIT_BINARY_EXT needs"),
        (b"Z\x00\x06" + NODE + b"\x00" * 28, "ID words"),
        (b"p" + u32(3) + b"\x00\x00\x00", "below 4"),
        (b"q" + atom("m") + atom("f") + b"b\x00\x00\x00\x01", "export arity"),
        (b"q" + atom("m") + b"a\x01a\x01", "expected an atom"),
        (b"u" + u32(0) + b"a\x01" + atom("m") + b"a\x01a\x01", "FUN_EXT without a pid"),
        (b"u" + u32(0) + bytes(PID.raw) + atom("m") + b"F" + b"\x00" * 8 + b"a\x01", "index"),
        (b"u" + u32(0) + bytes(PID.raw) + atom("m") + b"a\x01" + atom("x"), "uniq"),
        (
            b"u" + u32(1) + bytes(PID.raw) + atom("m") + b"a\x01a\x01" + _float_ext(b"bad"),
            "FLOAT_EXT is not a number",
        ),
        (b"u" + u32(0) + b"h\x01" + _float_ext(b"bad") + atom("m") + b"a\x01a\x01", "FLOAT_EXT"),
        (b"h\x02" + _float_ext(b"bad") + b"\xff", r"FLOAT_EXT is not a number: b'bad' at byte 3"),
        (b"u" + u32(100) + bytes(PID.raw) + atom("m") + b"a\x01a\x01", "free variables"),
    ],
)
def test_malformed_terms(codec: Any, raw: bytes, message: str) -> None:
    _, decode = codec
    with pytest.raises(TermError, match=message):
        decode(b"\x83" + raw)


def test_compressed_errors(codec: Any) -> None:
    _, decode = codec
    body = _etf.encode(list(range(100)))[1:]
    packed = zlib.compress(body)
    for claimed in (len(body) - 1, len(body) + 1):
        with pytest.raises(TermError, match="does not inflate to the"):
            decode(b"\x83P" + u32(claimed) + packed)
    with pytest.raises(TermError, match="trailing bytes after the compressed term"):
        decode(b"\x83P" + u32(len(body)) + packed + b"zz")
    with pytest.raises(TermError, match="not valid zlib"):
        decode(b"\x83P" + u32(10) + b"garbage!!!")
    with pytest.raises(TermError, match="truncated compressed term header"):
        decode(b"\x83P\x00")
    bad = zlib.compress(b"h\x01\xff")
    with pytest.raises(TermError, match=r"unknown tag 255 \(in the inflated term\) at byte 3"):
        decode(b"\x83P" + u32(3) + bad)
    with pytest.raises(TermError, match=r"in the inflated term"):
        decode(b"\x83P" + u32(32) + zlib.compress(_float_ext(b"nope")))


def test_compressed_bomb_fails_fast_without_allocating(codec: Any) -> None:
    _, decode = codec
    bomb = b"\x83P\xff\xff\xff\xff" + zlib.compress(b"\x00" * 10_000)[:14]
    assert len(bomb) == 20
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(TermError, match="above the limit"):
            decode(bomb)
        with pytest.raises(TermError):
            decode(bomb, max_inflated=2**32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < 1.0
    assert peak < 1 << 20


HOSTILE = [
    b"\x83l\xff\xff\xff\xffa\x01a\x01a\x01a\x01a\x01a",
    b"\x83m\xff\xff\xff\xff" + b"\x00" * 14,
    b"\x83t\xff\xff\xff\xff" + b"a\x01" * 7,
    b"\x83i\xff\xff\xff\xff" + b"a\x01" * 7,
    b"\x83o\xff\xff\xff\xff\x00" + b"\x01" * 13,
    b"\x83M\xff\xff\xff\xff\x03" + b"\x00" * 13,
    b"\x83p\xff\xff\xff\xff" + b"\x00" * 14,
    b"\x83u\xff\xff\xff\xff" + b"\x00" * 14,
    b"\x83k\xff\xff" + b"\x01" * 16,
    b"\x83v\xff\xff" + b"a" * 16,
    b"\x83" + b"h\x01" * 6 + b"l\xff\xff",
]


@pytest.mark.parametrize("data", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_lengths_allocate_nothing(codec: Any, data: bytes) -> None:
    _, decode = codec
    assert len(data) <= 20
    tracemalloc.start()
    try:
        with pytest.raises(TermError):
            decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024
