%% @doc A hardened ssh:daemon that serves only the sshrpc subsystem.
%%
%% The stock OTP daemon offers an Erlang shell and evaluates any expression
%% sent with `exec'. This one disables both (and every other channel type
%% but the sshrpc subsystem), authenticates with public keys only, and sets
%% modest connection limits.
-module(sshrpc_daemon).

-export([start/2, stop/1, port/1]).

-define(DEFAULTS, [
    {max_sessions, 64},       %% concurrent SSH connections
    {max_channels, 8},        %% channels per connection
    {parallel_login, true},   %% a slow login does not block the others
    {max_initial_idle_time, 30000}
]).

%% @doc Start a daemon on Port (0 picks a free port; see port/1).
%%
%% Opts is a proplist or map. sshrpc's own keys:
%% - `system_dir' (required): directory with the host key (ssh_host_ed25519_key, ...)
%% - `user_dir' (required): directory with `authorized_keys'
%% - `allow', `max_calls', `max_frame', `max_out_bytes', `expose_traces',
%%   `send_names', `send_any', `name', `max_session_atoms', `max_node_atoms',
%%   `detached', `policy': the server options (sshrpc_server:options()).
%%   `policy' ({file, Path} or [{rule, Keys, Allow, Deny}]) is read once,
%%   here: a bad policy returns {error, Reason} and starts nothing.
%% - `key_cb': consulted through sshrpc_keys, which notes the key that
%%   authenticated each connection.
%% - `ip': address to bind (default {127,0,0,1}).
%% Any other key is passed to ssh:daemon/3, after the hardening options
%% (`shell' and `exec' disabled, `nodelay', publickey auth); keys given here
%% override the connection limits above but not the hardening.
-spec start(inet:port_number(), proplists:proplist() | map()) ->
    {ok, ssh:daemon_ref()} | {error, term()}.
start(Port, Opts0) ->
    Opts = case Opts0 of
               M when is_map(M) -> maps:to_list(M);
               L -> L
           end,
    ServerKeys = [allow, max_calls, max_frame, max_out_bytes, expose_traces, send_names,
                  send_any, name, max_session_atoms, max_node_atoms, detached, policy],
    ServerOpts0 = maps:from_list([KV || {K, _} = KV <- Opts, lists:member(K, ServerKeys)]),
    Rest0 = [KV || {K, _} = KV <- Opts, not lists:member(K, [ip, key_cb | ServerKeys])],
    %% The key callback records which key authenticated (for the policy and
    %% the audit line); it asks the key_cb given here, or ssh_file.
    KeyCb = case proplists:get_value(key_cb, Opts, ssh_file) of
                {Mod, KOpts} -> {sshrpc_keys, [{inner, Mod} | KOpts]};
                Mod -> {sshrpc_keys, [{inner, Mod}]}
            end,
    Rest = [{key_cb, KeyCb} | Rest0],
    case sshrpc_server:compile_policy(maps:get(policy, ServerOpts0, none)) of
        {ok, Policy} ->
            start(Port, ServerOpts0#{policy => {compiled, Policy}}, Rest, Opts);
        {error, _} = Error ->
            Error
    end.

start(Port, ServerOpts, Rest, Opts) ->
    Ip = proplists:get_value(ip, Opts, {127, 0, 0, 1}),
    Subsystems = [sshrpc_server:subsystem_spec(ServerOpts),
                  {"sshrpc", {sshrpc_server, [ServerOpts]}}],
    Hardening = [
        {subsystems, Subsystems},
        {shell, disabled},
        {exec, disabled},
        {ssh_cli, no_cli},
        {nodelay, true},
        {auth_methods, "publickey"},
        {no_auth_needed, false},
        {tcpip_tunnel_in, false},
        {tcpip_tunnel_out, false}
    ],
    Limits = [KV || {K, _} = KV <- ?DEFAULTS, not lists:keymember(K, 1, Rest)],
    Forced = [K || {K, _} <- Hardening],
    Passed = [KV || {K, _} = KV <- Rest, not lists:member(K, Forced)],
    _ = application:ensure_all_started(ssh),
    ssh:daemon(Ip, Port, Hardening ++ Limits ++ Passed).

%% @doc The TCP port a daemon listens on.
-spec port(ssh:daemon_ref()) -> inet:port_number().
port(Ref) ->
    {ok, Info} = ssh:daemon_info(Ref),
    proplists:get_value(port, Info).

-spec stop(ssh:daemon_ref()) -> ok.
stop(Ref) ->
    ssh:stop_daemon(Ref).
