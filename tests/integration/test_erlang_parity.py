"""The Erlang daemon at parity with the Python node (issue 14).

- Atoms the node does not know are accepted within a per-session and a
  node-wide budget; past a budget the request is answered, the channel kept.
- Processes a session spawned and casts it runs end with the session.
- Per-key policy and one audit line per call through ``logger``.
- The Erlang client's streams (with credit) and multicall; its own atom
  budget; the rebar3 layout.

Real VMs (erlang_helpers), OTP's ssh daemon, OpenSSH's ``ssh -s`` for
hand-built frames and the Python client (``sshrpc.open_connection``).
"""

from __future__ import annotations

import itertools
import os
import signal
import uuid
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
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
from sshrpc import Atom

pytestmark = [
    pytest.mark.skipif(not erlang_available(), reason="Erlang/OTP is not installed"),
    pytest.mark.timeout(60),
]

ALLOW = "[{erlang, node, 0}, {lists, reverse, 1}, {sshrpc_test_funs, '_', '_'}]"

_serial = itertools.count()


def fresh(n: int = 1, prefix: str = "fresh") -> list[str]:
    """Atom names no VM has seen: unique per call, per test run."""
    run = uuid.uuid4().hex[:10]
    return [f"{prefix}_{run}_{next(_serial)}_{i}" for i in range(n)]


def erl_atom(name: str) -> str:
    return "'" + name.replace("\\", "\\\\").replace("'", "\\'") + "'"


@pytest.fixture(scope="module")
def server_node() -> Iterator[ErlangNode]:
    node = ErlangNode()
    try:
        yield node
    finally:
        node.close()


@pytest.fixture(scope="module")
def server(
    server_node: ErlangNode, tmp_path_factory: pytest.TempPathFactory, client_key: Any
) -> Iterator[ErlangServer]:
    srv = start_erlang_server(
        server_node, tmp_path_factory.mktemp("parity"), [client_key.public_line], allow=ALLOW
    )
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client_node(
    server: ErlangServer, tmp_path_factory: pytest.TempPathFactory, client_key: Any
) -> Iterator[ErlangNode]:
    """A client VM with ``UserDir`` bound (its key and the server's host key)."""
    user_dir = erlang_client_dir(
        tmp_path_factory.mktemp("parity_client"), client_key.private, [server.known_hosts_line]
    )
    node = ErlangNode()
    try:
        node.eval(f"UserDir = {erl_string(user_dir)}")
        yield node
    finally:
        node.close()


def connect(client_node: ErlangNode, srv: ErlangServer, var: str) -> None:
    """Bind ``var`` in the client VM to a connection to ``srv``."""
    client_node.eval(
        f'{{ok, {var}}} = sshrpc:connect("127.0.0.1", {srv.port}, '
        '[{user, "tester"}, {user_dir, UserDir}])'
    )


def raw_channel(srv: ErlangServer, tmp_path: Path, client_key: Any) -> RawChannel:
    kh = tmp_path / f"kh_{srv.port}"
    kh.write_text(srv.known_hosts_line + "\n")
    return RawChannel(srv.port, client_key.private, kh)


def exists_in(node: ErlangNode, name: str) -> bool:
    return node.eval(  # type: ignore[no-any-return]
        f"try binary_to_existing_atom(<<{erl_string(name)}/utf8>>) of _ -> true "
        "catch error:badarg -> false end"
    )


def node_atoms(node: ErlangNode) -> int:
    return node.eval("maps:get(new_atoms, sshrpc_server:atom_statistics())")  # type: ignore[no-any-return]


# --- atoms: an ordinary client keeps its channel ------------------------------


def test_erlang_client_sends_fresh_atoms_in_every_message(
    client_node: ErlangNode, server_node: ErlangNode, server: ErlangServer
) -> None:
    connect(client_node, server, "A1")
    client_node.eval("{ok, #{session := A1S}} = sshrpc:server_info(A1)")
    tag, key, elem, mod, fn, msg = (erl_atom(a) for a in fresh(6))
    hw = erl_atom(f"Hello World {uuid.uuid4().hex}")
    # Echo of an atom, a tuple and a map holding fresh atoms.
    assert client_node.eval(f"{{ok, {hw}}} =:= sshrpc:call(A1, sshrpc_test_funs, echo, [{hw}])")
    assert client_node.eval(
        f"T = {{{tag}, #{{{key} => [{elem}, {{{elem}}}]}}}}, "
        "{ok, T} =:= sshrpc:call(A1, sshrpc_test_funs, echo, [T])"
    )
    # A module and a function the node cannot know: forbidden and undef.
    assert client_node.eval_text(f"sshrpc:call(A1, {mod}, {fn}, [])").startswith(
        "{error,{sshrpc,forbidden,"
    )
    assert client_node.eval_text(f"sshrpc:call(A1, sshrpc_test_funs, {fn}, [{elem}])").startswith(
        "{error,{sshrpc,undef,"
    )
    # A cast and a spawned process carrying fresh atoms; a send with a fresh tag.
    client_node.eval(f"sshrpc:cast(A1, sshrpc_test_funs, notify, [A1S, {{{tag}, {msg}}}])")
    assert client_node.eval(
        f"receive {{sshrpc, A1, {{send, A1S, {{{tag}, {msg}}}}}}} -> true after 5000 -> false end"
    )
    client_node.eval("{ok, A1P} = sshrpc:spawn(A1, sshrpc_test_funs, loop, [])")
    client_node.eval(f"sshrpc:send(A1, A1P, {{{erl_atom(fresh()[0])}, 1}})")
    client_node.eval("sshrpc:send(A1, A1P, {ping, A1S})")
    assert client_node.eval(
        "receive {sshrpc, A1, {send, A1S, {pong, A1P}}} -> true after 5000 -> false end"
    )
    # The same channel throughout: one connection process, still answering.
    assert client_node.eval("element(1, sshrpc:ping(A1))") == "ok"
    assert client_node.eval("is_process_alive(A1)") is True
    assert exists_in(server_node, mod.strip("'"))
    client_node.eval("sshrpc:close(A1)")


def test_raw_fresh_atoms_in_tokens_tags_and_legacy_frames(
    server: ErlangServer, tmp_path: Path, client_key: Any
) -> None:
    ch = raw_channel(server, tmp_path, client_key)
    try:
        hello(ch)
        token = (Atom(fresh()[0]), {Atom(fresh()[0]): [Atom(fresh()[0])]})
        ch.send((Atom("ping"), token))
        assert ch.recv() == ("pong", token)
        ch.send((Atom(fresh(prefix="tag")[0]), 1, 2))  # an unknown, fresh tag: ignored
        ch.send((Atom("call"), 1, Atom("lists"), Atom("reverse"), [[Atom(fresh()[0])]]))
        tag, rid, value = ch.recv()
        assert (tag, rid) == ("reply", 1) and len(value) == 1
    finally:
        ch.close()
    legacy = raw_channel(server, tmp_path, client_key)
    try:
        legacy.send((Atom("mfa"), (Atom(fresh()[0]), Atom("f"), [])))
        assert legacy.recv() == ("answer", (("exec_badrpc", "forbidden"), -1))
        echo = Atom(fresh()[0])
        legacy.send((Atom("mfa"), (Atom("sshrpc_test_funs"), Atom("echo"), [echo])))
        assert legacy.recv() == ("answer", (echo, 0))
    finally:
        legacy.close()


@pytest.fixture
async def py_conn(server: ErlangServer, tmp_path: Path, client_key: Any) -> AsyncIterator[Any]:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(server.known_hosts_line + "\n")
    async with sshrpc.open_connection(
        "127.0.0.1",
        port=server.port,
        user="tester",
        identity=str(client_key.private),
        known_hosts=str(known_hosts),
        agent=False,
    ) as conn:
        yield conn


async def test_python_client_sends_fresh_atoms_in_every_message(py_conn: Any) -> None:
    hw = Atom(f"Hello World {uuid.uuid4().hex}")
    assert await py_conn.call("sshrpc_test_funs", "echo", [hw]) == hw
    a, b, c = (Atom(x) for x in fresh(3))
    value = (a, {b: [c, (c,)]}, [a, b])
    assert await py_conn.call("sshrpc_test_funs", "echo", [value]) == value
    with pytest.raises(sshrpc.Forbidden):
        await py_conn.call(fresh()[0], fresh()[0], [])
    with pytest.raises(sshrpc.Undef):
        await py_conn.call("sshrpc_test_funs", fresh()[0], [a])
    session = py_conn.hello["session"]
    await py_conn.cast("sshrpc_test_funs", "notify", [session, (a, Atom(fresh()[0]))])
    with trio.fail_after(10):
        assert (await py_conn.receive())[0] == a
    pid = await py_conn.spawn("sshrpc_test_funs", "loop", [])
    await py_conn.send(pid, (Atom(fresh()[0]), 1))
    await py_conn.send(pid, (Atom("ping"), session))
    with trio.fail_after(10):
        assert await py_conn.receive() == ("pong", pid)
    await py_conn.ping()
    assert await py_conn.call("lists", "reverse", [[1, 2]]) == [2, 1]


# --- atoms: the budgets ------------------------------------------------------


def test_session_budget_answers_instead_of_closing(
    server_node: ErlangNode, tmp_path: Path, client_key: Any
) -> None:
    srv = start_erlang_server(
        server_node, tmp_path, [client_key.public_line], allow=ALLOW,
        options="{max_session_atoms, 10}", ref="SessionBudget",
    )  # fmt: skip
    ch = raw_channel(srv, tmp_path, client_key)
    try:
        hello(ch)
        first = [Atom(x) for x in fresh(6)]
        ch.send((Atom("call"), 1, Atom("sshrpc_test_funs"), Atom("echo"), [first + first]))
        assert ch.recv() == ("reply", 1, first + first)  # six distinct atoms, counted once
        before = node_atoms(server_node)
        refused = fresh(6)
        ch.send(
            (Atom("call"), 2, Atom("sshrpc_test_funs"), Atom("echo"), [list(map(Atom, refused))])
        )
        tag, rid, (cls, reason, details) = ch.recv()
        assert (tag, rid, cls, reason) == ("error", 2, "sshrpc", "badarg")
        assert details["reason"] == "atom_limit" and details["scope"] == "session"
        # The walk stops one atom past what the budget still allows (4 left).
        assert (details["new_atoms"], details["limit"]) == (5, 10)
        assert b"more than 4 atoms unknown" in details["message"]
        # Refused spawns, casts and sends, and a ping whose token is refused too.
        ch.send((Atom("spawn"), 3, Atom(refused[0]), Atom("f"), list(map(Atom, refused))))
        ch.send((Atom("cast"), Atom("sshrpc_test_funs"), Atom("echo"), list(map(Atom, refused))))
        ch.send((Atom("send"), Atom(refused[0]), list(map(Atom, refused))))
        token = (list(map(Atom, refused)), 7)
        ch.send((Atom("ping"), token))
        assert ch.recv()[:2] == ("error", 3)
        assert ch.recv() == ("pong", token)
        # Nothing was created, and the session still serves known atoms and
        # new ones within what is left.
        assert not any(exists_in(server_node, name) for name in refused)
        assert node_atoms(server_node) == before
        ch.send((Atom("call"), 4, Atom("sshrpc_test_funs"), Atom("echo"), [Atom(refused[0])]))
        assert ch.recv() == ("reply", 4, refused[0])
        ch.send((Atom("call"), 5, Atom("lists"), Atom("reverse"), [[1, 2]]))
        assert ch.recv() == ("reply", 5, [2, 1])
    finally:
        ch.close()
    legacy = raw_channel(srv, tmp_path, client_key)
    try:
        legacy.send(
            (Atom("mfa"), (Atom("sshrpc_test_funs"), Atom("echo"), [list(map(Atom, fresh(11)))]))
        )
        assert legacy.recv() == ("answer", (("exec_badrpc", "atom_limit"), -1))
        legacy.send((Atom("mfa"), (Atom("lists"), Atom("reverse"), [[1]])))
        assert legacy.recv() == ("answer", ([1], 0))
    finally:
        legacy.close()
        srv.stop()


async def test_python_client_past_the_session_budget_keeps_its_connection(
    server_node: ErlangNode, tmp_path: Path, client_key: Any
) -> None:
    srv = await trio.to_thread.run_sync(
        lambda: start_erlang_server(
            server_node, tmp_path, [client_key.public_line], allow=ALLOW,
            options="{max_session_atoms, 8}", ref="PyBudget",
        )
    )  # fmt: skip
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(srv.known_hosts_line + "\n")
    try:
        async with sshrpc.open_connection(
            "127.0.0.1", port=srv.port, user="tester", identity=str(client_key.private),
            known_hosts=str(known_hosts), agent=False,
        ) as conn:  # fmt: skip
            five = [Atom(x) for x in fresh(5)]
            assert await conn.call("sshrpc_test_funs", "echo", [five]) == five
            with pytest.raises(sshrpc.RemoteError) as info:
                await conn.call("sshrpc_test_funs", "echo", [[Atom(x) for x in fresh(5)]])
            err = info.value
            assert (err.cls, err.reason) == ("sshrpc", "badarg")
            assert (err.details["reason"], err.details["scope"]) == ("atom_limit", "session")
            assert b"session budget of 8" in err.details["message"]
            assert await conn.call("sshrpc_test_funs", "echo", [five[:2]]) == five[:2]
            await conn.ping()
    finally:
        await trio.to_thread.run_sync(srv.stop)


def test_atoms_inside_funs_pids_and_refs_are_counted(
    server_node: ErlangNode, client_node: ErlangNode, tmp_path: Path, client_key: Any
) -> None:
    # A fun's module and free variables, and a pid's node, are atoms that
    # binary_to_term would create too: they count against the budget.
    srv = start_erlang_server(
        server_node, tmp_path, [client_key.public_line], allow=ALLOW,
        options="{max_session_atoms, 3}", ref="FunBudget",
    )  # fmt: skip
    names = fresh(5, "infun")
    payload = client_node.eval(
        f"FunEnv = {{{', '.join(erl_atom(n) for n in names[1:4])}}}, "
        "term_to_binary({call, 1, sshrpc_test_funs, echo, "
        f"[{erl_atom(names[0])}, fun() -> FunEnv end]}})"
    )
    pid_payload = client_node.eval(
        "term_to_binary({call, 2, sshrpc_test_funs, echo, "
        f'[binary_to_term(<<131, 88, 119, {len(names[4]) + 5}, "{names[4]}@host", '
        "0:32, 0:32, 0:32>>)]})"
    )
    ch = raw_channel(srv, tmp_path, client_key)
    try:
        hello(ch)
        ch.send_bytes(len(payload).to_bytes(4, "big") + payload)
        tag, rid, (cls, reason, details) = ch.recv()
        assert (tag, rid, cls, reason) == ("error", 1, "sshrpc", "badarg")
        # One outside the fun and, inside it, three of ours and the names of
        # the variables it closes over ('FunEnv', ...): the walk stops at the
        # fourth, one past the budget of 3.
        assert details["new_atoms"] == 4
        assert not any(exists_in(server_node, n) for n in names[:4])
        ch.send_bytes(len(pid_payload).to_bytes(4, "big") + pid_payload)
        tag, rid, _pid = ch.recv()
        assert (tag, rid) == ("reply", 2)
        assert exists_in(server_node, names[4] + "@host")
    finally:
        ch.close()
        srv.stop()


def test_an_unreadable_envelope_past_the_budget_ends_the_session(
    server_node: ErlangNode, tmp_path: Path, client_key: Any
) -> None:
    srv = start_erlang_server(
        server_node, tmp_path, [client_key.public_line], allow=ALLOW,
        options="{max_session_atoms, 2}", ref="TinyBudget",
    )  # fmt: skip
    ch = raw_channel(srv, tmp_path, client_key)
    try:
        hello(ch)
        ch.send([Atom(x) for x in fresh(3)])  # not even a tuple: no envelope
        tag, (what, detail) = ch.recv()
        assert (tag, what) == ("bye", "atom_limit")
        assert b"session budget of 2" in detail
        ch.wait_closed()
    finally:
        ch.close()
        srv.stop()


def test_node_budget_across_sessions_each_under_their_own(
    server_node: ErlangNode, client_node: ErlangNode, tmp_path: Path, client_key: Any
) -> None:
    # Six sessions may add 40 atoms each; together they may add only 100 more
    # than the node holds now. Each sends 30: the first three get through,
    # the rest are answered atom_limit (scope node) and keep their channel.
    base = node_atoms(server_node)
    srv = start_erlang_server(
        server_node, tmp_path, [client_key.public_line], allow=ALLOW,
        options=f"{{max_session_atoms, 40}}, {{max_node_atoms, {base + 100}}}", ref="NodeBudget",
    )  # fmt: skip
    client_node.eval(f"NbKh = {erl_string(srv.known_hosts_line + chr(10))}")
    client_node.eval('file:write_file(filename:join(UserDir, "known_hosts"), NbKh, [append])')
    try:
        results = client_node.eval(
            "[begin "
            f'  {{ok, Cn}} = sshrpc:connect("127.0.0.1", {srv.port}, '
            '      [{user, "tester"}, {user_dir, UserDir}]), '
            f'  Names = [list_to_atom("nb_{uuid.uuid4().hex}_" ++ integer_to_list(I) ++ "_" '
            "           ++ integer_to_list(J)) || J <- lists:seq(1, 30)], "
            "  R = case sshrpc:call(Cn, sshrpc_test_funs, echo, [Names]) of "
            "        {ok, Names} -> ok; "
            "        {error, {sshrpc, badarg, #{reason := atom_limit, scope := S}}} -> S; "
            "        Other -> Other "
            "      end, "
            "  Alive = sshrpc:call(Cn, lists, reverse, [[1, 2]]), "
            "  sshrpc:close(Cn), "
            "  {R, Alive} "
            "end || I <- lists:seq(1, 6)]",
            timeout=40,
        )
        assert [r for r, _ in results] == ["ok", "ok", "ok", "node", "node", "node"]
        assert all(alive == ("ok", [2, 1]) for _, alive in results)
        assert node_atoms(server_node) == base + 90
    finally:
        srv.stop()


# --- lifetimes: nothing a session started outlives it --------------------------


def start_everything(ch: RawChannel, names: dict[str, str]) -> None:
    """Through ``ch``: two spawns (one trapping exits), a cast, a call and a
    stream waiting for credit, each registered on the server under its name."""
    ch.send((Atom("spawn"), 1, Atom("sshrpc_test_funs"), Atom("block"), [Atom(names["spawn"])]))
    ch.send((Atom("spawn"), 2, Atom("sshrpc_test_funs"), Atom("trap_block"), [Atom(names["trap"])]))
    ch.send((Atom("cast"), Atom("sshrpc_test_funs"), Atom("block"), [Atom(names["cast"])]))
    ch.send((Atom("call"), 3, Atom("sshrpc_test_funs"), Atom("block"), [Atom(names["call"])]))
    ch.send(
        (Atom("call"), 4, Atom("sshrpc_test_funs"), Atom("stream_forever"),
         [Atom(names["stream"])], {Atom("stream"): True, Atom("credit"): 1})
    )  # fmt: skip


def registered(node: ErlangNode, names: list[str]) -> str:
    return "[N || N <- [" + ",".join(erl_atom(n) for n in names) + "], is_pid(whereis(N))]"


def assert_all_end(node: ErlangNode, names: list[str]) -> None:
    node.wait_until(f"{registered(node, names)} =:= []", timeout=15)


def test_nothing_outlives_a_killed_openssh_client(
    server: ErlangServer, server_node: ErlangNode, tmp_path: Path, client_key: Any
) -> None:
    names = dict(zip(["spawn", "trap", "cast", "call", "stream"], fresh(5, "life"), strict=True))
    before = server_node.eval("erlang:system_info(process_count)")
    ch = raw_channel(server, tmp_path, client_key)
    try:
        hello(ch)
        start_everything(ch, names)
        server_node.wait_until(f"length({registered(server_node, list(names.values()))}) =:= 5")
        assert server_node.eval("erlang:system_info(process_count)") >= before + 10
        os.kill(ch.proc.pid, signal.SIGKILL)
        assert_all_end(server_node, list(names.values()))
        # Not only the named ones: the session's channel, writer and relay, the
        # connection's processes, every worker are gone too.
        server_node.wait_until(f"erlang:system_info(process_count) =< {before}")
    finally:
        ch.close()


def test_nothing_outlives_a_killed_erlang_client_vm(
    server: ErlangServer, server_node: ErlangNode, tmp_path: Path, client_key: Any
) -> None:
    names = dict(zip(["spawn", "trap", "cast", "call"], fresh(4, "life"), strict=True))
    user_dir = erlang_client_dir(tmp_path / "u", client_key.private, [server.known_hosts_line])
    vm = ErlangNode()
    try:
        vm.eval(
            f'{{ok, K}} = sshrpc:connect("127.0.0.1", {server.port}, '
            f'[{{user, "tester"}}, {{user_dir, {erl_string(user_dir)}}}])'
        )
        vm.eval(
            f"{{ok, _}} = sshrpc:spawn(K, sshrpc_test_funs, block, [{erl_atom(names['spawn'])}])"
        )
        vm.eval(
            "{ok, _} = sshrpc:spawn(K, sshrpc_test_funs, trap_block, "
            f"[{erl_atom(names['trap'])}])"
        )
        vm.eval(f"sshrpc:cast(K, sshrpc_test_funs, block, [{erl_atom(names['cast'])}])")
        vm.eval(
            "spawn(fun() -> sshrpc:call(K, sshrpc_test_funs, block, "
            f"[{erl_atom(names['call'])}]) end)"
        )
        server_node.wait_until(f"length({registered(server_node, list(names.values()))}) =:= 4")
        os.kill(vm.pid, signal.SIGKILL)
        vm.proc.wait(10)
        assert_all_end(server_node, list(names.values()))
    finally:
        vm.close()


async def test_nothing_outlives_a_closed_python_connection(
    server: ErlangServer, server_node: ErlangNode, tmp_path: Path, client_key: Any
) -> None:
    # Spawns and a cast, no open call (aclose would wait for it to drain:
    # the killed-client tests above cover calls).
    names = dict(zip(["spawn", "trap", "cast"], fresh(3, "life"), strict=True))
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(server.known_hosts_line + "\n")
    expr = f"length({registered(server_node, list(names.values()))}) =:= 3"
    async with sshrpc.open_connection(
        "127.0.0.1", port=server.port, user="tester", identity=str(client_key.private),
        known_hosts=str(known_hosts), agent=False,
    ) as conn:  # fmt: skip
        await conn.spawn("sshrpc_test_funs", "block", [Atom(names["spawn"])])
        await conn.spawn("sshrpc_test_funs", "trap_block", [Atom(names["trap"])])
        await conn.cast("sshrpc_test_funs", "block", [Atom(names["cast"])])
        await trio.to_thread.run_sync(server_node.wait_until, expr)
    await trio.to_thread.run_sync(assert_all_end, server_node, list(names.values()))


def test_detached_functions_outlive_the_session(
    server_node: ErlangNode, tmp_path: Path, client_key: Any
) -> None:
    srv = start_erlang_server(
        server_node, tmp_path, [client_key.public_line], allow=ALLOW,
        options="{detached, [{sshrpc_test_funs, block, 1}]}", ref="Detached",
    )  # fmt: skip
    names = dict(zip(["spawn", "trap", "cast", "call", "stream"], fresh(5, "life"), strict=True))
    ch = raw_channel(srv, tmp_path, client_key)
    try:
        hello(ch)
        start_everything(ch, names)
        server_node.wait_until(f"length({registered(server_node, list(names.values()))}) =:= 5")
        os.kill(ch.proc.pid, signal.SIGKILL)
        assert_all_end(server_node, [names["trap"], names["call"], names["stream"]])
        # block/1 is detached: its spawn and its cast live on (a call is
        # never detached: its answer is owed to the session).
        assert server_node.eval(registered(server_node, [names["spawn"], names["cast"]])) == [
            names["spawn"],
            names["cast"],
        ]
    finally:
        server_node.eval(
            f"[exit(whereis(N), kill) || N <- {registered(server_node, list(names.values()))}]"
        )
        ch.close()
        srv.stop()


# --- per-key policy and the audit line ----------------------------------------

POLICY = """\
# Every key: two functions. The ops key: the whole test module but raise.
[[rule]]
keys = ["*"]
allow = ["lists:reverse/1", "sshrpc_test_funs:echo"]

[[rule]]
keys = ['ops@*']                       # an authorized_keys comment glob
allow = [
    "sshrpc_test_funs",                # a whole module
]
deny = ["sshrpc_test_funs:raise/*"]    # deny beats allow

[[rule]]
keys = ["{fingerprint}"]               # one key, exactly
allow = ["erlang:node/0", "sshrpc_test_funs:s?eep/[0-9]"]
"""


@pytest.fixture(scope="module")
def ops_key(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from conftest import make_key

    return make_key(tmp_path_factory.mktemp("ops_key"), comment="ops@example.org")


@pytest.fixture(scope="module")
def policy_server(
    server_node: ErlangNode, tmp_path_factory: pytest.TempPathFactory, client_key: Any, ops_key: Any
) -> Iterator[ErlangServer]:
    directory = tmp_path_factory.mktemp("policy")
    policy = directory / "policy.toml"
    policy.write_text(POLICY.format(fingerprint=client_key.fingerprint))
    server_node.eval("ok = sshrpc_test_log:start()")
    srv = start_erlang_server(
        server_node, directory, [client_key.public_line, ops_key.public_line], allow=ALLOW,
        options=f"{{policy, {{file, {erl_string(policy)}}}}}", ref="PolicyDaemon",
    )  # fmt: skip
    try:
        yield srv
    finally:
        srv.stop()


def audit_lines(node: ErlangNode, needle: str) -> list[str]:
    lines = [b.decode() for b in node.eval("sshrpc_test_log:lines()")]
    return [line for line in lines if needle in line]


@pytest.mark.parametrize(
    ("who", "call", "outcome"),
    [
        ("default", (Atom("lists"), Atom("reverse"), [[1, 2]]), "ok"),
        ("default", (Atom("erlang"), Atom("node"), []), "ok"),  # by fingerprint
        ("default", (Atom("sshrpc_test_funs"), Atom("sleep"), [1]), "ok"),
        ("default", (Atom("sshrpc_test_funs"), Atom("add"), [1, 2]), "forbidden"),
        ("ops", (Atom("sshrpc_test_funs"), Atom("add"), [1, 2]), "ok"),
        ("ops", (Atom("sshrpc_test_funs"), Atom("raise"), [Atom("error"), 1]), "forbidden"),
        ("ops", (Atom("erlang"), Atom("node"), []), "forbidden"),
        ("ops", (Atom("lists"), Atom("reverse"), [[]]), "ok"),
    ],
)
def test_policy_per_key_with_an_audit_line_per_call(
    policy_server: ErlangServer,
    server_node: ErlangNode,
    tmp_path: Path,
    client_key: Any,
    ops_key: Any,
    who: str,
    call: tuple[Any, ...],
    outcome: str,
) -> None:
    key = ops_key if who == "ops" else client_key
    ch = raw_channel(policy_server, tmp_path, key)
    try:
        hello(ch)
        ch.send((Atom("call"), 1, *call))
        answer = ch.recv()
        if outcome == "ok":
            assert answer[:2] == ("reply", 1)
        else:
            assert answer[:2] == ("error", 1) and answer[2][:2] == ("sshrpc", "forbidden")
    finally:
        ch.close()
    m, f, args = call
    line = f"key={key.fingerprint} call {m}:{f}/{len(args)} outcome={outcome} duration_ms="
    server_node.wait_until(
        f"lists:any(fun(L) -> binary:match(L, <<{erl_string(line)}>>) =/= nomatch end, "
        "sshrpc_test_log:lines())"
    )


def test_audit_lines_for_cast_spawn_legacy_and_errors(
    policy_server: ErlangServer, server_node: ErlangNode, tmp_path: Path, ops_key: Any
) -> None:
    fp = ops_key.fingerprint
    ch = raw_channel(policy_server, tmp_path, ops_key)
    try:
        hello(ch)
        ch.send((Atom("cast"), Atom("sshrpc_test_funs"), Atom("echo"), [1]))
        ch.send((Atom("cast"), Atom("sshrpc_test_funs"), Atom("raise"), [Atom("error"), 1]))
        ch.send((Atom("spawn"), 1, Atom("sshrpc_test_funs"), Atom("loop"), []))
        ch.send((Atom("call"), 2, Atom("sshrpc_test_funs"), Atom("add"), [1, Atom("x")]))
        ch.send((Atom("call"), 3, Atom("sshrpc_test_funs"), Atom("sleep"), [5000],
                 {Atom("timeout"): 50}))  # fmt: skip
        ch.send((Atom("call"), 4, Atom("sshrpc_test_funs"), Atom("nosuch"), []))
        answers = {ch.recv()[1] for _ in range(4)}
        assert answers == {1, 2, 3, 4}
    finally:
        ch.close()
    legacy = raw_channel(policy_server, tmp_path, ops_key)
    try:
        legacy.send((Atom("mfa"), (Atom("lists"), Atom("reverse"), [[1]])))
        assert legacy.recv() == ("answer", ([1], 0))
    finally:
        legacy.close()
    expected = [
        f"key={fp} cast sshrpc_test_funs:echo/1 outcome=ok ",
        f"key={fp} cast sshrpc_test_funs:raise/2 outcome=forbidden ",
        f"key={fp} spawn sshrpc_test_funs:loop/0 outcome=ok ",
        f"key={fp} call sshrpc_test_funs:add/2 outcome=error ",
        f"key={fp} call sshrpc_test_funs:sleep/1 outcome=timeout ",
        f"key={fp} call sshrpc_test_funs:nosuch/0 outcome=undef ",
        f"key={fp} mfa lists:reverse/1 outcome=ok ",
    ]
    server_node.wait_until(
        "lists:all(fun(E) -> lists:any(fun(L) -> binary:match(L, E) =/= nomatch end, "
        "sshrpc_test_log:lines()) end, [" + ",".join(f"<<{erl_string(e)}>>" for e in expected)
        + "])"
    )  # fmt: skip


async def test_python_client_under_the_policy(
    policy_server: ErlangServer, server_node: ErlangNode, tmp_path: Path, ops_key: Any
) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(policy_server.known_hosts_line + "\n")
    async with sshrpc.open_connection(
        "127.0.0.1", port=policy_server.port, user="tester", identity=str(ops_key.private),
        known_hosts=str(known_hosts), agent=False,
    ) as conn:  # fmt: skip
        assert await conn.call("sshrpc_test_funs", "add", [2, 3]) == 5
        with pytest.raises(sshrpc.Forbidden):
            await conn.call("sshrpc_test_funs", "raise", [Atom("error"), 1])
    line = f"key={ops_key.fingerprint} call sshrpc_test_funs:add/2 outcome=ok"
    assert audit_lines(server_node, line)


# The policy file the Python node reads decides the same in Erlang.
PARITY_POLICY = """\
[[rule]]
keys = ["*"]
allow = ["lists", "echo:echo/1", "m?th:*/[12]", "x[!y]z:f"]
deny = ["lists:reverse/2"]

[[rule]]
keys = ["ops@*", "SHA256:abc"]
allow = ["*"]
deny = ["os:getpid/0", "os:cmd"]
"""


def test_the_python_nodes_policy_file_decides_the_same_in_erlang(
    server_node: ErlangNode, tmp_path: Path
) -> None:
    from sshrpc.policy import KeyIdentity, Policy

    path = tmp_path / "policy.toml"
    path.write_text(PARITY_POLICY)
    py = Policy.load(path)
    server_node.eval(f"{{ok, ParityPolicy}} = sshrpc_policy:load({erl_string(path)})")
    keys = [KeyIdentity(), KeyIdentity("SHA256:abc"), KeyIdentity("SHA256:zzz", "ops@host"),
            KeyIdentity("SHA256:zzz", "dev@host")]  # fmt: skip
    mfas = [("lists", "reverse", 1), ("lists", "reverse", 2), ("echo", "echo", 1),
            ("echo", "echo", 2), ("math", "pi", 1), ("moth", "x", 2), ("math", "pi", 3),
            ("xaz", "f", 0), ("xyz", "f", 0), ("os", "getpid", 0), ("os", "cmd", 1),
            ("os", "type", 0)]  # fmt: skip
    for key in keys:
        key_erl = (
            "unknown"
            if not key.fingerprint
            else f"#{{fingerprint => <<{erl_string(key.fingerprint)}>>, "
            f"comment => <<{erl_string(key.comment)}>>}}"
        )
        got = server_node.eval(
            f"[sshrpc_policy:permits(ParityPolicy, {key_erl}, M, F, A) || {{M, F, A}} <- "
            "[" + ",".join(f"{{{m}, {f}, {a}}}" for m, f, a in mfas) + "]]"
        )
        assert got == [py.permits(key, m, f, a) for m, f, a in mfas], key


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[[rule]]\nkeys = ["*"\n', "unterminated array"),
        ('[[rule]]\nallow = ["a"]\nallow = ["b"]\n', "line 3: 'allow' given twice"),
        ("[[rules]]\n", "line 1: unknown table [[rules]]"),
        ('allow = ["a"]\n', "line 1: a key outside [[rule]]"),
        ('[[rule]]\nalow = ["a"]\n', "line 2: unknown key 'alow'"),
        ('[[rule]]\nallow = "a"\n', "line 2: expected an array of strings"),
        ("[[rule]]\nallow = [1]\n", "line 2: unexpected character '1'"),
    ],
)
def test_a_bad_policy_file_starts_nothing(
    server_node: ErlangNode, tmp_path: Path, client_key: Any, text: str, fragment: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = server_node.eval(
        f"sshrpc_daemon:start(0, [{{system_dir, {erl_string(tmp_path)}}}, "
        f"{{user_dir, {erl_string(tmp_path)}}}, {{policy, {{file, {erl_string(path)}}}}}])"
    )
    assert result[0] == "error"
    assert fragment.encode() in result[1], result
    assert str(path).encode() in result[1]


# --- streams and multicall from the Erlang client -----------------------------


def test_erlang_stream_with_credit_from_an_erlang_server(
    client_node: ErlangNode, server_node: ErlangNode, server: ErlangServer
) -> None:
    connect(client_node, server, "S1")
    assert client_node.eval(
        "{ok, St1} = sshrpc:stream(S1, sshrpc_test_funs, stream, [50], #{window => 3}), "
        "sshrpc:fold(fun(V, Acc) -> [V | Acc] end, [], St1)"
    ) == ("ok", list(range(50, 0, -1)), "done")
    # A consumer that does not take its chunks holds at most a window of them;
    # the producer waits on the server meanwhile.
    name = fresh(1, "stream")[0]
    client_node.eval(
        f"{{ok, St2}} = sshrpc:stream(S1, sshrpc_test_funs, stream_forever, [{erl_atom(name)}], "
        "#{window => 4})"
    )
    client_node.wait_until("element(2, process_info(self(), message_queue_len)) >= 4")
    for _ in range(3):  # frames in flight would have arrived after a round trip
        assert client_node.eval("element(1, sshrpc:ping(S1))") == "ok"
    assert client_node.eval("element(2, process_info(self(), message_queue_len))") == 4
    assert client_node.eval("[element(2, sshrpc:next(St2)) || _ <- lists:seq(1, 10)]") == list(
        range(1, 11)
    )
    assert client_node.eval("sshrpc:next(St2, 5000)") == ("chunk", 11)
    client_node.eval("sshrpc:cancel(St2)")
    server_node.wait_until(f"whereis({erl_atom(name)}) =:= undefined")
    assert client_node.eval("sshrpc:next(St2, 200)") == "timeout"
    # A failing stream: what was folded so far, and the error.
    assert (
        client_node.eval(
            "{ok, St3} = sshrpc:stream(S1, sshrpc_test_funs, nosuch, []), "
            "element(2, element(2, sshrpc:fold(fun(V, A) -> [V | A] end, [], St3)))"
        )
        == "undef"
    )
    client_node.eval("sshrpc:close(S1)")


def test_a_stream_whose_consumer_exits_is_cancelled(
    client_node: ErlangNode, server_node: ErlangNode, server: ErlangServer
) -> None:
    connect(client_node, server, "S2")
    name = fresh(1, "stream")[0]
    client_node.eval(
        "Me = self(), "
        "spawn(fun() -> "
        f"  {{ok, St}} = sshrpc:stream(S2, sshrpc_test_funs, stream_forever, [{erl_atom(name)}]), "
        "  {chunk, 1} = sshrpc:next(St), {chunk, 2} = sshrpc:next(St), Me ! took_two "
        "end), "
        "receive took_two -> ok after 5000 -> timeout end"
    )
    server_node.wait_until(f"whereis({erl_atom(name)}) =:= undefined")
    assert client_node.eval("sshrpc:call(S2, lists, reverse, [[1, 2]])") == ("ok", [2, 1])
    client_node.eval("sshrpc:close(S2)")


def test_erlang_multicall_per_connection_results(
    client_node: ErlangNode, server: ErlangServer
) -> None:
    for var in ("M1", "M2", "M3"):
        connect(client_node, server, var)
    client_node.eval("sshrpc:close(M3)")
    results = client_node.eval("sshrpc:multicall([M1, M2, M3], erlang, node, [])")
    assert [r[0] for r in results] == ["ok", "ok", "error"]
    assert results[2][1][:2] == ("sshrpc", "closed")
    started = client_node.eval("erlang:monotonic_time(millisecond)")
    timed = client_node.eval_text(
        "sshrpc:multicall([M1, M2], sshrpc_test_funs, sleep, [5000], 200)"
    )
    assert timed.replace(" ", "").replace("\n", "") == (
        "[{error,{sshrpc,timeout,#{}}},{error,{sshrpc,timeout,#{}}}]"
    )
    assert client_node.eval("erlang:monotonic_time(millisecond)") - started < 4000
    assert client_node.eval("sshrpc:multicall([M1, M2], sshrpc_test_funs, add, [1, 2], 5000)") == [
        ("ok", 3),
        ("ok", 3),
    ]


def test_erlang_client_atom_budget_fails_the_call_not_the_connection(
    client_node: ErlangNode, server: ErlangServer
) -> None:
    client_node.eval(
        f'{{ok, B1}} = sshrpc:connect("127.0.0.1", {server.port}, '
        '[{user, "tester"}, {user_dir, UserDir}, {max_new_atoms, 5}])'
    )
    first, second = fresh(2, "cli")
    assert client_node.eval_text(
        f"sshrpc:call(B1, sshrpc_test_funs, atoms, [<<{erl_string(first)}>>, 3])"
    ).startswith("{ok,[")
    text = client_node.eval_text(
        f"sshrpc:call(B1, sshrpc_test_funs, atoms, [<<{erl_string(second)}>>, 3])"
    )
    flat = text.replace(" ", "").replace("\n", "")
    assert flat.startswith("{error,{sshrpc,badarg,#{"), text
    assert "reason=>atom_limit" in flat and "scope=>connection" in flat
    assert (
        client_node.eval(
            f'try binary_to_existing_atom(<<{erl_string(second)}, "_1">>) of _ -> true '
            "catch error:badarg -> false end"
        )
        is False
    )
    assert client_node.eval("sshrpc:call(B1, lists, reverse, [[1, 2]])") == ("ok", [2, 1])
    client_node.eval("sshrpc:close(B1)")


def test_compressed_requests_with_fresh_atoms(
    server: ErlangServer, tmp_path: Path, client_key: Any
) -> None:
    ch = raw_channel(server, tmp_path, client_key)
    try:
        hello(ch)
        value = [Atom(x) for x in fresh(20)] * 50
        call = (Atom("call"), 1, Atom("sshrpc_test_funs"), Atom("echo"), [value])
        payload = sshrpc.encode(call, compressed=True)
        assert payload[:2] == b"\x83\x50"
        ch.send_bytes(len(payload).to_bytes(4, "big") + payload)
        assert ch.recv() == ("reply", 1, value)
        # A declared size below the inflated one is refused before decoding.
        body = zlib.compress(sshrpc.encode((Atom("ping"), Atom(fresh()[0])))[1:])
        bad = b"\x83\x50" + (3).to_bytes(4, "big") + body
        ch.send_bytes(len(bad).to_bytes(4, "big") + bad)
        tag, (what, detail) = ch.recv()
        assert (tag, what) == ("bye", "bad_term")
        assert b"compressed" in detail
    finally:
        ch.close()


def test_the_application_and_rebar_layout(server_node: ErlangNode) -> None:
    # erlang/build.sh writes ebin/sshrpc.app from src/sshrpc.app.src as rebar3
    # would: every module listed, and the application starts with its deps.
    src = sorted(p.stem for p in (Path(__file__).parents[2] / "erlang" / "src").glob("*.erl"))
    assert (
        server_node.eval(
            "{ok, [{application, sshrpc, Props}]} = "
            'file:consult(code:where_is_file("sshrpc.app")), '
            "lists:sort(proplists:get_value(modules, Props))"
        )
        == src
    )
    assert server_node.eval("element(1, application:ensure_all_started(sshrpc))") == "ok"
    rebar = Path(__file__).parents[2] / "erlang" / "rebar.config"
    assert server_node.eval(f"element(1, file:consult({erl_string(rebar)}))") == "ok"


def test_the_atom_walk_agrees_with_binary_to_term(server_node: ErlangNode) -> None:
    # Every type, every prefix, 5,000 random one-byte changes: the walk that
    # counts new atoms never raises, refuses every truncation cleanly and
    # accepts whatever binary_to_term(B, [safe, used]) accepts whole.
    assert server_node.eval("sshrpc_test_walk:run(5000)") == (0, 0, 0, 0)
