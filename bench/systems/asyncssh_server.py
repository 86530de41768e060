"""The asyncssh comparison server: an asyncssh SSH server whose
``sshrpc@k2r.org`` subsystem answers hello and ``sshrpc_bench:echo`` calls
with erlpack ETF frames.

Usage: ``python bench/systems/asyncssh_server.py PORT HOST_KEY AUTHORIZED_KEYS``.
Serves until killed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import asyncssh

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.systems._common import CIPHER, MAX_FRAME
from bench.systems.etf_erlpack import CALL, HELLO, REPLY, frame, hello_frame, unpack


async def serve_channel(process: asyncssh.SSHServerProcess[bytes]) -> None:
    reader, writer = process.stdin, process.stdout
    try:
        while True:
            head = await reader.readexactly(4)
            n = int.from_bytes(head, "big")
            if n > MAX_FRAME:
                break
            if n == 0:
                continue
            term = unpack(await reader.readexactly(n))
            if term[0] == CALL:
                writer.write(frame((REPLY, term[1], term[4][0])))
            elif term[0] == HELLO:
                writer.write(hello_frame(MAX_FRAME, "asyncssh-bench/1", "server"))
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncssh.BreakReceived, ConnectionError):
        pass
    finally:
        process.exit(0)


async def main(port: int, host_key: str, authorized: str) -> None:
    await asyncssh.create_server(
        None,
        "127.0.0.1",
        port,
        server_host_keys=[host_key],
        authorized_client_keys=authorized,
        process_factory=serve_channel,
        encoding=None,
        allow_scp=False,
        encryption_algs=[CIPHER],
    )
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
