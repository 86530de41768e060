"""The client's per-request builtins (csrc/pyreq.c, through sshrpc._reqc):
the same requests and effects as the Python path, and clear errors for bad
arguments.  No I/O."""

from __future__ import annotations

import gc
import struct
from typing import Any

import pytest

from sshrpc import Atom, _reqc
from sshrpc._accel import encode_frame
from sshrpc._request import CallSlots, Request, RequestSet, _PyRequestFields

if _reqc.fields is None:  # (one skip for the module: every test here is of the C builtins)
    pytest.skip("the C module is not in use (pure-Python mode)", allow_module_level=True)

FIELDS = _PyRequestFields.__slots__
A = Atom


class Conn:
    """What ``new_requests`` needs of a connection."""

    def __init__(self) -> None:
        self._pending: dict[int, Request] = {}


def _fields(req: Request) -> dict[str, Any]:
    return {name: getattr(req, name) for name in FIELDS}


def test_new_requests_match_the_python_path() -> None:
    conn, slots, into = Conn(), CallSlots(10), RequestSet()
    made = _reqc.new_requests(
        Request, [5, 6], conn, slots, into, ["a", "b"], conn._pending, into._requests
    )
    for req, (i, label) in zip(made, [(5, "a"), (6, "b")], strict=True):
        want = Request(i, conn, label)  # type: ignore[arg-type]
        want.slot, want._owner = slots, into
        assert type(req) is Request and _fields(req) == _fields(want)
        assert conn._pending[i] is req and req in into._requests
    assert repr(made[0]) == "<sshrpc.Request id=5 label='a' open>"
    # Without labels or a set.
    (req,) = _reqc.new_requests(Request, [7], conn, None, None, None, conn._pending, None)
    assert req.label is None and req._owner is None and req.slot is None and not req.counted


def test_new_requests_refuses_bad_arguments() -> None:
    conn = Conn()
    with pytest.raises(TypeError, match="new_requests"):
        _reqc.new_requests(Request, (1,), conn, None, None, None, conn._pending, None)
    with pytest.raises(TypeError, match="subclass RequestFields"):
        _reqc.new_requests(object, [1], conn, None, None, None, conn._pending, None)
    with pytest.raises(ValueError, match="fewer labels"):
        _reqc.new_requests(Request, [1, 2], conn, None, None, ["a"], conn._pending, None)
    assert conn._pending == {}


def test_a_request_is_collected_with_its_cycle() -> None:
    conn = Conn()
    (req,) = _reqc.new_requests(Request, [1], conn, None, None, None, conn._pending, None)
    req.value = req  # a cycle through a C field
    del req, conn
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is Request and o.value is o]


def _open(
    conn: Conn, ids: list[int], slots: CallSlots | None, into: RequestSet | None
) -> list[Request]:
    members = into._requests if into is not None else None
    return _reqc.new_requests(Request, ids, conn, slots, into, None, conn._pending, members)  # type: ignore[no-any-return]


def test_finish_replies_does_what_the_read_loop_does() -> None:
    conn, slots, into = Conn(), CallSlots(4), RequestSet()
    slots.free -= 3
    reqs = _open(conn, [1, 2, 3], slots, into)
    reqs[1].counted = True  # (a call's answer)
    reqs[2]._task = task = object()  # type: ignore[assignment]
    terms = [(A("reply"), 1, "one"), (A("reply"), 2, "two"), (A("reply"), 3, "three")]
    done: list[Request] = []
    tasks: list[Any] = []
    stop, freed, counted, owner = _reqc.finish_replies(terms, 0, conn._pending, slots, done, tasks)
    assert (stop, freed, counted, owner) == (3, 3, 1, into)
    assert done == reqs and tasks == [task] and conn._pending == {}
    for req, value in zip(reqs, ["one", "two", "three"], strict=True):
        assert req.done and req.ok and req.value == value
        assert req.slot is None and req._task is None


def test_finish_replies_stops_where_the_read_loop_must_decide() -> None:
    conn, slots = Conn(), CallSlots(8)
    a, b = RequestSet(), RequestSet()
    reqs = _open(conn, [1, 2], slots, a) + _open(conn, [3], slots, b)
    reqs += _open(conn, [4], CallSlots(1), None)  # another slot counter
    reqs += _open(conn, [5], None, None)
    reqs[4].chunk_event = object()  # type: ignore[assignment]  # (a stream)
    terms: list[Any] = [(A("reply"), i, i) for i in (1, 2, 3, 4, 5)]
    done: list[Request] = []
    # A second set stops the run (its owner differs), as does anything
    # but a 3-tuple, a request with another slot counter or a stream.
    assert _reqc.finish_replies(terms, 0, conn._pending, slots, done, [])[:2] == (2, 2)
    assert _reqc.finish_replies(terms, 2, conn._pending, slots, [], [])[0] == 3
    assert _reqc.finish_replies(terms, 3, conn._pending, slots, [], [])[0] == 3
    assert _reqc.finish_replies(terms, 4, conn._pending, None, [], [])[0] == 4
    assert sorted(conn._pending) == [4, 5]
    assert _reqc.finish_replies(["x", (1, 2)], 0, conn._pending, None, [], [])[0] == 0
    # An id that is not open (the core checks before): left to the caller.
    assert _reqc.finish_replies([(A("reply"), 99, 0)], 0, {}, None, [], [])[0] == 0
    with pytest.raises(TypeError, match="finish_replies"):
        _reqc.finish_replies((), 0, {}, None, [], [])


def test_take_answers_takes_the_leading_ok_answers() -> None:
    conn, into = Conn(), RequestSet()
    reqs = _open(conn, [1, 2, 3], None, into)
    for req in reqs:
        req.ok, req.value, req.label = True, req.id * 10, f"l{req.id}"
    reqs[2].ok = False
    assert _reqc.take_answers(reqs, into._requests, 5) == [("l1", 10), ("l2", 20)]
    assert into._requests == {reqs[2]}
    assert reqs[0].received and reqs[0]._owner is None and reqs[2]._owner is into
    assert _reqc.take_answers(reqs[2:], into._requests, 5) == []
    with pytest.raises(TypeError, match="take_answers"):
        _reqc.take_answers(reqs, [], 1)


def _frame(term: Any) -> bytes:
    return encode_frame(term)


def test_batch_frames_joins_the_leading_small_plain_frames() -> None:
    frames = [_frame((A("reply"), i, b"v")) for i in range(3)]
    chunk = b"".join(frames)
    batch, count, end = _reqc.batch_frames(chunk, 0, 1000, 1 << 20)
    assert (count, end) == (3, len(chunk))
    assert batch == b"\x83l" + struct.pack(">I", 3) + b"".join(f[5:] for f in frames) + b"j"
    # From an offset; a keepalive, a frame above `small` or `max_frame`,
    # a compressed one, an incomplete one: stops before it.
    assert _reqc.batch_frames(chunk, len(frames[0]), 1000, 1 << 20)[1:] == (2, len(chunk))
    for stopper in (
        b"\0\0\0\0",
        _frame(b"x" * 2000),
        b"\0\0\0\x06\x83P\0\0\0\0",
    ):
        got = _reqc.batch_frames(frames[0] + frames[1] + stopper + frames[2], 0, 1000, 1 << 20)
        assert got[1:] == (2, len(frames[0]) + len(frames[1]))
    got = _reqc.batch_frames(chunk[:-1], 0, 1000, 1 << 20)
    assert got[1:] == (2, len(frames[0]) + len(frames[1]))
    # One frame: nothing joined (the caller takes it as it is).
    assert _reqc.batch_frames(frames[0], 0, 1000, 1 << 20) == (None, 1, 0)
    assert _reqc.batch_frames(frames[0], 0, 1000, 4)[1:] == (0, 0)
    assert _reqc.batch_frames(b"", 0, 1000, 4) == (None, 0, 0)
    with pytest.raises(ValueError, match="pos"):
        _reqc.batch_frames(chunk, len(chunk) + 1, 1000, 1 << 20)
    with pytest.raises(TypeError, match="batch_frames"):
        _reqc.batch_frames(bytearray(chunk), 0, 1000, 1 << 20)
