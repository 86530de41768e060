"""Trio tasks <-> one sshrpc session over SSH: the client side of PROTOCOL.md.

``open_connection`` (an async context manager) and ``connect_node`` (the
explicit-nursery variant) give a ``Connection``.  Any number of tasks may use
one connection at once: each request gets an id and its answer is routed back
to its caller.  The bytes go through one pump task (``sshrpc._pump``).

Cancellation and deadlines (Trio's conventions, no ``timeout=``): a call sends
the remaining time of the caller's cancel scopes as its ``timeout`` option, so
the server gives up too; leaving the scope early raises ``Cancelled`` at once
and sends ``{cancel, Id}``.  The id is freed when the final answer arrives.

Backpressure: request bytes queued and not yet accepted by the SSH channel are
bounded (``write_limit``); callers wait in ``call`` beyond it.  Answers,
stream chunks and mailbox messages that nobody has taken are bounded too
(``max_undelivered``): beyond it the pump stops reading the channel, so the
server's SSH window closes and the server stops sending.

Errors: ``RemoteError`` and its subclasses for ``{error, ...}`` answers,
``ConnectionLost``, ``HostKeyError``, ``AuthenticationFailed``,
``ProtocolError``.  No ``ExceptionGroup`` escapes.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import struct
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import trio

from . import _ssh, _ssh_config
from ._codec import decode, encode
from ._errors import ConnectionLost, ProtocolError, RemoteError, SSHRPCError, TermError
from ._pump import DEFAULT_WRITE_LIMIT, Pump
from ._types import Atom

__all__ = [
    "DEFAULT_KEEPALIVE",
    "Connection",
    "ConnectionStatistics",
    "Pool",
    "connect_node",
    "multicall",
    "open_connection",
    "parse_destination",
]

log = logging.getLogger("sshrpc.client")

CLIENT_NAME = "sshrpc-python/0.1.0"
#: Largest payload we accept (announced in our hello); PROTOCOL.md's default.
DEFAULT_MAX_FRAME = 1024 * 1024
#: Untaken answers/chunks/mailbox messages before the pump stops reading.
DEFAULT_MAX_UNDELIVERED = 1024
#: Seconds between keepalive pings on a quiet connection; with
#: ``DEFAULT_KEEPALIVE_MISSES`` unanswered in a row the connection is lost.
DEFAULT_KEEPALIVE = 15.0
DEFAULT_KEEPALIVE_MISSES = 3
#: Stream credit granted at the start of a stream call (PROTOCOL.md default).
DEFAULT_STREAM_CREDIT = 16
#: How long ``aclose`` waits for open calls and the server's bye.
CLOSE_DRAIN_TIMEOUT = 5.0
#: Bytes of unexpected output shown in a "junk before hello" error.
_JUNK_SHOWN = 80

_A = Atom


# -- the wire, client role -------------------------------------------------------


class _Wire:
    """Client-role framing and term <-> message mapping.  No I/O."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self.buf = bytearray()
        self.prefix = bytearray()  # first bytes received, for junk diagnostics
        self.hello_seen = False

    @staticmethod
    def frame(term: Any) -> bytes:
        payload = encode(term)
        return struct.pack(">I", len(payload)) + payload

    def feed(self, data: bytes) -> None:
        if not self.hello_seen and len(self.prefix) < _JUNK_SHOWN:
            self.prefix += data[: _JUNK_SHOWN - len(self.prefix)]
        self.buf += data

    def _junk(self, why: str) -> ProtocolError:
        shown = bytes(self.prefix)
        return ProtocolError(
            "the server sent bytes that are not an sshrpc hello before its hello "
            f"({why}); the first bytes were {shown!r}.  Something on the server "
            "printed text into the channel: usually a shell start-up file (.bashrc, "
            ".profile) writing to stdout for non-interactive shells, or the "
            "subsystem command is not sshrpc",
            bye=(_A("protocol_error"), b"junk before hello"),
        )

    def terms(self) -> Iterable[Any]:
        while len(self.buf) >= 4:
            (length,) = struct.unpack_from(">I", self.buf)
            if length == 0:
                del self.buf[:4]
                continue
            if length > self.max_frame:
                if not self.hello_seen:
                    raise self._junk(f"a frame length of {length} bytes")
                raise ProtocolError(
                    f"the server sent a frame of {length} bytes, above our max_frame "
                    f"{self.max_frame}",
                    bye=(_A("frame_too_large"), length, self.max_frame),
                )
            if len(self.buf) < 4 + length:
                if not self.hello_seen and bytes(self.buf[4:5]) not in (b"", b"\x83"):
                    raise self._junk("no term version byte")
                return
            payload = bytes(self.buf[4 : 4 + length])
            del self.buf[: 4 + length]
            try:
                term = decode(payload)
            except TermError as exc:
                if not self.hello_seen:
                    raise self._junk(str(exc)) from exc
                raise ProtocolError(
                    f"the server sent a bad term: {exc}", bye=(_A("bad_term"), str(exc).encode())
                ) from exc
            if not self.hello_seen:
                if not (isinstance(term, tuple) and term and term[0] == "hello"):
                    if isinstance(term, tuple) and term and term[0] == "bye":
                        yield term
                        continue
                    raise self._junk(f"first term was {term!r}")
                self.hello_seen = True
            yield term


@dataclasses.dataclass
class _Pending:
    """One open call, spawn or stream."""

    id: int
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    ok: bool = False
    value: Any = None
    error: BaseException | None = None
    abandoned: bool = False
    chunks: deque[Any] | None = None
    chunk_event: trio.Event | None = None
    slot: trio.Semaphore | None = None

    def release(self) -> None:
        if self.slot is not None:
            self.slot.release()
            self.slot = None


@dataclasses.dataclass(frozen=True)
class ConnectionStatistics:
    """A snapshot of a connection (``Connection.statistics()``)."""

    open_calls: int
    waiting_for_slot: int
    queued_bytes: int
    write_limit: int
    undelivered: int
    max_undelivered: int
    reading_paused: bool
    mailbox: int
    bytes_sent: int
    bytes_received: int
    window_write: int | None
    window_read: int | None
    server: dict[str, Any]


class Connection:
    """One sshrpc session on one SSH channel.  Safe to use from many tasks.

    Get one from ``open_connection`` or ``connect_node``.  ``hello`` holds the
    server's hello map (``node``, ``session``, ``max_calls``, ``features``...).
    """

    def __init__(
        self,
        pump: Pump,
        *,
        destination: str,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_undelivered: int = DEFAULT_MAX_UNDELIVERED,
        keepalive: float | None = DEFAULT_KEEPALIVE,
        keepalive_misses: int = DEFAULT_KEEPALIVE_MISSES,
    ) -> None:
        self._pump = pump
        self.destination = destination
        self._wire = _Wire(max_frame)
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count()
        self._mailbox: deque[Any] = deque()
        self._mailbox_event = trio.Event()
        self._pings: dict[int, trio.Event] = {}
        self._ping_ids = itertools.count(1)
        self._undelivered = 0
        self.max_undelivered = max_undelivered
        self.keepalive = keepalive
        self.keepalive_misses = keepalive_misses
        self.hello: dict[str, Any] = {}
        self._hello_event = trio.Event()
        self._error: BaseException | None = None
        self._ended = trio.Event()
        self._closing = False
        self._closed = False
        self._last_heard = trio.current_time()
        self._cancel_scope = trio.CancelScope()
        #: One slot per call the server allows open at once (hello's
        #: ``max_calls``): callers beyond it wait here instead of getting
        #: ``overload``.  A slot is freed by the call's final answer.
        self._slots: trio.Semaphore | None = None
        self._nursery: trio.Nursery | None = None

    # -- set-up --------------------------------------------------------------

    async def _start(self, nursery: trio.Nursery) -> None:
        """Start the pump and keepalive tasks in ``nursery``, send our hello
        and wait for the server's."""
        nursery.start_soon(self._run)
        hello = (
            _A("hello"),
            1,
            {_A("max_frame"): self._wire.max_frame, _A("client"): CLIENT_NAME.encode()},
        )
        self._pump.send_nowait(self._wire.frame(hello))
        await self._wait_for(self._hello_event)
        if self._error is not None and not self._hello_event.is_set():
            raise self._raise_error()
        if self.keepalive and self._nursery is not None:
            # Counted from the hello on: a slow server start is not a dead peer.
            self._last_heard = trio.current_time()
            self._nursery.start_soon(self._keepalive)

    async def _wait_for(self, event: trio.Event) -> None:
        """Wait for ``event`` or the connection's end, whichever is first."""
        if event.is_set() or self._ended.is_set():
            await trio.lowlevel.checkpoint()
            return
        async with trio.open_nursery() as nursery:

            async def watch(e: trio.Event) -> None:
                await e.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch, event)
            nursery.start_soon(watch, self._ended)

    async def _run(self) -> None:
        with self._cancel_scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._pump.run(self._on_data, self._should_read, self._on_eof)
                nursery.cancel_scope.cancel()

    # -- the receive side (runs in the pump task) ---------------------------

    def _should_read(self) -> bool:
        # While closing, read on regardless, to see the server's bye and EOF.
        return self._closing or self._undelivered < self.max_undelivered

    def _on_data(self, data: bytes) -> None:
        self._last_heard = trio.current_time()
        self._wire.feed(data)
        try:
            for term in self._wire.terms():
                self._dispatch(term)
        except ProtocolError as exc:
            if exc.bye is not None:
                self._send_control((_A("bye"), exc.bye))
            self._pump.fail(exc)

    def _dispatch(self, term: Any) -> None:
        if not isinstance(term, tuple) or not term or not isinstance(term[0], str):
            raise ProtocolError(f"the server sent {term!r}, which is not a message")
        tag = term[0]
        if tag in ("reply", "error", "chunk") and len(term) == 3:
            pending = self._pending.get(term[1])
            if pending is None:
                raise ProtocolError(
                    f"the server answered id {term[1]!r}, which no open call uses",
                    bye=(_A("protocol_error"), b"answer for an unknown id"),
                )
            if tag == "chunk":
                if pending.chunks is None:
                    raise ProtocolError(f"chunk for call {term[1]} which is not a stream")
                if not pending.abandoned:
                    pending.chunks.append(term[2])
                    self._undelivered += 1
                    if pending.chunk_event is not None:
                        pending.chunk_event.set()
                return
            del self._pending[pending.id]
            pending.release()
            if tag == "reply":
                pending.ok, pending.value = True, term[2]
            else:
                detail = term[2]
                if isinstance(detail, tuple) and len(detail) == 3:
                    pending.error = RemoteError.from_term(str(detail[0]), detail[1], detail[2])
                else:
                    pending.error = RemoteError("error", detail)
            if not pending.abandoned:
                self._undelivered += 1
            pending.done.set()
            if pending.chunk_event is not None:
                pending.chunk_event.set()
        elif tag == "send" and len(term) == 3:
            self._mailbox.append(term[2])
            self._undelivered += 1
            self._mailbox_event.set()
        elif tag == "down" and len(term) == 3:
            self._mailbox.append((_A("down"), term[1], term[2]))
            self._undelivered += 1
            self._mailbox_event.set()
        elif tag == "pong" and len(term) == 2:
            event = self._pings.pop(term[1], None) if isinstance(term[1], int) else None
            if event is not None:
                event.set()
        elif tag == "hello" and len(term) == 3:
            if self._hello_event.is_set():
                raise ProtocolError("the server sent a second hello")
            if term[1] != 1 or not isinstance(term[2], dict):
                raise ProtocolError(f"the server speaks an unsupported version: {term!r}")
            self.hello = {str(k): v for k, v in term[2].items()}
            max_calls = self.hello.get("max_calls")
            if isinstance(max_calls, int) and not isinstance(max_calls, bool) and max_calls > 0:
                self._slots = trio.Semaphore(max_calls)
            max_frame = self.hello.get("max_frame")
            self._peer_max_frame = max_frame if isinstance(max_frame, int) else 1024 * 1024
            self._hello_event.set()
        elif tag == "bye" and len(term) == 2:
            reason = term[1]
            if reason == "normal":
                self._pump.fail(ConnectionLost("the server closed the session (bye normal)"))
            else:
                self._pump.fail(ConnectionLost(f"the server closed the session: {reason!r}"))
        else:
            log.info("ignored message from the server: %r", term)

    def _on_eof(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        for pending in list(self._pending.values()):
            pending.release()
            if not pending.done.is_set():
                pending.error = error
                pending.done.set()
                if pending.chunk_event is not None:
                    pending.chunk_event.set()
        self._pending.clear()
        for event in self._pings.values():
            event.set()
        self._pings.clear()
        self._mailbox_event.set()
        self._ended.set()

    def _send_control(self, term: Any) -> None:
        """Queue a small control frame (cancel, bye) if the connection lives."""
        with suppress(ConnectionLost):
            self._pump.send_nowait(self._wire.frame(term))

    def _raise_error(self) -> BaseException:
        error = self._error
        if isinstance(error, ProtocolError):
            return ProtocolError(str(error), bye=error.bye)
        if isinstance(error, ConnectionLost):
            return ConnectionLost(f"{self.destination}: {error}")
        return ConnectionLost(f"{self.destination}: connection closed ({error})")

    def _taken(self) -> None:
        self._undelivered -= 1
        if self._pump.paused and self._should_read():
            self._pump.wake()

    async def _keepalive(self) -> None:
        assert self.keepalive
        interval = self.keepalive
        while True:
            await trio.sleep(interval)
            if self._pump.paused:
                self._last_heard = trio.current_time()
                continue
            quiet = trio.current_time() - self._last_heard
            if quiet >= interval * self.keepalive_misses:
                self._pump.fail(
                    ConnectionLost(
                        f"the server did not answer keepalive pings for {quiet:.1f} s "
                        f"({self.keepalive_misses} missed at {interval:g} s intervals)"
                    )
                )
                return
            if quiet >= interval * 0.99:
                try:
                    self._pump.send_nowait(self._wire.frame((_A("ping"), 0)))
                except ConnectionLost:
                    return

    # -- sending -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._raise_error()
        if self._closing:
            raise ConnectionLost(f"{self.destination}: the connection is closing")

    async def _send_request(self, term_for_id: Any, pending: _Pending) -> None:
        """Wait for room, then register ``pending`` and queue the frame, with
        no checkpoint in between (a cancel leaves nothing registered)."""
        self._check_open()
        frame = self._wire.frame(term_for_id)
        slots = self._slots
        if slots is not None:
            await slots.acquire()
        try:
            while self._pump.queued_bytes >= self._pump.write_limit:
                await self._pump.send(b"")  # waits for room (or raises if lost)
                self._check_open()
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_open()
        except BaseException:
            if slots is not None:
                slots.release()
            raise
        pending.slot = slots
        self._pending[pending.id] = pending
        self._pump.send_nowait(frame)

    def _new_id(self) -> int:
        while True:
            i = next(self._ids) % (2**64)
            if i not in self._pending:
                return i

    @staticmethod
    def _timeout_ms() -> int | None:
        deadline = trio.current_effective_deadline()
        if math.isinf(deadline):
            return None
        return max(0, int((deadline - trio.current_time()) * 1000))

    async def _await(self, pending: _Pending) -> Any:
        try:
            await pending.done.wait()
        except BaseException:
            if not pending.done.is_set():
                pending.abandoned = True
                if self._error is None:
                    self._send_control((_A("cancel"), pending.id))
            elif not pending.abandoned:
                self._taken()
            raise
        self._taken()
        if pending.ok:
            return pending.value
        error = pending.error
        if isinstance(error, RemoteError):
            raise error
        raise self._raise_error()

    async def call(self, module: str, function: str, args: Sequence[Any] = ()) -> Any:
        """Apply ``module:function(*args)`` on the server and return its result.

        ``module`` and ``function`` are sent as atoms.  The remaining time of
        the caller's cancel scopes travels as the call's ``timeout``.  A
        checkpoint.  If cancelled, ``Cancelled`` propagates at once, the
        server is told to stop the call (``{cancel, Id}``), and its answer is
        discarded when it arrives.

        Raises ``RemoteError`` (or ``Forbidden``, ``Undef``, ``Overload``,
        ``RemoteTimeout``) for an error answer, ``ConnectionLost`` if the
        connection ends first, ``TermError`` for an argument with no Erlang
        term (nothing is sent then).
        """
        pending = _Pending(self._new_id())
        timeout = self._timeout_ms()
        term: tuple[Any, ...]
        if timeout is None:
            term = (_A("call"), pending.id, _A(module), _A(function), list(args))
        else:
            term = (
                _A("call"),
                pending.id,
                _A(module),
                _A(function),
                list(args),
                {_A("timeout"): timeout},
            )
        await self._send_request(term, pending)
        return await self._await(pending)

    async def cast(self, module: str, function: str, args: Sequence[Any] = ()) -> None:
        """Ask the server to run ``module:function(*args)``; no answer, ever.

        Returns once the request is queued (a checkpoint; waits for room in
        the send queue).  Raises ``ConnectionLost`` if the connection ended.
        """
        self._check_open()
        frame = self._wire.frame((_A("cast"), _A(module), _A(function), list(args)))
        await self._pump.send(frame)

    async def spawn(self, module: str, function: str, args: Sequence[Any] = ()) -> Any:
        """Start ``module:function(*args)`` as a long-lived process on the
        server; return its pid.  Its messages to this session's pid and its
        ``{down, Pid, Reason}`` arrive in ``receive()``.  Cancellation as in
        ``call``."""
        pending = _Pending(self._new_id())
        term = (_A("spawn"), pending.id, _A(module), _A(function), list(args))
        await self._send_request(term, pending)
        return await self._await(pending)

    async def send(self, dest: Any, message: Any) -> None:
        """Send ``message`` to the server process ``dest`` (a pid from
        ``spawn``, or a registered name: a ``str`` is sent as an atom).
        A message to no process is dropped, as in Erlang.  A checkpoint."""
        self._check_open()
        if isinstance(dest, str) and not isinstance(dest, Atom):
            dest = Atom(dest)
        await self._pump.send(self._wire.frame((_A("send"), dest, message)))

    async def receive(self) -> Any:
        """The next message sent to this session's mailbox (the ``session``
        pid of the hello), waiting for one.  A process's end arrives as
        ``(Atom("down"), pid, reason)``.  Raises ``ConnectionLost`` when the
        connection ends and the mailbox is empty.  A checkpoint; a cancel
        takes no message."""
        while not self._mailbox:
            if self._error is not None:
                raise self._raise_error()
            if self._mailbox_event.is_set():
                self._mailbox_event = trio.Event()
            await self._mailbox_event.wait()
        await trio.lowlevel.checkpoint()
        if not self._mailbox:
            return await self.receive()
        message = self._mailbox.popleft()
        self._taken()
        return message

    async def stream(
        self,
        module: str,
        function: str,
        args: Sequence[Any] = (),
        *,
        credit: int = DEFAULT_STREAM_CREDIT,
    ) -> AsyncIterator[Any]:
        """Yield the chunks of a stream call, then end (the final value is
        discarded; use ``stream_call`` for it).  Credit is granted back to the
        server as items are consumed, so at most ``credit`` chunks wait here.

        Leaving the loop early (break, exception, cancel) sends ``{cancel, Id}``.
        Raises as ``call``.
        """
        pending = _Pending(self._new_id(), chunks=deque(), chunk_event=trio.Event())
        opts: dict[Any, Any] = {_A("stream"): True, _A("credit"): credit}
        timeout = self._timeout_ms()
        if timeout is not None:
            opts[_A("timeout")] = timeout
        term = (_A("call"), pending.id, _A(module), _A(function), list(args), opts)
        await self._send_request(term, pending)
        consumed = 0
        assert pending.chunks is not None
        try:
            while True:
                if pending.chunks:
                    item = pending.chunks.popleft()
                    self._taken()
                    consumed += 1
                    if consumed >= max(1, credit // 2) and not pending.done.is_set():
                        self._pump.send_nowait(
                            self._wire.frame((_A("credit"), pending.id, consumed))
                        )
                        consumed = 0
                    yield item
                    continue
                if pending.done.is_set():
                    break
                assert pending.chunk_event is not None
                if pending.chunk_event.is_set():
                    pending.chunk_event = trio.Event()
                    continue
                await pending.chunk_event.wait()
        except BaseException:
            if not pending.done.is_set():
                pending.abandoned = True
                self._undelivered -= len(pending.chunks)
                pending.chunks.clear()
                if self._error is None:
                    self._send_control((_A("cancel"), pending.id))
            raise
        self._taken()
        if not pending.ok:
            if isinstance(pending.error, RemoteError):
                raise pending.error
            raise self._raise_error()

    async def ping(self) -> float:
        """Round-trip a ``{ping, Token}`` and return the time it took, in
        seconds.  A checkpoint; raises ``ConnectionLost`` if the connection
        ends first."""
        self._check_open()
        token = next(self._ping_ids)
        event = trio.Event()
        self._pings[token] = event
        start = trio.current_time()
        try:
            await self._pump.send(self._wire.frame((_A("ping"), token)))
            await event.wait()
        finally:
            self._pings.pop(token, None)
        if self._error is not None:
            raise self._raise_error()
        return trio.current_time() - start

    def statistics(self) -> ConnectionStatistics:
        """Open calls, queued bytes, window sizes and counters, now."""
        window_write = window_read = None
        channel = self._pump.channel
        if channel is not None and self._error is None:
            try:
                window_write = channel.window_write()
                window_read = channel.window_read()
            except Exception:  # a getter; a closed channel has no windows
                pass
        return ConnectionStatistics(
            waiting_for_slot=self._slots.statistics().tasks_waiting if self._slots else 0,
            open_calls=sum(1 for p in self._pending.values() if not p.abandoned),
            queued_bytes=self._pump.queued_bytes,
            write_limit=self._pump.write_limit,
            undelivered=self._undelivered,
            max_undelivered=self.max_undelivered,
            reading_paused=self._pump.paused,
            mailbox=len(self._mailbox),
            bytes_sent=self._pump.bytes_sent,
            bytes_received=self._pump.bytes_received,
            window_write=window_write,
            window_read=window_read,
            server=dict(self.hello),
        )

    @property
    def closed(self) -> bool:
        """True once the connection can no longer be used."""
        return self._error is not None or self._closing

    async def aclose(self) -> None:
        """Say ``{bye, normal}``, wait (at most ``CLOSE_DRAIN_TIMEOUT``) for
        open calls and the server's bye, then close the channel, session and
        socket.  Idempotent; completes even when cancelled (the wait is
        shielded and bounded), then lets the cancel propagate."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._closing = True
        with trio.CancelScope(shield=True):
            if self._error is None:
                self._send_control((_A("bye"), _A("normal")))
                with trio.move_on_after(CLOSE_DRAIN_TIMEOUT):
                    await self._ended.wait()
            self._pump.fail(ConnectionLost("the connection was closed"))
            self._cancel_scope.cancel()
            with trio.move_on_after(CLOSE_DRAIN_TIMEOUT):
                await self._ended.wait()
            await self._pump.aclose()
        await trio.lowlevel.checkpoint()


# -- opening ------------------------------------------------------------------------


def parse_destination(destination: str) -> tuple[str | None, str, int | None]:
    """``[user@]host[:port]`` (IPv6 as ``[addr]:port``) -> (user, host, port)."""
    user: str | None = None
    if "@" in destination:
        user, _, destination = destination.rpartition("@")
    port: int | None = None
    if destination.startswith("["):
        host, _, rest = destination[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif destination.count(":") == 1:
        host, _, p = destination.partition(":")
        port = int(p)
    else:
        host = destination
    return user or None, host, port


async def connect_node(
    nursery: trio.Nursery,
    host: str,
    port: int | None = None,
    user: str | None = None,
    identity: str | Any | None = None,
    known_hosts: str | Any | None = None,
    *,
    passphrase: str | None = None,
    password: str | None = None,
    agent: bool = True,
    verify_host_key: bool = True,
    accept_new_host_keys: bool = False,
    ssh_config: str | Any | None = None,
    use_ssh_config: bool = True,
    subsystem: str = _ssh.SUBSYSTEM,
    write_limit: int = DEFAULT_WRITE_LIMIT,
    max_undelivered: int = DEFAULT_MAX_UNDELIVERED,
    max_frame: int = DEFAULT_MAX_FRAME,
    keepalive: float | None = DEFAULT_KEEPALIVE,
    keepalive_misses: int = DEFAULT_KEEPALIVE_MISSES,
) -> Connection:
    """Open a connection whose background tasks run in ``nursery``.

    Same arguments as ``open_connection``.  The caller must ``aclose()`` the
    connection; cancelling ``nursery`` abandons it (the socket is closed when
    the pump task ends).  A checkpoint; on any error or cancel nothing stays
    open.
    """
    settings = await trio.to_thread.run_sync(
        lambda: _ssh_config.resolve(
            host,
            port=port,
            user=user,
            identity=identity,
            known_hosts=known_hosts,
            config_file=ssh_config,
            use_config=use_ssh_config,
        )
    )
    pump = await _ssh.open_channel(
        settings.hostname,
        settings.port,
        user=settings.user,
        identities=settings.identity_files,
        skip_missing_identities=settings.default_identities,
        known_hosts_files=settings.known_hosts_files,
        verify_host_key=verify_host_key,
        accept_new_host_keys=accept_new_host_keys,
        passphrase=passphrase,
        agent=agent and not (identity is not None and settings.identities_only),
        password=password,
        subsystem=subsystem,
    )
    pump.write_limit = write_limit
    destination = f"{settings.user}@{settings.hostname}:{settings.port}"
    connection = Connection(
        pump,
        destination=destination,
        max_frame=max_frame,
        max_undelivered=max_undelivered,
        keepalive=keepalive,
        keepalive_misses=keepalive_misses,
    )
    try:
        await connection._start(nursery)
    except BaseException:
        with trio.CancelScope(shield=True):
            await connection.aclose()
        raise
    return connection


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one meaningful exception of a nursery's group."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(group)
    for leaf in leaves:
        if not isinstance(leaf, trio.Cancelled):
            return leaf
    return leaves[0] if leaves else group


@asynccontextmanager
async def open_connection(
    host: str,
    port: int | None = None,
    user: str | None = None,
    identity: str | Any | None = None,
    known_hosts: str | Any | None = None,
    **options: Any,
) -> AsyncIterator[Connection]:
    """``async with open_connection("host") as node:`` a ``Connection``.

    ``host`` may be ``[user@]host[:port]`` and may name a ``Host`` of
    ``~/.ssh/config`` (read through ``ssh -G`` when OpenSSH is installed);
    explicit arguments win over the config.  ``identity`` is a private key
    file (or a list); ``known_hosts`` the file to check the host key against.

    Options: ``passphrase`` (for an encrypted identity), ``password`` (tried
    last, only if given), ``agent`` (default True: use ``SSH_AUTH_SOCK``),
    ``verify_host_key`` (default True), ``accept_new_host_keys`` (default
    False: trust and record an unknown host key), ``ssh_config``,
    ``use_ssh_config``, ``subsystem``, ``write_limit`` (request bytes queued
    before callers wait), ``max_undelivered`` (untaken answers before reading
    pauses), ``max_frame``, ``keepalive`` (seconds, None to disable) and
    ``keepalive_misses``.

    Raises ``ConnectionLost`` (unreachable, refused, no SSH server, subsystem
    refused), ``UnknownHostKey``/``HostKeyMismatch``, ``AuthenticationFailed``
    (``KeyFileNotFound``, ``KeyPassphraseError``), ``ProtocolError`` (e.g.
    junk before the hello).  Leaving the block closes the connection
    (``aclose``).
    """
    u, h, p = parse_destination(host)
    user = user or u
    port = port if port is not None else p
    try:
        async with trio.open_nursery() as nursery:
            connection = await connect_node(
                nursery, h, port, user, identity, known_hosts, **options
            )
            try:
                yield connection
            finally:
                await connection.aclose()
    except BaseExceptionGroup as group:
        raise _unwrap(group) from None


# -- many nodes -------------------------------------------------------------------


async def multicall(
    nodes: Iterable[str | Connection],
    module: str,
    function: str,
    args: Sequence[Any] = (),
    **options: Any,
) -> list[Any]:
    """Call ``module:function(*args)`` on every node at once; return one
    entry per node, in order: the result, or the exception (``RemoteError``,
    ``ConnectionLost``, ``HostKeyError``...) that node's call raised, like
    ``erpc:multicall``.  Host names get a connection each (``options`` as in
    ``open_connection``), closed afterwards.  The caller's cancel scope bounds
    the whole; a cancel propagates."""
    items = list(nodes)
    results: list[Any] = [None] * len(items)

    async def one(index: int, node: str | Connection) -> None:
        try:
            if isinstance(node, Connection):
                results[index] = await node.call(module, function, args)
            else:
                async with open_connection(node, **options) as connection:
                    results[index] = await connection.call(module, function, args)
        except (SSHRPCError, OSError, TermError) as exc:
            results[index] = exc

    try:
        async with trio.open_nursery() as nursery:
            for index, node in enumerate(items):
                nursery.start_soon(one, index, node)
    except BaseExceptionGroup as group:
        raise _unwrap(group) from None
    return results


class Pool:
    """Connections reused per destination.

    ``async with sshrpc.Pool(identity=..., known_hosts=...) as pool:`` then
    ``await pool.call("host", "m", "f", [...])`` or ``node = await
    pool.get("host")``.  A broken connection is replaced on the next ``get``.
    Keyword options are those of ``open_connection``.
    """

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._connections: dict[str, Connection] = {}
        self._locks: dict[str, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self._nursery_cm: Any = None

    async def __aenter__(self) -> Pool:
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            with trio.CancelScope(shield=True):
                await self.aclose()
            await self._nursery_cm.__aexit__(*exc)
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None

    async def get(self, destination: str) -> Connection:
        """An open connection to ``destination`` (``[user@]host[:port]``),
        opening one if needed.  Raises as ``open_connection``."""
        if self._nursery is None:
            raise RuntimeError("use the Pool as `async with sshrpc.Pool(...) as pool`")
        lock = self._locks.setdefault(destination, trio.Lock())
        async with lock:
            connection = self._connections.get(destination)
            if connection is not None and not connection.closed:
                await trio.lowlevel.checkpoint()
                return connection
            if connection is not None:
                await connection.aclose()
            u, h, p = parse_destination(destination)
            opts = dict(self._options)
            connection = await connect_node(
                self._nursery, h, p, u or opts.pop("user", None), **opts
            )
            self._connections[destination] = connection
            return connection

    async def call(
        self, destination: str, module: str, function: str, args: Sequence[Any] = ()
    ) -> Any:
        """``(await self.get(destination)).call(module, function, args)``."""
        node = await self.get(destination)
        return await node.call(module, function, args)

    async def aclose(self) -> None:
        """Close every connection.  Idempotent."""
        connections, self._connections = list(self._connections.values()), {}
        for connection in connections:
            await connection.aclose()
