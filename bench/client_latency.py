"""The Trio client's latency and throughput on one loopback SSH connection.

    .venv/bin/python bench/client_latency.py [--calls N] [--pipelined N] [--json]

Starts ``sshrpc serve sshrpc.demo:services`` (private OpenSSH sshd + the
Python node) on 127.0.0.1 with a fresh key pair and known_hosts in a temporary
directory, connects with ``sshrpc.open_connection`` (libssh2), and measures:

- sequential round trips: ``echo:echo(1)`` called N times in a row, and
  ``ping`` N times (the protocol's own round trip, no service code): median
  and p99 in microseconds;
- pipelined calls/s: N ``echo:echo(1)`` calls from C concurrent tasks on the
  one connection (C = 1, 8 and the server's ``max_calls``);
- bulk: ``echo:echo(<<512 KiB>>)`` round trips, in MB/s each way.

Prints the machine, Python and OpenSSH versions first.  Every process it
starts is stopped by pid.  Never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

import sshrpc
from sshrpc._sshd import free_port
from sshrpc._statedir import temp_root
from sshrpc.client import Connection, open_connection


def keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return Path(f"{path}.pub").read_text().strip()


def drain(proc: subprocess.Popen[str]) -> None:
    """Read what ``proc`` writes from now on, in a daemon thread: once it is
    ready, ``sshrpc serve`` writes an audit line per call, and a pipe nobody
    reads would fill and stall the node."""
    import threading

    stream = proc.stdout
    if stream is not None:
        threading.Thread(target=lambda: stream.read(), daemon=True).start()


def start_serve(d: Path, client_pub: str) -> tuple[subprocess.Popen[str], int, str]:
    keys = d / "authorized_keys"
    keys.write_text(client_pub + "\n")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sshrpc.cli", "serve", "sshrpc.demo:services",
         "--port", str(port), "--state-dir", str(d / "state"), "--authorized-keys", str(keys)],
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
            drain(proc)
            return proc, port, known
    stop(proc)
    raise RuntimeError("sshrpc serve did not start")


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def summary(samples_us: list[float]) -> dict[str, float]:
    s = sorted(samples_us)
    return {
        "median_us": statistics.median(s),
        "p99_us": s[min(len(s) - 1, int(len(s) * 0.99))],
        "n": len(s),
    }


async def sequential(node: Connection, calls: int) -> dict[str, Any]:
    for _ in range(min(200, calls)):
        await node.call("echo", "echo", [1])
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        await node.call("echo", "echo", [1])
        samples.append((time.perf_counter_ns() - t0) / 1000)
    pings = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        await node.ping()
        pings.append((time.perf_counter_ns() - t0) / 1000)
    return {"call": summary(samples), "ping": summary(pings)}


async def pipelined(node: Connection, calls: int, tasks: int) -> float:
    per_task = calls // tasks

    async def worker() -> None:
        for _ in range(per_task):
            await node.call("echo", "echo", [1])

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(worker)
    return per_task * tasks / (time.perf_counter() - t0)


async def bulk(node: Connection, rounds: int) -> float:
    blob = os.urandom(512 * 1024)
    t0 = time.perf_counter()
    for _ in range(rounds):
        assert await node.call("echo", "echo", [blob]) == blob
    return 2 * len(blob) * rounds / (time.perf_counter() - t0) / 1e6


async def run(port: int, user: str, identity: Path, known: Path, args: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    async with open_connection(
        "127.0.0.1",
        port,
        user=user,
        identity=str(identity),
        known_hosts=str(known),
        agent=False,
        use_ssh_config=False,
    ) as node:
        connect_ms = (time.perf_counter() - t0) * 1000
        result: dict[str, Any] = {"connect_ms": connect_ms}
        result.update(await sequential(node, args.calls))
        max_calls = int(node.hello.get("max_calls") or 64)
        result["pipelined_calls_per_s"] = {
            str(c): await pipelined(node, args.pipelined, c) for c in (1, 8, max_calls)
        }
        result["bulk_512KiB_MB_per_s"] = await bulk(node, args.bulk)
        result["statistics"] = {k: v for k, v in vars(node.statistics()).items() if k != "server"}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--pipelined", type=int, default=20000)
    parser.add_argument("--bulk", type=int, default=40)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import pwd

    user = pwd.getpwuid(os.getuid()).pw_name
    ssh_version = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    with tempfile.TemporaryDirectory(prefix="sshrpc-bench-", dir=temp_root()) as tmp:
        d = Path(tmp)
        identity = d / "id_ed25519"
        proc, port, known_line = start_serve(d, keygen(identity))
        known = d / "known_hosts"
        known.write_text(known_line + "\n")
        try:
            result = trio.run(run, port, user, identity, known, args)
        finally:
            stop(proc)
    result["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "openssh": ssh_version,
        "sshrpc": sshrpc.__version__,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    m = result["machine"]
    print(f"# {m['platform']}, {m['cpus']} CPUs, Python {m['python']}, {m['openssh']}")
    print(f"connect (TCP+SSH+auth+hello): {result['connect_ms']:.1f} ms")
    print(f"{'sequential':<28}{'median us':>12}{'p99 us':>12}{'n':>8}")
    for name in ("call", "ping"):
        r = result[name]
        print(f"{name:<28}{r['median_us']:>12.1f}{r['p99_us']:>12.1f}{r['n']:>8}")
    print(f"{'pipelined (tasks)':<28}{'calls/s':>12}")
    for tasks, rate in result["pipelined_calls_per_s"].items():
        print(f"{tasks:<28}{rate:>12.0f}")
    print(f"bulk 512 KiB echo: {result['bulk_512KiB_MB_per_s']:.1f} MB/s (both directions)")


if __name__ == "__main__":
    main()
