"""sshrpc's ETF codec against real Erlang/OTP (Debian's OTP 25.2.3).

One Erlang VM (tests/integration/etf_corpus.erl, distributed without epmd so
its pids, ports and references carry a real node name and creation) writes
``term_to_binary/1,2`` output of every corpus term in five forms (default,
``[compressed]``, ``[{minor_version,0..2}]``) plus hand-made non-canonical
inputs.  Python decodes and re-encodes all of them with each codec under test
and encodes a corpus of Python values; the same VM, still holding the original
terms, then checks that ``binary_to_term`` of our bytes ``=:=`` the original
(and re-encodes to the same canonical bytes, which also tells ``0.0`` from
``-0.0``), and that our bytes are byte-identical to OTP's canonical output
(PROTOCOL.md section 8) wherever that is promised.  3,000 seeded mutations
of those binaries are checked against ``binary_to_term`` as well.
Everything is batched: one VM start, one pass per codec.  docs/fuzzing.md
has the counts.
"""

from __future__ import annotations

import collections
import enum
import os
import random
import shutil
import struct
import subprocess
import time
from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import sshrpc
import sshrpc._etf
from sshrpc import Atom, BitString, ImproperList, Map, Pid, Reference
from sshrpc._types import Opaque

pytestmark = pytest.mark.timeout(120)

HERE = Path(__file__).resolve().parent
GENERATOR = HERE / "etf_corpus.erl"

Codec = tuple[Callable[..., Any], Callable[..., bytes]]

#: The codecs under test: the pure-Python reference and the public entry
#: points (the C fast path of sshrpc._codec).
CODECS: dict[str, Codec] = {
    "reference": (sshrpc._etf.decode, sshrpc._etf.encode),
    "sshrpc": (sshrpc.decode, sshrpc.encode),
}


class Color(enum.IntEnum):
    RED = 1
    GREEN = 2


Point = namedtuple("Point", "x y")


def _nest(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


#: (name, Python value, the term it must decode to in Erlang syntax, whether
#: our bytes must equal OTP's canonical term_to_binary output, encode kwargs).
PY_VALUES: list[tuple[str, Any, str, bool, dict[str, Any]]] = [
    ("none", None, "undefined", True, {}),
    ("true", True, "true", True, {}),
    ("false", False, "false", True, {}),
    ("zero", 0, "0", True, {}),
    ("255", 255, "255", True, {}),
    ("256", 256, "256", True, {}),
    ("minus_one", -1, "-1", True, {}),
    ("int32_max", 2**31 - 1, "2147483647", True, {}),
    ("int32_max_plus_1", 2**31, "2147483648", True, {}),
    ("int32_min", -(2**31), "-2147483648", True, {}),
    ("int32_min_minus_1", -(2**31) - 1, "-2147483649", True, {}),
    ("2_64", 2**64, "1 bsl 64", True, {}),
    ("minus_2_64", -(2**64), "-(1 bsl 64)", True, {}),
    ("small_big_max", 2**2040 - 1, "(1 bsl 2040) - 1", True, {}),
    ("large_big_min", 2**2040, "1 bsl 2040", True, {}),
    ("neg_large_big", -(2**20000), "-(1 bsl 20000)", True, {}),
    ("float", 1.5, "1.5", True, {}),
    ("float_neg_zero", -0.0, "begin <<F/float>> = <<1:1, 0:63>>, F end", True, {}),
    ("float_denormal", 5e-324, "4.9406564584124654e-324", True, {}),
    ("float_max", 1.7976931348623157e308, "1.7976931348623157e308", True, {}),
    ("float_third", 1 / 3, "1/3", True, {}),
    ("str", "héllo", '<<"héllo"/utf8>>', True, {}),
    ("str_empty", "", "<<>>", True, {}),
    ("str_emoji", "\U0001f600", "<<16#1F600/utf8>>", True, {}),
    ("bytes", b"\x00\xff", "<<0,255>>", True, {}),
    ("bytearray", bytearray(b"ab"), '<<"ab">>', True, {}),
    ("memoryview", memoryview(b"xyz"), '<<"xyz">>', True, {}),
    ("atom", Atom("ok"), "ok", True, {}),
    ("atom_empty", Atom(""), "''", True, {}),
    ("atom_quoted", Atom("hello world"), "'hello world'", True, {}),
    ("atom_pi", Atom("π"), "list_to_atom([960])", True, {}),
    ("atom_latin1", Atom("ÿ"), "list_to_atom([255])", True, {}),
    ("atom_255", Atom("a" * 255), "list_to_atom(lists:duplicate(255, $a))", True, {}),
    ("atom_255_pi", Atom("π" * 255), "list_to_atom(lists:duplicate(255, 960))", True, {}),
    ("atom_true", Atom("true"), "true", True, {}),
    ("tuple_empty", (), "{}", True, {}),
    ("tuple", (1, Atom("a"), b"b"), '{1, a, <<"b">>}', True, {}),
    ("tuple_256", tuple(range(256)), "list_to_tuple(lists:seq(0, 255))", True, {}),
    ("namedtuple", Point(1, 2), "{1, 2}", True, {}),
    ("intenum", Color.GREEN, "2", True, {}),
    ("list_empty", [], "[]", True, {}),
    ("list_bytes", [1, 2, 3], "[1, 2, 3]", True, {}),
    ("list_ints", [1, 256], "[1, 256]", True, {}),
    ("list_0_255", list(range(256)), "lists:seq(0, 255)", True, {}),
    ("list_65535_bytes", [7] * 65535, "lists:duplicate(65535, 7)", True, {}),
    ("list_65536_bytes", [7] * 65536, "lists:duplicate(65536, 7)", True, {}),
    ("list_mixed", [1.5, None, [[]]], "[1.5, undefined, [[]]]", True, {}),
    ("improper", ImproperList([1, 2], Atom("t")), "[1, 2 | t]", True, {}),
    ("improper_bin", ImproperList([[]], b""), "[[] | <<>>]", True, {}),
    ("bitstring_3", BitString(b"\xe0", 3), "<<7:3>>", True, {}),
    ("bitstring_9", BitString(b"\xff\x80", 1), "<<255, 1:1>>", True, {}),
    ("map_empty", {}, "#{}", True, {}),
    ("map_atom_keys", {Atom("a"): 1, Atom("b"): [2]}, "#{a => 1, b => [2]}", True, {}),
    ("map_str_keys", {"key": "value"}, '#{<<"key">> => <<"value">>}', True, {}),
    (
        "map_1_1.0_true",
        Map([(1, Atom("a")), (1.0, Atom("b")), (True, Atom("c"))]),
        "#{1 => a, 1.0 => b, true => c}",
        True,
        {},
    ),
    ("map_list_key", Map([([1], 2)]), "#{[1] => 2}", True, {}),
    (
        "map_40",
        {i: i for i in range(40)},
        "maps:from_list([{I, I} || I <- lists:seq(0, 39)])",
        False,
        {},
    ),
    (
        "call",
        (Atom("call"), 1, Atom("mod"), Atom("fun"), [1, b"x"]),
        "{call, 1, mod, 'fun', [1, <<\"x\">>]}",
        True,
        {},
    ),
    (
        "hello",
        (Atom("hello"), 1, {Atom("max_frame"): 1048576, Atom("client"): b"py/1"}),
        '{hello, 1, #{max_frame => 1048576, client => <<"py/1">>}}',
        False,
        {},
    ),
    (
        "nested_999",
        _nest(999),
        "lists:foldl(fun(_, A) -> [A] end, [], lists:seq(1, 999))",
        True,
        {},
    ),
    (
        "pid",
        Pid.new("py@host", 1, 2, 3),
        'binary_to_term(<<131, 88, 119, 7, "py@host", 1:32, 2:32, 3:32>>)',
        True,
        {},
    ),
    (
        "reference",
        Reference.new("py@host", (1, 2, 3), 4),
        'binary_to_term(<<131, 90, 3:16, 119, 7, "py@host", 4:32, 1:32, 2:32, 3:32>>)',
        True,
        {},
    ),
    (
        "compressed",
        [b"abc"] * 100,
        'lists:duplicate(100, <<"abc">>)',
        False,
        {"compressed": True},
    ),
]


@dataclass
class Outcome:
    """What one codec did with the corpus and what Erlang said about it."""

    # name -> (verdict, identical, expected-bytes kind)
    results: dict[str, tuple[str, bool, str]] = field(default_factory=dict)
    reencoded: list[bytes | None] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    seconds: float = 0.0
    mutants: list[bytes] = field(default_factory=list)
    mutant_opaque: list[bool] = field(default_factory=list)
    otp: str = ""


def _records(data: bytes) -> list[tuple[str, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        (nlen,) = struct.unpack_from(">H", data, pos)
        name = data[pos + 2 : pos + 2 + nlen].decode()
        pos += 2 + nlen
        (blen,) = struct.unpack_from(">I", data, pos)
        out.append((name, data[pos + 4 : pos + 4 + blen]))
        pos += 4 + blen
    return out


def _reencode(codec: Codec, corpus: list[tuple[str, bytes]], outcome: Outcome) -> bytes:
    decode, encode = codec
    chunks = []
    start = time.perf_counter()
    for name, data in corpus:
        try:
            value = decode(data)
            ours = encode(value)
        except sshrpc.TermError as exc:
            outcome.reencoded.append(None)
            message = f"{type(exc).__name__}: {exc}".encode()
            chunks.append(struct.pack(">BI", 1, len(message)) + message)
            continue
        except Exception as exc:  # anything but TermError breaks the contract
            outcome.unexpected.append(f"{name}: {type(exc).__name__}: {exc}")
            outcome.reencoded.append(None)
            message = f"{type(exc).__name__}: {exc}".encode()
            chunks.append(struct.pack(">BI", 2, len(message)) + message)
            continue
        outcome.reencoded.append(ours)
        chunks.append(struct.pack(">BI", 0, len(ours)) + ours)
    outcome.seconds = time.perf_counter() - start
    return b"".join(chunks)


#: Mutated byte strings derived from the corpus, for the differential check.
MUTANTS = 3000


def _mutants(corpus: list[tuple[str, bytes]]) -> list[bytes]:
    """Seeded byte-level mutations (flips, insertions, deletions, truncation)
    of small canonical corpus binaries; never compressed (binary_to_term
    would allocate whatever size a mutated header claims)."""
    rng = random.Random(20261122)
    sources = [b for n, b in corpus if n.endswith("/minor2") and len(b) <= 2048]
    sources += [b for n, b in corpus if n.startswith("hand/") and b[1] != 80]
    out: list[bytes] = []
    seen = set(sources)
    while len(out) < MUTANTS:
        data = bytearray(rng.choice(sources))
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(1, len(data) + 1)
            op = rng.randrange(5)
            if op == 0 and pos < len(data):
                data[pos] = rng.randrange(256)
            elif op == 1 and pos < len(data):
                data[pos] ^= 1 << rng.randrange(8)
            elif op == 2:
                data.insert(pos, rng.randrange(256))
            elif op == 3 and pos < len(data):
                del data[pos]
            elif op == 4:
                del data[pos:]
        mutant = bytes(data)
        if len(mutant) >= 2 and mutant[1] != 80 and mutant not in seen:
            seen.add(mutant)
            out.append(mutant)
    return out


def _has_opaque(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Opaque):
            return True
        if type(item) in (list, tuple):
            stack.extend(item)
        elif type(item) in (dict, Map):
            stack.extend(k for pair in item.items() for k in pair)
        elif type(item) is ImproperList:
            stack.extend(item.items)
            stack.append(item.tail)
    return False


def _mutant_records(codec: Codec, mutants: list[bytes], outcome: Outcome) -> bytes:
    decode, encode = codec
    chunks = []
    for data in mutants:
        opaque = False
        try:
            value = decode(data)
            opaque = _has_opaque(value)
            ours, status = encode(value), 0
        except sshrpc.TermError:
            ours, status = b"", 1
        except Exception as exc:  # anything but TermError breaks the contract
            outcome.unexpected.append(f"mutant {data!r}: {type(exc).__name__}: {exc}")
            ours, status = f"{type(exc).__name__}: {exc}".encode(), 2
        outcome.mutant_opaque.append(opaque)
        chunks.append(struct.pack(">I", len(data)) + data + struct.pack(">BI", status, len(ours)))
        chunks.append(ours)
    return b"".join(chunks)


def _py_values(codec: Codec) -> bytes:
    _, encode = codec
    chunks = []
    for name, value, text, canonical, kwargs in PY_VALUES:
        try:
            ours, status = encode(value, **kwargs), 0
        except Exception as exc:
            ours, status = f"{type(exc).__name__}: {exc}".encode(), 1
        bname, btext = name.encode(), text.encode()
        chunks.append(
            struct.pack(">H", len(bname))
            + bname
            + struct.pack(">I", len(btext))
            + btext
            + struct.pack(">BBI", int(canonical), status, len(ours))
            + ours
        )
    return b"".join(chunks)


@pytest.fixture(scope="module")
def conformance(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    erl, erlc = shutil.which("erl"), shutil.which("erlc")
    if erl is None or erlc is None:
        pytest.skip("Erlang/OTP (erl, erlc) is not installed on this machine")
    work = tmp_path_factory.mktemp("etf_conformance")
    subprocess.run(
        [erlc, "-o", str(work), str(GENERATOR)], check=True, timeout=60, capture_output=True
    )
    outcomes = {label: Outcome() for label in CODECS}
    for label, codec in CODECS.items():
        (work / f"pyvalues_{label}.bin").write_bytes(_py_values(codec))
    env = dict(os.environ, ERL_CRASH_DUMP=str(work / "erl_crash.dump"))
    with open(work / "stderr.txt", "wb") as stderr:
        proc = subprocess.Popen(
            # Distributed, so pids carry a node name and creation; no epmd is
            # started or contacted, and no port is listened on.
            [
                erl,
                "-noshell",
                "-sname",
                f"sshrpc_conf{os.getpid()}",
                "-dist_listen",
                "false",
                "-start_epmd",
                "false",
                "-pa",
                str(work),
                "-run",
                "etf_corpus",
                "main",
                str(work),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=work,
            env=env,
        )
        try:
            assert proc.stdin is not None and proc.stdout is not None
            ready = proc.stdout.readline().decode()
            assert ready.startswith("READY"), (ready, (work / "stderr.txt").read_text())
            corpus = _records((work / "corpus.bin").read_bytes())
            assert len(corpus) == int(ready.split()[1])
            for outcome in outcomes.values():
                outcome.otp = ready.split()[2]
            mutants = _mutants(corpus)
            for label, codec in CODECS.items():
                data = _reencode(codec, corpus, outcomes[label])
                (work / f"ours_{label}.bin").write_bytes(data)
                data = _mutant_records(codec, mutants, outcomes[label])
                (work / f"mutants_{label}.bin").write_bytes(data)
                outcomes[label].mutants = mutants
            proc.stdin.write(f"CHECK {' '.join(CODECS)}\n".encode())
            proc.stdin.flush()
            done = proc.stdout.readline().decode()
            assert done.strip() == "DONE", (done, (work / "stderr.txt").read_text())
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for label in CODECS:
        text = (work / f"results_{label}.txt").read_text(encoding="utf-8")
        for line in text.splitlines():
            name, verdict, identical, expect = line.split("\t")
            outcomes[label].results[name] = (verdict, identical == "yes", expect)
    return outcomes


def _kind(name: str) -> str:
    return {"py/": "py", "mut/": "mutant"}.get(name[: name.find("/") + 1], "corpus")


@pytest.mark.parametrize("label", list(CODECS))
def test_no_exception_but_term_error(conformance: dict[str, Outcome], label: str) -> None:
    assert conformance[label].unexpected == []


@pytest.mark.parametrize("label", list(CODECS))
def test_every_otp_term_decodes_and_reencodes_to_an_equal_term(
    conformance: dict[str, Outcome], label: str
) -> None:
    bad = {
        name: verdict
        for name, (verdict, _, _) in conformance[label].results.items()
        if _kind(name) == "corpus" and verdict != "equal"
    }
    assert bad == {}


@pytest.mark.parametrize("label", list(CODECS))
def test_canonical_otp_output_reencodes_byte_for_byte(
    conformance: dict[str, Outcome], label: str
) -> None:
    results = conformance[label].results
    expected = [n for n, (_, _, e) in results.items() if _kind(n) == "corpus" and e != "none"]
    # Every minor_version 2 term and every opaque-free term in any form.
    assert len(expected) > 0.6 * sum(1 for n in results if _kind(n) == "corpus")
    assert [n for n in expected if not results[n][1]] == []


@pytest.mark.parametrize("label", list(CODECS))
def test_python_values_decode_in_erlang_to_the_expected_terms(
    conformance: dict[str, Outcome], label: str
) -> None:
    results = conformance[label].results
    py = {n: r for n, r in results.items() if _kind(n) == "py"}
    assert len(py) == len(PY_VALUES)
    assert {n: v for n, (v, _, _) in py.items() if v != "equal"} == {}
    assert [n for n, (_, same, e) in py.items() if e == "canonical" and not same] == []


def test_reference_and_public_codec_agree(conformance: dict[str, Outcome]) -> None:
    reference, public = conformance["reference"], conformance["sshrpc"]
    assert len(reference.reencoded) == len(public.reencoded)
    differ = [
        i
        for i, (a, b) in enumerate(zip(reference.reencoded, public.reencoded, strict=True))
        if a != b
    ]
    assert differ == []


def test_report_counts(conformance: dict[str, Outcome], capsys: pytest.CaptureFixture[str]) -> None:
    paths = {
        op: "reference" if getattr(sshrpc, op) is getattr(sshrpc._etf, op) else "C"
        for op in ("decode", "encode")
    }
    otp = conformance["reference"].otp
    lines = [
        f"ETF conformance vs Erlang/OTP {otp} (sshrpc.decode: {paths['decode']}, "
        f"sshrpc.encode: {paths['encode']}):"
    ]
    for label, outcome in conformance.items():
        results = [r for n, r in outcome.results.items() if _kind(n) != "mutant"]
        mutants = collections.Counter(
            v for n, (v, _, _) in outcome.results.items() if _kind(n) == "mutant"
        )
        lines.append(
            f"  {label:9}: {len(results)} terms tried, "
            f"{sum(1 for _, same, _ in results if same)} byte-identical "
            f"(of {sum(1 for _, _, e in results if e != 'none')} where promised), "
            f"{sum(1 for v, _, _ in results if v == 'equal')} =:=-equal; "
            f"corpus re-encoded in {outcome.seconds:.2f} s"
        )
        lines.append(
            f"  {'':9}  {sum(mutants.values())} mutated inputs: "
            + ", ".join(f"{v} {k}" for k, v in sorted(mutants.items()))
        )
        assert len(results) > 2500
    with capsys.disabled():
        print("\n" + "\n".join(lines))


@pytest.mark.parametrize("label", list(CODECS))
def test_mutated_inputs_agree_with_binary_to_term(
    conformance: dict[str, Outcome], label: str
) -> None:
    # Where we decode a mutated byte string, binary_to_term must decode it to
    # the same term.  We may refuse what OTP reads (trailing bytes, which
    # binary_to_term/1 ignores; a bignum sign byte above 1; a NEW_FUN_EXT
    # whose size field disagrees with its fields), never the reverse, except
    # inside pids, ports, references and funs: we keep those as opaque bytes
    # (PROTOCOL.md section 8), while OTP checks a fun's fields and a local
    # pid's or port's range.
    outcome = conformance[label]
    verdicts = {n: v for n, (v, _, _) in outcome.results.items() if _kind(n) == "mutant"}
    assert len(verdicts) == MUTANTS
    wrong = {}
    for name, verdict in verdicts.items():
        index = int(name[4:]) - 1
        if verdict == "otp_rejects" and outcome.mutant_opaque[index]:
            continue
        if verdict not in ("equal", "both_reject", "we_reject"):
            wrong[name] = (verdict, outcome.mutants[index])
    assert wrong == {}
