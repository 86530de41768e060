"""Policy decisions, the policy file and key identification (no network)."""

from __future__ import annotations

import logging

import pytest

from sshrpc.policy import (
    ANONYMOUS,
    ExposureTable,
    KeyIdentity,
    Policy,
    PolicyError,
    audit,
    identify_key,
)
from sshrpc.service import Service

calc = Service("calc")


@calc.export
def add(a, b):
    return a + b


@calc.export
def sub(a, b):
    return a - b


osvc = Service("os")


@osvc.export
def getpid():
    return 1


ALICE = KeyIdentity("SHA256:alice", "alice@laptop", "ssh-ed25519", "publickey")
BOB = KeyIdentity("SHA256:bob", "bob@ci", "ssh-ed25519", "publickey")

POLICY = """
[[rule]]
keys = ["alice@*"]
allow = ["*"]
deny = ["os:getpid/0"]

[[rule]]
keys = ["SHA256:bob"]
allow = ["calc:add/2"]
"""


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    return ExposureTable({"calc": calc, "os": osvc}, Policy.load(path))


def test_default_policy_exposes_exported_only():
    t = ExposureTable({"calc": calc})
    assert t.decide(ANONYMOUS, "calc", "add", 2).outcome == "allow"
    assert t.decide(ANONYMOUS, "calc", "add", 3).outcome == "undef"
    assert t.decide(ANONYMOUS, "calc", "mul", 2).outcome == "undef"
    assert t.decide(ANONYMOUS, "nosuch", "f", 0).outcome == "forbidden"
    assert t.decide(ANONYMOUS, "os", "getpid", 0).outcome == "forbidden"


def test_full_and_partial_keys(table):
    assert table.decide(ALICE, "calc", "sub", 2).outcome == "allow"
    assert table.decide(ALICE, "os", "getpid", 0).outcome == "forbidden"
    assert table.decide(ALICE, "calc", "nope", 1).outcome == "undef"
    assert table.decide(BOB, "calc", "add", 2).outcome == "allow"
    # arity tricks and neighbours: never undef, which would leak existence
    assert table.decide(BOB, "calc", "add", 3).outcome == "forbidden"
    assert table.decide(BOB, "calc", "sub", 2).outcome == "forbidden"
    assert table.decide(BOB, "calc", "nope", 2).outcome == "forbidden"
    assert table.decide(BOB, "os", "getpid", 0).outcome == "forbidden"
    stranger = KeyIdentity("SHA256:eve", "eve", "ssh-ed25519", "publickey")
    assert table.decide(stranger, "calc", "add", 2).outcome == "forbidden"
    assert table.decide(ANONYMOUS, "calc", "add", 2).outcome == "forbidden"


def test_listing(table):
    text = table.listing(BOB)
    assert "calc  add/2     sync  allowed" in text
    assert "calc  sub/2     sync  denied" in text
    assert "os    getpid/0  sync  denied" in text
    assert "add/2" in table.listing()


@pytest.mark.parametrize(
    "text, message",
    [
        ("rule = 3", "array of tables"),
        ("[[rule]]\nallow = 'calc'", "list of strings"),
        ("[[rule]]\npermit = ['x']", "unknown keys"),
        ("other = 1", "unknown top-level"),
        ("[[rule", "policy file"),
    ],
)
def test_bad_policy_files(tmp_path, text, message):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=message):
        Policy.load(path)


def test_missing_policy_file(tmp_path):
    with pytest.raises(PolicyError, match="cannot read"):
        Policy.load(tmp_path / "nope.toml")


def test_identify_key(tmp_path, client_key):
    keys = tmp_path / "authorized_keys"
    keys.write_text('restrict,command="x" ' + client_key.public_line + "\n")
    kind, blob = client_key.public_line.split()[:2]
    auth = f"publickey {kind} {blob}\n"
    ident = identify_key(auth, keys)
    assert ident.fingerprint == client_key.fingerprint
    assert ident.comment == "sshrpc-test-client"
    assert identify_key("", keys) == ANONYMOUS
    assert identify_key("password\n", keys) == ANONYMOUS
    assert identify_key(auth, tmp_path / "missing").comment == ""


def test_audit_lines(caplog):
    with caplog.at_level(logging.DEBUG, logger="sshrpc.audit"):
        audit(BOB, "call", "calc", "sub", 2, "forbidden", 0.001)
        audit(BOB, "call", "calc", "add", 2, "ok", 0.002)
    warn, debug = caplog.records
    assert warn.levelno == logging.WARNING
    assert "key=SHA256:bob call calc:sub/2 outcome=forbidden" in warn.getMessage()
    assert debug.levelno == logging.DEBUG and "outcome=ok" in debug.getMessage()
