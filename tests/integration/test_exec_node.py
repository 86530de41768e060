"""Exec mode on the node side (sshrpc._exec): the parsed call runs through the
node's call path -- policy, audit line, cancellation, limits -- without sshd."""

from __future__ import annotations

import logging

import pytest
import trio

from sshrpc import Atom, Service, decode
from sshrpc._exec import (
    BAD_COMMAND,
    FORBIDDEN,
    MAX_COMMAND,
    OK,
    TIMEOUT,
    UNAVAILABLE,
    CommandError,
    parse_command,
    run_exec,
)
from sshrpc.demo import SLOW_STATE, services
from sshrpc.node import Node
from sshrpc.policy import ANONYMOUS, Policy


def test_parse_command_grammar():
    cmd = parse_command(b"  etf 'Mod':f(1, 'A b', <<\"x\">>, [a|b], #{}) .  \n")
    assert (cmd.module, cmd.function, cmd.etf) == (Atom("Mod"), Atom("f"), True)
    assert cmd.args[:3] == [1, Atom("A b"), b"x"]
    assert parse_command(b"m:f().").args == []
    assert parse_command(b"m:f(1 % a comment\n).").args == [1]
    assert parse_command(b"true:undefined().").module == Atom("true")
    for bad in (b"m:f()", b"m:f().x", b"M:f().", b"m:F().", b"m:f(1).m:f(2).", b"m:f((1)).",
                b"m:f(fun() -> 1 end).", b"m:f(1,).", b"m : f ( 1 ) . ;", b"m:f(1)..",
                b"m:f(<<1>>, $).", b"\xc3\x28m:f()."):  # fmt: skip
        with pytest.raises(CommandError):
            parse_command(bad)
    with pytest.raises(CommandError, match="longer than"):
        parse_command(b"m:f(" + b" " * MAX_COMMAND + b").")


async def test_policy_and_audit_apply(caplog):
    node = Node(services, policy=Policy.from_mapping({"rule": [{"allow": ["lists:*"]}]}))
    with caplog.at_level(logging.DEBUG, logger="sshrpc.audit"):
        ok = await run_exec(node, b"lists:reverse([1,2]).", ANONYMOUS)
        denied = await run_exec(node, b"echo:echo(1).", ANONYMOUS)
    assert (ok.status, ok.stdout, ok.stderr) == (OK, b"[2,1]\n", b"")
    assert denied.status == FORBIDDEN and denied.stdout == b""
    text = caplog.text
    assert "call lists:reverse/1 outcome=ok" in text
    assert "call echo:echo/1 outcome=forbidden" in text
    assert node.statistics()["channels"] == 0  # the private channels are gone


async def test_client_gone_cancels_the_call():
    node = Node(services)
    gone = trio.Event()
    SLOW_STATE["work"] = "idle"
    async with trio.open_nursery() as nursery:
        outcome: list = []

        async def run() -> None:
            outcome.append(await run_exec(node, b"etf slow:work(60).", ANONYMOUS, gone=gone))

        nursery.start_soon(run)
        with trio.fail_after(10):
            while SLOW_STATE["work"] != "started":  # bounded by fail_after
                await trio.sleep(0.01)
        gone.set()
    assert outcome[0].status == TIMEOUT
    assert SLOW_STATE["work"] == "cancelled"
    assert decode(outcome[0].stdout[4:]) == (
        Atom("answer"),
        ((Atom("exec_badrpc"), Atom("cancelled")), -1),
    )


async def test_shutting_down_node_answers_unavailable():
    """A node that is shutting down refuses the call like a subsystem call."""
    blocker = Service("blocker")
    release = trio.Event()

    @blocker.export
    async def wait() -> Atom:
        await release.wait()
        return Atom("ok")

    node = Node([blocker])
    async with trio.open_nursery() as nursery:
        outcome: list = []

        async def run() -> None:
            outcome.append(await run_exec(node, b"blocker:wait().", ANONYMOUS))

        nursery.start_soon(run)
        with trio.fail_after(10):
            while not node.statistics()["calls"]:  # bounded by fail_after
                await trio.sleep(0.01)
        await node.shutdown(grace=1)
        release.set()
    assert outcome[0].status == UNAVAILABLE, outcome[0]
    assert outcome[0].stderr.startswith(b"sshrpc: blocker:wait/0 failed")


async def test_bad_command_never_reaches_the_node():
    node = Node(services)
    outcome = await run_exec(node, b'os:cmd("id"); rm -rf /', ANONYMOUS)
    assert outcome.status == BAD_COMMAND and outcome.stdout == b""
    assert node.statistics()["channels"] == 0
