"""The README's Quick start runs top to bottom as written.

Its ```sh and ```python blocks are taken in order, from the "Quick start"
heading to the next heading, and run in a scratch directory that looks like
the clone (``.venv`` and ``scripts`` linked in) with a fresh ``$HOME`` whose
``~/.ssh/id_ed25519`` is a new key.  Two substitutions, both stated in the
README: port 2222 becomes a free port, and ``scripts/setup`` (which the suite
has run already) is skipped.  A Python block whose first line is ``# NAME.py``
is written to NAME.py; an ``sh`` line starting ``sshrpc serve`` is started in
the background (the README says to leave it running) and waited for until it
prints ``ready``; every other line runs in bash after the previous lines,
with ``set -e``.  The serve is stopped by its PID at the end.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import make_key
from sshrpc._sshd import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def quick_start_blocks() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    section = section.split("\n### ", 1)[0]
    return re.findall(r"```(sh|python)\n(.*?)```", section, flags=re.S)


def test_quick_start_blocks_are_there() -> None:
    kinds = [kind for kind, _ in quick_start_blocks()]
    assert kinds.count("python") >= 2 and kinds.count("sh") >= 4, kinds


def test_readme_quick_start_runs_as_written(tmp_path: Path) -> None:
    work = tmp_path / "clone"
    work.mkdir()
    (work / ".venv").symlink_to(ROOT / ".venv")
    (work / "scripts").symlink_to(ROOT / "scripts")
    home = tmp_path / "home"
    make_key(home / ".ssh", comment="readme-user")
    port = str(free_port())
    env = {
        "HOME": str(home),
        "USER": os.environ.get("USER") or __import__("getpass").getuser(),
        "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "LANG": "C.UTF-8",
        "SSH_AUTH_SOCK": "",
    }
    done: list[str] = []  # the shell lines run so far (activate, ...)
    serve: subprocess.Popen[bytes] | None = None
    outputs: list[str] = []
    try:
        for kind, body in quick_start_blocks():
            body = body.replace("2222", port)
            if kind == "python":
                first = body.splitlines()[0]
                assert first.startswith("# ") and first.endswith(".py"), first
                (work / first[2:]).write_text(body)
                continue
            for line in body.splitlines():
                if not line.strip() or line.startswith("scripts/setup"):
                    continue
                script = "set -e\n" + "\n".join([*done, line]) + "\n"
                if line.startswith("sshrpc serve"):
                    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 -- the child's
                    serve = subprocess.Popen(
                        ["bash", "-c", script.replace(line, "exec " + line)],
                        cwd=work,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                    log.close()
                    deadline = time.monotonic() + 60
                    while b"\nready: " not in b"\n" + (tmp_path / "serve.log").read_bytes():
                        assert serve.poll() is None, (tmp_path / "serve.log").read_text()
                        assert time.monotonic() < deadline, "serve not ready"
                        time.sleep(0.05)  # bounded polling of the child's log
                    continue
                out = subprocess.run(
                    ["bash", "-c", script],
                    cwd=work,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                assert out.returncode == 0, (line, out.stdout, out.stderr)
                if line.startswith((". ", "source ", "export ", "cd ")):
                    done.append(line)
                else:
                    outputs.append(out.stdout)
        assert serve is not None, "the Quick start starts no node"
        assert "3" in outputs[-1].split(), outputs  # python client.py printed 3
        assert outputs[0].strip() == "3", outputs  # sshrpc call calc add 1 2
        assert "calc:add/2" in outputs[1], outputs  # sshrpc list
        assert outputs[2].strip() == "3", outputs  # ssh ... 'calc:add(1, 2).' (exec mode)
    finally:
        if serve is not None and serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(30)
