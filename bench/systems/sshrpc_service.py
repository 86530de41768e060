"""The service every sshrpc node in the benchmark serves
(``sshrpc serve bench.systems.sshrpc_service:svc``):

- ``sshrpc_bench:echo(Value) -> Value``, an ``async def`` (on the node's loop);
- ``sshrpc_bench:echo_inline(Value)``, a plain ``def`` exported with
  ``inline=True`` (run on the node's loop, no worker thread) where
  ``Service.export`` accepts ``inline``; on a checkout without it, a plain
  ``def`` (``INLINE`` is then ``False`` and bench/call_cpu.py says so);
- ``sshrpc_bench:echo_thread(Value)``, a plain ``def`` (the node runs it off
  the loop, in a worker thread);
- ``sshrpc_bench:size(Binary) -> int`` and ``sshrpc_bench:blob(N) -> Binary``
  (async), for one-way bulk transfers (bench/longhaul.py).
"""

from __future__ import annotations

import inspect
from typing import Any

from sshrpc.service import Service

svc = Service("sshrpc_bench")

#: Whether this checkout's ``Service.export`` has the ``inline`` option.
INLINE = "inline" in inspect.signature(Service.export).parameters


@svc.export
async def echo(value: Any) -> Any:
    """Answers with its argument, on the node's loop (no worker thread)."""
    return value


def echo_inline(value: Any) -> Any:
    """Answers with its argument; exported inline where the node supports it."""
    return value


def echo_thread(value: Any) -> Any:
    """Answers with its argument, from the node's worker threads."""
    return value


if INLINE:
    svc.export(inline=True)(echo_inline)
else:
    svc.export(echo_inline)
svc.export(echo_thread)


@svc.export
async def size(value: bytes) -> int:
    """The length of its binary argument: bulk towards the node."""
    return len(value)


@svc.export
async def blob(n: int) -> bytes:
    """``n`` zero bytes: bulk towards the client."""
    return bytes(n)
