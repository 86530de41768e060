"""The package as users get it: ``python -m build`` gives an sdist with every
source (csrc/ with the relay, erlang/, docs/, LICENSE) and a wheel whose C
parts (codec, frame buffer, relay executable) are compiled; installed into a
fresh venv and run with no C compiler on PATH, it serves through ``sshrpc
serve`` and answers a call."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import start_serve, stop_serve

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=500,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _one(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def test_sdist_has_every_source(dist: Path) -> None:
    with tarfile.open(_one(dist, "sshrpc-*.tar.gz")) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for wanted in (
        "LICENSE",
        "csrc/relay.c",
        "csrc/etf.c",
        "csrc/build_sshrpc.py",
        "erlang/src/sshrpc_server.erl",
        "erlang/build.sh",
        "docs/security.md",
        "setup.py",
        "src/sshrpc/_relay.py",
    ):
        assert wanted in names, wanted
    assert not [name for name in names if name.endswith((".so", ".beam", ".o"))]


def test_wheel_has_compiled_parts_and_no_c_sources(dist: Path) -> None:
    with zipfile.ZipFile(_one(dist, "sshrpc-*.whl")) as wheel:
        infos = {info.filename: info for info in wheel.infolist()}
    assert [name for name in infos if name.startswith("sshrpc/_sshrpc_c") and ".so" in name]
    relay = infos["sshrpc/sshrpc-relay"]
    assert (relay.external_attr >> 16) & stat.S_IXUSR, "the relay is not executable"
    assert not [name for name in infos if name.endswith(".c")]
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in infos)


def test_wheel_serves_without_a_compiler(dist: Path, tmp_path: Path, client_key: object) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    done = subprocess.run(
        [python, "-m", "pip", "install", "-q", str(_one(dist, "sshrpc-*.whl"))],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # A PATH with the tools sshrpc serve runs (sshd, ssh-keygen) and no compiler.
    tools = tmp_path / "bin"
    tools.mkdir()
    for name in ("ssh-keygen", "ssh", "sshd"):
        found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin")
        assert found, name
        (tools / name).symlink_to(found)
    path = f"{venv / 'bin'}:{tools}"
    for compiler in ("cc", "gcc", "clang", "tcc"):
        assert shutil.which(compiler, path=path) is None
    env = {"PATH": path, "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    info = start_serve(
        ["sshrpc.demo:services"],
        state_dir=tmp_path / "state",
        authorized_keys=Path(client_key.public),  # type: ignore[attr-defined]
        identity=Path(client_key.private),  # type: ignore[attr-defined]
        python=python,
        env=env,
    )
    try:
        relay = (info.state_dir / "authorized_keys").read_text()
        assert "sshrpc-relay" in relay and str(venv) in relay
        call = subprocess.run(
            [
                python,
                "-c",
                "import sshrpc, sys, trio\n"
                "async def main():\n"
                "    async with sshrpc.open_connection(sys.argv[1], identity=sys.argv[2],\n"
                "            known_hosts=sys.argv[3], use_ssh_config=False, agent=False) as n:\n"
                "        value = await n.call('lists', 'reverse', [[1, 2, 3]])\n"
                "        print(sshrpc.c_accelerated, value)\n"
                "trio.run(main)\n",
                f"{info.user}@{info.host}:{info.port}",
                str(info.identity),
                str(info.known_hosts),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert call.returncode == 0, call.stderr
        assert call.stdout.strip() == "True [3, 2, 1]"
    finally:
        assert stop_serve(info) == 0
