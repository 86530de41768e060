"""A host name -> the effective OpenSSH client settings sshrpc uses.  Blocking I/O.

Where the OpenSSH client is installed, ``ssh -G`` prints the configuration
exactly as OpenSSH evaluates it (Host and Match blocks, Include, tokens,
defaults); ``resolve`` runs it and reads the few keys sshrpc honours:
HostName, User, Port, IdentityFile, IdentitiesOnly, UserKnownHostsFile.
Without ``ssh``, a small parser reads the file itself: Host blocks with
patterns and negations and Include; Match blocks are skipped (documented
limitation).  Explicit arguments always win over the file.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import pwd
import re
import shlex
import shutil
import subprocess
from pathlib import Path

__all__ = ["DEFAULT_IDENTITIES", "SSHSettings", "parse_config_text", "resolve"]

#: The identity files OpenSSH tries when the config names none (ssh -G lists
#: exactly these then); missing ones are skipped silently, as ssh does.
DEFAULT_IDENTITIES = (
    "~/.ssh/id_rsa",
    "~/.ssh/id_ecdsa",
    "~/.ssh/id_ecdsa_sk",
    "~/.ssh/id_ed25519",
    "~/.ssh/id_ed25519_sk",
    "~/.ssh/id_xmss",
    "~/.ssh/id_dsa",
)
_DEFAULT_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
#: ``ssh -G`` reads only local files; it answers in milliseconds.
SSH_G_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class SSHSettings:
    """The settings for one destination, after config and explicit arguments."""

    hostname: str
    port: int
    user: str
    identity_files: tuple[str, ...]
    #: True when the identity files are OpenSSH's defaults (missing ones are
    #: skipped silently); False when the config or the caller named them.
    default_identities: bool
    identities_only: bool
    known_hosts_files: tuple[str, ...]
    source: str  # "ssh -G", "parser" or "none"


def _local_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER", "root")


def _parse_g(text: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            values.setdefault(key.lower(), []).append(value.strip())
    return values


def _ssh_g(host: str, config_file: str | None) -> dict[str, list[str]] | None:
    ssh = shutil.which("ssh")
    if ssh is None:
        return None
    argv = [ssh, "-G"]
    if config_file is not None:
        argv += ["-F", config_file]
    argv += ["--", host]
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=SSH_G_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return _parse_g(result.stdout)


def _host_matches(patterns: list[str], host: str) -> bool:
    matched = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = "".join(
            ".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lstrip("!")
        )
        if re.fullmatch(regex, host):
            if negate:
                return False
            matched = True
    return matched


def parse_config_text(
    text: str, host: str, base_dir: str = "~/.ssh", _depth: int = 0
) -> dict[str, list[str]]:
    """The fallback parser: settings for ``host`` from ssh_config ``text``.

    First value wins (IdentityFile and UserKnownHostsFile accumulate), as in
    OpenSSH.  Host blocks and Include are honoured; Match blocks are skipped.
    """
    values: dict[str, list[str]] = {}
    active = True
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "=" in line.split(None, 1)[0]:
            key, _, rest = line.partition("=")
        else:
            key, _, rest = line.partition(" ")
        key = key.strip().lower()
        try:
            args = shlex.split(rest.strip())
        except ValueError:
            args = rest.split()
        if key == "host":
            active = _host_matches(args, host)
            continue
        if key == "match":
            active = False
            continue
        if not active:
            continue
        if key == "include" and _depth < 16:
            for pattern in args:
                path = os.path.expanduser(pattern)
                if not os.path.isabs(path):
                    path = os.path.join(os.path.expanduser(base_dir), path)
                for name in sorted(glob.glob(path)):
                    try:
                        included = Path(name).read_text()
                    except OSError:
                        continue
                    sub = parse_config_text(included, host, base_dir, _depth + 1)
                    for k, v in sub.items():
                        if k in ("identityfile", "userknownhostsfile"):
                            values.setdefault(k, []).extend(v)
                        else:
                            values.setdefault(k, v)
            continue
        if key in ("identityfile", "userknownhostsfile"):
            values.setdefault(key, []).extend(args)
        elif args:
            values.setdefault(key, [" ".join(args)])
    return values


def _expand(path: str, host: str, user: str, port: int) -> str:
    home = os.path.expanduser("~")
    path = (
        path.replace("%d", home)
        .replace("%h", host)
        .replace("%r", user)
        .replace("%p", str(port))
        .replace("%u", _local_user())
        .replace("%%", "%")
    )
    return os.path.expanduser(path)


def resolve(
    host: str,
    *,
    port: int | None = None,
    user: str | None = None,
    identity: str | os.PathLike[str] | list[str | os.PathLike[str]] | None = None,
    known_hosts: str | os.PathLike[str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
    use_config: bool = True,
) -> SSHSettings:
    """The effective settings for ``host``: explicit arguments, then the ssh
    config (``config_file``, default ``~/.ssh/config`` and the system file),
    then OpenSSH's defaults.  Blocking (runs ``ssh -G``); call it from a
    worker thread in async code."""
    values: dict[str, list[str]] = {}
    source = "none"
    if use_config:
        cfg = os.fspath(config_file) if config_file is not None else None
        got = _ssh_g(host, cfg)
        if got is not None:
            values, source = got, "ssh -G"
        else:
            path = Path(cfg) if cfg is not None else Path("~/.ssh/config").expanduser()
            try:
                values = parse_config_text(path.read_text(), host)
                source = "parser"
            except OSError:
                values = {}

    def first(key: str) -> str | None:
        got = values.get(key)
        return got[0] if got else None

    hostname = first("hostname") or host
    if source == "parser" and "%h" in hostname:
        hostname = hostname.replace("%h", host)
    final_user = user or first("user") or _local_user()
    final_port = port if port is not None else int(first("port") or 22)
    if identity is not None:
        items = identity if isinstance(identity, list) else [identity]
        identities = tuple(os.path.expanduser(os.fspath(p)) for p in items)
        default_ids = False
    else:
        configured = values.get("identityfile") or []
        default_ids = not configured or tuple(configured) == DEFAULT_IDENTITIES
        names = configured or list(DEFAULT_IDENTITIES)
        identities = tuple(_expand(p, hostname, final_user, final_port) for p in names)
    if known_hosts is not None:
        known: tuple[str, ...] = (os.path.expanduser(os.fspath(known_hosts)),)
    else:
        listed: list[str] = []
        for entry in values.get("userknownhostsfile") or list(_DEFAULT_KNOWN_HOSTS):
            listed.extend(entry.split())
        known = tuple(_expand(p, hostname, final_user, final_port) for p in listed)
    identities_only = (first("identitiesonly") or "no").lower() == "yes"
    return SSHSettings(
        hostname=hostname,
        port=final_port,
        user=final_user,
        identity_files=identities,
        default_identities=default_ids,
        identities_only=identities_only,
        known_hosts_files=known,
        source=source,
    )
