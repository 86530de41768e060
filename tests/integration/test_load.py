"""Load and soak against ``sshrpc serve sshrpc.demo:services`` on loopback.

- 10,000 calls from 100 concurrent tasks, on one connection and spread over 20
  connections: every answer reaches its own caller exactly once (each call
  echoes a term unique to it).  Calls/s and latency percentiles are printed
  (``-s`` shows them) and written to ``$SSHRPC_LOAD_REPORT`` if set.
- A mixed soak (calls, casts, streams, cancels, spawns) on 4 connections with
  an invariant checker; ``SSHRPC_SOAK_SECONDS`` sets its length (default 8 s,
  the short form in the suite).  The long form:

      SSHRPC_SOAK_SECONDS=180 .venv/bin/python -m pytest tests/integration/test_load.py -k soak -s

Every loop is bounded in count and time.
"""

from __future__ import annotations

import json
import os
import random
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio
from _connect import connect as _connect

import sshrpc
from sshrpc import Atom
from sshrpc.client import Connection

SOAK_MIX = [
    (k, int(c))
    for k, c in (x.split(":") for x in os.environ.get("SSHRPC_SOAK_MIX", "").split(",") if x)
]
SOAK_SECONDS = float(os.environ.get("SSHRPC_SOAK_SECONDS", "8"))
pytestmark = pytest.mark.timeout(60 + 2 * SOAK_SECONDS)

CALLS = 10_000
TASKS = 100


def _proc(pid: int, what: str) -> int:
    if what == "fds":
        return len(os.listdir(f"/proc/{pid}/fd"))
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(what + ":"):
            return int(line.split()[1])
    raise KeyError(what)


def _report(name: str, figures: dict[str, Any]) -> None:
    print(f"\n{name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    path = os.environ.get("SSHRPC_LOAD_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **figures}) + "\n")


async def _drive(connections: list[Connection], name: str) -> None:
    """``TASKS`` tasks share ``connections`` round-robin and make ``CALLS``
    calls in all; check that each answer is its own call's term, once."""
    answers: Counter[tuple[int, int]] = Counter()
    wrong: list[Any] = []
    latencies: list[float] = []
    per_task = CALLS // TASKS

    async def task(t: int) -> None:
        conn = connections[t % len(connections)]
        for i in range(per_task):
            term = (t, i, b"payload-%d-%d" % (t, i))
            start = trio.current_time()
            got = await conn.call("echo", "echo", [term])
            latencies.append(trio.current_time() - start)
            if got != term:
                wrong.append((term, got))
            answers[(got[0], got[1])] += 1

    start = trio.current_time()
    with trio.fail_after(45):
        async with trio.open_nursery() as nursery:
            for t in range(TASKS):
                nursery.start_soon(task, t)
    elapsed = trio.current_time() - start
    assert wrong == []
    assert len(answers) == CALLS  # none lost (and none misrouted, above)
    assert set(answers.values()) == {1}  # none duplicated
    for conn in connections:
        stats = conn.statistics()
        assert stats.open_calls == 0 and stats.undelivered == 0, stats
    q = statistics.quantiles(latencies, n=100)
    _report(
        name,
        {
            "calls": CALLS,
            "tasks": TASKS,
            "connections": len(connections),
            "seconds": round(elapsed, 3),
            "calls_per_s": round(CALLS / elapsed),
            "p50_ms": round(q[49] * 1000, 2),
            "p99_ms": round(q[98] * 1000, 2),
            "max_ms": round(max(latencies) * 1000, 2),
        },
    )


async def test_10000_calls_from_100_tasks_on_one_connection(sshrpc_server: Any) -> None:
    async with _connect(sshrpc_server) as conn:
        await _drive([conn], "one_connection")


async def test_10000_calls_from_100_tasks_on_20_connections(sshrpc_server: Any) -> None:
    async with trio.open_nursery() as nursery:
        connections = []
        for _ in range(20):
            connections.append(
                await sshrpc.connect_node(
                    nursery,
                    sshrpc_server.host,
                    sshrpc_server.port,
                    sshrpc_server.user,
                    str(sshrpc_server.identity),
                    str(sshrpc_server.known_hosts),
                    agent=False,
                    use_ssh_config=False,
                )
            )
        try:
            await _drive(connections, "twenty_connections")
        finally:
            for conn in connections:
                await conn.aclose()


async def test_casts_in_flight_do_not_make_calls_overload(sshrpc_server: Any) -> None:
    """PROTOCOL.md section 3: ``max_calls`` bounds the *calls* open on a
    channel, and the client waits for a free slot rather than drawing
    ``overload``.  64 casts still running must not make a lone call overload."""
    async with _connect(sshrpc_server) as conn:
        limit = conn.hello["max_calls"]
        assert limit == 64
        for _ in range(limit):
            await conn.cast("slow", "work", [1])
        assert await conn.call("echo", "echo", [1]) == 1


async def test_leaving_a_finished_stream_early_does_not_stall_the_connection(
    sshrpc_server: Any,
) -> None:
    """Three streams of 6 items, each left after its first item once the
    other 5 and the final reply have arrived: nothing stays counted as
    undelivered and the connection keeps answering (max_undelivered=8)."""
    leaked: list[int] = []
    async with trio.open_nursery() as nursery:
        conn = await sshrpc.connect_node(
            nursery,
            sshrpc_server.host,
            sshrpc_server.port,
            sshrpc_server.user,
            str(sshrpc_server.identity),
            str(sshrpc_server.known_hosts),
            agent=False,
            use_ssh_config=False,
            max_undelivered=8,
        )
        stalled = True
        try:
            with trio.move_on_after(2):  # a stalled connection answers nothing
                for _ in range(3):
                    before = conn.statistics().undelivered
                    stream = conn.stream("feed", "tail", [6], credit=16)
                    assert await stream.__anext__() == 0
                    with trio.move_on_after(2):  # 5 chunks and the final reply arrive
                        while conn.statistics().undelivered < before + 6:
                            await trio.sleep(0.005)  # bounded polling of local state
                    await stream.aclose()  # type: ignore[attr-defined]
                    leaked.append(conn.statistics().undelivered)
                    assert await conn.call("echo", "echo", [1]) == 1
                stalled = False
        finally:
            # abandon the connection: aclose would wait on a pump that never reads
            nursery.cancel_scope.cancel()
    if stalled or any(leaked):
        raise trio.TooSlowError(f"undelivered after each early exit: {leaked}; stalled={stalled}")


# -- mixed soak ------------------------------------------------------------------------


class Invariants:
    """Counts what each worker did and every breach of an invariant."""

    def __init__(self) -> None:
        self.done: Counter[str] = Counter()
        self.breaches: list[str] = []

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.breaches.append(what)


async def _soak_worker(kind: str, conn: Connection, inv: Invariants, end: float, seed: int) -> None:
    rng = random.Random(seed)
    for n in range(1_000_000):
        if trio.current_time() >= end:
            return
        if kind == "call":
            term = (seed, n, rng.randbytes(rng.randrange(0, 2048)))
            got = await conn.call("echo", "echo", [term])
            inv.check(got == term, f"call {seed}/{n}: answer {got!r:.60}")
        elif kind == "cast":
            await conn.cast("log", "info", [(seed, n)])
            # A round trip after each cast keeps casts from piling up on the
            # node, where running casts count against max_calls (see
            # test_casts_in_flight_do_not_make_calls_overload).
            await conn.call("log", "last", [])
        elif kind == "stream":
            count = rng.randrange(0, 300)
            # Leaving early only while the server cannot have finished (credit
            # 1, three items short): leaving after the final reply arrived
            # leaks undelivered counts (test_leaving_a_finished_stream_early_...).
            stop_at = rng.choice([None, rng.randrange(1, count - 2)]) if count > 3 else None
            credit = 1 if stop_at is not None else rng.choice([1, 16, 1000])
            seen = []
            async for item in conn.stream("feed", "tail", [count], credit=credit):
                seen.append(item)
                if stop_at is not None and len(seen) >= stop_at:
                    break
            want = list(range(count if stop_at is None else min(stop_at, count)))
            inv.check(seen == want, f"stream {seed}/{n}: {len(seen)} items, wanted {len(want)}")
        elif kind == "cancel":
            limit = rng.uniform(0.001, 0.05)
            start = trio.current_time()
            with trio.move_on_after(limit) as scope:
                try:
                    await conn.call("slow", "work", [30])
                except sshrpc.RemoteTimeout:
                    # Known bug: the deadline travels truncated to whole ms, so
                    # the server may time out first (see test_netns_faults.py::
                    # test_deadline_travels_rounded_up).  Counted, not hidden.
                    inv.done["remote_timeout"] += 1
                    await trio.sleep_forever()  # the caller's deadline is near
            late = trio.current_time() - start - limit
            inv.check(scope.cancelled_caught, f"cancel {seed}/{n}: the call returned")
            inv.check(late < 0.5, f"cancel {seed}/{n}: Cancelled {late:.3f} s late")
            got = await conn.call("slow", "work", [0])  # a short one completes
            inv.check(got == Atom("done"), f"cancel {seed}/{n}: short work gave {got!r}")
        elif kind == "spawn":
            pid = await conn.spawn("worker", "loop", [])
            sent = [(seed, n, k) for k in range(rng.randrange(1, 10))]
            for message in sent:
                await conn.send(pid, message)
            await conn.send(pid, Atom("stop"))
            with trio.fail_after(10):
                got = [await conn.receive() for _ in range(len(sent) + 1)]
            inv.check(
                got[:-1] == [(Atom("echo"), m) for m in sent], f"spawn {seed}/{n}: {got!r:.80}"
            )
            inv.check(
                got[-1][0] == Atom("down") and got[-1][1] == pid, f"spawn {seed}/{n}: {got[-1]!r}"
            )
        inv.done[kind] += 1


async def test_mixed_soak_with_invariant_checker(sshrpc_server: Any) -> None:
    """Calls, casts, streams (some left early), cancels and spawns from 4 tasks
    of each kind per connection (one spawner per connection: it owns that
    mailbox) on 4 connections, for ``SSHRPC_SOAK_SECONDS``.  Invariants:
    every answer is its call's; streams are complete and in order; a cancelled
    call raises Cancelled within 0.5 s of its deadline; spawned processes echo
    every message in order and end with one ``down``; at the end no call is
    open on any connection, the node answers, and its memory and file
    descriptors are back near their baseline."""
    node_pid = sshrpc_server.pid
    assert node_pid is not None
    async with _connect(sshrpc_server) as probe:
        await probe.call("echo", "echo", [0])
        rss_before = _proc(node_pid, "VmRSS")
        fds_before = _proc(node_pid, "fds")
    inv = Invariants()
    start = trio.current_time()
    end = start + SOAK_SECONDS
    with trio.fail_after(SOAK_SECONDS + 30):
        async with trio.open_nursery() as nursery:
            connections = [
                await sshrpc.connect_node(
                    nursery,
                    sshrpc_server.host,
                    sshrpc_server.port,
                    sshrpc_server.user,
                    str(sshrpc_server.identity),
                    str(sshrpc_server.known_hosts),
                    agent=False,
                    use_ssh_config=False,
                )
                for _ in range(4)
            ]
            try:
                async with trio.open_nursery() as workers:
                    seed = 0
                    for conn in connections:
                        for kind, count in SOAK_MIX or (
                            ("call", 4),
                            ("cast", 1),
                            ("stream", 2),
                            ("cancel", 2),
                            ("spawn", 1),
                        ):
                            for _ in range(count):
                                seed += 1
                                workers.start_soon(_soak_worker, kind, conn, inv, end, seed)
                for conn in connections:
                    # a cancelled call's id is freed when its final answer arrives
                    with trio.move_on_after(5):
                        while conn.statistics().open_calls or conn.statistics().undelivered:
                            await trio.sleep(0.01)  # bounded polling of local state
                    stats = conn.statistics()
                    inv.check(stats.open_calls == 0, f"open calls left: {stats}")
                    inv.check(stats.undelivered == 0, f"undelivered left: {stats.undelivered}")
                    inv.check(stats.queued_bytes == 0, f"queued bytes left: {stats}")
                    inv.check(await conn.call("echo", "echo", [b"end"]) == b"end", "final call")
                # the last cast is seen by the node (casts ran, in order per channel)
                await connections[0].cast("log", "info", [b"last"])
                with trio.move_on_after(5):
                    while await connections[0].call("log", "last", []) != b"last":
                        await trio.sleep(0.01)  # bounded polling of remote state
                inv.check(
                    await connections[0].call("log", "last", []) == b"last", "last cast not seen"
                )
            finally:
                for conn in connections:
                    await conn.aclose()
    elapsed = trio.current_time() - start
    assert inv.breaches == [], inv.breaches[:10]
    assert all(inv.done[k] > 0 for k in ("call", "cast", "stream", "cancel", "spawn")), inv.done
    # The node lets go of the channels: fds back to baseline, memory near it.
    with trio.move_on_after(10):
        while _proc(node_pid, "fds") > fds_before:
            await trio.sleep(0.05)  # bounded polling of the node's fd table
    fds_after = _proc(node_pid, "fds")
    rss_after = _proc(node_pid, "VmRSS")
    assert fds_after <= fds_before, (fds_before, fds_after)
    assert rss_after - rss_before < 64 * 1024, (rss_before, rss_after)
    _report(
        "mixed_soak",
        {
            "seconds": round(elapsed, 1),
            **{k + "s": v for k, v in sorted(inv.done.items())},
            "node_rss_kib_before": rss_before,
            "node_rss_kib_after": rss_after,
            "node_fds_before": fds_before,
            "node_fds_after": fds_after,
        },
    )
