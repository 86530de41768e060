"""The paper's Table 1, every row, with today's sshrpc on loopback.

    .venv/bin/python bench/table1.py [--rounds 5] [--exec-calls 10] [--json]

The original paper (Rikitake, 2010) timed one small call four ways on an
Intel Atom; this runs the same four patterns against ``sshrpc serve
sshrpc.demo:services`` (private OpenSSH sshd, the C relay, the Python node)
with ``lists:reverse([1,2,3])``:

- exec: a new SSH connection per call, through exec mode, with OpenSSH's
  ``ssh HOST 'lists:reverse([1,2,3]).'`` (connect, key exchange, auth,
  channel, relay, call, close);
- exec-mod: a new channel per call on a kept connection, through exec mode,
  with OpenSSH connection multiplexing (one ``ssh -M`` master; each call is
  ``ssh -S CTL HOST 'lists:reverse([1,2,3]).'``, which opens one new session
  channel on the master's connection): the OpenSSH reference.  The figure
  includes the mux client's own start-up (a fork+exec of ``ssh``);
- exec-mod (sshrpc): the same pattern with our own client, through the
  subsystem: one kept ``sshrpc.open_connection``, and per call
  ``async with node.open_channel() as ch: await ch.call(...)`` (a new SSH
  session channel + the sshrpc subsystem + hellos, the call, bye and
  channel close), timed from the open to the close;
- exec-mod (Erlang): the same with erlang/'s client (``sshrpc:open_channel/1``,
  ``sshrpc:call/4``, ``sshrpc:close/1`` on a kept ``sshrpc:connect``), timed
  inside the VM; skipped when ``erl`` is not installed;
- shell: one kept channel with ``sshrpc.open_connection``, calls in sequence;
- pipelined: the same kept channel, ``--pipelined`` calls from 64 concurrent
  tasks: wall time divided by the number of calls.

Every row runs once per round, in an order that rotates each round; each
figure is the median over rounds of that round's median (pipelined: mean)
time per call, in milliseconds, printed next to the paper's.  Wall-clock
time on a shared machine is noisy: quote medians of several rounds.  Every
process it starts is stopped by pid.  Never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from client_latency import keygen, start_serve, stop
from sshrpc._statedir import temp_root
from sshrpc.client import open_connection

#: The paper's Table 1 (ms per call, Intel Atom, Erlang/OTP R13B).
PAPER_MS = {
    "exec": 412.7,
    "exec-mod": 106.9,
    "exec-mod (sshrpc)": 106.9,
    "exec-mod (Erlang)": 106.9,
    "shell": 8.1,
    "pipelined": 4.2,
}
COMMAND = "lists:reverse([1,2,3])."


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and every descendant, alive or reaped: the sum
    over the live tree of utime+stime+cutime+cstime (a reaped process is
    counted in its parent's cutime/cstime, so nothing twice)."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                stat = f.read()
            total += sum(int(x) for x in stat[stat.rindex(")") + 2 :].split()[11:15])
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            pass  # it exited meanwhile: its parent's cutime has it
    return total / os.sysconf("SC_CLK_TCK")


class CPU:
    """CPU per call of one phase: server (``sshrpc serve``: node, sshd, relays)
    and client (this process and its other children: ssh, the ssh master)."""

    def __init__(self, serve_pid: int) -> None:
        self.serve_pid = serve_pid
        self.server0 = tree_cpu(serve_pid)
        self.all0 = tree_cpu(os.getpid())

    def per_call_ms(self, calls: int) -> tuple[float, float]:
        server = tree_cpu(self.serve_pid) - self.server0
        client = tree_cpu(os.getpid()) - self.all0 - server
        return server * 1e3 / calls, client * 1e3 / calls


def ssh_base(port: int, user: str, identity: Path, known: Path) -> list[str]:
    return [
        "ssh", "-F", "/dev/null", "-p", str(port), "-i", str(identity),
        "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
        "-o", f"UserKnownHostsFile={known}", "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
    ]  # fmt: skip


def timed_ssh(argv: list[str], calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        out = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
        samples.append((time.perf_counter() - t0) * 1e3)
        if out.returncode != 0 or out.stdout != b"[3,2,1]\n":
            raise RuntimeError(f"{argv[-1]!r}: status {out.returncode}: {out.stderr!r}")
    return samples


class Master:
    """An OpenSSH connection-multiplexing master (``ssh -M -N``), by pid."""

    def __init__(self, base: list[str], target: str, control: Path) -> None:
        self.control = control
        self.proc = subprocess.Popen(
            [*base, "-M", "-N", "-o", f"ControlPath={control}", target],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not control.exists():  # bounded polling of the master's socket
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("ssh -M did not start")
            time.sleep(0.02)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


async def kept_channel(
    port: int,
    user: str,
    identity: Path,
    known: Path,
    seq_calls: int,
    pipelined: int,
    serve_pid: int,
    cpu: dict[str, list[tuple[float, float]]],
) -> tuple[list[float], float]:
    async with open_connection(
        "127.0.0.1",
        port,
        user=user,
        identity=str(identity),
        known_hosts=str(known),
        agent=False,
        use_ssh_config=False,
    ) as node:
        for _ in range(20):
            await node.call("lists", "reverse", [[1, 2, 3]])
        samples = []
        meter = CPU(serve_pid)
        for _ in range(seq_calls):
            t0 = time.perf_counter()
            assert await node.call("lists", "reverse", [[1, 2, 3]]) == [3, 2, 1]
            samples.append((time.perf_counter() - t0) * 1e3)
        cpu["shell"].append(meter.per_call_ms(seq_calls))
        tasks = 64
        per_task = max(1, pipelined // tasks)

        async def worker() -> None:
            for _ in range(per_task):
                await node.call("lists", "reverse", [[1, 2, 3]])

        t0 = time.perf_counter()
        meter = CPU(serve_pid)
        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(worker)
        cpu["pipelined"].append(meter.per_call_ms(per_task * tasks))
        per_call = (time.perf_counter() - t0) * 1e3 / (per_task * tasks)
    return samples, per_call


async def own_exec_mod(
    port: int,
    user: str,
    identity: Path,
    known: Path,
    calls: int,
    serve_pid: int,
    cpu: dict[str, list[tuple[float, float]]],
) -> list[float]:
    """exec-mod with our client: one kept connection, a new channel per call."""
    async with open_connection(
        "127.0.0.1",
        port,
        user=user,
        identity=str(identity),
        known_hosts=str(known),
        agent=False,
        use_ssh_config=False,
    ) as node:
        async with node.open_channel() as warm:
            await warm.call("lists", "reverse", [[1, 2, 3]])
        samples = []
        meter = CPU(serve_pid)
        for _ in range(calls):
            t0 = time.perf_counter()
            async with node.open_channel() as channel:
                assert await channel.call("lists", "reverse", [[1, 2, 3]]) == [3, 2, 1]
            samples.append((time.perf_counter() - t0) * 1e3)
        cpu["exec-mod (sshrpc)"].append(meter.per_call_ms(calls))
    return samples


ROOT = Path(__file__).resolve().parents[1]


def erlang_exec_mod(user_dir: Path, port: int, user: str, calls: int) -> list[float]:
    """exec-mod with the Erlang client, in a fresh VM: ms per open+call+close."""
    ebin = ROOT / "erlang" / "ebin"
    prog = (
        "logger:set_primary_config(level, error), "
        f'{{ok, C}} = sshrpc:connect("127.0.0.1", {port}, '
        f'[{{user, "{user}"}}, {{user_dir, "{user_dir}"}}]), '
        "{ok, W} = sshrpc:open_channel(C), {ok, _} = sshrpc:call(W, lists, reverse, [[1]]), "
        "ok = sshrpc:close(W), "
        "T = [begin T0 = erlang:monotonic_time(nanosecond), {ok, Ch} = sshrpc:open_channel(C), "
        "{ok, [3, 2, 1]} = sshrpc:call(Ch, lists, reverse, [[1, 2, 3]]), ok = sshrpc:close(Ch), "
        f"erlang:monotonic_time(nanosecond) - T0 end || _ <- lists:seq(1, {calls})], "
        'io:format("samples ~w~n", [T]), sshrpc:close(C), halt().'
    )
    out = subprocess.run(
        ["erl", "-noshell", "-pa", str(ebin), "-eval", prog],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    ).stdout
    m = re.search(r"samples \[([0-9,\s]*)\]", out)
    if m is None:
        raise RuntimeError(f"Erlang client failed: {out[-2000:]}")
    return [int(x) / 1e6 for x in m.group(1).replace("\n", "").split(",")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--exec-calls", type=int, default=10, help="exec calls per round")
    parser.add_argument("--mod-calls", type=int, default=20, help="exec-mod calls per round")
    parser.add_argument("--seq-calls", type=int, default=300, help="shell calls per round")
    parser.add_argument("--pipelined", type=int, default=3200, help="pipelined calls per round")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if shutil.which("ssh") is None:
        print("OpenSSH's ssh is not installed", file=sys.stderr)
        return 1
    ssh_version = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"Python {platform.python_version()}; {ssh_version}", file=sys.stderr)  # fmt: skip
    erlang = shutil.which("erl") is not None
    if erlang:
        subprocess.run([str(ROOT / "erlang" / "build.sh")], check=True)
    else:
        print("# erl not found: no exec-mod (Erlang) row", file=sys.stderr)
    rows: dict[str, list[float]] = {name: [] for name in PAPER_MS}
    cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in PAPER_MS}
    with tempfile.TemporaryDirectory(prefix="table1-", dir=temp_root()) as tmp:
        d = Path(tmp)
        identity = d / "id_ed25519"
        pub = keygen(identity)
        proc, port, known_line = start_serve(d, pub)
        master = None
        try:
            known = d / "known_hosts"
            known.write_text(f"{known_line}\n")
            user = _user()
            base = ssh_base(port, user, identity, known)
            target = f"{user}@127.0.0.1"
            # A short control path: the socket's name must fit AF_UNIX.
            control = Path(tempfile.mkdtemp(prefix="t1-")) / "ctl"
            master = Master(base, target, control)
            mod_argv = [*base, "-o", f"ControlPath={control}", "-o", "ControlMaster=no"]
            names = [n for n in PAPER_MS if erlang or n != "exec-mod (Erlang)"]
            for r in range(args.rounds):
                k = r % len(names)
                order = names[k:] + names[:k]
                for name in order:
                    if name == "exec":
                        meter = CPU(proc.pid)
                        samples = timed_ssh([*base, target, COMMAND], args.exec_calls)
                        cpu[name].append(meter.per_call_ms(args.exec_calls))
                        rows[name].append(statistics.median(samples))
                    elif name == "exec-mod":
                        meter = CPU(proc.pid)
                        samples = timed_ssh([*mod_argv, target, COMMAND], args.mod_calls)
                        cpu[name].append(meter.per_call_ms(args.mod_calls))
                        rows[name].append(statistics.median(samples))
                    elif name == "exec-mod (sshrpc)":
                        samples = trio.run(
                            own_exec_mod, port, user, identity, known, args.mod_calls,
                            proc.pid, cpu,
                        )  # fmt: skip
                        rows[name].append(statistics.median(samples))
                    elif name == "exec-mod (Erlang)":
                        meter = CPU(proc.pid)
                        samples = erlang_exec_mod(d, port, user, args.mod_calls)
                        cpu[name].append(meter.per_call_ms(args.mod_calls))
                        rows[name].append(statistics.median(samples))
                    elif name == "shell":
                        seq, piped = trio.run(
                            kept_channel, port, user, identity, known, args.seq_calls,
                            args.pipelined, proc.pid, cpu,
                        )  # fmt: skip
                        rows["shell"].append(statistics.median(seq))
                        rows["pipelined"].append(piped)
                    # "pipelined" is measured with "shell" (one connection).
                print(f"# round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            if master is not None:
                master.close()
                shutil.rmtree(master.control.parent, ignore_errors=True)
            stop(proc)
    result = {name: statistics.median(values) for name, values in rows.items() if values}
    server_cpu = {n: statistics.median(v[0] for v in values) for n, values in cpu.items() if values}
    client_cpu = {n: statistics.median(v[1] for v in values) for n, values in cpu.items() if values}
    if args.json:
        json.dump(
            {"ms_per_call": result, "rounds": rows, "paper_ms": PAPER_MS,
             "server_cpu_ms_per_call": server_cpu, "client_cpu_ms_per_call": client_cpu},
            sys.stdout,
        )  # fmt: skip
        print()
        return 0
    print("| pattern | wall ms/call | server CPU ms/call | client CPU ms/call "
          "| paper (ms, Atom) | paper / wall |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for name, ms in result.items():
        print(f"| {name} | {ms:.3f} | {server_cpu[name]:.3f} | {client_cpu[name]:.3f} "
              f"| {PAPER_MS[name]} | {PAPER_MS[name] / ms:.1f}x |")  # fmt: skip
    return 0


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


if __name__ == "__main__":
    sys.exit(main())
