"""Drive an sshrpc subsystem through OpenSSH's own ``ssh -s`` client: frames are
written to its stdin and read from its stdout (helpers for the node tests)."""

from __future__ import annotations

import struct
import subprocess
from typing import Any

import trio

import sshrpc
from sshrpc import Atom

A = Atom


class SSHChannel:
    """One ``ssh -s`` process = one SSH channel to the subsystem."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.buffer = bytearray()
        self.eof = False

    @classmethod
    async def open(cls, argv: list[str]) -> SSHChannel:
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        return cls(process)

    async def send_raw(self, data: bytes) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(data)

    async def send(self, term: Any) -> None:
        payload = sshrpc.encode(term)
        await self.send_raw(struct.pack(">I", len(payload)) + payload)

    async def _fill(self, n: int) -> bool:
        assert self.process.stdout is not None
        while len(self.buffer) < n:
            data = await self.process.stdout.receive_some(65536)
            if not data:
                self.eof = True
                return False
            self.buffer += data
        return True

    async def recv(self, timeout: float = 10.0) -> Any:
        """The next term (keepalives skipped); ``EOF`` when the channel closed."""
        with trio.fail_after(timeout):
            while True:
                if not await self._fill(4):
                    return EOF
                (size,) = struct.unpack(">I", self.buffer[:4])
                if not await self._fill(4 + size):
                    return EOF
                payload = bytes(self.buffer[4 : 4 + size])
                del self.buffer[: 4 + size]
                if size:
                    return sshrpc.decode(payload)

    async def hello(self, **extra: Any) -> dict[Any, Any]:
        opts = {A("max_frame"): 1 << 20, A("client"): b"test/1"}
        opts.update({A(k): v for k, v in extra.items()})
        await self.send((A("hello"), 1, opts))
        answer = await self.recv()
        assert answer[0] == "hello", answer
        return dict(answer[2])

    async def call(self, id: int, m: str, f: str, args: list[Any], opts: Any = None) -> Any:
        if opts is None:
            await self.send((A("call"), id, A(m), A(f), args))
        else:
            await self.send((A("call"), id, A(m), A(f), args, opts))
        return await self.recv()

    async def stderr(self) -> bytes:
        assert self.process.stderr is not None
        out = bytearray()
        with trio.move_on_after(5):
            while data := await self.process.stderr.receive_some(65536):
                out += data
        return bytes(out)

    async def wait_closed(self, timeout: float = 10.0) -> int:
        """Wait for ssh to exit; its exit status."""
        with trio.fail_after(timeout):
            return await self.process.wait()

    async def aclose(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        with trio.CancelScope(shield=True):
            await self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                await stream.aclose()


class _Eof:
    def __repr__(self) -> str:
        return "EOF"


EOF = _Eof()


def bare(answer: Any) -> Any:
    """``{error, Id, {sshrpc, Reason, Details}}`` with the details dropped
    (``forbidden``/``undef`` details name what was asked; test_explain.py
    checks them), for comparing just the class and reason."""
    if isinstance(answer, tuple) and len(answer) == 3 and isinstance(answer[2], tuple):
        kind, cid, (cls, reason, _details) = answer
        return (kind, cid, (cls, reason, {}))
    return answer


class FrameClient:
    """A client end of ``Node.serve_channel`` over an in-memory stream: raw
    frames in and out, no protocol core (tests that need exact control)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def send(self, term: object) -> None:
        payload = sshrpc.encode(term)
        await self.stream.send_all(struct.pack(">I", len(payload)) + payload)

    async def recv(self) -> object:
        """The next term (None at EOF); fails after 5 s."""
        with trio.fail_after(5):
            while True:
                if len(self.buf) >= 4:
                    (size,) = struct.unpack(">I", self.buf[:4])
                    if len(self.buf) >= 4 + size:
                        payload = bytes(self.buf[4 : 4 + size])
                        del self.buf[: 4 + size]
                        return sshrpc.decode(payload)
                data = await self.stream.receive_some(65536)
                if not data:
                    return None
                self.buf += data

    async def hello(self) -> Any:
        """Send an empty hello; return the server's hello map."""
        await self.send((Atom("hello"), 1, {}))
        answer = await self.recv()
        return answer[2]  # type: ignore[index]
