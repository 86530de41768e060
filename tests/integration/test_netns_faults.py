"""Faults across real network hosts: network namespaces joined by veth pairs.

Each node is ``sshrpc serve sshrpc.demo:services`` (sshd + node) run with
``ip netns exec`` inside its own namespace, listening on that namespace's
address; the client runs in the root namespace and reaches each node over its
own veth pair (``10.X.N.1`` here <-> ``10.X.N.2`` there).  Faults are made
with iproute2: ``ip link set ... down`` cuts a cable, ``tc qdisc ... tbf``
throttles a link, ``tc qdisc ... netem`` adds delay and loss where the kernel
has it.  Every wait is bounded.

Skips only when this machine cannot create namespaces (no iproute2, not
root, or a sandbox without CAP_NET_ADMIN), and the netem test when the kernel
has no ``sch_netem``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import sshrpc
from sshrpc import Atom
from sshrpc._pump import READ_SIZE
from sshrpc.client import Connection, open_connection

pytestmark = pytest.mark.timeout(90)

PORT = 2222
#: Client keepalive used across these tests: a dead link is noticed after
#: ``KEEPALIVE * KEEPALIVE_MISSES`` quiet seconds, checked every KEEPALIVE.
KEEPALIVE = 0.4
KEEPALIVE_MISSES = 2
DETECT_BOUND = KEEPALIVE * (KEEPALIVE_MISSES + 1) + 0.5


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *args] if ns is None else ["ip", "netns", "exec", ns, "ip", *args]
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=20)


def _tc(*args: str, ns: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = ["tc", *args] if ns is None else ["ip", "netns", "exec", ns, "tc", *args]
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=20)


@dataclasses.dataclass
class NetNode:
    """One namespace with its veth pair and an ``sshrpc serve`` inside."""

    ns: str
    outer: str  # veth end in the root namespace
    inner: str  # veth end inside ``ns``
    ip: str
    base: Path
    known_hosts: Path
    identity: Path
    proc: subprocess.Popen[bytes] | None = None

    def connect(self, **options: Any) -> Any:
        options.setdefault("keepalive", KEEPALIVE)
        options.setdefault("keepalive_misses", KEEPALIVE_MISSES)
        return open_connection(
            self.ip,
            PORT,
            user="root" if os.getuid() == 0 else None,
            identity=str(self.identity),
            known_hosts=str(self.known_hosts),
            agent=False,
            use_ssh_config=False,
            **options,
        )

    def cut(self) -> None:
        """Pull the cable: the node's end of the link goes down."""
        _ip("link", "set", self.inner, "down", ns=self.ns)

    def mend(self) -> None:
        _ip("link", "set", self.inner, "up", ns=self.ns)

    def descendants(self) -> list[tuple[int, str]]:
        """(pid, cmdline) of every process below ``sshrpc serve``."""
        from sshrpc._sshd import _descendants

        assert self.proc is not None
        found = []
        for pid in _descendants(self.proc.pid):
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                found.append((pid, cmd.decode(errors="replace")))
        return found

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def start(self, client_key_public: str) -> None:
        """Start ``sshrpc serve`` in the namespace; wait (bounded) for ready."""
        keys = self.base / "authorized_keys"
        keys.write_text(client_key_public + "\n")
        log_path = self.base / "serve.log"
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.ns,
                    sys.executable,
                    "-m",
                    "sshrpc.cli",
                    "serve",
                    "sshrpc.demo:services",
                    "--host",
                    self.ip,
                    "--port",
                    str(PORT),
                    "--state-dir",
                    str(self.base / "state"),
                    "--authorized-keys",
                    str(keys),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while True:
            text = log_path.read_text(errors="replace")
            lines = text.splitlines()
            if any(line.startswith("ready") for line in lines):
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshrpc serve in {self.ns} exited:\n{text}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshrpc serve in {self.ns} not ready:\n{text}")
            time.sleep(0.02)  # bounded polling of a child's log, with a deadline
        known = next(x for x in lines if x.startswith("known_hosts: "))
        self.known_hosts.write_text(known.removeprefix("known_hosts: ") + "\n")

    def stop(self) -> None:
        """SIGTERM serve (it stops its sshd), then SIGKILL whatever is left below it."""
        if self.proc is None:
            return
        leftovers = [pid for pid, _ in self.descendants()] if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc = None


def _namespaces_permitted() -> str | None:
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"sshrpc-probe-{os.getpid()}"
    out = _ip("netns", "add", probe, check=False)
    if out.returncode != 0:
        return f"cannot create a network namespace here: {out.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@pytest.fixture
def netlab(tmp_path: Path, client_key: Any) -> Iterator[Any]:
    """Factory ``netlab(n)``: ``n`` started ``NetNode``s, each in its own
    namespace.  Namespaces, veths and processes are removed at teardown."""
    reason = _namespaces_permitted()
    if reason is not None:
        pytest.skip(reason)
    made: list[NetNode] = []
    tag = os.getpid() % 10000
    subnet = 100 + os.getpid() % 100

    def make(count: int) -> list[NetNode]:
        nodes = []
        for _ in range(count):
            i = len(made) + 1
            node = NetNode(
                ns=f"sshrpc-h9-{tag}-{i}",
                outer=f"h9o{tag}x{i}",
                inner=f"h9i{tag}x{i}",
                ip=f"10.{subnet}.{i}.2",
                base=tmp_path / f"node{i}",
                known_hosts=tmp_path / f"node{i}" / "known_hosts",
                identity=client_key.private,
            )
            node.base.mkdir()
            made.append(node)
            _ip("netns", "add", node.ns)
            _ip("link", "add", node.outer, "type", "veth", "peer", "name", node.inner)
            _ip("link", "set", node.inner, "netns", node.ns)
            _ip("addr", "add", f"10.{subnet}.{i}.1/24", "dev", node.outer)
            _ip("link", "set", node.outer, "up")
            _ip("addr", "add", f"{node.ip}/24", "dev", node.inner, ns=node.ns)
            _ip("link", "set", node.inner, "up", ns=node.ns)
            _ip("link", "set", "lo", "up", ns=node.ns)
            node.start(client_key.public_line)
            nodes.append(node)
        return nodes

    try:
        yield make
    finally:
        for node in made:
            node.stop()
            _ip("link", "del", node.outer, check=False)
            _ip("netns", "del", node.ns, check=False)


async def _poll(node: Connection, module: str, function: str, want: Any, within: float) -> Any:
    got = None
    with trio.move_on_after(within):
        while True:
            got = await node.call(module, function, [])
            if got == want:
                return got
            await trio.sleep(0.02)  # bounded polling of remote state
    return got


# -- link cut -----------------------------------------------------------------


async def test_link_cut_mid_call_fails_every_call_within_the_keepalive_bound(netlab: Any) -> None:
    """Cable pulled under five open calls: all five end in ConnectionLost within
    the keepalive bound; the other node keeps answering throughout; multicall
    reports the dead node and returns the live one's result; once the cable is
    back a new connection works."""
    a, b = netlab(2)
    async with a.connect() as na, b.connect() as nb:
        assert await na.call("os", "getpid", []) != await nb.call("os", "getpid", [])
        outcomes: list[tuple[str, float]] = []
        t_cut = 0.0
        all_failed = trio.Event()

        async def doomed() -> None:
            try:
                await na.call("slow", "work", [60])
                outcomes.append(("answered", 0.0))
            except sshrpc.ConnectionLost:
                outcomes.append(("lost", trio.current_time() - t_cut))
            if len(outcomes) == 5:
                all_failed.set()

        b_answers = 0

        async def other_node_busy() -> None:
            nonlocal b_answers
            while not all_failed.is_set():
                assert await nb.call("echo", "echo", [b_answers]) == b_answers
                b_answers += 1

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(doomed)
            await _poll(na, "slow", "status", "started", 5)
            assert na.statistics().open_calls >= 5
            nursery.start_soon(other_node_busy)
            t_cut = trio.current_time()
            a.cut()
            with trio.fail_after(DETECT_BOUND + 2):
                multi = await sshrpc.multicall([na, nb], "echo", "echo", [b"m"])
            with trio.fail_after(DETECT_BOUND + 2):
                await all_failed.wait()
        print(f"\nlink cut: 5 calls lost after {sorted(round(t, 2) for _, t in outcomes)} s")
        assert [kind for kind, _ in outcomes] == ["lost"] * 5
        assert max(t for _, t in outcomes) < DETECT_BOUND, outcomes
        assert isinstance(multi[0], sshrpc.ConnectionLost) and multi[1] == b"m"
        assert b_answers > 0
        with pytest.raises(sshrpc.ConnectionLost):
            await na.call("echo", "echo", [1])
        assert await nb.call("echo", "echo", [2]) == 2
    a.mend()
    # The link needs a moment to come back (carrier, neighbour entry):
    # retry "no route to host" for a bounded time.
    with trio.fail_after(10):
        while True:
            try:
                async with a.connect() as na:
                    assert await na.call("lists", "reverse", [[1, 2]]) == [2, 1]
                    break
            except sshrpc.ConnectionLost as exc:
                assert "route" in str(exc) or "unreachable" in str(exc), exc
                await trio.sleep(0.1)  # bounded retry while the link comes up


# -- a slow (throttled) link, and netem where the kernel has it ---------------------


async def _deadlines_and_cancel_hold(node: NetNode) -> None:
    """Bulk traffic fills the throttled link while a call with a 0.3 s deadline
    runs: the caller gets Cancelled on time and the server stops the work."""
    payload = b"x" * 65536
    async with node.connect() as conn:
        async with trio.open_nursery() as nursery:

            async def bulk() -> None:
                for _ in range(4):
                    assert await conn.call("echo", "echo", [payload]) == payload

            for _ in range(4):
                nursery.start_soon(bulk)
            start = trio.current_time()
            with trio.move_on_after(0.3) as scope:
                await conn.call("slow", "work", [30])
            elapsed = trio.current_time() - start
            assert scope.cancelled_caught
            assert elapsed < 0.6, elapsed
        assert await _poll(conn, "slow", "status", "cancelled", 10) == "cancelled"
        stats = conn.statistics()
        assert stats.open_calls == 0


async def test_throttled_link_calls_complete_deadlines_hold_cancel_reaches_server(
    netlab: Any,
) -> None:
    """A link throttled to 4 Mbit/s both ways (``tc ... tbf``: queueing delay
    under load): 1 MiB of calls complete intact, a deadline still holds and the
    cancel still reaches the server."""
    (a,) = netlab(1)
    for argv, ns in ((("dev", a.outer), None), (("dev", a.inner), a.ns)):
        out = _tc("qdisc", "add", *argv, "root", "tbf", "rate", "4mbit", "burst", "16kb",
                  "latency", "2s", ns=ns)  # fmt: skip
        if out.returncode != 0:
            pytest.skip(f"tc tbf is not available: {out.stderr.strip()}")
    await _deadlines_and_cancel_hold(a)


@pytest.fixture
def netem() -> None:
    """Skip unless this kernel has ``sch_netem`` (probed on ``lo`` of a
    throw-away namespace)."""
    reason = _namespaces_permitted()
    if reason is not None:
        pytest.skip(reason)
    probe = f"sshrpc-netem-{os.getpid()}"
    _ip("netns", "add", probe)
    try:
        out = _tc("qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms", ns=probe)
    finally:
        _ip("netns", "del", probe, check=False)
    if out.returncode != 0:
        pytest.skip(f"this kernel has no sch_netem (tc netem: {out.stderr.strip()})")


async def test_netem_delay_and_loss(netem: None, netlab: Any) -> None:
    """With 40 ms delay and 2 % loss each way (``tc ... netem``): calls complete,
    deadlines hold, cancellation reaches the server."""
    (a,) = netlab(1)
    for dev, ns in ((a.outer, None), (a.inner, a.ns)):
        out = _tc("qdisc", "add", "dev", dev, "root", "netem", "delay", "40ms", "loss", "2%", ns=ns)
        if out.returncode != 0:
            pytest.skip(f"this kernel has no sch_netem (tc netem: {out.stderr.strip()})")
    async with a.connect() as conn:
        for i in range(20):
            assert await conn.call("echo", "echo", [i]) == i
    await _deadlines_and_cancel_hold(a)


# -- processes killed ---------------------------------------------------------------


async def _hang_and_expect_lost(conn: Connection, kill: Any, bound: float = 2.0) -> float:
    """Open a long call, run ``kill()``, return how long ConnectionLost took."""
    failed = trio.Event()
    took: list[float] = []

    async def hang() -> None:
        with pytest.raises(sshrpc.ConnectionLost):
            await conn.call("slow", "work", [60])
        failed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hang)
        await _poll(conn, "slow", "status", "started", 5)
        start = trio.current_time()
        kill()
        with trio.fail_after(bound):
            await failed.wait()
        took.append(trio.current_time() - start)
    print(f"\n{getattr(kill, '__name__', kill)}: ConnectionLost after {took[0]:.3f} s")
    return took[0]


async def test_relay_killed_node_killed_sshd_restarted(netlab: Any) -> None:
    """Across the veth: the channel's relay killed, the whole ``sshrpc serve``
    (node + sshd) restarted, and the node process SIGKILLed each surface as
    ConnectionLost at once (< 2 s, far inside the keepalive bound would be
    too: the keepalive is off here), and a new connection works afterwards."""
    (a,) = netlab(1)
    # 1. the relay of this one channel killed
    async with a.connect(keepalive=None) as conn:

        def kill_relay() -> None:
            # the relay (Python or native) is the process whose last argument
            # is the node's socket; sshd's own processes are named "sshd: ..."
            relays = [
                pid
                for pid, cmd in a.descendants()
                if cmd.split()[-1].endswith("node.sock") and not cmd.startswith("sshd")
            ]
            assert len(relays) == 1, a.descendants()
            os.kill(relays[0], signal.SIGKILL)

        await _hang_and_expect_lost(conn, kill_relay)
    async with a.connect(keepalive=None) as conn:
        assert await conn.call("echo", "echo", [1]) == 1

        # 2. sshd restarted: serve stopped (SIGTERM) and started again, same state dir
        def restart() -> None:
            a.stop()

        await _hang_and_expect_lost(conn, restart, bound=5.0)
    with pytest.raises(sshrpc.ConnectionLost):
        async with a.connect(keepalive=None) as conn:
            pass
    a.start(Path(str(a.identity) + ".pub").read_text().strip())
    async with a.connect(keepalive=None) as conn:
        assert await conn.call("echo", "echo", [2]) == 2

        # 3. the node process (serve, which holds the node) SIGKILLed
        orphans: list[int] = []

        def kill_node() -> None:
            orphans.extend(pid for pid, _ in a.descendants())
            assert a.proc is not None
            a.proc.kill()

        await _hang_and_expect_lost(conn, kill_node)
    # sshd outlives a SIGKILLed serve (it is a separate process); a new channel
    # then finds no node behind it: a typed error at once, not a hang.
    with trio.fail_after(10), pytest.raises(sshrpc.SSHRPCError):
        async with a.connect(keepalive=None) as conn:
            await conn.call("echo", "echo", [3])
    for pid in orphans:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert a.proc is not None
    a.proc.wait(timeout=10)
    _wait_port_free(a)
    a.start(Path(str(a.identity) + ".pub").read_text().strip())
    async with a.connect(keepalive=None) as conn:
        assert await conn.call("echo", "echo", [4]) == 4


def _wait_port_free(node: NetNode) -> None:
    deadline = time.monotonic() + 10
    while True:
        out = subprocess.run(
            ["ip", "netns", "exec", node.ns, "ss", "-Htln", f"sport = :{PORT}"],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
        if not out.stdout.strip():
            return
        assert time.monotonic() < deadline, out.stdout
        time.sleep(0.05)  # bounded polling for the orphan sshd's exit


# -- slow readers -------------------------------------------------------------------


async def test_slow_readers_keep_memory_bounded(netlab: Any) -> None:
    """Over a throttled veth.  A client that does not read a 100,000-chunk
    stream (credit for all of it): the pump stops reading, the SSH window
    closes, the node stops producing; the node's RSS stays within 32 MiB of its baseline and the
    client holds at most ``max_undelivered`` untaken chunks.  A node that does
    not read (SIGSTOPped): 64 tasks sending 64 KiB calls wait in ``call`` with
    the queued bytes at most ``write_limit``; after SIGCONT every call is
    answered intact."""
    (a,) = netlab(1)
    out = _tc("qdisc", "add", "dev", a.outer, "root", "tbf", "rate", "20mbit", "burst", "32kb",
              "latency", "2s")  # fmt: skip
    if out.returncode != 0:
        pytest.skip(f"tc tbf is not available: {out.stderr.strip()}")
    async with a.connect(keepalive=None, max_undelivered=64) as conn:
        assert await conn.call("echo", "echo", [0]) == 0
        baseline = a.rss_kib()
        stream = conn.stream("feed", "tail", [100_000], credit=100_000)
        it = stream.__aiter__()
        assert await it.__anext__() == 0
        peak = baseline
        held = []
        for _ in range(40):  # the reader sleeps instead of reading: 2 s
            await trio.sleep(0.05)
            peak = max(peak, a.rss_kib())
            held.append(conn.statistics().undelivered)
        # The pump stops reading once 64 are untaken; the frames of the read
        # already in hand are still delivered: at most one READ_SIZE of them.
        assert max(held) <= 64 + READ_SIZE // 16, held
        assert held[-1] == held[len(held) // 2], held  # stopped growing
        print(f"\nslow client: node RSS {baseline} -> peak {peak} KiB, untaken {max(held)}")
        assert peak - baseline < 32 * 1024, (baseline, peak)
        # then it reads a few and leaves early: the server cancels the stream
        for i in range(1, 100):
            assert await it.__anext__() == i
        await stream.aclose()  # type: ignore[attr-defined]
        assert await conn.call("echo", "echo", [1]) == 1

    payload = b"y" * 65536
    async with a.connect(keepalive=None, write_limit=256 * 1024) as conn:
        assert await conn.call("echo", "echo", [1]) == 1
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGSTOP)
        answered = 0
        try:
            async with trio.open_nursery() as nursery:

                async def one(i: int) -> None:
                    nonlocal answered
                    assert await conn.call("echo", "echo", [(i, payload)]) == (i, payload)
                    answered += 1

                for i in range(64):
                    nursery.start_soon(one, i)
                peak_queued = 0
                for _ in range(20):
                    await trio.sleep(0.05)  # sampling while the node is stopped
                    peak_queued = max(peak_queued, conn.statistics().queued_bytes)
                assert answered == 0
                print(f"\nstopped node: client queued bytes peak {peak_queued}")
                assert peak_queued <= 256 * 1024 + 70_000, peak_queued
                os.kill(a.proc.pid, signal.SIGCONT)
                with trio.fail_after(30):
                    while answered < 64:
                        await trio.sleep(0.05)  # bounded wait for the answers
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        assert answered == 64


# -- the deadline as it travels (loopback, a test subsystem, a frozen clock) --------


@pytest.fixture
def opts_sshd(private_sshd: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """test_client.py's test subsystem; mode ``opts`` answers a call with the
    options map it received."""
    from test_client import _start_test_sshd

    return _start_test_sshd(private_sshd, tmp_path_factory.mktemp("subsys"))


async def test_deadline_travels_rounded_up(opts_sshd: Any, mock_clock: Any) -> None:
    """With the clock frozen the remaining time is exact: 5.9 ms left must
    travel as at least 6 ms, never as 5."""
    async with open_connection(
        opts_sshd.host,
        opts_sshd.port,
        user=opts_sshd.user,
        identity=str(opts_sshd.identity),
        known_hosts=str(opts_sshd.known_hosts),
        agent=False,
        use_ssh_config=False,
        subsystem="opts",
        keepalive=None,
    ) as conn:
        with trio.move_on_after(0.0059):
            opts = await conn.call("m", "f", [])
        assert opts[Atom("timeout")] >= 5.9
