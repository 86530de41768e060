"""Call-path properties the performance work must keep: a node serving a
real protocol session over an in-memory stream (no sshd needed for these)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from sshrpc import Atom, Service
from sshrpc import protocol as _p
from sshrpc.node import Node

pytestmark = pytest.mark.timeout(60)


async def next_event(client: _p.Connection, stream: trio.abc.ReceiveStream) -> _p.Event:
    """The client core's next event, reading ``stream`` as needed (10 s at
    most per read)."""
    while True:
        event = client.next_event()
        if event is not _p.NEED_DATA:
            assert isinstance(event, _p.Event)
            return event
        with trio.fail_after(10):
            data = await stream.receive_some()
        assert data, "the node closed the channel"
        client.receive_data(data)


async def test_cast_starts_before_a_call_sent_after_it():
    """A cast followed by a call in the same write: the cast's function has
    begun (here: finished its first step) when the call runs, every time."""
    svc = Service("state")
    seen: dict[str, int] = {"last": -1}

    @svc.export
    async def put(n: int) -> None:
        seen["last"] = n

    @svc.export
    async def get() -> int:
        return seen["last"]

    node = Node([svc])
    client_side, server_side = trio.testing.memory_stream_pair()
    client = _p.Connection(_p.Role.CLIENT, name="test")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.serve_channel, server_side)
        await client_side.send_all(client.send(client.hello()))
        pending = bytearray()

        assert isinstance(await next_event(client, client_side), _p.Hello)
        for i in range(50):
            pending += client.send(_p.Cast(module=Atom("state"), function=Atom("put"), args=[i]))
            pending += client.send(
                _p.Call(id=i, module=Atom("state"), function=Atom("get"), args=[])
            )
            await client_side.send_all(bytes(pending))
            pending.clear()
            answer = await next_event(client, client_side)
            assert isinstance(answer, _p.Reply), answer
            assert (answer.id, answer.value) == (i, i)
        nursery.cancel_scope.cancel()


def _write_syscalls() -> int:
    """write(2)-family calls of this thread so far (``send`` is not counted)."""
    with open("/proc/thread-self/io") as f:
        for line in f:
            if line.startswith("syscw:"):
                return int(line.split()[1])
    raise AssertionError("no syscw in /proc/thread-self/io")


async def test_answers_of_one_read_leave_in_one_write():
    """30 inline calls arriving in one read: the node answers them with one
    ``os.write`` on its socket (it used to write each answer on its own when
    no other call was open), and every answer arrives."""
    svc = Service("m")

    @svc.export(inline=True)
    def double(n: int) -> int:
        return 2 * n

    node = Node([svc])
    a, b = trio.socket.socketpair()
    client_side, server_side = trio.SocketStream(a), trio.SocketStream(b)
    client = _p.Connection(_p.Role.CLIENT, name="test")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.serve_channel, server_side)
        await client_side.send_all(client.send(client.hello()))

        assert isinstance(await next_event(client, client_side), _p.Hello)
        batch = b"".join(
            client.send(_p.Call(id=i, module=Atom("m"), function=Atom("double"), args=[i]))
            for i in range(30)
        )
        before = _write_syscalls()
        await client_side.send_all(batch)  # send(2): not counted
        answers = [await next_event(client, client_side) for _ in range(30)]
        writes = _write_syscalls() - before
        assert sorted((x.id, x.value) for x in answers) == [(i, 2 * i) for i in range(30)]
        assert writes == 1, writes
        nursery.cancel_scope.cancel()


async def test_pool_answers_wait_for_room_and_come_once():
    """Sync calls in the worker pool whose answers find the answer queue full
    (a client that reads slowly: lockstep stream) wait for room; a cancel
    that comes after the function returned changes nothing.  Exactly one
    answer per call, nothing after."""
    svc = Service("m")
    size = 4000

    @svc.export
    def big(i: int) -> bytes:
        return bytes([i]) * size

    node = Node([svc], max_queued=1000)
    client_side, server_side = trio.testing.lockstep_stream_pair()
    client = _p.Connection(_p.Role.CLIENT, name="test", max_frame=1 << 20)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.serve_channel, server_side)
        await client_side.send_all(client.send(client.hello()))

        assert isinstance(await next_event(client, client_side), _p.Hello)
        calls = b"".join(
            client.send(_p.Call(id=i, module=Atom("m"), function=Atom("big"), args=[i]))
            for i in range(20)
        )
        await client_side.send_all(calls)
        with trio.fail_after(10):
            while node.workers().statistics()["busy"]:  # every function returned
                await trio.sleep(0.001)  # bounded polling of the pool's threads
        first = await next_event(client, client_side)  # the writer is blocked until we read
        await client_side.send_all(
            b"".join(client.send(_p.Cancel(id=i)) for i in range(20) if i != first.id)
        )
        answers = [first] + [await next_event(client, client_side) for _ in range(19)]
        by_id = {a.id: a for a in answers}
        assert sorted(by_id) == list(range(20))
        for i, a in by_id.items():  # every function had returned: no cancel took
            assert isinstance(a, _p.Reply) and a.value == bytes([i]) * size, a
        await client_side.send_all(client.send(_p.Ping(token=7)))
        assert await next_event(client, client_side) == _p.Pong(token=7)
        nursery.cancel_scope.cancel()
