"""Fuzz target: channel reads -> ``FrameBuffer`` -> payloads, against a model.

The input chooses ``max_frame``, a byte stream and how it is cut into reads
(any sizes, empty ones, as ``bytes``, ``bytearray`` or a ``memoryview`` into
a larger buffer that is overwritten after the read).  After every read all
ready payloads are drained.  Properties:

- the payloads are exactly the model's (``_model``), in order, as ``bytes``;
  keepalives never appear;
- a header above ``max_frame`` raises ``FrameTooLarge`` (with that length
  and limit) as soon as its 4 bytes are fed, however much of the payload has
  arrived, and every later ``next_frame`` raises it again;
- nothing else is raised, and ``buffered`` is the bytes of the incomplete
  frame at the front;
- ``max_frame`` may grow between reads (as after a hello) and applies from
  then on.

Run it with ``python fuzz/run.py framing`` (docs/fuzzing.md).
"""

from __future__ import annotations

import atheris

from sshrpc import FrameTooLarge
from sshrpc._framing import FrameBuffer

MAX_FRAMES = [0, 1, 2, 3, 5, 16, 255, 4096, 1 << 20, 2**32 - 1]
MAX_LEN = 8192


class _Model:
    """The obvious reassembler: scan complete frames from the front."""

    def __init__(self, max_frame: int) -> None:
        self.data = bytearray()
        self.max_frame = max_frame
        self.error: tuple[int, int] | None = None

    def feed(self, chunk: bytes) -> list[bytes]:
        self.data += chunk
        out = []
        while self.error is None and len(self.data) >= 4:
            length = int.from_bytes(self.data[:4], "big")
            if length > self.max_frame:
                self.error = (length, self.max_frame)
                break
            if len(self.data) < 4 + length:
                break
            if length:
                out.append(bytes(self.data[4 : 4 + length]))
            del self.data[: 4 + length]
        return out


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    max_frame = fdp.PickValueInList(MAX_FRAMES)
    buffer, model = FrameBuffer(max_frame), _Model(max_frame)
    scratch = bytearray(64)
    while fdp.remaining_bytes():
        if fdp.ConsumeIntInRange(0, 15) == 0:
            grown = fdp.PickValueInList(MAX_FRAMES)
            if grown >= model.max_frame:
                buffer.max_frame = model.max_frame = grown
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
        expected = model.feed(chunk)
        how = fdp.ConsumeIntInRange(0, 2)
        if how == 0:
            buffer.feed(chunk)
        elif how == 1:
            piece = bytearray(chunk)
            buffer.feed(piece)
            piece[:] = b"\xaa" * len(piece)
        else:
            scratch[:] = b"\x55" * 7 + chunk + b"\x55" * 9
            buffer.feed(memoryview(scratch)[7 : 7 + len(chunk)])
            scratch[:] = b"\xcc" * len(scratch)
        got = _drain(buffer, model)
        assert got == expected, f"payloads {got!r}, expected {expected!r}"
        if model.error is None:
            assert buffer.buffered == len(model.data), (buffer.buffered, len(model.data))


def _drain(buffer: FrameBuffer, model: _Model) -> list[bytes]:
    got = []
    while True:
        try:
            payload = buffer.next_frame()
        except FrameTooLarge as exc:
            assert model.error == (exc.length, exc.maximum), (model.error, exc)
            for _ in range(2):  # stays broken
                try:
                    buffer.next_frame()
                except FrameTooLarge as again:
                    assert (again.length, again.maximum) == model.error
                else:
                    raise AssertionError("FrameBuffer recovered after FrameTooLarge")
            return got
        if payload is None:
            assert model.error is None, f"FrameTooLarge {model.error} not raised"
            return got
        assert type(payload) is bytes and payload, payload
        got.append(payload)


def seeds() -> list[bytes]:
    """Streams of a few frames, keepalives and an oversized header."""

    def frame(payload: bytes) -> bytes:
        return len(payload).to_bytes(4, "big") + payload

    streams = [
        frame(b"\x83a\x01") + frame(b"") + frame(b"\x83j"),
        frame(b"x" * 300) * 3,
        frame(b"") * 5 + frame(b"y"),
        b"\x00\x01\x00\x00" + b"z" * 20,
        b"\xff\xff\xff\xff",
    ]
    return [bytes([i, 40, 0]) + s for i in range(len(MAX_FRAMES)) for s in streams]


if __name__ == "__main__":
    import run

    run.main(["framing", *__import__("sys").argv[1:]])
