"""The Trio client against a real OpenSSH sshd serving ``sshrpc.demo``
(``sshrpc_server``), or test-only subsystems (``private_sshd``)."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from _connect import connect as _connect

import sshrpc
from sshrpc import Atom
from sshrpc._sshd import free_port
from sshrpc.client import Connection, open_connection

pytestmark = pytest.mark.timeout(60)


async def _poll(node: Connection, module: str, function: str, want: Any, within: float) -> Any:
    """Call until the answer is ``want`` (bounded by ``within`` seconds)."""
    got = None
    with trio.move_on_after(within):
        while True:
            got = await node.call(module, function, [])
            if got == want:
                return got
            await trio.sleep(0.01)  # bounded polling of remote state
    return got


async def test_call_cast_stream_spawn_ping(sshrpc_server: Any) -> None:
    async with _connect(sshrpc_server) as node:
        assert await node.call("lists", "reverse", [[1, 2, 3]]) == [3, 2, 1]
        assert node.hello["node"]
        await node.cast("log", "info", [b"hi"])
        assert await _poll(node, "log", "last", b"hi", 5) == b"hi"
        assert [x async for x in node.stream("feed", "tail", [100])] == list(range(100))
        pid = await node.spawn("worker", "loop", [])
        await node.send(pid, (Atom("job"), 1))
        assert await node.receive() == (Atom("echo"), (Atom("job"), 1))
        await node.send(pid, Atom("stop"))
        down = await node.receive()
        assert down[0] == "down" and down[1] == pid
        assert 0 < await node.ping() < 5
        stats = node.statistics()
        assert stats.open_calls == 0 and stats.queued_bytes == 0


# -- a test-only subsystem for behaviours the demo node cannot show -------------

SUBSYSTEM_SCRIPT = r"""
import os, struct, sys, time
sys.path[:0] = [{src!r}]
from sshrpc._accel import decode, encode
from sshrpc._types import Atom as A, Pid

mode = sys.argv[1]
open(sys.argv[2], "w").write(str(os.getpid()))
out = sys.stdout.buffer
def send(term):
    payload = encode(term)
    out.write(struct.pack(">I", len(payload)) + payload)
    out.flush()
def read():
    head = sys.stdin.buffer.read(4)
    if len(head) < 4:
        sys.exit(0)
    return decode(sys.stdin.buffer.read(struct.unpack(">I", head)[0]))
if mode == "junk":
    out.write(b"Welcome! Last login: yesterday\n")
    out.flush()
read()
session = Pid.new("test@host", 1)
send((A("hello"), 1, {{A("max_frame"): 1 << 20, A("session"): session, A("max_calls"): 1000}}))
if mode == "noread":
    time.sleep(3600)
if mode == "flood":
    n = 0
    while True:
        send((A("send"), session, (n, b"x" * 1000)))
        n += 1
while True:
    term = read()
    if term[0] == "call" and term[3] == "hang":
        continue
    if term[0] == "call":
        send((A("reply"), term[1], term[5] if len(term) > 5 else {{}}))
    elif term[0] == "ping":
        if mode == "chatty":
            sys.stderr.write("ping %r\\n" % (term[1],))
            sys.stderr.flush()
        send((A("pong"), term[1]))
    elif term[0] == "bye":
        send((A("bye"), A("normal")))
        sys.exit(0)
"""


def _start_test_sshd(
    private_sshd: Any, base: Path, authorized_keys: list[str] | None = None
) -> Any:
    src = os.path.dirname(os.path.dirname(sshrpc.__file__))
    script = base / "subsystem.py"
    script.write_text(SUBSYSTEM_SCRIPT.format(src=src))
    modes = ["opts", "junk", "noread", "flood", "chatty"]
    info = private_sshd(
        {mode: f"{sys.executable} -I {script} {mode} {base / mode}.pid" for mode in modes},
        authorized_keys=authorized_keys,
    )
    info.pid_file = lambda mode: base / f"{mode}.pid"
    return info


@pytest.fixture
def test_sshd(private_sshd: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A private sshd whose subsystems are the test script in each mode;
    ``info.pid_file(mode)`` names the file the script writes its pid to."""
    return _start_test_sshd(private_sshd, tmp_path_factory.mktemp("subsys"))


def _channel(info: Any, subsystem: str, **options: Any) -> Any:
    return _connect(info, subsystem=subsystem, **options)


def _pid(info: Any, mode: str) -> int:
    return int(info.pid_file(mode).read_text())


# -- deadlines and cancellation -----------------------------------------------


async def test_deadline_travels_as_timeout_opt(test_sshd: Any) -> None:
    async with _channel(test_sshd, "opts") as node:
        assert await node.call("m", "f", []) == {}
        with trio.fail_after(2):
            opts = await node.call("m", "f", [])
        assert 1500 < opts["timeout"] <= 2000
        with trio.move_on_after(30), trio.move_on_after(0.8):
            opts = await node.call("m", "f", [])
        assert 0 < opts["timeout"] <= 800


async def test_cancellation_reaches_the_server(sshrpc_server: Any) -> None:
    async with _connect(sshrpc_server) as node:
        with trio.move_on_after(0.3) as scope:
            await node.call("slow", "work", [30])
        assert scope.cancelled_caught
        assert await _poll(node, "slow", "status", "cancelled", 5) == "cancelled"
        assert await node.call("slow", "was_cancelled", []) is True
        assert node.statistics().open_calls == 0


async def test_leaving_a_stream_early_cancels_it(sshrpc_server: Any) -> None:
    async with _connect(sshrpc_server) as node:
        async with contextlib.aclosing(node.stream("feed", "tail", [10**9], credit=4)) as items:
            async for item in items:
                if item == 20:
                    break
        # The server answers the cancel; only then is the id free again.
        with trio.fail_after(5):
            while node.statistics().open_calls or node._pending:
                await trio.sleep(0.01)  # bounded polling for the final answer
        assert node.statistics().undelivered == 0
        assert await node.call("echo", "echo", [b"after"]) == b"after"


async def test_aclose_is_idempotent_and_completes_when_cancelled(sshrpc_server: Any) -> None:
    async with _connect(sshrpc_server) as node:
        assert await node.call("echo", "echo", [1]) == 1
        with trio.CancelScope() as scope:
            scope.cancel()
            await node.aclose()
        assert node.closed
        assert node._pump.closed  # channel, session and socket are gone
        await node.aclose()
        with pytest.raises(sshrpc.ConnectionLost):
            await node.call("echo", "echo", [1])


async def test_connect_node_in_a_nursery_closes_when_the_nursery_is_cancelled(
    sshrpc_server: Any,
) -> None:
    info = sshrpc_server
    async with trio.open_nursery() as nursery:
        node = await sshrpc.connect_node(
            nursery,
            info.host,
            info.port,
            identity=str(info.identity),
            known_hosts=str(info.known_hosts),
            agent=False,
        )
        assert await node.call("echo", "echo", [2]) == 2
        nursery.cancel_scope.cancel()
    assert node._pump.closed and node._pump.sock.fileno() == -1
    with pytest.raises(sshrpc.ConnectionLost):
        await node.call("echo", "echo", [2])


async def test_remote_errors_are_typed(sshrpc_server: Any) -> None:
    async with _connect(sshrpc_server) as node:
        with pytest.raises(sshrpc.Undef):
            await node.call("lists", "nope", [])
        with pytest.raises(sshrpc.Forbidden):
            await node.call("secret", "thing", [])
        with pytest.raises(sshrpc.RemoteError) as info:
            await node.call("errors", "raise", [Atom("throw"), Atom("oops")])
        assert (info.value.cls, info.value.reason) == ("throw", "oops")
        # The connection is still fine afterwards.
        assert await node.call("echo", "echo", [1]) == 1


# -- many callers -----------------------------------------------------------


async def test_1000_concurrent_calls_from_100_tasks_routed_right(sshrpc_server: Any) -> None:
    results: dict[tuple[int, int], Any] = {}
    async with _connect(sshrpc_server) as node:

        async def worker(w: int) -> None:
            for j in range(10):
                results[(w, j)] = await node.call("echo", "echo", [(w, j, b"x" * (w * j))])

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for w in range(100):
                    nursery.start_soon(worker, w)
        assert len(results) == 1000
        for (w, j), value in results.items():
            assert value == (w, j, b"x" * (w * j))
        assert node.statistics().open_calls == 0


async def test_large_payloads_from_many_tasks_arrive_intact(sshrpc_server: Any) -> None:
    # Writes beyond the SSH window come back as (EAGAIN, n>0) partial writes;
    # any slip in advancing by n would corrupt a frame.
    blobs = [os.urandom(300_000 + 4099 * i) for i in range(16)]
    async with _connect(sshrpc_server, write_limit=512 * 1024) as node:
        results: dict[int, bytes] = {}

        async def echo(i: int) -> None:
            results[i] = await node.call("echo", "echo", [blobs[i]])

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(len(blobs)):
                    nursery.start_soon(echo, i)
        assert all(results[i] == blobs[i] for i in range(len(blobs)))
        assert node.statistics().queued_bytes == 0


async def test_multicall_and_pool(sshrpc_server: Any, client_key: Any) -> None:
    opts = {
        "identity": str(sshrpc_server.identity),
        "known_hosts": str(sshrpc_server.known_hosts),
        "agent": False,
    }
    dest = f"{sshrpc_server.host}:{sshrpc_server.port}"
    dead = f"127.0.0.1:{free_port()}"
    async with _connect(sshrpc_server) as node:
        results = await sshrpc.multicall([node, dest, dead], "os", "getpid", [], **opts)
    assert results[0] == results[1] and isinstance(results[0], int)
    assert isinstance(results[2], sshrpc.ConnectionLost)
    async with sshrpc.Pool(**opts) as pool:
        first = await pool.get(dest)
        assert await pool.call(dest, "lists", "reverse", [[1, 2]]) == [2, 1]
        assert await pool.get(dest) is first


async def test_sequential_round_trips_never_stall(test_sshd: Any) -> None:
    # Regression: a reply pulled into libssh2's queue by the stderr read was
    # left there while the pump slept on the socket (until the next packet).
    # The server here writes to stderr on every ping.  No keepalive, which
    # would hide a stall by waking the pump.
    async with _channel(test_sshd, "chatty", keepalive=None) as node:
        for _ in range(1500):
            with trio.fail_after(2):
                await node.ping()


# -- failures -----------------------------------------------------------------


async def test_server_killed_mid_call_fails_promptly(test_sshd: Any) -> None:
    async with _channel(test_sshd, "opts") as node:
        failed = trio.Event()
        caught: list[BaseException] = []

        async def hang() -> None:
            try:
                await node.call("m", "hang", [])
            except sshrpc.ConnectionLost as exc:
                caught.append(exc)
            failed.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(hang)
            assert await node.ping() >= 0
            os.kill(_pid(test_sshd, "opts"), signal.SIGKILL)
            with trio.fail_after(3):
                await failed.wait()
        assert caught
        with pytest.raises(sshrpc.ConnectionLost):
            await node.call("m", "f", [])


async def test_dead_peer_detected_by_keepalive(test_sshd: Any) -> None:
    async with _channel(test_sshd, "opts", keepalive=0.5, keepalive_misses=3) as node:
        await node.ping()
        pid = _pid(test_sshd, "opts")
        os.kill(pid, signal.SIGSTOP)
        try:
            start = trio.current_time()
            with trio.fail_after(5), pytest.raises(sshrpc.ConnectionLost, match="keepalive"):
                await node.call("m", "hang", [])
            assert trio.current_time() - start < 3
        finally:
            # The stopped subsystem may already be gone (sshd reaps it once
            # the channel closes), so either signal may find no process.
            for sig in (signal.SIGKILL, signal.SIGCONT):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)


async def test_junk_before_hello_says_so(test_sshd: Any) -> None:
    with pytest.raises(sshrpc.ProtocolError, match="before the hello") as info:
        async with _channel(test_sshd, "junk"):
            pass
    assert "Welcome" in str(info.value)


async def test_unreachable_and_wrong_port() -> None:
    port = free_port()
    with trio.fail_after(10), pytest.raises(sshrpc.ConnectionLost, match=f"port {port}"):
        async with open_connection("127.0.0.1", port, use_ssh_config=False):
            pass

    async def not_ssh(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, host="127.0.0.1"), not_ssh, 0
        )
        wrong = listeners[0].socket.getsockname()[1]
        with trio.fail_after(10), pytest.raises(sshrpc.ConnectionLost, match="handshake"):
            async with open_connection("127.0.0.1", wrong, use_ssh_config=False):
                pass
        nursery.cancel_scope.cancel()


async def test_reconnect_loop_keeps_the_loop_non_blocking(
    sshrpc_server: Any, tmp_path: Path
) -> None:
    # Freeing a libssh2 session restores the fd's blocking mode; if the socket
    # were closed first, a new socket reusing that fd would turn blocking.
    # Failed connections (here: an unknown host key) are part of the loop,
    # since an error path keeps the session alive in its traceback.
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with trio.fail_after(30):
        for i in range(6):
            async with _connect(sshrpc_server, keepalive=None, use_ssh_config=False) as node:
                assert await node.call("echo", "echo", [i]) == i
            with pytest.raises(sshrpc.UnknownHostKey):
                async with open_connection(
                    sshrpc_server.host,
                    sshrpc_server.port,
                    identity=str(sshrpc_server.identity),
                    known_hosts=str(empty),
                    use_ssh_config=False,
                ):
                    pass
            probes = [trio.socket.socket() for _ in range(4)]
            try:
                assert not any(os.get_blocking(p.fileno()) for p in probes)
            finally:
                for probe in probes:
                    probe.close()


# -- backpressure -------------------------------------------------------------


async def test_client_flooding_a_server_that_does_not_read(test_sshd: Any) -> None:
    limit = 256 * 1024
    payload = b"x" * 100_000
    sent = 0
    async with _channel(test_sshd, "noread", write_limit=limit) as node:
        with trio.move_on_after(2):
            for _ in range(300):  # 30 MB if nothing pushed back
                await node.cast("m", "f", [payload])
                sent += 1
                assert node.statistics().queued_bytes <= limit + len(payload) + 64
        stats = node.statistics()
        assert sent < 300, "cast never waited: no backpressure"
        assert stats.queued_bytes >= limit - len(payload) - 64
        os.kill(_pid(test_sshd, "noread"), signal.SIGKILL)


async def test_server_flooding_a_client_that_does_not_read(test_sshd: Any) -> None:
    bound = 100
    async with _channel(test_sshd, "flood", max_undelivered=bound) as node:
        with trio.fail_after(10):
            while not node.statistics().reading_paused:
                await trio.sleep(0.01)  # bounded polling of the pump's state
        first = node.statistics()
        # One channel read (64 KiB) may overshoot by what it held.
        assert bound <= first.mailbox <= bound + 70
        await trio.sleep(0.3)  # and it stays there: nothing more is read
        assert node.statistics().mailbox == first.mailbox
        received = first.bytes_received
        for n in range(500):  # taking messages resumes reading, in order
            assert (await node.receive())[0] == n
        assert node.statistics().bytes_received > received
        os.kill(_pid(test_sshd, "flood"), signal.SIGKILL)


# -- SSH: host keys and authentication --------------------------------------------


def _keygen(path: Path, passphrase: str = "") -> tuple[Path, str]:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", "t", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return path, (path.parent / (path.name + ".pub")).read_text().strip()


async def test_unknown_host_key_is_refused_then_accepted_explicitly(
    test_sshd: Any, tmp_path: Path
) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    opts = {"identity": str(test_sshd.identity), "agent": False, "subsystem": "opts"}
    with pytest.raises(sshrpc.UnknownHostKey) as info:
        async with open_connection(test_sshd.host, test_sshd.port, known_hosts=str(known), **opts):
            pass
    assert info.value.fingerprint == test_sshd.host_fingerprint
    assert str(known) in str(info.value)
    assert known.read_text() == ""
    async with open_connection(
        test_sshd.host, test_sshd.port, known_hosts=str(known), accept_new_host_keys=True, **opts
    ) as node:
        assert await node.call("m", "f", []) == {}
    # Recorded as "[host]:port ssh-ed25519 KEY", hashed when the ssh config
    # says HashKnownHosts yes (Debian's /etc/ssh/ssh_config does).
    name, kind, _ = known.read_text().split()
    assert kind == "ssh-ed25519"
    assert name in (f"[{test_sshd.host}]:{test_sshd.port}",) or name.startswith("|1|")
    async with open_connection(
        test_sshd.host, test_sshd.port, known_hosts=str(known), **opts
    ) as node:
        assert await node.call("m", "f", []) == {}


async def test_changed_host_key_is_refused(test_sshd: Any, tmp_path: Path) -> None:
    _, other = _keygen(tmp_path / "other_host_key")
    known = tmp_path / "known_hosts"
    fields = other.split()
    known.write_text(f"[{test_sshd.host}]:{test_sshd.port} {fields[0]} {fields[1]}\n")
    opts = {"identity": str(test_sshd.identity), "agent": False, "subsystem": "opts"}
    with pytest.raises(sshrpc.HostKeyMismatch) as info:
        async with open_connection(test_sshd.host, test_sshd.port, known_hosts=str(known), **opts):
            pass
    assert info.value.fingerprint == test_sshd.host_fingerprint
    assert f"line 1 of {known}" in str(info.value)
    # Skipping the check takes an explicit argument.
    async with open_connection(
        test_sshd.host, test_sshd.port, known_hosts=str(known), verify_host_key=False, **opts
    ) as node:
        assert await node.call("m", "f", []) == {}


async def test_identity_files_and_their_three_errors(private_sshd: Any, tmp_path: Path) -> None:
    key, public = _keygen(tmp_path / "id_encrypted", passphrase="correct horse")
    refused, _ = _keygen(tmp_path / "id_refused")
    info = _start_test_sshd(private_sshd, tmp_path, authorized_keys=[public])

    def connect(identity: Path, **options: Any) -> Any:
        return open_connection(
            info.host,
            info.port,
            identity=str(identity),
            known_hosts=str(info.known_hosts),
            agent=False,
            subsystem="opts",
            **options,
        )

    async with connect(key, passphrase="correct horse") as node:
        assert await node.call("m", "f", []) == {}
    with pytest.raises(sshrpc.KeyPassphraseError, match="is encrypted"):
        async with connect(key):
            pass
    with pytest.raises(sshrpc.KeyPassphraseError, match="wrong passphrase"):
        async with connect(key, passphrase="wrong"):
            pass
    with pytest.raises(sshrpc.KeyFileNotFound, match="id_missing"):
        async with connect(tmp_path / "id_missing"):
            pass
    with pytest.raises(sshrpc.AuthenticationFailed) as failed:
        async with connect(refused, password="not-enabled"):
            pass
    assert not isinstance(failed.value, sshrpc.KeyPassphraseError | sshrpc.KeyFileNotFound)
    assert any("id_refused" in t and "refused" in t for t in failed.value.tried)
    assert any("password" in t for t in failed.value.tried)


async def test_agent_authentication(
    private_sshd: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, public = _keygen(tmp_path / "id_agent")
    info = _start_test_sshd(private_sshd, tmp_path, authorized_keys=[public])
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(
        ["ssh-agent", "-D", "-a", str(sock)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(10):
            while not sock.exists():
                await trio.sleep(0.01)  # bounded polling for the agent's socket
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(key)], env=env, check=True, capture_output=True)
        key.unlink()  # only the agent holds the key now
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        async with open_connection(
            info.host,
            info.port,
            identity=[],
            known_hosts=str(info.known_hosts),
            subsystem="opts",
        ) as node:
            assert await node.call("m", "f", []) == {}
        with pytest.raises(sshrpc.AuthenticationFailed, match="agent"):
            async with open_connection(
                info.host,
                info.port,
                identity=[],
                known_hosts=str(info.known_hosts),
                subsystem="opts",
                agent=False,
            ):
                pass
    finally:
        agent.kill()
        agent.wait()


# -- the command line --------------------------------------------------------------


async def test_cli_call(sshrpc_server: Any) -> None:
    info = sshrpc_server
    base = [
        sys.executable,
        "-m",
        "sshrpc.cli",
        "call",
        f"{info.user}@{info.host}:{info.port}",
        "-i",
        str(info.identity),
        "--known-hosts",
        str(info.known_hosts),
    ]
    env = {**os.environ, "SSH_AUTH_SOCK": ""}
    with trio.fail_after(30):
        ok = await trio.run_process(
            [*base, "lists", "reverse", '[1, {ok, <<"x">>}, #{a => 1.5}, "ab"]'],
            capture_stdout=True,
            capture_stderr=True,
            env=env,
            check=False,
        )
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.decode().strip() == '[[97,98],#{a => 1.5},{ok,<<"x">>},1]'
        failed = await trio.run_process(
            [*base, "errors", "raise", "exit", "{bad, 1}"],
            capture_stdout=True,
            capture_stderr=True,
            env=env,
            check=False,
        )
        assert failed.returncode == 1
        assert "exit {bad,1}" in failed.stderr.decode()
        bad = await trio.run_process(
            [*base, "lists", "reverse", "[1,"], capture_stderr=True, env=env, check=False
        )
        assert bad.returncode == 2
        assert "column" in bad.stderr.decode()


async def test_ssh_config_alias(test_sshd: Any, tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(
        "Host mynode\n"
        f"    HostName {test_sshd.host}\n"
        f"    Port {test_sshd.port}\n"
        f"    User {test_sshd.user}\n"
        f"    IdentityFile {test_sshd.identity}\n"
        f"    UserKnownHostsFile {test_sshd.known_hosts}\n"
    )
    async with open_connection(
        "mynode", ssh_config=str(config), agent=False, subsystem="opts"
    ) as node:
        assert node.destination == f"{test_sshd.user}@{test_sshd.host}:{test_sshd.port}"
        assert await node.call("m", "f", []) == {}
    # An error in the body comes out as itself, not in an ExceptionGroup.
    with pytest.raises(KeyError):
        async with open_connection("mynode", ssh_config=str(config), agent=False, subsystem="opts"):
            raise KeyError("body")
    # An explicit argument wins over the config: a port nothing listens on.
    with pytest.raises(sshrpc.ConnectionLost, match="cannot connect"):
        async with open_connection(
            "mynode", port=free_port(), ssh_config=str(config), agent=False, subsystem="opts"
        ):
            pass


# -- the request API (send_request / receive_response / RequestSet) -------------


@pytest.fixture
def wide_server(tmp_path_factory: pytest.TempPathFactory, client_key: Any) -> Any:
    """``sshrpc serve sshrpc.demo:services --max-calls 2048``."""
    from conftest import start_serve, stop_serve

    if not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("OpenSSH (sshd) is not installed on this machine")
    base = tmp_path_factory.mktemp("wide")
    keys = base / "authorized_keys"
    keys.write_text(client_key.public_line + "\n")
    info = start_serve(
        ["sshrpc.demo:services"],
        state_dir=base / "state",
        authorized_keys=keys,
        identity=client_key.private,
        extra_args=["--max-calls", "2048"],
    )
    try:
        yield info
    finally:
        stop_serve(info)


async def test_one_task_keeps_1024_requests_open(wide_server: Any) -> None:
    async with _connect(wide_server) as node:
        assert node.hello["max_calls"] == 2048
        reqs = sshrpc.RequestSet()
        with pytest.raises(trio.WouldBlock):
            reqs.check_response()
        for i in range(1024):
            await node.send_request("echo", "echo", [i], into=reqs, label=("n", i))
        assert len(reqs) == 1024
        got = {}
        with trio.fail_after(30):
            while reqs:
                label, value = await reqs.receive_response()
                got[label] = value
        assert got == {("n", i): i for i in range(1024)}
        with pytest.raises(ValueError, match="empty"):
            await reqs.receive_response()
        # All 1,024 open on the server at once: none answers for a second.
        for i in range(1024):
            await node.send_request("slow", "work", [1], into=reqs, label=i)
        assert node.statistics().open_calls == 1024
        assert node.statistics().waiting_for_slot == 0
        labels = set()
        with trio.fail_after(30):
            while reqs:
                label, value = await reqs.receive_response()
                assert value == "done"
                labels.add(label)
                with contextlib.suppress(trio.WouldBlock):
                    while True:  # the answers that are already here, no waiting
                        label, value = reqs.check_response()
                        labels.add(label)
        assert labels == set(range(1024))
        stats = node.statistics()
        assert (stats.open_calls, stats.undelivered) == (0, 0)
        # A plain request, outside a set.
        req = await node.send_request("lists", "reverse", [[1, 2]])
        assert await node.receive_response(req) == [2, 1]
        assert req.done
        with pytest.raises(ValueError, match="already received"):
            await node.receive_response(req)


async def test_send_request_nowait_in_a_cancelled_scope_sends_a_zero_timeout(
    sshrpc_server: Any,
) -> None:
    """Not a checkpoint, so no ``Cancelled``: the request leaves with the
    time that is left, none (it used to raise ``OverflowError``)."""
    async with _connect(sshrpc_server) as node:
        reqs = sshrpc.RequestSet()
        with trio.CancelScope() as scope:
            scope.cancel()
            node.send_request_nowait("slow", "work", [5], into=reqs, label="one")
        with trio.fail_after(10):
            with pytest.raises(sshrpc.RemoteTimeout) as info:
                await reqs.receive_response()
        assert info.value.label == "one"
        assert await node.call("echo", "echo", [b"after"]) == b"after"


async def test_batches_of_requests_and_of_responses(sshrpc_server: Any) -> None:
    async with _connect(sshrpc_server) as node:
        max_calls = node.hello["max_calls"]
        reqs = sshrpc.RequestSet()
        sent = node.send_requests_nowait(
            "echo",
            "echo",
            [[i] for i in range(10)],
            into=reqs,
            labels=[("n", i) for i in range(10)],
        )
        assert [r.label for r in sent] == [("n", i) for i in range(10)] and len(reqs) == 10
        got: dict[Any, Any] = {}
        with trio.fail_after(10):
            while reqs:
                batch = await reqs.receive_responses()
                assert batch
                got.update(batch)
        assert got == {("n", i): i for i in range(10)}
        with pytest.raises(ValueError, match="empty"):
            await reqs.receive_responses()
        # An error answer ends a batch; the next call raises it with its label.
        node.send_requests_nowait("echo", "echo", [[1]], into=reqs, labels=["a"])
        node.send_requests_nowait("nosuch", "fun", [[]], into=reqs, labels=["bad"])
        node.send_requests_nowait("echo", "echo", [(2,)], into=reqs, labels=["b"])
        with trio.fail_after(10):
            while reqs.answered < 3:
                await trio.sleep(0.01)  # bounded polling for the three answers
        assert await reqs.receive_responses() == [("a", 1)]
        with pytest.raises(sshrpc.RemoteError) as info:
            await reqs.receive_responses()
        assert info.value.label == "bad"
        assert await reqs.receive_responses(max=5) == [("b", 2)]
        # At most the free call slots: a prefix, then nothing at all.
        sent = node.send_requests_nowait("slow", "work", [[30]] * (max_calls + 5), into=reqs)
        assert len(sent) == max_calls == len(reqs) == node.statistics().open_calls
        assert node.send_requests_nowait("echo", "echo", [[1]]) == []
        # A cancelled wait takes nothing.
        with trio.move_on_after(0.05) as scope:
            await reqs.receive_responses()
        assert scope.cancelled_caught and len(reqs) == max_calls
        reqs.abandon()
        with trio.fail_after(10):
            while node._pending:
                await trio.sleep(0.01)  # bounded polling for the servers' answers
        assert node.statistics().open_calls == 0


async def test_a_batch_of_requests_is_sent_whole_or_not_at_all(sshrpc_server: Any) -> None:
    async with _connect(sshrpc_server) as node:
        reqs = sshrpc.RequestSet()
        with pytest.raises(TypeError):
            node.send_requests_nowait("echo", "echo", [[1], [object()], [3]], into=reqs)
        with pytest.raises(sshrpc.MessageTooLarge):
            node.send_requests_nowait("echo", "echo", [[1], [b"z" * (2 << 20)]], into=reqs)
        with pytest.raises(ValueError, match="labels"):
            node.send_requests_nowait("echo", "echo", [[1], [2]], into=reqs, labels=[1])
        assert len(reqs) == 0 and node.statistics().open_calls == 0
        assert node.statistics().queued_bytes == 0
        assert await node.call("echo", "echo", [b"after"]) == b"after"


async def test_a_batch_of_requests_carries_the_deadline_to_the_server(
    sshrpc_server: Any,
) -> None:
    async with _connect(sshrpc_server) as node:
        reqs = sshrpc.RequestSet()
        with trio.move_on_after(0.3):
            sent = node.send_requests_nowait("slow", "work", [[30], [30]], into=reqs)
        assert len(sent) == 2
        with trio.fail_after(10):  # the server gives up at 0.3 s, not at 30 s
            with pytest.raises(sshrpc.RemoteTimeout):
                await reqs.receive_responses()
            with pytest.raises(sshrpc.RemoteTimeout):
                await reqs.receive_responses()
        assert not reqs


async def test_requests_beyond_max_calls_wait_for_a_slot(sshrpc_server: Any) -> None:
    async with _connect(sshrpc_server) as node:
        max_calls = node.hello["max_calls"]
        reqs = sshrpc.RequestSet()
        for i in range(max_calls // 2):
            await node.send_request("slow", "work", [30], into=reqs, label=i)
        for i in range(max_calls // 2, max_calls):
            node.send_request_nowait("slow", "work", [30], into=reqs, label=i)
        with pytest.raises(trio.WouldBlock):
            node.send_request_nowait("echo", "echo", [1], into=reqs)
        assert len(reqs) == max_calls and node.statistics().open_calls == max_calls
        with trio.move_on_after(0.3) as scope:
            await node.send_request("echo", "echo", [1], into=reqs)
        assert scope.cancelled_caught  # waited for a slot; cancelled: nothing sent
        assert len(reqs) == max_calls and node.statistics().open_calls == max_calls
        assert node.statistics().waiting_for_slot == 0
        reqs.abandon()  # {cancel, Id} for each
        assert len(reqs) == 0
        with trio.fail_after(10):
            while node._pending:
                await trio.sleep(0.01)  # bounded polling for the servers' answers
        stats = node.statistics()
        assert (stats.open_calls, stats.undelivered) == (0, 0)
        assert await node.call("echo", "echo", [b"after"]) == b"after"


async def test_cancelled_receive_response_cancels_the_request(sshrpc_server: Any) -> None:
    async with _connect(sshrpc_server) as node:
        req = await node.send_request("slow", "work", [30])
        with trio.move_on_after(0.3) as scope:
            await node.receive_response(req)
        assert scope.cancelled_caught and not req.done
        assert await _poll(node, "slow", "status", "cancelled", 5) == "cancelled"
        with pytest.raises(ValueError, match="abandoned"):
            await node.receive_response(req)
        with trio.fail_after(5):
            while node._pending:
                await trio.sleep(0.01)  # bounded polling for the final answer
        assert node.statistics().undelivered == 0
        # An answer that arrived before the cancel is discarded.
        req = await node.send_request("echo", "echo", [1])
        with trio.fail_after(5):
            while not req.done:
                await trio.sleep(0.01)  # bounded polling for the answer
        with trio.CancelScope() as cancelled:
            cancelled.cancel()
            await node.receive_response(req)
        assert cancelled.cancelled_caught and req.abandoned
        assert node.statistics().undelivered == 0
        # A cancelled RequestSet wait takes nothing.
        reqs = sshrpc.RequestSet()
        await node.send_request("slow", "work", [0.5], into=reqs, label="w")
        with trio.move_on_after(0.05):
            await reqs.receive_response()
        assert len(reqs) == 1
        with trio.fail_after(10):
            assert await reqs.receive_response() == ("w", "done")


async def test_error_answers_carry_the_label(sshrpc_server: Any) -> None:
    async with _connect(sshrpc_server) as node:
        reqs = sshrpc.RequestSet()
        await node.send_request("errors", "raise", [Atom("error"), b"boom"], into=reqs, label="bad")
        await node.send_request("nosuch", "fun", [], into=reqs, label="undef")
        await node.send_request("echo", "echo", [2], into=reqs, label="good")
        seen: dict[Any, Any] = {}
        with trio.fail_after(10):
            while reqs:
                try:
                    label, value = await reqs.receive_response()
                    seen[label] = value
                except sshrpc.RemoteError as exc:
                    seen[exc.label] = type(exc)
        assert seen == {"good": 2, "bad": sshrpc.RemoteError, "undef": sshrpc.Forbidden}
        req = await node.send_request("errors", "raise", [Atom("throw"), 7])
        with pytest.raises(sshrpc.RemoteError) as info:
            await node.receive_response(req)
        assert (info.value.cls, info.value.reason, info.value.label) == ("throw", 7, None)


async def test_connection_lost_fails_every_open_request(test_sshd: Any) -> None:
    async with _channel(test_sshd, "opts") as node:
        with trio.fail_after(2):
            req = await node.send_request("m", "f", [])
        opts = await node.receive_response(req)
        assert 1500 < opts["timeout"] <= 2000  # the deadline at send time travels
        reqs = sshrpc.RequestSet()
        for i in range(10):
            await node.send_request("m", "hang", [], into=reqs, label=i)
        alone = await node.send_request("m", "hang", [])
        assert await node.ping() >= 0  # the server has read them all
        os.kill(_pid(test_sshd, "opts"), signal.SIGKILL)
        labels = set()
        with trio.fail_after(5):
            while reqs:
                with pytest.raises(sshrpc.ConnectionLost) as info:
                    await reqs.receive_response()
                labels.add(info.value.label)
            with pytest.raises(sshrpc.ConnectionLost):
                await node.receive_response(alone)
        assert labels == set(range(10))
        with pytest.raises(sshrpc.ConnectionLost):
            await node.send_request("m", "f", [])


async def test_dropped_requests_leak_no_undelivered_count(sshrpc_server: Any) -> None:
    import gc

    async with _connect(sshrpc_server) as node:
        reqs = sshrpc.RequestSet()
        for i in range(20):
            await node.send_request("echo", "echo", [i], into=reqs, label=i)
        alone = await node.send_request("echo", "echo", [b"x"])
        with trio.fail_after(10):
            while node._pending:
                await trio.sleep(0.01)  # bounded polling for the answers
        del reqs, alone  # dropped without receiving, e.g. on an error path
        gc.collect()
        stats = node.statistics()
        assert (stats.open_calls, stats.undelivered) == (0, 0)
