"""Many "hosts" on one machine, for fan-out tests and benchmarks: N private
sshd's on ports of 127.0.0.1, all in front of one node's socket.

Each sshd is a ``PrivateSSHD`` with its own state directory and host key, as
N separate machines would have (so a client sees N known_hosts entries,
``[127.0.0.1]:port``, and N key exchanges).  Every sshd runs the same relay
command for the sshrpc subsystems, so every channel ends up at the one node
listening on ``socket_path``; the node need not be running while the sshd's
start.  One sshd per "host" rather than one sshd on N ports: one sshd's
``MaxStartups`` (10 unauthenticated connections by default) and its single
accepting process would throttle a fan-out in a way N real hosts do not.

Blocking (``subprocess``, threads), no Trio: a Trio program runs ``start``
and ``stop`` with ``trio.to_thread.run_sync``.  ``stop`` stops every sshd and
every process below it by PID; it is idempotent and safe after a failed
``start``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ._sshd import SUBSYSTEM_NAMES, PrivateSSHD, SSHDError, address_family, free_port, host_port
from .subsystem import forced_authorized_keys, native_relay, relay_command

__all__ = ["Fleet"]

#: sshd's started at once by ``start`` (each runs ``sshd -t``, then waits
#: for its banner).
START_THREADS = 8


class Fleet:
    """``count`` private sshd's on 127.0.0.1 serving the node at
    ``socket_path`` to the keys in ``client_public_keys`` (OpenSSH public
    key lines; each gets the forced ``restrict,command=`` line that
    ``sshrpc serve`` writes).  State goes below ``directory`` (created 0700;
    it and its parents must pass sshd's StrictModes: not below ``/tmp``)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        count: int,
        *,
        socket_path: str | os.PathLike[str],
        client_public_keys: Sequence[str],
        host: str = "127.0.0.1",
        sshd_path: str | None = None,
    ) -> None:
        if count < 1:
            raise ValueError(f"a fleet has at least one sshd, not {count}")
        self.directory = Path(directory).absolute()
        self.directory.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self.socket_path = Path(socket_path)
        command = relay_command(self.socket_path, native=native_relay())
        self.authorized_keys = self.directory / "authorized_keys"
        keys = "".join(line.strip() + "\n" for line in client_public_keys)
        self.authorized_keys.write_text(forced_authorized_keys(keys, command))
        os.chmod(self.authorized_keys, 0o600)
        self.sshds = [
            PrivateSSHD(
                self.directory / f"h{i}",
                authorized_keys=self.authorized_keys,
                subsystems={name: command for name in SUBSYSTEM_NAMES},
                host=host,
                port=port,
                sshd_path=sshd_path,
            )
            for i, port in enumerate(_distinct_ports(host, count))
        ]

    @property
    def destinations(self) -> list[str]:
        """``host:port`` of every sshd, in order."""
        return [host_port(s.host, s.port) for s in self.sshds]

    @property
    def known_hosts_text(self) -> str:
        """known_hosts lines trusting every sshd of the fleet."""
        return "".join(s.known_hosts_line + "\n" for s in self.sshds)

    @property
    def pids(self) -> list[int]:
        """The listening sshd processes' PIDs (not their connections')."""
        return [s.pid for s in self.sshds if s.pid is not None]

    def start(self) -> None:
        """Start every sshd (``START_THREADS`` at a time); return once all
        accept connections.  A port taken by someone else meanwhile is
        replaced by a fresh one (``PORT_RETRIES`` times).  On any failure
        every sshd is stopped and the first ``SSHDError`` is raised."""
        try:
            with ThreadPoolExecutor(max_workers=START_THREADS) as pool:
                for future in [pool.submit(_start, s) for s in self.sshds]:
                    future.result()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every sshd and the processes below it (SIGTERM, then
        SIGKILL after ``PrivateSSHD.stop``'s bound).  Idempotent."""
        with ThreadPoolExecutor(max_workers=START_THREADS) as pool:
            for future in [pool.submit(s.stop) for s in self.sshds]:
                future.result()

    def __enter__(self) -> Fleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: Fresh ports tried when an sshd's port was taken between choosing and binding.
PORT_RETRIES = 3


def _distinct_ports(host: str, count: int) -> list[int]:
    """``count`` different free ports: all bound at once, then released (one
    ``free_port`` after another may hand out the same port twice)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(address_family(host), socket.SOCK_STREAM)
            sockets.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _start(sshd: PrivateSSHD) -> None:
    for attempt in range(PORT_RETRIES + 1):
        try:
            sshd.start()
            return
        except SSHDError as exc:
            if "already in use" not in str(exc) or attempt == PORT_RETRIES:
                raise
            sshd.port = free_port(sshd.host)
