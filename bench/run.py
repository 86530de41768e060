"""The benchmark suite in one command: every system side by side with the anchors.

    .venv/bin/python bench/run.py [--quick] [--out bench/results] [--only NAME,...]

Starts every system itself on free loopback ports (and stops each by its PID),
runs the same work on each, interleaved round by round so machine drift hits
them all alike, and prints medians, p99s and ratios measured in this run
against the anchors: the modernized seed (Erlang client -> Erlang daemon), the
plain-TCP Trio floor, and OpenSSH's ``ssh -s`` through ``cat`` (the cipher
floor).  Writes results.md, results.json and PNG plots into the output folder.

A system whose pieces are missing (not built yet, a tool not installed) stays
in the table as "not available: <reason>".  Each client runs in its own
process (a *driver*, protocol in bench/systems/_common.py), so its CPU and
memory are measured apart from the harness.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.systems import registry
from bench.systems._common import (
    ROOT,
    Driver,
    DriverError,
    DriverTimeout,
    tree_cpu_s,
    tree_rss_bytes,
)

MiB = 1024 * 1024


@dataclass(frozen=True)
class Plan:
    rounds: int
    lat_n: int
    lat_s: float
    pipe_n: int
    pipe_s: float
    bulk_reps: int
    bulk_s: float
    cat_big: int
    setup_n: int
    setup_s: float
    chan_n: int
    chan_s: float
    depths: tuple[int, ...]
    sweep_pipe_n: int
    sweep_pipe_s: float
    sizes: tuple[int, ...]
    sweep_bulk_s: float
    hang_s: float


QUICK = Plan(
    rounds=2,
    lat_n=300,
    lat_s=0.6,
    pipe_n=5000,
    pipe_s=0.6,
    bulk_reps=1,
    bulk_s=3.0,
    cat_big=64 * MiB,
    setup_n=3,
    setup_s=1.5,
    chan_n=3,
    chan_s=1.0,
    depths=(1, 8, 64, 256),
    sweep_pipe_n=3000,
    sweep_pipe_s=0.4,
    sizes=(1024, 64 * 1024, 1 * MiB, 16 * MiB),
    sweep_bulk_s=1.5,
    hang_s=15.0,
)
FULL = Plan(
    rounds=4,
    lat_n=2000,
    lat_s=1.5,
    pipe_n=40000,
    pipe_s=1.5,
    bulk_reps=3,
    bulk_s=4.0,
    cat_big=256 * MiB,
    setup_n=8,
    setup_s=2.5,
    chan_n=8,
    chan_s=1.5,
    depths=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    sweep_pipe_n=20000,
    sweep_pipe_s=0.8,
    sizes=(1024, 4096, 16384, 65536, 256 * 1024, MiB, 4 * MiB, 16 * MiB, 64 * MiB),
    sweep_bulk_s=3.0,
    hang_s=30.0,
)
LAT_SIZE = 32
BULK = 16 * MiB
PIPE_DEPTH = 64


@dataclass
class Result:
    """Everything measured for one system in this run."""

    name: str
    group: str
    note: str = ""
    unavailable: str | None = None
    connect_s: float | None = None
    lat_ns: list[float] = field(default_factory=list)
    pipe_rates: list[float] = field(default_factory=list)
    bulk_mbs: list[float] = field(default_factory=list)
    cat_big_mbs: list[float] = field(default_factory=list)
    setup_ns: list[float] = field(default_factory=list)
    chan_ns: list[float] = field(default_factory=list)
    cpu_seq_us: list[float] = field(default_factory=list)
    cpu_pipe_us: list[float] = field(default_factory=list)
    cpu_pipe_client_us: list[float] = field(default_factory=list)
    rss_client: list[int] = field(default_factory=list)
    rss_server: list[int] = field(default_factory=list)
    depth_sweep: dict[int, float] = field(default_factory=dict)
    size_sweep: dict[int, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    # ---- summaries (None when not measured)
    def med(self, values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    @property
    def seq_med_us(self) -> float | None:
        m = self.med(self.lat_ns)
        return None if m is None else m / 1e3

    @property
    def seq_p99_us(self) -> float | None:
        if len(self.lat_ns) < 2:
            return None
        ordered = sorted(self.lat_ns)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] / 1e3

    @property
    def pipe(self) -> float | None:
        return self.med(self.pipe_rates)

    @property
    def bulk(self) -> float | None:
        return self.med(self.bulk_mbs)

    @property
    def setup_ms(self) -> float | None:
        m = self.med(self.setup_ns)
        return None if m is None else m / 1e6

    @property
    def chan_ms(self) -> float | None:
        m = self.med(self.chan_ns)
        return None if m is None else m / 1e6


# --------------------------------------------------------------------------
# running


class Live:
    """A system while it runs: its driver and the PIDs of its server."""

    def __init__(self, spec: registry.SystemSpec, result: Result) -> None:
        self.spec = spec
        self.result = result
        self.driver: Driver | None = None
        self.server_pids: list[int] = []
        self.unsupported: set[str] = set()
        self.failures: dict[str, int] = {}

    @property
    def ok(self) -> bool:
        return self.driver is not None and self.result.unavailable is None and not self.dead

    dead = False

    def die(self, why: str) -> None:
        """Stop using this system for the rest of the run; what it measured stays."""
        self.dead = True
        self.result.errors["stopped"] = why[:300]
        if self.driver is not None:
            self.driver.close()

    def request(self, op: str, line: str, timeout_s: float) -> list[float] | None:
        if not self.ok or op in self.unsupported:
            return None
        assert self.driver is not None
        try:
            return self.driver.request(line, timeout_s)
        except DriverTimeout as exc:
            self.die(f"hung during {op} ({line}): {exc}")
            return None
        except DriverError as exc:
            text = str(exc)
            if "unsupported" in text:
                self.unsupported.add(op)
            else:
                # a deterministic failure is not retried in later rounds, a stall is
                # (up to 3 times); the kept channel may be gone: open it again
                self.failures[op] = self.failures.get(op, 0) + 1
                prior = self.result.errors.get(op)
                self.result.errors[op] = (
                    text[:300] if prior is None else f"{prior} [failed {self.failures[op]}x]"
                )
                if "stuck" not in text or self.failures[op] >= 3:
                    self.unsupported.add(op)
                if self.driver.proc.poll() is not None:
                    self.die(f"driver died during {op}: {text[:200]}")
                else:
                    try:
                        self.driver.request("connect", 60)
                    except DriverError as again:
                        self.die(f"reconnect after {op} failed: {again}")
            return None

    def cpu(self) -> tuple[float, float]:
        if self.driver is None:
            return 0.0, 0.0
        assert self.driver is not None
        return tree_cpu_s([self.driver.proc.pid]), tree_cpu_s(self.server_pids)


_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def run_round(live: Live, plan: Plan) -> None:
    r = live.result
    slack = plan.hang_s
    # sequential latency, with CPU per call
    c0, s0 = live.cpu()
    got = live.request(
        "latency", f"latency {plan.lat_n} {plan.lat_s} {LAT_SIZE}", plan.lat_s + slack
    )
    if got:
        c1, s1 = live.cpu()
        r.lat_ns += got
        r.cpu_seq_us.append((c1 - c0 + s1 - s0) / len(got) * 1e6)
    # pipelined, 64 in flight
    c0, s0 = live.cpu()
    got = live.request(
        "pipe", f"pipe {PIPE_DEPTH} {plan.pipe_n} {plan.pipe_s}", plan.pipe_s + slack
    )
    if got and got[0] > 0:
        c1, s1 = live.cpu()
        calls, ns = got
        r.pipe_rates.append(calls / (ns / 1e9))
        r.cpu_pipe_us.append((c1 - c0 + s1 - s0) / calls * 1e6)
        r.cpu_pipe_client_us.append((c1 - c0) / calls * 1e6)
    if live.ok and live.driver is not None:
        r.rss_client.append(tree_rss_bytes([live.driver.proc.pid]))
        r.rss_server.append(tree_rss_bytes(live.server_pids))
    # bulk echo
    got = live.request("bulk", f"bulk {BULK} {plan.bulk_reps} {plan.bulk_s}", plan.bulk_s + slack)
    if got:
        r.bulk_mbs += [BULK / (ns / 1e9) / 1e6 for ns in got]
    if live.spec.cipher_floor:
        got = live.request("bulk", f"bulk {plan.cat_big} 1 {plan.bulk_s}", plan.bulk_s + slack)
        if got:
            r.cat_big_mbs += [plan.cat_big / (ns / 1e9) / 1e6 for ns in got]
    # set-up to first answer, and a new channel per call
    got = live.request("setup", f"setup {plan.setup_n} {plan.setup_s}", plan.setup_s + slack)
    if got:
        r.setup_ns += got
    got = live.request("chan", f"chan {plan.chan_n} {plan.chan_s}", plan.chan_s + slack)
    if got:
        r.chan_ns += got


def run_all(plan: Plan, out: Path, only: set[str] | None) -> tuple[list[Result], dict[str, Any]]:
    state = Path(tempfile.mkdtemp(prefix="sshrpc-bench-"))
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ctx = registry.Context(state=state, logs=logs)
    specs = [s for s in registry.systems() if only is None or s.name in only]
    lives = [Live(s, Result(s.name, s.group, s.note)) for s in specs]
    started: dict[str, registry.ServerHandle | str] = {}
    meta: dict[str, Any] = {}
    try:
        # ---- start servers and drivers
        for live in lives:
            spec = live.spec
            keys = []
            for choices in spec.servers:
                # "a|b": the first of these servers that starts
                for key in choices.split("|"):
                    if key not in started:
                        log(f"starting server {key}")
                        try:
                            started[key] = registry.SERVERS[key](ctx)
                        except registry.Unavailable as exc:
                            started[key] = str(exc)
                        except Exception as exc:
                            started[key] = f"{type(exc).__name__}: {exc}"
                    if not isinstance(started[key], str):
                        break
                keys.append(key)
            handles = [started[k] for k in keys]
            missing = [h for h in handles if isinstance(h, str)]
            if missing:
                live.result.unavailable = str(missing[0])
                continue
            try:
                argv = spec.client(ctx, *handles)
            except registry.Unavailable as exc:
                live.result.unavailable = str(exc)
                continue
            live.server_pids = [pid for h in handles if not isinstance(h, str) for pid in h.pids]
            if spec.note_from_server:
                live.result.note = spec.note_from_server(*handles)
            log(f"connecting {spec.name}")
            live.driver = Driver(argv, logs / f"{spec.slug}.log")
            try:
                live.result.connect_s = live.driver.request("connect", 60)[0]
            except DriverError as exc:
                live.result.unavailable = f"connect failed: {exc}"[:300]
                live.driver.close()
                live.driver = None
        # ---- interleaved rounds
        running = [lv for lv in lives if lv.ok]
        t0 = time.monotonic()
        for rnd in range(plan.rounds):
            order = running[rnd % len(running) :] + running[: rnd % len(running)] if running else []
            for live in order:
                log(f"round {rnd + 1}/{plan.rounds}: {live.spec.name}")
                run_round(live, plan)
        meta["rounds_s"] = time.monotonic() - t0
        # ---- sweeps, interleaved point by point
        t0 = time.monotonic()
        for depth in plan.depths:
            for live in running:
                if live.spec.cipher_floor:
                    continue
                got = live.request(
                    "pipe",
                    f"pipe {depth} {plan.sweep_pipe_n} {plan.sweep_pipe_s}",
                    plan.sweep_pipe_s + plan.hang_s,
                )
                if got and got[0] > 0:
                    live.result.depth_sweep[depth] = got[0] / (got[1] / 1e9)
            log(f"depth sweep {depth} done")
        too_slow: set[str] = set()
        for size in plan.sizes:
            reps = 3 if size <= MiB else 1
            for live in running:
                if live.spec.name in too_slow:
                    continue
                got = live.request(
                    "bulk", f"bulk {size} {reps} {plan.sweep_bulk_s}", 120 + plan.hang_s
                )
                if got:
                    live.result.size_sweep[size] = statistics.median(
                        size / (ns / 1e9) / 1e6 for ns in got
                    )
                    # the next size is 4x larger: skip it when it would take > ~20 s
                    if max(got) / 1e9 * 4 * (plan.sizes[-1] // size > 1) > 20:
                        too_slow.add(live.spec.name)
                        live.result.errors["bulk sweep"] = (
                            f"stopped after {registry.human_size(size)}: one echo took"
                            f" {max(got) / 1e9:.1f} s"
                        )
            log(f"size sweep {size} done")
        meta["sweeps_s"] = time.monotonic() - t0
    finally:
        for live in lives:
            if live.driver is not None:
                live.driver.close()
        for handle in started.values():
            if not isinstance(handle, str):
                with contextlib.suppress(Exception):
                    handle.stop()
        shutil.rmtree(state, ignore_errors=True)
    return [lv.result for lv in lives], meta


# --------------------------------------------------------------------------
# versions


def _cmd(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    return (p.stdout + p.stderr).strip().splitlines()[0] if (p.stdout + p.stderr).strip() else "?"


def versions() -> dict[str, str]:
    from importlib import metadata

    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    pkgs = {}
    for name in ("trio", "ssh2-python", "asyncssh", "paramiko", "erlpack", "msgpack", "cffi"):
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pkgs[name] = "not installed"
    commit = _cmd(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "src", "erlang"],
        capture_output=True,
        text=True,
    ).stdout.count("\n")
    if dirty:
        commit += f" + {dirty} uncommitted changed files in src/ and erlang/"
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu},"
        f" Linux {platform.release()}",
        "python": platform.python_version(),
        "otp": _cmd(
            [
                "erl",
                "-noshell",
                "-eval",
                'io:format("~s (erts ~s)~n", [erlang:system_info(otp_release), '
                "erlang:system_info(version)]), halt().",
            ]
        ),
        "openssh": _cmd(["ssh", "-V"]),
        "packages": ", ".join(f"{k} {v}" for k, v in pkgs.items()),
        "sshrpc": f"commit {commit}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


# --------------------------------------------------------------------------
# reporting


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def anchors(results: list[Result]) -> dict[str, Result | None]:
    by_role: dict[str, Result | None] = {"seed": None, "tcp": None, "cat": None}
    for r in results:
        role = registry.ANCHOR_ROLES.get(r.name)
        if role and r.unavailable is None:
            by_role[role] = r
    return by_role


def cat_floor_mbs(cat: Result | None) -> float | None:
    if cat is None:
        return None
    return cat.med(cat.cat_big_mbs) or cat.bulk


def render(results: list[Result], meta: dict[str, Any], vers: dict[str, str], quick: bool) -> str:
    a = anchors(results)
    seed, tcp, cat = a["seed"], a["tcp"], a["cat"]
    cat_mbs = cat_floor_mbs(cat)
    lines: list[str] = []
    add = lines.append
    add(f"# sshrpc benchmark ({'quick' if quick else 'full'} run, {vers['date']})")
    add("")
    for k in ("machine", "python", "otp", "openssh", "packages", "sshrpc"):
        add(f"- {k}: {vers[k]}")
    add(
        f"- rounds took {meta.get('rounds_s', 0):.0f} s, sweeps {meta.get('sweeps_s', 0):.0f} s;"
        " medians over all rounds; the machine is shared, so quote medians"
    )
    add("")
    add(
        "| system | seq median µs | seq p99 µs | calls/s @64 | MB/s 16 MiB | set-up ms |"
        " new chan ms | CPU µs/call seq | CPU µs/call @64 | client RSS MiB | server RSS MiB |"
    )
    add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if r.unavailable:
            add(f"| {r.name} | not available: {r.unavailable} |||||||||||")
            continue
        add(
            f"| {r.name} | {fmt(r.seq_med_us)} | {fmt(r.seq_p99_us)} | {fmt(r.pipe)} |"
            f" {fmt(r.bulk, '.1f')} | {fmt(r.setup_ms, '.1f')} | {fmt(r.chan_ms, '.1f')} |"
            f" {fmt(r.med(r.cpu_seq_us))} | {fmt(r.med(r.cpu_pipe_us), '.1f')} |"
            f" {fmt(_mib(r.rss_client), '.1f')} | {fmt(_mib(r.rss_server), '.1f')} |"
        )
    add("")
    if cat is not None and cat.cat_big_mbs:
        add(
            f"Cipher floor: `ssh -s` through `cat`, {fmt(cat_mbs, '.0f')} MB/s streaming"
            f" {registry.human_size(int(meta.get('cat_big', 0)))} (MB = 10^6 bytes of payload"
            " echoed per second)."
        )
        add("")
    add("## Ratios in this run")
    add("")
    add(
        "| system | seq / seed | seq / TCP floor | calls/s / TCP floor | calls/s / seed |"
        " MB/s / cat floor | MB/s / seed | set-up - ssh -s (ms) |"
    )
    add("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if r.unavailable:
            continue
        setup_delta = (
            "-"
            if r.setup_ms is None or cat is None or cat.setup_ms is None
            else f"{r.setup_ms - cat.setup_ms:+.1f}"
        )
        add(
            f"| {r.name} | {ratio(r.seq_med_us, seed and seed.seq_med_us)} |"
            f" {ratio(r.seq_med_us, tcp and tcp.seq_med_us)} | {ratio(r.pipe, tcp and tcp.pipe)} |"
            f" {ratio(r.pipe, seed and seed.pipe)} | {ratio(r.bulk, cat_mbs)} |"
            f" {ratio(r.bulk, seed and seed.bulk)} | {setup_delta} |"
        )
    add("")
    add("## Issue 6 targets (sshrpc systems)")
    add("")
    add("| system | target | measured | met |")
    add("|---|---|---:|---|")
    for r in results:
        if r.group != "sshrpc" or r.unavailable:
            continue
        for text, value, limit, higher in targets(r, seed, tcp, cat, cat_mbs):
            met = (
                "?"
                if value is None
                else ("yes" if (value >= limit if higher else value <= limit) else "NO")
            )
            shown = (
                "-" if value is None else (f"{value:+.1f} ms" if "ms" in text else f"{value:.2f}x")
            )
            add(f"| {r.name} | {text} | {shown} | {met} |")
    add("")
    add("## The paper's Table 1 modes (µs per call, medians)")
    add("")
    add(
        "| system | exec: new connection per call | exec-mod: new channel per call |"
        " shell: kept channel | pipelined @64 |"
    )
    add("|---|---:|---:|---:|---:|")
    for r in results:
        if r.unavailable or registry.ANCHOR_ROLES.get(r.name) == "cat":
            continue
        exec_us = r.setup_ms and r.setup_ms * 1e3
        chan_us = r.chan_ms and r.chan_ms * 1e3
        add(
            f"| {r.name} | {fmt(exec_us)} | {fmt(chan_us)} |"
            f" {fmt(r.seq_med_us)} | {fmt(r.pipe and 1e6 / r.pipe, '.1f')} |"
        )
    add("")
    notes = [(r.name, r.note) for r in results if r.note]
    if notes:
        add("## Notes")
        add("")
        for name, note in notes:
            add(f"- {name}: {note}")
        add("")
    errs = [(r.name, op, e) for r in results for op, e in r.errors.items()]
    if errs:
        add("## Errors during the run")
        add("")
        for name, op, e in errs:
            add(f"- {name} {op}: {e}")
        add("")
    add(
        "Plots: latency.png (sequential latency CDF), pipelined.png (calls/s against calls in"
        " flight), bulk.png (MB/s against payload size)."
    )
    return "\n".join(lines) + "\n"


def _mib(values: list[int]) -> float | None:
    return statistics.median(values) / MiB if values else None


def targets(
    r: Result, seed: Result | None, tcp: Result | None, cat: Result | None, cat_mbs: float | None
) -> list[tuple[str, float | None, float, bool]]:
    def div(x: float | None, y: float | None) -> float | None:
        return None if x is None or y is None or not y else x / y

    setup_delta = None
    if r.setup_ms is not None and cat is not None and cat.setup_ms is not None:
        setup_delta = r.setup_ms - cat.setup_ms
    return [
        ("seq latency <= 0.6x seed", div(r.seq_med_us, seed and seed.seq_med_us), 0.6, False),
        ("seq latency <= 1.2x TCP floor", div(r.seq_med_us, tcp and tcp.seq_med_us), 1.2, False),
        ("calls/s @64 >= 1x TCP floor", div(r.pipe, tcp and tcp.pipe), 1.0, True),
        ("calls/s @64 >= 5x seed", div(r.pipe, seed and seed.pipe), 5.0, True),
        ("MB/s 16 MiB >= 0.8x ssh -s cat", div(r.bulk, cat_mbs), 0.8, True),
        ("MB/s 16 MiB >= 2x seed", div(r.bulk, seed and seed.bulk), 2.0, True),
        ("set-up <= ssh -s + 10 ms", setup_delta, 10.0, False),
    ]


def plot(results: list[Result], out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return [f"no plots: {exc} (pip install matplotlib, it is in the bench extra)"]
    made = []
    live = [r for r in results if not r.unavailable]

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in live:
        if r.lat_ns:
            xs = sorted(v / 1e3 for v in r.lat_ns)
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.plot(xs, ys, label=r.name)
    ax.set_xscale("log")
    ax.set_xlabel("sequential round trip (µs, log)")
    ax.set_ylabel("fraction of calls")
    ax.set_title("Sequential call latency, CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)
    made.append("latency.png")

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in live:
        if r.depth_sweep:
            ds = sorted(r.depth_sweep)
            ax.plot(ds, [r.depth_sweep[d] for d in ds], marker="o", label=r.name)
    ax.set_xscale("log", base=2)
    depths = sorted({d for r in live for d in r.depth_sweep})
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.set_yscale("log")
    ax.set_xlabel("calls in flight")
    ax.set_ylabel("calls/s (log)")
    ax.set_title("Pipelined calls on one channel")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pipelined.png", dpi=110)
    plt.close(fig)
    made.append("pipelined.png")

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in live:
        if r.size_sweep:
            ss = sorted(r.size_sweep)
            ax.plot(ss, [r.size_sweep[s] for s in ss], marker="o", label=r.name)
    cat = anchors(results)["cat"]
    if cat is not None and cat.cat_big_mbs:
        ax.axhline(
            statistics.median(cat.cat_big_mbs),
            color="grey",
            linestyle="--",
            label="ssh -s cat, streaming (cipher floor)",
        )
    ax.set_xscale("log", base=2)
    sizes = sorted({s for r in live for s in r.size_sweep})
    ax.set_xticks(sizes, [registry.human_size(s).replace(" ", "") for s in sizes])
    ax.set_yscale("log")
    ax.set_xlabel("payload bytes (log)")
    ax.set_ylabel("MB/s echoed (log)")
    ax.set_title("Bulk echo")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bulk.png", dpi=110)
    plt.close(fig)
    made.append("bulk.png")
    return made


def run_codec(rounds: int, out: Path) -> dict[str, Any] | str:
    """bench/codec.py (the foundation's codec benchmark) in this run, as JSON."""
    script = ROOT / "bench" / "codec.py"
    if not script.exists():
        return "bench/codec.py is not there"
    try:
        p = subprocess.run(
            [sys.executable, str(script), "--rounds", str(rounds), "--json"],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=str(ROOT),
        )
    except subprocess.TimeoutExpired:
        return "bench/codec.py took over 300 s"
    (out / "logs" / "codec.log").write_text(p.stderr)
    if p.returncode:
        return f"bench/codec.py failed: {p.stderr.strip()[-200:]}"
    try:
        data: dict[str, Any] = json.loads(p.stdout)
    except ValueError:
        return "bench/codec.py printed no JSON"
    return data


def render_codec(codec: dict[str, Any] | str) -> str:
    if isinstance(codec, str):
        return f"## Codec (bench/codec.py)\n\nnot available: {codec}\n"
    rows = [
        "## Codec (bench/codec.py, same run)",
        "",
        "Targets: C time / msgpack time <= 1.5 for encode and decode; erlpack never faster"
        " than C (erlpack time / C time >= 1).",
        "",
        "| item | encode C/msgpack | decode C/msgpack | encode erlpack/C | decode erlpack/C |",
        "|---|---:|---:|---:|---:|",
    ]
    for item, ops in codec.get("seconds_per_call", {}).items():
        cells = []
        for key, num, den, limit, higher in (
            ("encode", "C", "msgpack", 1.5, False),
            ("decode", "C", "msgpack", 1.5, False),
            ("encode", "erlpack", "C", 1.0, True),
            ("decode", "erlpack", "C", 1.0, True),
        ):
            a, b = ops.get(key, {}).get(num), ops.get(key, {}).get(den)
            if not a or not b:
                cells.append("n/a")
                continue
            r = a / b
            met = r >= limit if higher else r <= limit
            cells.append(f"{r:.2f}" + ("" if met else " (missed)"))
        rows.append(f"| {item} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


BEGIN = "<!-- results: begin (bench/run.py --publish writes this part) -->"
END = "<!-- results: end -->"


def publish(text: str, out: Path, plots: list[str]) -> None:
    """The run's table into bench/README.md (between the markers) and its
    plots into bench/plots/, so that they can be committed."""
    readme = ROOT / "bench" / "README.md"
    dest = ROOT / "bench" / "plots"
    dest.mkdir(exist_ok=True)
    for name in plots:
        shutil.copy(out / name, dest / name)
    body = text.replace("# sshrpc benchmark", "### Last published run", 1)
    body += "\n" + "\n".join(f"![{p}](plots/{p})" for p in plots) + "\n"
    current = readme.read_text() if readme.exists() else f"{BEGIN}\n{END}\n"
    head, _, rest = current.partition(BEGIN)
    _, _, tail = rest.partition(END)
    readme.write_text(f"{head}{BEGIN}\n{body}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="about 1-2 minutes instead of <= 15")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--only", help="comma-separated system names (default: all)")
    ap.add_argument("--list", action="store_true", help="list the systems and exit")
    ap.add_argument(
        "--publish",
        action="store_true",
        help="also copy the table into bench/README.md and the plots into bench/plots/",
    )
    args = ap.parse_args(argv)
    if args.list:
        for s in registry.systems():
            print(f"{s.name:28} {s.group:8} servers={','.join(s.servers)}")
        return 0
    plan = QUICK if args.quick else FULL
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    vers = versions()
    for k in ("machine", "python", "otp", "openssh", "packages", "sshrpc"):
        print(f"{k}: {vers[k]}", flush=True)
    only = set(args.only.split(",")) if args.only else None
    t0 = time.monotonic()
    results, meta = run_all(plan, out, only)
    meta["cat_big"] = plan.cat_big
    meta["total_s"] = time.monotonic() - t0
    log("codec benchmark (bench/codec.py)")
    codec = run_codec(3 if args.quick else 5, out)
    text = render(results, meta, vers, args.quick) + "\n" + render_codec(codec)
    made = plot(results, out)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(
        json.dumps(
            {
                "versions": vers,
                "meta": meta,
                "plan": plan.__dict__,
                "results": [r.__dict__ for r in results],
                "codec": codec,
            },
            indent=1,
            default=str,
        )
    )
    if args.publish:
        publish(text, out, made)
    print()
    print(text)
    print(f"wrote {out / 'results.md'}, results.json, {', '.join(made)} in {meta['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
