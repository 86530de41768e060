"""A private OpenSSH ``sshd``: state directory, generated config, child process.

Used by ``sshrpc serve`` and by the test fixtures.  Everything lives in one
state directory (mode 0700) that this module creates:

- ``ssh_host_ed25519_key`` (+ ``.pub``): the host key, generated once and kept,
  so clients' known_hosts lines stay valid across restarts;
- ``sshd_config``: rewritten at every start from the arguments;
- ``sshd.pid``: sshd's pid file while it runs (removed when it stops);
- ``sshd.log``: sshd's diagnostics (``-e`` sends them to stderr, which goes here).

The child runs ``sshd -D -e -f CONFIG`` (no daemonising, so its pid is ours to
stop).  ``start`` returns once sshd answers with an SSH banner on its port, or
raises ``SSHDError`` with the reason sshd logged.  ``stop`` sends SIGTERM to
sshd and to every process below it (per-connection sshd processes and the
subsystem programs they run), then SIGKILL after a bound.

Blocking calls (``subprocess``, ``socket``), no Trio: callers in a Trio program
run ``start`` and ``stop`` with ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "DEFAULT_SSHD",
    "SUBSYSTEM_NAMES",
    "PrivateSSHD",
    "SSHDError",
    "find_sshd",
    "free_port",
    "key_fingerprint",
    "known_hosts_line",
]

#: Debian's openssh-server installs sshd here; sshd insists on an absolute path
#: (it re-executes itself for every connection).
DEFAULT_SSHD = "/usr/sbin/sshd"

#: The subsystem names PROTOCOL.md section 1 requires a server to accept.
SUBSYSTEM_NAMES = ("sshrpc@k2r.org", "sshrpc")

#: How long ``start`` waits for sshd to accept connections, and ``stop`` waits
#: after SIGTERM before SIGKILL.  sshd starts in well under a second here.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

HOST_KEY_NAME = "ssh_host_ed25519_key"


class SSHDError(RuntimeError):
    """sshd could not be set up or started.  The message is one line that says
    why (missing binary, port in use, bad config, unreadable key file)."""


def find_sshd(path: str | None = None) -> str:
    """The absolute path of the sshd binary to run, or raise ``SSHDError``."""
    candidate = path or shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/sbin") or ""
    if not candidate or not os.path.isabs(candidate) or not os.access(candidate, os.X_OK):
        raise SSHDError(
            f"sshd not found ({path or DEFAULT_SSHD}); install OpenSSH's server "
            "(Debian: apt-get install openssh-server)"
        )
    return candidate


def address_family(host: str) -> socket.AddressFamily:
    """``AF_INET6`` for an IPv6 address literal (``::1``), else ``AF_INET``."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def host_port(host: str, port: int) -> str:
    """``host:port`` as users write it: ``[::1]:2222`` for IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (the kernel's
    choice for port 0).  Another process may take it before you bind it."""
    with socket.socket(address_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def key_fingerprint(public_key_line: str) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key line
    (``ssh-ed25519 AAAA... comment``), as ``ssh-keygen -l`` prints it."""
    fields = public_key_line.split()
    if len(fields) < 2:
        raise ValueError("not an OpenSSH public key line")
    blob = base64.b64decode(fields[1], validate=True)
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def known_hosts_line(host: str, port: int, public_key_line: str) -> str:
    """The known_hosts line for a host key served on ``host:port``."""
    fields = public_key_line.split()
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {fields[0]} {fields[1]}"


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: split after it.
        ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PrivateSSHD:
    """One private sshd serving ``subsystems`` on ``host:port``.

    ``subsystems`` maps a subsystem name to the command sshd runs for it (sshd
    runs it through the user's login shell, ``$SHELL -c COMMAND``).
    ``authorized_keys`` is the file sshd reads the allowed keys from.  Use as a
    context manager, or call ``start`` and ``stop``.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        authorized_keys: str | os.PathLike[str],
        subsystems: Mapping[str, str],
        host: str = "127.0.0.1",
        port: int | None = None,
        sshd_path: str | None = None,
        extra_config: Sequence[str] = (),
    ) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.authorized_keys = Path(authorized_keys).absolute()
        self.subsystems = dict(subsystems)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.sshd_path = sshd_path
        self.extra_config = list(extra_config)
        self.process: subprocess.Popen[bytes] | None = None
        self.prepare_state()

    # -- state directory ------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.state_dir / "sshd_config"

    @property
    def pid_path(self) -> Path:
        return self.state_dir / "sshd.pid"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "sshd.log"

    @property
    def host_key_path(self) -> Path:
        return self.state_dir / HOST_KEY_NAME

    @property
    def host_public_key(self) -> str:
        """The host key's public line (``ssh-ed25519 AAAA... comment``)."""
        return (self.state_dir / (HOST_KEY_NAME + ".pub")).read_text().strip()

    @property
    def host_fingerprint(self) -> str:
        """``SHA256:...`` of the host key, as ssh shows it on first contact."""
        return key_fingerprint(self.host_public_key)

    @property
    def known_hosts_line(self) -> str:
        """The line a client puts in its known_hosts to trust this sshd."""
        return known_hosts_line(self.host, self.port, self.host_public_key)

    def prepare_state(self) -> None:
        """Create the state directory (0700) and the host key if missing."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        if not self.host_key_path.exists():
            keygen = shutil.which("ssh-keygen")
            if keygen is None:
                raise SSHDError("ssh-keygen not found; install OpenSSH (Debian: openssh-client)")
            key = str(self.host_key_path)
            result = subprocess.run(
                [keygen, "-q", "-t", "ed25519", "-N", "", "-C", "sshrpc-host", "-f", key],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=False,
            )
            if result.returncode != 0:
                message = result.stderr.decode(errors="replace").strip()
                raise SSHDError(f"ssh-keygen failed: {message}")

    def config_text(self) -> str:
        """The generated sshd_config."""
        lines = [
            "# Generated by sshrpc; rewritten at every start.",
            f"Port {self.port}",
            f"ListenAddress {self.host}",
            f"HostKey {_quote(self.host_key_path)}",
            f"PidFile {_quote(self.pid_path)}",
            f"AuthorizedKeysFile {_quote(self.authorized_keys)}",
            "AuthorizedPrincipalsFile none",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "HostbasedAuthentication no",
            "UsePAM no",
            # We often run as root (containers, CI); keys only.
            "PermitRootLogin prohibit-password",
            # StrictModes checks that the user's home and every parent of the
            # authorized_keys file are owned by the user and not group/world
            # writable.  Our files sit in a state directory we created 0700,
            # but its parents may be /tmp (world-writable, sticky), which
            # StrictModes would reject.  The 0700 state directory is the guard.
            "StrictModes no",
            # Puts the authenticated key in $SSH_USER_AUTH for the subsystem.
            "ExposeAuthInfo yes",
            "AllowTcpForwarding no",
            "AllowStreamLocalForwarding no",
            "AllowAgentForwarding no",
            "X11Forwarding no",
            "PermitTunnel no",
            "PermitTTY no",
            "PermitUserRC no",
            "PermitUserEnvironment no",
            "GatewayPorts no",
            "PrintMotd no",
            "PrintLastLog no",
            "Banner none",
            # A vanished client (host off, link cut) is dropped after 45 s, so
            # its channel closes and the node cancels its calls.
            "ClientAliveInterval 15",
            "ClientAliveCountMax 3",
            "LogLevel VERBOSE",
        ]
        for name, command in self.subsystems.items():
            lines.append(f"Subsystem {name} {command}")
        lines.extend(self.extra_config)
        return "\n".join(lines) + "\n"

    # -- process --------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Write the config, run sshd, and return once it accepts connections.

        Raises ``SSHDError`` (one line: sshd's own complaint, such as the port
        being in use) if sshd exits or does not answer within ``timeout``; no
        process is left running then.
        """
        if self.process is not None:
            raise RuntimeError("this sshd is already running")
        sshd = find_sshd(self.sshd_path)
        if not os.access(self.authorized_keys, os.R_OK):
            raise SSHDError(f"cannot read authorized_keys file {self.authorized_keys}")
        if os.geteuid() == 0:
            # sshd's privilege separation directory (Debian creates it at boot).
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.config_path.write_text(self.config_text())
        os.chmod(self.config_path, 0o600)
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()
        check = subprocess.run(
            [sshd, "-t", "-f", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
        if check.returncode != 0:
            raise SSHDError("sshd rejected its config: " + _last_line(check.stderr))
        log = open(self.log_path, "ab")  # noqa: SIM115 -- handed to the child
        try:
            self.process = subprocess.Popen(
                [sshd, "-D", "-e", "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        finally:
            log.close()
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        try:
            self._wait_ready(timeout, log_start)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float, log_start: int) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            if self.process.poll() is not None:
                raise SSHDError(
                    f"sshd exited at start ({self.process.returncode}): "
                    + self._log_tail(log_start)
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0) as s:
                    if s.recv(8).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SSHDError(
                    f"sshd did not accept connections on {self.host}:{self.port} "
                    f"within {timeout:g} s: " + self._log_tail(log_start)
                )
            # Bounded back-off between polls of a process we cannot wait on.
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _log_tail(self, start: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(start)
                return _complaint(f.read()) or "(nothing logged)"
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop sshd and every process under it; idempotent.

        SIGTERM first, SIGKILL for whatever is left after ``timeout``.  The pid
        file is gone afterwards.
        """
        process = self.process
        if process is None:
            return
        victims = [*_descendants(process.pid)]
        for pid in [process.pid, *victims]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        # Connection processes are in their own sessions (sshd calls setsid),
        # so they are not reaped by us; poll them until gone, then SIGKILL.
        for pid in victims:
            while _alive(pid) and _is_zombie_free(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            with contextlib.suppress(ProcessLookupError):
                if _alive(pid) and _is_zombie_free(pid):
                    os.kill(pid, signal.SIGKILL)
        self.process = None
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()

    def __enter__(self) -> PrivateSSHD:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _is_zombie_free(pid: int) -> bool:
    """False when ``pid`` is a zombie (dead, waiting for its parent to reap it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :][:1] != b"Z"


def _complaint(data: bytes) -> str:
    """sshd's error and fatal lines joined into one line, else its last line."""
    lines = [line.strip() for line in data.decode(errors="replace").splitlines() if line.strip()]
    bad = [line for line in lines if line.startswith(("error:", "fatal:", "Bind to", "Cannot"))]
    return "; ".join(bad[-3:]) if bad else (lines[-1] if lines else "")


def _quote(path: Path) -> str:
    """A path as an sshd_config argument (double-quoted if it holds spaces)."""
    text = str(path)
    if '"' in text or "\n" in text:
        raise SSHDError(f"cannot use a path with quotes or newlines in sshd_config: {text!r}")
    return f'"{text}"' if any(c.isspace() for c in text) else text


def _last_line(data: bytes) -> str:
    lines = [line.strip() for line in data.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""
