"""Sends under the policy, pid generation, error redaction and audit of the
node over Trio memory streams (the sshd path: test_send_audit_serve.py)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import trio.testing
from _sshwire import FrameClient
from test_node_memory import t

from sshrpc import Atom, Pid, Service
from sshrpc.node import Node
from sshrpc.policy import KeyIdentity, Policy

A = Atom
pytestmark = pytest.mark.timeout(30)

ALICE = KeyIdentity("SHA256:alice", "alice@test")
BOB = KeyIdentity("SHA256:bob", "bob@test")
CAROL = KeyIdentity("SHA256:carol", "carol@test")


def _policy(scope_bob: str | None) -> Policy:
    rules: list[dict[str, Any]] = [
        {"keys": ["alice@*"], "allow": ["t"]},
        {"keys": ["carol@*"], "allow": ["t"], "send_pids": "any"},
    ]
    bob: dict[str, Any] = {"keys": ["bob@*"], "allow": ["t"], "send": ["pub_*"]}
    if scope_bob is not None:
        bob["send_pids"] = scope_bob
    rules.append(bob)
    return Policy.from_mapping({"rule": rules})


async def _open(nursery: trio.Nursery, n: Node, key: KeyIdentity) -> tuple[FrameClient, Pid]:
    ours, theirs = trio.testing.memory_stream_pair()
    nursery.start_soon(n.serve_channel, theirs, key)
    c = FrameClient(ours)
    hello = await c.hello()
    return c, hello[A("session")]


async def _spawn_named(c: FrameClient, id: int, name: bytes) -> Pid:
    await c.send((A("spawn"), id, A("t"), A("named"), [name]))
    tag, _, pid = await c.recv()
    assert tag == "reply"
    return pid


async def _sync(c: FrameClient, token: int) -> None:
    await c.send((A("ping"), token))
    assert await c.recv() == (A("pong"), token)


@pytest.mark.parametrize("scope", [None, "session", "key"])
async def test_pid_scopes(nursery: trio.Nursery, scope: str | None, caplog: Any) -> None:
    """Bob's second session reaches Bob's first session's process only with
    ``send_pids = "key"``; Alice's process never (carol: ``any``); a name
    only when listed in ``send``."""
    n = Node([t], policy=_policy(scope))
    bob1, bob1_session = await _open(nursery, n, BOB)
    bob2, _ = await _open(nursery, n, BOB)
    alice, alice_session = await _open(nursery, n, ALICE)
    carol, _ = await _open(nursery, n, CAROL)
    bobs = await _spawn_named(bob1, 1, b"pub_bob")
    alices = await _spawn_named(alice, 1, b"priv_alice")
    with caplog.at_level(logging.INFO, logger="sshrpc.audit"):
        await bob2.send((A("send"), bobs, b"bob2 by pid"))
        await bob2.send((A("send"), A("pub_bob"), b"bob2 by name"))
        await bob2.send((A("send"), alices, b"bob2 to alice's"))
        await bob2.send((A("send"), A("priv_alice"), b"bob2 to alice's name"))
        await bob2.send((A("send"), alice_session, b"bob2 to alice's mailbox"))
        await _sync(bob2, 1)
        await carol.send((A("send"), alices, b"carol"))
        await carol.send((A("send"), A("pub_bob"), b"carol by name"))  # no send names
        await _sync(carol, 2)
        await alice.send((A("send"), A("priv_alice"), b"own, by a name not listed"))
        await alice.send((A("send"), alices, b"own"))
        await bob1.send((A("send"), bobs, b"own"))
        got_bob = [await bob1.recv()]
        if scope == "key":
            got_bob.append(await bob1.recv())
        got_bob.append(await bob1.recv())
        expect_bob = [(A("send"), bob1_session, (A("got"), b"bob2 by name", bobs))]
        if scope == "key":
            expect_bob.insert(0, (A("send"), bob1_session, (A("got"), b"bob2 by pid", bobs)))
        expect_bob.append((A("send"), bob1_session, (A("got"), b"own", bobs)))
        assert got_bob == expect_bob
        # Alice's process got carol's (send_pids = "any") and its own, nothing else
        assert await alice.recv() == (A("send"), alice_session, (A("got"), b"carol", alices))
        assert await alice.recv() == (A("send"), alice_session, (A("got"), b"own", alices))
    sends = [r.getMessage() for r in caplog.records if " send " in r.getMessage()]
    assert len(sends) == 10
    assert sum("outcome=forbidden" in s for s in sends) == (5 if scope == "key" else 6)


def test_pids_are_random_distinct_and_valid() -> None:
    a, b = Node([t]), Node([t])
    pids = []
    for _ in range(3000):
        # Each registered as live before the next is drawn, as the node
        # does (drawing all first collided in about 1.7% of runs).
        pid = a.new_pid()
        a.pids[pid] = None  # type: ignore[assignment]
        pids.append(pid)
    assert len(set(pids)) == len(pids)
    ids = [p.id for p in pids]
    assert all(0 <= p.id < 2**15 and 0 <= p.serial < 2**13 for p in pids)
    assert ids[:5] != list(range(ids[0], ids[0] + 5))
    assert len({p.serial for p in pids}) > 1000
    # the creation (last 4 bytes) is random per node
    assert pids[0].raw[-4:] != b.new_pid().raw[-4:]
    assert str(pids[0]).startswith(f"<{a.name}.")


async def test_server_code_sends_are_not_under_the_policy(nursery: trio.Nursery) -> None:
    """``sshrpc.send`` in service code (a worker thread here) reaches the
    session's mailbox even for a key whose rule allows no sends at all."""
    n = Node([t], policy=_policy(None))
    alice, alice_session = await _open(nursery, n, ALICE)
    await alice.send((A("call"), 1, A("t"), A("notify"), [b"from thread"]))
    assert await alice.recv() == (A("send"), alice_session, b"from thread")
    assert await alice.recv() == (A("reply"), 1, b"sent")


bad = Service("bad")


@bad.export
def leak() -> None:
    raise OSError(2, "No such file", "/srv/app/secret/config.toml")


@bad.export
def unencodable() -> object:
    return object()


@pytest.mark.parametrize("redact", [True, False])
async def test_redact_errors(nursery: trio.Nursery, redact: bool) -> None:
    n = Node([bad], redact_errors=redact)
    c, _ = await _open(nursery, n, ALICE)
    await c.send((A("call"), 1, A("bad"), A("leak"), []))
    tag, _, (cls, reason, details) = await c.recv()
    await c.send((A("call"), 2, A("bad"), A("unencodable"), []))
    _, _, (_, reason2, _) = await c.recv()
    assert (tag, cls, details) == (A("error"), A("error"), {})
    if redact:
        assert reason == (A("FileNotFoundError"), b"")
        assert reason2[1] == b""
    else:
        assert b"/srv/app/secret/config.toml" in reason[1]
        assert b"cannot encode" in reason2[1]


async def test_requests_cut_off_by_a_disconnect_are_audited(
    nursery: trio.Nursery, caplog: Any
) -> None:
    """One audit line per request, also for a call, a cast and a legacy mfa
    still running when the channel ends."""
    from sshrpc import demo

    n = Node(demo.services)
    with caplog.at_level(logging.INFO, logger="sshrpc.audit"):
        ours, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(n.serve_channel, theirs, ALICE)
        c = FrameClient(ours)
        await c.hello()
        await c.send((A("call"), 1, A("slow"), A("work"), [30]))
        await c.send((A("cast"), A("slow"), A("work"), [30]))
        await c.send((A("ping"), 1))
        assert await c.recv() == (A("pong"), 1)
        legacy_ours, legacy_theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(n.serve_channel, legacy_theirs, ALICE)
        legacy = FrameClient(legacy_ours)
        await legacy.send((A("mfa"), (A("slow"), A("work"), [30])))
        await trio.testing.wait_all_tasks_blocked()
        await ours.aclose()
        with trio.fail_after(5):
            while n.statistics()["channels"] > 1:
                await trio.sleep(0.01)  # bounded polling: the channel ends
        # A legacy request is served inline (the reader waits for it), so a
        # disconnect is seen once it answers; the node stopping cuts it off.
        await n.shutdown(grace=0.5)
        await legacy_ours.aclose()
        with trio.fail_after(5):
            while n.statistics()["channels"]:
                await trio.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if "outcome=disconnected" in r.getMessage()]
    kinds = sorted(line.split()[1] for line in lines)
    assert kinds == ["call", "cast", "mfa"], lines
    assert all("slow:work/1" in line for line in lines)
