"""The Python relay's imports and start-up, and the node socket's access
checks, without sshd.  The relay's behaviour (header, bytes both ways,
endings) is tested for the Python and the C relay alike in
test_relay_native.py."""

from __future__ import annotations

import ast
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import trio

from sshrpc import subsystem
from sshrpc.node import Node

pytestmark = pytest.mark.timeout(60)


def test_relay_imports_only_os_socket_select_sys():
    tree = ast.parse(Path(subsystem.RELAY_PATH).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported == {"os", "socket", "select", "sys"}
    # And at run time, with no site: nothing from sshrpc, trio or site.
    out = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-X",
            "importtime",
            subsystem.RELAY_PATH,
            "/nonexistent.sock",
            "--subsystem",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 1
    assert "cannot reach the node at /nonexistent.sock" in out.stderr
    modules = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert not {m for m in modules if m.startswith(("sshrpc", "trio", "site", "json"))}


async def test_node_socket_refuses_other_uids(tmp_path, caplog):
    """Two guards: the socket directory is 0700 (others cannot reach the
    socket), and SO_PEERCRED (a peer of another uid is refused even if the
    directory were opened up)."""
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another uid (setpriv)")
    node = Node([])
    # Outside pytest's tmp dir, whose parent only root may enter.
    base = Path(tempfile.mkdtemp(prefix="sshrpc-uid-"))
    sock_dir = base / "node"
    path = sock_dir / "node.sock"
    client = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        "try:\n s.connect(sys.argv[1])\n"
        "except OSError as e:\n print('connect', e.errno); sys.exit(0)\n"
        "s.settimeout(10)\n"
        "try:\n s.sendall(b'SRLY\\0\\0\\0\\1\\0'); print('data', repr(s.recv(100)))\n"
        "except (ConnectionResetError, BrokenPipeError):\n print('data', repr(b''))\n"
    )
    argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable]
    async with trio.open_nursery() as nursery:
        await nursery.start(node.serve_unix, path)
        assert stat.S_IMODE(os.stat(sock_dir).st_mode) == 0o700
        out = await trio.run_process([*argv, "-c", client, str(path)], capture_stdout=True)
        assert out.stdout.decode().strip() == "connect 13"  # EACCES
        os.chmod(sock_dir, 0o755)
        os.chmod(base, 0o755)
        os.chmod(path, 0o777)
        out = await trio.run_process([*argv, "-c", client, str(path)], capture_stdout=True)
        # Connected, then closed by the node without a byte.
        assert out.stdout.decode().strip() == "data b''"
        assert "refused a connection to the node socket from uid 65534" in caplog.text
        assert node.statistics()["channels"] == 0
        nursery.cancel_scope.cancel()
    assert not path.exists()
    shutil.rmtree(base)


async def test_relay_startup_is_small(tmp_path):
    """Per-channel start-up of the relay (a bare interpreter): bounded."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-I", "-S", subsystem.RELAY_PATH, str(tmp_path / "none"), "--subsystem"],
        capture_output=True,
        timeout=20,
    )
    assert time.perf_counter() - start < 2.0
