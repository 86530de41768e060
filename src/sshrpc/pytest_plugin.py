"""pytest fixtures for code that uses sshrpc, built on ``sshrpc.testing``.

Registered on install (entry point ``pytest11``); needs pytest-trio for the
async fixtures.  Override ``sshrpc_services`` in your ``conftest.py`` (or a
test module) to say what the node serves, then take ``sshrpc_node`` (a
``TestNode``) or ``sshrpc_connection`` (a ready ``Connection``)::

    @pytest.fixture
    def sshrpc_services():
        return [myapp.rpc.inventory]

    async def test_reserve(sshrpc_connection):
        assert await sshrpc_connection.call("inventory", "reserve", ["sku-1", 3])

``sshrpc_node_options`` (a dict: ``policy``, ``max_calls``, ...) tunes the
node.  docs/testing.md has the whole example.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from .service import Service
from .testing import TestNode, open_test_node


@pytest.fixture
def sshrpc_services() -> list[Service | str]:
    """What the test node serves: override this fixture.  The default fails
    with a message saying so."""
    raise pytest.UsageError(
        "define a `sshrpc_services` fixture returning the services (Service objects or "
        "'module:attribute' targets) the sshrpc test node should serve"
    )


@pytest.fixture
def sshrpc_node_options() -> dict[str, Any]:
    """Keyword arguments for the test node (``sshrpc.Node``'s); override to tune."""
    return {}


@pytest.fixture
async def sshrpc_node(
    sshrpc_services: list[Service | str], sshrpc_node_options: dict[str, Any]
) -> AsyncIterator[TestNode]:
    """A node serving ``sshrpc_services`` behind a private sshd, for one test."""
    async with open_test_node(sshrpc_services, **sshrpc_node_options) as test_node:
        yield test_node


@pytest.fixture
async def sshrpc_connection(sshrpc_node: TestNode) -> AsyncIterator[Any]:
    """A ``Connection`` to ``sshrpc_node``, closed after the test."""
    async with sshrpc_node.connect() as connection:
        yield connection
