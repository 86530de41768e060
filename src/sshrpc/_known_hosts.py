"""A server's host key + known_hosts files -> trusted, unknown or changed.  File I/O only.

Reads OpenSSH known_hosts files: plain and hashed (``|1|salt|hash``) host
names, comma-separated patterns with ``*``/``?`` and ``!`` negation, the
``[host]:port`` form for ports other than 22, and the ``@revoked`` marker
(``@cert-authority`` lines are ignored: sshrpc does not do certificates).
``check`` raises ``UnknownHostKey`` or ``HostKeyMismatch`` with the key's
SHA256 fingerprint and the file to edit; ``add`` appends a line (used only
when the caller explicitly accepts new host keys).

As in OpenSSH, a key is CHANGED only when known_hosts holds a different key
*of the same type* for the host.  A key of another type than the known ones
is ``OTHER_TYPE``: the client asks for the known types first
(``host_key_algorithms``), so a server that still has its known key never
gets there; ``check`` reports it as unknown (never "changed") and it is not
accepted as new.
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

from ._errors import HostKeyMismatch, UnknownHostKey, hint

__all__ = [
    "HostKeyStatus",
    "add",
    "check",
    "fingerprint",
    "host_entry_name",
    "host_key_algorithms",
    "key_type",
    "known_key_types",
]


class HostKeyStatus(enum.Enum):
    TRUSTED = "trusted"
    UNKNOWN = "unknown"
    #: Only keys of other types are known for the host.
    OTHER_TYPE = "other type"
    CHANGED = "changed"
    REVOKED = "revoked"


#: A key type -> the host key algorithms that negotiate it.
_ALGORITHMS_OF_TYPE = {
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"),
}


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


def _entries(files: Sequence[str], name: str) -> list[tuple[str | None, bytes, str, int]]:
    """(marker, key blob, file, line number) of every line for ``name``."""
    found: list[tuple[str | None, bytes, str, int]] = []
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
            found.append((marker, known, path, number))
    return found


def _lookup(
    files: Sequence[str], name: str, blob: bytes
) -> tuple[HostKeyStatus, str | None, int | None]:
    """(status, file, line number of the conflicting or matching entry)."""
    changed: tuple[str, int] | None = None
    trusted: tuple[str, int] | None = None
    other: tuple[str, int] | None = None
    kind = key_type(blob)
    for marker, known, path, number in _entries(files, name):
        if marker == "@revoked":
            if known == blob:
                return HostKeyStatus.REVOKED, path, number
            continue
        if known == blob:
            trusted = trusted or (path, number)
        elif key_type(known) != kind:
            other = other or (path, number)
        elif changed is None:
            changed = (path, number)
    if trusted is not None:
        return HostKeyStatus.TRUSTED, trusted[0], trusted[1]
    if changed is not None:
        return HostKeyStatus.CHANGED, changed[0], changed[1]
    if other is not None:
        return HostKeyStatus.OTHER_TYPE, other[0], other[1]
    return HostKeyStatus.UNKNOWN, None, None


def known_key_types(files: Sequence[str], name: str) -> list[str]:
    """The key types known for ``name`` (``[host]:port`` or an alias) in
    ``files``, in file order, without duplicates; revoked keys excluded."""
    kinds: list[str] = []
    for marker, known, _, _ in _entries(files, name):
        kind = key_type(known)
        if marker is None and kind not in kinds:
            kinds.append(kind)
    return kinds


def host_key_algorithms(preferred: Sequence[str], known_types: Sequence[str]) -> list[str]:
    """``preferred`` reordered as OpenSSH does (sshconnect2.c
    ``order_hostkeyalgs``): algorithms for the key types already known for
    the host first, in ``preferred`` order, then the others."""
    wanted = {alg for kind in known_types for alg in _ALGORITHMS_OF_TYPE.get(kind, (kind,))}
    first = [alg for alg in preferred if alg in wanted]
    return first + [alg for alg in preferred if alg not in wanted]


def check(
    files: Sequence[str],
    host: str,
    port: int,
    blob: bytes,
    *,
    alias: str | None = None,
    record_file: str | None = None,
) -> None:
    """Return if ``blob`` is a trusted key for ``host:port`` (or ``alias``,
    OpenSSH's HostKeyAlias) in ``files``.

    Raises ``HostKeyMismatch`` when the files hold a different key of the
    same type for the host (or this key is ``@revoked``), ``UnknownHostKey``
    when they hold none of its type.  ``record_file`` is the file the
    message tells the user to edit (default: the first of ``files``).
    """
    name = alias or host_entry_name(host, port)
    status, path, number = _lookup(files, name, blob)
    fp = fingerprint(blob)
    kind = key_type(blob)
    first_file = record_file or (files[0] if files else "~/.ssh/known_hosts")
    if status is HostKeyStatus.TRUSTED:
        return
    if status is HostKeyStatus.OTHER_TYPE:
        known = ", ".join(known_key_types(files, name))
        raise UnknownHostKey(
            f"host key for {name} is not known: the server offered {kind} {fp}, but "
            f"{path} (line {number}) knows this host only by {known} keys.  sshrpc asked "
            f"for {known} first (unless HostKeyAlgorithms excludes it), so the server no "
            "longer offers that key, or someone is intercepting this connection.  "
            "Check the new fingerprint with the server's administrator before "
            f"adding it to {first_file}",
            host=name,
            fingerprint=fp,
            known_hosts=first_file,
        )
    if status is HostKeyStatus.UNKNOWN:
        scan = f"ssh-keyscan -p {port} {host}" if alias is None else f"ssh-keyscan {host}"
        raise UnknownHostKey(
            f"host key for {name} is not known: {kind} {fp}.  Check this fingerprint "
            f"with the server's administrator, then add the host to {first_file} "
            f"(e.g. {scan} >> {first_file}) or {hint('accept_new')}",
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


def status(
    files: Sequence[str], host: str, port: int, blob: bytes, *, alias: str | None = None
) -> HostKeyStatus:
    """The ``HostKeyStatus`` of ``blob`` for ``host:port`` or ``alias``
    (no exception)."""
    return _lookup(files, alias or host_entry_name(host, port), blob)[0]


def hashed_name(name: str, salt: bytes | None = None) -> str:
    """``name`` hashed as ``ssh-keygen -H`` does: ``|1|salt|HMAC-SHA1``."""
    salt = os.urandom(20) if salt is None else salt
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


def add(
    path: str,
    host: str,
    port: int,
    blob: bytes,
    *,
    alias: str | None = None,
    hashed: bool = False,
) -> None:
    """Append ``[host]:port TYPE BASE64`` (``alias`` instead of the name when
    given; hashed when ``hashed``, OpenSSH's HashKnownHosts) to ``path``
    (created 0600, with its directory 0700, if missing)."""
    target = Path(path)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = alias or host_entry_name(host, port)
    if hashed:
        name = hashed_name(name)
    line = f"{name} {key_type(blob)} {base64.b64encode(blob).decode()}\n"
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(line)
