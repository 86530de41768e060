"""Shared fixtures: a client key pair and private OpenSSH sshd servers.

- ``client_key``: an ed25519 key pair (session scoped), no passphrase.
- ``private_sshd``: a factory; ``private_sshd(subsystems={"name": "command"})``
  starts a real sshd on 127.0.0.1 (free port, own state dir and host key)
  that authorizes ``client_key`` (or the ``authorized_keys`` lines given), and
  returns a ``SSHDInfo``.  Every sshd started is stopped at teardown.
- ``sshrpc_server``: ``sshrpc serve sshrpc.demo:services`` as a subprocess,
  authorizing ``client_key``; yields a ``SSHDInfo``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from sshrpc._sshd import PrivateSSHD, free_port


def _safe_temp_root() -> None:
    """Put pytest's ``tmp_path`` directories under ``~/.cache/st``.

    The private sshd runs with ``StrictModes yes``, and ``sshrpc serve``
    refuses a state directory that sshd would: every directory above it must be
    owned by root or the serving user and writable by no one else.  ``/tmp``
    (mode 1777) is not, so the default ``/tmp/pytest-of-USER`` cannot hold a
    state directory.  An explicit ``--basetemp`` is still honoured.  (Short:
    ``STATE/node/node.sock`` must fit a Unix socket path.)
    """
    root = Path.home() / ".cache" / "st"
    for directory in (root.parent, root):
        directory.mkdir(mode=0o700, exist_ok=True)
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", str(root))


_safe_temp_root()


@dataclasses.dataclass(frozen=True)
class ClientKey:
    """An ed25519 key pair on disk."""

    private: Path
    public: Path
    public_line: str
    fingerprint: str


@dataclasses.dataclass
class SSHDInfo:
    """Where a test sshd listens and what a client needs to reach it."""

    host: str
    port: int
    user: str
    known_hosts: Path
    identity: Path
    host_fingerprint: str
    state_dir: Path
    sshd: PrivateSSHD | None = None
    pid: int | None = None

    def ssh_argv(self, subsystem: str = "sshrpc@k2r.org", *extra: str) -> list[str]:
        """OpenSSH client argv that opens ``subsystem`` on this server."""
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-s",
            "-p",
            str(self.port),
            "-i",
            str(self.identity),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "IdentityAgent=none",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            *extra,
            f"{self.user}@{self.host}",
            subsystem,
        ]


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def make_key(directory: Path, name: str = "id_ed25519", comment: str = "sshrpc-test") -> ClientKey:
    """Generate an ed25519 key pair in ``directory``."""
    from sshrpc._sshd import key_fingerprint

    directory.mkdir(parents=True, exist_ok=True)
    private = directory / name
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(private)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    public = directory / (name + ".pub")
    line = public.read_text().strip()
    return ClientKey(private, public, line, key_fingerprint(line))


@pytest.fixture(scope="session")
def client_key(tmp_path_factory: pytest.TempPathFactory) -> ClientKey:
    """A generated ed25519 client key pair, shared by the whole session."""
    return make_key(tmp_path_factory.mktemp("client_key"), comment="sshrpc-test-client")


@pytest.fixture
def private_sshd(
    tmp_path_factory: pytest.TempPathFactory, client_key: ClientKey
) -> Iterator[Callable[..., SSHDInfo]]:
    """Factory: ``private_sshd(subsystems, authorized_keys=None, extra_config=())``.

    ``authorized_keys`` is a list of authorized_keys lines (default: the
    ``client_key`` public line).  Returns an ``SSHDInfo`` whose
    ``known_hosts`` file trusts the server.
    """
    if shutil.which("ssh-keygen") is None or not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("OpenSSH (sshd, ssh-keygen) is not installed on this machine")
    started: list[PrivateSSHD] = []

    def start(
        subsystems: Mapping[str, str],
        authorized_keys: Sequence[str] | None = None,
        extra_config: Sequence[str] = (),
    ) -> SSHDInfo:
        base = tmp_path_factory.mktemp("sshd")
        state = base / "state"
        keys_file = base / "authorized_keys"
        lines = [client_key.public_line] if authorized_keys is None else list(authorized_keys)
        keys_file.write_text("".join(line + "\n" for line in lines))
        sshd = PrivateSSHD(
            state, authorized_keys=keys_file, subsystems=subsystems, extra_config=extra_config
        )
        # From the test's main thread: sshd ends with pytest, even a killed one.
        sshd.start(die_with_parent=True)
        started.append(sshd)
        known_hosts = base / "known_hosts"
        known_hosts.write_text(sshd.known_hosts_line + "\n")
        return SSHDInfo(
            host=sshd.host,
            port=sshd.port,
            user=_user(),
            known_hosts=known_hosts,
            identity=client_key.private,
            host_fingerprint=sshd.host_fingerprint,
            state_dir=state,
            sshd=sshd,
            pid=sshd.pid,
        )

    try:
        yield start
    finally:
        for sshd in started:
            sshd.stop()


@pytest.fixture
def sshrpc_server(
    tmp_path_factory: pytest.TempPathFactory, client_key: ClientKey
) -> Iterator[SSHDInfo]:
    """``sshrpc serve sshrpc.demo:services`` on a free port, authorizing
    ``client_key``; stopped (SIGTERM, then SIGKILL) at teardown."""
    if shutil.which("ssh-keygen") is None or not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("OpenSSH (sshd, ssh-keygen) is not installed on this machine")
    base = tmp_path_factory.mktemp("serve")
    keys_file = base / "authorized_keys"
    keys_file.write_text(client_key.public_line + "\n")
    state = base / "state"
    info = start_serve(
        ["sshrpc.demo:services"],
        state_dir=state,
        authorized_keys=keys_file,
        identity=client_key.private,
    )
    try:
        yield info
    finally:
        stop_serve(info)


_SERVE_PROCS: dict[int, subprocess.Popen[bytes]] = {}


def start_serve(
    targets: Sequence[str],
    *,
    state_dir: Path,
    authorized_keys: Path,
    identity: Path,
    extra_args: Sequence[str] = (),
    timeout: float = 30.0,
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    host: str = "127.0.0.1",
) -> SSHDInfo:
    """Run ``sshrpc serve`` and wait for its ready line; return where it listens.

    The known_hosts file is written next to the state dir from the line
    ``sshrpc serve`` prints.  ``python`` and ``env`` choose the interpreter
    (and so the installed sshrpc) and the environment it runs with; ``host``
    the address it listens on (``::1`` for IPv6).  ``port`` defaults to a
    free one.  Raises ``RuntimeError`` with serve's output if it exits
    before it is ready.
    """
    port = free_port(host) if port is None else port
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = state_dir.parent / f"serve-{port}.log"
    log = open(log_path, "wb")  # noqa: SIM115 -- handed to the child
    proc = subprocess.Popen(
        [
            python,
            "-m",
            "sshrpc.cli",
            "serve",
            *targets,
            "--host",
            host,
            "--port",
            str(port),
            "--state-dir",
            str(state_dir),
            "--authorized-keys",
            str(authorized_keys),
            *extra_args,
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_terminate_with_parent,
        env=env,
    )
    log.close()
    _SERVE_PROCS[proc.pid] = proc
    deadline = time.monotonic() + timeout
    known_line = None
    fingerprint = ""
    while True:
        text = log_path.read_text(errors="replace")
        for line in text.splitlines():
            if line.startswith("known_hosts: "):
                known_line = line.removeprefix("known_hosts: ").strip()
            elif line.startswith("fingerprint: "):
                fingerprint = line.removeprefix("fingerprint: ").strip()
        if any(line.startswith("ready") for line in text.splitlines()):
            break
        if proc.poll() is not None:
            _SERVE_PROCS.pop(proc.pid, None)
            raise RuntimeError(f"sshrpc serve exited ({proc.returncode}):\n{text}")
        if time.monotonic() > deadline:
            _kill(proc)
            raise RuntimeError(f"sshrpc serve not ready within {timeout} s:\n{text}")
        time.sleep(0.02)  # bounded polling of a child's log, with a deadline
    assert known_line is not None, text
    known_hosts = state_dir.parent / f"known_hosts-{port}"
    known_hosts.write_text(known_line + "\n")
    return SSHDInfo(
        host=host,
        port=port,
        user=_user(),
        known_hosts=known_hosts,
        identity=identity,
        host_fingerprint=fingerprint,
        state_dir=state_dir,
        pid=proc.pid,
    )


def _terminate_with_parent() -> None:
    """In the child: SIGTERM when the test process dies, so a pytest killed
    by a timeout does not leave ``sshrpc serve`` and its sshd running (the
    fixtures call ``start_serve`` from the main thread, which is the thread
    whose exit Linux reports)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def stop_serve(info: SSHDInfo) -> int | None:
    """SIGTERM the ``sshrpc serve`` process of ``info``; return its exit code."""
    assert info.pid is not None
    proc = _SERVE_PROCS.pop(info.pid, None)
    if proc is None:
        return None
    _kill(proc)
    return proc.returncode
