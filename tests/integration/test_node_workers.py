"""Sync functions and the node's worker pool, through a real ``sshrpc serve``
(its sshd, the C relay and the node): fairness between keys, cooperative
cancellation of sync code, inline functions.

Issue 11 item 7: 16 long sync calls from one key, cancelled, kept their
worker threads and left another key's sync call unanswered for seconds.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import trio
from _sshwire import SSHChannel

import sshrpc
from conftest import ClientKey, SSHDInfo, make_key, start_serve, stop_serve
from sshrpc import Atom
from sshrpc.client import open_connection

A = Atom
pytestmark = pytest.mark.timeout(90)

#: Seconds each blocking call of the hostile key sleeps: far longer than the
#: bound the other key's call is held to.
BLOCK = 30


@pytest.fixture
def two_key_serve(tmp_path: Path, client_key: ClientKey) -> Any:
    """``sshrpc serve sshrpc.demo:services`` authorizing two keys (no policy:
    both may call everything); yields (info, the second key)."""
    other = make_key(tmp_path / "other", comment="other@test")
    keys = tmp_path / "authorized_keys"
    keys.write_text(f"{client_key.public_line}\n{other.public_line}\n")
    info = start_serve(
        ["sshrpc.demo:services"],
        state_dir=tmp_path / "state",
        authorized_keys=keys,
        identity=client_key.private,
    )
    try:
        yield info, other
    finally:
        stop_serve(info)


def _connect(info: SSHDInfo, identity: Path | None = None) -> Any:
    return open_connection(
        info.host,
        info.port,
        user=info.user,
        identity=str(identity or info.identity),
        known_hosts=str(info.known_hosts),
        agent=False,
        use_ssh_config=False,
    )


async def _poll(conn: Any, module: str, function: str, want: Any, within: float = 10.0) -> None:
    """Call ``module:function()`` until it answers ``want`` (bounded in time)."""
    with trio.fail_after(within):
        for _ in itertools.count():
            if await conn.call(module, function, []) == want:
                return


async def test_cancelled_sync_calls_of_one_key_do_not_delay_another_key(
    two_key_serve: Any,
) -> None:
    info, other = two_key_serve
    async with _connect(info) as hostile, _connect(info, other.private) as victim:
        assert await victim.call("slow", "block", [0]) == A("done")
        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(hostile.call, "slow", "block", [BLOCK])
            # At least the key's share of the default 16 workers is busy.
            with trio.fail_after(10):
                while await victim.call("slow", "running", []) < 8:
                    pass
            nursery.cancel_scope.cancel()
        # Every hostile call was answered `cancelled` at once; the threads it
        # holds are charged to the hostile key, not to the pool as a whole.
        with trio.fail_after(3):
            assert await victim.call("slow", "block", [0]) == A("done")
            assert await victim.call("lists", "reverse", [[1, 2]]) == [2, 1]


async def test_a_cancelled_sync_function_learns_it_cooperatively(sshrpc_server: Any) -> None:
    """``slow:spin`` calls ``sshrpc.check_cancelled()`` between slices of work:
    a deadline (sent as the call's ``timeout``) stops the call at once and
    the function then stops by itself (it would otherwise run 30 s); the
    same for a cancel."""
    async with _connect(sshrpc_server) as conn:
        with trio.fail_after(5), trio.move_on_after(0.2) as scope:
            await conn.call("slow", "spin", [30])
        assert scope.cancelled_caught
        await _poll(conn, "slow", "spun", A("cancelled"))
        assert await conn.call("slow", "spin", [0]) == A("done")
        assert await conn.call("slow", "spun", []) == A("finished")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.call, "slow", "spin", [30])
            await _poll(conn, "slow", "spun", A("started"))
            nursery.cancel_scope.cancel()
        await _poll(conn, "slow", "spun", A("cancelled"))


async def test_inline_functions_answer_in_order_within_one_read(sshrpc_server: Any) -> None:
    """``echo:echo`` is ``inline=True``: many calls in flight on one channel
    all get their own answers (the answers of one read leave together)."""
    async with _connect(sshrpc_server) as conn:
        results: dict[int, Any] = {}

        async def one(i: int) -> None:
            results[i] = await conn.call("echo", "echo", [i])

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(500):
                    nursery.start_soon(one, i)
        assert results == {i: i for i in range(500)}


async def test_sync_errors_and_a_disconnect_during_a_sync_call(sshrpc_server: Any) -> None:
    """A sync function's exception answers ``error``; a channel that drops
    while its sync call runs flags the call (``slow:spin`` stops itself)."""
    async with _connect(sshrpc_server) as conn:
        with pytest.raises(sshrpc.RemoteError) as info:
            await conn.call("lists", "seq", [1, b"x"])
        assert info.value.reason[0] == A("TypeError")
        ch = await SSHChannel.open(sshrpc_server.ssh_argv())
        try:
            await ch.hello()
            await ch.send((A("call"), 1, A("slow"), A("spin"), [30]))
            await _poll(conn, "slow", "spun", A("started"))
        finally:
            await ch.aclose()  # kills ssh: the node sees the channel end
        await _poll(conn, "slow", "spun", A("cancelled"))
        assert await conn.call("echo", "echo", [b"still here"]) == b"still here"
