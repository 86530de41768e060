"""Channel reads -> frame payloads: the reassembly buffer.  No I/O.

A frame is a 4-byte big-endian length and that many payload bytes
(PROTOCOL.md section 2); length 0 is a keepalive and is skipped.  The buffer
takes reads of any size -- one byte at a time or many frames at once -- and
hands out each complete payload as ``bytes``.

Theory of operation.  ``feed`` only queues the read (a ``bytes`` object is
kept as is; other buffers are copied once, since their owner may reuse
them).  ``next_frame`` does the work, lazily, so a ``max_frame`` changed
between two calls (the protocol raises it after the hello) applies to every
frame not yet handed out:

1. If a frame straddles reads, its start sits in a C buffer
   (csrc/framing.c); C appends from the queued reads exactly the bytes that
   frame still needs -- its header, then, if the length is allowed, its
   payload -- and the payload is copied out once.
2. Otherwise C walks the complete frames of the first queued read in place
   and Python slices their payloads out of it, one copy each, a batch at a
   time.  The incomplete tail of a read moves into the C buffer.

So each byte is copied at most twice (into the C buffer, out as a payload)
and mostly once, whatever the read sizes: no quadratic copying for 1-byte
reads or for many frames per read.

3. A straddling frame of ``BIG_FRAME`` bytes or more (bulk, issue 10) is
   reassembled straight into the ``bytes`` object that will be its payload:
   once its header is in, ``_to_big`` makes an uninitialised ``bytes`` of
   its length (``PyBytes_FromStringAndSize(NULL, n)``, as CPython's own C
   code fills new objects: nobody else holds it until it is complete, and
   its pages become resident only as the payload arrives) and ``feed``
   copies each read's share into it.  One copy of a 16 MiB payload, and
   one 16 MiB block, fewer than in 1.  CPython only; elsewhere 1 applies.

A length above ``max_frame`` raises ``FrameTooLarge`` as soon as its 4
header bytes are here; none of its payload is ever copied.
"""

from __future__ import annotations

import array
import ctypes
import itertools
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from ._errors import FrameTooLarge
from ._pyframing import MAX_FRAME_LIMIT, encode_length
from ._reqc import batch_frames as _batch_frames
from ._sshrpc_c import ffi, lib

__all__ = ["MAX_FRAME_LIMIT", "FrameBuffer", "encode_length"]

# Frames found per C call: bounds a batch, not the number of frames.
_BATCH = 1024
# Reads gathered in Python before one C call, while a frame straddles them.
_SMALL = 4096
_OUT_OF_MEMORY = 2**64 - 1 if ffi.sizeof("size_t") == 8 else 2**32 - 1
#: Straddling frames at least this long are reassembled in their payload
#: object (step 3 of the module docstring).
BIG_FRAME = 1 << 20


def _bytes_api() -> tuple[Any, Any] | None:
    """CPython's ``PyBytes_FromStringAndSize`` (called with NULL: a new,
    uninitialised object) and ``PyBytes_AsString``, or None elsewhere."""
    if sys.implementation.name != "cpython":
        return None
    try:
        new = ctypes.pythonapi.PyBytes_FromStringAndSize
        data = ctypes.pythonapi.PyBytes_AsString
    except AttributeError:  # pragma: no cover - a CPython without them
        return None
    new.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    new.restype = ctypes.py_object
    data.argtypes = (ctypes.py_object,)
    data.restype = ctypes.c_void_p
    return new, data


_BYTES_API = _bytes_api()


def _new_buffer() -> object:
    fb = lib.sshrpc_fb_new()
    if fb == ffi.NULL:
        raise MemoryError("cannot allocate a frame buffer")
    return ffi.gc(fb, lib.sshrpc_fb_free)


class FrameBuffer:
    """Reassembles frames from channel reads.

    ``max_frame`` is the largest payload accepted; it may be changed at any
    time and applies to every frame not yet returned.  After
    ``FrameTooLarge`` the buffer stays broken: every later ``next_frame``
    raises the same error, since the stream cannot be resynchronised.
    """

    __slots__ = (
        "_big",
        "_big_at",
        "_big_missing",
        "_big_ptr",
        "_chunk_bytes",
        "_chunks",
        "_error",
        "_fb",
        "_held",
        "_max_frame",
        "_missing",
        "_out",
        "_pos",
        "_ready",
        "_small",
        "_span_array",
        "_spans",
    )

    def __init__(self, max_frame: int) -> None:
        self._fb = _new_buffer()
        self._held = False  # the C buffer holds the start of a frame
        self._ready: deque[bytes] = deque()
        self._chunks: deque[bytes] = deque()
        self._pos = 0  # offset of the first unread byte of _chunks[0]
        self._chunk_bytes = 0  # unread bytes in _chunks
        self._small = bytearray()  # tiny reads gathered for the straddling frame
        # Bytes the straddling frame still needs; kept only while the queue
        # is empty (then ``feed`` gives it bytes directly), else 0.
        self._missing = 0
        self._span_array = array.array("Q", bytes(16 * _BATCH))
        self._spans = ffi.cast("size_t *", ffi.from_buffer(self._span_array))
        self._out = ffi.new("size_t[2]")
        self._error: FrameTooLarge | None = None
        #: A large frame's payload being filled (step 3), the address of its
        #: bytes, how many are in and how many are still missing.
        self._big: bytes | None = None
        self._big_ptr: Any = None
        self._big_at = 0
        self._big_missing = 0
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
        if value < self._max_frame and self._ready:
            # Payloads found under the larger limit: the first one above the
            # new limit ends the stream, after the ones before it.
            for index, payload in enumerate(self._ready):
                if len(payload) > value:
                    kept = list(itertools.islice(self._ready, index))
                    self._max_frame = value
                    self._fail(len(payload))
                    self._ready.extend(kept)
                    break
        self._max_frame = value
        if self._big is not None and len(self._big) > value:
            kept = list(self._ready)
            self._fail(len(self._big))
            self._ready.extend(kept)
        self._unsmall()
        self._missing = 0

    @property
    def buffered(self) -> int:
        """Bytes held and not yet returned (payloads and headers)."""
        fb = self._fb
        held: int = fb.end - fb.start if self._held else 0  # type: ignore[attr-defined]
        if self._big is not None:
            held += 4 + self._big_at
        return sum(map(len, self._ready)) + self._chunk_bytes + len(self._small) + held

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Queue one channel read (any length, even 0).  Never raises for
        the bytes' content (``next_frame`` does); ``MemoryError`` if the
        buffer cannot grow."""
        n = len(data)
        if not n:
            return
        if self._big is not None:
            # 3. A large frame's payload: this read's share goes straight in.
            k = min(n, self._big_missing)
            ffi.memmove(self._big_ptr + self._big_at, data, k)
            self._big_at += k
            self._big_missing -= k
            if not self._big_missing:
                self._ready.append(self._big)
                self._big = self._big_ptr = None
            if k == n:
                return
            data = bytes(memoryview(data)[k:])
            n -= k
        taken = 0
        missing = self._missing
        if missing > 0 and not self._chunks:
            # The straddling frame wants these bytes.  Tiny reads that cannot
            # complete it are gathered here and handed to C in one call.
            small = self._small
            if len(small) + n < missing and len(small) + n <= _SMALL:
                small += data
                return
            if small:
                small += data
                data = bytes(small)
                small.clear()
                n = len(data)
            elif type(data) is not bytes:
                data = bytes(data)
            out = self._out
            taken = lib.sshrpc_fb_fill(self._fb, data, 0, n, self._max_frame, out)
            if taken == _OUT_OF_MEMORY:
                raise MemoryError("cannot grow the frame buffer")
            if taken == n:
                self._missing = out[0]
                return
            self._missing = 0
        elif type(data) is not bytes:
            data = bytes(data)
        if not self._chunks:
            self._pos = taken
        self._chunks.append(data)
        self._chunk_bytes += n - taken

    def peek_batch(self, small: int) -> tuple[bytes, int, int] | None:
        """The leading complete frames of the first queued read whose
        payloads are plain small terms (1 < length <= ``small``, version
        byte 131, not compressed) as one list term, ``(batch, count,
        end)`` (csrc/pyreq.c ``batch_frames``), or None when fewer than two
        are there or the buffer is in any other state (payloads ready, a straddling
        or large frame, an error).  Takes nothing: ``skip_batch(end)``
        does, once the caller has decoded ``batch``; else ``next_frame``
        returns the same payloads one by one."""
        if (
            _batch_frames is None
            or not self._only_reads()
            or self._missing
            or self._small
            or not self._chunks
        ):
            return None
        batch, count, end = _batch_frames(self._chunks[0], self._pos, small, self._max_frame)
        return (batch, count, end) if count > 1 else None

    def _only_reads(self) -> bool:
        """Whether all that is buffered is in the queued reads (no split
        payloads, no frame straddling reads, no error): frames may then be
        taken from the first read in place."""
        return not (self._ready or self._held or self._big is not None or self._error is not None)

    def skip_batch(self, end: int) -> None:
        """Take the first queued read's bytes up to ``end`` (the frames
        ``peek_batch`` returned, or those a walk took in place)."""
        chunk = self._chunks[0]
        self._chunk_bytes -= end - self._pos
        if end == len(chunk):
            self._chunks.popleft()
            self._pos = 0
        else:
            self._pos = end

    def next_frame(self) -> bytes | None:
        """The next complete payload, or ``None`` when more data is needed.

        Keepalives are skipped.  Raises ``FrameTooLarge`` when the next
        frame's length is above ``max_frame``, and ``MemoryError`` if a
        straddling frame cannot be buffered.
        """
        ready = self._ready
        if ready:
            return ready.popleft()
        if self._error is not None:
            raise self._error
        if self._missing > 0 or self._big is not None:  # a straddling frame, still incomplete
            return None
        chunks = self._chunks
        while True:
            if self._held:
                done = self._complete()
                if done is not None or self._held:
                    return done
                continue  # it was a keepalive
            if not chunks:
                return None
            # 2. Frames of the first queued read, found in place.
            chunk = chunks[0]
            pos = self._pos
            size = len(chunk)
            if size - pos >= 4:
                # A read that is exactly one frame (a small request or
                # answer) needs no C call.
                length = int.from_bytes(chunk[pos : pos + 4], "big")
                if pos + 4 + length == size and 0 < length <= self._max_frame:
                    chunks.popleft()
                    self._pos = 0
                    self._chunk_bytes -= size - pos
                    return chunk[pos + 4 :]
            spans = self._spans
            out = self._out
            count = lib.sshrpc_frames_scan(
                chunk, pos, size, self._max_frame, spans, _BATCH, out, out + 1
            )
            end = out[0]
            self._chunk_bytes -= end - pos
            if count:
                pairs = iter(self._span_array[: 2 * count])
                ready.extend(
                    [chunk[start : start + n] for start, n in zip(pairs, pairs, strict=False)]
                )
            if out[1]:
                self._pos = end
                if count:
                    return ready.popleft()
                raise self._fail(int(out[1]))
            if count == _BATCH:
                self._pos = end
                return ready.popleft()
            # The rest of this read is less than one frame: keep it in C.
            chunks.popleft()
            self._pos = 0
            if end != size:
                rest = size - end
                if lib.sshrpc_fb_feed(self._fb, ffi.from_buffer(chunk) + end, rest) != 0:
                    raise MemoryError("cannot grow the frame buffer")
                self._chunk_bytes -= rest
                self._held = True
            if count:
                return ready.popleft()

    def take_in_place(self, walk: Callable[..., int], *args: Any) -> bytes | None:
        """Let ``walk`` take complete frames straight from the queued reads,
        then return the next frame's payload if it is right there.

        ``walk(read, pos, max_frame, *args)`` is given the first queued read
        (``bytes``) and the offset of its first unread byte; it returns the
        offset up to which it took whole frames (and keepalives) of at most
        ``max_frame`` bytes, ``pos`` for none (csrc/pydec.c ``plain_calls``
        is one).  Those frames count as returned, as if ``next_frame`` had
        given them.  It runs only while nothing else comes first (no split
        payloads, no frame straddling reads, no error), and goes on to the
        next read when one is used up.  Then, when the frame where it
        stopped is complete in that read and within ``max_frame``, its
        payload is returned (what ``next_frame`` would return); otherwise
        None, and ``next_frame`` gives the next payload or error as ever.
        Never raises for the bytes."""
        if not self._only_reads():
            return None
        chunks = self._chunks
        while chunks:
            chunk = chunks[0]
            end = walk(chunk, self._pos, self._max_frame, *args)
            self.skip_batch(end)
            size = len(chunk)
            if end == size:
                continue
            if size - end >= 4:
                length = int.from_bytes(chunk[end : end + 4], "big")
                stop = end + 4 + length
                if 0 < length <= self._max_frame and stop <= size:
                    self.skip_batch(stop)
                    return chunk[end + 4 : stop]
            return None
        return None

    def _complete(self) -> bytes | None:
        """1. A frame straddles reads: complete it from the queued reads.
        Returns its payload, or ``None`` (``_held`` then says whether it is
        still incomplete or was a keepalive)."""
        fb = self._fb
        chunks = self._chunks
        out = self._out
        max_frame = self._max_frame
        if self._missing > 0:
            return None
        if not chunks:
            lib.sshrpc_fb_fill(fb, ffi.NULL, 0, 0, max_frame, out)
        while chunks:
            chunk = chunks[0]
            pos = self._pos
            taken = lib.sshrpc_fb_fill(fb, chunk, pos, len(chunk), max_frame, out)
            if taken == _OUT_OF_MEMORY:
                raise MemoryError("cannot grow the frame buffer")
            self._chunk_bytes -= taken
            if pos + taken == len(chunk):
                chunks.popleft()
                self._pos = 0
            else:
                self._pos = pos + taken
            if out[0] == 0:
                break
        self._missing = out[0] if not chunks else 0
        spans = self._spans
        if lib.sshrpc_fb_scan(fb, max_frame, spans, 1, out + 1):
            whole: bytes = ffi.buffer(fb.data + spans[0], spans[1])[:]  # type: ignore[attr-defined]
            lib.sshrpc_fb_clear(fb)
            self._held = False
            return whole
        if out[1]:
            raise self._fail(int(out[1]))
        if fb.end == fb.start:  # type: ignore[attr-defined]
            lib.sshrpc_fb_clear(fb)
            self._held = False
        elif self._missing and _BYTES_API is not None:
            self._to_big()
        return None

    def _to_big(self) -> None:
        """The incomplete frame in the C buffer (its header in, its rest
        still to come, none of it queued): from ``BIG_FRAME`` bytes on, its
        payload is filled in its final object from now on (step 3)."""
        fb = self._fb
        start: int = fb.start  # type: ignore[attr-defined]
        held: int = fb.end - start  # type: ignore[attr-defined]
        if held < 4:
            return
        data = fb.data  # type: ignore[attr-defined]
        length = int.from_bytes(ffi.buffer(data + start, 4), "big")
        if length < BIG_FRAME or length > self._max_frame:
            return
        assert _BYTES_API is not None
        new, address = _BYTES_API
        try:
            big: bytes = new(None, length)
        except MemoryError:
            return  # the C buffer goes on, as for any frame
        ptr = ffi.cast("char *", address(big))
        ffi.memmove(ptr, data + start + 4, held - 4)
        self._big, self._big_ptr = big, ptr
        self._big_at = held - 4
        self._big_missing = length - self._big_at
        self._missing = 0
        lib.sshrpc_fb_clear(fb)
        self._held = False

    def _unsmall(self) -> None:
        """Queue the gathered tiny reads as one read (the queue is empty
        whenever they exist), so the next ``next_frame`` sees them."""
        if self._small:
            self._chunks.appendleft(bytes(self._small))
            self._chunk_bytes += len(self._small)
            self._pos = 0
            self._small.clear()

    def _fail(self, length: int) -> FrameTooLarge:
        self._error = FrameTooLarge(length, self._max_frame)
        self._ready.clear()
        self._small.clear()
        self._chunks.clear()
        self._chunk_bytes = 0
        lib.sshrpc_fb_clear(self._fb)
        self._held = False
        self._big = self._big_ptr = None
        return self._error
