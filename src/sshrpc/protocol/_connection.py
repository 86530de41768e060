"""Frames <-> protocol events, both roles (PROTOCOL.md sections 2-7).  No I/O, no Trio.

``Connection`` is the whole protocol of one channel as a state machine, in
the style of h11 and wsproto.  Three verbs:

- ``receive_data(data)``: bytes read from the channel (``b""`` means EOF);
- ``next_event()``: the next event, ``NEED_DATA`` or ``CLOSED``;
- ``send(event)``: the frame bytes to write for an event.

The state moves only as the tables in ``_state.py`` say.  Errors:

- ``next_event`` raises ``sshrpc.ProtocolError`` (or its subclass
  ``FrameTooLarge``) when the peer broke PROTOCOL.md.  ``exc.bye`` is the
  reason to send back; the state is then ``CLOSED``, every later
  ``next_event`` raises the same error, and ``send(Bye(reason=exc.bye))``
  still works exactly once.  Nothing else escapes ``next_event`` (anything
  else is a bug).
- ``send`` raises ``sshrpc.LocalProtocolError`` for events this side may not
  send now (see its docstring) and ``sshrpc.MessageTooLarge`` for a payload
  above the peer's ``max_frame``.  Neither changes anything: nothing is
  sent, no id is opened or closed.

Decisions the core takes for the I/O layers (docs/protocol.md):

- A server's final answer (``Reply``/``ErrorReply``) that would exceed the
  client's ``max_frame`` is replaced here by
  ``{error, Id, {sshrpc, too_large, #{}}}``; the call is closed either way.
- A server refuses, on its own, calls it must answer with an ``sshrpc``
  error and hands them over as ``Refused`` events: ``badarg`` (shape),
  ``overload`` (more than ``max_calls`` ids open, counting calls and spawns)
  and ``notsup`` (``stream``/``spawn`` not in the sent hello's features).
  The id is open until the server sends the ``ErrorReply``.
- A malformed ``cancel``, ``credit``, ``cast``, ``ping``, ``send`` or
  ``bye`` has no id to answer on (or, for ``credit``, answering would end
  someone else's call) and is a protocol error.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterable, KeysView
from dataclasses import dataclass
from typing import Any, Final

from .._accel import (
    FrameBuffer,
    c_accelerated,
    decode_cost,
    encode,
    encode_direct,
    encode_frame,
)
from .._bulk import term_parts
from .._errors import FrameTooLarge, LocalProtocolError, MessageTooLarge, ProtocolError, TermError
from .._etf import DEFAULT_MAX_BIG_BYTES, DEFAULT_MAX_DEPTH
from .._saferepr import safe_repr

if c_accelerated:
    from .._codec import install_client_builtins
from .._types import Atom, Map
from ._events import (
    DEFAULT_CREDIT,
    MAX_ID,
    Answer,
    Bye,
    Call,
    Cancel,
    Cast,
    Chunk,
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
    Send,
    Spawn,
    Unknown,
)
from ._state import (
    AWAIT_HELLO,
    CLOSED,
    DRAINING,
    IDLE,
    LEGACY,
    OPEN,
    RECV,
    SEND,
    TRANSITIONS,
    Role,
    Sentinel,
)

__all__ = [
    "ALL_FEATURES",
    "CLIENT_COST_PER_BYTE",
    "COST_PER_BYTE",
    "DEFAULT_MAX_CALLS",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_MAX_INFLATE_RATIO",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "Connection",
    "ConnectionStatistics",
]

#: The only version this package speaks (PROTOCOL.md section 3).
PROTOCOL_VERSION: Final = 1
#: ``max_frame`` before the hellos are exchanged, and when a hello omits it.
DEFAULT_MAX_FRAME: Final = 1024 * 1024
#: Open calls a server allows per channel unless configured otherwise.
DEFAULT_MAX_CALLS: Final = 64
#: A received term's decode budget (``sshrpc._etf.TERM_COST``), unless
#: configured: this many cost units per byte of the receive limit, so 4 MiB
#: for 1 MiB frames: about 10 ms of decoding and encoding back, at most.  A
#: 1 MiB list of integers costs 3.2 Mi units, a 1 MiB binary 56; a 1 MiB
#: list of empty lists (75 MiB of objects, 1 KB compressed) is refused.
#: docs/security.md, "Work bounds".
COST_PER_BYTE: Final = 4
#: The same for a client, which serves no other keys from its event loop:
#: generous (answers of large records pass), still a bound (64 MiB of
#: estimated objects for 1 MiB frames, whatever the compression).
CLIENT_COST_PER_BYTE: Final = 64
#: A compressed payload may inflate to at most this many times its size.
DEFAULT_MAX_INFLATE_RATIO: Final = 128
#: The most a tag costs (``sshrpc._etf.TERM_COST``): a bound per byte.
_WORST_COST_PER_BYTE = 512
#: Every feature of PROTOCOL.md section 3.
ALL_FEATURES: Final = ("call", "cast", "cancel", "deadline", "stream", "spawn", "send", "ping")
#: ``next_event`` needs more bytes: call ``receive_data``.
NEED_DATA: Final = Sentinel("NEED_DATA")

_DEFAULT_NAME = "sshrpc-python/0.1.0"
# How much of the first bytes a "junk before the hello" error shows.
_JUNK_SHOWN = 64

_A = Atom
A_HELLO, A_CALL, A_CAST, A_CANCEL, A_CREDIT = (
    _A("hello"),
    _A("call"),
    _A("cast"),
    _A("cancel"),
    _A("credit"),
)
A_PING, A_PONG, A_BYE, A_REPLY, A_ERROR = (
    _A("ping"),
    _A("pong"),
    _A("bye"),
    _A("reply"),
    _A("error"),
)
A_CHUNK, A_SEND, A_DOWN, A_SPAWN = _A("chunk"), _A("send"), _A("down"), _A("spawn")
A_MFA, A_ANSWER, A_SSHRPC, A_NORMAL = _A("mfa"), _A("answer"), _A("sshrpc"), _A("normal")
A_BADARG, A_OVERLOAD, A_NOTSUP, A_TOO_LARGE = (
    _A("badarg"),
    _A("overload"),
    _A("notsup"),
    _A("too_large"),
)
A_PROTOCOL_ERROR, A_BAD_TERM = _A("protocol_error"), _A("bad_term")
A_UNSUPPORTED_VERSION, A_FRAME_TOO_LARGE = _A("unsupported_version"), _A("frame_too_large")
K_MAX_FRAME, K_CLIENT, K_SERVER, K_NODE = _A("max_frame"), _A("client"), _A("server"), _A("node")
K_SESSION, K_MAX_CALLS, K_FEATURES = _A("session"), _A("max_calls"), _A("features")
K_TIMEOUT, K_STREAM = _A("timeout"), _A("stream")
_HELLO_KEYS = frozenset(
    {K_MAX_FRAME, K_CLIENT, K_SERVER, K_NODE, K_SESSION, K_MAX_CALLS, K_FEATURES}
)


# The core builds received events from terms it has already checked.  The
# dataclass __init__ would check them again and set each frozen field through
# object.__setattr__; filling the slots directly makes receiving the common
# messages several times cheaper.  (Other events use their __init__.)
_new = object.__new__


def _slots(cls: type, *names: str) -> tuple[Callable[[Any, Any], None], ...]:
    return tuple(getattr(cls, name).__set__ for name in names)


_CALL_SLOTS = _slots(Call, "id", "module", "function", "args", "timeout", "stream", "credit")
_REPLY_SLOTS = _slots(Reply, "id", "value")
_ERROR_SLOTS = _slots(ErrorReply, "id", "cls", "reason", "details")
_CHUNK_SLOTS = _slots(Chunk, "id", "value")


#: A plain call as ``Connection.next_events_each(plain_calls=True)`` gives
#: it: ``(id, module, function, args, timeout, cost, term)`` (``timeout`` in
#: ms or None; ``cost`` its decode cost, ``term`` the decoded frame);
#: ``call_event`` makes its ``Call``.
PlainCall = tuple[int, Atom, Atom, list[Any], int | None, int, Any]


def _install_plain_call() -> Callable[[bytes, int, int, int], Any] | None:
    """``plain_call(data, max_depth, max_big, max_cost)`` (csrc/pydec.c): a
    frame decoded as ``decode_direct(..., True)`` does, and a common call
    (``_srv_call``'s first branch, but for the state) returned as its
    ``PlainCall``; None where the direct decoder is not in use."""
    from .. import _accel

    if not _accel.c_accelerated:
        return None
    from .. import _codec
    from .._sshrpc_c import ffi, lib

    install = getattr(lib, "sshrpc_pydec_install_plain_call", None)
    target: dict[str, Any] = {}
    if not _codec._direct_decoder or install is None:
        return None  # pragma: no cover - direct decoding off, a stale build
    if install(ffi.cast("void *", id(target))):
        return None  # pragma: no cover - out of memory at import
    return target["plain_call"]  # type: ignore[no-any-return]


_MAX_BIG = DEFAULT_MAX_BIG_BYTES


def call_event(plain: PlainCall) -> Call:
    """The ``Call`` event of a ``PlainCall``."""
    return _call(plain[0], plain[1], plain[2], plain[3], plain[4], False, DEFAULT_CREDIT)


def _call(
    call_id: int,
    module: Atom,
    function: Atom,
    args: list[Any],
    timeout: int | None,
    stream: bool,
    credit: int,
) -> Call:
    ev = _new(Call)
    set_id, set_module, set_function, set_args, set_timeout, set_stream, set_credit = _CALL_SLOTS
    set_id(ev, call_id)
    set_module(ev, module)
    set_function(ev, function)
    set_args(ev, args)
    set_timeout(ev, timeout)
    set_stream(ev, stream)
    set_credit(ev, credit)
    return ev


def _reply(call_id: int, value: Any) -> Reply:
    ev = _new(Reply)
    set_id, set_value = _REPLY_SLOTS
    set_id(ev, call_id)
    set_value(ev, value)
    return ev


def _chunk(call_id: int, value: Any) -> Chunk:
    ev = _new(Chunk)
    set_id, set_value = _CHUNK_SLOTS
    set_id(ev, call_id)
    set_value(ev, value)
    return ev


def _error_reply(call_id: int, cls: Atom, reason: Any, details: Any) -> ErrorReply:
    ev = _new(ErrorReply)
    set_id, set_cls, set_reason, set_details = _ERROR_SLOTS
    set_id(ev, call_id)
    set_cls(ev, cls)
    set_reason(ev, reason)
    set_details(ev, details)
    return ev


_Recv = Callable[["Connection", tuple[Any, ...]], Event]
_Send = Callable[["Connection", Any], bytes]


@dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    """A snapshot of ``Connection.statistics()``."""

    state: Sentinel
    open_calls: int
    legacy_in_flight: int
    frames_received: int
    frames_sent: int
    bytes_buffered: int
    answers_too_large: int


def _rows(
    role: Role,
) -> tuple[dict[Sentinel, dict[str, Sentinel]], dict[Sentinel, dict[str, Sentinel]]]:
    """``TRANSITIONS[role]`` split by direction, keyed by event name alone."""
    recv: dict[Sentinel, dict[str, Sentinel]] = {}
    send: dict[Sentinel, dict[str, Sentinel]] = {}
    for state, row in TRANSITIONS[role].items():
        recv[state] = {name: new for (way, name), new in row.items() if way is RECV}
        send[state] = {name: new for (way, name), new in row.items() if way is SEND}
    return recv, send


_ROWS: Final = {role: _rows(role) for role in Role}


class _Open:
    """Bookkeeping of one open id: is it a stream, how much credit is left."""

    __slots__ = ("credit", "stream")

    def __init__(self, stream: bool, credit: int) -> None:
        self.stream = stream
        self.credit = credit


# The bookkeeping of every open id that is not a stream call: nothing in it
# ever changes, so one instance serves them all.
_PLAIN: Final = _Open(False, 0)


def _is_id(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_ID


def _is_name(value: object) -> bool:
    return type(value) is Atom


def _atom(value: str) -> Atom:
    return value if type(value) is Atom else Atom(value)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else safe_repr(value)


def _protocol_error(message: str) -> ProtocolError:
    return ProtocolError(message, bye=(A_PROTOCOL_ERROR, message.encode("utf-8", "replace")))


class Connection:
    """One sshrpc channel, client or server role, as a state machine.

    Args:
      role: ``Role.CLIENT`` or ``Role.SERVER``.
      max_frame: the largest payload this side accepts, announced in
        ``hello()``; enforced on received frames once the hellos are
        exchanged (1 MiB before), and in legacy mode.
      max_calls, features, node, session: the server's hello fields (see
        ``hello()``); ``features`` defaults to all of them.
      name: ``"name/version"`` for the hello's ``client``/``server`` key.
      max_depth: the deepest nesting accepted in a received term.
      max_cost: the decode budget of one received term (see
        ``sshrpc._etf.TERM_COST``); None: ``COST_PER_BYTE`` times the
        receive limit in force (``CLIENT_COST_PER_BYTE`` for a client).
        A term over it is a ``bad_term``.
      max_inflate_ratio: a compressed payload that claims to inflate to more
        than this many times its own size is a ``bad_term``.

    ``send(Hello(...))`` makes the sent hello authoritative: its
    ``max_frame`` is this side's receive limit, and a server enforces its
    ``max_calls`` and ``features``.
    """

    def __init__(
        self,
        role: Role,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_calls: int = DEFAULT_MAX_CALLS,
        features: Iterable[str] = ALL_FEATURES,
        node: str | None = None,
        session: Any = None,
        name: str = _DEFAULT_NAME,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_cost: int | None = None,
        max_inflate_ratio: int = DEFAULT_MAX_INFLATE_RATIO,
    ) -> None:
        if not isinstance(role, Role):
            raise TypeError(f"role must be Role.CLIENT or Role.SERVER, not {role!r}")
        if type(max_frame) is not int or not 0 < max_frame <= 2**32 - 1:
            raise ValueError(f"max_frame must be an integer in 1..2**32-1, not {max_frame!r}")
        if type(max_calls) is not int or max_calls < 1:
            raise ValueError(f"max_calls must be a positive integer, not {max_calls!r}")
        self.role: Final = role
        self._state: Sentinel = IDLE
        self._recv_rows, self._send_rows = _ROWS[role]
        self._max_frame = max_frame
        self._max_calls = max_calls
        self._features = tuple(_atom(f) for f in features)
        self._node = node
        self._session = session
        self._name = name
        self._max_depth = max_depth
        if max_cost is not None and (type(max_cost) is not int or max_cost < 0):
            raise ValueError(f"max_cost must be a non-negative integer, not {max_cost!r}")
        if type(max_inflate_ratio) is not int or max_inflate_ratio < 1:
            raise ValueError(
                f"max_inflate_ratio must be a positive integer, not {max_inflate_ratio!r}"
            )
        self._max_cost = max_cost
        self._max_inflate_ratio = max_inflate_ratio
        self._peeked: bytes | None = None
        #: The decode cost of the last term ``next_event`` read (an estimate
        #: of the bytes of objects it became; ``sshrpc._etf.TERM_COST``).
        self.last_cost = 0
        self._frames = FrameBuffer(DEFAULT_MAX_FRAME)
        self._limit = DEFAULT_MAX_FRAME  # the receive limit, also in _frames
        self._cost_limit = self._cost_for(DEFAULT_MAX_FRAME)  # max_cost, kept by _set_limit
        self._send_limit = DEFAULT_MAX_FRAME
        self._open: dict[int, _Open] = {}
        self._legacy_in_flight = 0
        self._eof = False
        self._error: ProtocolError | None = None
        self._bye_after_error = False
        self._first_bytes = b""
        # Server: what our sent hello promised.
        self._hello_max_calls = max_calls
        self._hello_features = frozenset(self._features)
        self._frames_received = 0
        self._frames_sent = 0
        self._too_large = 0
        self._call_names: dict[tuple[str, str], bytes] = {}
        #: The hello this side sent, once sent.
        self.our_hello: Hello | None = None
        #: The peer's ``Hello`` event, once received.
        self.peer_hello: Hello | None = None
        #: True once the channel speaks the legacy ``{mfa, ...}`` protocol.
        self.legacy = False
        self._recv: dict[str, _Recv] = (
            self._SERVER_RECV if role is Role.SERVER else self._CLIENT_RECV
        )
        self._send = self._SERVER_SEND if role is Role.SERVER else self._CLIENT_SEND

    # ------------------------------------------------------------------
    # Introspection

    @property
    def state(self) -> Sentinel:
        """The conversation state: one of the sentinels of ``_state.py``."""
        return self._state

    @property
    def peer_max_frame(self) -> int:
        """The largest payload ``send`` lets through now: 1 MiB until the
        hellos are exchanged, then the peer's announced ``max_frame``; in
        legacy mode, 2**32-1 (the original protocol has no limit)."""
        return self._send_limit

    @property
    def max_frame(self) -> int:
        """The largest payload received frames may carry right now."""
        return self._limit

    @property
    def max_cost(self) -> int:
        """The decode budget of the next received term, in cost units."""
        return self._cost_limit

    def _cost_for(self, limit: int) -> int:
        if self._max_cost is not None:
            return self._max_cost
        per_byte = COST_PER_BYTE if self.role is Role.SERVER else CLIENT_COST_PER_BYTE
        return per_byte * limit

    def next_cost_bound(self) -> int:
        """An upper bound of what decoding the next buffered frame costs
        (``sshrpc._etf.TERM_COST`` units), 0 when no whole frame is buffered.

        Cheap: it looks at the payload's length only (the compressed header's
        size for a compressed one), nothing is decoded.  Lets an I/O layer
        take turns before an expensive ``next_event``.  Never raises: a
        broken stream is left for ``next_event`` to report.
        """
        if self._error is not None or self._state is CLOSED:
            return 0
        payload = self._peeked
        if payload is None:
            try:
                payload = self._frames.next_frame()
            except (FrameTooLarge, MemoryError):
                return 0
            if payload is None:
                return 0
            self._peeked = payload
        size = len(payload)
        if size >= 6 and payload[1] == 80:
            size = int.from_bytes(payload[2:6], "big")
        return min(self._cost_limit, _WORST_COST_PER_BYTE * size)

    @property
    def open_ids(self) -> KeysView[int]:
        """The ids of calls and spawns that still await their final answer
        (a live view).  After a ``bye`` the remaining ones never get one."""
        return self._open.keys()

    def stream_credit(self, id: int) -> int:
        """How many chunks the server may still send for call ``id`` (0 for
        an id that is not an open stream call)."""
        entry = self._open.get(id)
        return entry.credit if entry is not None and entry.stream else 0

    def statistics(self) -> ConnectionStatistics:
        """Counters for monitoring; cheap, no side effects."""
        return ConnectionStatistics(
            state=self._state,
            open_calls=len(self._open),
            legacy_in_flight=self._legacy_in_flight,
            frames_received=self._frames_received,
            frames_sent=self._frames_sent,
            bytes_buffered=self._frames.buffered + len(self._peeked or b""),
            answers_too_large=self._too_large,
        )

    def hello(self) -> Hello:
        """The ``Hello`` this side should send, built from the constructor's
        arguments (``send(conn.hello())``)."""
        if self.role is Role.CLIENT:
            return Hello(max_frame=self._max_frame, client=self._name)
        return Hello(
            max_frame=self._max_frame,
            server=self._name,
            node=None if self._node is None else _atom(self._node),
            session=self._session,
            max_calls=self._max_calls,
            features=self._features,
        )

    # ------------------------------------------------------------------
    # Receiving

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes read from the channel; ``b""`` means the peer sent
        EOF (it will send nothing more).  Never raises for the peer's bytes:
        violations surface from ``next_event``.  Raises
        ``LocalProtocolError`` for data after EOF."""
        if self._eof:
            raise LocalProtocolError("receive_data after EOF")
        if not data:
            self._eof = True
            return
        if not self._frames_received and len(self._first_bytes) < _JUNK_SHOWN:
            self._first_bytes += bytes(data[: _JUNK_SHOWN - len(self._first_bytes)])
        self._frames.feed(data)

    def next_event(self) -> Event | Sentinel:
        """The next event from the peer, ``NEED_DATA`` (call
        ``receive_data``) or ``CLOSED`` (the peer sent EOF or ``bye``, or
        this side sent a non-normal ``bye``: nothing more will come).

        Raises ``ProtocolError`` (``FrameTooLarge`` for an oversized frame)
        when the peer broke the protocol; see the module docstring.
        """
        if self._error is not None:
            raise self._error
        while True:
            if self._state is CLOSED:
                return CLOSED
            payload = self._peeked
            if payload is not None:
                self._peeked = None
                if len(payload) > self._limit:  # the limit went down since the peek
                    raise self._fail(FrameTooLarge(len(payload), self._limit))
            else:
                try:
                    payload = self._frames.next_frame()
                except FrameTooLarge as exc:
                    raise self._fail(self._junk_error(exc) or exc) from None
            if payload is None:
                if not self._eof:
                    return NEED_DATA
                if self._frames.buffered:  # (a peeked frame is never pending here)
                    eof = EOFError("the channel ended")
                    raise self._fail(
                        self._junk_error(eof)
                        or _protocol_error(
                            f"the channel ended inside a frame ({self._frames.buffered} "
                            "bytes of it arrived)"
                        )
                    )
                return CLOSED
            self._frames_received += 1
            term = self._decode(payload)
            try:
                if type(term) is not tuple or not term or type(term[0]) is not Atom:
                    event: Event | None = self._not_a_message(term)
                else:
                    handler = self._recv.get(term[0])
                    event = self._unknown(term) if handler is None else handler(self, term)
            except ProtocolError:
                raise
            except Exception as exc:  # a bug here must still be a ProtocolError
                raise self._fail(
                    _protocol_error(f"internal error on a frame: {type(exc).__name__}")
                ) from exc
            if event is not None:
                return event

    def next_events(self) -> list[Event]:
        """Every event whose whole frame is buffered now, in order: the
        batched form of ``next_event`` for an I/O layer's read loop.  The
        small frames of one read are decoded in one codec call (as one list
        term) instead of one call each; limits, events, state changes and
        errors are exactly those of ``next_event`` frame by frame.

        Only while the session is open (after the hellos, not legacy):
        returns ``[]`` otherwise, and when the next thing buffered is not a
        small plain frame (need data, a compressed or large frame, the
        channel's end, a broken stream).  Call ``next_event`` after it in
        any case: that reports whatever this left (``NEED_DATA``,
        ``CLOSED``, the next event, or the error), exactly as it would have.
        A protocol error after some events returns those events; the next
        ``next_event``/``next_events`` raises it (the state is ``CLOSED``
        from then on).  ``last_cost`` is the whole batch's decode cost.
        """
        return self._next_batch(False)

    def next_replies(self) -> list[Any]:
        """``next_events`` for the client's read loop: the same, except that
        each plain reply to an open call (``Reply`` there) is the decoded
        term itself, the tuple ``(Atom("reply"), Id, Value)`` (a tuple is
        never an ``Event``), which spares building the event."""
        return self._next_batch(True)

    def _next_batch(self, raw: bool) -> list[Any]:
        if self._error is not None:
            raise self._error
        state = self._state
        if self._peeked is not None:
            return []
        if state is not OPEN and state is not DRAINING:
            return []
        frames = self._frames
        # A frame this small cannot exceed its decode budget even at the
        # worst cost per byte, so the batch's budget (the same worst case)
        # never refuses what next_event would have accepted.
        small = min(_BATCH_MAX_FRAME, self.max_cost // _WORST_COST_PER_BYTE)
        terms: Any = None
        # Two or more such frames at the head of one buffered read: joined
        # as one list term straight from the read (csrc/pyreq.c
        # batch_frames), no payload objects; taken only once decoded (else
        # the frame-by-frame path below gives the exact error).
        peek = getattr(frames, "peek_batch", None)
        got = peek(small) if peek is not None else None
        if got is not None and got[1] > 1:
            try:
                terms, self.last_cost = decode_cost(
                    got[0],
                    max_depth=self._max_depth + 1,
                    max_inflated=len(got[0]),
                    max_cost=_WORST_COST_PER_BYTE * len(got[0]),
                )
            except TermError:
                pass
            else:
                frames.skip_batch(got[2])
        payloads: list[bytes] = []
        # The payloads the C frame buffer has already cut out of a read,
        # moved over in one C call while they qualify (the first that does
        # not stays there, and next_frame returns it).
        ready = getattr(frames, "_ready", None) if _take_batchable is not None else None
        while terms is None:
            try:
                payload = frames.next_frame()
            except FrameTooLarge:
                break  # the buffer raises it again for next_event
            if payload is None:
                break
            if not 1 < len(payload) <= small or payload[0] != 131 or payload[1] == 80:
                self._peeked = payload  # next_event takes it, in order
                break
            payloads.append(payload)
            if ready and _take_batchable is not None:
                _take_batchable(ready, payloads, small)
        if not payloads and terms is None:
            return []
        events: list[Any] = []
        if len(payloads) > 1:
            if _join_batch is not None:
                batch = _join_batch(payloads)
            else:
                body = b"".join([p[1:] for p in payloads])
                batch = b"\x83l" + len(payloads).to_bytes(4, "big") + body + b"j"
            try:
                terms, self.last_cost = decode_cost(
                    batch,
                    max_depth=self._max_depth + 1,
                    max_inflated=len(batch),
                    max_cost=_WORST_COST_PER_BYTE * len(batch),
                )
            except TermError:
                terms = None  # one is bad: frame by frame, for its exact error
        if terms is None:
            for payload in payloads:
                try:
                    self._frames_received += 1
                    event = self._event_of(self._decode(payload))
                except ProtocolError:
                    if events:
                        return events
                    raise
                if event is not None:
                    events.append(event)
            return events
        # A client's plain reply to an open call, as _cli_reply's first
        # branch takes it, without the handler lookup and calls.
        reply_state = self._recv_rows[state].get("Reply") if self.role is Role.CLIENT else None
        opened = self._open
        if reply_state is not None and _plain_replies is not None:
            # The leading plain replies counted (and their ids closed) in C.
            k = _plain_replies(terms, opened, A_REPLY)
            if k:
                self._frames_received += k
                self._state = reply_state
                if k == len(terms):
                    return terms if raw else [_reply(t[1], t[2]) for t in terms]
                events = terms[:k] if raw else [_reply(t[1], t[2]) for t in terms[:k]]
                terms = terms[k:]
        for term in terms:
            if (
                reply_state is not None
                and type(term) is tuple
                and len(term) == 3
                and term[0] == A_REPLY
                and type(term[0]) is Atom
                and type(term[1]) is int
                and opened.pop(term[1], None) is not None
            ):
                self._frames_received += 1
                self._state = reply_state
                events.append(term if raw else _reply(term[1], term[2]))
                continue
            try:
                self._frames_received += 1
                event = self._event_of(term)
            except ProtocolError:
                if events:
                    return events
                raise
            if event is not None:
                events.append(event)
        return events

    def next_events_each(
        self, costs: list[int], bound: int, plain_calls: bool = False
    ) -> list[Event | PlainCall]:
        """The server's batched read: the events of the small plain frames
        buffered now, in order, each frame decoded alone so that ``costs``
        gets each event's own decode cost (``last_cost`` after
        ``next_event`` returned it).  Saves ``next_cost_bound`` and
        ``next_event``'s steps per frame; the events, their costs, the
        state changes and errors are exactly those of ``next_event`` frame
        by frame.

        Stops before a frame whose ``next_cost_bound`` could exceed
        ``bound`` (the caller's turn for expensive frames), after an event
        that changes the state (a ``bye``), and before a frame that
        breaks the protocol when it has events: that frame stays buffered,
        undecoded as far as the state goes, and the next ``next_event``
        raises its error -- after the caller acted on the events before it,
        as it would have frame by frame.  Like ``next_events``: only while
        the session is open, ``[]`` otherwise; call ``next_event`` after it
        in any case.

        ``plain_calls=True``: the event of a call without options but a
        ``timeout`` (the common call, as the Python client sends it) is
        its ``PlainCall`` tuple instead of a ``Call`` (``call_event`` makes
        that): about 0.4 us less per call for a caller that needs no object.
        With the C module, a run of such calls at the front of the buffered
        reads is taken in one C call straight from the reads' bytes
        (``plain_calls``, csrc/pydec.c, through ``FrameBuffer.take_in_place``;
        about 0.5 us less per call again); the loop below takes every other
        frame, and is the reference the tests hold it to.
        """
        if self._error is not None:
            raise self._error
        state = self._state
        if self._peeked is not None or (state is not OPEN and state is not DRAINING):
            return []
        frames = self._frames
        small = min(
            _BATCH_MAX_FRAME,
            self.max_cost // _WORST_COST_PER_BYTE,
            bound // _WORST_COST_PER_BYTE,
        )
        bye_after_error = self._bye_after_error
        events: list[Event | PlainCall] = []
        # The common call (``_srv_call``'s first branch) is decoded and made
        # an event right here: a frame costs about 2.4 us through
        # ``_decode``, ``_event_of``, ``_srv_call`` and ``_call``, 1 here.
        new = self._recv_rows[state].get("Call")
        if new is not state:
            new = None  # (a call that changes the state: the general path)
        opened = self._open
        max_open = self._hello_max_calls
        limit = self._limit
        depth = self._max_depth
        next_frame = frames.next_frame
        # The frames the buffer has split already (``next_frame`` returns
        # the first of them first), taken without a call each.
        ready: Any = getattr(frames, "_ready", None)
        if type(ready) is not deque:
            ready = ()
        decode_plain = plain_call
        # The common calls at the front of the buffered reads, taken in one
        # C call (``plain_calls``, csrc/pydec.c) straight from the read's
        # bytes: this loop's first branch without a payload object each; it
        # stops at any other frame, which it hands here (or leaves for
        # ``next_frame``).
        walk = plain_call_batch if plain_calls and new is not None else None
        take: Any = getattr(frames, "take_in_place", None) if walk is not None else None
        cost_limit = self._cost_limit
        while True:
            if ready:
                payload = ready.popleft()
            else:
                payload = None
                if take is not None and len(opened) < max_open:
                    before = len(events)
                    payload = take(
                        walk, small, opened, max_open, _PLAIN, depth, _MAX_BIG,
                        cost_limit, events, costs,
                    )  # fmt: skip
                    if len(events) != before:
                        self._frames_received += len(events) - before
                        self.last_cost = costs[-1]
                if payload is None:
                    try:
                        payload = next_frame()
                    except FrameTooLarge:
                        break  # the buffer raises it again for next_event
                    if payload is None:
                        break
            if not 1 < len(payload) <= small or payload[0] != 131 or payload[1] == 80:
                self._peeked = payload  # next_event takes it, in order
                break
            self._frames_received += 1
            # The common call decoded and checked in one C call
            # (``plain_call``), its state checks here.
            got = (
                NotImplemented
                if decode_plain is None
                else decode_plain(payload, depth, _MAX_BIG, self._cost_limit)
            )
            if type(got) is tuple and len(got) == 7:
                call_id = got[0]
                if new is not None and call_id not in opened and len(opened) < max_open:
                    # (the state stays: ``new`` is ``state``)
                    opened[call_id] = _PLAIN
                    self.last_cost = cost = got[5]
                    events.append(
                        got
                        if plain_calls
                        else _call(call_id, got[1], got[2], got[3], got[4], False, DEFAULT_CREDIT)
                    )
                    costs.append(cost)
                    continue
                term, cost = got[6], got[5]
            elif got is not NotImplemented:
                term, cost = got
            else:
                # (``_decode`` of a plain payload; it raises a bad term's error)
                try:
                    term, cost = decode_cost(
                        payload, max_depth=depth, max_inflated=limit, max_cost=self._cost_limit
                    )
                except TermError:
                    term = cost = None
            if (
                new is not None
                and type(term) is tuple
                and 5 <= len(term) <= 6
                and term[0] == A_CALL
                and type(term[0]) is Atom
                and type(call_id := term[1]) is int
                and 0 <= call_id <= MAX_ID
                and call_id not in opened
                and type(term[2]) is Atom
                and type(term[3]) is Atom
                and type(term[4]) is list
                and len(opened) < max_open
            ):
                ms: int | None = None
                if len(term) == 6 and not (
                    type(opts := term[5]) is dict
                    and len(opts) == 1
                    and type(ms := opts.get(K_TIMEOUT)) is int
                    and ms >= 0
                ):
                    ms = -1  # not the common call: the general path below
                if ms is None or ms >= 0:
                    self._state = new
                    opened[call_id] = _PLAIN
                    self.last_cost = cost
                    events.append(
                        (call_id, term[2], term[3], term[4], ms, cost, term)
                        if plain_calls
                        else _call(call_id, term[2], term[3], term[4], ms, False, DEFAULT_CREDIT)
                    )
                    costs.append(cost)
                    continue
            try:
                if cost is None:
                    term = self._decode(payload)  # raises the bad term's error
                else:
                    self.last_cost = cost
                event = self._event_of(term)
            except ProtocolError:
                if not events:
                    raise
                # Undo the failure: next_event decodes this frame again and
                # raises, once the caller has acted on the events before it.
                self._error = None
                self._state = state
                self._bye_after_error = bye_after_error
                self._frames_received -= 1
                self._peeked = payload
                break
            if event is not None:
                events.append(event)
                costs.append(self.last_cost)
            if self._state is not state:  # a bye: the caller ends or drains
                break
        return events

    def _event_of(self, term: Any) -> Event | None:
        """The event of one decoded term (``next_event``'s dispatch)."""
        try:
            if type(term) is not tuple or not term or type(term[0]) is not Atom:
                return self._not_a_message(term)
            handler = self._recv.get(term[0])
            return self._unknown(term) if handler is None else handler(self, term)
        except ProtocolError:
            raise
        except Exception as exc:  # a bug here must still be a ProtocolError
            raise self._fail(
                _protocol_error(f"internal error on a frame: {type(exc).__name__}")
            ) from exc

    def _decode(self, payload: bytes) -> Any:
        limit = self._limit
        if len(payload) >= 6 and payload[1] == 80:
            inflated = int.from_bytes(payload[2:6], "big")
            if inflated > limit:
                raise self._fail(
                    ProtocolError(
                        f"compressed frame inflates to {inflated} bytes, above max_frame {limit}",
                        bye=(A_FRAME_TOO_LARGE, inflated, limit),
                    )
                )
            ratio = self._max_inflate_ratio
            if inflated > ratio * len(payload):
                detail = (
                    f"compressed term of {len(payload)} bytes claims to inflate to "
                    f"{inflated} bytes, more than {ratio} times its size at byte 2"
                )
                raise self._fail(
                    ProtocolError(f"bad term: {detail}", bye=(A_BAD_TERM, detail.encode()))
                )
        try:
            term, self.last_cost = decode_cost(
                payload, max_depth=self._max_depth, max_inflated=limit, max_cost=self._cost_limit
            )
            return term
        except TermError as exc:
            junk = self._junk_error(exc)
            if junk is not None:
                raise self._fail(junk) from None
            detail = str(exc)
            raise self._fail(
                ProtocolError(f"bad term: {detail}", bye=(A_BAD_TERM, detail.encode()))
            ) from None

    def _junk_error(self, exc: Exception) -> ProtocolError | None:
        """A client's view of an unreadable first frame: text before the hello."""
        if self.role is not Role.CLIENT or self.peer_hello is not None or self.legacy:
            return None
        if self._frames_received > 1:
            return None
        shown = self._first_bytes[:_JUNK_SHOWN]
        err = _protocol_error(
            "the server printed text before the hello (a shell rc file on the server "
            f"writing to stdout?): first bytes {shown!r} ({exc})"
        )
        err.__cause__ = exc
        return err

    def _fail(self, exc: ProtocolError) -> ProtocolError:
        self._error = exc
        self._state = CLOSED
        self._bye_after_error = True
        return exc

    def _advance(self, key: str) -> None:
        new = self._recv_rows[self._state].get(key)
        if new is None:
            raise self._fail(
                _protocol_error(
                    f"unexpected {key.rstrip('!')} from the "
                    f"{'client' if self.role is Role.SERVER else 'server'} in state {self._state}"
                )
            )
        self._state = new

    def _not_a_message(self, term: Any) -> Event:
        if self._state is LEGACY and self.role is Role.SERVER:
            self._advance("Refused")
            self._legacy_in_flight += 1
            return Refused(id=None, reason=A_BADARG, detail="not an mfa request", term=term)
        if self._state is IDLE or self._state is AWAIT_HELLO:
            raise self._fail(_protocol_error(f"expected a hello, got {_short(term)}"))
        raise self._fail(_protocol_error(f"not a message (a tagged tuple): {_short(term)}"))

    def _unknown(self, term: tuple[Any, ...]) -> Event:
        if self._state is LEGACY and self.role is Role.SERVER:
            return self._not_a_message(term)
        if self._state is IDLE or self._state is AWAIT_HELLO:
            raise self._fail(_protocol_error(f"expected a hello, got {_short(term)}"))
        self._advance("Unknown")
        return Unknown(term=term)

    def _read_id(self, term: tuple[Any, ...], what: str) -> int:
        if len(term) < 2 or not _is_id(term[1]):
            raise self._fail(_protocol_error(f"{what} without a valid id: {_short(term)}"))
        return int(term[1])

    def _bad_shape(self, term: tuple[Any, ...]) -> ProtocolError:
        return self._fail(_protocol_error(f"malformed {term[0]} message: {_short(term)}"))

    # Hello, both roles.

    def _recv_hello(self, term: tuple[Any, ...]) -> Event:
        self._advance("Hello")
        if len(term) != 3:
            raise self._bad_shape(term)
        version = term[1]
        if version != PROTOCOL_VERSION or type(version) is not int:
            raise self._fail(
                ProtocolError(
                    f"the peer speaks protocol version {_short(version)}, this side only 1",
                    bye=(A_UNSUPPORTED_VERSION, [PROTOCOL_VERSION]),
                )
            )
        fields = term[2]
        if type(fields) is not dict:
            raise self._fail(_protocol_error(f"hello without a map: {_short(term)}"))
        max_frame = fields.get(K_MAX_FRAME, DEFAULT_MAX_FRAME)
        max_calls = fields.get(K_MAX_CALLS)
        features = fields.get(K_FEATURES, [])
        try:
            if type(max_frame) is not int or max_frame <= 0:
                raise ValueError(f"max_frame {_short(max_frame)}")
            if max_calls is not None and (type(max_calls) is not int or max_calls < 1):
                raise ValueError(f"max_calls {_short(max_calls)}")
            if type(features) is not list or not all(type(f) is Atom for f in features):
                raise ValueError(f"features {_short(features)}")
            client, server = fields.get(K_CLIENT), fields.get(K_SERVER)
            node = fields.get(K_NODE)
            if node is not None and type(node) is not Atom:
                raise ValueError(f"node {_short(node)}")
            hello = Hello(
                version=version,
                max_frame=max_frame,
                client=None if client is None else _text(client),
                server=None if server is None else _text(server),
                node=node,
                session=fields.get(K_SESSION),
                max_calls=max_calls,
                features=tuple(features),
                extra={k: v for k, v in fields.items() if k not in _HELLO_KEYS},
            )
        except ValueError as exc:
            raise self._fail(_protocol_error(f"bad hello field: {exc}")) from None
        self.peer_hello = hello
        if self.role is Role.CLIENT:
            # Hellos exchanged (ours went first).
            self._send_limit = min(max_frame, 2**32 - 1)
            self._set_limit(self._our_max_frame())
        return hello

    def _set_limit(self, limit: int) -> None:
        self._frames.max_frame = limit
        self._limit = limit
        self._cost_limit = self._cost_for(limit)

    def _our_max_frame(self) -> int:
        ours = self.our_hello.max_frame if self.our_hello is not None else self._max_frame
        return min(ours, 2**32 - 1)

    # Server role.

    def _srv_call(self, term: tuple[Any, ...]) -> Event:
        # The common call first: allowed now, a fresh valid id, no options
        # (or a ``timeout`` only, as the Python client sends it), room for
        # it.  Everything else takes the checks below.
        new = self._recv_rows[self._state].get("Call")
        opened = self._open
        n = len(term)
        if (
            new is not None
            and n >= 5
            and type(call_id := term[1]) is int
            and 0 <= call_id <= MAX_ID
            and call_id not in opened
            and type(term[2]) is Atom
            and type(term[3]) is Atom
            and type(term[4]) is list
            and len(opened) < self._hello_max_calls
        ):
            if n == 5:
                self._state = new
                opened[call_id] = _PLAIN
                return _call(call_id, term[2], term[3], term[4], None, False, DEFAULT_CREDIT)
            if (
                n == 6
                and type(opts := term[5]) is dict
                and len(opts) == 1
                and type(ms := opts.get(K_TIMEOUT)) is int
                and ms >= 0
            ):
                self._state = new
                opened[call_id] = _PLAIN
                return _call(call_id, term[2], term[3], term[4], ms, False, DEFAULT_CREDIT)
        self._advance("Call")
        call_id = self._read_id(term, "call")
        if call_id in opened:
            raise self._fail(_protocol_error(f"call id {call_id} is already open"))
        refusal = None
        n = len(term)
        if n not in (5, 6):
            refusal = "a call has 5 or 6 elements"
        elif not _is_name(term[2]) or not _is_name(term[3]):
            refusal = "module and function must be atoms"
        elif type(term[4]) is not list:
            refusal = "arguments must be a proper list"
        timeout: int | None = None
        stream = False
        credit = DEFAULT_CREDIT
        if refusal is None and n == 6:
            opts = term[5]
            if type(opts) is not dict:
                refusal = "options must be a map"
            else:
                timeout = opts.get(K_TIMEOUT)
                stream = opts.get(K_STREAM, False)
                credit = opts.get(A_CREDIT, DEFAULT_CREDIT)
                if timeout is not None and (type(timeout) is not int or timeout < 0):
                    refusal = "timeout must be a non-negative integer"
                elif type(stream) is not bool:
                    refusal = "stream must be true or false"
                elif type(credit) is not int or credit < 0:
                    refusal = "credit must be a non-negative integer"
        if refusal is None:
            if stream and "stream" not in self._hello_features:
                return self._refuse(call_id, A_NOTSUP, "streams are not supported", term)
            if len(self._open) >= self._hello_max_calls:
                return self._refuse(call_id, A_OVERLOAD, "too many open calls", term)
            self._open[call_id] = _Open(True, credit) if stream else _PLAIN
            return _call(call_id, term[2], term[3], term[4], timeout, stream, credit)
        return self._refuse(call_id, A_BADARG, refusal, term)

    def _refuse(self, call_id: int, reason: Atom, detail: str, term: Any) -> Refused:
        self._open[call_id] = _PLAIN
        return Refused(id=call_id, reason=reason, detail=detail, term=term)

    def _srv_spawn(self, term: tuple[Any, ...]) -> Event:
        self._advance("Spawn")
        call_id = self._read_id(term, "spawn")
        if call_id in self._open:
            raise self._fail(_protocol_error(f"spawn id {call_id} is already open"))
        if len(term) != 5 or not _is_name(term[2]) or not _is_name(term[3]):
            return self._refuse(call_id, A_BADARG, "spawn needs {spawn, Id, M, F, Args}", term)
        if type(term[4]) is not list:
            return self._refuse(call_id, A_BADARG, "arguments must be a proper list", term)
        if "spawn" not in self._hello_features:
            return self._refuse(call_id, A_NOTSUP, "spawn is not supported", term)
        if len(self._open) >= self._hello_max_calls:
            return self._refuse(call_id, A_OVERLOAD, "too many open calls", term)
        self._open[call_id] = _PLAIN
        return Spawn(id=call_id, module=term[2], function=term[3], args=term[4])

    def _srv_cast(self, term: tuple[Any, ...]) -> Event:
        self._advance("Cast")
        if len(term) != 4 or not _is_name(term[1]) or not _is_name(term[2]):
            raise self._bad_shape(term)
        if type(term[3]) is not list:
            raise self._bad_shape(term)
        return Cast(module=term[1], function=term[2], args=term[3])

    def _srv_cancel(self, term: tuple[Any, ...]) -> Event:
        self._advance("Cancel")
        call_id = self._read_id(term, "cancel")
        if len(term) != 2:
            raise self._bad_shape(term)
        return Cancel(id=call_id)

    def _srv_credit(self, term: tuple[Any, ...]) -> Event:
        self._advance("Credit")
        call_id = self._read_id(term, "credit")
        if len(term) != 3 or type(term[2]) is not int or term[2] < 0:
            raise self._bad_shape(term)
        entry = self._open.get(call_id)
        if entry is not None and entry.stream:
            entry.credit += term[2]
        return Credit(id=call_id, n=term[2])

    def _recv_ping(self, term: tuple[Any, ...]) -> Event:
        self._advance("Ping")
        if len(term) != 2:
            raise self._bad_shape(term)
        return Ping(token=term[1])

    def _recv_send(self, term: tuple[Any, ...]) -> Event:
        self._advance("Send")
        if len(term) != 3:
            raise self._bad_shape(term)
        return Send(dest=term[1], msg=term[2])

    def _recv_bye(self, term: tuple[Any, ...]) -> Event:
        if len(term) != 2:
            self._advance("Bye!")
            raise self._bad_shape(term)
        reason = term[1]
        self._advance("Bye" if reason == A_NORMAL and type(reason) is Atom else "Bye!")
        return Bye(reason=reason)

    def _srv_mfa(self, term: tuple[Any, ...]) -> Event:
        if self._state is IDLE:
            self._enter_legacy()
        if self._state is LEGACY and (
            len(term) != 2 or type(term[1]) is not tuple or len(term[1]) != 3
        ):
            return self._not_a_message(term)
        self._advance("Mfa")
        if len(term) != 2 or type(term[1]) is not tuple or len(term[1]) != 3:
            # A malformed first frame: legacy mode anyway, answered exec_error.
            self._state = LEGACY
            self._legacy_in_flight += 1
            return Refused(id=None, reason=A_BADARG, detail="malformed mfa", term=term)
        self._legacy_in_flight += 1
        module, function, args = term[1]
        return Mfa(module=module, function=function, args=args)

    def _enter_legacy(self) -> None:
        self.legacy = True
        self._set_limit(self._max_frame)
        self._send_limit = 2**32 - 1
        # Only mfa (server) or answer (client) means anything from now on.
        if self.role is Role.SERVER:
            self._recv = {"mfa": Connection._srv_mfa}
        else:
            self._recv = {"answer": Connection._cli_answer}

    # Client role.

    def _cli_reply(self, term: tuple[Any, ...]) -> Event:
        new = self._recv_rows[self._state].get("Reply")
        if (
            new is not None
            and len(term) == 3
            and type(term[1]) is int
            and self._open.pop(term[1], None) is not None
        ):
            self._state = new
            return _reply(term[1], term[2])
        self._advance("Reply")
        if len(term) != 3 or not _is_id(term[1]):
            raise self._bad_shape(term)
        if self._open.pop(term[1], None) is None:
            raise self._fail(_protocol_error(f"reply for id {term[1]}, which is not open"))
        return _reply(term[1], term[2])

    def _cli_error(self, term: tuple[Any, ...]) -> Event:
        self._advance("ErrorReply")
        if len(term) != 3 or not _is_id(term[1]):
            raise self._bad_shape(term)
        body = term[2]
        if (
            type(body) is not tuple
            or len(body) != 3
            or type(body[0]) is not Atom
            or type(body[2]) not in (dict, Map)
        ):
            raise self._bad_shape(term)
        if self._open.pop(term[1], None) is None:
            raise self._fail(_protocol_error(f"error for id {term[1]}, which is not open"))
        return _error_reply(term[1], body[0], body[1], body[2])

    def _cli_chunk(self, term: tuple[Any, ...]) -> Event:
        self._advance("Chunk")
        if len(term) != 3 or not _is_id(term[1]):
            raise self._bad_shape(term)
        entry = self._open.get(term[1])
        if entry is None or not entry.stream:
            raise self._fail(_protocol_error(f"chunk for id {term[1]}, not an open stream call"))
        if entry.credit <= 0:
            raise self._fail(_protocol_error(f"chunk for id {term[1]} beyond the granted credit"))
        entry.credit -= 1
        return _chunk(term[1], term[2])

    def _cli_down(self, term: tuple[Any, ...]) -> Event:
        self._advance("Down")
        if len(term) != 3:
            raise self._bad_shape(term)
        return Down(pid=term[1], reason=term[2])

    def _cli_pong(self, term: tuple[Any, ...]) -> Event:
        self._advance("Pong")
        if len(term) != 2:
            raise self._bad_shape(term)
        return Pong(token=term[1])

    def _cli_answer(self, term: tuple[Any, ...]) -> Event:
        self._advance("Answer")
        body = term[1] if len(term) == 2 else None
        if type(body) is not tuple or len(body) != 2 or type(body[1]) is not int:
            raise self._bad_shape(term)
        if self._legacy_in_flight <= 0:
            raise self._fail(_protocol_error("answer without a request in flight"))
        self._legacy_in_flight -= 1
        return Answer(result=body[0], status=body[1])

    def _wrong_way(self, term: tuple[Any, ...]) -> Event:
        sender = "client" if self.role is Role.SERVER else "server"
        raise self._fail(_protocol_error(f"a {sender} does not send {term[0]}: {_short(term)}"))

    _SERVER_RECV: Final[dict[str, _Recv]] = {
        **dict.fromkeys(("reply", "error", "chunk", "down", "pong", "answer"), _wrong_way),
        "hello": _recv_hello,
        "call": _srv_call,
        "cast": _srv_cast,
        "cancel": _srv_cancel,
        "credit": _srv_credit,
        "ping": _recv_ping,
        "spawn": _srv_spawn,
        "send": _recv_send,
        "bye": _recv_bye,
        "mfa": _srv_mfa,
    }
    _CLIENT_RECV: Final[dict[str, _Recv]] = {
        **dict.fromkeys(("call", "cast", "cancel", "credit", "ping", "spawn", "mfa"), _wrong_way),
        "hello": _recv_hello,
        "reply": _cli_reply,
        "error": _cli_error,
        "chunk": _cli_chunk,
        "send": _recv_send,
        "down": _cli_down,
        "pong": _cli_pong,
        "bye": _recv_bye,
        "answer": _cli_answer,
    }

    # ------------------------------------------------------------------
    # Sending

    def send(self, event: Event) -> bytes:
        """The frame bytes for ``event``; write them to the channel in order.

        Raises ``LocalProtocolError`` (nothing sent, nothing changed) for an
        event this side may not send now: one its role never sends, one the
        state forbids (a call before ``Hello``, a call after ``Bye``, an
        answer before the server's hello, anything once ``CLOSED`` except the
        one ``Bye`` answering a ``ProtocolError``), a call or spawn whose id
        is open, a server answer for an id that is not open (including a
        second final answer), a chunk of a non-stream call or without
        credit, a legacy ``Answer`` with no request in flight.  Raises
        ``MessageTooLarge`` for a payload above ``peer_max_frame`` (a
        server's final answer is replaced by a ``too_large`` error instead),
        ``TypeError``/``TermError`` for values with no Erlang term.
        """
        handler = self._send.get(type(event))
        if handler is None:
            raise LocalProtocolError(f"a {self.role.value} does not send {type(event).__name__}")
        return handler(self, event)

    def send_reply(self, call_id: int, value: Any) -> bytes:
        """``send(Reply(id=call_id, value=value))`` without the event object
        (a server's common answer): the same bytes, checks and errors."""
        new = self._send_rows[self._state].get("Reply")
        if new is None or type(call_id) is not int or call_id not in self._open:
            return self.send(Reply(id=call_id, value=value))  # raises what it raises
        frame = encode_frame((A_REPLY, call_id, value))
        if len(frame) - 4 > self._send_limit:  # (``_final_frame``)
            self._too_large += 1
            frame = encode_frame((A_ERROR, call_id, (A_SSHRPC, A_TOO_LARGE, {})))
        self._frames_sent += 1
        del self._open[call_id]
        self._state = new
        return frame

    def reply_kit(self) -> tuple[Connection, Any, dict[int, Any], int, Atom] | None:
        """What a batch of ``send_reply`` calls made elsewhere (the node's
        plain-call loop, csrc/pynode.c) needs to build the same frames:
        ``(self, state, open ids, send limit, the reply atom)``, or None
        when a reply would change the state (then ``send_reply`` decides
        each).  Such a loop answers an id only while ``_state`` is still
        ``state`` and the id is open, deletes it from the open ids, leaves
        a frame above the limit to ``send_reply``, and reports how many it
        answered with ``replies_sent``."""
        state = self._state
        if self._send_rows[state].get("Reply") is not state:
            return None
        return (self, state, self._open, self._send_limit, A_REPLY)

    def replies_sent(self, n: int) -> None:
        """Count ``n`` answers built from ``reply_kit``."""
        self._frames_sent += n

    def _names(self, module: str, function: str) -> bytes:
        """The encoded atoms ``module`` and ``function`` of a call frame
        (no version bytes), from a bounded cache; ``ValueError`` (nothing
        cached) for a name that cannot be an atom."""
        names = self._call_names.get((module, function))
        if names is None:
            Call(id=0, module=_atom(module), function=_atom(function), args=[])  # checks names
            names = encode(_atom(module))[1:] + encode(_atom(function))[1:]
            if len(self._call_names) >= _CALL_NAMES_CACHED:
                self._call_names.clear()
            self._call_names[(module, function)] = names
        return names

    def send_calls(
        self,
        call_ids: list[int],
        module: str,
        function: str,
        arglists: list[Any],
        timeout: int | None = None,
    ) -> bytes:
        """``send_call`` for each id of ``call_ids`` with the args at the same
        place of ``arglists`` (lists of one length), the frames joined in
        order: the same bytes, errors and state changes, except that it is
        all or nothing -- when one raises, the state is as before and none
        is sent.  Whole batches of frames in one C call (csrc/pycall.c
        ``call_frames``) where it can."""
        n = len(call_ids)
        if n != len(arglists):
            raise ValueError("send_calls: call_ids and arglists differ in length")
        state = self._state
        opened = self._open
        if (
            _call_frames is not None
            and type(call_ids) is list
            and type(arglists) is list
            and self._send_rows[state].get("Call") is state
            and opened.keys().isdisjoint(call_ids)
            and len(set(call_ids)) == n
        ):
            names = self._call_names.get((module, function))
            if names is None:
                names = self._names(module, function)
            data: bytes | None = _call_frames(call_ids, names, arglists, timeout, self._send_limit)
            if data is not None:
                opened.update(dict.fromkeys(call_ids, _PLAIN))
                self._frames_sent += n
                return data
        # One at a time (each raises its own error), undone if one fails.
        frames: list[bytes | bytearray] = []
        try:
            for call_id, args in zip(call_ids, arglists, strict=True):
                frames.append(self.send_call(call_id, module, function, args, timeout))
        except BaseException:
            for call_id in call_ids[: len(frames)]:
                del opened[call_id]
            self._frames_sent -= len(frames)
            self._state = state
            raise
        return b"".join(frames)

    def send_call(
        self, call_id: int, module: str, function: str, args: Any, timeout: int | None = None
    ) -> bytes | bytearray:
        """``send(Call(id=call_id, module=module, function=function,
        args=list(args), timeout=timeout))`` -- the same bytes, errors and
        state change -- without building the event: the client's per-call
        path.  The frame's ``{call, Id, M, F`` part is assembled from cached
        encodings (one per (module, function), bounded); only ``Args``, the
        id and the timeout are encoded per call.  Arguments holding large
        binaries give a ``bytearray`` (``_frame_of_call``)."""
        new = self._send_rows[self._state].get("Call")
        if (
            new is None
            or type(call_id) is not int
            or not 0 <= call_id <= MAX_ID
            or call_id in self._open
            or (timeout is not None and (type(timeout) is not int or timeout < 0))
        ):
            # The slow path raises the right error (or handles the rare id).
            return self.send(
                Call(
                    id=call_id,
                    module=_atom(module),
                    function=_atom(function),
                    args=list(args),
                    timeout=timeout,
                )
            )
        names = self._call_names.get((module, function))
        if names is None:
            names = self._names(module, function)
        arglist = args if type(args) is list else list(args)
        if _call_frame is not None:
            fast: bytes | None = _call_frame(call_id, names, arglist, timeout)
            if fast is not None:
                if len(fast) - 4 > self._send_limit:
                    raise MessageTooLarge(len(fast) - 4, self._send_limit)
                self._frames_sent += 1
                self._open[call_id] = _PLAIN
                self._state = new
                return fast
        id_term = _INT_EXT(b"b", call_id) if 256 <= call_id < _INT32 else _int_term(call_id)
        body = encode_direct(arglist, DEFAULT_MAX_DEPTH, 0)
        if body is None:
            # Large binaries (the direct encoder declines them): the frame
            # joined once from pieces (src/sshrpc/_bulk.py) into a bytearray.
            big = term_parts(arglist, DEFAULT_MAX_DEPTH, encode)
            if big is not None:
                parts, size = big
                return self._frame_of_call(call_id, names, id_term, timeout, parts, size, new, True)
            body = encode(arglist)
        size = len(body) - 1
        parts = [memoryview(body)[1:]]
        return self._frame_of_call(call_id, names, id_term, timeout, parts, size, new, False)

    def _frame_of_call(
        self,
        call_id: int,
        names: bytes,
        id_term: bytes,
        timeout: int | None,
        parts: list[Any],
        body_size: int,
        new: Sentinel,
        big: bool,
    ) -> bytes | bytearray:
        """``send_call``'s frame from the encoded ``Args`` (``parts``,
        ``body_size`` bytes, no version byte), and its state change.
        ``big`` (arguments holding large binaries): the frame is joined into
        a ``bytearray``, which an empty send queue takes over without a copy
        (``Pump.send_nowait``)."""
        if timeout is None:
            size = _HEAD5_SIZE + len(id_term) + len(names) + body_size + 1
            tail: tuple[bytes, ...] = ()
            head = _CALL_HEAD5
        else:
            timeout_term = _int_term(timeout)
            size = _HEAD6_SIZE + len(id_term) + len(names) + body_size + 1 + len(timeout_term)
            tail = (_TIMEOUT_OPTS, timeout_term)
            head = _CALL_HEAD6
        if size > self._send_limit:
            raise MessageTooLarge(size, self._send_limit)
        joiner = bytearray() if big else b""
        frame = joiner.join((_U32(size), head, id_term, names, *parts, *tail))
        self._frames_sent += 1
        self._open[call_id] = _PLAIN
        self._state = new
        return frame

    def send_keepalive(self) -> bytes:
        """A zero-length frame, which the peer ignores.  Allowed in any state
        before ``CLOSED``."""
        if self._state is CLOSED:
            raise LocalProtocolError("cannot send a keepalive: the connection is closed")
        return b"\0\0\0\0"

    def _next_state(self, key: str) -> Sentinel:
        new = self._send_rows[self._state].get(key)
        if new is None:
            raise LocalProtocolError(
                f"a {self.role.value} cannot send {key.rstrip('!')} in state {self._state}"
            )
        return new

    def _frame(self, term: Any) -> bytes:
        frame = encode_frame(term)
        if len(frame) - 4 > self._send_limit:
            raise MessageTooLarge(len(frame) - 4, self._send_limit)
        self._frames_sent += 1
        return frame

    def _send_hello(self, ev: Hello) -> bytes:
        new = self._next_state("Hello")
        fields: dict[Any, Any] = dict(ev.extra)
        fields[K_MAX_FRAME] = ev.max_frame
        for key, value in (
            (K_CLIENT, ev.client),
            (K_SERVER, ev.server),
            (K_NODE, ev.node if ev.node is None else _atom(ev.node)),
            (K_SESSION, ev.session),
            (K_MAX_CALLS, ev.max_calls),
        ):
            if value is not None:
                fields[key] = value
        if self.role is Role.SERVER:
            fields[K_FEATURES] = [_atom(f) for f in ev.features]
        frame = self._frame((A_HELLO, ev.version, fields))
        self.our_hello = ev
        if self.role is Role.SERVER:
            self._hello_max_calls = ev.max_calls if ev.max_calls is not None else self._max_calls
            self._hello_features = frozenset(ev.features)
            # Hellos exchanged (the client's came first).
            assert self.peer_hello is not None
            self._send_limit = min(self.peer_hello.max_frame, 2**32 - 1)
            self._set_limit(min(ev.max_frame, 2**32 - 1))
        self._state = new
        return frame

    def _send_bye(self, ev: Bye) -> bytes:
        if self._state is CLOSED and self._bye_after_error:
            frame = encode_frame((A_BYE, ev.reason))
            self._bye_after_error = False
            self._frames_sent += 1
            return frame
        reason = ev.reason
        normal = reason == A_NORMAL and isinstance(reason, str)
        new = self._next_state("Bye" if normal else "Bye!")
        # Only ``normal`` is read as an atom when given as a str; any other
        # reason is a term like any value (a str is a binary).
        frame = encode_frame((A_BYE, A_NORMAL if normal else reason))
        self._frames_sent += 1
        self._state = new
        return frame

    # Client role.

    def _send_call(self, ev: Call) -> bytes:
        new = self._next_state("Call")
        if ev.id in self._open:
            raise LocalProtocolError(f"call id {ev.id} is already open")
        term: tuple[Any, ...]
        if ev.timeout is None and not ev.stream:
            term = (A_CALL, ev.id, _atom(ev.module), _atom(ev.function), ev.args)
        else:
            opts: dict[Any, Any] = {}
            if ev.timeout is not None:
                opts[K_TIMEOUT] = ev.timeout
            if ev.stream:
                opts[K_STREAM] = True
                if ev.credit != DEFAULT_CREDIT:
                    opts[A_CREDIT] = ev.credit
            term = (A_CALL, ev.id, _atom(ev.module), _atom(ev.function), ev.args, opts)
        frame = self._frame(term)
        self._open[ev.id] = _Open(True, ev.credit) if ev.stream else _PLAIN
        self._state = new
        return frame

    def _send_spawn(self, ev: Spawn) -> bytes:
        new = self._next_state("Spawn")
        if ev.id in self._open:
            raise LocalProtocolError(f"spawn id {ev.id} is already open")
        frame = self._frame((A_SPAWN, ev.id, _atom(ev.module), _atom(ev.function), ev.args))
        self._open[ev.id] = _PLAIN
        self._state = new
        return frame

    def _send_cast(self, ev: Cast) -> bytes:
        new = self._next_state("Cast")
        frame = self._frame((A_CAST, _atom(ev.module), _atom(ev.function), ev.args))
        self._state = new
        return frame

    def _send_cancel(self, ev: Cancel) -> bytes:
        # Cancelling an unknown or finished id does nothing on the server
        # (section 4), so it is allowed here too; the id stays open until
        # its final answer.
        new = self._next_state("Cancel")
        frame = self._frame((A_CANCEL, ev.id))
        self._state = new
        return frame

    def _send_credit(self, ev: Credit) -> bytes:
        new = self._next_state("Credit")
        frame = self._frame((A_CREDIT, ev.id, ev.n))
        entry = self._open.get(ev.id)
        if entry is not None and entry.stream:
            entry.credit += ev.n
        self._state = new
        return frame

    def _send_ping(self, ev: Ping) -> bytes:
        new = self._next_state("Ping")
        frame = self._frame((A_PING, ev.token))
        self._state = new
        return frame

    def _send_send(self, ev: Send) -> bytes:
        new = self._next_state("Send")
        frame = self._frame((A_SEND, ev.dest, ev.msg))
        self._state = new
        return frame

    def _send_mfa(self, ev: Mfa) -> bytes:
        new = self._next_state("Mfa")
        term = (A_MFA, (ev.module, ev.function, ev.args))
        if self._state is IDLE:
            frame = encode_frame(term)
            self._frames_sent += 1
            self._enter_legacy()
        else:
            frame = self._frame(term)
        self._legacy_in_flight += 1
        self._state = new
        return frame

    # Server role.

    def _send_reply(self, ev: Reply) -> bytes:
        new = self._next_state("Reply")
        if ev.id not in self._open:
            raise LocalProtocolError(f"reply for id {ev.id}, which is not open")
        frame = self._final_frame(ev.id, (A_REPLY, ev.id, ev.value))
        del self._open[ev.id]
        self._state = new
        return frame

    def _send_error(self, ev: ErrorReply) -> bytes:
        new = self._next_state("ErrorReply")
        if ev.id not in self._open:
            raise LocalProtocolError(f"error for id {ev.id}, which is not open")
        frame = self._final_frame(ev.id, (A_ERROR, ev.id, (_atom(ev.cls), ev.reason, ev.details)))
        del self._open[ev.id]
        self._state = new
        return frame

    def _final_frame(self, call_id: int, term: tuple[Any, ...]) -> bytes:
        frame = encode_frame(term)
        if len(frame) - 4 > self._send_limit:
            self._too_large += 1
            frame = encode_frame((A_ERROR, call_id, (A_SSHRPC, A_TOO_LARGE, {})))
        self._frames_sent += 1
        return frame

    def _send_chunk(self, ev: Chunk) -> bytes:
        new = self._next_state("Chunk")
        entry = self._open.get(ev.id)
        if entry is None or not entry.stream:
            raise LocalProtocolError(f"chunk for id {ev.id}, which is not an open stream call")
        if entry.credit <= 0:
            raise LocalProtocolError(f"chunk for id {ev.id} without credit (wait for Credit)")
        frame = self._frame((A_CHUNK, ev.id, ev.value))
        entry.credit -= 1
        self._state = new
        return frame

    def _send_down(self, ev: Down) -> bytes:
        new = self._next_state("Down")
        frame = self._frame((A_DOWN, ev.pid, ev.reason))
        self._state = new
        return frame

    def _send_pong(self, ev: Pong) -> bytes:
        new = self._next_state("Pong")
        frame = self._frame((A_PONG, ev.token))
        self._state = new
        return frame

    def _send_answer(self, ev: Answer) -> bytes:
        new = self._next_state("Answer")
        if self._legacy_in_flight <= 0:
            raise LocalProtocolError("answer without a legacy request in flight")
        frame = self._frame((A_ANSWER, (ev.result, ev.status)))
        self._legacy_in_flight -= 1
        self._state = new
        return frame

    _CLIENT_SEND: Final[dict[type[Event], _Send]] = {
        Hello: _send_hello,
        Call: _send_call,
        Cast: _send_cast,
        Cancel: _send_cancel,
        Credit: _send_credit,
        Ping: _send_ping,
        Spawn: _send_spawn,
        Send: _send_send,
        Bye: _send_bye,
        Mfa: _send_mfa,
    }
    _SERVER_SEND: Final[dict[type[Event], _Send]] = {
        Hello: _send_hello,
        Reply: _send_reply,
        ErrorReply: _send_error,
        Chunk: _send_chunk,
        Send: _send_send,
        Down: _send_down,
        Pong: _send_pong,
        Bye: _send_bye,
        Answer: _send_answer,
    }


#: The largest payload ``next_events`` decodes in a batch (bigger ones are
#: decoded alone: the batch copies the small frames of a read into one term).
_BATCH_MAX_FRAME: Final = 16 * 1024
#: (module, function) pairs whose encoded atoms ``send_call`` keeps.
_CALL_NAMES_CACHED: Final = 256
# 131 (version), SMALL_TUPLE_EXT of 5 or 6, then the atom ``call``.
_CALL_HEAD5: Final = b"\x83h\x05" + encode(A_CALL)[1:]
_CALL_HEAD6: Final = b"\x83h\x06" + encode(A_CALL)[1:]
# ``#{timeout => `` (MAP_EXT of one pair, the key atom); the value follows.
_TIMEOUT_OPTS: Final = encode({K_TIMEOUT: 0})[1:-2]
assert encode({K_TIMEOUT: 0})[-2:] == b"a\x00"
_INT32: Final = 2**31
# The frame size, less the payload's version byte (``len(body)`` counts it).
_HEAD5_SIZE: Final = len(_CALL_HEAD5) - 1
_HEAD6_SIZE: Final = len(_CALL_HEAD6) + len(_TIMEOUT_OPTS) - 1
_U32: Final = struct.Struct(">I").pack
_INT_EXT: Final = struct.Struct(">cI").pack
_SMALL_INTS: Final = tuple(b"a" + bytes([i]) for i in range(256))


#: The client's per-call builtins (csrc/pycall.c; absent in pure Python):
#: the whole call frame in one C call, and the count of a read's leading
#: plain replies.
_client_c: Final[dict[str, Any]] = (
    install_client_builtins(_CALL_HEAD5, _CALL_HEAD6, _TIMEOUT_OPTS) if c_accelerated else {}
)
_call_frame: Final = _client_c.get("call_frame")
_call_frames: Final = _client_c.get("call_frames")
_plain_replies: Final = _client_c.get("plain_replies")
_take_batchable: Final = _client_c.get("take_batchable")
_join_batch: Final = _client_c.get("join_batch")


def _int_term(value: int) -> bytes:
    """The canonical ETF of a non-negative integer, no version byte."""
    if value < 256:
        return _SMALL_INTS[value]
    if value < _INT32:
        return _INT_EXT(b"b", value)
    return encode(value)[1:]


def _short(term: Any) -> str:
    """Peer data for an error message: bounded, never raises (huge ints,
    deep terms; ``safe_repr``)."""
    return safe_repr(term, 200)


#: ``plain_call`` (csrc/pydec.c), or None: see ``_install_plain_call``.
plain_call = _install_plain_call()


def _install_plain_calls() -> Callable[..., int] | None:
    """``plain_calls(read, pos, max_frame, small, opened, max_open, plain,
    max_depth, max_big, max_cost, events, costs)`` (csrc/pydec.c): the loop
    of ``next_events_each`` over a read's common calls, in place in the
    read, for ``FrameBuffer.take_in_place``; None where ``plain_call`` is
    not in use (or the build predates it).  Setting the module's
    ``plain_call_batch`` to None makes ``next_events_each`` take every frame
    through its Python loop (the reference; tests compare the two)."""
    if plain_call is None:
        return None
    from .._sshrpc_c import ffi, lib

    target: dict[str, Any] = {}
    if lib.sshrpc_pydec_install_plain_call(ffi.cast("void *", id(target))):
        return None  # pragma: no cover - out of memory at import
    return target.get("plain_calls")


#: ``plain_calls`` (csrc/pydec.c), or None: see ``_install_plain_calls``.
plain_call_batch = _install_plain_calls()
