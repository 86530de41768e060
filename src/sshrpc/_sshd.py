"""A private OpenSSH ``sshd``: state directory, generated config, child process.

Used by ``sshrpc serve`` and by the test fixtures.  Everything lives in one
state directory (mode 0700) that this module creates, or refuses when another
user could have planted anything in it (``_statedir``: not ours, writable by
others, a symbolic link anywhere in it, an unsafe parent):

- ``ssh_host_ed25519_key`` (+ ``.pub``): the host key, generated once and kept,
  so clients' known_hosts lines stay valid across restarts;
- ``sshd_config``: rewritten at every start from the arguments;
- ``sshd.pid``: sshd's pid file while it runs (removed when it stops);
- ``sshd.log``: sshd's diagnostics (``-e`` sends them to stderr, which goes here).

The child runs ``sshd -D -e -f CONFIG`` (no daemonising, so its pid is ours to
stop).  ``start`` returns once sshd answers with an SSH banner on its port, or
raises ``SSHDError`` with the reason sshd logged.  ``stop`` sends SIGTERM to
sshd and to every process below it (per-connection sshd processes and the
subsystem programs they run), then SIGKILL after a bound.  With
``die_with_parent``, sshd gets SIGTERM when the thread that started it ends
(``PR_SET_PDEATHSIG``), so a killed parent leaves no sshd listening.

The generated config lets in only the serving user (``AllowUsers``), root
only when root is the serving user (``PermitRootLogin``), and only through an
``authorized_keys`` file that sshd itself checks (``StrictModes yes``).

Blocking calls (``subprocess``, ``socket``), no Trio: callers in a Trio program
run ``start`` and ``stop`` with ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
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

#: User names sshd's AllowUsers takes literally (no patterns, no spaces).
_USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?")

#: prctl(2) option: the signal a child gets when the thread that forked it ends.
_PR_SET_PDEATHSIG = 1


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
    ``authorized_keys`` is the file sshd reads the allowed keys from; with
    ``StrictModes yes`` it and every directory above it must be owned by root
    or ``user`` and writable by no one else, or sshd ignores it.  ``user``
    (default: this process's user) is the only account sshd lets in.  The
    state directory is created or checked here (``StateDirError``).  Use as a
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
        user: str | None = None,
    ) -> None:
        self.user = user if user is not None else pwd.getpwuid(os.geteuid()).pw_name
        if not _USER_NAME.fullmatch(self.user):
            raise ValueError(f"cannot name user name {self.user!r} in sshd's AllowUsers")
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
        """Create the state directory (0700) or check it (``StateDirError``),
        and generate the host key if missing (in a fresh private directory,
        then renamed into place)."""
        from ._statedir import prepare_state_dir

        prepare_state_dir(self.state_dir)
        if os.path.lexists(self.host_key_path):
            return
        keygen = shutil.which("ssh-keygen")
        if keygen is None:
            raise SSHDError("ssh-keygen not found; install OpenSSH (Debian: openssh-client)")
        scratch = tempfile.mkdtemp(prefix=".keygen-", dir=self.state_dir)
        try:
            key = os.path.join(scratch, HOST_KEY_NAME)
            result = subprocess.run(
                [keygen, "-q", "-t", "ed25519", "-N", "", "-C", "sshrpc-host", "-f", key],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=False,
            )
            if result.returncode != 0:
                message = result.stderr.decode(errors="replace").strip()
                raise SSHDError(f"ssh-keygen failed: {message}")
            os.rename(key + ".pub", self.state_dir / (HOST_KEY_NAME + ".pub"))
            os.rename(key, self.host_key_path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

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
            # Only the serving user, whose node the relays reach: the key file
            # is the same for every account, so without this an authorized key
            # could log in as any other user and run the command as them.
            f"AllowUsers {self.user}",
            # Root only when root serves (containers, CI); keys only then.
            "PermitRootLogin " + ("prohibit-password" if self.user == "root" else "no"),
            # sshd checks the authorized_keys file and every directory above
            # it: owned by root or the user, writable by no one else.  The
            # state directory is refused earlier under the same rule
            # (_statedir), so this is the second guard, at every login.
            "StrictModes yes",
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

    def start(self, timeout: float = START_TIMEOUT, *, die_with_parent: bool = False) -> None:
        """Write the config, run sshd, and return once it accepts connections.

        Raises ``SSHDError`` (one line: sshd's own complaint, such as the port
        being in use) if sshd exits or does not answer within ``timeout``; no
        process is left running then.  ``die_with_parent``: see ``spawn``.
        The same as ``prepare_start``, ``spawn``, ``wait_ready`` in a row.
        """
        self.prepare_start()
        self.spawn(die_with_parent=die_with_parent)
        self.wait_ready(timeout)

    def prepare_start(self) -> None:
        """Check the binary and the key file, write the config (atomically,
        never through a link) and have sshd check it (``sshd -t``).  Raises
        ``SSHDError``."""
        from ._statedir import write_file

        if self.process is not None:
            raise RuntimeError("this sshd is already running")
        sshd = find_sshd(self.sshd_path)
        if not os.access(self.authorized_keys, os.R_OK):
            raise SSHDError(f"cannot read authorized_keys file {self.authorized_keys}")
        if os.geteuid() == 0:
            # sshd's privilege separation directory (Debian creates it at boot).
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        write_file(self.state_dir, self.config_path.name, self.config_text().encode())
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

    def spawn(self, *, die_with_parent: bool = False) -> None:
        """Run sshd (after ``prepare_start``); does not wait for it.

        ``die_with_parent``: sshd gets SIGTERM when the *thread* that calls
        this ends (Linux's ``PR_SET_PDEATHSIG`` follows the forking thread),
        so call it from a thread that lives as long as the process -- the
        main thread -- not from a worker thread.
        """
        from ._statedir import open_append

        if self.process is not None:
            raise RuntimeError("this sshd is already running")
        sshd = find_sshd(self.sshd_path)
        log = open_append(self.state_dir, self.log_path.name)
        try:
            self._log_start = os.fstat(log).st_size
            self.process = subprocess.Popen(
                [sshd, "-D", "-e", "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=_die_with_parent() if die_with_parent else None,
            )
        finally:
            os.close(log)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Return once the spawned sshd answers with an SSH banner; else stop
        it and raise ``SSHDError`` with what sshd logged."""
        try:
            self._wait_ready(timeout, self._log_start)
        except BaseException:
            self.stop()
            raise

    _log_start = 0

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
        # Once reaped, sshd's pid may belong to someone else: no signal then.
        running = process.poll() is None
        victims = [*_descendants(process.pid)] if running else []
        for pid in [process.pid] if running else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in victims:
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


def stop_orphans(timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM every live process below this one, then SIGKILL what is left
    after ``timeout``.  For a parent that is a child subreaper: after sshd
    died, its connection processes were re-parented to us."""
    victims = _descendants(os.getpid())
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for pid in victims:
        while _alive(pid) and _is_zombie_free(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        with contextlib.suppress(ProcessLookupError):
            if _alive(pid) and _is_zombie_free(pid):
                os.kill(pid, signal.SIGKILL)
    # Reap the ones that were re-parented to us (they are no Popen's).
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def reap_adopted(exclude: int) -> None:
    """Reap every exited direct child of this process but ``exclude``: for a
    child subreaper, the orphans it adopted (no Popen waits for them)."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == exclude:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields[0] == b"Z" and int(fields[1]) == me:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry), os.WNOHANG)


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn``: SIGTERM when the forking thread ends; exit at once if
    the parent is already gone (the signal would never come).  None where
    there is no ``prctl`` (not Linux)."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


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
