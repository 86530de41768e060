"""The service every sshrpc node in the benchmark serves:
``sshrpc_bench:echo(Value) -> Value`` (``sshrpc serve bench.systems.sshrpc_service:svc``)."""

from __future__ import annotations

from typing import Any

from sshrpc.service import Service

svc = Service("sshrpc_bench")


@svc.export
async def echo(value: Any) -> Any:
    """Answers with its argument, on the node's loop (no worker thread)."""
    return value
