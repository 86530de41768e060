"""CPU per call of the node, by kind of exported function: async, inline sync
and thread-pool sync, sequential and 64 in flight, on one connection.

    .venv/bin/python bench/node_cpu.py [--calls 3000] [--rounds 5] [--only MODE]

Starts ``sshrpc serve node_cpu:services`` (this file's services) as a child
and reads CPU time from ``/proc/<pid>/task/*/schedstat`` (nanosecond run
time of every thread): the node (the ``serve`` process), the rest of the
server side (sshd and the relay), and the client (this process).  Prints,
per mode, the medians over ``--rounds`` of wall time and CPU per call in
microseconds.  Never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sshrpc.service import Service  # noqa: E402

svc = Service("nc")


@svc.export
async def async_echo(value: Any) -> Any:
    """On the node's loop."""
    return value


def _inline_echo(value: Any) -> Any:
    return value


try:  # inline=True is the new keyword; fall back to a thread on older trees
    svc.export(name="inline_echo", inline=True)(_inline_echo)  # type: ignore[call-overload]
except TypeError:
    svc.export(name="inline_echo")(_inline_echo)


@svc.export
def thread_echo(value: Any) -> Any:
    """In a worker thread."""
    return value


services = [svc]


def _cpu_ns(pid: int) -> int:
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            continue
    return total


def _descendants(root: int) -> list[int]:
    """Every live process under ``root`` (sshd's per-connection children
    start sessions of their own, so this follows parent pids)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        parents[int(entry)] = int(stat[stat.rfind(")") + 2 :].split()[1])
    found: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        children = [p for p, parent in parents.items() if parent == pid]
        found.extend(children)
        todo.extend(children)
    return found


def _sample(sid: int) -> tuple[int, int, int]:
    """(node ns, other server-side ns, client ns)."""
    node = _cpu_ns(sid)
    rest = sum(_cpu_ns(p) for p in _descendants(sid))
    return node, rest, _cpu_ns(os.getpid())


async def measure(
    port: int, known: Path, identity: Path, sid: int, args: argparse.Namespace
) -> dict[str, Any]:
    import trio

    from sshrpc.client import open_connection

    user = pwd.getpwuid(os.getuid()).pw_name
    out: dict[str, Any] = {}
    async with open_connection(
        "127.0.0.1", port, user=user, identity=str(identity), known_hosts=str(known),
        agent=False, use_ssh_config=False,
    ) as node:  # fmt: skip
        for fn in ("async_echo", "inline_echo", "thread_echo"):
            for _ in range(200):
                await node.call("nc", fn, [1])
        n = args.calls

        def seq(fn: str) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                for _ in range(n):
                    await node.call("nc", fn, [1])

            return run

        def pipe(fn: str) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                async def worker() -> None:
                    for _ in range(n // 64):
                        await node.call("nc", fn, [1])

                async with trio.open_nursery() as nursery:
                    for _ in range(64):
                        nursery.start_soon(worker)

            return run

        modes: list[tuple[str, Callable[[], Awaitable[None]], int]] = []
        for fn in ("async_echo", "inline_echo", "thread_echo"):
            kind = fn.removesuffix("_echo")
            modes.append((f"seq_{kind}", seq(fn), n))
            modes.append((f"pipe64_{kind}", pipe(fn), n // 64 * 64))
        rows: dict[str, list[tuple[float, ...]]] = {name: [] for name, _, _ in modes}
        # Interleave rounds so that the machine's load affects every mode alike.
        for _ in range(args.rounds):
            for name, fn_run, count in modes:
                if args.only and name != args.only:
                    continue
                n0, r0, c0 = _sample(sid)
                w0 = time.perf_counter()
                await fn_run()
                wall = time.perf_counter() - w0
                n1, r1, c1 = _sample(sid)
                rows[name].append(
                    (
                        wall / count * 1e6,
                        (c1 - c0) / count / 1e3,
                        (n1 - n0) / count / 1e3,
                        (r1 - r0) / count / 1e3,
                    )
                )
        for name, samples in rows.items():
            if samples:
                med = [round(statistics.median(col), 1) for col in zip(*samples, strict=True)]
                out[name] = dict(zip(("wall", "client", "node", "sshd+relay"), med, strict=True))
                out[name]["total_cpu"] = round(sum(med[1:]), 1)
    return out


def main() -> None:
    import trio

    sys.path.insert(0, str(HERE))
    import client_latency as cl

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only")
    parser.add_argument(
        "--serve-args",
        default="",
        help="more arguments for sshrpc serve, e.g. '--worker-threads 4'",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sshrpc-nodecpu-") as tmp:
        d = Path(tmp)
        identity = d / "id_ed25519"
        keys = d / "authorized_keys"
        keys.write_text(cl.keygen(identity) + "\n")
        port = cl.free_port()
        extra = args.serve_args.split()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), *sys.path[1:]]))
        proc = subprocess.Popen(
            [sys.executable, "-m", "sshrpc.cli", "serve", "node_cpu:services",
             "--port", str(port), "--state-dir", str(d / "state"), "--authorized-keys", str(keys),
             *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True, env=env,
        )  # fmt: skip
        assert proc.stdout is not None
        known_line = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("known_hosts: "):
                known_line = line.removeprefix("known_hosts: ").strip()
            if line.startswith("ready") and known_line:
                cl.drain(proc)
                break
        else:
            cl.stop(proc)
            raise RuntimeError("sshrpc serve did not start")
        known = d / "known_hosts"
        known.write_text(f"{known_line}\n")
        try:
            result = trio.run(measure, port, known, identity, proc.pid, args)
        finally:
            cl.stop(proc)
    print("per call, microseconds (medians): wall, CPU of client, node, sshd+relay, total")
    for name, row in result.items():
        print(f"{name:20s} {json.dumps(row)}")


if __name__ == "__main__":
    main()
