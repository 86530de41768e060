"""Run a fuzz target under atheris (libFuzzer), or all of them one after another.

    python fuzz/run.py TARGET [--seconds N] [--corpus DIR] [--artifacts DIR] [-- LIBFUZZER_FLAGS]
    python fuzz/run.py all --seconds N
    python fuzz/replay.py TARGET PATH...      (no atheris: re-run saved inputs)

TARGET is one of ``TARGETS``.  The corpus directory (default
``fuzz/corpus/TARGET``, not committed) is seeded from the target's
``seeds()`` when empty (for ``decode`` these include the OTP-made terms of
fuzz/seeds/otp_terms.bin); ``tests/regressions/TARGET`` (checked-in
findings) is read as an extra corpus.  A finding is written to
``ARTIFACTS/TARGET-crash-<sha1>`` (default ``fuzz/crashes/``) and the run
exits non-zero.  Only the sshrpc package is instrumented for coverage.
Exit status: 0 when no target found anything.  docs/fuzzing.md explains the
targets and their properties.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import subprocess
import sys
from collections.abc import Sequence

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

#: target name -> module in fuzz/.
TARGETS = {
    "budget": "fuzz_budget",
    "decode": "fuzz_decode",
    "encode": "fuzz_encode",
    "framing": "fuzz_framing",
    "protocol": "fuzz_protocol",
}

#: Per-input time limit (seconds) after which libFuzzer reports a hang, and
#: the resident memory (MiB) above which it reports a leak or blow-up.
HANG_SECONDS = 10
RSS_LIMIT_MB = 1024
MAX_LEN = 1 << 16


def available() -> list[str]:
    """The targets whose module exists."""
    names = []
    for name, module in TARGETS.items():
        if (HERE / f"{module}.py").exists():
            names.append(name)
    return names


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=[*TARGETS, "all"])
    parser.add_argument("--seconds", type=int, default=60, help="run time per target")
    parser.add_argument("--corpus", type=pathlib.Path, help="corpus directory to grow")
    parser.add_argument("--artifacts", type=pathlib.Path, default=HERE / "crashes")
    parser.add_argument("--runs", type=int, help="stop after this many inputs")
    args, extra = parser.parse_known_args(argv)
    return args, [a for a in extra if a != "--"]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and fuzz; return the exit status."""
    args, extra = _parse(sys.argv[1:] if argv is None else argv)
    if args.target == "all":
        failed = []
        for name in available():
            cmd = [sys.executable, str(HERE / "run.py"), name, "--seconds", str(args.seconds)]
            cmd += ["--artifacts", str(args.artifacts), *extra]
            if subprocess.run(cmd, check=False).returncode != 0:
                failed.append(name)
        print(f"fuzz: {', '.join(failed) or 'no target'} found something", file=sys.stderr)
        return 1 if failed else 0
    if args.target not in available():
        print(f"fuzz: target {args.target!r} has no module yet", file=sys.stderr)
        return 2
    fuzz(args.target, args.seconds, args.corpus, args.artifacts, args.runs, extra)
    return 0


def fuzz(
    name: str,
    seconds: int,
    corpus: pathlib.Path | None,
    artifacts: pathlib.Path,
    runs: int | None,
    extra: Sequence[str],
) -> None:
    """Fuzz one target in this process; libFuzzer exits the process when done."""
    import atheris

    sys.path.insert(0, str(HERE))
    with atheris.instrument_imports(include=["sshrpc"]):
        import sshrpc  # noqa: F401  (instrumented before the target imports it)

        module = importlib.import_module(TARGETS[name])
    corpus = corpus or HERE / "corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        for i, seed in enumerate(module.seeds()):
            (corpus / f"seed-{i:03d}").write_bytes(seed)
    artifacts.mkdir(parents=True, exist_ok=True)
    flags = [
        f"-max_total_time={seconds}",
        f"-timeout={HANG_SECONDS}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-max_len={getattr(module, 'MAX_LEN', MAX_LEN)}",
        f"-artifact_prefix={artifacts}/{name}-",
        "-print_final_stats=1",
    ]
    if runs is not None:
        flags.append(f"-runs={runs}")
    regressions = ROOT / "tests" / "regressions" / name
    dirs = [corpus] + ([regressions] if regressions.is_dir() else [])
    atheris.Setup([sys.argv[0], *flags, *extra, *map(str, dirs)], module.test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    sys.exit(main())
