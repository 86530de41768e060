"""Every exception sshrpc raises or lets service code raise.  No I/O.

Each docstring says who raises it and what to do about it.  The public names
are re-exported from ``sshrpc``.
"""

from __future__ import annotations

import contextvars
from typing import Any

from ._saferepr import clean as _clean
from ._saferepr import safe_repr as _safe_repr
from ._types import Atom as _atom

__all__ = [
    "AuthenticationFailed",
    "ConnectionLost",
    "Error",
    "Exit",
    "Forbidden",
    "FrameTooLarge",
    "HostKeyError",
    "HostKeyMismatch",
    "LocalProtocolError",
    "MessageTooLarge",
    "NodeTimeout",
    "Overload",
    "ProtocolError",
    "RemoteError",
    "RemoteTimeout",
    "SSHConfigError",
    "SSHRPCError",
    "TermError",
    "Throw",
    "Undef",
    "UnknownHostKey",
    "hint",
    "hint_style",
]

#: Who reads our error messages: ``"python"`` (the default: hints name the
#: keyword arguments of ``open_connection``) or ``"cli"`` (hints name the
#: flags of ``sshrpc call``).  The CLI sets it before it connects; as a
#: ``ContextVar`` it follows the Trio tasks and worker threads it starts.
hint_style: contextvars.ContextVar[str] = contextvars.ContextVar(
    "sshrpc_hint_style", default="python"
)

#: What each hint says to a Python caller and to a CLI user.
_HINTS: dict[str, tuple[str, str]] = {
    "accept_new": ("connect with accept_new_host_keys=True", "run with --accept-new-host-key"),
    "passphrase": (
        "pass its passphrase as passphrase=",
        "put its passphrase in the environment variable named by --passphrase-env "
        "(default SSHRPC_PASSPHRASE)",
    ),
    "identity": ("identity=", "-i FILE"),
    "no_config": (
        "pass use_ssh_config=False with explicit arguments",
        "run with -F /dev/null and explicit flags (-l, -p, -i, --known-hosts)",
    ),
}


def hint(name: str) -> str:
    """The hint ``name`` in the words of the current ``hint_style``."""
    python, cli = _HINTS[name]
    return cli if hint_style.get() == "cli" else python


class SSHRPCError(Exception):
    """Base class of the errors sshrpc raises for network and remote failures."""


class TermError(ValueError):
    """Raised by ``decode`` for bytes that are not a valid term within the
    configured limits, and by ``encode`` for a value that has no Erlang term.

    The message names the byte offset (0 is the version byte 131) and what
    was wrong.  ``offset`` holds the offset, or ``None`` for encode errors.
    """

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message if offset is None else f"{message} at byte {offset}")
        self.offset = offset
        self.detail = message


class ProtocolError(SSHRPCError):
    """The peer broke PROTOCOL.md (a malformed frame, a bad hello, a duplicate
    id, junk before the hello).  The channel is closed; open a new one.
    ``bye`` holds the ``{bye, Reason}`` reason term that was (or would be)
    sent to the peer."""

    def __init__(self, message: str, bye: Any = None) -> None:
        super().__init__(message)
        self.bye = bye


class FrameTooLarge(ProtocolError):
    """A frame's length is above the receiver's ``max_frame``.  Raised before
    the payload is read; the sender must split its data or the receiver must
    announce a larger ``max_frame``."""

    def __init__(self, length: int, maximum: int) -> None:
        super().__init__(
            f"frame of {length} bytes is larger than max_frame {maximum}",
            bye=(_atom("frame_too_large"), length, maximum),
        )
        self.length = length
        self.maximum = maximum


class LocalProtocolError(Exception):
    """Raised by ``sshrpc.protocol.Connection.send`` when *this* side tries
    something PROTOCOL.md forbids in the current state: an answer for an id
    that is not open (or a second final answer), a chunk without credit, a
    call whose id is already open, a call after ``bye``, anything after the
    connection closed.  Nothing was sent and the connection's state is
    unchanged.  It is a bug in the code driving the connection: fix the
    caller; retrying the same event fails the same way."""


class MessageTooLarge(ValueError):
    """Raised by ``sshrpc.protocol.Connection.send`` when an event's payload
    would exceed the peer's ``max_frame``.  Nothing was sent, no id was
    opened and the connection is still usable: send smaller arguments (split
    the data over several calls), or ask the peer to announce a larger
    ``max_frame``.  (A server's too-large final answer is not raised: it is
    replaced by ``{error, Id, {sshrpc, too_large, #{}}}``.)"""

    def __init__(self, size: int, maximum: int) -> None:
        super().__init__(f"payload of {size} bytes is larger than the peer's max_frame {maximum}")
        self.size = size
        self.maximum = maximum


class ConnectionLost(SSHRPCError):
    """The SSH connection or channel ended (peer closed it, network failure,
    keepalive missed, server sent ``bye``) while a call was open.  The call's
    outcome on the server is unknown: retry only idempotent work.

    Raised by ``RequestSet.receive_response``, ``label`` is the label of
    the request it ended (None otherwise)."""

    label: Any = None


class ChannelRefused(ConnectionLost):
    """``Connection.open_channel()`` got no new sshrpc session on the kept
    SSH connection: sshd refused the channel (``MaxSessions``) or the
    subsystem, or the node refused the session before its hello (``reason``
    is the node's bye reason, e.g. ``(Atom("too_many_channels"), 4)``; None
    when sshd refused).  The parent connection and its other channels are
    not affected."""

    def __init__(self, message: str, reason: Any = None) -> None:
        super().__init__(message)
        self.reason = reason


class SSHConfigError(SSHRPCError):
    """The ssh config (``ssh -G``) sets an option that could change where
    sshrpc connects or whom it trusts and that sshrpc does not implement, or
    sets it to a value sshrpc refuses (``StrictHostKeyChecking no``).  The
    message names the option; nothing was connected.  Change the config for
    this host, or pass ``use_ssh_config=False`` and explicit arguments."""


class NodeTimeout(SSHRPCError):
    """One node of ``multicall``/``Pool.multicall`` did not finish within
    ``per_node_timeout`` seconds (counted from when its connect started).

    ``destination`` names the node; ``phase`` is ``"connect"`` (TCP, SSH
    set-up or hellos not done: nothing ran there) or ``"call"`` (the call
    was open and was cancelled: it may have run in part, so retry only
    idempotent work); ``timeout`` is the bound in seconds.  The other nodes
    are not affected."""

    def __init__(self, destination: str, phase: str, timeout: float | None) -> None:
        bound = "" if timeout is None else f" of {timeout:g} s"
        super().__init__(
            f"{destination}: no answer within the per-node deadline{bound} "
            f"({'still connecting' if phase == 'connect' else 'call open; cancelled'})"
        )
        self.destination = destination
        self.phase = phase
        self.timeout = timeout


class HostKeyError(SSHRPCError):
    """The server's host key could not be verified against known_hosts."""

    def __init__(self, message: str, host: str, fingerprint: str, known_hosts: str) -> None:
        super().__init__(message)
        self.host = host
        self.fingerprint = fingerprint
        self.known_hosts = known_hosts


class UnknownHostKey(HostKeyError):
    """The host is not in known_hosts.  Check the fingerprint out of band, then
    add the host's line to the known_hosts file named in the message (or pass
    ``accept_new_host_keys=True`` to trust it on first use)."""


class HostKeyMismatch(HostKeyError):
    """known_hosts holds a different key for this host: someone may be
    intercepting the connection, or the host key was changed.  Do not connect
    until you know which; then edit the line in the file named in the message."""


class AuthenticationFailed(SSHRPCError):
    """The server accepted none of the credentials.  ``tried`` lists what was
    offered (identity files, agent keys, password), in order."""

    def __init__(self, message: str, tried: list[str] | None = None) -> None:
        super().__init__(message)
        self.tried = list(tried or [])


class RemoteError(SSHRPCError):
    """A call ended with ``{error, Id, {Class, Reason, Details}}``.

    ``cls`` is the class atom (``error``, ``exit``, ``throw`` or ``sshrpc``),
    ``reason`` the reason term, ``details`` the details map.  Subclasses name
    the ``sshrpc`` reasons a caller usually handles on its own.
    Raised by ``RequestSet.receive_response``, ``label`` is the label of
    the request it answered (None otherwise).
    """

    label: Any = None

    def __init__(self, cls: str, reason: Any, details: Any = None) -> None:
        self.cls = cls
        self.reason = reason
        self.details = details if details is not None else {}
        message = self._message()
        super().__init__(message)

    def _message(self) -> str:
        # The server's terms: bounded text that cannot raise (safe_repr).
        text = f"remote {_clean(str(self.cls), 255)}: {_safe_repr(self.reason, 500)}"
        if isinstance(self.details, dict):
            detail = self.details.get("message")
            if isinstance(detail, bytes | str):
                if isinstance(detail, bytes):
                    detail = detail[:2000].decode("utf-8", "replace")
                text += f" ({_clean(detail, 500)})"
        return text

    @classmethod
    def from_term(cls, klass: str, reason: Any, details: Any) -> RemoteError:
        """Build the most specific subclass for ``{Class, Reason, Details}``."""
        if klass == "sshrpc" and isinstance(reason, str):
            sub = _SSHRPC_REASONS.get(str(reason))
            if sub is not None:
                return sub(klass, reason, details)
        return cls(klass, reason, details)


class Forbidden(RemoteError):
    """The server's policy does not expose this function to your key."""


class Undef(RemoteError):
    """The service exists but has no such function or arity."""


class Overload(RemoteError):
    """The channel already has ``max_calls`` calls open; retry later or open
    another channel."""


class RemoteTimeout(RemoteError):
    """The server gave up on the call after the ``timeout`` it was sent."""


_SSHRPC_REASONS: dict[str, type[RemoteError]] = {
    "forbidden": Forbidden,
    "undef": Undef,
    "overload": Overload,
    "timeout": RemoteTimeout,
}


class _Raised(Exception):
    """Base of the exceptions service code raises to choose an Erlang error
    class and the exact reason term."""

    erlang_class = "error"

    def __init__(self, reason: Any) -> None:
        super().__init__(reason)
        self.reason = reason


class Error(_Raised):
    """Raise in a service function to answer ``{error, Id, {error, Reason, #{}}}``."""

    erlang_class = "error"


class Exit(_Raised):
    """Raise in a service function to answer ``{error, Id, {exit, Reason, #{}}}``."""

    erlang_class = "exit"


class Throw(_Raised):
    """Raise in a service function to answer ``{error, Id, {throw, Value, #{}}}``."""

    erlang_class = "throw"
