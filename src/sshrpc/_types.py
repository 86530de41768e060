"""Python values for Erlang terms that have no native Python twin. No I/O.

The mapping (PROTOCOL.md section 8, docs/types.md):

- ``Atom`` is a ``str`` subclass, so atoms compare and hash like their names
  and can be used wherever a name is expected.  ``True``/``False`` are the
  atoms ``true``/``false``; ``None`` is the atom ``undefined``.
- A Python ``str`` is encoded as a UTF-8 *binary*, never as an atom or a
  list: it is the only one-way mapping (it decodes as ``bytes``).  Callers that
  want an atom say so with ``Atom(...)``.
- ``BitString`` is a bitstring whose length is not a multiple of 8.
- ``ImproperList`` is a list whose tail is not ``[]``.
- ``Map`` holds the pairs of an Erlang map that a ``dict`` cannot hold
  (unhashable keys, or keys that are distinct in Erlang but equal in Python,
  such as ``1``, ``1.0`` and ``true``).
- ``Pid``, ``Port``, ``Reference``, ``Fun`` and ``Export`` are opaque: they
  keep the exact bytes they arrived as and re-encode them byte for byte.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = [
    "Atom",
    "BitString",
    "Export",
    "Fun",
    "ImproperList",
    "Map",
    "Opaque",
    "Pid",
    "Port",
    "Reference",
]


class Atom(str):
    """An Erlang atom.  At most 255 characters (checked by the encoder)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Atom({str.__repr__(self)})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Atom, (str(self),))


class BitString:
    """A bitstring of ``len(data) * 8 - (8 - bits) % 8`` bits.

    ``bits`` is the number of significant (high) bits of the last byte,
    1 to 7; the unused low bits are kept at zero so equal bitstrings have
    equal bytes.  A whole number of bytes is a ``bytes`` value instead.
    """

    __slots__ = ("bits", "data")

    def __init__(self, data: bytes, bits: int) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError("BitString data must be bytes")
        data = bytes(data)
        if not data or not 1 <= bits <= 7:
            raise ValueError(
                "BitString needs at least one byte and 1..7 bits in the last "
                "byte; use bytes for a whole number of bytes"
            )
        mask = (0xFF << (8 - bits)) & 0xFF
        if data[-1] & ~mask:
            data = data[:-1] + bytes([data[-1] & mask])
        self.data = data
        self.bits = bits

    def __len__(self) -> int:
        """The length in bits."""
        return (len(self.data) - 1) * 8 + self.bits

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BitString):
            return NotImplemented
        return self.data == other.data and self.bits == other.bits

    def __hash__(self) -> int:
        return hash((BitString, self.data, self.bits))

    def __repr__(self) -> str:
        return f"BitString({self.data!r}, {self.bits})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (BitString, (self.data, self.bits))


class ImproperList:
    """An Erlang list whose tail is not ``[]``: ``[1, 2 | tail]``.

    ``items`` is non-empty and ``tail`` is any term other than a list.
    """

    __slots__ = ("items", "tail")

    def __init__(self, items: Iterable[Any], tail: Any) -> None:
        items = list(items)
        if not items:
            raise ValueError("an improper list needs at least one item")
        if isinstance(tail, list | ImproperList):
            raise ValueError("the tail of an improper list cannot be a list")
        self.items = items
        self.tail = tail

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImproperList):
            return NotImplemented
        return self.items == other.items and self.tail == other.tail

    __hash__ = None  # type: ignore[assignment]  # mutable, like list

    def __repr__(self) -> str:
        return f"ImproperList({self.items!r}, {self.tail!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (ImproperList, (self.items, self.tail))


class Map:
    """An Erlang map kept as an ordered list of ``(key, value)`` pairs.

    Decoding gives a ``Map`` only when a ``dict`` would lose or reject a key;
    encoding accepts ``Map`` and ``dict`` alike.  Two ``Map`` values are equal
    when they hold the same pairs in the same order.
    """

    __slots__ = ("pairs",)

    def __init__(self, pairs: Iterable[tuple[Any, Any]] = ()) -> None:
        self.pairs = [(k, v) for k, v in pairs]

    def items(self) -> list[tuple[Any, Any]]:
        return self.pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[Any]:
        return (k for k, _ in self.pairs)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Map):
            return NotImplemented
        return self.pairs == other.pairs

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Map({self.pairs!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Map, (self.pairs,))


class Opaque:
    """A term Python does not look inside, kept as its exact ETF bytes.

    ``raw`` is the term's encoding without the leading version byte 131:
    its tag and everything after it.  Equality and hashing use ``raw``, so a
    pid that travels to Python and back is the same pid to Erlang.
    """

    __slots__ = ("raw",)
    TAGS: frozenset[int] = frozenset()

    def __init__(self, raw: bytes) -> None:
        raw = bytes(raw)
        if not raw or raw[0] not in self.TAGS:
            raise ValueError(
                f"{type(self).__name__} needs the ETF bytes of the term, "
                f"starting with one of the tags {sorted(self.TAGS)}"
            )
        self.raw = raw

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.raw == other.raw

    def __hash__(self) -> int:
        return hash((type(self), self.raw))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.raw!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.raw,))

    @property
    def node(self) -> Atom:
        """The node name carried by a pid, port or reference."""
        tag = self.raw[0]
        if tag not in (88, 89, 90, 101, 102, 103, 114, 120):
            raise AttributeError(f"{type(self).__name__} carries no node name")
        offset = 3 if tag in (90, 114) else 1
        atag = self.raw[offset]
        if atag in (115, 119):
            size, start = self.raw[offset + 1], offset + 2
        else:
            size, start = struct.unpack_from(">H", self.raw, offset + 1)[0], offset + 3
        text = self.raw[start : start + size]
        return Atom(text.decode("latin-1" if atag in (100, 115) else "utf-8"))


def _small_atom_utf8(name: str) -> bytes:
    data = name.encode("utf-8")
    if len(data) > 255:
        raise ValueError("node name too long")
    return bytes([119, len(data)]) + data


class Pid(Opaque):
    """An Erlang process identifier (tags 88 ``NEW_PID_EXT``, 103 ``PID_EXT``)."""

    __slots__ = ()
    TAGS = frozenset({88, 103})

    @classmethod
    def new(cls, node: str, id: int, serial: int = 0, creation: int = 0) -> Pid:
        """Make a ``NEW_PID_EXT`` pid, as a node that owns processes does."""
        return cls(bytes([88]) + _small_atom_utf8(node) + struct.pack(">III", id, serial, creation))

    @property
    def id(self) -> int:
        """The pid's ID field (the ``X`` in ``<N.X.Y>``)."""
        return int(
            struct.unpack_from(">I", self.raw, len(self.raw) - (12 if self.raw[0] == 88 else 9))[0]
        )

    @property
    def serial(self) -> int:
        """The pid's Serial field (the ``Y`` in ``<N.X.Y>``)."""
        return int(
            struct.unpack_from(">I", self.raw, len(self.raw) - (8 if self.raw[0] == 88 else 5))[0]
        )

    def __str__(self) -> str:
        """``<node.X.Y>``, as in logs (the node name as it arrived)."""
        try:
            return f"<{self.node}.{self.id}.{self.serial}>"
        except (ValueError, IndexError, struct.error):
            return "<pid>"


class Port(Opaque):
    """An Erlang port (tags 89 ``NEW_PORT_EXT``, 120 ``V4_PORT_EXT``, 102)."""

    __slots__ = ()
    TAGS = frozenset({89, 102, 120})


class Reference(Opaque):
    """An Erlang reference (tags 90 ``NEWER_REFERENCE_EXT``, 114, 101)."""

    __slots__ = ()
    TAGS = frozenset({90, 101, 114})

    @classmethod
    def new(cls, node: str, words: tuple[int, ...], creation: int = 0) -> Reference:
        """Make a ``NEWER_REFERENCE_EXT`` reference from 1..5 ID words."""
        if not 1 <= len(words) <= 5:
            raise ValueError("a reference has 1 to 5 ID words")
        return cls(
            bytes([90])
            + struct.pack(">H", len(words))
            + _small_atom_utf8(node)
            + struct.pack(f">I{len(words)}I", creation, *words)
        )


class Fun(Opaque):
    """An Erlang fun (tags 112 ``NEW_FUN_EXT``, 117 ``FUN_EXT``)."""

    __slots__ = ()
    TAGS = frozenset({112, 117})


class Export(Opaque):
    """An external fun ``fun M:F/A`` (tag 113 ``EXPORT_EXT``)."""

    __slots__ = ()
    TAGS = frozenset({113})
