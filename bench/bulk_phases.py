"""16 MiB one way and both ways through ``sshrpc serve``, with CPU per side.

    .venv/bin/python bench/bulk_phases.py [--reps 6]

Starts ``sshrpc serve`` (bench/systems/registry.py, stopped by its PID at the
end) and, on one kept connection, times ``sshrpc_bench:size(Binary)`` (16 MiB
to the node), ``sshrpc_bench:blob(N)`` (16 MiB to the client) and
``sshrpc_bench:echo(Binary)`` (both, one after the other, as an RPC must),
after one warm-up echo.  Prints the median MB/s (10^6 bytes of payload per
second) and CPU ms per transfer of the client (this process) and the server
tree (serve, sshd, relay).  Compare with the sshd floor's and ``ssh -s
cat``'s bulk rows in bench/run.py.  Never part of the test suite; every loop
is bounded by ``--reps``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.systems import registry
from bench.systems._common import MAX_FRAME, tree_cpu_s

from sshrpc._statedir import temp_root
from sshrpc.client import connect_node

SIZE = 16 << 20


async def measure(
    label: str, fn: Callable[[], Awaitable[Any]], reps: int, server_pids: list[int]
) -> None:
    walls = []
    c0, s0 = time.process_time(), tree_cpu_s(server_pids)
    for _ in range(reps):
        t0 = time.perf_counter()
        await fn()
        walls.append(time.perf_counter() - t0)
    c1, s1 = time.process_time(), tree_cpu_s(server_pids)
    wall = statistics.median(walls)
    print(
        f"| {label} | {SIZE / wall / 1e6:.1f} | {wall * 1000:.0f} |"
        f" {(c1 - c0) / reps * 1000:.0f} | {(s1 - s0) / reps * 1000:.0f} |"
    )


async def run(reps: int, ctx: registry.Context, server: registry.ServerHandle) -> None:
    async with trio.open_nursery() as nursery:
        conn = await connect_node(
            nursery,
            "127.0.0.1",
            server.port,
            "root",
            str(ctx.client_key),
            str(server.info["known_hosts"]),
            agent=False,
            use_ssh_config=False,
            max_frame=MAX_FRAME,
            keepalive=None,
        )
        value = os.urandom(SIZE)
        with trio.fail_after(60):
            await conn.call("sshrpc_bench", "echo", [value])
        print("| 16 MiB | MB/s | wall ms | client CPU ms | server CPU ms |")
        print("|---|---:|---:|---:|---:|")
        with trio.fail_after(60 + 10 * reps):
            await measure(
                "to the node", lambda: conn.call("sshrpc_bench", "size", [value]), reps, server.pids
            )
            await measure(
                "to the client",
                lambda: conn.call("sshrpc_bench", "blob", [SIZE]),
                reps,
                server.pids,
            )
            await measure(
                "echo", lambda: conn.call("sshrpc_bench", "echo", [value]), reps, server.pids
            )
        await conn.aclose()
        nursery.cancel_scope.cancel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=6)
    args = ap.parse_args()
    ctx = registry.Context(
        state=Path(tempfile.mkdtemp(dir=temp_root())), logs=Path(tempfile.mkdtemp(dir=temp_root()))
    )
    server = registry.start_sshrpc_relay(ctx)
    try:
        trio.run(run, args.reps, ctx, server)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
