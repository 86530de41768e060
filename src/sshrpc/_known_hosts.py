"""A server's host key + known_hosts files -> trusted, unknown or changed.  File I/O only.

Reads OpenSSH known_hosts files: plain and hashed (``|1|salt|hash``) host
names, comma-separated patterns with ``*``/``?`` and ``!`` negation, the
``[host]:port`` form for ports other than 22, and the ``@revoked`` marker
(``@cert-authority`` lines are ignored: sshrpc does not do certificates).
``check`` raises ``UnknownHostKey`` or ``HostKeyMismatch`` with the key's
SHA256 fingerprint and the file to edit; ``add`` appends a line (used only
when the caller explicitly accepts new host keys).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import os
import re
import struct
from collections.abc import Sequence
from pathlib import Path

from ._errors import HostKeyMismatch, UnknownHostKey

__all__ = ["HostKeyStatus", "add", "check", "fingerprint", "host_entry_name", "key_type"]


class HostKeyStatus(enum.Enum):
    TRUSTED = "trusted"
    UNKNOWN = "unknown"
    CHANGED = "changed"
    REVOKED = "revoked"


def fingerprint(blob: bytes) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key blob."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def key_type(blob: bytes) -> str:
    """The key type name at the start of a public key blob (``ssh-ed25519``...)."""
    if len(blob) < 4:
        return "unknown"
    (n,) = struct.unpack(">I", blob[:4])
    return blob[4 : 4 + n].decode("ascii", "replace")


def host_entry_name(host: str, port: int) -> str:
    """The name known_hosts uses: ``host`` on port 22, else ``[host]:port``."""
    return host if port == 22 else f"[{host}]:{port}"


def _wildcard(pattern: str) -> re.Pattern[str]:
    """OpenSSH patterns: only ``*`` and ``?`` are special (``[`` is literal,
    as in ``[host]:port``)."""
    return re.compile(
        "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    )


def _name_matches(field: str, name: str) -> bool:
    if field.startswith("|1|"):
        try:
            _, _, salt_b64, hash_b64 = field.split("|", 3)
            salt = base64.b64decode(salt_b64)
            expected = base64.b64decode(hash_b64)
        except (ValueError, TypeError):
            return False
        digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
        return hmac.compare_digest(digest, expected)
    matched = False
    for pattern in field.split(","):
        negate = pattern.startswith("!")
        if _wildcard(pattern.lstrip("!").lower()).fullmatch(name.lower()):
            if negate:
                return False
            matched = True
    return matched


def _lookup(
    files: Sequence[str], name: str, blob: bytes
) -> tuple[HostKeyStatus, str | None, int | None]:
    """(status, file, line number of the conflicting or matching entry)."""
    changed: tuple[str, int] | None = None
    trusted: tuple[str, int] | None = None
    for path in files:
        try:
            lines = Path(path).read_text(errors="replace").splitlines()
        except OSError:
            continue
        for number, raw in enumerate(lines, 1):
            fields = raw.split()
            if not fields or fields[0].startswith("#"):
                continue
            marker = None
            if fields[0].startswith("@"):
                marker, fields = fields[0], fields[1:]
            if len(fields) < 3 or marker == "@cert-authority":
                continue
            if not _name_matches(fields[0], name):
                continue
            try:
                known = base64.b64decode(fields[2], validate=True)
            except ValueError:
                continue
            if marker == "@revoked":
                if known == blob:
                    return HostKeyStatus.REVOKED, path, number
                continue
            if known == blob:
                trusted = trusted or (path, number)
            elif changed is None:
                changed = (path, number)
    if trusted is not None:
        return HostKeyStatus.TRUSTED, trusted[0], trusted[1]
    if changed is not None:
        return HostKeyStatus.CHANGED, changed[0], changed[1]
    return HostKeyStatus.UNKNOWN, None, None


def check(files: Sequence[str], host: str, port: int, blob: bytes) -> None:
    """Return if ``blob`` is a trusted key for ``host:port`` in ``files``.

    Raises ``HostKeyMismatch`` when the files hold a different key for the
    host (or this key is ``@revoked``), ``UnknownHostKey`` when they hold none.
    """
    name = host_entry_name(host, port)
    status, path, number = _lookup(files, name, blob)
    fp = fingerprint(blob)
    kind = key_type(blob)
    first_file = files[0] if files else "~/.ssh/known_hosts"
    if status is HostKeyStatus.TRUSTED:
        return
    if status is HostKeyStatus.UNKNOWN:
        raise UnknownHostKey(
            f"host key for {name} is not known: {kind} {fp}.  Check this fingerprint "
            f"with the server's administrator, then add the host to {first_file} "
            f"(e.g. ssh-keyscan -p {port} {host} >> {first_file}) or connect with "
            "accept_new_host_keys=True",
            host=name,
            fingerprint=fp,
            known_hosts=first_file,
        )
    what = "is revoked" if status is HostKeyStatus.REVOKED else "has CHANGED"
    raise HostKeyMismatch(
        f"host key for {name} {what}: the server offered {kind} {fp}, which does not "
        f"match line {number} of {path}.  Someone may be intercepting this "
        "connection.  If the key change is legitimate, remove that line "
        f"(ssh-keygen -R '{name}' -f {path}) and connect again",
        host=name,
        fingerprint=fp,
        known_hosts=str(path),
    )


def status(files: Sequence[str], host: str, port: int, blob: bytes) -> HostKeyStatus:
    """The ``HostKeyStatus`` of ``blob`` for ``host:port`` (no exception)."""
    return _lookup(files, host_entry_name(host, port), blob)[0]


def add(path: str, host: str, port: int, blob: bytes) -> None:
    """Append ``[host]:port TYPE BASE64`` to ``path`` (created 0600, with its
    directory 0700, if missing)."""
    target = Path(path)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    line = f"{host_entry_name(host, port)} {key_type(blob)} {base64.b64encode(blob).decode()}\n"
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(line)
