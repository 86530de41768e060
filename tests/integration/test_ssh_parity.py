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


# -- timeouts, keepalive, refused options, certificates ---------------------------


async def test_connect_timeout_bounds_connect_and_handshake(tmp_path: Path) -> None:
    # A port that completes TCP (backlog) but never says a word of SSH.
    silent = trio.socket.socket()
    await silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host quiet\n  HostName 127.0.0.1\n  Port {port}\n  ConnectTimeout 1\n"
        f"Host patient\n  HostName 127.0.0.1\n  Port {port}\n  ConnectTimeout 30\n"
    )
    with silent:
        started = trio.current_time()
        with pytest.raises(sshrpc.ConnectionLost, match=r"within 1 s \(ConnectTimeout\)"):
            async with _connect("quiet", config):
                pass
        assert 0.9 < trio.current_time() - started < 10
        # The caller's cancel scope still wins over a longer ConnectTimeout.
        with trio.move_on_after(0.3) as scope:
            async with _connect("patient", config):
                pass
        assert scope.cancelled_caught


async def test_server_alive_sets_the_keepalive(sshrpc_server: Any, tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(
        _host_block("alive", sshrpc_server, "ServerAliveInterval 5", "ServerAliveCountMax 2")
    )
    async with _connect("alive", config) as node:
        assert (node.keepalive, node.keepalive_misses) == (5, 2)
    async with _connect("alive", config, keepalive=9.0) as node:
        assert node.keepalive == 9.0  # an explicit argument wins


async def test_strict_host_key_checking_accept_new_from_the_config(
    sshrpc_server: Any, tmp_path: Path
) -> None:
    fresh = tmp_path / "fresh_known_hosts"
    config = tmp_path / "ssh_config"
    block = _host_block("new", sshrpc_server, "StrictHostKeyChecking accept-new")
    config.write_text(block.replace(str(sshrpc_server.known_hosts), str(fresh)))
    async with _connect("new", config) as node:
        assert await node.call("lists", "reverse", [[1]]) == [1]
    assert "ssh-ed25519" in fresh.read_text()


async def test_refused_option_is_an_error_before_any_connection(tmp_path: Path) -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host dns\n  HostName 127.0.0.1\n  Port {port}\n  VerifyHostKeyDNS yes\n"
        f"Host lax\n  HostName 127.0.0.1\n  Port {port}\n  StrictHostKeyChecking no\n"
    )
    with listener:
        with pytest.raises(sshrpc.SSHConfigError, match=r"VerifyHostKeyDNS.*use_ssh_config=False"):
            async with _connect("dns", config):
                pass
        with pytest.raises(sshrpc.SSHConfigError, match="StrictHostKeyChecking"):
            async with _connect("lax", config):
                pass
        cli = await _cli("call", "dns", "m", "f", "-F", str(config))
        assert cli.returncode == 1
        assert b"SSHConfigError" in cli.stderr and b"VerifyHostKeyDNS" in cli.stderr
        assert b"-F /dev/null" in cli.stderr and b"use_ssh_config" not in cli.stderr
        # Nothing connected: the listener's backlog is empty.
        with pytest.raises(BlockingIOError):
            _accept(listener)


def _accept(sock: Any) -> None:
    """Accept on ``sock`` without blocking (BlockingIOError: nobody came)."""
    import socket

    raw = socket.socket(fileno=os.dup(sock.fileno()))
    raw.setblocking(False)
    try:
        raw.accept()
    finally:
        raw.close()


async def test_certificate_file(private_sshd: Any, tmp_path: Path, client_key: Any) -> None:
    """A user certificate signed by a CA the server trusts, no authorized key."""
    ca = tmp_path / "ca"
    _keygen(ca, "ed25519")
    user = tmp_path / "user"
    _keygen(user, "ed25519")
    info = private_sshd(
        {"sshrpc@k2r.org": in_process_command(["sshrpc.demo:services"])},
        authorized_keys=[],
        extra_config=[f"TrustedUserCAKeys {ca}.pub"],
    )
    subprocess.run(
        ["ssh-keygen", "-q", "-s", str(ca), "-I", "test", "-n", info.user, "-V", "+1h",
         str(user) + ".pub"],
        check=True,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    certificate = tmp_path / "user-cert.pub"
    moved = tmp_path / "elsewhere-cert.pub"
    certificate.rename(moved)
    config = tmp_path / "ssh_config"
    block = _host_block("c", info).replace(str(info.identity), str(user))
    config.write_text(block)
    # Without the certificate the key alone is refused.
    with pytest.raises(sshrpc.AuthenticationFailed, match="refused"):
        async with _connect("c", config):
            pass
    # CertificateFile names it.
    config.write_text(block + f"    CertificateFile {moved}\n")
    async with _connect("c", config) as node:
        assert await node.call("lists", "reverse", [[1, 2]]) == [2, 1]
    # IDENTITY-cert.pub beside the key is used by itself, as by ssh.
    moved.rename(certificate)
    config.write_text(block)
    async with _connect("c", config) as node:
        assert await node.call("lists", "reverse", [[1, 2]]) == [2, 1]
    # A CertificateFile that does not exist is an error naming it.
    config.write_text(block + f"    CertificateFile {tmp_path / 'missing-cert.pub'}\n")
    with pytest.raises(sshrpc.AuthenticationFailed, match=r"missing-cert\.pub"):
        async with _connect("c", config):
            pass


async def test_ciphers_macs_and_kex_from_the_config(
    sshrpc_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(
        _host_block("algs", sshrpc_server, "Ciphers aes256-ctr", "MACs hmac-sha2-512")
        + _host_block("nokex", sshrpc_server, "KexAlgorithms sntrup761x25519-sha512@openssh.com")
    )
    caplog.set_level("DEBUG", logger="sshrpc.ssh")
    async with _connect("algs", config) as node:
        assert await node.call("lists", "reverse", [[1]]) == [1]
    negotiated = [r.getMessage() for r in caplog.records if "negotiated" in r.getMessage()]
    assert "cipher aes256-ctr" in negotiated[-1] and "mac hmac-sha2-512" in negotiated[-1]
    # A list libssh2 has nothing of is an error naming the option.
    with pytest.raises(sshrpc.SSHConfigError, match="KexAlgorithms"):
        async with _connect("nokex", config):
            pass


async def test_a_proxy_that_never_answers_is_ended_on_timeout(tmp_path: Path) -> None:
    record = tmp_path / "pid"
    config = tmp_path / "ssh_config"
    config.write_text(
        "Host mute\n  HostName 127.0.0.1\n  ConnectTimeout 1\n"
        f"  ProxyCommand sh -c 'echo $$ > {record}; exec sleep 60'\n"
    )
    with pytest.raises(sshrpc.ConnectionLost, match="ConnectTimeout"):
        async with _connect("mute", config):
            pass
    pid = int(record.read_text())
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "ProxyCommand process still running"
        await trio.sleep(0.02)  # bounded polling of another process
