"""Settings -> an authenticated SSH session with an open sshrpc channel, as a ``Pump``.

Order of events in ``open_channel``: TCP connect (TCP_NODELAY), SSH handshake,
host key check against known_hosts (before any credential is offered),
authentication (identity files, then the agent, then a password if given),
session channel, subsystem request.  Everything is non-blocking through
``Pump.retry`` except agent authentication (see ``_agent_auth``).

Errors: ``OSError`` subclasses become ``ConnectionLost`` with what was tried
(unreachable host, refused port); host key problems are ``HostKeyError``s;
credentials are ``AuthenticationFailed`` and its two subclasses for a missing
key file and a passphrase problem.  On any error the socket is closed (after
the session is freed) before the error propagates, also when cancelled.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from pathlib import Path

import trio
from ssh2 import exceptions as ssh2_exc
from ssh2.session import (
    LIBSSH2_METHOD_CRYPT_CS,
    LIBSSH2_METHOD_CRYPT_SC,
    Session,
)

from . import _known_hosts
from ._errors import AuthenticationFailed, ConnectionLost
from ._pump import Pump, connect_socket

#: Cipher preference offered to the server (it picks the first it also has).
CIPHERS = (
    "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,"
    "aes128-ctr,aes192-ctr,aes256-ctr"
)

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
    passphrase is wrong.  Pass the right one as ``passphrase=``."""


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
) -> None:
    tried: list[str] = []
    for path in identities:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            if skip_missing:
                continue
            raise KeyFileNotFound(
                f"identity file {path} cannot be read: {exc.strerror or exc}",
                tried=[*tried, f"identity file {path} (missing)"],
            ) from exc
        encrypted = is_encrypted_key(data)
        if encrypted and not passphrase:
            if skip_missing:
                tried.append(f"identity file {path} (skipped: encrypted, no passphrase given)")
                continue
            raise KeyPassphraseError(
                f"identity file {path} is encrypted: pass its passphrase as passphrase=",
                tried=[*tried, f"identity file {path} (encrypted, no passphrase)"],
            )
        # With the .pub beside an encrypted key, libssh2 offers the public key
        # first and reports a wrong passphrase as "unverified", which would
        # read as a refused key.  Without it, decryption comes first and a
        # wrong passphrase is a FileError we can name.
        public = path + ".pub" if not encrypted and os.path.exists(path + ".pub") else None
        try:
            rc = await pump.retry(
                session.userauth_publickey_fromfile, user, path, passphrase or "", public
            )
        except ssh2_exc.FileError as exc:
            if encrypted:
                raise KeyPassphraseError(
                    f"wrong passphrase for identity file {path}",
                    tried=[*tried, f"identity file {path} (wrong passphrase)"],
                ) from exc
            raise AuthenticationFailed(
                f"identity file {path} is not a private key libssh2 can read ({exc})",
                tried=[*tried, f"identity file {path} (unreadable key)"],
            ) from exc
        except (
            ssh2_exc.AuthenticationError,
            ssh2_exc.PublickeyUnverifiedError,
            ssh2_exc.PublicKeyError,
        ):
            tried.append(f"identity file {path} (refused by the server)")
            continue
        if rc == 0 and session.userauth_authenticated():
            return
        tried.append(f"identity file {path} (refused by the server, code {rc})")
    if agent and os.environ.get("SSH_AUTH_SOCK"):
        if await _agent_auth(pump, session, user):
            return
        tried.append("SSH agent keys (all refused, or the agent had none)")
    elif agent:
        tried.append("SSH agent (not used: SSH_AUTH_SOCK is not set)")
    if password is not None:
        try:
            rc = await pump.retry(session.userauth_password, user, password)
            if rc == 0 and session.userauth_authenticated():
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


async def open_channel(
    host: str,
    port: int,
    *,
    user: str,
    identities: Sequence[str],
    skip_missing_identities: bool,
    known_hosts_files: Sequence[str],
    verify_host_key: bool = True,
    accept_new_host_keys: bool = False,
    passphrase: str | None = None,
    agent: bool = True,
    password: str | None = None,
    subsystem: str = SUBSYSTEM,
) -> Pump:
    """Connect, verify, authenticate and open the subsystem channel.

    A checkpoint.  Returns a ``Pump`` with its channel attached (the pump
    task is not started).  On error or cancellation nothing is left open.
    """
    try:
        sock = await connect_socket(host, port)
    except OSError as exc:
        raise ConnectionLost(
            f"cannot connect to {host} port {port}: {exc.strerror or exc}"
        ) from exc
    session = Session()
    session.set_blocking(False)
    for direction in (LIBSSH2_METHOD_CRYPT_CS, LIBSSH2_METHOD_CRYPT_SC):
        # AES-GCM (hardware AES via OpenSSL) before libssh2's own portable
        # chacha20-poly1305, which it would pick first and which is slower.
        session.method_pref(direction, CIPHERS)
    pump = Pump(sock, session)
    ok = False
    try:
        try:
            await pump.retry(session.handshake, sock)
        except (ssh2_exc.SSH2Error, OSError) as exc:
            raise ConnectionLost(
                f"SSH handshake with {host} port {port} failed ({type(exc).__name__}): "
                "is an SSH server listening there?"
            ) from exc
        blob, _ = session.hostkey()
        if verify_host_key:
            status = _known_hosts.status(known_hosts_files, host, port, blob)
            if status is _known_hosts.HostKeyStatus.UNKNOWN and accept_new_host_keys:
                target = known_hosts_files[0] if known_hosts_files else "~/.ssh/known_hosts"
                _known_hosts.add(os.path.expanduser(target), host, port, blob)
            else:
                _known_hosts.check(known_hosts_files, host, port, blob)
        await _authenticate(
            pump,
            session,
            user,
            identities,
            skip_missing=skip_missing_identities,
            passphrase=passphrase,
            agent=agent,
            password=password,
        )
        try:
            channel = await pump.retry(session.open_session)
            await pump.retry(channel.subsystem, subsystem)
        except ssh2_exc.SSH2Error as exc:
            raise ConnectionLost(
                f"the server refused the {subsystem!r} subsystem ({type(exc).__name__}): "
                "is sshrpc installed as a Subsystem in its sshd_config?"
            ) from exc
        pump.attach_channel(channel)
        ok = True
        return pump
    finally:
        if not ok:
            with trio.CancelScope(shield=True):
                await pump.aclose()
