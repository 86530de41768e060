"""Fuzz target: Python values built from the input -> ``encode``, reference against public.

The input drives a ``FuzzedDataProvider`` that builds a value of the types
PROTOCOL.md section 8 maps (and some it does not).  Properties:

- each encoder returns bytes or raises ``TypeError`` (no Erlang term for the
  type) or ``TermError`` (a value that cannot be a term, or nested deeper
  than ``max_depth``); nothing else;
- both encoders give the same bytes, or the same exception type, plain,
  compressed and with a small ``max_depth``; ``encode_frame`` gives the
  length and the same bytes;
- the bytes decode, with both decoders, to a value that re-encodes to the
  same bytes, and to the value itself wherever the mapping is two-way.

Run it with ``python fuzz/run.py encode`` (docs/fuzzing.md).
"""

from __future__ import annotations

from typing import Any

import atheris
from fuzz_common import DECODERS, ENCODERS, same

from sshrpc import Atom, BitString, ImproperList, Map, Pid, Reference, TermError
from sshrpc._codec import encode_frame

_MAX_ITEMS = 40
#: Longest input libFuzzer makes for this target (values grow with the input).
MAX_LEN = 4096


def build(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    """A value chosen by the next input bytes, nested at most 12 deep.

    Containers stop growing when the input runs out, so a value has at most
    about as many items as the input has bytes.
    """
    nested = depth < 12 and fdp.remaining_bytes() > 0
    kind = fdp.ConsumeIntInRange(0, 19 if nested else 11)
    if kind == 0:
        return fdp.ConsumeIntInRange(0, 255)
    if kind == 1:
        return fdp.ConsumeInt(4)
    if kind == 2:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 300))
    if kind == 3:
        return fdp.ConsumeFloat()  # NaN and infinities included: TermError
    if kind == 4:
        return Atom(fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 260)))
    if kind == 5:
        return fdp.PickValueInList([True, False, None])
    if kind == 6:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
    if kind == 7:
        return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 64))
    if kind == 8:
        data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8)) or b"\x00"
        return BitString(data, fdp.ConsumeIntInRange(1, 7))
    if kind == 9:
        return bytearray(fdp.ConsumeBytes(8))
    if kind == 10:
        return fdp.ConsumeIntListInRange(fdp.ConsumeIntInRange(0, 300), 0, 256)
    if kind == 11:
        return fdp.PickValueInList(
            [Pid.new("a@b", 1, 2, 3), Reference.new("a@b", (1, 2, 3)), object(), 1j, {1}]
        )
    count = min(fdp.ConsumeIntInRange(0, _MAX_ITEMS), fdp.remaining_bytes())
    if kind in (12, 13):
        return [build(fdp, depth + 1) for _ in range(count)]
    if kind in (14, 15):
        return tuple(build(fdp, depth + 1) for _ in range(count))
    if kind == 16:
        return ImproperList([build(fdp, depth + 1) for _ in range(count + 1)], build_leaf(fdp))
    pairs = [(build_key(fdp, depth + 1), build(fdp, depth + 1)) for _ in range(count)]
    if kind == 17:
        return Map(pairs)
    try:
        return dict(pairs)
    except TypeError:
        return Map(pairs)


def build_leaf(fdp: atheris.FuzzedDataProvider) -> Any:
    value = build(fdp, 99)
    return value if not isinstance(value, list) else Atom("tail")


def build_key(fdp: atheris.FuzzedDataProvider, depth: int) -> Any:
    value = build(fdp, depth)
    return value if not isinstance(value, bytearray) else bytes(value)


def _encode(encode: Any, value: Any, **kwargs: Any) -> bytes | BaseException:
    try:
        return bytes(encode(value, **kwargs))
    except (TypeError, TermError) as exc:
        return exc


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    options: dict[str, Any] = fdp.PickValueInList(
        [{}, {}, {}, {"compressed": True}, {"compressed": 1}, {"max_depth": 0}, {"max_depth": 3}]
    )
    value = build(fdp)
    results = {name: _encode(encode, value, **options) for name, encode in ENCODERS.items()}
    ref, fast = results["reference"], results["sshrpc"]
    if isinstance(ref, BaseException) or isinstance(fast, BaseException):
        assert type(ref) is type(fast), f"encoders disagree on {value!r}: {ref!r} vs {fast!r}"
        return
    assert ref == fast, f"encoders disagree on {value!r} {options}: {ref!r} vs {fast!r}"
    if not options:
        frame = encode_frame(value)
        assert frame == len(fast).to_bytes(4, "big") + fast, f"encode_frame({value!r})"
    for name, decode in DECODERS.items():
        back = decode(fast)
        plain = ENCODERS["reference"](back)
        assert plain == ENCODERS["reference"](value), f"{name}: {value!r} does not round-trip"
        if _two_way(value):
            assert same(back, value), f"{name}: decode(encode({value!r})) is {back!r}"


def _two_way(value: Any) -> bool:
    """Whether ``decode(encode(value))`` must give ``value`` back exactly.

    Strings become binaries, bytearrays bytes, tuples of bytes lists ints,
    and lists of small ints stay lists; a ``Map`` comes back as a ``dict``
    when a dict can hold it.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind in (str, bytearray, Map):
            return False
        if kind is Atom and item in ("true", "false", "undefined"):
            return False
        if kind is list or kind is tuple:
            stack.extend(item)
        elif kind is dict:
            stack.extend(item.keys())
            stack.extend(item.values())
        elif kind is ImproperList:
            stack.extend(item.items)
            stack.append(item.tail)
    return True


def seeds() -> list[bytes]:
    """A few fixed byte strings; the provider turns any bytes into a value."""
    return [bytes((i + j) % 256 for j in range(64)) for i in range(0, 256, 16)] + [
        b"\xff" * 64,
        b"\x00" * 64,
    ]


if __name__ == "__main__":
    import run

    run.main(["encode", *__import__("sys").argv[1:]])
