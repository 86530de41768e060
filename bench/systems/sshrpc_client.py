"""The sshrpc client driver: ``sshrpc.connect_node`` (the Trio client over
libssh2) speaking the driver protocol of _common.py.  Pipelined calls are
DEPTH Trio tasks calling on one connection, as an application would.

Usage: ``python bench/systems/sshrpc_client.py PORT KEY KNOWN_HOSTS``.

Beyond the common protocol (for bench/call_cpu.py): ``latency`` and ``pipe``
take an optional last number, the function (0 ``echo``, async; 1
``echo_inline``; 2 ``echo_thread``, see sshrpc_service.py), and

    reqs OPEN N MAX_S [EACH] -> ok CALLS NS   one task keeping OPEN requests open
                           (the request API: ``send_requests_nowait``/
                           ``RequestSet.receive_responses``, one call of each per
                           batch of answers; with EACH 1, or where they are
                           missing, ``send_request_nowait``/``check_response``
                           per request);
                           ``err n/a: no request API`` where it is missing
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.systems._common import (
    ECHO_FUNCTION,
    ECHO_MODULE,
    MAX_FRAME,
    ok,
    payload,
    run_trio_driver,
)

import sshrpc
from sshrpc.client import Connection, connect_node

SMALL = payload(32)
#: The functions ``latency`` and ``pipe`` can call, by index.
FUNCTIONS = (ECHO_FUNCTION, "echo_inline", "echo_thread")
#: A pipelined run that has not finished this long after its time is up is
#: reported as stuck (with the connection's statistics) instead of hanging.
STUCK_S = 10.0


class Client:
    def __init__(self, nursery: trio.Nursery, port: int, key: str, known_hosts: str) -> None:
        self.nursery = nursery
        self.port, self.key, self.known_hosts = port, key, known_hosts
        self.conn: Connection | None = None

    async def _open(self, nursery: trio.Nursery) -> Connection:
        return await connect_node(
            nursery,
            "127.0.0.1",
            self.port,
            "root",
            self.key,
            self.known_hosts,
            agent=False,
            use_ssh_config=False,
            max_frame=MAX_FRAME,
            keepalive=None,
        )

    async def _echo(self, conn: Connection, value: Any) -> Any:
        return await conn.call(ECHO_MODULE, ECHO_FUNCTION, [value])

    async def connect(self) -> str:
        t0 = time.perf_counter()
        self.conn = await self._open(self.nursery)
        await self._echo(self.conn, SMALL)
        return ok([time.perf_counter() - t0])

    async def latency(self, n: float, max_s: float, size: float, fn: float = 0) -> str:
        conn = self.conn
        assert conn
        function = FUNCTIONS[int(fn)]
        value = payload(int(size))
        end = time.perf_counter() + max_s
        out: list[int] = []
        with trio.move_on_after(max_s + STUCK_S) as scope:
            for _ in range(int(n)):
                t0 = time.perf_counter_ns()
                await conn.call(ECHO_MODULE, function, [value])
                out.append(time.perf_counter_ns() - t0)
                if time.perf_counter() > end:
                    break
        if scope.cancelled_caught:
            return self._stuck(f"call {len(out) + 1} of {int(n)}", conn)
        return ok(out)

    @staticmethod
    def _stuck(what: str, conn: Connection) -> str:
        stats = conn.statistics()
        print(f"stuck at {what}: {stats}", file=sys.stderr, flush=True)
        return f"err stuck at {what}: {stats}".replace("\n", " ")

    async def pipe(self, depth: float, n: float, max_s: float, fn: float = 0) -> str:
        conn = self.conn
        assert conn
        function = FUNCTIONS[int(fn)]
        end = time.perf_counter() + max_s
        left = int(n)
        done = 0

        async def worker() -> None:
            nonlocal left, done
            while left > 0 and time.perf_counter() < end:
                left -= 1
                await conn.call(ECHO_MODULE, function, [SMALL])
                done += 1

        t0 = time.perf_counter_ns()
        with trio.move_on_after(max_s + STUCK_S) as scope:
            async with trio.open_nursery() as nursery:
                for _ in range(int(depth)):
                    nursery.start_soon(worker)
        if scope.cancelled_caught:
            return self._stuck(f"{done} of {int(n)} calls, {depth:.0f} in flight", conn)
        return ok([done, time.perf_counter_ns() - t0])

    async def reqs(self, open_: float, n: float, max_s: float, each: float = 0) -> str:
        """One task keeps ``open_`` requests open with the request API, refilling
        as answers arrive, until ``n`` answers or ``max_s`` seconds.

        Driven the way the request API is meant for a window (docs/client.md):
        one ``await reqs.receive_response()`` per batch of answers, the rest of
        the batch with ``check_response()``, and the refill with
        ``send_request_nowait`` (``await send_request`` only when it would
        block: no free call slot, or the send queue is full) -- as the TCP
        floor's window refills once per read.  Awaiting ``receive_response``
        and ``send_request`` per call instead pays a scheduler round per call
        (both are checkpoints), about twice the client CPU per call.

        Where the batch forms exist (``RequestSet.receive_responses``,
        ``send_requests_nowait``) and ``each`` is 0, one call of each per
        batch of answers instead."""
        conn = self.conn
        assert conn
        send_request = getattr(conn, "send_request", None)
        request_set = getattr(sshrpc, "RequestSet", None)
        if send_request is None or request_set is None:
            return "err n/a: no request API"
        send_nowait = getattr(conn, "send_request_nowait", None)
        reqs = request_set()
        n_calls = int(n)
        end = time.perf_counter() + max_s
        sent = done = 0

        async def send() -> None:
            nonlocal sent
            if send_nowait is not None:
                try:
                    send_nowait(ECHO_MODULE, ECHO_FUNCTION, [SMALL], into=reqs, label=sent)
                except trio.WouldBlock:
                    pass
                else:
                    sent += 1
                    return
            await send_request(ECHO_MODULE, ECHO_FUNCTION, [SMALL], into=reqs, label=sent)
            sent += 1

        send_batch = getattr(conn, "send_requests_nowait", None)
        if not each and send_batch is not None and hasattr(reqs, "receive_responses"):
            return await self._reqs_batched(conn, reqs, int(open_), n_calls, max_s)
        t0 = time.perf_counter_ns()
        with trio.move_on_after(max_s + STUCK_S) as scope:
            for _ in range(min(int(open_), n_calls)):
                await send()
            while done < sent:
                await reqs.receive_response()
                got = 1
                while True:
                    try:
                        reqs.check_response()
                    except trio.WouldBlock:
                        break
                    got += 1
                done += got
                if time.perf_counter() < end:
                    for _ in range(min(got, n_calls - sent)):
                        await send()
        if scope.cancelled_caught:
            return self._stuck(f"{done} of {sent} requests, {open_:.0f} open", conn)
        return ok([done, time.perf_counter_ns() - t0])

    async def _reqs_batched(
        self, conn: Connection, reqs: Any, open_: int, n_calls: int, max_s: float
    ) -> str:
        """``reqs`` with the batch forms: ``receive_responses`` takes every
        answer that has arrived, ``send_requests_nowait`` refills as many
        (then ``send_request`` for one more when not all of them fit: no
        free call slot or a full send queue)."""
        end = time.perf_counter() + max_s
        args = [[SMALL]] * open_
        sent = done = 0
        t0 = time.perf_counter_ns()

        async def refill(k: int) -> None:
            nonlocal sent
            got = len(conn.send_requests_nowait(ECHO_MODULE, ECHO_FUNCTION, args[:k], into=reqs))
            sent += got
            if got < k:  # (as the per-request driver: wait for a slot for one more)
                await conn.send_request(ECHO_MODULE, ECHO_FUNCTION, [SMALL], into=reqs)
                sent += 1

        with trio.move_on_after(max_s + STUCK_S) as scope:
            while sent < min(open_, n_calls):
                await refill(min(open_, n_calls) - sent)
            while done < sent:
                done += len(await reqs.receive_responses())
                if time.perf_counter() < end:
                    k = min(open_ - (sent - done), n_calls - sent)
                    if k > 0:
                        await refill(k)
        if scope.cancelled_caught:
            return self._stuck(f"{done} of {sent} requests, {open_} open", conn)
        return ok([done, time.perf_counter_ns() - t0])

    async def bulk(self, size: float, reps: float, max_s: float) -> str:
        assert self.conn
        value = payload(int(size))
        end = time.perf_counter() + max_s
        out = []
        for _ in range(int(reps)):
            t0 = time.perf_counter_ns()
            with trio.move_on_after(max_s + 10 * STUCK_S) as scope:
                got = await self._echo(self.conn, value)
            if scope.cancelled_caught:
                return self._stuck(f"echo of {len(value)} bytes", self.conn)
            out.append(time.perf_counter_ns() - t0)
            if got != value:
                raise AssertionError(f"echo of {len(value)} bytes came back different")
            if time.perf_counter() > end:
                break
        return ok(out)

    async def setup(self, n: float, max_s: float) -> str:
        end = time.perf_counter() + max_s
        out = []
        for _ in range(int(n)):
            t0 = time.perf_counter_ns()
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    conn = await self._open(nursery)
                    await self._echo(conn, SMALL)
                    out.append(time.perf_counter_ns() - t0)
                    await conn.aclose()
            if time.perf_counter() > end:
                break
        return ok(out)


async def main() -> None:
    async with trio.open_nursery() as nursery:
        client = Client(nursery, int(sys.argv[1]), sys.argv[2], sys.argv[3])
        await run_trio_driver(
            {
                "connect": client.connect,
                "latency": client.latency,
                "pipe": client.pipe,
                "reqs": client.reqs,
                "bulk": client.bulk,
                "setup": client.setup,
            }
        )
        if client.conn is not None:
            await client.conn.aclose()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
