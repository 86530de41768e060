"""``sshrpc serve`` for the benchmark, with ``--max-frame`` raised so that
the bulk sweep (up to 64 MiB) can run.  Everything else is the real
``sshrpc serve``.

Usage: ``python bench/systems/sshrpc_serve.py SERVE_ARGS...``
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.systems._common import MAX_FRAME

from sshrpc import cli


def main(argv: list[str]) -> int:
    return cli.main(
        [
            "serve",
            *argv,
            "--max-frame",
            str(MAX_FRAME),
            *os.environ.get("SSHRPC_BENCH_SERVE_ARGS", "").split(),
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
