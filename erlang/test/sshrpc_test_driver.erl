%% @doc Test-only: evaluates Erlang expressions read from stdin, one per line,
%% and answers each with one line on stdout:
%%   "ok <base64 ETF of the value> <base64 of the value printed with ~tp>"
%%   "raised <base64 ETF of {Class, Reason}> <base64 text>"
%% Bindings persist between lines. Used by tests/integration/erlang_helpers.py
%% to drive real Erlang VMs from pytest. Never part of a server.
-module(sshrpc_test_driver).
-export([main/0]).

main() ->
    ok = io:setopts(standard_io, [binary, {encoding, unicode}]),
    io:put_chars("ready\n"),
    loop(erl_eval:new_bindings()).

loop(Bindings) ->
    case io:get_line(standard_io, "") of
        eof -> halt(0);
        {error, _} -> halt(0);
        Line ->
            {Status, Value, B1} = eval(unicode:characters_to_list(Line), Bindings),
            Etf = base64:encode(term_to_binary(Value, [{minor_version, 2}])),
            Text = base64:encode(unicode:characters_to_binary(io_lib:format("~tp", [Value]))),
            io:put_chars([Status, " ", Etf, " ", Text, "\n"]),
            loop(B1)
    end.

eval(Src, Bindings) ->
    try
        {ok, Tokens, _} = erl_scan:string(Src),
        {ok, Exprs} = erl_parse:parse_exprs(Tokens),
        {value, V, B1} = erl_eval:exprs(Exprs, Bindings),
        {"ok", V, B1}
    catch
        C:R -> {"raised", {C, R}, Bindings}
    end.
