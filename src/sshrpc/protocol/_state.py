"""The states of one sshrpc channel and every transition between them.  No I/O.

Two rules, as in h11: every state change of ``Connection`` is looked up in
the tables below (nothing else moves ``state``), and the tables are plain
data, so docs/protocol.md and the tests read the same thing the code runs.

A channel has one conversation state.  ``TRANSITIONS[role][state]`` maps
``(direction, event class name)`` to the next state; a pair that is missing
is not allowed in that state: sent, it is a ``LocalProtocolError``;
received, a ``ProtocolError`` (the peer broke PROTOCOL.md).  ``Bye`` is
keyed ``"Bye"`` when its reason is ``normal`` and ``"Bye!"`` otherwise, since
only a client's normal bye leads to a graceful drain.

Per-call bookkeeping (open ids, stream credit, legacy requests in flight)
lives in ``_connection.py``; it never changes the state.  A peer's EOF is
not a state either: ``next_event`` returns ``CLOSED`` once the buffered
frames are consumed, and the state stays where the last frame left it, so a
server can still answer the calls of a client that half-closed.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "AWAIT_HELLO",
    "CLOSED",
    "DRAINING",
    "IDLE",
    "LEGACY",
    "MUST_HELLO",
    "OPEN",
    "RECV",
    "Role",
    "SEND",
    "STATES",
    "TRANSITIONS",
    "Sentinel",
    "diagram",
]


class Sentinel:
    """A named singleton (a state, a role or a direction)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def __reduce__(self) -> str:
        return self.name


#: Nothing exchanged yet.  The client must send ``Hello`` (or a legacy
#: ``Mfa``); the server waits for the client's first frame.
IDLE: Final = Sentinel("IDLE")
#: Client only: our hello is sent, the server's has not arrived.  Calls may be
#: pipelined (within the 1 MiB pre-hello limit).
AWAIT_HELLO: Final = Sentinel("AWAIT_HELLO")
#: Server only: the client's hello arrived; ours must be sent before any
#: answer.  Requests the client pipelined are already delivered as events.
MUST_HELLO: Final = Sentinel("MUST_HELLO")
#: Both hellos exchanged: calls and answers flow.
OPEN: Final = Sentinel("OPEN")
#: The client sent ``{bye, normal}``: no new calls or casts; open calls still
#: get their answers; the server ends it with its own ``bye``.
DRAINING: Final = Sentinel("DRAINING")
#: The original sshrpc protocol (``{mfa, ...}`` -> ``{answer, ...}``) for
#: the rest of the channel.
LEGACY: Final = Sentinel("LEGACY")
#: A ``bye`` was sent or received, or the peer broke the protocol.  Nothing
#: more is sent, except the one ``Bye`` that answers a ``ProtocolError``.
CLOSED: Final = Sentinel("CLOSED")

STATES: Final = (IDLE, AWAIT_HELLO, MUST_HELLO, OPEN, DRAINING, LEGACY, CLOSED)


class Role(enum.Enum):
    """Which end of the channel a ``Connection`` plays."""

    CLIENT = "client"
    SERVER = "server"


CLIENT: Final = Role.CLIENT
SERVER: Final = Role.SERVER
SEND: Final = Sentinel("SEND")
RECV: Final = Sentinel("RECV")

Table = dict[Role, dict[Sentinel, dict[tuple[Sentinel, str], Sentinel]]]


def _stay(
    state: Sentinel, direction: Sentinel, *names: str
) -> dict[tuple[Sentinel, str], Sentinel]:
    return {(direction, name): state for name in names}


# What a client sends and receives while calls flow.
_CLIENT_CALLS = ("Call", "Cast", "Cancel", "Credit", "Ping", "Spawn", "Send")
_CLIENT_IN = ("Reply", "ErrorReply", "Chunk", "Send", "Down", "Pong", "Unknown")
# What a server receives and sends while calls flow.  ``Refused`` is the
# event the core makes of a request it answers ``badarg``/``overload``/
# ``notsup`` for; ``Unknown`` a tuple with a tag this version does not know.
_SERVER_IN = ("Call", "Cast", "Cancel", "Credit", "Ping", "Spawn", "Send", "Refused", "Unknown")
_SERVER_OUT = ("Reply", "ErrorReply", "Chunk", "Send", "Down", "Pong")

TRANSITIONS: Final[Table] = {
    CLIENT: {
        IDLE: {
            (SEND, "Hello"): AWAIT_HELLO,
            (SEND, "Mfa"): LEGACY,
            (SEND, "Bye"): CLOSED,
            (SEND, "Bye!"): CLOSED,
            (RECV, "Bye"): CLOSED,
            (RECV, "Bye!"): CLOSED,
        },
        AWAIT_HELLO: {
            (RECV, "Hello"): OPEN,
            (RECV, "Bye"): CLOSED,
            (RECV, "Bye!"): CLOSED,
            (SEND, "Bye"): CLOSED,
            (SEND, "Bye!"): CLOSED,
            **_stay(AWAIT_HELLO, SEND, *_CLIENT_CALLS),
        },
        OPEN: {
            **_stay(OPEN, SEND, *_CLIENT_CALLS),
            **_stay(OPEN, RECV, *_CLIENT_IN),
            (SEND, "Bye"): DRAINING,
            (SEND, "Bye!"): CLOSED,
            (RECV, "Bye"): CLOSED,
            (RECV, "Bye!"): CLOSED,
        },
        DRAINING: {
            **_stay(DRAINING, SEND, "Cancel", "Credit", "Ping"),
            **_stay(DRAINING, RECV, *_CLIENT_IN),
            (SEND, "Bye!"): CLOSED,
            (RECV, "Bye"): CLOSED,
            (RECV, "Bye!"): CLOSED,
        },
        LEGACY: {
            (SEND, "Mfa"): LEGACY,
            (RECV, "Answer"): LEGACY,
            (RECV, "Unknown"): LEGACY,
        },
        MUST_HELLO: {},  # a server state
        CLOSED: {},
    },
    SERVER: {
        AWAIT_HELLO: {},  # a client state
        IDLE: {
            (RECV, "Hello"): MUST_HELLO,
            (RECV, "Mfa"): LEGACY,
            (SEND, "Bye"): CLOSED,
            (SEND, "Bye!"): CLOSED,
        },
        MUST_HELLO: {
            (SEND, "Hello"): OPEN,
            (SEND, "Bye"): CLOSED,
            (SEND, "Bye!"): CLOSED,
            **_stay(MUST_HELLO, RECV, *_SERVER_IN),
            (RECV, "Bye"): DRAINING,
            (RECV, "Bye!"): CLOSED,
        },
        OPEN: {
            **_stay(OPEN, RECV, *_SERVER_IN),
            **_stay(OPEN, SEND, *_SERVER_OUT),
            (RECV, "Bye"): DRAINING,
            (RECV, "Bye!"): CLOSED,
            (SEND, "Bye"): CLOSED,
            (SEND, "Bye!"): CLOSED,
        },
        DRAINING: {
            **_stay(DRAINING, RECV, "Cancel", "Credit", "Ping", "Unknown"),
            **_stay(DRAINING, SEND, *_SERVER_OUT),
            (RECV, "Bye!"): CLOSED,
            (SEND, "Bye"): CLOSED,
            (SEND, "Bye!"): CLOSED,
        },
        LEGACY: {
            (RECV, "Mfa"): LEGACY,
            (RECV, "Refused"): LEGACY,
            (SEND, "Answer"): LEGACY,
        },
        CLOSED: {},
    },
}


def diagram(role: Role) -> str:
    """The transitions of ``role`` as a Mermaid state diagram (for
    docs/protocol.md; tests check the page shows the current tables).
    Self-loops are folded into one note per state."""
    lines = ["stateDiagram-v2", f"    %% {role.name} role, drawn from sshrpc.protocol._state"]
    for state, row in TRANSITIONS[role].items():
        edges: dict[Sentinel, list[str]] = {}
        for (direction, name), new in row.items():
            label = ("send " if direction is SEND else "recv ") + name
            edges.setdefault(new, []).append(label)
        for new, labels in edges.items():
            if new is state:
                continue
            lines.append(f"    {state.name} --> {new.name}: {', '.join(labels)}")
        stays = sorted(label for new, labels in edges.items() if new is state for label in labels)
        if stays:
            lines.append(f"    note right of {state.name}: {', '.join(stays)}")
    lines.append(f"    [*] --> {IDLE.name}")
    lines.append(f"    {CLOSED.name} --> [*]")
    return "\n".join(lines)
