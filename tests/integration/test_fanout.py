"""Fan-out to many nodes: ``multicall`` and ``Pool.multicall`` over a fleet
of private sshd's on ports of 127.0.0.1 (``sshrpc._fleet``), each group in
front of one in-test node.

The fleet: healthy hosts (a fast node), slow hosts (a node whose function
never returns), a refused port, a host whose known_hosts entry holds another
key, and a listener that accepts TCP and never speaks SSH.  Results come back
per node, in order, typed; the total time is about the slowest node's, not
the sum; at most ``max_connects`` connects run at once, counted through
small TCP proxies against the node's open channels.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

import sshrpc
from sshrpc import _statedir
from sshrpc._fleet import Fleet
from sshrpc._sshd import free_port, known_hosts_line
from sshrpc.node import Node, serve_node

pytestmark = pytest.mark.timeout(120)

#: Every node's per-node deadline in the timing tests; the slow hosts' calls
#: never end, so they take exactly this long.  Generous: healthy hosts must
#: connect well within it on a loaded 2-core machine.
DEADLINE = 6.0


def _services(slow: bool) -> list[sshrpc.Service]:
    fan = sshrpc.Service("fan")

    @fan.export
    async def work(x: Any) -> Any:
        if slow:
            await trio.sleep_forever()
        return x

    return [fan]


@asynccontextmanager
async def fleet_node(
    client_key: Any, count: int, services: list[sshrpc.Service]
) -> AsyncIterator[tuple[Fleet, Node]]:
    """``count`` sshd's in front of one node serving ``services`` in this
    Trio loop; everything stopped (by PID) and removed at the end."""
    with (
        tempfile.TemporaryDirectory(prefix="fan-", dir=_statedir.temp_root()) as tmp,
        tempfile.TemporaryDirectory(prefix="sshrpc-sock-") as sockets,
    ):
        socket_path = Path(sockets) / "node.sock"
        fleet = Fleet(
            Path(tmp) / "fleet",
            count,
            socket_path=socket_path,
            client_public_keys=[client_key.public_line],
        )
        async with trio.open_nursery() as nursery:
            node = await nursery.start(
                lambda task_status: serve_node(
                    services,
                    socket_path=socket_path,
                    authorized_keys=fleet.authorized_keys,
                    task_status=task_status,
                )
            )
            try:
                await trio.to_thread.run_sync(fleet.start)
                yield fleet, node
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(fleet.stop)
                nursery.cancel_scope.cancel()


def _options(client_key: Any, known_hosts: Path) -> dict[str, Any]:
    return {
        "identity": str(client_key.private),
        "known_hosts": str(known_hosts),
        "agent": False,
        "use_ssh_config": False,
    }


async def _wait_until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Bounded polling: return once ``condition()`` holds, fail after ``within``."""
    with trio.fail_after(within):
        while not condition():
            await trio.sleep(0.02)


@asynccontextmanager
async def blackhole() -> AsyncIterator[tuple[int, list[int]]]:
    """A port that accepts TCP and never says a word; yields (port, accepts)."""
    accepts: list[int] = []

    async def handler(stream: trio.SocketStream) -> None:
        accepts.append(1)
        async with stream:
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1], accepts
        nursery.cancel_scope.cancel()


# -- per-node results, typed; time of the slowest, not the sum -------------------------


@pytest.mark.parametrize("through_pool", [False, True], ids=["multicall", "pool"])
async def test_partial_results_are_typed_per_node_and_time_is_the_slowest(
    client_key: Any, tmp_path: Path, through_pool: bool
) -> None:
    async with (
        fleet_node(client_key, 7, _services(slow=False)) as (fast, fast_node),
        fleet_node(client_key, 2, _services(slow=True)) as (slow, slow_node),
    ):
        known_hosts = tmp_path / "known_hosts"
        # The last fast host is listed with the slow fleet's key: a mismatch.
        imposter = fast.sshds[-1]
        wrong = known_hosts_line(imposter.host, imposter.port, slow.sshds[0].host_public_key)
        known_hosts.write_text(
            "".join(s.known_hosts_line + "\n" for s in fast.sshds[:-1])
            + wrong
            + "\n"
            + slow.known_hosts_text
        )
        refused = f"127.0.0.1:{free_port()}"
        nodes = [*fast.destinations[:3], *slow.destinations[:1], refused]
        nodes += [*fast.destinations[3:], *slow.destinations[1:]]
        # nodes: fast x3, slow, refused, fast x3, imposter, slow (10)
        opts = _options(client_key, known_hosts)
        start = trio.current_time()
        if through_pool:
            async with sshrpc.Pool(**opts) as pool:
                results = await pool.multicall(
                    nodes, "fan", "work", [b"x"], per_node_timeout=DEADLINE
                )
                elapsed = trio.current_time() - start
                # The timed-out calls were cancelled; their connections stay.
                assert len(pool) == 8
                again = await pool.multicall(fast.destinations[:6], "fan", "work", [1])
                assert again == [1] * 6
                assert fast_node.statistics()["channels"] == 6  # reused, none new
        else:
            results = await sshrpc.multicall(
                nodes, "fan", "work", [b"x"], per_node_timeout=DEADLINE, **opts
            )
            elapsed = trio.current_time() - start
        kinds = [type(r).__name__ if isinstance(r, Exception) else r for r in results]
        assert kinds == [
            b"x",
            b"x",
            b"x",
            "NodeTimeout",
            "ConnectionLost",
            b"x",
            b"x",
            b"x",
            "HostKeyMismatch",
            "NodeTimeout",
        ]
        for timed_out in (results[3], results[9]):
            assert timed_out.phase == "call" and timed_out.timeout == DEADLINE
        assert results[9].destination == slow.destinations[1]
        assert "refused" in str(results[4]).lower()
        # Two slow nodes: one after the other would take 2 x DEADLINE.
        assert DEADLINE <= elapsed < 1.6 * DEADLINE, elapsed
        if not through_pool:
            # The slow node's calls were cancelled when their connections dropped.
            await _wait_until(lambda: slow_node.statistics()["calls"] == 0)
            await _wait_until(lambda: slow_node.statistics()["channels"] == 0)


async def test_a_host_that_never_speaks_ssh_times_out_connecting(
    client_key: Any, tmp_path: Path
) -> None:
    async with (
        fleet_node(client_key, 1, _services(slow=False)) as (fast, _),
        blackhole() as (port, accepts),
    ):
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(fast.known_hosts_text)
        nodes = [f"127.0.0.1:{port}", fast.destinations[0]]
        opts = _options(client_key, known_hosts)
        with trio.fail_after(30):
            results = await sshrpc.multicall(
                nodes, "fan", "work", [2], per_node_timeout=1.0, **opts
            )
        assert isinstance(results[0], sshrpc.NodeTimeout) and results[0].phase == "connect"
        assert results[1] == 2
        async with sshrpc.Pool(**opts) as pool:
            results = await pool.multicall(nodes, "fan", "work", [3], per_node_timeout=1.0)
            assert isinstance(results[0], sshrpc.NodeTimeout) and results[0].phase == "connect"
            assert results[1] == 3
            assert len(pool) == 1  # nothing half-open kept for the silent host
        assert len(accepts) == 2


async def test_the_callers_scope_bounds_the_whole(client_key: Any, tmp_path: Path) -> None:
    async with fleet_node(client_key, 3, _services(slow=True)) as (slow, slow_node):
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(slow.known_hosts_text)
        opts = _options(client_key, known_hosts)
        with trio.move_on_after(2.5) as scope:
            await sshrpc.multicall(slow.destinations, "fan", "work", [1], **opts)
        assert scope.cancelled_caught
        await _wait_until(lambda: slow_node.statistics()["channels"] == 0)
        assert slow_node.statistics()["calls"] == 0
        # An open Connection: its call is cancelled at its deadline, and it
        # stays open and usable.
        async with sshrpc.open_connection(slow.destinations[0], **opts) as node:
            results = await sshrpc.multicall([node], "fan", "work", [1], per_node_timeout=0.5)
            assert isinstance(results[0], sshrpc.NodeTimeout)
            assert results[0].phase == "call" and results[0].destination == node.destination
            assert not node.closed
            await _wait_until(lambda: slow_node.statistics()["calls"] == 0)
            assert await node.ping() >= 0


async def test_bad_destinations_and_options_raise_before_any_connect() -> None:
    # A validation miss would connect to the silent host and hang: bounded.
    with trio.fail_after(10):
        await _bad_input_is_refused()


async def _bad_input_is_refused() -> None:
    async with blackhole() as (port, accepts):
        good = f"127.0.0.1:{port}"
        for bad in ("127.0.0.1:http", "127.0.0.1:70000", "user@:22", "[::1", "[::1]x"):
            with pytest.raises(ValueError, match="bad destination"):
                await sshrpc.multicall([good, bad], "fan", "work", [])
        with pytest.raises(TypeError, match="str or a Connection"):
            await sshrpc.multicall([good, 42], "fan", "work", [])  # type: ignore[list-item]
        for options in ({"max_connects": 0}, {"per_node_timeout": 0}, {"per_node_timeout": -1}):
            with pytest.raises(ValueError, match=r"max_connects|per_node_timeout"):
                await sshrpc.multicall([good], "fan", "work", [], **options)
        with pytest.raises(ValueError, match="max_connects"):
            sshrpc.Pool(max_connects=0)
        async with sshrpc.Pool() as pool:
            with pytest.raises(ValueError, match="bad destination"):
                await pool.multicall([good, "h:x"], "fan", "work", [])
            with pytest.raises(ValueError, match="per_node_timeout"):
                await pool.multicall([good], "fan", "work", [], per_node_timeout=math.nan)
        await trio.testing.wait_all_tasks_blocked()
        assert accepts == []


# -- the connect bound -----------------------------------------------------------------


class ConnectCounter:
    """TCP proxies in front of sshd's: at each accepted connection, how many
    connections are still setting up -- accepted by a proxy but without a
    channel at the node yet.  A client's connect ends only after the node's
    hello, which the node sends after registering the channel, so this never
    over-counts the client's connects in flight (channels must not end
    during the measurement)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.accepted = 0
        self.in_setup: list[int] = []

    async def proxy(self, nursery: trio.Nursery, target_port: int) -> int:
        async def handler(client: trio.SocketStream) -> None:
            self.accepted += 1
            self.in_setup.append(self.accepted - self.node.statistics()["channels"])
            server = await trio.open_tcp_stream("127.0.0.1", target_port)
            async with client, server, trio.open_nursery() as pipes:

                async def pipe(a: trio.SocketStream, b: trio.SocketStream) -> None:
                    try:
                        async for data in a:
                            await b.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    pipes.cancel_scope.cancel()

                pipes.start_soon(pipe, client, server)
                pipes.start_soon(pipe, server, client)

        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port: int = listeners[0].socket.getsockname()[1]
        return port


@pytest.mark.parametrize("through_pool", [False, True], ids=["multicall", "pool"])
async def test_at_most_max_connects_set_up_at_once(
    client_key: Any, tmp_path: Path, through_pool: bool
) -> None:
    count, bound = 9, 3
    arrived = 0
    everyone = trio.Event()
    gate = sshrpc.Service("fan")

    @gate.export
    async def work(x: Any) -> Any:
        # Every call waits for all: no channel ends while connects are counted.
        nonlocal arrived
        arrived += 1
        if arrived == count:
            everyone.set()
        await everyone.wait()
        return x

    async with (
        fleet_node(client_key, count, [gate]) as (fleet, node),
        trio.open_nursery() as proxies,
    ):
        counter = ConnectCounter(node)
        ports = [await counter.proxy(proxies, s.port) for s in fleet.sshds]
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(
            "".join(
                known_hosts_line("127.0.0.1", p, s.host_public_key) + "\n"
                for p, s in zip(ports, fleet.sshds, strict=True)
            )
        )
        nodes = [f"127.0.0.1:{p}" for p in ports]
        opts = _options(client_key, known_hosts)
        with trio.fail_after(60):
            if through_pool:
                async with sshrpc.Pool(max_connects=bound, **opts) as pool:
                    results = await pool.multicall(nodes, "fan", "work", [7])
            else:
                results = await sshrpc.multicall(
                    nodes, "fan", "work", [7], max_connects=bound, **opts
                )
        proxies.cancel_scope.cancel()
    assert results == [7] * count
    assert counter.accepted == count
    # Never more than the bound, and connects did overlap (unbounded: 9 here).
    assert 2 <= max(counter.in_setup) <= bound, counter.in_setup


async def test_a_destinations_user_and_port_win_over_the_options(
    client_key: Any, tmp_path: Path
) -> None:
    # Regression: user@host:port with user=/port= options too passed the
    # user twice to connect_node (TypeError for every node).
    import getpass

    me = getpass.getuser()
    async with fleet_node(client_key, 1, _services(slow=False)) as (fleet, _):
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(fleet.known_hosts_text)
        opts = _options(client_key, known_hosts)
        dest = f"{me}@{fleet.destinations[0]}"
        other = {"user": "somebody-else", "port": free_port()}
        with trio.fail_after(30):
            assert await sshrpc.multicall([dest], "fan", "work", [5], **opts, **other) == [5]
            async with sshrpc.Pool(**opts, **other) as pool:
                assert await pool.multicall([dest], "fan", "work", [6]) == [6]
                assert await pool.call(dest, "fan", "work", [7]) == 7
