"""Drive real Erlang VMs from pytest: build erlang/, start nodes, evaluate.

- ``build()`` compiles erlang/src and erlang/test with ``erlang/build.sh test``
  (once per test process).
- ``ErlangNode()`` starts ``erl`` running the test-only driver
  (erlang/test/sshrpc_test_driver.erl) and evaluates Erlang expressions sent
  one per line; bindings persist between calls.  ``eval`` returns the value
  decoded with ``sshrpc.decode``; ``eval_text`` returns it printed with ~tp.
  A raise in Erlang raises ``ErlangRaised`` here.  ``close()`` stops the VM
  by its pid.
- ``start_erlang_server(node, directory, authorized_keys, allow=..., ...)``
  starts ``sshrpc_daemon`` inside a node on a free loopback port with a fresh
  host key and returns an ``ErlangServer`` (port, known_hosts line, dirs).
- ``erlang_client_dir(directory, identity, known_hosts_lines)`` makes the
  ``user_dir`` an Erlang ssh client needs (its key and known_hosts).
- ``RawChannel`` opens the sshrpc subsystem with OpenSSH's own client and
  sends and receives hand-built frames, for hostile-input tests.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import sshrpc

REPO = Path(__file__).resolve().parents[2]
ERLANG_DIR = REPO / "erlang"
EBIN = ERLANG_DIR / "ebin"
EBIN_TEST = EBIN / "test"

_built = False


def erlang_available() -> bool:
    """True if erl and erlc are installed on this machine."""
    return shutil.which("erl") is not None and shutil.which("erlc") is not None


def build() -> None:
    """Compile the Erlang modules and test helpers (once per process)."""
    global _built
    if _built:
        return
    subprocess.run(
        [str(ERLANG_DIR / "build.sh"), "test"],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
    )
    _built = True


class ErlangRaised(Exception):
    """An expression raised in the Erlang node: ``cls`` and ``reason`` as text."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class ErlangNode:
    """One ``erl`` VM evaluating expressions for a test.  Not thread-safe."""

    def __init__(self, extra_args: list[str] | None = None, start_timeout: float = 30.0) -> None:
        build()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        argv = [
            "erl",
            "-noshell",
            "-pa",
            str(EBIN),
            "-pa",
            str(EBIN_TEST),
            "-kernel",
            "logger",
            "[{handler,default,logger_std_h,#{config=>#{type=>standard_error}}}]",
            *(extra_args or []),
            "-s",
            "sshrpc_test_driver",
            "main",
        ]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            start_new_session=True,
        )
        self._buf = b""
        line = self._read_line(start_timeout)
        if line != b"ready":
            self.close()
            raise RuntimeError(f"erl driver did not start: {line!r} {self.stderr_tail()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_tail(self, n: int = 4000) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-n:]

    def _read_line(self, timeout: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"erl did not answer within {timeout} s; {self.stderr_tail()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"erl exited: {self.stderr_tail()}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _eval(self, expr: str, timeout: float) -> tuple[bytes, str]:
        assert self.proc.stdin is not None
        src = " ".join(expr.strip().splitlines())
        if not src.endswith("."):
            src += "."
        self.proc.stdin.write(src.encode() + b"\n")
        self.proc.stdin.flush()
        status, etf, text = self._read_line(timeout).split(b" ")
        value_text = base64.b64decode(text).decode()
        if status == b"raised":
            raise ErlangRaised(value_text)
        return base64.b64decode(etf), value_text

    def eval(self, expr: str, timeout: float = 30.0) -> Any:
        """Evaluate ``expr`` (Erlang, may bind variables); its value, decoded."""
        etf, _ = self._eval(expr, timeout)
        return sshrpc.decode(etf)

    def make_atoms(self, names: list[str]) -> None:
        """Create the atoms ``names`` in this VM, for a server that decodes
        with ``[safe]`` (which refuses atoms the VM does not know)."""
        self.eval("[list_to_atom(A) || A <- [" + ",".join(erl_string(n) for n in names) + "]]")

    def eval_text(self, expr: str, timeout: float = 30.0) -> str:
        """Evaluate ``expr``; its value printed by Erlang with ~tp."""
        return self._eval(expr, timeout)[1]

    def wait_until(self, expr: str, timeout: float = 10.0) -> None:
        """Evaluate ``expr`` until it is ``true``; bounded polling with a deadline."""
        deadline = time.monotonic() + timeout
        while True:
            if self.eval(expr) is True:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr} not true within {timeout} s")
            self.eval("receive after 20 -> ok end")

    def close(self, timeout: float = 10.0) -> None:
        """Stop the VM: close its stdin (the driver halts), then kill by pid."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


def erl_string(s: str | Path) -> str:
    """An Erlang string literal for ``s``."""
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


def ssh_keygen(path: Path, comment: str = "sshrpc-erlang-test") -> str:
    """Generate an ed25519 key pair at ``path``; the public key line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return Path(str(path) + ".pub").read_text().strip()


@dataclasses.dataclass
class ErlangServer:
    """An sshrpc_daemon running inside ``node`` (variable ``ref`` names it there)."""

    node: ErlangNode
    ref: str
    port: int
    host_public_line: str
    system_dir: Path
    user_dir: Path

    @property
    def known_hosts_line(self) -> str:
        kind, blob = self.host_public_line.split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {blob}"

    def stop(self) -> None:
        if self.node.proc.poll() is None:
            self.node.eval(f"sshrpc_daemon:stop({self.ref})")


def start_erlang_server(
    node: ErlangNode,
    directory: Path,
    authorized_keys: list[str],
    allow: str = "[]",
    options: str = "",
    ref: str = "Daemon",
) -> ErlangServer:
    """Start sshrpc_daemon in ``node`` on a free 127.0.0.1 port.

    ``allow`` is an Erlang list of {M, F, A} rules; ``options`` more Erlang
    proplist entries (e.g. ``"{max_calls, 2}"``).  The daemon's ref is bound
    to the variable ``ref`` in the node.
    """
    system_dir = directory / "system"
    user_dir = directory / "user"
    host_line = ssh_keygen(system_dir / "ssh_host_ed25519_key", "sshrpc-erlang-host")
    user_dir.mkdir(parents=True, exist_ok=True)
    (user_dir / "authorized_keys").write_text("".join(k + "\n" for k in authorized_keys))
    extra = f", {options}" if options else ""
    node.eval(
        f"{{ok, {ref}}} = sshrpc_daemon:start(0, [{{system_dir, {erl_string(system_dir)}}}, "
        f"{{user_dir, {erl_string(user_dir)}}}, {{allow, {allow}}}{extra}])"
    )
    port = node.eval(f"sshrpc_daemon:port({ref})")
    return ErlangServer(node, ref, port, host_line, system_dir, user_dir)


def erlang_client_dir(directory: Path, identity: Path, known_hosts_lines: list[str]) -> Path:
    """A user_dir for OTP's ssh client: ``id_ed25519`` and ``known_hosts``."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(identity, directory / "id_ed25519")
    os.chmod(directory / "id_ed25519", 0o600)
    shutil.copyfile(Path(str(identity) + ".pub"), directory / "id_ed25519.pub")
    (directory / "known_hosts").write_text("".join(line + "\n" for line in known_hosts_lines))
    return directory


class RawChannel:
    """The sshrpc subsystem through OpenSSH's ``ssh -s``: frames by hand."""

    def __init__(
        self,
        port: int,
        identity: Path,
        known_hosts: Path,
        subsystem: str = "sshrpc@k2r.org",
        user: str = "tester",
    ) -> None:
        argv = [
            "ssh", "-F", "/dev/null", "-s", "-p", str(port), "-i", str(identity),
            "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            f"{user}@127.0.0.1", subsystem,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self._buf = b""

    def send_bytes(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, term: Any) -> None:
        payload = sshrpc.encode(term)
        self.send_bytes(struct.pack(">I", len(payload)) + payload)

    def _fill(self, n: int, deadline: float) -> bool:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while len(self._buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from the server in time")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    return False
                self._buf += chunk
        return True

    def recv(self, timeout: float = 10.0) -> Any:
        """The next term from the server; ``EOFError`` if the channel closed."""
        deadline = time.monotonic() + timeout
        while True:
            if not self._fill(4, deadline):
                raise EOFError("channel closed")
            (n,) = struct.unpack(">I", self._buf[:4])
            if not self._fill(4 + n, deadline):
                raise EOFError("channel closed mid-frame")
            payload, self._buf = self._buf[4 : 4 + n], self._buf[4 + n :]
            if n:
                return sshrpc.decode(payload)

    def wait_closed(self, timeout: float = 10.0) -> int:
        """Wait for the server to close the channel; ssh's exit status."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while self._fill(len(self._buf) + 1, deadline):
            pass
        return self.proc.wait(max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


def hello(ch: RawChannel, max_frame: int = 1 << 20) -> dict[Any, Any]:
    """Send a client hello on a raw channel; return the server's hello map."""
    ch.send(
        (
            sshrpc.Atom("hello"),
            1,
            {sshrpc.Atom("max_frame"): max_frame, sshrpc.Atom("client"): b"raw/0"},
        )
    )
    tag, version, info = ch.recv()
    assert (tag, version) == ("hello", 1)
    return info  # type: ignore[no-any-return]
