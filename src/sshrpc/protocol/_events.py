"""The messages of PROTOCOL.md as Python events: one frozen class per wire tag.

Events are nouns spelled like their tags.  ``ErrorReply`` is the ``error``
answer (``Error`` is what service code raises).  ``Send`` travels both ways.
Each event validates its own fields when built, so a malformed event cannot
be sent; the connection (``_connection.py``) turns terms into events and
events into frames.  No I/O, no Trio.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._types import Atom

__all__ = [
    "Answer",
    "Bye",
    "Call",
    "Cancel",
    "Cast",
    "Chunk",
    "Credit",
    "Down",
    "ErrorReply",
    "Event",
    "Hello",
    "Mfa",
    "Ping",
    "Pong",
    "Refused",
    "Reply",
    "Send",
    "Spawn",
    "Unknown",
]

#: Ids are non-negative integers below 2**64 (PROTOCOL.md section 4).
MAX_ID = 2**64 - 1
#: Stream credit a call starts with when its options do not say (section 4).
DEFAULT_CREDIT = 16


def _check_id(value: object) -> None:
    if type(value) is not int or not 0 <= value <= MAX_ID:
        raise ValueError(f"call id must be an integer in 0..2**64-1, not {value!r}")


def _check_name(value: object, what: str) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= 255:
        raise ValueError(f"{what} must be a name of 1..255 characters, not {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base class of every protocol event."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello(Event):
    """``{hello, Version, Map}``: the first frame of each side.

    ``max_frame`` is the largest payload the sender accepts.  The client sets
    ``client`` (``"name/version"``); the server sets ``server``, ``node``,
    ``session`` (a ``Pid``), ``max_calls`` and ``features``.  ``extra`` keeps
    map keys this version does not know (they are ignored, section 3).
    """

    version: int = 1
    max_frame: int = 1024 * 1024
    client: str | None = None
    server: str | None = None
    node: Atom | None = None
    session: Any = None
    max_calls: int | None = None
    features: tuple[Atom, ...] = ()
    extra: dict[Any, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if type(self.max_frame) is not int or self.max_frame < 0:
            raise ValueError(f"max_frame must be a non-negative integer, not {self.max_frame!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Call(Event):
    """``{call, Id, M, F, Args}`` or ``{call, Id, M, F, Args, Opts}``.

    ``timeout`` is in milliseconds (``None``: no deadline); ``stream`` asks
    for ``chunk`` frames; ``credit`` is the stream's initial credit.
    """

    id: int
    module: Atom
    function: Atom
    args: list[Any]
    timeout: int | None = None
    stream: bool = False
    credit: int = DEFAULT_CREDIT

    def __post_init__(self) -> None:
        _check_id(self.id)
        _check_name(self.module, "module")
        _check_name(self.function, "function")
        if type(self.args) is not list:
            raise ValueError("args must be a list")
        if self.timeout is not None and (type(self.timeout) is not int or self.timeout < 0):
            raise ValueError(f"timeout must be a non-negative integer (ms), not {self.timeout!r}")
        if type(self.credit) is not int or self.credit < 0:
            raise ValueError(f"credit must be a non-negative integer, not {self.credit!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Cast(Event):
    """``{cast, M, F, Args}``: a call that gets no answer, ever."""

    module: Atom
    function: Atom
    args: list[Any]

    def __post_init__(self) -> None:
        _check_name(self.module, "module")
        _check_name(self.function, "function")
        if type(self.args) is not list:
            raise ValueError("args must be a list")


@dataclass(frozen=True, slots=True, kw_only=True)
class Spawn(Event):
    """``{spawn, Id, M, F, Args}``: start a process; answered ``{reply, Id, Pid}``."""

    id: int
    module: Atom
    function: Atom
    args: list[Any]

    def __post_init__(self) -> None:
        _check_id(self.id)
        _check_name(self.module, "module")
        _check_name(self.function, "function")
        if type(self.args) is not list:
            raise ValueError("args must be a list")


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel(Event):
    """``{cancel, Id}``: ask the server to stop call ``Id``."""

    id: int

    def __post_init__(self) -> None:
        _check_id(self.id)


@dataclass(frozen=True, slots=True, kw_only=True)
class Credit(Event):
    """``{credit, Id, N}``: let the server send ``N`` more chunks of call ``Id``."""

    id: int
    n: int

    def __post_init__(self) -> None:
        _check_id(self.id)
        if type(self.n) is not int or self.n < 0:
            raise ValueError(f"credit must be a non-negative integer, not {self.n!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping(Event):
    """``{ping, Token}``: answered ``{pong, Token}``."""

    token: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong(Event):
    """``{pong, Token}``: the answer to a ping."""

    token: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class Bye(Event):
    """``{bye, Reason}``: the sender is closing (``normal``) or refusing the
    peer (``{protocol_error, Detail}``, ``{bad_term, Detail}``,
    ``{frame_too_large, Length, Max}``, ``{unsupported_version, [1]}``)."""

    reason: Any = Atom("normal")  # noqa: RUF009 (an Atom is an immutable str)


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply(Event):
    """``{reply, Id, Value}``: the final, successful answer of call ``Id``."""

    id: int
    value: Any

    def __post_init__(self) -> None:
        _check_id(self.id)


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorReply(Event):
    """``{error, Id, {Class, Reason, Details}}``: the final, failed answer."""

    id: int
    cls: Atom
    reason: Any
    details: dict[Any, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_id(self.id)
        _check_name(self.cls, "error class")


@dataclass(frozen=True, slots=True, kw_only=True)
class Chunk(Event):
    """``{chunk, Id, Value}``: one item of a stream call."""

    id: int
    value: Any

    def __post_init__(self) -> None:
        _check_id(self.id)


@dataclass(frozen=True, slots=True, kw_only=True)
class Send(Event):
    """``{send, Dest, Msg}``: a message to a pid or registered name (either way)."""

    dest: Any
    msg: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class Down(Event):
    """``{down, Pid, Reason}``: a process spawned by this session ended."""

    pid: Any
    reason: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class Mfa(Event):
    """Legacy ``{mfa, {M, F, A}}`` request (original sshrpc)."""

    module: Any
    function: Any
    args: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer(Event):
    """Legacy ``{answer, {Result, Status}}``: status 0 is success, -1 failure."""

    result: Any
    status: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Refused(Event):
    """Server role only: a request the core will not hand over as a call.

    Answer it with ``ErrorReply(id=ev.id, cls=Atom("sshrpc"), reason=ev.reason)``
    (the id is open until then), or in legacy mode (``id`` is ``None``) with
    ``Answer(result=(Atom("exec_error"), ev.term), status=-1)``.  ``reason``
    is ``badarg`` (a known tag with a wrong shape), ``overload`` (over
    ``max_calls``) or ``notsup`` (a feature the server's hello does not
    list); ``detail`` says what was wrong, for the log; ``term`` is the
    request as received.
    """

    id: int | None
    reason: Atom
    detail: str = ""
    term: Any = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Unknown(Event):
    """A tuple whose tag this version does not know.  PROTOCOL.md section 4
    says to ignore it, so later versions can add messages: log it."""

    term: Any
