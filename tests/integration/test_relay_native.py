"""The C relay (csrc/relay.c, built with the package) behaves as the Python
relay: same header, bytes both ways with flow control, same endings.  Run
for both programs, with a socketpair as stdin/stdout as sshd runs them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import trio

from sshrpc import subsystem

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def native() -> str:
    path = subsystem.native_relay()
    assert path is not None, "the package was built without its C relay (sshrpc/sshrpc-relay)"
    return path


@pytest.fixture(params=["python", "c"])
def relay_argv(request) -> list[str]:
    if request.param == "python":
        return [sys.executable, "-I", "-S", subsystem.RELAY_PATH]
    return [request.getfixturevalue("native")]


async def _unix_server(path: str):
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(4)
    return sock


async def _recv_exactly(stream, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        assert chunk, "EOF"
        data += chunk
    return bytes(data)


def test_native_relay_is_the_packaged_executable(native):
    assert native == subsystem.NATIVE_RELAY_PATH
    info = os.stat(native)
    assert info.st_mode & 0o111 and not info.st_mode & 0o022


def test_relay_command_names_the_native_relay(native):
    command = subsystem.relay_command("/run/x/node.sock", native=native)
    assert command == f"{native} /run/x/node.sock --subsystem"


def test_unreachable_node_is_one_line_and_status_1(relay_argv, tmp_path):
    out = subprocess.run(
        [*relay_argv, str(tmp_path / "none.sock"), "--subsystem"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 1
    assert out.stderr.startswith(f"sshrpc relay: cannot reach the node at {tmp_path}/none.sock: ")
    assert out.stderr.count("\n") == 1


@pytest.mark.parametrize("auth_text", ["publickey ssh-ed25519 AAAAtest\n", None])
async def test_header_and_bytes_both_ways(relay_argv, tmp_path, auth_text):
    path = str(tmp_path / "n.sock")
    server = await _unix_server(path)
    env = dict(os.environ, SSH_CONNECTION="1.2.3.4 5 6.7.8.9 22")
    env.pop("SSH_USER_AUTH", None)
    if auth_text is not None:
        auth = tmp_path / "auth"
        auth.write_bytes(auth_text.encode() + b"\0")  # NULs are dropped
        env["SSH_USER_AUTH"] = str(auth)
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [*relay_argv, path, "--subsystem"], stdin=theirs, stdout=theirs, env=env
    )
    theirs.close()
    try:
        raw, _ = await server.accept()
        conn = trio.SocketStream(raw)
        head = await _recv_exactly(conn, 8)
        assert head[:4] == b"SRLY"
        body = await _recv_exactly(conn, int.from_bytes(head[4:], "big"))
        assert body == (auth_text or "").encode() + b"\x001.2.3.4 5 6.7.8.9 22"
        ours_t = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        big = os.urandom(3_000_000)  # several times either buffer
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ours_t.send_all, big)
            assert await _recv_exactly(conn, len(big)) == big
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.send_all, big[::-1])
            assert await _recv_exactly(ours_t, len(big)) == big[::-1]
        # Both ways at once, with neither side reading until it has sent
        # half: the bounded buffers fill and drain without losing a byte.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ours_t.send_all, big)
            nursery.start_soon(conn.send_all, big[::-1])
            got_up = await _recv_exactly(conn, len(big))
            got_down = await _recv_exactly(ours_t, len(big))
        assert got_up == big and got_down == big[::-1]
        # EOF from the client (half-close) does not end the relay.
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


async def test_relay_ends_when_channel_closes(relay_argv, tmp_path):
    path = str(tmp_path / "n.sock")
    server = await _unix_server(path)
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([*relay_argv, path, "--subsystem"], stdin=theirs, stdout=theirs)
    theirs.close()
    try:
        raw, _ = await server.accept()
        conn = trio.SocketStream(raw)
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


def test_native_relay_starts_fast(native, tmp_path):
    """Per-channel start-up of the C relay: a few ms, not an interpreter's tens."""
    times = []
    for _ in range(10):
        start = time.perf_counter()
        subprocess.run(
            [native, str(tmp_path / "none"), "--subsystem"], capture_output=True, timeout=20
        )
        times.append(time.perf_counter() - start)
    assert sorted(times)[len(times) // 2] < 0.015


# -- exec mode: the relay tells subsystem, exec and shell apart ---------------------


async def _accept_header(server) -> tuple[trio.SocketStream, bytes]:
    raw, _ = await server.accept()
    conn = trio.SocketStream(raw)
    head = await _recv_exactly(conn, 8)
    assert head[:4] == b"SRLY"
    return conn, await _recv_exactly(conn, int.from_bytes(head[4:], "big"))


def _exec_env(command: bytes) -> dict[bytes, bytes]:
    env = {k: v for k, v in os.environb.items() if k != b"SSH_USER_AUTH"}
    env[b"SSH_CONNECTION"] = b"1.2.3.4 5 6.7.8.9 22"
    env[b"SSH_ORIGINAL_COMMAND"] = command
    return env


@pytest.mark.parametrize(
    ("answer", "status", "stdout", "stderr"),
    [
        (
            b"SRLX\x00" + (4).to_bytes(4, "big") + (0).to_bytes(4, "big") + b"[1]\n",
            0,
            b"[1]\n",
            b"",
        ),
        (b"SRLX\x05" + (0).to_bytes(4, "big") + (3).to_bytes(4, "big") + b"no\n", 5, b"", b"no\n"),
        (
            b"SRLX\x00" + (100).to_bytes(4, "big") + (0).to_bytes(4, "big") + b"short",
            1,
            b"short",
            b"sshrpc relay: the node's answer was cut short\n",
        ),
        (b"", 1, b"", b"sshrpc relay: the node closed the channel without an answer\n"),
    ],
)
async def test_exec_sends_the_command_and_copies_the_answer(
    relay_argv, tmp_path, answer, status, stdout, stderr
):
    path = str(tmp_path / "n.sock")
    server = await _unix_server(path)
    command = b"lists:reverse([1]). \xff" + b"x" * 9000  # bytes as sent, cut at 8193
    proc = subprocess.Popen(
        [*relay_argv, path],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_exec_env(command),
    )
    try:
        conn, body = await _accept_header(server)
        assert body == b"\x001.2.3.4 5 6.7.8.9 22\x00exec\x00" + command[:8193]
        await conn.send_all(answer)
        await conn.aclose()
        with trio.fail_after(10):
            out, err = await trio.to_thread.run_sync(proc.communicate)
        assert (proc.returncode, out, err) == (status, stdout, stderr)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.close()


async def test_marker_in_original_command_is_a_subsystem(relay_argv, tmp_path):
    """Under a forced command sshd puts the Subsystem line in
    SSH_ORIGINAL_COMMAND: its last word, the marker, means a subsystem."""
    path = str(tmp_path / "n.sock")
    server = await _unix_server(path)
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [*relay_argv, path],
        stdin=theirs,
        stdout=theirs,
        env=_exec_env(b"/usr/lib/sshrpc-relay /run/node.sock --subsystem \n"),
    )
    theirs.close()
    try:
        conn, body = await _accept_header(server)
        assert body == b"\x001.2.3.4 5 6.7.8.9 22"  # no exec part
        await conn.send_all(b"relayed")
        ours_t = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        assert await _recv_exactly(ours_t, 7) == b"relayed"
        await conn.aclose()
        with trio.fail_after(10):
            assert await trio.to_thread.run_sync(proc.wait) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.close()
        ours.close()


def test_shell_request_is_refused_without_reaching_the_node(relay_argv, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SSH_ORIGINAL_COMMAND"}
    out = subprocess.run(
        [*relay_argv, str(tmp_path / "none.sock")],
        capture_output=True,
        text=True,
        timeout=20,
        env=env,
    )
    assert out.returncode == 3
    assert out.stderr.startswith("sshrpc relay: shell requests are refused;")
    assert out.stderr.count("\n") == 1
    out = subprocess.run(
        [*relay_argv, str(tmp_path / "none.sock"), "--other"], capture_output=True, timeout=20
    )
    assert out.returncode == 2


async def test_exec_client_gone_closes_the_socket(relay_argv, tmp_path):
    """The channel closing while the node works (POLLHUP on stdout) ends the
    relay and closes its socket, which cancels the call."""
    path = str(tmp_path / "n.sock")
    server = await _unix_server(path)
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [*relay_argv, path], stdin=theirs, stdout=theirs, env=_exec_env(b"slow:work(60).")
    )
    theirs.close()
    try:
        conn, _ = await _accept_header(server)
        ours.close()
        with trio.fail_after(10):
            assert await conn.receive_some(10) == b""
            assert await trio.to_thread.run_sync(proc.wait) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.close()
