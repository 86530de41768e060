"""What ProxyJump costs: connect time and call latency direct vs through a jump host.

    .venv/bin/python bench/ssh_proxy.py [--connects N] [--calls N]

Starts ``sshrpc serve sshrpc.demo:services`` and a private jump sshd (TCP
forwarding allowed) on 127.0.0.1, writes an ssh config with a ``direct`` and
a ``jump`` host (``ProxyJump``, run as ``ssh -W``), and for each measures N
connects (wall and this process's CPU time, medians) and N sequential
``echo:echo(1)`` calls on one connection (median and p99).  Every process it
starts is stopped by pid.  Never part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from client_latency import keygen, start_serve, stop
from sshrpc._sshd import PrivateSSHD
from sshrpc.client import open_connection


async def measure(name: str, config: Path, connects: int, calls: int) -> None:
    wall, cpu = [], []
    for _ in range(connects):
        w0, c0 = time.perf_counter(), time.process_time()
        async with open_connection(name, ssh_config=str(config), agent=False) as node:
            await node.call("echo", "echo", [1])
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    async with open_connection(name, ssh_config=str(config), agent=False) as node:
        for _ in range(100):
            await node.call("echo", "echo", [1])
        samples = []
        for _ in range(calls):
            t0 = time.perf_counter_ns()
            await node.call("echo", "echo", [1])
            samples.append((time.perf_counter_ns() - t0) / 1000)
    samples.sort()
    print(
        f"{name:7s} connect+call+close: median {statistics.median(wall) * 1000:.0f} ms wall, "
        f"{statistics.median(cpu) * 1000:.0f} ms CPU (this process); "
        f"sequential call: median {statistics.median(samples):.0f} us, "
        f"p99 {samples[int(len(samples) * 0.99)]:.0f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connects", type=int, default=10)
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        pub = keygen(d / "id")
        serve, port, known_line = start_serve(d, pub)
        (d / "known_hosts").write_text(known_line + "\n")
        (d / "jump_keys").write_text(pub + "\n")
        jump = PrivateSSHD(
            d / "jump",
            authorized_keys=d / "jump_keys",
            subsystems={},
            extra_config=["Match all", "    AllowTcpForwarding yes"],
        )
        jump.start()
        try:
            with open(d / "known_hosts", "a") as f:
                f.write(jump.known_hosts_line + "\n")
            common = (
                f"    User {os.environ.get('USER') or 'root'}\n    IdentityFile {d / 'id'}\n"
                f"    IdentitiesOnly yes\n    UserKnownHostsFile {d / 'known_hosts'}\n"
                "    GlobalKnownHostsFile /dev/null\n    BatchMode yes\n"
            )
            config = d / "ssh_config"
            config.write_text(
                f"Host direct\n    HostName 127.0.0.1\n    Port {port}\n{common}"
                f"Host jump\n    HostName 127.0.0.1\n    Port {port}\n    ProxyJump hop\n{common}"
                f"Host hop\n    HostName 127.0.0.1\n    Port {jump.port}\n{common}"
            )
            for name in ("direct", "jump"):
                trio.run(measure, name, config, args.connects, args.calls)
        finally:
            jump.stop()
            stop(serve)


if __name__ == "__main__":
    main()
