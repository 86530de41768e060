"""The plain-TCP floor's client: a driver (bench/systems/_common.py protocol)
that speaks sshrpc's framing over a Trio TCP stream to ``tcp_server.py``.

Usage: ``python bench/floors/tcp_client.py PORT``.  Pipelined calls keep a
window of DEPTH calls open and refill it as answers arrive, in one write per
read: the least work a client with this framing can do.

Beyond the common protocol (for bench/call_cpu.py):

    tasks DEPTH N MAX_S -> ok CALLS NS   DEPTH Trio tasks calling at once, as an
                           application would with sshrpc's ``call``: each task
                           sends its frame (whoever finds the stream idle writes
                           every frame queued so far in one write) and parks;
                           one reader task decodes the answers and wakes each
                           caller by id (``trio.lowlevel.reschedule``), or
                           leaves the answer for a caller still writing
    reqs OPEN N MAX_S   -> the same as ``pipe OPEN N MAX_S`` (one task, a window
                           of OPEN frames)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import outcome
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.floors._wire import FrameBuffer, call_frame, hello_frame
from bench.systems._common import MAX_FRAME, ok, payload, run_trio_driver

from sshrpc import decode

SMALL = payload(32)


class Conn:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.frames = FrameBuffer(MAX_FRAME)
        self.next_id = 0

    @classmethod
    async def open(cls, port: int) -> Conn:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = cls(stream)
        await stream.send_all(hello_frame(MAX_FRAME, "floor/1"))
        await conn.receive_one()
        return conn

    async def receive_one(self) -> bytes:
        while (p := self.frames.pop()) is None:
            data = await self.stream.receive_some(1 << 18)
            if not data:
                raise EOFError("server closed")
            self.frames.feed(data)
        return p

    async def call(self, value: object) -> object:
        self.next_id += 1
        await self.stream.send_all(call_frame(self.next_id, value))
        return decode(await self.receive_one())[2]


class Floor:
    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: Conn | None = None

    async def connect(self) -> str:
        t0 = time.perf_counter()
        self.conn = await Conn.open(self.port)
        await self.conn.call(SMALL)
        return ok([time.perf_counter() - t0])

    async def latency(self, n: float, max_s: float, size: float) -> str:
        assert self.conn
        value = payload(int(size))
        end = time.perf_counter() + max_s
        out = []
        for _ in range(int(n)):
            t0 = time.perf_counter_ns()
            await self.conn.call(value)
            out.append(time.perf_counter_ns() - t0)
            if time.perf_counter() > end:
                break
        return ok(out)

    async def pipe(self, depth: float, n: float, max_s: float) -> str:
        conn = self.conn
        assert conn
        depth, n = int(depth), int(n)
        t0 = time.perf_counter_ns()
        end = time.perf_counter() + max_s
        sent = done = 0
        first = min(depth, n)
        await conn.stream.send_all(b"".join(call_frame(i, SMALL) for i in range(first)))
        sent = first
        while done < sent:
            data = await conn.stream.receive_some(1 << 18)
            if not data:
                raise EOFError("server closed")
            conn.frames.feed(data)
            got = 0
            while (p := conn.frames.pop()) is not None:
                decode(p)
                got += 1
            done += got
            more = min(got, n - sent) if time.perf_counter() < end else 0
            if more > 0:
                await conn.stream.send_all(
                    b"".join(call_frame(sent + i, SMALL) for i in range(more))
                )
                sent += more
        return ok([done, time.perf_counter_ns() - t0])

    async def reqs(self, open_: float, n: float, max_s: float) -> str:
        return await self.pipe(open_, n, max_s)

    async def tasks(self, depth: float, n: float, max_s: float) -> str:
        conn = self.conn
        assert conn
        end = time.perf_counter() + max_s
        left, done = int(n), 0
        waiting: dict[int, trio.lowlevel.Task] = {}
        early: dict[int, Any] = {}
        outbox: list[bytes] = []
        writing = False

        async def send(data: bytes) -> None:
            nonlocal writing
            outbox.append(data)
            if writing:
                return  # the task writing now takes it along
            writing = True
            try:
                while outbox:
                    chunk = b"".join(outbox) if len(outbox) > 1 else outbox[0]
                    outbox.clear()
                    await conn.stream.send_all(chunk)
            finally:
                writing = False

        async def call(value: Any) -> Any:
            conn.next_id += 1
            call_id = conn.next_id
            await send(call_frame(call_id, value))
            if call_id in early:  # answered while this task was still writing
                return early.pop(call_id)
            waiting[call_id] = trio.lowlevel.current_task()

            def abort(_: Any) -> trio.lowlevel.Abort:
                waiting.pop(call_id, None)
                return trio.lowlevel.Abort.SUCCEEDED

            return await trio.lowlevel.wait_task_rescheduled(abort)

        async def reader() -> None:
            while True:
                data = await conn.stream.receive_some(1 << 18)
                if not data:
                    raise EOFError("server closed")
                conn.frames.feed(data)
                while (p := conn.frames.pop()) is not None:
                    term = decode(p)
                    task = waiting.pop(term[1], None)
                    if task is None:
                        early[term[1]] = term[2]
                    else:
                        trio.lowlevel.reschedule(task, outcome.Value(term[2]))

        async def worker() -> None:
            nonlocal left, done
            while left > 0 and time.perf_counter() < end:
                left -= 1
                await call(SMALL)
                done += 1

        t0 = time.perf_counter_ns()
        with trio.fail_after(max_s + 10):
            async with trio.open_nursery() as outer:
                outer.start_soon(reader)
                async with trio.open_nursery() as callers:
                    for _ in range(int(depth)):
                        callers.start_soon(worker)
                outer.cancel_scope.cancel()
        return ok([done, time.perf_counter_ns() - t0])

    async def bulk(self, size: float, reps: float, max_s: float) -> str:
        assert self.conn
        value = payload(int(size))
        end = time.perf_counter() + max_s
        out = []
        for _ in range(int(reps)):
            t0 = time.perf_counter_ns()
            got = await self.conn.call(value)
            out.append(time.perf_counter_ns() - t0)
            assert got == value
            if time.perf_counter() > end:
                break
        return ok(out)

    async def setup(self, n: float, max_s: float) -> str:
        end = time.perf_counter() + max_s
        out = []
        for _ in range(int(n)):
            t0 = time.perf_counter_ns()
            conn = await Conn.open(self.port)
            await conn.call(SMALL)
            out.append(time.perf_counter_ns() - t0)
            await conn.stream.aclose()
            if time.perf_counter() > end:
                break
        return ok(out)


if __name__ == "__main__":
    floor = Floor(int(sys.argv[1]))
    trio.run(
        run_trio_driver,
        {
            "connect": floor.connect,
            "latency": floor.latency,
            "pipe": floor.pipe,
            "tasks": floor.tasks,
            "reqs": floor.reqs,
            "bulk": floor.bulk,
            "setup": floor.setup,
        },
    )
