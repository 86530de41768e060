"""The access policy end to end: keys authenticated by a real sshd, identified
by the node through the relay's ``$SSH_USER_AUTH``, decided per key."""

from __future__ import annotations

import logging

import pytest
import trio
from _sshwire import SSHChannel, bare

from conftest import make_key
from sshrpc import Atom, demo
from sshrpc.node import serve_node
from sshrpc.policy import Policy
from sshrpc.subsystem import relay_command

A = Atom
pytestmark = pytest.mark.timeout(60)

POLICY = """
[[rule]]
keys = ["sshrpc-test-client"]
allow = ["*"]

[[rule]]
keys = ["partial@*"]
allow = ["lists:reverse/1", "echo", "log:last/0"]
"""


@pytest.fixture
async def policy_node(nursery, private_sshd, tmp_path, client_key):
    partial = make_key(tmp_path / "partial", comment="partial@test")
    stranger = make_key(tmp_path / "stranger", comment="stranger@test")
    keys = [client_key.public_line, partial.public_line]
    keys_file = tmp_path / "authorized_keys"
    keys_file.write_text("\n".join(keys) + "\n")
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(POLICY)
    socket_path = tmp_path / "node" / "node.sock"
    await nursery.start(
        lambda task_status: serve_node(
            demo.services,
            socket_path=socket_path,
            policy=Policy.load(policy_file),
            authorized_keys=keys_file,
            task_status=task_status,
        )
    )
    info = private_sshd({"sshrpc@k2r.org": relay_command(socket_path)}, authorized_keys=keys)
    return info, partial, stranger


def _argv(info, key):
    argv = info.ssh_argv()
    argv[argv.index(str(info.identity))] = str(key.private)
    return argv


async def test_full_key(policy_node):
    info, _, _ = policy_node
    ch = await SSHChannel.open(info.ssh_argv())
    try:
        await ch.hello()
        assert await ch.call(1, "lists", "seq", [1, 2]) == (A("reply"), 1, [1, 2])
        assert bare(await ch.call(2, "lists", "nosuch", [1])) == (
            A("error"),
            2,
            (A("sshrpc"), A("undef"), {}),
        )
        assert bare(await ch.call(3, "nosuch", "f", [])) == (
            A("error"),
            3,
            (A("sshrpc"), A("forbidden"), {}),
        )
    finally:
        await ch.aclose()


async def test_partial_key_is_refused_everything_else(policy_node, caplog):
    info, partial, _ = policy_node
    forbidden = (A("sshrpc"), A("forbidden"), {})
    demo.LOG_STATE["last"] = None
    ch = await SSHChannel.open(_argv(info, partial))
    try:
        await ch.hello()
        with caplog.at_level(logging.WARNING, logger="sshrpc.audit"):
            assert await ch.call(1, "lists", "reverse", [[1, 2]]) == (A("reply"), 1, [2, 1])
            assert await ch.call(2, "echo", "echo", [5]) == (A("reply"), 2, 5)
            assert bare(await ch.call(3, "lists", "seq", [1, 2])) == (A("error"), 3, forbidden)
            assert bare(await ch.call(4, "os", "getpid", [])) == (A("error"), 4, forbidden)
            # arity tricks: an allowed name at another arity, and an unknown one
            answer = await ch.call(5, "lists", "reverse", [[1], 2])
            assert bare(answer) == (A("error"), 5, forbidden)
            assert bare(await ch.call(6, "lists", "nosuch", [])) == (A("error"), 6, forbidden)
            # spawn and cast are checked the same way
            await ch.send((A("spawn"), 7, A("worker"), A("loop"), []))
            assert bare(await ch.recv()) == (A("error"), 7, forbidden)
            await ch.send((A("cast"), A("log"), A("info"), [b"sneaky"]))
            assert await ch.call(8, "log", "last", []) == (A("reply"), 8, None)
        fingerprint = partial.fingerprint
        warnings = [r.getMessage() for r in caplog.records if r.name == "sshrpc.audit"]
        assert f"key={fingerprint} call lists:seq/2 outcome=forbidden" in warnings[0]
        assert any("cast log:info/1 outcome=forbidden" in w for w in warnings)
        assert any("spawn worker:loop/0 outcome=forbidden" in w for w in warnings)
    finally:
        await ch.aclose()
    # legacy frames cannot get around it either
    ch = await SSHChannel.open(_argv(info, partial))
    try:
        await ch.send((A("mfa"), (A("os"), A("getpid"), [])))
        assert await ch.recv() == (A("answer"), ((A("exec_badrpc"), A("forbidden")), -1))
        await ch.send((A("mfa"), (A("lists"), A("reverse"), [[3, 4]])))
        assert await ch.recv() == (A("answer"), ([4, 3], 0))
    finally:
        await ch.aclose()


async def test_unknown_key_is_refused_by_sshd(policy_node):
    info, _, stranger = policy_node
    out = await trio.run_process(
        _argv(info, stranger), stdin=b"", capture_stdout=True, capture_stderr=True, check=False
    )
    assert out.returncode == 255
    assert b"Permission denied (publickey)" in out.stderr
