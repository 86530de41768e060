"""Frames <-> protocol events, both roles (PROTOCOL.md).  No I/O, no Trio.

``Connection`` is the state machine (docs/protocol.md explains it); the
events are in ``_events.py``, the states and their transition tables in
``_state.py``.
"""

from ._connection import (
    ALL_FEATURES,
    COST_PER_BYTE,
    DEFAULT_MAX_CALLS,
    DEFAULT_MAX_FRAME,
    DEFAULT_MAX_INFLATE_RATIO,
    NEED_DATA,
    PROTOCOL_VERSION,
    Connection,
    ConnectionStatistics,
    PlainCall,
    call_event,
)
from ._events import *  # noqa: F403
from ._events import __all__ as _events_all
from ._state import AWAIT_HELLO, CLOSED, DRAINING, IDLE, LEGACY, MUST_HELLO, OPEN, Role, Sentinel

__all__ = [
    *_events_all,
    "ALL_FEATURES",
    "AWAIT_HELLO",
    "CLOSED",
    "COST_PER_BYTE",
    "DEFAULT_MAX_CALLS",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_MAX_INFLATE_RATIO",
    "DRAINING",
    "IDLE",
    "LEGACY",
    "MUST_HELLO",
    "NEED_DATA",
    "OPEN",
    "PROTOCOL_VERSION",
    "Connection",
    "ConnectionStatistics",
    "PlainCall",
    "Role",
    "Sentinel",
    "call_event",
]
