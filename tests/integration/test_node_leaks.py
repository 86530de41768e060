"""No leaks: open a channel, start a call, drop the channel without closing,
many times; the node's channels, calls, pids, tasks and memory return to
baseline.

The cycles talk to the node's Unix socket as the relay does (same header),
which is what the node sees of every SSH channel; a few more cycles go
through the real sshd and relay.  ``SSHRPC_LEAK_CYCLES=1000`` runs the long
form:

    SSHRPC_LEAK_CYCLES=1000 .venv/bin/python -m pytest tests/integration/test_node_leaks.py
"""

from __future__ import annotations

import os
import socket
import struct

import pytest
import trio
from _sshwire import SSHChannel

import sshrpc
from sshrpc import Atom, demo
from sshrpc.node import serve_node
from sshrpc.subsystem import relay_command

A = Atom
CYCLES = int(os.environ.get("SSHRPC_LEAK_CYCLES", "200"))
pytestmark = pytest.mark.timeout(120)


def _frame(term) -> bytes:
    payload = sshrpc.encode(term)
    return struct.pack(">I", len(payload)) + payload


HEADER = b"SRLY" + (1).to_bytes(4, "big") + b"\0"
HELLO = _frame((A("hello"), 1, {A("max_frame"): 1 << 20}))


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def _cycle(path: str, n: int) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(path)
    stream = trio.SocketStream(sock)
    await stream.send_all(HEADER + HELLO)
    # a long call, a stream with no credit left, a spawned process: all left open
    await stream.send_all(
        _frame((A("call"), 1, A("slow"), A("work"), [60]))
        + _frame((A("call"), 2, A("feed"), A("tail"), [100], {A("stream"): True, A("credit"): 1}))
        + _frame((A("spawn"), 3, A("worker"), A("loop"), []))
        + _frame((A("call"), 4, A("echo"), A("echo"), [n]))
    )
    # wait until the echo reply (so the others are surely running), then drop
    buf = b""
    with trio.fail_after(10):
        while _frame((A("reply"), 4, n)) not in buf:
            data = await stream.receive_some(65536)
            assert data
            buf += data
    await stream.aclose()


async def _settle(node, baseline_tasks: int) -> dict[str, int]:
    with trio.fail_after(10):
        while True:
            stats = node.statistics()
            if stats["channels"] == 0 and stats["tasks"] <= baseline_tasks:
                return stats
            await trio.sleep(0.01)  # bounded poll of the node's counters


async def test_open_call_drop_cycles_leak_nothing(nursery, private_sshd, tmp_path):
    path = str(tmp_path / "node" / "node.sock")
    node = await nursery.start(
        lambda task_status: serve_node(demo.services, socket_path=path, task_status=task_status)
    )
    baseline_tasks = node.statistics()["tasks"]
    for n in range(20):  # warm-up: caches, thread pool, allocator arenas
        await _cycle(path, n)
    await _settle(node, baseline_tasks)
    rss_before = _rss_kib()
    fds_before = len(os.listdir("/proc/self/fd"))
    for n in range(CYCLES):
        await _cycle(path, n)
    stats = await _settle(node, baseline_tasks)
    assert stats == {
        "channels": 0,
        "calls": 0,
        "processes": 0,
        "pids": 0,
        "registered": 0,
        "tasks": baseline_tasks,
        "held": 0,
    }
    growth = _rss_kib() - rss_before
    fds = len(os.listdir("/proc/self/fd"))
    print(f"\n{CYCLES} cycles: {stats}, RSS growth {growth} KiB, open fds {fds}")
    assert growth < 8 * 1024, f"RSS grew {growth} KiB over {CYCLES} cycles"
    assert fds <= fds_before

    # The same through sshd and the relay (each drop kills the ssh client).
    info = private_sshd({"sshrpc@k2r.org": relay_command(path)})
    for n in range(10):
        ch = await SSHChannel.open(info.ssh_argv())
        await ch.hello()
        await ch.send((A("call"), 1, A("slow"), A("work"), [60]))
        assert await ch.call(2, "echo", "echo", [n]) == (A("reply"), 2, n)
        await ch.aclose()
    stats = await _settle(node, baseline_tasks)
    assert stats["channels"] == stats["calls"] == stats["pids"] == 0
