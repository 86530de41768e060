"""Call-path properties the performance work must keep: a node serving a
real protocol session over an in-memory stream (no sshd needed for these)."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from typing import Any

import pytest
import trio
import trio.testing

import sshrpc
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


async def _writes_for_one_read_of_30_calls(node: Node, n: int = 30) -> int:
    """``n`` (30) inline calls to ``node`` arriving in one read: the number
    of ``os.write`` calls that carried the answers, once all arrived."""
    a, b = trio.socket.socketpair()
    client_side, server_side = trio.SocketStream(a), trio.SocketStream(b)
    client = _p.Connection(_p.Role.CLIENT, name="test")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.serve_channel, server_side)
        await client_side.send_all(client.send(client.hello()))

        assert isinstance(await next_event(client, client_side), _p.Hello)
        batch = b"".join(
            client.send(_p.Call(id=i, module=Atom("m"), function=Atom("double"), args=[i]))
            for i in range(n)
        )
        before = _write_syscalls()
        await client_side.send_all(batch)  # send(2): not counted
        answers = [await next_event(client, client_side) for _ in range(n)]
        writes = _write_syscalls() - before
        assert sorted((x.id, x.value) for x in answers) == [(i, 2 * i) for i in range(n)]
        nursery.cancel_scope.cancel()
    return writes


def _doubling() -> Service:
    svc = Service("m")

    @svc.export(inline=True)
    def double(n: int) -> int:
        return 2 * n

    return svc


async def test_early_flush_sends_answers_while_the_read_is_answered():
    """With ``flush_early=8`` and nothing else waiting for the loop, the
    answers of one read of 12 calls leave in two writes (8, then the
    rest): the client can work on them meanwhile; all arrive."""
    assert await _writes_for_one_read_of_30_calls(Node([_doubling()], flush_early=8), 12) == 2


async def test_early_flush_of_a_large_read_is_at_its_half():
    """A read of 30 calls with ``flush_early=4``: the answers leave in two
    writes of 15 (half the read: more than ``flush_early``), not in eight
    of 4 -- each write costs sshd and the client a packet and a system
    call, and two already let the client work while the node answers."""
    assert await _writes_for_one_read_of_30_calls(Node([_doubling()], flush_early=4)) == 2


async def test_early_flush_needs_flush_early_answers():
    """A read of 7 calls with ``flush_early=8``: one write."""
    assert await _writes_for_one_read_of_30_calls(Node([_doubling()], flush_early=8), 7) == 1


def test_flush_early_must_not_be_negative():
    with pytest.raises(ValueError, match="flush_early"):
        Node([_doubling()], flush_early=-1)


async def test_answers_of_one_read_leave_in_one_write():
    """30 inline calls arriving in one read, ``flush_early=0``: the node
    answers them with one ``os.write`` on its socket (it used to write each
    answer on its own when no other call was open), and every answer
    arrives."""
    assert await _writes_for_one_read_of_30_calls(Node([_doubling()], flush_early=0)) == 1


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


# -- async calls started by the reader, handed over when they wait (node._start_async)

_seen: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="unset")


def _mixed_service(gate: trio.Event, started: list[int]) -> Service:
    svc = Service("mix")

    @svc.export
    async def quick(n: int) -> list[Any]:
        """Never waits; sees and changes its own context only."""
        before = _seen.get()
        _seen.set(f"quick{n}")
        return [n, before]

    @svc.export
    async def halfway(n: int) -> list[Any]:
        """Sets its context, enters a cancel scope and a lock, then waits
        for ``gate`` (a checkpoint) in them; reads its context back, in the
        task it started in."""
        _seen.set(f"halfway{n}")
        task = trio.lowlevel.current_task()
        lock = trio.Lock()
        with trio.move_on_after(3600):
            async with lock:
                started.append(n)
                await gate.wait()
        assert trio.lowlevel.current_task() is task
        return [n, _seen.get()]

    @svc.export
    async def fails(n: int) -> None:
        raise ValueError(f"no {n}")

    return svc


async def _open_channel(
    node: Node, nursery: trio.Nursery, **client_options: Any
) -> tuple[_p.Connection, trio.testing.MemorySendStream | Any]:
    client_side, server_side = trio.testing.memory_stream_pair()
    client = _p.Connection(_p.Role.CLIENT, name="test", **client_options)
    nursery.start_soon(node.serve_channel, server_side)
    await client_side.send_all(client.send(client.hello()))
    assert isinstance(await next_event(client, client_side), _p.Hello)
    return client, client_side


def _call(client: _p.Connection, i: int, fn: str, n: int, **opts: Any) -> bytes:
    return client.send(_p.Call(id=i, module=Atom("mix"), function=Atom(fn), args=[n], **opts))


async def test_async_calls_that_wait_and_that_do_not_in_one_read():
    """One read: calls that never wait around two that wait half-way (in a
    cancel scope and a lock they entered before waiting).  The quick ones
    are answered before the gate opens (the waiting calls do not hold them
    up: the reading moves to another task), each in a fresh context; the
    waiting ones finish in their own context and task once it opens; an
    error answers as an error; one cancelled while it waits answers
    ``cancelled``; nothing is left open."""
    gate = trio.Event()
    started: list[int] = []
    node = Node([_mixed_service(gate, started)])
    async with trio.open_nursery() as nursery:
        client, stream = await _open_channel(node, nursery)
        batch = [
            _call(client, 1, "quick", 1),
            _call(client, 2, "halfway", 2),
            _call(client, 3, "quick", 3),
            _call(client, 4, "fails", 4),
            _call(client, 5, "halfway", 5),
            _call(client, 6, "quick", 6),
        ]
        await stream.send_all(b"".join(batch))
        early = {}
        for _ in range(4):
            ev = await next_event(client, stream)
            early[ev.id] = ev
        assert sorted(early) == [1, 3, 4, 6]
        for i in (1, 3, 6):
            assert early[i] == _p.Reply(id=i, value=[i, b"unset"]), early[i]
        assert isinstance(early[4], _p.ErrorReply), early[4]
        assert (early[4].cls, early[4].reason) == (Atom("error"), (Atom("ValueError"), b"no 4"))
        with trio.fail_after(10):
            while len(started) < 2:  # both waiting calls reached the gate
                await trio.sleep(0.001)
        await stream.send_all(client.send(_p.Cancel(id=5)))
        assert await next_event(client, stream) == _p.ErrorReply(
            id=5, cls=Atom("sshrpc"), reason=Atom("cancelled")
        )
        gate.set()
        ev = await next_event(client, stream)
        assert isinstance(ev, _p.Reply) and ev.id == 2, ev
        assert ev.value == [2, b"halfway2"]
        # the drainer's tasks keep serving: quick calls after all of that
        await stream.send_all(b"".join(_call(client, 10 + i, "quick", i) for i in range(5)))
        got = sorted([(await next_event(client, stream)).value for _ in range(5)])
        assert got == [[i, b"unset"] for i in range(5)]
        assert node.statistics()["calls"] == 0
        nursery.cancel_scope.cancel()


async def test_a_queued_async_call_cancelled_in_the_same_read():
    """A waiting call and its cancel in one read (the cancel is dispatched
    by the task the reading moved to): ``cancelled``; a quick call
    cancelled the same way has already its answer (it never waits),
    exactly one each."""
    gate = trio.Event()
    node = Node([_mixed_service(gate, [])])
    async with trio.open_nursery() as nursery:
        client, stream = await _open_channel(node, nursery)
        await stream.send_all(
            _call(client, 1, "halfway", 1)
            + client.send(_p.Cancel(id=1))
            + _call(client, 2, "quick", 2)
            + client.send(_p.Cancel(id=2))
        )
        got = {}
        for _ in range(2):
            ev = await next_event(client, stream)
            got[ev.id] = ev
        assert got[1] == _p.ErrorReply(id=1, cls=Atom("sshrpc"), reason=Atom("cancelled"))
        assert got[2] == _p.Reply(id=2, value=[2, b"unset"])
        await stream.send_all(client.send(_p.Ping(token=3)))
        assert await next_event(client, stream) == _p.Pong(token=3)  # nothing else came
        assert node.statistics()["calls"] == 0
        nursery.cancel_scope.cancel()


async def test_a_waiting_async_call_times_out_and_the_rest_of_its_read_runs():
    """A call with a short ``timeout`` that waits forever answers
    ``timeout``; the quick calls behind it in the same read are answered
    before that (the reading moved to another task), and a call with a
    timeout that never waits answers its value."""
    gate = trio.Event()
    node = Node([_mixed_service(gate, [])])
    async with trio.open_nursery() as nursery:
        client, stream = await _open_channel(node, nursery)
        await stream.send_all(
            _call(client, 1, "halfway", 1, timeout=50)
            + _call(client, 2, "quick", 2, timeout=0)
            + _call(client, 3, "quick", 3)
        )
        assert await next_event(client, stream) == _p.Reply(id=2, value=[2, b"unset"])
        assert await next_event(client, stream) == _p.Reply(id=3, value=[3, b"unset"])
        assert await next_event(client, stream) == _p.ErrorReply(
            id=1, cls=Atom("sshrpc"), reason=Atom("timeout")
        )
        assert node.statistics()["calls"] == 0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("wait_for_start", [True, False])
async def test_async_calls_open_when_the_channel_ends(wait_for_start: bool):
    """The client disconnects with async calls waiting (or just sent, in
    the same read as the EOF): the channel ends, every call is accounted
    for (none left open, the key's units given back)."""
    gate = trio.Event()
    started: list[int] = []
    node = Node([_mixed_service(gate, started)])
    async with trio.open_nursery() as nursery:
        client, stream = await _open_channel(node, nursery)
        batch = b"".join(_call(client, i, "halfway" if i % 2 else "quick", i) for i in range(20))
        await stream.send_all(batch)
        if wait_for_start:
            with trio.fail_after(10):
                while len(started) < 10:
                    await trio.sleep(0.001)
        await stream.aclose()
        with trio.fail_after(10):
            while node.statistics()["channels"]:
                await trio.sleep(0.001)
        stats = node.statistics()
        assert (stats["calls"], stats["held"]) == (0, 0), stats
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("level", [logging.DEBUG, logging.INFO])
async def test_every_call_is_audited_by_its_nodes_auditor(caplog: Any, level: int):
    """The audit line of a sync call answered from the worker pool is
    written by its node's auditor (its level), like an async or inline
    call's: it used to be written from the pool's delivery callback with
    the default auditor (INFO), whatever the node's ``audit_level``."""
    svc = Service("aud")

    @svc.export
    async def a() -> int:
        return 1

    @svc.export(inline=True)
    def i() -> int:
        return 2

    @svc.export
    def t() -> int:
        return 3

    caplog.set_level(logging.INFO, logger="sshrpc.audit")
    node = Node([svc], audit_level=level)
    async with trio.open_nursery() as nursery:
        client, stream = await _open_channel(node, nursery)
        for n, fn in enumerate("ait"):
            call = _p.Call(id=n, module=Atom("aud"), function=Atom(fn), args=[])
            await stream.send_all(client.send(call))
            assert await next_event(client, stream) == _p.Reply(id=n, value=n + 1)
        nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records if r.name == "sshrpc.audit"]
    if level == logging.DEBUG:
        assert lines == []
    else:
        assert [line.split()[2] for line in lines] == ["aud:a/0", "aud:i/0", "aud:t/0"], lines


async def test_deadlines_of_sync_calls_in_the_pool():
    """Sync calls with a ``timeout`` run in the pool with no task of their
    own; the channel's timer answers ``timeout`` for each whose deadline
    passes first (an earlier deadline arriving after a later one too), the
    function learns it (``cancelled()``), and calls that return in time
    answer their value, once."""
    svc = Service("pool")
    release = threading.Event()
    learned: list[bool] = []

    @svc.export
    def block(n: int) -> int:
        release.wait(20)
        return n

    @svc.export
    def spin(n: int) -> int:
        deadline = time.monotonic() + 20
        while not sshrpc.cancelled() and time.monotonic() < deadline:
            time.sleep(0.001)  # a sync function polling for its cancel
        learned.append(sshrpc.cancelled())
        return n

    @svc.export
    def quick(n: int) -> int:
        return n

    node = Node([svc])
    async with trio.open_nursery() as nursery:
        client, stream = await _open_channel(node, nursery)

        def call(i: int, fn: str, timeout: int) -> bytes:
            ev = _p.Call(id=i, module=Atom("pool"), function=Atom(fn), args=[i], timeout=timeout)
            return client.send(ev)

        await stream.send_all(call(1, "block", 60_000) + call(2, "spin", 60_000))
        await stream.send_all(call(3, "spin", 30) + call(4, "quick", 60_000))
        assert await next_event(client, stream) == _p.Reply(id=4, value=4)
        assert await next_event(client, stream) == _p.ErrorReply(
            id=3, cls=Atom("sshrpc"), reason=Atom("timeout")
        )
        with trio.fail_after(10):
            while not learned:  # the function saw its call time out
                await trio.sleep(0.001)
        assert learned == [True]
        release.set()
        assert await next_event(client, stream) == _p.Reply(id=1, value=1)
        await stream.send_all(client.send(_p.Cancel(id=2)))
        assert await next_event(client, stream) == _p.ErrorReply(
            id=2, cls=Atom("sshrpc"), reason=Atom("cancelled")
        )
        with trio.fail_after(10):
            while node.workers().statistics()["busy"]:
                await trio.sleep(0.001)
        await stream.send_all(client.send(_p.Ping(token=9)))
        assert await next_event(client, stream) == _p.Pong(token=9)  # nothing else came
        assert node.statistics()["calls"] == 0
        nursery.cancel_scope.cancel()


async def test_a_reused_id_does_not_inherit_an_ended_calls_deadline():
    """Call 1 (sync, ``timeout`` 150 ms) returns at once; call 1 again (the
    id reused, no timeout) blocks past those 150 ms: the first call's
    deadline, still in the channel's heap, does not time it out (the timer
    is asleep until call 0's earlier deadline meanwhile); it answers its
    value when let go."""
    svc = Service("pool")
    release = threading.Event()

    @svc.export
    def quick() -> int:
        return 0

    @svc.export
    def block() -> int:
        release.wait(20)
        return 1

    node = Node([svc])

    def call(i: int, fn: str, timeout: int | None = None) -> bytes:
        ev = _p.Call(id=i, module=Atom("pool"), function=Atom(fn), args=[], timeout=timeout)
        return client.send(ev)

    async with trio.open_nursery() as nursery:
        client, stream = await _open_channel(node, nursery)
        await stream.send_all(call(0, "block", 100) + call(1, "quick", 150))
        assert await next_event(client, stream) == _p.Reply(id=1, value=0)
        await stream.send_all(call(1, "block"))
        assert await next_event(client, stream) == _p.ErrorReply(
            id=0, cls=Atom("sshrpc"), reason=Atom("timeout")
        )
        (channel,) = node.channels
        with trio.fail_after(10):
            while channel._job_deadlines:  # the timer is done with both deadlines
                await trio.sleep(0.001)
        release.set()
        assert await next_event(client, stream) == _p.Reply(id=1, value=1)
        nursery.cancel_scope.cancel()


async def test_one_read_of_every_kind_of_call_answers_and_audits_in_order(caplog: Any):
    """One read mixing what the reader answers itself (inline and async
    functions, ok and raising, with and without a timeout) with a denied
    call, an undefined one, a thread call and an async call that waits:
    every answer is right, the audit lines come in the order the calls
    ended (the reader's ``ok`` lines are handed over once per read), and
    nothing stays held or open."""
    svc = Service("kinds")
    gate = trio.Event()

    @svc.export(inline=True)
    def inl(n: int) -> int:
        return n

    @svc.export(inline=True)
    def inl_fails(n: int) -> int:
        raise ValueError(f"inline {n}")

    @svc.export
    async def asy(n: int) -> int:
        return n

    @svc.export
    async def asy_fails(n: int) -> int:
        raise ValueError(f"async {n}")

    @svc.export
    async def waits(n: int) -> int:
        await gate.wait()
        return n

    @svc.export
    def thr(n: int) -> int:
        return n

    caplog.set_level(logging.INFO, logger="sshrpc.audit")
    node = Node([svc])
    names = ["inl", "asy", "inl_fails", "asy", "nope", "asy_fails", "inl", "waits", "asy", "inl"]
    async with trio.open_nursery() as nursery:
        client, stream = await _open_channel(node, nursery)
        batch = b"".join(
            client.send(
                _p.Call(
                    id=i,
                    module=Atom("kinds"),
                    function=Atom(fn),
                    args=[i],
                    timeout=60000 if i % 2 else None,
                )
            )
            for i, fn in enumerate(names)
        )
        await stream.send_all(batch)
        answers = {}
        for _ in range(len(names) - 1):
            ev = await next_event(client, stream)
            answers[ev.id] = ev
        assert sorted(answers) == [i for i in range(len(names)) if names[i] != "waits"]
        for i, fn in enumerate(names):
            if fn in ("inl", "asy"):
                assert answers[i] == _p.Reply(id=i, value=i), answers[i]
        for i, text in ((2, b"inline 2"), (5, b"async 5")):
            ev = answers[i]
            assert isinstance(ev, _p.ErrorReply), ev
            assert (ev.cls, ev.reason) == (Atom("error"), (Atom("ValueError"), text))
        assert isinstance(answers[4], _p.ErrorReply) and answers[4].reason == Atom("undef")
        gate.set()
        assert await next_event(client, stream) == _p.Reply(id=7, value=7)
        await stream.send_all(
            client.send(_p.Call(id=20, module=Atom("kinds"), function=Atom("thr"), args=[20]))
        )
        assert await next_event(client, stream) == _p.Reply(id=20, value=20)
        stats = node.statistics()
        assert (stats["calls"], stats["held"]) == (0, 0), stats
        nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records if r.name == "sshrpc.audit"]
    got = [(line.split()[2], line.split()[3]) for line in lines]
    assert got == [
        ("kinds:inl/1", "outcome=ok"),
        ("kinds:asy/1", "outcome=ok"),
        ("kinds:inl_fails/1", "outcome=error"),
        ("kinds:asy/1", "outcome=ok"),
        ("kinds:nope/1", "outcome=undef"),
        ("kinds:asy_fails/1", "outcome=error"),
        ("kinds:inl/1", "outcome=ok"),
        ("kinds:asy/1", "outcome=ok"),
        ("kinds:inl/1", "outcome=ok"),
        ("kinds:waits/1", "outcome=ok"),
        ("kinds:thr/1", "outcome=ok"),
    ], lines


async def _stop_code() -> None:
    pass


class _MarkedPlain:
    """A plain callable that ``inspect.iscoroutinefunction`` takes for an
    ``async def`` (as ``inspect.markcoroutinefunction`` makes one on 3.12)."""

    __name__ = "stop"
    __code__ = _stop_code.__code__
    __defaults__ = None
    __kwdefaults__ = None
    __annotations__: dict[str, Any] = {}

    def __call__(self) -> None:
        raise StopIteration(5)


async def test_a_marked_plain_function_raising_stopiteration_is_an_error():
    """A plain function marked as a coroutine function runs as an async
    call; its own ``StopIteration`` is an error, as on the general path, not
    the answer ``ok`` with the exception's value."""
    svc = Service("marked")
    svc.export(_MarkedPlain())
    node = Node([svc])
    async with trio.open_nursery() as nursery:
        client, client_side = await _open_channel(node, nursery)
        for call_id in (1, 2):  # the first call decides the name; the next takes the fast path
            await client_side.send_all(client.send_call(call_id, "marked", "stop", []))
            answer = await next_event(client, client_side)
            assert isinstance(answer, _p.ErrorReply) and answer.id == call_id, answer
        nursery.cancel_scope.cancel()


async def test_one_read_of_answers_the_reader_builds_itself_in_order():
    """One read of inline and async calls whose answers are not the plain
    case: a value with no Erlang term answers ``TypeError``, a value above
    the client's ``max_frame`` answers ``too_large``, a message a call sends
    to its own session arrives before that call's answer, and each call
    sees its session; the plain calls around them are answered in order
    and nothing stays open or held."""
    from sshrpc import node as sshrpc_node

    svc = Service("odd")

    @svc.export(inline=True)
    def inl(n: int) -> int:
        return n

    @svc.export
    async def asy(n: int) -> int:
        return n

    @svc.export(inline=True)
    def no_term(n: int) -> object:
        return object()

    @svc.export
    async def async_no_term(n: int) -> object:
        return object()

    @svc.export(inline=True)
    def big(n: int) -> bytes:
        return b"x" * 2000

    @svc.export
    async def async_big(n: int) -> bytes:
        return b"x" * 2000

    @svc.export(inline=True)
    def tell(n: int) -> Any:
        sshrpc_node.send(sshrpc_node.session_pid(), (Atom("told"), n))
        return sshrpc_node.session_pid()

    @svc.export
    async def async_tell(n: int) -> Any:
        sshrpc_node.send(sshrpc_node.session_pid(), (Atom("told"), n))
        return sshrpc_node.session_pid()

    names = [
        "inl", "no_term", "asy", "big", "tell", "inl", "async_no_term",
        "async_big", "async_tell", "asy",
    ]  # fmt: skip
    node = Node([svc])
    async with trio.open_nursery() as nursery:
        client, client_side = await _open_channel(node, nursery, max_frame=1024)
        for _ in range(2):  # the first round decides each name; the second is the fast path
            await client_side.send_all(
                b"".join(
                    client.send(_p.Call(id=i, module=Atom("odd"), function=Atom(fn), args=[i]))
                    for i, fn in enumerate(names)
                )
            )
            got = [await next_event(client, client_side) for _ in range(len(names) + 2)]
            session = got[5].value
            assert isinstance(session, sshrpc.Pid), got
            expected: list[Any] = []
            for i, fn in enumerate(names):
                if fn in ("inl", "asy"):
                    expected.append(_p.Reply(id=i, value=i))
                elif fn.endswith("tell"):
                    expected += [
                        _p.Send(dest=session, msg=(Atom("told"), i)),
                        _p.Reply(id=i, value=session),
                    ]
                elif fn.endswith("big"):
                    expected.append(
                        _p.ErrorReply(id=i, cls=Atom("sshrpc"), reason=Atom("too_large"))
                    )
                else:
                    expected.append(got[len(expected)])
                    answer = got[len(expected) - 1]
                    assert isinstance(answer, _p.ErrorReply) and answer.id == i, answer
                    assert answer.reason[0] == Atom("TypeError"), answer
            assert got == expected
        stats = node.statistics()
        assert (stats["calls"], stats["held"]) == (0, 0), stats
        nursery.cancel_scope.cancel()
