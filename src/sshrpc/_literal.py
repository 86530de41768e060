"""Erlang term literals (text) <-> Python values, for the command line.  No I/O, no eval.

``parse`` reads one Erlang term as written in Erlang source, with a small
hand-written parser (nothing is evaluated):

- integers ``42``, ``-7``, ``16#ff``, characters ``$a``; floats ``1.5``,
  ``-2.0e-3``; bignums of any size;
- atoms ``ok``, ``'Quoted atom'`` -> ``sshrpc.Atom``; ``true``/``false`` ->
  ``bool``, ``undefined`` -> ``None`` (PROTOCOL.md section 8);
- binaries ``<<"text">>``, ``<<"text"/utf8>>``, ``<<1,2,3>>``, ``<<>>``;
- tuples ``{a, 1}``, lists ``[1, 2]``, improper lists ``[1 | 2]``,
  maps ``#{a => 1}``;
- strings ``"abc"`` are Erlang strings: *lists of character codes*
  (``[97,98,99]``), exactly as in Erlang.  Write ``<<"abc">>`` for a binary,
  which is what Python services receive as ``bytes``.

``format`` writes a value the way Erlang's ``io:format("~p")`` would (lists of
integers are always shown as lists, never as strings).  ``parse(format(v))``
gives back ``v`` for every value the parser can express.

``LiteralError`` (a ``ValueError``) says what was wrong and at which column.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ._types import Atom, BitString, ImproperList, Map, Opaque, Pid

__all__ = ["LiteralError", "format_term", "parse"]

#: Nesting deeper than this is refused: command-line terms are small, and the
#: recursive parser must stay well inside Python's recursion limit.
MAX_DEPTH = 500


class LiteralError(ValueError):
    """Text that is not one Erlang term literal.  ``column`` is 1-based."""

    def __init__(self, message: str, text: str, pos: int) -> None:
        super().__init__(f"{message} at column {pos + 1}: {text!r}")
        self.column = pos + 1


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|%[^\n]*)
  | (?P<float>-?\d+\.\d+(?:[eE][+-]?\d+)?)
  | (?P<based>-?\d{1,2}\#[0-9a-zA-Z]+)
  | (?P<int>-?\d+)
  | (?P<char>\$(?:\\(?:x\{[0-9a-fA-F]+\}|x[0-9a-fA-F]{2}|[0-7]{1,3}|\^.|.)|.))
  | (?P<atom>[a-z][a-zA-Z0-9_@]*)
  | (?P<qatom>'(?:[^'\\]|\\.)*')
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<var>[A-Z_][a-zA-Z0-9_@]*)
  | (?P<punct><<|>>|=>|\#\{|[{}\[\],|/:])
    """,
    re.VERBOSE | re.DOTALL,
)

_ESCAPES = {
    "b": "\b",
    "d": "\x7f",
    "e": "\x1b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "s": " ",
    "t": "\t",
    "v": "\v",
}


def _unescape(body: str, text: str, pos: int) -> str:
    out: list[str] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        i += 1
        if i >= len(body):
            raise LiteralError("unfinished escape", text, pos)
        c = body[i]
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
            i += 1
        elif c in "01234567":
            m = re.match(r"[0-7]{1,3}", body[i:])
            assert m is not None
            out.append(chr(int(m.group(), 8)))
            i += len(m.group())
        elif c == "x":
            m = re.match(r"x\{([0-9a-fA-F]+)\}|x([0-9a-fA-F]{2})", body[i:])
            if m is None:
                raise LiteralError("bad \\x escape", text, pos)
            code = int(m.group(1) or m.group(2), 16)
            if code > 0x10FFFF:
                raise LiteralError("character code out of range", text, pos)
            out.append(chr(code))
            i += len(m.group())
        elif c == "^" and i + 1 < len(body):
            out.append(chr(ord(body[i + 1]) % 32))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                raise LiteralError(f"unexpected character {text[pos]!r}", text, pos)
            kind = m.lastgroup
            assert kind is not None
            if kind != "ws":
                self.tokens.append((kind, m.group(), pos))
            pos = m.end()
        self.i = 0

    def error(self, message: str) -> LiteralError:
        pos = self.tokens[self.i][2] if self.i < len(self.tokens) else len(self.text)
        return LiteralError(message, self.text, pos)

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str, int]:
        token = self.peek()
        if token is None:
            raise self.error("unexpected end of input")
        self.i += 1
        return token

    def expect(self, value: str) -> None:
        kind, got, _ = self.take()
        if got != value or kind not in ("punct",):
            self.i -= 1
            raise self.error(f"expected {value!r}, found {got!r}")

    def at(self, value: str) -> bool:
        token = self.peek()
        return token is not None and token[0] == "punct" and token[1] == value

    def term(self, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise self.error(f"nesting deeper than {MAX_DEPTH}")
        kind, value, pos = self.take()
        if kind == "int":
            return int(value)
        if kind == "based":
            base_text, _, digits = value.partition("#")
            sign = -1 if base_text.startswith("-") else 1
            base = abs(int(base_text))
            if not 2 <= base <= 36:
                raise LiteralError("base must be 2..36", self.text, pos)
            try:
                return sign * int(digits, base)
            except ValueError:
                raise LiteralError(f"bad digits for base {base}", self.text, pos) from None
        if kind == "float":
            return float(value)
        if kind == "char":
            body = _unescape(value[1:], self.text, pos)
            if len(body) != 1:
                raise LiteralError("bad character literal", self.text, pos)
            return ord(body)
        if kind == "atom":
            if len(value) > 255:
                raise LiteralError("atom longer than 255 characters", self.text, pos)
            return _atom_value(value)
        if kind == "qatom":
            name = _unescape(value[1:-1], self.text, pos)
            if len(name) > 255:
                raise LiteralError("atom longer than 255 characters", self.text, pos)
            return _atom_value(name)
        if kind == "string":
            chars = _unescape(value[1:-1], self.text, pos)
            # Adjacent strings concatenate, as in Erlang source.
            while (nxt := self.peek()) is not None and nxt[0] == "string":
                self.i += 1
                chars += _unescape(nxt[1][1:-1], self.text, nxt[2])
            return [ord(c) for c in chars]
        if kind == "var":
            raise LiteralError(
                f"{value!r} is a variable; quote it to make an atom ('{value}')",
                self.text,
                pos,
            )
        if value == "{":
            return tuple(self.sequence("}", depth))
        if value == "[":
            items: list[Any] = []
            if self.at("]"):
                self.take()
                return items
            items.append(self.term(depth + 1))
            while self.at(","):
                self.take()
                items.append(self.term(depth + 1))
            if self.at("|"):
                self.take()
                tail = self.term(depth + 1)
                self.expect("]")
                if isinstance(tail, list):
                    return items + tail
                if isinstance(tail, ImproperList):
                    return ImproperList(items + list(tail.items), tail.tail)
                return ImproperList(items, tail)
            self.expect("]")
            return items
        if value == "#{":
            pairs: list[tuple[Any, Any]] = []
            if not self.at("}"):
                while True:
                    key = self.term(depth + 1)
                    self.expect("=>")
                    pairs.append((key, self.term(depth + 1)))
                    if not self.at(","):
                        break
                    self.take()
            self.expect("}")
            try:
                as_dict = dict(pairs)
            except TypeError:
                return Map(pairs)
            return as_dict if len(as_dict) == len(pairs) else Map(pairs)
        if value == "<<":
            return self.binary()
        self.i -= 1
        raise self.error(f"unexpected {value!r}")

    def sequence(self, close: str, depth: int) -> list[Any]:
        items: list[Any] = []
        if self.at(close):
            self.take()
            return items
        items.append(self.term(depth + 1))
        while self.at(","):
            self.take()
            items.append(self.term(depth + 1))
        self.expect(close)
        return items

    def binary(self) -> bytes:
        out = bytearray()
        if self.at(">>"):
            self.take()
            return bytes(out)
        while True:
            kind, value, pos = self.take()
            if kind == "string":
                text = _unescape(value[1:-1], self.text, pos)
                utf8 = False
                if self.at("/"):
                    self.take()
                    _, spec, spos = self.take()
                    if spec != "utf8":
                        raise LiteralError(f"unsupported type {spec!r}", self.text, spos)
                    utf8 = True
                if utf8:
                    out += text.encode("utf-8")
                else:
                    if any(ord(c) > 255 for c in text):
                        raise LiteralError(
                            'characters above 255 need /utf8: <<"..."/utf8>>', self.text, pos
                        )
                    out += text.encode("latin-1")
            elif kind in ("int", "char", "based"):
                self.i -= 1
                byte = self.term()
                if not 0 <= byte <= 255:
                    byte &= 0xFF  # Erlang truncates a segment to its 8 bits
                out.append(byte)
            else:
                raise LiteralError(f"unexpected {value!r} in a binary", self.text, pos)
            if self.at(","):
                self.take()
                continue
            self.expect(">>")
            return bytes(out)


def _atom_value(name: str) -> Any:
    if name == "true":
        return True
    if name == "false":
        return False
    if name == "undefined":
        return None
    return Atom(name)


def parse(text: str) -> Any:
    """The Python value of the Erlang term literal ``text`` (an optional
    trailing ``.`` is allowed).  Raises ``LiteralError``."""
    stripped = text.strip()
    if stripped.endswith(".") and not re.search(r"\d\.$", stripped):
        stripped = stripped[:-1]
    parser = _Parser(stripped)
    if not parser.tokens:
        raise LiteralError("empty term", text, 0)
    value = parser.term()
    if parser.peek() is not None:
        raise parser.error("unexpected text after the term")
    return value


_PLAIN_ATOM = re.compile(r"[a-z][a-zA-Z0-9_@]*\Z")
_RESERVED = frozenset(
    [
        "after",
        "and",
        "andalso",
        "band",
        "begin",
        "bnot",
        "bor",
        "bsl",
        "bsr",
        "bxor",
        "case",
        "catch",
        "cond",
        "div",
        "end",
        "fun",
        "if",
        "let",
        "not",
        "of",
        "or",
        "orelse",
        "receive",
        "rem",
        "try",
        "when",
        "xor",
        "maybe",
        "else",
    ]
)


def _quote(text: str, quote: str) -> str:
    out = []
    for c in text:
        if c == quote or c == "\\":
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif ord(c) < 32 or ord(c) == 127:
            out.append(f"\\x{{{ord(c):X}}}")
        else:
            out.append(c)
    return quote + "".join(out) + quote


def _format_atom(name: str) -> str:
    if _PLAIN_ATOM.match(name) and name not in _RESERVED:
        return name
    return _quote(name, "'")


def _format_float(value: float) -> str:
    if not math.isfinite(value):
        raise ValueError(f"{value} has no Erlang term")
    text = repr(value)
    if "e" in text:
        mantissa, _, exponent = text.partition("e")
        if "." not in mantissa:
            mantissa += ".0"
        return f"{mantissa}e{int(exponent)}"
    return text


def _format_binary(data: bytes) -> str:
    if not data:
        return "<<>>"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text.isprintable():
        if all(ord(c) < 128 for c in text):
            return "<<" + _quote(text, '"') + ">>"
        return "<<" + _quote(text, '"') + "/utf8>>"
    return "<<" + ",".join(str(b) for b in data) + ">>"


def format_term(value: Any) -> str:
    """``value`` written as an Erlang term literal (as ``~p`` would, on one
    line).  Pids and other opaque terms print as ``#Pid<...>``-style
    placeholders that ``parse`` does not read back."""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "undefined"
    if isinstance(value, Atom):
        return _format_atom(str(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _format_float(value)
    if isinstance(value, str):
        return _format_binary(value.encode("utf-8"))
    if isinstance(value, bytes | bytearray | memoryview):
        return _format_binary(bytes(value))
    if isinstance(value, tuple):
        return "{" + ",".join(format_term(v) for v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(format_term(v) for v in value) + "]"
    if isinstance(value, ImproperList):
        items = ",".join(format_term(v) for v in value.items)
        return f"[{items}|{format_term(value.tail)}]"
    if isinstance(value, dict):
        pairs = value.items()
    elif isinstance(value, Map):
        pairs = value.pairs  # type: ignore[assignment]
    else:
        pairs = None
    if pairs is not None:
        return "#{" + ",".join(f"{format_term(k)} => {format_term(v)}" for k, v in pairs) + "}"
    if isinstance(value, BitString):
        whole = ",".join(str(b) for b in value.data[:-1])
        last = f"{value.data[-1] >> (8 - value.bits)}:{value.bits}"
        return "<<" + (whole + "," if whole else "") + last + ">>"
    if isinstance(value, Pid):
        return f"#Pid<{value.id}>"
    if isinstance(value, Opaque):
        return f"#{type(value).__name__}<{value.raw.hex()}>"
    raise ValueError(f"{type(value).__name__} has no Erlang term")
