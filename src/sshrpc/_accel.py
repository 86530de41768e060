"""Which codec and frame buffer run: the C fast path, or the pure-Python
reference when the compiled module is missing.

Every other module takes ``decode``, ``decode_cost``, ``encode``,
``encode_frame`` and
``FrameBuffer`` from here.  Without the C module (a platform with no wheel
and no compiler, or ``SSHRPC_PURE_PYTHON=1`` in the environment) sshrpc still
works, on ``sshrpc._etf`` and ``sshrpc._pyframing``, and logs one warning at
import saying what that costs.  ``sshrpc.c_accelerated`` tells which is in
use.
"""

from __future__ import annotations

import logging
import os
import struct
from typing import Any

__all__ = [
    "FrameBuffer",
    "c_accelerated",
    "decode",
    "decode_cost",
    "encode",
    "encode_direct",
    "encode_frame",
]

#: Why the C module is not in use ("" when it is).
fallback_reason = ""
if os.environ.get("SSHRPC_PURE_PYTHON", "") not in ("", "0"):
    fallback_reason = "SSHRPC_PURE_PYTHON is set"
else:
    try:
        from ._codec import _direct as encode_direct
        from ._codec import decode, decode_cost, encode, encode_frame
        from ._framing import FrameBuffer
    except ImportError as exc:
        fallback_reason = str(exc)

#: True when the C codec and frame buffer are in use.
c_accelerated = not fallback_reason

if not c_accelerated:
    from ._etf import decode, decode_cost, encode
    from ._pyframing import FrameBuffer  # type: ignore[assignment]

    def encode_direct(obj: Any, max_depth: int, reserve: int) -> bytes | None:
        """The C module's direct encoder: without it, it declines everything."""
        return None

    def encode_frame(obj: Any) -> bytes:
        """``obj`` encoded as one frame: a 4-byte big-endian length, then the term."""
        payload = encode(obj)
        return struct.pack(">I", len(payload)) + payload

    logging.getLogger("sshrpc").warning(
        "sshrpc: running without its C module (%s): the pure-Python codec and frame "
        "buffer are in use, 1-40x slower to encode and decode (the ref/C column of "
        "bench/codec.py); install a wheel or build from source with a C compiler",
        fallback_reason,
    )
