"""``Connection.next_events_each`` (the server's batched read): for any byte
stream it gives exactly the events, per-event decode costs, state changes and
error that ``next_event`` frame by frame gives, and a bad frame's error only
after the events before it were acted on.  No I/O."""

from __future__ import annotations

import struct
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sshrpc import Atom, ProtocolError, encode
from sshrpc._accel import encode_frame
from sshrpc.protocol import CLOSED, NEED_DATA, Call, Connection, Hello, Role, call_event

A = Atom


def server(**kw: Any) -> Connection:
    client = Connection(Role.CLIENT)
    conn = Connection(Role.SERVER, node="node@host", **kw)
    conn.receive_data(client.send(client.hello()))
    assert isinstance(conn.next_event(), Hello)
    conn.send(conn.hello())
    return conn


def single(conn: Connection) -> tuple[list[Any], str | None]:
    """(event, cost) by ``next_event`` alone, and the error's bye if one ends it."""
    out: list[Any] = []
    try:
        while True:
            ev = conn.next_event()
            out.append((ev, conn.last_cost))
            if ev is NEED_DATA or ev is CLOSED:
                return out, None
    except ProtocolError as exc:
        return out, repr(exc.bye)


def batched(
    conn: Connection, bound: int = 1 << 20, plain: bool = False, all_plain: bool = False
) -> tuple[list[Any], str | None]:
    """The same through ``next_events_each`` first, then ``next_event``, in
    rounds; ``plain``: with ``plain_calls=True``, each ``PlainCall`` made
    its ``Call`` (``call_event``)."""
    out: list[Any] = []
    try:
        while True:
            costs: list[int] = []
            batch = conn.next_events_each(costs, bound, plain_calls=plain)
            assert len(costs) == len(batch)
            if plain:
                # (``all_plain``: every call sent is a common one)
                assert not (all_plain and any(type(ev) is Call for ev in batch)), batch
                batch = [call_event(ev) if type(ev) is tuple else ev for ev in batch]
            out += zip(batch, costs, strict=True)
            ev = conn.next_event()
            out.append((ev, conn.last_cost))
            if ev is NEED_DATA or ev is CLOSED:
                return out, None
    except ProtocolError as exc:
        return out, repr(exc.bye)


def same(data: bytes, bound: int = 1 << 20, **kw: Any) -> list[Any]:
    a, b = server(**kw), server(**kw)
    a.receive_data(data)
    b.receive_data(data)
    got_a, got_b = single(a), batched(b, bound)
    assert got_b == got_a
    assert b.state is a.state
    assert list(b.open_ids) == list(a.open_ids)
    assert b.statistics().frames_received == a.statistics().frames_received
    return [ev for ev, _ in got_a[0]]


def call(i: int, *args: Any, timeout: int | None = None) -> bytes:
    term: tuple[Any, ...] = (A("call"), i, A("m"), A("f"), list(args))
    if timeout is not None:
        term += ({A("timeout"): timeout},)
    return encode_frame(term)


def test_a_read_of_calls_is_one_batch_with_each_cost() -> None:
    conn = server()
    conn.receive_data(b"".join(call(i, b"x" * i, [i]) for i in range(8)))
    costs: list[int] = []
    got = conn.next_events_each(costs, 1 << 20)
    assert [(type(ev), ev.id) for ev in got] == [(Call, i) for i in range(8)]  # type: ignore[attr-defined]
    assert conn.next_event() is NEED_DATA
    one = server()
    for i in range(8):
        one.receive_data(call(i, b"x" * i, [i]))
        one.next_event()
        assert one.last_cost == costs[i]


def test_other_requests_bye_and_errors_as_frame_by_frame() -> None:
    same(call(0) + encode_frame((A("cancel"), 0)) + encode_frame((A("ping"), 7)) + call(1))
    same(call(0) + encode_frame((A("bye"), A("normal"))) + call(1) + b"\0\0\0\1\0")
    same(call(0) + encode_frame((A("cast"), A("m"), A("f"), [1])) + call(0))  # a reused id
    same(call(0) + encode_frame((A("cancel"), 0, 1)) + call(1))  # a bad shape
    same(call(0) + encode_frame([1, 2]) + call(1))
    same(call(0) + struct.pack(">I", 3) + b"\x83h\x01" + call(1))  # a bad term
    same(call(0, timeout=5) + call(1, timeout=-1) + encode_frame((A("call"), 2, 3, A("f"), [])))


def test_heavy_compressed_and_keepalive_frames_keep_their_order() -> None:
    term = encode((A("call"), 1, A("m"), A("f"), [b"z" * 4000]))
    packed = zlib.compress(term[1:])
    compressed = b"\x83P" + struct.pack(">I", len(term) - 1) + packed
    data = (
        call(0)
        + struct.pack(">I", len(compressed))
        + compressed
        + b"\0\0\0\0"
        + call(2, b"b" * 3000)  # above a bound of 1 MiB units at the worst cost per byte
        + call(3)
    )
    events = same(data)
    assert [ev.id for ev in events[:-1]] == [0, 1, 2, 3]  # type: ignore[attr-defined]
    conn = server()
    conn.receive_data(call(0) + call(2, b"b" * 3000) + call(3))
    costs: list[int] = []
    assert [ev.id for ev in conn.next_events_each(costs, 1 << 20)] == [0]  # type: ignore[attr-defined]
    assert conn.next_cost_bound() > 1 << 20  # left for the caller's turn


def test_the_events_before_a_bad_frame_are_answered_before_its_error() -> None:
    conn = server()
    conn.receive_data(call(0) + call(1) + encode_frame((A("cancel"), "x")) + call(2))
    costs: list[int] = []
    got = conn.next_events_each(costs, 1 << 20)
    assert [ev.id for ev in got] == [0, 1]  # type: ignore[attr-defined]
    assert conn.state is not CLOSED
    conn.send_reply(0, b"ok")  # still open: frame by frame these were answered too
    conn.send_reply(1, b"ok")
    with pytest.raises(ProtocolError) as info:
        conn.next_event()
    assert info.value.bye is not None
    assert conn.state is CLOSED


@settings(max_examples=150, deadline=None)
@given(
    items=st.lists(
        st.tuples(
            st.integers(0, 5),
            st.sampled_from(["call", "timeout", "cancel", "credit", "ping", "junk", "bye", "big"]),
        ),
        max_size=14,
    ),
    cut=st.integers(0, 600),
)
@pytest.mark.parametrize("plain", [False, True])
def test_any_stream_gives_what_next_event_gives(
    items: list[tuple[int, str]], cut: int, plain: bool
) -> None:
    parts = []
    for i, kind in items:
        if kind == "call":
            parts.append(call(i, [i], b"a" * i))
        elif kind == "timeout":
            parts.append(call(i, timeout=i * 10))
        elif kind == "cancel":
            parts.append(encode_frame((A("cancel"), i)))
        elif kind == "credit":
            parts.append(encode_frame((A("credit"), i, i - 2)))
        elif kind == "ping":
            parts.append(encode_frame((A("ping"), i)))
        elif kind == "bye":
            parts.append(encode_frame((A("bye"), A("normal") if i % 2 else A("x"))))
        elif kind == "big":
            parts.append(call(i, b"q" * 2100))
        else:
            payload = encode((A("call"), i))[:-1] + b"\xff"
            parts.append(struct.pack(">I", len(payload)) + payload)
    data = b"".join(parts)
    a, b = server(max_calls=4), server(max_calls=4)
    for conn in (a, b):
        conn.receive_data(data[:cut] or b"\0\0\0\0")
    first_a, first_b = single(a), batched(b, plain=plain, all_plain=True)
    assert first_b == first_a
    if first_a[1] is None and first_a[0][-1][0] is NEED_DATA:
        for conn in (a, b):
            conn.receive_data(data[cut:] or b"\0\0\0\0")
        assert batched(b, plain=plain, all_plain=True) == single(a)
    assert b.state is a.state
    assert list(b.open_ids) == list(a.open_ids)


@pytest.mark.parametrize("plain", [False, True])
def test_calls_near_the_common_shape_as_frame_by_frame(plain: bool) -> None:
    """Frames that are almost the common call (``plain_call`` in
    csrc/pydec.c, or its Python twin, takes exactly the common ones): each
    gives the event, cost, state and error ``next_event`` gives."""
    frames = [
        (A("call"), 2**64 - 1, A("m"), A("f"), []),
        (A("call"), 2**64, A("m"), A("f"), []),  # an id past MAX_ID
        (A("call"), -1, A("m"), A("f"), []),
        (A("call"), 3, b"m", A("f"), []),  # a binary module
        (A("call"), 4, A("m"), A("f"), [1], {A("timeout"): 2**70}),
        (A("call"), 5, A("m"), A("f"), [1], {A("timeout"): -(2**70)}),
        (A("call"), 6, A("m"), A("f"), [1], {A("timeout"): 1, A("stream"): True}),
        (A("call"), 7, A("m"), A("f"), [1], {A("timeout"): 1.5}),
        (A("call"), 8, A("m"), A("f"), [1], {b"timeout": 1}),
        (A("call"), 9, A("m"), A("f"), [1], {}),
        (A("call"), 10, A("m"), A("f"), [1], [(A("timeout"), 1)]),
        (A("call"), 11, A("m"), A("f"), (1,)),
        (A("call"), 12, A("m"), A("f"), [1], {A("timeout"): 0}, 7),
        (A("call"), 13, A("m"), A("f")),
        (A("cast"), 14, A("m"), A("f"), []),
        (A("call"), 15, A("m"), A("f"), [2**100, 1.5, b"x", "é"], {A("timeout"): 2**40}),
        (A("call"), 16, A("m"), A("f"), [], {A("timeout"): 10}),
    ]
    for term in frames:
        for after in (b"", call(100)):
            data = encode_frame(term) + after
            a, b = server(), server()
            a.receive_data(data)
            b.receive_data(data)
            assert batched(b, plain=plain) == single(a), term
            assert b.state is a.state
            assert list(b.open_ids) == list(a.open_ids)
