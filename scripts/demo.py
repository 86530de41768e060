"""The main job on the embedded default, end to end, with visible results.

Starts two nodes with ``sshrpc serve sshrpc.demo:services``, each behind its
own private OpenSSH sshd on 127.0.0.1 (fresh client key, known_hosts and
state in a temporary directory), calls them over SSH with the Trio client,
prints every result and the per-call latency, and stops both by PID.

Run it with ``scripts/demo`` (which sets up first).
"""

from __future__ import annotations

import os
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
from sshrpc._literal import format_term
from sshrpc._statedir import temp_root


def show(label: str, value: Any, started: float | None = None) -> None:
    took = f"  ({(time.perf_counter() - started) * 1e3:.2f} ms)" if started else ""
    if isinstance(value, BaseException):
        text = f"{type(value).__name__}: {value}"
    elif isinstance(value, str) and not isinstance(value, sshrpc.Atom):
        text = value
    else:
        text = format_term(value)
    print(f"  {label:<44} -> {text}{took}")


def start_node(base: Path, name: str, keys: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    """``sshrpc serve`` on a free port; wait (bounded) for its ready line."""
    port = _free_port()
    log_path = base / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sshrpc.cli", "serve", "sshrpc.demo:services",
             "--port", str(port), "--state-dir", str(base / name),
             "--authorized-keys", str(keys)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        text = log_path.read_text(errors="replace")
        if any(line.startswith("ready") for line in text.splitlines()):
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise SystemExit(f"demo: sshrpc serve did not start:\n{text}")
        time.sleep(0.02)  # polling a child's log, bounded by the deadline
    known = next(
        line.removeprefix("known_hosts: ")
        for line in text.splitlines()
        if line.startswith("known_hosts: ")
    )
    print(f"[{name}] sshrpc serve (pid {proc.pid}) said:")
    for line in text.splitlines():
        print(f"    {line}")
    return proc, port, known


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def tour(ports: list[int], identity: Path, known_hosts: Path) -> None:
    options: dict[str, Any] = {"identity": str(identity), "known_hosts": str(known_hosts)}
    user = os.environ.get("USER") or "root"
    t = time.perf_counter()
    async with sshrpc.open_connection(f"{user}@127.0.0.1", port=ports[0], **options) as node:
        print(f"\nconnected to node A over SSH in {(time.perf_counter() - t) * 1e3:.1f} ms")
        t = time.perf_counter()
        show("call lists:reverse([1,2,3])", await node.call("lists", "reverse", [[1, 2, 3]]), t)
        value = {sshrpc.Atom("ok"): (1.5, b"bin", 2**80), "key": [sshrpc.Atom("a")]}
        t = time.perf_counter()
        show("call echo:echo(#{ok => {...}, ...})", await node.call("echo", "echo", [value]), t)
        try:
            await node.call("errors", "raise", [sshrpc.Atom("throw"), sshrpc.Atom("oops")])
        except sshrpc.RemoteError as exc:
            show("call errors:raise(throw, oops)", exc)
        try:
            await node.call("os", "cmd", ["rm -rf /"])
        except sshrpc.RemoteError as exc:
            show("call os:cmd(...)  (not exported)", exc)
        t = time.perf_counter()
        with trio.move_on_after(0.3):
            await node.call("slow", "work", [30])
        show("call slow:work(30) in move_on_after(0.3)", "abandoned by the caller", t)
        # The cancel reaches the node: wait (bounded) until it reports it.
        with trio.fail_after(5):
            while (status := await node.call("slow", "status", [])) != "cancelled":
                await trio.sleep(0.01)
        show("  ... the node's slow:status()", status)
        items = [item async for item in node.stream("feed", "tail", [5])]
        show("stream feed:tail(5)", items)
        await node.cast("log", "info", [b"hello from the demo"])
        show("cast log:info(...), then log:last()", await node.call("log", "last", []))
        pid = await node.spawn("worker", "loop", [])
        await node.send(pid, ("job", 1))
        show(f"spawn worker:loop() = {format_term(pid)}; send", await node.receive())
        await node.send(pid, sshrpc.Atom("stop"))
        show("ping round trip", f"{await node.ping() * 1e3:.2f} ms")

        latencies = []
        for i in range(300):
            t = time.perf_counter()
            await node.call("echo", "echo", [i])
            latencies.append(time.perf_counter() - t)
        latencies.sort()
        print(
            f"\n300 sequential calls: median {statistics.median(latencies) * 1e6:.0f} us, "
            f"p99 {latencies[int(len(latencies) * 0.99)] * 1e6:.0f} us"
        )
        n = 2000
        t = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(_pipeline, node, range(i, n, 64))
        took = time.perf_counter() - t
        print(f"{n} calls, 64 in flight on one channel: {n / took:,.0f} calls/s")

    t = time.perf_counter()
    nodes = [f"{user}@127.0.0.1:{port}" for port in ports] + [f"{user}@127.0.0.1:1"]
    results = await sshrpc.multicall(nodes, "os", "getpid", [], **options)
    took = (time.perf_counter() - t) * 1e3
    print(f"\nmulticall os:getpid() to A, B and a dead port ({took:.0f} ms):")
    for where, result in zip(["A", "B", "dead"], results, strict=True):
        show(f"  node {where}", result)


async def _pipeline(node: sshrpc.client.Connection, ids: range) -> None:
    for i in ids:
        assert await node.call("echo", "echo", [i]) == i


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="sshrpc-demo-", dir=temp_root()) as tmp:
        base = Path(tmp)
        identity = base / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "demo", "-f", str(identity)],
            check=True,
        )
        keys = base / "authorized_keys"
        keys.write_text(Path(f"{identity}.pub").read_text())
        procs = []
        try:
            ports, lines = [], []
            for name in ("node-a", "node-b"):
                proc, port, known = start_node(base, name, keys)
                procs.append(proc)
                ports.append(port)
                lines.append(known)
            known_hosts = base / "known_hosts"
            known_hosts.write_text("\n".join(lines) + "\n")
            trio.run(tour, ports, identity, known_hosts)
        finally:
            for proc in procs:
                stop(proc)
            print(f"\nstopped both nodes and their sshd (pids {[p.pid for p in procs]})")


if __name__ == "__main__":
    main()
