"""The plain-TCP floor's server: sshrpc's framing and codec on a Trio TCP
listener, no SSH, no crypto, no per-call task.

Usage: ``python bench/floors/tcp_server.py PORT``.  Serves until killed.
Answers ``{hello, 1, _}`` with a hello and ``{call, Id, sshrpc_bench, echo,
[V]}`` with ``{reply, Id, V}``; every complete frame in one read is answered
in one write, which is the least work any server with this framing can do.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.floors._wire import CALL, HELLO, REPLY, FrameBuffer, frame, hello_frame
from bench.systems._common import MAX_FRAME

from sshrpc import decode


async def handle(stream: trio.SocketStream) -> None:
    frames = FrameBuffer(MAX_FRAME)
    try:
        while True:
            data = await stream.receive_some(1 << 18)
            if not data:
                return
            frames.feed(data)
            out = []
            while (payload := frames.pop()) is not None:
                term = decode(payload)
                if term[0] == CALL:
                    out.append(frame((REPLY, term[1], term[4][0])))
                elif term[0] == HELLO:
                    out.append(hello_frame(MAX_FRAME, "floor/1", "server"))
            if out:
                await stream.send_all(b"".join(out) if len(out) > 1 else out[0])
    except trio.BrokenResourceError:
        return


async def main(port: int) -> None:
    await trio.serve_tcp(handle, port, host="127.0.0.1")


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]))
