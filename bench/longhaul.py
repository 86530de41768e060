"""Calls and bulk transfers over emulated long-haul links.  Not part of the
test suite.

    .venv/bin/python bench/longhaul.py [--rounds 3] [--rtts 0,10,50,150] [--rate 25e6]

Starts ``sshrpc serve bench.systems.sshrpc_service:svc`` (``--max-calls
1100``, 32 MiB frames) and, per round trip time, an emulated link in its own
process (``python -m sshrpc._link``: every byte held RTT/2 each way, each
direction paced to ``--rate`` bytes/s; this kernel has no netem).  Through
each link, on one connection whose receive window is sized to the
bandwidth-delay product (``window=``):

- sequential ``echo`` calls: median latency;
- pipelined ``echo`` calls with 64 and 1,024 open (one task keeping them open
  with ``send_request``/``RequestSet`` where the client has it, else that
  many caller tasks): calls/s, against Little's law, open / RTT;
- bulk: 16 MiB towards the node (``size``) and towards the client
  (``blob``): MB/s, against min(link rate, window / RTT), where the window
  towards the node is sshd's fixed 2 MiB and towards the client ours.

Prints a Markdown table of medians over ``--rounds`` with each figure's
ratio to its bound (the targets: calls/s >= 0.8x of min(the 0 ms figure,
open / RTT); bulk >= 0.8x of its bound), and writes ``longhaul.md``,
``longhaul.json`` and ``longhaul.png`` into ``bench/results/``.  Every loop is
bounded in count and time; every process is stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
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
from sshrpc._statedir import temp_root

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
SERVICE = "sshrpc_bench"
#: sshd's channel window (OpenSSH's CHAN_SES_WINDOW_DEFAULT, not configurable).
SSHD_WINDOW = 2 * 1024 * 1024
BULK = 16 * 1024 * 1024
OPEN_COUNTS = (64, 1024)


def _wait_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> list[str]:
    """Lines of ``proc``'s stdout up to the one starting with ``prefix``."""
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"process exited before {prefix!r}: {lines}")
        lines.append(line.rstrip("\n"))
        if line.startswith(prefix):
            return lines
    raise RuntimeError(f"no {prefix!r} within {timeout} s: {lines}")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Server:
    """``sshrpc serve`` on a free port with a throwaway client key."""

    def __init__(self, tmp: Path) -> None:
        from sshrpc._sshd import free_port

        self.identity = tmp / "id"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.identity)],
            check=True,
            stdin=subprocess.DEVNULL,
        )
        self.port = free_port()
        # Its log goes to a file: a pipe nobody reads after "ready" would
        # fill with audit lines and stall the node.
        log_path = tmp / "serve.log"
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "sshrpc.cli", "serve",
                    "bench.systems.sshrpc_service:svc",
                    "--port", str(self.port), "--state-dir", str(tmp / "state"),
                    "--authorized-keys", f"{self.identity}.pub",
                    "--max-calls", "1100", "--max-frame", str(32 * 1024 * 1024),
                ],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            lines = log_path.read_text().splitlines()
            if any(line.startswith("ready") for line in lines):
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshrpc serve did not start: {lines}")
            time.sleep(0.05)  # bounded polling of the child's log
        known = next(line for line in lines if line.startswith("known_hosts: "))
        self.host_key = known.removeprefix("known_hosts: ").split(" ", 1)[1]
        self.tmp = tmp

    def known_hosts_for(self, port: int) -> Path:
        path = self.tmp / f"known_hosts-{port}"
        path.write_text(f"[127.0.0.1]:{port} {self.host_key}\n")
        return path


class LinkProcess:
    def __init__(self, port: int, rtt: float, rate: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sshrpc._link", "--to", f"127.0.0.1:{port}",
             "--rtt", str(rtt), "--rate", str(rate)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        self.port = int(_wait_line(self.proc, "listening", 30)[-1].split()[2])


async def _pipelined(node: Any, open_: int, seconds: float) -> float:
    """Calls/s with ``open_`` requests kept open for ``seconds`` (after a
    warm-up of the same length, at most 2 s)."""
    done = 0
    counting = False

    if hasattr(node, "send_request") and hasattr(sshrpc, "RequestSet"):
        reqs = sshrpc.RequestSet()

        async def keep_open(until: float) -> None:
            nonlocal done
            while len(reqs) < open_:
                await node.send_request(SERVICE, "echo", [b"x" * 32], into=reqs, label=0)
            while trio.current_time() < until:
                await reqs.receive_response()
                if counting:
                    done += 1
                await node.send_request(SERVICE, "echo", [b"x" * 32], into=reqs, label=0)
            while len(reqs):
                await reqs.receive_response()

        start = trio.current_time()
        warm = min(seconds, 2.0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_open, start + warm + seconds)
            await trio.sleep(warm)
            counting = True
            t0 = trio.current_time()
            await trio.sleep(seconds)
            counting = False
            elapsed = trio.current_time() - t0
        return done / elapsed

    async def caller(until: float) -> None:
        nonlocal done
        while trio.current_time() < until:
            await node.call(SERVICE, "echo", [b"x" * 32])
            if counting:
                done += 1

    start = trio.current_time()
    warm = min(seconds, 2.0)
    async with trio.open_nursery() as nursery:
        for _ in range(open_):
            nursery.start_soon(caller, start + warm + seconds)
        await trio.sleep(warm)
        counting = True
        t0 = trio.current_time()
        await trio.sleep(seconds)
        counting = False
        elapsed = trio.current_time() - t0
    return done / elapsed


async def measure(server: Server, rtt: float, rate: float) -> dict[str, float]:
    link = LinkProcess(server.port, rtt, rate)
    try:
        window = max(SSHD_WINDOW, int(2 * rate * rtt))
        async with sshrpc.open_connection(
            f"{pwd.getpwuid(os.getuid()).pw_name}@127.0.0.1:{link.port}",
            identity=str(server.identity),
            known_hosts=str(server.known_hosts_for(link.port)),
            agent=False,
            use_ssh_config=False,
            max_frame=32 * 1024 * 1024,
            window=window,
        ) as node:
            out: dict[str, float] = {"window": window}
            times = []
            deadline = trio.current_time() + 3.0
            while len(times) < 200 and (len(times) < 5 or trio.current_time() < deadline):
                t = trio.current_time()
                await node.call(SERVICE, "echo", [b"x" * 32])
                times.append(trio.current_time() - t)
            out["seq_ms"] = statistics.median(times) * 1000
            seconds = max(2.0, 10 * rtt)
            for open_ in OPEN_COUNTS:
                out[f"calls_{open_}"] = await _pipelined(node, open_, seconds)
            payload = bytes(BULK)
            t = trio.current_time()
            assert await node.call(SERVICE, "size", [payload]) == BULK
            out["up_MBps"] = BULK / (trio.current_time() - t) / 1e6
            t = trio.current_time()
            assert len(await node.call(SERVICE, "blob", [BULK])) == BULK
            out["down_MBps"] = BULK / (trio.current_time() - t) / 1e6
            return out
    finally:
        _stop(link.proc)


def _ratio(value: float, bound: float) -> str:
    return f"{value / bound:.2f}x" if bound else "-"


def table(results: dict[float, dict[str, float]], rate: float) -> str:
    zero = results.get(0.0)
    rows = [
        f"Link rate {rate / 1e6:g} MB/s each way; medians over rounds.  Bounds: calls/s "
        "min(the 0 ms figure, open / RTT); bulk min(rate, window / RTT) with window "
        f"{SSHD_WINDOW >> 20} MiB (sshd's) towards the node and ours towards the client.",
        "",
        "| RTT ms | seq ms | calls/s @64 | vs bound | calls/s @1024 | vs bound "
        "| MB/s to node | vs bound | MB/s to client | vs bound |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rtt, r in sorted(results.items()):
        cells = [f"{rtt * 1000:g}", f"{r['seq_ms']:.2f}"]
        for open_ in OPEN_COUNTS:
            bound = zero[f"calls_{open_}"] if zero else r[f"calls_{open_}"]
            if rtt:
                bound = min(bound, open_ / rtt)
            cells += [f"{r[f'calls_{open_}']:,.0f}", _ratio(r[f"calls_{open_}"], bound)]
        for key, window in (("up_MBps", SSHD_WINDOW), ("down_MBps", r["window"])):
            bound = rate / 1e6 if not rtt else min(rate, window / rtt) / 1e6
            cells += [f"{r[key]:.1f}", _ratio(r[key], bound)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def plot(results: dict[float, dict[str, float]], rate: float, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rtts = sorted(results)
    xs = [r * 1000 for r in rtts]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for open_ in OPEN_COUNTS:
        a.plot(xs, [results[r][f"calls_{open_}"] for r in rtts], "o-", label=f"{open_} open")
        bound = [min(results[rtts[0]][f"calls_{open_}"], open_ / r) if r else None for r in rtts]
        a.plot(
            [x for x, v in zip(xs, bound, strict=True) if v],
            [v for v in bound if v],
            "--",
            alpha=0.5,
            label=f"bound, {open_} open",
        )
    a.set_xlabel("RTT (ms)")
    a.set_ylabel("calls/s")
    a.set_yscale("log")
    a.set_title("pipelined echo")
    a.legend(fontsize=8)
    b.plot(xs, [results[r]["up_MBps"] for r in rtts], "o-", label="to node (sshd window 2 MiB)")
    b.plot(xs, [results[r]["down_MBps"] for r in rtts], "s-", label="to client (window = BDP)")
    b.axhline(rate / 1e6, linestyle="--", alpha=0.5, label="link rate")
    b.set_xlabel("RTT (ms)")
    b.set_ylabel("MB/s")
    b.set_title("16 MiB one way")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rtts", default="0,10,50,150", help="milliseconds, comma separated")
    parser.add_argument("--rate", type=float, default=25e6, help="bytes/s each way")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rtts = [float(x) / 1000 for x in args.rtts.split(",")]
    samples: dict[float, list[dict[str, float]]] = {r: [] for r in rtts}
    with tempfile.TemporaryDirectory(prefix="sshrpc-longhaul-", dir=temp_root()) as tmp:
        server = Server(Path(tmp))
        try:
            for round_ in range(args.rounds):
                order = rtts[round_ % len(rtts) :] + rtts[: round_ % len(rtts)]
                for rtt in order:
                    samples[rtt].append(trio.run(measure, server, rtt, args.rate))
                    print(f"round {round_ + 1}, {rtt * 1000:g} ms: {samples[rtt][-1]}", flush=True)
        finally:
            _stop(server.proc)
    results = {
        rtt: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
        for rtt, runs in samples.items()
    }
    text = table(results, args.rate)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "longhaul.md").write_text(text)
    (args.out / "longhaul.json").write_text(
        json.dumps({"rate": args.rate, "results": results, "samples": samples}, indent=1)
    )
    if plot(results, args.rate, args.out / "longhaul.png"):
        print(f"plot: {args.out / 'longhaul.png'}")


if __name__ == "__main__":
    main()
