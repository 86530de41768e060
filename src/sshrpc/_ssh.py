"""Settings -> an authenticated SSH session with an open sshrpc channel, as a ``Pump``.

Order of events in ``open_channel``: TCP connect (TCP_NODELAY) -- or start
the ProxyCommand (ProxyJump: ``ssh -W``) and talk SSH over a socketpair
whose other end is its stdin and stdout --, SSH handshake (host key
algorithms ordered by the key types known for the host, as OpenSSH does),
host key check against known_hosts (user files, then global ones; before any
credential is offered), authentication (identity files, each with its
certificate first if it has one, then the agent, then a password if given),
session channel, subsystem request.  ``ConnectTimeout`` bounds the connect
and the handshake.  Everything is non-blocking through ``Pump.retry`` except
agent authentication (see ``_agent_auth``).

Each step is logged on the ``sshrpc.ssh`` logger, at INFO (what ``ssh -v``
shows) and DEBUG (algorithms, settings): ``sshrpc -v call ...``.

Errors: ``OSError`` subclasses become ``ConnectionLost`` with what was tried
(unreachable host, refused port); host key problems are ``HostKeyError``s;
credentials are ``AuthenticationFailed`` and its two subclasses for a missing
key file and a passphrase problem.  On any error the socket is closed (after
the session is freed) before the error propagates, also when cancelled.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import os
import socket as _stdsocket
import struct
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, cast

import trio
from ssh2 import exceptions as ssh2_exc
from ssh2.session import (
    LIBSSH2_METHOD_CRYPT_CS,
    LIBSSH2_METHOD_CRYPT_SC,
    LIBSSH2_METHOD_HOSTKEY,
    LIBSSH2_METHOD_KEX,
    LIBSSH2_METHOD_MAC_CS,
    LIBSSH2_METHOD_MAC_SC,
    Session,
)

from . import _known_hosts
from ._errors import AuthenticationFailed, ConnectionLost, SSHConfigError, hint
from ._pump import Pump, connect_socket
from ._ssh_config import (
    DEFAULT_CIPHERS,
    DEFAULT_HOST_KEY_ALGORITHMS,
    DEFAULT_KEX,
    DEFAULT_MACS,
    Proxy,
    SSHSettings,
)

log = logging.getLogger("sshrpc.ssh")

#: Pseudo key exchange names that must stay in the list: extension
#: negotiation and strict KEX (CVE-2023-48795).
_KEX_EXTENSIONS = ("ext-info-c", "kex-strict-c-v00@openssh.com")
#: How long a failed proxy gets to exit, so its stderr can be quoted.
PROXY_EXIT_WAIT = 2.0

#: Cipher, MAC and key exchange preferences offered (see _ssh_config).
CIPHERS = ",".join(DEFAULT_CIPHERS)
MACS = DEFAULT_MACS
KEX = DEFAULT_KEX

__all__ = [
    "SUBSYSTEM",
    "KeyFileNotFound",
    "KeyPassphraseError",
    "is_encrypted_key",
    "open_channel",
]

#: The subsystem name PROTOCOL.md section 1 registers.
SUBSYSTEM = "sshrpc@k2r.org"


class KeyFileNotFound(AuthenticationFailed):
    """An identity file you named does not exist or cannot be read.  Fix the
    path (``identity=`` or ``IdentityFile`` in ~/.ssh/config)."""


class KeyPassphraseError(AuthenticationFailed):
    """An identity file is encrypted and no passphrase was given, or the
    passphrase is wrong.  Pass the right one as ``passphrase=`` (CLI: the
    variable named by ``--passphrase-env``)."""


class _ProxySocket:
    """Our end of the socketpair whose other end is a proxy process's stdin
    and stdout.  ``close`` closes it and ends the process (SIGTERM, then
    SIGKILL after 2 s), reaped by a daemon thread, so none is left behind."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        proc: subprocess.Popen[bytes],
        errors: IO[bytes],
        proxy: Proxy,
    ) -> None:
        self._sock = sock
        self.proc = proc
        self.errors = errors
        self.proxy = proxy

    def fileno(self) -> int:
        return self._sock.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def stderr_tail(self) -> str:
        """The last lines the proxy wrote on stderr (one line of text)."""
        try:
            self.errors.seek(0)
            text = self.errors.read()[-600:].decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""
        return " / ".join(line.strip() for line in text.splitlines() if line.strip())

    def close(self) -> None:
        self._sock.close()
        proc = self.proc
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.terminate()

        def reap() -> None:
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self.errors.close()

        threading.Thread(target=reap, name="sshrpc-proxy-reaper", daemon=True).start()


def _start_proxy(proxy: Proxy) -> _ProxySocket:
    """Run the proxy with one end of a socketpair as its stdin and stdout."""
    ours, theirs = _stdsocket.socketpair()
    errors = tempfile.TemporaryFile()  # noqa: SIM115 -- owned by the _ProxySocket
    log.info("%s %s: running %s", proxy.option, proxy.spec, " ".join(proxy.argv))
    try:
        proc = subprocess.Popen(
            proxy.argv, stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=errors, close_fds=True
        )
    except OSError as exc:
        ours.close()
        errors.close()
        raise ConnectionLost(
            f"{proxy.option} {proxy.spec}: cannot run {proxy.argv[0]}: {exc.strerror or exc}"
        ) from exc
    finally:
        theirs.close()
    return _ProxySocket(trio.socket.from_stdlib_socket(ours), proc, errors, proxy)


async def _connect(settings: SSHSettings) -> trio.socket.SocketType:
    """A socket carrying bytes to the server: TCP, or a proxy's stdio."""
    if settings.proxy is not None:
        return cast(trio.socket.SocketType, _start_proxy(settings.proxy))
    host = settings.hostname
    if settings.address_family != "any":
        family = _stdsocket.AF_INET if settings.address_family == "inet" else _stdsocket.AF_INET6
        infos = await trio.socket.getaddrinfo(
            host, settings.port, family=family, type=_stdsocket.SOCK_STREAM
        )
        if not infos:
            raise OSError(f"no {settings.address_family} address for {host}")
        host = str(infos[0][4][0])
    log.info("connecting to %s port %d", host, settings.port)
    return await connect_socket(host, settings.port)


async def _proxy_failure(sock: Any) -> str:
    """What a failed proxy said (waits up to ``PROXY_EXIT_WAIT`` s for it)."""
    if not isinstance(sock, _ProxySocket):
        return ""
    proc = sock.proc
    with contextlib.suppress(subprocess.TimeoutExpired):
        await trio.to_thread.run_sync(proc.wait, PROXY_EXIT_WAIT)
    status = "" if proc.returncode is None else f" (exit status {proc.returncode})"
    said = sock.stderr_tail()
    return f"{sock.proxy.option} {sock.proxy.spec} failed{status}" + (f": {said}" if said else "")


def _ssh_strings(blob: bytes, count: int) -> list[bytes]:
    """The first ``count`` SSH strings of ``blob`` (fewer if it is short)."""
    out: list[bytes] = []
    offset = 0
    while len(out) < count and offset + 4 <= len(blob):
        (n,) = struct.unpack(">I", blob[offset : offset + 4])
        out.append(blob[offset + 4 : offset + 4 + n])
        offset += 4 + n
    return out


def _public_blob(path: str) -> bytes | None:
    """The key blob of an OpenSSH public key (or certificate) file."""
    try:
        fields = Path(path).read_text().split()
        return base64.b64decode(fields[1], validate=True)
    except (OSError, IndexError, ValueError):
        return None


def _certificate_matches(certificate: str, identity: str) -> bool:
    """True when the certificate certifies the identity's public key (from
    ``identity.pub``), or when there is no ``.pub`` to compare with."""
    key = _public_blob(identity + ".pub")
    cert = _public_blob(certificate)
    if key is None or cert is None:
        return True
    fields = _ssh_strings(key, 16)[1:]
    return _ssh_strings(cert, 2 + len(fields))[2:] == fields


def _certificates_for(identity: str, certificate_files: Sequence[str]) -> list[str]:
    """The certificates to offer with ``identity``: the CertificateFiles
    that certify its key, then ``IDENTITY-cert.pub`` if it exists (OpenSSH
    loads that one by itself)."""
    found = [c for c in certificate_files if _certificate_matches(c, identity)]
    beside = identity + "-cert.pub"
    if os.path.exists(beside) and beside not in found:
        found.append(beside)
    return found


def is_encrypted_key(data: bytes) -> bool:
    """True when private key file contents ``data`` are passphrase-protected
    (OpenSSH format with a cipher other than ``none``, or encrypted PEM)."""
    text = data.decode("ascii", "replace")
    if "-----BEGIN OPENSSH PRIVATE KEY-----" in text:
        body = "".join(
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.startswith("-----")
        )
        try:
            raw = base64.b64decode(body)
        except ValueError:
            return False
        magic = b"openssh-key-v1\x00"
        if not raw.startswith(magic) or len(raw) < len(magic) + 4:
            return False
        n = int.from_bytes(raw[len(magic) : len(magic) + 4], "big")
        cipher = raw[len(magic) + 4 : len(magic) + 4 + n]
        return cipher != b"none"
    return "ENCRYPTED" in text


async def _agent_auth(pump: Pump, session: Session, user: str) -> bool:
    """Try every key of the SSH agent.  True on success.

    libssh2's agent API cannot run non-blocking (ssh2-python's ``agent_auth``
    says so), so this one step runs in a worker thread with the session in
    blocking mode; no other task touches the session meanwhile (set-up runs
    before the pump task starts).  The thread cannot be abandoned: a cancel
    takes effect when it returns (a local agent answers in milliseconds).
    """
    session.set_blocking(True)
    try:
        await trio.to_thread.run_sync(session.agent_auth, user)
        return True
    except ssh2_exc.SSH2Error:
        return False
    finally:
        session.set_blocking(False)


async def _authenticate(
    pump: Pump,
    session: Session,
    user: str,
    identities: Sequence[str],
    *,
    skip_missing: bool,
    passphrase: str | None,
    agent: bool,
    password: str | None,
    certificate_files: Sequence[str] = (),
) -> None:
    tried: list[str] = []
    log.info("authenticating as %r", user)
    for certificate in certificate_files:
        if not os.path.exists(certificate):
            raise KeyFileNotFound(
                f"certificate file {certificate} (CertificateFile) does not exist",
                tried=[f"certificate file {certificate} (missing)"],
            )
    for path in identities:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            if skip_missing:
                log.debug("identity file %s: not there (a default, skipped)", path)
                continue
            raise KeyFileNotFound(
                f"identity file {path} cannot be read: {exc.strerror or exc} "
                f"(named by {hint('identity')} or IdentityFile in the ssh config)",
                tried=[*tried, f"identity file {path} (missing)"],
            ) from exc
        encrypted = is_encrypted_key(data)
        if encrypted and not passphrase:
            if skip_missing:
                log.info("identity file %s: encrypted and no passphrase given, skipped", path)
                tried.append(f"identity file {path} (skipped: encrypted, no passphrase given)")
                continue
            raise KeyPassphraseError(
                f"identity file {path} is encrypted: {hint('passphrase')}",
                tried=[*tried, f"identity file {path} (encrypted, no passphrase)"],
            )
        # With the .pub beside an encrypted key, libssh2 offers the public key
        # first and reports a wrong passphrase as "unverified", which would
        # read as a refused key.  Without it, decryption comes first and a
        # wrong passphrase is a FileError we can name.
        public = path + ".pub" if not encrypted and os.path.exists(path + ".pub") else None
        offers: list[tuple[str | None, str]] = [
            (c, f"identity file {path} with certificate {c}")
            for c in _certificates_for(path, certificate_files)
        ]
        offers.append((public, f"identity file {path}"))
        for public_file, what in offers:
            log.info("offering %s", what)
            try:
                rc = await pump.retry(
                    session.userauth_publickey_fromfile,
                    user,
                    path,
                    passphrase or "",
                    public_file,
                )
            except ssh2_exc.FileError as exc:
                if encrypted:
                    raise KeyPassphraseError(
                        f"wrong passphrase for identity file {path}: {hint('passphrase')}",
                        tried=[*tried, f"identity file {path} (wrong passphrase)"],
                    ) from exc
                raise AuthenticationFailed(
                    f"identity file {path} is not a private key libssh2 can read ({exc})",
                    tried=[*tried, f"{what} (unreadable key)"],
                ) from exc
            except (
                ssh2_exc.AuthenticationError,
                ssh2_exc.PublickeyUnverifiedError,
                ssh2_exc.PublicKeyError,
            ):
                log.info("%s: refused by the server", what)
                tried.append(f"{what} (refused by the server)")
                continue
            if rc == 0 and session.userauth_authenticated():
                log.info("authenticated with %s", what)
                return
            tried.append(f"{what} (refused by the server, code {rc})")
    if agent and os.environ.get("SSH_AUTH_SOCK"):
        log.info("offering the keys of the SSH agent at %s", os.environ["SSH_AUTH_SOCK"])
        if await _agent_auth(pump, session, user):
            log.info("authenticated with a key of the SSH agent")
            return
        tried.append("SSH agent keys (all refused, or the agent had none)")
    elif agent:
        tried.append("SSH agent (not used: SSH_AUTH_SOCK is not set)")
    if password is not None:
        log.info("trying the password")
        try:
            rc = await pump.retry(session.userauth_password, user, password)
            if rc == 0 and session.userauth_authenticated():
                log.info("authenticated with the password")
                return
        except ssh2_exc.SSH2Error:
            pass
        tried.append("password (refused)")
    if not tried:
        tried.append("nothing: no identity file exists, no agent, no password")
    raise AuthenticationFailed(
        f"the server refused authentication as {user!r}; tried: " + "; ".join(tried),
        tried=tried,
    )


def _host_key_order(
    session: Session, settings: SSHSettings, known_files: Sequence[str]
) -> list[str]:
    """The host key algorithms to offer, as OpenSSH orders them: the
    config's HostKeyAlgorithms as given, else the default order with the
    types already known for the host first.  Certificate algorithms are never
    offered: sshrpc verifies plain host keys only."""
    supported = set(session.supported_algs(LIBSSH2_METHOD_HOSTKEY))
    if settings.host_key_algorithms is not None:
        order = [a for a in settings.host_key_algorithms if a in supported and "-cert-" not in a]
        if not order:
            raise SSHConfigError(
                "HostKeyAlgorithms "
                + ",".join(settings.host_key_algorithms)
                + ": none of these is one sshrpc (libssh2) can verify; it can: "
                + ",".join(a for a in DEFAULT_HOST_KEY_ALGORITHMS if a in supported)
            )
        return order
    name = settings.host_key_alias or _known_hosts.host_entry_name(settings.hostname, settings.port)
    known = _known_hosts.known_key_types(known_files, name)
    preferred = [a for a in DEFAULT_HOST_KEY_ALGORITHMS if a in supported]
    order = _known_hosts.host_key_algorithms(preferred, known)
    if known:
        log.debug("key types known for %s: %s", name, ", ".join(known))
    return order


def _prefer(
    session: Session,
    methods: Sequence[int],
    ours: Sequence[str],
    configured: Sequence[str] | None,
    option: str,
    keep: Sequence[str] = (),
) -> None:
    """Offer ``configured`` (the config's list, in its order) or ``ours``,
    less what libssh2 lacks; ``keep`` is appended as is."""
    supported = session.supported_algs(methods[0])
    wanted = ours if configured is None else configured
    order = [a for a in wanted if a in supported and a not in keep]
    if not order:
        raise SSHConfigError(
            f"{option} {','.join(wanted)}: sshrpc (libssh2) has none of these; it has: "
            + ",".join(a for a in supported if a not in keep)
        )
    if configured is not None:
        log.debug("%s from the ssh config: %s", option, ",".join(order))
    order += [a for a in keep if a in supported]
    for method in methods:
        session.method_pref(method, ",".join(order))


def _algorithm_preferences(session: Session, settings: SSHSettings) -> None:
    # Ciphers: AES-GCM (hardware AES via OpenSSL) before libssh2's own
    # portable chacha20-poly1305, which it would pick first and is slower.
    _prefer(
        session,
        (LIBSSH2_METHOD_CRYPT_CS, LIBSSH2_METHOD_CRYPT_SC),
        CIPHERS.split(","),
        settings.ciphers,
        "Ciphers",
    )
    _prefer(session, (LIBSSH2_METHOD_MAC_CS, LIBSSH2_METHOD_MAC_SC), MACS, settings.macs, "MACs")
    _prefer(
        session,
        (LIBSSH2_METHOD_KEX,),
        KEX,
        settings.kex_algorithms,
        "KexAlgorithms",
        keep=_KEX_EXTENSIONS,
    )


def _verify_host_key(settings: SSHSettings, blob: bytes, *, verify: bool, accept_new: bool) -> None:
    host, port, alias = settings.hostname, settings.port, settings.host_key_alias
    name = alias or _known_hosts.host_entry_name(host, port)
    log.info("server host key: %s %s", _known_hosts.key_type(blob), _known_hosts.fingerprint(blob))
    if not verify:
        log.warning("host key of %s NOT verified (verify_host_key=False)", name)
        return
    user_files = settings.known_hosts_files
    files = [*user_files, *settings.global_known_hosts_files]
    log.info("checking the host key of %s against %s", name, ", ".join(files) or "no file")
    status, path, number = _known_hosts._lookup(files, name, blob)
    record = user_files[0] if user_files else None
    if status is _known_hosts.HostKeyStatus.UNKNOWN and (
        accept_new or settings.accept_new_host_keys
    ):
        target = os.path.expanduser(record or "~/.ssh/known_hosts")
        _known_hosts.add(target, host, port, blob, alias=alias, hashed=settings.hash_known_hosts)
        log.warning(
            "accepted the new host key of %s (%s) and recorded it in %s",
            name,
            _known_hosts.fingerprint(blob),
            target,
        )
        return
    _known_hosts.check(files, host, port, blob, alias=alias, record_file=record)
    log.info("host key of %s matches %s line %s", name, path, number)


async def open_channel(
    settings: SSHSettings,
    *,
    verify_host_key: bool = True,
    accept_new_host_keys: bool = False,
    passphrase: str | None = None,
    agent: bool = True,
    password: str | None = None,
    subsystem: str = SUBSYSTEM,
) -> Pump:
    """Connect, verify, authenticate and open the subsystem channel.

    ``settings`` come from ``_ssh_config.resolve``.  A checkpoint.  Returns
    a ``Pump`` with its channel attached (the pump task is not started).
    ``settings.connect_timeout`` bounds connect + handshake
    (``ConnectionLost`` when it expires); the caller's cancel scopes apply
    throughout.  On error or cancellation nothing is left open (a proxy
    process is ended too).
    """
    host, port = settings.hostname, settings.port
    where = f"{host} port {port}"
    if settings.proxy is not None:
        where += f" via {settings.proxy.option} {settings.proxy.spec}"
    timeout = math.inf if settings.connect_timeout is None else settings.connect_timeout
    pump: Pump | None = None
    sock: Any = None
    ok = False
    try:
        with trio.move_on_after(timeout) as deadline:
            try:
                sock = await _connect(settings)
            except OSError as exc:
                raise ConnectionLost(
                    f"cannot connect to {host} port {port}: {exc.strerror or exc}"
                ) from exc
            session = Session()
            session.set_blocking(False)
            pump = Pump(sock, session)
            _algorithm_preferences(session, settings)
            files = [*settings.known_hosts_files, *settings.global_known_hosts_files]
            order = _host_key_order(session, settings, files)
            log.debug("host key algorithms offered: %s", ",".join(order))
            session.method_pref(LIBSSH2_METHOD_HOSTKEY, ",".join(order))
            try:
                await pump.retry(session.handshake, sock)
            except (ssh2_exc.SSH2Error, OSError) as exc:
                said = await _proxy_failure(sock)
                raise ConnectionLost(
                    f"SSH handshake with {where} failed ({type(exc).__name__}): "
                    + (said or "is an SSH server listening there?")
                ) from exc
        if deadline.cancelled_caught:
            raise ConnectionLost(
                f"no SSH connection to {where} within {timeout:g} s (ConnectTimeout)"
            )
        assert pump is not None
        log.debug("negotiated: %s", _methods(session))
        blob, _ = session.hostkey()
        _verify_host_key(settings, blob, verify=verify_host_key, accept_new=accept_new_host_keys)
        await _authenticate(
            pump,
            session,
            settings.user,
            settings.identity_files,
            skip_missing=settings.default_identities,
            passphrase=passphrase,
            agent=agent and settings.agent,
            password=password,
            certificate_files=settings.certificate_files,
        )
        try:
            channel = await pump.retry(session.open_session)
            await pump.retry(channel.subsystem, subsystem)
        except ssh2_exc.SSH2Error as exc:
            raise ConnectionLost(
                f"the server refused the {subsystem!r} subsystem ({type(exc).__name__}): "
                "is sshrpc installed as a Subsystem in its sshd_config?"
            ) from exc
        log.info("subsystem %s open", subsystem)
        pump.attach_channel(channel)
        pump.subsystem = subsystem
        ok = True
        return pump
    finally:
        if not ok:
            with trio.CancelScope(shield=True):
                if pump is not None:
                    await pump.aclose()
                elif sock is not None:
                    sock.close()


def _methods(session: Session) -> str:
    from ssh2.session import LIBSSH2_METHOD_CRYPT_CS as CS

    names = {
        "kex": LIBSSH2_METHOD_KEX,
        "hostkey": LIBSSH2_METHOD_HOSTKEY,
        "cipher": CS,
        "mac": LIBSSH2_METHOD_MAC_CS,
    }
    out = []
    for label, method in names.items():
        with contextlib.suppress(ssh2_exc.SSH2Error):
            out.append(f"{label} {session.methods(method)}")
    return ", ".join(out)
