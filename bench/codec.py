"""Throughput of the ETF codec against its peers.  Not part of the test suite.

Run: ``.venv/bin/python bench/codec.py [--rounds N] [--json]``

For each corpus item and each implementation it measures encode and decode
operations per second (median of ``--rounds`` rounds of about 20 ms each,
all in this one run), then prints a table with ratios:

- ``C/msgpack``: the C codec's time divided by msgpack's on equivalent data
  (atoms as str, tuples as arrays); the target is at most 1.5.
- ``erlpack/C``, ``erlang_py/C``, ``ref/C``: how many times faster the C
  codec is than each (targets: above 1 for erlpack, at least 20 for erlang_py).

Peers that are not installed, or that cannot handle an item, show ``n/a``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import sshrpc
from sshrpc import Atom, _etf

try:
    import msgpack
except ImportError:  # pragma: no cover - bench-only dependency
    msgpack = None
try:
    import erlpack
except ImportError:  # pragma: no cover
    erlpack = None
try:
    import erlang as erlang_py
except ImportError:  # pragma: no cover
    erlang_py = None


def _nested() -> Any:
    value: Any = [1, b"x"]
    for i in range(10):
        value = (Atom("node"), value, i) if i % 2 else [value, i, b"leaf"]
    return value


def corpus() -> dict[str, Any]:
    """The named items, as sshrpc values."""
    return {
        "call tuple": (Atom("call"), 1, Atom("mod"), Atom("fun"), [1, b"x"]),
        "1000 small ints": list(range(1000)),
        "1000 floats": [i * 0.5 + 0.1 for i in range(1000)],
        "100-key map": {Atom(f"key{i}"): i for i in range(100)},
        "1 MiB binary": os.urandom(1 << 20),
        "10-deep nesting": _nested(),
        "1000 short binaries": [b"bin%d" % i for i in range(1000)],
    }


def to_plain(value: Any) -> Any:
    """The msgpack equivalent: atoms as str, tuples as lists."""
    if isinstance(value, Atom):
        return str(value)
    if isinstance(value, tuple | list):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {to_plain(k): to_plain(v) for k, v in value.items()}
    return value


def to_erlpack(value: Any) -> Any:
    if isinstance(value, Atom):
        return erlpack.Atom(str(value))
    if isinstance(value, tuple):
        return tuple(to_erlpack(v) for v in value)
    if isinstance(value, list):
        return [to_erlpack(v) for v in value]
    if isinstance(value, dict):
        return {to_erlpack(k): to_erlpack(v) for k, v in value.items()}
    return value


def to_erlang_py(value: Any) -> Any:
    if isinstance(value, Atom):
        return erlang_py.OtpErlangAtom(str(value).encode())
    if isinstance(value, bytes):
        return erlang_py.OtpErlangBinary(value)
    if isinstance(value, tuple):
        return tuple(to_erlang_py(v) for v in value)
    if isinstance(value, list):
        return [to_erlang_py(v) for v in value]
    if isinstance(value, dict):
        return {to_erlang_py(k): to_erlang_py(v) for k, v in value.items()}
    return value


Impl = tuple[Callable[[], Any], Callable[[], Any]]


def implementations(value: Any) -> dict[str, Impl | None]:
    """name -> (encode thunk, decode thunk), or None where not available."""
    data = sshrpc.encode(value)
    impls: dict[str, Impl | None] = {
        "C": (lambda: sshrpc.encode(value), lambda: sshrpc.decode(data)),
        "reference": (lambda: _etf.encode(value), lambda: _etf.decode(data)),
    }
    impls["msgpack"] = None
    if msgpack is not None:
        plain = to_plain(value)
        packed = msgpack.packb(plain, use_bin_type=True)
        impls["msgpack"] = (
            lambda: msgpack.packb(plain, use_bin_type=True),
            lambda: msgpack.unpackb(packed, raw=False),
        )
    impls["erlpack"] = None
    if erlpack is not None:
        try:
            evalue = to_erlpack(value)
            erlpack.pack(evalue)
            erlpack.unpack(data)
            impls["erlpack"] = (lambda: erlpack.pack(evalue), lambda: erlpack.unpack(data))
        except Exception:
            pass
    impls["erlang_py"] = None
    if erlang_py is not None:
        try:
            ovalue = to_erlang_py(value)
            erlang_py.term_to_binary(ovalue)
            erlang_py.binary_to_term(data)
            impls["erlang_py"] = (
                lambda: erlang_py.term_to_binary(ovalue),
                lambda: erlang_py.binary_to_term(data),
            )
        except Exception:
            pass
    return impls


def _calls_per_round(fn: Callable[[], Any]) -> int:
    """How many calls of ``fn`` take about 20 ms."""
    fn()
    n = 1
    while True:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - start > 0.02:
            return n
        n *= 2


def measure(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each function.  The functions take turns
    within each round, so load from other processes hits them alike."""
    counts = {name: _calls_per_round(fn) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n = counts[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(t) for name, t in times.items()}


def versions() -> list[str]:
    lines = [
        f"machine: {platform.machine()} {_cpu()} ({os.cpu_count()} cores), {platform.platform()}",
        f"python: {sys.version.split()[0]} ({platform.python_implementation()})",
        f"sshrpc: {sshrpc.__version__}",
    ]
    for name, mod in (("msgpack", msgpack), ("erlpack", erlpack), ("erlang_py", erlang_py)):
        if mod is None:
            lines.append(f"{name}: not installed")
        else:
            lines.append(f"{name}: {_dist_version(name)}")
    try:
        otp = subprocess.run(
            ["erl", "-noshell", "-eval",
             'io:put_chars(erlang:system_info(otp_release)), halt().'],
            capture_output=True, text=True, timeout=30, check=False,
        ).stdout.strip()  # fmt: skip
        lines.append(f"otp: {otp or 'unknown'}")
    except (OSError, subprocess.SubprocessError):
        lines.append("otp: not installed")
    return lines


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def _dist_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


PEERS = ["C", "reference", "msgpack", "erlpack", "erlang_py"]


def run(rounds: int) -> dict[str, dict[str, dict[str, float | None]]]:
    """item -> op -> implementation -> seconds per call (None: n/a)."""
    results: dict[str, dict[str, dict[str, float | None]]] = {}
    for name, value in corpus().items():
        impls = implementations(value)
        results[name] = {}
        for index, op in enumerate(("encode", "decode")):
            fns = {peer: impl[index] for peer, impl in impls.items() if impl is not None}
            measured = measure(fns, rounds)
            results[name][op] = {peer: measured.get(peer) for peer in PEERS}
    return results


def _ops(t: float | None) -> str:
    return "n/a" if t is None else f"{1 / t:,.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{a / b:.2f}"


def table(results: dict[str, dict[str, dict[str, float | None]]]) -> str:
    head = (
        "| item | op | C ops/s | ref ops/s | msgpack ops/s | erlpack ops/s | erlang_py ops/s "
        "| C/msgpack time | erlpack/C | erlang_py/C | ref/C |"
    )
    lines = [head, "|" + "---|" * 11]
    for name, ops in results.items():
        for op, t in ops.items():
            c = t["C"]
            lines.append(
                f"| {name} | {op} | {_ops(c)} | {_ops(t['reference'])} | {_ops(t['msgpack'])} "
                f"| {_ops(t['erlpack'])} | {_ops(t['erlang_py'])} | {_ratio(c, t['msgpack'])} "
                f"| {_ratio(t['erlpack'], c)} | {_ratio(t['erlang_py'], c)} "
                f"| {_ratio(t['reference'], c)} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    results = run(args.rounds)
    if args.json:
        print(json.dumps({"versions": versions(), "seconds_per_call": results}, indent=2))
        return
    print("\n".join(versions()))
    print()
    print(table(results))


if __name__ == "__main__":
    main()
