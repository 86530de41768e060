"""The node behind a real OpenSSH sshd, driven by OpenSSH's own ``ssh -s``:
every message of PROTOCOL.md sections 3-7, legacy mode, errors, hostile input.

The node runs in the test's Trio loop (``serve_node``), sshd runs the relay per
channel; one test module-wide sshd per mode keeps the area fast.
"""

from __future__ import annotations

import itertools
import os
import struct

import pytest
import trio
from _sshwire import EOF, SSHChannel, bare

from sshrpc import Atom, Pid, demo
from sshrpc.node import serve_node
from sshrpc.subsystem import in_process_command, relay_command

A = Atom
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def relay_node(nursery, private_sshd, tmp_path):
    """(node, sshd info): a node on a Unix socket, sshd relaying to it."""
    socket_path = tmp_path / "node" / "node.sock"
    node = await nursery.start(
        lambda task_status: serve_node(
            demo.services, socket_path=socket_path, max_calls=8, task_status=task_status
        )
    )
    command = relay_command(socket_path)
    info = private_sshd({"sshrpc@k2r.org": command, "sshrpc": command})
    return node, info


async def open_channel(info, subsystem="sshrpc@k2r.org") -> SSHChannel:
    return await SSHChannel.open(info.ssh_argv(subsystem))


async def wait_started(ch: SSHChannel, first_id: int = 1000) -> None:
    """Poll ``slow:status/0`` until the last ``slow:work`` has started (its
    task may be scheduled after the status call's)."""
    with trio.fail_after(10):
        for i in itertools.count(first_id):
            reply = await ch.call(i, "slow", "status", [])
            if reply == (A("reply"), i, A("started")):
                return


async def test_hello_fields_and_basic_calls(relay_node):
    node, info = relay_node
    ch = await open_channel(info)
    try:
        hello = await ch.hello()
        assert hello[A("max_frame")] == 1 << 20
        assert hello[A("node")] == node.name
        assert isinstance(hello[A("session")], Pid)
        assert hello[A("max_calls")] == 8
        assert set(hello[A("features")]) == {
            "call",
            "cast",
            "cancel",
            "deadline",
            "stream",
            "spawn",
            "send",
            "ping",
        }
        assert await ch.call(1, "lists", "reverse", [[1, 2, 3]]) == (A("reply"), 1, [3, 2, 1])
        assert await ch.call(2, "lists", "seq", [1, 4]) == (A("reply"), 2, [1, 2, 3, 4])
        assert await ch.call(3, "os", "getpid", []) == (A("reply"), 3, os.getpid())
        assert await ch.call(4, "echo", "echo", [{A("k"): b"v"}]) == (A("reply"), 4, {A("k"): b"v"})
        await ch.send((A("ping"), [b"tok"]))
        assert await ch.recv() == (A("pong"), [b"tok"])
        # graceful bye
        await ch.send((A("bye"), A("normal")))
        assert await ch.recv() == (A("bye"), A("normal"))
        assert await ch.recv() is EOF
        assert await ch.wait_closed() == 0
    finally:
        await ch.aclose()


async def test_both_subsystem_names(relay_node):
    _, info = relay_node
    ch = await open_channel(info, "sshrpc")
    try:
        await ch.hello()
        assert await ch.call(1, "echo", "echo", [7]) == (A("reply"), 1, 7)
    finally:
        await ch.aclose()


async def test_errors_undef_forbidden_badarg(relay_node):
    _, info = relay_node
    ch = await open_channel(info)
    try:
        await ch.hello()
        for cls in ("error", "exit", "throw"):
            assert await ch.call(1, "errors", "raise", [A(cls), (A("r"), 1)]) == (
                A("error"),
                1,
                (A(cls), (A("r"), 1), {}),
            )
        assert await ch.call(2, "errors", "raise", [A("other"), b"bad value"]) == (
            A("error"),
            2,
            (A("error"), (A("ValueError"), b"bad value"), {}),
        )
        # undef and forbidden name what was asked (docs/protocol.md, "What a
        # key may learn"); test_explain.py checks the messages.
        for i, (m, f, args, reason, arities) in enumerate(
            [
                ("lists", "nosuch", [], "undef", []),
                ("lists", "reverse", [1, 2], "undef", [1]),
                ("nosuch", "f", [], "forbidden", None),
            ],
            start=3,
        ):
            kind, cid, (cls, got, details) = await ch.call(i, m, f, args)
            assert (kind, cid, cls, got) == (A("error"), i, A("sshrpc"), A(reason))
            assert details[A("module")] == A(m) and details[A("function")] == A(f)
            assert details[A("arity")] == len(args)
            assert details.get(A("arities")) == arities
        # known tag, wrong shape, readable id: badarg
        await ch.send((A("call"), 6, b"lists", A("reverse"), [[1]]))
        assert await ch.recv() == (A("error"), 6, (A("sshrpc"), A("badarg"), {}))
        await ch.send((A("call"), 7, A("lists"), A("reverse"), [[1]], {A("timeout"): -1}))
        assert await ch.recv() == (A("error"), 7, (A("sshrpc"), A("badarg"), {}))
        # unknown message: ignored; the channel still works
        await ch.send((A("frobnicate"), 1, 2))
        assert await ch.call(8, "echo", "echo", [1]) == (A("reply"), 8, 1)
        # a value with no Erlang term... is impossible from Erlang; a too
        # large answer becomes too_large
        assert await ch.call(9, "lists", "seq", [1, 300_000]) == (
            A("error"),
            9,
            (A("sshrpc"), A("too_large"), {}),
        )
    finally:
        await ch.aclose()


async def test_concurrent_calls_answer_in_any_order(relay_node):
    _, info = relay_node
    ch = await open_channel(info)
    try:
        await ch.hello()
        await ch.send((A("call"), 1, A("slow"), A("work"), [0.5]))
        await ch.send((A("call"), 2, A("echo"), A("echo"), [b"fast"]))
        assert await ch.recv() == (A("reply"), 2, b"fast")
        assert await ch.recv() == (A("reply"), 1, A("done"))
    finally:
        await ch.aclose()


async def test_cancel_timeout_and_sync_block(relay_node):
    _, info = relay_node
    ch = await open_channel(info)
    try:
        await ch.hello()
        await ch.send((A("call"), 1, A("slow"), A("work"), [60]))
        # the work has started before we cancel it
        await wait_started(ch)
        await ch.send((A("cancel"), 1))
        assert await ch.recv() == (A("error"), 1, (A("sshrpc"), A("cancelled"), {}))
        assert await ch.call(3, "slow", "was_cancelled", []) == (A("reply"), 3, True)
        # cancel of an unknown/finished id: nothing
        await ch.send((A("cancel"), 1))
        await ch.send((A("cancel"), 999))
        # timeout
        assert await ch.call(4, "slow", "work", [60], {A("timeout"): 50}) == (
            A("error"),
            4,
            (A("sshrpc"), A("timeout"), {}),
        )
        assert await ch.call(5, "slow", "was_cancelled", []) == (A("reply"), 5, True)
        # a wedged sync function cannot block the cancel or timeout answer
        with trio.fail_after(5):
            assert await ch.call(6, "slow", "block", [3], {A("timeout"): 100}) == (
                A("error"),
                6,
                (A("sshrpc"), A("timeout"), {}),
            )
            await ch.send((A("call"), 7, A("slow"), A("block"), [3]))
            await ch.send((A("cancel"), 7))
            assert await ch.recv() == (A("error"), 7, (A("sshrpc"), A("cancelled"), {}))
        # finished first: the normal answer stands, exactly one
        await ch.send((A("call"), 8, A("echo"), A("echo"), [1]))
        assert await ch.recv() == (A("reply"), 8, 1)
        await ch.send((A("cancel"), 8))
        await ch.send((A("ping"), 0))
        assert await ch.recv() == (A("pong"), 0)
    finally:
        await ch.aclose()


async def test_cast(relay_node):
    _, info = relay_node
    ch = await open_channel(info)
    try:
        await ch.hello()
        await ch.send((A("cast"), A("log"), A("info"), [b"hello cast"]))
        await ch.send((A("cast"), A("nosuch"), A("info"), [1]))  # forbidden: logged, no answer
        with trio.fail_after(10):
            while True:
                reply = await ch.call(1, "log", "last", [])
                if reply == (A("reply"), 1, b"hello cast"):
                    break
        await ch.send((A("ping"), 1))
        assert await ch.recv() == (A("pong"), 1)  # nothing else came
    finally:
        await ch.aclose()


async def test_stream_with_credit(relay_node):
    _, info = relay_node
    ch = await open_channel(info)
    try:
        await ch.hello()
        await ch.send(
            (A("call"), 1, A("feed"), A("tail"), [5], {A("stream"): True, A("credit"): 2})
        )
        assert await ch.recv() == (A("chunk"), 1, 0)
        assert await ch.recv() == (A("chunk"), 1, 1)
        # no more chunks without credit
        await ch.send((A("ping"), b"gate"))
        assert await ch.recv() == (A("pong"), b"gate")
        await ch.send((A("credit"), 1, 10))
        assert [await ch.recv() for _ in range(4)] == [
            (A("chunk"), 1, 2),
            (A("chunk"), 1, 3),
            (A("chunk"), 1, 4),
            (A("reply"), 1, A("done")),
        ]
        # the same function as a plain call: the list of items
        assert await ch.call(2, "feed", "tail", [3]) == (A("reply"), 2, [0, 1, 2])
    finally:
        await ch.aclose()


async def test_spawn_send_down_and_session_mailbox(relay_node):
    node, info = relay_node
    ch = await open_channel(info)
    try:
        hello = await ch.hello()
        session = hello[A("session")]
        await ch.send((A("spawn"), 1, A("worker"), A("loop"), []))
        tag, id_, pid = await ch.recv()
        assert (tag, id_) == (A("reply"), 1) and isinstance(pid, Pid)
        await ch.send((A("send"), pid, b"msg1"))
        assert await ch.recv() == (A("send"), session, (A("echo"), b"msg1"))
        await ch.send((A("send"), pid, A("stop")))
        assert await ch.recv() == (A("down"), pid, A("normal"))
        # a crashing process
        await ch.send((A("spawn"), 2, A("worker"), A("loop"), []))
        _, _, pid2 = await ch.recv()
        await ch.send((A("send"), pid2, (A("crash"), A("boom"))))
        assert await ch.recv() == (A("down"), pid2, (A("exit"), A("boom")))
        # sending to a dead pid or an unregistered name: dropped
        await ch.send((A("send"), pid, b"x"))
        await ch.send((A("send"), A("nobody"), b"x"))
        # spawn is policy-checked like call
        await ch.send((A("spawn"), 3, A("nosuch"), A("loop"), []))
        assert bare(await ch.recv()) == (A("error"), 3, (A("sshrpc"), A("forbidden"), {}))
        assert node.statistics()["processes"] == 0
    finally:
        await ch.aclose()


async def test_legacy_mfa_mode(relay_node):
    _, info = relay_node
    ch = await open_channel(info)
    try:
        await ch.send((A("mfa"), (A("lists"), A("reverse"), [[1, 2]])))
        assert await ch.recv() == (A("answer"), ([2, 1], 0))
        await ch.send((A("mfa"), (A("errors"), A("raise"), [A("throw"), 3])))
        assert await ch.recv() == (A("answer"), ((A("exec_badrpc"), (A("throw"), 3)), -1))
        await ch.send((A("mfa"), (A("nosuch"), A("f"), [])))
        assert await ch.recv() == (A("answer"), ((A("exec_badrpc"), A("forbidden")), -1))
        await ch.send((A("what"), 1))
        assert await ch.recv() == (A("answer"), ((A("exec_error"), (A("what"), 1)), -1))
        await ch.send((A("mfa"), (A("echo"), A("echo"), [b"still here"])))
        assert await ch.recv() == (A("answer"), (b"still here", 0))
    finally:
        await ch.aclose()


async def _expect_bye(ch: SSHChannel, reason_tag: str) -> object:
    msg = await ch.recv()
    assert msg[0] == "bye", msg
    reason = msg[1]
    assert (reason[0] if isinstance(reason, tuple) else reason) == reason_tag, reason
    assert await ch.recv() is EOF
    return reason


async def test_hostile_input(relay_node):
    _, info = relay_node
    other = await open_channel(info)
    try:
        await other.hello()
        # oversize length: bye at once, payload never read
        ch = await open_channel(info)
        await ch.hello()
        await ch.send_raw(struct.pack(">I", (1 << 20) + 1) + b"x" * 10)
        assert await _expect_bye(ch, "frame_too_large") == (
            A("frame_too_large"),
            (1 << 20) + 1,
            1 << 20,
        )
        await ch.aclose()
        # bad term
        ch = await open_channel(info)
        await ch.hello()
        await ch.send_raw(struct.pack(">I", 3) + b"\x83\xff\x00")
        reason = await _expect_bye(ch, "bad_term")
        assert b"1" in reason[1]  # the byte offset
        await ch.aclose()
        # not a hello first
        ch = await open_channel(info)
        await ch.send((A("call"), 1, A("echo"), A("echo"), [1]))
        await _expect_bye(ch, "protocol_error")
        await ch.aclose()
        # unsupported version
        ch = await open_channel(info)
        await ch.send((A("hello"), 2, {}))
        assert await _expect_bye(ch, "unsupported_version") == (A("unsupported_version"), [1])
        await ch.aclose()
        # duplicate id
        ch = await open_channel(info)
        await ch.hello()
        await ch.send((A("call"), 1, A("slow"), A("work"), [30]))
        await ch.send((A("call"), 1, A("echo"), A("echo"), [1]))
        await _expect_bye(ch, "protocol_error")
        await ch.aclose()
        # the other channel is unaffected
        assert await other.call(1, "echo", "echo", [b"ok"]) == (A("reply"), 1, b"ok")
    finally:
        await other.aclose()


async def test_flood_past_max_calls(relay_node):
    _, info = relay_node
    ch = await open_channel(info)
    try:
        await ch.hello()
        for i in range(8):
            await ch.send((A("call"), i, A("slow"), A("work"), [30]))
        for i in range(8, 12):
            await ch.send((A("call"), i, A("echo"), A("echo"), [i]))
        for i in range(8, 12):
            assert await ch.recv() == (A("error"), i, (A("sshrpc"), A("overload"), {}))
        await ch.send((A("cancel"), 0))
        assert await ch.recv() == (A("error"), 0, (A("sshrpc"), A("cancelled"), {}))
        assert await ch.call(20, "echo", "echo", [1]) == (A("reply"), 20, 1)
    finally:
        await ch.aclose()


async def test_channel_that_stops_reading(relay_node):
    """A client that sends calls but never reads: the node's answer queue
    fills, it stops reading, the SSH window closes, and the client's writes
    block; the node's memory for this channel stays bounded and other
    channels are served."""
    node, info = relay_node
    ch = await open_channel(info)
    other = await open_channel(info)
    try:
        await ch.hello()
        await other.hello()
        big = b"x" * 60_000
        sent = 0
        blocked = False
        with trio.fail_after(20):
            while sent < 2000 and not blocked:  # 120 MB if nothing pushed back
                with trio.move_on_after(0.5) as scope:
                    await ch.send((A("call"), sent, A("echo"), A("echo"), [big]))
                blocked = scope.cancelled_caught
                sent += 1
        assert blocked, "the node never pushed back"
        queued = max(c.outbox.nbytes for c in node.channels)
        assert queued <= node.max_queued + 8 * 70_000
        assert await other.call(2, "echo", "echo", [b"ok"]) == (A("reply"), 2, b"ok")
        # Once the client reads again, every complete call gets its one answer.
        ids = set()
        for _ in range(sent - 1):
            answer = await ch.recv()
            assert answer[0] in ("reply", "error") and answer[1] not in ids
            if answer[0] == "reply":
                assert answer[2] == big
            ids.add(answer[1])
        assert ids == set(range(sent - 1))
    finally:
        await ch.aclose()
        await other.aclose()


async def test_disconnect_cancels_calls(relay_node):
    node, info = relay_node
    ch = await open_channel(info)
    await ch.hello()
    await ch.send((A("call"), 1, A("slow"), A("work"), [60]))
    await wait_started(ch)
    await ch.aclose()  # kill ssh: the connection drops mid-call
    with trio.fail_after(10):
        while node.statistics()["channels"]:
            await trio.sleep(0.01)  # bounded poll of node state
    assert demo.SLOW_STATE["work"] == "cancelled"
    assert node.statistics()["calls"] == 0


@pytest.fixture
def in_process_sshd(private_sshd):
    command = in_process_command(["sshrpc.demo:services"])
    return private_sshd({"sshrpc@k2r.org": command, "sshrpc": command})


async def test_in_process_mode(in_process_sshd):
    ch = await open_channel(in_process_sshd)
    try:
        hello = await ch.hello()
        assert hello[A("max_calls")] == 64
        reply = await ch.call(1, "os", "getpid", [])
        assert reply[0] == "reply" and reply[2] != os.getpid()
        await ch.send((A("call"), 2, A("slow"), A("work"), [60]))
        await ch.send((A("cancel"), 2))
        assert await ch.recv() == (A("error"), 2, (A("sshrpc"), A("cancelled"), {}))
        await ch.send((A("bye"), A("normal")))
        assert await ch.recv() == (A("bye"), A("normal"))
        assert await ch.recv() is EOF
    finally:
        await ch.aclose()
