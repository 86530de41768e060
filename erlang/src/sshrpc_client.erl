%% @doc The client side of one sshrpc channel (ssh_client_channel callback).
%% Use the sshrpc module; this one is its engine.
%%
%% Theory of operation. Callers (any number of processes) send requests to
%% the channel process as plain messages tagged with a monitor alias and wait
%% in their own receive, like erpc. The channel gives each request an id,
%% hands the frame to a writer process (ssh_connection:send/4 blocks on the
%% SSH window, and the channel must keep reading meanwhile, or a server that
%% stopped reading until we take its answers would deadlock us), and routes
%% each answer to the alias that asked. A caller that gives up sends
%% {sshrpc_cancel, Alias}: the channel sends {cancel, Id} and drops the final
%% answer when it comes; the alias is already inactive then.
-module(sshrpc_client).
-behaviour(ssh_client_channel).

-export([init/1, handle_call/3, handle_cast/2, handle_msg/2, handle_ssh_msg/2,
         terminate/2, code_change/3]).

-define(MIB, 1048576).
-define(DEFAULT_PEER_MAX, ?MIB).
-define(CLOSE_GRACE_MS, 5000).

-record(st, {
    cm :: pid(),
    ch :: integer(),
    owner :: pid(),              %% gets {sshrpc, Conn, {send|down, ...}}
    owns_cm :: boolean(),        %% close the SSH connection when we stop
    max_frame :: pos_integer(),  %% what we accept
    peer_max = ?DEFAULT_PEER_MAX :: pos_integer(),
    atom_budget :: non_neg_integer(), %% new atoms we still accept from the server
    atom_max :: non_neg_integer(),    %% max_new_atoms
    node_atoms :: non_neg_integer(),  %% max_node_atoms
    buf = sshrpc_wire:buffer() :: sshrpc_wire:buffer(),
    hello :: map() | undefined,  %% the server's hello
    hello_waiters = [] :: [term()],
    next_id = 1 :: non_neg_integer(),
    calls = #{} :: #{non_neg_integer() => reference()},   %% id -> caller alias
    streams = #{} :: #{non_neg_integer() => {non_neg_integer(), non_neg_integer()}},
                                 %% stream id -> {window, chunks consumed since the last credit}
    consumers = #{} :: #{reference() => reference()}, %% monitor of a stream's consumer -> alias
    consumer_mons = #{} :: #{reference() => reference()}, %% alias -> that monitor
    aliases = #{} :: #{reference() => non_neg_integer()}, %% alias -> id
    pings = #{} :: #{integer() => reference()},
    max_calls = infinity :: pos_integer() | infinity, %% the server's, from its hello
    waiting = queue:new() :: queue:queue({reference(), term()}), %% beyond max_calls
    waiting_aliases = #{} :: #{reference() => true},
    writer :: pid(),
    closing :: undefined | term(), %% the From of close/1
    stop = false :: boolean()
}).

init([CM, Ch, Owner, Opts]) ->
    process_flag(trap_exit, true),
    erlang:monitor(process, Owner),
    Timeout = maps:get(timeout, Opts, 10000),
    Subsystem = maps:get(subsystem, Opts, "sshrpc@k2r.org"),
    case ssh_connection:subsystem(CM, Ch, Subsystem, Timeout) of
        success ->
            Self = self(),
            Writer = spawn_link(fun() -> sshrpc_server:writer(Self, CM, Ch) end),
            MaxFrame = maps:get(max_frame, Opts, 64 * ?MIB),
            Hello = {hello, 1, #{max_frame => MaxFrame, client => <<"sshrpc-erlang/0.1.0">>}},
            Writer ! {write, sshrpc_wire:frame(Hello)},
            {ok, #st{cm = CM, ch = Ch, owner = Owner, owns_cm = maps:get(owns_cm, Opts, false),
                     max_frame = MaxFrame, writer = Writer,
                     atom_budget = maps:get(max_new_atoms, Opts, 1024),
                     atom_max = maps:get(max_new_atoms, Opts, 1024),
                     node_atoms = maps:get(max_node_atoms, Opts, 65536)}};
        Other ->
            {stop, {subsystem_refused, Other}}
    end.

handle_call(wait_hello, From, St = #st{hello = undefined, hello_waiters = W}) ->
    {noreply, St#st{hello_waiters = [From | W]}};
handle_call(wait_hello, _From, St = #st{hello = H}) ->
    {reply, {ok, H}, St};
handle_call(connection, _From, St = #st{cm = CM}) ->
    %% The SSH connection this channel runs on (sshrpc:open_channel/1,2).
    {reply, {ok, CM}, St};
handle_call(close, From, St) ->
    out({bye, normal}, St),
    erlang:send_after(?CLOSE_GRACE_MS, self(), sshrpc_close_now),
    {noreply, St#st{closing = From}};
handle_call(_Other, _From, St) ->
    {reply, {error, badarg}, St}.

handle_cast(_Msg, St) ->
    {noreply, St}.

code_change(_Old, St, _Extra) ->
    {ok, St}.

handle_msg({ssh_channel_up, _Ch, _CM}, St) ->
    {ok, St};
handle_msg({sshrpc_req, Alias, Req}, St) ->
    {ok, request(Alias, Req, St)};
handle_msg({sshrpc_stream, Alias, Consumer, Req}, St = #st{consumers = Cs}) ->
    %% A stream whose consumer exits is cancelled: it would otherwise wait
    %% for credit on the server for ever.
    MRef = erlang:monitor(process, Consumer),
    {ok, request(Alias, Req, St#st{consumers = Cs#{MRef => Alias},
                                   consumer_mons = (St#st.consumer_mons)#{Alias => MRef}})};
handle_msg({'DOWN', MRef, process, _, _}, St = #st{consumers = Cs}) when is_map_key(MRef, Cs) ->
    #{MRef := Alias} = Cs,
    handle_msg({sshrpc_cancel, Alias}, unwatch(Alias, St));
handle_msg({sshrpc_cancel, Alias}, St0) ->
    St = #st{aliases = As, waiting_aliases = WA} = unwatch(Alias, St0),
    case As of
        #{Alias := Id} ->
            out({cancel, Id}, St),
            {ok, St#st{aliases = maps:remove(Alias, As)}};
        _ when is_map_key(Alias, WA) ->
            %% Never sent: drop it from the queue.
            {ok, St#st{waiting_aliases = maps:remove(Alias, WA),
                       waiting = queue:filter(fun({A, _}) -> A =/= Alias end, St#st.waiting)}};
        _ ->
            {ok, St}
    end;
handle_msg({sshrpc_ack, Alias}, St = #st{aliases = As, streams = Ss}) ->
    %% The consumer took one chunk: grant credit back in batches of half the
    %% window, so at most a window of chunks waits in its mailbox.
    case As of
        #{Alias := Id} ->
            case Ss of
                #{Id := {Window, Taken}} when Taken + 1 >= Window div 2 ->
                    out({credit, Id, Taken + 1}, St),
                    {ok, St#st{streams = Ss#{Id := {Window, 0}}}};
                #{Id := {Window, Taken}} ->
                    {ok, St#st{streams = Ss#{Id := {Window, Taken + 1}}}};
                _ ->
                    {ok, St}
            end;
        _ ->
            {ok, St}
    end;
handle_msg({sshrpc_cast, M, F, A}, St) ->
    out_checked({cast, M, F, A}, St),
    {ok, St};
handle_msg({sshrpc_send, Dest, Msg}, St) ->
    out_checked({send, Dest, Msg}, St),
    {ok, St};
handle_msg({sshrpc_written, _N}, St) ->
    {ok, St};
handle_msg(sshrpc_flushed, St) ->
    {ok, St};
handle_msg(sshrpc_close_now, St) ->
    ret(St#st{stop = true});
handle_msg({'DOWN', _, process, Owner, _}, St = #st{owner = Owner}) ->
    ret(St#st{stop = true});
handle_msg({'EXIT', W, _}, St = #st{writer = W}) ->
    ret(St#st{stop = true});
handle_msg(_Other, St) ->
    {ok, St}.

%% The ssh_client_channel behaviour gives the window back when we return.
handle_ssh_msg({ssh_cm, _CM, {data, _Ch, 0, Data}}, St = #st{buf = Buf}) ->
    St1 = case sshrpc_wire:buffer_add(Data, Buf) of
              {wait, Buf1} -> St#st{buf = Buf1};
              {ready, Bin} -> parse(Bin, St)
          end,
    ret(St1);
handle_ssh_msg({ssh_cm, _CM, {data, _Ch, 1, Data}}, St) ->
    logger:info("sshrpc: server diagnostics: ~ts", [Data]),
    {ok, St};
handle_ssh_msg({ssh_cm, _, {eof, _}}, St) ->
    {ok, St};
handle_ssh_msg({ssh_cm, _, {closed, _}}, St) ->
    ret(St#st{stop = true});
handle_ssh_msg({ssh_cm, _, {exit_status, _, _}}, St) ->
    {ok, St};
handle_ssh_msg({ssh_cm, _, {exit_signal, _, _, _, _}}, St) ->
    ret(St#st{stop = true});
handle_ssh_msg(_Msg, St) ->
    {ok, St}.

terminate(Reason, St = #st{calls = Calls, pings = Pings, cm = CM}) ->
    Closed = {error, {sshrpc, closed, #{reason => closed_reason(Reason)}}},
    Waiting = [A || {A, _} <- queue:to_list(St#st.waiting)],
    [A ! {A, Closed} || A <- maps:values(Calls) ++ maps:values(Pings) ++ Waiting],
    [gen_server:reply(W, Closed) || W <- St#st.hello_waiters],
    case St#st.closing of
        undefined -> ok;
        From -> gen_server:reply(From, ok)
    end,
    %% A channel of its own connection closes the connection. A channel on
    %% a shared one (sshrpc:open_channel/1,2) is closed by ssh_client_channel
    %% itself before it calls this terminate: closing it again here would
    %% send a second CLOSE, which OpenSSH's sshd may find for a channel it
    %% has freed already -- and then it drops the whole connection.
    case St#st.owns_cm of
        true -> catch ssh:close(CM);
        false -> ok
    end,
    ok.

closed_reason(normal) -> normal;
closed_reason({shutdown, R}) -> R;
closed_reason(R) -> R.

ret(St = #st{stop = true, ch = Ch}) -> {stop, Ch, St};
ret(St) -> {ok, St}.

%%% Requests

request(Alias, ping, St = #st{pings = P}) ->
    Token = erlang:unique_integer([positive]),
    out({ping, Token}, St),
    St#st{pings = P#{Token => Alias}};
request(Alias, Req, St = #st{calls = Calls, max_calls = MaxCalls, waiting = W})
  when is_integer(MaxCalls), map_size(Calls) >= MaxCalls ->
    %% The server would answer overload: the caller waits here instead.
    St#st{waiting = queue:in({Alias, Req}, W),
          waiting_aliases = maps:put(Alias, true, St#st.waiting_aliases)};
request(Alias, Req, St) ->
    send_request(Alias, Req, St).

send_request(Alias, Req, St = #st{next_id = Id, calls = Calls, aliases = As, peer_max = Max}) ->
    Msg = case Req of
              {call, M, F, A, O} when map_size(O) =:= 0 -> {call, Id, M, F, A};
              {call, M, F, A, O} -> {call, Id, M, F, A, O};
              {spawn, M, F, A} -> {spawn, Id, M, F, A}
          end,
    case sshrpc_wire:frame(Msg, Max) of
        {ok, Frame, _} ->
            St#st.writer ! {write, Frame},
            Streams = case Msg of
                          {call, _, _, _, _, #{stream := true, credit := W}} ->
                              (St#st.streams)#{Id => {W, 0}};
                          _ -> St#st.streams
                      end,
            St#st{next_id = Id + 1, calls = Calls#{Id => Alias}, aliases = As#{Alias => Id},
                  streams = Streams};
        {too_large, N} ->
            Alias ! {Alias, {error, {sshrpc, too_large,
                                     #{message => detail("the request is ~b bytes; the server "
                                                         "accepts ~b", [N, Max])}}}},
            St
    end.

out(Term, #st{writer = W}) ->
    W ! {write, sshrpc_wire:frame(Term)},
    ok.

out_checked(Term, #st{writer = W, peer_max = Max}) ->
    case sshrpc_wire:frame(Term, Max) of
        {ok, Frame, _} -> W ! {write, Frame}, ok;
        {too_large, N} ->
            logger:warning("sshrpc: dropped a ~b-byte ~p: above the server's max_frame",
                           [N, element(1, Term)])
    end.

%%% Frames in

parse(Bin, St = #st{max_frame = Max}) ->
    case sshrpc_wire:take_one(Bin, Max) of
        {more, Rest} ->
            St#st{buf = sshrpc_wire:buffer(Rest)};
        {too_large, Len} ->
            out({bye, {frame_too_large, Len, Max}}, St),
            St#st{stop = true};
        {frame, Payload, Rest} ->
            StopAfter = min(St#st.atom_budget, sshrpc_server:node_atoms_left(St#st.node_atoms)),
            St1 = case sshrpc_wire:decode(Payload, #{max => Max, stop_after => StopAfter}) of
                      {ok, Term, _} ->
                          answer(Term, St);
                      {error, Detail} ->
                          out({bye, {bad_term, Detail}}, St),
                          St#st{stop = true};
                      {new_atoms, N, Detail} ->
                          new_atoms(Payload, N, Detail, St);
                      {inflate_too_large, Size} ->
                          out({bye, {frame_too_large, Size, Max}}, St),
                          St#st{stop = true}
                  end,
            case St1#st.stop of
                true -> St1;
                false -> parse(Rest, St1)
            end
    end.

%% Atoms this node does not know, in a frame from the server: charged to the
%% connection's budget (max_new_atoms) and the node's (max_node_atoms, shared
%% with the sshrpc servers on this node) before anything is created. Beyond
%% either, nothing is created: the call it answers fails with
%% {error, {sshrpc, badarg, #{reason => atom_limit, ...}}} (and is cancelled
%% on the server), a send or down is dropped and logged; only a frame whose
%% envelope cannot be read ends the connection.
new_atoms(Payload, N, Detail, St = #st{atom_budget = Left}) ->
    NodeMax = St#st.node_atoms,
    Charged = N =< Left andalso sshrpc_server:charge_node_atoms(N, NodeMax),
    case Charged of
        ok ->
            case sshrpc_wire:decode_new_atoms(Payload) of
                {ok, Term} -> answer(Term, St#st{atom_budget = Left - N});
                {error, D} -> out({bye, {bad_term, D}}, St), St#st{stop = true}
            end;
        _ ->
            {Scope, Limit} = case N > Left of
                                 true -> {connection, St#st.atom_max};
                                 false -> {node, NodeMax}
                             end,
            Msg = detail("~b new atoms would pass the ~p budget of ~b (~ts)",
                         [N, Scope, Limit, Detail]),
            logger:warning("sshrpc: refused an answer from the server: ~ts", [Msg]),
            Details = #{reason => atom_limit, scope => Scope, new_atoms => N, limit => Limit,
                        message => Msg},
            case sshrpc_wire:envelope(Payload) of
                {Tag, _, Id, _} when Tag =:= reply; Tag =:= error; Tag =:= chunk ->
                    case is_map_key(Id, St#st.calls) of
                        true ->
                            out({cancel, Id}, St),
                            final(Id, {error, {sshrpc, badarg, Details}}, St);
                        false ->
                            St
                    end;
                {Tag, _, _, _} when Tag =:= send; Tag =:= down ->
                    St;
                _ ->
                    out({bye, {atom_limit, Msg}}, St),
                    St#st{stop = true}
            end
    end.

answer({hello, 1, H}, St = #st{hello = undefined}) when is_map(H) ->
    [gen_server:reply(W, {ok, H}) || W <- St#st.hello_waiters],
    PeerMax = case maps:get(max_frame, H, ?DEFAULT_PEER_MAX) of
                  N when is_integer(N), N > 0 -> N;
                  _ -> ?DEFAULT_PEER_MAX
              end,
    MaxCalls = case maps:get(max_calls, H, infinity) of
                   M when is_integer(M), M > 0 -> M;
                   _ -> infinity
               end,
    St#st{hello = H, hello_waiters = [], peer_max = PeerMax, max_calls = MaxCalls};
answer({reply, Id, V}, St) ->
    final(Id, {ok, V}, St);
answer({error, Id, {C, R, D}}, St) ->
    final(Id, {error, {C, R, D}}, St);
answer({pong, Token}, St = #st{pings = P}) ->
    case maps:take(Token, P) of
        {Alias, P1} -> Alias ! {Alias, pong}, St#st{pings = P1};
        error -> St
    end;
answer({send, Dest, Msg}, St = #st{owner = O}) ->
    O ! {sshrpc, self(), {send, Dest, Msg}},
    St;
answer({down, Pid, Reason}, St = #st{owner = O}) ->
    O ! {sshrpc, self(), {down, Pid, Reason}},
    St;
answer({bye, Reason}, St) ->
    case Reason of
        normal -> ok;
        _ -> logger:warning("sshrpc: server closed the session: ~0p", [Reason])
    end,
    St#st{stop = true};
answer({chunk, Id, V}, St = #st{calls = Calls, streams = Ss}) ->
    case {Calls, Ss} of
        {#{Id := Alias}, #{Id := _}} -> Alias ! {Alias, {chunk, V}};
        _ -> ok
    end,
    St;
answer(Other, St) ->
    logger:info("sshrpc: ignored ~0p", [Other]),
    St.

final(Id, Result, St = #st{calls = Calls, aliases = As, streams = Ss}) ->
    case maps:take(Id, Calls) of
        {Alias, Calls1} ->
            case is_map_key(Id, Ss) of
                true -> Alias ! {Alias, {done, Result}};
                false -> Alias ! {Alias, Result}
            end,
            next_waiting(unwatch(Alias, St#st{calls = Calls1, aliases = maps:remove(Alias, As),
                                              streams = maps:remove(Id, Ss)}));
        error ->
            St
    end.

%% Stop watching a stream's consumer.
unwatch(Alias, St = #st{consumers = Cs, consumer_mons = CM}) ->
    case maps:take(Alias, CM) of
        {MRef, CM1} ->
            erlang:demonitor(MRef, [flush]),
            St#st{consumers = maps:remove(MRef, Cs), consumer_mons = CM1};
        error ->
            St
    end.

next_waiting(St = #st{waiting = W, waiting_aliases = WA}) ->
    case queue:out(W) of
        {empty, _} ->
            St;
        {{value, {Alias, Req}}, W1} ->
            send_request(Alias, Req, St#st{waiting = W1, waiting_aliases = maps:remove(Alias, WA)})
    end.

detail(Fmt, Args) ->
    iolist_to_binary(io_lib:format(Fmt, Args)).
