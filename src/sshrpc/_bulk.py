"""Terms holding large binaries, encoded with each large binary copied once.
No I/O.

The direct encoder (csrc/pyenc.c) declines binaries of ``BIG`` bytes or
more, and the pickle path behind it copies such a binary about four times
(into the pickle stream, joining the stream's chunks, splicing it back into
the ETF, joining the frame): 11 ms for a 16 MiB argument, all of it before
the first byte leaves.  ``encode_big`` takes the shapes large data has in
calls and answers -- a large binary as the term, or inside lists and tuples
(at most ``LEVELS`` deep, ``WIDTH`` elements each) -- and writes the frame
as pieces: the container headers, each large binary's 5-byte header and the
binary itself by reference, and every other element as the codec encodes
it alone (ETF is context-free: an element's bytes do not depend on where it
sits).  One ``join`` then copies each large binary once.  The bytes are
exactly the reference's (tests/test_bulk_codec.py, hypothesis); anything
else, and any error, is left to the usual path, which answers or raises.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import Any

__all__ = ["BIG", "DIRECT_WRITE_MAX", "encode_big", "term_parts", "tune_malloc"]

#: Binaries at least this long travel by reference (the direct encoder's
#: limit, PYENC_BIG_BINARY in csrc/pyenc.c).
BIG = 64 * 1024
#: Containers looked into, and elements per container: bounds the Python
#: work spent before handing a term to the usual path.
LEVELS = 4
WIDTH = 64
_U32_MAX = 0xFFFFFFFF
#: The node writes answers up to this many bytes straight to the channel
#: from the task that made them (``_Channel._queue``/``_flush``); a larger
#: one goes to the writer task whole, which sends it from a memoryview: a
#: direct write takes only a pipe's worth, and the rest of a 16 MiB answer
#: was copied (1.3 ms, more when its memory is fresh) to be queued.
DIRECT_WRITE_MAX = 256 * 1024
_VERSION = b"\x83"


def _holds_big(obj: Any, level: int) -> bool:
    kind = type(obj)
    if kind is bytes or kind is bytearray:
        return len(obj) >= BIG
    if (kind is tuple or kind is list) and level < LEVELS and 0 < len(obj) <= WIDTH:
        return any(_holds_big(item, level + 1) for item in obj)
    return False


def _parts(
    obj: Any, depth: int, max_depth: int, out: list[Any], leaf: Callable[..., bytes]
) -> bool:
    """Append the ETF of ``obj`` at ``depth`` (no version byte) to ``out``;
    False when this path does not take it."""
    kind = type(obj)
    if (kind is bytes or kind is bytearray) and len(obj) >= BIG:
        if len(obj) > _U32_MAX:
            return False
        # A bytearray is copied now: the caller may change it later.
        out += (b"m" + len(obj).to_bytes(4, "big"), obj if kind is bytes else bytes(obj))
        return True
    if (kind is tuple or kind is list) and _holds_big(obj, depth):
        if depth >= max_depth:
            return False  # the usual path raises the depth error
        # (WIDTH <= 255: a small tuple; a list holding a binary is no string)
        out.append(bytes((104, len(obj))) if kind is tuple else b"l" + len(obj).to_bytes(4, "big"))
        for item in obj:
            if not _parts(item, depth + 1, max_depth, out, leaf):
                return False
        if kind is list:
            out.append(b"j")
        return True
    # Any other element: the codec's own bytes for it, as deep as it may go.
    out.append(memoryview(leaf(obj, max_depth=max_depth - depth))[1:])
    return True


def term_parts(
    obj: Any, max_depth: int, leaf: Callable[..., bytes]
) -> tuple[list[Any], int] | None:
    """``obj``'s ETF without the version byte as pieces to join (each large
    binary by reference) and their total length; or None, as ``encode_big``."""
    if not _holds_big(obj, 0):
        return None
    out: list[Any] = []
    try:
        if not _parts(obj, 0, max_depth, out, leaf):
            return None
    except Exception:
        return None
    return out, sum(map(len, out))


def encode_big(obj: Any, max_depth: int, reserve: int, leaf: Callable[..., bytes]) -> bytes | None:
    """``obj``'s ETF (version byte included) after ``reserve`` bytes (0, or
    4: then they hold the term's length, a frame), built from pieces with
    each large binary copied once; or None when ``obj`` holds no large
    binary where this path looks, or anything fails (the usual path then
    encodes or raises).  ``leaf(value, max_depth=...)`` encodes the other
    elements (the codec's ``encode``)."""
    parts = term_parts(obj, max_depth, leaf)
    if parts is None:
        return None
    out, size = parts
    size += 1
    if size > _U32_MAX:
        return None
    head = _VERSION if not reserve else bytes(reserve - 4) + size.to_bytes(4, "big") + _VERSION
    return b"".join([head, *out])


# -- fresh memory ------------------------------------------------------------

#: glibc's mallopt parameters, and its ceiling for M_MMAP_THRESHOLD (64-bit).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_CEILING = 32 << 20
#: The most freed memory ``tune_malloc`` lets a process keep.
KEEP_CEILING = 1 << 30
_kept = 0


def tune_malloc(max_frame: int) -> bool:
    """Let this process reuse the memory of large frames instead of getting
    it fresh from the kernel each time; True if glibc took the settings.

    A frame of several MiB passes through a few buffers of its size (the
    reassembled payload, the decoded binary, an answer).  glibc gives
    blocks that large back to the kernel when they are freed, and the next
    frame's buffers are then faulted in page by page: about 0.5 ms per MiB
    here (a virtual machine), 8 ms per 16 MiB buffer, more than copying it.
    With frames up to ``max_frame`` allowed, this sets glibc's mmap
    threshold to its ceiling (32 MiB: smaller blocks come from the heap)
    and lets the heap keep up to 3 x ``max_frame`` (at most 1 GiB) of freed
    memory for reuse.  Does nothing for ``max_frame`` up to 1 MiB (the
    default), on other C libraries, or with ``SSHRPC_NO_MALLOC_TUNING`` set;
    only ever raises what it set before.  Process-wide: ``sshrpc serve``
    and ``sshrpc node`` call it, and ``connect_node`` when a connection
    allows frames above 1 MiB."""
    global _kept
    if max_frame <= 1 << 20 or os.environ.get("SSHRPC_NO_MALLOC_TUNING"):
        return False
    keep = min(3 * max_frame, KEEP_CEILING)
    if keep <= _kept:
        return True
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):
            return False  # not glibc: its mallopt may mean something else
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if not mallopt(_M_MMAP_THRESHOLD, _MMAP_CEILING) or not mallopt(_M_TRIM_THRESHOLD, keep):
        return False
    _kept = keep
    return True
