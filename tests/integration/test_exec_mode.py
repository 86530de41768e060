"""Exec mode through a real sshd with OpenSSH's ``ssh`` client: one call per
``ssh HOST 'M:F(Args).'``, parsed never evaluated, behind ``sshrpc serve``
(C relay, Python relay, in-process) -- and the hostile inputs a second door
must refuse."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ClientKey, SSHDInfo, start_serve, stop_serve
from sshrpc import Atom, decode
from sshrpc._exec import (
    BAD_COMMAND,
    FORBIDDEN,
    MAX_COMMAND,
    RAISED,
    REFUSED,
    UNDEF,
)

pytestmark = pytest.mark.timeout(120)


def _serve(factory: pytest.TempPathFactory, key: ClientKey, *extra: str) -> Iterator[SSHDInfo]:
    base = factory.mktemp("exec")
    keys = base / "authorized_keys"
    keys.write_text(key.public_line + "\n")
    info = start_serve(
        ["sshrpc.demo:services"],
        state_dir=base / "state",
        authorized_keys=keys,
        identity=key.private,
        extra_args=extra,
    )
    try:
        yield info
    finally:
        stop_serve(info)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, client_key: ClientKey) -> Iterator[SSHDInfo]:
    """``sshrpc serve`` with the C relay, shared by this module's tests."""
    yield from _serve(tmp_path_factory, client_key)


def ssh(info: SSHDInfo, command: str | bytes | None) -> subprocess.CompletedProcess[bytes]:
    """Run ``ssh HOST COMMAND`` (a shell request when ``command`` is None)."""
    argv: list[str | bytes] = list(info.ssh_argv())
    argv.remove("-s")
    argv.pop()  # the subsystem name
    if command is not None:
        argv.append(command)
    return subprocess.run(argv, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)


def _log(info: SSHDInfo) -> str:
    return (info.state_dir.parent / f"serve-{info.port}.log").read_text(errors="replace")


def test_call_prints_the_result(server):
    out = ssh(server, "lists:reverse([1,2,3]).")
    assert (out.returncode, out.stdout, out.stderr) == (0, b"[3,2,1]\n", b"")
    out = ssh(server, "  echo:echo({ok, <<\"x\">>, 'Quoted atom', #{a => 1.5}}) .\n")
    assert (out.returncode, out.stdout) == (0, b"{ok,<<\"x\">>,'Quoted atom',#{a => 1.5}}\n")


def test_etf_form_is_the_papers_answer_frame(server):
    out = ssh(server, "etf lists:reverse([1,2,3]).")
    assert out.returncode == 0
    size = int.from_bytes(out.stdout[:4], "big")
    assert size == len(out.stdout) - 4
    assert decode(out.stdout[4:]) == (Atom("answer"), ([3, 2, 1], 0))
    out = ssh(server, "etf erlang:halt().")
    assert out.returncode == FORBIDDEN
    assert decode(out.stdout[4:]) == (
        Atom("answer"),
        ((Atom("exec_badrpc"), Atom("forbidden")), -1),
    )
    out = ssh(server, "etf not a call")
    assert out.returncode == BAD_COMMAND
    answer = decode(out.stdout[4:])
    assert answer[1][0][0] == Atom("exec_error") and answer[1][1] == -1


def test_error_kinds_have_distinct_statuses(server):
    out = ssh(server, "errors:raise(error, boom).")
    assert out.returncode == RAISED
    assert out.stderr == b"sshrpc: errors:raise/2 failed: error boom\n"
    out = ssh(server, "erlang:halt().")
    assert out.returncode == FORBIDDEN and b"forbidden" in out.stderr
    assert "erlang:halt/0 outcome=forbidden" in _log(server)  # the audit line


@pytest.mark.parametrize(
    ("command", "status", "message"),
    [
        ('os:cmd("id").', UNDEF, b"os:cmd/1 failed: sshrpc undef"),
        ("lists:'__class__'().", UNDEF, b"undef"),
        ("lists:'_private'([1]).", UNDEF, b"undef"),
        ("lists:reverse([1]). lists:reverse([2]).", BAD_COMMAND, b"bad command"),
        ("lists:reverse([1]). rm -rf /", BAD_COMMAND, b"bad command"),
        ("lists:reverse([1]);id", BAD_COMMAND, b"bad command"),
        ("id; echo PWNED", BAD_COMMAND, b"expected one call"),
        ('lists:reverse(os:cmd("id")).', BAD_COMMAND, b"bad arguments"),
        ("lists:reverse([1+1]).", BAD_COMMAND, b"bad arguments"),
        ("lists:reverse(X).", BAD_COMMAND, b"is a variable"),
        ("lists:reverse([1,2,3])", BAD_COMMAND, b"end the call with a '.'"),
        ("lists:reverse([1 | 2]).", RAISED, b"TypeError"),  # a literal, not a list
        ("", REFUSED, b"shell requests are refused"),  # ssh asks for a shell
    ],
)
def test_hostile_commands_are_refused(server, command, status, message):
    out = ssh(server, command)
    assert out.returncode == status, out.stderr
    assert message in out.stderr
    assert out.stdout == b"" and b"PWNED" not in out.stderr
    assert out.stderr.count(b"\n") == 1


def test_overlong_command(server):
    command = "lists:reverse([" + "1," * MAX_COMMAND + "1])."
    out = ssh(server, command)
    assert out.returncode == BAD_COMMAND
    assert out.stderr == f"sshrpc: bad command: command longer than {MAX_COMMAND} bytes\n".encode()
    # Just below the bound it runs.
    items = (MAX_COMMAND - 40) // 2
    out = ssh(server, "lists:reverse([" + "1," * items + "1]).")
    assert out.returncode == 0 and out.stdout.count(b"1") == items + 1


def test_non_utf8_command(server):
    out = ssh(server, b'echo:echo(<<"\xff\xfe">>).')
    assert out.returncode == BAD_COMMAND
    assert out.stderr == b"sshrpc: bad command: command is not UTF-8 (byte 13)\n"


def test_nesting_past_the_depth_limit(server):
    out = ssh(server, "echo:echo(" + "[" * 600 + "]" * 600 + ").")
    assert out.returncode == BAD_COMMAND and b"nesting deeper than" in out.stderr
    out = ssh(server, "echo:echo(" + "{" * 100 + "}" * 100 + ").")
    assert out.returncode == 0


def test_atoms_past_the_atom_limit(server):
    for command in (
        "echo:echo(" + "a" * 256 + ").",
        "echo:echo('" + "a" * 256 + "').",
        "a" * 256 + ":f().",
        "echo:" + "f" * 256 + "().",
    ):
        out = ssh(server, command)
        assert out.returncode == BAD_COMMAND, command
        assert b"atom longer than 255 characters" in out.stderr
    out = ssh(server, "echo:echo(" + "a" * 255 + ").")
    assert (out.returncode, out.stdout) == (0, b"a" * 255 + b"\n")


def test_shell_request_refused(server):
    out = ssh(server, None)
    assert out.returncode == REFUSED
    assert out.stderr.startswith(b"sshrpc relay: shell requests are refused;")
    assert out.stderr.count(b"\n") == 1


def test_python_relay_and_in_process_mode(tmp_path_factory, client_key):
    """The same door behind the Python relay and in in-process mode."""
    for extra in (("--python-relay",), ("--in-process",)):
        for info in _serve(tmp_path_factory, client_key, *extra):
            out = ssh(info, "lists:reverse([1,2,3]).")
            assert (out.returncode, out.stdout) == (0, b"[3,2,1]\n"), (extra, out.stderr)
            out = ssh(info, b"echo:echo(\xff).")
            assert out.returncode == BAD_COMMAND, extra
            out = ssh(info, None)
            assert out.returncode == REFUSED and b"shell requests are refused" in out.stderr


def test_sshd_config_forces_the_command_without_the_marker(tmp_path: Path, client_key):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sshrpc.cli",
            "sshd-config",
            "sshrpc.demo:services",
            "--socket",
            "/run/sshrpc/node.sock",
            "--key",
            str(client_key.public),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    subsystem = next(line for line in lines if line.startswith("Subsystem sshrpc@k2r.org "))
    assert subsystem.endswith(" /run/sshrpc/node.sock --subsystem")
    forced = next(line for line in lines if line.startswith("restrict,command="))
    assert '/run/sshrpc/node.sock"' in forced and "--subsystem" not in forced
