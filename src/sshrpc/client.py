"""Trio tasks <-> one sshrpc session over SSH: the client side of PROTOCOL.md.

``open_connection`` (an async context manager) and ``connect_node`` (the
explicit-nursery variant) give a ``Connection``.  Any number of tasks may use
one connection at once: each request gets an id and its answer is routed back
to its caller.  The bytes go through one pump task (``sshrpc._pump``).

Many requests from one task: ``send_request``/``receive_response`` and
``RequestSet`` (``sshrpc._request``), like OTP's ``erpc:send_request``.

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
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import trio

from . import _ssh, _ssh_config
from . import protocol as _p
from ._bulk import tune_malloc
from ._deadline import effective_deadline as _effective_deadline
from ._errors import (
    ChannelRefused,
    ConnectionLost,
    LocalProtocolError,
    MessageTooLarge,
    NodeTimeout,
    ProtocolError,
    RemoteError,
    SSHRPCError,
    TermError,
)
from ._pump import DEFAULT_WRITE_LIMIT, Lane, Pump
from ._reqc import finish_replies as _finish_replies
from ._request import CallSlots, Request, RequestSet, new_requests
from ._saferepr import safe_repr
from ._types import Atom

__all__ = [
    "DEFAULT_KEEPALIVE",
    "DEFAULT_MAX_CONNECTS",
    "Connection",
    "ConnectionStatistics",
    "Pool",
    "Request",
    "RequestSet",
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

_A = Atom


_INF = math.inf
_ceil = math.ceil
_current_task = trio.lowlevel.current_task
_wait_task_rescheduled = trio.lowlevel.wait_task_rescheduled
_Reply, _ErrorReply = _p.Reply, _p.ErrorReply
_checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
#: Call ids wrap at 2**64 (PROTOCOL.md's id range).
_ID_SPACE = 2**64


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

    ``call`` is one request and one waiting task.  One task may keep many
    requests open with ``send_request`` (returns a ``Request``) and
    ``receive_response(req)``, or with a ``RequestSet`` (``into=``,
    ``label=``) whose ``receive_response()`` gives answers in completion
    order; cancellation as in ``call``.  At most the server's ``max_calls``
    are open at once: beyond it senders wait for a slot.
    """

    def __init__(
        self,
        pump: Pump | Lane,
        *,
        destination: str,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_undelivered: int = DEFAULT_MAX_UNDELIVERED,
        keepalive: float | None = DEFAULT_KEEPALIVE,
        keepalive_misses: int = DEFAULT_KEEPALIVE_MISSES,
    ) -> None:
        self._pump = pump
        self.destination = destination
        self._proto = _p.Connection(_p.Role.CLIENT, max_frame=max_frame, name=CLIENT_NAME)
        self.max_frame = max_frame
        self._pending: dict[int, Request] = {}
        self._ids = itertools.count()
        self._mailbox: deque[Any] = deque()
        self._mailbox_event = trio.Event()
        self._pings: dict[int, trio.Event] = {}
        self._ping_ids = itertools.count(1)
        self._undelivered = 0
        #: Callers woken by an answer that have not run yet: while any
        #: has, more calls are about to be sent, so none is written alone.
        self._woken = 0
        #: The last queued call was written by its caller with the pump
        #: asleep on the socket (see ``_queue_call``).
        self._lone_ok = False
        #: The request API's last send was a batch form (written by its
        #: caller when the pump sleeps): a read that answered only request
        #: sets then lets the pump sleep at once (see ``_on_data``).
        self._direct_batches = False
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
        self._slots: CallSlots | None = None
        self._nursery: trio.Nursery | None = None
        #: trio.lowlevel.reschedule without its wrapper's frame: this run's
        #: ``Runner.reschedule`` (a private attribute; the public function
        #: where it is missing).  A connection lives in one Trio run.
        self._reschedule: Callable[[trio.lowlevel.Task], object] = trio.lowlevel.reschedule
        with suppress(AttributeError):
            self._reschedule = trio._core._run.GLOBAL_RUN_CONTEXT.runner.reschedule
        #: trio.current_time without its two wrappers' frames: the run's
        #: clock's own method (what Trio's Runner.current_time calls).
        self._now: Callable[[], float] = trio.current_time
        with suppress(AttributeError):
            self._now = trio._core._run.GLOBAL_RUN_CONTEXT.runner.clock.current_time

    # -- set-up --------------------------------------------------------------

    async def _start(self, nursery: trio.Nursery) -> None:
        """Start the pump and keepalive tasks in ``nursery``, send our hello
        and wait for the server's."""
        nursery.start_soon(self._run)
        self._pump.send_nowait(self._proto.send(self._proto.hello()))
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
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await self._pump.run(self._on_data, self._should_read, self._on_eof)
                    nursery.cancel_scope.cancel()
        finally:
            # Also when the owner's nursery is cancelled without aclose().
            with trio.CancelScope(shield=True):
                await self._pump.aclose()

    # -- the receive side (runs in the pump task) ---------------------------

    def _should_read(self) -> bool:
        # While closing, read on regardless, to see the server's bye and EOF.
        return self._closing or self._undelivered < self.max_undelivered

    def _on_data(self, data: bytes) -> bool:
        """Take a read's bytes (the pump's ``on_data``).  True when it
        answered more than one call: their callers will send again soon."""
        self._last_heard = trio.current_time()
        proto = self._proto
        proto.receive_data(data)
        answered = 0
        try:
            # The small frames of the read decoded in one go; then
            # next_event for whatever that left (see next_events).
            pop = self._pending.pop
            replies = proto.next_replies()
            start = 0
            if _finish_replies is not None and replies and type(replies[0]) is tuple:
                start = answered = self._finish_replies(replies)
            for batched in replies[start:] if start else replies:
                # _dispatch's Reply branch, inlined (the per-call path); a
                # plain reply comes as its decoded term (next_replies).
                if type(batched) is tuple:
                    pending = pop(batched[1])  # (the core checked the id is open)
                    value = batched[2]
                elif type(batched) is _Reply:
                    pending = pop(batched.id)
                    value = batched.value
                else:
                    self._dispatch(batched)
                    continue
                slot = pending.slot
                if slot is not None:
                    pending.slot = None
                    if slot._waiters:
                        slot.release()
                    else:
                        slot.free += 1  # (CallSlots.release)
                pending.ok = True
                pending.value = value
                if pending.counted and not pending.abandoned:
                    self._undelivered += 1
                # Request._finish, inlined.
                pending.done = True
                task = pending._task
                if task is not None:
                    self._woken += 1
                    pending._task = None
                    self._reschedule(task)
                if pending._owner is not None:
                    pending._owner._completed(pending)
                if pending.chunk_event is not None:
                    pending.chunk_event.set()
                answered += 1
            while True:
                event = proto.next_event()
                if event is _p.NEED_DATA:
                    # (No caller task woken and the request sets refilled
                    # by batch forms, whose caller writes itself while the
                    # pump sleeps and may then read the next answers
                    # itself: the pump need not stay awake for them.)
                    return answered > 1 and (self._woken > 0 or not self._direct_batches)
                if event is _p.CLOSED:
                    self._pump.fail(ConnectionLost("the server closed the session"))
                    return False
                assert isinstance(event, _p.Event)
                self._dispatch(event)
        except ProtocolError as exc:
            if exc.bye is not None:
                self._send_control(_p.Bye(reason=exc.bye))
            self._pump.fail(exc)
        return False

    def _finish_replies(self, replies: list[Any]) -> int:
        """``_on_data``'s per-reply loop for the leading plain replies it
        decides in C (csrc/pyreq.c ``finish_replies``): the same effects,
        with the slots, the undelivered count, the wake-ups and the
        request sets' completions applied once per run.  Returns how many
        replies it took (the caller's loop takes the rest)."""
        slots = self._slots
        free_slots = slots if slots is not None and not slots._waiters else None
        done: list[Request] = []
        tasks: list[trio.lowlevel.Task] = []
        stop, freed, counted, owner = _finish_replies(
            replies, 0, self._pending, free_slots, done, tasks
        )
        if freed:
            free_slots.free += freed  # type: ignore[union-attr]
        if counted:
            self._undelivered += counted
        if tasks:
            self._woken += len(tasks)
            reschedule = self._reschedule
            for task in tasks:
                reschedule(task)
        if done:
            owner._completed_many(done, self)
        return stop  # type: ignore[no-any-return]

    def _dispatch(self, event: _p.Event) -> None:
        kind = type(event)
        if kind is _Reply or kind is _ErrorReply:
            pending = self._pending.pop(event.id)  # type: ignore[attr-defined]
            pending.release()  # (the core checked the id is open)
            if kind is _Reply:
                pending.ok = True
                pending.value = event.value  # type: ignore[attr-defined]
            else:
                assert isinstance(event, _ErrorReply)
                pending.error = RemoteError.from_term(event.cls, event.reason, event.details)
            if pending.counted and not pending.abandoned:
                self._undelivered += 1
            if pending._task is not None:
                self._woken += 1
            pending._finish()
        elif isinstance(event, _p.Chunk):
            pending = self._pending[event.id]
            if not pending.abandoned and pending.chunks is not None:
                pending.chunks.append(event.value)
                self._undelivered += 1
                if pending.chunk_event is not None:
                    pending.chunk_event.set()
        elif isinstance(event, _p.Send):
            self._mailbox.append(event.msg)
            self._undelivered += 1
            self._mailbox_event.set()
        elif isinstance(event, _p.Down):
            self._mailbox.append((_A("down"), event.pid, event.reason))
            self._undelivered += 1
            self._mailbox_event.set()
        elif isinstance(event, _p.Pong):
            token = event.token
            waiter = self._pings.pop(token, None) if isinstance(token, int) else None
            if waiter is not None:
                waiter.set()
        elif isinstance(event, _p.Hello):
            self.hello = {
                "max_frame": event.max_frame,
                "server": event.server,
                "node": event.node,
                "session": event.session,
                "max_calls": event.max_calls,
                "features": list(event.features),
                **{str(k): v for k, v in event.extra.items()},
            }
            if event.max_calls is not None and event.max_calls > 0:
                self._slots = CallSlots(event.max_calls)
            self._hello_event.set()
        elif isinstance(event, _p.Bye):
            self._pump.fail(
                ConnectionLost(f"the server closed the session: {safe_repr(event.reason)}")
            )
        else:
            log.info("ignored message from the server: %s", safe_repr(event))

    def _on_eof(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        pendings = list(self._pending.values())
        self._pending.clear()
        for pending in pendings:
            pending.release()
            if not pending.done:
                pending.error = error
                if pending.counted and not pending.abandoned:
                    self._undelivered += 1
                pending._finish()
        for event in self._pings.values():
            event.set()
        self._pings.clear()
        self._mailbox_event.set()
        self._ended.set()

    def _send_control(self, event: _p.Event) -> None:
        """Queue a small control frame (cancel, credit, bye, ping) if the
        connection still lives; nothing otherwise."""
        with suppress(ConnectionLost, LocalProtocolError):
            self._pump.send_nowait(self._proto.send(event))

    def _raise_error(self) -> BaseException:
        error = self._error
        if isinstance(error, ProtocolError):
            return ProtocolError(str(error), bye=error.bye)
        if isinstance(error, ConnectionLost):
            return ConnectionLost(f"{self.destination}: {error}")
        return ConnectionLost(f"{self.destination}: connection closed ({error})")

    def _taken(self, n: int = 1) -> None:
        self._undelivered -= n
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
                self._send_control(_p.Ping(token=0))

    # -- sending -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._raise_error()
        if self._closing:
            raise ConnectionLost(f"{self.destination}: the connection is closing")

    async def _send_request(self, make: Callable[[], _p.Event | bytes], pending: Request) -> None:
        """Wait for a call slot and room in the send queue, then encode
        ``make()``, register ``pending`` and queue the frame, with no
        checkpoint in between: a cancel leaves nothing registered or sent.
        Encoding errors (``TermError``, ``TypeError``, ``MessageTooLarge``)
        propagate with nothing sent."""
        self._check_open()
        slots = self._slots
        if slots is not None and not slots.acquire_nowait():
            await slots.acquire()  # (no scheduler round trip when one is free)
        try:
            frame = await self._encode_when_room(make)
        except BaseException:
            if slots is not None:
                slots.release()
            raise
        pending.slot = slots
        # Alone in flight: write at once; else let the pump batch the frames.
        direct = not self._pending
        self._pending[pending.id] = pending
        self._pump.send_nowait(frame, direct)

    def _new_id(self) -> int:
        while True:
            i = next(self._ids) % _ID_SPACE
            if i not in self._pending:
                return i

    def _timeout(self) -> int | None:
        """The caller's remaining time in ms (None: no deadline), a call's
        ``timeout``.  Rounded up, so the server's deadline is never before
        the caller's: the caller's scope fires first and the call ends as
        cancelled.  0 in a cancelled scope (where a send that is not a
        checkpoint still sends)."""
        deadline = _effective_deadline()
        if deadline == _INF:
            return None
        if deadline == -_INF:
            return 0
        return max(0, _ceil((deadline - self._now()) * 1000))

    def _abandon(self, pending: Request) -> None:
        """Give up ``pending``: discard its answer if it came (uncounting
        it), else tell the server ``{cancel, Id}`` and discard the answer
        when it comes."""
        if pending.abandoned or pending.received:
            return
        pending.abandoned = True
        if pending.done:
            if pending.counted:
                self._taken()
        elif self._error is None:
            self._send_control(_p.Cancel(id=pending.id))

    async def _await(self, pending: Request, lone: bool = False) -> Any:
        """Wait for ``pending``'s answer and take it (a checkpoint).  If
        cancelled: the request is abandoned (see ``_abandon``).  ``lone``:
        this task has just written ``pending``'s frame itself, alone in
        flight (``_lone_ok``); it may read the answer itself
        (``Pump.wait_answer``)."""
        try:
            if pending.done:
                await trio.lowlevel.checkpoint()
            elif lone and (woken := await self._pump.wait_answer(pending)) is not None:
                if woken and self._woken:
                    self._woken -= 1
            else:
                # Request._wait, inlined (the per-call path).
                pending._task = _current_task()
                await _wait_task_rescheduled(pending._abort)
                if self._woken:
                    self._woken -= 1
        except BaseException:
            self._abandon(pending)
            raise
        pending.received = True
        if pending.counted:
            self._undelivered -= 1
            if self._pump.paused and self._should_read():
                self._pump.wake()
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
        # The per-call path: _new_id, _send_call, _queue_call and _await
        # inlined for the common case (a call slot free, room in the send
        # queue, nobody woken waiting to send); the rest goes through them.
        i = next(self._ids) % _ID_SPACE
        if i in self._pending:
            i = self._new_id()
        pending = Request(i)
        if self._error is not None or self._closing:
            self._check_open()
        slots = self._slots
        pump = self._pump
        if (slots is not None and (slots.free <= 0 or slots._waiters)) or len(
            pump._out
        ) >= pump.write_limit:
            await self._send_call(pending, module, function, args)
            return await self._await(pending, self._lone_ok)
        if slots is not None:
            slots.free -= 1  # (acquire_nowait)
        try:
            deadline = _effective_deadline()
            if deadline == -_INF:  # (the walk saw a cancelled scope)
                await _checkpoint_if_cancelled()  # raises Cancelled: nothing sent
            # Rounded up, so the server's deadline is never before the
            # caller's: the caller's scope fires first.
            timeout = None if deadline == _INF else max(0, _ceil((deadline - self._now()) * 1000))
            frame = self._proto.send_call(i, module, function, args, timeout)
        except BaseException as exc:
            if slots is not None:
                slots.release()
            if isinstance(exc, LocalProtocolError):
                raise ConnectionLost(f"{self.destination}: {exc}") from exc
            raise
        pending.slot = slots
        direct = not self._pending and not self._woken
        self._pending[i] = pending
        if pump.send_nowait(frame, direct):
            return await self._await(pending, True)
        try:
            # _await: parked until the answer's dispatch reschedules us.
            pending._task = _current_task()
            await _wait_task_rescheduled(pending._abort)
            if self._woken:
                self._woken -= 1
        except BaseException:
            self._abandon(pending)
            raise
        pending.received = True
        self._undelivered -= 1  # (a call's answer is counted)
        if pump.paused and self._should_read():
            pump.wake()
        if pending.ok:
            return pending.value
        error = pending.error
        if isinstance(error, RemoteError):
            raise error
        raise self._raise_error()

    async def _send_call(
        self, pending: Request, module: str, function: str, args: Sequence[Any]
    ) -> None:
        """``_send_request`` for a call, flattened: the per-call path."""
        if self._error is not None or self._closing:
            self._check_open()
        slots = self._slots
        if slots is not None and not slots.acquire_nowait():
            await slots.acquire()  # (no scheduler round trip when one is free)
        try:
            pump = self._pump
            while len(pump._out) >= pump.write_limit:
                await pump.send(b"")  # waits for room (or raises if lost)
                self._check_open()
            await trio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            if slots is not None:
                slots.release()
            raise
        self._queue_call(pending, slots, module, function, args)

    def _queue_call(
        self,
        pending: Request,
        slots: CallSlots | None,
        module: str,
        function: str,
        args: Sequence[Any],
        batch: bool = False,
    ) -> None:
        """Encode the call (the caller's deadline as its timeout), register
        ``pending`` with ``slots``'s slot, which the caller holds, and queue
        the frame (``batch``: more frames follow at once, leave the write to
        the pump).  Not a checkpoint.  On an error nothing is registered or
        sent and the slot is released."""
        try:
            if self._error is not None or self._closing:
                self._check_open()
            frame = self._proto.send_call(pending.id, module, function, args, self._timeout())
        except BaseException as exc:
            if slots is not None:
                slots.release()
            if isinstance(exc, LocalProtocolError):
                raise ConnectionLost(f"{self.destination}: {exc}") from exc
            raise
        pending.slot = slots
        # Alone in flight (and no other caller woken by the last answers,
        # who would send next in this scheduler round): write at once;
        # else let the pump batch the frames.
        direct = not self._pending and not self._woken and not batch
        self._pending[pending.id] = pending
        # True: written by this task, the pump asleep on the socket (call
        # may then wait for the answer there itself: Pump.wait_answer).
        self._lone_ok = self._pump.send_nowait(frame, direct)

    def send_request_nowait(
        self,
        module: str,
        function: str,
        args: Sequence[Any] = (),
        *,
        into: RequestSet | None = None,
        label: Any = None,
    ) -> Request:
        """``send_request`` without waiting and without a checkpoint: raises
        ``trio.WouldBlock`` (nothing sent) when no call slot is free or the
        send queue is full.  For a task that refills many requests per
        batch of answers: ``label, value = await reqs.receive_response()``,
        then ``reqs.check_response()`` and ``send_request_nowait`` until
        ``WouldBlock`` -- one checkpoint per batch instead of two per call.
        Raises as ``send_request`` otherwise."""
        if self._error is not None or self._closing:
            self._check_open()
        if len(self._pump._out) >= self._pump.write_limit:
            raise trio.WouldBlock
        slots = self._slots
        if slots is not None and not slots.acquire_nowait():
            raise trio.WouldBlock
        req = Request(self._new_id(), self, label)
        self._direct_batches = False
        self._queue_call(req, slots, module, function, args, batch=True)
        if into is not None:
            into._add(req)
        return req

    def send_requests_nowait(
        self,
        module: str,
        function: str,
        arglists: Sequence[Sequence[Any]],
        *,
        into: RequestSet | None = None,
        labels: Sequence[Any] | None = None,
    ) -> list[Request]:
        """``send_request_nowait`` for many calls of one function at once:
        sends ``module:function(*args)`` for the leading ``args`` of
        ``arglists`` that there are free call slots for (the server's
        ``max_calls``), in order, and returns their ``Request`` handles --
        ``[]``, nothing sent, when no slot is free, others wait for one, or
        the send queue is full.  ``labels`` (as long as ``arglists``) gives
        each request its label (else None); ``into`` a ``RequestSet`` they
        join.  The frames of the batch are encoded in one pass and queued
        at once (one wake-up of the pump).

        Not a checkpoint (so never ``Cancelled``).  The remaining time of
        the caller's cancel scopes travels as each call's ``timeout`` (0 in
        a cancelled scope).  All or nothing: an argument with no Erlang term
        raises ``TermError``/``TypeError``, and ``MessageTooLarge`` a call
        too large, with nothing of the batch sent; ``ConnectionLost`` if the
        connection ended; ``ValueError`` if ``labels`` differs in length.
        The send queue may go beyond ``write_limit`` by this batch."""
        if self._error is not None or self._closing:
            self._check_open()
        n = len(arglists)
        if labels is not None and len(labels) != n:
            raise ValueError("send_requests_nowait: labels and arglists differ in length")
        pump = self._pump
        if len(pump._out) >= pump.write_limit:
            return []
        slots = self._slots
        if slots is not None:
            if slots._waiters:
                return []
            n = min(n, slots.free)
        if n <= 0:
            return []
        pending = self._pending
        # The next n ids of the counter in one C pass; one at a time when
        # they wrap around or one of them is still open.
        ids = list(itertools.islice(self._ids, n))
        if ids[-1] >= _ID_SPACE or not pending.keys().isdisjoint(ids):
            ids = [i % _ID_SPACE for i in ids]
            ids = [self._new_id() if i in pending else i for i in ids]
        batch = [a if type(a) is list else list(a) for a in arglists[:n]]
        try:
            frames = self._proto.send_calls(ids, module, function, batch, self._timeout())
        except LocalProtocolError as exc:
            raise ConnectionLost(f"{self.destination}: {exc}") from exc
        if slots is not None:
            slots.free -= n
        reqs = new_requests(self, ids, slots, into, labels)
        self._lone_ok = False
        self._direct_batches = True
        # The batch is one write: this task writes it itself when the pump
        # sleeps on the socket and no woken task is about to queue more
        # (Pump.send_nowait's direct; a request set's waiter may then read
        # the answers itself, RequestSet._wait).
        pump.send_nowait(frames, not self._woken)
        return reqs

    async def send_request(
        self,
        module: str,
        function: str,
        args: Sequence[Any] = (),
        *,
        into: RequestSet | None = None,
        label: Any = None,
    ) -> Request:
        """Send ``module:function(*args)`` like ``call`` and return at once
        with a ``Request`` handle, without waiting for the answer (OTP's
        ``erpc:send_request``).  One task may keep many requests open.

        Take the result with ``receive_response(req)``, or pass ``into=`` a
        ``RequestSet`` (with a ``label``, returned with the result) and take
        results in completion order from the set.  A request's answer is
        held by its handle (not counted against ``max_undelivered``): a
        dropped ``Request`` or ``RequestSet`` takes its answers with it.  To
        stop the server's work too, cancel a ``receive_response`` or call
        ``RequestSet.abandon()``.

        Waits, like ``call``, for a call slot (the server's ``max_calls``:
        a task keeping more than ``max_calls`` requests open waits forever
        for its own answers) and for room in the send queue.  The remaining
        time of the caller's cancel scopes at send time travels as the
        call's ``timeout``.  A checkpoint; if cancelled, nothing was sent.
        Raises ``ConnectionLost``, ``TermError`` (nothing sent) as ``call``.
        """
        req = Request(self._new_id(), self, label)
        self._direct_batches = False
        await self._send_call(req, module, function, args)
        if into is not None:
            into._add(req)
        return req

    async def receive_response(self, req: Request) -> Any:
        """The result of ``req`` (from ``send_request`` without ``into``),
        waiting for it; raises exactly as ``call`` does (``RemoteError`` and
        subclasses, ``ConnectionLost``).

        A checkpoint.  If cancelled, ``Cancelled`` propagates, the request is
        abandoned (``{cancel, Id}`` is sent if it is still open; its answer
        is discarded), as when a ``call`` is cancelled.  Raises
        ``ValueError`` for a request of another connection, of a
        ``RequestSet``, or already received or abandoned.
        """
        if req._conn is not self:
            raise ValueError(f"{req!r} was not sent on this connection")
        if req._owner is not None:
            raise ValueError(f"{req!r} belongs to a RequestSet: use its receive_response()")
        if req.received or req.abandoned:
            raise ValueError(f"{req!r} was already received or abandoned")
        return await self._await(req)

    async def exports(self) -> list[tuple[str, str, Any]]:
        """What this connection's key may call on the node, as ``(module,
        function, arity)`` tuples (``arity`` is ``(min, Atom("infinity"))``
        for a ``*args`` function), from the node's built-in
        ``sshrpc:exports/0`` (docs/protocol.md).  Raises as ``call``; a node
        without the built-in (the Erlang daemon) answers ``forbidden``."""
        return [tuple(entry) for entry in await self.call("sshrpc", "exports", [])]

    async def cast(self, module: str, function: str, args: Sequence[Any] = ()) -> None:
        """Ask the server to run ``module:function(*args)``; no answer, ever.

        Returns once the request is queued (a checkpoint; waits for room in
        the send queue).  Raises ``ConnectionLost`` if the connection ended.
        """
        await self._send_simple(
            lambda: _p.Cast(module=_A(module), function=_A(function), args=list(args))
        )

    async def _send_simple(self, make: Callable[[], _p.Event]) -> None:
        """Wait for room in the send queue, then encode and queue ``make()``
        (no checkpoint in between: a cancel sends nothing)."""
        self._check_open()
        frame = await self._encode_when_room(make)
        self._pump.send_nowait(frame, not self._pending)

    async def _encode_when_room(self, make: Callable[[], _p.Event | bytes]) -> bytes:
        """Wait until the send queue is below ``write_limit``, then encode
        ``make()`` (an event, or a frame from the core's ``send_call``); the
        last checkpoint is before the encode, so a cancel leaves nothing
        encoded."""
        while self._pump.queued_bytes >= self._pump.write_limit:
            await self._pump.send(b"")  # waits for room (or raises if lost)
            self._check_open()
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        try:
            made = make()
            return made if type(made) is bytes else self._proto.send(made)  # type: ignore[arg-type]
        except LocalProtocolError as exc:
            raise ConnectionLost(f"{self.destination}: {exc}") from exc

    async def spawn(self, module: str, function: str, args: Sequence[Any] = ()) -> Any:
        """Start ``module:function(*args)`` as a long-lived process on the
        server; return its pid.  Its messages to this session's pid and its
        ``{down, Pid, Reason}`` arrive in ``receive()``.  Cancellation as in
        ``call``."""
        pending = Request(self._new_id())
        await self._send_request(
            lambda: _p.Spawn(
                id=pending.id, module=_A(module), function=_A(function), args=list(args)
            ),
            pending,
        )
        return await self._await(pending)

    async def send(self, dest: Any, message: Any) -> None:
        """Send ``message`` to the server process ``dest`` (a pid from
        ``spawn``, or a registered name: a ``str`` is sent as an atom).
        A message to no process is dropped, as in Erlang.  A checkpoint."""
        if isinstance(dest, str) and not isinstance(dest, Atom):
            dest = Atom(dest)
        await self._send_simple(lambda: _p.Send(dest=dest, msg=message))

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
        """Yield the chunks of a stream call, then end (the final reply's
        value is discarded).  Credit is granted back to the
        server as items are consumed, so at most ``credit`` chunks wait here.

        Leaving the loop early (break, exception, cancel) sends ``{cancel, Id}``.
        Raises as ``call``.
        """
        pending = Request(self._new_id())
        pending.chunks = deque()
        pending.chunk_event = trio.Event()

        def make() -> _p.Event:
            return _p.Call(
                id=pending.id,
                module=_A(module),
                function=_A(function),
                args=list(args),
                timeout=self._timeout(),
                stream=True,
                credit=credit,
            )

        await self._send_request(make, pending)
        consumed = 0
        assert pending.chunks is not None
        try:
            while True:
                if pending.chunks:
                    item = pending.chunks.popleft()
                    self._taken()
                    consumed += 1
                    if consumed >= max(1, credit // 2) and not pending.done:
                        self._send_control(_p.Credit(id=pending.id, n=consumed))
                        consumed = 0
                    yield item
                    continue
                if pending.done:
                    break
                assert pending.chunk_event is not None
                if pending.chunk_event.is_set():
                    pending.chunk_event = trio.Event()
                    continue
                await pending.chunk_event.wait()
        except BaseException:
            # Left early: the untaken chunks, and the final reply if it has
            # arrived, no longer count against max_undelivered.
            untaken = len(pending.chunks)
            pending.chunks.clear()
            if pending.done:
                self._taken(untaken + 1)
            else:
                pending.abandoned = True
                self._taken(untaken)
                if self._error is None:
                    self._send_control(_p.Cancel(id=pending.id))
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
            await self._send_simple(lambda: _p.Ping(token=token))
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
            waiting_for_slot=self._slots.waiting if self._slots else 0,
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

    @asynccontextmanager
    async def open_channel(
        self,
        *,
        max_undelivered: int | None = None,
        max_frame: int | None = None,
    ) -> AsyncIterator[Connection]:
        """``async with node.open_channel() as channel:`` a new sshrpc
        session on this SSH connection: one more SSH session channel with
        the sshrpc subsystem (sshd starts a new relay and the node a new
        session: its own hello, ids, mailbox, ``max_calls``), over the same
        TCP connection, key exchange and authentication.  This is the
        paper's "exec-mod" pattern: a new channel per call on a kept
        connection.

        The child is a ``Connection`` (``call``, ``cast``, ``spawn``,
        ``send``, ``receive``, ``stream``, ``send_request``...); one pump
        task moves the bytes of all channels (docs/client.md, "More
        channels on one connection").  ``max_undelivered`` and
        ``max_frame`` default to this connection's.  The child sends no
        keepalive pings of its own (this connection's cover the transport);
        its receive window is this connection's ``window=``.

        Leaving the block closes the child (bye, then the channel); this
        connection and its other children carry on.  Closing this
        connection (or losing it) ends every child: their calls raise
        ``ConnectionLost``.  A child opened from a child is a sibling: it
        lives on the same SSH connection.

        A checkpoint.  Raises ``ChannelRefused`` (a ``ConnectionLost``) when
        sshd refuses the channel or the subsystem (e.g. ``MaxSessions``) or
        the node refuses the session (``reason``, e.g.
        ``(Atom("too_many_channels"), N)``); this connection is unaffected.
        ``ConnectionLost`` if this connection has ended.  If cancelled while
        opening, the half-open channel is closed by the pump.
        """
        self._check_open()
        pump = self._pump
        root = pump.pump if isinstance(pump, Lane) else pump
        lane = await root.open_lane()
        child = _ChannelConnection(
            lane,
            destination=f"{self.destination} channel {root.lanes_opened}",
            max_frame=self.max_frame if max_frame is None else max_frame,
            max_undelivered=self.max_undelivered if max_undelivered is None else max_undelivered,
            keepalive=None,
        )
        try:
            async with trio.open_nursery() as nursery:
                try:
                    await child._start(nursery)
                except BaseException as exc:
                    with trio.CancelScope(shield=True):
                        await child.aclose()
                    if isinstance(exc, ConnectionLost) and child._refusal is not None:
                        raise ChannelRefused(
                            f"{child.destination}: the node refused the session: "
                            f"{safe_repr(child._refusal)}",
                            child._refusal,
                        ) from None
                    raise
                try:
                    yield child
                finally:
                    await child.aclose()
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None

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
                self._send_control(_p.Bye(reason=_A("normal")))
                with trio.move_on_after(CLOSE_DRAIN_TIMEOUT):
                    await self._ended.wait()
            self._pump.fail(ConnectionLost("the connection was closed"))
            self._cancel_scope.cancel()
            with trio.move_on_after(CLOSE_DRAIN_TIMEOUT):
                await self._ended.wait()
            await self._pump.aclose()
        await trio.lowlevel.checkpoint()


class _ChannelConnection(Connection):
    """A ``Connection`` on a ``Lane`` (``Connection.open_channel``): notes a
    bye that comes instead of the hello, the node's refusal of the session."""

    _refusal: Any = None

    def _dispatch(self, event: _p.Event) -> None:
        if type(event) is _p.Bye and not self._hello_event.is_set():
            self._refusal = event.reason
        super()._dispatch(event)


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
    window: int | None = None,
) -> Connection:
    """Open a connection whose background tasks run in ``nursery``.

    Same arguments as ``open_connection``.  The caller must ``aclose()`` the
    connection; cancelling ``nursery`` abandons it (the socket is closed when
    the pump task ends).  A checkpoint; on any error or cancel nothing stays
    open (a ProxyCommand/ProxyJump process is ended too).

    The ssh config is honoured as ``ssh`` would (docs/client.md, "ssh_config
    parity"): ProxyJump/ProxyCommand, known_hosts files and HostKeyAlias,
    ConnectTimeout (bounds connect + handshake), ServerAliveInterval/CountMax
    (become ``keepalive``/``keepalive_misses`` unless you pass other
    values).  An option sshrpc refuses raises ``SSHConfigError`` before
    anything is connected.
    """
    if window is not None and not 0 < window <= 2**31:
        raise ValueError(f"window must be 1..2**31 bytes, not {window!r}")
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
        settings,
        verify_host_key=verify_host_key,
        accept_new_host_keys=accept_new_host_keys,
        passphrase=passphrase,
        agent=agent and not (identity is not None and settings.identities_only),
        password=password,
        subsystem=subsystem,
    )
    if (
        settings.server_alive_interval > 0
        and keepalive == DEFAULT_KEEPALIVE
        and keepalive_misses == DEFAULT_KEEPALIVE_MISSES
    ):
        # ServerAliveInterval/CountMax of the ssh config, unless the caller
        # chose the keepalive: our pings do what OpenSSH's do.
        keepalive = settings.server_alive_interval
        keepalive_misses = settings.server_alive_count_max
    pump.write_limit = write_limit
    if window is not None:
        _grow_receive_window(pump, window)
        pump.window = window  # (and for open_channel's channels)
    destination = f"{settings.user}@{settings.hostname}:{settings.port}"
    tune_malloc(max_frame)  # (large frames: reuse their memory, src/sshrpc/_bulk.py)
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


def _grow_receive_window(pump: Pump, window: int) -> None:
    """Raise the channel's receive window to ``window`` bytes (libssh2 opens
    it at 2 MiB), so the server may have that much in flight towards us:
    size it to the bandwidth-delay product on long links."""
    current = pump.channel.window_read()
    if window > current:
        pump.channel.receive_window_adjust2(window - current, True)


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
    pauses), ``max_frame``, ``keepalive`` (seconds, None to disable),
    ``keepalive_misses`` and ``window`` (the channel's receive window in
    bytes; libssh2 opens it at 2 MiB: size it to the bandwidth-delay
    product for large answers over long round trips).

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

#: Connection set-ups (TCP connect, SSH key exchange, authentication,
#: subsystem, hellos) in progress at once in ``multicall`` and per ``Pool``:
#: each costs a key exchange and a signature on both sides (and the server
#: forks sshd), so thousands at once only queue on CPU (parallel-ssh's
#: ``pool_size`` is the same idea).  Established connections are not counted.
DEFAULT_MAX_CONNECTS = 32

#: What one node's failure may be: recorded in its result slot, never raised.
_NODE_ERRORS = (SSHRPCError, OSError, TermError, MessageTooLarge)


def _check_fanout(max_connects: int, per_node_timeout: float | None) -> None:
    if isinstance(max_connects, bool) or not isinstance(max_connects, int) or max_connects < 1:
        raise ValueError(f"max_connects must be an int >= 1, not {max_connects!r}")
    if per_node_timeout is not None and not (
        isinstance(per_node_timeout, int | float)
        and not isinstance(per_node_timeout, bool)
        and per_node_timeout > 0
    ):
        raise ValueError(f"per_node_timeout must be seconds > 0 or None, not {per_node_timeout!r}")


def _parse_all(
    destinations: Sequence[str | Connection],
) -> list[tuple[str | None, str, int | None]]:
    """Every host-name destination parsed up front, so a malformed one raises
    ``ValueError`` before any node is contacted."""
    parsed: list[tuple[str | None, str, int | None]] = []
    for destination in destinations:
        if isinstance(destination, Connection):
            parsed.append((None, "", None))
            continue
        if not isinstance(destination, str):
            raise TypeError(
                f"a destination is a str or a Connection, not {type(destination).__name__}"
            )
        try:
            user, host, port = parse_destination(destination)
            address = destination.rpartition("@")[2]
            if address.startswith("[") and not (
                address.endswith("]") or address[address.find("]") + 1 :].startswith(":")
            ):
                raise ValueError("unclosed or trailing text after [address]")
        except ValueError:
            raise ValueError(
                f"bad destination {destination!r}: expected [user@]host[:port] "
                "or [user@][address]:port"
            ) from None
        if not host or (port is not None and not 0 < port < 65536):
            raise ValueError(f"bad destination {destination!r}: empty host or port out of range")
        parsed.append((user, host, port))
    return parsed


def _deadline_after(seconds: float | None) -> float:
    return math.inf if seconds is None else trio.current_time() + seconds


async def _fan_out(count: int, one: Callable[[int], Any]) -> None:
    """Run ``await one(i)`` for every index at once; no ExceptionGroup leaks."""
    try:
        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(one, index)
    except BaseExceptionGroup as group:
        raise _unwrap(group) from None


async def multicall(
    nodes: Iterable[str | Connection],
    module: str,
    function: str,
    args: Sequence[Any] = (),
    *,
    max_connects: int = DEFAULT_MAX_CONNECTS,
    per_node_timeout: float | None = None,
    **options: Any,
) -> list[Any]:
    """Call ``module:function(*args)`` on every node at once; return one
    entry per node, in order: the result, or the exception that node's call
    raised (``RemoteError``, ``ConnectionLost``, ``HostKeyError``,
    ``AuthenticationFailed``, ``NodeTimeout``...), like ``erpc:multicall``.

    ``nodes`` are open ``Connection``s (used as they are, left open) and/or
    destinations ``[user@]host[:port]``, which get a connection each
    (``options`` as in ``open_connection``), closed after their call.

    At most ``max_connects`` connections are being set up at once (TCP,
    SSH handshake, authentication, hellos); a node's slot is freed as soon
    as its connection is up, so the calls themselves all run concurrently
    and the total time is about the slowest node's, plus the connects
    queued ``len(nodes) / max_connects`` deep.

    ``per_node_timeout`` (seconds, None for no bound) bounds each node
    separately: its clock starts when that node's connect starts (after the
    wait for a connect slot, which the caller's scope bounds), and covers
    connect and call.  A node past it gets ``NodeTimeout`` in its slot
    (its call is cancelled, its connection dropped without the closing
    handshake); the other nodes carry on.  The remaining time travels with
    the call as its ``timeout`` option, so the server gives up too.

    The caller's cancel scope bounds the whole: a cancel propagates (as
    ``Cancelled``) at once, with every connection opened here dropped
    (sockets closed, no closing handshake to wait for).  Raises
    ``ValueError`` for a malformed destination or option before contacting
    any node.
    """
    _check_fanout(max_connects, per_node_timeout)
    items = list(nodes)
    parsed = _parse_all(items)
    results: list[Any] = [None] * len(items)
    slots = trio.Semaphore(max_connects)

    async def one(index: int) -> None:
        node = items[index]
        try:
            if isinstance(node, Connection):
                results[index] = await _call_before(
                    node,
                    node.destination,
                    _deadline_after(per_node_timeout),
                    per_node_timeout,
                    module,
                    function,
                    args,
                )
            else:
                user, host, port = parsed[index]
                results[index] = await _connect_and_call(
                    node,
                    user,
                    host,
                    port,
                    slots,
                    per_node_timeout,
                    options,
                    module,
                    function,
                    args,
                )
        except _NODE_ERRORS as exc:
            results[index] = exc

    await _fan_out(len(items), one)
    return results


async def _call_before(
    connection: Connection,
    name: str,
    deadline: float,
    timeout: float | None,
    module: str,
    function: str,
    args: Sequence[Any],
) -> Any:
    """``connection.call(...)`` bounded by ``deadline``: ``NodeTimeout`` past it."""
    with trio.CancelScope(deadline=deadline) as scope:
        return await connection.call(module, function, args)
    assert scope.cancelled_caught
    raise NodeTimeout(name, "call", timeout)


async def _connect_and_call(
    destination: str,
    user: str | None,
    host: str,
    port: int | None,
    slots: trio.Semaphore,
    timeout: float | None,
    options: dict[str, Any],
    module: str,
    function: str,
    args: Sequence[Any],
) -> Any:
    """One node of ``multicall``: connect (holding a slot), call, close.
    Past the deadline the connection is dropped without the closing
    handshake, so a hung node costs no more than its deadline."""
    opts = dict(options)
    user = user or opts.pop("user", None)  # the destination's own user wins
    opts.pop("user", None)
    port = port if port is not None else opts.pop("port", None)
    opts.pop("port", None)
    try:
        async with trio.open_nursery() as nursery:
            async with slots:
                deadline = _deadline_after(timeout)
                connection: Connection | None = None
                with trio.CancelScope(deadline=deadline):
                    connection = await connect_node(nursery, host, port, user, **opts)
            if connection is None:
                raise NodeTimeout(destination, "connect", timeout)
            try:
                result = await _call_before(
                    connection, destination, deadline, timeout, module, function, args
                )
            except (NodeTimeout, trio.Cancelled):
                # Past the node's deadline or the caller's: drop the
                # connection (no bye to wait for from a node that may hang).
                nursery.cancel_scope.cancel()
                raise
            except BaseException:
                await connection.aclose()
                raise
            await connection.aclose()
            return result
    except BaseExceptionGroup as group:
        raise _unwrap(group) from None


class Pool:
    """Connections reused per destination, opened at most ``max_connects``
    at a time.

    ``async with sshrpc.Pool(identity=..., known_hosts=...) as pool:`` then
    ``await pool.call("host", "m", "f", [...])``, ``node = await
    pool.get("host")``, or ``await pool.multicall(destinations, "m", "f",
    [...])`` for many nodes at once.  One connection per destination, shared
    by every task; a broken one is replaced on the next use.  Keyword
    options are those of ``open_connection``.  Leaving the block closes
    every connection (concurrently, each bounded as ``Connection.aclose``).
    """

    def __init__(self, *, max_connects: int = DEFAULT_MAX_CONNECTS, **options: Any) -> None:
        _check_fanout(max_connects, None)
        self.max_connects = max_connects
        self._options = options
        self._connect_slots = trio.Semaphore(max_connects)
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

    def __len__(self) -> int:
        """Open connections held now."""
        return sum(1 for c in self._connections.values() if not c.closed)

    async def get(self, destination: str) -> Connection:
        """An open connection to ``destination`` (``[user@]host[:port]``),
        opening one if needed (waiting for one of ``max_connects`` slots).
        A checkpoint.  Raises as ``open_connection``; a cancel leaves no
        half-open connection."""
        connection, _ = await self._get(destination, None)
        return connection

    async def _get(self, destination: str, timeout: float | None) -> tuple[Connection, float]:
        """The connection and the node's deadline (``timeout`` from when its
        connect started, or from now for a pooled one).  ``NodeTimeout`` if
        the connect does not finish in time."""
        if self._nursery is None:
            raise RuntimeError("use the Pool as `async with sshrpc.Pool(...) as pool`")
        lock = self._locks.setdefault(destination, trio.Lock())
        async with lock:
            connection = self._connections.get(destination)
            if connection is not None and not connection.closed:
                await trio.lowlevel.checkpoint()
                return connection, _deadline_after(timeout)
            if connection is not None:
                del self._connections[destination]
                await connection.aclose()
            (user, host, port) = _parse_all([destination])[0]
            opts = dict(self._options)
            user = user or opts.pop("user", None)  # the destination's own user wins
            opts.pop("user", None)
            port = port if port is not None else opts.pop("port", None)
            opts.pop("port", None)
            async with self._connect_slots:
                deadline = _deadline_after(timeout)
                new: Connection | None = None
                with trio.CancelScope(deadline=deadline):
                    new = await connect_node(self._nursery, host, port, user, **opts)
            if new is None:
                raise NodeTimeout(destination, "connect", timeout)
            self._connections[destination] = new
            return new, deadline

    async def call(
        self, destination: str, module: str, function: str, args: Sequence[Any] = ()
    ) -> Any:
        """``(await self.get(destination)).call(module, function, args)``."""
        node = await self.get(destination)
        return await node.call(module, function, args)

    async def multicall(
        self,
        destinations: Iterable[str],
        module: str,
        function: str,
        args: Sequence[Any] = (),
        *,
        per_node_timeout: float | None = None,
    ) -> list[Any]:
        """``module:function(*args)`` on every destination at once, through
        the pool's connections (opened as needed, at most ``max_connects``
        at a time, and kept for the next call).  One entry per destination,
        in order: the result or that node's exception, as ``multicall``;
        ``per_node_timeout`` as there (a timed-out call is cancelled, its
        connection stays in the pool).  The caller's scope bounds the whole;
        a cancel propagates.  ``ValueError`` for a malformed destination,
        before any node is contacted."""
        _check_fanout(1, per_node_timeout)
        items = list(destinations)
        _parse_all(items)
        results: list[Any] = [None] * len(items)

        async def one(index: int) -> None:
            try:
                connection, deadline = await self._get(items[index], per_node_timeout)
                results[index] = await _call_before(
                    connection, items[index], deadline, per_node_timeout, module, function, args
                )
            except _NODE_ERRORS as exc:
                results[index] = exc

        await _fan_out(len(items), one)
        return results

    async def aclose(self) -> None:
        """Close every connection, concurrently.  Idempotent."""
        connections, self._connections = list(self._connections.values()), {}

        async def close(index: int) -> None:
            await connections[index].aclose()

        await _fan_out(len(connections), close)
