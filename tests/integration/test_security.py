"""The security model (docs/security.md), claim by claim, against real parts.

- The sshrpc key gets nothing but the sshrpc subsystem through the sshd that
  ``sshrpc serve`` generates: no shell, no exec, no pty, no port forwarding
  (TCP or Unix socket, also not to the node's own socket), no agent
  forwarding -- driven with OpenSSH's own ``ssh`` (``-t``, a command, ``-A``,
  ``-L``, ``-R``, ``-W``).
- A malicious server (a test subsystem written here) cannot make the client
  run anything or exhaust its memory: oversized lengths, deep terms,
  compression bombs, endless chunks, requests the client does not serve and a
  huge hello ``max_frame`` each end in a typed error with bounded memory.
- The audit log: one line per call (key fingerprint, kind, service,
  function, arity, outcome, duration) from ``sshrpc serve -vv``, and through a
  ``SysLogHandler`` the way an operator ships it to syslog.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import logging.handlers
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from _connect import connect as _connect
from _sshwire import SSHChannel

import sshrpc
from sshrpc import Atom, demo
from sshrpc._sshd import _descendants
from sshrpc.client import open_connection
from sshrpc.node import serve_node
from sshrpc.subsystem import relay_command

A = Atom
pytestmark = pytest.mark.timeout(60)


def _relays(serve_pid: int) -> list[int]:
    """The relay processes below ``sshrpc serve`` (last argument: node.sock)."""
    found = []
    for pid in _descendants(serve_pid):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            argv = [a for a in argv if a]
            if argv and argv[-1].endswith(b"node.sock") and not argv[0].startswith(b"sshd"):
                found.append(pid)
    return found


def _ssh(info: Any, *extra: str, command: str | None = None, env: Any = None) -> list[str]:
    """``ssh`` argv for ``info`` without ``-s``: an exec of ``command`` (or a
    shell when None)."""
    argv = info.ssh_argv("x", *extra)
    argv.remove("-s")
    argv.pop()
    if command is not None:
        argv.append(command)
    return argv


# -- what the sshrpc key can do through the generated sshd -------------------------


async def test_no_shell_no_exec_no_pty(sshrpc_server: Any, tmp_path: Path) -> None:
    """``ssh -tt`` (a pty, for a login shell or a command) is refused outright:
    ssh exits 255 and the command never runs.  A shell request without a pty
    (``ssh -T``) runs the forced relay, which refuses it (exit status 3, one
    line on stderr).  (Exec without a pty: test_exec_mode.py and
    test_serve_cli.py::test_key_gets_only_sshrpc_no_exec_or_shell.)"""
    marker = tmp_path / "PWNED"
    for command in (None, f"touch {marker}; echo PWNED"):
        out = subprocess.run(
            _ssh(sshrpc_server, "-tt", command=command),
            capture_output=True,
            timeout=20,
            stdin=subprocess.DEVNULL,
        )
        assert out.returncode == 255
        assert b"PTY allocation request failed" in out.stderr, out.stderr
        assert b"PWNED" not in out.stdout
    assert not marker.exists()
    out = subprocess.run(
        _ssh(sshrpc_server, "-T"), capture_output=True, timeout=20, stdin=subprocess.DEVNULL
    )
    assert out.returncode == 3 and out.stdout == b""
    assert out.stderr.startswith(b"sshrpc relay: shell requests are refused;"), out.stderr


def test_no_port_forwarding_of_any_kind(sshrpc_server: Any, tmp_path: Path) -> None:
    """``-R`` (remote listen), ``-W`` (direct-tcpip, what ``-L``/``-D`` use)
    and a Unix socket forward to the node's own socket are all refused.
    (``-L`` with ExitOnForwardFailure: test_node_sshd.py and test_serve_cli.py.)"""
    info = sshrpc_server
    out = subprocess.run(
        _ssh(info, "-o", "ExitOnForwardFailure=yes", "-N", "-R", "0:127.0.0.1:9"),
        capture_output=True,
        timeout=20,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode != 0
    assert b"forwarding failed" in out.stderr.lower(), out.stderr
    out = subprocess.run(
        _ssh(info, "-W", f"127.0.0.1:{info.port}"),
        capture_output=True,
        timeout=20,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 255
    assert b"SSH-2.0" not in out.stdout  # nothing reached sshd's port through the tunnel
    assert b"forwarding failed" in out.stderr.lower() or b"prohibited" in out.stderr.lower()
    # A Unix socket forward to the node's socket would bypass the relay (and
    # its key statement): sshd refuses the channel, the local end just closes.
    node_sock = info.state_dir / "node" / "node.sock"
    assert node_sock.exists()
    local = tmp_path / "fwd.sock"
    proc = subprocess.Popen(
        _ssh(info, "-N", "-L", f"{local}:{node_sock}"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        import time

        deadline = time.monotonic() + 10
        while not local.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline
            time.sleep(0.02)  # bounded polling for ssh's local listener
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(local))
            # a relay header with no key statement, then a client hello: had
            # it reached the node (same uid: sshd runs as us) it would answer
            hello = sshrpc.encode((A("hello"), 1, {A("max_frame"): 1 << 20}))
            s.sendall(b"SRLY" + (1).to_bytes(4, "big") + b"\0" + len(hello).to_bytes(4, "big"))
            s.sendall(hello)
            with contextlib.suppress(ConnectionResetError):  # reset: refused as well
                assert s.recv(100) == b""  # closed: the channel was refused
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()


async def test_no_agent_forwarding(sshrpc_server: Any, tmp_path: Path) -> None:
    """``ssh -A`` with a running agent: the relay sshd starts for the channel
    has ``SSH_USER_AUTH`` (ExposeAuthInfo) but no ``SSH_AUTH_SOCK``."""
    agent_sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(
        ["ssh-agent", "-D", "-a", str(agent_sock)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(10):
            while not agent_sock.exists():
                await trio.sleep(0.02)  # bounded polling for the agent's socket
        env = dict(os.environ, SSH_AUTH_SOCK=str(agent_sock))
        subprocess.run(
            ["ssh-add", str(sshrpc_server.identity)], env=env, check=True, capture_output=True
        )
        argv = sshrpc_server.ssh_argv("sshrpc@k2r.org", "-A", "-o", "ForwardAgent=yes")
        argv[argv.index("IdentityAgent=none")] = f"IdentityAgent={agent_sock}"
        process = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        ch = SSHChannel(process)
        try:
            hello = await ch.hello()
            assert hello[A("max_frame")] > 0
            assert sshrpc_server.pid is not None
            relays = _relays(sshrpc_server.pid)
            assert len(relays) == 1, relays
            environ = Path(f"/proc/{relays[0]}/environ").read_bytes().split(b"\0")
            names = {e.split(b"=", 1)[0] for e in environ if e}
            assert b"SSH_USER_AUTH" in names
            assert b"SSH_AUTH_SOCK" not in names
        finally:
            await ch.aclose()
    finally:
        agent.kill()
        agent.wait()


def test_state_files_are_private(sshrpc_server: Any) -> None:
    """What a local user must not read or enter: the state directory and the
    node's socket directory are 0700; the host key and the generated
    authorized_keys (with the forced command) are 0600."""
    state = sshrpc_server.state_dir
    modes = {
        path.name: stat.S_IMODE(path.stat().st_mode)
        for path in (
            state,
            state / "node",
            state / "ssh_host_ed25519_key",
            state / "authorized_keys",
        )
    }
    assert modes == {
        state.name: 0o700,
        "node": 0o700,
        "ssh_host_ed25519_key": 0o600,
        "authorized_keys": 0o600,
    }
    assert 'restrict,command="' in (state / "authorized_keys").read_text()


# -- a malicious server --------------------------------------------------------------

EVIL_SCRIPT = r"""
import os, struct, sys, zlib
sys.path[:0] = [{src!r}]
from sshrpc._accel import decode, encode
from sshrpc._types import Atom as A, Pid

mode = sys.argv[1]
out = sys.stdout.buffer
def raw(payload):
    out.write(struct.pack(">I", len(payload)) + payload)
    out.flush()
def send(term):
    raw(encode(term))
def read():
    head = sys.stdin.buffer.read(4)
    if len(head) < 4:
        sys.exit(0)
    return decode(sys.stdin.buffer.read(struct.unpack(">I", head)[0]))
read()
max_frame = 2**32 - 1 if mode == "hugehello" else 1 << 20
session = Pid.new("evil@host", 1)
send((A("hello"), 1, {{A("max_frame"): max_frame, A("session"): session, A("max_calls"): 10}}))
marker = {marker!r}
if mode == "requests":
    # requests a client never serves, some naming things that would leave a mark
    send((A("call"), 1, A("os"), A("system"), [("touch " + marker).encode()]))
    send((A("cast"), A("os"), A("system"), [("touch " + marker).encode()]))
    send((A("spawn"), 2, A("os"), A("system"), [("touch " + marker).encode()]))
    send((A("mfa"), A("os"), A("system"), [("touch " + marker).encode()]))
call = read()
cid = call[1]
if mode == "biglen":
    out.write(struct.pack(">I", 2**32 - 1) + b"\x83" * 20)
    out.flush()
elif mode == "deep":
    n = 150_000
    head = b"\x83h\x03d\x00\x05replya" + bytes([cid])
    raw(head + b"l\x00\x00\x00\x01" * n + b"j" * (n + 1))
elif mode == "bomb":
    # a compressed term that claims 4 GiB uncompressed and inflates to zeros
    body = zlib.compress(b"\x00" * (8 << 20), 9)
    raw(b"\x83P" + struct.pack(">I", 2**32 - 1) + body)
elif mode == "bignum":
    # a bignum claiming 2^32-1 digit bytes, in a 20-byte frame
    raw(b"\x83o" + struct.pack(">I", 2**32 - 1) + b"\x00" + b"\xff" * 10)
elif mode in ("chunks", "streamflood"):
    n = 0
    while True:
        send((A("chunk"), cid, (n, b"x" * 1000)))
        n += 1
elif mode == "hugehello":
    raw(encode((A("reply"), cid, b"y" * (2 << 20))))
elif mode == "requests":
    send((A("reply"), cid, A("ok")))
elif mode == "hugeid":
    # past Python's int-to-str digit limit: the client's error text must cope
    send((A("reply"), 2**64000, A("ok")))
elif mode == "hugeerror":
    send((A("error"), cid, (A("error"), (2**64000, [[[[2**64000]]]]), {{}})))
while True:
    read()
"""

EVIL_MODES = [
    "biglen", "deep", "bomb", "bignum", "chunks", "streamflood", "hugehello", "requests",
    "hugeid", "hugeerror",
]  # fmt: skip


@pytest.fixture
def evil_sshd(private_sshd: Any, tmp_path: Path) -> Any:
    src = os.path.dirname(os.path.dirname(sshrpc.__file__))
    marker = tmp_path / "RAN"
    script = tmp_path / "evil.py"
    script.write_text(EVIL_SCRIPT.format(src=src, marker=str(marker)))
    info = private_sshd({mode: f"{sys.executable} -I {script} {mode}" for mode in EVIL_MODES})
    info.marker = marker
    return info


def _rss_reset() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM


def _hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("biglen", sshrpc.ProtocolError),  # FrameTooLarge before reading the payload
        ("deep", sshrpc.ProtocolError),
        ("bomb", sshrpc.ProtocolError),
        ("bignum", sshrpc.ProtocolError),
        ("chunks", sshrpc.ProtocolError),  # chunks for a call that is no stream
        ("hugehello", sshrpc.ProtocolError),  # our max_frame holds, not theirs
        ("requests", sshrpc.ProtocolError),  # "a server does not send call": nothing ran
        ("hugeid", sshrpc.ProtocolError),  # was ValueError (int-to-str digit limit)
        ("hugeerror", sshrpc.RemoteError),  # was ValueError building the message
    ],
)
async def test_malicious_server_gets_a_typed_error_and_bounded_memory(
    evil_sshd: Any, mode: str, expected: Any
) -> None:
    _rss_reset()
    start_rss = _rss_kib()
    with trio.fail_after(20):
        async with _connect(evil_sshd, subsystem=mode, keepalive=None) as conn:
            if expected is None:
                assert await conn.call("m", "f", []) == A("ok")
            else:
                with pytest.raises(expected) as info:
                    await conn.call("m", "f", [])
                assert not isinstance(info.value, MemoryError | RecursionError)
                assert len(str(info.value)) < 2000
                if mode == "hugeerror":  # a valid answer: the value whole, bounded text
                    assert info.value.reason[0] == 2**64000
                    assert "<int of 64001 bits>" in str(info.value)
                else:
                    with pytest.raises(sshrpc.SSHRPCError):  # the connection is over
                        await conn.call("m", "f", [])
    growth = _hwm_kib() - start_rss
    print(f"\nmalicious {mode}: {type(info.value).__name__ if expected else 'ok'}, "
          f"peak RSS growth {growth} KiB")  # fmt: skip
    assert growth < 32 * 1024, f"peak RSS grew {growth} KiB"
    assert not evil_sshd.marker.exists()


async def test_malicious_stream_flood_beyond_credit(evil_sshd: Any) -> None:
    """A stream call granted 4 credits; the server sends chunks without end: a
    protocol error (credit exceeded) or, at the least, bounded buffering --
    never unbounded memory."""
    _rss_reset()
    start_rss = _rss_kib()
    with trio.fail_after(20):
        async with _connect(
            evil_sshd, subsystem="streamflood", keepalive=None, max_undelivered=64
        ) as conn:
            stream = conn.stream("m", "f", [], credit=4)
            with pytest.raises(sshrpc.ProtocolError):
                async for _ in stream:
                    await trio.sleep(0.01)  # a slow consumer
    growth = _hwm_kib() - start_rss
    assert growth < 32 * 1024, f"peak RSS grew {growth} KiB"


# -- the audit log ----------------------------------------------------------------------


AUDIT_LINE = re.compile(
    r"key=(SHA256:\S+) (call|cast|spawn|mfa) (\w+):(\w+)/(\d+) outcome=(\w+) duration_ms=([\d.]+)"
)


async def test_serve_writes_an_audit_line_per_call(tmp_path: Path, client_key: Any) -> None:
    """``sshrpc -vv serve --policy F``: one ``sshrpc.audit`` line per call that
    ran (INFO) and per denied call (WARNING), each with the key's
    fingerprint, kind, service:function/arity, outcome and duration."""
    from sshrpc._sshd import free_port

    keys = tmp_path / "authorized_keys"
    keys.write_text(client_key.public_line + "\n")
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[[rule]]\nkeys = ["{client_key.fingerprint}"]\nallow = ["echo", "slow"]\n')
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sshrpc.cli", "-vv", "serve", "sshrpc.demo:services",
             "--port", str(port), "--state-dir", str(tmp_path / "state"),
             "--authorized-keys", str(keys), "--policy", str(policy)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        with trio.fail_after(30):
            while "ready" not in log_path.read_text(errors="replace"):
                assert proc.poll() is None, log_path.read_text(errors="replace")
                await trio.sleep(0.02)  # bounded polling of the child's log
        text = log_path.read_text(errors="replace")
        known = next(x for x in text.splitlines() if x.startswith("known_hosts: "))
        (tmp_path / "known_hosts").write_text(known.removeprefix("known_hosts: ") + "\n")
        async with open_connection(
            "127.0.0.1",
            port,
            user=getpass.getuser(),
            identity=str(client_key.private),
            known_hosts=str(tmp_path / "known_hosts"),
            agent=False,
            use_ssh_config=False,
        ) as conn:
            assert await conn.call("echo", "echo", [b"x"]) == b"x"
            with pytest.raises(sshrpc.Forbidden):
                await conn.call("lists", "seq", [1, 2])
            with trio.move_on_after(0.2):
                await conn.call("slow", "work", [30])
            await conn.call("echo", "echo", [b"sync"])  # the cancel has been answered
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    log_text = log_path.read_text()
    got = {
        (m[2], m[3], m[4], m[5], m[6]): m[1]
        for m in (AUDIT_LINE.search(line) for line in log_text.splitlines())
        if m
    }
    assert got.get(("call", "echo", "echo", "1", "ok")) == client_key.fingerprint, log_text
    assert got.get(("call", "lists", "seq", "2", "forbidden")) == client_key.fingerprint
    # the deadline travels as the timeout option: whichever end stops it first
    stopped = [got.get(("call", "slow", "work", "1", o)) for o in ("cancelled", "timeout")]
    assert client_key.fingerprint in stopped, log_text


async def test_audit_lines_reach_syslog_via_sysloghandler(
    nursery: Any, private_sshd: Any, client_key: Any, tmp_path: Path
) -> None:
    """The operator's recipe in docs/security.md: route the ``sshrpc.audit``
    logger to a ``SysLogHandler``.  Here the "syslog" is a Unix datagram socket
    the test reads; the call goes through the real sshd and relay."""
    log_sock = tmp_path / "log.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(log_sock))
    receiver.setblocking(False)
    handler = logging.handlers.SysLogHandler(
        address=str(log_sock), facility=logging.handlers.SysLogHandler.LOG_AUTH
    )
    handler.setFormatter(logging.Formatter("sshrpc[%(process)d]: %(message)s"))
    audit = logging.getLogger("sshrpc.audit")
    old_level = audit.level
    audit.addHandler(handler)
    audit.setLevel(logging.DEBUG)
    try:
        keys = tmp_path / "authorized_keys"
        keys.write_text(client_key.public_line + "\n")
        path = str(tmp_path / "n" / "node.sock")
        await nursery.start(
            lambda task_status: serve_node(
                demo.services, socket_path=path, authorized_keys=keys, task_status=task_status
            )
        )
        info = private_sshd({"sshrpc@k2r.org": relay_command(path)})
        async with _connect(info) as conn:
            assert await conn.call("lists", "reverse", [[1, 2, 3]]) == [3, 2, 1]
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(receiver)
        datagram = receiver.recv(4096).decode()
    finally:
        audit.removeHandler(handler)
        audit.setLevel(old_level)
        handler.close()
        receiver.close()
    # <PRI>: facility auth (4) * 8 + severity info (6) = 38
    assert datagram.startswith("<38>sshrpc["), datagram
    m = AUDIT_LINE.search(datagram)
    assert m is not None, datagram
    assert m.groups()[:6] == (client_key.fingerprint, "call", "lists", "reverse", "1", "ok")
    assert float(m[7]) >= 0
