"""The channel's descriptors passed from the C relay to the node
(``sshrpc._fdpass``), through a real OpenSSH sshd: the node reads and writes
sshd's ends itself and the relay copies nothing; the copying relay is the
fallback; every ending behaves as with the copying relay."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from _sshwire import EOF, FrameClient, SSHChannel

import sshrpc
from sshrpc import Atom, _fdpass
from sshrpc.subsystem import NATIVE_RELAY_PATH, native_relay
from sshrpc.testing import TestNode, open_test_node

A = Atom

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(native_relay() is None, reason="this build has no C relay"),
]

svc = sshrpc.Service("fdp")
release = trio.Event()


@svc.export
async def echo(value: Any) -> Any:
    return value


@svc.export
async def held(value: Any) -> Any:
    await release.wait()
    return value


def _relays() -> set[int]:
    """PIDs of this checkout's C relay processes."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/exe") == NATIVE_RELAY_PATH:
                    found.add(int(entry))
            except OSError:
                pass
    return found


def _io(pid: int) -> tuple[int, int]:
    """The relay's rchar and wchar: bytes it read and wrote, ever."""
    fields = dict(
        line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines() if line
    )
    return int(fields["rchar"]), int(fields["wchar"])


def _ssh_argv(tn: TestNode) -> list[str]:
    return [
        "ssh",
        "-F",
        "/dev/null",
        "-s",
        "-p",
        str(tn.port),
        "-i",
        str(tn.identity),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "IdentityAgent=none",
        "-o",
        f"UserKnownHostsFile={tn.known_hosts}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
        f"{tn.user}@{tn.host}",
        "sshrpc@k2r.org",
    ]


async def _until(condition: Any, what: str, timeout: float = 10.0) -> None:
    """Bounded polling (the condition waits on other processes: sshd, the
    relay, ssh); fails saying ``what`` did not happen."""
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"not {what} within {timeout} s")


@asynccontextmanager
async def _node(mode: str, **options: Any) -> AsyncIterator[TestNode]:
    """mode: "passed" (default set-up), "copy" (relay run without
    --pass-fds), "declined" (the relay offers, the node says copy)."""
    global release
    release = trio.Event()
    async with open_test_node([svc], pass_fds=mode != "copy", **options) as tn:
        if mode == "declined":
            tn.node.pass_fds = False
        yield tn


@asynccontextmanager
async def _channel(tn: TestNode) -> AsyncIterator[tuple[SSHChannel, int]]:
    """An ``ssh -s`` channel after the hello, and its relay's PID."""
    before = _relays()
    ch = await SSHChannel.open(_ssh_argv(tn))
    try:
        await ch.hello()
        new = _relays() - before
        assert len(new) == 1, new
        yield ch, new.pop()
    finally:
        await ch.aclose()


@pytest.mark.parametrize("mode", ["passed", "copy", "declined"])
async def test_calls_and_who_copies(mode: str) -> None:
    """Passed: the relay reads and writes nothing per call (its I/O
    counters stand still over 900 kB each way); copy and declined: it copies
    every byte; the answers are the same."""
    async with _node(mode) as tn, _channel(tn) as (ch, relay):
        start = _io(relay)
        big = os.urandom(900_000)
        for i in range(20):
            assert await ch.call(i, "fdp", "echo", [i]) == (A("reply"), i, i)
        assert await ch.call(99, "fdp", "echo", [big]) == (A("reply"), 99, big)
        read, written = (a - b for a, b in zip(_io(relay), start, strict=True))
        if mode == "passed":
            assert (read, written) == (0, 0)
            assert tn.node.channels_passed == 1
        else:
            assert read > len(big) and written > len(big)
            assert tn.node.channels_passed == 0


@pytest.mark.parametrize("mode", ["passed", "copy"])
async def test_client_eof_keeps_the_channel_until_it_closes(mode: str) -> None:
    """The client's EOF (half-close) does not end the channel: a call still
    running answers after it; closing the channel (ssh gone) then ends the
    channel at the node."""
    async with _node(mode) as tn, _channel(tn) as (ch, _relay):
        await ch.send((A("call"), 1, A("fdp"), A("held"), [7]))
        await _until(lambda: tn.node.statistics()["calls"] == 1, "call open")
        assert ch.process.stdin is not None
        await ch.process.stdin.aclose()  # ssh sends the channel's EOF
        if mode == "passed":
            (channel,) = tn.node.channels
            await _until(lambda: channel.stream.eof, "EOF read by the node")
        release.set()
        assert await ch.recv() == (A("reply"), 1, 7)
        assert tn.node.statistics()["channels"] == 1
        ch.process.kill()
        await _until(lambda: tn.node.statistics()["channels"] == 0, "channel ended")


@pytest.mark.parametrize("mode", ["passed", "copy"])
async def test_bye_and_protocol_error_close_the_channel(mode: str) -> None:
    """The node ending the channel closes it for the client (ssh exits 0,
    the relay exits)."""
    async with _node(mode) as tn:
        async with _channel(tn) as (ch, relay):
            await ch.send((A("bye"), A("normal")))
            assert await ch.recv() == (A("bye"), A("normal"))
            assert await ch.recv() == EOF
            assert await ch.wait_closed() == 0
            await _until(lambda: relay not in _relays(), "relay exited")
        async with _channel(tn) as (ch, relay):
            await ch.send_raw(b"\x00\x00\x00\x03xyz")
            answer = await ch.recv()
            assert answer[0] == A("bye") and answer[1][0] == A("bad_term"), answer
            assert await ch.recv() == EOF
            assert await ch.wait_closed() == 0
            await _until(lambda: relay not in _relays(), "relay exited")
        await _until(lambda: tn.node.statistics()["channels"] == 0, "channels ended")


@pytest.mark.parametrize("mode", ["passed", "copy"])
async def test_relay_killed_ends_the_channel(mode: str) -> None:
    """The relay dying ends the channel at the node and for the client."""
    async with _node(mode) as tn, _channel(tn) as (ch, relay):
        await ch.send((A("call"), 1, A("fdp"), A("held"), [7]))
        await _until(lambda: tn.node.statistics()["calls"] == 1, "call open")
        os.kill(relay, signal.SIGKILL)
        await _until(lambda: tn.node.statistics()["channels"] == 0, "channel ended")
        assert await ch.recv() == EOF
        assert tn.node.statistics()["calls"] == 0


async def test_too_many_channels_is_refused_on_the_passed_socket() -> None:
    async with _node("passed", max_channels_per_key=1) as tn:
        async with _channel(tn) as (first, _relay):
            second = await SSHChannel.open(_ssh_argv(tn))
            try:
                await second.send((A("hello"), 1, {A("max_frame"): 1 << 20}))
                assert await second.recv() == (A("bye"), (A("too_many_channels"), 1))
                assert await second.recv() == EOF
                assert await second.wait_closed() == 0
            finally:
                await second.aclose()
            assert await first.call(1, "fdp", "echo", [1]) == (A("reply"), 1, 1)
        assert tn.node.channels_passed == 2


async def test_serve_passes_by_default_and_copies_with_no_pass_fds(
    tmp_path: Path, client_key: Any
) -> None:
    """``sshrpc serve`` runs the relay with --pass-fds unless told not to."""
    from conftest import start_serve, stop_serve

    keys = tmp_path / "authorized_keys"
    keys.write_text(client_key.public_line + "\n")
    for extra, passed in (((), True), (("--no-pass-fds",), False)):
        info = start_serve(
            ["sshrpc.demo:services"],
            state_dir=tmp_path / f"state{passed}",
            authorized_keys=keys,
            identity=client_key.private,
            extra_args=extra,
        )
        try:
            before = _relays()
            ch = await SSHChannel.open(info.ssh_argv())
            try:
                await ch.hello()
                (relay,) = _relays() - before
                start = _io(relay)
                answer = await ch.call(1, "lists", "reverse", [[1, 2, 3]])
                assert answer == (A("reply"), 1, [3, 2, 1])
                assert (_io(relay) == start) is passed
                argv = Path(f"/proc/{relay}/cmdline").read_bytes().split(b"\0")
                assert (b"--pass-fds" in argv) is passed
            finally:
                await ch.aclose()
        finally:
            stop_serve(info)


# -- the relay alone, against a stand-in node ------------------------------


@asynccontextmanager
async def _relay_with(kind: str, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """The C relay with --pass-fds, its stdin/stdout as sshd gives them
    (``socket``: one socketpair end; ``pipes``: two pipes; ``file``:
    /dev/null, nothing to pass), accepted by a stand-in node."""
    path = str(tmp_path / "n.sock")
    server = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await server.bind(path)
    server.listen(1)
    parts: dict[str, Any] = {}
    child: list[Any] = []
    if kind == "socket":
        ours, theirs = socket.socketpair()
        parts["up"] = parts["down"] = ours
        stdin = stdout = theirs
        child.append(theirs)
    elif kind == "pipes":
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        parts["up"], parts["down"] = in_w, out_r
        stdin, stdout = in_r, out_w
        child += [in_r, out_w]
    else:
        stdin = stdout = subprocess.DEVNULL
    proc = subprocess.Popen([NATIVE_RELAY_PATH, "--pass-fds", path, "--subsystem"], stdin=stdin,
                            stdout=stdout)  # fmt: skip
    for c in child:
        c.close() if isinstance(c, socket.socket) else os.close(c)
    try:
        raw, _ = await server.accept()
        parts["conn"] = trio.SocketStream(raw)
        parts["proc"] = proc
        yield parts
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.close()
        for key in ("up", "down"):
            end = parts.get(key)
            if isinstance(end, socket.socket):
                end.close()
            elif isinstance(end, int):
                with contextlib.suppress(OSError):
                    os.close(end)


def _write(end: Any, data: bytes) -> None:
    if isinstance(end, socket.socket):
        end.sendall(data)
    else:
        os.write(end, data)


def _read(end: Any, n: int) -> bytes:
    return end.recv(n) if isinstance(end, socket.socket) else os.read(end, n)


async def _header(conn: trio.SocketStream, fds: list[int]) -> bytes:
    head = b""
    while len(head) < 8:
        data = await _fdpass.receive_header_start(conn, 8 - len(head), fds)
        assert data, "EOF"
        head += data
    size = int.from_bytes(head[4:], "big")
    body = b""
    while len(body) < size:
        body += await conn.receive_some(size - len(body))
    return head[:4]


@pytest.mark.parametrize("kind", ["socket", "pipes"])
async def test_relay_passes_the_channel_and_holds(kind: str, tmp_path: Path) -> None:
    async with _relay_with(kind, tmp_path) as parts:
        fds: list[int] = []
        try:
            assert await _header(parts["conn"], fds) == b"SRLF"
            assert len(fds) == (1 if kind == "socket" else 2)
            await parts["conn"].send_all(_fdpass.TAKEN)
            # The node's descriptors are the client's ends' peers: no copy.
            os.write(fds[-1], b"down")
            assert _read(parts["down"], 4) == b"down"
            _write(parts["up"], b"up")
            assert os.read(fds[0], 2) == b"up"
            assert parts["proc"].poll() is None  # held, not exited
        finally:
            _fdpass.close_fds(fds)
        await parts["conn"].aclose()  # the node ended the channel
        with trio.fail_after(10):
            assert await trio.to_thread.run_sync(parts["proc"].wait) == 0


@pytest.mark.parametrize("kind", ["socket", "pipes"])
async def test_held_relay_ends_when_the_channel_closes(kind: str, tmp_path: Path) -> None:
    async with _relay_with(kind, tmp_path) as parts:
        fds: list[int] = []
        try:
            assert await _header(parts["conn"], fds) == b"SRLF"
            await parts["conn"].send_all(_fdpass.TAKEN)
            end = parts.pop("down")  # sshd closes the channel
            end.close() if isinstance(end, socket.socket) else os.close(end)
            if kind == "socket":
                parts.pop("up")
            with trio.fail_after(10):
                assert await parts["conn"].receive_some(10) == b""
                assert await trio.to_thread.run_sync(parts["proc"].wait) == 0
        finally:
            _fdpass.close_fds(fds)


async def test_relay_copies_when_the_node_declines(tmp_path: Path) -> None:
    async with _relay_with("socket", tmp_path) as parts:
        fds: list[int] = []
        assert await _header(parts["conn"], fds) == b"SRLF"
        _fdpass.close_fds(fds)
        conn = parts["conn"]
        await conn.send_all(_fdpass.COPY + b"answer")
        assert _read(parts["down"], 6) == b"answer"
        _write(parts["up"], b"request")
        got = b""
        with trio.fail_after(10):
            while len(got) < 7:
                got += await conn.receive_some(7 - len(got))
        assert got == b"request"
        await conn.aclose()
        with trio.fail_after(10):
            assert await trio.to_thread.run_sync(parts["proc"].wait) == 0


async def test_relay_with_nothing_to_pass_sends_the_plain_header(tmp_path: Path) -> None:
    async with _relay_with("file", tmp_path) as parts:
        fds: list[int] = []
        assert await _header(parts["conn"], fds) == b"SRLY"
        assert fds == []
        await parts["conn"].aclose()
        with trio.fail_after(10):
            assert await trio.to_thread.run_sync(parts["proc"].wait) == 0


def test_node_refuses_passed_descriptors_that_are_no_channel() -> None:
    """Descriptors that are neither one stream socket nor a pipe's read end
    and a pipe's write end are all closed and the relay told to copy."""
    cases = []
    r, w = os.pipe()
    cases.append([w, r])  # the ends swapped
    r, w = os.pipe()
    os.close(w)
    cases.append([r])  # one pipe end
    cases.append([os.open(os.devnull, os.O_RDONLY)])  # a file
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b.close()
    cases.append([a.detach()])  # a datagram socket
    for fds in cases:
        given = list(fds)
        assert _fdpass.take_channel(given) is None
        assert given == []
        for fd in fds:
            with pytest.raises(OSError):
                os.fstat(fd)


@asynccontextmanager
async def _relay_on_socketpair(
    node: sshrpc.Node, path: str
) -> AsyncIterator[tuple[trio.SocketStream, subprocess.Popen[bytes]]]:
    """The C relay with ``--pass-fds`` run on one end of a socketpair (the
    socketpair case: OpenSSH without USE_PIPES; this machine's sshd gives
    pipes), ``node`` serving ``path``; yields the other end, sshd's part
    played by the test, and the relay, killed at the end if still running."""
    ours, theirs = socket.socketpair()
    async with trio.open_nursery() as nursery:
        await nursery.start(node.serve_unix, path)
        proc = subprocess.Popen(
            [NATIVE_RELAY_PATH, "--pass-fds", path, "--subsystem"], stdin=theirs, stdout=theirs
        )
        theirs.close()
        try:
            yield trio.SocketStream(trio.socket.from_stdlib_socket(ours)), proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            nursery.cancel_scope.cancel()


async def test_node_serves_a_passed_socket(tmp_path: Path) -> None:
    """The socketpair case with the real node and relay: calls go through
    the passed socket, the client's EOF keeps the channel, closing it ends
    the channel and the relay."""
    global release
    release = trio.Event()
    node = sshrpc.Node([svc])
    async with _relay_on_socketpair(node, str(tmp_path / "n.sock")) as (stream, proc):
        client = FrameClient(stream)
        await client.hello()
        assert node.channels_passed == 1
        await client.send((A("call"), 1, A("fdp"), A("echo"), [b"x"]))
        assert await client.recv() == (A("reply"), 1, b"x")
        await client.send((A("call"), 2, A("fdp"), A("held"), [2]))
        await _until(lambda: node.statistics()["calls"] == 1, "call open")
        await stream.send_eof()  # the client's EOF
        (channel,) = node.channels
        await _until(lambda: channel.stream.eof, "EOF read by the node")
        release.set()
        assert await client.recv() == (A("reply"), 2, 2)
        assert node.statistics()["channels"] == 1
        await stream.aclose()  # sshd closes the channel
        await _until(lambda: node.statistics()["channels"] == 0, "channel ended")
        with trio.fail_after(10):
            assert await trio.to_thread.run_sync(proc.wait) == 0


async def test_node_ending_a_passed_socket_closes_it(tmp_path: Path) -> None:
    """Bye on the socketpair case: the answer, then EOF (node and relay
    both closed their copies), and the relay exits 0."""
    node = sshrpc.Node([svc])
    async with _relay_on_socketpair(node, str(tmp_path / "n.sock")) as (stream, proc):
        client = FrameClient(stream)
        await client.hello()
        await client.send((A("bye"), A("normal")))
        assert await client.recv() == (A("bye"), A("normal"))
        assert await client.recv() is None
        with trio.fail_after(10):
            assert await trio.to_thread.run_sync(proc.wait) == 0
        assert node.channels_passed == 1
        await stream.aclose()
