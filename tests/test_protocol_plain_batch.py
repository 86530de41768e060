"""The server's batched read in C (``plain_calls``, csrc/pydec.c, through
``FrameBuffer.take_in_place``) against its Python loop, the reference
(``Connection.next_events_each`` with ``plain_call_batch`` set to None): for
any byte stream cut into any reads, the same events, costs, batches, state,
open ids, counters and errors.  No I/O."""

from __future__ import annotations

import itertools
import struct
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sshrpc import Atom, ProtocolError, encode
from sshrpc._accel import encode_frame
from sshrpc.protocol import CLOSED, NEED_DATA, Connection, Hello, Role, _connection

A = Atom
BATCH = _connection.plain_call_batch

if BATCH is None:  # (one skip for the module: every test here compares the C batch)
    pytest.skip("the C module or its direct decoder is not in use", allow_module_level=True)


@contextmanager
def python_loop() -> Iterator[None]:
    """``next_events_each`` without the C batch: its Python loop alone."""
    _connection.plain_call_batch = None
    try:
        yield
    finally:
        _connection.plain_call_batch = BATCH


def server(**kw: Any) -> Connection:
    client = Connection(Role.CLIENT)
    conn = Connection(Role.SERVER, node="node@host", **kw)
    conn.receive_data(client.send(client.hello()))
    assert isinstance(conn.next_event(), Hello)
    conn.send(conn.hello())
    return conn


def call(i: int, *args: Any, timeout: int | None = None) -> bytes:
    term: tuple[Any, ...] = (A("call"), i, A("m"), A("f"), list(args))
    if timeout is not None:
        term += ({A("timeout"): timeout},)
    return encode_frame(term)


def raw(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def compressed(i: int) -> bytes:
    term = encode((A("call"), i, A("m"), A("f"), [b"z" * 300]))
    return raw(b"\x83P" + struct.pack(">I", len(term) - 1) + zlib.compress(term[1:]))


def frame_of(kind: str, i: int) -> bytes:
    """One frame (or keepalive, or oversized header) of a kind."""
    if kind == "call":
        return call(i, [i], b"a" * i)
    if kind == "timeout":
        return call(i, timeout=i * 10)
    if kind == "stream":  # a call with options but a timeout: not the common one
        return encode_frame((A("call"), i, A("m"), A("f"), [], {A("stream"): True}))
    if kind == "cancel":
        return encode_frame((A("cancel"), i))
    if kind == "cast":
        return encode_frame((A("cast"), A("m"), A("f"), [i]))
    if kind == "ping":
        return encode_frame((A("ping"), i))
    if kind == "bye":
        return encode_frame((A("bye"), A("normal") if i % 2 else A("x")))
    if kind == "big":  # above the small bound of the lower ``bound`` values
        return call(i, b"q" * (200 * i + 100))
    if kind == "compressed":
        return compressed(i)
    if kind == "bad_term":
        return raw(encode((A("call"), i))[:-1] + b"\xff")
    if kind == "trailing":
        return raw(encode((A("call"), i, A("m"), A("f"), [])) + b"\0")
    if kind == "short":
        return raw(b"\x83")
    if kind == "not_etf":
        return raw(b"hello " + bytes([48 + i]))
    if kind == "keepalive":
        return b"\0\0\0\0"
    if kind == "too_large":
        return struct.pack(">I", 2**31) + b"x"
    raise AssertionError(kind)


KINDS = [
    "call", "call", "call", "timeout", "timeout", "stream", "cancel", "cast", "ping", "bye",
    "big", "compressed", "bad_term", "trailing", "short", "not_etf", "keepalive", "too_large",
]  # fmt: skip


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def run(reads: list[bytes], bound: int, **kw: Any) -> list[Any]:
    """Everything observable of a server fed ``reads`` one at a time, each
    drained by ``next_events_each`` (plain calls) and ``next_event`` in
    rounds until it needs data, closes or fails."""
    conn = server(**kw)
    out: list[Any] = []
    for data in reads:
        conn.receive_data(data)
        try:
            while True:
                costs: list[int] = []
                events = conn.next_events_each(costs, bound, plain_calls=True)
                out.append(("batch", events, costs, conn.last_cost))
                ev = conn.next_event()
                out.append(("event", ev, conn.last_cost))
                if ev is NEED_DATA or ev is CLOSED:
                    break
        except ProtocolError as exc:
            out.append(("error", type(exc).__name__, str(exc), exc.bye))
        stats = conn.statistics()
        # (Bytes buffered count the headers of frames not yet split from
        # their read, so they are compared only once every complete frame
        # was taken.)
        drained = out[-1][0] == "event" and out[-1][1] is NEED_DATA
        out.append(("after", conn.state, list(conn.open_ids), stats.frames_received))
        out.append(("buffered", stats.bytes_buffered if drained else None))
        if not drained:
            return out
    conn.receive_data(b"")  # EOF: "the channel ended inside a frame", or CLOSED
    try:
        out.append(("eof", conn.next_event()))
    except ProtocolError as exc:
        out.append(("eof error", str(exc), exc.bye))
    return out


def both(reads: list[bytes], bound: int = 1 << 20, **kw: Any) -> list[Any]:
    got = run(reads, bound, **kw)
    with python_loop():
        want = run(reads, bound, **kw)
    assert got == want
    return got


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 6)), max_size=24),
    cuts=st.lists(st.integers(min_value=0), max_size=6),
    bound=st.sampled_from([1 << 20, 60_000, 20_000]),
    max_calls=st.sampled_from([1, 3, 64]),
)
def test_any_stream_in_any_reads_as_the_python_loop(
    items: list[tuple[str, int]], cuts: list[int], bound: int, max_calls: int
) -> None:
    data = b"".join(frame_of(kind, i) for kind, i in items)
    both(split(data, cuts) or [b"\0\0\0\0"], bound, max_calls=max_calls)


@pytest.mark.parametrize(
    "kinds",
    [
        ["call", "call", "call"],
        ["call", "stream", "call", "call"],
        ["call", "compressed", "call"],
        ["call", "bad_term", "call"],
        ["call", "trailing", "call"],
        ["call", "short", "call"],
        ["call", "not_etf", "call"],
        ["call", "keepalive", "keepalive", "call", "keepalive"],
        ["call", "too_large", "call"],
        ["call", "cancel", "ping", "cast", "call"],
        ["call", "bye", "call"],
        ["call", "big", "call"],
    ],
)
@pytest.mark.parametrize("cut", [None, 0, 3, 7, 20, -3])
def test_each_kind_of_frame_after_plain_calls(kinds: list[str], cut: int | None) -> None:
    """Every way the C walk stops, in one read and with the stream cut
    inside the second frame (a frame split across reads) or near its end."""
    data = b"".join(frame_of(kind, i) for i, kind in enumerate(kinds))
    if cut is None:
        reads = [data]
    else:
        at = len(frame_of(kinds[0], 0)) + cut if cut >= 0 else len(data) + cut
        reads = [data[:at], data[at:]]
    for bound in (1 << 20, 20_000):
        both(reads, bound)


def test_duplicate_ids_and_max_open_as_the_python_loop() -> None:
    # a reused id inside one read: the Python path raises its error after
    # the calls before it
    both([call(0) + call(1) + call(1) + call(2)])
    # an id still open from an earlier read
    both([call(0) + call(1), call(2) + call(0)])
    # max_calls reached: the overload answer, then calls again once it is
    # not (here: never, nothing answers)
    both([b"".join(call(i) for i in range(6))], max_calls=3)
    both([call(0) + call(1), b"".join(call(i) for i in range(2, 6))], max_calls=2)


def test_answers_free_ids_between_reads() -> None:
    """Calls answered between reads free their ids for later reads, in both
    paths alike."""

    def drive() -> list[Any]:
        conn = server(max_calls=4)
        out: list[Any] = []
        for r in range(5):
            conn.receive_data(b"".join(call(i, r) for i in range(4)))
            costs: list[int] = []
            events = conn.next_events_each(costs, 1 << 20, plain_calls=True)
            out.append((events, costs, conn.next_event()))
            for ev in events:
                conn.send_reply(ev[0], b"ok")  # type: ignore[index]
        return out

    got = drive()
    with python_loop():
        assert got == drive()
    assert [len(events) for events, _, _ in got] == [4] * 5


def test_reads_of_common_calls_take_no_python_decode() -> None:
    """The batch is in use: of 40 common calls in two reads, the Python
    loop decodes only the one frame split across them."""
    plain = _connection.plain_call
    assert plain is not None
    decoded: list[bytes] = []

    def counting(data: bytes, *args: Any) -> Any:
        decoded.append(data)
        return plain(data, *args)

    conn = server()
    frames = [call(i, [i], timeout=i if i % 2 else None) for i in range(40)]
    data = b"".join(frames)
    conn.receive_data(data[:700])
    conn.receive_data(data[700:])
    _connection.plain_call = counting
    try:
        costs: list[int] = []
        events = conn.next_events_each(costs, 1 << 20, plain_calls=True)
    finally:
        _connection.plain_call = plain
    assert [ev[0] for ev in events] == list(range(40))  # type: ignore[index]
    assert conn.next_event() is NEED_DATA
    assert len(decoded) == 1 and decoded[0] in data
    split_at = next(i for i in range(40) if len(b"".join(frames[: i + 1])) > 700)
    assert decoded[0] == frames[split_at][4:]


def test_the_builtin_walk() -> None:
    """``plain_calls`` itself: the offset past what it took, what it
    appends and sets, and how it refuses its arguments."""
    data = b"\0\0\0\0" + call(1) + call(2, timeout=5) + encode_frame((A("ping"), 1)) + call(3)
    opened: dict[int, object] = {}
    plain = object()
    events: list[Any] = []
    costs: list[int] = []
    end = BATCH(data, 0, 1 << 20, 4096, opened, 64, plain, 100, 8, 1 << 20, events, costs)
    assert end == 4 + len(call(1)) + len(call(2, timeout=5))
    assert [ev[:5] for ev in events] == [(1, A("m"), A("f"), [], None), (2, A("m"), A("f"), [], 5)]
    assert costs == [ev[5] for ev in events]
    assert opened == {1: plain, 2: plain}
    assert events[0][6] == (A("call"), 1, A("m"), A("f"), [])
    # stops: at the ping, at a known id, at max_open, past max_cost or
    # max_depth, past `small` or max_frame, and past the end
    args = (opened, 64, plain, 100, 8, 1 << 20, [], [])
    assert BATCH(data, end, 1 << 20, 4096, *args) == end
    assert BATCH(call(1), 0, 1 << 20, 4096, *args) == 0
    assert BATCH(call(4), 0, 1 << 20, 4096, opened, 2, plain, 100, 8, 1 << 20, [], []) == 0
    assert BATCH(call(4), 0, 1 << 20, 4096, opened, 64, plain, 100, 8, 100, [], []) == 0
    assert BATCH(call(4, [[1]]), 0, 1 << 20, 4096, opened, 64, plain, 2, 8, 1 << 20, [], []) == 0
    assert BATCH(call(4), 0, 1 << 20, 8, *args) == 0
    assert BATCH(call(4), 0, 8, 4096, *args) == 0
    assert BATCH(call(4), 99, 1 << 20, 4096, *args) == len(call(4))  # (clamped: nothing there)
    # a limit it cannot hold takes nothing
    assert BATCH(call(4), 0, -1, 4096, *args) == 0
    assert BATCH(call(4), 0, 1 << 20, 2**64, *args) == 0
    assert 4 not in opened
    for bad in (
        (bytearray(call(4)), 0, 1 << 20, 4096, *args),
        (call(4), 0.0, 1 << 20, 4096, *args),
        (call(4), 0, 1 << 20, 4096, [], 64, plain, 100, 8, 1 << 20, [], []),
        (call(4), 0, 1 << 20, 4096, opened, 64, plain, 100, 8, 1 << 20, (), []),
        (call(4), 0, 1 << 20, 4096, opened, 64, plain, 100, 8, 1 << 20, [], None),
        (call(4), 0),
    ):
        with pytest.raises(TypeError):
            BATCH(*bad)
    assert 4 not in opened


def test_the_builtin_walk_leaks_nothing() -> None:
    """Taken and refused frames alike: no objects left behind."""
    good = b"".join(call(i, [i, b"x"], timeout=i) for i in range(50))
    refused = call(7, {A("a"): [1.5]}) + call(8, [[1.5]])

    def once() -> None:
        events: list[Any] = []
        BATCH(good, 0, 1 << 20, 4096, {}, 64, None, 100, 8, 1 << 20, events, [])
        assert len(events) == 50
        # a known id (after its whole term is built), then too deep
        for at, depth in ((0, 100), (len(call(7, {A("a"): [1.5]})), 2)):
            args = (1 << 20, 4096, {7: None}, 64, None, depth, 8, 1 << 20, [], [])
            assert BATCH(refused, at, *args) == at

    for _ in range(200):
        once()
    before = sys.getallocatedblocks()
    for _ in range(2000):
        once()
    assert sys.getallocatedblocks() - before < 100


def take_t(read: bytes, pos: int, max_frame: int, out: list[bytes]) -> int:
    """A walk for ``FrameBuffer.take_in_place``: the frames whose payload
    starts with ``t``, up to the first that does not."""
    while len(read) - pos >= 4:
        length = int.from_bytes(read[pos : pos + 4], "big")
        if length > max_frame or len(read) - pos - 4 < length:
            break
        payload = read[pos + 4 : pos + 4 + length]
        if payload and not payload.startswith(b"t"):
            break
        if payload:
            out.append(payload)
        pos += 4 + length
    return pos


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(st.binary(max_size=40), max_size=30),
    taken=st.lists(st.booleans(), min_size=30, max_size=30),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
    too_large=st.booleans(),
)
def test_take_in_place_hands_out_every_payload_in_order(
    items: list[bytes], taken: list[bool], cuts: list[int], too_large: bool
) -> None:
    """The frame buffer's side of the batch, with a walk written in Python:
    frames it takes and payloads ``take_in_place`` or ``next_frame`` return
    are every payload once, in order, whatever the reads; then the oversized
    frame's error; nothing left buffered."""
    from sshrpc._framing import FrameBuffer, FrameTooLarge

    payloads = [(b"t" if t else b"u") + p if p else b"" for p, t in zip(items, taken, strict=False)]
    data = b"".join(raw(p) for p in payloads)
    if too_large:
        data += struct.pack(">I", 41 + 1) + b"x" * 42
    fb = FrameBuffer(41)
    out: list[bytes] = []
    error = None
    for read in split(data, cuts):
        fb.feed(read)
        try:
            for _ in range(2 * len(payloads) + 2):  # (bounded: a bug may repeat a frame)
                payload = fb.take_in_place(take_t, out)
                if payload is None:
                    payload = fb.next_frame()
                    if payload is None:
                        break
                out.append(payload)
            else:
                raise AssertionError(f"more payloads than frames: {out}")
        except FrameTooLarge as exc:
            error = exc
            break
    assert out == [p for p in payloads if p]
    assert (error is not None) is too_large
    assert too_large or fb.buffered == 0
