#!/bin/sh
# Build the C module with AddressSanitizer and UBSan in a COPY of the tree
# (the committed HEAD, unpacked into DEST, default /tmp/sshrpc-asan; the
# checkout itself is never touched) and run the fuzz corpora there:
#
#   fuzz/asan.sh [DEST] [SECONDS]
#
# 1. replays every seed, every input of fuzz/corpus/<target> (grown by
#    earlier coverage-guided fuzz/run.py runs) and of tests/regressions/<target>
#    through each target;
# 2. runs the hostile-input tests of tests/test_fuzz_short.py, the codec and
#    framing tests and the Erlang conformance test of the copy;
# 3. fuzzes each target for SECONDS (default 30).  Under a preloaded ASan
#    runtime atheris gets no coverage feedback, so this is plain mutation of
#    the corpus.
# A sanitizer report aborts the process.  ASAN_OPTIONS and UBSAN_OPTIONS
# from the environment replace the defaults (e.g. to add a suppressions file
# for a known report and look past it).  The script prints each step's
# result, then exits 1 if any sanitizer report or crash appeared (Python-level
# failures are listed but left to the normal test suite).  Logs: DEST/logs.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-/tmp/sshrpc-asan}
seconds=${2:-30}
case "$dest" in /tmp/?*) ;; *) echo "asan.sh: DEST must be under /tmp" >&2; exit 2 ;; esac
rm -rf "$dest"
mkdir -p "$dest/logs"
commit=$(git -C "$root" rev-parse HEAD)
git -C "$root" archive "$commit" | tar -x -C "$dest" || exit 2
ln -s "$root/.venv" "$dest/.venv"
SSHRPC_SANITIZE=1 "$dest/scripts/build-c" >/dev/null || exit 2

# libstdc++ too, so ASan's __cxa_throw interceptor resolves (atheris is C++).
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)"
ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1:detect_stack_use_after_return=1}
UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1:abort_on_error=1}
PYTHONPATH="$dest/src"
export LD_PRELOAD ASAN_OPTIONS UBSAN_OPTIONS PYTHONPATH
cd "$dest" || exit 2
py=.venv/bin/python
$py -c 'import sshrpc._sshrpc_c, sshrpc; print("asan.sh: testing", sshrpc.__file__, end=" ")'
git -C "$root" log --oneline -1 "$commit"
crashes=0
report='==[0-9]+==ERROR: [A-Za-z]+Sanitizer|runtime error:|Sanitizer: CHECK failed|deadly signal'
step() {  # step NAME COMMAND...: run, log, and count sanitizer reports and crashes
    name=$1; shift
    "$@" >"logs/$name.log" 2>&1
    rc=$?
    if [ $rc -gt 128 ] || grep -qE "$report" "logs/$name.log"; then
        crashes=$((crashes + 1))
        echo "asan.sh: $name: SANITIZER REPORT OR CRASH (rc $rc), see $dest/logs/$name.log"
    else
        echo "asan.sh: $name: rc $rc: $(grep -E "inputs passed|passed|failed|^Done" "logs/$name.log" | tail -1)"
    fi
}
targets=$($py -c 'import sys; sys.path.insert(0, "fuzz"); import run; print(*run.available())')
for target in $targets; do
    dirs=""
    for d in "$root/fuzz/corpus/$target" "tests/regressions/$target"; do
        if [ -d "$d" ]; then dirs="$dirs $d"; fi
    done
    step "replay-$target" $py fuzz/replay.py --keep-going "$target" $dirs
done
tests="tests/test_fuzz_short.py tests/integration/test_erlang_conformance.py"
for t in tests/test_framing.py tests/test_codec.py tests/test_etf.py; do
    if [ -f "$t" ]; then tests="$tests $t"; fi
done
step pytest $py -m pytest -q -p no:cacheprovider $tests -k "not fuzz_target_briefly"
# A Python-level finding ends a libFuzzer run; restart from the grown corpus
# (at most 20 times) so a known bug does not end the sanitizer run early.
for target in $targets; do
    end=$(($(date +%s) + seconds))
    runs=0
    while [ "$(date +%s)" -lt "$end" ] && [ $runs -lt 20 ]; do
        runs=$((runs + 1))
        step "fuzz-$target-$runs" $py fuzz/run.py "$target" --seconds $((end - $(date +%s) + 1)) \
            --corpus "$dest/corpus/$target" --artifacts "$dest/crashes"
        if grep -qE "$report" "logs/fuzz-$target-$runs.log"; then break; fi
    done
done
echo "asan.sh: inputs saved by the fuzz steps: $(ls "$dest/crashes" 2>/dev/null | wc -l) (in $dest/crashes)"
if [ "$crashes" -ne 0 ]; then
    echo "asan.sh: $crashes step(s) with a sanitizer report or crash"
    exit 1
fi
echo "asan.sh: no sanitizer report"
