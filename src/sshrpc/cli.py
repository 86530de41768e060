"""The ``sshrpc`` command: ``serve``, ``node``, ``sshd-config``, ``list``.

- ``sshrpc serve TARGET...``: a node and a private OpenSSH sshd as children,
  until Ctrl-C or SIGTERM; then both stop (no orphans, no stale pid files).
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
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._framing import MAX_FRAME_LIMIT
from .protocol import DEFAULT_MAX_FRAME

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


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


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
    serve.add_argument(
        "--python-relay",
        action="store_true",
        help="relay channels with the Python relay, not the C one compiled at start",
    )
    serve.add_argument("--sshd", metavar="PATH", help=f"sshd binary (default {_sshd_default()})")
    serve.add_argument("--list", action="store_true", help="print the exposure table at start")
    _worker_options(serve)

    node = sub.add_parser("node", help="run only the node (behind a system sshd)")
    _common(node)
    node.add_argument("--socket", required=True, metavar="PATH")
    node.add_argument("--authorized-keys", metavar="FILE")
    _worker_options(node)

    config = sub.add_parser("sshd-config", help="print what to add to a system sshd")
    _common(config)
    config.add_argument("--socket", default="/run/sshrpc/node.sock", metavar="PATH")
    config.add_argument("--in-process", action="store_true")
    config.add_argument(
        "--key", action="append", default=[], metavar="PUBKEY_FILE", help="key to authorize"
    )

    listing = sub.add_parser("list", help="print the exposure table")
    _common(listing)
    listing.add_argument("--key", metavar="FINGERPRINT_OR_COMMENT")

    from . import _call

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
    if not 0 < port < 65536:
        raise UsageError(f"--port {port}: not a TCP port")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise StartError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _serve(args: argparse.Namespace) -> int:
    import trio

    from . import _sshd
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
    socket_path = state / "node" / "node.sock"
    if len(os.fsencode(socket_path)) > 100:
        raise UsageError(f"--state-dir {state}: too long for a Unix socket path; use a shorter one")
    if args.in_process:
        command = in_process_command(
            args.targets, policy=args.policy, authorized_keys=str(keys_path)
        )
        if args.expose_traces:
            command += " --expose-traces"
        command += f" --max-frame {args.max_frame}"
    else:
        # The C relay starts per channel in ~1 ms instead of ~30 ms.
        native = None if args.python_relay else native_relay(state / "bin")
        command = relay_command(socket_path, native=native)
    try:
        sshd = _sshd.PrivateSSHD(
            state,
            authorized_keys=state / "authorized_keys",
            subsystems={name: command for name in _sshd.SUBSYSTEM_NAMES},
            host=args.host,
            port=args.port,
            sshd_path=sshd_path,
        )
    except _sshd.SSHDError as exc:
        raise StartError(str(exc)) from None
    generated = state / "authorized_keys"
    generated.write_text(forced_authorized_keys(keys_text, command))
    os.chmod(generated, 0o600)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                node = None
                if not args.in_process:
                    node = await nursery.start(
                        lambda task_status: serve_node(
                            services,
                            socket_path=socket_path,
                            policy=policy,
                            authorized_keys=keys_path,
                            expose_traces=args.expose_traces,
                            max_frame=args.max_frame,
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
                    await trio.to_thread.run_sync(sshd.start)
                    user = _user()
                    mode = "in-process" if args.in_process else f"node {socket_path}"
                    print(f"fingerprint: {sshd.host_fingerprint}")
                    print(f"known_hosts: {sshd.known_hosts_line}")
                    where = f"{user}@{args.host}"
                    print(
                        f"client: ssh -s -p {args.port} -o StrictHostKeyChecking=yes "
                        f"{where} sshrpc@k2r.org"
                    )
                    print(
                        f"python: async with sshrpc.open_connection({args.host!r}, "
                        f"port={args.port}, user={user!r}) as node: ..."
                    )
                    print(
                        f"ready: {len(services)} services on {args.host}:{args.port} "
                        f"({mode}; sshd pid {sshd.pid}; pid {os.getpid()})",
                        flush=True,
                    )
                    async for signum in signals:
                        print(f"stopping ({signal.Signals(signum).name})", flush=True)
                        break
                finally:
                    with trio.CancelScope(shield=True):
                        if node is not None:
                            await node.shutdown()
                        await trio.to_thread.run_sync(sshd.stop)
                    nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    except _sshd.SSHDError as exc:
        raise StartError(str(exc)) from None
    return 0


def _node(args: argparse.Namespace) -> int:
    import trio

    from .node import serve_node

    services, policy = _load(args)
    workers = _worker_args(args)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                node = await nursery.start(
                    lambda task_status: serve_node(
                        services,
                        socket_path=args.socket,
                        policy=policy,
                        authorized_keys=args.authorized_keys,
                        expose_traces=args.expose_traces,
                        max_frame=args.max_frame,
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
    from .subsystem import forced_authorized_keys, in_process_command, relay_command

    _load(args)
    if args.in_process:
        command = in_process_command(args.targets, policy=args.policy)
    else:
        command = relay_command(args.socket)
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
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
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
