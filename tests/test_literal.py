"""Erlang term literals <-> Python values (sshrpc._literal).  No I/O."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sshrpc import Atom, ImproperList, Map, decode, encode
from sshrpc._literal import LiteralError, format_term, parse


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", 42),
        ("-7", -7),
        ("16#ff", 255),
        ("-2#101", -5),
        ("$a", 97),
        ("$\\n", 10),
        ("1.5", 1.5),
        ("-2.0e-3", -0.002),
        ("123456789012345678901234567890", 123456789012345678901234567890),
        ("ok", Atom("ok")),
        ("'Hello world'", Atom("Hello world")),
        ("'it\\'s'", Atom("it's")),
        ("true", True),
        ("false", False),
        ("undefined", None),
        ('"abc"', [97, 98, 99]),
        ('"ab" "c"', [97, 98, 99]),
        ('""', []),
        ('<<"x">>', b"x"),
        ('<<"h\\x{e9}"/utf8>>', "hé".encode()),
        ("<<1,2,255>>", b"\x01\x02\xff"),
        ("<<>>", b""),
        ('{ok, <<"x">>}', (Atom("ok"), b"x")),
        ("{}", ()),
        ("[1,2,3]", [1, 2, 3]),
        ("[]", []),
        ("[1 | 2]", ImproperList([1], 2)),
        ("[1 | [2, 3]]", [1, 2, 3]),
        ("#{a => 1}", {Atom("a"): 1}),
        ("#{}", {}),
        ("#{[1] => x}", Map([([1], Atom("x"))])),
        ("#{1 => a, 1.0 => b}", Map([(1, Atom("a")), (1.0, Atom("b"))])),
        (
            '{a, [b, {c, #{d => <<"e">>}}]}.',
            (Atom("a"), [Atom("b"), (Atom("c"), {Atom("d"): b"e"})]),
        ),
    ],
)
def test_parse(text: str, value: Any) -> None:
    got = parse(text)
    assert got == value
    assert type(got) is type(value)


@pytest.mark.parametrize(
    ("text", "column"),
    [
        ("", 1),
        ("[1,2", 5),
        ("{a b}", 4),
        ("X", 1),
        ("#{a}", 4),
        ("1 2", 3),
        ('<<"ā">>', 3),
        ('os:cmd("rm")', 7),
        ("fun() -> ok end", 4),
        ("[" * 502 + "]" * 502, 502),
    ],
)
def test_parse_errors_say_where(text: str, column: int) -> None:
    with pytest.raises(LiteralError) as info:
        parse(text)
    assert info.value.column == column
    assert "column" in str(info.value)


def test_variable_error_suggests_quoting() -> None:
    with pytest.raises(LiteralError, match="quote it"):
        parse("Foo")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ((Atom("ok"), b"x"), '{ok,<<"x">>}'),
        ([1, 2, 3], "[1,2,3]"),
        ({Atom("a"): 1}, "#{a => 1}"),
        (Atom("Hello"), "'Hello'"),
        (Atom("end"), "'end'"),
        (None, "undefined"),
        (1e20, "1.0e20"),
        (1.5, "1.5"),
        (b"\x00\xff", "<<0,255>>"),
        ("hé", '<<"hé"/utf8>>'),
        (ImproperList([1], Atom("t")), "[1|t]"),
    ],
)
def test_format(value: Any, text: str) -> None:
    assert format_term(value) == text


def test_format_rejects_values_without_a_term() -> None:
    with pytest.raises(ValueError):
        format_term(object())
    with pytest.raises(ValueError):
        format_term(float("nan"))


_atoms = (
    st.text(min_size=1, max_size=20)
    .map(Atom)
    .filter(lambda a: a not in ("true", "false", "undefined"))
)
_leaves = st.one_of(
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    _atoms,
    st.binary(max_size=20),
    st.booleans(),
    st.none(),
)
_terms = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.one_of(st.integers(), _atoms, st.binary(max_size=5)), inner, max_size=3),
    ),
    max_leaves=20,
)


@given(_terms)
def test_format_then_parse_round_trips(value: Any) -> None:
    # Compare through the codec: that is what travels, and it tells 1 from 1.0.
    assert encode(parse(format_term(value))) == encode(value)
    assert decode(encode(parse(format_term(value)))) == decode(encode(value))


def test_unquoted_atom_longer_than_255_is_refused():
    """Erlang's atom limit holds for plain atoms as for quoted ones."""
    assert parse("a" * 255) == Atom("a" * 255)
    with pytest.raises(LiteralError, match="atom longer than 255"):
        parse("a" * 256)
    with pytest.raises(LiteralError, match="atom longer than 255"):
        parse("{ok, " + "b" * 1000 + "}")
