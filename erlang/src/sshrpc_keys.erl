%% @doc The daemon's key callback (ssh_server_key_api): ssh_file (or the
%% key_cb you gave sshrpc_daemon) decides, and the key that authenticated is
%% remembered in the connection process, where each sshrpc session finds it
%% (identity/1) for the per-key policy and the audit line.
%%
%% sshrpc_daemon installs it; your own daemon can use
%% `{key_cb, {sshrpc_keys, [{inner, YourKeyCb}]}}' (default inner: ssh_file).
-module(sshrpc_keys).
-behaviour(ssh_server_key_api).

-export([host_key/2, is_auth_key/3, identity/1]).

-define(KEY, sshrpc_authenticated_key).

-type identity() :: #{fingerprint := binary(), comment := binary(), user := binary()}.
-export_type([identity/0]).

host_key(Alg, Opts) ->
    (inner(Opts)):host_key(Alg, Opts).

is_auth_key(Key, User, Opts) ->
    case (inner(Opts)):is_auth_key(Key, User, Opts) of
        true ->
            %% Runs in the connection process; the last key accepted is the
            %% one that authenticated (only publickey is offered).
            put(?KEY, #{fingerprint => fingerprint(Key), comment => comment(Key, Opts),
                        user => unicode:characters_to_binary(User)}),
            true;
        False ->
            False
    end.

%% @doc The key that authenticated the connection CM, or `unknown' (a daemon
%% without this callback).
-spec identity(pid()) -> identity() | unknown.
identity(CM) ->
    case erlang:process_info(CM, dictionary) of
        {dictionary, D} ->
            case lists:keyfind(?KEY, 1, D) of
                {_, Id} -> Id;
                false -> unknown
            end;
        undefined ->
            unknown
    end.

inner(Opts) ->
    Private = proplists:get_value(key_cb_private, Opts, []),
    proplists:get_value(inner, Private, ssh_file).

fingerprint(Key) ->
    try ssh:hostkey_fingerprint(sha256, Key) of
        F -> unicode:characters_to_binary(F)
    catch
        _:_ -> <<>>
    end.

%% The comment of the authorized_keys line that holds Key.
comment(Key, Opts) ->
    Dir = case proplists:get_value(user_dir, Opts) of
              undefined -> filename:join(os:getenv("HOME", "/"), ".ssh");
              D -> D
          end,
    try
        {ok, Bin} = file:read_file(filename:join(Dir, "authorized_keys")),
        hd([unicode:characters_to_binary(proplists:get_value(comment, Attrs, ""))
            || {K, Attrs} <- ssh_file:decode(Bin, auth_keys), K =:= Key] ++ [<<>>])
    catch
        _:_ -> <<>>
    end.
