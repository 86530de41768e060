"""Frame reassembly throughput, and what the protocol core adds per call.

Not part of the test suite.  Prints MB/s for ``sshrpc._framing.FrameBuffer``
(64 KiB channel reads of 1 KiB frames; also 1-byte reads) next to a
pure-Python bytearray reassembler, measured in the same run (best of several
rounds); then the time of one call round trip (``{call, 1, mod, fun, [1,
<<"x">>]}`` and its reply) through a client and a server
``sshrpc.protocol.Connection``, next to the codec work alone (two
``encode_frame`` and two ``decode``).

    .venv/bin/python bench/framing.py [--json]
"""

from __future__ import annotations

import json
import platform
import struct
import sys
import time
from collections.abc import Callable

from sshrpc._framing import FrameBuffer

FRAME = 1024
READ = 64 * 1024
TOTAL = 64 * 1024 * 1024


class PyFrameBuffer:
    """A straightforward pure-Python reassembler, for comparison."""

    def __init__(self, max_frame: int) -> None:
        self.buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next_frame(self) -> bytes | None:
        buf = self.buf
        while len(buf) >= 4:
            (length,) = struct.unpack_from(">I", buf)
            if length > self.max_frame:
                raise ValueError("too large")
            if len(buf) < 4 + length:
                return None
            payload = bytes(buf[4 : 4 + length])
            del buf[: 4 + length]
            if length:
                return payload
        return None


def _stream(frame: int, total: int) -> bytes:
    one = struct.pack(">I", frame) + bytes([131]) + b"x" * (frame - 1)
    return one * (total // len(one))


def run(make: Callable[[int], object], data: bytes, read: int, rounds: int) -> float:
    """Best MB/s over ``rounds`` passes of ``data`` fed in ``read``-byte reads."""
    reads = [data[i : i + read] for i in range(0, len(data), read)]
    best = 0.0
    for _ in range(rounds):
        fb = make(1 << 20)
        feed = fb.feed  # type: ignore[attr-defined]
        next_frame = fb.next_frame  # type: ignore[attr-defined]
        frames = 0
        start = time.process_time()
        for chunk in reads:
            feed(chunk)
            while next_frame() is not None:
                frames += 1
        elapsed = time.process_time() - start
        best = max(best, len(data) / elapsed / 1e6)
    return best


def core_round_trip(rounds: int = 5, n: int = 5000) -> tuple[float, float]:
    """Best microseconds per call: through both cores, and codec work only."""
    from sshrpc import Atom
    from sshrpc._codec import decode, encode_frame
    from sshrpc.protocol import Call, Connection, Reply, Role

    client = Connection(Role.CLIENT)
    server = Connection(Role.SERVER)
    server.receive_data(client.send(client.hello()))
    server.next_event()
    client.receive_data(server.send(server.hello()))
    client.next_event()
    args = [1, b"x"]
    mod, fun, call, reply = Atom("mod"), Atom("fun"), Atom("call"), Atom("reply")
    best_core = best_codec = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(n):
            server.receive_data(client.send(Call(id=1, module=mod, function=fun, args=args)))
            server.next_event()
            server.next_event()
            client.receive_data(server.send(Reply(id=1, value=b"ok")))
            client.next_event()
            client.next_event()
        best_core = min(best_core, (time.process_time() - start) / n * 1e6)
        start = time.process_time()
        for _ in range(n):
            decode(encode_frame((call, 1, mod, fun, args))[4:])
            decode(encode_frame((reply, 1, b"ok"))[4:])
        best_codec = min(best_codec, (time.process_time() - start) / n * 1e6)
    return best_core, best_codec


def main() -> None:
    print(f"# {platform.machine()} {platform.processor() or ''} Python {sys.version.split()[0]}")
    data = _stream(FRAME, TOTAL)
    small = _stream(FRAME, 256 * 1024)
    results = {
        "c_64k_reads_MBps": run(FrameBuffer, data, READ, 5),
        "python_64k_reads_MBps": run(PyFrameBuffer, data, READ, 3),
        "c_1byte_reads_MBps": run(FrameBuffer, small, 1, 1),
        "python_1byte_reads_MBps": run(PyFrameBuffer, small, 1, 1),
    }
    core, codec = core_round_trip()
    results["core_round_trip_us"] = core
    results["codec_only_round_trip_us"] = codec
    if "--json" in sys.argv:
        print(json.dumps(results))
        return
    print(f"{'case':28} {'MB/s':>10}")
    rates = {k: v for k, v in results.items() if k.endswith("MBps")}
    for name, value in sorted(rates.items(), key=lambda kv: -kv[1]):
        print(f"{name:28} {value:10.1f}")
    ratio = results["c_64k_reads_MBps"] / results["python_64k_reads_MBps"]
    print(f"C vs Python, 64 KiB reads of {FRAME} B frames: {ratio:.1f}x")
    print(
        f"call round trip through client+server cores: {core:.1f} us "
        f"(codec work alone {codec:.1f} us, core adds {core - codec:.1f} us)"
    )


if __name__ == "__main__":
    main()
