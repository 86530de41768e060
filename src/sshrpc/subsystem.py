"""The program sshd runs for the sshrpc subsystem, and the commands that name it.

Two modes:

- relay (default): ``python -I -S .../_relay.py SOCKET`` relays the channel to
  a long-lived node (``relay_command``).  Start-up: a bare interpreter, no
  site, four stdlib modules (~20-35 ms).  The same relay in C
  (csrc/relay.c, built with the package as ``sshrpc/sshrpc-relay``; see
  ``native_relay``) starts in ~1 ms and copies with 256 KiB buffers;
  ``sshrpc serve`` uses it when the package has it.
- in-process: ``python -m sshrpc.subsystem TARGET...`` serves the services
  itself on stdin/stdout (``in_process_command``), for one-shot use; every
  channel is a fresh process with fresh state.

``load_targets`` resolves ``package.module:attribute`` names to services, with
one-line errors (``TargetError``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from .service import Service, flatten_services

__all__ = [
    "NATIVE_RELAY_PATH",
    "RELAY_PATH",
    "SUBSYSTEM_MARKER",
    "TargetError",
    "forced_authorized_keys",
    "in_process_command",
    "load_targets",
    "main",
    "native_relay",
    "relay_command",
]

#: The relay script, run by path (not as a module) so that it needs no site.
RELAY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_relay.py")
#: The same relay in C (csrc/relay.c), compiled into the package when it is
#: built (setup.py).
NATIVE_RELAY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sshrpc-relay")


#: The last argument of a Subsystem line's command, absent from the forced
#: command: how the relay (and in-process mode) tell subsystem from exec.
SUBSYSTEM_MARKER = "--subsystem"


class TargetError(ValueError):
    """A ``module:attribute`` target does not name a Service; one-line message."""


def load_targets(targets: Sequence[str]) -> list[Service]:
    """Import each ``package.module:attribute`` and return the services it
    names (a ``Service`` or a list of them).  Raises ``TargetError``."""
    found: list[Service] = []
    for target in targets:
        module_name, sep, attribute = target.partition(":")
        if not sep or not module_name or not attribute:
            raise TargetError(f"{target!r}: expected package.module:attribute")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise TargetError(f"{target!r}: cannot import {module_name}: {exc}") from exc
        try:
            value = getattr(module, attribute)
        except AttributeError:
            raise TargetError(f"{target!r}: module {module_name} has no {attribute!r}") from None
        items = value if isinstance(value, list | tuple) else [value]
        try:
            flatten_services(items)
        except (TypeError, ValueError) as exc:
            raise TargetError(
                f"{target!r} is not a sshrpc.Service or a list of them ({exc})"
            ) from None
        found.extend(flatten_services(items).values())
    try:
        flatten_services(found)
    except ValueError as exc:
        raise TargetError(str(exc)) from None
    return found


def native_relay() -> str | None:
    """The C relay installed with the package (``NATIVE_RELAY_PATH``), or None
    when this build has none (built without a C compiler, or a checkout that
    was never built): then use the Python relay.  Nothing is ever compiled at
    run time: the relay is built with the package (setup.py), so it is as
    trusted as the package's own code and needs no cache."""
    return NATIVE_RELAY_PATH if os.access(NATIVE_RELAY_PATH, os.X_OK) else None


def relay_command(
    socket_path: str | os.PathLike[str],
    python: str | None = None,
    *,
    native: str | None = None,
    pass_fds: bool = False,
) -> str:
    """The subsystem command line that relays a channel to the node: the C
    relay at ``native`` (from ``native_relay``) if given, else the Python
    relay run by ``python`` (default: this interpreter).

    ``pass_fds`` (C relay only; the Python relay always copies): the relay
    offers the node the channel's socket (``sshrpc._fdpass``) and, when the
    node takes it, copies nothing.  Only for a node that knows the offer
    (this package's ``Node``, ``pass_fds=True``, which is the default).

    It ends with ``SUBSYSTEM_MARKER``, which tells the relay that sshd ran it
    for a subsystem request; ``forced_authorized_keys`` leaves the marker out
    of the forced command, so that the same program run for an exec request
    serves exec mode (see ``_relay.py``)."""
    if native is not None:
        argv = [native, *(["--pass-fds"] if pass_fds else []), os.fspath(socket_path)]
        argv.append(SUBSYSTEM_MARKER)
    else:
        python = python or sys.executable
        argv = [python, "-I", "-S", RELAY_PATH, os.fspath(socket_path), SUBSYSTEM_MARKER]
    return " ".join(shlex.quote(p) for p in argv)


def in_process_command(
    targets: Sequence[str],
    *,
    policy: str | None = None,
    authorized_keys: str | None = None,
    python: str | None = None,
    options: Sequence[str] = (),
) -> str:
    """The subsystem command line that serves ``targets`` in-process (importable
    from the current directory, as for ``sshrpc serve``); ``options`` are more
    of ``main``'s options.  It ends with ``SUBSYSTEM_MARKER``, as
    ``relay_command``'s does."""
    argv = [python or sys.executable, "-m", "sshrpc.subsystem", "--path", os.getcwd()]
    if policy:
        argv += ["--policy", os.path.abspath(policy)]
    if authorized_keys:
        argv += ["--authorized-keys", os.path.abspath(authorized_keys)]
    argv += [*options, *targets, SUBSYSTEM_MARKER]
    return " ".join(shlex.quote(a) for a in argv)


_KEY_TYPE = re.compile(r"(?:^|\s)((?:ssh|ecdsa|sk-ssh|sk-ecdsa)-[A-Za-z0-9@.-]+)\s+[A-Za-z0-9+/=]+")


def forced_authorized_keys(text: str, command: str) -> str:
    """``authorized_keys`` text with ``restrict,command="COMMAND"`` on every key.

    ``restrict`` turns off port, agent and X11 forwarding, ptys and user rc;
    ``command`` makes every session request (shell, exec, any subsystem) run
    ``command``, so these keys can reach sshrpc and nothing else.  A trailing
    ``SUBSYSTEM_MARKER`` is dropped from ``command``: the program then tells
    a subsystem request (``$SSH_ORIGINAL_COMMAND`` is the Subsystem line,
    which has the marker) from exec mode (any other command) and a shell
    (none, refused).  Options a line already has are kept after ours.
    Comments and blank lines are kept.
    """
    words = shlex.split(command)
    if words[-1:] == [SUBSYSTEM_MARKER]:
        command = shlex.join(words[:-1])
    quoted = command.replace("\\", "\\\\").replace('"', '\\"')
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            out.append(line)
            continue
        match = _KEY_TYPE.search(stripped)
        if match is None:
            out.append("# sshrpc: not a key line, ignored: " + stripped)
            continue
        options = stripped[: match.start(1)].strip()
        key = stripped[match.start(1) :]
        ours = f'restrict,command="{quoted}"'
        out.append(f"{ours},{options} {key}" if options else f"{ours} {key}")
    return "\n".join(out) + "\n"


def _user_auth() -> str:
    """The text of sshd's ``$SSH_USER_AUTH`` file ('' without one)."""
    path = os.environ.get("SSH_USER_AUTH", "")
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(65536)
    except OSError:
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sshrpc.subsystem [--policy F] [--authorized-keys F] TARGET... [--subsystem]``:
    serve one channel on stdin/stdout (in-process mode).

    As the relay does, it tells the request sshd ran it for: a subsystem
    (``--subsystem`` given, or the last word of ``$SSH_ORIGINAL_COMMAND``),
    exec mode (``$SSH_ORIGINAL_COMMAND`` set otherwise: one call, answered as
    ``sshrpc._exec`` says, exit status from there) or a shell (refused, exit
    status 3)."""
    import trio

    from . import _exec
    from .node import Node, serve_stdio
    from .policy import Policy, PolicyError

    parser = argparse.ArgumentParser(prog="python -m sshrpc.subsystem")
    parser.add_argument("targets", nargs="+", metavar="TARGET")
    parser.add_argument("--policy")
    parser.add_argument("--authorized-keys")
    parser.add_argument("--expose-traces", action="store_true")
    parser.add_argument("--redact-errors", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--max-frame", type=int, default=None)
    parser.add_argument("--max-calls", type=int, default=None)
    parser.add_argument("--flush-early", type=int, default=None)
    parser.add_argument(
        "--path", action="append", default=[], help="directory to import targets from"
    )
    parser.add_argument(SUBSYSTEM_MARKER, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    original = os.environb.get(b"SSH_ORIGINAL_COMMAND")
    if not args.subsystem and not (
        original is not None and original.split()[-1:] == [SUBSYSTEM_MARKER.encode()]
    ):
        if original is None:
            sys.stderr.write(
                "sshrpc subsystem: shell requests are refused; open the subsystem "
                "(ssh -s HOST sshrpc@k2r.org) or run one call: ssh HOST 'lists:reverse([1,2,3]).'\n"
            )
            return _exec.REFUSED
        exec_command: bytes | None = original
    else:
        exec_command = None
    sys.path[:0] = args.path
    try:
        services = load_targets(args.targets)
        policy = Policy.load(args.policy) if args.policy else None
    except (TargetError, PolicyError) as exc:
        sys.stderr.write(f"sshrpc subsystem: {exc}\n")
        return 2
    if exec_command is not None:
        from .policy import identify_key

        options: dict[str, Any] = {"expose_traces": args.expose_traces}
        if args.max_frame is not None:
            options["max_frame"] = args.max_frame
        if args.max_calls is not None:
            options["max_calls"] = args.max_calls
        node = Node(services, policy=policy, authorized_keys=args.authorized_keys, **options)
        key = identify_key(_user_auth(), node.authorized_keys)
        peer = os.environ.get("SSH_CONNECTION", "")
        outcome = trio.run(_exec.run_exec, node, exec_command, key, peer)
        for fd, data in ((1, outcome.stdout), (2, outcome.stderr)):
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        return outcome.status
    trio.run(
        lambda: serve_stdio(
            services,
            policy=policy,
            authorized_keys=args.authorized_keys,
            expose_traces=args.expose_traces,
            redact_errors=args.redact_errors,
            **({} if args.max_frame is None else {"max_frame": args.max_frame}),
            **({} if args.max_calls is None else {"max_calls": args.max_calls}),
            **({} if args.flush_early is None else {"flush_early": args.flush_early}),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
