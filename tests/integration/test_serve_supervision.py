"""``sshrpc serve`` and its sshd live and die together (issue 11, finding 6).

Before: ``kill -9`` of serve left its sshd listening (clients authenticated,
then lost the channel; a new serve on the port failed with "Address already
in use"); ``kill -9`` of sshd left serve running with a dead port, silently.
Now: sshd gets SIGTERM from the kernel when serve dies (``PR_SET_PDEATHSIG``,
set by serve's main thread), and serve, watching sshd through a pidfd, says
so on stderr, stops the node and the orphaned connections, and exits 1.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from _sshwire import EOF, SSHChannel

from conftest import _SERVE_PROCS, ClientKey, SSHDInfo, start_serve, stop_serve
from sshrpc import Atom
from sshrpc._sshd import _descendants

A = Atom
pytestmark = pytest.mark.timeout(90)

#: Bound on how long the kernel, sshd and serve take to react (they take ms).
DEADLINE = 15.0


def _alive(pid: int) -> bool:
    """Running (a zombie is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :][:1] != b"Z"


async def _until(predicate: Callable[[], bool], what: str) -> None:
    """Bounded polling of other processes' state, with a deadline."""
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE} s: {what}")
        await trio.sleep(0.02)


def _sshd_pid(tmp_path: Path, port: int) -> int:
    """The listener's pid, from serve's ready line."""
    log = (tmp_path / f"serve-{port}.log").read_text()
    match = re.search(r"; sshd pid (\d+);", log)
    assert match, log
    return int(match.group(1))


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _serve(tmp_path: Path, client_key: ClientKey, port: int | None = None) -> SSHDInfo:
    keys = tmp_path / "ak"
    keys.write_text(client_key.public_line + "\n")
    return start_serve(
        ["sshrpc.demo:services"],
        state_dir=tmp_path / "st",
        authorized_keys=keys,
        identity=client_key.private,
        port=port,
    )


async def _open_channel(info: SSHDInfo) -> SSHChannel:
    ch = await SSHChannel.open(info.ssh_argv())
    await ch.hello()
    assert await ch.call(1, "lists", "reverse", [[1, 2]]) == (A("reply"), 1, [2, 1])
    return ch


async def test_sshd_ends_with_a_killed_serve_and_the_port_is_free_again(
    tmp_path: Path, client_key: ClientKey
) -> None:
    info = _serve(tmp_path, client_key)
    assert info.pid is not None
    listener = _sshd_pid(tmp_path, info.port)
    ch = await _open_channel(info)
    tree = _descendants(info.pid)
    assert listener in tree and len(tree) >= 3, tree  # + the channel's sshd and relay
    os.kill(info.pid, signal.SIGKILL)
    assert stop_serve(info) == -signal.SIGKILL
    # The listener got SIGTERM from the kernel; the channel's relay lost the
    # node, so the connection ended too.
    await _until(lambda: not [pid for pid in tree if _alive(pid)], "serve's processes gone")
    assert await ch.recv() is EOF
    await ch.aclose()
    assert not _listening(info.port)
    # A new serve takes the same port and state directory.
    again = _serve(tmp_path, client_key, port=info.port)
    try:
        ch = await _open_channel(again)
        await ch.aclose()
    finally:
        assert stop_serve(again) == 0


async def test_serve_exits_1_and_says_why_when_its_sshd_is_killed(
    tmp_path: Path, client_key: ClientKey
) -> None:
    info = _serve(tmp_path, client_key)
    assert info.pid is not None
    proc = _SERVE_PROCS[info.pid]
    listener = _sshd_pid(tmp_path, info.port)
    ch = await _open_channel(info)
    tree = [pid for pid in _descendants(info.pid) if pid != listener]
    assert tree  # the channel's connection processes and relay
    os.kill(listener, signal.SIGKILL)
    await _until(lambda: proc.poll() is not None, "serve exited")
    assert stop_serve(info) == 1
    log = (tmp_path / f"serve-{info.port}.log").read_text()
    assert (
        f"sshrpc serve: sshd (pid {listener}) exited unexpectedly (killed by SIGKILL); "
        f"nothing listens on 127.0.0.1:{info.port} any more: stopping the node and "
        "exiting with status 1"
    ) in log, log
    # The channel was told, the connection sshd left behind was stopped.
    assert await ch.recv() in ((A("bye"), A("shutting_down")), EOF)
    await ch.aclose()
    await _until(lambda: not [pid for pid in tree if _alive(pid)], "orphans gone")
    assert not (info.state_dir / "node" / "node.sock").exists()
    assert not (info.state_dir / "sshd.pid").exists()
    assert not _listening(info.port)


def _children_of(pid: int) -> dict[int, bytes]:
    """Direct children of ``pid`` and their state letter (``Z`` for zombies)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2 :].split()
            if int(fields[1]) == pid:
                found[int(entry)] = fields[0]
    return found


async def test_in_process_sessions_end_when_sshd_dies(
    tmp_path: Path, client_key: ClientKey
) -> None:
    """``--in-process``: no node to lose, so the session sshd left behind
    would serve on; serve (a child subreaper, so it adopted them) stops it."""
    keys = tmp_path / "ak"
    keys.write_text(client_key.public_line + "\n")
    info = start_serve(
        ["sshrpc.demo:services"],
        state_dir=tmp_path / "st",
        authorized_keys=keys,
        identity=client_key.private,
        extra_args=["--in-process"],
    )
    assert info.pid is not None
    proc = _SERVE_PROCS[info.pid]
    listener = _sshd_pid(tmp_path, info.port)
    ch = await _open_channel(info)
    tree = [pid for pid in _descendants(info.pid) if pid != listener]
    os.kill(listener, signal.SIGKILL)
    await _until(lambda: proc.poll() is not None, "serve exited")
    assert stop_serve(info) == 1
    assert await ch.recv() is EOF
    await ch.aclose()
    await _until(lambda: not [pid for pid in tree if _alive(pid)], "orphans gone")


async def test_serve_reaps_what_a_dead_connection_process_leaves_behind(
    sshrpc_server: SSHDInfo,
) -> None:
    """Killing one connection's sshd process orphans the processes below it;
    serve adopted them (subreaper) and reaps them when they exit: no zombies
    pile up under a long-running serve.  The other channels go on."""
    info = sshrpc_server
    assert info.pid is not None
    listener = _sshd_pid(info.state_dir.parent, info.port)
    ch = await _open_channel(info)
    other = await _open_channel(info)
    await _until(lambda: len(_children_of(listener)) >= 2, "two connection processes")
    victim = min(_children_of(listener))
    below = _descendants(victim)
    assert below
    os.kill(victim, signal.SIGKILL)
    await _until(lambda: not [pid for pid in below if pid in _children_of(info.pid)], "reaped")
    assert _alive(listener)
    assert await other.call(2, "lists", "reverse", [[3, 4]]) == (A("reply"), 2, [4, 3])
    await other.aclose()
    await ch.aclose()
