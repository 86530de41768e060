%% @doc The sshrpc subsystem for OTP's ssh daemon: one SSH channel in, one
%% PROTOCOL.md v1 session out.
%%
%% Use subsystem_spec/1 in ssh:daemon's `subsystems' option (sshrpc_daemon
%% does this for you, for both names "sshrpc@k2r.org" and "sshrpc").
%%
%% Theory of operation. The channel process owns the session state and never
%% blocks: it reassembles frames from channel data (a length above max_frame
%% ends the session before the payload is buffered), decodes them with
%% binary_to_term(B, [safe]), checks the access policy, and starts one worker
%% process per call. A worker applies M:F(Args...), encodes its own answer
%% (checking the client's max_frame) and sends it back; answers therefore
%% leave in any order. Cancel and timeout kill the worker; the pid of a killed
%% worker is forgotten first, so a late answer from it is dropped and every
%% call gets exactly one final answer. Bytes go out through a writer process
%% that calls the blocking ssh_connection:send/4, so the SSH window paces the
%% writer, not the session. The session counts the bytes it queued to the
%% writer. The ssh_server_channel behaviour gives the client window back each
%% time handle_ssh_msg/2 returns, so while the queued bytes exceed
%% max_out_bytes the session does not return from handle_ssh_msg/2: it waits
%% there for the writer (and nothing else), the window stays shut, and a
%% client that does not read its answers soon cannot send.
-module(sshrpc_server).
-behaviour(ssh_server_channel).

-export([subsystem_spec/1, default_options/0, atom_statistics/0, compile_policy/1,
         charge_node_atoms/2, node_atoms_left/1]).
-export([init/1, handle_msg/2, handle_ssh_msg/2, terminate/2]).
-export([writer/3]).  %% shared with sshrpc_client

-define(MIB, 1048576).
-define(DEFAULT_PEER_MAX, ?MIB).              %% PROTOCOL.md section 2
-define(DEFAULT_CREDIT, 16).                  %% PROTOCOL.md section 4
-define(MAX_ID, 18446744073709551615).        %% ids are below 2^64
-define(CLOSE_GRACE_MS, 5000).                %% time to flush a bye
-define(FEATURES, [call, cast, cancel, deadline, stream, spawn, send, ping]).
-define(KNOWN_TAGS, [hello, call, cast, cancel, credit, ping, bye, spawn, send, mfa]).

-type mfa_rule() :: {module(), atom() | '_', arity() | '_'}.
-type options() :: #{
    allow => [mfa_rule()],       %% what may run; [] (default) forbids everything
    max_calls => pos_integer(),  %% open calls per channel (default 1024)
    max_frame => pos_integer(),  %% largest payload accepted (default 64 MiB)
    max_out_bytes => pos_integer(), %% answer bytes queued before reading stops (default 4 MiB)
    expose_traces => boolean(),  %% put stack traces in error Details (default false)
    send_names => [atom()],      %% registered names a client may send to (default [])
    send_any => boolean(),       %% let clients send to any pid or name (default false)
    name => binary(),            %% the hello's `server' value
    detached => [mfa_rule()],    %% casts and spawns of these outlive the session (default [])
    policy => none | [tuple()] | {file, file:filename_all()} | {compiled, sshrpc_policy:policy()},
                                 %% per-key rules; see sshrpc_policy (default none)
    max_session_atoms => non_neg_integer(), %% new atoms one session may add (default 4096)
    max_node_atoms => non_neg_integer()     %% new atoms all sessions on this node may add (default 65536)
}.
-export_type([options/0, mfa_rule/0]).

-record(call, {
    pid :: pid(),                 %% the worker
    mref :: reference(),          %% its monitor
    timer :: reference() | undefined, %% the `timeout' option's timer
    credit = 0 :: non_neg_integer(), %% stream credit left
    parked :: {reference(), iodata()} | undefined, %% a chunk waiting for credit
    mfa :: {atom(), atom(), arity()},  %% for the audit line
    start :: integer()                 %% erlang:monotonic_time() at start
}).

-record(st, {
    cm :: pid() | undefined,      %% connection manager
    ch :: integer() | undefined,  %% our channel id
    user = <<>> :: term(),        %% the authenticated user name, for logs
    key = unknown :: sshrpc_keys:identity() | unknown, %% the key that authenticated
    policy = none :: none | sshrpc_policy:policy(), %% per-key rules (narrow `allow')
    opts :: map(),                %% options(), defaults filled in
    allow :: map(),               %% the allow list as a set
    rx_max :: pos_integer(),      %% max payload we accept right now
    peer_max = ?DEFAULT_PEER_MAX :: pos_integer(), %% client's max_frame
    buf = sshrpc_wire:buffer() :: sshrpc_wire:buffer(), %% an incomplete frame
    mode = init :: init | v1 | legacy,
    draining = false :: boolean(), %% client said {bye, normal}: no new calls
    closing = false :: boolean(), %% we sent bye: wait for the flush, then stop
    stop = false :: boolean(),    %% stop the channel when this message is handled
    calls = #{} :: #{non_neg_integer() => #call{}},
    workers = #{} :: #{pid() => non_neg_integer()}, %% worker pid -> call id
    casts = #{} :: #{reference() => pid()}, %% running casts
    spawned = #{} :: #{reference() => pid()}, %% processes from {spawn, ...}
    spawned_pids = #{} :: #{pid() => reference()},
    detached = #{} :: #{pid() => true}, %% casts and spawns that outlive the session
    writer :: pid() | undefined,
    session :: pid() | undefined, %% the relay named in the hello
    out_bytes = 0 :: non_neg_integer(), %% queued to the writer, not yet sent
    legacy_q = queue:new() :: queue:queue(term()),
    legacy_busy = false :: false | {pid(), reference()},
    legacy_audit :: {{atom(), atom(), arity()}, integer()} | undefined,
    atoms_left :: non_neg_integer()  %% new atoms this session may still add
}).

-define(ATOM_COUNTER, {?MODULE, new_atoms}).

%% @doc The entry for ssh:daemon's `subsystems' option, name "sshrpc@k2r.org".
-spec subsystem_spec(options()) -> {string(), {module(), [options()]}}.
subsystem_spec(Opts) ->
    {"sshrpc@k2r.org", {?MODULE, [Opts]}}.

-spec default_options() -> map().
default_options() ->
    #{allow => [], max_calls => 1024, max_frame => 64 * ?MIB, max_out_bytes => 4 * ?MIB,
      expose_traces => false, send_names => [], send_any => false,
      name => <<"sshrpc-erlang/0.1.0">>,
      max_session_atoms => 4096, max_node_atoms => 65536, detached => [], policy => none}.

%% @doc The policy option, compiled: `none', or a policy; {error, Why} when
%% the file or the terms are bad.
-spec compile_policy(term()) -> {ok, none | sshrpc_policy:policy()} | {error, binary()}.
compile_policy(none) -> {ok, none};
compile_policy({compiled, P}) -> {ok, P};
compile_policy({file, Path}) -> sshrpc_policy:load(Path);
compile_policy(Terms) -> sshrpc_policy:from_terms(Terms).

%% @doc How many atoms sshrpc sessions have added to this node's atom table
%% since it started (the count the `max_node_atoms' ceiling applies to).
-spec atom_statistics() -> #{new_atoms := non_neg_integer()}.
atom_statistics() ->
    #{new_atoms => atomics:get(atom_counter(), 1)}.

%% The node-wide count of atoms added by sessions: one atomics array, made
%% once per node (global:trans serialises the first sessions).
atom_counter() ->
    case persistent_term:get(?ATOM_COUNTER, undefined) of
        undefined ->
            global:trans({?ATOM_COUNTER, self()},
                         fun() ->
                             case persistent_term:get(?ATOM_COUNTER, undefined) of
                                 undefined ->
                                     Ref = atomics:new(1, [{signed, false}]),
                                     persistent_term:put(?ATOM_COUNTER, Ref),
                                     Ref;
                                 Ref ->
                                     Ref
                             end
                         end, [node()]);
        Ref ->
            Ref
    end.

%%% ssh_server_channel callbacks

init([Opts0]) ->
    process_flag(trap_exit, true),
    Opts = maps:merge(default_options(), maps:from_list(to_list(Opts0))),
    Allow = maps:from_list([{Rule, true} || Rule <- maps:get(allow, Opts)]),
    %% Load the exposed modules, so that their function names exist as atoms
    %% before a request names them (and do not count against the atom budgets).
    _ = [code:ensure_loaded(M) || {M, _, _} <- maps:get(allow, Opts)],
    _ = atom_counter(),
    {ok, Policy} = compile_policy(maps:get(policy, Opts)),
    {ok, #st{opts = Opts, allow = Allow, policy = Policy,
             rx_max = min(?MIB, maps:get(max_frame, Opts)),
             atoms_left = maps:get(max_session_atoms, Opts)}}.

to_list(M) when is_map(M) -> maps:to_list(M);
to_list(L) when is_list(L) -> L.

handle_msg({ssh_channel_up, Ch, CM}, St) ->
    Self = self(),
    Writer = spawn_link(fun() -> writer(Self, CM, Ch) end),
    Session = spawn_link(fun() -> relay(Self) end),
    User = case catch ssh:connection_info(CM, [user]) of
               [{user, U}] -> U;
               _ -> unknown
           end,
    {ok, St#st{cm = CM, ch = Ch, writer = Writer, session = Session, user = User,
               key = sshrpc_keys:identity(CM)}};
handle_msg({sshrpc_done, Pid, Frame, Outcome}, St) ->
    ret(done(Pid, Frame, Outcome, St));
handle_msg({sshrpc_chunk, Pid, Ref, Frame}, St) ->
    ret(chunk(Pid, Ref, Frame, St));
handle_msg({sshrpc_timeout, Pid}, St) ->
    ret(stop_call(Pid, timeout, St));
handle_msg({sshrpc_written, N}, St = #st{out_bytes = Out}) ->
    {ok, St#st{out_bytes = Out - N}};
handle_msg(sshrpc_flushed, St) ->
    ret(St#st{stop = true});
handle_msg(sshrpc_close_now, St) ->
    ret(St#st{stop = true});
handle_msg({sshrpc_mailbox, Msg}, St = #st{session = S, peer_max = Max}) ->
    case sshrpc_wire:frame({send, S, Msg}, Max) of
        {ok, F, _} -> ret(out(F, St));
        {too_large, N} ->
            logger:warning("sshrpc: dropped a ~b-byte message to session ~p: above the "
                           "client's max_frame", [N, S]),
            ret(St)
    end;
handle_msg({sshrpc_statistics, From, Ref}, St) ->
    From ! {Ref, session_statistics(St)},
    {ok, St};
handle_msg({'DOWN', MRef, process, Pid, Reason}, St) ->
    ret(down(MRef, Pid, Reason, St));
handle_msg({'EXIT', Pid, Reason}, St = #st{writer = Pid}) ->
    logger:info("sshrpc: channel writer ended: ~p", [Reason]),
    ret(St#st{stop = true});
handle_msg({'EXIT', _Pid, _Reason}, St) ->
    {ok, St};
handle_msg(Other, St) ->
    logger:info("sshrpc: unexpected message ~p", [Other]),
    {ok, St}.

handle_ssh_msg({ssh_cm, _CM, {data, _Ch, 0, _Data}}, St = #st{closing = true}) ->
    {ok, St};
handle_ssh_msg({ssh_cm, _CM, {data, _Ch, 0, Data}}, St = #st{buf = Buf}) ->
    St1 = case sshrpc_wire:buffer_add(Data, Buf) of
              {wait, Buf1} -> St#st{buf = Buf1};
              {ready, Bin} -> parse(Bin, St)
          end,
    ret(wait_for_room(St1));
handle_ssh_msg({ssh_cm, _CM, {data, _Ch, _Type, _Data}}, St) ->
    {ok, St};
handle_ssh_msg({ssh_cm, _CM, {eof, _Ch}}, St) ->
    ret(drain(St));
handle_ssh_msg({ssh_cm, _CM, {signal, _Ch, _}}, St) ->
    {ok, St};
handle_ssh_msg({ssh_cm, _CM, {exit_signal, _Ch, _, _, _}}, St) ->
    ret(St#st{stop = true});
handle_ssh_msg({ssh_cm, _CM, {exit_status, _Ch, _}}, St) ->
    ret(St#st{stop = true});
handle_ssh_msg(_Msg, St) ->
    {ok, St}.

terminate(_Reason, St = #st{calls = Calls, legacy_busy = LB}) ->
    [exit(P, kill) || #call{pid = P} <- maps:values(Calls)],
    case LB of
        {LP, _} -> exit(LP, kill);
        false -> ok
    end,
    [exit(P, kill) || P <- maps:values(St#st.casts) ++ maps:values(St#st.spawned),
                      not is_map_key(P, St#st.detached)],
    [exit(P, kill) || P <- [St#st.writer, St#st.session], is_pid(P)],
    ok.

%% What `{sshrpc_statistics, From, Ref}' answers (for operators and tests).
session_statistics(#st{calls = C, out_bytes = Out, casts = Casts, spawned = Sp,
                        atoms_left = AL, opts = #{max_session_atoms := AMax}}) ->
    #{open_calls => map_size(C), queued_answer_bytes => Out,
      running_casts => map_size(Casts), spawned => map_size(Sp), new_atoms => AMax - AL}.

ret(St = #st{stop = true, ch = Ch}) -> {stop, Ch, St};
ret(St) -> {ok, St}.

%%% Frames in

parse(_Bin, St = #st{closing = true}) ->
    St;
parse(Bin, St = #st{rx_max = Max}) ->
    case sshrpc_wire:take_one(Bin, Max) of
        {more, Rest} ->
            St#st{buf = sshrpc_wire:buffer(Rest)};
        {too_large, Len} ->
            bye({frame_too_large, Len, Max}, St#st{buf = sshrpc_wire:buffer()});
        {frame, Payload, Rest} ->
            parse(Rest, payload(Payload, St))
    end.

payload(Payload, St = #st{rx_max = Max, atoms_left = Left, opts = #{max_node_atoms := NMax}}) ->
    %% Counting stops where a budget would refuse anyway.
    StopAfter = min(Left, node_atoms_left(NMax)),
    case sshrpc_wire:decode(Payload, #{max => Max, stop_after => StopAfter}) of
        {ok, Term, _} -> term(Term, St);
        {error, Detail} -> bye({bad_term, Detail}, St);
        {inflate_too_large, Size} -> bye({frame_too_large, Size, Max}, St);
        {new_atoms, N, Detail} -> new_atoms(Payload, N, Detail, St)
    end.

%%% Atoms this node does not know yet
%%
%% The atom table is never collected, so a request that would add N atoms is
%% charged to two budgets before binary_to_term creates any: the session's
%% (max_session_atoms) and the node's (max_node_atoms, one counter for every
%% sshrpc session on the node). Within both it is decoded and served like
%% any other. Beyond either nothing is created and the request is answered
%% from its envelope, read without decoding: a call or spawn gets
%% {error, Id, {sshrpc, badarg, #{reason => atom_limit, ...}}}, a ping its
%% pong, a legacy mfa {answer, {{exec_badrpc, atom_limit}, -1}}; a cast or
%% send is dropped and logged (they are never answered). Only a frame whose
%% envelope cannot be read ends the session, with {bye, {atom_limit, Detail}}.

new_atoms(Payload, N, Detail, St) ->
    case charge_atoms(N, St) of
        {ok, St1} ->
            case sshrpc_wire:decode_new_atoms(Payload) of
                {ok, Term} -> term(Term, St1);
                {error, D} -> bye({bad_term, D}, St1)
            end;
        {refused, Scope, Limit} ->
            Msg = detail("~b new atoms would pass the ~p budget of ~b (~ts)",
                         [N, Scope, Limit, Detail]),
            logger:warning("sshrpc: refused a request from user ~p: ~ts", [St#st.user, Msg]),
            Details = #{reason => atom_limit, scope => Scope, new_atoms => N, limit => Limit,
                        message => Msg},
            atom_limit(sshrpc_wire:envelope(Payload), Details, St)
    end.

charge_atoms(N, #st{atoms_left = Left, opts = #{max_session_atoms := Max}}) when N > Left ->
    {refused, session, Max};
charge_atoms(N, St = #st{atoms_left = Left, opts = #{max_node_atoms := Max}}) ->
    case charge_node_atoms(N, Max) of
        ok -> {ok, St#st{atoms_left = Left - N}};
        refused -> {refused, node, Max}
    end.

%% @doc How many more atoms the node-wide count allows under Max.
-spec node_atoms_left(non_neg_integer()) -> non_neg_integer().
node_atoms_left(Max) ->
    max(0, Max - atomics:get(atom_counter(), 1)).

%% @doc Charge N new atoms to the node-wide count if it stays within Max
%% (shared by every sshrpc session and client connection on this node).
-spec charge_node_atoms(non_neg_integer(), non_neg_integer()) -> ok | refused.
charge_node_atoms(N, Max) ->
    Ref = atom_counter(),
    case atomics:add_get(Ref, 1, N) of
        Total when Total > Max ->
            atomics:sub(Ref, 1, N),
            refused;
        _ ->
            ok
    end.

atom_limit({mfa, _, _, _}, Details, St = #st{mode = init, opts = O}) ->
    atom_limit({mfa, 2, unknown, <<>>}, Details,
               St#st{mode = legacy, rx_max = maps:get(max_frame, O)});
atom_limit(_, Details, St = #st{mode = legacy}) ->
    %% Legacy mode answers every frame, in order.
    legacy({sshrpc_atom_limit, Details}, St);
atom_limit({Tag, _, Id, _}, Details, St = #st{mode = v1})
  when Tag =:= call; Tag =:= spawn; Tag =:= cancel; Tag =:= credit ->
    case valid_id(Id) andalso not is_map_key(Id, St#st.calls) of
        true ->
            out(error_frame(Id, sshrpc, badarg, Details), St);
        false ->
            bye({protocol_error, detail("~p message with too many new atoms and no usable id",
                                        [Tag])}, St)
    end;
atom_limit({ping, 2, _, Token}, _Details, St = #st{mode = v1}) ->
    %% {pong, Token} built from the token's own bytes: no atom is created.
    Pong = <<131, 104, 2, 119, 4, "pong", Token/binary>>,
    out([<<(byte_size(Pong)):32>>, Pong], St);
atom_limit({Tag, _, _, _}, #{message := Msg}, St = #st{mode = v1})
  when Tag =:= cast; Tag =:= send ->
    logger:warning("sshrpc: dropped a ~p from user ~p: ~ts", [Tag, St#st.user, Msg]),
    St;
atom_limit({bye, _, _, _}, _Details, St = #st{mode = v1}) ->
    St#st{stop = true};
atom_limit({Tag, _, _, _}, _Details, St = #st{mode = v1}) ->
    case lists:member(Tag, ?KNOWN_TAGS) of
        false ->
            logger:info("sshrpc: ignored a message with unknown tag ~p", [Tag]),
            St;
        true ->
            bye({protocol_error, detail("malformed ~p message", [Tag])}, St)
    end;
atom_limit(_, #{message := Msg}, St) ->
    bye({atom_limit, Msg}, St).

%% The first frame decides the mode.
term({hello, 1, M}, St = #st{mode = init}) when is_map(M) ->
    PeerMax = case maps:get(max_frame, M, ?DEFAULT_PEER_MAX) of
                  N when is_integer(N), N > 0 -> N;
                  _ -> ?DEFAULT_PEER_MAX
              end,
    #st{opts = O, session = S} = St,
    Hello = {hello, 1, #{max_frame => maps:get(max_frame, O), server => maps:get(name, O),
                         node => node(), session => S, max_calls => maps:get(max_calls, O),
                         features => ?FEATURES}},
    out(sshrpc_wire:frame(Hello),
        St#st{mode = v1, peer_max = PeerMax, rx_max = maps:get(max_frame, O)});
term({hello, V, _}, St = #st{mode = init}) when V =/= 1 ->
    bye({unsupported_version, [1]}, St);
term({mfa, _} = T, St = #st{mode = init, opts = O}) ->
    legacy(T, St#st{mode = legacy, rx_max = maps:get(max_frame, O)});
term(_, St = #st{mode = init}) ->
    bye({protocol_error, <<"the first frame must be a hello or a legacy mfa">>}, St);
term(T, St = #st{mode = legacy}) ->
    legacy(T, St);
term(T, St = #st{mode = v1}) ->
    request(T, St).

%%% Version 1 requests

request({call, Id, M, F, A}, St) ->
    call(Id, M, F, A, #{}, St);
request({call, Id, M, F, A, O}, St) ->
    call(Id, M, F, A, O, St);
request({cast, M, F, A}, St) when is_atom(M), is_atom(F), is_list(A) ->
    cast(M, F, A, St);
request({cancel, Id}, St) when is_integer(Id) ->
    case St#st.calls of
        #{Id := #call{pid = Pid}} -> stop_call(Pid, cancelled, St);
        _ -> St
    end;
request({credit, Id, N}, St) when is_integer(Id), is_integer(N), N >= 0 ->
    credit(Id, N, St);
request({ping, Token}, St) ->
    out(sshrpc_wire:frame({pong, Token}), St);
request({bye, normal}, St) ->
    drain(St);
request({bye, _Reason}, St) ->
    St#st{stop = true};
request({spawn, Id, M, F, A}, St) ->
    spawn_req(Id, M, F, A, St);
request({send, Dest, Msg}, St) when is_pid(Dest); is_atom(Dest) ->
    send_request(Dest, Msg, St);
request(T, St) when is_tuple(T), tuple_size(T) >= 1 ->
    Tag = element(1, T),
    case lists:member(Tag, ?KNOWN_TAGS) of
        false ->
            logger:info("sshrpc: ignored a message with unknown tag ~p", [Tag]),
            St;
        true ->
            malformed(T, St)
    end;
request(_T, St) ->
    bye({protocol_error, <<"a request must be a tuple">>}, St).

%% A known tag with a wrong shape: badarg if an id can be read, else bye.
malformed(T, St) when tuple_size(T) >= 2, (element(1, T) =:= call orelse
                                           element(1, T) =:= spawn orelse
                                           element(1, T) =:= cancel orelse
                                           element(1, T) =:= credit) ->
    Id = element(2, T),
    case valid_id(Id) andalso not is_map_key(Id, St#st.calls) of
        true ->
            error_out(Id, badarg, <<"malformed ", (atom_to_binary(element(1, T)))/binary>>, St);
        false ->
            bye({protocol_error, detail("malformed ~p message and no usable id", [element(1, T)])},
                St)
    end;
malformed(T, St) ->
    bye({protocol_error, detail("malformed ~p message", [element(1, T)])}, St).

valid_id(Id) -> is_integer(Id) andalso Id >= 0 andalso Id =< ?MAX_ID.

%% Checks shared by call and spawn: a fresh id, then the shape.
check_id(Id, St) ->
    case valid_id(Id) of
        false ->
            {bye, {protocol_error, detail("id ~0p is not an integer in 0..2^64-1", [Id])}};
        true ->
            case is_map_key(Id, St#st.calls) of
                true -> {bye, {protocol_error, detail("id ~b is already in use", [Id])}};
                false -> ok
            end
    end.

call(Id, M, F, A, O, St = #st{opts = Opts, calls = Calls}) ->
    case check_id(Id, St) of
        {bye, Reason} ->
            bye(Reason, St);
        ok ->
            case is_atom(M) andalso is_atom(F) andalso is_proper_list(A) andalso valid_opts(O) of
                false ->
                    error_out(Id, badarg, <<"malformed call">>, St);
                true when St#st.draining ->
                    error_out(Id, shutting_down, <<"the session is closing">>, St);
                true ->
                    Stream = maps:get(stream, O, false),
                    Arity = length(A) + case Stream of true -> 1; false -> 0 end,
                    case map_size(Calls) >= maps:get(max_calls, Opts) of
                        true -> error_out(Id, overload, St);
                        false ->
                            case allowed(M, F, Arity, St) of
                                false -> forbidden(call, Id, M, F, Arity, St);
                                true -> start_call(Id, M, F, A, O, Stream, St)
                            end
                    end
            end
    end.

valid_opts(O) when is_map(O) ->
    case O of
        #{timeout := T} when not (is_integer(T) andalso T >= 0) -> false;
        #{stream := S} when not is_boolean(S) -> false;
        #{credit := C} when not (is_integer(C) andalso C >= 0) -> false;
        _ -> true
    end;
valid_opts(_) ->
    false.

is_proper_list(L) when is_list(L) ->
    try length(L) of
        _ -> true
    catch
        error:badarg -> false
    end;
is_proper_list(_) ->
    false.

%% The allow list exposes M:F/A, and the per-key policy (if any) lets this
%% session's key call it.
allowed(M, F, A, #st{allow = Allow, policy = Policy, key = Key}) ->
    (is_map_key({M, F, A}, Allow) orelse is_map_key({M, F, '_'}, Allow)
        orelse is_map_key({M, '_', '_'}, Allow))
        andalso (Policy =:= none orelse sshrpc_policy:permits(Policy, Key, M, F, A)).

forbidden(Kind, Id, M, F, A, St) ->
    audit(St, Kind, {M, F, A}, forbidden, 0),
    error_out(Id, forbidden, detail("~0p:~0p/~b is not exposed", [M, F, A]), St).

audit(#st{key = Key, user = User}, Kind, MFA, Outcome, Duration) ->
    sshrpc_audit:log(Key, Kind, MFA, Outcome, Duration, User).

audit_end(St, #call{mfa = MFA, start = T0}, Outcome) ->
    audit(St, call, MFA, Outcome, erlang:monotonic_time() - T0).

start_call(Id, M, F, A, O, Stream, St = #st{calls = Calls, workers = Ws}) ->
    Self = self(),
    Cfg = {St#st.peer_max, maps:get(expose_traces, St#st.opts)},
    {Pid, MRef} = spawn_opt(fun() -> worker(Self, Id, M, F, A, Stream, Cfg) end,
                            [link, monitor]),
    Timer = case O of
                #{timeout := Ms} when Ms =< 16#FFFFFFFF ->
                    erlang:send_after(Ms, Self, {sshrpc_timeout, Pid});
                _ -> undefined  %% none, or beyond erlang:send_after's range (49 days)
            end,
    C = #call{pid = Pid, mref = MRef, timer = Timer,
              credit = maps:get(credit, O, ?DEFAULT_CREDIT),
              mfa = {M, F, length(A) + case Stream of true -> 1; false -> 0 end},
              start = erlang:monotonic_time()},
    St#st{calls = Calls#{Id => C}, workers = Ws#{Pid => Id}}.

%% The worker: apply, encode the answer, hand it to the session.
worker(Chan, Id, M, F, A, Stream, {PeerMax, Traces}) ->
    Args = case Stream of
               true -> A ++ [emit_fun(Chan, Id, PeerMax)];
               false -> A
           end,
    Result =
        try
            case exported(M, F, length(Args)) of
                true -> {ok, apply(M, F, Args)};
                false -> {sshrpc, undef, detail("~0p:~0p/~b is undefined", [M, F, length(Args)]), []}
            end
        catch
            Class:Reason:Stack -> {Class, Reason, Stack}
        end,
    {Frame, Outcome} = answer(Id, Result, PeerMax, Traces),
    Chan ! {sshrpc_done, self(), Frame, Outcome}.

emit_fun(Chan, Id, PeerMax) ->
    fun(V) ->
        case sshrpc_wire:frame({chunk, Id, V}, PeerMax) of
            {ok, Frame, _} ->
                Ref = make_ref(),
                Chan ! {sshrpc_chunk, self(), Ref, Frame},
                receive {Ref, ok} -> ok end;
            {too_large, _} ->
                {error, too_large}
        end
    end.

exported(M, F, A) ->
    _ = code:ensure_loaded(M),
    erlang:function_exported(M, F, A).

%% The answer's frame and the outcome for the audit line.
answer(Id, {ok, V}, PeerMax, _Traces) ->
    case sshrpc_wire:frame({reply, Id, V}, PeerMax) of
        {ok, Frame, _} -> {Frame, ok};
        {too_large, N} ->
            {error_frame(Id, sshrpc, too_large,
                         #{message => detail("the answer is ~b bytes; the client accepts ~b",
                                             [N, PeerMax])}), too_large}
    end;
answer(Id, {sshrpc, Reason, Msg, _}, _PeerMax, _Traces) ->
    {error_frame(Id, sshrpc, Reason, #{message => Msg}), Reason};
answer(Id, {Class, Reason, Stack}, PeerMax, Traces) ->
    Details = case Traces of
                  true -> #{trace => [iolist_to_binary(io_lib:format("~0p", [E])) || E <- Stack]};
                  false -> #{}
              end,
    case sshrpc_wire:frame({error, Id, {Class, Reason, Details}}, PeerMax) of
        {ok, Frame, _} -> {Frame, Class};
        {too_large, _} -> {error_frame(Id, sshrpc, too_large, #{}), Class}
    end.

error_frame(Id, Class, Reason, Details) ->
    sshrpc_wire:frame({error, Id, {Class, Reason, Details}}).

error_out(Id, Reason, St) ->
    out(error_frame(Id, sshrpc, Reason, #{}), St).

error_out(Id, Reason, Msg, St) ->
    out(error_frame(Id, sshrpc, Reason, #{message => Msg}), St).

%% A worker finished. Unknown pids are workers already cancelled: drop.
done(Pid, Frame, Outcome, St = #st{workers = Ws, calls = Calls}) ->
    case Ws of
        #{Pid := Id} ->
            #{Id := C} = Calls,
            forget(C),
            audit_end(St, C, Outcome),
            check_drained(out(Frame, St#st{workers = maps:remove(Pid, Ws),
                                          calls = maps:remove(Id, Calls)}));
        _ ->
            legacy_done(Pid, Frame, Outcome, St)
    end.

forget(#call{mref = MRef, timer = T}) ->
    erlang:demonitor(MRef, [flush]),
    case T of
        undefined -> ok;
        _ -> erlang:cancel_timer(T)
    end.

%% Cancel or timeout: kill the worker, answer once.
stop_call(Pid, Why, St = #st{workers = Ws, calls = Calls}) ->
    case Ws of
        #{Pid := Id} ->
            #{Id := C} = Calls,
            exit(Pid, kill),
            forget(C),
            audit_end(St, C, Why),
            St1 = St#st{workers = maps:remove(Pid, Ws), calls = maps:remove(Id, Calls)},
            check_drained(error_out(Id, Why, St1));
        _ ->
            St
    end.

chunk(Pid, Ref, Frame, St = #st{workers = Ws, calls = Calls}) ->
    case Ws of
        #{Pid := Id} ->
            case Calls of
                #{Id := C = #call{credit = N}} when N > 0 ->
                    Pid ! {Ref, ok},
                    out(Frame, St#st{calls = Calls#{Id := C#call{credit = N - 1}}});
                #{Id := C} ->
                    St#st{calls = Calls#{Id := C#call{parked = {Ref, Frame}}}}
            end;
        _ ->
            St
    end.

credit(Id, N, St = #st{calls = Calls}) ->
    case Calls of
        #{Id := C = #call{credit = Old, parked = undefined}} ->
            St#st{calls = Calls#{Id := C#call{credit = Old + N}}};
        #{Id := C = #call{credit = Old, parked = {Ref, Frame}, pid = Pid}} when Old + N > 0 ->
            Pid ! {Ref, ok},
            out(Frame, St#st{calls = Calls#{Id := C#call{credit = Old + N - 1,
                                                          parked = undefined}}});
        _ ->
            St
    end.

%% A monitored process ended.
down(MRef, Pid, Reason, St = #st{workers = Ws, calls = Calls, spawned = Sp, casts = Casts}) ->
    case {Ws, Sp, Casts} of
        {#{Pid := Id}, _, _} ->
            %% A worker died without answering (killed from outside).
            #{Id := C} = Calls,
            forget(C),
            audit_end(St, C, exit),
            St1 = St#st{workers = maps:remove(Pid, Ws), calls = maps:remove(Id, Calls)},
            check_drained(out(error_frame(Id, exit, Reason, #{}), St1));
        {_, #{MRef := Pid}, _} ->
            St1 = St#st{spawned = maps:remove(MRef, Sp),
                        spawned_pids = maps:remove(Pid, St#st.spawned_pids),
                        detached = maps:remove(Pid, St#st.detached)},
            case sshrpc_wire:frame({down, Pid, down_reason(Reason)}, St#st.peer_max) of
                {ok, F, _} -> out(F, St1);
                {too_large, _} -> out(sshrpc_wire:frame({down, Pid, {exit, too_large}}), St1)
            end;
        {_, _, #{MRef := _}} ->
            St#st{casts = maps:remove(MRef, Casts),
                  detached = maps:remove(Pid, St#st.detached)};
        _ ->
            legacy_down(Pid, Reason, St)
    end.

down_reason(normal) -> normal;
down_reason({sshrpc_down, Class, Reason}) -> {Class, Reason};
down_reason(Reason) -> {exit, Reason}.

cast(M, F, A, St = #st{casts = Casts, opts = O, key = Key, user = U}) ->
    Arity = length(A),
    case {allowed(M, F, Arity, St), map_size(Casts) >= maps:get(max_calls, O)} of
        {false, _} ->
            audit(St, cast, {M, F, Arity}, forbidden, 0),
            St;
        {true, true} ->
            logger:warning("sshrpc: dropped cast ~p:~p/~b: too many running", [M, F, Arity]),
            St;
        {true, false} ->
            {Pid, MRef} = spawn_opt(fun() -> run_cast(M, F, A, {Key, U}) end,
                                    spawn_opts(M, F, Arity, St)),
            detach(Pid, M, F, Arity, St#st{casts = Casts#{MRef => Pid}})
    end.

run_cast(M, F, A, {Key, User}) ->
    T0 = erlang:monotonic_time(),
    Outcome =
        try
            case exported(M, F, length(A)) of
                true -> _ = apply(M, F, A), ok;
                false ->
                    logger:warning("sshrpc: cast to undefined ~p:~p/~b", [M, F, length(A)]),
                    undef
            end
        catch
            C:R ->
                logger:warning("sshrpc: cast ~p:~p/~b failed: ~p:~0p", [M, F, length(A), C, R]),
                C
        end,
    sshrpc_audit:log(Key, cast, {M, F, length(A)}, Outcome, erlang:monotonic_time() - T0, User).

spawn_req(Id, M, F, A, St = #st{opts = O, spawned = Sp, spawned_pids = SpP}) ->
    case check_id(Id, St) of
        {bye, Reason} ->
            bye(Reason, St);
        ok when not (is_atom(M) andalso is_atom(F) andalso is_list(A)) ->
            error_out(Id, badarg, <<"malformed spawn">>, St);
        ok ->
            Arity = length(A),
            case allowed(M, F, Arity, St) of
                false -> forbidden(spawn, Id, M, F, Arity, St);
                true ->
                    case {exported(M, F, Arity), map_size(Sp) >= maps:get(max_calls, O)} of
                        {false, _} ->
                            error_out(Id, undef, detail("~0p:~0p/~b is undefined", [M, F, Arity]),
                                      St);
                        {true, true} ->
                            error_out(Id, overload, St);
                        {true, false} ->
                            audit(St, spawn, {M, F, Arity}, ok, 0),
                            {Pid, MRef} = spawn_opt(fun() -> run_spawned(M, F, A) end,
                                                    spawn_opts(M, F, Arity, St)),
                            St1 = detach(Pid, M, F, Arity, St),
                            out(sshrpc_wire:frame({reply, Id, Pid}),
                                St1#st{spawned = Sp#{MRef => Pid},
                                       spawned_pids = SpP#{Pid => MRef}})
                    end
            end
    end.

%% Casts and spawned processes are linked to the session and killed when it
%% ends (terminate/2), unless the operator listed their function in
%% `detached': those are only monitored and outlive the session.
spawn_opts(M, F, A, St) ->
    case is_detached(M, F, A, St) of
        true -> [monitor];
        false -> [link, monitor]
    end.

detach(Pid, M, F, A, St = #st{detached = D}) ->
    case is_detached(M, F, A, St) of
        true -> St#st{detached = D#{Pid => true}};
        false -> St
    end.

is_detached(M, F, A, #st{opts = #{detached := Rules}}) ->
    lists:any(fun({RM, RF, RA}) ->
                      RM =:= M andalso (RF =:= '_' orelse RF =:= F)
                          andalso (RA =:= '_' orelse RA =:= A)
              end, Rules).

run_spawned(M, F, A) ->
    try apply(M, F, A) of
        _ -> ok
    catch
        exit:normal -> ok;
        Class:Reason -> exit({sshrpc_down, Class, Reason})
    end.

%% Clients may reach processes their session spawned, their own session pid,
%% and the registered names the operator listed.
send_request(Dest, Msg, St = #st{opts = O, session = S}) ->
    Ok = maps:get(send_any, O)
        orelse Dest =:= S
        orelse is_map_key(Dest, St#st.spawned_pids)
        orelse (is_atom(Dest) andalso lists:member(Dest, maps:get(send_names, O))),
    case Ok of
        true ->
            catch erlang:send(Dest, Msg),
            St;
        false ->
            logger:warning("sshrpc: refused a send to ~p from user ~p", [Dest, St#st.user]),
            St
    end.

%%% Legacy mode: one {mfa, {M, F, A}} at a time, in order.

legacy(T, St = #st{legacy_q = Q}) ->
    legacy_next(St#st{legacy_q = queue:in(T, Q)}).

legacy_next(St = #st{legacy_busy = false, legacy_q = Q}) ->
    case queue:out(Q) of
        {empty, _} ->
            check_drained(St);
        {{value, T}, Q1} ->
            legacy_next(legacy_start(T, St#st{legacy_q = Q1}))
    end;
legacy_next(St) ->
    St.

legacy_start({mfa, {M, F, A}} = T, St) when is_atom(M), is_atom(F) ->
    case is_proper_list(A) of
        false ->
            legacy_answer({{exec_error, T}, -1}, St);
        true ->
            case allowed(M, F, length(A), St) of
                false ->
                    audit(St, mfa, {M, F, length(A)}, forbidden, 0),
                    legacy_answer({{exec_badrpc, forbidden}, -1}, St);
                true ->
                    Self = self(),
                    Max = maps:get(max_frame, St#st.opts),
                    {Pid, MRef} = spawn_opt(fun() -> legacy_worker(Self, M, F, A, Max) end,
                                            [link, monitor]),
                    St#st{legacy_busy = {Pid, MRef},
                          legacy_audit = {{M, F, length(A)}, erlang:monotonic_time()}}
            end
    end;
legacy_start({sshrpc_atom_limit, _Details}, St) ->
    legacy_answer({{exec_badrpc, atom_limit}, -1}, St);
legacy_start(T, St) ->
    legacy_answer({{exec_error, T}, -1}, St).

legacy_answer(Answer, St = #st{opts = O}) ->
    case sshrpc_wire:frame({answer, Answer}, maps:get(max_frame, O)) of
        {ok, F, _} -> out(F, St);
        {too_large, _} -> out(sshrpc_wire:frame({answer, {{exec_badrpc, too_large}, -1}}), St)
    end.

legacy_worker(Chan, M, F, A, Max) ->
    {Answer, Outcome} =
        try
            case exported(M, F, length(A)) of
                true -> {{apply(M, F, A), 0}, ok};
                false -> {{{exec_badrpc, undef}, -1}, undef}
            end
        catch
            Class:Reason -> {{{exec_badrpc, {Class, Reason}}, -1}, Class}
        end,
    {Frame, Outcome1} =
        case sshrpc_wire:frame({answer, Answer}, Max) of
            {ok, Fr, _} -> {Fr, Outcome};
            {too_large, _} ->
                {sshrpc_wire:frame({answer, {{exec_badrpc, too_large}, -1}}), too_large}
        end,
    Chan ! {sshrpc_done, self(), Frame, Outcome1}.

legacy_done(Pid, Frame, Outcome, St = #st{legacy_busy = {Pid, MRef}}) ->
    erlang:demonitor(MRef, [flush]),
    legacy_audit(St, Outcome),
    legacy_next(out(Frame, St#st{legacy_busy = false}));
legacy_done(_Pid, _Frame, _Outcome, St) ->
    St.

legacy_audit(St = #st{legacy_audit = {MFA, T0}}, Outcome) ->
    audit(St, mfa, MFA, Outcome, erlang:monotonic_time() - T0).

legacy_down(Pid, Reason, St = #st{legacy_busy = {Pid, _}}) ->
    legacy_audit(St, exit),
    legacy_next(legacy_answer({{exec_badrpc, {exit, Reason}}, -1},
                              St#st{legacy_busy = false}));
legacy_down(_Pid, _Reason, St) ->
    St.

%%% Closing

drain(St) ->
    check_drained(St#st{draining = true}).

check_drained(St = #st{draining = true, closing = false, calls = C, legacy_busy = false,
                       legacy_q = Q}) when map_size(C) =:= 0 ->
    case queue:is_empty(Q) of
        true -> bye(normal, St);
        false -> St
    end;
check_drained(St) ->
    St.

%% Send {bye, Reason}, then stop once the writer has flushed it.
bye(_Reason, St = #st{closing = true}) ->
    St;
bye(Reason, St) ->
    case Reason of
        normal -> ok;
        _ -> logger:info("sshrpc: closing session of user ~p: ~0p", [St#st.user, Reason])
    end,
    St1 = out(sshrpc_wire:frame({bye, Reason}), St),
    St1#st.writer ! {flush, self()},
    erlang:send_after(?CLOSE_GRACE_MS, self(), sshrpc_close_now),
    St1#st{closing = true}.

%%% Frames out and flow control

out(Frame, St = #st{writer = W, out_bytes = Out}) ->
    W ! {write, Frame},
    St#st{out_bytes = Out + iolist_size(Frame)}.

%% Do not return to the behaviour (which would give the client window back)
%% while more than max_out_bytes of answers wait for the SSH window.
wait_for_room(St = #st{out_bytes = Out, opts = #{max_out_bytes := Max}, writer = W,
                       stop = false, closing = false}) when Out > Max ->
    receive
        {sshrpc_written, N} -> wait_for_room(St#st{out_bytes = Out - N});
        {'EXIT', W, _} -> St#st{stop = true}
    end;
wait_for_room(St) ->
    St.

%% Writes frames in order; ssh_connection:send/4 returns once the SSH window
%% took the bytes. Frames queued meanwhile go out together.
writer(Chan, CM, Ch) ->
    receive
        {write, Frame} ->
            {Batch, Flush} = batch([Frame], iolist_size(Frame), []),
            Size = iolist_size(Batch),
            case ssh_connection:send(CM, Ch, Batch, infinity) of
                ok ->
                    Chan ! {sshrpc_written, Size},
                    [Chan ! sshrpc_flushed || _ <- Flush],
                    writer(Chan, CM, Ch);
                {error, Reason} ->
                    exit({send_failed, Reason})
            end;
        {flush, Chan} ->
            Chan ! sshrpc_flushed,
            writer(Chan, CM, Ch)
    end.

batch(Acc, Size, Flush) when Size >= 262144 ->
    {lists:reverse(Acc), Flush};
batch(Acc, Size, Flush) ->
    receive
        {write, Frame} -> batch([Frame | Acc], Size + iolist_size(Frame), Flush);
        {flush, _} -> {lists:reverse(Acc), [flush | Flush]}
    after 0 ->
        {lists:reverse(Acc), Flush}
    end.

%% The session pid: whatever reaches it goes to the client as {send, Session, Msg}.
relay(Chan) ->
    receive
        Msg ->
            Chan ! {sshrpc_mailbox, Msg},
            relay(Chan)
    end.

detail(Fmt, Args) ->
    iolist_to_binary(io_lib:format(Fmt, Args)).
