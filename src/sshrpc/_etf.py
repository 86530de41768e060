"""Python values <-> Erlang External Term Format bytes: the reference codec.

This module is the readable specification of the mapping in PROTOCOL.md
section 8 (and docs/types.md).  It is pure Python and slow on purpose: the C
fast path in ``sshrpc._codec`` must give the same result, or the same kind of
error, for every input, which the hypothesis tests in tests/test_codec.py
check.  No I/O.

Decoding promises:

- Every malformed input raises ``TermError`` whose message says what was
  wrong and at which byte offset (0 is the version byte 131).  Nothing else
  escapes (a deep term is a ``TermError``, not a ``RecursionError``).
- Nothing is allocated from a length field before the bytes that back it are
  known to be there; a compressed term is inflated only up to the size it
  claims, and only if that is within ``max_inflated``.
- A term that OTP's ``term_to_binary/1`` produced re-encodes to the same bytes,
  except string floats (tag 99), Latin-1 atom tags and compressed input
  (PROTOCOL.md section 8).  Pids, ports, references and funs are kept as raw
  bytes, so they always re-encode byte for byte.

Non-canonical inputs are normalised the way ``binary_to_term`` reads them:
a ``LIST_EXT`` whose tail is a list is one longer list, a ``LIST_EXT`` with no
elements is its tail, a bignum that fits a small integer is a plain ``int``,
and the unused low bits of a bitstring's last byte read as zero.
"""

from __future__ import annotations

import math
import struct
import sys
import zlib
from typing import Any

from ._errors import TermError
from ._types import Atom, BitString, Export, Fun, ImproperList, Map, Opaque, Pid, Port, Reference

__all__ = [
    "DEFAULT_MAX_BIG_BYTES",
    "DEFAULT_MAX_COST",
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_INFLATED",
    "decode",
    "encode",
]

#: Deepest nesting of tuples, lists and maps accepted.  PROTOCOL.md section 2
#: requires at least 1,000; Erlang's own limit is memory.
DEFAULT_MAX_DEPTH = 1000
#: Largest bignum magnitude, in bytes.  PROTOCOL.md requires at least 1,024;
#: 8 KiB (about 19,700 decimal digits) is far beyond what RPC arguments need.
DEFAULT_MAX_BIG_BYTES = 8192
#: Largest inflated size of a compressed term, unless the caller (the
#: protocol, from ``max_frame``) passes its own.
DEFAULT_MAX_INFLATED = 64 * 1024 * 1024
#: The decode budget: the largest total ``TERM_COST`` of one term's tags.
#: A tag costs the larger of the bytes of Python objects it becomes (a
#: reference in its container, plus the object unless it is shared) and
#: about 1 unit per 2 ns of decoding it and encoding it back, measured; so
#: a term decodes to at most about ``max_cost`` bytes of objects, on top of
#: its binaries' bytes (bounded by the input), and its work is in
#: proportion.  64 MiB here; the protocol passes ``COST_PER_BYTE`` times its
#: ``max_frame`` (4 MiB for 1 MiB frames).  docs/security.md ("Work
#: bounds") has the measurements.
DEFAULT_MAX_COST = 64 * 1024 * 1024

VERSION = 131
COMPRESSED = 80

# Tags (erts/doc "External Term Format").
NEW_FLOAT_EXT = 70
BIT_BINARY_EXT = 77
NEW_PID_EXT = 88
NEW_PORT_EXT = 89
NEWER_REFERENCE_EXT = 90
SMALL_INTEGER_EXT = 97
INTEGER_EXT = 98
FLOAT_EXT = 99
ATOM_EXT = 100
REFERENCE_EXT = 101
PORT_EXT = 102
PID_EXT = 103
SMALL_TUPLE_EXT = 104
LARGE_TUPLE_EXT = 105
NIL_EXT = 106
STRING_EXT = 107
LIST_EXT = 108
BINARY_EXT = 109
SMALL_BIG_EXT = 110
LARGE_BIG_EXT = 111
NEW_FUN_EXT = 112
EXPORT_EXT = 113
NEW_REFERENCE_EXT = 114
SMALL_ATOM_EXT = 115
MAP_EXT = 116
FUN_EXT = 117
ATOM_UTF8_EXT = 118
SMALL_ATOM_UTF8_EXT = 119
V4_PORT_EXT = 120

_ATOM_TAGS = (ATOM_EXT, SMALL_ATOM_EXT, ATOM_UTF8_EXT, SMALL_ATOM_UTF8_EXT)


def _cost_table() -> tuple[int, ...]:
    costs = [0] * 256  # an unknown tag costs nothing: it is an error
    for tag, cost in (
        (SMALL_INTEGER_EXT, 6),  # a reference (8 bytes) to a shared small int
        (INTEGER_EXT, 16),
        (NEW_FLOAT_EXT, 32),
        (FLOAT_EXT, 512),  # parsed by float() in Python
        (ATOM_EXT, 80),  # cached, but encoding one back takes ~150 ns
        (SMALL_ATOM_EXT, 80),
        (ATOM_UTF8_EXT, 80),
        (SMALL_ATOM_UTF8_EXT, 80),
        (SMALL_TUPLE_EXT, 64),
        (LARGE_TUPLE_EXT, 64),
        (NIL_EXT, 72),  # a new list
        (STRING_EXT, 256),  # a list of ints, slow to encode back
        (LIST_EXT, 256),  # may be an ImproperList, built in Python
        (BINARY_EXT, 48),  # the bytes themselves are bounded by the input
        (BIT_BINARY_EXT, 512),  # a BitString, built in Python
        (SMALL_BIG_EXT, 48),
        (LARGE_BIG_EXT, 48),
        (MAP_EXT, 256),
    ):
        costs[tag] = cost
    for tag in (88, 89, 90, 101, 102, 103, 112, 113, 114, 117, 120):
        costs[tag] = 512  # pids, ports, references, funs, exports: built in Python
    return tuple(costs)


#: What each tag costs against the decode budget (``max_cost``), wherever
#: it appears as a term (a list's tail, a fun's pid, index and uniq too; not
#: the atoms inside a pid or an export, which are part of that term).
TERM_COST = _cost_table()
_SPECIAL_ATOMS: dict[str, Any] = {"true": True, "false": False, "undefined": None}
_MAX_ATOM_CHARS = 255


def _ensure_recursion(depth: int) -> None:
    # The reference codec recurses up to twice per nesting level.  CPython
    # 3.11+ does not use the C stack for Python-to-Python calls, so raising
    # the limit (never lowering it) is safe; ``max_depth`` bounds the recursion.
    # A limit far beyond any real nesting is capped (setrecursionlimit takes
    # a C int).
    needed = 2 * min(depth, 10**8) + 3000
    if sys.getrecursionlimit() < needed:
        sys.setrecursionlimit(needed)


# ----------------------------------------------------------------------------
# Decoding


class _Decoder:
    def __init__(
        self, data: bytes, max_depth: int, max_big: int, inflated: bool, max_cost: int
    ) -> None:
        self.data = data
        self.max_depth = max_depth
        self.max_big = max_big
        self.inflated = inflated
        self.max_cost = max_cost
        self.cost = 0

    def charge(self, tag: int, pos: int) -> None:
        self.cost += TERM_COST[tag]
        if self.cost > self.max_cost:
            raise self.fail(f"term exceeds the decode budget of {self.max_cost}", pos)

    def fail(self, message: str, pos: int) -> TermError:
        # Offsets in a compressed term count in the inflated term, whose
        # version byte 131 is offset 0.
        return TermError(message + (" (in the inflated term)" if self.inflated else ""), pos)

    def need(self, pos: int, n: int, what: str) -> None:
        if pos + n > len(self.data):
            raise self.fail(f"truncated {what}: needs {n} bytes, {len(self.data) - pos} left", pos)

    def u8(self, pos: int, what: str) -> int:
        self.need(pos, 1, what)
        return self.data[pos]

    def u16(self, pos: int, what: str) -> int:
        self.need(pos, 2, what)
        return int(struct.unpack_from(">H", self.data, pos)[0])

    def u32(self, pos: int, what: str) -> int:
        self.need(pos, 4, what)
        return int(struct.unpack_from(">I", self.data, pos)[0])

    def term(self, pos: int, depth: int) -> tuple[Any, int]:
        """Decode the term whose tag is at ``pos``; return it and the offset after it."""
        tag = self.u8(pos, "term")
        self.charge(tag, pos)
        p = pos + 1
        if tag == SMALL_INTEGER_EXT:
            return self.u8(p, "SMALL_INTEGER_EXT"), p + 1
        if tag == INTEGER_EXT:
            self.need(p, 4, "INTEGER_EXT")
            return struct.unpack_from(">i", self.data, p)[0], p + 4
        if tag == NEW_FLOAT_EXT:
            self.need(p, 8, "NEW_FLOAT_EXT")
            value = struct.unpack_from(">d", self.data, p)[0]
            if not math.isfinite(value):
                raise self.fail("float is not finite (Erlang has no NaN or infinity)", pos)
            return value, p + 8
        if tag == FLOAT_EXT:
            return self.string_float(pos)
        if tag in _ATOM_TAGS:
            name, end = self.atom_text(pos)
            return (_SPECIAL_ATOMS[name] if name in _SPECIAL_ATOMS else Atom(name)), end
        if tag in (SMALL_TUPLE_EXT, LARGE_TUPLE_EXT):
            if tag == SMALL_TUPLE_EXT:
                arity, p = self.u8(p, "SMALL_TUPLE_EXT arity"), p + 1
            else:
                arity, p = self.u32(p, "LARGE_TUPLE_EXT arity"), p + 4
            self.check_count(p, arity, 1, "tuple")
            self.check_depth(depth, pos)
            items = []
            for _ in range(arity):
                item, p = self.term(p, depth + 1)
                items.append(item)
            return tuple(items), p
        if tag == NIL_EXT:
            return [], p
        if tag == STRING_EXT:
            length = self.u16(p, "STRING_EXT length")
            p += 2
            self.need(p, length, "STRING_EXT")
            return list(self.data[p : p + length]), p + length
        if tag == LIST_EXT:
            return self.list(pos, depth)
        if tag == BINARY_EXT:
            length = self.u32(p, "BINARY_EXT length")
            p += 4
            self.need(p, length, "BINARY_EXT")
            return bytes(self.data[p : p + length]), p + length
        if tag == BIT_BINARY_EXT:
            length = self.u32(p, "BIT_BINARY_EXT length")
            bits = self.u8(p + 4, "BIT_BINARY_EXT bits")
            p += 5
            if length == 0 or not 1 <= bits <= 8:
                raise self.fail(
                    f"BIT_BINARY_EXT needs at least one byte and 1..8 bits, "
                    f"got {length} bytes and {bits} bits",
                    pos,
                )
            self.need(p, length, "BIT_BINARY_EXT")
            data = bytes(self.data[p : p + length])
            return (data if bits == 8 else BitString(data, bits)), p + length
        if tag in (SMALL_BIG_EXT, LARGE_BIG_EXT):
            if tag == SMALL_BIG_EXT:
                n, p = self.u8(p, "SMALL_BIG_EXT length"), p + 1
            else:
                n, p = self.u32(p, "LARGE_BIG_EXT length"), p + 4
            if n > self.max_big:
                raise self.fail(f"bignum of {n} bytes is above the limit {self.max_big}", pos)
            sign = self.u8(p, "bignum sign")
            if sign > 1:
                raise self.fail(f"bignum sign byte is {sign}, not 0 or 1", p)
            p += 1
            self.need(p, n, "bignum digits")
            value = int.from_bytes(self.data[p : p + n], "little")
            return (-value if sign else value), p + n
        if tag == MAP_EXT:
            return self.map(pos, depth)
        if tag in _OPAQUE_TAGS:
            end = self.opaque_end(pos, depth)
            return _OPAQUE_TAGS[tag](bytes(self.data[pos:end])), end
        raise self.fail(f"unknown tag {tag}", pos)

    def check_depth(self, depth: int, pos: int) -> None:
        if depth >= self.max_depth:
            raise self.fail(f"nesting deeper than the limit {self.max_depth}", pos)

    def check_count(self, pos: int, count: int, size: int, what: str) -> None:
        # Each element takes at least ``size`` bytes: reject a count that the
        # remaining input cannot back before doing any work for it.
        left = len(self.data) - pos
        if count * size > left:
            raise self.fail(f"{what} claims {count} elements but only {left} bytes follow", pos)

    def string_float(self, pos: int) -> tuple[float, int]:
        self.need(pos + 1, 31, "FLOAT_EXT")
        text = bytes(self.data[pos + 1 : pos + 32]).split(b"\0", 1)[0]
        try:
            value = float(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise self.fail(f"FLOAT_EXT is not a number: {text!r}", pos) from None
        if not math.isfinite(value):
            raise self.fail("float is not finite (Erlang has no NaN or infinity)", pos)
        return value, pos + 32

    def atom_text(self, pos: int) -> tuple[str, int]:
        tag = self.u8(pos, "atom")
        if tag not in _ATOM_TAGS:
            raise self.fail(f"expected an atom, found tag {tag}", pos)
        if tag in (SMALL_ATOM_EXT, SMALL_ATOM_UTF8_EXT):
            length, p = self.u8(pos + 1, "atom length"), pos + 2
        else:
            length, p = self.u16(pos + 1, "atom length"), pos + 3
        self.need(p, length, "atom text")
        raw = bytes(self.data[p : p + length])
        if tag in (ATOM_EXT, SMALL_ATOM_EXT):
            name = raw.decode("latin-1")
        else:
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise self.fail("atom text is not valid UTF-8", pos) from None
        if len(name) > _MAX_ATOM_CHARS:
            raise self.fail(f"atom of {len(name)} characters is longer than 255", pos)
        return name, p + length

    def list(self, pos: int, depth: int) -> tuple[Any, int]:
        length = self.u32(pos + 1, "LIST_EXT length")
        p = pos + 5
        self.check_count(p, length, 1, "list")
        self.check_depth(depth, pos)
        items = []
        for _ in range(length):
            item, p = self.term(p, depth + 1)
            items.append(item)
        tail, p = self.term(p, depth + 1)
        if isinstance(tail, list):
            return items + tail, p
        if isinstance(tail, ImproperList):
            return ImproperList(items + tail.items, tail.tail), p
        if not items:
            return tail, p
        return ImproperList(items, tail), p

    def map(self, pos: int, depth: int) -> tuple[Any, int]:
        arity = self.u32(pos + 1, "MAP_EXT arity")
        p = pos + 5
        self.check_count(p, arity, 2, "map")
        self.check_depth(depth, pos)
        pairs = []
        for _ in range(arity):
            key, p = self.term(p, depth + 1)
            value, p = self.term(p, depth + 1)
            pairs.append((key, value))
        return _make_map(pairs), p

    def opaque_end(self, pos: int, depth: int) -> int:
        """Validate the pid/port/reference/fun/export at ``pos``; return its end."""
        tag = self.data[pos]
        p = pos + 1
        if tag in (NEW_PID_EXT, PID_EXT, NEW_PORT_EXT, V4_PORT_EXT, PORT_EXT, REFERENCE_EXT):
            _, p = self.atom_text(p)
            size = {
                NEW_PID_EXT: 12, PID_EXT: 9, NEW_PORT_EXT: 8,
                V4_PORT_EXT: 12, PORT_EXT: 5, REFERENCE_EXT: 5,
            }[tag]  # fmt: skip
            self.need(p, size, "pid, port or reference")
            return p + size
        if tag in (NEWER_REFERENCE_EXT, NEW_REFERENCE_EXT):
            words = self.u16(p, "reference length")
            if not 1 <= words <= 5:
                raise self.fail(f"reference with {words} ID words (1..5 allowed)", pos)
            _, p = self.atom_text(p + 2)
            size = (4 if tag == NEWER_REFERENCE_EXT else 1) + 4 * words
            self.need(p, size, "reference")
            return p + size
        if tag == NEW_FUN_EXT:
            size = self.u32(p, "NEW_FUN_EXT size")
            if size < 4:
                raise self.fail(f"NEW_FUN_EXT size {size} is below 4", pos)
            self.need(p, size, "NEW_FUN_EXT")
            return p + size
        self.check_depth(depth, pos)
        if tag == EXPORT_EXT:
            _, p = self.atom_text(p)
            _, p = self.atom_text(p)
            if self.u8(p, "export arity") != SMALL_INTEGER_EXT:
                raise self.fail("export arity is not a small integer", p)
            self.need(p + 1, 1, "export arity")
            return p + 2
        # FUN_EXT: NumFree, Pid, Module, Index, Uniq, FreeVars.
        free = self.u32(p, "FUN_EXT free variable count")
        p += 4
        self.check_count(p, free, 1, "FUN_EXT free variables")
        pid, p = self.term(p, depth + 1)
        if not isinstance(pid, Pid):
            raise self.fail("FUN_EXT without a pid", pos)
        _, p = self.atom_text(p)
        for what in ("index", "uniq"):
            # The tag decides, before the term is read (as the C decoder does).
            tag = self.u8(p, "term")
            if tag not in (SMALL_INTEGER_EXT, INTEGER_EXT, SMALL_BIG_EXT, LARGE_BIG_EXT):
                self.charge(tag, p)
                raise self.fail(f"FUN_EXT {what} is not an integer", p)
            _, p = self.term(p, depth + 1)
        for _ in range(free):
            _, p = self.term(p, depth + 1)
        return p


_OPAQUE_TAGS: dict[int, type[Opaque]] = {
    NEW_PID_EXT: Pid,
    PID_EXT: Pid,
    NEW_PORT_EXT: Port,
    V4_PORT_EXT: Port,
    PORT_EXT: Port,
    NEWER_REFERENCE_EXT: Reference,
    NEW_REFERENCE_EXT: Reference,
    REFERENCE_EXT: Reference,
    NEW_FUN_EXT: Fun,
    FUN_EXT: Fun,
    EXPORT_EXT: Export,
}


def _make_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any] | Map:
    """A dict when Python can hold every key apart, else a ``Map``."""
    try:
        result = dict(pairs)
    except TypeError:  # an unhashable key
        return Map(pairs)
    if len(result) != len(pairs):  # keys equal in Python, distinct in Erlang
        return Map(pairs)
    return result


def decode(
    data: bytes | bytearray | memoryview,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_big_bytes: int = DEFAULT_MAX_BIG_BYTES,
    max_inflated: int = DEFAULT_MAX_INFLATED,
    max_cost: int = DEFAULT_MAX_COST,
) -> Any:
    """Decode one complete term, version byte included.

    Raises ``TermError`` (and nothing else) for anything that is not exactly
    one valid term within the limits: a missing version byte, an unknown tag,
    truncation, trailing bytes, nesting deeper than ``max_depth``, a bignum of
    more than ``max_big_bytes`` bytes, a compressed term that would inflate
    past ``max_inflated`` bytes or does not inflate to the size it claims,
    tags whose ``TERM_COST`` adds up to more than ``max_cost`` (the error is
    at the tag that went over).
    """
    return decode_cost(
        data,
        max_depth=max_depth,
        max_big_bytes=max_big_bytes,
        max_inflated=max_inflated,
        max_cost=max_cost,
    )[0]


def decode_cost(
    data: bytes | bytearray | memoryview,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_big_bytes: int = DEFAULT_MAX_BIG_BYTES,
    max_inflated: int = DEFAULT_MAX_INFLATED,
    max_cost: int = DEFAULT_MAX_COST,
) -> tuple[Any, int]:
    """``decode``, and the term's cost (the sum of its tags' ``TERM_COST``)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"decode needs bytes, not {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise TermError("empty input, expected version byte 131", 0)
    if data[0] != VERSION:
        raise TermError(f"expected version byte 131, found {data[0]}", 0)
    inflated = len(data) > 1 and data[1] == COMPRESSED
    if inflated:
        data = _inflate(data, max_inflated)
    _ensure_recursion(min(max_depth, len(data)))  # each level takes at least a byte
    decoder = _Decoder(data, max_depth, max_big_bytes, inflated, max_cost)
    value, end = decoder.term(1, 0)
    if end != len(data):
        raise decoder.fail(f"{len(data) - end} trailing bytes after the term", end)
    return value, decoder.cost


def _inflate(data: bytes, max_inflated: int) -> bytes:
    """Inflate ``131, 80, Size:32, Zlib`` into ``131`` + the term, bounded."""
    if len(data) < 6:
        raise TermError("truncated compressed term header", 1)
    size = int(struct.unpack_from(">I", data, 2)[0])
    if size > max_inflated:
        raise TermError(
            f"compressed term inflates to {size} bytes, above the limit {max_inflated}", 2
        )
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data[6:], size)
    except zlib.error as exc:
        raise TermError(f"compressed term is not valid zlib data ({exc})", 6) from None
    if len(out) != size or inflater.unconsumed_tail or not inflater.eof:
        raise TermError(f"compressed term does not inflate to the {size} bytes it claims", 6)
    if inflater.unused_data:
        raise TermError(
            f"{len(inflater.unused_data)} trailing bytes after the compressed term",
            len(data) - len(inflater.unused_data),
        )
    return bytes([VERSION]) + out


# ----------------------------------------------------------------------------
# Encoding


def encode(
    obj: Any, *, compressed: bool | int = False, max_depth: int = DEFAULT_MAX_DEPTH
) -> bytes:
    """Encode ``obj`` as one term, version byte included.

    Emits what OTP 26+ ``term_to_binary/1`` emits for the same term: UTF-8
    atoms, tag 70 floats, ``STRING_EXT`` for lists of 1..65535 integers in
    0..255.  ``compressed`` (``True`` or a zlib level 1..9) wraps the term in
    tag 80.  Raises ``TypeError`` for a value with no Erlang term (naming its
    type) and ``TermError`` for a value that cannot be a term (a non-finite
    float, an atom over 255 characters, nesting deeper than ``max_depth``,
    which also catches cycles).
    """
    _ensure_recursion(max_depth)
    out = bytearray([VERSION])
    _encode(obj, out, 0, max_depth)
    if compressed:
        level = 6 if compressed is True else int(compressed)
        body = bytes(out[1:])
        return (
            bytes([VERSION, COMPRESSED]) + struct.pack(">I", len(body)) + zlib.compress(body, level)
        )
    return bytes(out)


def _encode(obj: Any, out: bytearray, depth: int, max_depth: int) -> None:
    kind = type(obj)
    if kind is bool or obj is None:
        _encode_atom("undefined" if obj is None else ("true" if obj else "false"), out)
    elif kind is int:
        _encode_int(obj, out)
    elif kind is float:
        _encode_float(obj, out)
    elif kind is Atom:
        _encode_atom(obj, out)
    elif kind is str:
        _encode_binary(_utf8(obj), out)
    elif kind is bytes or kind is bytearray or kind is memoryview:
        _encode_binary(bytes(obj), out)
    elif kind is tuple:
        _check_depth(depth, max_depth)
        if len(obj) <= 255:
            out += bytes([SMALL_TUPLE_EXT, len(obj)])
        else:
            out.append(LARGE_TUPLE_EXT)
            out += struct.pack(">I", len(obj))
        for item in obj:
            _encode(item, out, depth + 1, max_depth)
    elif kind is list:
        _encode_list(obj, out, depth, max_depth)
    elif kind is dict or kind is Map:
        _check_depth(depth, max_depth)
        out.append(MAP_EXT)
        out += struct.pack(">I", len(obj))
        for key, value in obj.items():
            _encode(key, out, depth + 1, max_depth)
            _encode(value, out, depth + 1, max_depth)
    elif kind is ImproperList:
        _check_depth(depth, max_depth)
        out.append(LIST_EXT)
        out += struct.pack(">I", len(obj.items))
        for item in obj.items:
            _encode(item, out, depth + 1, max_depth)
        _encode(obj.tail, out, depth + 1, max_depth)
    elif kind is BitString:
        out.append(BIT_BINARY_EXT)
        out += struct.pack(">IB", len(obj.data), obj.bits)
        out += obj.data
    elif isinstance(obj, Opaque):
        out += obj.raw
    else:
        _encode_subclass(obj, out, depth, max_depth)


def _encode_subclass(obj: Any, out: bytearray, depth: int, max_depth: int) -> None:
    # Subclasses of the built-in types encode as their base type (an IntEnum
    # as an int, a namedtuple as a tuple); an Atom subclass stays an atom.
    bases: tuple[type[Any], ...] = (int, float, Atom, str, bytes, bytearray, tuple, list, dict)
    for base in bases:
        if isinstance(obj, base):
            _encode(base(obj), out, depth, max_depth)
            return
    raise TypeError(
        f"cannot encode {type(obj).__module__}.{type(obj).__qualname__} as an Erlang term"
    )


def _check_depth(depth: int, max_depth: int) -> None:
    if depth >= max_depth:
        raise TermError(f"value nested deeper than the limit {max_depth} (or cyclic)")


def _encode_int(value: int, out: bytearray) -> None:
    if 0 <= value <= 255:
        out += bytes([SMALL_INTEGER_EXT, value])
    elif -(2**31) <= value < 2**31:
        out.append(INTEGER_EXT)
        out += struct.pack(">i", value)
    else:
        magnitude = abs(value)
        digits = magnitude.to_bytes((magnitude.bit_length() + 7) // 8, "little")
        if len(digits) <= 255:
            out += bytes([SMALL_BIG_EXT, len(digits)])
        else:
            out.append(LARGE_BIG_EXT)
            out += struct.pack(">I", len(digits))
        out.append(1 if value < 0 else 0)
        out += digits


def _encode_float(value: float, out: bytearray) -> None:
    if not math.isfinite(value):
        raise TermError(f"{value!r} has no Erlang term (Erlang floats are finite)")
    out.append(NEW_FLOAT_EXT)
    out += struct.pack(">d", value)


def _encode_atom(name: str, out: bytearray) -> None:
    if len(name) > _MAX_ATOM_CHARS:
        raise TermError(f"atom of {len(name)} characters is longer than 255")
    text = _utf8(name)
    if len(text) <= 255:
        out += bytes([SMALL_ATOM_UTF8_EXT, len(text)])
    else:
        out.append(ATOM_UTF8_EXT)
        out += struct.pack(">H", len(text))
    out += text


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TermError(
            f"text holds a lone surrogate at index {exc.start}, which is not Unicode "
            "and has no UTF-8 form"
        ) from None


def _encode_binary(data: bytes, out: bytearray) -> None:
    out.append(BINARY_EXT)
    out += struct.pack(">I", len(data))
    out += data


def _encode_list(items: list[Any], out: bytearray, depth: int, max_depth: int) -> None:
    if not items:
        out.append(NIL_EXT)
        return
    if len(items) <= 65535 and all(type(i) is int and 0 <= i <= 255 for i in items):
        out.append(STRING_EXT)
        out += struct.pack(">H", len(items))
        out += bytes(items)
        return
    _check_depth(depth, max_depth)
    out.append(LIST_EXT)
    out += struct.pack(">I", len(items))
    for item in items:
        _encode(item, out, depth + 1, max_depth)
    out.append(NIL_EXT)
