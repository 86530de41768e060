"""CPU per call, per process, for sshrpc and its anchors, in one run.

    .venv/bin/python bench/call_cpu.py                       # 5 rounds, 1-3 minutes
    .venv/bin/python bench/call_cpu.py --rounds 5 --calls 3000 --seq-calls 500   # smaller
    .venv/bin/python bench/call_cpu.py --only 'p64_*,tcp_*'  # some rows (--list names them)
    .venv/bin/python bench/call_cpu.py --json                # JSON on stdout instead

Starts the servers of the rows asked for on free loopback ports (each stopped
by its PID at the end): ``sshrpc serve`` in relay mode serving
bench/systems/sshrpc_service.py (OpenSSH sshd, the C relay passing the
channel's descriptors to the Python node), the same with ``--no-pass-fds``
(the relay copies every byte: the ``*_copy`` rows), the sshd floor (the same
OpenSSH sshd in front of bench/floors/sshd_echo.py, a blocking echo of
frames, driven by bench/floors/sshd_client.py, ssh2-python under Trio: what
SSH itself costs per call), the plain-TCP Trio floor (bench/floors) and the
modernized seed (erlang/'s OTP daemon), with one client driver process each
(bench/systems/_common.py's line protocol).  Each *row*
is one way of calling (sequential, 64 caller tasks, one task with many
requests open, ...); rounds run every row once, in an order that rotates
each round, and every figure is the median over the rounds.

For every row it prints wall µs per call, calls/s, and CPU µs per call of each
process role: client (the driver's process tree), sshd (every sshd process
under ``sshrpc serve``: the listener and the connection's processes), relay
(the subsystem command sshd runs for the channel), node (the ``sshrpc serve``
process itself, or the whole server for the floor and the seed), and their
sum.  Then the issue-10 targets as ratios of this run's medians, and writes
call_cpu.md, call_cpu.json and call_cpu.png (CPU per call stacked by process)
into bench/results/ (untracked; ``--out DIR`` elsewhere).

How CPU is read: per process, the kernel's thread-group CPU clock
(``clock_gettime`` on the process's CPU-clock id, the same nanosecond counter
as the first field of /proc/PID/task/*/schedstat, summed over the threads,
plus threads that have exited), falling back to that schedstat sum; plus the
process's ``cutime + cstime`` from /proc/PID/stat (children it has reaped,
clock ticks).  Each process is sampled before and after a row, keyed by PID
and start time: a process born during a row counts from zero; one that ends
during a row counts through its parent's cutime/cstime when the parent reaps
it (in steady state no process of a kept connection starts or ends).  The
harness samples from its own process, so its work is in no figure.

Never part of the test suite.  Every loop is bounded in count and seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.systems import registry
from bench.systems._common import ROOT, Driver, DriverError, DriverTimeout

from sshrpc._statedir import temp_root

ROLES = ("client", "sshd", "relay", "node")
#: Systems behind OpenSSH's sshd (an sshd column), and with a relay process.
SSH_SYSTEMS = ("sshrpc", "sshrpc_copy", "sshd_floor")
RELAY_SYSTEMS = ("sshrpc", "sshrpc_copy")
TICK = os.sysconf("SC_CLK_TCK")
#: The value every row echoes: 32 bytes, as in bench/run.py.
SIZE = 32


# --------------------------------------------------------------------------
# what runs


@dataclass(frozen=True)
class System:
    key: str  # sshrpc | tcp | seed
    spec_name: str  # the registry's name for it
    title: str


SYSTEMS = (
    System("sshrpc", "sshrpc relay", "sshrpc (relay mode)"),
    System("sshrpc_copy", "sshrpc relay (copying)", "sshrpc, relay copying (--no-pass-fds)"),
    System("sshd_floor", "sshd floor", "sshd floor"),
    System("tcp", "TCP floor (Trio)", "TCP floor"),
    System("seed", "Erlang seed (OTP -> OTP)", "seed"),
)


@dataclass(frozen=True)
class Row:
    key: str
    system: str
    label: str
    command: str  # driver command; {n} calls, {s} seconds
    sequential: bool


ROWS = (
    Row("seq_echo", "sshrpc", "sshrpc sequential, async `echo`", "latency {n} {s} 32 0", True),
    Row("seq_inline", "sshrpc", "sshrpc sequential, inline-sync", "latency {n} {s} 32 1", True),
    Row("seq_thread", "sshrpc", "sshrpc sequential, thread-sync", "latency {n} {s} 32 2", True),
    Row("p64_echo", "sshrpc", "sshrpc 64 tasks, async `echo`", "pipe 64 {n} {s} 0", False),
    Row("p64_inline", "sshrpc", "sshrpc 64 tasks, inline-sync", "pipe 64 {n} {s} 1", False),
    Row("p64_thread", "sshrpc", "sshrpc 64 tasks, thread-sync", "pipe 64 {n} {s} 2", False),
    Row("req64", "sshrpc", "sshrpc request API, 1 task, 64 open", "reqs 64 {n} {s}", False),
    Row("req1024", "sshrpc", "sshrpc request API, 1 task, 1,024 open", "reqs 1024 {n} {s}", False),
    Row(
        "req64_each",
        "sshrpc",
        "sshrpc request API, 1 task, 64 open, per-request forms",
        "reqs 64 {n} {s} 1",
        False,
    ),
    Row(
        "seq_echo_copy",
        "sshrpc_copy",
        "sshrpc sequential, async `echo`, relay copying",
        "latency {n} {s} 32 0",
        True,
    ),
    Row(
        "seq_inline_copy",
        "sshrpc_copy",
        "sshrpc sequential, inline-sync, relay copying",
        "latency {n} {s} 32 1",
        True,
    ),
    Row(
        "seq_thread_copy",
        "sshrpc_copy",
        "sshrpc sequential, thread-sync, relay copying",
        "latency {n} {s} 32 2",
        True,
    ),
    Row(
        "p64_echo_copy",
        "sshrpc_copy",
        "sshrpc 64 tasks, async `echo`, relay copying",
        "pipe 64 {n} {s} 0",
        False,
    ),
    Row(
        "p64_inline_copy",
        "sshrpc_copy",
        "sshrpc 64 tasks, inline-sync, relay copying",
        "pipe 64 {n} {s} 1",
        False,
    ),
    Row(
        "p64_thread_copy",
        "sshrpc_copy",
        "sshrpc 64 tasks, thread-sync, relay copying",
        "pipe 64 {n} {s} 2",
        False,
    ),
    Row(
        "sshd_floor_seq",
        "sshd_floor",
        "sshd floor sequential (ssh2-python -> sshd -> echo)",
        "latency {n} {s} 32",
        True,
    ),
    Row("sshd_floor_win64", "sshd_floor", "sshd floor 1 task, window 64", "pipe 64 {n} {s}", False),
    Row("tcp_seq", "tcp", "TCP floor sequential", "latency {n} {s} 32", True),
    Row("tcp_tasks64", "tcp", "TCP floor 64 tasks", "tasks 64 {n} {s}", False),
    Row("tcp_win64", "tcp", "TCP floor 1 task, window 64", "pipe 64 {n} {s}", False),
    Row("seed_seq", "seed", "seed sequential", "latency {n} {s} 32", True),
    Row("seed_procs64", "seed", "seed 64 processes", "pipe 64 {n} {s}", False),
    Row("seed_open64", "seed", "seed 1 process, 64 open", "reqs 64 {n} {s}", False),
)

#: (text, numerator row, denominator row or None, what, limit, higher is better)
#: what: "calls/s" (ratio of calls/s), "wall" (ratio of wall µs/call), "cpu" (µs, absolute)
TARGETS: tuple[tuple[str, str, str | None, str, float, bool], ...] = (
    ("64 tasks, async: calls/s vs TCP floor 64 tasks", "p64_echo", "tcp_tasks64",
     "calls/s", 1.0, True),
    ("64 tasks, inline: calls/s vs TCP floor 64 tasks", "p64_inline", "tcp_tasks64",
     "calls/s", 1.0, True),
    ("64 tasks, async: calls/s vs seed 1 process 64 open", "p64_echo", "seed_open64",
     "calls/s", 3.0, True),
    ("64 tasks, inline: calls/s vs seed 1 process 64 open", "p64_inline", "seed_open64",
     "calls/s", 3.0, True),
    ("request API 64 open: calls/s vs TCP floor window 64", "req64", "tcp_win64",
     "calls/s", 0.8, True),
    ("CPU per pipelined call, all processes, async", "p64_echo", None, "cpu", 20.0, False),
    ("CPU per pipelined call, all processes, inline", "p64_inline", None, "cpu", 20.0, False),
    ("CPU per pipelined call, all processes, thread", "p64_thread", None, "cpu", 40.0, False),
    ("sequential latency, async, vs seed", "seq_echo", "seed_seq", "wall", 0.8, False),
    ("sequential latency, inline, vs seed", "seq_inline", "seed_seq", "wall", 0.8, False),
    ("sequential latency, thread, vs seed", "seq_thread", "seed_seq", "wall", 0.8, False),
    ("(info) sequential latency, async, vs the sshd floor", "seq_echo", "sshd_floor_seq",
     "wall", 1.0, False),
    ("(info) sequential latency, async: descriptors passed vs relay copying", "seq_echo",
     "seq_echo_copy", "wall", 1.0, False),
)  # fmt: skip


# --------------------------------------------------------------------------
# CPU from /proc


def _cpu_clock_id(pid: int) -> int:
    # Linux's MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED): the thread group's
    # sum_exec_runtime, i.e. schedstat's first field summed over all threads
    # including exited ones.
    return ((~pid) << 3) | 2


def _schedstat_ns(pid: int) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with (
                contextlib.suppress(OSError, ValueError),
                open(f"/proc/{pid}/task/{tid}/schedstat") as f,
            ):
                total += int(f.read().split()[0])
    return total


def process_cpu_ns(pid: int) -> int:
    """CPU nanoseconds used by process ``pid`` (all its threads, live or
    exited); 0 if it is gone."""
    try:
        return time.clock_gettime_ns(_cpu_clock_id(pid))
    except OSError:
        return _schedstat_ns(pid)


@dataclass
class ProcInfo:
    pid: int
    ppid: int
    comm: str
    start: int
    reaped_ns: int  # cutime + cstime


def _read_stat(pid: int) -> ProcInfo | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    comm = data[data.index(b"(") + 1 : data.rindex(b")")].decode(errors="replace")
    rest = data[data.rindex(b")") + 2 :].split()
    reaped = (int(rest[13]) + int(rest[14])) * 1_000_000_000 // TICK
    return ProcInfo(pid, int(rest[1]), comm, int(rest[19]), reaped)


def _all_procs() -> dict[int, ProcInfo]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := _read_stat(int(entry))) is not None:
            out[info.pid] = info
    return out


def _tree(root: int, procs: dict[int, ProcInfo]) -> list[ProcInfo]:
    kids: dict[int, list[int]] = {}
    for p in procs.values():
        kids.setdefault(p.ppid, []).append(p.pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in procs:
            out.append(procs[pid])
            todo.extend(kids.get(pid, ()))
    return out


#: (pid, start time) -> (role, CPU ns including reaped children)
Sample = dict[tuple[int, int], tuple[str, int]]


def sample(roots: list[tuple[int, Callable[[ProcInfo, int], str]]]) -> Sample:
    """CPU so far of every process in the trees at ``roots``; each root comes
    with a function that names a process's role (given the process and the root)."""
    procs = _all_procs()
    out: Sample = {}
    for root, role_of in roots:
        for p in _tree(root, procs):
            out[(p.pid, p.start)] = (role_of(p, root), process_cpu_ns(p.pid) + p.reaped_ns)
    return out


def delta(before: Sample, after: Sample) -> dict[str, int]:
    """CPU ns per role between two samples (a new process counts from zero)."""
    out = dict.fromkeys(ROLES, 0)
    for key, (role, ns) in after.items():
        prior = before.get(key)
        out[role] += ns - (prior[1] if prior else 0)
    return out


def sshrpc_role(p: ProcInfo, root: int) -> str:
    if p.pid == root:
        return "node"  # `sshrpc serve` is the node in relay mode
    if p.comm.startswith("sshd"):
        return "sshd"
    return "relay"  # the subsystem command (the C relay; a shell if it did not exec)


def floor_role(p: ProcInfo, root: int) -> str:
    """The sshd floor: every sshd process, and the echo subsystem as the node."""
    return "sshd" if p.comm.startswith("sshd") else "node"


def server_role(p: ProcInfo, root: int) -> str:
    return "node"


def client_role(p: ProcInfo, root: int) -> str:
    return "client"


# --------------------------------------------------------------------------
# running


@dataclass
class RowResult:
    row: Row
    unavailable: str | None = None
    wall_us: list[float] = field(default_factory=list)
    calls_s: list[float] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    cpu_us: dict[str, list[float]] = field(default_factory=lambda: {r: [] for r in ROLES})
    all_us: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def med(self, name: str) -> float | None:
        """The median over rounds of a column (a role's CPU or an attribute);
        None where not measured, and for sshd and relay outside sshrpc."""
        if name == "sshd" and self.row.system not in SSH_SYSTEMS:
            return None
        if name == "relay" and self.row.system not in RELAY_SYSTEMS:
            return None
        values = self.cpu_us[name] if name in ROLES else getattr(self, name)
        return statistics.median(values) if values else None


@dataclass
class Live:
    system: System
    handle: registry.ServerHandle | None = None
    driver: Driver | None = None
    unavailable: str | None = None

    def roots(self) -> list[tuple[int, Callable[[ProcInfo, int], str]]]:
        assert self.driver is not None and self.handle is not None
        server = {"sshrpc": sshrpc_role, "sshrpc_copy": sshrpc_role, "sshd_floor": floor_role}.get(
            self.system.key, server_role
        )
        return [(self.driver.proc.pid, client_role)] + [(p, server) for p in self.handle.pids]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def start(live: Live, ctx: registry.Context, logs: Path) -> None:
    specs = registry.systems() + registry.extra_systems()
    spec = next(s for s in specs if s.name == live.system.spec_name)
    try:
        live.handle = registry.SERVERS[spec.servers[0]](ctx)
        argv = spec.client(ctx, live.handle)
    except registry.Unavailable as exc:
        live.unavailable = str(exc)
        return
    except Exception as exc:
        live.unavailable = f"{type(exc).__name__}: {exc}"[:300]
        return
    live.driver = Driver(argv, logs / f"call_cpu_{live.system.key}.log")
    try:
        live.driver.request("connect", 90)
    except DriverError as exc:
        live.unavailable = f"connect failed: {exc}"[:300]
        live.driver.close()
        live.driver = None


def run_row(live: Live, res: RowResult, n: int, max_s: float, record: bool) -> None:
    """One pass of ``res.row`` on its system; its figures are kept when ``record``."""
    if live.driver is None or res.unavailable:
        return
    line = res.row.command.format(n=n, s=max_s)
    before = sample(live.roots())
    try:
        got = live.driver.request(line, max_s + 60)
    except DriverTimeout as exc:
        res.errors.append(f"{line}: {exc}")
        live.unavailable = f"hung during {line}"
        live.driver.close()
        live.driver = None
        return
    except DriverError as exc:
        text = str(exc)
        if text.startswith("err n/a:"):
            res.unavailable = text.removeprefix("err ")
        else:
            res.errors.append(f"{line}: {text}"[:300])
            if len(res.errors) >= 3:
                res.unavailable = f"failed 3 times: {text}"[:300]
        return
    after = sample(live.roots())
    if res.row.sequential:
        calls, total_ns = len(got), sum(got)
        wall_us = statistics.median(got) / 1e3 if got else 0.0
    else:
        calls, total_ns = int(got[0]), got[1]
        wall_us = total_ns / max(calls, 1) / 1e3
    if not record or calls == 0:
        return
    cpu = delta(before, after)
    res.calls.append(calls)
    res.wall_us.append(wall_us)
    res.calls_s.append(calls / (total_ns / 1e9))
    for role in ROLES:
        res.cpu_us[role].append(cpu[role] / calls / 1e3)
    res.all_us.append(sum(cpu.values()) / calls / 1e3)


def run(
    args: argparse.Namespace, rows: list[Row], out: Path
) -> tuple[list[RowResult], dict[str, Any]]:
    state = Path(tempfile.mkdtemp(prefix="sshrpc-callcpu-", dir=temp_root()))
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ctx = registry.Context(state=state, logs=logs)
    wanted = {r.system for r in rows}
    lives = {s.key: Live(s) for s in SYSTEMS if s.key in wanted}
    results = [RowResult(r) for r in rows]
    meta: dict[str, Any] = {"load_start": os.getloadavg()}
    try:
        for live in lives.values():
            log(f"starting {live.system.spec_name}")
            start(live, ctx, logs)
            if live.unavailable:
                log(f"{live.system.spec_name}: not available: {live.unavailable}")
        for res in results:
            live = lives[res.row.system]
            if live.unavailable:
                res.unavailable = live.unavailable
        t0 = time.monotonic()
        log("warm-up pass")
        for res in results:
            run_row(lives[res.row.system], res, max(64, _calls(args, res.row) // 5), 2.0, False)
        for rnd in range(args.rounds):
            k = rnd % len(results)
            order = results[k:] + results[:k]
            log(f"round {rnd + 1}/{args.rounds}")
            for res in order:
                live = lives[res.row.system]
                if live.unavailable and not res.unavailable:
                    res.unavailable = live.unavailable
                run_row(live, res, _calls(args, res.row), args.max_s, True)
        meta["rounds_s"] = time.monotonic() - t0
    finally:
        for live in lives.values():
            if live.driver is not None:
                live.driver.close()
            if live.handle is not None:
                with contextlib.suppress(Exception):
                    live.handle.stop()
        shutil.rmtree(state, ignore_errors=True)
    meta["load_end"] = os.getloadavg()
    return results, meta


def _calls(args: argparse.Namespace, row: Row) -> int:
    return int(args.seq_calls if row.sequential else args.calls)


# --------------------------------------------------------------------------
# reporting


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def evaluate(results: list[RowResult]) -> list[dict[str, Any]]:
    by_key = {r.row.key: r for r in results}
    out = []
    for text, num_key, den_key, what, limit, higher in TARGETS:
        num = by_key.get(num_key)
        den = by_key.get(den_key) if den_key else None
        value: float | None = None
        if what == "cpu":
            value = num.med("all_us") if num else None
        else:
            attr = "calls_s" if what == "calls/s" else "wall_us"
            a = num.med(attr) if num else None
            b = den.med(attr) if den else None
            value = a / b if a is not None and b else None
        met = None if value is None else (value >= limit if higher else value <= limit)
        out.append(
            {
                "target": text,
                "rows": [num_key] + ([den_key] if den_key else []),
                "limit": f"{'>=' if higher else '<='} {limit:g}{' µs' if what == 'cpu' else 'x'}",
                "value": value,
                "unit": "µs" if what == "cpu" else "x",
                "met": met,
            }
        )
    return out


def render(results: list[RowResult], meta: dict[str, Any], args: argparse.Namespace) -> str:
    lines: list[str] = []
    add = lines.append
    add(f"# CPU per call by process (bench/call_cpu.py, {meta['date']})")
    add("")
    for k in ("machine", "python", "otp", "openssh", "sshrpc"):
        if k in meta["versions"]:
            add(f"- {k}: {meta['versions'][k]}")
    add(
        f"- {args.rounds} rounds, interleaved (order rotates each round), medians over rounds;"
        f" {args.seq_calls} sequential / {args.calls} pipelined calls per row per round, at most"
        f" {args.max_s:g} s each; rounds took {meta.get('rounds_s', 0):.0f} s"
    )
    add(
        f"- load average {meta['load_start'][0]:.1f} at start, {meta['load_end'][0]:.1f} at end"
        f" on {os.cpu_count()} cores: the machine is shared, so wall time and calls/s are noisy;"
        " CPU µs per call is the robust figure"
    )
    for note in meta["notes"]:
        add(f"- note: {note}")
    add("")
    add("| per call | wall µs | calls/s | client CPU µs | sshd | relay | node | all processes |")
    add("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if r.unavailable or not r.wall_us:
            why = r.unavailable or ("; ".join(r.errors) or "no figures")
            add(f"| {r.row.label} | {why} |||||||")
            continue
        add(
            f"| {r.row.label} | {fmt(r.med('wall_us'))} | {fmt(r.med('calls_s'), '.0f')} |"
            + "".join(f" {fmt(r.med(role))} |" for role in ROLES)
            + f" {fmt(r.med('all_us'))} |"
        )
    add("")
    add("## Targets (issue 10; ratios of this run's medians)")
    add("")
    add("| target | limit | measured | met |")
    add("|---|---:|---:|---|")
    for t in meta["targets"]:
        v = t["value"]
        shown = "-" if v is None else (f"{v:.1f} µs" if t["unit"] == "µs" else f"{v:.2f}x")
        met = "?" if t["met"] is None else ("yes" if t["met"] else "NO")
        if t["target"].startswith("(info)"):
            met = "(not a target)"
        add(f"| {t['target']} | {t['limit']} | {shown} | {met} |")
    add("")
    add("Columns: wall µs = median round trip (sequential rows) or elapsed time / calls;")
    add("calls/s = calls / elapsed (sequential rows: calls / the sum of their round trips, so")
    add("outliers count); CPU µs = CPU used during the row / calls: client = the")
    add("driver's process tree; sshd = all sshd processes under `sshrpc serve` (listener and")
    add("the connection's); relay = the subsystem command per channel; node = the `sshrpc")
    add("serve` process (for the TCP floor and the seed: their whole server process tree);")
    add("all processes = their sum per round, then the median. Sources: bench/README.md.")
    errs = [(r.row.key, e) for r in results for e in r.errors]
    if errs:
        add("")
        add("## Errors during the run")
        add("")
        for key, e in errs:
            add(f"- {key}: {e}")
    return "\n".join(lines) + "\n"


def plot(results: list[RowResult], path: Path) -> str:
    """CPU per call stacked by process, one bar per row; sequential and
    pipelined rows in two panels (linear scales, they differ ~10x)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no plot: {exc} (.venv/bin/pip install -e '.[bench]')"
    shown = [r for r in results if not r.unavailable and r.wall_us]
    panels = [
        (title, rows)
        for title, rows in (
            ("one call at a time", [r for r in shown if r.row.sequential]),
            ("many calls in flight", [r for r in shown if not r.row.sequential]),
        )
        if rows
    ]
    if not panels:
        return "no plot: no figures"
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(9, 0.42 * len(shown) + 1.4 * len(panels) + 0.6),
        gridspec_kw={"height_ratios": [len(rows) for _, rows in panels]},
        squeeze=False,
    )
    colours = ("#4c72b0", "#dd8452", "#55a868", "#c44e52")
    for ax, (title, rows) in zip(axes[:, 0], panels, strict=True):
        ys = list(range(len(rows)))[::-1]
        left = [0.0] * len(rows)
        for role, colour in zip(ROLES, colours, strict=True):
            widths = [r.med(role) or 0.0 for r in rows]
            ax.barh(ys, widths, left=left, color=colour, label=role)
            left = [a + b for a, b in zip(left, widths, strict=True)]
        for y, total, r in zip(ys, left, rows, strict=True):
            ax.text(total, y, f" {fmt(r.med('all_us'))}", va="center", fontsize=8)
        ax.set_yticks(ys, [r.row.label.replace("`", "") for r in rows], fontsize=8)
        ax.set_xlim(0, max(left) * 1.15)
        ax.set_title(f"CPU µs per call by process, {title} (medians)", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[-1, 0].set_xlabel("CPU µs per call, stacked: client, sshd, relay, node")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    ap.add_argument(
        "--calls", type=int, default=50000, help="calls per pipelined row per round (50000)"
    )
    ap.add_argument(
        "--seq-calls", type=int, default=2000, help="calls per sequential row per round (2000)"
    )
    ap.add_argument(
        "--max-s", type=float, default=4.0, help="a row stops after this many seconds (4)"
    )
    ap.add_argument(
        "--only", help="comma-separated row keys or systems (sshrpc, tcp, seed); globs allowed"
    )
    ap.add_argument("--list", action="store_true", help="list the rows and exit")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args(argv)
    if args.list:
        for row in ROWS:
            print(f"{row.key:14} {row.system:7} {row.label}")
        return 0
    rows = list(ROWS)
    if args.only:
        pats = [p.strip() for p in args.only.split(",") if p.strip()]
        rows = [r for r in rows if any(fnmatch.fnmatch(r.key, p) or r.system == p for p in pats)]
        if not rows:
            ap.error(f"--only {args.only!r} selects no row (--list names them)")
    if args.rounds < 1 or args.calls < 1 or args.seq_calls < 1:
        ap.error("--rounds, --calls and --seq-calls must be positive")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    from bench.run import versions
    from bench.systems import sshrpc_service

    notes = []
    if not sshrpc_service.INLINE:
        notes.append(
            "`Service.export` has no `inline` option on this checkout: `echo_inline` is"
            " exported as a plain def, so the inline-sync rows run through the worker threads"
        )
    notes.append(
        "the node's max_calls is 64 (`sshrpc serve` default): with 1,024 requests open, at"
        " most 64 are at the node, the rest wait in the client"
    )
    notes.append("the seed's BEAM schedulers busy-wait when idle, which adds to its CPU per call")
    vers = versions()
    meta: dict[str, Any] = {"versions": vers, "date": vers["date"], "notes": notes}
    results, run_meta = run(args, rows, out)
    meta.update(run_meta)
    meta["targets"] = evaluate(results)
    text = render(results, meta, args)
    (out / "call_cpu.md").write_text(text)
    data = {
        "meta": meta,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": [
            {
                "key": r.row.key,
                "system": r.row.system,
                "label": r.row.label,
                "unavailable": r.unavailable,
                "median": {
                    "wall_us": r.med("wall_us"),
                    "calls_s": r.med("calls_s"),
                    **{f"{role}_cpu_us": r.med(role) for role in ROLES},
                    "all_cpu_us": r.med("all_us"),
                },
                "rounds": {
                    "calls": r.calls,
                    "wall_us": r.wall_us,
                    "calls_s": r.calls_s,
                    "cpu_us": r.cpu_us,
                    "all_cpu_us": r.all_us,
                },
                "errors": r.errors,
            }
            for r in results
        ],
    }
    (out / "call_cpu.json").write_text(json.dumps(data, indent=1))
    made = plot(results, out / "call_cpu.png")
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        print(text)
    log(f"wrote {out / 'call_cpu.md'}, call_cpu.json; {made}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
