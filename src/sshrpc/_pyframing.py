"""Channel reads -> frame payloads in pure Python: the frame buffer used when
the C module is missing.  No I/O.

Same contract as ``sshrpc._framing.FrameBuffer`` (which documents it): the
same payloads for any chunking, keepalives skipped, ``FrameTooLarge`` as soon
as a too-long header is complete, and the same error again after that.
Reads are appended to one ``bytearray``; consumed bytes are dropped once they
are the larger half of it, so the work stays linear in the bytes fed.
"""

from __future__ import annotations

from ._errors import FrameTooLarge

__all__ = ["MAX_FRAME_LIMIT", "FrameBuffer", "encode_length"]

#: The largest length a 4-byte header can carry.
MAX_FRAME_LIMIT = 2**32 - 1


def encode_length(length: int) -> bytes:
    """The 4-byte big-endian header of a payload of ``length`` bytes."""
    return length.to_bytes(4, "big")


class FrameBuffer:
    """Reassembles frames from channel reads (pure Python).

    ``max_frame`` is the largest payload accepted; it may be changed at any
    time and applies to every frame not yet returned.  After
    ``FrameTooLarge`` the buffer stays broken.
    """

    __slots__ = ("_buf", "_error", "_max_frame", "_pos")

    def __init__(self, max_frame: int) -> None:
        self._buf = bytearray()
        self._pos = 0
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
        """Bytes held and not yet returned (payloads and headers)."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Queue one channel read (any length, even 0).  Never raises for
        the bytes' content (``next_frame`` does)."""
        if self._error is None:
            self._buf += data

    def next_frame(self) -> bytes | None:
        """The next complete payload, or ``None`` when more data is needed.

        Keepalives are skipped.  Raises ``FrameTooLarge`` when the next
        frame's length is above ``max_frame``.
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        pos = self._pos
        size = len(buf)
        payload = None
        while size - pos >= 4:
            length = int.from_bytes(buf[pos : pos + 4], "big")
            if length > self._max_frame:
                self._error = FrameTooLarge(length, self._max_frame)
                buf.clear()
                self._pos = 0
                raise self._error
            end = pos + 4 + length
            if end > size:
                break
            if length:
                payload = bytes(buf[pos + 4 : end])
                pos = end
                break
            pos = end  # a keepalive
        if pos == size:
            buf.clear()
            pos = 0
        elif pos > size // 2:
            del buf[:pos]
            pos = 0
        self._pos = pos
        return payload
