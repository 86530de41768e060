"""Frame reassembly: any chunking, keepalives, the max_frame check on the
header alone, linear cost.  The tests run on the frame buffer in use
(``sshrpc._accel``: C, or pure Python with ``SSHRPC_PURE_PYTHON=1``, as one
CI run does); the last test checks that both give the same payloads and
errors."""

from __future__ import annotations

import itertools
import struct
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sshrpc import FrameTooLarge, ProtocolError, _pyframing, c_accelerated
from sshrpc._accel import FrameBuffer
from sshrpc._pyframing import encode_length


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def drain(fb: FrameBuffer) -> list[bytes]:
    out = []
    while (payload := fb.next_frame()) is not None:
        out.append(payload)
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


payloads = st.lists(st.binary(min_size=0, max_size=300), max_size=40)


@settings(max_examples=300, deadline=None)
@given(payloads, st.lists(st.integers(min_value=0), max_size=60), st.sampled_from([0, 1, 2]))
def test_any_chunking_yields_the_payloads_in_order(
    items: list[bytes], cuts: list[int], kind: int
) -> None:
    data = b"".join(frame(p) for p in items)
    fb = FrameBuffer(300)
    got: list[bytes] = []
    for piece in split(data, cuts):
        # bytes, bytearray and memoryview reads all work
        fb.feed(piece if kind == 0 else bytearray(piece) if kind == 1 else memoryview(piece))
        got.extend(drain(fb))
    assert got == [p for p in items if p]  # empty payloads are keepalives
    assert fb.buffered == 0
    assert fb.next_frame() is None


@settings(max_examples=200, deadline=None)
@given(payloads, st.lists(st.integers(min_value=0), max_size=30), st.integers(0, 299))
def test_buffered_counts_what_is_held(items: list[bytes], cuts: list[int], limit: int) -> None:
    data = b"".join(frame(p) for p in items)
    fb = FrameBuffer(300)
    fed = 0
    taken = 0
    for piece in split(data, cuts):
        fb.feed(piece)
        fed += len(piece)
        for payload in drain(fb):
            taken += 4 + len(payload)
        # what is buffered is what was fed minus whole frames handed out
        # (keepalive headers are consumed silently, so buffered may be less)
        assert fb.buffered <= fed - taken


def test_keepalives_are_skipped() -> None:
    fb = FrameBuffer(10)
    fb.feed(b"\0\0\0\0" * 5 + frame(b"a") + b"\0\0\0\0")
    assert drain(fb) == [b"a"]
    assert fb.buffered == 0


def test_one_byte_at_a_time() -> None:
    data = frame(b"hello") + b"\0\0\0\0" + frame(b"x" * 100) + frame(b"z")
    fb = FrameBuffer(100)
    got = []
    for i in range(len(data)):
        fb.feed(data[i : i + 1])
        got.extend(drain(fb))
    assert got == [b"hello", b"x" * 100, b"z"]


def test_too_large_raises_on_the_header_before_the_payload() -> None:
    fb = FrameBuffer(100)
    fb.feed(frame(b"ok") + encode_length(101))  # only the header of the big one
    assert fb.next_frame() == b"ok"
    with pytest.raises(FrameTooLarge) as info:
        fb.next_frame()
    assert (info.value.length, info.value.maximum) == (101, 100)
    assert isinstance(info.value, ProtocolError)
    assert info.value.bye == ("frame_too_large", 101, 100)
    # the buffer stays broken: the stream cannot be resynchronised
    fb.feed(frame(b"more"))
    with pytest.raises(FrameTooLarge):
        fb.next_frame()


def test_too_large_with_a_straddling_header() -> None:
    fb = FrameBuffer(10)
    header = encode_length(2**32 - 1)
    fb.feed(header[:1])
    assert fb.next_frame() is None
    fb.feed(header[1:3])
    assert fb.next_frame() is None
    fb.feed(header[3:] + b"x" * 50)
    with pytest.raises(FrameTooLarge) as info:
        fb.next_frame()
    assert info.value.length == 2**32 - 1


def test_exactly_max_frame_is_accepted() -> None:
    fb = FrameBuffer(5)
    fb.feed(frame(b"12345"))
    assert fb.next_frame() == b"12345"


def test_max_frame_applies_to_frames_not_yet_returned() -> None:
    big = b"y" * 50
    fb = FrameBuffer(10)
    fb.feed(frame(b"hello") + frame(big))
    assert fb.next_frame() == b"hello"
    fb.max_frame = 100  # raised after the hello: the next frame passes
    assert fb.next_frame() == big
    fb = FrameBuffer(100)
    fb.feed(frame(b"a") + frame(big))
    assert fb.next_frame() == b"a"
    fb.max_frame = 10  # lowered: the next frame is refused
    with pytest.raises(FrameTooLarge):
        fb.next_frame()


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, "10"])
def test_max_frame_is_validated(bad: object) -> None:
    with pytest.raises(ValueError):
        FrameBuffer(bad)  # type: ignore[arg-type]
    fb = FrameBuffer(10)
    with pytest.raises(ValueError):
        fb.max_frame = bad  # type: ignore[assignment]


def test_fed_buffers_may_be_reused_by_the_caller() -> None:
    fb = FrameBuffer(100)
    buf = bytearray(frame(b"first")[:6])
    fb.feed(buf)
    buf[:] = b"\xff" * 6  # the caller reuses its read buffer
    fb.feed(frame(b"first")[6:])
    assert fb.next_frame() == b"first"


def test_many_frames_per_read_and_large_frames() -> None:
    small = [bytes([i % 251]) * (i % 300 + 1) for i in range(5000)]
    big = b"B" * (3 * 1024 * 1024)
    data = b"".join(frame(p) for p in small) + frame(big)
    fb = FrameBuffer(4 * 1024 * 1024)
    got = []
    for i in range(0, len(data), 65536):
        fb.feed(data[i : i + 65536])
        got.extend(drain(fb))
    assert got == [*small, big]


@pytest.mark.timeout(30)
def test_cost_is_linear_in_the_bytes() -> None:
    """Doubling the input of 1-byte reads (one big frame straddling all of
    them) and of 64 KiB reads (many frames each) must not quadruple the time."""

    def one_byte_reads(n: int) -> float:
        data = frame(b"z" * n)
        fb = FrameBuffer(n)
        start = time.process_time()
        for i in range(len(data)):
            fb.feed(data[i : i + 1])
            fb.next_frame()
        return time.process_time() - start

    def many_frames(n: int) -> float:
        data = frame(b"q" * 1000) * n
        fb = FrameBuffer(2000)
        start = time.process_time()
        for i in range(0, len(data), 65536):
            fb.feed(data[i : i + 65536])
            drain(fb)
        return time.process_time() - start

    for measure, n in ((one_byte_reads, 40_000), (many_frames, 20_000)):
        small = min(measure(n) for _ in range(3))
        large = min(measure(2 * n) for _ in range(3))
        assert large < 3.5 * small, (measure.__name__, small, large)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=120), min_size=1, max_size=20),
    st.lists(st.integers(min_value=0), max_size=30),
)
def test_first_oversized_frame_stops_the_stream(sizes: list[int], cuts: list[int]) -> None:
    limit = 100
    data = b"".join(frame(bytes([n % 256]) * n) for n in sizes)
    expected = []
    for n in sizes:
        if n > limit:
            break
        if n:
            expected.append(bytes([n % 256]) * n)
    too_large = any(n > limit for n in sizes)
    fb = FrameBuffer(limit)
    got: list[bytes] = []
    raised = False
    for piece in split(data, cuts):
        fb.feed(piece)
        try:
            while (payload := fb.next_frame()) is not None:
                got.append(payload)
        except FrameTooLarge as exc:
            assert exc.length == next(n for n in sizes if n > limit)
            raised = True
            break
    assert got == expected
    assert raised == too_large


def test_max_frame_changed_while_tiny_reads_are_gathered() -> None:
    data = frame(b"p" * 50) + frame(b"after")
    fb = FrameBuffer(100)
    for i in range(20):  # header and 16 payload bytes, one at a time
        fb.feed(data[i : i + 1])
        assert fb.next_frame() is None
    assert fb.buffered == 20
    fb.max_frame = 200
    assert fb.buffered == 20
    fb.feed(data[20:])
    assert drain(fb) == [b"p" * 50, b"after"]
    fb = FrameBuffer(100)
    for i in range(20):
        fb.feed(data[i : i + 1])
        fb.next_frame()
    fb.max_frame = 40
    fb.feed(data[20:])
    with pytest.raises(FrameTooLarge) as info:
        fb.next_frame()
    assert (info.value.length, info.value.maximum) == (50, 40)


@settings(max_examples=200, deadline=None)
@given(
    payloads,
    st.lists(st.integers(min_value=0), max_size=60),
    st.lists(st.integers(min_value=300, max_value=10_000), max_size=10),
)
def test_raising_max_frame_at_any_point_keeps_the_stream(
    items: list[bytes], cuts: list[int], limits: list[int]
) -> None:
    data = b"".join(frame(p) for p in items)
    fb = FrameBuffer(300)
    got: list[bytes] = []
    pieces = split(data, cuts)
    for index, piece in enumerate(pieces):
        fb.feed(piece)
        if index < len(limits):
            fb.max_frame = limits[index]
        got.extend(drain(fb))
        assert fb.buffered == len(b"".join(pieces[: index + 1])) - sum(
            4 + len(p) for p in got
        ) - _keepalive_bytes(data, len(b"".join(pieces[: index + 1])))
    assert got == [p for p in items if p]


def _keepalive_bytes(data: bytes, upto: int) -> int:
    """Header bytes of the keepalives wholly inside data[:upto]."""
    pos = total = 0
    while pos + 4 <= upto:
        (n,) = struct.unpack_from(">I", data, pos)
        if n == 0:
            total += 4
        pos += 4 + n
    return total


def test_a_large_straddling_frame_does_not_pin_its_buffer() -> None:
    big = b"x" * (4 << 20)
    data = frame(big) + frame(b"small")
    fb = FrameBuffer(8 << 20)
    got = []
    for i in range(0, len(data), 1000):
        fb.feed(data[i : i + 1000])
        got.extend(drain(fb))
    assert got == [big, b"small"]
    if c_accelerated:
        assert fb._fb.cap <= 256 * 1024  # type: ignore[attr-defined]
    else:
        assert sys.getsizeof(fb._buf) <= 256 * 1024  # type: ignore[attr-defined]


@pytest.mark.skipif(not c_accelerated, reason="the C module is not in use (pure-Python mode)")
@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=70), max_size=30),
    st.lists(st.integers(min_value=0), max_size=40),
    st.integers(min_value=0, max_value=64),
    st.integers(min_value=0, max_value=64),
)
def test_python_and_c_buffers_agree(
    sizes: list[int], cuts: list[int], limit: int, lowered: int
) -> None:
    """The pure-Python fallback gives the C buffer's payloads and errors for
    any chunking, also when ``max_frame`` is lowered halfway."""
    from sshrpc._framing import FrameBuffer as CFrameBuffer

    data = b"".join(frame(bytes([n % 251]) * n) for n in sizes)
    results = []
    for cls in (CFrameBuffer, _pyframing.FrameBuffer):
        fb = cls(limit)
        out: list[object] = []
        buffered: int | None = None
        for i, piece in enumerate(split(data, cuts)):
            if i == 2:
                fb.max_frame = lowered
            fb.feed(piece)
            try:
                out.extend(drain(fb))
            except FrameTooLarge as exc:
                out.append(("too large", exc.length, exc.maximum))
                break
        else:
            buffered = fb.buffered
        results.append((out, buffered))
    assert results[0] == results[1]
