"""The state directory of ``sshrpc serve`` against a hostile local user.

Every test here runs as root (the serving user) against a real second local
account, ``sshrpc-atk-<random>``, created with ``useradd`` for the test and
removed afterwards.  Where the attacker can act for real (in a world-writable
sticky directory, like ``/tmp``), it does, as its own uid; where it could only
have acted earlier (an entry inside a directory it cannot reach now), the test
plants the entry as root and hands it to the attacker with ``lchown``.

The attack (issue 11, finding 1): the attacker pre-creates the directory root
will pass as ``--state-dir``, with ``authorized_keys`` a symlink to a root-owned
file.  Before: ``serve`` wrote through the symlink, chmod-ed the directory but
left it the attacker's, who then replaced ``authorized_keys`` with their own
key and logged in as root (``StrictModes no``).  Now: ``serve`` refuses every
such directory with one line saying why and what to do, writes nothing, and
the sshd it starts (``StrictModes yes``, ``AllowUsers`` the serving user)
lets no other key or user in.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ClientKey, make_key, start_serve, stop_serve
from sshrpc._sshd import PrivateSSHD, free_port

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a second local user"),
    pytest.mark.skipif(shutil.which("useradd") is None, reason="useradd is not installed"),
]


@dataclass(frozen=True)
class Attacker:
    name: str
    uid: int
    gid: int
    key: ClientKey

    def run(self, script: str) -> None:
        """Run ``sh -c script`` as the attacker (its own uid and gid, no groups)."""
        subprocess.run(
            ["sh", "-c", script],
            user=self.uid,
            group=self.gid,
            extra_groups=[],
            check=True,
            capture_output=True,
            timeout=20,
            stdin=subprocess.DEVNULL,
        )


@pytest.fixture(scope="module")
def attacker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attacker]:
    """A throwaway local account (no home, no login shell) with its own key."""
    name = f"sshrpc-atk-{secrets.token_hex(4)}"
    subprocess.run(
        # Password "*": no password works, but the account is not locked, so
        # only AllowUsers keeps it out of sshd.
        ["useradd", "-M", "-U", "-p", "*", "-s", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        entry = pwd.getpwnam(name)
        key = make_key(tmp_path_factory.mktemp("attacker"), comment="attacker")
        yield Attacker(name, entry.pw_uid, entry.pw_gid, key)
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=30, check=False)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A world-writable sticky directory, as ``/tmp`` is (the attacker can create in it)."""
    path = Path(tempfile.mkdtemp(prefix="sshrpc-shared-", dir="/tmp"))
    os.chmod(path, 0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tmp_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short one (``STATE/node/node.sock`` must fit a Unix socket path)."""
    return tmp_path_factory.mktemp("sd")


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A root-owned file the attacker wants overwritten."""
    path = tmp_path / "victim"
    path.write_text("precious\n")
    os.chmod(path, 0o644)
    return path


def _serve(state: Path, keys: Path, port: int) -> subprocess.CompletedProcess[str]:
    """``sshrpc serve`` run to completion (it exits at once when it refuses)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "sshrpc.cli",
            "serve",
            "sshrpc.demo:services",
            "--port",
            str(port),
            "--state-dir",
            str(state),
            "--authorized-keys",
            str(keys),
            "--python-relay",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def _refused(out: subprocess.CompletedProcess[str], *words: str) -> str:
    """Assert serve refused: status 2, one line naming the state dir and ``words``."""
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    line = lines[0]
    assert line.startswith("sshrpc serve: --state-dir "), line
    for word in words:
        assert word in line, (word, line)
    assert "ready" not in out.stdout
    return line


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ssh(port: int, user: str, identity: Path, command: str) -> subprocess.CompletedProcess[str]:
    """OpenSSH's client, host key not checked (the attacker's point of view)."""
    return subprocess.run(
        [
            "ssh",
            "-F",
            "/dev/null",
            "-p",
            str(port),
            "-i",
            str(identity),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "IdentityAgent=none",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            f"{user}@127.0.0.1",
            command,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def keys(tmp_path: Path, client_key: ClientKey) -> Path:
    path = tmp_path / "authorized_keys"
    path.write_text(client_key.public_line + "\n")
    return path


# -- the attack of issue 11, played to the end ---------------------------------------


def test_precreated_state_dir_with_symlinked_authorized_keys_gives_no_root(
    attacker: Attacker, shared: Path, victim: Path, keys: Path
) -> None:
    """The attacker pre-creates the state dir in /tmp with ``authorized_keys``
    a symlink to a root-owned file, then (if serve started) swaps in its own
    key.  serve must refuse: the victim file is untouched, nothing listens,
    and the attacker's ``ssh root@... id`` never answers ``uid=0``."""
    state = shared / "state"
    attacker.run(f"mkdir {state} && ln -s {victim} {state}/authorized_keys")
    mode = os.lstat(state).st_mode
    port = free_port()
    started = None
    try:
        started = start_serve(
            ["sshrpc.demo:services"],
            state_dir=state,
            authorized_keys=keys,
            identity=keys,
            extra_args=["--python-relay"],
            port=port,
            timeout=20,
        )
    except RuntimeError as exc:
        refusal = str(exc)
    else:
        refusal = ""
        # What the attacker did next, as its own uid: its key instead of ours.
        attacker.run(
            f"rm -f {state}/authorized_keys && "
            f"echo '{attacker.key.public_line}' > {state}/authorized_keys"
        )
    try:
        answer = _ssh(port, "root", attacker.key.private, "id")
        assert "uid=0" not in answer.stdout
        assert victim.read_text() == "precious\n"
        assert started is None, "serve started in a directory the attacker owns"
        assert "sshrpc serve: --state-dir" in refusal and "writable by others" in refusal
        assert not _listening(port)
        # Nothing was written or changed in the attacker's directory.
        assert sorted(p.name for p in state.iterdir()) == ["authorized_keys"]
        assert os.lstat(state).st_uid == attacker.uid
        assert os.lstat(state).st_mode == mode
    finally:
        if started is not None:
            stop_serve(started)


def test_state_dir_under_a_world_writable_dir_is_refused_before_creating_it(
    shared: Path, keys: Path
) -> None:
    """Even a state dir serve would create itself: /tmp-like parents let
    others rename it away (and sshd's StrictModes rejects them)."""
    state = shared / "fresh"
    line = _refused(_serve(state, keys, free_port()), str(shared), "writable by others")
    assert "StrictModes" in line
    assert not state.exists()


# -- each path, one at a time, in an otherwise safe place ---------------------------------


def test_state_dir_owned_by_another_user_is_refused(
    attacker: Attacker, tmp_path: Path, keys: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.lchown(state, attacker.uid, attacker.gid)
    _refused(_serve(state, keys, free_port()), f"owned by {attacker.name}", "not by root")
    assert list(state.iterdir()) == []


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o1777])
def test_group_or_world_writable_state_dir_is_refused(
    tmp_path: Path, keys: Path, mode: int
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, mode)
    _refused(_serve(state, keys, free_port()), "writable by", "chmod go-w")
    assert stat.S_IMODE(os.lstat(state).st_mode) == mode
    assert list(state.iterdir()) == []


def test_symlinked_state_dir_is_refused(
    attacker: Attacker, shared: Path, tmp_path: Path, keys: Path
) -> None:
    target = shared / "theirs"
    attacker.run(f"mkdir -m 700 {target}")
    state = tmp_path / "state"
    state.symlink_to(target)
    _refused(_serve(state, keys, free_port()), "symbolic link")
    assert os.listdir(target) == []


@pytest.mark.parametrize("sub", ["bin", "node"])
@pytest.mark.parametrize("how", ["symlink", "owned"])
def test_subdirectory_symlinked_or_owned_by_another_user_is_refused(
    attacker: Attacker, shared: Path, tmp_path: Path, keys: Path, sub: str, how: str
) -> None:
    """``node/`` (the socket the relays trust) and any other directory in the
    state directory (``bin/``, where older versions kept the relay): a
    symlink out, or a directory of the attacker's, is refused; nothing is
    written there."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    target = shared / "theirs"
    attacker.run(f"mkdir -m 755 {target}")
    if how == "symlink":
        (state / sub).symlink_to(target)
        words = ["symbolic link", sub]
    else:
        (state / sub).mkdir(mode=0o700)
        os.lchown(state / sub, attacker.uid, attacker.gid)
        words = [f"owned by {attacker.name}", sub]
    _refused(_serve(state, keys, free_port()), *words)
    assert os.listdir(target) == []
    assert sorted(os.listdir(state)) == [sub]


STATE_FILES = [
    "authorized_keys",
    "sshd_config",
    "sshd.log",
    "sshd.pid",
    "ssh_host_ed25519_key",
    "ssh_host_ed25519_key.pub",
    "bin/relay-0123456789abcdef",
    "node/node.sock",
]


@pytest.mark.parametrize("name", STATE_FILES)
def test_symlinked_file_in_state_dir_is_refused(
    tmp_path: Path, keys: Path, victim: Path, name: str
) -> None:
    """Every file serve or sshd writes (and any other): a symlink is refused,
    the file it points to is untouched."""
    state = tmp_path / "state"
    (state / "bin").mkdir(parents=True, mode=0o700)
    (state / "node").mkdir(mode=0o700)
    os.chmod(state, 0o700)
    (state / name).symlink_to(victim)
    _refused(_serve(state, keys, free_port()), "symbolic link", name.rsplit("/", 1)[-1])
    assert victim.read_text() == "precious\n"
    assert os.readlink(state / name) == str(victim)


@pytest.mark.parametrize("name", ["authorized_keys", "ssh_host_ed25519_key", "bin/relay-x"])
def test_file_owned_by_another_user_or_writable_is_refused(
    attacker: Attacker, tmp_path: Path, keys: Path, name: str
) -> None:
    state = tmp_path / "state"
    (state / "bin").mkdir(parents=True, mode=0o700)
    os.chmod(state, 0o700)
    path = state / name
    path.write_text("theirs\n")
    os.chmod(path, 0o600)
    os.lchown(path, attacker.uid, attacker.gid)
    _refused(_serve(state, keys, free_port()), f"owned by {attacker.name}", path.name)
    os.lchown(path, 0, 0)
    os.chmod(path, 0o666)
    _refused(_serve(state, keys, free_port()), "writable by", path.name)
    assert path.read_text() == "theirs\n"


def test_hard_linked_file_is_refused(tmp_path: Path, keys: Path, victim: Path) -> None:
    """A hard link to another file (sshd.log is appended in place)."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.link(victim, state / "sshd.log")
    _refused(_serve(state, keys, free_port()), "hard link", "sshd.log")
    assert victim.read_text() == "precious\n"


# -- the sshd serve starts lets no other user or key in -------------------------------------


def test_sshd_lets_in_only_the_serving_user_and_honours_strict_modes(
    attacker: Attacker, tmp_path: Path, client_key: ClientKey
) -> None:
    """``AllowUsers`` the serving user: the authorized key cannot log in as the
    attacker's account (sshd would otherwise run the forced command as that
    user with the same key file).  ``StrictModes yes``: an authorized_keys
    file that ends up owned by another user is ignored, so a key added to it
    does not get in."""
    keys = tmp_path / "ak"
    keys.write_text(client_key.public_line + "\n")
    sshd = PrivateSSHD(tmp_path / "state", authorized_keys=keys, subsystems={}, extra_config=())
    assert sshd.user == "root"
    text = sshd.config_text()
    assert "StrictModes yes" in text.splitlines()
    assert "AllowUsers root" in text.splitlines()
    assert "PermitRootLogin prohibit-password" in text.splitlines()
    with sshd:
        good = _ssh(sshd.port, "root", client_key.private, "echo in")
        assert good.returncode == 0 and good.stdout == "in\n", good.stderr
        other = _ssh(sshd.port, attacker.name, client_key.private, "echo in")
        assert other.returncode == 255 and other.stdout == ""
        os.lchown(keys, attacker.uid, attacker.gid)
        with keys.open("a") as f:
            f.write(attacker.key.public_line + "\n")
        theirs = _ssh(sshd.port, "root", attacker.key.private, "id")
        assert theirs.returncode == 255 and "uid=0" not in theirs.stdout
        log = sshd.log_path.read_text()
    refused = f"User {attacker.name} from 127.0.0.1 not allowed because not listed in AllowUsers"
    assert refused in log, log
    assert "bad ownership or modes for file" in log


def test_non_root_serving_user_gets_no_root_login(tmp_path: Path) -> None:
    """The generated config for a serving user that is not root."""
    keys = tmp_path / "ak"
    keys.write_text("")
    sshd = PrivateSSHD(tmp_path / "state", authorized_keys=keys, subsystems={}, user="alice")
    lines = sshd.config_text().splitlines()
    assert "PermitRootLogin no" in lines
    assert "AllowUsers alice" in lines
    assert "StrictModes yes" in lines
    with pytest.raises(ValueError, match="user name"):
        PrivateSSHD(tmp_path / "state", authorized_keys=keys, subsystems={}, user="a*")


def test_write_file_replaces_a_symlink_never_writes_through_it(
    tmp_path: Path, victim: Path
) -> None:
    """The state dir's writes: O_CREAT|O_EXCL|O_NOFOLLOW to a fresh random
    name, then rename; a file or symlink already at the final name is
    replaced, never written through."""
    from sshrpc._statedir import write_file

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "f").symlink_to(victim)
    write_file(state, "f", b"new\n", mode=0o600)
    assert victim.read_text() == "precious\n"
    assert not (state / "f").is_symlink()
    assert (state / "f").read_bytes() == b"new\n"
    assert stat.S_IMODE(os.lstat(state / "f").st_mode) == 0o600
    assert os.listdir(state) == ["f"]
    with contextlib.suppress(FileNotFoundError):
        (state / "f").unlink()


async def test_node_socket_dir_of_another_user_is_refused_on_its_own(
    attacker: Attacker, shared: Path, tmp_path: Path
) -> None:
    """Without serve's check in front: ``Node.serve_unix`` will not listen in
    (nor chmod) a socket directory that is a link or another user's.  (The C
    relay is part of the installed package, never built at run time.)"""
    from sshrpc.node import Node

    theirs = shared / "theirs"
    attacker.run(f"mkdir -m 755 {theirs}")
    linked = tmp_path / "linked"
    linked.symlink_to(theirs)
    for directory in (theirs, linked):
        with pytest.raises(PermissionError, match="not a directory owned by uid 0"):
            await Node([]).serve_unix(directory / "node.sock")
    assert os.listdir(theirs) == []
    assert stat.S_IMODE(os.lstat(theirs).st_mode) == 0o755
