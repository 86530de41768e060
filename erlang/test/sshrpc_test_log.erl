%% @doc Test-only: a logger handler that keeps the sshrpc audit lines
%% (domain [sshrpc, audit]) in an ETS table, for the integration tests.
-module(sshrpc_test_log).
-export([start/0, lines/0, log/2]).

-define(TAB, sshrpc_test_log).

%% @doc Start collecting (idempotent): every audit line, at every level.
start() ->
    case ets:info(?TAB) of
        undefined ->
            Self = self(),
            spawn(fun() ->
                          ets:new(?TAB, [named_table, public, ordered_set]),
                          Self ! {?TAB, ready},
                          receive after infinity -> ok end
                  end),
            receive {?TAB, ready} -> ok end,
            logger:set_module_level(sshrpc_audit, debug),
            ok = logger:add_handler(?TAB, ?MODULE, #{
                level => all,
                filter_default => log,
                filters => [{audit, {fun logger_filters:domain/2,
                                     {stop, not_equal, [sshrpc, audit]}}}]});
        _ ->
            ok
    end.

%% @doc The lines so far, oldest first, as binaries.
lines() ->
    [Text || {_, Text} <- ets:tab2list(?TAB)].

log(#{msg := Msg}, _Config) ->
    Text = case Msg of
               {string, S} -> S;
               {report, R} -> io_lib:format("~0p", [R]);
               {Fmt, Args} -> io_lib:format(Fmt, Args)
           end,
    ets:insert(?TAB, {erlang:unique_integer([monotonic]), unicode:characters_to_binary(Text)}).
