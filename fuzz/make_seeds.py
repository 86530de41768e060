"""Regenerate fuzz/seeds/otp_terms.bin: decode-target seeds made by real Erlang/OTP.

    python fuzz/make_seeds.py

Runs the conformance generator (tests/integration/etf_corpus.erl, which names
the OTP release) once and keeps its small binaries: the hand-made
non-canonical inputs and the default, minor_version 0 and minor_version 2
forms of every term up to 512 bytes (live pids, ports, references and funs
included).  The bundle is a sequence of ``<<Length:32, Bytes>>`` records;
``fuzz_decode.seeds()`` reads it.  Needs ``erl`` and ``erlc``.
"""

from __future__ import annotations

import pathlib
import struct
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
GENERATOR = HERE.parent / "tests" / "integration" / "etf_corpus.erl"
BUNDLE = HERE / "seeds" / "otp_terms.bin"
MAX_SEED = 512


def main() -> int:
    """Generate the bundle; return the exit status."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["erlc", "-o", tmp, str(GENERATOR)], check=True, timeout=60)
        proc = subprocess.run(
            ["erl", "-noshell", "-sname", "sshrpc_seeds", "-dist_listen", "false",
             "-start_epmd", "false", "-pa", tmp, "-run", "etf_corpus", "main", tmp],
            input=b"CHECK\n", capture_output=True, timeout=120, check=True, cwd=tmp,
        )  # fmt: skip
        assert proc.stdout.startswith(b"READY"), proc.stdout
        data = pathlib.Path(tmp, "corpus.bin").read_bytes()
    records, pos = [], 0
    while pos < len(data):
        (nlen,) = struct.unpack_from(">H", data, pos)
        name = data[pos + 2 : pos + 2 + nlen].decode()
        pos += 2 + nlen
        (blen,) = struct.unpack_from(">I", data, pos)
        term = data[pos + 4 : pos + 4 + blen]
        pos += 4 + blen
        form = name.rsplit("/", 1)[-1]
        keep = name.startswith("hand/") or form in ("default", "minor0", "minor2")
        if keep and len(term) <= MAX_SEED:
            records.append(struct.pack(">I", len(term)) + term)
    BUNDLE.parent.mkdir(exist_ok=True)
    BUNDLE.write_bytes(b"".join(records))
    print(f"{BUNDLE}: {len(records)} seeds, {BUNDLE.stat().st_size} bytes")
    return 0


def load() -> list[bytes]:
    """The seeds in the bundle (none if it was never generated)."""
    if not BUNDLE.exists():
        return []
    data, out, pos = BUNDLE.read_bytes(), [], 0
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        out.append(data[pos + 4 : pos + 4 + length])
        pos += 4 + length
    return out


if __name__ == "__main__":
    sys.exit(main())
