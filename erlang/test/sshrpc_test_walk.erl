%% @doc Test-only: sshrpc_wire:check/1 against binary_to_term on every
%% prefix and on random one-byte changes of a payload holding every type.
-module(sshrpc_test_walk).
-export([run/1]).

%% Returns {Rejected, Unclean, Raised, Disagree}: valid payloads check/1
%% refuses, prefixes not refused with {error, _, _}, inputs on which it
%% raised, and changed payloads binary_to_term accepts whole but check/1
%% refuses.
run(Flips) ->
    Terms = [1, 300, -5, 1 bsl 100, -(1 bsl 3000), 1.5, <<"bin">>, <<1:3>>, "str", [], [1 | 2],
             {}, {a, b, [c]}, #{a => 1, <<"k">> => [1, 2], 3 => #{}}, self(), make_ref(),
             hd(erlang:ports()), fun lists:seq/2, fun() -> ok end,
             list_to_tuple(lists:seq(1, 300)), lists:seq(1, 300),
             {atom_with_ü, binary_to_atom(<<"日本"/utf8>>)}, [{list_to_atom(""), <<>>, [], {}}]],
    Payloads = [term_to_binary(T, O) || T <- Terms,
                                        O <- [[], [{minor_version, 1}], [{minor_version, 2}]]],
    Rejected = [P || P <- Payloads, element(1, sshrpc_wire:check(P)) =/= ok],
    All = term_to_binary(Terms, [{minor_version, 2}]),
    Unclean = [N || N <- lists:seq(0, byte_size(All) - 1),
                    not is_error(catch sshrpc_wire:check(binary:part(All, 0, N)))],
    rand:seed(exsss, {14, 14, 14}),
    Changed = [begin
                   I = rand:uniform(byte_size(All)) - 1,
                   <<Pre:I/binary, _, Post/binary>> = All,
                   <<Pre/binary, (rand:uniform(256) - 1), Post/binary>>
               end || _ <- lists:seq(1, Flips)],
    Raised = [P || P <- Changed, element(1, catch sshrpc_wire:check(P)) =:= 'EXIT'],
    Disagree = [P || P <- Changed,
                     case catch binary_to_term(P, [safe, used]) of
                         {_, Used} when Used =:= byte_size(P) ->
                             element(1, sshrpc_wire:check(P)) =/= ok;
                         _ ->
                             false  %% refused, or trailing bytes (which decode/2 refuses)
                     end],
    {length(Rejected), length(Unclean), length(Raised), length(Disagree)}.

is_error({error, _, _}) -> true;
is_error(_) -> false.
