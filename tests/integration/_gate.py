"""A call that waits in the node until the test opens the gate."""

from __future__ import annotations

import trio

import sshrpc


class Gate:
    """Export ``gate.wait`` in a test's service: the call sets ``started``,
    waits for ``opened`` and answers ``opened``; cancelled, it sets
    ``cancelled``."""

    def __init__(self) -> None:
        self.opened = trio.Event()
        self.started = trio.Event()
        self.cancelled = trio.Event()

    async def wait(self) -> sshrpc.Atom:
        self.started.set()
        try:
            await self.opened.wait()
        except BaseException:
            self.cancelled.set()
            raise
        return sshrpc.Atom("opened")
