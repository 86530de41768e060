"""The lone caller (src/sshrpc/_pump.py, "The lone caller"): a call alone in
flight waits on the SSH socket in its own task and reads its answer there,
while the pump task sleeps.  The hand-off back to the pump must lose
nothing: a second call, a cancel, the connection's end or a channel opened
while the caller waits.  A real sshd and a node in this Trio loop
(``sshrpc.testing``)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio
from _gate import Gate

import sshrpc
from sshrpc import _pump
from sshrpc.client import Connection
from sshrpc.testing import TestNode, open_test_node

pytestmark = pytest.mark.timeout(60)

#: Every wait in these tests is bounded by this (seconds).
DEADLINE = 20.0


def _services(gate: Gate) -> list[sshrpc.Service]:
    svc = sshrpc.Service("lone")

    @svc.export
    async def echo(value: Any) -> Any:
        return value

    svc.export(gate.wait)

    return [svc]


@pytest.fixture
async def gated() -> AsyncIterator[tuple[TestNode, Gate]]:
    if _pump._epoll_manager() is None:
        pytest.skip(
            f"the lone caller is off with Trio {trio.__version__}"
            " (not a release it was tested with)"
        )
    gate = Gate()
    async with open_test_node(_services(gate)) as test_node:
        yield test_node, gate


def _pump_of(node: Connection) -> _pump.Pump:
    pump = node._pump
    assert isinstance(pump, _pump.Pump)
    return pump


def _pump_owns_socket(pump: _pump.Pump) -> bool:
    """The pump sleeps on the socket, registered as its reader, and no
    caller holds the wait."""
    waiters = pump._io._registered.get(pump._fd)
    return (
        pump._lone is None
        and pump._in_park
        and waiters is not None
        and waiters.read_task is pump._task
    )


async def _until(predicate: Any) -> None:
    """Bounded polling (checkpoints) until ``predicate()``."""
    with trio.fail_after(DEADLINE):
        while not predicate():
            await trio.sleep(0.001)


async def _waiting_lone(node: Connection, gate: Gate, nursery: trio.Nursery) -> list[Any]:
    """Start ``lone:wait()`` in a task; return once the node runs it and its
    caller holds the socket wait.  The list gets the result."""
    results: list[Any] = []

    async def caller() -> None:
        results.append(await node.call("lone", "wait"))

    nursery.start_soon(caller)
    with trio.fail_after(DEADLINE):
        await gate.started.wait()
    await _until(lambda: _pump_of(node)._lone is not None)
    return results


async def test_sequential_calls_are_read_by_their_callers(gated: tuple[TestNode, Gate]) -> None:
    """Alone in flight, a call's answer is read by its caller: the pump
    task does not run for it (fails if the pump still reads every answer)."""
    test_node, _ = gated
    async with test_node.connect(keepalive=None) as node:
        pump = _pump_of(node)
        assert await node.call("lone", "echo", [0]) == 0
        await _until(lambda: _pump_owns_socket(pump))
        steps = 0
        original = pump._turns

        async def counted(*args: Any) -> None:
            nonlocal steps
            steps += 1
            await original(*args)

        pump._turns = counted  # type: ignore[method-assign]
        with trio.fail_after(DEADLINE):
            for i in range(50):
                assert await node.call("lone", "echo", [i]) == i
        # (The pump stays in the _turns call it was parked in.)
        assert steps == 0
        assert _pump_owns_socket(pump)
        assert node._woken == 0 and not node._pending


async def test_a_second_call_while_the_lone_caller_waits(gated: tuple[TestNode, Gate]) -> None:
    """Another task's call wakes the pump, which takes the socket back; the
    waiting caller then gets its answer from the pump's dispatch."""
    test_node, gate = gated
    async with test_node.connect(keepalive=None) as node:
        pump = _pump_of(node)
        async with trio.open_nursery() as nursery:
            results = await _waiting_lone(node, gate, nursery)
            with trio.fail_after(DEADLINE):
                for i in range(5):
                    assert await node.call("lone", "echo", [i]) == i
            assert pump._lone is None
            gate.opened.set()
        assert results == [sshrpc.Atom("opened")]
        assert node._woken == 0 and not node._pending
        # Lone again afterwards.
        assert await node.call("lone", "echo", [9]) == 9
        assert _pump_owns_socket(pump)


async def test_a_cancel_while_the_lone_caller_waits(gated: tuple[TestNode, Gate]) -> None:
    """Cancelled while it holds the socket wait: the wait is back with the
    pump at once, the node hears the cancel, and later calls work."""
    test_node, gate = gated
    async with test_node.connect(keepalive=None) as node:
        pump = _pump_of(node)
        outcome: list[str] = []
        scope = trio.CancelScope()

        async def caller() -> None:
            with scope:
                await node.call("lone", "wait")
                outcome.append("answered")
            outcome.append("left")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            with trio.fail_after(DEADLINE):
                await gate.started.wait()
            await _until(lambda: pump._lone is not None)
            scope.cancel()
            # Synchronously back with the parked pump.
            assert _pump_owns_socket(pump)
            await _until(lambda: bool(outcome))
        assert outcome == ["left"]
        with trio.fail_after(DEADLINE):
            await gate.cancelled.wait()
        assert await node.call("lone", "echo", [1]) == 1
        await _until(lambda: not node._pending)
        assert node.statistics().undelivered == 0


async def _socket_fails(test_node: TestNode, pump: Any) -> None:
    pump.sock.shutdown(socket.SHUT_RDWR)


async def _node_closes(test_node: TestNode, pump: Any) -> None:
    (channel,) = test_node.node.channels
    await channel.stream.aclose()


@pytest.mark.parametrize(
    "end",
    [
        # the socket fails under the waiting caller (its own read sees the end)
        pytest.param(_socket_fails, id="socket-fails"),
        # the node closes the session's channel
        pytest.param(_node_closes, id="node-closes"),
    ],
)
async def test_the_connection_ends_while_the_lone_caller_waits(
    gated: tuple[TestNode, Gate], end: Callable[[TestNode, Any], Awaitable[None]]
) -> None:
    """The connection ends under the waiting caller: the call raises
    ConnectionLost and the connection is closed."""
    test_node, gate = gated
    async with test_node.connect(keepalive=None) as node:
        pump = _pump_of(node)
        errors: list[BaseException] = []

        async def caller() -> None:
            try:
                await node.call("lone", "wait")
            except sshrpc.ConnectionLost as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            with trio.fail_after(DEADLINE):
                await gate.started.wait()
            await _until(lambda: pump._lone is not None)
            await end(test_node, pump)
            await _until(lambda: bool(errors))
        assert node.closed
        with pytest.raises(sshrpc.ConnectionLost):
            await node.call("lone", "echo", [1])
        gate.opened.set()


async def test_a_channel_opened_while_the_lone_caller_waits(
    gated: tuple[TestNode, Gate],
) -> None:
    """Opening a lane wakes the pump, which takes the socket back before it
    opens the channel; the waiting caller's answer arrives through the
    pump, and after the lane is gone calls are lone again."""
    test_node, gate = gated
    async with test_node.connect(keepalive=None) as node:
        pump = _pump_of(node)
        async with trio.open_nursery() as nursery:
            results = await _waiting_lone(node, gate, nursery)
            with trio.fail_after(DEADLINE):
                async with node.open_channel() as child:
                    assert await child.call("lone", "echo", [1]) == 1
                    gate.opened.set()
                    await _until(lambda: bool(results))
                    assert await node.call("lone", "echo", [2]) == 2
        assert results == [sshrpc.Atom("opened")]
        await _until(lambda: not pump._multi)
        assert await node.call("lone", "echo", [3]) == 3
        await _until(lambda: _pump_owns_socket(pump))
        assert await node.call("lone", "echo", [4]) == 4


async def test_a_call_in_a_cancelled_scope_sends_nothing(gated: tuple[TestNode, Gate]) -> None:
    """A call made in a scope already cancelled (or past its deadline)
    raises Cancelled before anything is registered or written, on the
    lone path and with other calls in flight."""
    test_node, gate = gated
    async with test_node.connect(keepalive=None) as node:
        pump = _pump_of(node)
        assert await node.call("lone", "echo", [0]) == 0
        for in_flight in (False, True):
            async with trio.open_nursery() as nursery:
                gate.started, gate.opened = trio.Event(), trio.Event()
                if in_flight:
                    await _waiting_lone(node, gate, nursery)
                sent, pending = pump.bytes_sent + len(pump._out), dict(node._pending)
                cancelled = trio.CancelScope()
                cancelled.cancel()
                for scope in (cancelled, trio.move_on_at(trio.current_time() - 1)):
                    with scope:
                        await node.call("lone", "echo", [1])
                    assert scope.cancelled_caught
                    assert pump.bytes_sent + len(pump._out) == sent
                    assert node._pending == pending
                gate.opened.set()
        assert await node.call("lone", "echo", [2]) == 2


def test_the_shortcut_is_off_for_an_untested_trio(monkeypatch: pytest.MonkeyPatch) -> None:
    """It lends Trio's private epoll registration: only for the Trio
    releases it was tested with; any other takes the pump path."""

    async def manager() -> object:
        return _pump._epoll_manager()

    assert trio.run(manager) is not None  # this checkout's Trio is in the range
    monkeypatch.setattr(trio, "__version__", "0.99.0")
    assert trio.run(manager) is None
    monkeypatch.setattr(trio, "__version__", "not a version")
    assert trio.run(manager) is None
