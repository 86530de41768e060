"""The Erlang side end to end: sshrpc_client -> sshrpc_daemon, two real VMs.

One VM runs the hardened daemon (erlang/src/sshrpc_daemon.erl) on a free
loopback port with generated keys; another VM connects with the Erlang client
(erlang/src/sshrpc.erl).  Hostile and protocol-level cases use OpenSSH's own
``ssh -s`` as the client, with frames built by hand.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from erlang_helpers import (
    ErlangNode,
    ErlangServer,
    RawChannel,
    erl_string,
    erlang_available,
    erlang_client_dir,
    hello,
    start_erlang_server,
)

import sshrpc
from sshrpc import Atom, ImproperList

pytestmark = [
    pytest.mark.skipif(not erlang_available(), reason="Erlang/OTP is not installed"),
    pytest.mark.timeout(60),
]

# Atoms the tests send (they would be accepted anyway, within the atom budgets).
TEST_ATOMS = [
    "h3_blocked",
    "h3_cancel",
    "h3_target",
    "got_it",
    "casted",
    "boom",
    "hi",
    "still_fine",
]

ALLOW = "[{erlang, node, 0}, {os, getpid, 0}, {lists, reverse, 1}, {sshrpc_test_funs, '_', '_'}]"


@pytest.fixture(scope="module")
def server_node() -> Iterator[ErlangNode]:
    node = ErlangNode()
    try:
        node.make_atoms(TEST_ATOMS)
        yield node
    finally:
        node.close()


@pytest.fixture(scope="module")
def server(
    server_node: ErlangNode, tmp_path_factory: pytest.TempPathFactory, client_key: Any
) -> Iterator[ErlangServer]:
    srv = start_erlang_server(
        server_node,
        tmp_path_factory.mktemp("erlang_server"),
        [client_key.public_line],
        allow=ALLOW,
        options="{max_frame, 33554432}",
    )
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def known_hosts(server: ErlangServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kh") / "known_hosts"
    path.write_text(server.known_hosts_line + "\n")
    return path


@pytest.fixture(scope="module")
def client(
    server: ErlangServer, tmp_path_factory: pytest.TempPathFactory, client_key: Any
) -> Iterator[ErlangNode]:
    """A client VM with ``C`` bound to a connection to ``server``."""
    user_dir = erlang_client_dir(
        tmp_path_factory.mktemp("erlang_client"), client_key.private, [server.known_hosts_line]
    )
    node = ErlangNode()
    try:
        node.eval(f"UserDir = {erl_string(user_dir)}")
        node.eval(
            f'{{ok, C}} = sshrpc:connect("127.0.0.1", {server.port}, '
            '[{user, "tester"}, {user_dir, UserDir}, {max_frame, 33554432}])'
        )
        node.eval("{ok, Hello} = sshrpc:server_info(C), #{session := Session} = Hello")
        yield node
    finally:
        node.close()


@pytest.fixture
def raw(server: ErlangServer, known_hosts: Path, client_key: Any) -> Iterator[RawChannel]:
    ch = RawChannel(server.port, client_key.private, known_hosts)
    try:
        yield ch
    finally:
        ch.close()


def sshrpc_error(reason: str) -> str:
    return f"{{error,{{sshrpc,{reason},"


# --- calls through the Erlang client ------------------------------------------


def test_hello_names_the_server(client: ErlangNode, server_node: ErlangNode) -> None:
    info = client.eval("Hello")
    assert info[Atom("node")] == server_node.eval("node()")
    assert set(info[Atom("features")]) >= {"call", "cast", "cancel", "stream", "spawn", "ping"}
    assert info[Atom("max_calls")] == 1024
    assert client.eval("is_pid(Session)") is True


def test_calls_run_in_the_server_vm(client: ErlangNode, server_node: ErlangNode) -> None:
    assert client.eval("sshrpc:call(C, erlang, node, [])") == ("ok", server_node.eval("node()"))
    pid = client.eval("sshrpc:call(C, os, getpid, [])")
    assert pid == ("ok", [ord(c) for c in str(server_node.pid)])
    assert client.eval("sshrpc:call(C, lists, reverse, [[1, 2, 3]])") == ("ok", [3, 2, 1])


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("sshrpc:call(C, sshrpc_test_funs, raise, [error, badarith])",
         "{error,{error,badarith,#{}}}"),
        ("sshrpc:call(C, sshrpc_test_funs, raise, [exit, {shutdown, x}])",
         "{error,{exit,{shutdown,x},#{}}}"),
        ("sshrpc:call(C, sshrpc_test_funs, raise, [throw, 42])", "{error,{throw,42,#{}}}"),
        ("sshrpc:call(C, sshrpc_test_funs, add, [1, a])", "{error,{error,badarith,#{}}}"),
        ("sshrpc:call(C, lists, sort, [[2, 1]])", sshrpc_error("forbidden")),
        ("sshrpc:call(C, lists, reverse, [[1], []])", sshrpc_error("forbidden")),
        ("sshrpc:call(C, ok, ok, [])", sshrpc_error("forbidden")),
        ("sshrpc:call(C, os, cmd, [\"id\"])", sshrpc_error("forbidden")),
        ("sshrpc:call(C, sshrpc_test_funs, reverse, [1])", sshrpc_error("undef")),
        ("sshrpc:call(C, sshrpc_test_funs, echo, [1, 2])", sshrpc_error("undef")),
    ],
)  # fmt: skip
def test_error_classes(client: ErlangNode, expr: str, expected: str) -> None:
    text = client.eval_text(expr)
    assert text.replace(" ", "").replace("\n", "").startswith(expected), text
    assert "trace" not in text and ".erl" not in text


def test_timeout_stops_the_worker(client: ErlangNode, server_node: ErlangNode) -> None:
    assert client.eval_text("sshrpc:call(C, sshrpc_test_funs, block, [h3_blocked], 300)") == (
        "{error,{sshrpc,timeout,#{}}}"
    )
    server_node.wait_until("whereis(h3_blocked) =:= undefined")
    assert client.eval("sshrpc:call(C, sshrpc_test_funs, echo, [still_fine])") == (
        "ok",
        "still_fine",
    )


def test_1000_concurrent_calls_from_1000_processes(client: ErlangNode) -> None:
    ok = client.eval(
        "Self = self(), "
        "[spawn(fun() -> Self ! {h3, I, sshrpc:call(C, sshrpc_test_funs, echo, [{I, <<I:32>>}])} "
        "end) || I <- lists:seq(1, 1000)], "
        "lists:all(fun(I) -> receive {h3, I, {ok, {I, <<I:32>>}}} -> true "
        "after 20000 -> false end end, lists:seq(1, 1000))"
    )
    assert ok is True


def test_16_mib_binary_both_ways(client: ErlangNode) -> None:
    assert client.eval(
        "Big = crypto:strong_rand_bytes(16 * 1048576), "
        "{ok, Back} = sshrpc:call(C, sshrpc_test_funs, echo, [Big]), Back =:= Big"
    )
    assert client.eval(
        "{ok, S} = sshrpc:call(C, sshrpc_test_funs, sized, [16777216]), byte_size(S)"
    )


def test_replies_and_requests_of_many_sizes(client: ErlangNode) -> None:
    # The original implementation closed its channel after the first reply
    # whose size differed from the request's.
    sizes = sorted(
        set(range(0, 300))
        | {(1 << k) + d for k in range(8, 21) for d in (-1, 0, 1)}
        | {32768 - 13, 65536 * 3 + 7}
    )
    sizes_erl = "[" + ",".join(map(str, sizes)) + "]"
    mismatched = client.eval(
        f"[N || N <- {sizes_erl}, "
        'not ({ok, binary:copy(<<"x">>, N)} =:= sshrpc:call(C, sshrpc_test_funs, sized, [N]))]'
    )
    assert mismatched == []
    mismatched = client.eval(
        f"[N || N <- {sizes_erl}, B <- [binary:copy(<<7>>, N)], "
        "not ({ok, B} =:= sshrpc:call(C, sshrpc_test_funs, echo, [B]))]"
    )
    assert mismatched == []


def test_answer_larger_than_the_clients_max_frame(client: ErlangNode, server: ErlangServer) -> None:
    client.eval(
        f'{{ok, Small}} = sshrpc:connect("127.0.0.1", {server.port}, '
        '[{user, "tester"}, {user_dir, UserDir}, {max_frame, 4096}])'
    )
    assert (
        client.eval_text("sshrpc:call(Small, sshrpc_test_funs, sized, [5000])")
        .replace("\n", "")
        .replace(" ", "")
        .startswith(sshrpc_error("too_large"))
    )
    assert client.eval("sshrpc:call(Small, sshrpc_test_funs, sized, [3000])")[0] == "ok"
    assert client.eval("sshrpc:close(Small)") == "ok"


def test_spawn_send_down_and_session_mailbox(client: ErlangNode) -> None:
    client.eval("{ok, P} = sshrpc:spawn(C, sshrpc_test_funs, loop, [])")
    client.eval("sshrpc:send(C, P, {ping, Session})")
    assert client.eval(
        "receive {sshrpc, C, {send, Session, {pong, P}}} -> true after 5000 -> false end"
    )
    client.eval("sshrpc:send(C, P, {crash, boom})")
    assert client.eval("receive {sshrpc, C, {down, P, R}} -> R after 5000 -> timeout end") == (
        "error",
        "boom",
    )
    assert client.eval("sshrpc:call(C, sshrpc_test_funs, notify, [Session, {hi, 1}])") == (
        "ok",
        "ok",
    )
    assert client.eval(
        "receive {sshrpc, C, {send, Session, {hi, 1}}} -> true after 5000 -> false end"
    )
    client.eval("sshrpc:cast(C, sshrpc_test_funs, notify, [Session, casted])")
    assert client.eval("receive {sshrpc, C, {send, _, casted}} -> true after 5000 -> false end")
    assert client.eval_text("sshrpc:spawn(C, erlang, halt, [])").startswith(
        sshrpc_error("forbidden")
    )


def test_send_to_unlisted_names_is_refused(client: ErlangNode, server_node: ErlangNode) -> None:
    server_node.eval("register(h3_target, spawn(fun() -> receive M -> exit(M) end end))")
    client.eval("sshrpc:send(C, h3_target, got_it), sshrpc:send(C, init, {stop, stop})")
    # Frames are handled in order: once the ping is answered the sends were.
    assert client.eval("element(1, sshrpc:ping(C))") == "ok"
    assert server_node.eval("is_pid(whereis(h3_target))") is True
    assert server_node.eval("is_process_alive(whereis(init))") is True


def test_close_fails_later_calls(client: ErlangNode, server: ErlangServer) -> None:
    client.eval(
        f'{{ok, C2}} = sshrpc:connect("127.0.0.1", {server.port}, '
        '[{user, "tester"}, {user_dir, UserDir}])'
    )
    assert client.eval("sshrpc:close(C2)") == "ok"
    assert client.eval_text("sshrpc:call(C2, erlang, node, [])").startswith(
        "{error,{sshrpc,closed,"
    )


def test_unknown_host_key_is_refused(
    client: ErlangNode, server: ErlangServer, tmp_path: Path, client_key: Any
) -> None:
    d = erlang_client_dir(tmp_path / "u", client_key.private, [])
    opts = f'[{{user, "t"}}, {{user_dir, {erl_string(d)}}}]'
    text = client.eval_text(f'sshrpc:connect("127.0.0.1", {server.port}, {opts})')
    assert text.startswith("{error,")


# --- the protocol seen by OpenSSH's client ------------------------------------


def test_cancel_stops_the_worker_with_one_answer(raw: RawChannel, server_node: ErlangNode) -> None:
    hello(raw)
    raw.send((Atom("call"), 7, Atom("sshrpc_test_funs"), Atom("block"), [Atom("h3_cancel")]))
    server_node.wait_until("is_pid(whereis(h3_cancel))")
    raw.send((Atom("cancel"), 7))
    raw.send((Atom("cancel"), 7))
    raw.send((Atom("ping"), 1))
    assert raw.recv() == ("error", 7, ("sshrpc", "cancelled", {}))
    assert raw.recv() == ("pong", 1)
    server_node.wait_until("whereis(h3_cancel) =:= undefined")


def test_stream_honours_credit(raw: RawChannel) -> None:
    hello(raw)
    opts = {Atom("stream"): True, Atom("credit"): 2}
    raw.send((Atom("call"), 1, Atom("sshrpc_test_funs"), Atom("stream"), [5], opts))
    assert raw.recv() == ("chunk", 1, 1)
    assert raw.recv() == ("chunk", 1, 2)
    raw.send((Atom("ping"), 2))
    assert raw.recv() == ("pong", 2)
    raw.send((Atom("credit"), 1, 10))
    assert [raw.recv() for _ in range(4)] == [
        ("chunk", 1, 3),
        ("chunk", 1, 4),
        ("chunk", 1, 5),
        ("reply", 1, "done"),
    ]


def test_answers_in_any_order_and_bye_drains(raw: RawChannel) -> None:
    hello(raw)
    raw.send((Atom("call"), 1, Atom("sshrpc_test_funs"), Atom("sleep"), [300]))
    raw.send((Atom("call"), 2, Atom("sshrpc_test_funs"), Atom("echo"), [b"fast"]))
    assert raw.recv() == ("reply", 2, b"fast")
    raw.send((Atom("bye"), Atom("normal")))
    assert raw.recv() == ("reply", 1, "slept")
    assert raw.recv() == ("bye", "normal")
    raw.wait_closed()


def test_overload_beyond_max_calls(
    server_node: ErlangNode, tmp_path: Path, client_key: Any
) -> None:
    srv = start_erlang_server(
        server_node, tmp_path, [client_key.public_line], allow=ALLOW,
        options="{max_calls, 2}", ref="Small",
    )  # fmt: skip
    (tmp_path / "kh").write_text(srv.known_hosts_line + "\n")
    ch = RawChannel(srv.port, client_key.private, tmp_path / "kh")
    try:
        assert hello(ch)[Atom("max_calls")] == 2
        for i in (1, 2, 3):
            ch.send((Atom("call"), i, Atom("sshrpc_test_funs"), Atom("sleep"), [200]))
        assert ch.recv() == ("error", 3, ("sshrpc", "overload", {}))
        assert sorted([ch.recv(), ch.recv()]) == [("reply", 1, "slept"), ("reply", 2, "slept")]
        ch.send((Atom("call"), 3, Atom("sshrpc_test_funs"), Atom("echo"), [3]))
        assert ch.recv() == ("reply", 3, 3)
    finally:
        ch.close()
        srv.stop()


def test_malformed_requests(raw: RawChannel) -> None:
    hello(raw)
    raw.send((Atom("call"), 1, b"lists", Atom("reverse"), [[1]]))
    raw.send((Atom("call"), 2, Atom("lists"), Atom("reverse"), Atom("ok")))
    raw.send((Atom("call"), 3, Atom("lists"), Atom("reverse"), [[1]], {Atom("timeout"): -1}))
    raw.send((Atom("call"), 4))
    raw.send((Atom("info"), 1, 2))  # an unknown tag (that the server knows as an atom)
    raw.send((Atom("call"), 5, Atom("lists"), Atom("reverse"), [[1, 2]]))
    for i in (1, 2, 3, 4):
        tag, rid, (cls, reason, _details) = raw.recv()
        assert (tag, rid, cls, reason) == ("error", i, "sshrpc", "badarg")
    assert raw.recv() == ("reply", 5, [2, 1])


def test_duplicate_id_is_a_protocol_error(raw: RawChannel) -> None:
    hello(raw)
    raw.send((Atom("call"), 9, Atom("sshrpc_test_funs"), Atom("sleep"), [2000]))
    raw.send((Atom("call"), 9, Atom("sshrpc_test_funs"), Atom("echo"), [1]))
    tag, (what, detail) = raw.recv()
    assert (tag, what) == ("bye", "protocol_error")
    assert b"9" in detail
    raw.wait_closed()


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"\x83h\x02d\x00\x05hello", b"truncated"),
        (b"\x83\xff", b"unknown tag 255 at byte 1"),
        (b"\x84a\x01", b"131"),
        (b"\x83a\x01\x00", b"trailing bytes"),
    ],
)
def test_bad_term_ends_the_session_with_detail(
    raw: RawChannel, payload: bytes, fragment: bytes
) -> None:
    hello(raw)
    raw.send_bytes(len(payload).to_bytes(4, "big") + payload)
    tag, (what, detail) = raw.recv()
    assert (tag, what) == ("bye", "bad_term")
    assert fragment in detail and b"at byte" in detail
    raw.wait_closed()


def test_unknown_atoms_are_answered_not_fatal(raw: RawChannel) -> None:
    # Atoms the node does not know are accepted within its atom budgets
    # (test_erlang_parity.py tests the budgets): forbidden, and the channel stays.
    hello(raw)
    raw.send((Atom("call"), 1, Atom("h3_no_such_module_xq"), Atom("f"), []))
    tag, rid, (cls, reason, _details) = raw.recv()
    assert (tag, rid, cls, reason) == ("error", 1, "sshrpc", "forbidden")
    raw.send((Atom("ping"), Atom("h3_fresh_token_xq")))
    assert raw.recv() == ("pong", "h3_fresh_token_xq")


def test_frame_too_large_before_reading_it(raw: RawChannel) -> None:
    raw.send_bytes((1 << 20 | 1).to_bytes(4, "big") + b"\x83")
    assert raw.recv() == ("bye", ("frame_too_large", (1 << 20) + 1, 1 << 20))
    raw.wait_closed()


def test_first_frame_must_be_hello_or_mfa(raw: RawChannel) -> None:
    raw.send_bytes(b"\x00\x00\x00\x00")  # keepalive: ignored
    raw.send((Atom("hello"), 2, {}))
    assert raw.recv() == ("bye", ("unsupported_version", [1]))


def test_legacy_mfa_mode(raw: RawChannel) -> None:
    raw.send((Atom("mfa"), (Atom("lists"), Atom("reverse"), [[1, 2, 3]])))
    raw.send((Atom("mfa"), (Atom("lists"), Atom("sort"), [[1]])))
    raw.send((Atom("mfa"), (Atom("sshrpc_test_funs"), Atom("raise"), [Atom("error"), 1])))
    raw.send((Atom("ok"), 1))
    raw.send((Atom("mfa"), (Atom("lists"), Atom("reverse"), ImproperList([1], 2))))
    raw.send((Atom("mfa"), (Atom("sshrpc_test_funs"), Atom("sized"), [70000])))
    assert raw.recv() == ("answer", ([3, 2, 1], 0))
    assert raw.recv() == ("answer", (("exec_badrpc", "forbidden"), -1))
    assert raw.recv() == ("answer", (("exec_badrpc", ("error", 1)), -1))
    assert raw.recv() == ("answer", (("exec_error", ("ok", 1)), -1))
    assert raw.recv() == (
        "answer",
        (("exec_error", ("mfa", ("lists", "reverse", ImproperList([1], 2)))), -1),
    )
    assert raw.recv(timeout=20) == ("answer", (b"x" * 70000, 0))


def test_plain_subsystem_name_is_served(
    server: ErlangServer, known_hosts: Path, client_key: Any
) -> None:
    ch = RawChannel(server.port, client_key.private, known_hosts, subsystem="sshrpc")
    try:
        assert hello(ch)[Atom("server")].startswith(b"sshrpc-erlang/")
    finally:
        ch.close()


@pytest.mark.parametrize(
    ("options", "command"),
    [([], ["erlang:halt()."]), (["-s"], ["sftp"]), (["-tt"], [])],
    ids=["exec", "sftp", "shell"],
)
def test_exec_shell_and_other_subsystems_are_refused(
    server: ErlangServer,
    known_hosts: Path,
    client_key: Any,
    server_node: ErlangNode,
    options: list[str],
    command: list[str],
) -> None:
    argv = [
        "ssh", "-F", "/dev/null", *options, "-p", str(server.port), "-i", str(client_key.private),
        "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
        "-o", f"UserKnownHostsFile={known_hosts}", "-o", "BatchMode=yes",
        "-o", "LogLevel=ERROR", "tester@127.0.0.1", *command,
    ]  # fmt: skip
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    assert proc.returncode != 0, proc
    assert b"request failed on channel" in proc.stderr, proc.stderr
    assert server_node.eval("1 + 1") == 2


def test_traces_only_when_the_operator_exposes_them(
    server_node: ErlangNode, tmp_path: Path, client_key: Any
) -> None:
    srv = start_erlang_server(
        server_node, tmp_path, [client_key.public_line], allow=ALLOW,
        options="{expose_traces, true}", ref="Traced",
    )  # fmt: skip
    (tmp_path / "kh").write_text(srv.known_hosts_line + "\n")
    ch = RawChannel(srv.port, client_key.private, tmp_path / "kh")
    try:
        hello(ch)
        ch.send((Atom("call"), 1, Atom("sshrpc_test_funs"), Atom("add"), [1, Atom("ok")]))
        tag, rid, (cls, reason, details) = ch.recv()
        assert (tag, rid, cls, reason) == ("error", 1, "error", "badarith")
        assert any(b"sshrpc_test_funs" in frame for frame in details["trace"])
    finally:
        ch.close()
        srv.stop()


def test_a_client_that_does_not_read_cannot_keep_sending(raw: RawChannel) -> None:
    # 400 requests of 64 KiB whose answers are 64 KiB each. Without reading the
    # answers, the server's window to us fills, its answer queue passes
    # max_out_bytes, it stops reading, and our writes block long before all
    # 25 MiB of requests are taken. Then reading lets every call finish.
    hello(raw)
    payload = b"r" * 65536
    frames = b"".join(
        len(p).to_bytes(4, "big") + p
        for p in (
            sshrpc.encode((Atom("call"), i, Atom("sshrpc_test_funs"), Atom("echo"), [payload]))
            for i in range(400)
        )
    )
    assert raw.proc.stdin is not None and raw.proc.stdout is not None
    fd_in = raw.proc.stdin.fileno()
    os.set_blocking(fd_in, False)
    sent = 0
    deadline = time.monotonic() + 20
    while sent < len(frames) and time.monotonic() < deadline:
        _, writable, _ = select.select([], [fd_in], [], 0.5)
        if not writable:
            break  # blocked for half a second: the server stopped reading
        try:
            sent += os.write(fd_in, frames[sent : sent + 65536])
        except BlockingIOError:
            continue
    assert sent < len(frames) // 2, f"the server took {sent} bytes without being read"
    answered: set[int] = set()
    fd_out = raw.proc.stdout.fileno()
    deadline = time.monotonic() + 30
    while len(answered) < 400:
        assert time.monotonic() < deadline, f"{len(answered)} answers"
        want_write = [fd_in] if sent < len(frames) else []
        readable, writable, _ = select.select([fd_out], want_write, [], 1.0)
        if writable:
            with contextlib.suppress(BlockingIOError):
                sent += os.write(fd_in, frames[sent : sent + 65536])
        if readable:
            raw._fill(len(raw._buf) + 1, time.monotonic() + 5)
            while len(raw._buf) >= 4 and len(raw._buf) >= 4 + int.from_bytes(raw._buf[:4], "big"):
                tag, rid, value = raw.recv()
                assert (tag, value) == ("reply", payload)
                answered.add(rid)
    assert answered == set(range(400))
