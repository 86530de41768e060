"""Errors that say what to do, and a key's own listing (issue 12, item 3):
``forbidden``/``undef`` details through a real sshd, ``sshrpc:exports/0``,
``Connection.exports()`` and ``sshrpc list USER@HOST``."""

from __future__ import annotations

import subprocess
import sys

import pytest

import sshrpc
from conftest import start_serve, stop_serve
from sshrpc.policy import Policy
from sshrpc.testing import open_test_node

pytestmark = pytest.mark.timeout(90)
A = sshrpc.Atom

calc = sshrpc.Service("calc")
secret = sshrpc.Service("secret")


@calc.export
def add(a, b):
    return a + b


@calc.export
def sub(a, b):
    return a - b


@secret.export
def launch():
    return "boom"


POLICY = """
[[rule]]
keys = ["sshrpc-test-client"]
allow = ["calc"]
deny = ["calc:sub"]
"""


async def test_forbidden_and_undef_say_what_was_asked_and_what_to_do(tmp_path) -> None:
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(POLICY)
    async with (
        open_test_node([calc, secret], policy=Policy.load(policy_file)) as test_node,
        test_node.connect() as node,
    ):
        assert await node.exports() == [(A("calc"), A("add"), 2)]
        # An existing but denied function and a module that does not exist
        # read alike: the key learns nothing about what it may not call.
        answers = {}
        for m, f, args in [("secret", "launch", []), ("nosuch", "launch", [])]:
            with pytest.raises(sshrpc.Forbidden) as caught:
                await node.call(m, f, args)
            details = caught.value.details
            assert details[A("module")] == A(m)
            assert details[A("function")] == A(f)
            assert details[A("arity")] == 0
            answers[m] = details[A("message")].replace(m.encode(), b"M")
        assert answers["secret"] == answers["nosuch"]
        assert b"sshrpc:exports()" in answers["secret"]
        with pytest.raises(sshrpc.Forbidden):
            await node.call("calc", "sub", [1, 2])
        # In a module the key may use: the arities it may call.
        with pytest.raises(sshrpc.Undef) as caught:
            await node.call("calc", "add", [1, 2, 3])
        details = caught.value.details
        assert details[A("arities")] == [2]
        assert details[A("message")].startswith(b"no calc:add/3; calc:add takes 2 arguments")
        with pytest.raises(sshrpc.Undef) as caught:
            await node.call("calc", "mul", [1, 2])
        assert caught.value.details[A("arities")] == []
        assert await node.call("calc", "add", [1, 2]) == 3


def _cli(info, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sshrpc.cli", *argv[:1], f"{info.user}@{info.host}:{info.port}",
         "-i", str(info.identity), "--known-hosts", str(info.known_hosts), "-F", "/dev/null",
         *argv[1:]],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_cli_list_and_call_explain(tmp_path, client_key) -> None:
    info = start_serve(
        ["sshrpc.demo:services"],
        state_dir=tmp_path / "state",
        authorized_keys=client_key.public,
        identity=client_key.private,
    )
    try:
        listed = _cli(info, "list")
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert "lists:reverse/1" in lines and "echo:echo/1" in lines
        failed = _cli(info, "call", "lists", "reverse", "1", "2")
        assert failed.returncode == 1
        assert "undef" in failed.stderr
        assert "no lists:reverse/2; lists:reverse takes 1 argument;" in failed.stderr
    finally:
        assert stop_serve(info) == 0
