%% @doc Call functions on an sshrpc server (Erlang or Python) over SSH.
%%
%% One connection is one SSH connection with one sshrpc channel. Any number of
%% processes may use it at once; each waits in its own receive (like erpc).
%% Calls beyond the server's max_calls (from its hello) wait in the client
%% until an open call ends, instead of drawing `overload' answers.
%%
%% Results are tagged tuples, never exceptions:
%%   {ok, Value}
%%   {error, {Class, Reason, Details}}  Class is error | exit | throw (raised by
%%       the remote function) or sshrpc (raised by the RPC layer: Reason is
%%       undef, forbidden, badarg, timeout, cancelled, overload, shutting_down,
%%       notsup, too_large, or closed when the connection went away).
%%
%% Messages that server code sends to this session's pid, and the ends of
%% processes spawned with spawn/4, arrive at the connection's owner (the
%% process that called connect, or the `owner' option) as
%%   {sshrpc, Conn, {send, SessionPid, Msg}}
%%   {sshrpc, Conn, {down, Pid, Reason}}
%% The connection closes when its owner exits.
-module(sshrpc).

-export([connect/2, connect/3, call/4, call/5, cast/4, send/3, spawn/4, ping/1,
         server_info/1, close/1, open_channel/1, open_channel/2]).
-export([stream/4, stream/5, next/1, next/2, cancel/1, fold/3, multicall/4, multicall/5]).

-type conn() :: pid().
-type result() :: {ok, term()} | {error, {atom(), term(), map()}}.
-opaque stream() :: {sshrpc_stream, conn(), reference()}.
-export_type([conn/0, result/0, stream/0]).

-define(DEFAULT_WINDOW, 16).

-spec connect(ssh:host(), inet:port_number()) -> {ok, conn()} | {error, term()}.
connect(Host, Port) ->
    connect(Host, Port, []).

%% @doc Open an SSH connection and an sshrpc channel, and do the handshake.
%%
%% Opts (proplist or map):
%% - `user' (string; default: the local user)
%% - `user_dir': the directory with the private key (id_ed25519, id_ecdsa,
%%   id_rsa) and known_hosts (default ~/.ssh)
%% - `silently_accept_hosts' (default false): skip the host key check. Off by
%%   default: the server's key must be in user_dir's known_hosts.
%% - `max_frame' (default 64 MiB): the largest answer accepted
%% - `max_new_atoms' (default 1024): atoms the server may add to this node
%%   over the connection's life (node names, atoms in answers), and
%%   `max_node_atoms' (default 65536): atoms all sshrpc connections and
%%   sessions together may add to this node. An answer beyond either creates
%%   nothing: its call fails with {error, {sshrpc, badarg, #{reason =>
%%   atom_limit, ...}}} and the connection stays
%% - `timeout' (ms, default 10000): for connecting and the handshake
%% - `subsystem' (default "sshrpc@k2r.org"), `owner' (default self())
%% - `ssh': a list of extra ssh:connect/3 options
-spec connect(ssh:host(), inet:port_number(), proplists:proplist() | map()) ->
    {ok, conn()} | {error, term()}.
connect(Host, Port, Opts0) ->
    Opts = case Opts0 of
               M when is_map(M) -> M;
               L -> maps:from_list([case X of {_, _} -> X; A -> {A, true} end || X <- L])
           end,
    _ = application:ensure_all_started(ssh),
    Timeout = maps:get(timeout, Opts, 10000),
    SshOpts = ssh_options(Opts),
    case ssh:connect(Host, Port, SshOpts, Timeout) of
        {ok, CM} ->
            case open_channel(CM, Opts#{owns_cm => true}, Timeout) of
                {ok, Conn} -> {ok, Conn};
                Error -> ssh:close(CM), Error
            end;
        Error ->
            Error
    end.

ssh_options(Opts) ->
    Base = [{user_interaction, false},
            {silently_accept_hosts, maps:get(silently_accept_hosts, Opts, false)},
            {save_accepted_host, false},
            {quiet_mode, true},
            {nodelay, true},
            {auth_methods, "publickey"}],
    User = [{user, U} || U <- [maps:get(user, Opts, undefined)], U =/= undefined],
    Dir = [{user_dir, D} || D <- [maps:get(user_dir, Opts, undefined)], D =/= undefined],
    Base ++ User ++ Dir ++ maps:get(ssh, Opts, []).

%% @doc One more sshrpc session on Conn's SSH connection: a new SSH session
%% channel with the sshrpc subsystem and its own hello (session pid, ids,
%% max_calls), over the same TCP connection and authentication -- the
%% paper's "exec-mod" pattern. The result is a conn() like any other:
%% close/1 on it closes only that channel (Conn and its other channels carry
%% on); closing Conn, or losing its connection, closes every channel on it
%% (their calls answer {error, {sshrpc, closed, _}}).
%%
%% Opts as connect/3's channel options (`owner', `subsystem', `max_frame',
%% `max_new_atoms', `max_node_atoms', `timeout'); the SSH ones do not apply.
%% Returns {error, Reason} when the server refuses the channel (e.g. the
%% Erlang daemon's max_channels, sshd's MaxSessions) or the session (a node
%% past --max-channels-per-key answers {error, {sshrpc, closed, #{reason =>
%% {too_many_channels, N}}}}); Conn is not affected.
-spec open_channel(conn()) -> {ok, conn()} | {error, term()}.
open_channel(Conn) ->
    open_channel(Conn, []).

-spec open_channel(conn(), proplists:proplist() | map()) -> {ok, conn()} | {error, term()}.
open_channel(Conn, Opts0) ->
    Opts = case Opts0 of
               M when is_map(M) -> M;
               L -> maps:from_list([case X of {_, _} -> X; A -> {A, true} end || X <- L])
           end,
    Timeout = maps:get(timeout, Opts, 10000),
    case catch ssh_client_channel:call(Conn, connection, Timeout) of
        {ok, CM} -> open_channel(CM, Opts#{owns_cm => false}, Timeout);
        {error, _} = E -> E;
        {'EXIT', _} -> {error, {sshrpc, closed, #{}}}
    end.

open_channel(CM, Opts, Timeout) ->
    case ssh_connection:session_channel(CM, Timeout) of
        {ok, Ch} ->
            Owner = maps:get(owner, Opts, self()),
            Args = [CM, Ch, Owner, Opts],
            case ssh_client_channel:start(CM, Ch, sshrpc_client, Args) of
                {ok, Conn} ->
                    try ssh_client_channel:call(Conn, wait_hello, Timeout) of
                        {ok, _Hello} -> {ok, Conn};
                        {error, _} = E -> E
                    catch
                        exit:R -> {error, R}
                    end;
                Error ->
                    Error
            end;
        Error ->
            Error
    end.

%% @doc M:F(Args...) on the server; waits for the answer.
-spec call(conn(), module(), atom(), [term()]) -> result().
call(Conn, M, F, Args) ->
    request(Conn, {call, M, F, Args, #{}}, infinity).

%% @doc As call/4, but gives up after TimeoutMs. The timeout also travels to
%% the server as the call's `timeout' option, and giving up sends
%% {cancel, Id}, so the remote work stops too. Returns
%% {error, {sshrpc, timeout, #{}}} then.
-spec call(conn(), module(), atom(), [term()], timeout()) -> result().
call(Conn, M, F, Args, infinity) ->
    call(Conn, M, F, Args);
call(Conn, M, F, Args, TimeoutMs) when is_integer(TimeoutMs), TimeoutMs >= 0 ->
    request(Conn, {call, M, F, Args, #{timeout => TimeoutMs}}, TimeoutMs).

%% @doc Apply M:F(Args...) on the server and do not wait. No answer, ever.
-spec cast(conn(), module(), atom(), [term()]) -> ok.
cast(Conn, M, F, Args) ->
    Conn ! {sshrpc_cast, M, F, Args},
    ok.

%% @doc Send Msg to Dest (a pid or registered name) on the server.
-spec send(conn(), pid() | atom() | term(), term()) -> ok.
send(Conn, Dest, Msg) ->
    Conn ! {sshrpc_send, Dest, Msg},
    ok.

%% @doc Start M:F(Args...) as a process on the server; {ok, Pid} at once.
%% When it ends, the owner gets {sshrpc, Conn, {down, Pid, Reason}}.
-spec spawn(conn(), module(), atom(), [term()]) -> result().
spawn(Conn, M, F, Args) ->
    request(Conn, {spawn, M, F, Args}, infinity).

%% @doc Round-trip time in microseconds.
-spec ping(conn()) -> {ok, non_neg_integer()} | {error, term()}.
ping(Conn) ->
    T0 = erlang:monotonic_time(microsecond),
    case request(Conn, ping, 10000) of
        pong -> {ok, erlang:monotonic_time(microsecond) - T0};
        Error -> Error
    end.

%% @doc The server's hello map (node, session, max_calls, features, ...).
-spec server_info(conn()) -> {ok, map()} | {error, term()}.
server_info(Conn) ->
    ssh_client_channel:call(Conn, wait_hello, 10000).

%% @doc Say {bye, normal}, wait (at most 5 s) for the server to answer the
%% open calls, and close the channel and the SSH connection. Idempotent.
-spec close(conn()) -> ok.
close(Conn) ->
    _ = (catch ssh_client_channel:call(Conn, close, 10000)),
    ok.

%% @doc Start a stream call: the server runs M:F(Args ++ [Emit]) (an Erlang
%% server) or the streaming function M:F (a Python server), and each value it
%% emits becomes one chunk. Take them with next/1,2 or fold/3, in order, then
%% the final result. Only the process that called stream/4,5 can take them.
%%
%% Flow control is the protocol's credit: at most `window' chunks (default
%% 16) are ever on their way or waiting in the caller's mailbox; taking one
%% with next/1,2 gives credit back (in batches of half the window), so a
%% slow consumer slows the producer on the server, and nothing piles up.
%%
%% Opts: `window' (the credit, default 16), `timeout' (ms: sent to the server
%% as the call's timeout, which then ends the stream with
%% {error, {sshrpc, timeout, #{}}}). If the calling process exits before the
%% stream ends, the stream is cancelled on the server.
-spec stream(conn(), module(), atom(), [term()]) -> {ok, stream()}.
stream(Conn, M, F, Args) ->
    stream(Conn, M, F, Args, #{}).

-spec stream(conn(), module(), atom(), [term()],
             #{window => pos_integer(), timeout => non_neg_integer()}) -> {ok, stream()}.
stream(Conn, M, F, Args, Opts) ->
    Window = maps:get(window, Opts, ?DEFAULT_WINDOW),
    CallOpts = maps:merge(#{stream => true, credit => Window},
                          maps:with([timeout], Opts)),
    Alias = erlang:monitor(process, Conn, [{alias, demonitor}]),
    Conn ! {sshrpc_stream, Alias, self(), {call, M, F, Args, CallOpts}},
    {ok, {sshrpc_stream, Conn, Alias}}.

%% @doc The stream's next item: {chunk, Value}, or {done, Result} once (the
%% call's final result, as call/4 returns it; {error, {sshrpc, closed, _}}
%% if the connection went away).
-spec next(stream()) -> {chunk, term()} | {done, result()}.
next(Stream) ->
    next(Stream, infinity).

%% @doc As next/1, but `timeout' if nothing arrived within TimeoutMs; the
%% stream goes on (call next again, or cancel/1).
-spec next(stream(), timeout()) -> {chunk, term()} | {done, result()} | timeout.
next({sshrpc_stream, Conn, Alias}, Timeout) ->
    receive
        {Alias, {chunk, V}} ->
            Conn ! {sshrpc_ack, Alias},
            {chunk, V};
        {Alias, {done, Result}} ->
            erlang:demonitor(Alias, [flush]),
            {done, Result};
        {Alias, {error, _} = Error} ->
            erlang:demonitor(Alias, [flush]),
            {done, Error};
        {'DOWN', Alias, process, _, Reason} ->
            {done, {error, {sshrpc, closed, #{reason => Reason}}}}
    after Timeout ->
        timeout
    end.

%% @doc Stop a stream: the server is sent {cancel, Id} (its function is
%% killed) and chunks still on their way are dropped.
-spec cancel(stream()) -> ok.
cancel({sshrpc_stream, Conn, Alias}) ->
    Conn ! {sshrpc_cancel, Alias},
    erlang:demonitor(Alias, [flush]),
    flush_alias(Alias).

flush_alias(Alias) ->
    receive
        {Alias, _} -> flush_alias(Alias)
    after 0 ->
        ok
    end.

%% @doc Fold Fun(Value, Acc) over the chunks of Stream, in order:
%% {ok, Acc, FinalValue}, or {error, Reason, Acc} with the chunks folded
%% before the stream failed.
-spec fold(fun((term(), Acc) -> Acc), Acc, stream()) ->
    {ok, Acc, term()} | {error, {atom(), term(), map()}, Acc}.
fold(Fun, Acc, Stream) ->
    case next(Stream) of
        {chunk, V} -> fold(Fun, Fun(V, Acc), Stream);
        {done, {ok, Final}} -> {ok, Acc, Final};
        {done, {error, Reason}} -> {error, Reason, Acc}
    end.

%% @doc M:F(Args...) on every connection at once: one result per connection,
%% in the order of Conns, each as call/4 returns it (like erpc:multicall/4).
-spec multicall([conn()], module(), atom(), [term()]) -> [result()].
multicall(Conns, M, F, Args) ->
    multicall(Conns, M, F, Args, infinity).

%% @doc As multicall/4 with one deadline for all: a connection that has not
%% answered within TimeoutMs gets {error, {sshrpc, timeout, #{}}} and its
%% call is cancelled on its server (the timeout also travels to each server
%% as the call's `timeout' option).
-spec multicall([conn()], module(), atom(), [term()], timeout()) -> [result()].
multicall(Conns, M, F, Args, Timeout) ->
    Opts = case Timeout of
               infinity -> #{};
               Ms when is_integer(Ms), Ms >= 0 -> #{timeout => Ms}
           end,
    Deadline = case Timeout of
                   infinity -> infinity;
                   _ -> erlang:monotonic_time(millisecond) + Timeout
               end,
    Aliases = [begin
                   Alias = erlang:monitor(process, Conn, [{alias, demonitor}]),
                   Conn ! {sshrpc_req, Alias, {call, M, F, Args, Opts}},
                   {Conn, Alias}
               end || Conn <- Conns],
    [collect(Conn, Alias, Deadline) || {Conn, Alias} <- Aliases].

collect(Conn, Alias, Deadline) ->
    Left = case Deadline of
               infinity -> infinity;
               _ -> max(0, Deadline - erlang:monotonic_time(millisecond))
           end,
    receive
        {Alias, Reply} ->
            erlang:demonitor(Alias, [flush]),
            Reply;
        {'DOWN', Alias, process, _, Reason} ->
            {error, {sshrpc, closed, #{reason => Reason}}}
    after Left ->
        Conn ! {sshrpc_cancel, Alias},
        erlang:demonitor(Alias, [flush]),
        receive
            {Alias, Reply} -> Reply
        after 0 ->
            {error, {sshrpc, timeout, #{}}}
        end
    end.

request(Conn, Req, Timeout) ->
    Alias = erlang:monitor(process, Conn, [{alias, demonitor}]),
    Conn ! {sshrpc_req, Alias, Req},
    receive
        {Alias, Reply} ->
            erlang:demonitor(Alias, [flush]),
            Reply;
        {'DOWN', Alias, process, _, Reason} ->
            {error, {sshrpc, closed, #{reason => Reason}}}
    after Timeout ->
        Conn ! {sshrpc_cancel, Alias},
        erlang:demonitor(Alias, [flush]),
        receive
            {Alias, Reply} -> Reply
        after 0 ->
            {error, {sshrpc, timeout, #{}}}
        end
    end.
