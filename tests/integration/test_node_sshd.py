"""The private sshd fixture itself, driven by OpenSSH's client."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from sshrpc._sshd import PrivateSSHD, SSHDError, key_fingerprint

pytestmark = pytest.mark.timeout(60)


def test_cat_subsystem_echoes_through_real_sshd(private_sshd, client_key):
    info = private_sshd({"sshrpc@k2r.org": "cat", "sshrpc": "cat"})
    for name in ("sshrpc@k2r.org", "sshrpc"):
        out = subprocess.run(
            info.ssh_argv(name), input=b"hello\x00\xff", capture_output=True, timeout=20
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == b"hello\x00\xff"
    assert stat.S_IMODE(os.stat(info.state_dir).st_mode) == 0o700
    fp = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(info.state_dir / "ssh_host_ed25519_key.pub")],
        capture_output=True,
        check=True,
        text=True,
    ).stdout.split()[1]
    assert fp == info.host_fingerprint
    assert key_fingerprint(client_key.public_line) == client_key.fingerprint


def test_sshd_refuses_shell_exec_and_unknown_key(private_sshd, tmp_path):
    from conftest import make_key

    info = private_sshd({"sshrpc": "cat"})
    # Port forwarding is refused by the generated config.
    argv = info.ssh_argv("sshrpc", "-o", "ExitOnForwardFailure=yes", "-L", "0:127.0.0.1:9", "-N")
    argv.remove("-s")
    argv.pop()
    out = subprocess.run(argv, capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
    assert out.returncode != 0
    assert b"forwarding" in out.stderr.lower(), out.stderr
    other = make_key(tmp_path / "other")
    argv = info.ssh_argv("sshrpc")
    argv[argv.index(str(info.identity))] = str(other.private)
    out = subprocess.run(argv, capture_output=True, timeout=20, input=b"x")
    assert out.returncode == 255
    assert b"Permission denied" in out.stderr


def test_host_key_is_kept_and_pid_file_removed(tmp_path, client_key):
    keys = tmp_path / "authorized_keys"
    keys.write_text(client_key.public_line + "\n")
    first = PrivateSSHD(tmp_path / "state", authorized_keys=keys, subsystems={"sshrpc": "cat"})
    with first:
        assert first.pid_path.exists()
        pid = first.pid
        fingerprint = first.host_fingerprint
    assert not first.pid_path.exists()
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    second = PrivateSSHD(tmp_path / "state", authorized_keys=keys, subsystems={"sshrpc": "cat"})
    assert second.host_fingerprint == fingerprint


def test_port_in_use_is_one_clear_line(tmp_path, client_key):
    import socket

    keys = tmp_path / "authorized_keys"
    keys.write_text(client_key.public_line + "\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        sshd = PrivateSSHD(
            tmp_path / "state", authorized_keys=keys, subsystems={"sshrpc": "cat"}, port=port
        )
        with pytest.raises(SSHDError) as info:
            sshd.start()
    assert "\n" not in str(info.value)
    assert "Address already in use" in str(info.value) or "bind" in str(info.value).lower()
    assert sshd.process is None


def test_missing_sshd_and_unreadable_keys(tmp_path, client_key):
    keys = tmp_path / "authorized_keys"
    sshd = PrivateSSHD(
        tmp_path / "state", authorized_keys=keys, subsystems={}, sshd_path="/nonexistent/sshd"
    )
    with pytest.raises(SSHDError, match="sshd not found"):
        sshd.start()
    sshd = PrivateSSHD(tmp_path / "state", authorized_keys=keys, subsystems={})
    with pytest.raises(SSHDError, match="authorized_keys"):
        sshd.start()


def test_state_dir_with_spaces(tmp_path, client_key):
    keys = tmp_path / "my keys"
    keys.write_text(client_key.public_line + "\n")
    with PrivateSSHD(
        tmp_path / "state dir (x)", authorized_keys=keys, subsystems={"sshrpc": "cat"}
    ) as sshd:
        assert sshd.pid_path.exists()
