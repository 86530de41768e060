"""The channel's socket passed from the relay to the node (``SCM_RIGHTS``).

The C relay run with ``--pass-fds`` (``subsystem.relay_command(...,
pass_fds=True)``) sends the channel's descriptors with its header: magic
``SRLF`` instead of ``SRLY``, same body, the descriptors attached to the
header's bytes with ``SCM_RIGHTS``: fd 0 alone when sshd gave the channel
as one socket on fd 0 and fd 1 (OpenSSH's socketpair), fd 0 and fd 1 when
they are two pipes (OpenSSH built with ``USE_PIPES``, as Debian's is).  The
node answers one byte: ``F`` (it serves the channel on those descriptors,
reading and writing sshd's ends itself: no copy, no process hop per call)
or ``C`` (copy as usual: the node does not take descriptors, or what came
is neither).  Without an offer nothing changes: the Python relay, exec mode
and relays run without ``--pass-fds`` copy.

After ``F`` the relay copies nothing and stays alive (OpenSSH stops giving
the subsystem the client's data once the subsystem process exits), blocked
until the node closes the relay socket or sshd closes the channel; the
endings are those of the copying relay:

- the node ends the channel (bye, protocol error, refusal): it closes its
  copy of the channel socket, then the relay socket; the relay exits 0 and
  sshd, with every copy closed, sends EOF and closes the channel;
- the client sends EOF (half-close): the node's read sees EOF, but, as with
  the copying relay (which stops reading stdin and relays on), the channel
  stays up and answers still leave, until
- the channel is closed (sshd closed its end: POLLHUP/POLLERR on the
  relay's fd 1) or the
  relay dies: the relay socket ends, and the node ends the channel as it
  does when a copying relay's socket ends.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import socket
import stat

import trio

#: Header magic of a relay that sends the channel's socket with the header.
MAGIC_PASSED = b"SRLF"
#: The node's answer: it serves the passed socket / the relay copies.
TAKEN = b"F"
COPY = b"C"
_INT = array.array("i").itemsize
#: ``receive_some``'s size when none is given (Trio's default).
RECEIVE_SIZE = 65536


class FdReader:
    """Reads a non-blocking descriptor for a stream's ``receive_some``, with
    fewer system calls and scheduler turns for a channel that waits for
    each request.

    Trio's streams first checkpoint (a turn of the loop: an ``epoll_wait``),
    then try a read, and only on ``EAGAIN`` wait for the descriptor
    (``epoll_ctl``, ``epoll_wait``) and read again: five system calls and two
    turns for a request that was not there yet -- every sequential call's.
    ``receive`` waits for the descriptor first, then reads: three system
    calls and one turn.  After a read that filled ``max_bytes`` (more is
    likely waiting: bulk data, a pipelined burst) it reads after a plain
    checkpoint instead, as Trio does.  Set ``closed`` before the descriptor
    is closed (its number may be reused); the owner closes it."""

    __slots__ = ("_wait_first", "closed", "fd")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.closed = False
        self._wait_first = True

    async def receive(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` bytes; b"" at EOF.  A checkpoint
        (``trio.Cancelled`` before anything is read: nothing is taken).
        Raises ``ClosedResourceError`` once ``closed`` (or when Trio is told
        the descriptor closes, ``notify_closing``), ``BrokenResourceError``
        for another read error."""
        if self.closed:
            raise trio.ClosedResourceError("the channel was closed")
        fd = self.fd
        if self._wait_first:
            await trio.lowlevel.wait_readable(fd)
        else:
            await trio.lowlevel.checkpoint()
        while True:
            if self.closed:
                raise trio.ClosedResourceError("the channel was closed")
            try:
                data = os.read(fd, max_bytes)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    raise trio.ClosedResourceError("the channel was closed") from None
                raise trio.BrokenResourceError from exc
            else:
                self._wait_first = len(data) < max_bytes
                return data


class PassedStream(trio.abc.HalfCloseableStream):
    """The channel, passed by the relay: one socket (``trio.SocketStream``)
    or two pipes (``trio.lowlevel.FdStream`` each); ``out_fd`` is the
    descriptor written to, for direct writes.  ``receive_some`` returns EOF
    only once the relay socket has ended too (``relay_gone``): a client's
    EOF alone keeps the channel up, as the copying relay does."""

    def __init__(
        self,
        reader: trio.SocketStream | trio.lowlevel.FdStream,
        writer: trio.SocketStream | trio.lowlevel.FdStream,
        fds: tuple[int, ...],
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.fds = fds
        self.out_fd = fds[-1]
        #: Reads ``fds[0]`` (``_receive``).
        self.in_reader = FdReader(fds[0])
        self.gone = trio.Event()
        self.closed = False
        #: The client's EOF was read (the channel stays up until ``gone``).
        self.eof = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.gone.is_set():
            return b""
        data = await self._receive(RECEIVE_SIZE if max_bytes is None else max_bytes)
        if not data:
            self.eof = True
            await self.gone.wait()
        return data

    async def _receive(self, max_bytes: int) -> bytes:
        """``reader.receive_some(max_bytes)`` in fewer system calls (``FdReader``)."""
        return await self.in_reader.receive(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.writer.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.writer.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.writer, trio.SocketStream):
            await self.writer.send_eof()
        else:
            await self.writer.aclose()

    async def aclose(self) -> None:
        self.closed = True
        self.in_reader.closed = True
        try:
            await self.writer.aclose()
        finally:
            if self.reader is not self.writer:
                await self.reader.aclose()

    def relay_gone(self) -> None:
        """The relay socket ended: the channel is gone.  A task reading or
        writing wakes (``ClosedResourceError``; a read then returns EOF)."""
        if self.gone.is_set():
            return
        self.gone.set()
        if not self.closed:  # (once closed, the numbers may be reused)
            for fd in self.fds:
                trio.lowlevel.notify_closing(fd)


async def receive_header_start(stream: trio.SocketStream, n: int, fds: list[int]) -> bytes:
    """Up to ``n`` bytes of ``stream`` (b"" at EOF), with any descriptors
    that came with them appended to ``fds`` (the caller closes them)."""
    try:
        data, ancdata, _flags, _addr = await stream.socket.recvmsg(n, socket.CMSG_SPACE(2 * _INT))
    except OSError:
        return b""
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _INT
            fds.extend(array.array("i", payload[:usable]))
    return bytes(data)


def close_fds(fds: list[int]) -> None:
    """Close every descriptor in ``fds`` and empty it."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


def take_channel(fds: list[int]) -> PassedStream | None:
    """The passed channel as a stream, if ``fds`` is one stream socket, or a
    pipe's read end and a pipe's write end; else None.  Every descriptor in
    ``fds`` is taken (closed, or owned by the stream) and ``fds`` emptied."""
    try:
        modes = [os.fstat(fd).st_mode for fd in fds]
        if len(fds) == 1 and stat.S_ISSOCK(modes[0]):
            sock = socket.socket(fileno=fds[0])
            fds.clear()
            if sock.type != socket.SOCK_STREAM:
                sock.close()
                return None
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
            return PassedStream(stream, stream, (sock.fileno(),))
        if (
            len(fds) == 2
            and all(stat.S_ISFIFO(m) for m in modes)
            and fcntl.fcntl(fds[0], fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
            and fcntl.fcntl(fds[1], fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
        ):
            taken = (fds[0], fds[1])
            fds.clear()
            reader = trio.lowlevel.FdStream(taken[0])
            writer = trio.lowlevel.FdStream(taken[1])
            return PassedStream(reader, writer, taken)
        return None
    except OSError:
        return None
    finally:
        close_fds(fds)


async def watch_relay(relay: trio.SocketStream, channel: PassedStream) -> None:
    """Wait until the relay socket ends (the relay sends nothing after its
    header), then tell ``channel``."""
    try:
        while await relay.receive_some(256):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    channel.relay_gone()
