"""Short fuzzing runs, checked-in findings, and hostile inputs against memory bounds.

- Each fuzz target in fuzz/ runs under atheris for a few seconds (the long
  command is in docs/fuzzing.md); it must end without a finding and must
  actually have run inputs.
- Every input under tests/regressions/<target>/ is replayed through its target.
- Hostile inputs (nesting 10^6 deep, 2^32-1 lengths in 20 bytes, compressed
  bombs, bignums claiming 2^32 digits) must fail with ``TermError`` and keep
  peak memory (Python heap by tracemalloc, and the process's peak resident
  set, which also counts C allocations) within a small multiple of the input.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import pathlib
import re
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

import sshrpc
import sshrpc._etf
from sshrpc import TermError

ROOT = pathlib.Path(__file__).resolve().parent.parent
FUZZ = ROOT / "fuzz"
REGRESSIONS = ROOT / "tests" / "regressions"

# The targets (fuzz/fuzz_*.py) import each other by name; fuzz/run.py is
# loaded under a name of its own, not as a top-level ``run``.
sys.path.insert(0, str(FUZZ))
_spec = importlib.util.spec_from_file_location("sshrpc_fuzz_run", FUZZ / "run.py")
assert _spec is not None and _spec.loader is not None
fuzz_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz_run)

#: Seconds of fuzzing per target in the suite; their sum stays under 15.
SECONDS = {"budget": 2, "decode": 2, "encode": 2, "framing": 1, "protocol": 2}

DECODERS: dict[str, Callable[..., Any]] = {
    "reference": sshrpc._etf.decode,
    "sshrpc": sshrpc.decode,
}
ENCODERS: dict[str, Callable[..., bytes]] = {
    "reference": sshrpc._etf.encode,
    "sshrpc": sshrpc.encode,
}

MiB = 1 << 20


def _target(name: str) -> ModuleType:
    return importlib.import_module(fuzz_run.TARGETS[name])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", fuzz_run.available())
def test_fuzz_target_briefly(name: str, tmp_path: pathlib.Path) -> None:
    corpus, artifacts = tmp_path / "corpus", tmp_path / "crashes"
    cmd = [sys.executable, str(FUZZ / "run.py"), name, "--seconds", str(SECONDS[name])]
    cmd += ["--corpus", str(corpus), "--artifacts", str(artifacts)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=50, check=False)
    findings = sorted(artifacts.glob("*")) if artifacts.exists() else []
    report = "\n".join(f"{p.name}: {p.read_bytes()[:200]!r}" for p in findings)
    assert proc.returncode == 0 and not findings, (
        f"fuzz target {name} found something (rc {proc.returncode}); add the input to "
        f"tests/regressions/{name}/\n{report}\n{proc.stderr[-4000:]}"
    )
    runs = re.search(r"stat::number_of_executed_units:\s+(\d+)", proc.stderr)
    assert runs is not None, proc.stderr[-2000:]
    assert int(runs.group(1)) >= 20, proc.stderr[-2000:]


@pytest.mark.parametrize("name", fuzz_run.available())
def test_regression_inputs(name: str) -> None:
    # Every checked-in finding of this target still passes its properties.
    directory = REGRESSIONS / name
    paths = sorted(directory.iterdir()) if directory.is_dir() else []
    target = _target(name)
    for path in paths:
        try:
            target.test_one_input(path.read_bytes())
        except BaseException as exc:
            raise AssertionError(f"regression {path.relative_to(ROOT)} fails again") from exc


def test_regressions_are_replayed() -> None:
    # The corpus of findings exists and every file in it belongs to a target.
    assert REGRESSIONS.is_dir()
    targets = {p.name for p in REGRESSIONS.iterdir() if p.is_dir()}
    assert targets <= set(fuzz_run.TARGETS), targets


# ----------------------------------------------------------------------------
# Hostile inputs and memory


def _peak_rss_reset() -> int:
    """Reset the process's peak resident set (Linux 4.0+) and return the current one, in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _status(field: str) -> int:
    text = pathlib.Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    assert match is not None
    return int(match.group(1)) * 1024


def _measure(call: Callable[[], Any], trace: bool) -> tuple[Any, int | None, int, float]:
    """Run ``call`` once.  Return its result or exception, the peak of the
    Python heap allocations it made (if ``trace``; tracemalloc slows deep
    recursion a hundredfold), how far it raised the process's peak resident
    set, and the seconds it took."""
    rss = _peak_rss_reset()
    if trace:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        try:
            result: Any = call()
        except Exception as exc:
            result = exc
        elapsed = time.perf_counter() - start
        heap = tracemalloc.get_traced_memory()[1] if trace else None
    finally:
        if trace:
            tracemalloc.stop()
    return result, heap, _status("VmHWM") - rss, elapsed


def _hostile() -> Iterator[Any]:
    """(id, input, decode kwargs) for inputs built to exhaust memory or stack."""
    n = 10**6
    u32 = b"\xff\xff\xff\xff"
    yield "list_nested_1e6", b"\x83" + b"l\x00\x00\x00\x01" * n + b"j" * (n + 1), {}
    yield "tuple_nested_1e6", b"\x83" + b"h\x01" * n + b"j", {}
    yield "map_nested_1e6", b"\x83" + b"t\x00\x00\x00\x01a\x00" * n + b"j", {}
    yield "list_tail_chain_1e6", b"\x83" + b"l\x00\x00\x00\x01a\x01" * n + b"j", {}
    yield "improper_head_1e6", b"\x83" + b"l\x00\x00\x00\x01" * n + b"a\x01" * n + b"j", {}
    yield "export_in_fun_1e6", b"\x83" + b"u\x00\x00\x00\x01" * n, {}
    for tag, name in [(b"m", "binary"), (b"l", "list"), (b"i", "large_tuple"), (b"t", "map")]:
        yield f"{name}_len_2e32", (b"\x83" + tag + u32 + b"a\x01" * 8)[:20], {}
    yield "bit_binary_len_2e32", b"\x83M" + u32 + b"\x03" + bytes(13), {}
    yield "string_len_65535", b"\x83k\xff\xff" + bytes(16), {}
    yield "atom_len_65535", b"\x83v\xff\xff" + b"a" * 16, {}
    yield "new_fun_size_2e32", b"\x83p" + u32 + bytes(14), {}
    yield "fun_ext_free_2e32", b"\x83u" + u32 + bytes(14), {}
    yield "reference_words_65535", b"\x83Z\xff\xffw\x01a" + bytes(13), {}
    big_hdr = b"\x83o" + u32 + b"\x00" + bytes(13)
    yield "bignum_2e32_digits", big_hdr, {}
    yield "bignum_2e32_digits_no_limit", big_hdr, {"max_big_bytes": 2**33}
    yield "small_big_255_truncated", b"\x83n\xff\x00" + bytes(16), {}
    zeros = _zeros_stream(16 * MiB)
    yield "compressed_claims_2e32", b"\x83P" + u32 + zlib.compress(b"abc")[:14], {}
    # With no inflated-size limit, memory follows the data, never the claim.
    yield (
        "compressed_claims_2e32_no_limit",
        b"\x83P" + u32 + zlib.compress(b"abc"),
        {"max_inflated": 2**33},
    )
    yield "compressed_bomb_claims_1GiB", b"\x83P" + struct.pack(">I", 1 << 30) + zeros, {}
    yield "compressed_bomb_lies_small", b"\x83P" + struct.pack(">I", 1000) + zeros, {}
    yield (
        "compressed_bomb_1MiB_limit",
        b"\x83P" + struct.pack(">I", MiB + 1) + zeros,
        {"max_inflated": MiB},
    )
    nested = zlib.compress(b"l\x00\x00\x00\x01" * (MiB // 5), 9)
    yield "compressed_nesting", b"\x83P" + struct.pack(">I", MiB // 5 * 5) + nested, {}


@functools.cache
def _zeros_stream(size: int) -> bytes:
    """zlib data that inflates to ``size`` zero bytes, made without holding them."""
    packer = zlib.compressobj(9)
    block = bytes(MiB)
    return b"".join(packer.compress(block) for _ in range(size // MiB)) + packer.flush()


@functools.cache
def _hostile_inputs() -> list[tuple[str, bytes, dict[str, int]]]:
    return list(_hostile())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec", list(DECODERS))
def test_hostile_inputs_fail_within_memory_bounds(codec: str) -> None:
    decode = DECODERS[codec]
    report = [f"hostile inputs, {codec} decoder:"]
    for name, data, kwargs in _hostile_inputs():
        # The Python heap is traced except for the reference decoder's
        # megabyte inputs (also when it is sshrpc's, without the C module),
        # which the resident-set check covers.
        trace = decode is not sshrpc._etf.decode or len(data) < MiB
        result, heap, rss, elapsed = _measure(lambda d=data, k=kwargs: decode(d, **k), trace)
        # A small multiple of the input, plus room for the interpreter's own
        # arenas and page granularity.
        bound = 3 * len(data) + 8 * MiB
        report.append(
            f"  {name}: {len(data)} B in, heap peak {'-' if heap is None else heap} B, "
            f"peak RSS +{rss} B, {elapsed * 1000:.1f} ms"
        )
        assert isinstance(result, TermError), (name, result)
        assert elapsed < 1, (name, elapsed)
        assert heap is None or heap <= bound, (name, heap, bound)
        assert rss <= bound + 8 * MiB, (name, rss, bound)
    print("\n".join(report))


@pytest.mark.parametrize("codec", list(DECODERS))
def test_allowed_compressed_term_inflates_to_its_claim(codec: str) -> None:
    # The largest term the protocol accepts by default (max_frame 1 MiB), as
    # a bomb: 1 MiB of zeros in about 1 KiB.  Memory stays near the claim.
    body = b"m" + struct.pack(">I", MiB - 5) + bytes(MiB - 5)
    data = b"\x83P" + struct.pack(">I", len(body)) + zlib.compress(body, 9)
    assert len(data) < 2048
    result, heap, rss, _ = _measure(lambda: DECODERS[codec](data, max_inflated=MiB), True)
    assert result == bytes(MiB - 5)
    assert heap is not None and heap <= 4 * MiB and rss <= 12 * MiB, (heap, rss)


@pytest.mark.parametrize("codec", list(ENCODERS))
def test_encoding_deep_or_cyclic_values_fails_cleanly(codec: str) -> None:
    encode = ENCODERS[codec]
    deep: list[Any] = []
    for _ in range(10**5):
        deep = [deep]
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    cyclic_dict: dict[str, Any] = {}
    cyclic_dict["self"] = cyclic_dict
    for value in (deep, cyclic, cyclic_dict, _deep_tuple(10**5)):
        with pytest.raises(TermError, match="deeper than the limit"):
            encode(value)


def _deep_tuple(depth: int) -> tuple[Any, ...]:
    value: tuple[Any, ...] = ()
    for _ in range(depth):
        value = (value,)
    return value


@pytest.mark.parametrize("codec", list(DECODERS))
def test_depth_limit_is_exact_and_configurable(codec: str) -> None:
    decode = DECODERS[codec]
    for depth, ok in [(1000, True), (1001, False)]:
        data = b"\x83" + b"h\x01" * depth + b"j"
        if ok:
            decode(data)
        else:
            with pytest.raises(TermError, match="nesting deeper than the limit 1000"):
                decode(data)
    decode(b"\x83" + b"h\x01" * 5000 + b"j", max_depth=5000)


# A finding of fuzz/fuzz_encode.py: lone surrogates raised UnicodeEncodeError.
@pytest.mark.parametrize("codec", list(ENCODERS))
def test_lone_surrogate_is_a_term_error(codec: str) -> None:
    encode = ENCODERS[codec]
    for value in ("\ud800", sshrpc.Atom("\udc00"), {"k\ud800": 1}):
        with pytest.raises(TermError):
            encode(value)
