"""``sshrpc.testing`` and the pytest plugin, as a user's test suite uses them:
a real private sshd, throwaway keys, the user's service objects."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import trio

import sshrpc
from sshrpc.testing import TestNode, open_test_node

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.timeout(120)

inventory = sshrpc.Service("inventory")
stock = {b"sku-1": 5}


@inventory.export
def reserve(sku: bytes, n: int) -> int:
    if stock.get(sku, 0) < n:
        raise sshrpc.Error(sshrpc.Atom("out_of_stock"))
    stock[sku] -= n
    return stock[sku]


@inventory.export
async def slow() -> None:
    await trio.sleep_forever()


async def test_open_test_node_serves_objects_and_cleans_up() -> None:
    async with open_test_node([inventory], max_calls=8) as test_node:
        assert isinstance(test_node, TestNode)
        directory = test_node.directory
        assert f"[127.0.0.1]:{test_node.port} " in test_node.known_hosts.read_text()
        async with test_node.connect() as node:
            assert node.hello["max_calls"] == 8
            assert await node.call("inventory", "reserve", [b"sku-1", 2]) == 3
            with pytest.raises(sshrpc.RemoteError) as caught:
                await node.call("inventory", "reserve", [b"sku-1", 99])
            assert caught.value.reason == sshrpc.Atom("out_of_stock")
            with trio.move_on_after(0.2):
                await node.call("inventory", "slow", [])
        stats = test_node.node.statistics()
        assert stats["calls"] == 0
        sshd_pid = int((directory / "sshd" / "sshd.pid").read_text())
    assert not directory.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(sshd_pid, 0)


async def test_an_error_in_the_block_comes_out_as_itself() -> None:
    with pytest.raises(KeyError, match="mine"):
        async with open_test_node([inventory]):
            raise KeyError("mine")


async def test_a_missing_sshd_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(sshrpc.testing.TestNodeError, match="sshd"):
        async with open_test_node([inventory], sshd_path=str(tmp_path / "no-sshd")):
            pass


def test_the_pytest_plugin_fixtures_in_a_user_suite(pytester: pytest.Pytester) -> None:
    """The example of docs/testing.md, run as a user's own test file."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "testing.md").read_text()
    example = doc.split("```python\n", 1)[1].split("```", 1)[0]
    pytester.makepyfile(test_user_service=example)
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", timeout=100)
    result.assert_outcomes(passed=2)


def test_without_services_the_fixture_says_what_to_define(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_forgot=textwrap.dedent(
            """
            async def test_x(sshrpc_connection):
                pass
            """
        )
    )
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", timeout=60)
    result.stdout.fnmatch_lines(["*define a `sshrpc_services` fixture*"])
    assert result.ret != 0
