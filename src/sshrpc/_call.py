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

__all__ = ["add_parser", "run"]


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
    call.add_argument("--stream", action="store_true", help="print each chunk of a stream call")
    call.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS", help="give up after this long"
    )


def run(args: argparse.Namespace) -> int:
    """Run the ``call`` subcommand; returns the exit status."""
    import math

    import trio

    from . import _ssh
    from ._errors import RemoteError, SSHRPCError, hint_style
    from ._literal import LiteralError, format_term, parse
    from .client import open_connection

    try:
        call_args = [parse(text) for text in args.args]
    except LiteralError as exc:
        print(f"sshrpc call: bad argument: {exc}", file=sys.stderr)
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
                    print(format_term(await node.call(args.module, args.function, call_args)))

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
            f"sshrpc call: {args.module}:{args.function} failed: "
            f"{exc.cls} {format_term(exc.reason)}{details}",
            file=sys.stderr,
        )
        return 1
    except trio.TooSlowError:
        print(f"sshrpc call: no answer within {args.timeout:g} s", file=sys.stderr)
        return 1
    except SSHRPCError as exc:
        print(f"sshrpc call: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # an argument with no Erlang term
        print(f"sshrpc call: {exc}", file=sys.stderr)
        return 2
    return 0
