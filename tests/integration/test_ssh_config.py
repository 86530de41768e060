"""``open_connection("host")`` connects as ``ssh host`` would: ProxyJump and
ProxyCommand, host-key algorithms ordered by the keys known for the host,
GlobalKnownHostsFile, HostKeyAlias, ConnectTimeout, options we refuse, hints
that fit the caller (Python or the CLI), and ``sshrpc -v``.  Every server is a
real private sshd (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

import sshrpc
from sshrpc.client import open_connection
from sshrpc.subsystem import in_process_command

pytestmark = pytest.mark.timeout(60)

#: A ProxyCommand: relays stdio to HOST:PORT and records its pid and the
#: substituted tokens, so a test can prove the session went through it.
RELAY = r"""
import os, socket, sys, threading
host, port, user, record = sys.argv[1:5]
with open(record, "w") as f:
    f.write(f"{os.getpid()} {host} {port} {user}\n")
s = socket.create_connection((host, int(port)))
def up():
    while True:
        data = os.read(0, 65536)
        if not data:
            s.shutdown(socket.SHUT_WR)
            return
        s.sendall(data)
threading.Thread(target=up, daemon=True).start()
while True:
    data = s.recv(65536)
    if not data:
        break
    os.write(1, data)
"""


def _keygen(path: Path, kind: str) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return Path(str(path) + ".pub").read_text().strip()


def _host_block(name: str, info: Any, *lines: str) -> str:
    return "\n".join(
        [
            f"Host {name}",
            f"    HostName {info.host}",
            f"    Port {info.port}",
            f"    User {info.user}",
            f"    IdentityFile {info.identity}",
            "    IdentitiesOnly yes",
            "    IdentityAgent none",
            "    BatchMode yes",
            f"    UserKnownHostsFile {info.known_hosts}",
            "    GlobalKnownHostsFile /dev/null",
            *(f"    {line}" for line in lines),
            "",
        ]
    )


def _connect(name: str, config: Path, **options: Any) -> Any:
    return open_connection(name, ssh_config=str(config), agent=False, **options)


def _jump_sshd(private_sshd: Any, permit: str) -> Any:
    """A private sshd that forwards TCP only to ``permit`` (``host:port``)."""
    return private_sshd(
        {}, extra_config=["Match all", "    AllowTcpForwarding yes", f"    PermitOpen {permit}"]
    )


# -- ProxyJump and ProxyCommand -------------------------------------------------


async def test_proxy_jump_goes_through_the_jump_host(
    sshrpc_server: Any, private_sshd: Any, tmp_path: Path
) -> None:
    target = sshrpc_server
    jump = _jump_sshd(private_sshd, f"{target.host}:{target.port}")
    # A second jump host that may forward nowhere: through it, the same
    # target must be unreachable -- which proves the route.
    closed = _jump_sshd(private_sshd, "127.0.0.1:1")
    config = tmp_path / "ssh_config"
    config.write_text(
        _host_block("jump", jump)
        + _host_block("closed", closed)
        + _host_block("target", target, "ProxyJump jump")
        + _host_block("target-closed", target, "ProxyJump closed")
        + _host_block("target-chain", target, "ProxyJump closed,jump")
    )
    async with _connect("target", config) as node:
        assert await node.call("lists", "reverse", [[1, 2]]) == [2, 1]
    with pytest.raises(sshrpc.ConnectionLost, match="ProxyJump closed"):
        async with _connect("target-closed", config):
            pass
    # A chain: ssh reaches "jump" through "closed" (which may forward only
    # to 127.0.0.1:1), so the chain fails at its first hop.
    with pytest.raises(sshrpc.ConnectionLost, match="ProxyJump closed,jump"):
        async with _connect("target-chain", config):
            pass


async def test_proxy_jump_chain_of_two_hops(
    sshrpc_server: Any, private_sshd: Any, tmp_path: Path
) -> None:
    target = sshrpc_server
    second = _jump_sshd(private_sshd, f"{target.host}:{target.port}")
    first = _jump_sshd(private_sshd, f"{second.host}:{second.port}")
    config = tmp_path / "ssh_config"
    config.write_text(
        _host_block("first", first)
        + _host_block("second", second)
        + _host_block("target", target, "ProxyJump first,second")
    )
    async with _connect("target", config) as node:
        assert await node.call("lists", "reverse", [[1, 2]]) == [2, 1]


async def test_proxy_command_carries_the_session(sshrpc_server: Any, tmp_path: Path) -> None:
    target = sshrpc_server
    relay = tmp_path / "relay.py"
    relay.write_text(RELAY)
    record = tmp_path / "record"
    config = tmp_path / "ssh_config"
    config.write_text(
        _host_block("viaproxy", target, f"ProxyCommand {sys.executable} {relay} %h %p %r {record}")
    )
    async with _connect("viaproxy", config) as node:
        assert await node.call("lists", "reverse", [[1, 2]]) == [2, 1]
        pid, host, port, user = record.read_text().split()
        assert (host, port, user) == (target.host, str(target.port), target.user)
        os.kill(int(pid), 0)  # the relay is running while the connection is
    # Closing the connection ends the proxy process (and reaps it).
    deadline = time.monotonic() + 10
    while _alive(int(pid)):
        assert time.monotonic() < deadline, "ProxyCommand process still running"
        await trio.sleep(0.02)  # bounded polling of another process


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_proxy_command_that_fails_says_so(sshrpc_server: Any, tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(
        _host_block("broken", sshrpc_server, "ProxyCommand sh -c 'echo no route >&2; exit 3'")
    )
    with pytest.raises(sshrpc.ConnectionLost, match=r"ProxyCommand.*no route"):
        async with _connect("broken", config):
            pass


# -- host keys ------------------------------------------------------------------


@pytest.fixture
def multikey_sshd(private_sshd: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A private sshd with ed25519 (the fixture's), ecdsa and rsa host keys;
    its ``known_hosts`` lists only the ed25519 key.  ``info.extra_keys`` maps
    a key type to its public line."""
    base = tmp_path_factory.mktemp("hostkeys")
    ecdsa = _keygen(base / "ecdsa", "ecdsa")
    rsa = _keygen(base / "rsa", "rsa")
    info = private_sshd(
        {"sshrpc@k2r.org": in_process_command(["sshrpc.demo:services"])},
        extra_config=[f"HostKey {base / 'ecdsa'}", f"HostKey {base / 'rsa'}"],
    )
    info.extra_keys = {"ecdsa-sha2-nistp256": ecdsa, "ssh-rsa": rsa}
    return info


async def _host_key_of(info: Any, known_hosts: Path, **options: Any) -> None:
    """Connect (checking the host key against ``known_hosts``) and call."""
    async with open_connection(
        info.host,
        info.port,
        user=info.user,
        identity=str(info.identity),
        known_hosts=str(known_hosts),
        agent=False,
        use_ssh_config=False,
        **options,
    ) as node:
        assert await node.call("lists", "reverse", [[1, 2]]) == [2, 1]


async def test_known_ed25519_key_is_negotiated_not_reported_changed(
    multikey_sshd: Any,
) -> None:
    # On main: libssh2 prefers ecdsa, the server offers it, and sshrpc
    # reported "host key has CHANGED".
    await _host_key_of(multikey_sshd, multikey_sshd.known_hosts)


@pytest.mark.parametrize("kind", ["ecdsa-sha2-nistp256", "ssh-rsa"])
async def test_whichever_key_type_is_known_is_negotiated(
    multikey_sshd: Any, tmp_path: Path, kind: str
) -> None:
    known = tmp_path / "known_hosts"
    fields = multikey_sshd.extra_keys[kind].split()
    known.write_text(f"[{multikey_sshd.host}]:{multikey_sshd.port} {fields[0]} {fields[1]}\n")
    await _host_key_of(multikey_sshd, known)


async def test_other_key_type_than_known_is_unknown_not_changed(
    multikey_sshd: Any, tmp_path: Path
) -> None:
    # HostKeyAlgorithms allows only ecdsa; known_hosts lists only ed25519.
    config = tmp_path / "ssh_config"
    config.write_text(_host_block("multi", multikey_sshd, "HostKeyAlgorithms ecdsa-sha2-nistp256"))
    with pytest.raises(sshrpc.UnknownHostKey, match="ssh-ed25519") as info:
        async with _connect("multi", config):
            pass
    assert not isinstance(info.value, sshrpc.HostKeyMismatch)
    assert "CHANGED" not in str(info.value)
    # Nor is it accepted as new: a known key of another type exists.
    before = multikey_sshd.known_hosts.read_text()
    with pytest.raises(sshrpc.UnknownHostKey):
        async with _connect("multi", config, accept_new_host_keys=True):
            pass
    assert multikey_sshd.known_hosts.read_text() == before


async def test_global_known_hosts_file_is_read(sshrpc_server: Any, tmp_path: Path) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    config = tmp_path / "ssh_config"
    config.write_text(
        _host_block("g", sshrpc_server)
        .replace(
            "GlobalKnownHostsFile /dev/null", f"GlobalKnownHostsFile {sshrpc_server.known_hosts}"
        )
        .replace(f"UserKnownHostsFile {sshrpc_server.known_hosts}", f"UserKnownHostsFile {empty}")
    )
    async with _connect("g", config) as node:
        assert await node.call("lists", "reverse", [[1]]) == [1]


async def test_host_key_alias(sshrpc_server: Any, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    fields = sshrpc_server.known_hosts.read_text().split()
    known.write_text(f"mynode.alias {fields[1]} {fields[2]}\n")
    config = tmp_path / "ssh_config"
    config.write_text(
        _host_block("a", sshrpc_server, "HostKeyAlias mynode.alias").replace(
            f"UserKnownHostsFile {sshrpc_server.known_hosts}", f"UserKnownHostsFile {known}"
        )
    )
    async with _connect("a", config) as node:
        assert await node.call("lists", "reverse", [[1]]) == [1]
    # accept-new records the alias, not host:port.
    fresh = tmp_path / "fresh"
    fresh.write_text("")
    config.write_text(config.read_text().replace(str(known), str(fresh)))
    async with _connect("a", config, accept_new_host_keys=True):
        pass
    assert fresh.read_text().startswith("mynode.alias ssh-ed25519 ")


# -- hints for the caller, and sshrpc -v ------------------------------------------


async def _cli(*argv: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        return await trio.run_process(
            [sys.executable, "-m", "sshrpc.cli", *argv],
            capture_stdout=True,
            capture_stderr=True,
            env={**os.environ, "SSH_AUTH_SOCK": "", "SSHRPC_PASSPHRASE": ""},
            check=False,
        )


def _encrypted_key(tmp_path: Path) -> Path:
    key = tmp_path / "id_encrypted"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-C", "", "-f", str(key)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return key


async def test_hints_name_python_keywords_in_python_and_flags_in_the_cli(
    sshrpc_server: Any, tmp_path: Path
) -> None:
    info = sshrpc_server
    empty = tmp_path / "empty"
    empty.write_text("")
    encrypted = _encrypted_key(tmp_path)
    where = f"{info.user}@{info.host}:{info.port}"
    # Python: keywords.
    with pytest.raises(sshrpc.UnknownHostKey, match=r"accept_new_host_keys=True"):
        async with open_connection(
            where, identity=str(info.identity), known_hosts=str(empty), agent=False
        ):
            pass
    with pytest.raises(sshrpc.KeyPassphraseError, match=r"passphrase="):
        async with open_connection(
            where, identity=str(encrypted), known_hosts=str(info.known_hosts), agent=False
        ):
            pass
    # CLI: flags, and no Python keyword.
    base = ("call", where, "lists", "reverse", "[1]", "-F", "/dev/null")
    unknown = await _cli(*base, "-i", str(info.identity), "--known-hosts", str(empty))
    assert unknown.returncode == 1
    assert b"--accept-new-host-key" in unknown.stderr
    assert b"accept_new_host_keys" not in unknown.stderr
    locked = await _cli(*base, "-i", str(encrypted), "--known-hosts", str(info.known_hosts))
    assert locked.returncode == 1
    assert b"--passphrase-env" in locked.stderr
    assert b"passphrase=" not in locked.stderr
    assert empty.read_text() == ""


async def test_cli_verbose_shows_the_ssh_steps(sshrpc_server: Any) -> None:
    info = sshrpc_server
    base = (
        "call",
        f"{info.user}@{info.host}:{info.port}",
        "lists",
        "reverse",
        "[1,2]",
        "-F",
        "/dev/null",
        "-i",
        str(info.identity),
        "--known-hosts",
        str(info.known_hosts),
    )
    quiet = await _cli(*base)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.strip() == b"[2,1]" and quiet.stderr == b""
    verbose = await _cli(*base, "-v")
    assert verbose.returncode == 0, verbose.stderr
    text = verbose.stderr.decode()
    assert "config from ssh -G (/dev/null)" in text
    assert f"checking the host key of [{info.host}]:{info.port} against {info.known_hosts}" in text
    assert f"matches {info.known_hosts} line 1" in text
    assert f"offering identity file {info.identity}" in text
    assert "authenticated with identity file" in text
    assert "host key algorithms offered" not in text  # DEBUG: -vv only
    debug = await _cli("-vv", *base)
    assert "host key algorithms offered: ssh-ed25519," in debug.stderr.decode()
