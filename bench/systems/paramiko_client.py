"""The paramiko comparison client: a driver (protocol in _common.py) that
calls ``sshrpc_bench:echo`` over the ``sshrpc@k2r.org`` subsystem of an
OpenSSH-served node with erlpack ETF frames, as a paramiko user would.
Pipelined calls keep a window of DEPTH calls open from one thread.

Usage: ``python bench/systems/paramiko_client.py PORT KEY KNOWN_HOSTS [SUBSYSTEM]``.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from typing import Any

import paramiko

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.systems._common import (
    CIPHER,
    MAX_FRAME,
    SUBSYSTEM,
    ok,
    payload,
    run_sync_driver,
)
from bench.systems.etf_erlpack import REPLY, call_frame, hello_frame, unpack

SMALL = payload(32)
#: The subsystem to open: sshrpc's, or the one named by a 4th argument (``cat``).
SUBSYSTEM_NAME = sys.argv[4] if len(sys.argv) > 4 else SUBSYSTEM
OTHER_CIPHERS = [c for c in paramiko.Transport._preferred_ciphers if c != CIPHER]


class Channel:
    def __init__(self, chan: paramiko.Channel) -> None:
        self.chan = chan
        self.buf = bytearray()
        self.next_id = 0

    @classmethod
    def open(cls, transport: paramiko.Transport) -> Channel:
        raw = transport.open_session()
        raw.invoke_subsystem(SUBSYSTEM_NAME)
        chan = cls(raw)
        raw.sendall(hello_frame(MAX_FRAME, "paramiko-bench/1"))
        chan.read_frame()  # the server's hello (not decoded: erlpack has no pids)
        return chan

    def read_frame(self) -> bytes:
        while True:
            while len(self.buf) < 4:
                self._fill()
            n = int.from_bytes(self.buf[:4], "big")
            while len(self.buf) < 4 + n:
                self._fill()
            payload_ = bytes(self.buf[4 : 4 + n])
            del self.buf[: 4 + n]
            if n:
                return payload_

    def _fill(self) -> None:
        data = self.chan.recv(1 << 20)
        if not data:
            raise EOFError("channel closed")
        self.buf += data

    def call(self, value: Any) -> Any:
        self.next_id += 1
        self.chan.sendall(call_frame(self.next_id, value))
        term = unpack(self.read_frame())
        # a reply, or (against a `cat` subsystem, the floor) the call itself
        return term[2] if term[0] == REPLY else term[4][0]


class Client:
    def __init__(self, port: int, key: str, known_hosts: str) -> None:
        self.port, self.key, self.known_hosts = port, key, known_hosts
        self.ssh: paramiko.SSHClient | None = None
        self.chan: Channel | None = None

    def _connect(self) -> paramiko.SSHClient:
        ssh = paramiko.SSHClient()
        ssh.load_host_keys(self.known_hosts)
        ssh.set_missing_host_key_policy(paramiko.RejectPolicy())
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ssh.connect(
            "127.0.0.1",
            self.port,
            username="root",
            key_filename=self.key,
            allow_agent=False,
            look_for_keys=False,
            sock=sock,
            disabled_algorithms={"ciphers": OTHER_CIPHERS},
        )
        return ssh

    def _transport(self) -> paramiko.Transport:
        assert self.ssh
        transport = self.ssh.get_transport()
        assert transport is not None
        return transport

    def connect(self) -> str:
        t0 = time.perf_counter()
        self.ssh = self._connect()
        self.chan = Channel.open(self._transport())
        self.chan.call(SMALL)
        return ok([time.perf_counter() - t0])

    def latency(self, n: float, max_s: float, size: float) -> str:
        assert self.chan
        value = payload(int(size))
        end = time.perf_counter() + max_s
        out = []
        for _ in range(int(n)):
            t0 = time.perf_counter_ns()
            self.chan.call(value)
            out.append(time.perf_counter_ns() - t0)
            if time.perf_counter() > end:
                break
        return ok(out)

    def pipe(self, depth: float, n: float, max_s: float) -> str:
        chan = self.chan
        assert chan
        depth, n = int(depth), int(n)
        end = time.perf_counter() + max_s
        t0 = time.perf_counter_ns()
        first = min(depth, n)
        chan.chan.sendall(b"".join(call_frame(i, SMALL) for i in range(first)))
        sent, done = first, 0
        while done < sent:
            unpack(chan.read_frame())
            done += 1
            if sent < n and time.perf_counter() < end:
                chan.chan.sendall(call_frame(sent, SMALL))
                sent += 1
        return ok([done, time.perf_counter_ns() - t0])

    def bulk(self, size: float, reps: float, max_s: float) -> str:
        if SUBSYSTEM_NAME != SUBSYSTEM:
            # `cat` streams the echo back while this thread is still sending
            return "err bulk unsupported against a streaming echo"
        assert self.chan
        value = payload(int(size))
        end = time.perf_counter() + max_s
        out = []
        for _ in range(int(reps)):
            t0 = time.perf_counter_ns()
            got = self.chan.call(value)
            out.append(time.perf_counter_ns() - t0)
            assert got == value
            if time.perf_counter() > end:
                break
        return ok(out)

    def setup(self, n: float, max_s: float) -> str:
        end = time.perf_counter() + max_s
        out = []
        for _ in range(int(n)):
            t0 = time.perf_counter_ns()
            ssh = self._connect()
            transport = ssh.get_transport()
            assert transport is not None
            chan = Channel.open(transport)
            chan.call(SMALL)
            out.append(time.perf_counter_ns() - t0)
            chan.chan.close()
            ssh.close()
            if time.perf_counter() > end:
                break
        return ok(out)

    def chan_per_call(self, n: float, max_s: float) -> str:
        end = time.perf_counter() + max_s
        out = []
        for _ in range(int(n)):
            t0 = time.perf_counter_ns()
            chan = Channel.open(self._transport())
            chan.call(SMALL)
            out.append(time.perf_counter_ns() - t0)
            chan.chan.close()
            if time.perf_counter() > end:
                break
        return ok(out)


if __name__ == "__main__":
    client = Client(int(sys.argv[1]), sys.argv[2], sys.argv[3])
    run_sync_driver(
        {
            "connect": client.connect,
            "latency": client.latency,
            "pipe": client.pipe,
            "bulk": client.bulk,
            "setup": client.setup,
            "chan": client.chan_per_call,
        }
    )
