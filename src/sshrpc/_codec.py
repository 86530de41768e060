"""Python values <-> ETF bytes, the fast path behind ``sshrpc.encode``/``decode``.

Same contract as the reference codec ``sshrpc._etf`` (which documents it);
the C transcoder in csrc/ does the work.  (Until the C path lands this module
delegates to the reference codec.)
"""

from __future__ import annotations

import struct
from typing import Any

from ._etf import decode, encode

__all__ = ["decode", "encode", "encode_frame"]


def encode_frame(obj: Any) -> bytes:
    """``obj`` encoded as one frame: a 4-byte big-endian length, then the term."""
    payload = encode(obj)
    return struct.pack(">I", len(payload)) + payload
