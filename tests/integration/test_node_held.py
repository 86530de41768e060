"""Issue 11, finding 3: what one key's requests hold in the node is bounded in
(estimated) bytes, not only counted: running calls' arguments, mailbox
messages, queued answers.  Over Trio memory streams (the sshd path is in
test_work_bounds.py)."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing
from _sshwire import FrameClient

from sshrpc import Atom, Service, node
from sshrpc.node import Node

A = Atom
pytestmark = pytest.mark.timeout(30)

t = Service("t")


@t.export
async def sleeper(*_: object) -> None:
    await trio.sleep_forever()


@t.export
async def reader(n: int) -> int:
    for _ in range(n):
        await node.receive()
    return n


def heavy(n: int) -> list[list[object]]:
    return [[] for _ in range(n)]  # 72 units per empty list


async def start(nursery: trio.Nursery, **options: object) -> tuple[Node, FrameClient]:
    n = Node([t], **options)  # type: ignore[arg-type]
    ours, theirs = trio.testing.memory_stream_pair()
    nursery.start_soon(n.serve_channel, theirs)
    c = FrameClient(ours)
    await c.send((A("hello"), 1, {}))
    assert (await c.recv())[0] == "hello"  # type: ignore[index]
    return n, c


LIMIT = 8 * 1024 * 1024
UNIT = 20_000 * 72  # what heavy(20_000) holds, about


async def until(condition: object) -> None:
    """Poll ``condition()`` (bounded: 5 s).  Large frames are decoded in
    paced turns (timed sleeps), which wait_all_tasks_blocked cannot see."""
    with trio.fail_after(5):
        while not condition():  # type: ignore[operator]
            await trio.sleep(0.01)


async def test_mailbox_messages_hold_the_senders_units(nursery, caplog):
    """20 messages of ~1.4 Mi units each to a process that never reads
    (issue 11: 20 such messages held 1.5 GB): five fit an 8 MiB limit, the
    rest are dropped and logged; the process's end gives the units back."""
    n, c = await start(nursery, max_held_per_key=LIMIT)
    await c.send((A("spawn"), 1, A("t"), A("sleeper"), []))
    _, _, pid = await c.recv()  # type: ignore[misc]
    with caplog.at_level(logging.WARNING, logger="sshrpc.node"):
        for _ in range(20):
            await c.send((A("send"), pid, heavy(20_000)))
        refused = lambda: caplog.text.count("send refused: the key holds")  # noqa: E731
        await until(lambda: refused() + n.statistics()["held"] // UNIT == 20)
    held = n.statistics()["held"]
    assert 4 * UNIT < held <= LIMIT
    assert refused() == 20 - held // UNIT
    # The channel ends: its process is cancelled, its mailbox emptied.
    await c.stream.aclose()
    with trio.fail_after(5):
        while n.statistics()["channels"]:
            await trio.sleep(0.01)
    assert n.statistics()["held"] == 0


async def test_received_messages_give_the_units_back(nursery):
    n, c = await start(nursery, max_held_per_key=LIMIT)
    await c.send((A("spawn"), 1, A("t"), A("reader"), [15]))
    _, _, pid = await c.recv()  # type: ignore[misc]
    for _ in range(15):  # 15 x 1.4 Mi units: 2.5 times the limit, in turns
        await c.send((A("send"), pid, heavy(20_000)))
        assert n.statistics()["held"] <= LIMIT
    assert await c.recv() == (A("down"), pid, A("normal"))
    assert n.statistics()["held"] == 0


async def test_running_calls_hold_their_arguments(nursery, caplog):
    """24 calls that keep their large arguments (issue 11: 24 such calls took
    the node from 174 MiB to 1.97 GB): past the limit, ``overload``."""
    n, c = await start(nursery, max_held_per_key=LIMIT)
    with caplog.at_level(logging.WARNING, logger="sshrpc.node"):
        for i in range(24):
            await c.send((A("call"), i, A("t"), A("sleeper"), [heavy(20_000)]))
        overloads = [await c.recv() for _ in range(19)]
    held = n.statistics()["held"]
    assert held <= LIMIT
    running = held // UNIT
    assert running == 5 and n.statistics()["calls"] == running
    assert all(o[2] == (A("sshrpc"), A("overload"), {}) for o in overloads)  # type: ignore[index]
    # Small calls are refused too while the key is at its limit ...
    await c.send((A("call"), 100, A("t"), A("sleeper"), [heavy(20_000)]))
    assert (await c.recv())[:2] == (A("error"), 100)  # type: ignore[index]
    # ... and run again once a call ends and gives its units back.
    await c.send((A("cancel"), 0))
    assert await c.recv() == (A("error"), 0, (A("sshrpc"), A("cancelled"), {}))
    assert n.statistics()["held"] == held - (held // running)
    await c.send((A("call"), 101, A("t"), A("sleeper"), [heavy(20_000)]))
    await c.send((A("cancel"), 101))
    assert await c.recv() == (A("error"), 101, (A("sshrpc"), A("cancelled"), {}))


async def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_held_per_key"):
        Node([t], max_held_per_key=0)
    with pytest.raises(ValueError, match="max_channels_per_key"):
        Node([t], max_channels_per_key=0)


@t.export
async def queue_then_wait(n: int) -> int:
    node.send(node.session_pid(), b"x" * n)  # queued for this key before the first await
    await trio.sleep(0)
    return n


async def test_a_call_that_queues_before_it_waits_is_charged(nursery):
    """An async call whose first step queues bytes for its key (a message to
    its own session) is charged before it runs, like any call: once its
    answer and the message are read, the key holds nothing.  (The read's
    fast path charged such a call after its first step; the charge then
    failed against the message's bytes, and the call's end gave back what
    was never held, leaving the key below zero.)"""
    n, c = await start(nursery, max_held_per_key=4000)
    for i in range(3):
        await c.send((A("call"), i, A("t"), A("queue_then_wait"), [3900]))
        frames = [await c.recv(), await c.recv()]
        assert (A("reply"), i, 3900) in frames
        await trio.testing.wait_all_tasks_blocked()
        assert n.statistics()["held"] == 0
