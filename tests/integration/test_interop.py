"""Python and Erlang across the same wire (PROTOCOL.md), both directions.

- The Python client (``sshrpc.open_connection``) calls an Erlang VM served by
  ``sshrpc_daemon`` (erlang/src): calls, every error class, cancellation that
  stops the Erlang worker, 1,000 concurrent calls, 16 MiB both ways, and
  terms that cross unchanged (checked against Erlang literals in the VM).
- The Erlang client (``sshrpc:connect``) calls the Python node behind
  OpenSSH's sshd (see the ``python_node`` fixture below).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from erlang_helpers import (
    ErlangNode,
    ErlangServer,
    erl_string,
    erlang_available,
    erlang_client_dir,
    start_erlang_server,
)

import sshrpc
from sshrpc import Atom, BitString, ImproperList

pytestmark = [
    pytest.mark.skipif(not erlang_available(), reason="Erlang/OTP is not installed"),
    pytest.mark.timeout(90),
]

MAX_FRAME = 32 * 1024 * 1024
UTF8_ATOM = "h3_atom_héllo_wörld_π_日本"
TEST_ATOMS = ["h3_py_block", "h3_py_cancel", "h3_term", UTF8_ATOM]
ALLOW = "[{erlang, node, 0}, {lists, reverse, 1}, {sshrpc_test_funs, '_', '_'}]"


@pytest.fixture(scope="module")
def erlang_node() -> Iterator[ErlangNode]:
    node = ErlangNode()
    try:
        node.make_atoms(TEST_ATOMS)
        yield node
    finally:
        node.close()


@pytest.fixture(scope="module")
def erlang_server(
    erlang_node: ErlangNode, tmp_path_factory: pytest.TempPathFactory, client_key: Any
) -> Iterator[ErlangServer]:
    srv = start_erlang_server(
        erlang_node,
        tmp_path_factory.mktemp("interop_server"),
        [client_key.public_line],
        allow=ALLOW,
        options=f"{{max_frame, {MAX_FRAME}}}",
    )
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
async def node(erlang_server: ErlangServer, tmp_path: Path, client_key: Any) -> AsyncIterator[Any]:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(erlang_server.known_hosts_line + "\n")
    async with sshrpc.open_connection(
        "127.0.0.1",
        port=erlang_server.port,
        user="tester",
        identity=str(client_key.private),
        known_hosts=str(known_hosts),
        agent=False,
        max_frame=MAX_FRAME,
    ) as conn:
        yield conn


async def in_erlang(node: ErlangNode, expr: str) -> Any:
    """Evaluate in the Erlang VM without blocking the Trio loop."""
    return await trio.to_thread.run_sync(node.eval, expr)


async def wait_in_erlang(node: ErlangNode, expr: str) -> None:
    await trio.to_thread.run_sync(node.wait_until, expr)


# --- Python client -> Erlang server -------------------------------------------


async def test_python_calls_erlang(node: Any, erlang_node: ErlangNode) -> None:
    assert await node.call("erlang", "node", []) == await in_erlang(erlang_node, "node()")
    assert await node.call("lists", "reverse", [[1, 2, 3]]) == [3, 2, 1]
    assert node.hello["features"]


@pytest.mark.parametrize(
    ("function", "args", "cls", "reason"),
    [
        ("raise", [Atom("error"), Atom("badarith")], "error", "badarith"),
        ("raise", [Atom("exit"), (Atom("shutdown"), 1)], "exit", ("shutdown", 1)),
        ("raise", [Atom("throw"), b"thrown"], "throw", b"thrown"),
        ("add", [1, Atom("error")], "error", "badarith"),
    ],
)
async def test_python_sees_erlang_error_classes(
    node: Any, function: str, args: list[Any], cls: str, reason: Any
) -> None:
    with pytest.raises(sshrpc.RemoteError) as info:
        await node.call("sshrpc_test_funs", function, args)
    assert (info.value.cls, info.value.reason, info.value.details) == (cls, reason, {})


async def test_python_sees_forbidden_and_undef(node: Any) -> None:
    with pytest.raises(sshrpc.Forbidden):
        await node.call("lists", "sort", [[1]])
    with pytest.raises(sshrpc.Forbidden):
        await node.call("os", "cmd", [b"id"])
    with pytest.raises(sshrpc.Undef):
        await node.call("sshrpc_test_funs", "reverse", [[1]])
    assert await node.call("lists", "reverse", [[]]) == []


async def test_python_cancel_stops_the_erlang_worker(node: Any, erlang_node: ErlangNode) -> None:
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def blocked_call() -> None:
            with scope:
                await node.call("sshrpc_test_funs", "block", [Atom("h3_py_cancel")])

        nursery.start_soon(blocked_call)
        await wait_in_erlang(erlang_node, "is_pid(whereis(h3_py_cancel))")
        scope.cancel()
    await wait_in_erlang(erlang_node, "whereis(h3_py_cancel) =:= undefined")
    assert await node.call("lists", "reverse", [[1, 2]]) == [2, 1]


async def test_python_deadline_reaches_erlang(node: Any, erlang_node: ErlangNode) -> None:
    # The server's timeout (sent as the call's remaining time) and the local
    # deadline race: either ends the call, and the worker must stop.
    with trio.move_on_after(0.3) as scope:
        try:
            await node.call("sshrpc_test_funs", "block", [Atom("h3_py_block")])
        except sshrpc.RemoteTimeout:
            pass
        else:
            raise AssertionError("the blocked call returned")
    assert scope.deadline < trio.current_time() + 0.05
    await wait_in_erlang(erlang_node, "whereis(h3_py_block) =:= undefined")


async def test_python_streams_from_erlang_with_credit(node: Any) -> None:
    items = [item async for item in node.stream("sshrpc_test_funs", "stream", [40], credit=3)]
    assert items == list(range(1, 41))
    # A huge timeout (beyond erlang:send_after's range) is accepted, not fatal.
    assert await node.call("sshrpc_test_funs", "add", [1, 2]) == 3
    with trio.fail_after(2**33 / 1000):
        assert await node.call("sshrpc_test_funs", "add", [2, 2]) == 4


async def test_python_1000_concurrent_calls(node: Any) -> None:
    results: dict[int, Any] = {}

    async def worker(first: int) -> None:
        for i in range(first, first + 10):
            results[i] = await node.call("sshrpc_test_funs", "echo", [(i, b"x" * (i % 50))])

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for first in range(0, 1000, 10):
                nursery.start_soon(worker, first)
    assert results == {i: (i, b"x" * (i % 50)) for i in range(1000)}


async def test_python_1000_calls_in_flight_at_once(node: Any) -> None:
    results: dict[int, Any] = {}

    async def one(i: int) -> None:
        results[i] = await node.call("sshrpc_test_funs", "add", [i, 1])

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(1000):
                nursery.start_soon(one, i)
    assert results == {i: i + 1 for i in range(1000)}


async def test_python_16_mib_both_ways(node: Any) -> None:
    big = bytes(range(256)) * (16 * 1024 * 1024 // 256)
    with trio.fail_after(60):
        assert await node.call("sshrpc_test_funs", "echo", [big]) == big
        got = await node.call("sshrpc_test_funs", "sized", [16 * 1024 * 1024])
    assert got == b"x" * (16 * 1024 * 1024)


#: (Python value, the same term as an Erlang literal)
TERMS: list[tuple[Any, str]] = [
    (2**200, "1 bsl 200"),
    (-(2**70) + 3, "-(1 bsl 70) + 3"),
    (2**64, "18446744073709551616"),
    (-1, "-1"),
    (1.5, "1.5"),
    (-0.0, "-0.0"),
    (1e300, "1.0e300"),
    (Atom(UTF8_ATOM), "'" + UTF8_ATOM + "'"),
    ({Atom("a"): 1, b"k": [1, 2], 3: {Atom("error"): ()}},
     "#{a => 1, <<\"k\">> => [1, 2], 3 => #{error => {}}}"),
    (ImproperList([1, 2], 3), "[1, 2 | 3]"),
    (BitString(b"\xab\xc0", 3), "<<16#AB, 6:3>>"),
    ("text é", "<<\"text é\"/utf8>>"),
    ([], "[]"),
    ((True, False, None), "{true, false, undefined}"),
]  # fmt: skip


@pytest.mark.parametrize(("value", "literal"), TERMS, ids=[t[1][:30] for t in TERMS])
async def test_terms_cross_unchanged(
    node: Any, erlang_node: ErlangNode, value: Any, literal: str
) -> None:
    await node.call("sshrpc_test_funs", "store", [Atom("h3_term"), value])
    assert await in_erlang(erlang_node, f"sshrpc_test_funs:fetch(h3_term) =:= ({literal})") is True
    back = await node.call("sshrpc_test_funs", "echo", [value])
    if isinstance(value, str) and not isinstance(value, Atom):
        assert back == value.encode()
    elif isinstance(value, float):
        assert repr(back) == repr(value)
    else:
        assert back == value
    assert sshrpc.encode(back) == sshrpc.encode(await in_erlang(erlang_node, literal))


async def test_erlang_pids_come_back_as_the_same_pid(node: Any) -> None:
    pid = await node.spawn("sshrpc_test_funs", "loop", [])
    assert await node.call("sshrpc_test_funs", "echo", [pid]) == pid
    assert await node.call("sshrpc_test_funs", "alive", [pid]) is True
    session = node.hello["session"]
    await node.send(pid, (Atom("ping"), session))
    assert await node.receive() == ("pong", pid)
    await node.send(pid, Atom("stop"))
    assert await node.receive() == ("down", pid, "normal")
    assert await node.call("sshrpc_test_funs", "alive", [pid]) is False


# --- Erlang client -> Python node behind OpenSSH's sshd -----------------------

#: The Python node's max_frame for these tests: room for a 16 MiB binary.
PYTHON_NODE_MAX_FRAME = 17 * 1048576


@pytest.fixture(scope="module")
def python_node(tmp_path_factory: pytest.TempPathFactory, client_key: Any) -> Iterator[Any]:
    """``sshrpc serve sshrpc.demo:services`` (OpenSSH sshd + the Python node)."""
    from conftest import start_serve, stop_serve

    base = tmp_path_factory.mktemp("python_node")
    keys = base / "authorized_keys"
    keys.write_text(client_key.public_line + "\n")
    info = start_serve(
        ["sshrpc.demo:services"],
        state_dir=base / "state",
        authorized_keys=keys,
        identity=client_key.private,
        extra_args=["--max-frame", str(PYTHON_NODE_MAX_FRAME)],
    )
    try:
        yield info
    finally:
        stop_serve(info)


@pytest.fixture(scope="module")
def erl(
    python_node: Any, tmp_path_factory: pytest.TempPathFactory, client_key: Any
) -> Iterator[ErlangNode]:
    """An Erlang VM with ``PC`` bound to an sshrpc connection to the Python node."""
    user_dir = erlang_client_dir(
        tmp_path_factory.mktemp("erl_client"),
        client_key.private,
        python_node.known_hosts.read_text().splitlines(),
    )
    node = ErlangNode()
    try:
        node.eval(
            f'{{ok, PC}} = sshrpc:connect("127.0.0.1", {python_node.port}, '
            f'[{{user, "{python_node.user}"}}, {{user_dir, {erl_string(user_dir)}}}, '
            f"{{max_frame, {MAX_FRAME}}}])"
        )
        node.eval("{ok, PHello} = sshrpc:server_info(PC)")
        yield node
    finally:
        node.close()


def flat(text: str) -> str:
    return text.replace(" ", "").replace("\n", "")


def test_erlang_calls_python(erl: ErlangNode) -> None:
    assert erl.eval("sshrpc:call(PC, lists, reverse, [[1, 2, 3]])") == ("ok", [3, 2, 1])
    assert erl.eval("sshrpc:call(PC, lists, seq, [1, 4])") == ("ok", [1, 2, 3, 4])
    assert erl.eval("{ok, P} = sshrpc:call(PC, os, getpid, []), is_integer(P)") is True
    assert erl.eval("element(1, sshrpc:ping(PC))") == "ok"


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("errors, raise, [error, badarith]", "{error,{error,badarith,#{}}}"),
        ("errors, raise, [exit, {shutdown, 1}]", "{error,{exit,{shutdown,1},#{}}}"),
        ('errors, raise, [throw, <<"t">>]', '{error,{throw,<<"t">>,#{}}}'),
        # sshrpc serve redacts exception messages by default: the class only
        ('errors, raise, [other, <<"bad">>]', "{error,{error,{'ValueError',<<>>},"),
        ("erlang, halt, []", "{error,{sshrpc,forbidden,"),
        ("lists, sort, [[2, 1]]", "{error,{sshrpc,undef,"),
        ("lists, reverse, [[1], [2]]", "{error,{sshrpc,undef,"),
    ],
)
def test_erlang_sees_python_error_classes(erl: ErlangNode, expr: str, expected: str) -> None:
    text = flat(erl.eval_text(f"sshrpc:call(PC, {expr})"))
    assert text.startswith(expected), text
    assert "Traceback" not in text and ".py" not in text


def test_erlang_timeout_cancels_python_work(erl: ErlangNode) -> None:
    assert erl.eval_text("sshrpc:call(PC, slow, work, [30], 300)") == (
        "{error,{sshrpc,timeout,#{}}}"
    )
    erl.wait_until("sshrpc:call(PC, slow, status, []) =:= {ok, cancelled}")


def test_erlang_1000_concurrent_calls_to_python(erl: ErlangNode) -> None:
    ok = erl.eval(
        "Self = self(), "
        "[spawn(fun() -> Self ! {py, I, sshrpc:call(PC, echo, echo, [{I, <<I:32>>}])} end) "
        "|| I <- lists:seq(1, 1000)], "
        "lists:all(fun(I) -> receive {py, I, {ok, {I, <<I:32>>}}} -> true "
        "after 30000 -> false end end, lists:seq(1, 1000))",
        timeout=60,
    )
    assert ok is True


def test_erlang_16_mib_both_ways_with_python(erl: ErlangNode) -> None:
    # `sshrpc serve --max-frame` announces its limit in the hello: a 16 MiB
    # binary crosses both ways intact, and a payload past the limit is
    # refused locally, before sending, with the channel still usable.
    limit = erl.eval("maps:get(max_frame, PHello)")
    assert limit == PYTHON_NODE_MAX_FRAME
    assert erl.eval(
        f"PBig = crypto:strong_rand_bytes({16 * 1048576}), "
        "{ok, PBack} = sshrpc:call(PC, echo, echo, [PBig]), PBack =:= PBig",
        timeout=60,
    )
    text = flat(erl.eval_text(f"sshrpc:call(PC, echo, echo, [binary:copy(<<1>>, {limit})])"))
    assert text.startswith("{error,{sshrpc,too_large,"), text
    assert erl.eval("sshrpc:call(PC, lists, reverse, [[1]])") == ("ok", [1])


ERLANG_TERMS = [
    "1 bsl 200",
    "-(1 bsl 70) + 3",
    "1.5",
    "-0.0",
    "1.0e300",
    "'" + UTF8_ATOM + "'",
    '#{a => 1, <<"k">> => [1, 2], 3 => #{b => {}}, 1.0 => x}',
    "[1, 2 | 3]",
    "<<16#AB, 6:3>>",
    "{self(), make_ref(), hd(erlang:ports())}",
    "fun erlang:node/0",
    '[{list_to_atom(""), <<>>, [], {}}]',
]


@pytest.mark.parametrize("index", range(len(ERLANG_TERMS)), ids=ERLANG_TERMS)
def test_erlang_terms_cross_python_unchanged(erl: ErlangNode, index: int) -> None:
    sent, back = f"Sent{index}", f"Back{index}"  # bindings persist in the driver
    assert erl.eval(
        f"{sent} = ({ERLANG_TERMS[index]}), "
        f"{{ok, {back}}} = sshrpc:call(PC, echo, echo, [{sent}]), "
        f"{{{back} =:= {sent}, term_to_binary({back}) =:= term_to_binary({sent})}}"
    ) == (True, True)


def test_erlang_spawns_and_messages_python_processes(erl: ErlangNode) -> None:
    erl.eval("{ok, PW} = sshrpc:spawn(PC, worker, loop, [])")
    erl.eval("sshrpc:send(PC, PW, {hello, self()})")
    assert erl.eval(
        "Me = self(), receive {sshrpc, PC, {send, _, {echo, {hello, Me}}}} -> true "
        "after 10000 -> false end"
    )
    erl.eval("sshrpc:send(PC, PW, {crash, boom})")
    assert erl.eval("receive {sshrpc, PC, {down, PW, Why}} -> Why after 10000 -> timeout end") == (
        "exit",
        "boom",
    )


def test_erlang_casts_to_python(erl: ErlangNode) -> None:
    erl.eval("sshrpc:cast(PC, log, info, [{from_erlang, 42}])")
    erl.wait_until("sshrpc:call(PC, log, last, []) =:= {ok, {from_erlang, 42}}")


def test_erlang_streams_from_python_with_credit(erl: ErlangNode) -> None:
    assert erl.eval(
        "{ok, PSt} = sshrpc:stream(PC, feed, tail, [100], #{window => 3}), "
        "sshrpc:fold(fun(V, Acc) -> [V | Acc] end, [], PSt)",
        timeout=60,
    ) == ("ok", list(range(99, -1, -1)), "done")
    assert erl.eval(
        "{ok, PSt2} = sshrpc:stream(PC, feed, tail, [1000], #{window => 2}), "
        "[element(2, sshrpc:next(PSt2)) || _ <- lists:seq(1, 5)]"
    ) == [0, 1, 2, 3, 4]
    erl.eval("sshrpc:cancel(PSt2)")
    assert erl.eval("sshrpc:call(PC, lists, reverse, [[1, 2]])") == ("ok", [2, 1])


def test_erlang_multicall_across_python_and_erlang(
    erl: ErlangNode,
    erlang_server: ErlangServer,
    erlang_node: ErlangNode,
    tmp_path: Path,
    client_key: Any,
) -> None:
    user_dir = erlang_client_dir(
        tmp_path / "mc", client_key.private, [erlang_server.known_hosts_line]
    )
    erl.eval(
        f'{{ok, EC}} = sshrpc:connect("127.0.0.1", {erlang_server.port}, '
        f'[{{user, "tester"}}, {{user_dir, {erl_string(user_dir)}}}])'
    )
    assert erl.eval("sshrpc:multicall([PC, EC], lists, reverse, [[1, 2, 3]], 10000)") == [
        ("ok", [3, 2, 1]),
        ("ok", [3, 2, 1]),
    ]
    nodes = erl.eval("sshrpc:multicall([EC, PC], erlang, node, [])")
    assert nodes[0] == ("ok", erlang_node.eval("node()"))
    assert flat(
        erl.eval_text("element(2, lists:nth(2, sshrpc:multicall([EC, PC], erlang, node, [])))")
    ).startswith("{sshrpc,forbidden")
    erl.eval("sshrpc:close(EC)")


def test_erlang_sends_fresh_atoms_to_python_and_keeps_its_channel(erl: ErlangNode) -> None:
    tag = f"h14_{uuid.uuid4().hex}"
    assert erl.eval(
        f"PT = {{'{tag}', #{{'{tag}_key' => ['{tag}_elem', '{tag} Hello World']}}}}, "
        "{ok, PT} =:= sshrpc:call(PC, echo, echo, [PT])"
    )
    assert erl.eval(f"element(1, sshrpc:call(PC, '{tag}_mod', '{tag}_fn', []))") == "error"
    erl.eval(f"sshrpc:cast(PC, log, info, [{{'{tag}_cast', 1}}])")
    erl.wait_until(f"sshrpc:call(PC, log, last, []) =:= {{ok, {{'{tag}_cast', 1}}}}")
    assert erl.eval("element(1, sshrpc:ping(PC))") == "ok"
