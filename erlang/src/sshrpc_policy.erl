%% @doc Per-key policy: which functions each authenticated key may call.
%%
%% The same rules, and the same file, as the Python node's policy
%% (src/sshrpc/policy.py). OTP has no TOML parser, so this module reads the
%% subset such a file is written in: `[[rule]]' tables whose keys are
%% `keys', `allow' and `deny', each an array of strings ("..." with the
%% usual escapes, or '...'), arrays over several lines, `#' comments.
%% Anything else is an error naming the file and the line.
%%
%%     # Rules are checked for the key that authenticated; a key that
%%     # matches no rule can call nothing.
%%     [[rule]]
%%     keys = ["*"]                        # every key
%%     allow = ["lists", "echo:echo/1"]    # module, module:function, module:function/arity
%%
%%     [[rule]]
%%     keys = ["SHA256:3m6Vx...", "ops@*"] # fingerprints or authorized_keys comments
%%     allow = ["*"]
%%     deny = ["os:getpid/0"]              # deny beats allow
%%
%% The same rules as Erlang terms: `[{rule, Keys, Allow, Deny}]' with lists
%% of strings (or binaries) in the same syntax.
%%
%% Patterns are shell globs (`*', `?', `[abc]', `[!abc]') on the module, the
%% function and the arity; a missing part matches anything. A key pattern
%% `*' matches every key; otherwise it is compared with the key's
%% fingerprint exactly, and matched as a glob against its comment.
%% The policy narrows the daemon's `allow' list; it never widens it.
-module(sshrpc_policy).

-export([load/1, from_terms/1, permits/5]).

-record(rule, {keys :: [binary()], allow :: [pattern()], deny :: [pattern()]}).
-type pattern() :: {re:mp(), re:mp(), re:mp()}.
-opaque policy() :: [#rule{}].
-export_type([policy/0]).

%% @doc Read a policy file (the TOML subset above).
-spec load(file:filename_all()) -> {ok, policy()} | {error, binary()}.
load(Path) ->
    case file:read_file(Path) of
        {ok, Bin} ->
            try from_terms(parse(Bin)) of
                Result -> Result
            catch
                throw:{policy, Line, What} ->
                    {error, iolist_to_binary(io_lib:format("policy file ~ts, line ~b: ~ts",
                                                           [Path, Line, What]))}
            end;
        {error, Reason} ->
            {error, iolist_to_binary(io_lib:format("cannot read policy file ~ts: ~ts",
                                                   [Path, file:format_error(Reason)]))}
    end.

%% @doc A policy from `[{rule, Keys, Allow, Deny}]'.
-spec from_terms([{rule, [iodata()], [iodata()], [iodata()]}]) -> {ok, policy()} | {error, binary()}.
from_terms(Rules) when is_list(Rules) ->
    try
        {ok, [#rule{keys = [bin(K) || K <- Keys],
                    allow = [pattern(bin(P)) || P <- Allow],
                    deny = [pattern(bin(P)) || P <- Deny]}
              || {rule, Keys, Allow, Deny} <- Rules,
                 is_list(Keys) orelse throw(bad), is_list(Allow) orelse throw(bad),
                 is_list(Deny) orelse throw(bad)]}
    of
        {ok, Parsed} when length(Parsed) =:= length(Rules) -> {ok, Parsed};
        {ok, _} -> {error, <<"a policy is a list of {rule, Keys, Allow, Deny}">>}
    catch
        _:_ -> {error, <<"a policy is a list of {rule, Keys, Allow, Deny} with lists of strings">>}
    end;
from_terms(_) ->
    {error, <<"a policy is a list of {rule, Keys, Allow, Deny}">>}.

%% @doc True when a rule for Key allows M:F/A and none denies it.
-spec permits(policy(), sshrpc_keys:identity() | unknown, atom(), atom(), arity()) -> boolean().
permits(Policy, Key, M, F, A) ->
    Subject = {atom_to_binary(M), atom_to_binary(F), integer_to_binary(A)},
    permits(Policy, Key, Subject, false).

permits([], _Key, _Subject, Allowed) ->
    Allowed;
permits([#rule{keys = Keys, allow = Allow, deny = Deny} | Rest], Key, Subject, Allowed) ->
    case key_matches(Keys, Key) of
        false -> permits(Rest, Key, Subject, Allowed);
        true ->
            case hit(Deny, Subject) of
                true -> false;
                false -> permits(Rest, Key, Subject, Allowed orelse hit(Allow, Subject))
            end
    end.

key_matches(Patterns, Key) ->
    lists:any(fun(<<"*">>) -> true;
                 (P) ->
                      case Key of
                          #{fingerprint := <<_, _/binary>> = Fp, comment := C} ->
                              P =:= Fp orelse (C =/= <<>> andalso glob_match(P, C));
                          _ -> false
                      end
              end, Patterns).

hit(Patterns, {M, F, A}) ->
    lists:any(fun({PM, PF, PA}) -> match(PM, M) andalso match(PF, F) andalso match(PA, A) end,
              Patterns).

match(MP, Subject) ->
    re:run(Subject, MP, [{capture, none}]) =:= match.

glob_match(Glob, Subject) ->
    match(glob(Glob), Subject).

%% "m:f/a" -> three compiled globs; missing parts are "*".
pattern(P) ->
    {M, Rest} = split(P, <<":">>),
    {F, A} = split(Rest, <<"/">>),
    {glob(M), glob(F), glob(A)}.

split(Bin, Sep) ->
    case binary:split(Bin, Sep) of
        [X] -> {star(X), <<"*">>};
        [X, Y] -> {star(X), star(Y)}
    end.

star(<<>>) -> <<"*">>;
star(X) -> X.

%% fnmatch-style glob to an anchored regular expression.
glob(Glob) ->
    {ok, MP} = re:compile(["^", glob_re(unicode:characters_to_list(Glob)), "$"],
                          [unicode, dotall]),
    MP.

glob_re([]) -> [];
glob_re([$* | T]) -> [".*" | glob_re(T)];
glob_re([$? | T]) -> [$. | glob_re(T)];
glob_re([$[ | T] = All) ->
    case class(T, []) of
        {ok, Class, Rest} -> [Class | glob_re(Rest)];
        error -> ["\\[" | glob_re(tl(All))]
    end;
glob_re([C | T]) -> [quote(C) | glob_re(T)].

class([$! | T], []) -> class_body(T, "[^");
class(T, []) -> class_body(T, "[").

class_body(T, Open) ->
    case lists:splitwith(fun(C) -> C =/= $] end, T) of
        {[], [$] | _]} -> error;   %% "[]" : literal, as fnmatch treats an empty class
        {Body, [$] | Rest]} ->
            {ok, [Open, [case C of $\\ -> "\\\\"; $^ -> "\\^"; _ -> C end || C <- Body], "]"],
             Rest};
        _ -> error
    end.

quote(C) when C >= $a, C =< $z; C >= $A, C =< $Z; C >= $0, C =< $9; C =:= $_ -> C;
quote(C) when C < 128 -> [$\\, C];
quote(C) -> C.

bin(B) when is_binary(B) -> B;
bin(L) when is_list(L) -> unicode:characters_to_binary(L).

%%% The TOML subset

parse(Bin) ->
    Tokens = tokens(unicode:characters_to_list(Bin), 1, []),
    tables(Tokens, undefined, []).

%% tables(Tokens, Current, Done): Current is {Line, #{Key => [binary()]}}.
tables([], Current, Done) ->
    lists:reverse(add_rule(Current, Done));
tables([{header, _, "rule"} | T], Current, Done) ->
    tables(T, {0, #{}}, add_rule(Current, Done));
tables([{header, L, Name} | _], _, _) ->
    throw({policy, L, io_lib:format("unknown table [[~ts]] (only [[rule]])", [Name])});
tables([{key, L, _} | _], undefined, _) ->
    throw({policy, L, "a key outside [[rule]]"});
tables([{key, L, Key}, {'=', _} | T], {RL, Map}, Done) ->
    lists:member(Key, ["keys", "allow", "deny"])
        orelse throw({policy, L, io_lib:format("unknown key '~ts' (keys, allow, deny)", [Key])}),
    is_map_key(Key, Map) andalso throw({policy, L, io_lib:format("'~ts' given twice", [Key])}),
    {Strings, T1} = array(T, L),
    tables(T1, {RL, Map#{Key => Strings}}, Done);
tables([Tok | _], _, _) ->
    throw({policy, element(2, Tok), "expected [[rule]] or key = [\"...\", ...]"}).

add_rule(undefined, Done) -> Done;
add_rule({_, Map}, Done) ->
    [{rule, maps:get("keys", Map, [<<"*">>]), maps:get("allow", Map, []),
      maps:get("deny", Map, [])} | Done].

array([{'[', _} | T], _) -> elements(T, []);
array([Tok | _], _) -> throw({policy, element(2, Tok), "expected an array of strings"});
array([], L) -> throw({policy, L, "expected an array of strings"}).

elements([{']', _} | T], Acc) -> {lists:reverse(Acc), T};
elements([{string, _, S}, {',', _} | T], Acc) -> elements(T, [S | Acc]);
elements([{string, _, S}, {']', _} | T], Acc) -> {lists:reverse([S | Acc]), T};
elements([{string, L, _}], _) -> throw({policy, L, "unterminated array"});
elements([{',', L}], _) -> throw({policy, L, "unterminated array"});
elements([Tok | _], _) -> throw({policy, element(2, Tok), "expected a string in the array"});
elements([], _) -> throw({policy, 0, "unterminated array"}).

tokens([], _L, Acc) -> lists:reverse(Acc);
tokens([$\n | T], L, Acc) -> tokens(T, L + 1, Acc);
tokens([C | T], L, Acc) when C =:= $\s; C =:= $\t; C =:= $\r -> tokens(T, L, Acc);
tokens([$# | T], L, Acc) -> tokens(lists:dropwhile(fun(C) -> C =/= $\n end, T), L, Acc);
tokens("[[" ++ T, L, Acc) ->
    {Name, Rest} = lists:splitwith(fun(C) -> C =/= $] end, T),
    case Rest of
        "]]" ++ Rest1 -> tokens(Rest1, L, [{header, L, string:trim(Name)} | Acc]);
        _ -> throw({policy, L, "unterminated [[table]]"})
    end;
tokens([$[ | T], L, Acc) -> tokens(T, L, [{'[', L} | Acc]);
tokens([$] | T], L, Acc) -> tokens(T, L, [{']', L} | Acc]);
tokens([$, | T], L, Acc) -> tokens(T, L, [{',', L} | Acc]);
tokens([$= | T], L, Acc) -> tokens(T, L, [{'=', L} | Acc]);
tokens([$" | T], L, Acc) ->
    {S, Rest} = basic(T, L, []),
    tokens(Rest, L, [{string, L, S} | Acc]);
tokens([$' | T], L, Acc) ->
    case lists:splitwith(fun(C) -> C =/= $' andalso C =/= $\n end, T) of
        {S, [$' | Rest]} -> tokens(Rest, L, [{string, L, unicode:characters_to_binary(S)} | Acc]);
        _ -> throw({policy, L, "unterminated string"})
    end;
tokens([C | _] = T, L, Acc) when C >= $a, C =< $z; C >= $A, C =< $Z; C =:= $_ ->
    {Key, Rest} = lists:splitwith(fun(X) -> X >= $a andalso X =< $z orelse X >= $A andalso
                                            X =< $Z orelse X >= $0 andalso X =< $9 orelse
                                            X =:= $_ orelse X =:= $- end, T),
    tokens(Rest, L, [{key, L, Key} | Acc]);
tokens([C | _], L, _) ->
    throw({policy, L, io_lib:format("unexpected character '~tc' (only [[rule]] tables with "
                                    "arrays of strings are read)", [C])}).

basic([$" | T], _L, Acc) -> {unicode:characters_to_binary(lists:reverse(Acc)), T};
basic([$\\, C | T], L, Acc) when C =:= $"; C =:= $\\ -> basic(T, L, [C | Acc]);
basic([$\\, $n | T], L, Acc) -> basic(T, L, [$\n | Acc]);
basic([$\\, $t | T], L, Acc) -> basic(T, L, [$\t | Acc]);
basic([$\\, $u, A, B, C, D | T], L, Acc) ->
    basic(T, L, [list_to_integer([A, B, C, D], 16) | Acc]);
basic([$\\ | _], L, _) -> throw({policy, L, "unsupported escape in a string"});
basic([$\n | _], L, _) -> throw({policy, L, "unterminated string"});
basic([], L, _) -> throw({policy, L, "unterminated string"});
basic([C | T], L, Acc) -> basic(T, L, [C | Acc]).
