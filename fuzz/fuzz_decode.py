"""Fuzz target: arbitrary bytes -> ``decode``, reference codec against the public one.

Properties checked for every input (an ``AssertionError`` or any exception
other than ``TermError`` is a finding):

- each decoder returns a value or raises ``TermError``, nothing else (no
  ``RecursionError``, ``MemoryError``, ``OverflowError``, ``SystemError``...),
  whose message names a byte offset inside the input (or the inflated term),
  the same offset for both decoders;
- both decoders agree: both refuse the input, or both return the same value
  of the same types (``same``);
- a decoded value encodes (both encoders give the same bytes), and those
  bytes decode and re-encode to themselves (canonical output is stable).

Run it with ``python fuzz/run.py decode`` (docs/fuzzing.md).
"""

from __future__ import annotations

from typing import Any

from fuzz_common import DECODERS, ENCODERS, MAX_INFLATED, attempt, same

from sshrpc import Atom, BitString, ImproperList, Map, Pid, Reference, TermError


def test_one_input(data: bytes) -> None:
    results = {name: attempt(decode, data) for name, decode in DECODERS.items()}
    ref, fast = results["reference"], results["sshrpc"]
    ref_failed, fast_failed = isinstance(ref, TermError), isinstance(fast, TermError)
    assert ref_failed == fast_failed, f"decoders disagree on {data!r}: {ref!r} vs {fast!r}"
    if ref_failed:
        # The message names the byte offset, within the (inflated) input,
        # and both decoders name the same one.
        limit = MAX_INFLATED + 1 if len(data) > 1 and data[1] == 80 else len(data)
        for err in (ref, fast):
            assert type(err.offset) is int and 0 <= err.offset <= limit, (data, err)
            assert f"at byte {err.offset}" in str(err), (data, err)
        assert ref.offset == fast.offset, f"offsets differ on {data!r}: {ref} vs {fast}"
        return
    assert same(ref, fast), f"decoders disagree on {data!r}: {ref!r} vs {fast!r}"
    encoded = {name: encode(ref) for name, encode in ENCODERS.items()}
    assert encoded["reference"] == encoded["sshrpc"], f"encoders disagree on {ref!r}"
    again = attempt(DECODERS["sshrpc"], encoded["sshrpc"])
    assert not isinstance(again, TermError), f"{encoded['sshrpc']!r} does not decode: {again}"
    assert ENCODERS["sshrpc"](again) == encoded["sshrpc"], f"unstable encoding of {ref!r}"


def seed_values() -> list[Any]:
    """Values whose encodings start the corpus: one of each kind of term."""
    pid = Pid.new("node@host", 1, 2, 3)
    return [
        0, 255, 256, -1, 2**31, -(2**31) - 1, 2**64, -(2**2040), 1.5, -0.0,
        Atom("ok"), Atom("π"), Atom("a" * 255), True, None, b"", b"bin", "str",
        BitString(b"\xe0", 3), (), (1, Atom("a")), tuple(range(256)), [], [1, 2, 3],
        [1, 256], [1.5, [b"x"]], ImproperList([1], Atom("t")), {}, {Atom("k"): [1]},
        Map([(1, 0), (1.0, 0), (True, 0)]), {i: i for i in range(40)}, pid,
        Reference.new("node@host", (1, 2, 3)), [pid, {Atom("deep"): [[[()]]]}],
        (Atom("call"), 1, Atom("mod"), Atom("fun"), [1, b"x"]),
    ]  # fmt: skip


def seeds() -> list[bytes]:
    """Seed inputs: the seed values encoded plainly and compressed, old and
    Latin-1 forms the encoder never produces, and the OTP-made terms of
    fuzz/seeds/otp_terms.bin (fuzz/make_seeds.py)."""
    import make_seeds

    from sshrpc._etf import encode

    out = [encode(v) for v in seed_values()]
    out += [encode(v, compressed=True) for v in seed_values()[-5:]]
    out += [
        bytes([131, 100, 0, 3]) + b"abc",  # ATOM_EXT
        bytes([131, 115, 3]) + b"abc",  # SMALL_ATOM_EXT
        bytes([131, 99]) + b"1.50000000000000000000e+00".ljust(31, b"\0"),  # FLOAT_EXT
        bytes([131, 108, 0, 0, 0, 1, 97, 1, 97, 2]),  # improper via LIST_EXT
        bytes([131, 103, 100, 0, 3]) + b"a@b" + bytes(9),  # PID_EXT
        bytes([131, 113, 119, 5]) + b"lists" + bytes([119, 3]) + b"map" + bytes([97, 2]),
        bytes([131, 112, 0, 0, 0, 4]),  # NEW_FUN_EXT, minimal size
    ]
    return out + make_seeds.load()


if __name__ == "__main__":
    import run

    run.main(["decode", *__import__("sys").argv[1:]])
