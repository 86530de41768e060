%% @doc One audit line per request, through logger, in the Python node's
%% format:
%%
%%   key=SHA256:... call lists:reverse/1 outcome=ok duration_ms=0.412
%%
%% `kind' is call, cast, spawn or mfa (legacy); `outcome' is ok, forbidden,
%% undef, error, exit, throw, timeout, cancelled, too_large or badarg. Lines
%% for requests that ran are logged at `debug', denied ones (`forbidden') at
%% `warning', with metadata `domain => [sshrpc, audit]' and `sshrpc_audit =>
%% #{key, user, kind, mfa, outcome, duration_ms}'. To keep every line:
%%
%%   logger:set_module_level(sshrpc_audit, debug),
%%   logger:add_handler(audit, logger_std_h, #{level => debug,
%%       filters => [{audit, {fun logger_filters:domain/2, {stop, not_equal, [sshrpc, audit]}}}],
%%       config => #{file => "/var/log/sshrpc-audit.log"}}).
-module(sshrpc_audit).

-include_lib("kernel/include/logger.hrl").

-export([log/6]).

%% @doc Log one line. Key is sshrpc_keys:identity() or `unknown';
%% DurationNative is in erlang:monotonic_time/0 units.
-spec log(sshrpc_keys:identity() | unknown, atom(), {atom(), atom(), arity()}, atom(),
          integer(), term()) -> ok.
log(Key, Kind, {M, F, A}, Outcome, DurationNative, User) ->
    Fp = case Key of
             #{fingerprint := <<_, _/binary>> = P} -> P;
             _ -> <<"-">>
         end,
    Ms = erlang:convert_time_unit(DurationNative, native, nanosecond) / 1.0e6,
    Meta = #{domain => [sshrpc, audit],
             sshrpc_audit => #{key => Key, user => User, kind => Kind, mfa => {M, F, A},
                               outcome => Outcome, duration_ms => Ms}},
    Args = [Fp, Kind, M, F, A, Outcome, Ms],
    Fmt = "key=~ts ~ts ~ts:~ts/~b outcome=~ts duration_ms=~.3f",
    case Outcome of
        forbidden -> ?LOG_WARNING(Fmt, Args, Meta);
        _ -> ?LOG_DEBUG(Fmt, Args, Meta)
    end,
    ok.
