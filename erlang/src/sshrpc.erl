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
         server_info/1, close/1]).

-type conn() :: pid().
-type result() :: {ok, term()} | {error, {atom(), term(), map()}}.
-export_type([conn/0, result/0]).

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
%%   over the connection's life (node names, atoms in answers); the server
%%   can never add more
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
