"""``Connection.next_events`` (the batched read of the sans-io core): for any
byte stream it gives exactly the events, state changes and error that
``next_event`` frame by frame gives.  No I/O."""

from __future__ import annotations

import struct
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sshrpc import Atom, ProtocolError, encode
from sshrpc._accel import encode_frame
from sshrpc.protocol import (
    CLOSED,
    NEED_DATA,
    Call,
    Connection,
    ErrorReply,
    Event,
    Hello,
    Reply,
    Role,
)

A = Atom


def handshake(**client_kw: Any) -> tuple[Connection, Connection]:
    client = Connection(Role.CLIENT, **client_kw)
    server = Connection(Role.SERVER, node="node@host")
    server.receive_data(client.send(client.hello()))
    assert isinstance(server.next_event(), Hello)
    client.receive_data(server.send(server.hello()))
    assert isinstance(client.next_event(), Hello)
    return client, server


def client_with_calls(n: int, **client_kw: Any) -> Connection:
    client, _ = handshake(**client_kw)
    for i in range(n):
        client.send_call(i, "m", "f", [i])
    return client


def single(conn: Connection) -> tuple[list[Any], str | None]:
    """Events by ``next_event`` alone, and the error (its bye) if one ends it."""
    out: list[Any] = []
    try:
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA or ev is CLOSED:
                out.append(ev)
                return out, None
            out.append(ev)
    except ProtocolError as exc:
        return out, repr(exc.bye)


def batched(conn: Connection, raw: bool = False) -> tuple[list[Any], str | None]:
    """The same through ``next_events`` first, then ``next_event``, in rounds
    (``raw``: ``next_replies``, its reply terms made ``Reply`` events)."""
    out: list[Any] = []
    try:
        while True:
            if raw:
                batch = conn.next_replies()
                assert all(isinstance(ev, Event) or ev[0] == A("reply") for ev in batch)
                batch = [
                    ev if isinstance(ev, Event) else Reply(id=ev[1], value=ev[2]) for ev in batch
                ]
            else:
                batch = conn.next_events()
            assert all(isinstance(ev, Event) for ev in batch)
            out += batch
            ev = conn.next_event()
            if ev is NEED_DATA or ev is CLOSED:
                out.append(ev)
                return out, None
            out.append(ev)
    except ProtocolError as exc:
        return out, repr(exc.bye)


def same(data: bytes, calls: int = 8, **client_kw: Any) -> list[Any]:
    """Feeds ``data`` to two identical clients; asserts both ways agree."""
    a = client_with_calls(calls, **client_kw)
    b = client_with_calls(calls, **client_kw)
    c = client_with_calls(calls, **client_kw)
    for conn in (a, b, c):
        conn.receive_data(data)
    got_a, got_b, got_c = single(a), batched(b), batched(c, raw=True)
    assert got_b == got_a and got_c == got_a
    for other in (b, c):
        assert other.state is a.state
        assert list(other.open_ids) == list(a.open_ids)
        assert other.statistics().frames_received == a.statistics().frames_received
    return got_a[0]


def reply(i: int, value: Any = b"v") -> bytes:
    return encode_frame((A("reply"), i, value))


def test_a_read_of_replies_is_one_batch() -> None:
    client = client_with_calls(8)
    client.receive_data(b"".join(reply(i, [i, b"x" * i]) for i in range(8)))
    batch = client.next_events()
    assert [(type(ev), ev.id, ev.value) for ev in batch] == [  # type: ignore[attr-defined]
        (Reply, i, [i, b"x" * i]) for i in range(8)
    ]
    assert client.next_event() is NEED_DATA
    assert not client.open_ids


def test_next_replies_gives_plain_replies_as_their_terms() -> None:
    client = client_with_calls(8)
    data = b"".join(reply(i, [i]) for i in range(4))
    data += encode_frame((A("error"), 4, (A("error"), A("x"), {}))) + reply(5)
    client.receive_data(data)
    batch = client.next_replies()
    assert batch[:4] == [(A("reply"), i, [i]) for i in range(4)]
    assert type(batch[4]) is ErrorReply and batch[5] == (A("reply"), 5, b"v")
    assert sorted(client.open_ids) == [6, 7]
    assert client.statistics().frames_received == 1 + 6


def test_nothing_to_batch_before_the_hellos() -> None:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    server.receive_data(client.send(client.hello()))
    assert server.next_events() == []  # the hello goes through next_event
    assert isinstance(server.next_event(), Hello)


def test_a_bad_term_after_good_frames_returns_them_then_raises() -> None:
    bad = b"\x83h\x03w\x05replya\x01\xff"  # an unknown tag for the value
    data = reply(0) + struct.pack(">I", len(bad)) + bad + reply(2)
    client = client_with_calls(3)
    client.receive_data(data)
    got = client.next_events()
    assert [ev.id for ev in got] == [0]  # type: ignore[attr-defined]
    with pytest.raises(ProtocolError) as info:
        client.next_events()
    assert info.value.bye[0] == "bad_term"
    assert client.state is CLOSED
    with pytest.raises(ProtocolError):
        client.next_event()
    same(data, calls=3)


def test_a_protocol_error_mid_batch_keeps_the_events_before_it() -> None:
    # A reply for an id that is not open, between good ones.
    same(reply(0) + reply(1) + reply(99) + reply(2))
    same(reply(0) + encode_frame((A("call"), 1, A("m"), A("f"), [])) + reply(1))
    same(reply(0) + encode_frame([1, 2]) + reply(1))


def test_depth_limit_is_the_same_in_a_batch() -> None:
    for depth in (8, 9, 10, 11):
        deep: Any = 1
        for _ in range(depth):
            deep = [deep]
        same(reply(0) + reply(1, deep) + reply(2), max_depth=10)


def test_compressed_large_and_keepalive_frames_keep_their_order() -> None:
    term = encode((A("reply"), 1, b"z" * 4000))
    packed = zlib.compress(term[1:])
    compressed = b"\x83P" + struct.pack(">I", len(term) - 1) + packed
    big = reply(3, b"b" * 40000)
    data = (
        reply(0)
        + struct.pack(">I", len(compressed))
        + compressed
        + b"\0\0\0\0"
        + reply(2)
        + big
        + reply(4)
    )
    got = same(data)
    assert [ev.id for ev in got[:-1]] == [0, 1, 2, 3, 4]


def test_frames_split_across_reads() -> None:
    data = b"".join(reply(i, b"x" * (i * 7)) for i in range(8))
    for cut in range(0, len(data), 5):
        a = client_with_calls(8)
        b = client_with_calls(8)
        for conn in (a, b):
            conn.receive_data(data[:cut] or b"\0\0\0\0")
        first_a, first_b = single(a), batched(b)
        for conn in (a, b):
            conn.receive_data(data[cut:])
        assert first_b == first_a and batched(b) == single(a)


def test_eof_after_a_batch() -> None:
    client = client_with_calls(2)
    client.receive_data(reply(0) + reply(1))
    client.receive_data(b"")
    assert [ev.id for ev in client.next_events()] == [0, 1]  # type: ignore[attr-defined]
    assert client.next_event() is CLOSED


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.binary(max_size=20) | st.text(max_size=5),
    lambda kids: st.lists(kids, max_size=4) | st.tuples(kids, kids),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(
    items=st.lists(
        st.tuples(st.integers(0, 9), _VALUES, st.sampled_from(["ok", "junk", "error", "send"])),
        max_size=12,
    ),
    cut=st.integers(0, 400),
)
def test_any_stream_gives_what_next_event_gives(
    items: list[tuple[int, Any, str]], cut: int
) -> None:
    parts = []
    for i, value, kind in items:
        if kind == "ok":
            parts.append(reply(i, value))
        elif kind == "error":
            parts.append(encode_frame((A("error"), i, (A("error"), value, {}))))
        elif kind == "send":
            parts.append(encode_frame((A("send"), A("pid"), value)))
        else:
            payload = encode(value)[:-1] + b"\xff"
            parts.append(struct.pack(">I", len(payload)) + payload)
    data = b"".join(parts)
    a = client_with_calls(10)
    b = client_with_calls(10)
    c = client_with_calls(10)
    for conn in (a, b, c):
        conn.receive_data(data[:cut] or b"\0\0\0\0")
    first_a, first_b, first_c = single(a), batched(b), batched(c, raw=True)
    assert first_b == first_a and first_c == first_a
    if first_a[1] is None:
        for conn in (a, b, c):
            conn.receive_data(data[cut:] or b"\0\0\0\0")
        rest_a = single(a)
        assert batched(b) == rest_a and batched(c, raw=True) == rest_a
    assert b.state is a.state and c.state is a.state


def test_send_call_still_works_after_batches() -> None:
    client, server = handshake()
    server.receive_data(client.send(Call(id=1, module="m", function="f", args=[])))
    assert server.next_events() and not server.next_events()
