"""An emulated long-haul link, for tests and benchmarks: a TCP proxy that
holds every byte for a fixed one-way delay and paces each direction to a
bandwidth, keeping order.

This kernel has no ``sch_netem``, so ``tc`` cannot add delay; this proxy
does it in user space.  Each direction is modelled as a serial line of
``rate`` bytes per second followed by ``delay`` seconds of propagation: a
segment read at time t leaves the line at ``max(t, previous departure) +
len / rate`` and is written to the far side ``delay`` later.  Reads are cut
into segments of at most ``SEGMENT`` bytes so pacing is smooth.  At most
``buffer`` bytes wait inside the link per direction; beyond that the proxy
stops reading, so TCP's own flow control pushes back on the sender, as a
full router queue would (without the loss).

    python -m sshrpc._link --to 127.0.0.1:2222 --rtt 0.05 --rate 12.5e6
    # prints "listening 127.0.0.1 PORT", serves until SIGTERM/SIGINT

``open_link`` is the same in the caller's Trio loop (``sshrpc.testing``
re-exports it).
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import trio

__all__ = ["Link", "open_link"]

#: Largest piece the link paces and delivers at once.
SEGMENT = 16 * 1024
#: Bytes read from a socket at once.
READ_SIZE = 64 * 1024
#: Default bytes held inside the link per direction.
DEFAULT_BUFFER = 16 * 1024 * 1024


@dataclass
class Link:
    """A running emulated link: connect to ``host:port`` to reach the target
    through it.  ``delay`` is one way (RTT/2), ``rate`` in bytes/s (None:
    unlimited)."""

    host: str
    port: int
    delay: float
    rate: float | None
    connections: int = 0
    bytes_forwarded: int = 0
    _nursery: trio.Nursery | None = field(default=None, repr=False)


class _Direction:
    """One direction of one connection: the queue between reading and writing."""

    def __init__(self, link: Link, buffer: int) -> None:
        self.link = link
        self.buffer = buffer
        self.queue: deque[tuple[float, bytes]] = deque()
        self.queued = 0
        self.departure = 0.0
        self.eof = False
        self.data = trio.lowlevel.ParkingLot()
        self.room = trio.lowlevel.ParkingLot()

    async def read_side(self, source: trio.abc.ReceiveStream) -> None:
        rate = self.link.rate
        delay = self.link.delay
        try:
            while True:
                while self.queued >= self.buffer:
                    await self.room.park()
                data = await source.receive_some(READ_SIZE)
                if not data:
                    break
                now = trio.current_time()
                for start in range(0, len(data), SEGMENT):
                    piece = bytes(data[start : start + SEGMENT])
                    if rate is None:
                        self.departure = now
                    else:
                        self.departure = max(now, self.departure) + len(piece) / rate
                    self.queue.append((self.departure + delay, piece))
                    self.queued += len(piece)
                self.data.unpark_all()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self.eof = True
            self.data.unpark_all()

    async def write_side(self, sink: trio.SocketStream) -> None:
        while True:
            while not self.queue:
                if self.eof:
                    with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        await sink.send_eof()
                    return
                await self.data.park()
            arrival, piece = self.queue[0]
            await trio.sleep_until(arrival)
            self.queue.popleft()
            await sink.send_all(piece)
            self.queued -= len(piece)
            self.link.bytes_forwarded += len(piece)
            self.room.unpark_all()


async def _serve_one(
    link: Link, client: trio.SocketStream, target: tuple[str, int], buffer: int
) -> None:
    link.connections += 1
    try:
        server = await trio.open_tcp_stream(*target)
    except OSError:
        await client.aclose()
        return
    up, down = _Direction(link, buffer), _Direction(link, buffer)
    try:
        async with trio.open_nursery() as nursery:

            async def run_writer(direction: _Direction, sink: trio.SocketStream) -> None:
                try:
                    await direction.write_side(sink)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    nursery.cancel_scope.cancel()

            nursery.start_soon(up.read_side, client)
            nursery.start_soon(run_writer, up, server)
            nursery.start_soon(down.read_side, server)
            nursery.start_soon(run_writer, down, client)
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()
            await server.aclose()


@asynccontextmanager
async def open_link(
    target_host: str,
    target_port: int,
    *,
    rtt: float,
    rate: float | None = None,
    buffer: int = DEFAULT_BUFFER,
    listen_host: str = "127.0.0.1",
) -> AsyncIterator[Link]:
    """Run an emulated link to ``target_host:target_port`` until the block
    ends; yield the ``Link`` (where to connect).

    ``rtt`` seconds round trip (half each way), ``rate`` bytes per second
    each way (None: unlimited), ``buffer`` bytes held per direction before
    the link stops reading.  A checkpoint.  Leaving the block closes every
    proxied connection.
    """
    if not (rtt >= 0 and math.isfinite(rtt)):
        raise ValueError(f"rtt must be a finite number of seconds >= 0, not {rtt!r}")
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be > 0 bytes/s or None, not {rate!r}")
    listeners = await trio.open_tcp_listeners(0, host=listen_host)
    port = listeners[0].socket.getsockname()[1]
    link = Link(listen_host, port, rtt / 2, rate)

    async def handler(stream: trio.SocketStream) -> None:
        await _serve_one(link, stream, (target_host, target_port), buffer)

    async with trio.open_nursery() as nursery:
        link._nursery = nursery
        nursery.start_soon(trio.serve_listeners, handler, listeners)
        try:
            yield link
        finally:
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sshrpc._link", description=__doc__)
    parser.add_argument("--to", required=True, metavar="HOST:PORT")
    parser.add_argument("--rtt", type=float, required=True, help="round trip, seconds")
    parser.add_argument("--rate", type=float, default=None, help="bytes/s each way")
    parser.add_argument("--buffer", type=int, default=DEFAULT_BUFFER)
    args = parser.parse_args(argv)
    host, _, port = args.to.rpartition(":")

    async def run() -> None:
        async with open_link(
            host.strip("[]"), int(port), rtt=args.rtt, rate=args.rate, buffer=args.buffer
        ) as link:
            print(f"listening {link.host} {link.port}", flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    break

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
