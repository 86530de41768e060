"""``sshrpc node`` behind an sshd set up the way ``sshrpc sshd-config``
prints: the printed Subsystem and authorized_keys lines, used as printed, in
a real sshd, with the node a separate process, as on a server whose own sshd
carries sshrpc."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _sshwire import SSHChannel

from sshrpc import Atom
from sshrpc._statedir import temp_root
from sshrpc.subsystem import native_relay

pytestmark = pytest.mark.timeout(90)


def _sshd_config(socket: Path, key: Path, *extra: str) -> tuple[str, str]:
    """The Subsystem command and the forced authorized_keys line printed."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sshrpc.cli",
            "sshd-config",
            "sshrpc.demo:services",
            "--socket",
            str(socket),
            "--key",
            str(key),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    command = next(x for x in lines if x.startswith("Subsystem sshrpc@k2r.org "))
    forced = next(x for x in lines if x.startswith("restrict,command="))
    return command.removeprefix("Subsystem sshrpc@k2r.org "), forced


@pytest.fixture
def node_socket() -> Iterator[Path]:
    # AF_UNIX paths hold about 100 bytes: a short private directory.
    base = Path(tempfile.mkdtemp(prefix="sysd-", dir=temp_root()))
    try:
        yield base / "run" / "node.sock"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _start_node(socket: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sshrpc.cli",
                "node",
                "sshrpc.demo:services",
                "--socket",
                str(socket),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while b"ready: node on" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"sshrpc node did not start: {log.read_text()}")
        time.sleep(0.02)
    return proc


def _fd_targets(pid: int) -> set[str]:
    targets = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            targets.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return targets


def _relays(socket: Path, node: int) -> list[int]:
    """The relays to ``socket`` sshd runs (C or Python): the processes other
    than the node with the socket's path on their command line."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.fsencode(socket) in argv and int(entry) != node:
            pids.append(int(entry))
    return pids


C_RELAY = pytest.mark.skipif(native_relay() is None, reason="this build has no C relay")


@pytest.mark.parametrize(
    ("options", "relay", "passed"),
    [
        pytest.param([], "sshrpc-relay --pass-fds /", True, marks=C_RELAY, id="c-pass-fds"),
        pytest.param(["--no-pass-fds"], "sshrpc-relay /", False, marks=C_RELAY, id="c-copying"),
        pytest.param(["--python-relay"], "_relay.py /", False, id="python"),
    ],
)
async def test_node_behind_sshd_as_printed(
    tmp_path: Path,
    client_key,
    private_sshd,
    node_socket: Path,
    options: list[str],
    relay: str,
    passed: bool,
) -> None:
    """The printed lines work as printed.  By default the command is the C
    relay with ``--pass-fds``, and the node holds sshd's end of the channel
    itself; ``--no-pass-fds`` and ``--python-relay`` relays copy."""
    command, forced = _sshd_config(node_socket, client_key.public, *options)
    assert relay in command
    node = _start_node(node_socket, tmp_path / "node.log")
    try:
        info = private_sshd({"sshrpc@k2r.org": command}, authorized_keys=[forced])
        ch = await SSHChannel.open(info.ssh_argv())
        try:
            await ch.hello()
            assert await ch.call(1, "os", "getpid", []) == (Atom("reply"), 1, node.pid)
            [pid] = _relays(node_socket, node.pid)
            channel_end = os.readlink(f"/proc/{pid}/fd/0")
            assert (channel_end in _fd_targets(node.pid)) == passed, channel_end
        finally:
            await ch.aclose()
    finally:
        node.terminate()
        node.wait(timeout=30)
