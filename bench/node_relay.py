"""What the relay costs: per call and per channel, relay mode vs in-process mode.

    .venv/bin/python bench/node_relay.py [--calls 2000] [--channels 20] [--json]

Starts a private sshd (127.0.0.1, free port, temporary state) whose subsystem
is either the relay to a node (``sshrpc node``, its own process) or the
in-process subsystem (``python -m sshrpc.subsystem``), and drives it with
OpenSSH's ``ssh -s``:

- per channel: spawn ``ssh -s`` until the server's hello is read (SSH
  handshake + auth + subsystem start-up), median of ``--channels`` runs;
- subsystem start-up alone: the program sshd runs, timed without ssh
  (relay: ``python -I -S _relay.py``; in-process: importing the node and the
  demo services), median of 20;
- per call: sequential ``echo:echo(<<"x">>)`` round trips on one channel
  after the hello, median and p99 of ``--calls``;
- and two floors: ``cat`` as the subsystem (SSH alone: the frames come back
  unchanged) and the node's Unix socket without ssh.

Prints a table (times in ms).  Never run by the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pwd
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import sshrpc
from sshrpc import Atom
from sshrpc._sshd import PrivateSSHD
from sshrpc._statedir import temp_root
from sshrpc.subsystem import RELAY_PATH, in_process_command, native_relay, relay_command

A = Atom


def frame(term: object) -> bytes:
    payload = sshrpc.encode(term)
    return struct.pack(">I", len(payload)) + payload


HELLO = frame((A("hello"), 1, {A("max_frame"): 1 << 20}))


class Reader:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()

    def term(self) -> object:
        while True:
            while len(self.buf) < 4:
                self._more()
            (size,) = struct.unpack(">I", self.buf[:4])
            while len(self.buf) < 4 + size:
                self._more()
            payload = bytes(self.buf[4 : 4 + size])
            del self.buf[: 4 + size]
            if size:
                return sshrpc.decode(payload)

    def _more(self) -> None:
        data = os.read(self.fd, 65536)
        if not data:
            raise EOFError
        self.buf += data


def ssh_argv(sshd: PrivateSSHD, key: Path, known_hosts: Path) -> list[str]:
    return [
        "ssh", "-F", "/dev/null", "-s", "-p", str(sshd.port), "-i", str(key),
        "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
        "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
        f"{pwd.getpwuid(os.getuid()).pw_name}@127.0.0.1", "sshrpc@k2r.org",
    ]  # fmt: skip


def open_channel(argv: list[str]) -> tuple[subprocess.Popen[bytes], Reader, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(HELLO)
    proc.stdin.flush()
    reader = Reader(proc.stdout.fileno())
    hello = reader.term()
    elapsed = time.perf_counter() - start
    assert isinstance(hello, tuple) and hello[0] == "hello", hello
    return proc, reader, elapsed


def close(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


def calls(write, reader: Reader, n: int, echo: bool = False) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for i in range(n):
        request = frame((A("call"), i, A("echo"), A("echo"), [b"x"]))
        start = time.perf_counter()
        write(request)
        answer = reader.term()
        out.append(time.perf_counter() - start)
        expected = sshrpc.decode(request[4:]) if echo else (A("reply"), i, b"x")
        assert answer == expected, answer
    return out


def p99(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(len(xs) * 0.99))]


def startup(argv: list[str], runs: int = 20) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--channels", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sshrpc-bench-", dir=temp_root()))
    results: dict[str, dict[str, float]] = {}
    node_proc = None
    try:
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "id")], check=True
        )
        keys = tmp / "authorized_keys"
        shutil.copy(tmp / "id.pub", keys)
        sock = tmp / "node" / "node.sock"
        node_proc = subprocess.Popen(
            [sys.executable, "-m", "sshrpc.cli", "node", "sshrpc.demo:services",
             "--socket", str(sock)],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert node_proc.stdout is not None
        assert node_proc.stdout.readline().startswith(b"ready")
        native = native_relay()
        modes = {
            "cat (ssh floor)": "cat",
            "relay": relay_command(sock),
            **({"relay-c": relay_command(sock, native=native)} if native else {}),
            "in-process": in_process_command(["sshrpc.demo:services"]),
        }
        for mode, command in modes.items():
            with PrivateSSHD(
                tmp / f"sshd-{mode.split()[0]}",
                authorized_keys=keys,
                subsystems={"sshrpc@k2r.org": command},
            ) as sshd:
                known = tmp / f"known-{mode.split()[0]}"
                known.write_text(sshd.known_hosts_line + "\n")
                argv = ssh_argv(sshd, tmp / "id", known)
                per_channel = []
                for _ in range(args.channels):
                    proc, _, elapsed = open_channel(argv)
                    per_channel.append(elapsed)
                    close(proc)
                proc, reader, _ = open_channel(argv)
                assert proc.stdin is not None
                stdin = proc.stdin

                def write(data: bytes, stdin=stdin) -> None:  # type: ignore[no-untyped-def]
                    stdin.write(data)
                    stdin.flush()

                lat = calls(write, reader, args.calls, echo=command == "cat")
                close(proc)
            results[mode] = {
                "channel_open_ms": statistics.median(per_channel) * 1e3,
                "call_median_ms": statistics.median(lat) * 1e3,
                "call_p99_ms": p99(lat) * 1e3,
            }
        results["relay"]["startup_ms"] = (
            startup([sys.executable, "-I", "-S", RELAY_PATH, str(tmp / "none.sock"), "--subsystem"])
            * 1e3
        )
        if native:
            results["relay-c"]["startup_ms"] = (
                startup([native, str(tmp / "none.sock"), "--subsystem"]) * 1e3
            )
        results["in-process"]["startup_ms"] = (
            startup([sys.executable, "-c", "import sshrpc.node, sshrpc.demo"]) * 1e3
        )
        # The node's socket directly (no ssh, no relay).
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock))
        s.sendall(b"SRLY" + (1).to_bytes(4, "big") + b"\0" + HELLO)
        reader = Reader(s.fileno())
        reader.term()
        lat = calls(s.sendall, reader, args.calls)
        s.close()
        results["node socket (no ssh)"] = {
            "call_median_ms": statistics.median(lat) * 1e3,
            "call_p99_ms": p99(lat) * 1e3,
        }
    finally:
        if node_proc is not None:
            node_proc.terminate()
            node_proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"# {platform.node()} {platform.machine()} Python {platform.python_version()}, "
        f"{os.cpu_count()} cores; {args.calls} calls, {args.channels} channels"
    )
    cols = ["channel_open_ms", "startup_ms", "call_median_ms", "call_p99_ms"]
    print("| mode | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for mode, row in results.items():
        cells = [f"{row[c]:.3f}" if c in row else "-" for c in cols]
        print(f"| {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
