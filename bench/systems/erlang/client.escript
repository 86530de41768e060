#!/usr/bin/env escript
%% The Erlang client driver for the benchmark: erlang/'s sshrpc client
%% (sshrpc:connect/3, call/4) speaking the driver protocol of
%% bench/systems/_common.py on stdin/stdout. Every loop is bounded in count
%% and time.
%%
%% Beyond the common protocol (for bench/call_cpu.py):
%%   reqs OPEN N MAX_S -> ok CALLS NS: one process keeping OPEN requests open
%%   on the connection and sending the next as each answer arrives, as
%%   erpc:send_request/receive_response would (each request is
%%   sshrpc:call/4's own message to the connection process, one alias each).
%%
%% Usage: escript client.escript PORT USER_DIR EBIN...
%% (USER_DIR holds id_ed25519 and known_hosts.)
-mode(compile).

-define(SMALL, payload(32)).

main([PortS, UserDir | Ebins]) ->
    code:add_pathsa(Ebins),
    %% stdout carries the driver protocol: logs go to stderr
    ok = logger:remove_handler(default),
    ok = logger:add_handler(default, logger_std_h, #{config => #{type => standard_error}}),
    ok = logger:set_primary_config(level, warning),
    {ok, _} = application:ensure_all_started(ssh),
    Port = list_to_integer(PortS),
    Opts = #{user => "root", user_dir => UserDir, max_frame => 64 * 1024 * 1024 + 4096,
             timeout => 30000,
             ssh => [{preferred_algorithms, [{cipher, ['aes128-gcm@openssh.com']}]}]},
    loop(#{port => Port, opts => Opts, conn => undefined}).

loop(S) ->
    case io:get_line(standard_io, "") of
        eof -> halt(0);
        {error, _} -> halt(0);
        Line ->
            case string:lexemes(string:trim(Line), " ") of
                ["quit"] -> halt(0);
                [] -> loop(S);
                [Op | Args] ->
                    {Answer, S2} =
                        try op(Op, [list_to_number(A) || A <- Args], S)
                        catch C:R -> {io_lib:format("err ~p:~0p", [C, R]), S}
                        end,
                    io:put_chars(standard_io, [Answer, $\n]),
                    loop(S2)
            end
    end.

list_to_number(A) ->
    try list_to_integer(A) catch error:badarg -> list_to_float(A) end.

ok(Values) ->
    ["ok" | [[$\s, fmt(V)] || V <- Values]].

fmt(V) when is_integer(V) -> integer_to_list(V);
fmt(V) when is_float(V) -> float_to_list(V, [{decimals, 9}, compact]).

now_ns() -> erlang:monotonic_time(nanosecond).

deadline(MaxS) -> now_ns() + round(MaxS * 1.0e9).

payload(Size) ->
    Pattern = list_to_binary(lists:seq(0, 255)),
    Full = binary:copy(Pattern, Size div 256 + 1),
    binary:part(Full, 0, Size).

%% A server's max_calls below the calls in flight answers overload at once
%% (the Erlang client does not hold slots): such a call is sent again.
echo(Conn, V) ->
    echo(Conn, V, 10000).

echo(Conn, V, Tries) ->
    case sshrpc:call(Conn, sshrpc_bench, echo, [V]) of
        {ok, V} -> ok;
        {error, {sshrpc, overload, _}} when Tries > 0 -> erlang:yield(), echo(Conn, V, Tries - 1)
    end.

connect(#{port := Port, opts := Opts}) ->
    {ok, Conn} = sshrpc:connect("127.0.0.1", Port, Opts),
    Conn.

op("connect", [], S) ->
    T0 = now_ns(),
    Conn = connect(S),
    echo(Conn, ?SMALL),
    {ok([(now_ns() - T0) / 1.0e9]), S#{conn => Conn}};
op("latency", [N, MaxS, Size], S = #{conn := Conn}) ->
    V = payload(Size),
    {ok(repeat(round(N), deadline(MaxS), fun() -> echo(Conn, V) end)), S};
op("bulk", [Size, Reps, MaxS], S = #{conn := Conn}) ->
    V = payload(Size),
    {ok(repeat(round(Reps), deadline(MaxS), fun() -> echo(Conn, V) end)), S};
op("setup", [N, MaxS], S) ->
    Times = repeat_setup(round(N), deadline(MaxS), S, []),
    {ok(Times), S};
op("pipe", [Depth, N, MaxS], S = #{conn := Conn}) ->
    Left = atomics:new(1, []),
    atomics:put(Left, 1, round(N)),
    End = deadline(MaxS),
    Parent = self(),
    T0 = now_ns(),
    Pids = [spawn_link(fun() -> Parent ! {done, self(), worker(Conn, Left, End, 0)} end)
            || _ <- lists:seq(1, round(Depth))],
    Done = lists:sum([receive {done, P, K} -> K end || P <- Pids]),
    {ok([Done, now_ns() - T0]), S};
op("reqs", [Open, N, MaxS], S = #{conn := Conn}) ->
    End = deadline(MaxS),
    T0 = now_ns(),
    V = ?SMALL,
    First = min(round(Open), round(N)),
    [send_req(Conn, V) || _ <- lists:seq(1, First)],
    Done = reqs_loop({Conn, V}, First, First, round(N), End, 0),
    {ok([Done, now_ns() - T0]), S};
op(Op, _, S) ->
    {"err " ++ Op ++ " unsupported", S}.

worker(Conn, Left, End, K) ->
    case atomics:sub_get(Left, 1, 1) >= 0 andalso now_ns() < End of
        true -> echo(Conn, ?SMALL), worker(Conn, Left, End, K + 1);
        false -> K
    end.

%% sshrpc:call/4 without the wait: the same message to the connection process.
send_req(Conn, V) ->
    Alias = erlang:monitor(process, Conn, [{alias, demonitor}]),
    Conn ! {sshrpc_req, Alias, {call, sshrpc_bench, echo, [V], #{}}},
    Alias.

reqs_loop(_Conn, 0, _Sent, _N, _End, Done) ->
    Done;
reqs_loop(CV = {Conn, V}, Open, Sent, N, End, Done) ->
    receive
        {Alias, {ok, _}} when is_reference(Alias) ->
            erlang:demonitor(Alias, [flush]),
            case Sent < N andalso now_ns() < End of
                true ->
                    send_req(Conn, V),
                    reqs_loop(CV, Open, Sent + 1, N, End, Done + 1);
                false ->
                    reqs_loop(CV, Open - 1, Sent, N, End, Done + 1)
            end;
        {Alias, {error, Reason}} when is_reference(Alias) ->
            error({call_failed, Reason});
        {'DOWN', _, process, Conn, Reason} ->
            error({connection_down, Reason})
    after 30000 ->
        error(reqs_stuck)
    end.

repeat(0, _End, _F) -> [];
repeat(N, End, F) ->
    T0 = now_ns(),
    F(),
    Dt = now_ns() - T0,
    case now_ns() > End of
        true -> [Dt];
        false -> [Dt | repeat(N - 1, End, F)]
    end.

repeat_setup(0, _End, _S, Acc) -> lists:reverse(Acc);
repeat_setup(N, End, S, Acc) ->
    T0 = now_ns(),
    Conn = connect(S),
    echo(Conn, ?SMALL),
    Dt = now_ns() - T0,
    sshrpc:close(Conn),
    case now_ns() > End of
        true -> lists:reverse([Dt | Acc]);
        false -> repeat_setup(N - 1, End, S, [Dt | Acc])
    end.
