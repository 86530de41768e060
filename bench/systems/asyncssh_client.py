"""The asyncssh comparison client: a driver (protocol in _common.py) that
calls ``sshrpc_bench:echo`` over an ``sshrpc@k2r.org`` subsystem with erlpack
ETF frames, routing answers to waiting callers by id, as a user of asyncssh
would write it.

Usage: ``python bench/systems/asyncssh_client.py PORT KEY KNOWN_HOSTS``.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from pathlib import Path
from typing import Any

import asyncssh

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.systems._common import (
    CIPHER,
    MAX_FRAME,
    SUBSYSTEM,
    ok,
    parse_command,
    payload,
)
from bench.systems.etf_erlpack import REPLY, call_frame, hello_frame, unpack

SMALL = payload(32)


class Channel:
    def __init__(self, process: asyncssh.SSHClientProcess[bytes]) -> None:
        self.process = process
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.ids = itertools.count(1)
        self.reader_task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, conn: asyncssh.SSHClientConnection) -> Channel:
        process = await conn.create_process(subsystem=SUBSYSTEM, encoding=None)
        chan = cls(process)
        process.stdin.write(hello_frame(MAX_FRAME, "asyncssh-bench/1"))
        await chan._read_frame()
        chan.reader_task = asyncio.create_task(chan._route())
        return chan

    async def _read_frame(self) -> bytes:
        while True:
            n = int.from_bytes(await self.process.stdout.readexactly(4), "big")
            if n:
                return await self.process.stdout.readexactly(n)

    async def _route(self) -> None:
        try:
            while True:
                term = unpack(await self._read_frame())
                if term[0] == REPLY:
                    fut = self.waiting.pop(term[1], None)
                    if fut is not None and not fut.done():
                        fut.set_result(term[2])
        except Exception as exc:
            for fut in self.waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(f"channel closed: {exc!r}"))

    async def call(self, value: Any) -> Any:
        call_id = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.waiting[call_id] = fut
        self.process.stdin.write(call_frame(call_id, value))
        await self.process.stdin.drain()
        return await fut

    def close(self) -> None:
        if self.reader_task:
            self.reader_task.cancel()
        self.process.close()


class Client:
    def __init__(self, port: int, key: str, known_hosts: str) -> None:
        self.port, self.key, self.known_hosts = port, key, known_hosts
        self.conn: asyncssh.SSHClientConnection | None = None
        self.chan: Channel | None = None

    async def _connect(self) -> asyncssh.SSHClientConnection:
        return await asyncssh.connect(
            "127.0.0.1",
            self.port,
            username="root",
            client_keys=[self.key],
            known_hosts=self.known_hosts,
            encryption_algs=[CIPHER],
            agent_path=None,
        )

    async def connect(self) -> str:
        t0 = time.perf_counter()
        self.conn = await self._connect()
        self.chan = await Channel.open(self.conn)
        await self.chan.call(SMALL)
        return ok([time.perf_counter() - t0])

    async def latency(self, n: float, max_s: float, size: float) -> str:
        assert self.chan
        value = payload(int(size))
        end = time.perf_counter() + max_s
        out = []
        for _ in range(int(n)):
            t0 = time.perf_counter_ns()
            await self.chan.call(value)
            out.append(time.perf_counter_ns() - t0)
            if time.perf_counter() > end:
                break
        return ok(out)

    async def pipe(self, depth: float, n: float, max_s: float) -> str:
        chan = self.chan
        assert chan
        end = time.perf_counter() + max_s
        left = int(n)
        done = 0

        async def worker() -> None:
            nonlocal left, done
            while left > 0 and time.perf_counter() < end:
                left -= 1
                await chan.call(SMALL)
                done += 1

        t0 = time.perf_counter_ns()
        await asyncio.gather(*(worker() for _ in range(int(depth))))
        return ok([done, time.perf_counter_ns() - t0])

    async def bulk(self, size: float, reps: float, max_s: float) -> str:
        assert self.chan
        value = payload(int(size))
        end = time.perf_counter() + max_s
        out = []
        for _ in range(int(reps)):
            t0 = time.perf_counter_ns()
            got = await self.chan.call(value)
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
            conn = await self._connect()
            chan = await Channel.open(conn)
            await chan.call(SMALL)
            out.append(time.perf_counter_ns() - t0)
            chan.close()
            conn.close()
            await conn.wait_closed()
            if time.perf_counter() > end:
                break
        return ok(out)

    async def chan_per_call(self, n: float, max_s: float) -> str:
        assert self.conn
        end = time.perf_counter() + max_s
        out = []
        for _ in range(int(n)):
            t0 = time.perf_counter_ns()
            chan = await Channel.open(self.conn)
            await chan.call(SMALL)
            out.append(time.perf_counter_ns() - t0)
            chan.close()
            if time.perf_counter() > end:
                break
        return ok(out)


async def main() -> None:
    client = Client(int(sys.argv[1]), sys.argv[2], sys.argv[3])
    handlers = {
        "connect": client.connect,
        "latency": client.latency,
        "pipe": client.pipe,
        "bulk": client.bulk,
        "setup": client.setup,
        "chan": client.chan_per_call,
    }
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        op, args = parse_command(line)
        if not line or op == "quit":
            break
        if not op:
            continue
        handler = handlers.get(op)
        try:
            answer = await handler(*args) if handler else f"err {op} unsupported"
        except Exception as exc:
            answer = f"err {type(exc).__name__}: {exc}".replace("\n", " ")
        sys.stdout.write(answer + "\n")
        sys.stdout.flush()
    if client.conn:
        client.conn.close()


if __name__ == "__main__":
    asyncio.run(main())
