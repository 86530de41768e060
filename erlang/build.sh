#!/bin/sh
# Compile the sshrpc Erlang modules into erlang/ebin (and, with "test", the
# test helpers into erlang/ebin/test). Plain erlc; only OTP's ssh, crypto and
# public_key are needed at run time. Safe to run while other runs use ebin:
# files are compiled into a temporary directory and renamed into place.
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
compile() {  # compile SRC_DIR OUT_DIR
    mkdir -p "$2"
    tmp="$(mktemp -d "$2/.build.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    erlc -Werror +warn_unused_vars +debug_info -o "$tmp" "$1"/*.erl
    for f in "$tmp"/*.beam; do mv -f "$f" "$2/"; done
    rm -rf "$tmp"
    trap - EXIT
}
compile "$here/src" "$here/ebin"
# ebin/sshrpc.app from src/sshrpc.app.src, with the modules filled in (what
# rebar3 does), so application:ensure_all_started(sshrpc) works.
mods="$(cd "$here/src" && ls *.erl | sed 's/\.erl$//' | paste -sd, -)"
app="$(mktemp "$here/ebin/.sshrpc.app.XXXXXX")"
sed "s/{modules, \[\]}/{modules, [$mods]}/" "$here/src/sshrpc.app.src" > "$app"
mv -f "$app" "$here/ebin/sshrpc.app"
if [ "${1:-}" = "test" ]; then
    compile "$here/test" "$here/ebin/test"
fi
