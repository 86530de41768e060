"""The relay program (``_relay.py``) and the node socket's access checks, without
sshd: the relay runs with a socketpair as stdin/stdout, as sshd runs it."""

from __future__ import annotations

import ast
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import trio

from sshrpc import subsystem
from sshrpc.node import Node

pytestmark = pytest.mark.timeout(60)


def test_relay_imports_only_os_socket_select_sys():
    tree = ast.parse(Path(subsystem.RELAY_PATH).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported == {"os", "socket", "select", "sys"}
    # And at run time, with no site: nothing from sshrpc, trio or site.
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-X", "importtime", subsystem.RELAY_PATH, "/nonexistent.sock"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 1
    assert "cannot reach the node at /nonexistent.sock" in out.stderr
    modules = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert not {m for m in modules if m.startswith(("sshrpc", "trio", "site", "json"))}


async def _unix_server(path: str):
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(4)
    return sock


async def _accept(server) -> trio.SocketStream:
    conn, _ = await server.accept()
    return trio.SocketStream(conn)


async def _recv_exactly(stream, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        assert chunk, "EOF"
        data += chunk
    return bytes(data)


async def test_relay_header_and_bytes_both_ways(tmp_path):
    path = str(tmp_path / "n.sock")
    server = await _unix_server(path)
    auth = tmp_path / "auth"
    auth.write_text("publickey ssh-ed25519 AAAAtest\n")
    ours, theirs = socket.socketpair()
    env = dict(os.environ, SSH_USER_AUTH=str(auth), SSH_CONNECTION="1.2.3.4 5 6.7.8.9 22")
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", subsystem.RELAY_PATH, path],
        stdin=theirs,
        stdout=theirs,
        env=env,
    )
    theirs.close()
    try:
        conn = await _accept(server)
        head = await _recv_exactly(conn, 8)
        assert head[:4] == b"SRLY"
        body = await _recv_exactly(conn, int.from_bytes(head[4:], "big"))
        assert body == b"publickey ssh-ed25519 AAAAtest\n\x001.2.3.4 5 6.7.8.9 22"
        ours_t = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        big = os.urandom(300_000)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ours_t.send_all, big)
            assert await _recv_exactly(conn, len(big)) == big
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.send_all, b"answer" * 50_000)
            assert await _recv_exactly(ours_t, 300_000) == b"answer" * 50_000
        # EOF from the client (half-close) does not end the relay: answers
        # still flow back.
        ours_t.socket.shutdown(socket.SHUT_WR)
        await conn.send_all(b"late answer")
        assert await _recv_exactly(ours_t, 11) == b"late answer"
        assert proc.poll() is None
        # The node closing ends the relay after the last bytes are written.
        await conn.send_all(b"bye")
        await conn.aclose()
        assert await _recv_exactly(ours_t, 3) == b"bye"
        with trio.fail_after(10):
            assert await trio.to_thread.run_sync(proc.wait) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.close()
        ours.close()


async def test_relay_ends_when_channel_closes(tmp_path):
    """sshd closing the channel (the client is gone) ends the relay, which
    closes its socket: the node sees EOF."""
    path = str(tmp_path / "n.sock")
    server = await _unix_server(path)
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", subsystem.RELAY_PATH, path], stdin=theirs, stdout=theirs
    )
    theirs.close()
    try:
        conn = await _accept(server)
        head = await _recv_exactly(conn, 8)
        await _recv_exactly(conn, int.from_bytes(head[4:], "big"))
        ours.close()
        with trio.fail_after(10):
            assert await conn.receive_some(10) == b""
            assert await trio.to_thread.run_sync(proc.wait) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.close()


async def test_node_socket_refuses_other_uids(tmp_path, caplog):
    """Two guards: the socket directory is 0700 (others cannot reach the
    socket), and SO_PEERCRED (a peer of another uid is refused even if the
    directory were opened up)."""
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another uid (setpriv)")
    node = Node([])
    # Outside pytest's tmp dir, whose parent only root may enter.
    base = Path(tempfile.mkdtemp(prefix="sshrpc-uid-"))
    sock_dir = base / "node"
    path = sock_dir / "node.sock"
    client = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        "try:\n s.connect(sys.argv[1])\n"
        "except OSError as e:\n print('connect', e.errno); sys.exit(0)\n"
        "s.settimeout(10)\n"
        "try:\n s.sendall(b'SRLY\\0\\0\\0\\1\\0'); print('data', repr(s.recv(100)))\n"
        "except (ConnectionResetError, BrokenPipeError):\n print('data', repr(b''))\n"
    )
    argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable]
    async with trio.open_nursery() as nursery:
        await nursery.start(node.serve_unix, path)
        assert stat.S_IMODE(os.stat(sock_dir).st_mode) == 0o700
        out = await trio.run_process([*argv, "-c", client, str(path)], capture_stdout=True)
        assert out.stdout.decode().strip() == "connect 13"  # EACCES
        os.chmod(sock_dir, 0o755)
        os.chmod(base, 0o755)
        os.chmod(path, 0o777)
        out = await trio.run_process([*argv, "-c", client, str(path)], capture_stdout=True)
        # Connected, then closed by the node without a byte.
        assert out.stdout.decode().strip() == "data b''"
        assert "refused a connection to the node socket from uid 65534" in caplog.text
        assert node.statistics()["channels"] == 0
        nursery.cancel_scope.cancel()
    assert not path.exists()
    shutil.rmtree(base)


async def test_relay_startup_is_small(tmp_path):
    """Per-channel start-up of the relay (a bare interpreter): bounded."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-I", "-S", subsystem.RELAY_PATH, str(tmp_path / "none")],
        capture_output=True,
        timeout=20,
    )
    assert time.perf_counter() - start < 2.0
