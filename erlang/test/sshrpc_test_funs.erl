%% @doc Test-only functions that the integration tests expose through the
%% sshrpc server's allow list.
-module(sshrpc_test_funs).
-export([echo/1, sized/1, sized_list/1, block/1, sleep/1, raise/2, stream/2,
         notify/2, loop/0, atoms/2, stream_forever/2, trap_block/1, add/2, count/0, store/2, fetch/1, alive/1]).

echo(X) -> X.

%% A binary of N bytes.
sized(N) -> binary:copy(<<"x">>, N).

%% Binaries of each size in Sizes (a call per size is done by the tests).
sized_list(Sizes) -> [sized(N) || N <- Sizes].

%% Registers itself as Name and waits forever: a test sees it stop with whereis/1.
block(Name) ->
    register(Name, self()),
    receive after infinity -> ok end.

%% block/1, but trapping exits: only a kill stops it.
trap_block(Name) ->
    process_flag(trap_exit, true),
    block(Name).

%% A stream call that registers as Name and emits forever (it waits for credit).
stream_forever(Name, Emit) ->
    register(Name, self()),
    stream_forever_loop(Emit, 1).

stream_forever_loop(Emit, I) ->
    ok = Emit(I),
    stream_forever_loop(Emit, I + 1).

%% N atoms made here (so a client does not know them): Prefix_1 .. Prefix_N.
atoms(Prefix, N) ->
    [binary_to_atom(<<Prefix/binary, "_", (integer_to_binary(I))/binary>>) || I <- lists:seq(1, N)].

sleep(Ms) -> timer:sleep(Ms), slept.

raise(Class, Reason) -> erlang:raise(Class, Reason, []).

%% A stream call: emits 1..N, then answers done.
stream(N, Emit) ->
    [ok = Emit(I) || I <- lists:seq(1, N)],
    done.

%% Sends Msg to Pid (e.g. the session pid from the hello).
notify(Pid, Msg) -> Pid ! Msg, ok.

%% A spawned process: answers pings to the session pid, stops or crashes on request.
loop() ->
    receive
        {ping, From} -> From ! {pong, self()}, loop();
        stop -> ok;
        {crash, Reason} -> error(Reason)
    end.

add(A, B) -> A + B.

count() -> length(processes()).

%% Keeps Value where a test can compare it with an Erlang literal.
store(Key, Value) -> persistent_term:put({?MODULE, Key}, Value), ok.

fetch(Key) -> persistent_term:get({?MODULE, Key}).

alive(Pid) -> is_pid(Pid) andalso node(Pid) =:= node() andalso is_process_alive(Pid).
