"""Replay saved inputs through a fuzz target, without atheris's fuzzing loop.

    python fuzz/replay.py [--keep-going] TARGET PATH...

Each PATH is a file or a directory (read recursively).  Prints how many
inputs passed; on the first failure prints the path and the traceback and
exits 1 (with ``--keep-going``: after all inputs, listing every failure).
Use it to reproduce an artifact from ``fuzz/run.py``, and to run
the corpora under AddressSanitizer (fuzz/asan.sh).
"""

from __future__ import annotations

import importlib
import pathlib
import sys
import time
import traceback

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import TARGETS  # noqa: E402


def main(argv: list[str]) -> int:
    """Replay; return the exit status."""
    keep_going = bool(argv) and argv[0] == "--keep-going"
    if keep_going:
        argv = argv[1:]
    if len(argv) < 1 or argv[0] not in TARGETS:
        print(__doc__, file=sys.stderr)
        return 2
    module = importlib.import_module(TARGETS[argv[0]])
    inputs = [("seed", s) for s in module.seeds()]
    for arg in argv[1:]:
        root = pathlib.Path(arg)
        if not root.exists():
            print(f"replay: {arg}: no such file or directory", file=sys.stderr)
            return 2
        paths = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        inputs += [(str(p), p.read_bytes()) for p in paths]
    start = time.perf_counter()
    failed = []
    for where, data in inputs:
        try:
            module.test_one_input(data)
        except Exception as exc:
            print(f"replay {argv[0]}: {where} fails:", file=sys.stderr)
            traceback.print_exc()
            if not keep_going:
                return 1
            failed.append(f"{where}: {type(exc).__name__}: {exc}"[:300])
    elapsed = time.perf_counter() - start
    passed = len(inputs) - len(failed)
    print(f"replay {argv[0]}: {passed} of {len(inputs)} inputs passed in {elapsed:.1f} s")
    for line in failed:
        print(f"  FAILED {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
