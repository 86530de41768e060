"""Who may call what: the exposure table, the policy file and the audit log.  No I/O
except reading the policy and authorized_keys files.

One table drives three things (as sftp-server's ``handlers[]`` does): the
access decision for every ``call``/``cast``/``spawn``/legacy ``mfa``, the
audit log line, and the listing ``sshrpc serve --list`` prints.

Decisions (PROTOCOL.md section 5):

- nothing outside the exported functions ever runs;
- ``forbidden``: the policy does not expose ``M:F/A`` to this key, or ``M``
  is not a service this key can reach (whether or not it exists);
- ``undef``: the policy would allow ``M:F/A`` and ``M`` is a service this key
  can reach, but it has no such function or arity;
- ``allow``: run it.

Without a policy every exported function is exposed to every key that sshd
let in.  The policy file (TOML) narrows that::

    # Rules are checked for the key that authenticated; a key that matches no
    # rule can call nothing.
    [[rule]]
    keys = ["*"]                          # every key (fingerprint or comment globs)
    allow = ["lists", "echo:echo/1"]      # service, service:function, service:function/arity

    [[rule]]
    keys = ["SHA256:3m6Vx...", "ops@*"]   # fingerprints or authorized_keys comments
    allow = ["*"]
    deny = ["os:getpid/0"]                # deny beats allow

Patterns are shell globs (``fnmatch``) on ``service``, ``service:function``
or ``service:function/arity``; a missing part matches anything.
"""

from __future__ import annotations

import binascii
import fnmatch
import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ._sshd import key_fingerprint
from .service import Exported, Service

__all__ = [
    "AUDIT_LOGGER",
    "Decision",
    "ExposureTable",
    "KeyIdentity",
    "Policy",
    "PolicyError",
    "Rule",
    "identify_key",
]

#: The logger audit lines go to (one per call at DEBUG, one per denied call at
#: WARNING); route it to syslog with ``logging.handlers.SysLogHandler``.
AUDIT_LOGGER = "sshrpc.audit"

Outcome = Literal["allow", "forbidden", "undef"]


class PolicyError(ValueError):
    """The policy file is missing, unreadable or malformed.  The message names
    the file and what is wrong."""


@dataclass(frozen=True, slots=True)
class KeyIdentity:
    """The key sshd authenticated a channel with.

    ``fingerprint`` is ``SHA256:...``; ``comment`` is the comment of the
    matching authorized_keys line (if known).  ``ANONYMOUS`` (no key known,
    such as in-process mode without ``$SSH_USER_AUTH``) matches only rules
    with ``keys = ["*"]``.
    """

    fingerprint: str = ""
    comment: str = ""
    key_type: str = ""
    method: str = ""

    def __str__(self) -> str:
        if not self.fingerprint:
            return "-"
        return f"{self.fingerprint} ({self.comment})" if self.comment else self.fingerprint


ANONYMOUS = KeyIdentity()


def identify_key(user_auth: str, authorized_keys: str | os.PathLike[str] | None) -> KeyIdentity:
    """The key in sshd's ``$SSH_USER_AUTH`` text (``ExposeAuthInfo``).

    The text has one line per successful auth method, ``publickey TYPE BASE64``;
    the last ``publickey`` line names the key.  Its comment comes from the
    authorized_keys line with the same key blob, when that file is readable.
    """
    key_type = blob = ""
    for line in user_auth.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] == "publickey":
            key_type, blob = fields[1], fields[2]
    if not blob:
        return ANONYMOUS
    try:
        fingerprint = key_fingerprint(f"{key_type} {blob}")
    except (ValueError, binascii.Error):
        return ANONYMOUS
    comment = ""
    if authorized_keys is not None:
        try:
            with open(authorized_keys, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            lines = []
        for line in lines:
            fields = line.split()
            if blob in fields:
                rest = fields[fields.index(blob) + 1 :]
                comment = " ".join(rest)
                break
    return KeyIdentity(fingerprint, comment, key_type, "publickey")


def _split_pattern(pattern: str) -> tuple[str, str, str]:
    service, _, rest = pattern.partition(":")
    function, _, arity = rest.partition("/")
    return service or "*", function or "*", arity or "*"


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``[[rule]]``: for keys matching ``keys``, allow and deny patterns."""

    keys: tuple[str, ...]
    allow: tuple[tuple[str, str, str], ...]
    deny: tuple[tuple[str, str, str], ...]

    def matches_key(self, key: KeyIdentity) -> bool:
        for pattern in self.keys:
            if pattern == "*":
                return True
            if key.fingerprint and (
                pattern == key.fingerprint
                or (key.comment and fnmatch.fnmatchcase(key.comment, pattern))
            ):
                return True
        return False

    @staticmethod
    def _hit(patterns: tuple[tuple[str, str, str], ...], m: str, f: str, a: int) -> bool:
        return any(
            fnmatch.fnmatchcase(m, pm)
            and fnmatch.fnmatchcase(f, pf)
            and fnmatch.fnmatchcase(str(a), pa)
            for pm, pf, pa in patterns
        )


@dataclass(frozen=True)
class Policy:
    """Allow/deny rules per key.  ``Policy.load(path)`` reads the TOML file;
    ``Policy.allow_all()`` is the default (every exported function)."""

    rules: tuple[Rule, ...]
    source: str = "<default>"

    @classmethod
    def allow_all(cls) -> Policy:
        return cls((Rule(("*",), (("*", "*", "*"),), ()),))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "<policy>") -> Policy:
        """Build from parsed TOML; raises ``PolicyError`` naming ``source``."""
        unknown = set(data) - {"rule"}
        if unknown:
            raise PolicyError(f"{source}: unknown top-level keys {sorted(unknown)}")
        raw_rules = data.get("rule", [])
        if not isinstance(raw_rules, list):
            raise PolicyError(f"{source}: 'rule' must be an array of tables ([[rule]])")
        rules = []
        for n, raw in enumerate(raw_rules, 1):
            if not isinstance(raw, dict):
                raise PolicyError(f"{source}: rule {n} is not a table")
            bad = set(raw) - {"keys", "allow", "deny"}
            if bad:
                raise PolicyError(f"{source}: rule {n}: unknown keys {sorted(bad)}")
            lists = {}
            for name in ("keys", "allow", "deny"):
                value = raw.get(name, ["*"] if name == "keys" else [])
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise PolicyError(f"{source}: rule {n}: '{name}' must be a list of strings")
                lists[name] = value
            rules.append(
                Rule(
                    tuple(lists["keys"]),
                    tuple(_split_pattern(p) for p in lists["allow"]),
                    tuple(_split_pattern(p) for p in lists["deny"]),
                )
            )
        return cls(tuple(rules), source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Policy:
        """Read a TOML policy file; raises ``PolicyError`` (one line)."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise PolicyError(f"cannot read policy file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"policy file {path}: {exc}") from exc
        return cls.from_mapping(data, str(path))

    def permits(self, key: KeyIdentity, module: str, function: str, arity: int) -> bool:
        """True when some rule for ``key`` allows ``module:function/arity`` and
        none denies it."""
        allowed = False
        for rule in self.rules:
            if not rule.matches_key(key):
                continue
            if Rule._hit(rule.deny, module, function, arity):
                return False
            allowed = allowed or Rule._hit(rule.allow, module, function, arity)
        return allowed


@dataclass(frozen=True, slots=True)
class Decision:
    """The table's answer for one request: ``outcome`` and, when allowed, the
    function to run."""

    outcome: Outcome
    exported: Exported | None = None


@dataclass
class ExposureTable:
    """Services + policy: the single source for access decisions, audit and
    listing."""

    services: dict[str, Service]
    policy: Policy = field(default_factory=Policy.allow_all)

    def _module_exposed(self, key: KeyIdentity, service: Service) -> bool:
        return any(
            self.policy.permits(key, service.name, e.name, a)
            for e in service.functions.values()
            for a in _sample_arities(e)
        )

    def decide(self, key: KeyIdentity, module: str, function: str, arity: int) -> Decision:
        """``allow`` (with the function), ``forbidden`` or ``undef``; see the
        module docstring.  Never raises for any names."""
        service = self.services.get(module)
        if service is None or not self.policy.permits(key, module, function, arity):
            return Decision("forbidden")
        exported = service.lookup(function, arity)
        if exported is None:
            if self._module_exposed(key, service):
                return Decision("undef")
            return Decision("forbidden")
        return Decision("allow", exported)

    def rows(self, key: KeyIdentity | None = None) -> list[tuple[str, str, str, str]]:
        """``(service, function/arity, kind, access)`` for every exported
        function; ``access`` is ``allowed``/``denied`` for ``key``, or the
        policy source when ``key`` is ``None``."""
        out: list[tuple[str, str, str, str]] = []
        for service in sorted(self.services.values(), key=lambda s: s.name):
            for name in sorted(service.functions):
                e = service.functions[name]
                if key is None:
                    access = ""
                else:
                    ok = any(
                        self.policy.permits(key, service.name, name, a) for a in _sample_arities(e)
                    )
                    access = "allowed" if ok else "denied"
                out.append((service.name, f"{name}/{e.arity_text}", e.kind, access))
        return out

    def listing(self, key: KeyIdentity | None = None) -> str:
        """The table as aligned text lines (for ``sshrpc serve --list``)."""
        rows = self.rows(key)
        if not rows:
            return "(no exported functions)\n"
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "".join(
            "  ".join(col.ljust(w) for col, w in zip(r, widths, strict=True)).rstrip() + "\n"
            for r in rows
        )


def _sample_arities(e: Exported) -> range:
    upper = e.max_arity if e.max_arity is not None else e.min_arity + 8
    return range(e.min_arity, upper + 1)


_audit = logging.getLogger(AUDIT_LOGGER)


def audit(
    key: KeyIdentity,
    kind: str,
    module: str,
    function: str,
    arity: int,
    outcome: str,
    duration: float,
) -> None:
    """Log one audit line: DEBUG for a call that ran, WARNING when denied.

    ``outcome`` is ``ok``, ``forbidden``, ``undef``, ``error``, ``exit``,
    ``throw``, ``timeout``, ``cancelled``, ...
    """
    level = logging.WARNING if outcome == "forbidden" else logging.DEBUG
    if _audit.isEnabledFor(level):
        _audit.log(
            level,
            "key=%s %s %s:%s/%d outcome=%s duration_ms=%.3f",
            key.fingerprint or "-",
            kind,
            module,
            function,
            arity,
            outcome,
            duration * 1000.0,
        )
