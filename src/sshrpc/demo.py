"""Demo services for the README and the tests: ``sshrpc serve sshrpc.demo:services``.

=====================  =====================================================
``lists:reverse/1``    the list reversed (inline)
``lists:seq/2``        ``list(range(From, To + 1))``, as Erlang's lists:seq (a
                       worker thread: the caller chooses how long it takes)
``os:getpid/0``        the pid of the process running the services (inline)
``echo:echo/1``        its argument, unchanged (inline)
``slow:work/1``        sleeps N seconds (async) and returns ``done``; records
                       ``started``, then ``finished`` or ``cancelled``
``slow:was_cancelled/0`` ``true`` when the last ``slow:work`` was cancelled
``slow:status/0``      ``started``/``finished``/``cancelled``/``idle`` of the
                       last ``slow:work``
``slow:block/1``       a *sync* function that blocks its worker thread N
                       seconds (``time.sleep``) and returns ``done``
``slow:running/0``     how many ``slow:block`` calls are running right now
``slow:spin/1``        a *sync* function that works N seconds in slices,
                       calling ``sshrpc.check_cancelled()`` between them;
                       ``slow:spun/0`` says ``started``/``finished``/
                       ``cancelled`` for the last one
``feed:tail/1``        stream: yields ``0..N-1``, then the call replies ``done``
``log:info/1``         records its argument (meant for ``cast``), returns ``ok``
``log:last/0``         the last argument ``log:info`` got (``undefined`` if none)
``worker:loop/0``      for ``spawn``: receives messages and sends each back to
                       the spawning session's mailbox as ``{echo, Msg}``; the
                       message ``stop`` ends it normally, ``{crash, Reason}``
                       ends it with ``sshrpc.Exit(Reason)``
``worker:named/1``     for ``spawn``: registers the process under the atom
                       Name (a binary), then runs as ``worker:loop``
``errors:raise/2``     ``errors:raise(Class, Reason)``: Class ``error``,
                       ``exit`` or ``throw`` raises ``sshrpc.Error``/``Exit``/
                       ``Throw`` with Reason; ``other`` raises
                       ``ValueError(Reason)`` (becomes ``{'ValueError', <<..>>}``)
=====================  =====================================================
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import trio

from . import node
from ._errors import Error, Exit, Throw
from ._types import Atom
from ._workers import Cancelled, check_cancelled
from .service import Service

__all__ = ["services"]

lists = Service("lists")
os_service = Service("os")
echo = Service("echo")
slow = Service("slow")
feed = Service("feed")
log = Service("log")
worker = Service("worker")
errors = Service("errors")

#: What the last ``slow:work`` did; read by ``slow:status/0``.
SLOW_STATE: dict[str, str] = {"work": "idle"}
#: ``slow:block`` calls running now (worker threads), read by ``slow:running/0``.
_BLOCKING = {"running": 0}
_BLOCKING_LOCK = threading.Lock()
#: The last ``log:info`` argument.
LOG_STATE: dict[str, Any] = {"last": None}


@lists.export(inline=True)
def reverse(items: list[Any]) -> list[Any]:
    return list(reversed(items))


@lists.export
def seq(first: int, last: int) -> list[int]:
    return list(range(first, last + 1))


@os_service.export(inline=True)
def getpid() -> int:
    return os.getpid()


@echo.export(name="echo", inline=True)
def echo_(value: Any) -> Any:
    return value


@slow.export
async def work(seconds: float) -> Atom:
    SLOW_STATE["work"] = "started"
    try:
        await trio.sleep(seconds)
    except trio.Cancelled:
        SLOW_STATE["work"] = "cancelled"
        raise
    SLOW_STATE["work"] = "finished"
    return Atom("done")


@slow.export
async def was_cancelled() -> bool:
    return SLOW_STATE["work"] == "cancelled"


@slow.export
async def status() -> Atom:
    return Atom(SLOW_STATE["work"])


@slow.export
def block(seconds: float) -> Atom:
    with _BLOCKING_LOCK:
        _BLOCKING["running"] += 1
    try:
        time.sleep(seconds)
    finally:
        with _BLOCKING_LOCK:
            _BLOCKING["running"] -= 1
    return Atom("done")


@slow.export
async def running() -> int:
    return _BLOCKING["running"]


@slow.export
def spin(seconds: float) -> Atom:
    SLOW_STATE["spin"] = "started"
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            check_cancelled()
            time.sleep(0.005)  # a slice of "work"
    except Cancelled:
        SLOW_STATE["spin"] = "cancelled"
        raise
    SLOW_STATE["spin"] = "finished"
    return Atom("done")


@slow.export
async def spun() -> Atom:
    return Atom(SLOW_STATE.get("spin", "idle"))


@feed.export
async def tail(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


@log.export
async def info(message: Any) -> Atom:
    LOG_STATE["last"] = message
    return Atom("ok")


@log.export
async def last() -> Any:
    return LOG_STATE["last"]


@worker.export(name="loop")
async def loop() -> None:
    session = node.session_pid()
    while True:
        message = await node.receive()
        if message == Atom("stop"):
            return
        if isinstance(message, tuple) and len(message) == 2 and message[0] == Atom("crash"):
            raise Exit(message[1])
        node.send(session, (Atom("echo"), message))


@worker.export
async def named(name: bytes) -> None:
    node.register(name)
    await loop()


@errors.export(name="raise")
async def raise_(cls: Any, reason: Any) -> None:
    if cls == "error":
        raise Error(reason)
    if cls == "exit":
        raise Exit(reason)
    if cls == "throw":
        raise Throw(reason)
    raise ValueError(reason.decode() if isinstance(reason, bytes) else str(reason))


services: list[Service] = [lists, os_service, echo, slow, feed, log, worker, errors]
