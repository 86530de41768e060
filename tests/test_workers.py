"""The node's worker pool (``sshrpc._workers.WorkerPool``) on its own: values,
exceptions and context reach the caller; per-key shares; cancellation of
waiting and running jobs (``check_cancelled``); threads end with the run.
Threads are gated with ``threading.Event`` s, never timed."""

from __future__ import annotations

import contextvars
import threading
from typing import Any

import pytest
import trio
import trio.testing

import sshrpc
from sshrpc._workers import WorkerPool

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


def _workers_alive() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sshrpc-worker")]


def test_values_exceptions_context_and_threads_end_with_the_run() -> None:
    pools: list[WorkerPool] = []

    async def main() -> None:
        pool = WorkerPool(4)
        pools.append(pool)
        assert await pool.run("k", lambda a, b: a + b, 1, 2) == 3
        VAR.set("caller's")
        assert await pool.run("k", VAR.get) == "caller's"
        with pytest.raises(ZeroDivisionError):
            await pool.run("k", lambda: 1 / 0)
        # outside a worker thread: never cancelled
        assert sshrpc.cancelled() is False
        sshrpc.check_cancelled()
        results = []

        async def one(i: int) -> None:
            results.append(await pool.run(f"key{i % 3}", lambda: i))

        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(one, i)
        assert sorted(results) == list(range(100))
        assert pool.statistics()["busy"] == 0
        assert 1 <= pool.statistics()["threads"] <= 4

    trio.run(main)
    assert pools[0].closed
    assert pools[0].join(10)
    assert not _workers_alive()


def test_bad_sizes() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        WorkerPool(0)
    with pytest.raises(ValueError, match=r"within 1\.\.4"):
        WorkerPool(4, 5)
    assert WorkerPool(1).per_key == 1
    assert WorkerPool(16).per_key == 8


async def test_one_key_holds_at_most_its_share_and_others_run_past_it() -> None:
    pool = WorkerPool(4, 2)
    release = threading.Event()
    started = threading.Semaphore(0)

    def hog() -> str:
        started.release()
        release.wait(30)
        return "hog"

    hogs: list[str] = []

    async def run_hog() -> None:
        hogs.append(await pool.run("hostile", hog))

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(run_hog)
        await trio.testing.wait_all_tasks_blocked()
        assert await trio.to_thread.run_sync(started.acquire, True, 10)
        assert await trio.to_thread.run_sync(started.acquire, True, 10)
        stats = pool.statistics()
        assert (stats["busy"], stats["waiting"]) == (2, 4)
        # another key finds a thread at once, repeatedly
        for i in range(20):
            assert await pool.run("victim", lambda i=i: i) == i
        release.set()
    assert hogs == ["hog"] * 6
    pool.close()
    assert pool.join(10)


async def test_cancel_drops_waiting_jobs_and_flags_running_ones() -> None:
    pool = WorkerPool(2, 1)
    inside = threading.Event()
    go_on = threading.Event()
    seen: dict[str, Any] = {}
    ran_waiting = threading.Event()

    def cooperative() -> str:
        inside.set()
        go_on.wait(30)
        seen["cancelled"] = sshrpc.cancelled()
        try:
            sshrpc.check_cancelled()
        except sshrpc.Cancelled:
            seen["raised"] = True
            raise
        return "not reached"

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.run, "k", cooperative)
            await trio.to_thread.run_sync(inside.wait, 10)
            nursery.start_soon(pool.run, "k", ran_waiting.set)  # waits: k's share is 1
            await trio.testing.wait_all_tasks_blocked()
            assert pool.statistics()["waiting"] == 1
            scope.cancel()
    # both callers got Cancelled at once; the running job still holds its thread
    assert pool.statistics() == {"threads": 1, "busy": 1, "waiting": 0}
    go_on.set()
    with trio.fail_after(10):
        while pool.statistics()["busy"]:
            await trio.sleep(0.001)  # bounded: the job returns once released
    assert seen == {"cancelled": True, "raised": True}
    assert not ran_waiting.is_set()
    pool.close()
    assert pool.join(10)


async def test_closed_pool_refuses_jobs() -> None:
    pool = WorkerPool(1)
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        await pool.run("k", int)


def test_results_come_in_rounds_with_one_flush_each() -> None:
    """``submit``'s ``flush``: called on the loop once per round of results
    after that round's callbacks (here every job of the round shares it),
    never for a round with none of its jobs."""

    async def main() -> None:
        pool = WorkerPool(4, 4)
        gate = threading.Event()
        log: list[Any] = []
        done = trio.Event()

        def callback(i: int, result: Any) -> None:
            log.append(result.unwrap())
            if sum(x != "flush" for x in log) == 4:
                done.set()

        def flush() -> None:
            log.append("flush")

        started = threading.Semaphore(0)

        def job(i: int) -> int:
            started.release()
            gate.wait(20)
            return i

        for i in range(4):
            pool.submit(
                "k", job, (i,), contextvars.copy_context(), lambda r, i=i: callback(i, r), flush
            )
        with trio.fail_after(10):
            for _ in range(4):  # every job runs, held at the gate
                while not started.acquire(timeout=0.01):
                    await trio.lowlevel.checkpoint()
        gate.set()
        with trio.fail_after(10):
            await done.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(x for x in log if x != "flush") == [0, 1, 2, 3]
        assert log[-1] == "flush"
        assert log[0] != "flush"
        assert "flush flush" not in " ".join(map(str, log))  # one per round
        # a job without a flush: its round calls none
        log.clear()
        assert await pool.run("k", lambda: 5) == 5
        assert log == []

    trio.run(main)
