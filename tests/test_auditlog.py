"""_auditlog.AuditStream: the text logging would write, once per loop turn."""

from __future__ import annotations

import io
import logging
import re
import threading
import time

import pytest
import trio

from sshrpc._auditlog import LOG_FORMAT, AuditStream
from sshrpc.policy import AUDIT_LOGGER, Auditor, KeyIdentity

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
KEY = KeyIdentity(fingerprint="SHA256:abc", comment="ops@host")


def logging_text(level: int, line: str) -> str:
    """What ``logging.basicConfig(format=LOG_FORMAT)`` writes for ``line``."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger = logging.getLogger("test_auditlog.reference")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        logger.log(level, "%s", line)
    finally:
        logger.removeHandler(handler)
    return out.getvalue().replace("test_auditlog.reference", AUDIT_LOGGER)


def test_same_text_as_logging() -> None:
    out = io.StringIO()
    stream = AuditStream(out, AUDIT_LOGGER)
    for level in (logging.INFO, logging.WARNING, logging.DEBUG):
        stream.write(level, "key=SHA256:abc call m:f/1 outcome=ok duration_ms=0.010")
    ours = out.getvalue().splitlines(keepends=True)
    assert len(ours) == 3
    for level, got in zip((logging.INFO, logging.WARNING, logging.DEBUG), ours, strict=True):
        want = logging_text(level, "key=SHA256:abc call m:f/1 outcome=ok duration_ms=0.010")
        assert STAMP.match(got) and STAMP.match(want)
        assert STAMP.sub("", got) == STAMP.sub("", want)


def test_written_once_per_loop_turn_and_at_the_end() -> None:
    out = io.StringIO()
    stream = AuditStream(out, AUDIT_LOGGER)
    seen: list[str] = []

    async def main() -> None:
        for i in range(3):
            stream.write(logging.INFO, f"line {i}")
        seen.append(out.getvalue())  # nothing yet: the loop has not waited
        await trio.sleep(0)  # one loop turn: before_io_wait writes them
        seen.append(out.getvalue())
        stream.write(logging.INFO, "last")  # the run ends before any wait

    trio.run(main)
    assert seen[0] == ""
    assert [line.split(" ", 4)[-1] for line in seen[1].splitlines()] == [
        "line 0",
        "line 1",
        "line 2",
    ]
    assert out.getvalue().endswith(" last\n")


def test_outside_trio_and_from_threads_written_at_once() -> None:
    out = io.StringIO()
    stream = AuditStream(out, AUDIT_LOGGER)
    stream.write(logging.INFO, "no loop")
    assert out.getvalue().endswith(" no loop\n")
    thread = threading.Thread(target=stream.write, args=(logging.INFO, "thread"))
    thread.start()
    thread.join()
    assert out.getvalue().endswith(" thread\n")


def test_broken_stream_drops_the_line_without_raising() -> None:
    out = io.StringIO()
    out.close()
    AuditStream(out, AUDIT_LOGGER).write(logging.INFO, "lost")


def test_auditor_through_a_stream_escapes_and_rate_limits_as_through_logging() -> None:
    out = io.StringIO()
    stream = AuditStream(out, AUDIT_LOGGER)
    logger = logging.getLogger("test_auditlog.levels")
    logger.setLevel(logging.INFO)  # the logger's level still decides
    auditor = Auditor(write=stream.write, burst=2, clock=lambda: 0.0, logger=logger)
    auditor.record(KEY, "call m:h/0", "ok", 0.0)
    logger.setLevel(logging.WARNING)
    auditor.record(KEY, "call m:hidden/0", "ok", 0.0)
    logger.setLevel(logging.INFO)
    auditor.record(KEY, "call m:f\n/1", "ok", 0.001)
    for _ in range(5):
        auditor.record(KEY, "call m:g/1", "forbidden", 0.0)
    auditor.flush()
    lines = out.getvalue().splitlines()
    assert [STAMP.sub("", x) for x in lines] == [
        "sshrpc.audit INFO key=SHA256:abc call m:h/0 outcome=ok duration_ms=0.000",
        "sshrpc.audit INFO key=SHA256:abc call m:f\\x0a/1 outcome=ok duration_ms=1.000",
        "sshrpc.audit WARNING key=SHA256:abc call m:g/1 outcome=forbidden duration_ms=0.000",
        "sshrpc.audit WARNING key=SHA256:abc call m:g/1 outcome=forbidden duration_ms=0.000"
        " (repeated 4 times)",
    ]


def test_stamps_follow_the_clock_across_milliseconds() -> None:
    """The prefix kept for the last millisecond and level is not reused
    after either changes: every line's stamp is the time of its write."""
    import datetime
    import time

    out = io.StringIO()
    stream = AuditStream(out, AUDIT_LOGGER)
    levels = (logging.INFO,) * 50 + (logging.WARNING,) + (logging.INFO,) * 200_000
    times = []
    start = time.time()
    for n in range(200_000):  # bounded; ends once 5 ms have passed
        before = time.time()
        stream.write(levels[n], f"line {n}")
        times.append((before, time.time()))
        if times[-1][1] - start > 0.005:
            break
    lines = out.getvalue().splitlines()
    assert len(lines) == len(times) > 3
    stamps = set()
    for n, (got, (before, after)) in enumerate(zip(lines, times, strict=True)):
        day, clock, name, level, *_ = got.split(" ")
        assert (name, level) == (AUDIT_LOGGER, logging.getLevelName(levels[n]))
        wall = datetime.datetime.strptime(f"{day} {clock}", "%Y-%m-%d %H:%M:%S,%f").timestamp()
        # (logging's own msecs may read 1 ms low: float rounding)
        assert int(before * 1000) - 1 <= round(wall * 1000) <= int(after * 1000), (n, got)
        stamps.add(wall)
    assert len(stamps) >= 3  # several milliseconds


def test_record_calls_writes_record_requests_lines_timed_at_each_end() -> None:
    """``Auditor.record_calls`` (the node's collected ``ok`` lines): the
    text ``record_request`` writes for each, stamped at each call's end,
    through ``write_requests`` or, without it, ``write`` line by line; none
    while the logger's level hides them; the kept texts stay bounded."""
    import datetime
    import time

    out = io.StringIO()
    stream = AuditStream(out, AUDIT_LOGGER)
    logger = logging.getLogger("test_auditlog.calls")
    logger.setLevel(logging.INFO)
    timed = Auditor(write=stream.write, write_requests=stream.write_requests, logger=logger)
    now = time.perf_counter()
    calls = [
        (("m", "f", 1), now - 2.0, now - 1.5),  # ended 1.5 s ago
        (("m", "g\n", 0), now - 0.002, now - 0.00075),
        (("m", "f", 1), now, now),
    ]
    wall = time.time()
    timed.record_calls(KEY, calls)
    logger.setLevel(logging.WARNING)
    timed.record_calls(KEY, calls[:1])  # hidden by the level
    logger.setLevel(logging.INFO)
    timed.record_calls(KEY, [])
    got = out.getvalue().splitlines()
    assert [STAMP.sub("", x) for x in got] == [
        "sshrpc.audit INFO key=SHA256:abc call m:f/1 outcome=ok duration_ms=500.000",
        "sshrpc.audit INFO key=SHA256:abc call m:g\\x0a/0 outcome=ok duration_ms=1.250",
        "sshrpc.audit INFO key=SHA256:abc call m:f/1 outcome=ok duration_ms=0.000",
    ]
    stamps = [
        datetime.datetime.strptime(" ".join(x.split(" ")[:2]), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for x in got
    ]
    assert abs(stamps[0] - (wall - 1.5)) < 0.05  # its own end, not the hand-over
    assert abs(stamps[2] - wall) < 0.05
    # The same lines as record_request writes, through write alone too.
    plain = io.StringIO()
    untimed = AuditStream(plain, AUDIT_LOGGER)
    reference = io.StringIO()
    by_request = AuditStream(reference, AUDIT_LOGGER)
    Auditor(write=untimed.write, logger=logger).record_calls(KEY, calls)
    requests = Auditor(write=by_request.write, logger=logger)
    for (module, function, arity), start, end in calls:
        requests.record_request(KEY, "call", module, function, arity, "ok", end - start)
    assert [STAMP.sub("", x) for x in plain.getvalue().splitlines()] == [
        STAMP.sub("", x) for x in reference.getvalue().splitlines()
    ]
    assert len(reference.getvalue().splitlines()) == 3
    # Many names and keys: what is kept stays bounded, the lines the same.
    small = Auditor(write=untimed.write, logger=logger, max_entries=8)
    for n in range(40):
        key = KeyIdentity(fingerprint=f"SHA256:k{n % 3}")
        small.record_calls(key, [(("m", f"f{n}", 0), now, now)])
        assert small._ok_count <= 8 and len(small._starts) <= 8
    assert (
        plain.getvalue()
        .splitlines()[-1]
        .endswith("key=SHA256:k0 call m:f39/0 outcome=ok duration_ms=0.000")
    )


def test_write_calls_in_c_writes_exactly_what_write_requests_writes() -> None:
    """``AuditStream.write_calls`` (csrc/pyaudit.c) against the Python of
    ``write_requests``: the same text, byte for byte, for stamps across
    milliseconds, seconds and days and durations of every size (rounding
    included); False, writing nothing, for a name it has no start for."""
    import random

    from sshrpc import _auditlog, c_accelerated

    if not c_accelerated:
        pytest.skip("the C module is not built here")
    assert _auditlog._format_calls is not None
    rng = random.Random(7)
    starts = {
        ("m", "f", n): f"key=SHA256:é{n} call m:f/{n} outcome=ok duration_ms=" for n in range(5)
    }
    offset = time.time() - time.perf_counter()
    base = time.perf_counter()
    calls = []
    for i in range(3000):
        end = base + rng.choice([i * 0.0004, i * 0.37, 86400.0 * i, rng.random()])
        duration = rng.choice(
            [0.0, 1e-9, 0.0000005, 0.0000015, 0.0012345, rng.random() * 10, 12345.678, 1e-7 * i]
        )
        calls.append((("m", "f", i % 5), end - duration, end))
    c_out, py_out = io.StringIO(), io.StringIO()
    assert AuditStream(c_out, AUDIT_LOGGER).write_calls(logging.INFO, calls, starts, offset)
    py = AuditStream(py_out, AUDIT_LOGGER)
    py.write_requests(
        logging.INFO, [(starts[name], end - start, end + offset) for name, start, end in calls]
    )
    c_text, py_text = c_out.getvalue(), py_out.getvalue()
    assert c_text.count("\n") == 3000
    assert c_text == py_text
    missing = io.StringIO()
    stream = AuditStream(missing, AUDIT_LOGGER)
    assert not stream.write_calls(
        logging.INFO, [*calls[:3], (("m", "g", 0), 1.0, 2.0)], starts, 0.0
    )
    stream.flush()
    assert missing.getvalue() == ""
