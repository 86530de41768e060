"""The sshd floor's client: a driver (bench/systems/_common.py protocol)
that drives ssh2-python (libssh2) non-blocking from Trio, as sshrpc's client
does, against ``sshd_echo.py`` behind a private OpenSSH sshd, with the least
work per call: the frames are sshrpc's call frames, built once; an answer is
counted by its length prefix, never decoded.

Usage: ``python bench/floors/sshd_client.py PORT KEY USER``.

    connect             -> ok SECONDS   handshake, auth, the channel, one echo
    latency N MAX_S S   -> ok NS ...    one frame written, its echo read back
    pipe DEPTH N MAX_S  -> ok CALLS NS  one task keeps DEPTH frames open and
                                        refills as many as a read completed,
                                        in one write
    reqs OPEN N MAX_S   -> the same as pipe
    bulk SIZE REPS MAX_S -> ok NS ...   one call frame carrying SIZE bytes
                                        written (32 KiB per channel write, as
                                        sshrpc's pump), its echo read back
                                        whole: the RPC pattern, no streaming

Cipher, MAC and key exchange are sshrpc's client preferences (AES-GCM first).
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from typing import Any

import trio
from ssh2.error_codes import LIBSSH2_ERROR_EAGAIN as EAGAIN
from ssh2.session import (
    LIBSSH2_METHOD_CRYPT_CS,
    LIBSSH2_METHOD_CRYPT_SC,
    LIBSSH2_METHOD_KEX,
    LIBSSH2_SESSION_BLOCK_INBOUND,
    LIBSSH2_SESSION_BLOCK_OUTBOUND,
    Session,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.floors._wire import call_frame
from bench.systems._common import SUBSYSTEM, ok, payload, run_trio_driver

from sshrpc._ssh_config import DEFAULT_CIPHERS, DEFAULT_KEX


class Floor:
    def __init__(self, port: int, key: str, user: str) -> None:
        self.port, self.key, self.user = port, key, user
        self.sock: socket.socket | None = None
        self.session: Any = None
        self.channel: Any = None
        self.buf = b""

    async def _wait(self) -> None:
        directions = self.session.block_directions()
        if directions & LIBSSH2_SESSION_BLOCK_OUTBOUND:
            await trio.lowlevel.wait_writable(self.sock)
        elif directions & LIBSSH2_SESSION_BLOCK_INBOUND or directions == 0:
            await trio.lowlevel.wait_readable(self.sock)

    async def _retry(self, fn: Any, *args: Any) -> Any:
        while True:
            result = fn(*args)
            if result == EAGAIN or (isinstance(result, tuple) and result[0] == EAGAIN):
                await self._wait()
                continue
            return result

    async def connect(self) -> str:
        t0 = time.perf_counter()
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self.sock = sock
        session = self.session = Session()
        session.set_blocking(False)
        ciphers = ",".join(DEFAULT_CIPHERS)
        session.method_pref(LIBSSH2_METHOD_CRYPT_CS, ciphers)
        session.method_pref(LIBSSH2_METHOD_CRYPT_SC, ciphers)
        session.method_pref(LIBSSH2_METHOD_KEX, ",".join(DEFAULT_KEX))
        await self._retry(session.handshake, sock)
        await self._retry(session.userauth_publickey_fromfile, self.user, self.key)
        self.channel = await self._retry(session.open_session)
        await self._retry(self.channel.subsystem, SUBSYSTEM)
        await self._exchange([call_frame(0, payload(32))])
        return ok([time.perf_counter() - t0])

    async def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            rc, n = self.channel.write(bytes(view))
            if rc == EAGAIN or n == EAGAIN:
                await self._wait()
                continue
            view = view[n:]

    async def _read_frames(self) -> int:
        """Read what the channel has (waiting for something); the number of
        complete frames it finished."""
        while True:
            size, data = self.channel.read(1 << 18)
            if size == EAGAIN:
                await self._wait()
                continue
            if size < 0:
                raise OSError(f"libssh2 read error {size}")
            if size == 0 and self.channel.eof():
                raise EOFError("channel closed")
            if size:
                break
        buf = self.buf + data if self.buf else data
        end = count = 0
        while len(buf) - end >= 4:
            n = int.from_bytes(buf[end : end + 4], "big")
            if len(buf) - end - 4 < n:
                break
            end += 4 + n
            count += 1
        self.buf = buf[end:]
        return count

    async def _exchange(self, frames: list[bytes]) -> None:
        await self._write(b"".join(frames))
        got = 0
        while got < len(frames):
            got += await self._read_frames()

    async def latency(self, n: float, max_s: float, size: float) -> str:
        frame = call_frame(1, payload(int(size)))
        end = time.perf_counter() + max_s
        out = []
        for _ in range(int(n)):
            t0 = time.perf_counter_ns()
            await self._write(frame)
            got = 0
            while not got:
                got = await self._read_frames()
            out.append(time.perf_counter_ns() - t0)
            if time.perf_counter() > end:
                break
        return ok(out)

    async def pipe(self, depth: float, n: float, max_s: float) -> str:
        frame = call_frame(1, payload(32))
        depth, n = int(depth), int(n)
        t0 = time.perf_counter_ns()
        end = time.perf_counter() + max_s
        sent = min(depth, n)
        await self._write(frame * sent)
        done = 0
        while done < sent:
            got = await self._read_frames()
            done += got
            more = min(got, n - sent) if time.perf_counter() < end else 0
            if more > 0:
                await self._write(frame * more)
                sent += more
        return ok([done, time.perf_counter_ns() - t0])

    async def reqs(self, open_: float, n: float, max_s: float) -> str:
        return await self.pipe(open_, n, max_s)

    async def bulk(self, size: float, reps: float, max_s: float) -> str:
        frame = call_frame(1, payload(int(size)))
        end = time.perf_counter() + max_s
        out = []
        for _ in range(int(reps)):
            t0 = time.perf_counter_ns()
            view = memoryview(frame)
            while view:
                rc, n = self.channel.write(bytes(view[: 32 * 1024]))
                if n > 0:
                    view = view[n:]
                if rc == EAGAIN:
                    await self._wait()
                elif rc < 0:
                    raise OSError(f"libssh2 write error {rc}")
            got = 0
            while got < len(frame):
                size_, _data = self.channel.read(1 << 18)
                if size_ == EAGAIN:
                    await self._wait()
                    continue
                if size_ < 0:
                    raise OSError(f"libssh2 read error {size_}")
                if size_ == 0 and self.channel.eof():
                    raise EOFError("channel closed")
                got += size_
            if got != len(frame):
                raise AssertionError(f"echo of {len(frame)} bytes came back as {got}")
            out.append(time.perf_counter_ns() - t0)
            if time.perf_counter() > end:
                break
        return ok(out)


def main() -> None:
    port, key, user = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    floor = Floor(port, key, user)
    handlers = {
        "connect": floor.connect,
        "latency": floor.latency,
        "pipe": floor.pipe,
        "reqs": floor.reqs,
        "bulk": floor.bulk,
    }
    trio.run(run_trio_driver, handlers)


if __name__ == "__main__":
    main()
