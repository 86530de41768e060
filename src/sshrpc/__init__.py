"""sshrpc: secure remote procedure calls for Trio and Erlang/OTP, over SSH.

This module only re-exports; each name is documented where it is defined.
"""

from typing import TYPE_CHECKING

from ._accel import c_accelerated, decode, encode
from ._errors import (
    AuthenticationFailed,
    ChannelRefused,
    ConnectionLost,
    Error,
    Exit,
    Forbidden,
    FrameTooLarge,
    HostKeyError,
    HostKeyMismatch,
    LocalProtocolError,
    MessageTooLarge,
    NodeTimeout,
    Overload,
    ProtocolError,
    RemoteError,
    RemoteTimeout,
    SSHConfigError,
    SSHRPCError,
    TermError,
    Throw,
    Undef,
    UnknownHostKey,
)
from ._types import Atom, BitString, Export, Fun, ImproperList, Map, Pid, Port, Reference
from ._workers import Cancelled, cancelled, check_cancelled
from .service import Service

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ._ssh import KeyFileNotFound as KeyFileNotFound
    from ._ssh import KeyPassphraseError as KeyPassphraseError
    from .client import Connection as Connection
    from .client import ConnectionStatistics as ConnectionStatistics
    from .client import Pool as Pool
    from .client import Request as Request
    from .client import RequestSet as RequestSet
    from .client import connect_node as connect_node
    from .client import multicall as multicall
    from .client import open_connection as open_connection
    from .node import Node as Node
    from .node import serve_node as serve_node
    from .node import serve_stdio as serve_stdio
    from .policy import Policy as Policy

#: The client (Trio, ssh2-python) is imported on first use, so that
#: ``import sshrpc`` stays light for the server-side subsystem entry.
_CLIENT_NAMES = {
    "Connection": "client",
    "ConnectionStatistics": "client",
    "KeyFileNotFound": "_ssh",
    "KeyPassphraseError": "_ssh",
    "Pool": "client",
    "Request": "client",
    "RequestSet": "client",
    "connect_node": "client",
    "multicall": "client",
    "open_connection": "client",
    "Node": "node",
    "serve_node": "node",
    "serve_stdio": "node",
    "Policy": "policy",
}


def __getattr__(name: str) -> object:
    module = _CLIENT_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'sshrpc' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "Atom",
    "AuthenticationFailed",
    "BitString",
    "Cancelled",
    "ChannelRefused",
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
    "NodeTimeout",
    "Overload",
    "Pid",
    "Port",
    "ProtocolError",
    "Reference",
    "RemoteError",
    "RemoteTimeout",
    "SSHConfigError",
    "SSHRPCError",
    "Service",
    "TermError",
    "Throw",
    "Undef",
    "UnknownHostKey",
    "c_accelerated",
    "cancelled",
    "check_cancelled",
    "decode",
    "encode",
]
