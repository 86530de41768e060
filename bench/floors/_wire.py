"""Frames <-> terms for the floors and the Python comparison clients: a
4-byte big-endian length, then one ETF term (PROTOCOL.md section 2).

``FrameBuffer`` takes bytes as they arrive and hands out complete payloads.
The codec is sshrpc's own (``sshrpc.encode``/``decode``), so a floor pays
exactly what sshrpc pays for terms.
"""

from __future__ import annotations

from typing import Any

from sshrpc import Atom, decode, encode

CALL = Atom("call")
REPLY = Atom("reply")
HELLO = Atom("hello")
MODULE = Atom("sshrpc_bench")
FUNCTION = Atom("echo")


def frame(term: Any) -> bytes:
    payload = encode(term)
    return len(payload).to_bytes(4, "big") + payload


def call_frame(call_id: int, value: Any) -> bytes:
    return frame((CALL, call_id, MODULE, FUNCTION, [value]))


def hello_frame(max_frame: int, who: str, role: str = "client") -> bytes:
    return frame((HELLO, 1, {Atom("max_frame"): max_frame, Atom(role): who.encode()}))


class FrameBuffer:
    """Reassembles frames from arbitrary chunks; ``pop()`` gives the next
    complete payload or ``None``.  Keepalives (length 0) are dropped."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def pop(self) -> bytes | None:
        while True:
            buf, pos = self._buf, self._pos
            if len(buf) - pos < 4:
                return None
            n = int.from_bytes(buf[pos : pos + 4], "big")
            if n > self.max_frame:
                raise ValueError(f"frame of {n} bytes exceeds max_frame {self.max_frame}")
            if len(buf) - pos - 4 < n:
                if pos > 1 << 20:
                    del buf[:pos]
                    self._pos = 0
                return None
            self._pos = pos + 4 + n
            if n:
                return bytes(buf[pos + 4 : pos + 4 + n])

    def pop_term(self) -> Any:
        payload = self.pop()
        return None if payload is None else decode(payload)
