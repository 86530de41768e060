"""``sshrpc serve`` for the benchmark, with the node's ``max_frame`` raised
so that the bulk sweep (up to 64 MiB) can run.

If the CLI has a ``--max-frame`` option it is used as is; otherwise the node
that ``sshrpc serve`` starts gets ``max_frame`` through ``serve_node``'s
options (relay mode only: an in-process channel is a separate process that
keeps its default).  Everything else is the real ``sshrpc serve``.

Usage: ``python bench/systems/sshrpc_serve.py SERVE_ARGS...``
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.systems._common import MAX_FRAME

from sshrpc import cli, node


def main(argv: list[str]) -> int:
    if "--max-frame" in cli._parser().format_help():
        return cli.main(["serve", *argv, "--max-frame", str(MAX_FRAME)])
    node.serve_node = functools.partial(node.serve_node, max_frame=MAX_FRAME)  # type: ignore[assignment]
    return cli.main(["serve", *argv])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
