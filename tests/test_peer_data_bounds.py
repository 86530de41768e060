"""Peer data in error paths (issue 11, finding 8): huge integers and deep terms.

Python refuses to turn an integer of more than 4300 digits into text
(``ValueError``), and a deep term's ``repr`` is as big as the term.  Every
place that formats peer data for an error message or a log line goes through
``sshrpc._saferepr.safe_repr``: bounded, and never raising.  Only
``ProtocolError`` leaves the protocol core.  No I/O.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from sshrpc import Atom, Pid, ProtocolError, RemoteError, decode
from sshrpc._saferepr import safe_repr
from sshrpc.protocol import Bye, Call, Connection, Hello, Reply, Role
from test_protocol import events, frame, handshake

A = Atom
HUGE = 2**64000


def _deep(n: int) -> Any:
    term: Any = []
    for _ in range(n):
        term = [term]
    return term


def terms(data: bytes) -> list[Any]:
    out = []
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        if n:
            out.append(decode(data[pos + 4 : pos + 4 + n]))
        pos += 4 + n
    return out


# The server role: frames a hostile client sends.
SERVER_CASES = [
    (A("cancel"), HUGE),
    (A("cancel"), -HUGE),
    (A("credit"), HUGE, 1),
    (A("call"), HUGE, A("m"), A("f"), []),
    (A("spawn"), HUGE, A("m"), A("f"), []),
    (A("cast"), A("m"), HUGE, []),
    (A("ping"), HUGE, HUGE),
    (A("bye"), HUGE, 1),
    (A("reply"), HUGE, 1),
    (A("cancel"), _deep(90)),
    (HUGE,),
    [HUGE, HUGE],
    HUGE,
]


@pytest.mark.parametrize("term", SERVER_CASES, ids=lambda t: safe_repr(t, 40))
def test_server_huge_ints_in_bad_frames_are_protocol_errors(term: Any) -> None:
    client, server = handshake()
    server.receive_data(frame(term))
    with pytest.raises(ProtocolError) as info:
        events(server)
    exc = info.value
    assert len(str(exc)) < 400
    # the bye goes out (the node says why before closing) and is bounded too
    data = server.send(Bye(reason=exc.bye))
    assert len(data) < 600
    assert isinstance(events(client, data)[0], Bye)


def test_unknown_tag_with_huge_ints_is_an_event() -> None:
    _, server = handshake()
    (ev,) = events(server, frame((A("nosuch"), [HUGE] * 50)))
    assert ev.term == (A("nosuch"), [HUGE] * 50)  # type: ignore[attr-defined]


def test_server_huge_hello_fields() -> None:
    for fields in (
        {A("max_calls"): -HUGE},
        {A("features"): [HUGE]},
        {A("node"): HUGE},
        {A("client"): HUGE},
        {A("max_frame"): -HUGE},
    ):
        server = Connection(Role.SERVER)
        server.receive_data(frame((A("hello"), 1, fields)))
        try:
            got = events(server)
        except ProtocolError as exc:
            assert len(str(exc)) < 400
        else:  # a hello field the server does not check is only text
            assert isinstance(got[0], Hello)
            assert len(got[0].client or "") < 400
    server = Connection(Role.SERVER)
    server.receive_data(frame((A("hello"), HUGE, {})))
    with pytest.raises(ProtocolError) as info:
        events(server)
    assert len(str(info.value)) < 400


# The client role: frames a hostile server sends.
CLIENT_CASES = [
    (A("reply"), HUGE, 1),
    (A("error"), HUGE, (A("error"), 1, {})),
    (A("chunk"), HUGE, 1),
    (A("down"), HUGE),
    (A("pong"), HUGE, HUGE),
    (A("answer"), HUGE),
    (A("call"), HUGE, A("m"), A("f"), []),
]


@pytest.mark.parametrize("term", CLIENT_CASES, ids=lambda t: safe_repr(t, 40))
def test_client_huge_ints_from_a_server_are_protocol_errors(term: Any) -> None:
    client, _ = handshake()
    client.send(Call(id=1, module="m", function="f", args=[]))
    client.receive_data(frame(term))
    with pytest.raises(ProtocolError) as info:
        events(client)
    assert len(str(info.value)) < 400


def test_client_remote_error_with_a_huge_reason() -> None:
    """A server's ``{error, Id, {error, 2^64000, #{message => ...}}}`` is a
    ``RemoteError`` with a bounded message (it was ``ValueError``)."""
    client, server = handshake()
    events(server, client.send(Call(id=1, module="m", function="f", args=[])))
    data = frame((A("error"), 1, (A("error"), (HUGE, _deep(50)), {A("message"): b"x" * 9000})))
    (ev,) = events(client, data)
    exc = RemoteError.from_term(ev.cls, ev.reason, ev.details)  # type: ignore[attr-defined]
    assert exc.reason == (HUGE, _deep(50))  # the value itself is kept whole
    assert len(str(exc)) < 1200
    assert "<int of 64001 bits>" in str(exc)


def test_reply_with_a_huge_value_is_delivered_whole() -> None:
    client, server = handshake()
    events(server, client.send(Call(id=1, module="m", function="f", args=[])))
    (ev,) = events(client, server.send(Reply(id=1, value=HUGE)))
    assert ev == Reply(id=1, value=HUGE)


# safe_repr itself


@pytest.mark.parametrize(
    "value",
    [
        HUGE,
        -HUGE,
        [HUGE] * 1000,
        _deep(100_000),
        {HUGE: HUGE},
        b"\x00" * 100_000,
        "\n" * 100_000,
        A("a\nb"),
        (1,) * 10**5,
        float("nan"),
        Pid.new("n@h", 1),
    ],
    ids=lambda v: type(v).__name__,
)
def test_safe_repr_is_bounded_and_never_raises(value: Any) -> None:
    text = safe_repr(value, 200)
    assert len(text) <= 200
    assert "\n" not in text


def test_safe_repr_survives_hostile_objects() -> None:
    class Bad:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    class Huge:
        def __repr__(self) -> str:
            return "y" * 10**6

    assert safe_repr(Bad()) == "<Bad object (repr failed)>"
    assert len(safe_repr(Huge(), 100)) <= 100
    assert safe_repr([1, A("ok"), b"x", (2.5, None)]) == "[1, Atom('ok'), b'x', (2.5, None)]"
    assert safe_repr(2**20) == str(2**20)
    assert safe_repr(HUGE) == "<int of 64001 bits>"
