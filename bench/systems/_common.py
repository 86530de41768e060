"""Shared pieces of the benchmark: ports, keys, a private sshd, process-tree
accounting, and the line protocol between ``bench/run.py`` and client drivers.

Driver protocol (one line in, one line out, on the driver's stdin/stdout; the
Erlang driver speaks it too, so it is plain text):

    connect                     -> ok SECONDS_TO_FIRST_ANSWER   (opens the kept channel)
    latency N MAX_S SIZE        -> ok NS NS ...   one sequential call per figure
    pipe DEPTH N MAX_S          -> ok CALLS NS    calls completed and time taken
    bulk SIZE REPS MAX_S        -> ok NS NS ...   one echo of SIZE bytes per figure
    setup N MAX_S               -> ok NS NS ...   new connection per call, to first answer
    chan N MAX_S                -> ok NS NS ...   new channel per call on the kept connection
    quit                        -> (exits)
    anything unsupported        -> err REASON

Every loop in a driver stops at N and at MAX_S seconds, whichever comes first.
The call is ``sshrpc_bench:echo(Value)``, answered with ``Value``.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[2]
PYTHON = str(ROOT / ".venv" / "bin" / "python")
SUBSYSTEM = "sshrpc@k2r.org"
CIPHER = "aes128-gcm@openssh.com"
#: Largest payload any system here is asked to carry (bulk sweep top + headroom).
MAX_FRAME = 64 * 1024 * 1024 + 4096
ECHO_MODULE = "sshrpc_bench"
ECHO_FUNCTION = "echo"


# --------------------------------------------------------------------------
# ports, keys, processes


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, deadline_s: float, proc: subprocess.Popen[Any] | None = None) -> None:
    """Poll until something accepts on ``127.0.0.1:port``; raise past the deadline
    or if ``proc`` exits first."""
    end = time.monotonic() + deadline_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > end:
                raise RuntimeError(f"nothing listens on port {port} after {deadline_s} s") from None
            time.sleep(0.02)


def keygen(path: Path, comment: str = "bench") -> Path:
    """An ed25519 key pair at ``path`` (and ``path.pub``), made once."""
    if not path.exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
            check=True,
            stdin=subprocess.DEVNULL,
        )
    return path


def stop_process(proc: subprocess.Popen[Any], grace_s: float = 3.0) -> None:
    """SIGTERM ``proc`` by its PID, wait up to ``grace_s``, then SIGKILL it."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(grace_s)


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        ppid = int(data[data.rindex(b")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree_pids(root: int) -> list[int]:
    """``root`` and its live descendants."""
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu_s(roots: Sequence[int]) -> float:
    """CPU seconds (user+system) used so far by the process trees at ``roots``,
    including reaped children of live members."""
    total = 0
    for root in roots:
        for pid in tree_pids(root):
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            fields = data[data.rindex(b")") + 2 :].split()
            total += sum(int(x) for x in fields[11:15])
    return total / _TICK


def tree_rss_bytes(roots: Sequence[int]) -> int:
    """Resident memory of the process trees at ``roots``, summed."""
    total = 0
    for root in roots:
        for pid in tree_pids(root):
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
                            break
            except OSError:
                continue
    return total


# --------------------------------------------------------------------------
# a private OpenSSH sshd


class PrivateSshd:
    """OpenSSH's sshd on 127.0.0.1 with its own config, host key and
    authorized_keys, serving the given subsystems.  ``stop()`` kills it by PID.
    """

    def __init__(
        self, state: Path, subsystems: dict[str, str], client_key: Path | None = None
    ) -> None:
        self.state = state
        self.subsystems = subsystems
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        state.mkdir(parents=True, exist_ok=True)
        self.host_key = keygen(state / "host_ed25519", "host")
        self.client_key = client_key or keygen(state / "client_ed25519", "bench-client")
        self.known_hosts = state / "known_hosts"

    def start(self) -> None:
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        self.port = free_port()
        ak = self.state / "authorized_keys"
        ak.write_text(Path(f"{self.client_key}.pub").read_text())
        host_pub = (self.state / "host_ed25519.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        lines = [
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {ak}",
            f"PidFile {self.state / 'sshd.pid'}",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            "StrictModes no",
            "UseDNS no",
            "PrintMotd no",
            "LogLevel ERROR",
            "MaxStartups 100:30:200",
            "MaxSessions 64",
            f"Ciphers {CIPHER},aes256-gcm@openssh.com,aes128-ctr,chacha20-poly1305@openssh.com",
        ]
        lines += [f"Subsystem {name} {cmd}" for name, cmd in self.subsystems.items()]
        cfg = self.state / "sshd_config"
        cfg.write_text("\n".join(lines) + "\n")
        log = open(self.state / "sshd.log", "ab")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(cfg)], stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
        log.close()
        wait_port(self.port, 10, self.proc)

    def ssh_argv(self, subsystem: str) -> list[str]:
        """An OpenSSH client command line that opens ``subsystem`` here."""
        return [
            "ssh",
            "-F",
            "none",
            "-p",
            str(self.port),
            "-i",
            str(self.client_key),
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-c",
            CIPHER,
            # the key exchange libssh2 and paramiko negotiate; OpenSSH 9's default
            # (sntrup761x25519) costs 100-300 ms more per set-up on this machine
            "-o",
            "KexAlgorithms=curve25519-sha256",
            "-s",
            "root@127.0.0.1",
            subsystem,
        ]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


# --------------------------------------------------------------------------
# the harness side of the driver protocol


class DriverError(RuntimeError):
    pass


class DriverTimeout(DriverError):
    pass


class Driver:
    """A client driver process; ``request`` sends one command and waits
    (bounded) for its one-line answer."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        log = open(log_path, "ab")  # noqa: SIM115 (closed right after the spawn)
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, **(env or {})},
            cwd=str(ROOT),
        )
        log.close()
        self._buf = b""

    def request(self, line: str, timeout_s: float) -> list[float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if self.proc.poll() is not None:
            raise DriverError(f"driver exited with {self.proc.returncode}")
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise DriverError("driver exited") from None
        end = time.monotonic() + timeout_s
        while True:
            answer = self._readline(max(0.0, end - time.monotonic()))
            if answer.startswith(("ok", "err")):
                break
        parts = answer.split()
        if not parts or parts[0] != "ok":
            raise DriverError(answer.strip() or "empty answer")
        return [float(x) for x in parts[1:]]

    def _readline(self, timeout_s: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        end = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0:
                raise DriverTimeout(f"no answer within {timeout_s:.0f} s")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise DriverError(f"driver exited ({self.proc.poll()})")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(3)
        stop_process(self.proc)


# --------------------------------------------------------------------------
# the driver side, for Python drivers


def ok(values: Sequence[float | int]) -> str:
    return "ok " + " ".join(str(v) for v in values)


def parse_command(line: str) -> tuple[str, list[float]]:
    parts = line.split()
    if not parts:
        return "", []
    return parts[0], [float(x) for x in parts[1:]]


def run_sync_driver(handlers: dict[str, Callable[..., str]], stdin: IO[str] = sys.stdin) -> None:
    """Serve the driver protocol with blocking handlers until ``quit`` or EOF."""
    out = sys.stdout
    for line in stdin:
        op, args = parse_command(line)
        if op in ("quit", ""):
            if op == "quit":
                break
            continue
        handler = handlers.get(op)
        if handler is None:
            answer = f"err {op} unsupported"
        else:
            try:
                answer = handler(*args)
            except Exception as exc:  # reported to the harness, which marks the figure n/a
                answer = f"err {type(exc).__name__}: {exc}".replace("\n", " ")
        out.write(answer + "\n")
        out.flush()


def payload(size: int) -> bytes:
    """The bytes every system echoes for a given size."""
    pattern = bytes(range(256))
    return (pattern * (size // 256 + 1))[:size]


async def run_trio_driver(handlers: dict[str, Callable[..., Any]]) -> None:
    """Serve the driver protocol with async handlers (Trio) until ``quit`` or EOF.
    Commands are read in a worker thread; the calls run on the Trio loop."""
    import trio

    while True:
        line = await trio.to_thread.run_sync(sys.stdin.readline)
        op, args = parse_command(line)
        if not line or op == "quit":
            return
        if not op:
            continue
        handler = handlers.get(op)
        if handler is None:
            answer = f"err {op} unsupported"
        else:
            try:
                answer = await handler(*args)
            except Exception as exc:  # reported to the harness, which marks the figure n/a
                answer = f"err {type(exc).__name__}: {exc}".replace("\n", " ")
        sys.stdout.write(answer + "\n")
        sys.stdout.flush()
