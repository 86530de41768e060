"""Client CPU per call of two client builds, A and B, against one server, in
alternating client processes: the paired comparison for changes to the
client, robust on a shared machine where whole-run medians swing.

    .venv/bin/python bench/client_pair.py --row req64 --pairs 8 \\
        --a-pythonpath /path/to/main/src          # A: another checkout's src
    .venv/bin/python bench/client_pair.py --row p64 --b-env SSHRPC_NO_C_REQUESTS=1

Starts ``sshrpc serve`` (bench/systems/sshrpc_service.py, relay mode, as
bench/call_cpu.py's ``sshrpc`` rows) once, then runs, ``--pairs`` times, one
client process per build (order alternating), each keeping ``--seconds`` of
calls after a short warm-up: ``req64`` (one task, ``send_requests_nowait`` /
``RequestSet.receive_responses`` keeping 64 open, as call_cpu.py's
``req64``), ``p64`` (64 tasks calling ``echo``) or ``seq`` (one task calling
``echo``).  Each client prints its own process CPU per call
(``time.process_time``) and calls/s; the medians per build are printed at
the end.  A build is the default environment plus ``--X-pythonpath`` (a
``src`` directory put first on ``PYTHONPATH``) and ``--X-env NAME=VALUE``.
The server is stopped by its PID at the end.  Every loop is bounded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.systems import registry

from sshrpc._statedir import temp_root

ROOT = Path(__file__).resolve().parents[1]

#: The client of one phase (argv: ROW PORT KEY KNOWN_HOSTS SECONDS).
CLIENT = r"""
import sys, time
sys.path.insert(0, sys.argv[6])
import trio
from bench.systems._common import ECHO_MODULE, ECHO_FUNCTION, MAX_FRAME, payload
from sshrpc import RequestSet
from sshrpc.client import connect_node

SMALL = payload(32)
row, port, key, kh = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
secs = float(sys.argv[5])


async def phase(conn, secs):
    end = time.perf_counter() + secs
    if row == "req64":
        reqs, args = RequestSet(), [[SMALL]] * 64
        sent = len(conn.send_requests_nowait(ECHO_MODULE, ECHO_FUNCTION, args, into=reqs))
        done = 0
        while done < sent:
            done += len(await reqs.receive_responses())
            if time.perf_counter() < end and sent - done < 64:
                got = conn.send_requests_nowait(
                    ECHO_MODULE, ECHO_FUNCTION, args[: 64 - (sent - done)], into=reqs
                )
                sent += len(got)
        return done
    count = [0]

    async def worker():
        while time.perf_counter() < end:
            await conn.call(ECHO_MODULE, ECHO_FUNCTION, [SMALL])
            count[0] += 1

    async with trio.open_nursery() as nursery:
        for _ in range(64 if row == "p64" else 1):
            nursery.start_soon(worker)
    return count[0]


async def main():
    async with trio.open_nursery() as nursery:
        conn = await connect_node(
            nursery, "127.0.0.1", port, "root", key, kh, agent=False,
            use_ssh_config=False, max_frame=MAX_FRAME, keepalive=None,
        )
        with trio.fail_after(secs + 60):
            await phase(conn, 0.3)
            t0, w0 = time.process_time(), time.perf_counter()
            n = await phase(conn, secs)
        print((time.process_time() - t0) / n * 1e6, n / (time.perf_counter() - w0))
        nursery.cancel_scope.cancel()


trio.run(main)
"""


def _env(pythonpath: str | None, pairs: list[str]) -> dict[str, str]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
    for pair in pairs:
        name, _, value = pair.partition("=")
        env[name] = value
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--row", choices=("req64", "p64", "seq"), default="req64")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=2.0)
    for x in ("a", "b"):
        parser.add_argument(f"--{x}-pythonpath", default=None)
        parser.add_argument(f"--{x}-env", action="append", default=[])
    opts = parser.parse_args()
    envs = {
        "A": _env(opts.a_pythonpath, opts.a_env),
        "B": _env(opts.b_pythonpath, opts.b_env),
    }
    state = Path(tempfile.mkdtemp(dir=temp_root()))
    ctx = registry.Context(state=state, logs=state)
    server = registry.start_sshrpc_relay(ctx)
    cpu: dict[str, list[float]] = {"A": [], "B": []}
    rate: dict[str, list[float]] = {"A": [], "B": []}
    started = time.perf_counter()
    try:
        for i in range(opts.pairs):
            for build in ("A", "B") if i % 2 else ("B", "A"):
                out = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        CLIENT,
                        opts.row,
                        str(server.port),
                        str(ctx.client_key),
                        str(server.info["known_hosts"]),
                        str(opts.seconds),
                        str(ROOT),
                    ],
                    env=envs[build],
                    capture_output=True,
                    text=True,
                    timeout=opts.seconds + 90,
                    check=True,
                )
                us, per_s = out.stdout.split()[-2:]
                cpu[build].append(float(us))
                rate[build].append(float(per_s))
                print(f"pair {i + 1}: {build} {float(us):.2f} µs/call, {float(per_s):.0f} calls/s")
    finally:
        server.stop()
    for build in ("A", "B"):
        print(
            f"{build}: client CPU {statistics.median(cpu[build]):.2f} µs/call (median of "
            f"{len(cpu[build])}), {statistics.median(rate[build]):.0f} calls/s"
        )
    print(f"({opts.row}; {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
