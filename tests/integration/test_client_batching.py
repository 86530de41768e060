"""The client's per-call path batches what it can and still writes a lone
call at once: a real sshd and an in-process node (sshrpc.testing)."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from sshrpc import ConnectionLost, RequestSet, Service
from sshrpc._request import Request
from sshrpc.testing import open_test_node

pytestmark = pytest.mark.timeout(60)

svc = Service("t")


TASKS = 16
_arrived: dict[int, int] = {}
_rounds: dict[int, trio.Event] = {}


@svc.export
async def echo(value: Any) -> Any:
    return value


@svc.export
async def together(i: int, r: int) -> list[int]:
    """Answers once all ``TASKS`` calls of round ``r`` have arrived, all
    together (so one read brings the client every answer of the round)."""
    _arrived[r] = _arrived.get(r, 0) + 1
    event = _rounds.setdefault(r, trio.Event())
    if _arrived[r] == TASKS:
        event.set()
    await event.wait()
    return [i, r]


class _DirectWrites:
    """The pump's channel as callers see it: counts the writes a calling
    task makes itself (``Pump.send_nowait``'s direct write), not the pump
    task's own (which keeps the channel it started with)."""

    def __init__(self, channel: Any) -> None:
        self._channel = channel
        self.frames: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)

    def write(self, data: bytes) -> Any:
        self.frames.append(len(data))
        return self._channel.write(data)


async def test_callers_woken_by_one_read_do_not_write_alone() -> None:
    """Many tasks in lockstep: once their answers arrive, nothing is in
    flight, but the woken callers are about to send: none of them writes
    its frame alone (each would cost an SSH packet and a system call); the
    pump writes them together.  A caller alone still writes at once."""
    async with open_test_node([svc]) as test_node, test_node.connect() as node:
        assert await node.call("t", "echo", [0]) == 0
        direct = _DirectWrites(node._pump.channel)
        node._pump.channel = direct
        rounds = 20

        async def worker(i: int) -> None:
            for r in range(rounds):
                assert await node.call("t", "together", [i, r]) == [i, r]

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(TASKS):
                    nursery.start_soon(worker, i)
        # At most the very first call of the run goes alone (nothing in
        # flight, nobody woken); before, about one per round did.
        assert len(direct.frames) <= 2, direct.frames
        assert node._woken == 0

        # Sequential calls: each one alone in flight, written by its caller.
        before = len(direct.frames)
        with trio.fail_after(30):
            for r in range(10):
                assert await node.call("t", "echo", [r]) == r
        assert len(direct.frames) - before >= 9
        assert node._woken == 0


async def test_a_failure_raised_while_the_pump_is_busy_stops_it_at_once() -> None:
    """``Pump.fail`` called from inside the pump's own turn (here from the
    dispatch of an answer) does not interrupt the busy pump; it must still
    stop before sleeping on a socket where nothing more will arrive."""

    class FailingSet(RequestSet):
        __slots__ = ()

        def _completed(self, req: Request) -> None:
            super()._completed(req)
            assert req._conn is not None
            req._conn._pump.fail(ConnectionLost("failed from the dispatch"))

    async with open_test_node([svc]) as test_node, test_node.connect(keepalive=None) as node:
        reqs = FailingSet()
        await node.send_request("t", "echo", [1], into=reqs, label="x")
        with trio.fail_after(10):
            assert await reqs.receive_response() == ("x", 1)
            await node._ended.wait()
        with pytest.raises(ConnectionLost):
            await node.call("t", "echo", [2])
