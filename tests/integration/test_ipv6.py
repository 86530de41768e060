"""IPv6 everywhere a destination appears: ``sshrpc serve --host ::1``, the
client's ``[::1]:port`` destinations (Python, CLI, multicall, Pool) and
known_hosts ``[::1]:port`` entries, on the loopback ``::1``."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

import sshrpc
from conftest import start_serve, stop_serve

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def v6_server(tmp_path, client_key):
    info = start_serve(
        ["sshrpc.demo:services"],
        state_dir=tmp_path / "state",
        authorized_keys=client_key.public,
        identity=client_key.private,
        host="::1",
    )
    yield info
    assert stop_serve(info) == 0


def _options(info, **more):
    return {
        "identity": str(info.identity),
        "known_hosts": str(info.known_hosts),
        "agent": False,
        "use_ssh_config": False,
        **more,
    }


async def test_serve_listens_on_ipv6_only(v6_server) -> None:
    info = v6_server
    assert info.known_hosts.read_text().startswith(f"[::1]:{info.port} ssh-ed25519 ")
    with socket.socket(socket.AF_INET6) as s:
        s.connect(("::1", info.port))
        assert s.recv(4).startswith(b"SSH-")
    with socket.socket(socket.AF_INET) as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", info.port))


async def test_python_client_multicall_and_pool_on_ipv6(v6_server) -> None:
    info = v6_server
    destination = f"{info.user}@[::1]:{info.port}"
    async with sshrpc.open_connection(destination, **_options(info)) as node:
        assert await node.call("lists", "reverse", [[1, 2, 3]]) == [3, 2, 1]
        results = await sshrpc.multicall(
            [node, destination, f"{info.user}@[::1]:1"], "lists", "reverse", [[1, 2]],
            **_options(info),
        )  # fmt: skip
        assert results[:2] == [[2, 1], [2, 1]]
        assert isinstance(results[2], sshrpc.ConnectionLost)
    async with sshrpc.Pool(**_options(info)) as pool:
        assert await pool.call(destination, "lists", "reverse", [[5, 6]]) == [6, 5]
    # host and port given apart, the address without brackets
    async with sshrpc.open_connection(
        "::1", port=info.port, user=info.user, **_options(info)
    ) as node:
        assert await node.call("lists", "reverse", [[7]]) == [7]


async def test_new_ipv6_host_key_is_recorded_as_bracketed_entry(v6_server, tmp_path) -> None:
    info = v6_server
    fresh = tmp_path / "fresh_known_hosts"
    destination = f"{info.user}@[::1]:{info.port}"
    with pytest.raises(sshrpc.UnknownHostKey):
        async with sshrpc.open_connection(destination, **_options(info, known_hosts=str(fresh))):
            pass
    async with sshrpc.open_connection(
        destination, accept_new_host_keys=True, **_options(info, known_hosts=str(fresh))
    ) as node:
        await node.call("lists", "reverse", [[]])
    assert fresh.read_text().startswith(f"[::1]:{info.port} ssh-ed25519 ")
    async with sshrpc.open_connection(destination, **_options(info, known_hosts=str(fresh))):
        pass


def test_cli_call_on_ipv6(v6_server) -> None:
    info = v6_server
    out = subprocess.run(
        [
            sys.executable, "-m", "sshrpc.cli", "call", f"{info.user}@[::1]:{info.port}",
            "-i", str(info.identity), "--known-hosts", str(info.known_hosts), "-F", "/dev/null",
            "lists", "reverse", "[1,2,3]",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[3,2,1]"
