"""``sshrpc serve`` / ``sshd-config`` / ``list`` as a user runs them: real
processes, a real sshd, OpenSSH's client."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _sshwire import SSHChannel

from conftest import start_serve, stop_serve
from sshrpc import Atom
from sshrpc.subsystem import native_relay

A = Atom
pytestmark = pytest.mark.timeout(90)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :][:1] != b"Z"


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            if int(stat[stat.rfind(b")") + 2 :].split()[1]) == pid:
                out.append(int(entry))
    return out


async def test_serve_calls_and_stops_cleanly(sshrpc_server):
    info = sshrpc_server
    ch = await SSHChannel.open(info.ssh_argv())
    try:
        hello = await ch.hello()
        assert hello[A("max_calls")] == 64
        assert await ch.call(1, "lists", "reverse", [[1, 2]]) == (A("reply"), 1, [2, 1])
        # every channel reaches the same node process
        pid1 = (await ch.call(2, "os", "getpid", []))[2]
        ch2 = await SSHChannel.open(info.ssh_argv("sshrpc"))
        await ch2.hello()
        assert (await ch2.call(1, "os", "getpid", []))[2] == pid1 == info.pid
        await ch2.aclose()
    finally:
        await ch.aclose()
    # stop while a channel is open with a call running: nothing survives
    ch = await SSHChannel.open(info.ssh_argv())
    await ch.hello()
    await ch.send((A("call"), 1, A("slow"), A("work"), [60]))
    await ch.send((A("ping"), 1))
    assert await ch.recv() == (A("pong"), 1)
    children = _children(info.pid)
    assert children  # sshd
    sshd_tree = [p for c in children for p in _children(c)]
    assert sshd_tree  # the connection's sshd processes
    assert (info.state_dir / "sshd.pid").exists()
    assert stop_serve(info) == 0
    assert await ch.recv() == (A("bye"), A("shutting_down"))
    await ch.aclose()
    assert not [pid for pid in children + sshd_tree if _alive(pid)]
    assert not (info.state_dir / "sshd.pid").exists()
    assert not (info.state_dir / "node" / "node.sock").exists()


async def test_key_gets_only_sshrpc_no_exec_or_shell(sshrpc_server):
    """``restrict,command=`` on every key: an exec request runs the relay in
    exec mode, which parses the command as one call and never runs it in a
    shell (a shell command is a bad command, exit status 4); a shell request
    is refused (status 3); forwarding is refused."""
    info = sshrpc_server
    argv = info.ssh_argv()
    argv.remove("-s")
    argv[-1] = "id; echo PWNED"
    out = subprocess.run(argv, capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
    assert out.returncode == 4
    assert out.stdout == b"" and b"PWNED" not in out.stderr and b"uid=" not in out.stderr
    assert out.stderr.startswith(b"sshrpc: bad command: ")
    out = subprocess.run(argv[:-1], capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
    assert out.returncode == 3 and b"shell requests are refused" in out.stderr
    argv = info.ssh_argv("x", "-o", "ExitOnForwardFailure=yes", "-L", "0:127.0.0.1:9", "-N")
    argv.remove("-s")
    argv.pop()
    out = subprocess.run(argv, capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
    assert out.returncode != 0


async def test_serve_in_process_mode(tmp_path, client_key):
    """Each channel is served by its own process, which gets the node
    options of ``serve`` (here ``--flush-early``) on its command line."""
    keys = tmp_path / "ak"
    keys.write_text(client_key.public_line + "\n")
    info = start_serve(
        ["sshrpc.demo:services"],
        state_dir=tmp_path / "st",
        authorized_keys=keys,
        identity=client_key.private,
        extra_args=["--in-process", "--flush-early", "3"],
    )
    try:
        forced = (tmp_path / "st" / "authorized_keys").read_text()
        assert "--flush-early 3" in forced, forced
        ch = await SSHChannel.open(info.ssh_argv())
        try:
            await ch.hello()
            reply = await ch.call(1, "os", "getpid", [])
            assert reply[0] == "reply" and reply[2] != info.pid
        finally:
            await ch.aclose()
    finally:
        assert stop_serve(info) == 0


def _serve(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sshrpc.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


WORKERS_2_3 = ["--worker-threads", "2", "--worker-threads-per-key", "3"]


WORKERS_2_3 = ["--worker-threads", "2", "--worker-threads-per-key", "3"]


def test_bad_arguments_one_clear_line(tmp_path, client_key):
    keys = tmp_path / "ak"
    keys.write_text(client_key.public_line + "\n")
    base = ["--state-dir", str(tmp_path / "st"), "--authorized-keys", str(keys)]
    cases = [
        (["serve", "no.such.module:services", *base], 2, "cannot import no.such.module"),
        (["serve", "sshrpc.demo:nothing", *base], 2, "has no 'nothing'"),
        (["serve", "sshrpc.demo:SLOW_STATE", *base], 2, "not a sshrpc.Service"),
        (["serve", "sshrpc.demo", *base], 2, "expected package.module:attribute"),
        (
            ["serve", "sshrpc.demo:services", "--authorized-keys", str(tmp_path / "none")],
            2,
            "cannot read authorized keys file",
        ),
        (
            ["serve", "sshrpc.demo:services", *base, "--sshd", "/nonexistent/sshd"],
            1,
            "sshd not found",
        ),
        (
            ["serve", "sshrpc.demo:services", *base, "--policy", str(tmp_path / "nope")],
            2,
            "cannot read policy file",
        ),
        (
            ["serve", "sshrpc.demo:services", *base, *WORKERS_2_3],
            2,
            "--worker-threads-per-key 3 exceeds --worker-threads 2",
        ),
    ]
    for argv, status, message in cases:
        out = _serve(*argv)
        assert out.returncode == status, (argv, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (argv, out.stderr)
    # argparse's own errors: its usage, then the error line.
    out = _serve("serve", "sshrpc.demo:services", *base, "--flush-early", "-1")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].endswith("--flush-early: must be 0 or more")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _serve("serve", "sshrpc.demo:services", *base, "--port", str(port))
    assert out.returncode == 1
    assert out.stderr.strip() == (
        f"sshrpc serve: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


def test_sshd_config_and_list(tmp_path, client_key):
    out = _serve(
        "sshd-config",
        "sshrpc.demo:services",
        "--socket",
        "/run/x/node.sock",
        "--key",
        str(client_key.public),
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "ExposeAuthInfo yes" in text
    relay = "sshrpc-relay --pass-fds" if native_relay() else "_relay.py"
    assert "Subsystem sshrpc@k2r.org " in text and f"{relay} /run/x/node.sock" in text
    assert 'restrict,command="' in text and client_key.public_line in text
    assert "sshrpc node sshrpc.demo:services --socket /run/x/node.sock" in text
    policy = tmp_path / "p.toml"
    policy.write_text('[[rule]]\nkeys = ["ci"]\nallow = ["lists"]\n')
    out = _serve("list", "sshrpc.demo:services", "--policy", str(policy), "--key", "ci")
    assert out.returncode == 0, out.stderr
    assert "lists   reverse/1" in out.stdout
    assert [line.split()[-1] for line in out.stdout.splitlines() if line.startswith("lists")] == [
        "allowed",
        "allowed",
    ]
    assert all(
        line.split()[-1] == "denied"
        for line in out.stdout.splitlines()
        if not line.startswith("lists")
    )


def test_the_printed_client_command_works_as_printed(tmp_path, client_key) -> None:
    """``serve`` prints an ``sshrpc call`` line with the right user, port and a
    known_hosts file it wrote: run verbatim (by a user whose default key is
    authorized), it calls the node; the ``known_hosts:`` line is that file's."""
    import shlex
    import shutil

    info = start_serve(
        ["sshrpc.demo:services"],
        state_dir=tmp_path / "state",
        authorized_keys=client_key.public,
        identity=client_key.private,
    )
    try:
        text = (tmp_path / f"serve-{info.port}.log").read_text()
        lines = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
        command = lines["client"]
        assert command.startswith("sshrpc call --known-hosts ")
        known_file = Path(lines["known_hosts file"])
        assert known_file.read_text() == lines["known_hosts"] + "\n"
        home = tmp_path / "home"
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        shutil.copy(client_key.private, home / ".ssh" / "id_ed25519")
        env = {
            "HOME": str(home),
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "SSH_AUTH_SOCK": "",
        }
        out = subprocess.run(
            shlex.split(command),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, (command, out.stderr)
        assert out.stdout.strip(), command
    finally:
        assert stop_serve(info) == 0
