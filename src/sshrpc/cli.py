"""The ``sshrpc`` command: ``serve``, ``node``, ``sshd-config``, ``list``.

- ``sshrpc serve TARGET...``: a node and a private OpenSSH sshd as children,
  until Ctrl-C or SIGTERM; then both stop (no orphans, no stale pid files).
  sshd ends with ``serve`` even when ``serve`` is killed (SIGKILL): it gets
  SIGTERM from the kernel.  If sshd dies first, ``serve`` says so on stderr,
  stops the node and the connections left behind, and exits with status 1
  (a service manager restarts it).  The state directory is created or refused
  (``_statedir``): one line, status 2.
- ``sshrpc node TARGET... --socket PATH``: only the node, for a system sshd.
- ``sshrpc sshd-config TARGET...``: what to add to a system sshd.
- ``sshrpc list TARGET... [--policy F] [--key FINGERPRINT]``: the exposure table.

Bad arguments print one line on stderr and exit with status 2; a failure to
start (port in use, sshd missing) exits with status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._auditlog import LOG_FORMAT
from ._bounds import (
    DEFAULT_MAX_CHANNELS_PER_KEY,
    DEFAULT_MAX_HELD_PER_KEY,
    FLUSH_EARLY,
    collect_periodically,
    tune_gc,
)
from ._bulk import tune_malloc
from ._pyframing import MAX_FRAME_LIMIT
from .protocol import DEFAULT_MAX_CALLS, DEFAULT_MAX_FRAME

__all__ = ["main"]

DEFAULT_PORT = 2222


class UsageError(Exception):
    """Bad arguments: one line, exit status 2."""


class StartError(Exception):
    """Could not start: one line, exit status 1."""


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "sshrpc"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("targets", nargs="+", metavar="TARGET", help="package.module:attribute")
    parser.add_argument(
        "--policy", metavar="FILE", help="TOML access policy (default: all exported)"
    )
    parser.add_argument(
        "--expose-traces", action="store_true", help="send stack traces in error details"
    )
    parser.add_argument(
        "--max-frame",
        type=_max_frame,
        default=DEFAULT_MAX_FRAME,
        metavar="BYTES",
        help=f"largest request payload accepted (default {DEFAULT_MAX_FRAME}, 1 MiB)",
    )
    parser.add_argument(
        "--flush-early",
        type=_count,
        default=FLUSH_EARLY,
        metavar="N",
        help=f"answers of one read leave once N (or half the read, if more) are ready and "
        "nothing else waits, so the "
        f"client works while the node answers the rest (default {FLUSH_EARLY}; 0: together, "
        "the least CPU per call)",
    )
    parser.add_argument(
        "--max-calls",
        type=_max_calls,
        default=DEFAULT_MAX_CALLS,
        metavar="N",
        help=f"calls open at once per channel (default {DEFAULT_MAX_CALLS}); raise it for "
        "many requests in flight on long round trips",
    )
    parser.add_argument(
        "--max-channels-per-key",
        type=_positive,
        default=DEFAULT_MAX_CHANNELS_PER_KEY,
        metavar="N",
        help="channels one key may have open at once; one more is refused "
        f"(default {DEFAULT_MAX_CHANNELS_PER_KEY})",
    )
    parser.add_argument(
        "--max-held-per-key",
        type=_positive,
        default=DEFAULT_MAX_HELD_PER_KEY,
        metavar="BYTES",
        help="estimated bytes one key's requests, mailbox messages and queued answers may "
        f"hold; past it requests get overload (default {DEFAULT_MAX_HELD_PER_KEY}, 64 MiB)",
    )


def _whole(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(
            "must be 0 or more" if least == 0 else f"must be at least {least}"
        )
    return value


def _positive(text: str) -> int:
    return _whole(text, 1)


def _count(text: str) -> int:
    return _whole(text, 0)


def _max_calls(text: str) -> int:
    value = _positive(text)
    if value > 65536:
        raise argparse.ArgumentTypeError("must be within 1..65536")
    return value


_AUDIT_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


def _relay_options(parser: argparse.ArgumentParser) -> None:
    """Which relay sshd runs per channel (``serve``, ``sshd-config``)."""
    parser.add_argument(
        "--python-relay",
        action="store_true",
        help="relay channels with the Python relay, not the C one built with the package",
    )
    parser.add_argument(
        "--pass-fds",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the C relay hands the channel's socket to the node, which then reads and "
        "writes sshd's end itself (default: on; --no-pass-fds: the relay copies)",
    )


def _serving(parser: argparse.ArgumentParser) -> None:
    """Options of the commands that run a node (``serve``, ``node``)."""
    parser.add_argument(
        "--redact-errors",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send clients only the class of an exception, not its message "
        "(default: on; sshrpc.Error/Exit/Throw reasons are always sent)",
    )
    parser.add_argument(
        "--audit-level",
        choices=sorted(_AUDIT_LEVELS),
        default="info",
        help="level of the audit line of each request that ran (default info; "
        "denials are warnings, rate-limited)",
    )
    parser.add_argument(
        "--audit-window",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="rate limit of denial lines: an identical one once, at most 20 per key, "
        "per window (default 10)",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError("must be within 0..86400 seconds")
    return value


def _worker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--worker-threads",
        type=_positive,
        default=16,
        metavar="N",
        help="threads running sync functions (default 16)",
    )
    parser.add_argument(
        "--worker-threads-per-key",
        type=_positive,
        default=None,
        metavar="N",
        help="most of them one key's calls may hold (default: half of --worker-threads)",
    )


def _worker_args(args: argparse.Namespace) -> dict[str, int | None]:
    per_key = args.worker_threads_per_key
    if per_key is not None and per_key > args.worker_threads:
        raise UsageError(
            f"--worker-threads-per-key {args.worker_threads_per_key} exceeds "
            f"--worker-threads {args.worker_threads}"
        )
    return {
        "worker_threads": args.worker_threads,
        "worker_threads_per_key": args.worker_threads_per_key,
    }


def _max_frame(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of bytes: {text!r}") from None
    if not 1024 <= value <= MAX_FRAME_LIMIT:
        raise argparse.ArgumentTypeError(f"must be within 1024..{MAX_FRAME_LIMIT} bytes")
    return value


def _sshd_default() -> str:
    from ._sshd import DEFAULT_SSHD

    return DEFAULT_SSHD


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sshrpc", description="Secure RPC over SSH")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve services behind a private sshd")
    _common(serve)
    _serving(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument(
        "--authorized-keys",
        metavar="FILE",
        default=os.path.join(Path.home(), ".ssh", "authorized_keys"),
    )
    serve.add_argument("--state-dir", metavar="DIR", default=None)
    serve.add_argument(
        "--in-process", action="store_true", help="each channel serves in its own process"
    )
    _relay_options(serve)
    serve.add_argument("--sshd", metavar="PATH", help=f"sshd binary (default {_sshd_default()})")
    serve.add_argument("--list", action="store_true", help="print the exposure table at start")
    _worker_options(serve)

    node = sub.add_parser("node", help="run only the node (behind a system sshd)")
    _common(node)
    _serving(node)
    node.add_argument("--socket", required=True, metavar="PATH")
    node.add_argument("--authorized-keys", metavar="FILE")
    node.add_argument(
        "--pass-fds",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="take the channel's descriptors when the C relay offers them (default: on; "
        "--no-pass-fds: the relay copies)",
    )
    _worker_options(node)

    config = sub.add_parser("sshd-config", help="print what to add to a system sshd")
    _common(config)
    config.add_argument("--socket", default="/run/sshrpc/node.sock", metavar="PATH")
    config.add_argument("--in-process", action="store_true")
    _relay_options(config)
    config.add_argument(
        "--key", action="append", default=[], metavar="PUBKEY_FILE", help="key to authorize"
    )

    from . import _call

    listing = sub.add_parser(
        "list",
        help="print the exposure table, or what a node lets you call",
        description="sshrpc list TARGET... prints the exposure table of local services "
        "(--key: as that key sees it); sshrpc list [USER@]HOST[:PORT] asks a node what "
        "your key may call there (its built-in sshrpc:exports/0).",
    )
    _common(listing)
    listing.add_argument("--key", metavar="FINGERPRINT_OR_COMMENT")
    _call.add_connection_options(listing)

    _call.add_parser(sub)
    return parser


def _load(args: argparse.Namespace) -> tuple[list[Any], Any]:
    from .policy import Policy, PolicyError
    from .subsystem import TargetError, load_targets

    sys.path.insert(0, os.getcwd())
    try:
        services = load_targets(args.targets)
    except TargetError as exc:
        raise UsageError(str(exc)) from None
    try:
        policy = Policy.load(args.policy) if args.policy else None
    except PolicyError as exc:
        raise UsageError(str(exc)) from None
    return services, policy


def _check_port(host: str, port: int) -> None:
    from ._sshd import address_family, host_port

    if not 0 < port < 65536:
        raise UsageError(f"--port {port}: not a TCP port")
    with socket.socket(address_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise StartError(f"cannot listen on {host_port(host, port)}: {exc.strerror}") from None


#: prctl(2) option: orphaned descendants are re-parented to this process.
_PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> None:
    """Orphans of a dead sshd (its connection processes) become our children,
    so ``serve`` can still find and stop them.  Best effort (Linux only)."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1)


async def _wait_exited(process: subprocess.Popen[bytes]) -> int:
    """``process``'s exit status once it has exited (it is reaped here).

    Waits on a pidfd (Linux >= 5.3), else polls twice a second.  Cancellable.
    """
    import trio

    try:
        fd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        while process.poll() is None:
            await trio.sleep(0.5)
    else:
        try:
            await trio.lowlevel.wait_readable(fd)
        finally:
            os.close(fd)
    return process.wait()


def _how(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


def _example_call(services: list[Any]) -> str:
    """``MODULE FUNCTION [ARG...]`` of one exported function, for the client
    line ``serve`` prints: the first (by name) that takes no argument, else
    the first, with one ``ARG`` per argument it needs."""
    from .service import flatten_services

    functions = sorted(
        (exported.service, exported.name, exported)
        for service in flatten_services(services).values()
        for exported in service.functions.values()
    )
    if not functions:
        return "MODULE FUNCTION [ARG...]"
    chosen = next((f for f in functions if f[2].min_arity == 0), functions[0])
    return " ".join([chosen[0], chosen[1], *["ARG"] * chosen[2].min_arity])


def _serve(args: argparse.Namespace) -> int:
    import trio

    from . import _sshd, _statedir
    from .node import serve_node
    from .subsystem import forced_authorized_keys, in_process_command, native_relay, relay_command

    services, policy = _load(args)
    workers = _worker_args(args)
    keys_path = Path(args.authorized_keys).expanduser()
    try:
        keys_text = keys_path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read authorized keys file {keys_path}: {exc.strerror}") from None
    try:
        sshd_path = _sshd.find_sshd(args.sshd)
    except _sshd.SSHDError as exc:
        raise StartError(str(exc)) from None
    _check_port(args.host, args.port)
    state = Path(args.state_dir).expanduser() if args.state_dir else _default_state_dir()
    try:
        state = _statedir.prepare_state_dir(state, subdirs=("node",))
    except _statedir.StateDirError as exc:
        raise UsageError(f"--state-dir {state}: {exc}") from None
    socket_path = state / "node" / "node.sock"
    socket_dir: str | None = None
    if len(os.fsencode(socket_path)) > 100:
        # AF_UNIX paths hold about 100 bytes: below a deep state directory
        # (a long $HOME) the socket goes into a fresh private directory of
        # the system's temporary directory (mkdtemp: 0700, unguessable),
        # removed at exit.
        socket_dir = tempfile.mkdtemp(prefix="sshrpc-node-")
        socket_path = Path(socket_dir) / "node.sock"
    if args.in_process:
        options = ["--expose-traces"] if args.expose_traces else []
        options += [] if args.redact_errors else ["--no-redact-errors"]
        options += ["--max-frame", str(args.max_frame), "--max-calls", str(args.max_calls)]
        options += ["--flush-early", str(args.flush_early)]
        command = in_process_command(
            args.targets, policy=args.policy, authorized_keys=str(keys_path), options=options
        )
    else:
        # The C relay starts per channel in ~1 ms instead of ~30 ms.
        native = None if args.python_relay else native_relay()
        if native is None and not args.python_relay:
            logging.getLogger("sshrpc.serve").warning(
                "this sshrpc build has no C relay; the Python relay serves (~30 ms per channel)"
            )
        command = relay_command(socket_path, native=native, pass_fds=args.pass_fds)
    try:
        sshd = _sshd.PrivateSSHD(
            state,
            authorized_keys=state / "authorized_keys",
            subsystems={name: command for name in _sshd.SUBSYSTEM_NAMES},
            host=args.host,
            port=args.port,
            sshd_path=sshd_path,
        )
        _statedir.write_file(
            state, "authorized_keys", forced_authorized_keys(keys_text, command).encode()
        )
    except _statedir.StateDirError as exc:
        raise UsageError(f"--state-dir {state}: {exc}") from None
    except _sshd.SSHDError as exc:
        raise StartError(str(exc)) from None
    died: list[int] = []
    stopping = False

    async def watch_sshd(process: subprocess.Popen[bytes], waiting: trio.CancelScope) -> None:
        status = await _wait_exited(process)
        if stopping:
            return
        died.append(status)
        print(
            f"sshrpc serve: sshd (pid {process.pid}) exited unexpectedly ({_how(status)}); "
            f"nothing listens on {args.host}:{args.port} any more: stopping the node "
            f"and exiting with status 1 (sshd's log: {sshd.log_path})",
            file=sys.stderr,
            flush=True,
        )
        waiting.cancel()

    async def reap_adopted(sshd_pid: int) -> None:
        # As a subreaper we inherit whatever a dead process left behind below
        # sshd (a killed connection's processes, a subsystem's own children);
        # reap those when they exit, never sshd itself (its Popen does).
        with trio.open_signal_receiver(signal.SIGCHLD) as children:
            async for _ in children:
                _sshd.reap_adopted(exclude=sshd_pid)

    async def run() -> None:
        nonlocal stopping
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                node = None
                if not args.in_process:
                    tune_gc()
                    tune_malloc(args.max_frame)
                    nursery.start_soon(collect_periodically)
                    node = await nursery.start(
                        lambda task_status: serve_node(
                            services,
                            socket_path=socket_path,
                            policy=policy,
                            authorized_keys=keys_path,
                            expose_traces=args.expose_traces,
                            redact_errors=args.redact_errors,
                            audit_level=_AUDIT_LEVELS[args.audit_level],
                            audit_window=args.audit_window,
                            audit_stream=sys.stderr,
                            max_frame=args.max_frame,
                            max_calls=args.max_calls,
                            flush_early=args.flush_early,
                            max_channels_per_key=args.max_channels_per_key,
                            max_held_per_key=args.max_held_per_key,
                            pass_fds=args.pass_fds,
                            task_status=task_status,
                            **workers,
                        )
                    )
                if args.list:
                    from .policy import ExposureTable, Policy
                    from .service import flatten_services

                    table = ExposureTable(flatten_services(services), policy or Policy.allow_all())
                    sys.stdout.write(table.listing())
                try:
                    await trio.to_thread.run_sync(sshd.prepare_start)
                    # From this (the main) thread: sshd gets SIGTERM when it
                    # ends, i.e. when serve does, even by SIGKILL.
                    sshd.spawn(die_with_parent=True)
                    assert sshd.process is not None
                    await trio.to_thread.run_sync(sshd.wait_ready)
                    user = _user()
                    mode = "in-process" if args.in_process else f"node {socket_path}"
                    known_file = state / "known_hosts"
                    _statedir.write_file(
                        state, "known_hosts", (sshd.known_hosts_line + "\n").encode(), mode=0o644
                    )
                    destination = f"{user}@{_sshd.host_port(args.host, args.port)}"
                    print(f"fingerprint: {sshd.host_fingerprint}")
                    print(f"known_hosts: {sshd.known_hosts_line}")
                    print(f"known_hosts file: {known_file}")
                    print(
                        "client: sshrpc call --known-hosts "
                        f"{shlex.quote(str(known_file))} {destination} {_example_call(services)}"
                    )
                    print(
                        f"python: async with sshrpc.open_connection({destination!r}, "
                        f"known_hosts={str(known_file)!r}) as node: ..."
                    )
                    print(
                        f"ready: {len(services)} services on "
                        f"{_sshd.host_port(args.host, args.port)} "
                        f"({mode}; sshd pid {sshd.pid}; pid {os.getpid()})",
                        flush=True,
                    )
                    with trio.CancelScope() as waiting:
                        nursery.start_soon(watch_sshd, sshd.process, waiting)
                        nursery.start_soon(reap_adopted, sshd.process.pid)
                        async for signum in signals:
                            print(f"stopping ({signal.Signals(signum).name})", flush=True)
                            break
                finally:
                    stopping = True
                    with trio.CancelScope(shield=True):
                        if node is not None:
                            await node.shutdown()
                        await trio.to_thread.run_sync(sshd.stop)
                        if died:
                            await trio.to_thread.run_sync(_sshd.stop_orphans)
                    nursery.cancel_scope.cancel()

    _become_subreaper()
    try:
        trio.run(run)
    except _sshd.SSHDError as exc:
        raise StartError(str(exc)) from None
    finally:
        if socket_dir is not None:
            shutil.rmtree(socket_dir, ignore_errors=True)
    return 1 if died else 0


def _node(args: argparse.Namespace) -> int:
    import trio

    from .node import serve_node

    services, policy = _load(args)
    workers = _worker_args(args)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                tune_gc()
                tune_malloc(args.max_frame)
                nursery.start_soon(collect_periodically)
                node = await nursery.start(
                    lambda task_status: serve_node(
                        services,
                        socket_path=args.socket,
                        policy=policy,
                        authorized_keys=args.authorized_keys,
                        expose_traces=args.expose_traces,
                        redact_errors=args.redact_errors,
                        audit_level=_AUDIT_LEVELS[args.audit_level],
                        audit_window=args.audit_window,
                        audit_stream=sys.stderr,
                        max_frame=args.max_frame,
                        max_calls=args.max_calls,
                        flush_early=args.flush_early,
                        max_channels_per_key=args.max_channels_per_key,
                        max_held_per_key=args.max_held_per_key,
                        pass_fds=args.pass_fds,
                        task_status=task_status,
                        **workers,
                    )
                )
                print(f"ready: node on {args.socket}", flush=True)
                async for _ in signals:
                    break
                await node.shutdown()
                nursery.cancel_scope.cancel()

    trio.run(run)
    return 0


def _sshd_config(args: argparse.Namespace) -> int:
    from .subsystem import forced_authorized_keys, in_process_command, native_relay, relay_command

    _load(args)
    if args.in_process:
        command = in_process_command(args.targets, policy=args.policy)
    else:
        native = None if args.python_relay else native_relay()
        command = relay_command(args.socket, native=native, pass_fds=args.pass_fds)
    keys = []
    for path in args.key:
        try:
            keys.append(Path(path).read_text())
        except OSError as exc:
            raise UsageError(f"cannot read key file {path}: {exc.strerror}") from None
    out = [
        "# 1. In /etc/ssh/sshd_config (or a file in /etc/ssh/sshd_config.d/), then reload sshd:",
        "ExposeAuthInfo yes",
        f"Subsystem sshrpc@k2r.org {command}",
        "# (sshd accepts each Subsystem name once; add 'Subsystem sshrpc ...' too if unused)",
        "# Recommended: drop vanished clients, so the node cancels their calls.",
        "ClientAliveInterval 15",
        "ClientAliveCountMax 3",
        "",
        "# 2. In the authorized_keys of the account the node runs as, one line per key:",
        "#    restrict: no pty, no forwarding, no ~/.ssh/rc; command=: every session",
        "#    request of this key (shell, exec, subsystem) runs sshrpc and nothing else.",
    ]
    if keys:
        out.append(forced_authorized_keys("".join(keys), command).rstrip("\n"))
    else:
        quoted = command.replace('"', '\\"')
        out.append(f'restrict,command="{quoted}" ssh-ed25519 AAAA... user@host')
    if not args.in_process:
        targets = " ".join(args.targets)
        policy = f" --policy {args.policy}" if args.policy else ""
        out += [
            "",
            "# 3. Run the node as that account (e.g. a systemd service):",
            f"sshrpc node {targets} --socket {args.socket}{policy}",
        ]
    print("\n".join(out))
    return 0


def _list(args: argparse.Namespace) -> int:
    from . import _call

    if len(args.targets) == 1 and _call.looks_remote(args.targets[0]):
        args.destination = args.targets[0]
        return _call.run_list(args)
    from .policy import ExposureTable, KeyIdentity, Policy
    from .service import flatten_services

    services, policy = _load(args)
    table = ExposureTable(flatten_services(services), policy or Policy.allow_all())
    key = None
    if args.key:
        key = KeyIdentity(
            fingerprint=args.key if args.key.startswith("SHA256:") else "x",
            comment="" if args.key.startswith("SHA256:") else args.key,
        )
    sys.stdout.write(table.listing(key))
    return 0


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sshrpc`` command; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format=LOG_FORMAT)
    if getattr(args, "audit_level", None) is not None:
        # Audit lines at INFO and above show without -v; ``--audit-level
        # debug`` hides the lines of allowed requests unless -vv.
        from .policy import AUDIT_LOGGER

        logging.getLogger(AUDIT_LOGGER).setLevel(min(logging.INFO, level))
    from . import _call

    handlers = {
        "serve": _serve,
        "node": _node,
        "sshd-config": _sshd_config,
        "list": _list,
        "call": _call.run,
    }
    try:
        return handlers[args.command](args)
    except UsageError as exc:
        print(f"sshrpc {args.command}: {exc}", file=sys.stderr)
        return 2
    except StartError as exc:
        print(f"sshrpc {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
