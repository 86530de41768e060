"""Driving a coroutine by hand: the node's async calls without a task switch.

The node's reader starts each async call's coroutine itself, with ``start``
(``node._Channel._start_async``): most calls (an echo, a lookup) return
without ever waiting, so they are answered at once, without a task of their
own, a reschedule or a checkpoint.  A call that does wait hands back the
first *trap* it yielded (the object a Trio primitive yields to the
scheduler); the reading then moves to another task of the channel, and the
task that started the call awaits ``Resume(coro, context, trap)``, which
yields that trap to Trio and goes on driving the coroutine until it
returns.  A coroutine is always driven by the task that started it (Trio
code keeps ``current_task()`` and its cancel scopes), and each call runs in
its own ``contextvars`` context.
"""

from __future__ import annotations

import contextvars
import types
from collections.abc import Awaitable, Generator
from typing import Any

__all__ = ["Resume", "start"]

_CoroutineType = types.CoroutineType


def start(awaitable: Awaitable[Any], context: contextvars.Context) -> tuple[bool, Any, Any]:
    """Run ``awaitable`` in ``context`` up to its first trap.

    Returns ``(True, value, None)`` when it finished without waiting, or
    ``(False, iterator, trap)``: pass both to ``Resume`` and await it from the
    same task.  An exception the awaitable raises before it waits propagates.
    """
    it: Any = awaitable if type(awaitable) is _CoroutineType else awaitable.__await__()
    try:
        trap = context.run(it.send, None)
    except StopIteration as stop:
        return True, stop.value, None
    return False, it, trap


class Resume:
    """Awaitable: yield ``trap`` (the first trap of a coroutine ``start``
    ran) to the task's scheduler, then drive the coroutine to its end in
    ``context``; its value, or its exception (``trio.Cancelled`` included).

    Whatever the scheduler sends or throws in is passed on to the
    coroutine, as ``await`` would; await it only from the task that ran
    ``start``."""

    __slots__ = ("_context", "_it", "_trap")

    def __init__(self, it: Any, context: contextvars.Context, trap: Any) -> None:
        self._it = it
        self._context = context
        self._trap = trap

    def __await__(self) -> Generator[Any, Any, Any]:
        it, run, trap = self._it, self._context.run, self._trap
        self._it = self._trap = None
        send = it.send
        while True:
            try:
                value = yield trap
            except BaseException as exc:  # thrown in: pass it on
                try:
                    trap = run(it.throw, exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    trap = run(send, value)
                except StopIteration as stop:
                    return stop.value
