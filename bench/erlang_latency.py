"""Sequential round-trip latency across languages over one loopback SSH channel.

    .venv/bin/python bench/erlang_latency.py [--calls N]

Measures ``lists:reverse([1, 2, 3])`` called N times in a row (after a
warm-up) on one connection, for:

- Erlang -> Erlang: erlang/'s sshrpc client -> sshrpc_daemon (OTP ssh)
- Python -> Erlang: sshrpc.open_connection (libssh2) -> sshrpc_daemon
- Erlang -> Python: erlang/'s sshrpc client -> ``sshrpc serve sshrpc.demo:services``
  (OpenSSH sshd + the Python node)
- Python -> Python: sshrpc.open_connection -> the same ``sshrpc serve``

and prints median and p99 in microseconds. Every process it starts is
stopped by pid. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

import sshrpc
from sshrpc._statedir import temp_root
from sshrpc.client import open_connection

ROOT = Path(__file__).resolve().parents[1]
EBIN = ROOT / "erlang" / "ebin"


def keygen(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", str(path)],
        check=True,
    )
    return Path(f"{path}.pub").read_text().strip()


def erl_str(p: Path | str) -> str:
    return '"' + str(p).replace("\\", "\\\\").replace('"', '\\"') + '"'


def summary(samples_us: list[float]) -> tuple[float, float, int]:
    s = sorted(samples_us)
    return statistics.median(s), s[min(len(s) - 1, int(len(s) * 0.99))], len(s)


def read_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    raise RuntimeError(f"no {prefix!r} line from {proc.args!r}")


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def start_erlang_daemon(d: Path, client_pub: str) -> tuple[subprocess.Popen[str], int, str]:
    host = keygen(d / "system" / "ssh_host_ed25519_key")
    (d / "user").mkdir(parents=True, exist_ok=True)
    (d / "user" / "authorized_keys").write_text(client_pub + "\n")
    prog = (
        f"{{ok, R}} = sshrpc_daemon:start(0, [{{system_dir, {erl_str(d / 'system')}}}, "
        f"{{user_dir, {erl_str(d / 'user')}}}, {{allow, [{{lists, reverse, 1}}]}}]), "
        'io:format("port ~b~n", [sshrpc_daemon:port(R)]), io:get_line(""), halt().'
    )
    proc = subprocess.Popen(
        ["erl", "-noshell", "-pa", str(EBIN), "-eval", prog],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    port = int(read_line(proc, "port ", 30))
    kind, blob = host.split()[:2]
    return proc, port, f"[127.0.0.1]:{port} {kind} {blob}"


def erlang_client(user_dir: Path, port: int, user: str, calls: int) -> list[float]:
    prog = (
        "logger:set_primary_config(level, error), "
        f'{{ok, C}} = sshrpc:connect("127.0.0.1", {port}, '
        f'[{{user, "{user}"}}, {{user_dir, {erl_str(user_dir)}}}]), '
        "[{ok, _} = sshrpc:call(C, lists, reverse, [[1, 2, 3]]) || _ <- lists:seq(1, 200)], "
        "T = [begin T0 = erlang:monotonic_time(nanosecond), "
        "{ok, [3, 2, 1]} = sshrpc:call(C, lists, reverse, [[1, 2, 3]]), "
        f"erlang:monotonic_time(nanosecond) - T0 end || _ <- lists:seq(1, {calls})], "
        'io:format("samples ~w~n", [T]), sshrpc:close(C), halt().'
    )
    out = subprocess.run(
        ["erl", "-noshell", "-pa", str(EBIN), "-eval", prog],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    m = re.search(r"samples \[([0-9,\s]*)\]", out)
    if m is None:
        raise RuntimeError(f"Erlang client failed: {out[-2000:]}")
    return [int(x) / 1000 for x in m.group(1).replace("\n", "").split(",")]


async def python_client(
    port: int, user: str, identity: Path, known_hosts: Path, calls: int
) -> list[float]:
    samples = []
    async with open_connection(
        "127.0.0.1",
        port=port,
        user=user,
        identity=str(identity),
        known_hosts=str(known_hosts),
        agent=False,
    ) as node:
        for _ in range(200):
            await node.call("lists", "reverse", [[1, 2, 3]])
        for _ in range(calls):
            t0 = time.perf_counter_ns()
            assert await node.call("lists", "reverse", [[1, 2, 3]]) == [3, 2, 1]
            samples.append((time.perf_counter_ns() - t0) / 1000)
    return samples


def start_python_node(d: Path, client_pub: str) -> tuple[subprocess.Popen[str], int, str]:
    sys.path.insert(0, str(ROOT / "src"))
    from sshrpc._sshd import free_port

    d.mkdir(parents=True, exist_ok=True)
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
            return proc, port, known
    stop(proc)
    raise RuntimeError("sshrpc serve did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    subprocess.run([str(ROOT / "erlang" / "build.sh")], check=True)
    otp = subprocess.run(
        ["erl", "-noshell", "-eval",
         'io:format("~s", [erlang:system_info(otp_release)]), halt().'],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    machine = f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs"
    versions = f"Python {platform.python_version()}, OTP {otp}, sshrpc {sshrpc.__version__}"
    print(f"# {machine}, {versions}")
    print(f"# lists:reverse([1,2,3]) x {args.calls}, sequential, one channel, 127.0.0.1")
    user = os.environ.get("USER") or "root"
    results: list[tuple[str, tuple[float, float, int] | str]] = []
    with tempfile.TemporaryDirectory(prefix="sshrpc-bench-", dir=temp_root()) as tmp:
        base = Path(tmp)
        pub = keygen(base / "client" / "id_ed25519")
        identity = base / "client" / "id_ed25519"
        procs: list[subprocess.Popen[str]] = []
        try:
            eproc, eport, eknown = start_erlang_daemon(base / "erlang", pub)
            procs.append(eproc)
            udir = base / "client"
            (udir / "known_hosts").write_text(eknown + "\n")
            results.append(
                ("Erlang -> Erlang", summary(erlang_client(udir, eport, user, args.calls)))
            )
            samples = trio.run(
                python_client, eport, user, identity, udir / "known_hosts", args.calls
            )
            results.append(("Python -> Erlang", summary(samples)))
            try:
                pproc, pport, pknown = start_python_node(base / "python", pub)
            except Exception as exc:  # the Python node may be missing
                results.append(("Erlang -> Python", f"n/a ({exc})"))
                results.append(("Python -> Python", "n/a"))
            else:
                procs.append(pproc)
                udir2 = base / "client2"
                udir2.mkdir()
                shutil.copy(identity, udir2 / "id_ed25519")
                (udir2 / "known_hosts").write_text(pknown + "\n")
                results.append(
                    ("Erlang -> Python", summary(erlang_client(udir2, pport, user, args.calls)))
                )
                samples = trio.run(
                    python_client, pport, user, identity, udir2 / "known_hosts", args.calls
                )
                results.append(("Python -> Python", summary(samples)))
        finally:
            for p in procs:
                stop(p)
    print(f"{'path':<18} {'median us':>10} {'p99 us':>10} {'calls':>7}")
    for name, r in results:
        if isinstance(r, str):
            print(f"{name:<18} {r}")
        else:
            print(f"{name:<18} {r[0]:>10.0f} {r[1]:>10.0f} {r[2]:>7}")


if __name__ == "__main__":
    main()
