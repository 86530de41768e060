"""A ``RequestSet``'s waiter reading its connection's socket itself
(``RequestSet._wait`` through ``Pump.wait_answer``) while the pump sleeps:
it is woken by whatever ends its wait -- its own read, an answer of another
connection of the set, ``abandon()`` from another task, the connection's
end -- and a cancel takes nothing.  Against a real OpenSSH sshd serving
``sshrpc.demo`` (``sshrpc_server``)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from _connect import connect as _connect

import sshrpc
from sshrpc.client import Connection

pytestmark = pytest.mark.timeout(60)


async def _parked(node: Connection) -> None:
    """Until the pump sleeps on the socket (bounded)."""
    with trio.fail_after(5):
        while not node._pump._in_park:
            await trio.sleep(0.005)  # bounded polling of the pump's state


async def _lone_waiter(node: Connection) -> None:
    """Until a task waits on ``node``'s socket itself (bounded)."""
    with trio.fail_after(5):
        while node._pump._lone is None:
            await trio.sleep(0.005)  # bounded polling of the pump's state


async def test_a_set_waiter_reads_the_answers_itself(sshrpc_server: Any) -> None:
    async with _connect(sshrpc_server) as node:
        reqs = sshrpc.RequestSet()
        await _parked(node)
        sent_by_pump = node._pump.bytes_sent
        node.send_requests_nowait("slow", "work", [[0.3]], into=reqs, labels=["s"])
        node.send_requests_nowait("echo", "echo", [[1], [2]], into=reqs, labels=["a", "b"])
        got: dict[Any, Any] = {}
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                await _lone_waiter(node)

            nursery.start_soon(watch)
            with trio.fail_after(10):
                while reqs:
                    got.update(await reqs.receive_responses())
        assert got == {"s": "done", "a": 1, "b": 2}
        # The batches were written by their caller (the pump slept), and
        # the pump is asleep on the socket again.
        assert node._pump.bytes_sent > sent_by_pump
        await _parked(node)
        assert node._pump._lone is None
        assert await node.call("echo", "echo", [b"after"]) == b"after"


async def test_abandon_from_another_task_wakes_a_lone_waiter(sshrpc_server: Any) -> None:
    async with _connect(sshrpc_server) as node:
        reqs = sshrpc.RequestSet()
        await _parked(node)
        node.send_requests_nowait("slow", "work", [[30], [30]], into=reqs)
        outcome: list[BaseException] = []

        async def wait() -> None:
            try:
                await reqs.receive_responses()
            except ValueError as exc:  # the set was emptied under it
                outcome.append(exc)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await _lone_waiter(node)
                reqs.abandon()
        assert len(outcome) == 1 and "empty" in str(outcome[0])
        assert not reqs
        with trio.fail_after(10):
            while node._pending:
                await trio.sleep(0.01)  # bounded polling for the servers' answers
        assert await node.call("echo", "echo", [b"after"]) == b"after"


async def test_an_answer_of_another_connection_wakes_a_lone_waiter(
    sshrpc_server: Any,
) -> None:
    async with _connect(sshrpc_server) as a, _connect(sshrpc_server) as b:
        reqs = sshrpc.RequestSet()
        await _parked(a)
        a.send_requests_nowait("slow", "work", [[30]], into=reqs, labels=["slow"])
        got: list[Any] = []
        with trio.fail_after(10):  # not the 30 s of the slow call
            async with trio.open_nursery() as nursery:

                async def wait() -> None:
                    got.extend(await reqs.receive_responses())

                nursery.start_soon(wait)
                await _lone_waiter(a)
                # The set now spans two connections; b's answer comes
                # through b's pump, which the waiter on a's socket cannot see.
                b.send_requests_nowait("echo", "echo", [[7]], into=reqs, labels=["b"])
        assert got == [("b", 7)]
        reqs.abandon()


async def test_the_connection_ending_wakes_a_lone_waiter(sshrpc_server: Any) -> None:
    reqs = sshrpc.RequestSet()
    async with _connect(sshrpc_server) as node:
        await _parked(node)
        node.send_requests_nowait("slow", "work", [[30]], into=reqs, labels=["x"])
        raised: list[BaseException] = []
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def wait() -> None:
                    try:
                        await reqs.receive_responses()
                    except sshrpc.ConnectionLost as exc:
                        raised.append(exc)

                nursery.start_soon(wait)
                await _lone_waiter(node)
                await node.aclose()
    assert len(raised) == 1 and raised[0].label == "x"  # type: ignore[attr-defined]
    assert not reqs


async def test_a_cancelled_lone_wait_takes_nothing(sshrpc_server: Any) -> None:
    async with _connect(sshrpc_server) as node:
        reqs = sshrpc.RequestSet()
        await _parked(node)
        node.send_requests_nowait("slow", "work", [[0.5]], into=reqs, labels=["w"])
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reqs.receive_responses)
                await _lone_waiter(node)
                nursery.cancel_scope.cancel()
        # The socket wait is back with the pump; nothing was taken.
        assert node._pump._lone is None and len(reqs) == 1 and reqs.answered == 0
        with trio.fail_after(10):
            assert await reqs.receive_responses() == [("w", "done")]
        assert await node.call("echo", "echo", [b"after"]) == b"after"
