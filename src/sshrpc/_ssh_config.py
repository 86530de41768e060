"""A host name -> the effective OpenSSH client settings sshrpc uses.  Blocking I/O.

Where the OpenSSH client is installed, ``ssh -G`` prints the configuration
exactly as OpenSSH evaluates it (Host and Match blocks, Include, tokens,
defaults); ``resolve`` runs it and ``settings_from_values`` (pure) reads it.
Without ``ssh``, a small parser reads the file itself: Host blocks with
patterns and negations and Include; Match blocks are skipped (documented
limitation).  Explicit arguments always win over the file.

Honoured: HostName, User, Port, IdentityFile, CertificateFile (and
``IDENTITY-cert.pub`` beside an identity), IdentitiesOnly, IdentityAgent
``none``, UserKnownHostsFile, GlobalKnownHostsFile, HostKeyAlias,
HostKeyAlgorithms, StrictHostKeyChecking (``yes``/``ask`` -> refuse unknown
hosts, ``accept-new``), HashKnownHosts, ProxyJump, ProxyCommand,
ConnectTimeout, ServerAliveInterval/CountMax, AddressFamily.

Every other option that could change where we connect or whom we trust is
checked by ``unsupported``: a non-default value is an ``SSHConfigError``
naming the option, never skipped in silence (see ``REFUSED``).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import logging
import os
import pwd
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from ._errors import SSHConfigError, hint

__all__ = [
    "DEFAULT_CIPHERS",
    "DEFAULT_HOST_KEY_ALGORITHMS",
    "DEFAULT_IDENTITIES",
    "DEFAULT_KEX",
    "DEFAULT_MACS",
    "Proxy",
    "SSHSettings",
    "parse_config_text",
    "parse_ssh_g",
    "resolve",
    "settings_from_values",
    "unsupported",
]

log = logging.getLogger("sshrpc.ssh")

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
_RAW = ("proxycommand", "localcommand", "remotecommand", "knownhostscommand")
_ACCUMULATE = ("identityfile", "userknownhostsfile", "certificatefile")
_DEFAULT_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
_DEFAULT_GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
#: OpenSSH's default host key algorithms, less the certificate and FIDO ones
#: (sshrpc verifies plain host keys only).  Used without ``ssh -G``.
DEFAULT_HOST_KEY_ALGORITHMS = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "rsa-sha2-512",
    "rsa-sha2-256",
)
#: Cipher preference: AES-GCM (hardware AES via OpenSSL) before libssh2's own
#: portable chacha20-poly1305, which it would pick first and which is slower.
DEFAULT_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
)
#: MACs offered: OpenSSH 9's defaults that libssh2 has (libssh2 would also
#: offer hmac-md5 and hmac-ripemd160).  AES-GCM and chacha20 need no MAC.
DEFAULT_MACS = (
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "hmac-sha1-etm@openssh.com",
    "hmac-sha2-256",
    "hmac-sha2-512",
    "hmac-sha1",
)
#: Key exchange offered: OpenSSH 9's defaults that libssh2 has (no SHA-1
#: groups, which libssh2 would otherwise offer), then the two pseudo
#: algorithms for extension negotiation and strict KEX (CVE-2023-48795).
DEFAULT_KEX = (
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521",
    "diffie-hellman-group-exchange-sha256",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
    "diffie-hellman-group14-sha256",
    "ext-info-c",
    "kex-strict-c-v00@openssh.com",
)

#: ``ssh -G`` reads only local files; it answers in milliseconds.
SSH_G_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class Proxy:
    """How to reach the server other than by TCP: a command whose stdin and
    stdout carry the SSH session (``argv``, run without a shell of ours)."""

    #: "ProxyJump" or "ProxyCommand": the option it came from.
    option: str
    #: The option's value as configured (for messages).
    spec: str
    argv: tuple[str, ...]


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
    #: Read after ``known_hosts_files``; never written.
    global_known_hosts_files: tuple[str, ...] = ()
    #: The name to look up (and record) in known_hosts instead of the host.
    host_key_alias: str | None = None
    #: Host key algorithms in the order the config gives them, when it sets
    #: ``HostKeyAlgorithms``; ``None``: OpenSSH's default order, with the
    #: types known for the host first (decided at connect time).
    host_key_algorithms: tuple[str, ...] | None = None
    #: ``StrictHostKeyChecking accept-new``.
    accept_new_host_keys: bool = False
    hash_known_hosts: bool = False
    proxy: Proxy | None = None
    #: Seconds for TCP connect + SSH handshake (``ConnectTimeout``), or None.
    connect_timeout: float | None = None
    #: ``ServerAliveInterval`` (0: off) and ``ServerAliveCountMax``.
    server_alive_interval: float = 0.0
    server_alive_count_max: int = 3
    certificate_files: tuple[str, ...] = ()
    #: False when the config says ``IdentityAgent none``.
    agent: bool = True
    #: "any", "inet" or "inet6" (``AddressFamily``).
    address_family: str = "any"
    #: The host as the caller named it (``%n``).
    original_host: str = ""
    #: ``Ciphers``, ``MACs``, ``KexAlgorithms`` when the config sets them
    #: (in its order); ``None``: sshrpc's defaults (OpenSSH's, less SHA-1 KEX).
    ciphers: tuple[str, ...] | None = None
    macs: tuple[str, ...] | None = None
    kex_algorithms: tuple[str, ...] | None = None


def _local_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER", "root")


def parse_ssh_g(text: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            values.setdefault(key.lower(), []).append(value.strip())
    return values


def _ssh_g(host: str, config_file: str | None) -> dict[str, list[str]] | None:
    """``ssh -G`` for ``host``; None without ``ssh`` or when it fails."""
    text = _ssh_g_text(host, config_file)
    return None if text is None else parse_ssh_g(text)


@functools.lru_cache(maxsize=1)
def _openssh_defaults() -> dict[str, list[str]]:
    """What ``ssh -G`` prints with no config at all: tells an option the
    config set from OpenSSH's default (cached: one ``ssh -G`` a process)."""
    text = _ssh_g_text("sshrpc.invalid", os.devnull)
    return {} if text is None else parse_ssh_g(text)


def _ssh_g_text(host: str, config_file: str | None) -> str | None:
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
        log.info("ssh -G %s failed (%s); reading the config file myself", host, result.stderr)
        return None
    return result.stdout


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
                        if k in _ACCUMULATE:
                            values.setdefault(k, []).extend(v)
                        else:
                            values.setdefault(k, v)
            continue
        if key in _ACCUMULATE:
            values.setdefault(key, []).extend(args)
        elif key in _RAW and rest.strip():
            # A command line: the rest of the line as written, as OpenSSH does.
            values.setdefault(key, [rest.strip()])
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


def _tokens(text: str, option: str, table: dict[str, str]) -> str:
    """Expand ``%x`` tokens as OpenSSH does; an unknown token is an error."""

    def one(match: re.Match[str]) -> str:
        token = match.group(1)
        if token == "%":
            return "%"
        if token not in table:
            raise SSHConfigError(f"{option} {text}: unknown token %{token}")
        return table[token]

    return re.sub(r"%(.?)", one, text)


#: ssh -G key -> the option's name as ssh_config(5) spells it.
_NAMES = {
    "addressfamily": "AddressFamily",
    "bindaddress": "BindAddress",
    "bindinterface": "BindInterface",
    "canonicalizehostname": "CanonicalizeHostname",
    "controlmaster": "ControlMaster",
    "controlpath": "ControlPath",
    "identityagent": "IdentityAgent",
    "knownhostscommand": "KnownHostsCommand",
    "localcommand": "LocalCommand",
    "nohostauthenticationforlocalhost": "NoHostAuthenticationForLocalhost",
    "permitlocalcommand": "PermitLocalCommand",
    "pkcs11provider": "PKCS11Provider",
    "proxyusefdpass": "ProxyUseFdpass",
    "remotecommand": "RemoteCommand",
    "revokedhostkeys": "RevokedHostKeys",
    "securitykeyprovider": "SecurityKeyProvider",
    "stricthostkeychecking": "StrictHostKeyChecking",
    "tunnel": "Tunnel",
    "userknownhostsfile": "UserKnownHostsFile",
    "verifyhostkeydns": "VerifyHostKeyDNS",
}

#: Options sshrpc does not implement, with the values that are harmless (the
#: defaults as ``ssh -G`` prints them; an absent key is always fine) and why
#: another value is refused.  ``None`` as the allowed set: any value is refused.
REFUSED: dict[str, tuple[frozenset[str] | None, str]] = {
    "canonicalizehostname": (
        frozenset({"false", "no"}),
        "sshrpc does not canonicalize host names, so it could connect elsewhere than ssh",
    ),
    "verifyhostkeydns": (
        frozenset({"false", "no"}),
        "sshrpc does not look host keys up in DNS (SSHFP)",
    ),
    "knownhostscommand": (
        frozenset({"none"}),
        "sshrpc does not run a command to find known host keys",
    ),
    "revokedhostkeys": (frozenset({"none"}), "sshrpc does not read a revoked host keys file"),
    "nohostauthenticationforlocalhost": (
        frozenset({"no", "false"}),
        "sshrpc always checks the host key, also for localhost",
    ),
    "pkcs11provider": (frozenset({"none"}), "sshrpc cannot use PKCS#11 tokens"),
    "securitykeyprovider": (
        frozenset({"internal"}),
        "sshrpc cannot use another FIDO security key provider",
    ),
    "tunnel": (frozenset({"false", "no"}), "sshrpc does not open tun devices"),
    "remotecommand": (
        frozenset({"none"}),
        "sshrpc requests its subsystem and would not run this command",
    ),
    "proxyusefdpass": (
        frozenset({"no", "false"}),
        "sshrpc does not receive a connected socket from the ProxyCommand",
    ),
    "bindaddress": (None, "sshrpc does not bind the local end of the connection"),
    "bindinterface": (None, "sshrpc does not bind the local end of the connection"),
    "userknownhostsfile": (
        None,  # checked by value below: only "none" is refused
        "name a known_hosts file (or pass known_hosts=) so the host key can be checked",
    ),
    "stricthostkeychecking": (
        None,  # checked by value below
        "sshrpc never connects to a host whose key it has not verified; "
        "pass verify_host_key=False explicitly if you must",
    ),
    "identityagent": (
        None,  # checked by value below
        "sshrpc uses the agent at $SSH_AUTH_SOCK only (or none)",
    ),
}


def unsupported(values: dict[str, list[str]]) -> list[str]:
    """What in ``values`` (``ssh -G`` keys) sshrpc refuses: one sentence per
    option, naming it and its value.  Pure; an empty list means none."""
    found: list[str] = []

    def refuse(key: str, value: str) -> None:
        found.append(f"{_NAMES.get(key, key)} {value}: {REFUSED[key][1]}")

    for key, (allowed, _why) in REFUSED.items():
        for value in values.get(key) or []:
            low = value.lower()
            if key == "userknownhostsfile":
                if low == "none":
                    refuse(key, value)
            elif key == "stricthostkeychecking":
                if low in ("false", "no", "off"):
                    refuse(key, value)
            elif key == "identityagent":
                if low not in ("none", "ssh_auth_sock", "$ssh_auth_sock") and value != (
                    os.environ.get("SSH_AUTH_SOCK") or "\0"
                ):
                    refuse(key, value)
            elif allowed is None or low not in allowed:
                refuse(key, value)
    if (values.get("permitlocalcommand") or ["no"])[0].lower() in ("yes", "true") and (
        values.get("localcommand") or ["none"]
    )[0].lower() != "none":
        found.append(
            f"LocalCommand {values['localcommand'][0]} (with PermitLocalCommand yes): "
            "sshrpc does not run local commands"
        )
    return found


def _parse_jump(spec: str) -> tuple[str | None, str, int | None]:
    """``[user@]host[:port]`` or ``ssh://[user@]host[:port]`` -> parts."""
    text = spec.removeprefix("ssh://").rstrip("/")
    user, _, hostport = text.rpartition("@")
    port = ""
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port = rest.removeprefix(":")
    elif hostport.count(":") == 1:
        host, _, port = hostport.partition(":")
    else:
        host = hostport
    if not host or (port and not port.isdigit()):
        raise SSHConfigError(f"ProxyJump {spec}: not [user@]host[:port]")
    return (user or None), host, (int(port) if port else None)


def _proxy(
    values: dict[str, list[str]],
    *,
    original: str,
    hostname: str,
    port: int,
    user: str,
    config_file: str | None,
) -> Proxy | None:
    """The ProxyJump or ProxyCommand of ``values`` as an argv (pure).

    ProxyJump becomes ``ssh [-l U] [-p P] [-J FIRST,...] [-F CONFIG] -W
    [HOST]:PORT LAST``: exactly the ProxyCommand OpenSSH's own ``ssh``
    builds for ProxyJump (ssh.c), so every hop is verified, authenticated
    and configured by OpenSSH itself, as ``ssh host`` would.
    """
    jump = (values.get("proxyjump") or ["none"])[0]
    command = (values.get("proxycommand") or ["none"])[0]
    if jump.lower() != "none":
        ssh = shutil.which("ssh")
        if ssh is None:
            raise SSHConfigError(
                f"ProxyJump {jump}: sshrpc runs OpenSSH's ssh -W for each hop, "
                "and the ssh client is not installed"
            )
        hops = [h.strip() for h in jump.split(",") if h.strip()]
        jump_user, jump_host, jump_port = _parse_jump(hops[-1])
        for hop in hops[:-1]:
            _parse_jump(hop)
        argv = [ssh]
        if jump_user:
            argv += ["-l", jump_user]
        if jump_port:
            argv += ["-p", str(jump_port)]
        if len(hops) > 1:
            argv += ["-J", ",".join(hops[:-1])]
        if config_file is not None:
            argv += ["-F", config_file]
        argv += ["-W", f"[{hostname}]:{port}", jump_host]
        return Proxy("ProxyJump", jump, tuple(argv))
    if command.lower() != "none":
        if command == "-":
            raise SSHConfigError("ProxyCommand -: sshrpc needs a command (or a direct connection)")
        expanded = _tokens(
            command,
            "ProxyCommand",
            {"h": hostname, "p": str(port), "r": user, "n": original},
        )
        shell = os.environ.get("SHELL") or "/bin/sh"
        return Proxy("ProxyCommand", command, (shell, "-c", "exec " + expanded))
    return None


def _algorithms(value: str, defaults: tuple[str, ...]) -> tuple[str, ...]:
    """A HostKeyAlgorithms value, with the ``+``/``-``/``^`` forms the
    fallback parser may see (``ssh -G`` prints the final list)."""
    if value[:1] in "+-^":
        items = [a for a in value[1:].split(",") if a]
        if value[0] == "+":
            return tuple(defaults) + tuple(a for a in items if a not in defaults)
        if value[0] == "-":
            return tuple(a for a in defaults if a not in items)
        return tuple(items) + tuple(a for a in defaults if a not in items)
    return tuple(a for a in value.split(",") if a)


def settings_from_values(
    host: str,
    values: dict[str, list[str]],
    *,
    source: str,
    defaults: dict[str, list[str]] | None = None,
    port: int | None = None,
    user: str | None = None,
    identity: str | os.PathLike[str] | list[str | os.PathLike[str]] | None = None,
    known_hosts: str | os.PathLike[str] | None = None,
    config_file: str | None = None,
) -> SSHSettings:
    """``SSHSettings`` from ``ssh -G`` output (or the fallback parser's)
    ``values`` and the explicit arguments.  Pure (no I/O but ``~``).

    ``defaults`` is what ``ssh -G`` prints without any config: an option
    equal to it was not set by the config.  Raises ``SSHConfigError`` for
    an option sshrpc refuses (``unsupported``).
    """
    refused = unsupported(values)
    if refused:
        raise SSHConfigError(
            f"the ssh config for {host!r} sets what sshrpc does not implement: "
            + "; ".join(refused)
            + f".  Change the config for this host (or {hint('no_config')})"
        )
    defaults = defaults or {}

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
    global_listed: list[str] = []
    for entry in values.get("globalknownhostsfile") or list(_DEFAULT_GLOBAL_KNOWN_HOSTS):
        global_listed.extend(p for p in entry.split() if p.lower() != "none")
    global_known = tuple(_expand(p, hostname, final_user, final_port) for p in global_listed)
    identities_only = (first("identitiesonly") or "no").lower() in ("yes", "true")
    alias = first("hostkeyalias")

    def explicit_list(key: str, fallback: tuple[str, ...]) -> tuple[str, ...] | None:
        """An algorithm list the config sets (differs from OpenSSH's default)."""
        value = first(key)
        if value is None or (source == "ssh -G" and value == (defaults.get(key) or [""])[0]):
            return None
        return _algorithms(value, fallback)

    explicit = explicit_list("hostkeyalgorithms", DEFAULT_HOST_KEY_ALGORITHMS)
    strict = (first("stricthostkeychecking") or "ask").lower()
    timeout = first("connecttimeout")
    alive = first("serveraliveinterval")
    alive_max = first("serveralivecountmax")
    try:
        connect_timeout = None if timeout in (None, "none") else float(timeout)
        alive_interval = float(alive or 0)
        alive_count = int(alive_max or 3)
    except ValueError as exc:
        raise SSHConfigError(f"the ssh config for {host!r}: {exc}") from None
    certificates = tuple(
        _expand(p, hostname, final_user, final_port)
        for p in values.get("certificatefile") or []
        if p.lower() != "none"
    )
    family = (first("addressfamily") or "any").lower()
    return SSHSettings(
        hostname=hostname,
        port=final_port,
        user=final_user,
        identity_files=identities,
        default_identities=default_ids,
        identities_only=identities_only,
        known_hosts_files=known,
        source=source,
        global_known_hosts_files=global_known,
        host_key_alias=None if alias is None or alias.lower() == "none" else alias,
        host_key_algorithms=explicit,
        accept_new_host_keys=strict == "accept-new",
        hash_known_hosts=(first("hashknownhosts") or "no").lower() in ("yes", "true"),
        proxy=_proxy(
            values,
            original=host,
            hostname=hostname,
            port=final_port,
            user=final_user,
            config_file=config_file,
        ),
        connect_timeout=connect_timeout,
        server_alive_interval=alive_interval,
        server_alive_count_max=alive_count,
        certificate_files=certificates,
        agent=(first("identityagent") or "").lower() != "none",
        address_family=family if family in ("inet", "inet6") else "any",
        original_host=host,
        ciphers=explicit_list("ciphers", DEFAULT_CIPHERS),
        macs=explicit_list("macs", DEFAULT_MACS),
        kex_algorithms=explicit_list("kexalgorithms", DEFAULT_KEX),
    )


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
    worker thread in async code.  Raises ``SSHConfigError`` for an option
    sshrpc refuses."""
    values: dict[str, list[str]] = {}
    source = "none"
    defaults: dict[str, list[str]] = {}
    cfg = os.fspath(config_file) if config_file is not None else None
    if use_config:
        got = _ssh_g(host, cfg)
        if got is not None:
            values, source = got, "ssh -G"
            defaults = _openssh_defaults()
        else:
            path = Path(cfg) if cfg is not None else Path("~/.ssh/config").expanduser()
            try:
                values = parse_config_text(path.read_text(), host)
                source = "parser"
            except OSError:
                values = {}
    settings = settings_from_values(
        host,
        values,
        source=source,
        defaults=defaults,
        port=port,
        user=user,
        identity=identity,
        known_hosts=known_hosts,
        config_file=cfg,
    )
    log.info(
        "%s: config from %s%s: %s@%s port %s%s",
        host,
        source,
        f" ({cfg})" if cfg else "",
        settings.user,
        settings.hostname,
        settings.port,
        f" via {settings.proxy.option} {settings.proxy.spec}" if settings.proxy else "",
    )
    log.debug("%s: effective settings %s", host, settings)
    return settings
