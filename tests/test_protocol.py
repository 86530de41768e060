"""The sans-io protocol core (sshrpc.protocol): a client and a server
Connection paired through bytes, every message both ways, every error shape,
every protocol error.  No I/O."""

from __future__ import annotations

import itertools
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from sshrpc import (
    Atom,
    FrameTooLarge,
    LocalProtocolError,
    MessageTooLarge,
    Pid,
    ProtocolError,
    decode,
    encode,
)
from sshrpc._accel import encode_frame
from sshrpc.protocol import (
    ALL_FEATURES,
    AWAIT_HELLO,
    CLOSED,
    DRAINING,
    IDLE,
    LEGACY,
    MUST_HELLO,
    NEED_DATA,
    OPEN,
    Answer,
    Bye,
    Call,
    Cancel,
    Cast,
    Chunk,
    Connection,
    Credit,
    Down,
    ErrorReply,
    Event,
    Hello,
    Mfa,
    Ping,
    Pong,
    Refused,
    Reply,
    Role,
    Send,
    Spawn,
    Unknown,
)
from sshrpc.protocol._state import RECV, SEND, STATES, TRANSITIONS, diagram

A = Atom
SESSION = Pid.new("node@host", 7)
PID = Pid.new("node@host", 42)


def frame(term: Any) -> bytes:
    return encode_frame(term)


def events(conn: Connection, data: bytes = b"") -> list[Event]:
    """Feed ``data`` and collect events until NEED_DATA or CLOSED."""
    if data:
        conn.receive_data(data)
    out: list[Event] = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA or ev is CLOSED:
            return out
        assert isinstance(ev, Event)
        out.append(ev)


def one(conn: Connection, data: bytes) -> Event:
    got = events(conn, data)
    assert len(got) == 1, got
    return got[0]


def terms(data: bytes) -> list[Any]:
    """The terms of the frames in ``data`` (keepalives skipped)."""
    out = []
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        if n:
            out.append(decode(data[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    return out


def handshake(**server_kw: Any) -> tuple[Connection, Connection]:
    client_kw = {k[7:]: server_kw.pop(k) for k in list(server_kw) if k.startswith("client_")}
    client = Connection(Role.CLIENT, **client_kw)
    server = Connection(Role.SERVER, node="node@host", session=SESSION, **server_kw)
    hello = one(server, client.send(client.hello()))
    assert isinstance(hello, Hello)
    assert server.state is MUST_HELLO
    assert isinstance(one(client, server.send(server.hello())), Hello)
    assert client.state is OPEN and server.state is OPEN
    return client, server


def server_only(first: bytes, **kw: Any) -> Connection:
    server = Connection(Role.SERVER, **kw)
    server.receive_data(first)
    return server


def open_server(**kw: Any) -> Connection:
    """A server past the handshake, driven by raw frames."""
    server = Connection(Role.SERVER, **kw)
    events(server, frame((A("hello"), 1, {A("max_frame"): 1 << 20})))
    server.send(server.hello())
    return server


def protocol_error(conn: Connection, data: bytes = b"") -> ProtocolError:
    if data:
        conn.receive_data(data)
    with pytest.raises(ProtocolError) as info:
        events(conn)
    assert conn.state is CLOSED
    return info.value


def bye_detail(exc: ProtocolError) -> tuple[Any, ...]:
    assert isinstance(exc.bye, tuple)
    return exc.bye


# ----------------------------------------------------------------------------
# Handshake


def test_handshake_fields_and_states() -> None:
    client = Connection(Role.CLIENT, max_frame=2 << 20, name="tool/1.0")
    server = Connection(
        Role.SERVER,
        max_frame=3 << 20,
        max_calls=5,
        features=["call", "ping"],
        node="n@h",
        session=SESSION,
        name="srv/2",
    )
    assert client.state is IDLE and server.state is IDLE
    data = client.send(client.hello())
    assert client.state is AWAIT_HELLO
    assert terms(data) == [(A("hello"), 1, {A("max_frame"): 2 << 20, A("client"): b"tool/1.0"})]
    got = one(server, data)
    assert got == Hello(max_frame=2 << 20, client="tool/1.0")
    assert server.peer_hello == got
    data = server.send(server.hello())
    ((tag, version, fields),) = terms(data)
    assert (tag, version) == ("hello", 1)
    assert fields == {
        "max_frame": 3 << 20,
        "server": b"srv/2",
        "node": A("n@h"),
        "session": SESSION,
        "max_calls": 5,
        "features": [A("call"), A("ping")],
    }
    assert all(type(k) is Atom for k in fields)
    hello = one(client, data)
    assert isinstance(hello, Hello)
    assert (hello.node, hello.session, hello.max_calls, hello.features, hello.server) == (
        "n@h",
        SESSION,
        5,
        ("call", "ping"),
        "srv/2",
    )
    # after the exchange each side sends within the other's max_frame
    assert client.peer_max_frame == 3 << 20 and server.peer_max_frame == 2 << 20
    assert client.max_frame == 2 << 20 and server.max_frame == 3 << 20


def test_before_hellos_the_limit_is_one_mebibyte() -> None:
    client = Connection(Role.CLIENT, max_frame=8 << 20)
    assert client.peer_max_frame == 1 << 20 and client.max_frame == 1 << 20
    client.send(client.hello())
    # calls may be pipelined before the server's hello, within 1 MiB
    with pytest.raises(MessageTooLarge):
        client.send(Call(id=1, module="m", function="f", args=[b"x" * (1 << 20)]))
    assert not client.open_ids
    data = client.send(Call(id=1, module="m", function="f", args=[]))
    server = Connection(Role.SERVER)
    assert isinstance(one(server, frame((A("hello"), 1, {}))), Hello)
    assert isinstance(one(server, data), Call)  # pipelined call, before our hello
    with pytest.raises(LocalProtocolError):
        server.send(Reply(id=1, value=1))  # the hello must go first
    server.send(server.hello())
    server.send(Reply(id=1, value=1))


def test_unknown_hello_keys_are_ignored_and_kept() -> None:
    server = Connection(Role.SERVER)
    got = one(server, frame((A("hello"), 1, {A("max_frame"): 5000, A("future"): [1, 2]})))
    assert isinstance(got, Hello)
    assert got.max_frame == 5000 and got.extra == {"future": [1, 2]}
    # a hello without max_frame means 1 MiB
    server = Connection(Role.SERVER)
    got = one(server, frame((A("hello"), 1, {})))
    assert isinstance(got, Hello) and got.max_frame == 1 << 20


def test_keepalives_before_and_after_hello_are_ignored() -> None:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    assert client.send_keepalive() == b"\0\0\0\0"
    got = one(server, b"\0\0\0\0" * 3 + client.send(client.hello()) + b"\0\0\0\0")
    assert isinstance(got, Hello)
    assert isinstance(one(client, b"\0\0\0\0" + server.send(server.hello())), Hello)
    assert events(server, server.send_keepalive()) == []


@pytest.mark.parametrize("version", [0, 2, 99])
def test_server_refuses_other_versions(version: int) -> None:
    exc = protocol_error(server_only(frame((A("hello"), version, {}))))
    assert exc.bye == (A("unsupported_version"), [1])


def test_client_refuses_a_server_of_another_version() -> None:
    client = Connection(Role.CLIENT)
    client.send(client.hello())
    exc = protocol_error(client, frame((A("hello"), 2, {})))
    assert exc.bye == ("unsupported_version", [1])


@pytest.mark.parametrize(
    "first",
    [
        (A("call"), 1, A("m"), A("f"), []),
        (A("ping"), 1),
        (A("hello"),),
        (A("hello"), 1, [1]),
        (A("hello"), 1, {A("max_frame"): -1}),
        (A("hello"), 1, {A("max_frame"): A("big")}),
        (A("hello"), 1, {A("features"): A("call")}),
        (A("whatever"), 1),
        [A("hello"), 1, {}],
        42,
        b"hello",
    ],
    ids=repr,
)
def test_first_frame_must_be_a_hello_or_mfa(first: Any) -> None:
    exc = protocol_error(server_only(frame(first)))
    tag, detail = bye_detail(exc)
    assert tag == "protocol_error" and isinstance(detail, bytes) and detail
    assert detail.decode() == str(exc)


def test_second_hello_is_a_protocol_error() -> None:
    client, server = handshake()
    exc = protocol_error(server, client.send(Ping(token=1)) + frame((A("hello"), 1, {})))
    assert exc.bye[0] == "protocol_error"


# ----------------------------------------------------------------------------
# Calls and answers


def test_call_reply_and_wire_shapes() -> None:
    client, server = handshake()
    data = client.send(Call(id=1, module="lists", function="reverse", args=[[1, 2, 3]]))
    assert terms(data) == [(A("call"), 1, A("lists"), A("reverse"), [[1, 2, 3]])]
    assert type(terms(data)[0][2]) is Atom  # a str module goes out as an atom
    call = one(server, data)
    assert call == Call(id=1, module=A("lists"), function=A("reverse"), args=[[1, 2, 3]])
    assert set(client.open_ids) == {1} and set(server.open_ids) == {1}
    data = server.send(Reply(id=1, value=[3, 2, 1]))
    assert terms(data) == [(A("reply"), 1, [3, 2, 1])]
    assert one(client, data) == Reply(id=1, value=[3, 2, 1])
    assert not client.open_ids and not server.open_ids


def test_call_options() -> None:
    client, server = handshake()
    data = client.send(
        Call(id=9, module="m", function="f", args=[], timeout=1500, stream=True, credit=4)
    )
    assert terms(data) == [
        (
            A("call"),
            9,
            A("m"),
            A("f"),
            [],
            {A("timeout"): 1500, A("stream"): True, A("credit"): 4},
        )
    ]
    got = one(server, data)
    assert got == Call(id=9, module="m", function="f", args=[], timeout=1500, stream=True, credit=4)
    # default credit is not sent; unknown options are ignored
    data = frame((A("call"), 10, A("m"), A("f"), [], {A("stream"): True, A("later"): 1}))
    got = one(server, data)
    assert isinstance(got, Call) and got.stream and got.credit == 16
    assert server.stream_credit(10) == 16


def test_error_reply_both_ways() -> None:
    client, server = handshake()
    events(server, client.send(Call(id=3, module="m", function="f", args=[])))
    data = server.send(
        ErrorReply(id=3, cls="error", reason=(A("badmatch"), 1), details={A("message"): b"no"})
    )
    assert terms(data) == [(A("error"), 3, (A("error"), (A("badmatch"), 1), {A("message"): b"no"}))]
    got = one(client, data)
    assert got == ErrorReply(
        id=3, cls=A("error"), reason=(A("badmatch"), 1), details={"message": b"no"}
    )


def test_answers_in_any_order_and_id_reuse() -> None:
    client, server = handshake()
    data = b"".join(client.send(Call(id=i, module="m", function="f", args=[i])) for i in range(5))
    assert [e.id for e in events(server, data)] == [0, 1, 2, 3, 4]  # type: ignore[attr-defined]
    data = b"".join(server.send(Reply(id=i, value=i)) for i in (3, 1, 4, 0, 2))
    assert [e.id for e in events(client, data)] == [3, 1, 4, 0, 2]  # type: ignore[attr-defined]
    # an id may be reused once its call completed
    assert isinstance(one(server, client.send(Call(id=3, module="m", function="f", args=[]))), Call)


def test_cast_gets_no_answer() -> None:
    client, server = handshake()
    data = client.send(Cast(module="log", function="info", args=[b"hi"]))
    assert terms(data) == [(A("cast"), A("log"), A("info"), [b"hi"])]
    assert one(server, data) == Cast(module="log", function="info", args=[b"hi"])
    assert not server.open_ids


def test_cancel_keeps_the_id_open_until_its_final_answer() -> None:
    client, server = handshake()
    events(server, client.send(Call(id=5, module="m", function="f", args=[])))
    data = client.send(Cancel(id=5))
    assert terms(data) == [(A("cancel"), 5)]
    assert one(server, data) == Cancel(id=5)
    assert 5 in client.open_ids and 5 in server.open_ids
    with pytest.raises(LocalProtocolError):
        client.send(Call(id=5, module="m", function="f", args=[]))
    data = server.send(ErrorReply(id=5, cls="sshrpc", reason=A("cancelled")))
    assert one(client, data) == ErrorReply(id=5, cls="sshrpc", reason="cancelled")
    # cancelling an unknown or finished id does nothing
    assert one(server, client.send(Cancel(id=5))) == Cancel(id=5)
    assert not server.open_ids


def test_stream_credit_both_sides() -> None:
    client, server = handshake()
    events(
        server, client.send(Call(id=1, module="m", function="f", args=[], stream=True, credit=2))
    )
    assert server.stream_credit(1) == 2
    data = server.send(Chunk(id=1, value=b"a")) + server.send(Chunk(id=1, value=b"b"))
    assert terms(data) == [(A("chunk"), 1, b"a"), (A("chunk"), 1, b"b")]
    assert server.stream_credit(1) == 0
    with pytest.raises(LocalProtocolError, match="without credit"):
        server.send(Chunk(id=1, value=b"c"))
    assert events(client, data) == [Chunk(id=1, value=b"a"), Chunk(id=1, value=b"b")]
    data = client.send(Credit(id=1, n=3))
    assert terms(data) == [(A("credit"), 1, 3)]
    assert one(server, data) == Credit(id=1, n=3)
    assert server.stream_credit(1) == 3 and client.stream_credit(1) == 3
    data = server.send(Chunk(id=1, value=b"c")) + server.send(Reply(id=1, value=A("done")))
    assert events(client, data) == [Chunk(id=1, value=b"c"), Reply(id=1, value=A("done"))]
    assert server.stream_credit(1) == 0


def test_chunks_need_a_stream_call() -> None:
    client, server = handshake()
    events(server, client.send(Call(id=1, module="m", function="f", args=[])))
    with pytest.raises(LocalProtocolError, match="not an open stream"):
        server.send(Chunk(id=1, value=1))
    with pytest.raises(LocalProtocolError):
        server.send(Chunk(id=2, value=1))


def test_ping_pong() -> None:
    client, server = handshake()
    data = client.send(Ping(token=(1, b"t")))
    assert terms(data) == [(A("ping"), (1, b"t"))]
    assert one(server, data) == Ping(token=(1, b"t"))
    data = server.send(Pong(token=(1, b"t")))
    assert terms(data) == [(A("pong"), (1, b"t"))]
    assert one(client, data) == Pong(token=(1, b"t"))


def test_spawn_send_down() -> None:
    client, server = handshake()
    data = client.send(Spawn(id=4, module="worker", function="loop", args=[1]))
    assert terms(data) == [(A("spawn"), 4, A("worker"), A("loop"), [1])]
    assert one(server, data) == Spawn(id=4, module="worker", function="loop", args=[1])
    assert one(client, server.send(Reply(id=4, value=PID))) == Reply(id=4, value=PID)
    # send, client to server: to a pid or a registered name
    data = client.send(Send(dest=PID, msg=(A("job"), 1))) + client.send(
        Send(dest=A("logger"), msg=b"x")
    )
    assert terms(data) == [(A("send"), PID, (A("job"), 1)), (A("send"), A("logger"), b"x")]
    assert events(server, data) == [
        Send(dest=PID, msg=(A("job"), 1)),
        Send(dest=A("logger"), msg=b"x"),
    ]
    # send, server to client (its mailbox is the session pid)
    data = server.send(Send(dest=SESSION, msg=b"hello"))
    assert one(client, data) == Send(dest=SESSION, msg=b"hello")
    data = server.send(Down(pid=PID, reason=A("normal")))
    assert terms(data) == [(A("down"), PID, A("normal"))]
    assert one(client, data) == Down(pid=PID, reason=A("normal"))


def test_unknown_tags_are_events_for_the_log() -> None:
    client, server = handshake()
    assert one(server, frame((A("gossip"), 1, 2))) == Unknown(term=(A("gossip"), 1, 2))
    assert one(client, frame((A("notice"), b"x"))) == Unknown(term=(A("notice"), b"x"))
    assert client.state is OPEN and server.state is OPEN


# ----------------------------------------------------------------------------
# Bye and EOF


def test_graceful_bye_drains_open_calls() -> None:
    client, server = handshake()
    events(server, client.send(Call(id=1, module="m", function="f", args=[])))
    data = client.send(Bye())
    assert terms(data) == [(A("bye"), A("normal"))]
    assert client.state is DRAINING
    with pytest.raises(LocalProtocolError, match="cannot send Call"):
        client.send(Call(id=2, module="m", function="f", args=[]))
    assert one(server, data) == Bye(reason=A("normal"))
    assert server.state is DRAINING
    data = server.send(Reply(id=1, value=1)) + server.send(Bye())
    assert server.state is CLOSED
    assert events(client, data) == [Reply(id=1, value=1), Bye(reason=A("normal"))]
    assert client.state is CLOSED
    assert client.next_event() is CLOSED
    with pytest.raises(LocalProtocolError):
        client.send(Ping(token=1))
    with pytest.raises(LocalProtocolError):
        server.send(Pong(token=1))


def test_a_call_after_bye_is_a_protocol_error() -> None:
    client, server = handshake()
    events(server, client.send(Bye()))
    exc = protocol_error(server, frame((A("call"), 1, A("m"), A("f"), [])))
    assert exc.bye[0] == "protocol_error"


def test_server_bye_leaves_open_calls_unanswered() -> None:
    client, server = handshake()
    events(server, client.send(Call(id=1, module="m", function="f", args=[])))
    data = server.send(Bye(reason=A("shutting_down")))
    assert one(client, data) == Bye(reason=A("shutting_down"))
    assert client.state is CLOSED and set(client.open_ids) == {1}
    with pytest.raises(LocalProtocolError):
        server.send(Reply(id=1, value=1))


def test_eof_is_closed_and_the_server_may_still_answer() -> None:
    client, server = handshake()
    data = client.send(Call(id=1, module="m", function="f", args=[]))
    server.receive_data(data)
    server.receive_data(b"")
    assert isinstance(server.next_event(), Call)
    assert server.next_event() is CLOSED
    assert server.next_event() is CLOSED
    assert server.state is OPEN
    assert one(client, server.send(Reply(id=1, value=2))) == Reply(id=1, value=2)
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"more")


def test_eof_inside_a_frame_is_a_protocol_error() -> None:
    client, server = handshake()
    server.receive_data(client.send(Ping(token=1))[:-2])
    server.receive_data(b"")
    exc = protocol_error(server)
    assert b"inside a frame" in bye_detail(exc)[1]


# ----------------------------------------------------------------------------
# Refusals the core makes (badarg, overload, notsup)


@pytest.mark.parametrize(
    ("term", "detail"),
    [
        ((A("call"), 7, b"m", A("f"), []), "atoms"),
        ((A("call"), 7, A("m"), 1, []), "atoms"),
        ((A("call"), 7, A("m"), A("f"), (1,)), "proper list"),
        ((A("call"), 7, A("m"), A("f")), "5 or 6"),
        ((A("call"), 7, A("m"), A("f"), [], {}, 1), "5 or 6"),
        ((A("call"), 7, A("m"), A("f"), [], [1]), "map"),
        ((A("call"), 7, A("m"), A("f"), [], {A("timeout"): -5}), "timeout"),
        ((A("call"), 7, A("m"), A("f"), [], {A("stream"): 1}), "stream"),
        ((A("call"), 7, A("m"), A("f"), [], {A("stream"): True, A("credit"): -1}), "credit"),
        ((A("spawn"), 7, A("m"), A("f")), "spawn"),
        ((A("spawn"), 7, A("m"), A("f"), 3), "proper list"),
    ],
    ids=repr,
)
def test_bad_shapes_with_a_readable_id_are_refused_badarg(term: Any, detail: str) -> None:
    client, server = handshake()
    got = one(server, frame(term))
    assert isinstance(got, Refused)
    assert (got.id, got.reason, got.term) == (7, "badarg", term)
    assert detail in got.detail
    assert set(server.open_ids) == {7}
    # the node answers it; the client (which must have opened id 7) gets it
    client.send(Call(id=7, module="m", function="f", args=[]))
    data = server.send(ErrorReply(id=7, cls="sshrpc", reason=got.reason))
    assert terms(data) == [(A("error"), 7, (A("sshrpc"), A("badarg"), {}))]
    assert one(client, data) == ErrorReply(id=7, cls="sshrpc", reason="badarg")
    assert not server.open_ids


@pytest.mark.parametrize("call_id", [0, 1, 255, 256, 2**31 - 1, 2**31, 2**64 - 1])
@pytest.mark.parametrize("timeout", [None, 0, 255, 70_000, 2**31, 2**40])
@pytest.mark.parametrize(
    "args", [[], [1], [Atom("x"), b"bin", [1, 2]], (1.5, "text"), [b"y" * 70_000]]
)
def test_send_call_is_send_of_a_call(call_id: int, timeout: int | None, args: Any) -> None:
    """The client's fast path gives the bytes and state of send(Call(...))."""
    fast, _ = handshake()
    slow, _ = handshake()
    module, function = ("mod", "fun") if call_id % 2 else ("ünïcode_mod", "f")
    for _ in range(2):  # the second time from the cache
        got = fast.send_call(call_id, module, function, args, timeout)
        want = slow.send(
            Call(
                id=call_id,
                module=Atom(module),
                function=Atom(function),
                args=list(args),
                timeout=timeout,
            )
        )
        assert got == want
        assert list(fast.open_ids) == list(slow.open_ids) == [call_id]
        assert fast.statistics() == slow.statistics()
        for conn in (fast, slow):
            conn._open.clear()


@pytest.mark.parametrize("timeout", [None, 0, 70_000, 2**31])
@pytest.mark.parametrize(
    "ids", [[0], [1, 2, 3], [255, 256, 2**31 - 1], [5, 2**31, 6], list(range(100, 164))]
)
def test_send_calls_is_send_call_for_each(ids: list[int], timeout: int | None) -> None:
    """The batch gives the bytes and state of one send_call per call."""
    batch, _ = handshake()
    each, _ = handshake()
    arglists: list[Any] = [[i, b"v" * (i % 7), Atom("a")] for i in range(len(ids))]
    arglists[0] = (1.5, "tuple args")  # not a list: the per-call path
    got = batch.send_calls(ids, "mod", "fun", arglists, timeout)
    want = b"".join(
        each.send_call(i, "mod", "fun", a, timeout) for i, a in zip(ids, arglists, strict=True)
    )
    assert got == want
    assert list(batch.open_ids) == list(each.open_ids)
    assert batch.statistics() == each.statistics()
    arglists[0] = [0]  # every one a list: one C call
    more = [i + 2**20 for i in ids]
    got = batch.send_calls(more, "mod", "fun", arglists, timeout)
    want = b"".join(
        each.send_call(i, "mod", "fun", a, timeout) for i, a in zip(more, arglists, strict=True)
    )
    assert got == want and batch.statistics() == each.statistics()
    again = [i + 2**21 for i in ids]  # tuples, not lists: the same
    got = batch.send_calls(tuple(again), "mod", "fun", tuple(arglists), timeout)  # type: ignore[arg-type]
    want = b"".join(
        each.send_call(i, "mod", "fun", a, timeout) for i, a in zip(again, arglists, strict=True)
    )
    assert got == want and batch.statistics() == each.statistics()


def test_send_calls_is_all_or_nothing() -> None:
    client, _ = handshake()
    client.send_call(7, "m", "f", [])
    before = client.statistics()
    bad: list[tuple[list[int], list[Any], type[Exception]]] = [
        ([1, 2, 3], [[1], [object()], [3]], TypeError),  # no term: after one was encoded
        ([1, 7, 3], [[1], [2], [3]], LocalProtocolError),  # 7 is open
        ([1, 1], [[1], [2]], LocalProtocolError),  # the same id twice
        ([1, -1], [[1], [2]], ValueError),
        ([1, 2], [[1]], ValueError),  # lengths differ
    ]
    for ids, arglists, exc in bad:
        with pytest.raises(exc):
            client.send_calls(ids, "m", "f", arglists)
        assert client.statistics() == before and list(client.open_ids) == [7]
    small, _ = handshake(client_max_frame=1 << 20, max_frame=1024)
    with pytest.raises(MessageTooLarge):
        small.send_calls([1, 2], "m", "f", [[b"ok"], [b"z" * 2000]])
    assert not small.open_ids
    with pytest.raises(ValueError, match="module"):
        client.send_calls([1], "", "f", [[]])
    assert client.statistics() == before


def test_send_call_errors_change_nothing() -> None:
    client, _ = handshake()
    with pytest.raises(LocalProtocolError):
        Connection(Role.CLIENT).send_call(1, "m", "f", [])  # before the hellos
    client.send_call(7, "m", "f", [])
    with pytest.raises(LocalProtocolError, match="already open"):
        client.send_call(7, "m", "f", [])
    with pytest.raises(ValueError, match="timeout"):
        client.send_call(8, "m", "f", [], -1)
    with pytest.raises(ValueError, match="module"):
        client.send_call(8, "", "f", [])
    with pytest.raises(ValueError, match="id"):
        client.send_call(-1, "m", "f", [])
    with pytest.raises(TypeError):
        client.send_call(8, "m", "f", [object()])
    client2, _ = handshake(client_max_frame=1 << 20, max_frame=1024)
    with pytest.raises(MessageTooLarge):
        client2.send_call(8, "m", "f", [b"z" * 2000])
    assert list(client.open_ids) == [7] and not client2.open_ids
    assert client.statistics().frames_sent == client2.statistics().frames_sent + 1


def test_send_reply_is_send_of_a_reply() -> None:
    """The server's fast answer gives the bytes and state of
    ``send(Reply(...))``, and its errors, changing nothing when it fails."""
    fast_client, fast = handshake(max_frame=1 << 20, client_max_frame=4096)
    _, slow = handshake(max_frame=1 << 20, client_max_frame=4096)
    for conn in (fast, slow):
        for i in (1, 2, 3):
            events(conn, fast_client.send(Call(id=i, module="m", function="f", args=[])))
            fast_client._open.clear()
    assert fast.send_reply(1, [b"v", 1.5]) == slow.send(Reply(id=1, value=[b"v", 1.5]))
    # too large for the peer: the same too_large error answer
    assert fast.send_reply(2, b"z" * 5000) == slow.send(Reply(id=2, value=b"z" * 5000))
    assert fast.statistics() == slow.statistics()
    for bad_id, exc in ((1, LocalProtocolError), (99, LocalProtocolError), (True, ValueError)):
        with pytest.raises(exc):
            fast.send_reply(bad_id, 0)
    with pytest.raises(TypeError):
        fast.send_reply(3, object())
    assert list(fast.open_ids) == [3] and fast.statistics() == slow.statistics()
    with pytest.raises(LocalProtocolError):
        fast_client.send_reply(3, 0)  # a client never answers


@pytest.mark.parametrize(
    "options",
    [
        {A("timeout"): 0},
        {A("timeout"): 1500},
        {A("timeout"): 2**64},
        {A("timeout"): -1},
        {A("timeout"): True},
        {A("timeout"): 1.5},
        {A("timeout"): None},
        {b"timeout": 5},
        {A("timeout"): 5, A("stream"): False},
        {},
    ],
)
def test_call_with_options_fast_and_checked_agree(options: dict[Any, Any]) -> None:
    """A call whose only option is ``timeout`` takes the server's fast path;
    its event (or refusal) is the one the full checks give for the same
    options with an unknown key added (which the fast path never takes)."""
    _, fast = handshake()
    _, checked = handshake()
    term = (A("call"), 4, A("m"), A("f"), [1], options)
    got = one(fast, frame(term))
    want = one(checked, frame((*term[:5], {**options, A("later"): 1})))
    if isinstance(want, Refused):
        assert isinstance(got, Refused) and (got.id, got.reason) == (want.id, want.reason)
    else:
        assert got == want
    assert list(fast.open_ids) == list(checked.open_ids) == [4]


def test_overload_beyond_max_calls() -> None:
    client, server = handshake(max_calls=2)
    data = b"".join(client.send(Call(id=i, module="m", function="f", args=[])) for i in range(3))
    first, second, third = events(server, data)
    assert isinstance(first, Call) and isinstance(second, Call)
    assert third == Refused(
        id=2, reason=A("overload"), detail="too many open calls", term=third.term
    )  # type: ignore[attr-defined]
    server.send(ErrorReply(id=2, cls="sshrpc", reason=A("overload")))
    server.send(Reply(id=0, value=0))
    # room again
    assert isinstance(one(server, client.send(Call(id=5, module="m", function="f", args=[]))), Call)


def test_spawns_count_against_max_calls() -> None:
    client, server = handshake(max_calls=1)
    events(server, client.send(Spawn(id=1, module="m", function="f", args=[])))
    got = one(server, client.send(Call(id=2, module="m", function="f", args=[])))
    assert isinstance(got, Refused) and got.reason == "overload"


def test_notsup_for_features_not_announced() -> None:
    client, server = handshake(features=["call", "cast"])
    got = one(server, client.send(Call(id=1, module="m", function="f", args=[], stream=True)))
    assert isinstance(got, Refused) and (got.id, got.reason) == (1, "notsup")
    got = one(server, client.send(Spawn(id=2, module="m", function="f", args=[])))
    assert isinstance(got, Refused) and (got.id, got.reason) == (2, "notsup")
    assert isinstance(one(server, client.send(Call(id=3, module="m", function="f", args=[]))), Call)


# ----------------------------------------------------------------------------
# Peer violations: ProtocolError with the bye to send


@pytest.mark.parametrize(
    "term",
    [
        (A("call"), -1, A("m"), A("f"), []),
        (A("call"), 2**64, A("m"), A("f"), []),
        (A("call"), b"1", A("m"), A("f"), []),
        (A("call"),),
        (A("spawn"), 1.0, A("m"), A("f"), []),
        (A("cancel"), A("x")),
        (A("cancel"), 1, 2),
        (A("credit"), 1, -1),
        (A("credit"), 1),
        (A("credit"), None, 1),
        (A("cast"), b"m", A("f"), []),
        (A("cast"), A("m"), A("f"), 1),
        (A("ping"),),
        (A("ping"), 1, 2),
        (A("send"), PID),
        (A("bye"),),
        (A("bye"), 1, 2),
        (A("mfa"), (A("m"), A("f"), [])),
        (A("reply"), 1, 1),
        [A("call"), 1],
        b"junk",
    ],
    ids=repr,
)
def test_server_protocol_errors(term: Any) -> None:
    client, server = handshake()
    exc = protocol_error(server, frame(term))
    tag, detail = bye_detail(exc)
    assert tag == "protocol_error" and detail == str(exc).encode()
    # the error sticks, and the bye can be sent exactly once
    with pytest.raises(ProtocolError):
        server.next_event()
    data = server.send(Bye(reason=exc.bye))
    assert terms(data) == [(A("bye"), exc.bye)]
    assert one(client, data) == Bye(reason=exc.bye)
    with pytest.raises(LocalProtocolError):
        server.send(Bye(reason=exc.bye))


def test_duplicate_open_id_is_a_protocol_error() -> None:
    client, server = handshake()
    data = client.send(Call(id=1, module="m", function="f", args=[]))
    events(server, data)
    exc = protocol_error(server, data)
    assert b"already open" in bye_detail(exc)[1]
    # also a spawn reusing an open id
    client, server = handshake()
    events(server, client.send(Call(id=1, module="m", function="f", args=[])))
    exc = protocol_error(server, frame((A("spawn"), 1, A("m"), A("f"), [])))
    assert b"already open" in bye_detail(exc)[1]


def test_frame_too_large() -> None:
    _client, server = handshake(max_frame=1000)
    assert server.max_frame == 1000
    server.receive_data(struct.pack(">I", 1001))  # the header alone is enough
    with pytest.raises(FrameTooLarge) as info:
        server.next_event()
    assert info.value.bye == (A("frame_too_large"), 1001, 1000)
    assert server.state is CLOSED
    assert terms(server.send(Bye(reason=info.value.bye))) == [
        (A("bye"), (A("frame_too_large"), 1001, 1000))
    ]


def test_compressed_frame_inflating_past_max_frame() -> None:
    _client, server = handshake(max_frame=1000)
    payload = encode(b"z" * 5000, compressed=True)
    assert len(payload) < 1000
    exc = protocol_error(server, struct.pack(">I", len(payload)) + payload)
    assert exc.bye[0] == "frame_too_large" and exc.bye[2] == 1000
    assert exc.bye[1] > 1000


@pytest.mark.parametrize(
    ("payload", "offset"),
    [
        (b"\x83\x68\x02\x61\x01", 5),  # truncated tuple
        (b"\x83\xff", 1),  # unknown tag
        (b"\x83\x61\x01\x00", 3),  # trailing byte
        (b"\x84\x61\x01", 0),  # wrong version byte
    ],
)
def test_bad_term(payload: bytes, offset: int) -> None:
    _client, server = handshake()
    exc = protocol_error(server, struct.pack(">I", len(payload)) + payload)
    tag, detail = bye_detail(exc)
    assert tag == "bad_term" and isinstance(detail, bytes)
    assert f"at byte {offset}".encode() in detail


def test_nesting_deeper_than_max_depth_is_a_bad_term() -> None:
    client, server = handshake(max_depth=10)
    deep: Any = 1
    for _ in range(20):
        deep = [deep]
    exc = protocol_error(server, client.send(Call(id=1, module="m", function="f", args=[deep])))
    assert exc.bye[0] == "bad_term"


def test_client_protocol_errors() -> None:
    def fresh() -> tuple[Connection, Connection]:
        client, server = handshake()
        events(server, client.send(Call(id=1, module="m", function="f", args=[])))
        return client, server

    cases = [
        frame((A("reply"), 2, 1)),  # id not open
        frame((A("error"), 2, (A("error"), 1, {}))),
        frame((A("error"), 1, (A("error"), 1))),  # malformed error
        frame((A("error"), 1, (b"error", 1, {}))),
        frame((A("error"), 1, (A("error"), 1, []))),
        frame((A("reply"), -1, 1)),
        frame((A("reply"), 1)),
        frame((A("chunk"), 1, 1)),  # not a stream call
        frame((A("pong"),)),
        frame((A("down"), PID)),
        frame((A("answer"), (1, 0))),  # not in legacy mode
        frame((A("hello"), 1, {})),  # second hello
        frame(5),
    ]
    for data in cases:
        client, _ = fresh()
        exc = protocol_error(client, data)
        assert exc.bye[0] == "protocol_error", data


def test_chunk_beyond_granted_credit() -> None:
    client, server = handshake()
    events(
        server, client.send(Call(id=1, module="m", function="f", args=[], stream=True, credit=1))
    )
    events(client, frame((A("chunk"), 1, 1)))
    exc = protocol_error(client, frame((A("chunk"), 1, 2)))
    assert b"beyond the granted credit" in bye_detail(exc)[1]


@pytest.mark.parametrize(
    "junk",
    [
        b"Welcome to host.example!\n",
        b"hi\n",
        b"\x00\x00\x00\x05abcde",  # a plausible length, then not a term
    ],
)
def test_junk_before_the_server_hello(junk: bytes) -> None:
    client = Connection(Role.CLIENT)
    client.send(client.hello())
    server = Connection(Role.SERVER)
    events(server, frame((A("hello"), 1, {})))
    data = junk + server.send(server.hello())
    exc = protocol_error(client, data)
    assert "printed text before the hello" in str(exc)
    assert repr(junk[:10])[:-1] in str(exc)


def test_junk_is_shown_truncated() -> None:
    client = Connection(Role.CLIENT)
    client.send(client.hello())
    exc = protocol_error(client, b"Last login: " + b"x" * 5000)
    assert "Last login" in str(exc) and len(str(exc)) < 400


def test_a_client_hello_with_junk_is_a_plain_protocol_error_on_the_server() -> None:
    exc = protocol_error(server_only(b"GET / HTTP/1.1\r\n"))
    assert isinstance(exc, FrameTooLarge)
    assert "printed text" not in str(exc)


# ----------------------------------------------------------------------------
# Local misuse: LocalProtocolError, nothing changed


def test_local_misuse() -> None:
    client, server = handshake()
    with pytest.raises(LocalProtocolError, match="not open"):
        server.send(Reply(id=99, value=1))
    with pytest.raises(LocalProtocolError, match="not open"):
        server.send(ErrorReply(id=99, cls="error", reason=1))
    events(server, client.send(Call(id=1, module="m", function="f", args=[])))
    server.send(Reply(id=1, value=1))
    with pytest.raises(LocalProtocolError, match="not open"):
        server.send(Reply(id=1, value=2))  # a second final answer
    client.send(Call(id=2, module="m", function="f", args=[]))
    with pytest.raises(LocalProtocolError, match="already open"):
        client.send(Call(id=2, module="m", function="f", args=[]))
    with pytest.raises(LocalProtocolError, match="already open"):
        client.send(Spawn(id=2, module="m", function="f", args=[]))
    # events of the other role
    with pytest.raises(LocalProtocolError, match="does not send"):
        client.send(Reply(id=2, value=1))
    with pytest.raises(LocalProtocolError, match="does not send"):
        server.send(Call(id=3, module="m", function="f", args=[]))
    with pytest.raises(LocalProtocolError, match="does not send"):
        server.send(Mfa(module=A("m"), function=A("f"), args=[]))
    # a hello twice
    with pytest.raises(LocalProtocolError):
        client.send(client.hello())
    with pytest.raises(LocalProtocolError):
        server.send(server.hello())
    assert client.state is OPEN and server.state is OPEN


def test_calls_before_hello_and_answers_before_the_servers_hello() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError, match="state IDLE"):
        client.send(Call(id=1, module="m", function="f", args=[]))
    server = Connection(Role.SERVER)
    with pytest.raises(LocalProtocolError):
        server.send(Pong(token=1))
    with pytest.raises(LocalProtocolError):
        server.send(server.hello())  # before the client's hello
    with pytest.raises(LocalProtocolError):
        server.send(Answer(result=1))


def test_nothing_after_close() -> None:
    client, _server = handshake()
    client.send(Bye(reason=A("error")))
    assert client.state is CLOSED
    for event in (
        Ping(token=1),
        Bye(),
        Cancel(id=1),
        Call(id=1, module="m", function="f", args=[]),
    ):
        with pytest.raises(LocalProtocolError):
            client.send(event)
    with pytest.raises(LocalProtocolError):
        client.send_keepalive()
    assert client.next_event() is CLOSED


def test_message_too_large_leaves_everything_as_it_was() -> None:
    client, server = handshake(max_frame=2000)
    with pytest.raises(MessageTooLarge) as info:
        client.send(Call(id=1, module="m", function="f", args=[b"x" * 3000]))
    assert info.value.maximum == 2000 and info.value.size > 3000
    assert isinstance(info.value, ValueError)
    assert not client.open_ids and client.state is OPEN
    for event in (
        Cast(module="m", function="f", args=[b"x" * 3000]),
        Send(dest=PID, msg=b"x" * 3000),
        Ping(token=b"x" * 3000),
    ):
        with pytest.raises(MessageTooLarge):
            client.send(event)
    assert one(server, client.send(Call(id=1, module="m", function="f", args=[b"x" * 1000])))


def test_too_large_answer_becomes_a_too_large_error() -> None:
    client, server = handshake(client_max_frame=1000)
    data = b"".join(
        client.send(Call(id=i, module="m", function="f", args=[], stream=True)) for i in (1, 2)
    )
    events(server, data)
    data = server.send(Reply(id=1, value=b"x" * 2000))
    assert terms(data) == [(A("error"), 1, (A("sshrpc"), A("too_large"), {}))]
    assert one(client, data) == ErrorReply(id=1, cls="sshrpc", reason="too_large")
    data = server.send(ErrorReply(id=2, cls="error", reason=b"y" * 2000))
    assert one(client, data) == ErrorReply(id=2, cls="sshrpc", reason="too_large")
    assert server.statistics().answers_too_large == 2
    assert not server.open_ids
    # chunks, sends and downs are not final: they raise instead
    events(server, client.send(Call(id=3, module="m", function="f", args=[], stream=True)))
    for event in (
        Chunk(id=3, value=b"x" * 2000),
        Send(dest=SESSION, msg=b"x" * 2000),
        Down(pid=PID, reason=b"x" * 2000),
    ):
        with pytest.raises(MessageTooLarge):
            server.send(event)
    assert server.stream_credit(3) == 16


# ----------------------------------------------------------------------------
# Legacy mode


def test_legacy_mode_both_roles() -> None:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    data = client.send(Mfa(module=A("lists"), function=A("reverse"), args=[[1, 2]]))
    assert terms(data) == [(A("mfa"), (A("lists"), A("reverse"), [[1, 2]]))]
    assert client.legacy and client.state is LEGACY
    assert one(server, data) == Mfa(module=A("lists"), function=A("reverse"), args=[[1, 2]])
    assert server.legacy and server.state is LEGACY
    data = server.send(Answer(result=[2, 1], status=0))
    assert terms(data) == [(A("answer"), ([2, 1], 0))]
    assert one(client, data) == Answer(result=[2, 1], status=0)
    # pipelined requests are answered in order
    data = client.send(Mfa(module=A("m"), function=A("f"), args=[])) + client.send(
        Mfa(module=A("m"), function=A("g"), args=[])
    )
    assert len(events(server, data)) == 2
    data = server.send(Answer(result=(A("exec_badrpc"), A("undef")), status=-1))
    data += server.send(Answer(result=1))
    assert events(client, data) == [
        Answer(result=(A("exec_badrpc"), A("undef")), status=-1),
        Answer(result=1, status=0),
    ]
    with pytest.raises(LocalProtocolError):
        server.send(Answer(result=1))  # nothing in flight
    with pytest.raises(LocalProtocolError):
        client.send(Call(id=1, module="m", function="f", args=[]))
    with pytest.raises(LocalProtocolError):
        server.send(Reply(id=1, value=1))
    exc = protocol_error(client, frame((A("answer"), (1, 0))))  # nothing in flight
    assert exc.bye[0] == "protocol_error"


@pytest.mark.parametrize(
    "term", [(A("call"), 1, A("m"), A("f"), []), A("hello"), (A("mfa"), 1), (A("mfa"),)], ids=repr
)
def test_legacy_anything_else_is_answered_exec_error(term: Any) -> None:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    events(server, client.send(Mfa(module=A("m"), function=A("f"), args=[])))
    got = one(server, frame(term))
    assert isinstance(got, Refused) and got.id is None and got.term == term
    server.send(Answer(result=1))
    data = server.send(Answer(result=(A("exec_error"), got.term), status=-1))
    client.send(Mfa(module=A("m"), function=A("f"), args=[]))  # the client's view
    events(client, frame((A("answer"), (1, 0))))
    assert one(client, data) == Answer(result=(A("exec_error"), term), status=-1)


def test_legacy_malformed_first_mfa_is_still_legacy() -> None:
    server = server_only(frame((A("mfa"), (A("m"), A("f")))))
    got = events(server)
    assert len(got) == 1 and isinstance(got[0], Refused) and got[0].id is None
    assert server.legacy and server.state is LEGACY
    assert terms(server.send(Answer(result=(A("exec_error"), got[0].term), status=-1)))


def test_legacy_max_frame_is_the_receivers() -> None:
    server = Connection(Role.SERVER, max_frame=4 << 20)
    events(server, frame((A("mfa"), (A("m"), A("f"), []))))
    assert server.max_frame == 4 << 20
    big = frame((A("mfa"), (A("m"), A("f"), [b"x" * (2 << 20)])))
    assert isinstance(one(server, big), Mfa)
    # answers are not limited (the original protocol has no max_frame)
    server.send(Answer(result=b"y" * (2 << 20)))


# ----------------------------------------------------------------------------
# The transition tables and random chunking


def test_every_state_has_a_row_for_both_roles() -> None:
    for role in Role:
        assert set(TRANSITIONS[role]) == set(STATES)
        for row in TRANSITIONS[role].values():
            for (direction, name), new in row.items():
                assert direction in (SEND, RECV) and new in STATES
                assert name.rstrip("!") in {
                    *(cls.__name__ for cls in Event.__subclasses__()),
                }, name


def _conversation() -> tuple[bytes, bytes, list[Event], list[Event]]:
    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER, node="n@h", session=SESSION)
    up = [client.send(client.hello())]
    down = []
    server_events = events(server, up[0])
    down.append(server.send(server.hello()))
    client_events = events(client, down[0])
    calls = [
        Call(id=1, module="m", function="f", args=[b"a" * 300]),
        Call(id=2, module="m", function="g", args=[], stream=True, credit=2),
        Cast(module="m", function="h", args=[1.5]),
        Ping(token=7),
        Send(dest=A("reg"), msg=[1, 2]),
        Credit(id=2, n=1),
        Cancel(id=1),
    ]
    for ev in calls:
        up.append(client.send(ev))
        up.append(client.send_keepalive())
    answers = [
        Chunk(id=2, value=b"c1"),
        Reply(id=1, value=list(range(100))),
        Chunk(id=2, value=b"c2"),
        Pong(token=7),
        Send(dest=SESSION, msg=b"m"),
        ErrorReply(id=2, cls="sshrpc", reason=A("cancelled")),
    ]
    server_events += events(server, b"".join(up[1:]))
    for ev in answers:
        down.append(server.send(ev))
    client_events += events(client, b"".join(down[1:]))
    return b"".join(up), b"".join(down), server_events, client_events


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(min_value=0), max_size=40), st.lists(st.integers(min_value=0), max_size=40)
)
def test_random_chunking_gives_the_same_events(up_cuts: list[int], down_cuts: list[int]) -> None:
    up, down, server_expected, client_expected = _conversation()

    def cut(data: bytes, cuts: list[int]) -> list[bytes]:
        points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
        return [data[a:b] for a, b in itertools.pairwise(points)]

    server = Connection(Role.SERVER, node="n@h", session=SESSION)
    got: list[Event] = []
    for piece in cut(up, up_cuts):
        got += events(server, piece)
    assert got == server_expected
    client = Connection(Role.CLIENT)
    client.send(client.hello())
    for ev in server_expected[1:]:  # the same calls, so the same ids are open
        if isinstance(ev, Call):
            client.send(ev)
    got = []
    for piece in cut(down, down_cuts):
        got += events(client, piece)
    assert got == client_expected


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([Role.CLIENT, Role.SERVER]))
def test_random_bytes_raise_only_protocol_errors(data: bytes, role: Role) -> None:
    conn = Connection(role)
    if role is Role.CLIENT:
        conn.send(conn.hello())
    if data:
        conn.receive_data(data)
    conn.receive_data(b"")
    try:
        for _ in range(1000):
            if conn.next_event() is CLOSED:
                break
    except ProtocolError as exc:
        assert exc.bye is not None
        assert conn.state is CLOSED


def test_statistics() -> None:
    client, server = handshake()
    events(server, client.send(Call(id=1, module="m", function="f", args=[])))
    stats = server.statistics()
    assert (stats.state, stats.open_calls, stats.frames_received, stats.frames_sent) == (
        OPEN,
        1,
        2,
        1,
    )
    assert stats.bytes_buffered == 0
    assert ALL_FEATURES == ("call", "cast", "cancel", "deadline", "stream", "spawn", "send", "ping")


def test_docs_show_the_current_tables() -> None:
    page = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    for role in Role:
        assert diagram(role) in page, f"regenerate the {role.name} diagram in docs/protocol.md"


def test_short_junk_then_eof_before_the_hello() -> None:
    client = Connection(Role.CLIENT)
    client.send(client.hello())
    client.receive_data(b"ok\n")
    assert client.next_event() is NEED_DATA
    client.receive_data(b"")
    exc = protocol_error(client)
    assert "printed text before the hello" in str(exc) and "b'ok\\n'" in str(exc)


def test_a_hello_announcing_more_than_a_header_can_carry() -> None:
    client = Connection(Role.CLIENT)
    client.send(Hello(max_frame=2**40, client="x/1"))
    server = Connection(Role.SERVER)
    hello = one(server, client.send_keepalive() + frame((A("hello"), 1, {A("max_frame"): 2**40})))
    assert isinstance(hello, Hello) and hello.max_frame == 2**40
    one(client, server.send(server.hello()))
    assert client.max_frame == 2**32 - 1 and server.peer_max_frame == 2**32 - 1


def test_bye_reasons() -> None:
    client, server = handshake()
    assert terms(client.send(Bye(reason="normal"))) == [(A("bye"), A("normal"))]
    ((_, reason),) = terms(server.send(Bye(reason="going away")))
    assert reason == b"going away"


def _in_state(role: Role, state: Any) -> Connection:
    """A connection of ``role`` brought to ``state`` through its own verbs."""
    if role is Role.CLIENT:
        conn = Connection(Role.CLIENT)
        if state is IDLE:
            return conn
        if state is LEGACY:
            conn.send(Mfa(module=A("m"), function=A("f"), args=[]))
            return conn
        conn.send(conn.hello())
        if state is AWAIT_HELLO:
            return conn
        events(conn, frame((A("hello"), 1, {})))
        if state is DRAINING:
            conn.send(Bye())
        elif state is CLOSED:
            conn.send(Bye(reason=A("error")))
        return conn
    conn = Connection(Role.SERVER)
    if state is IDLE:
        return conn
    if state is LEGACY:
        events(conn, frame((A("mfa"), (A("m"), A("f"), []))))
        return conn
    events(conn, frame((A("hello"), 1, {})))
    if state is MUST_HELLO:
        return conn
    conn.send(conn.hello())
    if state is DRAINING:
        events(conn, frame((A("bye"), A("normal"))))
    elif state is CLOSED:
        conn.send(Bye())
    return conn


def _sample(name: str) -> Event:
    return {
        "Hello": Hello(),
        "Call": Call(id=77, module="m", function="f", args=[]),
        "Cast": Cast(module="m", function="f", args=[]),
        "Cancel": Cancel(id=1),
        "Credit": Credit(id=1, n=1),
        "Ping": Ping(token=1),
        "Pong": Pong(token=1),
        "Spawn": Spawn(id=78, module="m", function="f", args=[]),
        "Send": Send(dest=A("x"), msg=1),
        "Down": Down(pid=PID, reason=A("normal")),
        "Reply": Reply(id=1, value=1),
        "ErrorReply": ErrorReply(id=1, cls="error", reason=1),
        "Chunk": Chunk(id=1, value=1),
        "Bye": Bye(),
        "Bye!": Bye(reason=A("error")),
        "Mfa": Mfa(module=A("m"), function=A("f"), args=[]),
        "Answer": Answer(result=1),
    }[name]


SENDABLE = [
    "Hello", "Call", "Cast", "Cancel", "Credit", "Ping", "Pong", "Spawn", "Send", "Down",
    "Reply", "ErrorReply", "Chunk", "Bye", "Bye!", "Mfa", "Answer",
]  # fmt: skip


ROLE_STATES = [
    (role, state)
    for role in Role
    for state in STATES
    if state is not (MUST_HELLO if role is Role.CLIENT else AWAIT_HELLO)
]


@pytest.mark.parametrize(("role", "state"), ROLE_STATES, ids=repr)
def test_send_follows_the_table(role: Role, state: Any) -> None:
    """Every event the table does not allow in a state is refused there,
    and every one it allows moves the state where the table says."""
    row = TRANSITIONS[role][state]
    for name in SENDABLE:
        conn = _in_state(role, state)
        assert conn.state is state
        if role is Role.SERVER and name in ("Reply", "ErrorReply", "Chunk") and state is not IDLE:
            # give the answer an open id (a stream call, for the chunk)
            conn._open[1] = conn._open.get(1) or _stream_record()
        allowed = (SEND, name) in row
        if not allowed:
            with pytest.raises(LocalProtocolError):
                conn.send(_sample(name))
            assert conn.state is state
        else:
            conn.send(_sample(name))
            assert conn.state is row[(SEND, name)], name


def _stream_record() -> Any:
    from sshrpc.protocol._connection import _Open

    return _Open(True, 5)


class PairedConversation(RuleBasedStateMachine):
    """Random conversations: whatever the client sends and the server answers,
    in whatever order, both sides agree on the open ids and stream credit,
    and each side receives exactly the events the other sent."""

    def __init__(self) -> None:
        super().__init__()
        self.client, self.server = handshake(max_calls=8)
        self.next_id = 0

    def _up(self, event: Event) -> None:
        got = one(self.server, self.client.send(event))
        if isinstance(got, Refused):
            assert got.reason == "overload"
            self._down(ErrorReply(id=got.id, cls="sshrpc", reason=got.reason))  # type: ignore[arg-type]
        else:
            assert got == event

    def _down(self, event: Event) -> None:
        assert one(self.client, self.server.send(event)) == event

    @rule(stream=st.booleans(), credit=st.integers(0, 3))
    def call(self, stream: bool, credit: int) -> None:
        self.next_id += 1
        self._up(
            Call(
                id=self.next_id,
                module="m",
                function="f",
                args=[],
                stream=stream,
                credit=credit if stream else 16,  # credit only travels with a stream
            )
        )

    @rule()
    def spawn(self) -> None:
        self.next_id += 1
        self._up(Spawn(id=self.next_id, module="m", function="f", args=[]))

    @rule(data=st.data())
    def reply(self, data: st.DataObject) -> None:
        if self.server.open_ids:
            call_id = data.draw(st.sampled_from(sorted(self.server.open_ids)))
            self._down(Reply(id=call_id, value=call_id))

    @rule(data=st.data())
    def fail(self, data: st.DataObject) -> None:
        if self.server.open_ids:
            call_id = data.draw(st.sampled_from(sorted(self.server.open_ids)))
            self._down(ErrorReply(id=call_id, cls="sshrpc", reason=A("cancelled")))

    @rule(data=st.data())
    def chunk(self, data: st.DataObject) -> None:
        streams = [i for i in self.server.open_ids if self.server.stream_credit(i)]
        if streams:
            self._down(Chunk(id=data.draw(st.sampled_from(sorted(streams))), value=b"c"))

    @rule(data=st.data(), n=st.integers(0, 3))
    def credit(self, data: st.DataObject, n: int) -> None:
        call_id = data.draw(st.integers(0, self.next_id + 1))
        self._up(Credit(id=call_id, n=n))

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        self._up(Cancel(id=data.draw(st.integers(0, self.next_id + 1))))

    @rule()
    def ping(self) -> None:
        self._up(Ping(token=self.next_id))
        self._down(Pong(token=self.next_id))

    @invariant()
    def both_sides_agree(self) -> None:
        assert set(self.client.open_ids) == set(self.server.open_ids)
        for call_id in self.server.open_ids:
            assert self.client.stream_credit(call_id) == self.server.stream_credit(call_id)
        assert len(self.server.open_ids) <= 8


PairedConversation.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None
)
test_paired_conversation = PairedConversation.TestCase


@pytest.mark.parametrize(
    ("cls", "reason", "details"),
    [
        ("error", (A("ValueError"), b"bad value"), {}),
        ("exit", A("killed"), {A("message"): b"gone"}),
        ("throw", [1, 2], {}),
        *[
            ("sshrpc", A(r), {})
            for r in (
                "undef",
                "forbidden",
                "badarg",
                "timeout",
                "cancelled",
                "overload",
                "shutting_down",
                "notsup",
                "too_large",
            )
        ],
        ("error", A("x"), {A("trace"): [b"f/1", b"g/2"]}),
    ],
    ids=repr,
)
def test_every_error_shape(cls: str, reason: Any, details: dict[Any, Any]) -> None:
    client, server = handshake()
    events(server, client.send(Call(id=1, module="m", function="f", args=[])))
    data = server.send(ErrorReply(id=1, cls=cls, reason=reason, details=details))
    assert terms(data) == [(A("error"), 1, (A(cls), reason, details))]
    got = one(client, data)
    assert got == ErrorReply(id=1, cls=A(cls), reason=reason, details=details)
    assert type(got.cls) is Atom  # type: ignore[attr-defined]


# -- work bounds (issue 11): the decode budget and the inflate ratio -------------


def _nil_ping(n: int, compressed: bool = False) -> bytes:
    payload = encode((A("ping"), [[]] * n), compressed=compressed)
    return struct.pack(">I", len(payload)) + payload


def test_decode_budget_is_a_bad_term_with_the_offset() -> None:
    # 1 MiB frames: 4 MiB of cost units; a list of empty lists costs 72 each.
    _client, server = handshake()
    assert server.max_cost == 4 * 1024 * 1024
    exc = protocol_error(server, _nil_ping(300_000))
    tag, detail = bye_detail(exc)
    assert tag == "bad_term"
    assert detail.startswith(b"term exceeds the decode budget of 4194304 at byte ")
    assert server.state is CLOSED


def test_decode_budget_compressed_amplification() -> None:
    """Issue 11: 1 KB compressed inflated to a million empty lists."""
    _client, server = handshake(max_inflate_ratio=10**6)
    data = _nil_ping(1024 * 1024 - 64, compressed=True)
    assert len(data) < 2048
    exc = protocol_error(server, data)
    assert b"decode budget of 4194304 (in the inflated term) at byte" in bye_detail(exc)[1]


def test_inflate_ratio_cap() -> None:
    _client, server = handshake()
    data = _nil_ping(55_000, compressed=True)
    exc = protocol_error(server, data)
    tag, detail = bye_detail(exc)
    assert tag == "bad_term" and b"more than 128 times its size" in detail
    # Within the ratio, a compressed frame is fine.
    _client, server = handshake(max_inflate_ratio=10**6)
    (ping,) = events(server, data)
    assert isinstance(ping, Ping) and len(ping.token) == 55_000
    assert server.last_cost == 64 + 80 + 256 + 72 * 55_000 + 72


def test_budget_follows_max_cost_and_the_receive_limit() -> None:
    _client, server = handshake(max_frame=64 * 1024)
    assert server.max_cost == 4 * 64 * 1024
    client, server = handshake(max_cost=1000)
    assert server.max_cost == 1000
    assert client.max_cost == 64 * 1024 * 1024  # a client: 64 units per byte
    (ping,) = events(server, _nil_ping(5))
    assert isinstance(ping, Ping) and server.last_cost == 64 + 80 + 256 + 72 * 6
    exc = protocol_error(server, _nil_ping(20))
    assert bye_detail(exc)[0] == "bad_term"
    with pytest.raises(ValueError, match="max_cost"):
        Connection(Role.SERVER, max_cost=-1)
    with pytest.raises(ValueError, match="max_inflate_ratio"):
        Connection(Role.SERVER, max_inflate_ratio=0)


def test_next_cost_bound_peeks_without_decoding() -> None:
    client, server = handshake()
    assert server.next_cost_bound() == 0
    server.receive_data(_nil_ping(1000) + client.send(Ping(token=1)))
    assert server.next_cost_bound() == 512 * (len(_nil_ping(1000)) - 4)
    assert server.next_cost_bound() == 512 * (len(_nil_ping(1000)) - 4)  # idempotent
    assert server.statistics().bytes_buffered >= len(_nil_ping(1000)) - 4  # the peeked one
    first, second = events(server)
    assert isinstance(first, Ping) and len(first.token) == 1000
    assert second == Ping(token=1)
    assert server.next_cost_bound() == 0
    # A compressed payload's bound comes from the size it claims.
    big = _nil_ping(1000, compressed=True)
    _client, server = handshake(max_inflate_ratio=10**6)
    server.receive_data(big)
    assert server.next_cost_bound() == 512 * (len(encode((A("ping"), [[]] * 1000))) - 1)
    # A frame over the limit: the bound is 0 and next_event reports it.
    _client, server = handshake(max_frame=100)
    server.receive_data(struct.pack(">I", 1000))
    assert server.next_cost_bound() == 0
    with pytest.raises(FrameTooLarge):
        server.next_event()
