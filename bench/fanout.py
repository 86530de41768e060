"""Fan-out to many nodes: ``multicall`` and ``Pool`` against N private sshd's.

    .venv/bin/python bench/fanout.py                      # 100 nodes, 3 rounds, 2-4 minutes
    .venv/bin/python bench/fanout.py --nodes 20 --rounds 1
    .venv/bin/python bench/fanout.py --json               # JSON on stdout, not the table

The "hosts": N ``PrivateSSHD``s on ports of 127.0.0.1 (``sshrpc._fleet``,
each with its own host key), all relaying to ONE node process (``sshrpc node
sshrpc.demo:services``, a subprocess, so its memory is measured apart from
the client's).  The client is this process.

Measured:

- **time to connect to and call N nodes** (``echo:echo(1)`` on each, a new
  connection per node, closed after its call): ``multicall`` with
  ``max_connects=1`` (connects one after the other) and with a bound of 8,
  32 (the default) and N; the median wall time of ``--rounds`` rounds,
  with the client's CPU time and the sshd's (the listeners' reaped
  per-connection children: ``cutime + cstime``) per node;
- **memory per open connection** on the client: this process's RSS with N
  connections open in a ``Pool`` minus RSS before (after one warm-up
  connection opened and closed), divided by N;
- **memory per channel** on the node: the node process's RSS delta / N;
  and the sshd side: the processes each connection adds below its sshd
  (privileged monitor, unprivileged child, relay), their RSS and PSS
  (``/proc/PID/smaps_rollup``: shared pages divided among sharers) per
  connection.

Every run is bounded (``trio.fail_after``); every process started is stopped
by its PID (the node by SIGTERM then SIGKILL, the sshd's and their children
by ``Fleet.stop``).  The temporary directories are removed.  Never part of
the test suite.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import trio

import sshrpc
from sshrpc._fleet import Fleet
from sshrpc._sshd import _descendants
from sshrpc._statedir import temp_root

#: Bound on one round (connect and call N nodes) and on node start-up.
ROUND_LIMIT = 300.0
START_LIMIT = 30.0
TICKS = os.sysconf("SC_CLK_TCK")


def keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return Path(f"{path}.pub").read_text().strip()


def rss_kib(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def child_cpu_s(pids: list[int]) -> float:
    """Reaped children's CPU (cutime + cstime) of ``pids``, in seconds."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        total += int(fields[13]) + int(fields[14])  # cutime, cstime
    return total / TICKS


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def start_node(socket_path: Path, authorized_keys: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sshrpc.cli", "node", "sshrpc.demo:services",
         "--socket", str(socket_path), "--authorized-keys", str(authorized_keys)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + START_LIMIT
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("ready"):
            threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()  # type: ignore[union-attr]
            return proc
    stop_node(proc)
    raise RuntimeError("sshrpc node did not start")


def stop_node(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def connect_and_call(
    fleet: Fleet, options: dict[str, Any], max_connects: int
) -> dict[str, float]:
    """One round: ``echo:echo(1)`` on every node, a new connection each."""
    nodes = fleet.destinations
    cpu0, sshd0 = own_cpu_s(), child_cpu_s(fleet.pids)
    t0 = time.perf_counter()
    with trio.fail_after(ROUND_LIMIT):
        results = await sshrpc.multicall(
            nodes, "echo", "echo", [1], max_connects=max_connects, **options
        )
    wall = time.perf_counter() - t0
    failed = [r for r in results if r != 1]
    if failed:
        raise RuntimeError(f"{len(failed)} nodes failed, e.g. {failed[0]!r}")
    # The sshd's reap their connection processes after the client has gone.
    with trio.move_on_after(5):
        while any(_descendants(pid) for pid in fleet.pids):
            await trio.sleep(0.05)
    n = len(nodes)
    return {
        "wall_s": wall,
        "client_cpu_ms_per_node": (own_cpu_s() - cpu0) * 1000 / n,
        "sshd_cpu_ms_per_node": (child_cpu_s(fleet.pids) - sshd0) * 1000 / n,
    }


async def memory(fleet: Fleet, options: dict[str, Any], node_pid: int) -> dict[str, Any]:
    """RSS with every node connected through one ``Pool``, minus before."""
    n = len(fleet.sshds)
    async with sshrpc.Pool(**options) as warm:  # imports, libssh2 init, codec
        assert await warm.call(fleet.destinations[0], "echo", "echo", [1]) == 1
    gc.collect()
    client0, node0 = rss_kib(), rss_kib(node_pid)
    async with sshrpc.Pool(**options) as pool:
        with trio.fail_after(ROUND_LIMIT):
            results = await pool.multicall(fleet.destinations, "echo", "echo", [1])
        assert results == [1] * n, results
        gc.collect()
        client1, node1 = rss_kib(), rss_kib(node_pid)
        per_sshd = [_descendants(pid) for pid in fleet.pids]
        procs = [pid for group in per_sshd for pid in group]
        names: dict[str, int] = {}
        for pid in procs:
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
            names[name] = names.get(name, 0) + 1
        sshd_rss = sum(rss_kib(pid) for pid in procs)
        sshd_pss = sum(pss_kib(pid) for pid in procs)
    return {
        "connections": n,
        "client_rss_kib_per_connection": (client1 - client0) / n,
        "node_rss_kib_per_channel": (node1 - node0) / n,
        "sshd_processes_per_connection": len(procs) / n,
        "sshd_process_names": names,
        "sshd_rss_kib_per_connection": sshd_rss / n,
        "sshd_pss_kib_per_connection": sshd_pss / n,
        "client_rss_kib": {"before": client0, "open": client1},
        "node_rss_kib": {"before": node0, "open": node1},
    }


async def bench(fleet: Fleet, options: dict[str, Any], node_pid: int, args: Any) -> dict[str, Any]:
    n = len(fleet.sshds)
    # Memory first, while the heap holds only the warm-up: after the rounds
    # below it holds freed memory that new connections would reuse unseen.
    mem = await memory(fleet, options, node_pid)
    bounds = sorted({1, 8, 32, n} if args.bounds is None else set(args.bounds))
    runs: dict[int, list[dict[str, float]]] = {b: [] for b in bounds}
    for round_ in range(args.rounds):
        # Rotate the order each round, so drift on a shared machine hits all alike.
        order = bounds[round_ % len(bounds) :] + bounds[: round_ % len(bounds)]
        for bound in order:
            runs[bound].append(await connect_and_call(fleet, options, bound))
    table = {
        b: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        | {"walls": [r["wall_s"] for r in rs]}
        for b, rs in runs.items()
    }
    return {"nodes": n, "connect_and_call": table, "memory": mem}


def report(result: dict[str, Any]) -> str:
    n = result["nodes"]
    lines = [
        f"{n} nodes, one `echo:echo(1)` each, a new connection per node "
        "(median of the rounds; CPU per node):",
        "",
        "| max_connects | wall time | client CPU / node | sshd CPU / node |",
        "|---|---|---|---|",
    ]
    for bound, row in sorted(result["connect_and_call"].items()):
        lines.append(
            f"| {bound}{' (sequential connects)' if bound == 1 else ''} | {row['wall_s']:.2f} s "
            f"| {row['client_cpu_ms_per_node']:.1f} ms | {row['sshd_cpu_ms_per_node']:.1f} ms |"
        )
    m = result["memory"]
    names = ", ".join(f"{k} x{v / n:g}" for k, v in sorted(m["sshd_process_names"].items()))
    lines += [
        "",
        f"Memory with {n} connections open (one `Pool`):",
        "",
        "| where | per connection |",
        "|---|---|",
        f"| client (this process), RSS delta / {n} "
        f"| {m['client_rss_kib_per_connection']:.0f} KiB |",
        f"| node process, RSS delta / {n} channels | {m['node_rss_kib_per_channel']:.0f} KiB |",
        f"| sshd side: {m['sshd_processes_per_connection']:g} processes ({names}), RSS "
        f"| {m['sshd_rss_kib_per_connection']:.0f} KiB |",
        f"| sshd side, PSS (shared pages divided) | {m['sshd_pss_kib_per_connection']:.0f} KiB |",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bounds", type=int, nargs="*", default=None, metavar="MAX_CONNECTS")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.nodes <= 1000 or not 1 <= args.rounds <= 20:
        parser.error("--nodes 1..1000, --rounds 1..20")
    tmp = Path(tempfile.mkdtemp(prefix="fanout-", dir=temp_root()))
    sockets = Path(tempfile.mkdtemp(prefix="sshrpc-sock-"))
    node: subprocess.Popen[str] | None = None
    fleet: Fleet | None = None
    try:
        identity = tmp / "id_ed25519"
        public = keygen(identity)
        socket_path = sockets / "node.sock"
        t0 = time.perf_counter()
        fleet = Fleet(
            tmp / "fleet", args.nodes, socket_path=socket_path, client_public_keys=[public]
        )
        node = start_node(socket_path, fleet.authorized_keys)
        fleet.start()
        started = time.perf_counter() - t0
        known_hosts = tmp / "known_hosts"
        known_hosts.write_text(fleet.known_hosts_text)
        options = {
            "identity": str(identity),
            "known_hosts": str(known_hosts),
            "agent": False,
            "use_ssh_config": False,
        }
        ssh_version = subprocess.run(
            ["ssh", "-V"], capture_output=True, text=True, check=False
        ).stderr.strip()
        header = (
            f"# {platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"{ssh_version}; {args.nodes} sshd's + node started in {started:.1f} s"
        )
        result = trio.run(bench, fleet, options, node.pid, args)
        result["machine"] = header
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(header)
            print(report(result))
    finally:
        if fleet is not None:
            fleet.stop()
        if node is not None:
            stop_node(node)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(sockets, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
