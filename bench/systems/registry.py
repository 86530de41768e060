"""Which systems the benchmark runs, how each server starts, and which driver
talks to it.  A server or client that cannot be had on this checkout raises
``Unavailable(reason)`` and the table says so.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sshrpc._statedir import temp_root

from ._common import (
    PYTHON,
    ROOT,
    SUBSYSTEM,
    PrivateSshd,
    free_port,
    keygen,
    stop_process,
    wait_port,
)

BENCH = ROOT / "bench"


class Unavailable(Exception):
    """This system cannot run here; the message says why."""


@dataclass
class Context:
    state: Path
    logs: Path

    @property
    def client_key(self) -> Path:
        return keygen(self.state / "client_ed25519", "bench-client")


@dataclass
class ServerHandle:
    port: int
    pids: list[int]
    stop: Callable[[], None]
    info: dict[str, Any] = field(default_factory=dict)


def _popen(argv: list[str], logfile: Path, **kw: Any) -> subprocess.Popen[bytes]:
    with open(logfile, "ab") as log:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=str(ROOT), **kw
        )


def _known_hosts(path: Path, port: int, host_pub: Path) -> Path:
    kind, key = host_pub.read_text().split()[:2]
    path.write_text(f"[127.0.0.1]:{port} {kind} {key}\n")
    return path


# --------------------------------------------------------------------------
# servers


def start_tcp_floor(ctx: Context) -> ServerHandle:
    port = free_port()
    proc = _popen(
        [PYTHON, str(BENCH / "floors" / "tcp_server.py"), str(port)], ctx.logs / "tcp_server.log"
    )
    wait_port(port, 20, proc)
    return ServerHandle(port, [proc.pid], lambda: stop_process(proc))


def _start_openssh(ctx: Context, name: str, subsystems: dict[str, str]) -> ServerHandle:
    if not Path("/usr/sbin/sshd").exists() and not shutil.which("sshd"):
        raise Unavailable("OpenSSH sshd not installed")
    sshd = PrivateSshd(ctx.state / name, subsystems, client_key=ctx.client_key)
    sshd.start()
    assert sshd.proc is not None
    return ServerHandle(
        sshd.port,
        [sshd.proc.pid],
        sshd.stop,
        {"sshd": sshd, "known_hosts": sshd.known_hosts},
    )


def start_openssh_cat(ctx: Context) -> ServerHandle:
    return _start_openssh(ctx, "openssh_cat", {"cat": "/bin/cat"})


def start_openssh_pynode(ctx: Context) -> ServerHandle:
    return _start_openssh(
        ctx, "openssh_pynode", {SUBSYSTEM: f"{PYTHON} {BENCH / 'systems' / 'py_subsystem.py'}"}
    )


def start_asyncssh(ctx: Context) -> ServerHandle:
    if importlib.util.find_spec("asyncssh") is None:
        raise Unavailable("asyncssh not installed (pip install asyncssh; it is in the bench extra)")
    d = ctx.state / "asyncssh"
    d.mkdir(parents=True, exist_ok=True)
    host = keygen(d / "host_ed25519", "host")
    ak = d / "authorized_keys"
    ak.write_text(Path(f"{ctx.client_key}.pub").read_text())
    port = free_port()
    proc = _popen(
        [PYTHON, str(BENCH / "systems" / "asyncssh_server.py"), str(port), str(host), str(ak)],
        ctx.logs / "asyncssh_server.log",
    )
    wait_port(port, 30, proc)
    kh = _known_hosts(d / "known_hosts", port, Path(f"{host}.pub"))
    return ServerHandle(port, [proc.pid], lambda: stop_process(proc), {"known_hosts": kh})


ERLANG = BENCH / "systems" / "erlang"


def erlang_ebin(ctx: Context) -> Path:
    """erlang/src and the bench's echo module compiled into the state folder
    (independent of erlang/ebin, which others rebuild while we run)."""
    ebin = ctx.state / "ebin"
    if (ebin / "sshrpc_bench.beam").exists():
        return ebin
    if not shutil.which("erlc") or not shutil.which("escript"):
        raise Unavailable("Erlang/OTP (erlc, escript) not installed")
    srcs = sorted((ROOT / "erlang" / "src").glob("*.erl"))
    if not any(p.name == "sshrpc_daemon.erl" for p in srcs):
        raise Unavailable("erlang/src/sshrpc_daemon.erl is not there yet")
    ebin.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(
        ["erlc", "-o", str(ebin), *map(str, srcs), str(ERLANG / "sshrpc_bench.erl")],
        capture_output=True,
        text=True,
    )
    if p.returncode:
        raise Unavailable(f"erlc failed: {(p.stdout + p.stderr).strip()[:200]}")
    return ebin


def start_erlang(ctx: Context) -> ServerHandle:
    ebin = erlang_ebin(ctx)
    d = ctx.state / "erlang_daemon"
    (d / "system").mkdir(parents=True, exist_ok=True)
    (d / "user").mkdir(parents=True, exist_ok=True)
    host = keygen(d / "system" / "ssh_host_ed25519_key", "host")
    (d / "user" / "authorized_keys").write_text(Path(f"{ctx.client_key}.pub").read_text())
    port = free_port()
    proc = _popen(
        [
            "escript",
            str(ERLANG / "daemon.escript"),
            str(port),
            str(d / "system"),
            str(d / "user"),
            str(ebin),
        ],
        ctx.logs / "erlang_daemon.log",
    )
    wait_port(port, 60, proc)
    kh = _known_hosts(d / "known_hosts", port, Path(f"{host}.pub"))
    return ServerHandle(port, [proc.pid], lambda: stop_process(proc), {"known_hosts": kh})


def _start_sshrpc_serve(ctx: Context, name: str, extra: list[str]) -> ServerHandle:
    if importlib.util.find_spec("sshrpc.cli") is None:
        raise Unavailable("sshrpc serve (sshrpc.cli) is not there yet")
    if importlib.util.find_spec("sshrpc.node") is None:
        raise Unavailable("the node (sshrpc.node) is not there yet")
    # Short (a Unix socket lives here); not under /tmp (sshd's StrictModes).
    d = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=temp_root()))
    ak = d / "client_authorized_keys"
    ak.write_text(Path(f"{ctx.client_key}.pub").read_text())
    port = free_port()
    proc = _popen(
        [
            PYTHON,
            str(BENCH / "systems" / "sshrpc_serve.py"),
            "bench.systems.sshrpc_service:svc",
            "--port",
            str(port),
            "--authorized-keys",
            str(ak),
            "--state-dir",
            str(d / "state"),
            *extra,
        ],
        ctx.logs / f"{name}.log",
    )

    def stop() -> None:
        stop_process(proc, 10)
        shutil.rmtree(d, ignore_errors=True)

    try:
        wait_port(port, 60, proc)
        host_pub = _find_host_pub(d / "state")
    except Exception:
        stop()
        raise
    kh = _known_hosts(ctx.state / f"{name}_known_hosts", port, host_pub)
    return ServerHandle(port, [proc.pid], stop, {"known_hosts": kh, "kind": "sshrpc"})


def _find_host_pub(state: Path) -> Path:
    found = sorted(state.rglob("*ed25519*.pub"))
    if not found:
        raise Unavailable(f"sshrpc serve wrote no ed25519 host key under {state}")
    return found[0]


def start_sshrpc_relay(ctx: Context) -> ServerHandle:
    return _start_sshrpc_serve(ctx, "sshrpc_relay", [])


def start_sshrpc_inproc(ctx: Context) -> ServerHandle:
    return _start_sshrpc_serve(ctx, "sshrpc_inproc", ["--in-process"])


def start_sshrpc_relay_copy(ctx: Context) -> ServerHandle:
    """``sshrpc serve`` whose relay copies every byte (``--no-pass-fds``)."""
    return _start_sshrpc_serve(ctx, "sshrpc_relay_copy", ["--no-pass-fds"])


def start_sshd_floor(ctx: Context) -> ServerHandle:
    """The sshd floor: bench/floors/sshd_echo.py behind a private OpenSSH sshd."""
    return _start_openssh(
        ctx, "sshd_floor", {SUBSYSTEM: f"{PYTHON} -S {BENCH / 'floors' / 'sshd_echo.py'}"}
    )


SERVERS: dict[str, Callable[[Context], ServerHandle]] = {
    "tcp_floor": start_tcp_floor,
    "openssh_cat": start_openssh_cat,
    "openssh_pynode": start_openssh_pynode,
    "asyncssh": start_asyncssh,
    "erlang": start_erlang,
    "sshrpc_relay": start_sshrpc_relay,
    "sshrpc_inproc": start_sshrpc_inproc,
    "sshrpc_relay_copy": start_sshrpc_relay_copy,
    "sshd_floor": start_sshd_floor,
}


# --------------------------------------------------------------------------
# systems


@dataclass
class SystemSpec:
    name: str
    group: str  # sshrpc | anchor | cross | alt | floor
    servers: tuple[str, ...]
    client: Callable[..., list[str]]
    note: str = ""
    cipher_floor: bool = False
    note_from_server: Callable[..., str] | None = None

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "_" for c in self.name).strip("_")


def _tcp_client(ctx: Context, server: ServerHandle) -> list[str]:
    return [PYTHON, str(BENCH / "floors" / "tcp_client.py"), str(server.port)]


def _cat_client(ctx: Context, server: ServerHandle) -> list[str]:
    return [PYTHON, str(BENCH / "systems" / "openssh_cat.py"), *server.info["sshd"].ssh_argv("cat")]


def _asyncssh_client(ctx: Context, server: ServerHandle) -> list[str]:
    return [
        PYTHON,
        str(BENCH / "systems" / "asyncssh_client.py"),
        str(server.port),
        str(ctx.client_key),
        str(server.info["known_hosts"]),
    ]


def _paramiko_client(ctx: Context, server: ServerHandle) -> list[str]:
    if importlib.util.find_spec("paramiko") is None:
        raise Unavailable("paramiko not installed (pip install paramiko; it is in the bench extra)")
    return [
        PYTHON,
        str(BENCH / "systems" / "paramiko_client.py"),
        str(server.port),
        str(ctx.client_key),
        str(server.info["known_hosts"]),
    ]


def _erlang_client(ctx: Context, server: ServerHandle) -> list[str]:
    ebin = erlang_ebin(ctx)
    user_dir = ctx.state / f"erlang_client_{server.port}"
    user_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(ctx.client_key, user_dir / "id_ed25519")
    shutil.copy(f"{ctx.client_key}.pub", user_dir / "id_ed25519.pub")
    shutil.copy(server.info["known_hosts"], user_dir / "known_hosts")
    return [
        "escript",
        str(ERLANG / "client.escript"),
        str(server.port),
        str(user_dir),
        str(ebin),
    ]


def _sshrpc_client(ctx: Context, server: ServerHandle) -> list[str]:
    if importlib.util.find_spec("sshrpc.client") is None:
        raise Unavailable("the sshrpc client (sshrpc.client) is not there yet")
    return [
        PYTHON,
        str(BENCH / "systems" / "sshrpc_client.py"),
        str(server.port),
        str(ctx.client_key),
        str(server.info["known_hosts"]),
    ]


def _sshd_floor_client(ctx: Context, server: ServerHandle) -> list[str]:
    import getpass

    if importlib.util.find_spec("ssh2") is None:
        raise Unavailable("ssh2-python is not installed")
    return [
        PYTHON,
        str(BENCH / "floors" / "sshd_client.py"),
        str(server.port),
        str(ctx.client_key),
        getpass.getuser(),
    ]


def _paramiko_cat_client(ctx: Context, server: ServerHandle) -> list[str]:
    argv = _paramiko_client(ctx, server)
    return [*argv, "cat"]


def _paramiko_note(server: ServerHandle) -> str:
    what = (
        "`sshrpc serve` (relay mode)"
        if server.info.get("kind") == "sshrpc"
        else "bench/systems/py_subsystem.py under a private OpenSSH sshd (`sshrpc serve`"
        " did not start)"
    )
    return f"paramiko client, erlpack frames, one thread, against {what}"


#: Which result is which anchor.
ANCHOR_ROLES = {"Erlang seed (OTP -> OTP)": "seed", "TCP floor (Trio)": "tcp", "ssh -s cat": "cat"}


def systems() -> list[SystemSpec]:
    return [
        SystemSpec(
            "sshrpc relay",
            "sshrpc",
            ("sshrpc_relay",),
            _sshrpc_client,
            note="sshrpc client (libssh2, Trio) -> `sshrpc serve`"
            " (OpenSSH sshd, relay to the node)",
        ),
        SystemSpec(
            "sshrpc in-process",
            "sshrpc",
            ("sshrpc_inproc",),
            _sshrpc_client,
            note="sshrpc client -> `sshrpc serve --in-process` (each channel serves itself)",
        ),
        SystemSpec(
            "sshrpc -> Erlang daemon",
            "cross",
            ("erlang",),
            _sshrpc_client,
        ),
        SystemSpec(
            "Erlang -> sshrpc node",
            "cross",
            ("sshrpc_relay",),
            _erlang_client,
        ),
        SystemSpec(
            "Erlang seed (OTP -> OTP)",
            "anchor",
            ("erlang",),
            _erlang_client,
            note="erlang/ client module -> erlang/ server module under OTP ssh:daemon"
            " ({nodelay, true}), driven by bench/systems/erlang/*.escript;"
            " pipelining is 64 Erlang processes calling on one channel",
        ),
        SystemSpec(
            "paramiko -> OpenSSH node",
            "alt",
            ("sshrpc_relay|openssh_pynode",),
            _paramiko_client,
            note_from_server=_paramiko_note,
        ),
        SystemSpec(
            "asyncssh -> asyncssh",
            "alt",
            ("asyncssh",),
            _asyncssh_client,
            note="asyncssh client and server, erlpack frames, answers routed by id",
        ),
        SystemSpec(
            "TCP floor (Trio)",
            "floor",
            ("tcp_floor",),
            _tcp_client,
            note="sshrpc framing and codec over plain TCP, one Trio process each side;"
            " no per-call task, pipelining refills a window of frames per read",
        ),
        SystemSpec(
            "sshd floor",
            "floor",
            ("sshd_floor",),
            _sshd_floor_client,
            note="bench/floors/sshd_client.py (ssh2-python non-blocking under Trio, no decoding)"
            " -> the same OpenSSH sshd -> bench/floors/sshd_echo.py (blocking, one read, one"
            " write of the complete frames): what SSH itself costs per call; bulk is one 16 MiB"
            " frame echoed whole, the RPC pattern (`ssh -s cat` streams both ways at once)",
        ),
        SystemSpec(
            "paramiko -> ssh cat",
            "floor",
            ("openssh_cat",),
            _paramiko_cat_client,
            note="the paramiko driver against the `cat` subsystem (frames echoed as they are):"
            " the set-up and new-channel floor of an OpenSSH-served subsystem for the same"
            " client, login shell included",
        ),
        SystemSpec(
            "ssh -s cat",
            "floor",
            ("openssh_cat",),
            _cat_client,
            cipher_floor=True,
            note="OpenSSH client to a `cat` subsystem of a private sshd; latency is a 36-byte"
            " block echoed, bulk streams through the kept channel, set-up includes"
            " starting `ssh` (KexAlgorithms=curve25519-sha256, as libssh2 negotiates; OpenSSH's"
            " default sntrup761x25519 adds 100-300 ms here)",
        ),
    ]


def extra_systems() -> list[SystemSpec]:
    """Systems only bench/call_cpu.py runs (besides ``systems()``)."""
    return [
        SystemSpec(
            "sshrpc relay (copying)",
            "sshrpc",
            ("sshrpc_relay_copy",),
            _sshrpc_client,
            note="as `sshrpc relay`, with `sshrpc serve --no-pass-fds`: the C relay copies"
            " every byte between sshd and the node (no descriptor passing)",
        ),
    ]


def human_size(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"
