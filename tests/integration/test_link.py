"""The emulated long-haul link (sshrpc._link): its delay and its rate,
measured; order and every byte kept; backpressure instead of unbounded
buffering."""

from __future__ import annotations

import functools
import os

import pytest
import trio

from sshrpc._link import open_link

pytestmark = pytest.mark.timeout(60)


async def _echo_server(nursery: trio.Nursery) -> int:
    async def echo(stream: trio.SocketStream) -> None:
        try:
            async for data in stream:
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def _roundtrip(stream: trio.SocketStream, n: int = 1) -> float:
    start = trio.current_time()
    await stream.send_all(b"x" * n)
    got = 0
    while got < n:
        got += len(await stream.receive_some(n - got))
    return trio.current_time() - start


@pytest.mark.parametrize("rtt", [0.02, 0.1])
async def test_round_trip_is_the_configured_rtt(rtt: float) -> None:
    async with trio.open_nursery() as nursery:
        port = await _echo_server(nursery)
        async with open_link("127.0.0.1", port, rtt=rtt) as link:
            stream = await trio.open_tcp_stream(link.host, link.port)
            times = sorted([await _roundtrip(stream) for _ in range(5)])
            await stream.aclose()
        nursery.cancel_scope.cancel()
    # Never faster than the link allows; slower only by scheduling noise.
    assert times[0] >= rtt
    assert times[2] < rtt + 0.05, times


async def test_rate_paces_each_direction() -> None:
    """4 MiB through an echo at 8 MB/s: each direction takes about 0.52 s and
    they overlap, so the round trip is about 0.52 s plus the delay."""
    rate = 8e6
    size = 4 * 1024 * 1024
    async with trio.open_nursery() as nursery:
        port = await _echo_server(nursery)
        async with open_link("127.0.0.1", port, rtt=0.01, rate=rate) as link:
            stream = await trio.open_tcp_stream(link.host, link.port)
            start = trio.current_time()
            payload = os.urandom(size)
            received = bytearray()

            async def reader() -> None:
                while len(received) < size:
                    received.extend(await stream.receive_some(65536))

            async with trio.open_nursery() as inner:
                inner.start_soon(reader)
                await stream.send_all(payload)
            elapsed = trio.current_time() - start
            await stream.aclose()
        nursery.cancel_scope.cancel()
    assert bytes(received) == payload  # order and content kept
    ideal = size / rate + 0.01
    assert ideal * 0.95 <= elapsed < ideal * 1.5, (elapsed, ideal)


async def test_a_slow_reader_stops_the_link_reading() -> None:
    """With nobody reading the far side, the link holds at most its buffer
    (plus what the kernel's sockets hold), never the whole stream."""
    received = trio.Event()
    sink_streams: list[trio.SocketStream] = []

    async def sink(stream: trio.SocketStream) -> None:
        sink_streams.append(stream)
        received.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, sink, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        async with open_link("127.0.0.1", port, rtt=0.0, buffer=256 * 1024) as link:
            stream = await trio.open_tcp_stream(link.host, link.port)
            sent = 0
            with trio.move_on_after(1.0):
                while sent < 256 * 1024 * 1024:
                    await stream.send_all(b"y" * 65536)
                    sent += 65536
            # The sender was stopped long before 256 MiB: the link pushed back.
            assert sent < 64 * 1024 * 1024
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="rtt"):
        async with open_link("127.0.0.1", 1, rtt=-1):
            pass
    with pytest.raises(ValueError, match="rate"):
        async with open_link("127.0.0.1", 1, rtt=0.01, rate=0):
            pass


async def test_window_and_max_calls_for_long_links(tmp_path, client_key) -> None:
    """What a long link needs: ``sshrpc serve --max-calls`` lets many calls
    be open, ``window=`` lets the server have a bandwidth-delay product in
    flight towards us."""
    import sshrpc
    from conftest import start_serve, stop_serve

    info = start_serve(
        ["sshrpc.demo:services"],
        state_dir=tmp_path / "state",
        authorized_keys=client_key.public,
        identity=client_key.private,
        extra_args=["--max-calls", "1100"],
    )
    try:
        options = {
            "identity": str(info.identity),
            "known_hosts": str(info.known_hosts),
            "agent": False,
            "use_ssh_config": False,
        }
        destination = f"{info.user}@{info.host}:{info.port}"
        async with sshrpc.open_connection(destination, window=16 << 20, **options) as node:
            assert node.hello["max_calls"] == 1100
            assert node.statistics().window_read >= 15 << 20
            # 300 calls open at once on one channel, none waiting for a slot.
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    for _ in range(300):
                        nursery.start_soon(node.call, "slow", "work", [30])
                    deadline = trio.current_time() + 20
                    while node.statistics().open_calls < 300:
                        assert trio.current_time() < deadline, node.statistics()
                        await trio.sleep(0.01)  # bounded polling with a deadline
                    assert node.statistics().waiting_for_slot == 0
                    scope.cancel()
            assert await node.call("lists", "reverse", [[1, 2]]) == [2, 1]
        with pytest.raises(ValueError, match="window"):
            async with sshrpc.open_connection(destination, window=0, **options):
                pass
    finally:
        assert stop_serve(info) == 0
