"""The large-binary encode path (src/sshrpc/_bulk.py) writes exactly the
reference codec's bytes (hypothesis), raises the reference's errors (it
declines, and the usual path raises), and ``tune_malloc`` only raises the
settings it makes.  No I/O."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sshrpc import _bulk, _codec, _etf
from sshrpc._errors import TermError
from sshrpc._types import Atom

BIG = _bulk.BIG


def _binary(n: int, fill: int) -> bytes:
    return bytes([fill]) * n


big_sizes = st.sampled_from([BIG - 1, BIG, BIG + 1, 3 * BIG + 7])
big_binaries = st.builds(_binary, big_sizes, st.integers(0, 255))
leaves = st.one_of(
    st.integers(-(2**70), 2**70),
    st.binary(max_size=40),
    st.text(max_size=10),
    st.sampled_from([Atom("ok"), Atom("x" * 255), None, True, 1.5]),
    st.dictionaries(st.integers(0, 9), st.integers(), max_size=3),
    st.lists(st.integers(0, 255), max_size=5),
    big_binaries,
    big_binaries.map(bytearray),
)
terms = st.recursive(
    leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=6), st.lists(inner, max_size=6).map(tuple)),
    max_leaves=12,
)


def _reference_frame(term: Any) -> bytes:
    payload = _etf.encode(term)
    return len(payload).to_bytes(4, "big") + payload


@settings(max_examples=150, deadline=None)
@given(terms)
def test_same_bytes_as_the_reference(term: Any) -> None:
    expected = _etf.encode(term)
    assert _codec.encode(term) == expected
    assert _codec.encode_frame(term) == _reference_frame(term)
    direct = _bulk.encode_big(term, _etf.DEFAULT_MAX_DEPTH, 0, _codec.encode)
    assert direct is None or direct == expected
    framed = _bulk.encode_big(term, _etf.DEFAULT_MAX_DEPTH, 4, _codec.encode)
    assert framed is None or framed == _reference_frame(term)


@pytest.mark.parametrize(
    "term",
    [
        _binary(BIG, 1),
        [_binary(BIG, 2)],
        (Atom("reply"), 7, _binary(5 * BIG, 3)),
        (Atom("call"), 1, Atom("m"), Atom("f"), [_binary(BIG, 4), b"x", 1], {Atom("t"): 5}),
        [[[(_binary(BIG, 5),)]]],
        bytearray(_binary(BIG + 3, 6)),
    ],
)
def test_large_binaries_take_the_path(term: Any) -> None:
    """The shapes large data has in calls and answers are encoded here (not
    handed on), with the reference's bytes."""
    got = _bulk.encode_big(term, _etf.DEFAULT_MAX_DEPTH, 4, _codec.encode)
    assert got is not None and got == _reference_frame(term)


def test_out_of_reach_or_small_is_handed_on() -> None:
    big = _binary(BIG, 0)
    for term in ([[[[[big]]]]], [0] * (_bulk.WIDTH) + [big], [_binary(BIG - 1, 0)], {1: big}):
        assert _bulk.encode_big(term, _etf.DEFAULT_MAX_DEPTH, 0, _codec.encode) is None
        assert _codec.encode(term) == _etf.encode(term)


def test_errors_are_the_reference_errors() -> None:
    """A value with no term, or nesting past ``max_depth``, next to a large
    binary: the path declines and the usual path raises the reference's
    error; nothing half-encoded is returned."""
    big = _binary(BIG, 9)
    bad = [big, object()]
    assert _bulk.encode_big(bad, _etf.DEFAULT_MAX_DEPTH, 0, _codec.encode) is None
    with pytest.raises(TypeError) as ours:
        _codec.encode(bad)
    with pytest.raises(TypeError) as theirs:
        _etf.encode(bad)
    assert str(ours.value) == str(theirs.value)
    deep = [[[big]]]
    for limit in (0, 1, 2):
        assert _bulk.encode_big(deep, limit, 0, _codec.encode) is None
        with pytest.raises(TermError) as ours_t:
            _codec.encode(deep, max_depth=limit)
        with pytest.raises(TermError) as theirs_t:
            _etf.encode(deep, max_depth=limit)
        assert str(ours_t.value) == str(theirs_t.value)
    assert _codec.encode(deep, max_depth=3) == _etf.encode(deep, max_depth=3)
    inner_deep = [big, [[[1, 2, 300]]]]
    assert _bulk.encode_big(inner_deep, 3, 0, _codec.encode) is None
    with pytest.raises(TermError) as ours_t:
        _codec.encode(inner_deep, max_depth=3)
    with pytest.raises(TermError) as theirs_t:
        _etf.encode(inner_deep, max_depth=3)
    assert str(ours_t.value) == str(theirs_t.value)


def test_tune_malloc_leaves_default_frames_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_bulk, "_kept", 0)
    assert _bulk.tune_malloc(1 << 20) is False
    assert _bulk._kept == 0
    monkeypatch.setenv("SSHRPC_NO_MALLOC_TUNING", "1")
    assert _bulk.tune_malloc(64 << 20) is False
    assert _bulk._kept == 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 400_000), min_size=1, max_size=12),
    st.sampled_from([BIG - 1, 70_000, 300_000, 1 << 20]),
)
def test_large_frames_reassemble_from_any_reads(cuts: list[int], size: int) -> None:
    """A large frame's buffer is reserved at its exact size once its header
    is in (csrc/framing.c): the C buffer hands out what the pure-Python one
    does, for any read sizes, with small frames and keepalives around it."""
    from sshrpc._framing import FrameBuffer
    from sshrpc._pyframing import FrameBuffer as PyFrameBuffer

    big = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    stream = b"\0\0\0\0" + len(big).to_bytes(4, "big") + big + b"\0\0\0\x03abc" + b"\0\0\0\0"
    stream += len(big).to_bytes(4, "big") + big
    ours, theirs = FrameBuffer(1 << 21), PyFrameBuffer(1 << 21)
    got: list[bytes] = []
    expected: list[bytes] = []
    at = 0
    for cut in [*cuts, len(stream)]:
        piece = stream[at : at + cut]
        at += len(piece)
        ours.feed(piece)
        theirs.feed(piece)
        while (frame := ours.next_frame()) is not None:
            got.append(frame)
        while (frame := theirs.next_frame()) is not None:
            expected.append(frame)
        if at >= len(stream):
            break
    assert got == expected == [big, b"abc", big]
    assert ours.buffered == 0


def _client() -> Any:
    from sshrpc import protocol as _p

    client = _p.Connection(_p.Role.CLIENT, max_frame=1 << 24)
    server = _p.Connection(_p.Role.SERVER, max_frame=1 << 24, node="n", session=None)
    server.receive_data(client.send(client.hello()))
    server.next_event()
    client.receive_data(server.send(server.hello()))
    client.next_event()
    return client


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.one_of(leaves, big_binaries), min_size=1, max_size=4),
    st.one_of(st.none(), st.integers(0, 2**40)),
    st.integers(0, 2**27 - 1),
)
def test_send_call_with_large_binaries_same_bytes(args: list[Any], timeout: Any, id: int) -> None:
    """``send_call``'s large-binary frame (a ``bytearray`` joined once) is
    the frame the general ``send(Call(...))`` writes."""
    from sshrpc import protocol as _p

    fast = _client().send_call(id, "m", "f", args, timeout)
    slow = _client().send(
        _p.Call(id=id, module=Atom("m"), function=Atom("f"), args=list(args), timeout=timeout)
    )
    assert bytes(fast) == slow


def test_send_call_too_large_sends_nothing() -> None:
    from sshrpc._errors import MessageTooLarge

    client = _client()
    client._send_limit = 3 * BIG
    with pytest.raises(MessageTooLarge):
        client.send_call(1, "m", "f", [_binary(3 * BIG, 1)])
    assert 1 not in client.open_ids
    frame = client.send_call(1, "m", "f", [_binary(2 * BIG, 1)])
    assert type(frame) is bytearray and 1 in client.open_ids


def test_large_frame_in_its_payload_object_bounds() -> None:
    """Step 3 of src/sshrpc/_framing.py: ``buffered`` counts what arrived,
    a ``max_frame`` lowered below the frame being filled ends the stream
    with ``FrameTooLarge`` (after the frames before it), and the payload is
    an exact ``bytes`` equal to what was sent."""
    from sshrpc import FrameTooLarge
    from sshrpc._framing import BIG_FRAME, FrameBuffer

    payload = bytes(range(256)) * (BIG_FRAME // 256 + 3)
    frame = len(payload).to_bytes(4, "big") + payload
    fb = FrameBuffer(4 * BIG_FRAME)
    fb.feed(b"\0\0\0\x02hi" + frame[:1000])
    assert fb.next_frame() == b"hi"
    assert fb.next_frame() is None
    fb.feed(frame[1000:500_000])
    assert fb.next_frame() is None
    assert fb.buffered == 500_000
    fb.feed(frame[500_000:] + b"\0\0\0\x01!")
    got = fb.next_frame()
    assert type(got) is bytes and got == payload
    assert fb.next_frame() == b"!" and fb.next_frame() is None and fb.buffered == 0

    fb = FrameBuffer(4 * BIG_FRAME)
    fb.feed(frame[:300_000])
    assert fb.next_frame() is None
    fb.max_frame = BIG_FRAME
    with pytest.raises(FrameTooLarge):
        fb.next_frame()
    fb.feed(frame[300_000:])
    with pytest.raises(FrameTooLarge):
        fb.next_frame()
