"""Audit lines straight to a text stream, written once per turn of the Trio loop.

A ``logging`` record costs about 15 µs to make, format and write, and the
node writes one audit line per call: profiles of ``sshrpc serve`` at 64
calls in flight put half of the node's CPU there.  ``sshrpc serve`` and
``sshrpc node`` therefore hand their ``Auditor`` an ``AuditStream``: lines
are formatted as ``logging.basicConfig(format=LOG_FORMAT)`` formats them (the
same text as before, byte for byte), collected, and written together with
one ``write`` and ``flush`` just before the Trio loop waits for I/O (a Trio
instrument's ``before_io_wait``), and when the run ends.  A line thus waits
at most for the tasks that are runnable at the same time, never for I/O.

The audit logger's level still decides which lines exist (``Auditor``
checks it).  Lines of other loggers go through ``logging`` at once, so
within one loop turn they may appear before audit lines of the same turn.
Outside a Trio run (e.g. from a worker thread) a line is written at once.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

import trio

#: The format ``sshrpc`` configures for its log (``cli.main``).
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def _install_format_calls() -> Callable[..., str | None] | None:
    """``format_calls`` (csrc/pyaudit.c), or None without the C module (or
    with ``SSHRPC_PURE_PYTHON`` set, or an older build)."""
    if sys.implementation.name != "cpython" or os.environ.get("SSHRPC_PURE_PYTHON", "") not in (
        "",
        "0",
    ):
        return None
    try:
        from ._sshrpc_c import ffi, lib
    except ImportError:
        return None
    install = getattr(lib, "sshrpc_pyaudit_install", None)
    target: dict[str, Any] = {}
    if install is None or install(ffi.cast("void *", id(target))):
        return None  # pragma: no cover - a stale build, out of memory at import
    return target["format_calls"]  # type: ignore[no-any-return]


#: ``format_calls(calls, starts, offset, tail)``: the text of
#: ``AuditStream.write_calls``'s lines in one C call, or None (see there).
_format_calls = _install_format_calls()


class AuditStream(trio.abc.Instrument):
    """``write(level, line)`` for ``Auditor``; see the module docstring.
    Never raises for a closed or broken stream (the line is dropped)."""

    def __init__(self, stream: TextIO, name: str) -> None:
        self.stream = stream
        self.name = name
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._installed_in: object = None
        self._thread = 0  # the thread of that run
        self._stamp: tuple[int, str] = (-1, "")
        self._last: tuple[int, int, int, str] = (-1, -1, -1, "")
        self._tails: dict[int, str] = {}

    def _new_prefix(self, second: int, msecs: int, level: int) -> str:
        """The text ``logging`` puts before a line of ``level`` at that time."""
        stamp = self._stamp
        if stamp[0] != second:
            stamp = self._stamp = (
                second,
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)),
            )
        text = f"{stamp[1]},{msecs:03d} {self.name} {logging.getLevelName(level)} "
        self._last = (msecs, second, level, text)
        return text

    def write(self, level: int, line: str) -> None:
        now = time.time()
        second = int(now)
        msecs = int((now - second) * 1000)
        # The same millisecond and level as the line before (dozens of
        # lines per millisecond under load): the same prefix, not rebuilt.
        # (One tuple each, so that a worker thread's line cannot mix two.)
        last = self._last
        if last[0] == msecs and last[1] == second and last[2] == level:
            text = f"{last[3]}{line}\n"
        else:
            text = f"{self._new_prefix(second, msecs, level)}{line}\n"
        self._add([text])

    def write_requests(self, level: int, items: list[tuple[str, float, float]]) -> None:
        """``write(level, f"{start}{duration * 1000.0:.3f}")`` for each
        ``(start, duration, when)`` of ``items`` in order (an audit line of
        a request and its duration in seconds), each stamped with its
        ``when`` (a ``time.time()``) instead of now: lines the caller
        collected as they happened."""
        texts = []
        last = self._last
        for start, duration, now in items:
            second = int(now)
            msecs = int((now - second) * 1000)
            if last[0] != msecs or last[1] != second or last[2] != level:
                last = (msecs, second, level, self._new_prefix(second, msecs, level))
            texts.append(f"{last[3]}{start}{duration * 1000.0:.3f}\n")
        self._add(texts)

    def write_calls(
        self,
        level: int,
        calls: list[tuple[Any, float, float]],
        starts: dict[Any, str],
        offset: float,
    ) -> bool:
        """``write_requests(level, [(starts[name], end - start, end +
        offset) for name, start, end in calls])`` -- the same text -- in
        one C call (csrc/pyaudit.c); False (nothing written) where that
        cannot: without the C module, when a name is not in ``starts``."""
        if _format_calls is None:
            return False
        tail = self._tails.get(level)
        if tail is None:
            tail = self._tails[level] = f" {self.name} {logging.getLevelName(level)} "
        text = _format_calls(calls, starts, offset, tail)
        if text is None:
            return False
        self._add([text])
        return True

    def _add(self, texts: list[str]) -> None:
        """Collect ``texts`` for the next ``flush`` (at once outside a run)."""
        if self._installed_in is not None and threading.get_ident() == self._thread:
            # In the run this is installed in (``after_run`` resets it).
            with self._lock:
                self._lines += texts
            return
        try:
            run = trio.lowlevel.current_root_task()
        except RuntimeError:
            run = None
        if run is None:
            with self._lock:
                self._lines += texts
            self.flush()
            return
        if self._installed_in is not run:
            trio.lowlevel.add_instrument(self)
            self._installed_in = run
            self._thread = threading.get_ident()
        with self._lock:
            self._lines += texts

    def flush(self) -> None:
        """Write the collected lines now."""
        with self._lock:
            if not self._lines:
                return
            text = "".join(self._lines)
            self._lines.clear()
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                pass

    # Trio instrument hooks
    def before_io_wait(self, timeout: float) -> None:
        self.flush()

    def after_run(self) -> None:
        self.flush()
        self._installed_in = None
