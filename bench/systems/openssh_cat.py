"""The cipher floor: a driver (protocol in _common.py) around OpenSSH's own
client, ``ssh -s`` to a ``cat`` subsystem of a private sshd.

- ``connect`` starts one ``ssh -s cat`` and times the first echoed byte.
- ``latency`` writes a 36-byte frame-sized block and reads it back (no RPC
  layer at all: the SSH round trip itself).
- ``bulk SIZE`` streams SIZE bytes through the kept ``cat`` channel, writing
  and reading concurrently, timed from the first byte written to the last read.
- ``setup`` starts a new ``ssh -s cat`` per figure, to its first echoed byte.

Usage: ``python bench/systems/openssh_cat.py SSH_ARGV...`` (the full ssh
command line, ending with the subsystem name).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.systems._common import ok, payload, run_sync_driver, stop_process

CHUNK = 1 << 18


def start(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)


def read_exactly(fd: int, n: int) -> None:
    while n:
        data = os.read(fd, min(n, 1 << 20))
        if not data:
            raise EOFError("ssh closed")
        n -= len(data)


class Cat:
    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None

    def _fds(self) -> tuple[int, int]:
        assert self.proc and self.proc.stdin and self.proc.stdout
        return self.proc.stdin.fileno(), self.proc.stdout.fileno()

    def _first_byte(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin and proc.stdout
        os.write(proc.stdin.fileno(), b"x")
        read_exactly(proc.stdout.fileno(), 1)

    def connect(self) -> str:
        t0 = time.perf_counter()
        self.proc = start(self.argv)
        self._first_byte(self.proc)
        return ok([time.perf_counter() - t0])

    def latency(self, n: float, max_s: float, size: float) -> str:
        w, r = self._fds()
        block = payload(int(size) + 4)
        end = time.perf_counter() + max_s
        out = []
        for _ in range(int(n)):
            t0 = time.perf_counter_ns()
            os.write(w, block)
            read_exactly(r, len(block))
            out.append(time.perf_counter_ns() - t0)
            if time.perf_counter() > end:
                break
        return ok(out)

    def bulk(self, size: float, reps: float, max_s: float) -> str:
        w, r = self._fds()
        size = int(size)
        block = memoryview(payload(CHUNK))
        end = time.perf_counter() + max_s
        out = []

        def writer() -> None:
            left = size
            while left:
                left -= os.write(w, block[: min(left, CHUNK)])

        for _ in range(int(reps)):
            t0 = time.perf_counter_ns()
            thread = threading.Thread(target=writer)
            thread.start()
            read_exactly(r, size)
            thread.join()
            out.append(time.perf_counter_ns() - t0)
            if time.perf_counter() > end:
                break
        return ok(out)

    def setup(self, n: float, max_s: float) -> str:
        end = time.perf_counter() + max_s
        out = []
        for _ in range(int(n)):
            t0 = time.perf_counter_ns()
            proc = start(self.argv)
            self._first_byte(proc)
            out.append(time.perf_counter_ns() - t0)
            assert proc.stdin
            proc.stdin.close()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                stop_process(proc)
            if time.perf_counter() > end:
                break
        return ok(out)

    def close(self) -> None:
        if self.proc:
            stop_process(self.proc)


if __name__ == "__main__":
    cat = Cat(sys.argv[1:])
    try:
        run_sync_driver(
            {"connect": cat.connect, "latency": cat.latency, "bulk": cat.bulk, "setup": cat.setup}
        )
    finally:
        cat.close()
