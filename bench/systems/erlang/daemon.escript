#!/usr/bin/env escript
%% The modernized seed's server for the benchmark: erlang/'s sshrpc_daemon
%% (OTP ssh:daemon, {nodelay, true}) serving sshrpc_bench:echo/1 and nothing
%% else, with aes128-gcm preferred.
%%
%% Usage: escript daemon.escript PORT SYSTEM_DIR USER_DIR EBIN...
%% Prints "ready PORT" when it listens, then serves until killed.
-mode(compile).

main([PortS, SystemDir, UserDir | Ebins]) ->
    code:add_pathsa(Ebins),
    {ok, Ref} = sshrpc_daemon:start(list_to_integer(PortS), [
        {system_dir, SystemDir},
        {user_dir, UserDir},
        {allow, [{sshrpc_bench, echo, 1}]},
        {max_frame, 64 * 1024 * 1024 + 4096},
        {max_calls, 1024},
        {max_out_bytes, 8 * 1024 * 1024},
        {max_sessions, 200},
        {preferred_algorithms, [{cipher, ['aes128-gcm@openssh.com']}]}
    ]),
    io:format("ready ~b~n", [sshrpc_daemon:port(Ref)]),
    receive stop -> ok end.
