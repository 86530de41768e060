"""The client's per-call records: ``Request`` (one open call, spawn or stream,
also the handle ``Connection.send_request`` returns), ``RequestSet`` (many
requests answered in completion order) and ``CallSlots`` (the server's
``max_calls`` as a counter with parked waiters).

Theory of operation.  A waiting task does not wait on a ``trio.Event``: it
parks itself with ``trio.lowlevel.wait_task_rescheduled`` and records itself
in the request (or set, or slot queue); the pump task, when the answer
arrives, stores the outcome in the request and ``reschedule``s the parked
task.  The abort callback (run by Trio when the parked task is cancelled)
forgets the task, so a task is rescheduled at most once and never after it
was cancelled.  Everything runs in one thread; no locks.

The pump task calls ``Request._finish`` exactly once per request (final
answer, error answer or connection end).  A finished request that belongs to
a ``RequestSet`` goes into the set's completion deque, so
``RequestSet.receive_response`` finds the next answer in O(1).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio
from trio.lowlevel import Abort, Task, current_task, reschedule, wait_task_rescheduled

from . import _reqc
from ._errors import ConnectionLost, RemoteError

if TYPE_CHECKING:
    from .client import Connection

__all__ = ["CallSlots", "Request", "RequestSet"]


class _PyRequestFields:
    """``Request``'s attributes as slots: the pure-Python storage, used
    when the C one (csrc/pyreq.c ``RequestFields``, the same names) is not
    there."""

    __slots__ = (
        "_conn",
        "_owner",
        "_task",
        "abandoned",
        "chunk_event",
        "chunks",
        "counted",
        "done",
        "error",
        "id",
        "label",
        "ok",
        "received",
        "slot",
        "value",
    )

    id: int
    label: Any
    done: bool
    ok: bool
    value: Any
    error: BaseException | None
    abandoned: bool
    counted: bool
    received: bool
    chunks: deque[Any] | None
    chunk_event: trio.Event | None
    slot: CallSlots | None
    _conn: Connection | None
    _owner: RequestSet | None
    _task: Task | None


if TYPE_CHECKING:
    _RequestFields = _PyRequestFields
else:
    _RequestFields = _reqc.fields if _reqc.fields is not None else _PyRequestFields


class Request(_RequestFields):
    """One request in flight: the handle ``Connection.send_request`` returns.

    ``id`` is the call's protocol id, ``label`` what ``RequestSet`` returns
    with its result (None outside a set), ``done`` whether its final answer
    (or the connection's end) has arrived.  Get its result once with
    ``Connection.receive_response(req)`` or, inside a set,
    ``RequestSet.receive_response()``.  The other attributes are private.
    (Its attributes live in ``_RequestFields``: C storage the client's batch
    paths fill and finish in bulk, csrc/pyreq.c, else slots.)
    """

    __slots__ = ()

    def __init__(self, id: int, conn: Connection | None = None, label: Any = None) -> None:
        self.id = id
        self.label = label
        self.done = False
        self.ok = False
        self.value = None
        self.error = None
        #: The caller gave up: the answer is discarded (not counted).
        self.abandoned = False
        #: Its answer counts against ``max_undelivered`` until taken: true
        #: for ``call``/``spawn``/``stream``, whose caller always takes it;
        #: not for ``send_request``, whose handle may be dropped unreceived
        #: (the answer then goes with it; nothing to leak).
        self.counted = conn is None
        #: The result was handed out (``receive_response``).
        self.received = False
        self.chunks = None
        self.chunk_event = None
        self.slot = None
        self._conn = conn
        self._owner = None
        self._task = None

    def __repr__(self) -> str:
        state = "done" if self.done else "open"
        return f"<sshrpc.Request id={self.id} label={self.label!r} {state}>"

    def release(self) -> None:
        """Give the call slot back (once)."""
        slot = self.slot
        if slot is not None:
            self.slot = None
            slot.release()

    def _finish(self) -> None:
        """Mark done and wake whoever waits for it (pump task only)."""
        self.done = True
        task = self._task
        if task is not None:
            self._task = None
            reschedule(task)
        owner = self._owner
        if owner is not None:
            owner._completed(self)
        if self.chunk_event is not None:
            self.chunk_event.set()

    def _abort(self, _: Any) -> Abort:
        self._task = None
        return Abort.SUCCEEDED

    async def _wait(self) -> None:
        """Park until ``_finish`` (precondition: not done).  Cancellable;
        a cancel leaves ``done`` as the pump left it."""
        self._task = current_task()
        await wait_task_rescheduled(self._abort)


def new_requests(
    conn: Connection,
    ids: list[int],
    slots: CallSlots | None,
    into: RequestSet | None,
    labels: Sequence[Any] | None,
) -> list[Request]:
    """``Request(id, conn, label)`` for each id of ``ids`` (label from
    ``labels`` at the same place, else None), with ``slot`` set to
    ``slots``, stored in ``conn._pending`` under its id and, with ``into``,
    joined to that set: the batch form of what ``send_request`` does per
    request (``Connection.send_requests_nowait``).  In one C call where it
    can (csrc/pyreq.c ``new_requests``)."""
    pending = conn._pending
    members = None
    if into is not None:
        members = into._requests
        into._joined_by(conn)
    if _reqc.new_requests is not None:
        return _reqc.new_requests(  # type: ignore[no-any-return]
            Request,
            ids,
            conn,
            slots,
            into,
            labels if labels is None or type(labels) is list else list(labels),
            pending,
            members,
        )
    if labels is None:
        reqs = [Request(i, conn) for i in ids]
    else:
        reqs = [Request(i, conn, label) for i, label in zip(ids, labels, strict=False)]
    for req in reqs:
        req.slot = slots
        pending[req.id] = req
    if into is not None:
        for req in reqs:
            req._owner = into
        into._requests.update(reqs)
    return reqs


class RequestSet:
    """Requests answered in the order they complete, like an OTP request-id
    collection.

    ``await conn.send_request(m, f, args, into=reqs, label=x)`` adds a
    request; ``label, value = await reqs.receive_response()`` takes whichever
    answer arrived first.  ``len(reqs)`` counts the requests not yet taken.
    One task at a time may wait on a set.  Requests of several connections
    may share a set.
    """

    __slots__ = ("_conn", "_lone_pump", "_ready", "_requests", "_task")

    def __init__(self) -> None:
        self._requests: set[Request] = set()
        self._ready: deque[Request] = deque()
        self._task: Task | None = None
        #: The one connection of the set's requests so far (None: none
        #: yet; ``_MIXED``: several): only then may a waiter read that
        #: connection's socket itself (``_wait``).
        self._conn: Any = None
        #: The pump whose socket wait a waiter of this set holds (``_wait``).
        self._lone_pump: Any = None

    def __len__(self) -> int:
        return len(self._requests)

    def __bool__(self) -> bool:
        return bool(self._requests)

    def __repr__(self) -> str:
        return f"<sshrpc.RequestSet {len(self._requests)} requests, {len(self._ready)} answered>"

    @property
    def answered(self) -> int:
        """How many requests of the set have an answer waiting to be taken."""
        return len(self._ready)

    def _joined_by(self, conn: Connection | None) -> None:
        if self._conn is not conn:
            self._conn = conn if self._conn is None else _MIXED

    def _add(self, req: Request) -> None:
        self._joined_by(req._conn)
        req._owner = self
        self._requests.add(req)
        if req.done:  # (cannot happen today: no checkpoint in between)
            self._ready.append(req)

    def _completed(self, req: Request) -> None:
        self._ready.append(req)
        self._wake(req._conn)

    def _completed_many(self, reqs: list[Request], conn: Connection) -> None:
        """``_completed`` for each of ``reqs`` (of ``conn``), in order."""
        self._ready.extend(reqs)
        self._wake(conn)

    def _wake(self, conn: Connection | None) -> None:
        """Wake the set's waiter: something of ``conn`` (None: of no
        connection) completed or the set was emptied.  A waiter sleeping
        on a pump's socket itself is woken through that pump (which takes
        its socket back and wakes it, Pump._reclaim), unless ``conn``'s
        read is the waiter's own (it then sees the answer itself)."""
        task = self._task
        if task is not None:
            self._task = None
            reschedule(task)
        elif self._lone_pump is not None:
            pump = self._lone_pump
            if conn is None or conn._pump is not pump:
                pump.wake()

    async def _until_ready(self, caller: str) -> None:
        """A checkpoint if an answer is ready, else ``_wait`` (``caller``
        names the method in the errors): ``ValueError`` for an empty set,
        ``trio.BusyResourceError`` if another task waits on it."""
        if self._ready:
            await trio.lowlevel.checkpoint()
            return
        if not self._requests:
            raise ValueError(f"{caller} on an empty RequestSet")
        if self._task is not None or self._lone_pump is not None:
            raise trio.BusyResourceError("another task is waiting on this RequestSet")
        await self._wait()

    async def _wait(self) -> None:
        """Park until a request of the set completes or the set is emptied
        (precondition: none has, and nobody waits).  When all its requests
        are on one connection whose pump sleeps on the socket, this task
        reads that socket itself (``Pump.wait_answer``, "The lone caller"
        in _pump.py): one task step per read instead of the pump's and
        this task's.  Cancellable; nothing is taken either way."""
        conn = self._conn
        if conn is not None and conn is not _MIXED and conn._pump._in_park:
            pump = conn._pump
            self._lone_pump = pump
            try:
                woken = await pump.wait_answer(_SetWaiter(self))
            finally:
                self._lone_pump = None
            if woken is not None:
                return
        self._task = current_task()
        await wait_task_rescheduled(self._abort)

    def _abort(self, _: Any) -> Abort:
        self._task = None
        return Abort.SUCCEEDED

    def _take(self) -> tuple[Any, Any]:
        req = self._ready.popleft()
        self._requests.discard(req)
        req._owner = None
        req.received = True
        if req.ok:
            return req.label, req.value
        error: RemoteError | ConnectionLost | BaseException | None = req.error
        if not isinstance(error, RemoteError):
            conn = req._conn
            error = conn._raise_error() if conn is not None else ConnectionLost(str(error))
        if isinstance(error, RemoteError | ConnectionLost):
            error.label = req.label
        raise error

    async def receive_response(self) -> tuple[Any, Any]:
        """Wait for the next request of the set to complete; remove it and
        return ``(label, value)``.

        An error answer raises its ``RemoteError`` (subclass) with ``.label``
        set to the request's label; a connection that ended first raises
        ``ConnectionLost`` (also with ``.label``).  Either way the request
        leaves the set, so ``while reqs:`` loops end.  A checkpoint.  If
        cancelled, no answer is taken: every request stays in the set (use
        ``abandon()`` to give them up).  Raises ``ValueError`` if the set is
        empty and ``trio.BusyResourceError`` if another task waits on it.
        """
        await self._until_ready("receive_response")
        if not self._ready:  # e.g. abandon() from another task while waiting
            return await self.receive_response()
        return self._take()

    async def receive_responses(self, max: int | None = None) -> list[tuple[Any, Any]]:
        """``receive_response`` for every answer that has arrived: wait until
        a request of the set has completed, then remove and return the
        ``(label, value)`` pairs of the completed requests in completion
        order -- at most ``max`` of them, and stopping before the first
        error answer (or connection end), which the next call raises as
        ``receive_response`` does, with ``.label`` (removing that request
        only).  One checkpoint for the whole batch.

        If cancelled, no answer is taken (every request stays in the set).
        Raises ``ValueError`` if the set is empty or ``max`` is below 1,
        and ``trio.BusyResourceError`` if another task waits on the set."""
        if max is not None and max < 1:
            raise ValueError(f"receive_responses: max must be at least 1, not {max!r}")
        await self._until_ready("receive_responses")
        ready = self._ready
        if not ready:  # e.g. abandon() from another task while waiting
            return await self.receive_responses(max)
        if not ready[0].ok:
            return [self._take()]  # (raises)
        count = len(ready) if max is None or max > len(ready) else max
        requests = self._requests
        if _reqc.take_answers is not None:
            out: list[tuple[Any, Any]] = _reqc.take_answers(ready, requests, count)
            if len(out) == len(ready):
                ready.clear()
            else:
                for _ in range(len(out)):
                    ready.popleft()
            return out
        out = []
        for _ in range(count):
            req = ready[0]
            if not req.ok:
                break
            ready.popleft()
            requests.discard(req)
            req._owner = None
            req.received = True
            out.append((req.label, req.value))
        return out

    def check_response(self) -> tuple[Any, Any]:
        """``receive_response`` without waiting: raises ``trio.WouldBlock``
        when no request of the set has completed.  Not a checkpoint."""
        if not self._ready:
            raise trio.WouldBlock
        return self._take()

    def abandon(self) -> None:
        """Give up every request of the set: ``{cancel, Id}`` goes to the
        server for each one still open, answers that arrived are discarded,
        and the set is empty.  Not a checkpoint."""
        requests, self._requests = self._requests, set()
        self._ready.clear()
        for req in requests:
            req._owner = None
            conn = req._conn
            if conn is not None:
                conn._abandon(req)
        self._wake(None)


#: ``RequestSet._conn`` of a set with requests of several connections.
_MIXED: Any = object()


class _SetWaiter:
    """A ``RequestSet`` as ``Pump.wait_answer``'s request: ``done`` once
    an answer is ready (or the set was emptied: ``abandon``), and
    ``_task``/``_abort`` the set's, which the dispatch reschedules."""

    __slots__ = ("rs",)

    def __init__(self, rs: RequestSet) -> None:
        self.rs = rs

    @property
    def done(self) -> bool:
        return bool(self.rs._ready) or not self.rs._requests

    @property
    def _task(self) -> Task | None:
        return self.rs._task

    @_task.setter
    def _task(self, task: Task | None) -> None:
        self.rs._task = task

    def _abort(self, raise_cancel: Any) -> Abort:
        return self.rs._abort(raise_cancel)


class CallSlots:
    """``n`` call slots: a counter plus a queue of parked tasks.

    ``release`` hands a slot straight to the longest-waiting task, so a freed
    slot is never taken by a newcomer while others wait.
    """

    __slots__ = ("_waiters", "free")

    def __init__(self, n: int) -> None:
        self.free = n
        self._waiters: deque[Task] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def acquire_nowait(self) -> bool:
        """Take a slot if one is free and nobody waits; True if taken."""
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        return False

    async def acquire(self) -> None:
        """Wait for a slot (parks; first come, first served).  If cancelled,
        no slot was taken."""
        if self.acquire_nowait():
            await trio.lowlevel.checkpoint()
            return
        task = current_task()
        self._waiters.append(task)

        def abort(_: Any) -> Abort:
            self._waiters.remove(task)
            return Abort.SUCCEEDED

        await wait_task_rescheduled(abort)

    def release(self) -> None:
        """Free a slot, handing it to the first waiter if there is one."""
        if self._waiters:
            reschedule(self._waiters.popleft())
        else:
            self.free += 1
