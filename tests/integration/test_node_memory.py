"""The node's channel logic over Trio memory streams (no sshd): graceful bye,
mailboxes and their overflow, registered names, bounds."""

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
RECEIVED: list[object] = []


@t.export
async def sleeper() -> None:
    await trio.sleep_forever()


@t.export
async def named(name: str) -> None:
    node.register(name)
    while True:
        message = await node.receive()
        node.send(node.session_pid(), (A("got"), message, node.self_pid()))


@t.export
async def quick(x: int) -> int:
    await trio.sleep(0.05)
    return x


CLOSED_GENERATORS: list[int] = []


@t.export
async def chunks(size: int, n: int):
    try:
        for _ in range(n):
            yield b"x" * size
    finally:
        CLOSED_GENERATORS.append(size)


@t.export
def fail() -> None:
    raise KeyError("k")


@t.export
def notify(message: object) -> str:
    """A sync function (worker thread) writing to the client's mailbox."""
    return "sent" if node.send(node.session_pid(), message) else "dropped"


@t.export
def whoami() -> str:
    return node.current_key().fingerprint or "-"


async def start(nursery, **options) -> tuple[Node, FrameClient]:
    n = Node([t], **options)
    ours, theirs = trio.testing.memory_stream_pair()
    nursery.start_soon(n.serve_channel, theirs)
    return n, FrameClient(ours)


async def test_bye_drains_open_calls(nursery):
    n, c = await start(nursery)
    await c.hello()
    await c.send((A("call"), 1, A("t"), A("quick"), [7]))
    await c.send((A("bye"), A("normal")))
    assert await c.recv() == (A("reply"), 1, 7)
    assert await c.recv() == (A("bye"), A("normal"))
    assert await c.recv() is None
    assert n.statistics()["channels"] == 0


async def test_registered_names_and_mailbox_overflow(nursery, caplog):
    n, c = await start(nursery, mailbox_size=2)
    hello = await c.hello()
    await c.send((A("spawn"), 1, A("t"), A("named"), [b"svc"]))
    _, _, pid = await c.recv()
    await trio.testing.wait_all_tasks_blocked()  # the process has registered
    await c.send((A("send"), A("svc"), b"hi"))
    assert await c.recv() == (A("send"), hello[A("session")], (A("got"), b"hi", pid))
    # a process that never reads: its mailbox holds 2, the third is dropped
    await c.send((A("spawn"), 2, A("t"), A("sleeper"), []))
    _, _, sleeper = await c.recv()
    with caplog.at_level(logging.WARNING, logger="sshrpc.node"):
        assert [n.send(sleeper, i) for i in range(3)] == [True, True, False]
    assert "full; message dropped" in caplog.text
    assert n.send(A("nobody"), 1) is False
    assert n.registry == {"svc": pid}
    with pytest.raises(ValueError, match="already registered"):
        n.register("svc", sleeper)


async def test_spawn_bound_and_cast_bound(nursery, caplog):
    n, c = await start(nursery, max_calls=2)
    await c.hello()
    for i in range(2):
        await c.send((A("spawn"), i, A("t"), A("sleeper"), []))
        assert (await c.recv())[:2] == (A("reply"), i)
    await c.send((A("spawn"), 5, A("t"), A("sleeper"), []))
    assert await c.recv() == (A("error"), 5, (A("sshrpc"), A("overload"), {}))
    await c.send((A("call"), 6, A("t"), A("sleeper"), []))
    await c.send((A("call"), 7, A("t"), A("sleeper"), []))
    with caplog.at_level(logging.WARNING, logger="sshrpc.node"):
        # Running casts have a bound of their own (max_calls): two run, the
        # third is dropped; calls are full whatever the casts do.
        for _ in range(3):
            await c.send((A("cast"), A("t"), A("sleeper"), []))
        await c.send((A("call"), 8, A("t"), A("quick"), [1]))
        assert await c.recv() == (A("error"), 8, (A("sshrpc"), A("overload"), {}))
    assert caplog.text.count("cast t:sleeper/0 outcome=overload") == 1  # the audit line
    assert n.statistics()["processes"] == 2


async def test_expose_traces_option(nursery):
    bad = Service("bad")

    @bad.export
    def boom() -> None:
        raise KeyError("k")

    n = Node([bad], expose_traces=True)
    ours, theirs = trio.testing.memory_stream_pair()
    nursery.start_soon(n.serve_channel, theirs)
    c = FrameClient(ours)
    await c.hello()
    await c.send((A("call"), 1, A("bad"), A("boom"), []))
    tag, _, (cls, reason, details) = await c.recv()
    assert (tag, cls, reason) == (A("error"), A("error"), (A("KeyError"), b"'k'"))
    assert any(b"Traceback" in line for line in details[A("trace")])
    # and by default: no trace; in-memory channels have no key
    _, c2 = await start(nursery)
    await c2.hello()
    await c2.send((A("call"), 1, A("t"), A("fail"), []))
    assert await c2.recv() == (A("error"), 1, (A("error"), (A("KeyError"), b"'k'"), {}))
    await c2.send((A("call"), 2, A("t"), A("whoami"), []))
    assert await c2.recv() == (A("reply"), 2, b"-")


async def test_send_from_a_worker_thread(nursery):
    _, c = await start(nursery)
    hello = await c.hello()
    await c.send((A("call"), 1, A("t"), A("notify"), [b"from thread"]))
    assert await c.recv() == (A("send"), hello[A("session")], b"from thread")
    assert await c.recv() == (A("reply"), 1, b"sent")


async def test_abnormal_bye_aborts_like_a_disconnect(nursery):
    n, c = await start(nursery)
    await c.hello()
    await c.send((A("call"), 1, A("t"), A("sleeper"), []))
    await c.send((A("bye"), (A("shutdown"), b"client exiting")))
    assert await c.recv() is None  # closed, no answer, no bye back
    assert n.statistics()["channels"] == 0


async def test_node_shutdown_says_bye(nursery):
    n, c = await start(nursery)
    await c.hello()
    await c.send((A("call"), 1, A("t"), A("sleeper"), []))
    await trio.testing.wait_all_tasks_blocked()
    await n.shutdown()
    assert await c.recv() == (A("bye"), A("shutting_down"))
    assert await c.recv() is None
    with trio.fail_after(5):
        while n.statistics()["channels"]:
            await trio.sleep(0.01)  # bounded poll of the node's counters


async def test_stream_chunk_too_large_and_cancel_mid_stream(nursery):
    _, c = await start(nursery)
    await c.send((A("hello"), 1, {A("max_frame"): 1000}))
    await c.recv()
    await c.send((A("call"), 1, A("t"), A("chunks"), [10, 3], {A("stream"): True}))
    assert [await c.recv() for _ in range(4)] == [
        (A("chunk"), 1, b"x" * 10),
        (A("chunk"), 1, b"x" * 10),
        (A("chunk"), 1, b"x" * 10),
        (A("reply"), 1, A("done")),
    ]
    await c.send((A("call"), 2, A("t"), A("chunks"), [5000, 3], {A("stream"): True}))
    assert await c.recv() == (A("error"), 2, (A("sshrpc"), A("too_large"), {}))
    # cancel while the stream waits for credit: one cancelled, generator closed
    await c.send((A("call"), 3, A("t"), A("chunks"), [7, 100], {A("stream"): True, A("credit"): 1}))
    assert await c.recv() == (A("chunk"), 3, b"x" * 7)
    await c.send((A("cancel"), 3))
    assert await c.recv() == (A("error"), 3, (A("sshrpc"), A("cancelled"), {}))
    await c.send((A("ping"), 1))
    assert await c.recv() == (A("pong"), 1)
    assert CLOSED_GENERATORS == [10, 5000, 7]
