"""Helpers shared by the fuzz targets: strict value comparison and decoder calls.

No I/O, no atheris: the targets stay importable (and their regression inputs
replayable) where atheris is not installed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import sshrpc
import sshrpc._etf
from sshrpc import ImproperList, Map, TermError

#: The limits the protocol decodes frames with (max_frame 1 MiB bounds the
#: inflated size); the other limits are the codec defaults.
MAX_INFLATED = 1 << 20

Decoder = Callable[..., Any]

#: The decoders that must agree: the pure-Python reference and the public
#: entry point (the C fast path once sshrpc._codec uses it).
DECODERS: dict[str, Decoder] = {"reference": sshrpc._etf.decode, "sshrpc": sshrpc.decode}
ENCODERS: dict[str, Callable[..., bytes]] = {
    "reference": sshrpc._etf.encode,
    "sshrpc": sshrpc.encode,
}


def same(a: Any, b: Any) -> bool:
    """True when ``a`` and ``b`` are the same value of the same types all the
    way down: ``1``, ``1.0`` and ``True`` differ, as do ``0.0`` and ``-0.0``,
    a ``dict`` and a ``Map``, and two dicts with the same items in another order."""
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        kind = type(x)
        if kind is not type(y):
            return False
        if kind is float:
            if struct.pack(">d", x) != struct.pack(">d", y):
                return False
        elif kind is list or kind is tuple:
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y, strict=True))
        elif kind is dict or kind is Map:
            if len(x) != len(y):
                return False
            for (k1, v1), (k2, v2) in zip(x.items(), y.items(), strict=True):
                stack.append((k1, k2))
                stack.append((v1, v2))
        elif kind is ImproperList:
            stack.append((x.items, y.items))
            stack.append((x.tail, y.tail))
        elif x != y:
            return False
    return True


def attempt(decode: Decoder, data: bytes) -> Any:
    """``decode(data)`` with the protocol's limits, or the ``TermError`` it raised.

    Any other exception propagates: only ``TermError`` is documented.
    """
    try:
        return decode(data, max_inflated=MAX_INFLATED)
    except TermError as exc:
        return exc
