"""Large frames end to end (issue 10, bulk): a real sshd and a node in this
Trio loop (``sshrpc.testing``).  Large binaries come back byte for byte in
every shape the large-binary encode path takes (src/sshrpc/_bulk.py), and
the node's heavy-frame pacing delays the next heavy frame, not the request
just decoded (``Node.heavy_pace``)."""

from __future__ import annotations

import os
import platform
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

import sshrpc
from sshrpc import _bulk
from sshrpc import node as node_module
from sshrpc.client import Connection
from sshrpc.testing import TestNode, open_test_node

pytestmark = pytest.mark.timeout(120)

MAX_FRAME = 24 << 20
#: Every wait in these tests is bounded by this (seconds).
DEADLINE = 60.0


def _services() -> list[sshrpc.Service]:
    svc = sshrpc.Service("bulk")

    @svc.export
    async def echo(value: Any) -> Any:
        return value

    @svc.export
    async def size(value: bytes) -> int:
        return len(value)

    @svc.export
    async def pair(a: Any, b: Any) -> Any:
        return (b, a)

    return [svc]


@pytest.fixture
async def bulk_node() -> AsyncIterator[tuple[TestNode, Connection]]:
    async with (
        open_test_node(_services(), max_frame=MAX_FRAME) as test_node,
        test_node.connect(max_frame=MAX_FRAME) as conn,
    ):
        yield test_node, conn


async def test_large_echo_exact_bytes(bulk_node: tuple[TestNode, Connection]) -> None:
    """16 MiB of random bytes to the node and back, unchanged, twice on one
    connection; and the shapes around it (a binary among other arguments,
    in a tuple, a bytearray, just below and above the large-binary size)."""
    _, conn = bulk_node
    if platform.libc_ver()[0] == "glibc":
        # connect_node with max_frame above 1 MiB let glibc keep freed frames.
        assert _bulk._kept >= min(3 * MAX_FRAME, _bulk.KEEP_CEILING)
    value = os.urandom(16 << 20)
    with trio.fail_after(DEADLINE):
        for _ in range(2):
            got = await conn.call("bulk", "echo", [value])
            assert type(got) is bytes and got == value
        assert await conn.call("bulk", "size", [value]) == len(value)
        small = os.urandom(1000)
        assert await conn.call("bulk", "pair", [value[:300_000], [small, 7]]) == (
            [small, 7],
            value[:300_000],
        )
        got = await conn.call("bulk", "echo", [(sshrpc.Atom("x"), value[:5_000_000], b"")])
        assert got == (sshrpc.Atom("x"), value[:5_000_000], b"")
        assert await conn.call("bulk", "echo", [bytearray(value[:400_000])]) == value[:400_000]
        for n in (256 * 1024 - 1, 256 * 1024, 256 * 1024 + 1):
            assert await conn.call("bulk", "echo", [[value[:n]]]) == [value[:n]]


async def test_heavy_pace_delays_the_next_heavy_frame_not_this_one(
    bulk_node: tuple[TestNode, Connection], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A heavy frame's request is answered at once; the pause its decode
    earned (``HEAVY_PACE`` times its decoding time) holds back the next heavy
    frame only.  With a huge pace the first answer comes before the pause
    ends, and the second heavy call's answer not before it."""
    test_node, conn = bulk_node
    monkeypatch.setattr(node_module, "HEAVY_PACE", 200.0)
    monkeypatch.setattr(node_module, "HEAVY_PACE_MIN", 0.0)
    value = os.urandom(4 << 20)
    with trio.fail_after(DEADLINE):
        assert await conn.call("bulk", "size", [value]) == len(value)
        answered = trio.current_time()
        after = test_node.node.heavy_after
        # The pause is at least 200 times a decode of 4 MiB: well past now.
        assert answered < after
        assert await conn.call("bulk", "size", [value]) == len(value)
        assert trio.current_time() >= after
