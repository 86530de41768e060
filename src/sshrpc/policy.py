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

Sends (``{send, Dest, Msg}`` from a client) are under the policy too::

    [[rule]]
    keys = ["ops@*"]
    allow = ["jobs"]
    send = ["jobs_*", "logger"]   # registered names (globs) this key may send to
    send_pids = "session"         # pids: "session" (default), "key" or "any"

A client may always send to its own session pid and to the processes its own
session spawned.  ``send_pids = "key"`` widens that to processes spawned by
any session of the same key, ``"any"`` to every pid of the node (other
sessions' mailboxes included).  A rule without ``send`` allows no registered
name; the default policy (no file) allows every name, and pids per session.
Sends by service code (``sshrpc.node.send``) are not checked: the code is
trusted.

Audit (``AUDIT_LOGGER``): one line per call, cast, spawn, legacy mfa and
client send, with every field escaped (``_saferepr.clean``) so a name holding
a newline cannot forge a line.  Allowed requests are logged at
``Auditor.allowed_level`` (INFO by default); denials at WARNING, rate-limited
per key: an identical denial is logged once per ``window`` seconds and then
as ``... repeated N times``, and at most ``burst`` denial lines per key per
window are written (then ``N more denials not logged``).
"""

from __future__ import annotations

import binascii
import contextvars
import fnmatch
import logging
import os
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ._saferepr import clean
from ._sshd import key_fingerprint
from ._types import Atom
from .service import Exported, Service

__all__ = [
    "AUDIT_LOGGER",
    "Auditor",
    "Decision",
    "ExposureTable",
    "KeyIdentity",
    "Policy",
    "PolicyError",
    "Rule",
    "identify_key",
]

#: The logger audit lines go to (one per request at INFO by default, one per
#: denied request at WARNING, rate-limited); route it to syslog with
#: ``logging.handlers.SysLogHandler``.
AUDIT_LOGGER = "sshrpc.audit"

Outcome = Literal["allow", "forbidden", "undef"]
PidScope = Literal["session", "key", "any"]
_SCOPES: dict[str, int] = {"session": 0, "key": 1, "any": 2}


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
    send: tuple[str, ...] = ()
    send_pids: PidScope | None = None

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
        return cls((Rule(("*",), (("*", "*", "*"),), (), ("*",)),))

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
            bad = set(raw) - {"keys", "allow", "deny", "send", "send_pids"}
            if bad:
                raise PolicyError(f"{source}: rule {n}: unknown keys {sorted(bad)}")
            lists = {}
            for name in ("keys", "allow", "deny", "send"):
                value = raw.get(name, ["*"] if name == "keys" else [])
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise PolicyError(f"{source}: rule {n}: '{name}' must be a list of strings")
                lists[name] = value
            scope = raw.get("send_pids")
            if scope is not None and scope not in _SCOPES:
                raise PolicyError(
                    f'{source}: rule {n}: \'send_pids\' must be "session", "key" or "any"'
                )
            rules.append(
                Rule(
                    tuple(lists["keys"]),
                    tuple(_split_pattern(p) for p in lists["allow"]),
                    tuple(_split_pattern(p) for p in lists["deny"]),
                    tuple(lists["send"]),
                    scope,
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

    def may_send_to_name(self, key: KeyIdentity, name: str) -> bool:
        """True when some rule for ``key`` lists the registered ``name`` (a
        glob) in its ``send``."""
        return any(
            rule.matches_key(key) and any(fnmatch.fnmatchcase(name, p) for p in rule.send)
            for rule in self.rules
        )

    def pid_scope(self, key: KeyIdentity) -> PidScope:
        """Which pids ``key`` may send to: ``session`` (its own session and the
        processes it spawned; the default), ``key`` (every session of this
        key) or ``any``; the widest of the rules for ``key``."""
        widest: PidScope = "session"
        for rule in self.rules:
            scope = rule.send_pids
            if scope is not None and _SCOPES[scope] > _SCOPES[widest] and rule.matches_key(key):
                widest = scope
        return widest


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

    def callable_arities(self, key: KeyIdentity, module: str, function: str) -> list[int]:
        """The arities of ``module:function`` that ``key`` may call (for
        ``*args`` functions, up to eight past the minimum), ``[]`` if none."""
        service = self.services.get(module)
        exported = service.functions.get(function) if service is not None else None
        if exported is None:
            return []
        return [
            a for a in _sample_arities(exported) if self.policy.permits(key, module, function, a)
        ]

    def exports(self, key: KeyIdentity) -> list[tuple[Atom, Atom, int | tuple[int, Atom]]]:
        """What ``key`` may call, as Erlang-style ``{Module, Function, Arity}``
        terms (``{Min, infinity}`` for a ``*args`` function allowed from its
        minimum on): the answer of the built-in ``sshrpc:exports/0``."""
        out: list[tuple[Atom, Atom, int | tuple[int, Atom]]] = []
        for service in sorted(self.services.values(), key=lambda s: s.name):
            for name in sorted(service.functions):
                exported = service.functions[name]
                arities = self.callable_arities(key, service.name, name)
                if exported.max_arity is None and arities == list(_sample_arities(exported)):
                    out.append((Atom(service.name), Atom(name), (arities[0], Atom("infinity"))))
                    continue
                out.extend((Atom(service.name), Atom(name), a) for a in arities)
        return out

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

#: Outcomes that are denials: logged at WARNING and rate-limited.
DENIALS = frozenset({"forbidden", "undef", "noproc", "dropped", "overload"})


def _line_start(name: tuple[str, str, str, str, int, str]) -> str:
    """An audit line of a request that ran, up to its duration, for
    ``name`` = (fingerprint, kind, module, function, arity, outcome)."""
    fingerprint, kind, module, function, arity, outcome = name
    what = clean(f"{kind} {module}:{function}/{arity}", 600)
    return f"key={clean(fingerprint or '-', 120)} {what} outcome={clean(outcome, 60)} duration_ms="


class Auditor:
    """Writes audit lines to ``logger``; one per node.

    ``allowed_level``: the level of lines for requests that ran (whatever
    their outcome: ``ok``, ``error``, ``timeout``, ``disconnected``...).
    Denials (``DENIALS``) are WARNING lines, rate-limited per key: an
    identical line at most once per ``window`` seconds, then ``... repeated
    N times``; at most ``burst`` denial lines per key per window, then ``N
    more denials not logged``.  The bookkeeping is bounded (``max_entries``).
    Every field is escaped with ``clean``.  Never raises for any input.

    ``write``: where lines go, ``write(level, line)``; by default
    ``logger.log``.  (``sshrpc serve`` passes ``_auditlog.AuditStream``,
    which writes the same text once per loop turn.)  ``logger``'s level
    decides which lines are written either way.
    """

    def __init__(
        self,
        *,
        allowed_level: int = logging.INFO,
        window: float = 10.0,
        burst: int = 20,
        max_entries: int = 4096,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
        write: Callable[[int, str], None] | None = None,
        write_requests: Callable[[int, list[tuple[str, float, float]]], None] | None = None,
        write_calls: Callable[
            [int, list[tuple[tuple[str, str, int], float, float]], dict[Any, str], float], bool
        ]
        | None = None,
    ) -> None:
        self.allowed_level = allowed_level
        self.window = window
        self.burst = burst
        self.max_entries = max_entries
        self.logger = logger or _audit
        self.clock = clock
        self._write = write or self._log
        #: ``write_requests(level, [(start, duration, when), ...])``: how
        #: ``record_calls`` hands over its lines, if given (``sshrpc
        #: serve``'s ``AuditStream.write_requests``); else ``write`` each.
        self._write_requests = write_requests
        #: ``write_calls(level, calls, starts, offset)``: ``record_calls``'s
        #: lines in one go, if it can (``AuditStream.write_calls``: True).
        self._write_calls = write_calls
        # fingerprint -> (module, function, arity) -> the line of an ``ok``
        # call up to its duration (``record_calls``); entries in all
        self._ok_starts: dict[str, dict[tuple[str, str, int], str]] = {}
        self._ok_count = 0
        # (fingerprint, kind, module, function, arity, outcome) -> the
        # escaped line up to its duration (``record_request``)
        self._starts: dict[tuple[str, str, str, str, int, str], str] = {}
        # line -> [window start, identical lines not logged]
        self._same: dict[str, list[float]] = {}
        # fingerprint -> [window start, lines logged, lines not logged]
        self._per_key: dict[str, list[float]] = {}

    def enabled(self, outcome: str) -> bool:
        """Whether a line with ``outcome`` would be written (the level check)."""
        level = logging.WARNING if outcome in DENIALS else self.allowed_level
        return self.logger.isEnabledFor(level)

    def record(self, key: KeyIdentity, what: str, outcome: str, duration: float | None) -> None:
        """One request: ``what`` is e.g. ``call m:f/2`` or ``send <dest>``
        (escaped here)."""
        denied = outcome in DENIALS
        if not self.logger.isEnabledFor(logging.WARNING if denied else self.allowed_level):
            return
        fingerprint = clean(key.fingerprint or "-", 120)
        line = f"key={fingerprint} {clean(what, 600)} outcome={clean(outcome, 60)}"
        if duration is not None:
            line += f" duration_ms={duration * 1000.0:.3f}"
        if not denied:
            self._write(self.allowed_level, line)
            return
        now = self.clock()
        same = self._same.get(line)
        if same is not None and now - same[0] < self.window:
            same[1] += 1
            return
        quota = self._per_key.get(fingerprint)
        if quota is None or now - quota[0] >= self.window:
            if quota is not None and quota[2]:
                self._more(fingerprint, int(quota[2]))
            if quota is None and len(self._per_key) >= self.max_entries:
                self._expire(now)
                while len(self._per_key) >= self.max_entries:  # the oldest goes
                    oldest = next(iter(self._per_key))
                    self._more(oldest, int(self._per_key.pop(oldest)[2]))
            quota = self._per_key[fingerprint] = [now, 0, 0]
        if same is not None:
            self._repeated(line, int(same[1]))
            del self._same[line]
        if quota[1] >= self.burst:
            quota[2] += 1
            return
        quota[1] += 1
        if len(self._same) >= self.max_entries:
            self._expire(now)
            while len(self._same) >= self.max_entries:  # the oldest goes
                oldest = next(iter(self._same))
                self._repeated(oldest, int(self._same.pop(oldest)[1]))
        self._same[line] = [now, 0]
        self._write(logging.WARNING, line)

    def record_request(
        self,
        key: KeyIdentity,
        kind: str,
        module: str,
        function: str,
        arity: int,
        outcome: str,
        duration: float,
    ) -> None:
        """``record(key, f"{kind} {module}:{function}/{arity}", outcome,
        duration)``, the same line, cheaper for a request that ran (the
        node's per-call line): the text up to the duration is kept per
        (key, request, outcome), bounded by ``max_entries``."""
        if outcome in DENIALS:
            self.record(key, f"{kind} {module}:{function}/{arity}", outcome, duration)
            return
        level = self.allowed_level
        if not self.logger.isEnabledFor(level):
            return
        name = (key.fingerprint, kind, module, function, arity, outcome)
        start = self._starts.get(name)
        if start is None:
            start = _line_start(name)
            if len(self._starts) >= self.max_entries:
                self._starts.clear()
            self._starts[name] = start
        self._write(level, f"{start}{duration * 1000.0:.3f}")

    def record_calls(
        self, key: KeyIdentity, calls: list[tuple[tuple[str, str, int], float, float]]
    ) -> None:
        """``record_request(key, "call", module, function, arity, "ok",
        end - start)`` for each ``((module, function, arity), start, end)``
        of ``calls`` in order (``start``/``end``: ``time.perf_counter()``
        readings), the same lines, timed at each ``end``: the node's
        per-call lines, handed over once per read of its channel.  One
        level check for all; the text up to the duration is kept per key
        and name (bounded by ``max_entries``)."""
        level = self.allowed_level
        if not calls or not self.logger.isEnabledFor(level):
            return
        fingerprint = key.fingerprint
        starts = self._ok_starts.get(fingerprint)
        if starts is None:
            starts = self._ok_starts[fingerprint] = {}
        offset = time.time() - time.perf_counter()
        if self._write_calls is not None and self._write_calls(level, calls, starts, offset):
            return
        items: list[tuple[str, float, float]] = []
        for name, start_at, end_at in calls:
            start = starts.get(name)
            if start is None:
                start = _line_start((fingerprint, "call", *name, "ok"))
                if self._ok_count >= self.max_entries:
                    self._ok_starts.clear()
                    self._ok_count = 0
                    starts = self._ok_starts[fingerprint] = {}
                starts[name] = start
                self._ok_count += 1
            items.append((start, end_at - start_at, end_at + offset))
        if self._write_requests is not None:
            self._write_requests(level, items)
        else:
            write = self._write
            for start, duration, _ in items:
                write(level, f"{start}{duration * 1000.0:.3f}")

    def flush(self, *, expired_only: bool = False) -> None:
        """Write the pending counts (``repeated N times``, ``N more denials
        not logged``) and forget them: of windows that have passed (the node
        does this every ``window`` seconds and as channels end), or all
        (when the node stops).  Windows still running are kept, so ending
        channels cannot reset a key's budget."""
        if expired_only:
            self._expire(self.clock())
            return
        for line, (_, count) in self._same.items():
            self._repeated(line, int(count))
        for fingerprint, (_, _, count) in self._per_key.items():
            self._more(fingerprint, int(count))
        self._same.clear()
        self._per_key.clear()

    def _expire(self, now: float) -> None:
        for line in [k for k, v in self._same.items() if now - v[0] >= self.window]:
            self._repeated(line, int(self._same.pop(line)[1]))
        for fp in [k for k, v in self._per_key.items() if now - v[0] >= self.window]:
            self._more(fp, int(self._per_key.pop(fp)[2]))

    def _log(self, level: int, line: str) -> None:
        self.logger.log(level, "%s", line)

    def _repeated(self, line: str, count: int) -> None:
        if count:
            self._write(logging.WARNING, f"{line} (repeated {count} times)")

    def _more(self, fingerprint: str, count: int) -> None:
        if count:
            self._write(logging.WARNING, f"key={fingerprint}: {count} more denials not logged")


_default_auditor = Auditor()
#: The auditor of the node serving the current task (set per channel).
current_auditor: contextvars.ContextVar[Auditor] = contextvars.ContextVar(
    "sshrpc_auditor", default=_default_auditor
)


def audit(
    key: KeyIdentity,
    kind: str,
    module: str,
    function: str,
    arity: int,
    outcome: str,
    duration: float,
) -> None:
    """Log one audit line for ``kind`` (``call``, ``cast``, ``spawn``,
    ``mfa``) ``module:function/arity`` through the current node's
    ``Auditor``: at its allowed level for a request that ran, WARNING
    (rate-limited) when denied.

    ``outcome`` is ``ok``, ``forbidden``, ``undef``, ``error``, ``exit``,
    ``throw``, ``timeout``, ``cancelled``, ``disconnected``, ...
    """
    current_auditor.get().record_request(key, kind, module, function, arity, outcome, duration)


def audit_send(key: KeyIdentity, dest: str, outcome: str) -> None:
    """Log one client ``send`` to ``dest`` (text of the pid or name):
    ``ok``, ``forbidden`` (the policy), ``noproc`` (no such process) or
    ``dropped`` (its mailbox is full)."""
    current_auditor.get().record(key, f"send {dest}", outcome, None)
