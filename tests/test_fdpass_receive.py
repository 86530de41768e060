"""``PassedStream.receive_some`` on a passed pipe pair: waits for data first
(fewer system calls per sequential request), yet is a checkpoint, reads
everything, big reads included, and reports a closed channel clearly."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from sshrpc import _fdpass


def _pipe_channel() -> tuple[_fdpass.PassedStream, int, int]:
    """A passed channel over two pipes; the client's write and read ends."""
    to_node_r, to_node_w = os.pipe()
    to_client_r, to_client_w = os.pipe()
    channel = _fdpass.take_channel([to_node_r, to_client_w])
    assert channel is not None
    return channel, to_node_w, to_client_r


async def test_receive_waits_for_data_then_reads_it_whole() -> None:
    channel, client_w, client_r = _pipe_channel()
    try:
        got: list[bytes] = []

        async def read() -> None:
            got.append(await channel.receive_some())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # nothing yet: waiting
            os.write(client_w, b"hello")
        assert got == [b"hello"]
        # A read that fills the buffer: the next one reads what is left.
        os.write(client_w, b"x" * 100)
        assert await channel.receive_some(64) == b"x" * 64
        assert await channel.receive_some(64) == b"x" * 36
    finally:
        await channel.aclose()
        os.close(client_w)
        os.close(client_r)


async def test_receive_is_a_checkpoint_with_data_ready() -> None:
    channel, client_w, client_r = _pipe_channel()
    try:
        os.write(client_w, b"y" * 10)
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await channel.receive_some()
        assert await channel.receive_some() == b"y" * 10  # nothing was taken
        os.write(client_w, b"z" * 8)
        await channel.receive_some(8)  # a full read: the next reads first
        os.write(client_w, b"w")
        with trio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(trio.Cancelled):
                await channel.receive_some()
        assert await channel.receive_some() == b"w"
    finally:
        await channel.aclose()
        os.close(client_w)
        os.close(client_r)


async def test_receive_ends_at_eof_and_when_closed() -> None:
    channel, client_w, client_r = _pipe_channel()
    try:
        os.close(client_w)
        assert await channel._receive(10) == b""  # the client's EOF
        channel.relay_gone()  # the relay ended too: the channel's read says EOF
        assert await channel.receive_some() == b""
    finally:
        await channel.aclose()
        os.close(client_r)
    with pytest.raises(trio.ClosedResourceError):
        await channel._receive(10)


async def test_relay_gone_wakes_a_waiting_read() -> None:
    channel, client_w, client_r = _pipe_channel()
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                failed: list[BaseException] = []

                async def read() -> None:
                    try:
                        await channel.receive_some()
                    except trio.ClosedResourceError as exc:
                        failed.append(exc)

                nursery.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()
                channel.relay_gone()
        assert len(failed) == 1
    finally:
        await channel.aclose()
        os.close(client_w)
        os.close(client_r)


async def test_stdio_stream_reads_the_same_way() -> None:
    from sshrpc.node import _StdioStream

    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    stream = _StdioStream(in_r, out_w)
    os.close(in_r)
    os.close(out_w)
    try:
        os.write(in_w, b"call")
        assert await stream.receive_some() == b"call"
        await stream.send_all(b"reply")
        assert os.read(out_r, 10) == b"reply"
        os.close(in_w)
        assert await stream.receive_some() == b""
    finally:
        await stream.aclose()
        os.close(out_r)
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some()
