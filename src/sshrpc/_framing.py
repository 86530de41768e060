"""Channel reads -> frame payloads: the reassembly buffer.  No I/O.

A frame is a 4-byte big-endian length and that many payload bytes
(PROTOCOL.md section 2); length 0 is a keepalive and is skipped.  The buffer
takes reads of any size -- one byte at a time or many frames at once -- and
hands out each complete payload as ``bytes``.

Theory of operation: the bytes live in one C buffer (csrc/framing.c).
``feed`` appends; ``next_frame``, when its queue of ready payloads is empty,
asks C to walk every complete frame at the front of the buffer and copies
each payload out once, in a batch.  Appending is amortised linear (the unread
tail, always shorter than one frame, is moved at most once per growth), so
neither tiny reads nor large ones copy quadratically.  The length check runs
on the header alone: a frame longer than ``max_frame`` raises
``FrameTooLarge`` as soon as its 4 header bytes are here, before any of its
payload needs to be buffered.
"""

from __future__ import annotations

import array
from collections import deque

from ._errors import FrameTooLarge
from ._sshrpc_c import ffi, lib

__all__ = ["FrameBuffer", "MAX_FRAME_LIMIT", "encode_length"]

#: The largest length a 4-byte header can carry.
MAX_FRAME_LIMIT = 2**32 - 1
# Frames extracted per C call; bounds the batch, not the frame count.
_BATCH = 1024


def encode_length(length: int) -> bytes:
    """The 4-byte big-endian header of a payload of ``length`` bytes."""
    return length.to_bytes(4, "big")


def _new_buffer() -> object:
    fb = lib.sshrpc_fb_new()
    if fb == ffi.NULL:
        raise MemoryError("cannot allocate a frame buffer")
    return ffi.gc(fb, lib.sshrpc_fb_free)


class FrameBuffer:
    """Reassembles frames from channel reads.

    ``max_frame`` is the largest payload accepted; it may be changed at any
    time (the protocol raises it after the hello) and applies to every frame
    whose header has not yet been checked.  After ``FrameTooLarge`` the
    buffer stays broken: every later ``next_frame`` raises the same error,
    since the stream cannot be resynchronised.
    """

    __slots__ = ("_error", "_fb", "_max_frame", "_ready", "_span_array", "_spans", "_too_large")

    def __init__(self, max_frame: int) -> None:
        self._fb = _new_buffer()
        self._ready: deque[bytes] = deque()
        self._span_array = array.array("Q", bytes(16 * _BATCH))
        self._spans = ffi.cast("size_t *", ffi.from_buffer(self._span_array))
        self._too_large = ffi.new("uint32_t *")
        self._error: FrameTooLarge | None = None
        self._max_frame = 0
        self.max_frame = max_frame

    @property
    def max_frame(self) -> int:
        """The largest payload accepted, in bytes (0 to 2**32-1)."""
        return self._max_frame

    @max_frame.setter
    def max_frame(self, value: int) -> None:
        if type(value) is not int or not 0 <= value <= MAX_FRAME_LIMIT:
            raise ValueError(f"max_frame must be an integer in 0..2**32-1, not {value!r}")
        self._max_frame = value

    @property
    def buffered(self) -> int:
        """Bytes held: ready payloads plus the not yet complete frame."""
        fb = self._fb
        held: int = fb.end - fb.start  # type: ignore[attr-defined]
        return sum(map(len, self._ready)) + held

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append one channel read (any length, even 0).  Raises ``MemoryError``
        if the buffer cannot grow (nothing is appended then)."""
        if not data:
            return
        if lib.sshrpc_fb_feed(self._fb, ffi.from_buffer(data), len(data)) != 0:
            raise MemoryError(f"cannot grow the frame buffer by {len(data)} bytes")

    def next_frame(self) -> bytes | None:
        """The next complete payload, or ``None`` when more data is needed.

        Keepalives are skipped.  Raises ``FrameTooLarge`` when the next
        frame's header announces more than ``max_frame`` bytes.
        """
        ready = self._ready
        if ready:
            return ready.popleft()
        if self._error is not None:
            raise self._error
        fb = self._fb
        spans = self._spans
        count = lib.sshrpc_fb_scan(fb, self._max_frame, spans, _BATCH, self._too_large)
        if count:
            # One copy of the batch's bytes, then one slice per payload: fewer
            # Python-level operations per frame than slicing the C memory.
            blob = ffi.buffer(fb.data, fb.start)[:]  # type: ignore[attr-defined]
            pairs = iter(self._span_array[: 2 * count])
            ready.extend(
                [blob[start : start + length] for start, length in zip(pairs, pairs, strict=False)]
            )
            return ready.popleft()
        if self._too_large[0]:
            self._error = FrameTooLarge(int(self._too_large[0]), self._max_frame)
            lib.sshrpc_fb_clear(fb)
            raise self._error
        return None
