"""Client CPU and libssh2 calls per call, for the client's call paths.

    .venv/bin/python bench/client_cpu.py [--calls 4000] [--rounds 5] [--only MODE ...]

Starts ``sshrpc serve sshrpc.demo:services --max-calls 2048`` in its own
session, connects once and runs, per round, each mode on ``echo:echo(1)``:

- ``seq``: ``--calls`` sequential ``call``s from one task;
- ``tasks64``: the same number of calls from 64 tasks at once;
- ``req64`` / ``req1024``: one task keeping 64 / 1,024 requests open with
  ``send_request`` into a ``RequestSet`` and ``RequestSet.receive_response``
  (skipped when the client has no request API);
- ``req64_batch`` / ``req1024_batch``: the same, refilled per batch of
  answers with ``check_response`` and ``send_request_nowait`` (one
  checkpoint per batch).

Client CPU is this process's, from ``/proc/self/task/*/schedstat`` (every
thread; the on-CPU nanoseconds).  libssh2 calls are counted by a proxy around
the pump's channel and session (every method call).  Prints, per mode, the
medians over ``--rounds`` of wall, client CPU (microseconds per call) and
libssh2 calls per call.  Never part of the test suite.
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
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

import client_latency as cl
import sshrpc
from sshrpc import _pump
from sshrpc._statedir import temp_root
from sshrpc.client import Connection, open_connection

ECHO = ("echo", "echo")


def cpu_ns() -> int:
    """On-CPU nanoseconds of every thread of this process."""
    total = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total


class Counting:
    """Forwards every attribute; counts the calls of callable ones."""

    count = 0

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def counted(*args: Any) -> Any:
            Counting.count += 1
            return attr(*args)

        return counted


def install_counter() -> None:
    original = _pump.Pump.attach_channel

    def attach(self: _pump.Pump, channel: Any) -> None:
        self.session = Counting(self.session)  # type: ignore[assignment]
        original(self, Counting(channel))

    _pump.Pump.attach_channel = attach  # type: ignore[method-assign]


def start_serve(d: Path, client_pub: str, max_calls: int) -> tuple[Any, int, str]:
    """bench/client_latency.py's start_serve with ``--max-calls``."""
    import subprocess

    keys = d / "authorized_keys"
    keys.write_text(client_pub + "\n")
    port = cl.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sshrpc.cli", "serve", "sshrpc.demo:services",
         "--port", str(port), "--state-dir", str(d / "state"), "--authorized-keys", str(keys),
         *(["--max-calls", str(max_calls)] if max_calls else [])],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    known = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("known_hosts: "):
            known = line.removeprefix("known_hosts: ").strip()
        if line.startswith("ready") and known:
            cl.drain(proc)
            return proc, port, known
    cl.stop(proc)
    raise RuntimeError("sshrpc serve did not start")


def modes(node: Connection, n: int) -> list[tuple[str, Callable[[], Awaitable[None]], int]]:
    async def seq() -> None:
        for _ in range(n):
            await node.call(*ECHO, [1])

    async def tasks64() -> None:
        async def worker() -> None:
            for _ in range(n // 64):
                await node.call(*ECHO, [1])

        async with trio.open_nursery() as nursery:
            for _ in range(64):
                nursery.start_soon(worker)

    def window(depth: int) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            reqs = sshrpc.RequestSet()  # type: ignore[attr-defined]
            sent = 0
            while sent < min(depth, n):
                await node.send_request(*ECHO, [1], into=reqs, label=sent)  # type: ignore[attr-defined]
                sent += 1
            while len(reqs):
                await reqs.receive_response()
                if sent < n:
                    await node.send_request(*ECHO, [1], into=reqs, label=sent)  # type: ignore[attr-defined]
                    sent += 1

        return run

    def batched(depth: int) -> Callable[[], Awaitable[None]]:
        """One checkpoint per batch: check_response and send_request_nowait."""

        async def run() -> None:
            reqs = sshrpc.RequestSet()  # type: ignore[attr-defined]
            send = node.send_request_nowait  # type: ignore[attr-defined]
            sent = 0
            while sent < min(depth, n):
                send(*ECHO, [1], into=reqs, label=sent)
                sent += 1
            while len(reqs):
                await reqs.receive_response()
                got = 1
                while True:
                    try:
                        reqs.check_response()
                    except trio.WouldBlock:
                        break
                    got += 1
                for _ in range(min(got, n - sent)):
                    send(*ECHO, [1], into=reqs, label=sent)
                    sent += 1

        return run

    out = [("seq", seq, n), ("tasks64", tasks64, n // 64 * 64)]
    if hasattr(node, "send_request"):
        out += [("req64", window(64), n), ("req1024", window(1024), n)]
    if hasattr(node, "send_request_nowait"):
        out += [("req64_batch", batched(64), n), ("req1024_batch", batched(1024), n)]
    return out


async def measure(port: int, known: Path, identity: Path, args: argparse.Namespace) -> Any:
    user = pwd.getpwuid(os.getuid()).pw_name
    rows: dict[str, list[tuple[float, float, float]]] = {}
    async with open_connection(
        "127.0.0.1", port, user=user, identity=str(identity), known_hosts=str(known),
        agent=False, use_ssh_config=False, keepalive=None,
    ) as node:  # fmt: skip
        for _ in range(300):
            await node.call(*ECHO, [1])
        for _ in range(args.rounds):
            for name, fn, count in modes(node, args.calls):
                if args.only and name not in args.only:
                    continue
                calls0, c0, w0 = Counting.count, cpu_ns(), time.perf_counter()
                await fn()
                wall = time.perf_counter() - w0
                rows.setdefault(name, []).append(
                    (
                        wall / count * 1e6,
                        (cpu_ns() - c0) / count / 1e3,
                        (Counting.count - calls0) / count,
                    )
                )
    return {
        name: {
            "wall_us": round(statistics.median(r[0] for r in rs), 2),
            "client_cpu_us": round(statistics.median(r[1] for r in rs), 2),
            "libssh2_calls": round(statistics.median(r[2] for r in rs), 2),
            "calls_per_s": round(1e6 / statistics.median(r[0] for r in rs)),
        }
        for name, rs in rows.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--no-count", action="store_true", help="no libssh2 call counting")
    parser.add_argument(
        "--max-calls", type=int, default=2048, help="the server's (0: its default, not passed)"
    )
    args = parser.parse_args()
    if not args.no_count:
        install_counter()
    with tempfile.TemporaryDirectory(prefix="sshrpc-bench-", dir=temp_root()) as tmp:
        d = Path(tmp)
        identity = d / "id_ed25519"
        proc, port, known_line = start_serve(d, cl.keygen(identity), args.max_calls)
        known = d / "known_hosts"
        known.write_text(known_line + "\n")
        try:
            result = trio.run(measure, port, known, identity, args)
        finally:
            cl.stop(proc)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
