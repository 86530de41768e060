"""_auditlog.AuditStream: the text logging would write, once per loop turn."""

from __future__ import annotations

import io
import logging
import re
import threading

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
