"""Fuzz target: a peer's arbitrary frames -> ``sshrpc.protocol.Connection``, either role.

The input chooses the role under test, its ``max_frame``, and a sequence of
things the peer does: well-formed and malformed messages (built from the
input, so every tag, arity and field type is reached), raw payloads, frames
longer than ``max_frame``, keepalives, text before the hello, EOF, all cut
into reads of any size.  A harness plays the local side like a correct node
or client would: it sends its hello, answers calls (some at once, some
later, some with chunks while credit lasts), answers refusals, pings and the
legacy protocol.  Properties:

- ``next_event`` returns an event, ``NEED_DATA`` or ``CLOSED``, or raises
  ``ProtocolError`` (``FrameTooLarge`` included) and nothing else, also for
  integers past Python's int-to-str digit limit; its message is bounded
  (under 1,000 characters) and never the core's "internal error"; after
  that error the state is ``CLOSED``, the same error is raised again, its
  ``bye`` is a reason term of PROTOCOL.md's shapes, and ``send(Bye(reason=
  exc.bye))`` works exactly once;
- ``send`` raises only ``LocalProtocolError`` or ``MessageTooLarge``, and
  then changes nothing (state, open ids, credit, frames sent);
- every frame ``send`` returns is one valid term within the peer's
  ``max_frame``; waiting for data, the connection holds less than one
  frame of ``max_frame`` bytes;
- the open ids and stream credit are exactly the harness's model of them:
  a call's id opens once and closes with exactly one final answer (a second
  one raises), a chunk needs credit, a reply is delivered only for an open id.

Run it with ``python fuzz/run.py protocol`` (docs/fuzzing.md).
"""

from __future__ import annotations

import struct
from typing import Any

import atheris

import sshrpc
from sshrpc import Atom, FrameTooLarge, LocalProtocolError, Pid, ProtocolError, Reference
from sshrpc._errors import MessageTooLarge
from sshrpc.protocol import (
    CLOSED,
    NEED_DATA,
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

MAX_LEN = 4096
_A = Atom
SERVER_TAGS = ["hello", "call", "cast", "cancel", "credit", "ping", "bye", "spawn", "send", "mfa"]
CLIENT_TAGS = ["hello", "reply", "error", "chunk", "send", "down", "pong", "bye", "answer"]
PID = Pid.new("node@host", 7, 0, 1)
#: More than 4300 decimal digits (Python's int-to-str limit), small on the wire.
HUGE = 2**20000
IDS = [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 2**64 - 1, 2**64, -1, 1.0, _A("x"), b"1", HUGE, -HUGE]
HELLO_KEYS = ["max_frame", "client", "server", "node", "session", "max_calls", "features", "new"]
BYE_SHAPES = {"protocol_error": (bytes,), "bad_term": (bytes,), "frame_too_large": (int, int)}


def _leaf(fdp: atheris.FuzzedDataProvider) -> Any:
    return fdp.PickValueInList(
        [
            0, 1, 16, 64, 2**32, -5, 2**64, 1.5, True, None, b"", b"text", [], [1, 2], (),
            _A("ok"), _A("normal"), _A("true"), _A("call"), _A("error"), _A("sshrpc"),
            _A("cancelled"), _A("calc"), _A("add"), PID, Reference.new("n@h", (1, 2, 3)),
            {}, {_A("timeout"): 5}, [_A("call"), _A("stream")], "str",
            # past Python's int-to-str digit limit: error text must not repr them
            HUGE, -HUGE, [[[[[HUGE]]]]],
        ]
    )  # fmt: skip


def _value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    """A small term: a leaf or a short list, tuple or map of terms."""
    kind = fdp.ConsumeIntInRange(0, 5 if depth < 3 else 0)
    if kind <= 2:
        return _leaf(fdp)
    items = [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if kind == 3:
        return items
    if kind == 4:
        return tuple(items)
    return sshrpc.Map((_leaf(fdp), v) for v in items)


def _hello_map(fdp: atheris.FuzzedDataProvider) -> Any:
    fields: dict[Any, Any] = {}
    for key in HELLO_KEYS:
        if fdp.ConsumeBool():
            fields[_A(key)] = fdp.PickValueInList(
                {
                    "max_frame": [0, 1, 100, 1 << 20, 2**32, -1, 1.5, _A("big")],
                    "features": [[], [_A("call"), _A("stream"), _A("spawn")], [_A("x")], b"x"],
                    "node": [_A("n@h"), b"n@h", 1],
                    "session": [PID, _A("no")],
                    "max_calls": [1, 2, 64, 0, -1, _A("many")],
                }.get(key, [b"py/1", "x/1", 1, _A("x")])
            )
    return fields if fdp.ConsumeIntInRange(0, 7) else list(fields.items())


def _valid_hello(fdp: atheris.FuzzedDataProvider, role: Role) -> Any:
    fields: dict[Any, Any] = {_A("max_frame"): fdp.PickValueInList([64, 300, 1 << 20])}
    if role is Role.SERVER:  # the peer is a client
        fields[_A("client")] = b"fuzz/1"
    else:
        fields[_A("server")] = b"fuzz/1"
        fields[_A("node")] = _A("n@h")
        fields[_A("session")] = PID
        fields[_A("max_calls")] = fdp.ConsumeIntInRange(1, 8)
        fields[_A("features")] = [_A(f) for f in ("call", "cast", "cancel", "stream", "spawn")]
    return (_A("hello"), 1, fields)


def _message(fdp: atheris.FuzzedDataProvider, tags: list[str]) -> Any:
    """A term a peer might send: a message of a known tag with fields of
    the right or wrong types and arity, or an unknown tag, or not a tuple."""
    choice = fdp.ConsumeIntInRange(0, 15)
    if choice == 0:
        return _value(fdp)  # not a message
    if choice == 1:
        return (_A("future_message"), _value(fdp))
    tag = _A(fdp.PickValueInList(tags))
    if tag == "hello":
        return (tag, fdp.PickValueInList([1, 1, 1, 2, 0, _A("v1")]), _hello_map(fdp))
    fields: list[Any] = []
    arity = {
        "call": 4, "spawn": 4, "cast": 3, "cancel": 1, "credit": 2, "ping": 1, "bye": 1,
        "send": 2, "mfa": 1, "reply": 2, "error": 2, "chunk": 2, "down": 2, "pong": 1,
        "answer": 1,
    }[tag]  # fmt: skip
    if tag == "call" and fdp.ConsumeBool():
        arity = 5
    if fdp.ConsumeIntInRange(0, 7) == 0:
        arity = fdp.ConsumeIntInRange(0, 6)
    for i in range(arity):
        fields.append(_field(fdp, str(tag), i))
    return (tag, *fields)


def _field(fdp: atheris.FuzzedDataProvider, tag: str, index: int) -> Any:
    if fdp.ConsumeIntInRange(0, 9) == 0:
        return _value(fdp)
    if index == 0 and tag in ("call", "spawn", "cancel", "credit", "reply", "error", "chunk"):
        return fdp.PickValueInList(IDS)
    if tag in ("call", "spawn", "cast"):
        offset = 0 if tag == "cast" else 1
        pos = index - offset
        if pos in (0, 1):
            return _A(fdp.PickValueInList(["calc", "add", "m", "f"]))
        if pos == 2:
            return [_value(fdp) for _ in range(fdp.ConsumeIntInRange(0, 3))]
        if pos == 3:  # call options
            opts: dict[Any, Any] = {}
            for key, values in (
                ("timeout", [0, 100, -1, 1.5, _A("infinity")]),
                ("stream", [True, False, 1]),
                ("credit", [0, 1, 2, 16, -1, 2**40]),
                ("other", [1]),
            ):
                if fdp.ConsumeBool():
                    opts[_A(key)] = fdp.PickValueInList(values)
            return opts
    if tag == "credit" and index == 1:
        return fdp.PickValueInList([0, 1, 3, -1, 2**64, _A("lots")])
    if tag == "error" and index == 1:
        return (
            _A(fdp.PickValueInList(["error", "exit", "throw", "sshrpc", "other"])),
            _A(fdp.PickValueInList(["badarg", "timeout", "cancelled", "undef"])),
            fdp.PickValueInList([{}, {_A("message"): b"m"}, [], _A("x")]),
        )[: fdp.ConsumeIntInRange(0, 3)]
    if tag == "mfa":
        return (_A("calc"), _A("add"), [1, 2])[: fdp.ConsumeIntInRange(0, 3)]
    if tag == "answer":
        return (_value(fdp), fdp.PickValueInList([0, -1, 1]))
    if tag == "bye":
        return fdp.PickValueInList([_A("normal"), (_A("protocol_error"), b"x"), _A("shutdown"), 1])
    return _value(fdp)


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def _peer_bytes(fdp: atheris.FuzzedDataProvider, role: Role, max_frame: int) -> bytes:
    """One action of the peer, as the bytes it writes."""
    what = fdp.ConsumeIntInRange(0, 19)
    if what == 0:
        return b"\0\0\0\0"  # keepalive
    if what == 1:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 40))  # raw, unframed
    if what == 2:
        return _frame(b"\x83" + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40)))
    if what == 3:
        return struct.pack(">I", max_frame + fdp.ConsumeIntInRange(1, 3)) + b"\x83"
    if what == 4:
        return b"Welcome to the server!\r\n"
    tags = SERVER_TAGS if role is Role.SERVER else CLIENT_TAGS
    term = _message(fdp, tags)
    try:
        payload = sshrpc.encode(term, compressed=what == 5)
    except (TypeError, sshrpc.TermError):
        payload = sshrpc.encode(_A("unencodable"))
    return _frame(payload)


class _Harness:
    """The local side: a correct node (server role) or client (client role)
    driving the connection under test, with a model of its open ids."""

    def __init__(self, fdp: atheris.FuzzedDataProvider, conn: Connection) -> None:
        self.fdp = fdp
        self.conn = conn
        self.open: dict[int, int | None] = {}  # id -> stream credit (None: not a stream)
        self.answered: list[int] = []
        self.error: ProtocolError | None = None
        self.done = False

    # -- sending ---------------------------------------------------------

    def send(self, event: Event) -> bool:
        """Send ``event``; return whether it went out.  Checks that a refusal
        changed nothing and that what went out is one valid term."""
        conn = self.conn
        before = (conn.state, set(conn.open_ids), conn.statistics().frames_sent, self._credits())
        try:
            frame = conn.send(event)
        except (LocalProtocolError, MessageTooLarge):
            after = (conn.state, set(conn.open_ids), conn.statistics().frames_sent, self._credits())
            assert before == after, f"refused {event!r} but changed {before} -> {after}"
            return False
        (length,) = struct.unpack_from(">I", frame)
        assert length == len(frame) - 4 and length <= max(conn.peer_max_frame, 1 << 20), event
        sshrpc.decode(frame[4:])
        return True

    def _credits(self) -> dict[int, int]:
        return {i: self.conn.stream_credit(i) for i in self.conn.open_ids}

    def final(self, event: Reply | ErrorReply) -> None:
        """Send a final answer for an open id, then check it closed and that
        a second final answer is refused."""
        if not self.send(event):
            return
        self.open.pop(event.id, None)
        assert event.id not in self.conn.open_ids, f"{event.id} still open after its answer"
        if self.fdp.ConsumeIntInRange(0, 7) == 0:
            try:
                self.conn.send(Reply(id=event.id, value=_A("again")))
            except LocalProtocolError:
                pass
            else:
                raise AssertionError(f"second final answer for {event.id} was sent")

    def start(self) -> None:
        if self.conn.role is Role.CLIENT:
            self.send(self.conn.hello())
            for call_id in range(self.fdp.ConsumeIntInRange(0, 5)):
                stream = self.fdp.ConsumeBool()
                credit = self.fdp.ConsumeIntInRange(0, 3)
                call = Call(
                    id=call_id, module=_A("m"), function=_A("f"), args=[], stream=stream,
                    credit=credit,
                )  # fmt: skip
                if self.send(call):
                    self.open[call_id] = credit if stream else None
            if self.fdp.ConsumeBool() and self.send(
                Spawn(id=9, module=_A("m"), function=_A("f"), args=[])
            ):
                self.open[9] = None

    def idle(self) -> None:
        """Between peer actions: maybe answer a pending call (server role)."""
        if self.conn.role is Role.SERVER and self.open and self.fdp.ConsumeBool():
            call_id = self.fdp.PickValueInList(sorted(self.open))
            self.stream_some(call_id)
            self.final(Reply(id=call_id, value=_value(self.fdp)))

    def stream_some(self, call_id: int) -> None:
        credit = self.open.get(call_id)
        while credit and self.fdp.ConsumeBool():
            if not self.send(Chunk(id=call_id, value=_leaf(self.fdp))):
                break
            credit -= 1
            self.open[call_id] = credit
        if credit == 0 and self.fdp.ConsumeIntInRange(0, 3) == 0:
            assert not self.send(Chunk(id=call_id, value=1)), "chunk sent without credit"

    # -- receiving -------------------------------------------------------

    def drain(self) -> None:
        conn = self.conn
        while not self.done:
            # The I/O layer's peek (issue 11): a bound on the next frame's
            # decode cost that the decode then keeps to.
            self._peek = not getattr(self, "_peek", False)
            bound = conn.next_cost_bound() if self._peek else None
            budget = conn.max_cost  # a hello may change it
            try:
                event = conn.next_event()
            except ProtocolError as exc:
                self.protocol_error(exc)
                return
            if bound is not None and isinstance(event, Event):
                assert conn.last_cost <= max(bound, budget), (conn.last_cost, bound)
                assert conn.last_cost <= budget, (conn.last_cost, budget)
            if event is NEED_DATA:
                # Memory: at most one incomplete frame is held.
                held = conn.statistics().bytes_buffered
                assert held < 4 + conn.max_frame, (held, conn.max_frame)
                return
            if event is CLOSED:
                assert conn.state is CLOSED or conn.statistics().state is not None
                self.done = conn.state is CLOSED
                return
            assert isinstance(event, Event), event
            if conn.role is Role.SERVER:
                self.serve(event)
            else:
                self.client(event)
            self.check_model()

    def protocol_error(self, exc: ProtocolError) -> None:
        conn = self.conn
        assert conn.state is CLOSED, conn.state
        # Error text from peer data is bounded (safe_repr), and no bug hides
        # behind the core's catch-all.
        text = str(exc)
        assert len(text) < 1000, len(text)
        assert not text.startswith("internal error"), (text, exc.__cause__)
        reason = exc.bye
        assert reason is not None, exc
        if isinstance(exc, FrameTooLarge):
            assert reason == (_A("frame_too_large"), exc.length, exc.maximum), reason
        else:
            assert type(reason) is tuple and reason and type(reason[0]) is Atom, reason
            shape = BYE_SHAPES.get(str(reason[0]))
            if shape is not None:
                assert tuple(type(x) for x in reason[1:]) == shape, reason
            else:
                assert reason == (_A("unsupported_version"), [1]), reason
        sshrpc.encode(reason)
        try:
            conn.next_event()
        except ProtocolError as again:
            assert again is exc, (again, exc)
        else:
            raise AssertionError("next_event after a ProtocolError did not raise it again")
        assert self.send(Bye(reason=reason)), "the bye answering a protocol error was refused"
        assert not self.send(Bye(reason=reason)), "a second bye after a protocol error was sent"
        self.error = exc
        self.done = True

    def serve(self, event: Event) -> None:
        conn = self.conn
        if isinstance(event, Hello):
            self.send(conn.hello())
        elif isinstance(event, Call):
            assert event.id not in self.open, f"call id {event.id} accepted while open"
            self.open[event.id] = event.credit if event.stream else None
            if self.fdp.ConsumeIntInRange(0, 2) == 0:
                self.stream_some(event.id)
                self.final(Reply(id=event.id, value=_value(self.fdp)))
        elif isinstance(event, Spawn):
            assert event.id not in self.open, f"spawn id {event.id} accepted while open"
            self.open[event.id] = None
            self.final(Reply(id=event.id, value=PID))
        elif isinstance(event, Refused):
            if event.id is None:
                self.send(Answer(result=(_A("exec_error"), event.term), status=-1))
            else:
                assert event.id not in self.open, f"refused id {event.id} was open"
                self.open[event.id] = None
                self.final(ErrorReply(id=event.id, cls=_A("sshrpc"), reason=event.reason))
        elif isinstance(event, Cancel):
            if event.id in self.open and self.fdp.ConsumeBool():
                self.final(ErrorReply(id=event.id, cls=_A("sshrpc"), reason=_A("cancelled")))
        elif isinstance(event, Credit):
            if event.id in self.open and self.open[event.id] is not None:
                self.open[event.id] = (self.open[event.id] or 0) + event.n
                self.stream_some(event.id)
        elif isinstance(event, Ping):
            self.send(Pong(token=event.token))
        elif isinstance(event, Mfa):
            self.send(Answer(result=_A("ok"), status=0))
        elif isinstance(event, Bye):
            for call_id in sorted(self.open):
                self.final(Reply(id=call_id, value=_A("late")))
            self.send(Bye())
        else:
            assert isinstance(event, Send | Unknown | Cast), event

    def client(self, event: Event) -> None:
        if isinstance(event, Reply | ErrorReply):
            assert event.id in self.open, f"answer for {event.id}, which was not open"
            del self.open[event.id]
        elif isinstance(event, Chunk):
            credit = self.open.get(event.id)
            assert credit, f"chunk for {event.id} with credit {credit}"
            self.open[event.id] = credit - 1
            if self.fdp.ConsumeBool() and self.send(Credit(id=event.id, n=2)):
                self.open[event.id] = credit + 1
        elif isinstance(event, Hello):
            assert self.conn.peer_hello is event
        else:
            assert isinstance(event, Send | Down | Pong | Bye | Answer | Unknown), event

    def check_model(self) -> None:
        if self.conn.state is CLOSED:
            return
        assert set(self.open) == set(self.conn.open_ids), (self.open, set(self.conn.open_ids))
        for call_id, credit in self.open.items():
            if credit is not None:
                assert self.conn.stream_credit(call_id) == credit, (call_id, credit)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    role = Role.SERVER if fdp.ConsumeBool() else Role.CLIENT
    max_frame = fdp.PickValueInList([64, 300, 1 << 20])
    conn = Connection(
        role, max_frame=max_frame, max_calls=fdp.ConsumeIntInRange(1, 4), node="n@h",
        session=PID,
    )  # fmt: skip
    harness = _Harness(fdp, conn)
    harness.start()
    pending = b""
    if fdp.ConsumeIntInRange(0, 3):
        # Most sessions start with a valid hello, so the fuzzer spends its
        # time past the handshake.
        pending = _frame(sshrpc.encode(_valid_hello(fdp, role)))
    for _ in range(60):
        if harness.done or not fdp.remaining_bytes():
            break
        pending += _peer_bytes(fdp, role, conn.max_frame)
        while pending and not harness.done:
            cut = fdp.ConsumeIntInRange(1, len(pending))
            conn.receive_data(pending[:cut])
            pending = pending[cut:]
            harness.drain()
            harness.idle()
            harness.check_model()
    if not harness.done and fdp.ConsumeBool():
        conn.receive_data(b"")
        harness.drain()


def seeds() -> list[bytes]:
    """A few short inputs; the provider turns any bytes into a session."""
    return [bytes((i * 37 + j * 11) % 256 for j in range(200)) for i in range(16)]


if __name__ == "__main__":
    import run

    run.main(["protocol", *__import__("sys").argv[1:]])
