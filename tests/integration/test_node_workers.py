"""Sync functions and the node's worker pool, through a real ``sshrpc serve``
(its sshd, the C relay and the node): fairness between keys, cooperative
cancellation of sync code, inline functions; async calls on the channel's
worker tasks (a fresh context per call, deadlines that end with their call).

Issue 11 item 7: 16 long sync calls from one key, cancelled, kept their
worker threads and left another key's sync call unanswered for seconds.
"""

from __future__ import annotations

import contextvars
import itertools
from pathlib import Path
from typing import Any

import pytest
import trio
from _sshwire import SSHChannel

import sshrpc
from conftest import ClientKey, SSHDInfo, make_key, start_serve, stop_serve
from sshrpc import Atom, Service
from sshrpc import node as sshrpc_node
from sshrpc.client import open_connection
from sshrpc.node import serve_node
from sshrpc.subsystem import relay_command

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


# -- async calls on the channel's worker tasks ----------------------------------

VAR: contextvars.ContextVar[Any] = contextvars.ContextVar("VAR", default="unset")
ctx_svc = Service("ctx")


@ctx_svc.export
async def swap(value: Any) -> Any:
    """Sets VAR and answers what it was: a fresh context per call says
    ``unset`` every time."""
    old = VAR.get()
    VAR.set(value)
    await trio.lowlevel.checkpoint()
    return [old, sshrpc_node.current_key().fingerprint.encode()]


@ctx_svc.export
async def nap(seconds: float) -> Atom:
    await trio.sleep(seconds)
    return A("done")


@ctx_svc.export
def tell(message: Any) -> bool:
    """A sync function (worker thread) sending to the caller's mailbox."""
    return sshrpc_node.send(sshrpc_node.session_pid(), (A("told"), message))


@pytest.fixture
async def ctx_node(nursery: Any, private_sshd: Any, tmp_path: Path, client_key: ClientKey) -> Any:
    socket_path = tmp_path / "node" / "node.sock"
    keys = tmp_path / "authorized_keys"
    keys.write_text(client_key.public_line + "\n")
    await nursery.start(
        lambda task_status: serve_node(
            [ctx_svc],
            socket_path=socket_path,
            authorized_keys=keys,
            task_status=task_status,
        )
    )
    return private_sshd({"sshrpc@k2r.org": relay_command(socket_path)})


async def test_each_async_call_gets_a_fresh_context(ctx_node: Any, client_key: ClientKey) -> None:
    ch = await SSHChannel.open(ctx_node.ssh_argv())
    try:
        await ch.hello()
        me = client_key.fingerprint.encode()
        for i in range(1, 6):  # sequential: one worker task serves them all
            assert await ch.call(i, "ctx", "swap", [i]) == (A("reply"), i, [b"unset", me])
        for i in range(10, 20):  # in flight together, then again on the same workers
            await ch.send((A("call"), i, A("ctx"), A("swap"), [i]))
        got = sorted([await ch.recv() for _ in range(10)])
        assert got == [(A("reply"), i, [b"unset", me]) for i in range(10, 20)]
    finally:
        await ch.aclose()


async def test_a_finished_calls_deadline_does_not_reach_the_next_call(ctx_node: Any) -> None:
    """A worker reused after a call with a ``timeout`` runs the next call
    without it; a timed-out call ends its worker and the next one works."""
    ch = await SSHChannel.open(ctx_node.ssh_argv())
    try:
        await ch.hello()
        assert await ch.call(1, "ctx", "nap", [0], {A("timeout"): 200}) == (
            A("reply"),
            1,
            A("done"),
        )
        assert await ch.call(2, "ctx", "nap", [0.5]) == (A("reply"), 2, A("done"))
        timeout = (A("error"), 3, (A("sshrpc"), A("timeout"), {}))
        assert await ch.call(3, "ctx", "nap", [30], {A("timeout"): 50}) == timeout
        await ch.send((A("call"), 4, A("ctx"), A("nap"), [30]))
        await ch.send((A("cancel"), 4))
        assert await ch.recv() == (A("error"), 4, (A("sshrpc"), A("cancelled"), {}))
        assert await ch.call(5, "ctx", "nap", [0]) == (A("reply"), 5, A("done"))
    finally:
        await ch.aclose()


async def test_a_sync_function_sends_from_its_worker_thread(ctx_node: Any) -> None:
    """``send`` from a pool thread reaches the loop (``from_thread`` with the
    pool's token) and the client's mailbox."""
    ch = await SSHChannel.open(ctx_node.ssh_argv())
    try:
        hello = await ch.hello()
        await ch.send((A("call"), 1, A("ctx"), A("tell"), [b"hi"]))
        frames = [await ch.recv(), await ch.recv()]
        assert (A("send"), hello[A("session")], (A("told"), b"hi")) in frames
        assert (A("reply"), 1, True) in frames
    finally:
        await ch.aclose()
