%% @doc The function every system in the benchmark serves: echo/1.
-module(sshrpc_bench).
-export([echo/1]).

-spec echo(term()) -> term().
echo(X) -> X.
