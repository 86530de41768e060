"""Issue 11, findings 4, 5, 8 and 9 (logging, error text), against a real
``sshrpc serve`` with a three-key policy behind its own sshd.

- ``send`` is under the policy: a key with no rights reaches no process of
  another session (neither its spawned processes, by pid or name, nor its
  mailbox); a key whose rule lists a registered name reaches that name; one
  audit line per client send, allowed and denied.  Pids are random.
- Audit lines cannot be forged (a function atom holding a newline), 20,000
  forbidden casts write a bounded log, allowed calls are logged at INFO by
  default and a call cut off by a disconnect gets its line too.
- ``{cancel, 2^64000}`` is answered with ``{bye, {protocol_error, ...}}``, with
  no traceback in the log; exception messages do not reach clients.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from _sshwire import EOF, SSHChannel, bare

import sshrpc
from conftest import ClientKey, SSHDInfo, make_key, start_serve, stop_serve
from sshrpc import Atom, Pid

A = Atom
pytestmark = pytest.mark.timeout(90)
#: The audit rate limit's window (seconds) of the served node.
WINDOW = 2

POLICY = """
[[rule]]
keys = ["owner@test"]
allow = ["worker", "slow", "errors", "echo"]

[[rule]]
keys = ["sender@test"]
allow = ["echo"]
send = ["jobs"]

[[rule]]
keys = ["nobody@test"]
allow = []
"""


class Served:
    def __init__(self, info: SSHDInfo, keys: dict[str, ClientKey], log: Path) -> None:
        self.info = info
        self.keys = keys
        self.log = log

    def argv(self, who: str) -> list[str]:
        argv = self.info.ssh_argv()
        argv[argv.index(str(self.info.identity))] = str(self.keys[who].private)
        return argv

    async def open(self, who: str) -> tuple[SSHChannel, Pid]:
        ch = await SSHChannel.open(self.argv(who))
        # ssh's handshake on a loaded 2-core machine: a generous bound
        await ch.send((A("hello"), 1, {A("max_frame"): 1 << 20, A("client"): b"test/1"}))
        hello = await ch.recv(timeout=30)
        assert hello[0] == "hello", hello
        return ch, hello[2][A("session")]

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_for(self, pattern: str, timeout: float = 15.0) -> str:
        """Bounded polling of the serve log for a regex; the log text."""
        with trio.fail_after(timeout):
            while True:
                text = self.text()
                if re.search(pattern, text):
                    return text
                await trio.sleep(0.05)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("sendpolicy")
    keys = {
        who: make_key(base / who, comment=f"{who}@test") for who in ("owner", "sender", "nobody")
    }
    keys_file = base / "authorized_keys"
    keys_file.write_text("".join(k.public_line + "\n" for k in keys.values()))
    policy = base / "policy.toml"
    policy.write_text(POLICY)
    state = base / "state"
    info = start_serve(
        ["sshrpc.demo:services"],
        state_dir=state,
        authorized_keys=keys_file,
        identity=keys["owner"].private,
        extra_args=["--policy", str(policy), "--audit-window", str(WINDOW)],
    )
    try:
        yield Served(info, keys, state.parent / f"serve-{info.port}.log")
    finally:
        stop_serve(info)


async def _sync(ch: SSHChannel, token: int) -> None:
    """The node handled everything sent before (frames of a channel are
    handled in order)."""
    await ch.send((A("ping"), token))
    assert await ch.recv() == (A("pong"), token)


async def test_send_is_under_the_policy(served: Served) -> None:
    owner, owner_session = await served.open("owner")
    sender, _ = await served.open("sender")
    nobody, nobody_session = await served.open("nobody")
    try:
        await owner.send((A("spawn"), 1, A("worker"), A("named"), [b"jobs"]))
        tag, _, worker = await owner.recv()
        assert tag == "reply" and isinstance(worker, Pid)
        await owner.send((A("send"), worker, b"m0"))  # its own process: allowed
        assert await owner.recv() == (A("send"), owner_session, (A("echo"), b"m0"))
        # the key with no rights: not by pid, not by name, not the owner's mailbox
        await nobody.send((A("send"), worker, b"by pid"))
        await nobody.send((A("send"), A("jobs"), b"by name"))
        await nobody.send((A("send"), owner_session, b"to the mailbox"))
        await nobody.send((A("send"), nobody_session, b"to itself"))
        assert await nobody.recv() == (A("send"), nobody_session, b"to itself")
        await _sync(nobody, 1)
        # the key whose rule lists the name: by name only
        await sender.send((A("send"), A("jobs"), b"by name"))
        await sender.send((A("send"), worker, b"by pid"))
        await _sync(sender, 2)
        await owner.send((A("send"), worker, b"m1"))
        assert await owner.recv() == (A("send"), owner_session, (A("echo"), b"by name"))
        assert await owner.recv() == (A("send"), owner_session, (A("echo"), b"m1"))
        # server code's sshrpc.send (the worker's echo) worked throughout
        await owner.send((A("send"), worker, A("stop")))
        assert (await owner.recv())[0] == "down"
    finally:
        for ch in (owner, sender, nobody):
            await ch.aclose()
    fp = {who: k.fingerprint for who, k in served.keys.items()}
    text = await served.wait_for(rf"key={re.escape(fp['sender'])} send .*outcome=forbidden")
    sends = [line for line in text.splitlines() if " send " in line and "sshrpc.audit" in line]
    nobody_lines = [line for line in sends if f"key={fp['nobody']} " in line]
    assert sum("outcome=forbidden" in line for line in nobody_lines) == 3, nobody_lines
    assert sum("outcome=ok" in line for line in nobody_lines) == 1
    assert any(f"key={fp['sender']} send Atom('jobs') outcome=ok" in line for line in sends)
    assert sum(f"key={fp['owner']} " in line and "outcome=ok" in line for line in sends) == 3


async def test_pids_are_random(served: Served) -> None:
    pids = []
    for _ in range(3):
        ch, session = await served.open("nobody")
        await ch.aclose()
        pids.append(session)
    ids = sorted(p.id for p in pids)
    # sequential pids (the old counter) were consecutive; random ones are not
    assert ids != list(range(ids[0], ids[0] + 3))
    assert len({p.raw for p in pids}) == 3


async def test_audit_lines_cannot_be_forged(served: Served) -> None:
    owner_fp = served.keys["owner"].fingerprint
    forged = f"x\nkey={owner_fp} call worker:loop/0 outcome=ok"
    ch, _ = await served.open("nobody")
    try:
        reply = await ch.call(1, "worker", forged, [])
        assert bare(reply) == (A("error"), 1, (A("sshrpc"), A("forbidden"), {}))
    finally:
        await ch.aclose()
    text = await served.wait_for(re.escape("x\\x0akey="))
    assert not any(line.startswith("key=") for line in text.splitlines())
    assert f"worker:x\\x0akey={owner_fp} call worker:loop/0 outcome=ok/0 outcome=forbidden" in text


async def test_forbidden_cast_flood_writes_a_bounded_log(served: Served) -> None:
    """20,000 forbidden casts (the 1-million-cast finding, scaled down): the
    lines of that key stay a few, with the counts."""
    fp = served.keys["nobody"].fingerprint
    before = len(served.text().encode())
    ch, _ = await served.open("nobody")
    try:
        frames = bytearray()
        for n in range(20_000):
            payload = sshrpc.encode((A("cast"), A("echo"), A(f"flood{n % 1000}"), [n]))
            frames += struct.pack(">I", len(payload)) + payload
        await ch.send_raw(bytes(frames))
        await _sync(ch, 3)
    finally:
        await ch.aclose()
    # The counts are written as the windows pass (the node checks once a
    # window): wait until every cast is accounted for.
    with trio.fail_after(6 * WINDOW + 10):
        while True:
            text = served.text()
            flood = [line for line in text.splitlines() if "flood" in line]
            more = re.findall(rf"key={re.escape(fp)}: (\d+) more denials not logged", text)
            repeated = re.findall(
                r"flood\d+/1 outcome=forbidden \S+ \(repeated (\d+) times\)", text
            )
            logged = sum(1 for line in flood if re.search(r"outcome=forbidden \S+$", line))
            if sum(map(int, more)) + sum(map(int, repeated)) + logged >= 20_000:
                break
            await trio.sleep(0.1)
    assert sum(map(int, more)) + sum(map(int, repeated)) + logged == 20_000
    # per window: at most burst (20) lines, a "repeated N times" line for
    # each, one count; the flood spans one or two windows (three at most)
    grown = len(text.encode()) - before
    assert len(flood) + len(more) <= 3 * 41, len(flood)
    assert grown < 25_000, grown


async def test_allowed_calls_and_disconnects_are_logged_at_info(served: Served) -> None:
    fp = served.keys["owner"].fingerprint
    ch, _ = await served.open("owner")
    try:
        assert await ch.call(1, "echo", "echo", [b"hi"]) == (A("reply"), 1, b"hi")
        await ch.send((A("call"), 2, A("slow"), A("work"), [30]))
        await _sync(ch, 4)  # the call is running
        await served.wait_for(rf"key={re.escape(fp)} call echo:echo/1 outcome=ok")
    finally:
        await ch.aclose()  # kills ssh: the call is cut off
    text = await served.wait_for(rf"key={re.escape(fp)} call slow:work/1 outcome=disconnected")
    line = next(line for line in text.splitlines() if "echo:echo/1 outcome=ok" in line)
    assert " INFO " in line


async def test_exception_messages_do_not_reach_clients(served: Served) -> None:
    ch, _ = await served.open("owner")
    try:
        reply = await ch.call(1, "errors", "raise", [A("other"), b"/srv/secret/path.py"])
        assert reply == (A("error"), 1, (A("error"), (A("ValueError"), b""), {}))
        # sshrpc.Error reasons are chosen by the service: they go out whole
        reply = await ch.call(2, "errors", "raise", [A("error"), b"chosen"])
        assert reply == (A("error"), 2, (A("error"), b"chosen", {}))
    finally:
        await ch.aclose()


async def test_bignum_cancel_gets_a_bye_and_no_traceback(served: Served) -> None:
    ch, _ = await served.open("owner")
    try:
        started = time.monotonic()
        await ch.send((A("cancel"), 2**64000))
        bye = await ch.recv()
        assert bye[0] == "bye" and bye[1][0] == "protocol_error", bye
        assert b"<int of 64001 bits>" in bye[1][1]
        assert len(bye[1][1]) < 400
        assert await ch.recv() is EOF
        assert time.monotonic() - started < 10
    finally:
        await ch.aclose()
    text = served.text()
    assert "Traceback" not in text
    assert "int of 64001 bits" in text


@pytest.mark.parametrize(
    ("extra", "message", "info_line"),
    [
        (["--in-process"], b"", None),  # its log is sshd's stderr, not ours
        (["--no-redact-errors", "--audit-level", "debug"], b"/srv/secret/path.py", False),
    ],
    ids=["in-process-redacts", "no-redact-audit-debug"],
)
async def test_serve_error_and_audit_flags(
    tmp_path: Path,
    client_key: ClientKey,
    extra: list[str],
    message: bytes,
    info_line: bool | None,
) -> None:
    """``--redact-errors`` is on by default also in in-process mode (the flag
    travels to the subsystem); ``--no-redact-errors`` sends the message;
    ``--audit-level debug`` keeps the lines of allowed calls out of the
    default log."""
    keys = tmp_path / "authorized_keys"
    keys.write_text(client_key.public_line + "\n")
    state = tmp_path / "state"
    info = start_serve(
        ["sshrpc.demo:services"],
        state_dir=state,
        authorized_keys=keys,
        identity=client_key.private,
        extra_args=extra,
    )
    try:
        ch = await SSHChannel.open(info.ssh_argv())
        try:
            await ch.hello()
            reply = await ch.call(1, "errors", "raise", [A("other"), b"/srv/secret/path.py"])
            assert reply == (A("error"), 1, (A("error"), (A("ValueError"), message), {}))
            assert await ch.call(2, "echo", "echo", [b"x"]) == (A("reply"), 2, b"x")
        finally:
            await ch.aclose()
    finally:
        stop_serve(info)
    text = (tmp_path / f"serve-{info.port}.log").read_text()
    if info_line is not None:
        assert ("call echo:echo/1 outcome=ok" in text) == info_line, text
