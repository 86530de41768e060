"""The node's own CPU per call, without SSH: a ``Node`` serving one channel
in this process over a socketpair, its client in a child process.

    .venv/bin/python bench/node_loop.py                      # every function, depths 1, 16, 64, 256
    .venv/bin/python bench/node_loop.py --only echo_inline --depths 64 --calls 50000

The child (plain sockets, sshrpc's codec) keeps DEPTH calls in flight on the
channel, sending the ids answered as soon as half of them are (so a read
carries about DEPTH/2 calls); DEPTH 1 is one call at a time.  Every call has a
``timeout`` option, as the Python client sends one.  The functions: ``echo``
(``async def``), ``echo_inline`` (``def`` exported ``inline=True``),
``echo_thread`` (``def``: the node's worker pool), and ``floor``: the plain-TCP
floor's handler (``bench/floors/tcp_server.py``: decode, encode, one write per
read) on the same socket, the least any server with this framing can do.

CPU is this process's (``time.process_time``, every thread: the loop and the
pool's workers) while the calls run, divided by the calls; the figure is the
median of ``--rounds``.  With several depths it also fits CPU = per call +
per read / (DEPTH/2) (least squares over the pipelined depths), which tells
the cost of each call's Python from the cost of each read's syscalls and
scheduling.  The client's CPU is not counted.  Never part of the test suite.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.floors.tcp_server import handle as floor_handle  # noqa: E402

from sshrpc import Service  # noqa: E402
from sshrpc.node import Node  # noqa: E402

CLIENT = r"""
import socket, sys
sys.path.insert(0, sys.argv[6])
from bench.floors._wire import FrameBuffer, frame, hello_frame
from sshrpc import Atom, decode
fd, fn, n, depth = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
module = sys.argv[5]
s = socket.socket(fileno=fd)
options = {Atom("timeout"): 600000}
call = (Atom("call"), 0, Atom(module), Atom(fn), [b"x" * 32], options)
frames = [frame((*call[:1], i, *call[2:])) for i in range(depth)]
s.sendall(hello_frame(1 << 20, "node_loop/1"))
buf = FrameBuffer(1 << 20)
while buf.pop() is None:
    buf.feed(s.recv(65536))
sent, got, free, half = depth, 0, [], max(1, depth // 2)
s.sendall(b"".join(frames))
while got < n:
    data = s.recv(1 << 18)
    if not data:
        break
    buf.feed(data)
    while (payload := buf.pop()) is not None:
        got += 1
        free.append(decode(payload)[1])
    if len(free) >= half and sent < n:
        k = min(len(free), n - sent)
        s.sendall(b"".join(frames[i] for i in free[:k]))
        sent += k
        del free[:k]
print(got, flush=True)
"""

svc = Service("node_loop")


@svc.export
async def echo(value: Any) -> Any:
    """On the node's loop."""
    return value


@svc.export(inline=True)
def echo_inline(value: Any) -> Any:
    """Inline: in the reader."""
    return value


@svc.export
def echo_thread(value: Any) -> Any:
    """In the worker pool."""
    return value


FUNCTIONS = ("floor", "echo", "echo_inline", "echo_thread")


AUDIT = False  # --audit


async def one_run(fn: str, calls: int, depth: int) -> float:
    """CPU µs per call of one run."""
    mine, theirs = socket.socketpair()
    if AUDIT:
        # The audit line on, written as ``sshrpc serve`` writes it.
        logging.getLogger("sshrpc.audit").setLevel(logging.INFO)
        node = Node([svc], audit_stream=open(os.devnull, "w"))  # noqa: SIM115
    else:
        node = Node([svc], audit_level=10)  # the audit line off (DEBUG)
    argv = [sys.executable, "-c", CLIENT, str(theirs.fileno()), fn, str(calls), str(depth)]
    argv += ["sshrpc_bench" if fn == "floor" else "node_loop", str(ROOT)]
    if fn == "floor":
        argv[4] = "echo"
    proc = subprocess.Popen(argv, pass_fds=[theirs.fileno()], stdout=subprocess.PIPE)
    theirs.close()
    try:
        async with trio.open_nursery() as nursery:
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(mine))
            cpu = time.process_time()
            if fn == "floor":
                nursery.start_soon(floor_handle, stream)
            else:
                nursery.start_soon(node.serve_channel, stream)
            with trio.fail_after(300):
                while proc.poll() is None:
                    await trio.sleep(0.01)
            cpu = time.process_time() - cpu
            nursery.cancel_scope.cancel()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        node.close_workers()
    assert proc.stdout is not None
    done = int(proc.stdout.read() or 0)
    if done != calls:
        raise SystemExit(f"{fn} depth {depth}: {done} of {calls} calls answered")
    return cpu / calls * 1e6


def fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least squares of cpu = a + b / (depth / 2): (per call, per read)."""
    xs = [2 / d for d, _ in points if d > 1]
    ys = [c for d, c in points if d > 1]
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return my - b * mx, b


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(FUNCTIONS), help="functions, comma-separated")
    parser.add_argument("--depths", default="1,16,64,256", help="calls in flight, comma-separated")
    parser.add_argument("--calls", type=int, default=20000, help="pipelined calls per run")
    parser.add_argument("--seq-calls", type=int, default=3000, help="calls per run at depth 1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--audit", action="store_true", help="audit lines on (to /dev/null, as `sshrpc serve`)"
    )
    args = parser.parse_args()
    global AUDIT
    AUDIT = args.audit
    depths = [int(d) for d in args.depths.split(",")]
    print(f"node CPU µs per call (median of {args.rounds}; pid {os.getpid()})")
    print("| function | " + " | ".join(f"depth {d}" for d in depths) + " | per call | per read |")
    print("|---|" + "---:|" * (len(depths) + 2))
    for fn in args.only.split(","):
        if fn not in FUNCTIONS:
            raise SystemExit(f"no function {fn!r}: one of {', '.join(FUNCTIONS)}")
        points = []
        for depth in depths:
            calls = args.seq_calls if depth == 1 else args.calls
            runs = [await one_run(fn, calls, depth) for _ in range(args.rounds)]
            points.append((depth, statistics.median(runs)))
        line = fit(points)
        tail = " | - | -" if line is None else f" | {line[0]:.2f} | {line[1]:.1f}"
        print(f"| {fn} | " + " | ".join(f"{c:.2f}" for _, c in points) + tail + " |")


if __name__ == "__main__":
    trio.run(main)
