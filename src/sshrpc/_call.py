"""``sshrpc call [user@]host[:port] MODULE FUNCTION [ARG...]``: one call from the shell.

Arguments are Erlang term literals (``'[1,2,3]'``, ``'{ok, <<"x">>}'``,
``'#{a => 1}'``), read by ``sshrpc._literal`` (no eval); the result is printed
as an Erlang term on stdout.  Exit status: 0 on success; 1 when the call
failed (the remote class and reason, or the connection/SSH error, on stderr);
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

__all__ = ["add_connection_options", "add_parser", "looks_remote", "run", "run_list"]


def add_parser(sub: Any) -> None:
    """Register the ``call`` subcommand on an argparse subparsers object."""
    call = sub.add_parser(
        "call",
        help="call a function on a node",
        description="Call MODULE:FUNCTION(ARG...) on an sshrpc node over SSH.  ARGs are "
        'Erlang term literals: 42, 1.5, ok, \'Quoted atom\', <<"binary">>, "string" '
        "(a list of character codes, as in Erlang), [1,2], {a,b}, #{k => v}.",
    )
    call.add_argument("destination", metavar="[USER@]HOST[:PORT]")
    call.add_argument("module", metavar="MODULE")
    call.add_argument("function", metavar="FUNCTION")
    call.add_argument("args", nargs="*", metavar="ARG", help="an Erlang term literal")
    add_connection_options(call)
    call.add_argument("--stream", action="store_true", help="print each chunk of a stream call")
    call.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS", help="give up after this long"
    )


def add_connection_options(call: argparse.ArgumentParser) -> None:
    """The options of a command that connects to a node (``call``, remote
    ``list``)."""
    call.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="show the SSH steps (config, host key check, authentication); -vv: more",
    )
    call.add_argument("-p", "--port", type=int, default=None)
    call.add_argument("-l", "--user", default=None)
    call.add_argument("-i", "--identity", action="append", metavar="FILE", default=None)
    call.add_argument("--known-hosts", metavar="FILE", default=None)
    call.add_argument(
        "--accept-new-host-key",
        action="store_true",
        help="trust and record an unknown host key (check its fingerprint first)",
    )
    call.add_argument(
        "--passphrase-env",
        metavar="VAR",
        default="SSHRPC_PASSPHRASE",
        help="environment variable holding the identity's passphrase",
    )
    call.add_argument("-F", "--ssh-config", metavar="FILE", default=None)
    call.add_argument("--subsystem", default=None)


def run(
    args: argparse.Namespace,
    on_result: Any = None,
    label: str = "sshrpc call",
) -> int:
    """Run the ``call`` subcommand; returns the exit status.  ``on_result``
    (if given) gets the result instead of printing it."""
    import math

    import trio

    from . import _ssh
    from ._errors import RemoteError, SSHRPCError, hint_style
    from ._literal import LiteralError, format_term, parse
    from .client import open_connection

    try:
        call_args = [parse(text) for text in args.args]
    except LiteralError as exc:
        print(f"{label}: bad argument: {exc}", file=sys.stderr)
        return 2
    options: dict[str, Any] = {
        "accept_new_host_keys": args.accept_new_host_key,
        "passphrase": os.environ.get(args.passphrase_env) or None,
        "ssh_config": args.ssh_config,
        "subsystem": args.subsystem or _ssh.SUBSYSTEM,
    }

    async def main() -> None:
        with trio.fail_after(math.inf if args.timeout is None else args.timeout):
            async with open_connection(
                args.destination,
                args.port,
                args.user,
                args.identity,
                args.known_hosts,
                **options,
            ) as node:
                if args.stream:
                    async for item in node.stream(args.module, args.function, call_args):
                        print(format_term(item), flush=True)
                else:
                    result = await node.call(args.module, args.function, call_args)
                    if on_result is not None:
                        on_result(result)
                    else:
                        print(format_term(result))

    # Error hints name our flags (--accept-new-host-key), not Python keywords.
    hint_style.set("cli")
    try:
        trio.run(main)
    except RemoteError as exc:
        details = ""
        if isinstance(exc.details, dict) and exc.details.get("message"):
            message = exc.details["message"]
            if isinstance(message, bytes):
                message = message.decode("utf-8", "replace")
            details = f" ({message})"
        print(
            f"{label}: {args.module}:{args.function} failed: "
            f"{exc.cls} {format_term(exc.reason)}{details}",
            file=sys.stderr,
        )
        return 1
    except trio.TooSlowError:
        print(f"{label}: no answer within {args.timeout:g} s", file=sys.stderr)
        return 1
    except SSHRPCError as exc:
        print(f"{label}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # an argument with no Erlang term
        print(f"{label}: {exc}", file=sys.stderr)
        return 2
    return 0


def looks_remote(text: str) -> bool:
    """True when ``text`` names a node (``[user@]host[:port]``) rather than a
    ``package.module:attribute`` target: it has a user, or an IPv6 bracket,
    or no colon, or only a port after its colon."""
    if "@" in text or text.startswith("["):
        return True
    _, sep, tail = text.rpartition(":")
    return not sep or tail.isdigit()


def run_list(args: argparse.Namespace) -> int:
    """``sshrpc list [USER@]HOST[:PORT]``: what this key may call there
    (the node's built-in ``sshrpc:exports/0``), one ``module:function/arity``
    a line; exit status as ``call``."""
    args.module, args.function, args.args = "sshrpc", "exports", []
    args.stream, args.timeout = False, None
    lines: list[str] = []

    def show(value: Any) -> None:
        for module, function, arity in value:
            if isinstance(arity, tuple):
                arity = f"{arity[0]}.."
            lines.append(f"{module}:{function}/{arity}")

    status = run(args, on_result=show, label="sshrpc list")
    if status == 0:
        print("\n".join(lines) if lines else "(nothing: this key may call no function)")
    return status
