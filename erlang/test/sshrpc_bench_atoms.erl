%% @doc Test-only micro-benchmark: the CPU cost of new atoms in a request.
%% erl -noshell -pa erlang/ebin -pa erlang/ebin/test -eval 'sshrpc_bench_atoms:run(), halt().'
-module(sshrpc_bench_atoms).
-export([run/0]).
%% CPU cost of decoding a request with 100 atoms: all known ([safe] fast
%% path) vs all unknown (walk + count + unsafe decode), per frame.
run() ->
    Rounds = 2000,
    Known = [list_to_atom("known_" ++ integer_to_list(I)) || I <- lists:seq(1, 100)],
    KnownP = term_to_binary({call, 1, m, f, [Known]}, [{minor_version, 2}]),
    %% Unknown payloads: build by hand from names never made into atoms.
    Fresh = fun(R) ->
                Names = [iolist_to_binary(["fresh_", integer_to_list(R), "_", integer_to_list(I)])
                         || I <- lists:seq(1, 100)],
                Atoms = << <<119, (byte_size(N)), N/binary>> || N <- Names >>,
                <<131, 104, 5, 119, 4, "call", 97, 1, 119, 1, "m", 119, 1, "f",
                  108, 1:32, 108, 100:32, Atoms/binary, 106, 106>>
            end,
    FreshPs = [Fresh(R) || R <- lists:seq(1, Rounds)],
    {K, _} = cpu(fun() -> [{ok, _, 0} = sshrpc_wire:decode(KnownP, #{max => 1 bsl 20}) || _ <- lists:seq(1, Rounds)] end),
    {W, _} = cpu(fun() -> [{new_atoms, 100, _} = sshrpc_wire:decode(P, #{max => 1 bsl 20}) || P <- FreshPs] end),
    {D, _} = cpu(fun() -> [{ok, _} = sshrpc_wire:decode_new_atoms(P) || P <- FreshPs] end),
    io:format("per frame of 100 atoms (CPU us): known ~.1f, unknown walk+count ~.1f, then create ~.1f~n",
              [K * 1000 / Rounds, W * 1000 / Rounds, D * 1000 / Rounds]).
cpu(F) ->
    {T0, _} = erlang:statistics(runtime),
    R = F(),
    {T1, _} = erlang:statistics(runtime),
    {T1 - T0, R}.
