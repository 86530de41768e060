"""CPU per call on one connection: the client process and the whole server
side (sshd, relay, node), which stays readable on a machine too busy for
wall-clock medians.

    .venv/bin/python bench/call_cpu.py [--calls 3000] [--rounds 3] [--only seq|pipe64|bulk512K]

Starts ``sshrpc serve sshrpc.demo:services`` (as bench/client_latency.py does)
in its own session; the server side's CPU is the sum over every process of
that session (from /proc).  For each mode: ``--calls`` sequential
``echo:echo(1)`` calls, the same from 64 tasks at once, and ``--calls``/100
``echo:echo(<<512 KiB>>)`` round trips.  Prints, per mode, the medians over
``--rounds`` of wall time, client CPU and server CPU per call, in
microseconds.  Never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

import client_latency as cl
from sshrpc._statedir import temp_root
from sshrpc.client import open_connection

TICK = os.sysconf("SC_CLK_TCK")


def session_cpu(sid: int) -> float:
    """CPU seconds (user+system, with reaped children) of session ``sid``."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[3]) == sid:
            total += sum(int(x) for x in fields[11:15])
    return total / TICK


async def measure(
    port: int, known: Path, identity: Path, sid: int, args: argparse.Namespace
) -> dict[str, list[float]]:
    user = pwd.getpwuid(os.getuid()).pw_name
    out: dict[str, list[float]] = {}
    async with open_connection(
        "127.0.0.1", port, user=user, identity=str(identity), known_hosts=str(known),
        agent=False, use_ssh_config=False,
    ) as node:  # fmt: skip
        for _ in range(300):
            await node.call("echo", "echo", [1])
        blob = os.urandom(512 * 1024)
        n = args.calls

        async def seq() -> None:
            for _ in range(n):
                await node.call("echo", "echo", [1])

        async def pipe() -> None:
            async def worker() -> None:
                for _ in range(n // 64):
                    await node.call("echo", "echo", [1])

            async with trio.open_nursery() as nursery:
                for _ in range(64):
                    nursery.start_soon(worker)

        async def bulk() -> None:
            for _ in range(max(1, n // 100)):
                await node.call("echo", "echo", [blob])

        modes: list[tuple[str, Callable[[], Awaitable[None]], int]] = [
            ("seq", seq, n),
            ("pipe64", pipe, n // 64 * 64),
            ("bulk512K", bulk, max(1, n // 100)),
        ]
        for name, fn, count in modes:
            if args.only and name != args.only:
                continue
            rows = []
            for _ in range(args.rounds):
                c0, s0, w0 = time.process_time(), session_cpu(sid), time.perf_counter()
                await fn()
                wall = time.perf_counter() - w0
                rows.append(
                    (
                        wall / count * 1e6,
                        (time.process_time() - c0) / count * 1e6,
                        (session_cpu(sid) - s0) / count * 1e6,
                    )
                )
            out[name] = [round(statistics.median(col), 1) for col in zip(*rows, strict=True)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["seq", "pipe64", "bulk512K"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sshrpc-bench-", dir=temp_root()) as tmp:
        d = Path(tmp)
        identity = d / "id_ed25519"
        proc, port, known_line = cl.start_serve(d, cl.keygen(identity))
        known = d / "known_hosts"
        known.write_text(known_line + "\n")
        try:
            result = trio.run(measure, port, known, identity, proc.pid, args)
        finally:
            cl.stop(proc)
    print("per call, microseconds: [wall, client CPU, server CPU (sshd+relay+node)]")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
