"""A private node for testing code that uses sshrpc: a real OpenSSH sshd on
127.0.0.1 with throwaway keys, serving your services from your test's own
Trio loop.

    async with sshrpc.testing.open_test_node([calc]) as test_node:
        async with test_node.connect() as node:
            assert await node.call("calc", "add", [1, 2]) == 3

Everything lives in a temporary directory removed at the end (under
``~/.cache/sshrpc-tmp``: sshd's StrictModes refuses keys below ``/tmp``): the sshd's
state (config, host key), a client key pair, an ``authorized_keys`` that
lets that key reach the node and nothing else (``restrict,command=``, as
``sshrpc serve`` writes it), and a ``known_hosts`` that trusts the sshd.  The
node runs in the caller's task tree, so services may be any ``Service``
objects (no importable ``module:attribute`` needed) and the ``Node`` is
there to inspect (``test_node.node.statistics()``).  Needs OpenSSH's
``sshd`` and ``ssh-keygen``; ``TestNodeError`` says what is missing.

``open_link`` (from ``sshrpc._link``) puts an emulated long-haul link (a
delaying, rate-pacing TCP proxy) between a client and a node.

The pytest plugin (``sshrpc.pytest_plugin``, registered on install) builds
fixtures on this; docs/testing.md shows both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from . import _sshd, _statedir
from ._link import Link, open_link
from .service import Service
from .subsystem import forced_authorized_keys, load_targets, native_relay, relay_command

if TYPE_CHECKING:
    from .node import Node
    from .policy import Policy

__all__ = ["Link", "TestNode", "TestNodeError", "open_link", "open_test_node"]


class TestNodeError(RuntimeError):
    """The test node could not start: the message says what is missing."""

    __test__ = False  # not a pytest test class


@dataclass
class TestNode:
    """A running test node: where it listens and what a client needs.

    ``connect()`` opens a connection with the right key and known_hosts;
    ``connect_options`` holds the same as keyword arguments for
    ``sshrpc.open_connection``/``Pool``/``multicall``.
    """

    __test__ = False  # not a pytest test class

    node: Node
    host: str
    port: int
    user: str
    identity: Path
    public_key: str
    known_hosts: Path
    directory: Path

    @property
    def destination(self) -> str:
        """``user@host:port``, as ``open_connection`` takes it."""
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments that reach this node and only trust it: the
        throwaway key and known_hosts, no agent, no ``~/.ssh/config``."""
        return {
            "identity": str(self.identity),
            "known_hosts": str(self.known_hosts),
            "agent": False,
            "use_ssh_config": False,
        }

    def connect(self, **options: Any) -> Any:
        """``async with test_node.connect() as node:`` a ``Connection`` to this
        node (``options`` as in ``open_connection``, overriding the defaults)."""
        from .client import open_connection

        return open_connection(self.destination, **{**self.connect_options, **options})


def _keygen(path: Path, comment: str) -> str:
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        raise TestNodeError("ssh-keygen not found; install OpenSSH (Debian: openssh-client)")
    done = subprocess.run(
        [keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        raise TestNodeError(f"ssh-keygen failed: {done.stderr.decode(errors='replace').strip()}")
    return path.with_suffix(".pub").read_text().strip()


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


@asynccontextmanager
async def open_test_node(
    services: Iterable[Service | str] | Mapping[str, Service],
    *,
    policy: Policy | None = None,
    sshd_path: str | None = None,
    **node_options: Any,
) -> AsyncIterator[TestNode]:
    """Start a node serving ``services`` behind a private sshd; yield a
    ``TestNode``; stop both on exit and remove every file.

    ``services`` are ``Service`` objects or ``"module:attribute"`` targets.
    ``policy`` and ``node_options`` are ``sshrpc.Node``'s (``max_calls``,
    ``max_frame``, ...).  A checkpoint.  Cancellation stops the node and its
    sshd (the sshd is stopped even then; waiting for it is shielded and
    bounded).  Raises ``TestNodeError`` when OpenSSH is missing or sshd does
    not start.
    """
    from .client import _unwrap
    from .node import serve_node

    found: list[Service] = []
    items = services.values() if isinstance(services, Mapping) else services
    for item in items:
        found.extend(load_targets([item]) if isinstance(item, str) else [item])
    try:
        sshd_binary = _sshd.find_sshd(sshd_path)
    except _sshd.SSHDError as exc:
        raise TestNodeError(str(exc)) from None
    # The keys and sshd's state below ~/.cache (sshd's StrictModes refuses
    # /tmp); the node's socket in a fresh 0700 directory of the system's temp
    # directory, whose path stays short enough for AF_UNIX whatever $HOME is.
    with (
        tempfile.TemporaryDirectory(prefix="sshrpc-test-", dir=_statedir.temp_root()) as tmp,
        tempfile.TemporaryDirectory(prefix="sshrpc-sock-") as sockets,
    ):
        base = Path(tmp)
        identity = base / "id_ed25519"
        public_key = await trio.to_thread.run_sync(_keygen, identity, "sshrpc-test-client")
        socket_path = Path(sockets) / "node.sock"
        command = relay_command(
            socket_path, native=native_relay(), pass_fds=node_options.get("pass_fds", True)
        )
        keys_file = base / "authorized_keys"
        keys_file.write_text(forced_authorized_keys(public_key + "\n", command))
        os.chmod(keys_file, 0o600)
        try:
            sshd = _sshd.PrivateSSHD(
                base / "sshd",
                authorized_keys=keys_file,
                subsystems={name: command for name in _sshd.SUBSYSTEM_NAMES},
                sshd_path=sshd_binary,
            )
        except _sshd.SSHDError as exc:
            raise TestNodeError(str(exc)) from None
        known_hosts = base / "known_hosts"
        known_hosts.write_text(sshd.known_hosts_line + "\n")
        try:
            async with trio.open_nursery() as nursery:
                node = await nursery.start(
                    lambda task_status: serve_node(
                        found,
                        socket_path=socket_path,
                        policy=policy,
                        authorized_keys=keys_file,
                        task_status=task_status,
                        **node_options,
                    )
                )
                try:
                    try:
                        await trio.to_thread.run_sync(sshd.start)
                    except _sshd.SSHDError as exc:
                        raise TestNodeError(str(exc)) from None
                    yield TestNode(
                        node=node,
                        host=sshd.host,
                        port=sshd.port,
                        user=_user(),
                        identity=identity,
                        public_key=public_key,
                        known_hosts=known_hosts,
                        directory=base,
                    )
                finally:
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(sshd.stop)
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None
