"""``sshrpc._request``: call slots and request sets, driven as the pump
drives them (``Request._finish``), without a connection.  The same objects
run through a real sshd in tests/integration/test_client.py."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from sshrpc import ConnectionLost, RemoteError
from sshrpc._request import CallSlots, Request, RequestSet


async def test_slots_are_handed_over_in_order_and_a_cancel_takes_none() -> None:
    slots = CallSlots(1)
    assert slots.acquire_nowait() and not slots.acquire_nowait()
    order: list[str] = []

    async def take(name: str, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await slots.acquire()
            order.append(name)

    async with trio.open_nursery() as nursery:
        a = await nursery.start(take, "a")
        b = await nursery.start(take, "b")
        c = await nursery.start(take, "c")
        await trio.testing.wait_all_tasks_blocked()
        assert slots.waiting == 3
        b.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert slots.waiting == 2 and slots.free == 0
        assert not slots.acquire_nowait()  # others wait: no overtaking
        slots.release()  # to a
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["a"]
        slots.release()  # to c
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["a", "c"] and slots.free == 0
        assert a.cancelled_caught is False and c.cancelled_caught is False
    slots.release()
    assert slots.free == 1 and slots.waiting == 0


async def test_a_request_set_answers_in_completion_order() -> None:
    reqs = RequestSet()
    requests = [Request(i, label=f"r{i}") for i in range(5)]
    for req in requests:
        reqs._add(req)
    assert len(reqs) == 5 and reqs.answered == 0
    with pytest.raises(trio.WouldBlock):
        reqs.check_response()
    for i in (3, 1):
        requests[i].ok, requests[i].value = True, i * 10
        requests[i]._finish()
    requests[4].error = RemoteError("error", "boom")
    requests[4]._finish()
    assert reqs.answered == 3
    assert await reqs.receive_response() == ("r3", 30)
    assert reqs.check_response() == ("r1", 10)
    with pytest.raises(RemoteError) as info:
        await reqs.receive_response()
    assert info.value.label == "r4" and len(reqs) == 2
    requests[0].error = EOFError("gone")
    requests[0]._finish()
    with pytest.raises(ConnectionLost) as lost:
        reqs.check_response()
    assert lost.value.label == "r0" and len(reqs) == 1


async def test_waiting_on_a_request_set() -> None:
    reqs = RequestSet()
    with pytest.raises(ValueError, match="empty"):
        await reqs.receive_response()
    req = Request(7, label="x")
    reqs._add(req)
    got: list[tuple[object, object]] = []

    async def wait() -> None:
        got.append(await reqs.receive_response())

    # A cancelled wait takes nothing.
    with trio.CancelScope() as scope:
        scope.cancel()
        await reqs.receive_response()
    assert scope.cancelled_caught and len(reqs) == 1 and reqs._task is None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await reqs.receive_response()
        req.ok, req.value = True, "v"
        req._finish()  # wakes the waiter (as the pump does)
    assert got == [("x", "v")] and not reqs


async def test_receive_responses_takes_the_answers_up_to_an_error() -> None:
    reqs = RequestSet()
    requests = [Request(i, label=f"r{i}") for i in range(6)]
    for req in requests:
        reqs._add(req)
    with pytest.raises(ValueError, match="max"):
        await reqs.receive_responses(max=0)
    for i in (4, 0, 2):
        requests[i].ok, requests[i].value = True, i
        requests[i]._finish()
    requests[1].error = RemoteError("error", "boom")
    requests[1]._finish()
    requests[3].ok = True
    requests[3]._finish()
    assert await reqs.receive_responses(max=2) == [("r4", 4), ("r0", 0)]
    assert await reqs.receive_responses() == [("r2", 2)]
    with pytest.raises(RemoteError) as info:
        await reqs.receive_responses()
    assert info.value.label == "r1"
    assert await reqs.receive_responses() == [("r3", None)]
    assert len(reqs) == 1 and reqs.answered == 0
    # A cancelled wait takes nothing; an answer then wakes the next wait.
    with trio.move_on_after(0.01) as scope:
        await reqs.receive_responses()
    assert scope.cancelled_caught and len(reqs) == 1

    async def answer() -> None:
        requests[5].ok, requests[5].value = True, 5
        requests[5]._finish()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        assert await reqs.receive_responses() == [("r5", 5)]
    assert not reqs
    with pytest.raises(ValueError, match="empty"):
        await reqs.receive_responses()
