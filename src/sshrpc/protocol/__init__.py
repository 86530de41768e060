"""Frames <-> protocol events, both roles (PROTOCOL.md).  No I/O, no Trio."""

from ._events import *  # noqa: F403
from ._events import __all__ as _events_all

__all__ = list(_events_all)
