"""``open_connection`` to a test sshd (``tests/conftest.py``'s ``SSHDInfo``)."""

from __future__ import annotations

from typing import Any

from sshrpc.client import open_connection


def connect(info: Any, **options: Any) -> Any:
    """``open_connection`` to ``info``'s sshd with its user, key and
    known_hosts (no agent, no ``~/.ssh/config``); ``options`` go to
    ``open_connection``."""
    options = {"agent": False, "use_ssh_config": False, **options}
    return open_connection(
        info.host,
        info.port,
        user=info.user,
        identity=str(info.identity),
        known_hosts=str(info.known_hosts),
        **options,
    )
