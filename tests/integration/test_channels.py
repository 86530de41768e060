"""``Connection.open_channel()``: more sshrpc sessions on one SSH connection,
through a real sshd and a node in this Trio loop (``sshrpc.testing``).

One pump task moves every channel's bytes (src/sshrpc/_pump.py, "Many
channels"): parent and children interleave, a paused child does not stop
the others, closing a child closes only it, closing the parent ends all,
and refusals (the node's ``--max-channels-per-key``, sshd's
``MaxSessions``) are ``ChannelRefused`` with the parent intact.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from _gate import Gate

import sshrpc
from sshrpc import client as _client
from sshrpc import node as _node
from sshrpc._link import open_link
from sshrpc.testing import TestNode, open_test_node

pytestmark = pytest.mark.timeout(120)

#: Every wait in these tests is bounded by this (seconds).
DEADLINE = 20.0


def _services(gate: Gate) -> list[sshrpc.Service]:
    chan = sshrpc.Service("chan")

    @chan.export
    def echo(value: Any) -> Any:
        return value

    chan.export(gate.wait)

    @chan.export
    async def flood(n: int, size: int) -> None:
        session = _node.session_pid()
        for i in range(n):
            _node.send(session, (i, b"x" * size))

    return [chan]


@pytest.fixture
async def gated() -> AsyncIterator[tuple[TestNode, Gate]]:
    gate = Gate()
    async with open_test_node(_services(gate), max_channels_per_key=6) as test_node:
        yield test_node, gate


async def _node_channels(test_node: TestNode, count: int) -> None:
    """Wait (bounded) until the node has ``count`` channels open."""
    with trio.fail_after(DEADLINE):
        while len(test_node.node.channels) != count:
            await trio.sleep(0.01)


async def test_parent_and_children_interleave(gated: tuple[TestNode, Gate]) -> None:
    test_node, _ = gated
    big = b"b" * 300_000  # several SSH packets: half-sent writes on a busy session
    async with test_node.connect() as parent:
        async with parent.open_channel() as one, parent.open_channel() as two:
            assert len({parent.hello["session"], one.hello["session"], two.hello["session"]}) == 3
            await _node_channels(test_node, 3)
            results: dict[str, list[Any]] = {"parent": [], "one": [], "two": []}

            async def calls(name: str, conn: sshrpc.Connection, value: Any) -> None:
                for i in range(40):
                    results[name].append(await conn.call("chan", "echo", [[name, i, value]]))

            with trio.fail_after(DEADLINE):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(calls, "parent", parent, 1)
                    nursery.start_soon(calls, "parent", parent, 2)
                    nursery.start_soon(calls, "one", one, big)
                    nursery.start_soon(calls, "two", two, 3)
                    nursery.start_soon(calls, "two", two, big)
            for name, conn in (("parent", parent), ("one", one), ("two", two)):
                assert len(results[name]) == 80 if name != "one" else 40
                assert all(r[0] == name.encode() for r in results[name])
                assert conn.statistics().open_calls == 0
            assert [r[1] for r in results["one"]] == list(range(40))
            assert all(r[2] == big for r in results["one"])
        await _node_channels(test_node, 1)
        assert await parent.call("chan", "echo", [7]) == 7


async def test_batches_of_requests_on_a_child_channel(gated: tuple[TestNode, Gate]) -> None:
    """``send_requests_nowait``/``receive_responses`` on a lane, while the
    parent channel calls too: each answer comes back on its own channel."""
    test_node, _ = gated
    async with test_node.connect() as parent, parent.open_channel() as child:
        reqs = sshrpc.RequestSet()
        labels = [("child", i) for i in range(40)]
        sent = child.send_requests_nowait(
            "chan", "echo", [[i] for i in range(40)], into=reqs, labels=labels
        )
        assert len(sent) == 40
        sent += parent.send_requests_nowait("chan", "echo", [[-1]], into=reqs, labels=["parent"])
        got: dict[Any, Any] = {}
        with trio.fail_after(DEADLINE):
            while reqs:
                got.update(await reqs.receive_responses())
        assert got == {**{("child", i): i for i in range(40)}, "parent": -1}
        assert child.statistics().open_calls == parent.statistics().open_calls == 0


async def test_many_children_opened_and_closed_leave_nothing(
    gated: tuple[TestNode, Gate],
) -> None:
    test_node, _ = gated
    async with test_node.connect() as parent:
        pump = parent._pump
        assert isinstance(pump, _client.Pump)
        with trio.fail_after(60):
            for i in range(15):
                async with parent.open_channel() as child:
                    assert await child.call("chan", "echo", [i]) == i
                assert child.closed
                with pytest.raises(sshrpc.ConnectionLost):
                    await child.call("chan", "echo", [i])
        assert pump.lanes_opened == 15
        assert pump._lanes == [] and not pump._ops and pump._owner is None
        await _node_channels(test_node, 1)
        assert await parent.call("chan", "echo", [1]) == 1


async def test_child_close_with_call_in_flight(
    gated: tuple[TestNode, Gate], monkeypatch: pytest.MonkeyPatch
) -> None:
    test_node, gate = gated
    # The close waits this long for the node to answer open calls (it never
    # will: the gate stays shut), then cuts the channel.
    monkeypatch.setattr(_client, "CLOSE_DRAIN_TIMEOUT", 0.5)
    async with test_node.connect() as parent:
        caught: list[BaseException] = []
        with trio.fail_after(DEADLINE):
            async with parent.open_channel() as child:

                async def in_flight() -> None:
                    try:
                        await child.call("chan", "wait", [])
                    except sshrpc.ConnectionLost as exc:
                        caught.append(exc)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(in_flight)
                    await gate.started.wait()
                    await child.aclose()
        assert len(caught) == 1 and "closed" in str(caught[0])
        assert await parent.call("chan", "echo", [2]) == 2
        await _node_channels(test_node, 1)
        assert not parent.closed


async def test_cancel_inside_child(gated: tuple[TestNode, Gate]) -> None:
    test_node, gate = gated
    async with test_node.connect() as parent, parent.open_channel() as child:
        with trio.fail_after(DEADLINE):
            with trio.CancelScope() as scope:

                async def cancel_when_started() -> None:
                    await gate.started.wait()
                    scope.cancel()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cancel_when_started)
                    await child.call("chan", "wait", [])
            assert scope.cancelled_caught
            await gate.cancelled.wait()  # the node stopped the call too
            assert await child.call("chan", "echo", [3]) == 3
            assert await parent.call("chan", "echo", [4]) == 4
            assert child.statistics().open_calls == 0


async def test_parent_close_ends_children(gated: tuple[TestNode, Gate]) -> None:
    test_node, gate = gated
    caught: list[BaseException] = []
    with trio.fail_after(DEADLINE):
        async with test_node.connect() as parent, parent.open_channel() as child:

            async def in_flight() -> None:
                try:
                    await child.call("chan", "wait", [])
                except sshrpc.ConnectionLost as exc:
                    caught.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(in_flight)
                await gate.started.wait()
                await parent.aclose()
            assert child.closed
            with pytest.raises(sshrpc.ConnectionLost, match="SSH connection ended"):
                await child.call("chan", "echo", [1])
            with pytest.raises(sshrpc.ConnectionLost):
                async with parent.open_channel():
                    pass  # pragma: no cover
        assert len(caught) == 1 and "SSH connection ended" in str(caught[0])
        await _node_channels(test_node, 0)


async def test_paused_child_does_not_stop_the_others(gated: tuple[TestNode, Gate]) -> None:
    test_node, _ = gated
    async with (
        test_node.connect() as parent,
        parent.open_channel(max_undelivered=4) as flooded,
        parent.open_channel() as other,
    ):
        # 800 KB: far beyond what the child takes before it pauses (4
        # messages), within the node's answer queue (1 MiB: it drops
        # messages beyond, and the flood does not wait for room).
        n = 40
        await flooded.spawn("chan", "flood", [n, 20_000])
        with trio.fail_after(DEADLINE):
            while not flooded.statistics().reading_paused:
                await trio.sleep(0.01)
            for i in range(20):
                assert await other.call("chan", "echo", [i]) == i
                assert await parent.call("chan", "echo", [i]) == i
            assert flooded.statistics().reading_paused
            got = []
            while len(got) < n:
                message = await flooded.receive()
                if message[0] != sshrpc.Atom("down"):
                    got.append(message[0])
        assert got == list(range(n))


async def test_node_refuses_a_channel_past_its_limit(gated: tuple[TestNode, Gate]) -> None:
    test_node, _ = gated  # max_channels_per_key=6
    async with test_node.connect() as parent:
        with trio.fail_after(DEADLINE):
            async with (
                parent.open_channel() as a,
                parent.open_channel() as b,
                parent.open_channel() as c,
                parent.open_channel() as d,
                parent.open_channel() as e,
            ):
                await _node_channels(test_node, 6)
                with pytest.raises(sshrpc.ChannelRefused) as refused:
                    async with parent.open_channel():
                        pass  # pragma: no cover
                assert refused.value.reason == (sshrpc.Atom("too_many_channels"), 6)
                assert "too_many_channels" in str(refused.value)
                for conn in (parent, a, b, c, d, e):
                    assert await conn.call("chan", "echo", [5]) == 5
            await _node_channels(test_node, 1)
            async with parent.open_channel() as again:
                assert await again.call("chan", "echo", [6]) == 6


async def test_every_refusal_reaches_the_client(gated: tuple[TestNode, Gate]) -> None:
    """The node refuses with a bye, then closes; the client's hello is on its
    way by then.  The bye must arrive every time (it was lost about one time
    in four when the node closed with the hello unread: the relay died on
    the reset before it had copied the bye)."""
    test_node, _ = gated  # max_channels_per_key=6
    async with test_node.connect() as parent:
        with trio.fail_after(60):
            async with (
                parent.open_channel(),
                parent.open_channel(),
                parent.open_channel(),
                parent.open_channel(),
                parent.open_channel(),
            ):
                for _ in range(16):
                    with pytest.raises(sshrpc.ChannelRefused) as refused:
                        async with parent.open_channel():
                            pass  # pragma: no cover
                    assert refused.value.reason == (sshrpc.Atom("too_many_channels"), 6)
                assert await parent.call("chan", "echo", [1]) == 1


async def test_sshd_refuses_past_max_sessions() -> None:
    """sshd's MaxSessions (10 by default) refuses the channel itself: a
    ``ChannelRefused`` without a node reason; the open ones carry on."""
    gate = Gate()
    async with (
        open_test_node(_services(gate), max_channels_per_key=64) as test_node,
        test_node.connect() as parent,
    ):
        children: list[sshrpc.Connection] = []
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                refused: list[sshrpc.ChannelRefused] = []
                done = trio.Event()

                async def hold() -> None:
                    try:
                        async with parent.open_channel() as child:
                            children.append(child)
                            await done.wait()
                    except sshrpc.ChannelRefused as exc:
                        refused.append(exc)

                for opened in range(1, 21):  # bounded: MaxSessions is 10
                    nursery.start_soon(hold)
                    while len(children) + len(refused) < opened:
                        await trio.sleep(0.01)
                    if refused:
                        break
                assert refused and refused[0].reason is None
                assert "refused a new channel" in str(refused[0])
                assert len(children) == 9  # plus the parent: MaxSessions 10
                for child in children:
                    assert await child.call("chan", "echo", [8]) == 8
                assert await parent.call("chan", "echo", [9]) == 9
                done.set()
        await _node_channels(test_node, 1)


async def test_open_channel_cancelled_while_opening(gated: tuple[TestNode, Gate]) -> None:
    test_node, _ = gated
    async with test_node.connect() as parent:
        pump = parent._pump
        assert isinstance(pump, _client.Pump)
        with trio.fail_after(DEADLINE):
            with trio.CancelScope() as scope:
                scope.cancel()
                async with parent.open_channel():
                    pass  # pragma: no cover
            # Cancels at every stage of the open: while the pump opens the
            # channel, just as it finishes, during the hellos.
            for step in range(12):
                with trio.move_on_after(0.0005 * 1.5**step):
                    async with parent.open_channel():
                        await trio.sleep_forever()
                while pump._lanes or pump._ops:  # the pump closes what was opened
                    await trio.sleep(0.01)
        await _node_channels(test_node, 1)
        assert await parent.call("chan", "echo", [10]) == 10


async def test_child_closed_while_its_packet_is_half_sent(
    gated: tuple[TestNode, Gate], monkeypatch: pytest.MonkeyPatch
) -> None:
    """libssh2 holds one half-sent packet per session and answers EAGAIN to
    every other send until it is out: the pump must finish a closing
    child's packet before it closes the channel, or the close (and every
    later call of the parent) would wait for ever.  A slow link and a small
    socket send buffer make the child's big request leave half a packet."""
    test_node, _ = gated
    monkeypatch.setattr(_client, "CLOSE_DRAIN_TIMEOUT", 0.2)
    async with (
        open_link("127.0.0.1", test_node.port, rtt=0.2, buffer=64 * 1024) as link,
        sshrpc.open_connection(
            link.host,
            link.port,
            user=test_node.user,
            identity=str(test_node.identity),
            verify_host_key=False,  # (the link's port is not in known_hosts)
            agent=False,
            use_ssh_config=False,
        ) as parent,
    ):
        pump = parent._pump
        assert isinstance(pump, _client.Pump)
        pump.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        with trio.fail_after(DEADLINE):
            async with parent.open_channel() as child:
                lane = child._pump
                for _ in range(2):
                    await child.send_request("chan", "echo", [b"x" * 900_000])
                while pump._owner is None or pump._owner[0] is not lane:
                    await trio.sleep(0.001)
                # Leave the block now: the close waits 0.2 s for answers,
                # then closes the channel with half a packet of it out.
            assert pump._lanes == [] and pump._owner is None
            assert await parent.call("chan", "echo", [1]) == 1
        await _node_channels(test_node, 1)


async def test_children_get_the_connections_window(gated: tuple[TestNode, Gate]) -> None:
    test_node, _ = gated
    window = 8 * 1024 * 1024
    async with test_node.connect(window=window) as parent, parent.open_channel() as child:
        # (less the hello that came in meanwhile)
        for conn in (parent, child):
            assert window - 4096 <= (conn.statistics().window_read or 0) <= window
        assert await child.call("chan", "echo", [b"w" * 900_000]) == b"w" * 900_000
    async with test_node.connect() as plain, plain.open_channel() as child:
        assert (child.statistics().window_read or 0) <= 2 * 1024 * 1024


async def test_concurrent_open_call_close_loops(gated: tuple[TestNode, Gate]) -> None:
    """Several tasks each open, call and close children in a bounded loop
    while the parent keeps calling; a child's child is a sibling on the same
    SSH connection.  Nothing is left open at the end."""
    test_node, _ = gated  # max_channels_per_key=6: parent + 3 tasks + 1 grandchild, 1 spare
    async with test_node.connect() as parent:
        pump = parent._pump
        assert isinstance(pump, _client.Pump)
        done: list[int] = []

        async def loop(task: int) -> None:
            for i in range(4):
                async with parent.open_channel() as child:
                    assert await child.call("chan", "echo", [[task, i]]) == [task, i]
                    if task == 0 and i == 0:
                        async with child.open_channel() as grandchild:
                            assert await grandchild.call("chan", "echo", [7]) == 7
                            assert grandchild._pump.pump is pump  # type: ignore[union-attr]
                done.append(task)

        async def parent_calls() -> None:
            for i in range(50):
                assert await parent.call("chan", "echo", [i]) == i

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for task in range(3):
                    nursery.start_soon(loop, task)
                nursery.start_soon(parent_calls)
        assert sorted(done) == sorted(list(range(3)) * 4)
        assert pump._lanes == [] and not pump._ops and not pump._multi
        assert pump.lanes_opened == 13
        await _node_channels(test_node, 1)


async def test_request_sets_on_a_child_channel_and_on_both(
    gated: tuple[TestNode, Gate],
) -> None:
    """The request API's batch forms on a child (its pump is a lane, which
    lends no socket wait: the set's waiter waits as usual), and one set
    spanning the parent and a child."""
    test_node, _ = gated
    async with test_node.connect() as parent, parent.open_channel() as child:
        with trio.fail_after(DEADLINE):
            reqs = sshrpc.RequestSet()
            child.send_requests_nowait("chan", "echo", [[i] for i in range(5)], into=reqs)
            got = []
            while reqs:
                got += [value for _, value in await reqs.receive_responses()]
            assert sorted(got) == list(range(5))
            parent.send_requests_nowait("chan", "echo", [[1]], into=reqs, labels=["p"])
            child.send_requests_nowait("chan", "echo", [[2]], into=reqs, labels=["c"])
            both: dict[Any, Any] = {}
            while reqs:
                both.update(await reqs.receive_responses())
            assert both == {"p": 1, "c": 2}
