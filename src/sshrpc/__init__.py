"""sshrpc: secure remote procedure calls for Trio and Erlang/OTP, over SSH.

This module only re-exports; each name is documented where it is defined.
"""

from ._codec import decode, encode
from ._errors import (
    AuthenticationFailed,
    ConnectionLost,
    Error,
    Exit,
    Forbidden,
    FrameTooLarge,
    HostKeyError,
    HostKeyMismatch,
    LocalProtocolError,
    MessageTooLarge,
    Overload,
    ProtocolError,
    RemoteError,
    RemoteTimeout,
    SSHRPCError,
    TermError,
    Throw,
    Undef,
    UnknownHostKey,
)
from ._types import Atom, BitString, Export, Fun, ImproperList, Map, Pid, Port, Reference

__version__ = "0.1.0"

__all__ = [
    "Atom",
    "AuthenticationFailed",
    "BitString",
    "ConnectionLost",
    "Error",
    "Exit",
    "Export",
    "Forbidden",
    "FrameTooLarge",
    "Fun",
    "HostKeyError",
    "HostKeyMismatch",
    "ImproperList",
    "LocalProtocolError",
    "Map",
    "MessageTooLarge",
    "Overload",
    "Pid",
    "Port",
    "ProtocolError",
    "Reference",
    "RemoteError",
    "RemoteTimeout",
    "SSHRPCError",
    "TermError",
    "Throw",
    "Undef",
    "UnknownHostKey",
    "decode",
    "encode",
]
