"""The node's worker threads for sync functions: a long-lived pool, fair per key.

``trio.to_thread.run_sync`` costs about 72 µs per call on the machines this
was measured on (a thread hand-off, an ``Event``-like wake-up and a
``run_sync_soon`` per call).  ``WorkerPool`` starts its threads once (lazily,
up to ``threads``), feeds them from one ``queue.SimpleQueue`` and hands
results back to the Trio loop in batches: the first result finished while
none is pending schedules one ``TrioToken.run_sync_soon``; every result that
finishes before that callback runs rides on it.  The waiting task is parked
with ``trio.lowlevel.wait_task_rescheduled`` and woken with ``reschedule``:
no ``Event``, no task, no cancel scope per call.

Fairness: a job is handed to a thread only when one is free, and a key may
hold at most ``per_key`` threads at once; further jobs of that key wait in a
per-key queue, served round-robin with other keys' queues as threads free
up.  So one key never holds more than its share, and with the default
(``per_key = threads // 2``) one busy or hostile key always leaves half the
threads to the others.  Several keys at their share together can fill the
pool: lower ``per_key`` where several keys may be hostile.

Cancellation: a job still waiting for a thread is dropped at once.  A job
running in a thread cannot be stopped (Python cannot kill a thread): its
waiter gets ``trio.Cancelled`` at once (the call answers ``cancelled`` or
``timeout``), the job is flagged, and code in the thread learns it
cooperatively with ``check_cancelled()`` (raises ``Cancelled``) or
``cancelled()``.  Its thread stays charged to its key until the function
returns; its result is then discarded.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["Cancelled", "Job", "WorkerPool", "cancelled", "check_cancelled"]


class Cancelled(BaseException):
    """Raised by ``sshrpc.check_cancelled()`` in a sync function whose call
    was cancelled, timed out, or whose channel ended.

    A ``BaseException`` like ``trio.Cancelled``, so that ``except Exception``
    in service code does not swallow it.  Let it propagate: the call has
    already been answered and whatever the function returns or raises after
    it is discarded.
    """


class Job:
    """One sync function call handed to the pool (``WorkerPool.submit``)."""

    __slots__ = (
        "args",
        "callback",
        "cancelled",
        "context",
        "flush",
        "fn",
        "key",
        "outcome",
        "pool",
    )

    def __init__(
        self,
        pool: WorkerPool,
        key: Hashable,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        context: contextvars.Context,
        callback: Callable[[Any], object],
        flush: Callable[[], object] | None = None,
    ) -> None:
        self.pool = pool
        self.key = key
        self.fn = fn
        self.args = args
        self.context = context
        #: Called on the loop with the outcome; ``None`` once abandoned.
        self.callback: Callable[[Any], object] | None = callback
        #: Called on the loop once after the callbacks of a round of results.
        self.flush = flush
        #: Read by ``check_cancelled()`` in the worker thread.
        self.cancelled = False
        self.outcome: Any = None


_local = threading.local()
log = logging.getLogger("sshrpc.node")


def check_cancelled() -> None:
    """Raise ``sshrpc.Cancelled`` if the call running this sync function was
    cancelled (``{cancel, Id}``, client-side cancellation), ran past its
    deadline, or its channel ended.

    Call it now and then in a long sync function: it is the only way such a
    function learns that nobody waits for its answer any more.  Cheap (an
    attribute read).  Outside a worker thread of the node (on the event loop:
    ``async def`` and ``inline=True`` functions) it never raises; async code
    is cancelled by Trio at its next checkpoint instead.
    """
    job: Job | None = getattr(_local, "job", None)
    if job is not None and job.cancelled:
        raise Cancelled


def cancelled() -> bool:
    """True if the call running this sync function was cancelled or timed
    out, or its channel ended (see ``check_cancelled``); False outside a
    worker thread of the node."""
    job: Job | None = getattr(_local, "job", None)
    return job is not None and job.cancelled


def current_token() -> Any:
    """The ``TrioToken`` of the loop whose pool runs this thread's job, or
    ``None`` outside a pool thread."""
    job: Job | None = getattr(_local, "job", None)
    return None if job is None else job.pool.token


class WorkerPool:
    """``threads`` worker threads for sync functions, at most ``per_key`` of
    them held by jobs of one key.

    Create and use it on one Trio loop; ``close()`` ends the threads once
    their current jobs return.  ``run`` is the only awaitable.  The
    bookkeeping (threads held per key, jobs waiting) is shared with the
    threads under one lock: a thread that finishes a job takes the next
    waiting one itself, without a round trip through the loop.
    """

    def __init__(self, threads: int, per_key: int | None = None) -> None:
        if threads < 1:
            raise ValueError(f"worker threads must be at least 1, not {threads}")
        if per_key is None:
            per_key = max(1, threads // 2)
        if not 1 <= per_key <= threads:
            raise ValueError(f"worker threads per key must be within 1..{threads}, not {per_key}")
        self.threads = threads
        self.per_key = per_key
        self.token: Any = None
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        #: Jobs handed to threads (queued for one or running, abandoned ones
        #: included), per key and in all.
        self._held: dict[Hashable, int] = {}
        self._busy = 0
        #: Jobs waiting for a thread, per key, in arrival order; keys in
        #: round-robin order.
        self._waiting: dict[Hashable, deque[Job]] = {}
        #: Finished jobs, appended by worker threads, taken by ``_deliver``.
        self._done: list[Job] = []
        self._wake_pending = False
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    # -- the loop side --------------------------------------------------------

    async def run(self, key: Hashable, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a worker thread, as one job of ``key``; its value,
        or its exception.

        Runs in a copy of the caller's ``contextvars`` context.  Cancellation:
        a job not yet started is dropped; a started one is flagged (see
        ``check_cancelled``) and left to finish, still charged to ``key``;
        either way ``trio.Cancelled`` is raised here at once.
        """
        import trio

        task = trio.lowlevel.current_task()
        job = self.submit(
            key,
            fn,
            args,
            contextvars.copy_context(),
            functools.partial(trio.lowlevel.reschedule, task),
        )

        def abort(_: Any) -> Any:
            self.abandon(job)
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def submit(
        self,
        key: Hashable,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        context: contextvars.Context,
        callback: Callable[[Any], object],
        flush: Callable[[], object] | None = None,
    ) -> Job:
        """Without a task: run ``fn(*args)`` in ``context`` in a worker
        thread, as one job of ``key``, and call ``callback(outcome)`` (an
        ``outcome.Outcome``) on the loop when it returns, unless the job was
        abandoned first.  Results are handed over in rounds: after the
        callbacks of a round, each distinct ``flush`` of their jobs is
        called once (e.g. to write their answers together).  Neither may
        raise.  Call on the loop."""
        if self._closed:
            raise RuntimeError("the worker pool is closed")
        if self.token is None:
            import trio

            self.token = trio.lowlevel.current_trio_token()
            trio.lowlevel.spawn_system_task(self._close_when_run_ends)
        job = Job(self, key, fn, args, context, callback, flush)
        with self._lock:
            if self._busy < self.threads and self._held.get(key, 0) < self.per_key:
                self._held[key] = self._held.get(key, 0) + 1
                self._busy += 1
                start = True
            else:
                self._waiting.setdefault(key, deque()).append(job)
                start = False
        if start:
            if len(self._workers) < self._busy:
                self._spawn_thread()
            self._queue.put(job)
        return job

    def abandon(self, job: Job) -> None:
        """Nobody waits for ``job`` any more: drop it if it waits for a
        thread, else flag it (``check_cancelled`` raises in its thread; it
        keeps its thread, charged to its key, until it returns).  Its
        callback will not be called.  Call on the loop; idempotent."""
        job.callback = None
        with self._lock:
            waiting = self._waiting.get(job.key)
            if waiting is not None and job in waiting:
                waiting.remove(job)
                if not waiting:
                    del self._waiting[job.key]
            else:
                job.cancelled = True

    def _spawn_thread(self) -> None:
        thread = threading.Thread(
            target=self._work, name=f"sshrpc-worker-{len(self._workers)}", daemon=True
        )
        self._workers.append(thread)
        thread.start()

    async def _close_when_run_ends(self) -> None:
        import trio

        try:
            await trio.sleep_forever()
        finally:
            self.close()

    def _deliver(self) -> None:
        """On the loop: hand every finished job's outcome to its callback."""
        with self._lock:
            self._wake_pending = False
            done, self._done = self._done, []
        flushes: dict[Callable[[], object], None] = {}
        for job in done:
            callback = job.callback
            if callback is not None:
                job.callback = None
                if job.flush is not None:
                    flushes[job.flush] = None
                try:
                    callback(job.outcome)
                except Exception:  # a bug; the loop must go on
                    log.exception("worker pool: result callback failed")
        for flush in flushes:
            try:
                flush()
            except Exception:  # a bug; the loop must go on
                log.exception("worker pool: flush failed")

    def close(self) -> None:
        """End every thread once its current job returns; waiting jobs are
        not started (their callers stay parked until cancelled, as they are
        when the Trio run ends).  Idempotent; does not wait for the threads
        (see ``join``)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for _ in self._workers:
            self._queue.put(None)

    def join(self, timeout: float | None = None) -> bool:
        """Wait (blocking) for the threads to end after ``close``; True if
        they all did within ``timeout`` (seconds, per thread)."""
        for thread in self._workers:
            thread.join(timeout)
        return not any(thread.is_alive() for thread in self._workers)

    def statistics(self) -> dict[str, int]:
        """Threads alive, jobs handed to threads, jobs waiting for one."""
        with self._lock:
            return {
                "threads": sum(thread.is_alive() for thread in self._workers),
                "busy": self._busy,
                "waiting": sum(len(jobs) for jobs in self._waiting.values()),
            }

    # -- the thread side ------------------------------------------------------

    def _finish(self, job: Job) -> Job | None:
        """Under the lock: account for ``job`` (finished), queue it for
        ``_deliver``, and take the next waiting job this thread may run
        (round-robin over keys under their share), if any."""
        key = job.key
        held = self._held[key] - 1
        if held:
            self._held[key] = held
        else:
            del self._held[key]
        self._done.append(job)
        if not self._closed:
            for other in self._waiting:
                if self._held.get(other, 0) < self.per_key:
                    jobs = self._waiting.pop(other)
                    following = jobs.popleft()
                    if jobs:
                        self._waiting[other] = jobs  # to the back of the round
                    self._held[other] = self._held.get(other, 0) + 1
                    return following
        self._busy -= 1
        return None

    def _work(self) -> None:
        import outcome

        get = self._queue.get
        lock = self._lock
        job = get()
        while job is not None:
            _local.job = job
            try:
                job.outcome = job.context.run(outcome.capture, job.fn, *job.args)
            finally:
                _local.job = None
            # The function and its arguments: gone from this thread.
            job.fn = job.args = job.context = None  # type: ignore[assignment]
            with lock:
                following = self._finish(job)
                wake = not self._wake_pending
                self._wake_pending = True
            if wake:
                # RunFinishedError: the Trio run has ended, nobody waits.
                with contextlib.suppress(Exception):
                    self.token.run_sync_soon(self._deliver)
            job = following if following is not None else get()
