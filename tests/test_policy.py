"""Policy decisions, the policy file and key identification (no network)."""

from __future__ import annotations

import logging

import pytest

from sshrpc import Atom
from sshrpc.policy import (
    ANONYMOUS,
    Auditor,
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
    assert debug.levelno == logging.INFO and "outcome=ok" in debug.getMessage()


# -- sends under the policy (issue 11, finding 4) ----------------------------------


SEND_POLICY = """
[[rule]]
keys = ["ops@*"]
allow = ["calc"]
send = ["jobs_*", "logger"]
send_pids = "key"

[[rule]]
keys = ["root@*"]
send_pids = "any"

[[rule]]
keys = ["*"]
allow = ["calc:add"]
"""


def test_send_rules(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(SEND_POLICY)
    policy = Policy.load(path)
    ops = KeyIdentity("SHA256:ops", "ops@host")
    root = KeyIdentity("SHA256:root", "root@host")
    assert policy.may_send_to_name(ops, "jobs_1") and policy.may_send_to_name(ops, "logger")
    assert not policy.may_send_to_name(ops, "other")
    assert not policy.may_send_to_name(BOB, "logger")  # a rule without send: no names
    assert policy.pid_scope(ops) == "key"
    assert policy.pid_scope(root) == "any"
    assert policy.pid_scope(BOB) == "session"
    # the default policy: every name, pids per session
    assert Policy.allow_all().may_send_to_name(BOB, "anything")
    assert Policy.allow_all().pid_scope(BOB) == "session"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[rule]]\nsend = 'x'", "'send' must be a list of strings"),
        ("[[rule]]\nsend_pids = 'all'", "'send_pids' must be"),
    ],
)
def test_bad_send_rules(tmp_path, text, message):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=message):
        Policy.load(path)


# -- safe audit (issue 11, findings 5 and 9) ----------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _auditor(**kw):
    logger = logging.getLogger("sshrpc.audit.test")
    clock = Clock()
    return Auditor(logger=logger, clock=clock, **kw), clock


def test_audit_escapes_control_characters(caplog):
    """A function atom holding a newline cannot forge a second line."""
    auditor, _ = _auditor()
    forged = "x\nkey=SHA256:alice call calc:add/2 outcome=ok\r\x1b[2J\u2028"
    mallory = KeyIdentity("SHA256:mal\nlory", "m")
    with caplog.at_level(logging.DEBUG, logger="sshrpc.audit.test"):
        auditor.record(mallory, f"call calc:{forged}/2", "forbidden", 0.0)
        auditor.record(mallory, f"send {forged}", "ok\nforged", None)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    for line in lines:
        assert line.isprintable(), line
        assert line.startswith("key=SHA256:mal\\x0alory ")
    assert (
        "calc:x\\x0akey=SHA256:alice call calc:add/2 outcome=ok\\x0d\\x1b[2J\\u2028/2" in lines[0]
    )


def test_identical_denials_are_counted(caplog):
    auditor, clock = _auditor(window=10.0, burst=5)
    with caplog.at_level(logging.DEBUG, logger="sshrpc.audit.test"):
        for _ in range(1000):
            auditor.record(BOB, "cast calc:mul/2", "forbidden", 0.0)
        clock.now = 11.0
        auditor.record(BOB, "cast calc:mul/2", "forbidden", 0.0)
        auditor.record(BOB, "call calc:add/2", "ok", 0.001)  # allowed: always a line
        auditor.record(BOB, "call calc:add/2", "ok", 0.001)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "key=SHA256:bob cast calc:mul/2 outcome=forbidden duration_ms=0.000",
        "key=SHA256:bob cast calc:mul/2 outcome=forbidden duration_ms=0.000 (repeated 999 times)",
        "key=SHA256:bob cast calc:mul/2 outcome=forbidden duration_ms=0.000",
        "key=SHA256:bob call calc:add/2 outcome=ok duration_ms=1.000",
        "key=SHA256:bob call calc:add/2 outcome=ok duration_ms=1.000",
    ]


def test_distinct_denials_are_limited_per_key(caplog):
    """20,000 denials of distinct names write at most ``burst`` lines per
    key per window, plus one count; another key keeps its own budget."""
    auditor, clock = _auditor(window=10.0, burst=20)
    alice = KeyIdentity("SHA256:alice")
    with caplog.at_level(logging.DEBUG, logger="sshrpc.audit.test"):
        for n in range(20_000):
            auditor.record(BOB, f"cast calc:f{n}/0", "forbidden", 0.0)
        auditor.record(alice, "cast calc:f1/0", "forbidden", 0.0)
        clock.now = 10.5
        auditor.record(BOB, "cast calc:g/0", "undef", 0.0)
        auditor.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 20 + 1 + 1 + 1
    assert lines[20] == "key=SHA256:alice cast calc:f1/0 outcome=forbidden duration_ms=0.000"
    assert lines[21] == "key=SHA256:bob: 19980 more denials not logged"
    assert lines[22] == "key=SHA256:bob cast calc:g/0 outcome=undef duration_ms=0.000"
    assert sum(len(line) for line in lines) < 3000


def test_audit_bookkeeping_is_bounded(caplog):
    auditor, _ = _auditor(window=10.0, burst=10**9, max_entries=100)
    with caplog.at_level(logging.DEBUG, logger="sshrpc.audit.test"):
        for n in range(5000):
            auditor.record(KeyIdentity(f"SHA256:k{n % 300}"), f"call m:f{n}/0", "forbidden", 0)
    assert len(auditor._same) <= 100 and len(auditor._per_key) <= 100


def test_flushing_as_channels_end_keeps_the_windows(caplog):
    """Ending channels (which flushes passed windows) does not reset a key's
    budget: cycling channels cannot buy more lines."""
    auditor, clock = _auditor(window=10.0, burst=2)
    with caplog.at_level(logging.DEBUG, logger="sshrpc.audit.test"):
        for n in range(100):
            auditor.record(BOB, f"call m:f{n % 5}/0", "forbidden", None)
            auditor.flush(expired_only=True)  # a channel ended
        assert len(caplog.records) == 2
        clock.now = 10.0
        auditor.flush(expired_only=True)  # the node's periodic check
    lines = [r.getMessage() for r in caplog.records]
    assert lines[2:] == [
        "key=SHA256:bob call m:f0/0 outcome=forbidden (repeated 19 times)",
        "key=SHA256:bob call m:f1/0 outcome=forbidden (repeated 19 times)",
        "key=SHA256:bob: 60 more denials not logged",
    ]


def test_exports_and_callable_arities_follow_the_key(table):
    """What ``sshrpc:exports/0`` answers and ``undef`` details offer: only
    what this key may call."""
    A = Atom
    assert table.exports(BOB) == [(A("calc"), A("add"), 2)]
    assert table.exports(ALICE) == [(A("calc"), A("add"), 2), (A("calc"), A("sub"), 2)]
    assert table.exports(ANONYMOUS) == []
    assert table.callable_arities(ALICE, "calc", "add") == [2]
    assert table.callable_arities(BOB, "calc", "sub") == []
    assert table.callable_arities(ALICE, "os", "getpid") == []
    assert table.callable_arities(ALICE, "calc", "nope") == []
    varargs = Service("v")

    @varargs.export
    def many(a, *rest):
        return a

    t = ExposureTable({"v": varargs})
    assert t.exports(ANONYMOUS) == [(A("v"), A("many"), (1, A("infinity")))]


def test_the_service_name_sshrpc_is_reserved():
    with pytest.raises(ValueError, match="reserved"):
        Service("sshrpc")


@pytest.mark.parametrize(
    "text, remote",
    [
        ("calc:calc", False),
        ("pkg.mod:services", False),
        ("host", True),
        ("host:2222", True),
        ("me@host", True),
        ("me@host:2222", True),
        ("[::1]:2222", True),
        ("me@[::1]:2222", True),
    ],
)
def test_list_tells_a_node_from_a_target(text, remote):
    from sshrpc._call import looks_remote

    assert looks_remote(text) is remote


def test_record_request_writes_what_record_writes(caplog):
    """``record_request`` (the node's per-call line, its text kept per
    request and outcome) writes the very lines ``record`` writes: escaped,
    denials rate-limited, the logger's level obeyed, its cache bounded."""
    cases = [
        (BOB, "call", "calc", "add", 2, "ok", 0.0012345),
        (BOB, "call", "calc", "add", 2, "ok", 0.5),  # cached text, new duration
        (BOB, "call", "calc", "add", 2, "error", 0.001),
        (BOB, "cast", "calc", "add", 2, "ok", 0.0),
        (KeyIdentity("SHA256:mal\nlory"), "call", "c\nx", "f\r\x1b", 1, "ok\nforged", 0.002),
        (KeyIdentity(""), "spawn", "m", "f", 0, "exit", 0.0),
    ] + [(BOB, "call", "calc", "nope", 2, "undef", 0.0)] * 5
    lines = []
    for method in ("record", "record_request"):
        auditor, _ = _auditor(window=10.0, burst=2, max_entries=3)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="sshrpc.audit.test"):
            for key, kind, module, function, arity, outcome, duration in cases:
                if method == "record":
                    what = f"{kind} {module}:{function}/{arity}"
                    auditor.record(key, what, outcome, duration)
                else:
                    auditor.record_request(key, kind, module, function, arity, outcome, duration)
            auditor.flush()
        assert len(auditor._starts) <= 3
        lines.append([(r.levelno, r.getMessage()) for r in caplog.records])
    assert lines[0] == lines[1]
    assert lines[1][0] == (
        logging.INFO,
        "key=SHA256:bob call calc:add/2 outcome=ok duration_ms=1.234",
    )
    assert lines[1][4][1] == (
        "key=SHA256:mal\\x0alory call c\\x0ax:f\\x0d\\x1b/1 outcome=ok\\x0aforged duration_ms=2.000"
    )
    assert lines[1][-1] == (
        logging.WARNING,
        "key=SHA256:bob call calc:nope/2 outcome=undef duration_ms=0.000 (repeated 4 times)",
    )
    assert len(lines[1]) == 6 + 1 + 1
    auditor, _ = _auditor()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sshrpc.audit.test"):
        auditor.record_request(BOB, "call", "calc", "add", 2, "ok", 0.0)
    assert caplog.records == []
