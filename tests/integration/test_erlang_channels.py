"""The Erlang client's ``sshrpc:open_channel/1,2``: more sshrpc sessions on
one SSH connection (the exec-mod pattern), two real VMs: the hardened
Erlang daemon (``{max_channels, 3}`` per connection) and a client VM.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from erlang_helpers import (
    ErlangNode,
    ErlangServer,
    erl_string,
    erlang_available,
    erlang_client_dir,
    start_erlang_server,
)

pytestmark = [
    pytest.mark.skipif(not erlang_available(), reason="Erlang/OTP is not installed"),
    pytest.mark.timeout(60),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, client_key: Any) -> Iterator[ErlangServer]:
    node = ErlangNode()
    try:
        srv = start_erlang_server(
            node,
            tmp_path_factory.mktemp("erlang_server"),
            [client_key.public_line],
            allow="[{lists, reverse, 1}, {timer, sleep, 1}, {erlang, self, 0}]",
            options="{max_channels, 3}",
        )
        try:
            yield srv
        finally:
            srv.stop()
    finally:
        node.close()


@pytest.fixture
def client(
    server: ErlangServer, tmp_path_factory: pytest.TempPathFactory, client_key: Any
) -> Iterator[ErlangNode]:
    """A client VM with ``C`` bound to a connection to ``server``."""
    user_dir = erlang_client_dir(
        tmp_path_factory.mktemp("erlang_client"), client_key.private, [server.known_hosts_line]
    )
    node = ErlangNode()
    try:
        node.eval(
            f'{{ok, C}} = sshrpc:connect("127.0.0.1", {server.port}, '
            f'[{{user, "tester"}}, {{user_dir, {erl_string(user_dir)}}}])'
        )
        yield node
    finally:
        node.close()


#: ``Open(C)``: ``sshrpc:open_channel(C)``, retried for at most ~5 s while the
#: daemon refuses: ``sshrpc:close/1`` returns before the daemon has freed the
#: channel, so right after a close the daemon may still count it.
OPEN = (
    "Open = fun(Conn) -> (fun Retry(0) -> {error, still_refused}; Retry(K) -> "
    "case sshrpc:open_channel(Conn) of {ok, X} -> {ok, X}; "
    "_ -> timer:sleep(20), Retry(K - 1) end end)(250) end"
)


def test_child_channel_calls_and_closes_alone(client: ErlangNode) -> None:
    assert client.eval("{ok, Ch} = sshrpc:open_channel(C), is_pid(Ch)") is True
    sessions = client.eval(
        "{ok, #{session := S1}} = sshrpc:server_info(C), "
        "{ok, #{session := S2}} = sshrpc:server_info(Ch), S1 =/= S2"
    )
    assert sessions is True
    assert client.eval("sshrpc:call(Ch, lists, reverse, [[1, 2, 3]])") == ("ok", [3, 2, 1])
    assert client.eval("sshrpc:call(C, lists, reverse, [[4, 5]])") == ("ok", [5, 4])
    # Calls on both at once, from many processes.
    both = client.eval(
        "Self = self(), "
        "[spawn(fun() -> Self ! {done, sshrpc:call(X, lists, reverse, [[N]])} end) "
        " || X <- [C, Ch], N <- lists:seq(1, 20)], "
        "lists:sort([receive {done, R} -> R after 10000 -> timeout end "
        "            || _ <- lists:seq(1, 40)])"
    )
    assert both == sorted([("ok", [n]) for n in range(1, 21)] * 2)
    assert client.eval("sshrpc:close(Ch)") == "ok"
    assert client.eval("is_process_alive(Ch)") is False
    assert client.eval("sshrpc:call(C, lists, reverse, [[6]])") == ("ok", [6])


def test_many_children_in_a_loop_leave_no_channel(client: ErlangNode) -> None:
    # The daemon allows 3 channels per connection: a leak would be refused.
    client.eval(OPEN)
    results = client.eval(
        "[begin {ok, X} = Open(C), "
        "       R = sshrpc:call(X, lists, reverse, [[N]]), ok = sshrpc:close(X), R end "
        " || N <- lists:seq(1, 12)]"
    )
    assert results == [("ok", [n]) for n in range(1, 13)]
    assert client.eval("sshrpc:call(C, lists, reverse, [[7]])") == ("ok", [7])


def test_refused_channel_is_an_error_and_the_parent_stays(client: ErlangNode) -> None:
    client.eval("{ok, A} = sshrpc:open_channel(C), {ok, B} = sshrpc:open_channel(C)")
    refused = client.eval_text("sshrpc:open_channel(C)")
    assert refused.startswith("{error,"), refused
    assert client.eval("sshrpc:call(A, lists, reverse, [[1]])") == ("ok", [1])
    assert client.eval("sshrpc:call(C, lists, reverse, [[2]])") == ("ok", [2])
    client.eval("ok = sshrpc:close(B)")
    client.eval(OPEN)
    assert client.eval("{ok, D} = Open(C), sshrpc:call(D, lists, reverse, [[3]])") == (
        "ok",
        [3],
    )


def test_parent_close_ends_children(client: ErlangNode) -> None:
    client.eval(
        "{ok, Ch} = sshrpc:open_channel(C), Self = self(), "
        "spawn(fun() -> Self ! {slow, sshrpc:call(Ch, timer, sleep, [5000])} end)"
    )
    client.eval("ok = sshrpc:close(C)")
    text = client.eval_text("receive {slow, R} -> R after 10000 -> timeout end")
    assert text.startswith("{error,{sshrpc,closed,"), text
    client.wait_until("not is_process_alive(Ch)")
    assert client.eval_text("sshrpc:open_channel(C)").startswith("{error,")


def test_open_close_loop_through_openssh(
    sshrpc_server: Any, tmp_path_factory: pytest.TempPathFactory, client_key: Any
) -> None:
    """Against OpenSSH's sshd and the Python node: each child's channel is
    closed once.  (Closed twice -- by ssh_client_channel and again by
    sshrpc_client -- the second CLOSE could reach sshd after it had freed
    the channel, and sshd dropped the whole connection: "close packet
    referred to nonexistent channel".)"""
    known = sshrpc_server.known_hosts.read_text().splitlines()
    user_dir = erlang_client_dir(
        tmp_path_factory.mktemp("erlang_client_openssh"), client_key.private, known
    )
    node = ErlangNode()
    try:
        node.eval(
            f'{{ok, C}} = sshrpc:connect("127.0.0.1", {sshrpc_server.port}, '
            f'[{{user, "{sshrpc_server.user}"}}, {{user_dir, {erl_string(user_dir)}}}])'
        )
        results = node.eval(
            "[begin {ok, X} = sshrpc:open_channel(C), "
            "       R = sshrpc:call(X, lists, reverse, [[N]]), ok = sshrpc:close(X), R end "
            " || N <- lists:seq(1, 25)]",
            timeout=120,
        )
        assert results == [("ok", [n]) for n in range(1, 26)]
        assert node.eval("sshrpc:call(C, lists, reverse, [[7]])") == ("ok", [7])
    finally:
        node.close()
