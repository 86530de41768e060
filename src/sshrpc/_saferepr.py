"""Bounded text for peer data in error messages and log lines.  No I/O.

``repr`` is the wrong tool for a value a peer sent: an integer of more than
4300 digits raises ``ValueError`` (Python's int-to-str limit), a term nested
thousands deep or holding a million items makes text as big as itself, and a
hostile object's ``__repr__`` may raise anything.  ``safe_repr`` walks the
value itself, with a budget of characters, items and depth, and never raises.
``clean`` makes any text safe for one log line.
"""

from __future__ import annotations

from typing import Any

__all__ = ["clean", "safe_repr"]

#: Default size of ``safe_repr`` text.
LIMIT = 200
#: Containers deeper than this show as ``...``.
MAX_DEPTH = 12
#: Integers with more bits than this show as ``<int of N bits>``.
MAX_INT_BITS = 4096


class _Full(Exception):
    pass


class _Out:
    __slots__ = ("limit", "parts", "size")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0

    def add(self, text: str) -> None:
        room = self.limit - self.size
        if len(text) > room:
            self.parts.append(text[: max(room, 0)])
            self.size = self.limit
            raise _Full
        self.parts.append(text)
        self.size += len(text)


def _scalar(value: Any) -> str | None:
    """Text for a value that is not a container, or None for a container."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            return f"<int of {value.bit_length()} bits>"
        return int.__repr__(value)
    if isinstance(value, float):
        return float.__repr__(value)
    if isinstance(value, str):
        # Atom (a str subclass) keeps its name; long text is cut before repr.
        text = str.__repr__(str.__str__(value)[: LIMIT * 4])
        return f"Atom({text})" if type(value).__name__ == "Atom" else text
    if isinstance(value, bytes | bytearray | memoryview):
        return repr(bytes(value[: LIMIT * 4]))
    if isinstance(value, list | tuple | dict):
        return None
    try:
        text = repr(value)
    except Exception:
        return f"<{type(value).__name__} object (repr failed)>"
    if not isinstance(text, str):
        return f"<{type(value).__name__} object>"
    return text[: LIMIT * 4]


def _walk(value: Any, out: _Out, depth: int) -> None:
    text = _scalar(value)
    if text is not None:
        out.add(text)
        return
    if depth >= MAX_DEPTH:
        out.add("...")
        return
    if isinstance(value, dict):
        out.add("{")
        for n, (k, v) in enumerate(value.items()):
            if n:
                out.add(", ")
            _walk(k, out, depth + 1)
            out.add(": ")
            _walk(v, out, depth + 1)
        out.add("}")
        return
    opener, closer = ("[", "]") if isinstance(value, list) else ("(", ")")
    out.add(opener)
    for n, item in enumerate(value):
        if n:
            out.add(", ")
        _walk(item, out, depth + 1)
    if isinstance(value, tuple) and len(value) == 1:
        out.add(",")
    out.add(closer)


def safe_repr(value: Any, limit: int = LIMIT) -> str:
    """A ``repr``-like text of ``value`` of at most ``limit`` characters.

    Never raises: huge integers show as ``<int of N bits>``, containers
    deeper than ``MAX_DEPTH`` as ``...``, an object whose ``repr`` fails as
    ``<Type object (repr failed)>``; text past ``limit`` is cut and ends in
    ``...``.  The result holds no control characters (see ``clean``), so it
    cannot break a log line.  Costs O(limit), whatever the size of ``value``.
    """
    limit = max(limit, 8)
    out = _Out(limit + 1)
    try:
        _walk(value, out, 0)
    except _Full:
        pass
    except Exception:  # this helper must not raise
        out.parts.append(" <unprintable>")
    text = clean("".join(out.parts))
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def clean(text: str, limit: int | None = None) -> str:
    """``text`` with every non-printable character (control characters,
    line and paragraph separators, ...) and the backslash escaped, so that a
    value cannot start a new log line or forge a field; cut to ``limit``
    characters (ending in ``...``) when given."""
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 3, 0)] + "..."
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(
                f"\\x{code:02x}"
                if code < 0x100
                else f"\\u{code:04x}"
                if code < 0x10000
                else f"\\U{code:08x}"
            )
    return "".join(out)
