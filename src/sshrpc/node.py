"""Channels -> service calls: the node, the server side of PROTOCOL.md, with Trio.

A ``Node`` holds services, processes (``spawn``), registered names and
mailboxes.  Every channel (``serve_channel``) reaches the same node, as every
SSH channel of an Erlang node reaches the same VM.  Two ways to run it:

- ``serve_node``: the long-lived node listens on a Unix socket in a directory
  only its user can enter; sshd runs the tiny relay (``_relay.py``) per
  channel, which connects, says which key authenticated (``$SSH_USER_AUTH``)
  and relays bytes.  The node checks the peer's uid with ``SO_PEERCRED``.
- ``serve_stdio``: in-process mode; the subsystem program serves the services
  itself on stdin/stdout (one channel, one process: for one-shot use).

Per channel, one reader task feeds the protocol core and dispatches events,
one writer task writes answers, and calls run concurrently, so answers leave
in any order: an async call is started by the reader itself (answered at
once if it never waits; if it waits, the reading moves to another worker
task of the channel and the call goes on in the task that started it), a
sync call in the worker pool (no task of its own; one timer task per
channel keeps their deadlines), a stream in a task of its own, an
``inline=True`` call in the reader itself.  Answers produced while the
events of one read are dispatched (or one batch of pool results) leave in
one write.

Theory of operation, cancellation and bounds:

- A call runs inside a cancel scope (a stream's task has its own; an async
  call that waits has the scope its task was reading in; a sync call in the
  pool has none: its channel's timer task answers its deadline).
  ``{cancel, Id}`` cancels that scope; a ``timeout`` option sets its
  deadline.  The task then answers
  ``cancelled`` or ``timeout``, unless the function had already returned, in
  which case its normal answer stands: the answer is chosen after the scope
  exits, with no checkpoint in between, so there is exactly one.
- Sync functions run in the node's worker pool (``_workers.WorkerPool``:
  ``worker_threads`` long-lived threads, at most ``worker_threads_per_key``
  of them held by one key).  A cancel or a timeout answers at once; the
  function learns it cooperatively (``sshrpc.check_cancelled()``) and its
  thread stays charged to its key until it returns; its result is
  discarded.  ``inline=True`` sync functions run on the loop, at once, in
  the reader: nothing interrupts them.
- ``max_calls`` calls (and casts) may be open per channel; one more gets
  ``overload`` at once (a cast beyond it is dropped and logged).
- Answers are queued as bytes for the writer.  While more than
  ``max_queued`` bytes wait, the reader stops reading the channel (so the SSH
  window closes on a client that does not read), streams stop producing
  chunks and call tasks wait before queueing their answer.
- Mailboxes hold ``mailbox_size`` messages; a message sent to a full mailbox
  is dropped and logged (a warning), as a message to a dead process is.
  Messages to the client's mailbox (the session pid) are dropped the same
  way while the channel's answer queue is full.
- A client's ``{send, Dest, Msg}`` is under the policy (``_client_send``):
  registered names its key's rules list in ``send``, and pids of its own
  session and of the processes it spawned (wider with ``send_pids``); each
  send gets an audit line.  Pids are random (``new_pid``).  Service code's
  ``send`` is trusted and not checked.
- Processes spawned on a channel are linked to it: when the channel ends
  (``bye``, disconnect, protocol error) they are cancelled.
- When the channel ends without a ``bye`` (the client disconnected, EOF), every
  task of the channel is cancelled at once; nothing outlives it except
  abandoned worker threads.
- ``{bye, normal}`` from the client: the node reads no more, lets open calls
  finish and answers them, then sends ``{bye, normal}`` and closes.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import heapq
import inspect
import logging
import math
import os
import secrets
import socket
import stat
import struct
import time
import types
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO, TypeVar

import trio
from outcome import Value as _Value

from . import _drive, _fdpass
from . import protocol as _p
from ._accel import c_accelerated
from ._auditlog import AuditStream
from ._bounds import (
    DEFAULT_MAX_CHANNELS_PER_KEY,
    DEFAULT_MAX_HELD_PER_KEY,
    FLUSH_EARLY,
    HEAVY_COST,
    HEAVY_PACE,
    HEAVY_PACE_MIN,
    Held,
    KeyAccount,
    KeyAccounts,
)
from ._bulk import DIRECT_WRITE_MAX
from ._errors import LocalProtocolError, MessageTooLarge, ProtocolError, TermError
from ._saferepr import clean, safe_repr
from ._types import Atom, Pid
from ._workers import Job, WorkerPool
from ._workers import current_token as _worker_token
from .policy import (
    ANONYMOUS,
    AUDIT_LOGGER,
    Auditor,
    Decision,
    ExposureTable,
    KeyIdentity,
    Policy,
    audit,
    audit_send,
    current_auditor,
    identify_key,
)
from .service import Exported, Service, error_term, flatten_services

__all__ = [
    "DEFAULT_MAILBOX_SIZE",
    "DEFAULT_MAX_CALLS",
    "DEFAULT_MAX_CHANNELS_PER_KEY",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_MAX_HELD_PER_KEY",
    "DEFAULT_MAX_QUEUED",
    "DEFAULT_WORKER_THREADS",
    "Node",
    "receive",
    "register",
    "self_pid",
    "send",
    "serve_node",
    "serve_stdio",
    "session_pid",
    "whereis",
]

log = logging.getLogger("sshrpc.node")
T = TypeVar("T")
#: The clock of call durations (audit lines): cheaper than ``trio.current_time``.
_clock = time.perf_counter
_CoroutineType = types.CoroutineType
_CO_COROUTINE = inspect.CO_COROUTINE
# How ``_Channel._plain_calls`` runs a function (``_Channel._fast``).
_INLINE, _PLAIN_COROUTINE, _ASYNC = 0, 1, 2


def _install_run_plain() -> Callable[..., None] | None:
    if not c_accelerated or os.environ.get("SSHRPC_NO_C_NODE_LOOP"):
        return None
    from ._codec import install_node_builtins

    return install_node_builtins().get("run_plain")


#: ``_plain_calls``' loop in C (csrc/pynode.c), None in pure Python or with
#: ``SSHRPC_NO_C_NODE_LOOP=1`` (for measurements).
_run_plain = _install_run_plain()

#: Open calls per channel (PROTOCOL.md section 3's ``max_calls``).
DEFAULT_MAX_CALLS = _p.DEFAULT_MAX_CALLS
#: Largest payload accepted (PROTOCOL.md's default and minimum useful value).
DEFAULT_MAX_FRAME = 1024 * 1024
#: Answer bytes queued but not yet written before the node stops reading.
DEFAULT_MAX_QUEUED = 1024 * 1024
#: Worker threads shared by all sync functions of the node.
DEFAULT_WORKER_THREADS = 16
#: Messages a process mailbox holds before new ones are dropped.
DEFAULT_MAILBOX_SIZE = 1024
#: The relay's header is small; anything bigger is not our relay.
MAX_HEADER = 65536
#: How long a fresh Unix-socket peer has to send its header.
HEADER_TIMEOUT = 10.0
RECEIVE_SIZE = 65536
_statistics = trio.lowlevel.current_statistics


def _tasks_runnable() -> int:
    return _statistics().tasks_runnable


def _runnable_count() -> Callable[[], int]:
    """``current_statistics().tasks_runnable`` of this run, cheaply: the
    length of the runner's run queue (a private attribute, as
    ``client.py``'s reschedule; about 5 us less per early flush), or the
    public statistics where it is missing."""
    try:
        runq = trio._core._run.GLOBAL_RUN_CONTEXT.runner.runq
    except AttributeError:
        return _tasks_runnable
    if not isinstance(runq, deque):
        return _tasks_runnable  # pragma: no cover - another Trio
    return runq.__len__


#: Bytes a refused channel's client may still send before the node closes.
REFUSE_DRAIN = 65536


async def _drain_after_refusal(stream: Any) -> None:
    """Shut our sending side (if the stream can) and read until the peer
    closes or ``REFUSE_DRAIN`` bytes came; the caller bounds the time."""
    send_eof = getattr(stream, "send_eof", None)
    if send_eof is not None:
        await send_eof()
    taken = 0
    while taken < REFUSE_DRAIN:
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            return
        taken += len(data)


#: Policy decisions remembered per channel (per module/function/arity).
DECISION_CACHE = 256

SERVER_NAME = "sshrpc-python/0.1.0"


# -- the context service code runs in -------------------------------------------


@dataclass
class _Context:
    node: Node
    session: _Channel | None
    process: _Process | None
    key: KeyIdentity


_current: contextvars.ContextVar[_Context] = contextvars.ContextVar("sshrpc_node_context")


def _on_loop(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` on the node's Trio loop: directly, or from a worker thread."""
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        token = _worker_token()
        if token is None:
            return trio.from_thread.run_sync(fn, *args)
        return trio.from_thread.run_sync(fn, *args, trio_token=token)
    return fn(*args)


def _context() -> _Context:
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError("not inside a function the sshrpc node is running") from None


def self_pid() -> Pid:
    """The pid of the spawned process running this code.  Raises
    ``RuntimeError`` outside a spawned process."""
    process = _context().process
    if process is None:
        raise RuntimeError("self_pid() only works in a spawned process")
    return process.pid


def session_pid() -> Pid:
    """The pid of the channel that called or spawned this code: sending to it
    reaches the client's mailbox (a ``{send, Pid, Msg}`` frame)."""
    session = _context().session
    if session is None:
        raise RuntimeError("no client session here")
    return session.pid


def current_key() -> KeyIdentity:
    """The key that authenticated the calling channel (``ANONYMOUS`` if none)."""
    return _context().key


def send(dest: Pid | str, message: Any) -> bool:
    """Send ``message`` to a pid or registered name; never blocks.

    Returns ``False`` when it was dropped: no such process (as in Erlang), or
    its mailbox is full (logged).  Works from the worker threads sync
    functions run in, too.
    """
    return _on_loop(_context().node.send, dest, message)


async def receive() -> Any:
    """The next message in this spawned process's mailbox; waits for one.

    A checkpoint; a cancel leaves the mailbox unchanged.
    """
    process = _context().process
    if process is None:
        raise RuntimeError("receive() only works in a spawned process")
    message = await process.inbox_receive.receive()
    return message.take() if type(message) is Held else message


def register(name: str | bytes, pid: Pid | None = None) -> None:
    """Register ``pid`` (default: this process) under the atom ``name``.
    Raises ``ValueError`` if the name is taken; the name is released when
    the process ends."""
    ctx = _context()
    if pid is None:
        pid = self_pid()
    _on_loop(ctx.node.register, name, pid)


def whereis(name: str) -> Pid | None:
    """The pid registered under ``name``, or ``None``."""
    return _context().node.registry.get(name)


# -- processes -------------------------------------------------------------------


class _Process:
    def __init__(
        self, node: Node, pid: Pid, mailbox_size: int, owner: _Channel | None = None
    ) -> None:
        self.node = node
        self.pid = pid
        #: The session that spawned it (it runs with that session's key).
        self.owner = owner
        self.inbox_send, self.inbox_receive = trio.open_memory_channel[Any](mailbox_size)
        self.names: set[str] = set()

    def deliver(self, message: Any) -> bool:
        try:
            self.inbox_send.send_nowait(message)
        except trio.WouldBlock:
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True


# -- the answer queue ------------------------------------------------------------


class _Outbox:
    """Frames waiting for the writer, bounded in bytes (softly: a put never
    waits; callers wait for room first with ``wait_room``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.frames: deque[bytes] = deque()
        self.nbytes = 0
        #: The key's account, which counts queued bytes as held (issue 11).
        self.account: KeyAccount | None = None
        self._data = trio.lowlevel.ParkingLot()
        self._room = trio.lowlevel.ParkingLot()
        self._empty = trio.lowlevel.ParkingLot()

    @property
    def full(self) -> bool:
        return self.nbytes >= self.limit

    def put(self, frame: bytes, wake: bool = True) -> None:
        """Queue ``frame``; ``wake=False`` leaves the writer asleep (the
        caller then calls ``wake`` or writes it out itself)."""
        if frame:
            self.frames.append(frame)
            self.nbytes += len(frame)
            if self.account is not None:
                self.account.add(len(frame))
            # (each ``unpark_all`` is guarded: it costs ~0.6 us on an empty lot)
            if wake and self._data:
                self._data.unpark_all()

    def put_batched(self, frame: bytes) -> None:
        """``put(frame, wake=False)`` for a frame that is not empty."""
        self.frames.append(frame)
        n = len(frame)
        self.nbytes += n
        if self.account is not None:
            self.account.held += n  # (``KeyAccount.add``)

    def wake(self) -> None:
        if self.frames and self._data:
            self._data.unpark_all()

    def take_nowait(self) -> bytes:
        """Every queued frame, joined (still counted in ``nbytes`` until
        ``written``)."""
        data = b"".join(self.frames)
        self.frames.clear()
        return data

    async def wait_room(self) -> None:
        while self.full:
            await self._room.park()

    async def wait_empty(self) -> None:
        while self.nbytes:
            await self._empty.park()

    async def take(self, most: int = 256 * 1024) -> bytes:
        while not self.frames:
            await self._data.park()
        parts = []
        size = 0
        while self.frames and size < most:
            frame = self.frames.popleft()
            parts.append(frame)
            size += len(frame)
        return b"".join(parts)

    def written(self, n: int) -> None:
        self.nbytes -= n
        if self.account is not None:
            self.account.release(n)
        if self._room and not self.full:
            self._room.unpark_all()
        if self._empty and not self.nbytes:
            self._empty.unpark_all()


# -- one channel -----------------------------------------------------------------


class _OpenCall:
    """A call that runs on the loop: in a task of its own (``scope`` set at
    once, ``credit_lot`` for a stream), or an async call that waits in the
    task that read it (``scope``: the reading's, set as the reading moves
    on, see ``_Channel._run_waiting_call``)."""

    __slots__ = ("cancel_requested", "cost", "credit_lot", "deadline", "scope")

    def __init__(
        self,
        scope: trio.CancelScope | None,
        cost: int = 0,
        deadline: float | None = None,
        credit_lot: trio.lowlevel.ParkingLot | None = None,
    ) -> None:
        self.scope = scope
        self.cancel_requested = False
        #: Units charged to the key for this call (``_hold``), given back when
        #: it ends (fast paths only; the task path uses ``_holding``).
        self.cost = cost
        #: An async call's deadline (``trio.current_time()``), if it has one.
        self.deadline = deadline
        self.credit_lot = credit_lot


@dataclass
class _JobCall:
    """A call of a sync function in the worker pool, with no task of its own
    (see ``_Channel._start_job``)."""

    call: _p.Call
    start: float
    job: Job | None = None
    #: Units charged to the key for this call, given back when it ends.
    cost: int = 0
    #: Its entry in the channel's deadline heap, if it has a deadline.
    serial: int = 0


class _ChannelEnded(Exception):
    pass


class _Channel:
    """One RPC session: one SSH channel."""

    def __init__(self, node: Node, stream: trio.abc.Stream, key: KeyIdentity, peer: str) -> None:
        self.node = node
        self.stream = stream
        self.key = key
        self.peer = peer
        self.pid = node.new_pid()
        self.calls: dict[int, _OpenCall | _JobCall] = {}
        self.casts = 0
        self.processes: dict[Pid, _Process] = {}
        self.outbox = _Outbox(node.max_queued)
        self.conn = _p.Connection(
            _p.Role.SERVER,
            max_frame=node.max_frame,
            max_calls=node.max_calls,
            node=node.name,
            session=self.pid,
            name=SERVER_NAME,
            max_cost=node.max_cost,
            max_inflate_ratio=node.max_inflate_ratio,
        )
        #: This key's account (channels, held units) while the channel runs.
        self.account: KeyAccount | None = None
        #: The decode cost of the request being dispatched.
        self.frame_cost = 0
        self.closing = False
        self.idle = trio.lowlevel.ParkingLot()
        self._decisions: dict[tuple[str, str, int], Decision] = {}
        #: The stream's file descriptor for direct writes (see ``_queue``),
        #: None for streams without one and once the channel ends.
        self.fd: int | None = None
        if isinstance(stream, trio.SocketStream):
            self.fd = stream.socket.fileno()
        elif isinstance(stream, _StdioStream | _fdpass.PassedStream):
            self.fd = stream.out_fd
        self.writing = False
        self.flush_early = node.flush_early or 1 << 62
        #: The early flush's threshold for the read being answered
        #: (``_next_read_events``): ``flush_early``, or half the read's
        #: frames when that is more.
        self._flush_at = self.flush_early
        #: True while the events of one read are dispatched: answers are
        #: queued without waking the writer and leave together (``_flush``).
        self.batching = False
        #: The context service code of this channel's calls runs in.
        self.context = _Context(node, self, None, key)
        self._context_base: contextvars.Context | None = None
        #: Worker tasks waiting to be handed the reading (``_async_worker``).
        self._idle_workers: list[trio.lowlevel.Task] = []
        #: Events of the frames decoded together, not yet dispatched; the
        #: index of the next one, and each one's decode cost.  On the
        #: channel, not the reader, since the reading moves between tasks.
        self._read_events: list[Any] = []
        self._read_costs: list[int] = []
        self._read_at = 0
        #: An async call the reader started that waits (``_start_async``).
        self._waiting: tuple[Any, ...] | None = None
        #: The reader, waiting for a cast's task to begin (``_dispatch``).
        self._cast_waiter: trio.lowlevel.Task | None = None
        #: Deadlines of sync calls in the pool (``_add_job_deadline``).
        self._job_deadlines: list[tuple[float, int, int]] = []
        self._job_serial = 0
        self._timer_scope: trio.CancelScope | None = None
        self._timer_at = math.inf
        #: The node's worker pool, once a sync call needed it (``_start_job``).
        self._pool: WorkerPool | None = None
        #: The context pool results are handed over in (``_start_job``).
        self._delivery_context: contextvars.Context | None = None
        #: The allowed inline and async functions by (module, function,
        #: arity), as ``_check`` decided them (``_plain_calls``): ``(fn,
        #: how)``, how ``_INLINE``, ``_PLAIN_COROUTINE`` (an ``async def``
        #: function, whose call runs none of its code) or ``_ASYNC``.
        self._fast: dict[tuple[str, str, int], tuple[Callable[..., Any], int]] = {}
        #: How many tasks are runnable now (``_runnable_count``).
        self._runnable: Callable[[], int] = _tasks_runnable
        #: Audit lines of calls answered ``ok`` in this read, not yet handed
        #: to the auditor (``_audit_pending``).
        self._audited: list[tuple[tuple[str, str, int], float, float]] = []
        #: The auditor of the channel's context (``current_auditor`` in
        #: ``run``): ``_audit_pending`` may run in the pool's delivery.
        self._auditor: Auditor = node.auditor

    # sending ---------------------------------------------------------------

    def _queue(self, data: bytes) -> None:
        """Send ``data`` now if that is cheap and safe, else queue it for the
        writer task.

        When no other call is open and the writer is idle with nothing
        queued, the frame goes straight to the socket with one non-blocking
        ``os.write``: no writer wake-up, one task switch less per sequential
        call (frames up to ``DIRECT_WRITE_MAX``; a larger one goes to the
        writer whole, uncopied).  With other calls open, answers are queued
        so that the writer sends everything ready in one write (one SSH
        packet, not one each).
        A partial or failed write queues the rest; the writer then finds any
        error.
        """
        if self.batching:
            self.outbox.put(data, wake=False)
            return
        fd = self.fd
        if (
            fd is not None
            and not self.writing
            and not self.outbox.nbytes
            and not self.calls
            and len(data) <= DIRECT_WRITE_MAX
        ):
            try:
                n = os.write(fd, data)
            except OSError:
                n = 0
            if n == len(data):
                return
            data = data[n:]
        self.outbox.put(data)

    def _flush(self) -> None:
        """Send what the events of one read queued: with one ``os.write``
        when the writer is idle (up to ``DIRECT_WRITE_MAX`` bytes), else by
        waking the writer.  Answers of one
        read leave in one write.  Called at the end of each read's dispatch
        and before the reader waits for anything in between."""
        outbox = self.outbox
        if not outbox.frames:
            return
        fd = self.fd
        if fd is not None and not self.writing and outbox.nbytes <= DIRECT_WRITE_MAX:
            data = outbox.take_nowait()
            try:
                n = os.write(fd, data)
            except OSError:
                n = 0
            if n < len(data):
                outbox.frames.appendleft(data[n:])
            outbox.written(n)
        outbox.wake()

    def emit(self, event: _p.Event) -> bool:
        """Encode ``event`` and queue it; False if the connection refuses it."""
        try:
            data = self.conn.send(event)
        except MessageTooLarge:
            if isinstance(event, _p.Chunk):
                raise
            log.warning(
                "session %r: %s too large for the client; dropped", self.pid, type(event).__name__
            )
            return False
        except (TermError, TypeError) as exc:
            if isinstance(event, _p.Reply | _p.Chunk):
                # A value with no Erlang term: answer with an error instead.
                cls, reason, details = self.node.error_term(exc)
                return self.emit(
                    _p.ErrorReply(id=event.id, cls=cls, reason=reason, details=details)
                )
            log.warning("cannot send %s: %s", type(event).__name__, exc)
            return False
        except LocalProtocolError as exc:  # e.g. after the channel closed
            log.debug("not sent (%s): %s", exc, safe_repr(event))
            return False
        self._queue(data)
        return True

    def _reply(self, call_id: int, value: Any) -> None:
        """``emit(Reply(id=call_id, value=value))``, the common answer,
        without the event object."""
        try:
            data = self.conn.send_reply(call_id, value)
        except Exception:  # (nothing was sent) the general path answers each failure
            self.emit(_p.Reply(id=call_id, value=value))
            return
        self._queue(data)

    def deliver(self, message: Any) -> bool:
        """A message to the client's mailbox: a ``{send, SessionPid, Msg}`` frame."""
        if self.outbox.full or self.closing:
            log.warning("session %r: answer queue full; message dropped", self.pid)
            return False
        return self.emit(_p.Send(dest=self.pid, msg=message))

    async def _writer(self) -> None:
        try:
            while True:
                data = await self.outbox.take()
                self.writing = True
                await self.stream.send_all(data)
                self.writing = False
                self.outbox.written(len(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The client is gone: end the channel, cancelling its tasks.
            log.debug("session %r: channel broken while writing", self.pid)
            self.nursery.cancel_scope.cancel()

    # the channel's life ----------------------------------------------------

    async def run(self) -> None:
        """Serve the channel until bye, EOF, a protocol error or cancellation.

        Cancellation (the node stopping) cancels every task of the channel.
        """
        self.account = self.node.accounts.open_channel(self.key)
        if self.account is None:
            await self._refuse_channel()
            return
        self.outbox.account = self.account
        self._runnable = _runnable_count()
        self._auditor = current_auditor.get()
        self.node.pids[self.pid] = self
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                self.node.channels.add(self)
                nursery.start_soon(self._writer)
                if not await self._read_on():
                    # Reading went on in a worker task while this one ran an
                    # async call that waited; whoever ends the reading ends
                    # the channel (cancelling this).
                    await trio.sleep_forever()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            for open_call in list(self.calls.values()):
                if isinstance(open_call, _JobCall) and open_call.job is not None:
                    open_call.job.pool.abandon(open_call.job)
                    del self.calls[open_call.call.id]
                    self._release(open_call.cost)
                    call = open_call.call
                    self._audit_call(call, "disconnected", open_call.start)
            self.fd = None  # its number may be reused once the stream is closed
            self.node.pids.pop(self.pid, None)
            self.node.channels.discard(self)
            self.outbox.account = None
            self.account.release(self.outbox.nbytes)
            self.node.accounts.close_channel(self.account)
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self.stream.aclose()

    async def _refuse_channel(self) -> None:
        """One channel too many for this key: ``{bye, {too_many_channels,
        Limit}}``, then close.  Bounded in time (a client that does not read
        is cut off).

        Before closing, the node shuts its sending side and takes what the
        client sent (its hello; at most ``REFUSE_DRAIN`` bytes) until the
        client closes: closing a Unix socket with unread data resets it,
        and the relay could then die before it had copied the bye to the
        client (who saw the channel end with no reason)."""
        limit = self.node.accounts.max_channels
        log.warning(
            "session %r (%s): refused: the key has %d channels open already",
            self.pid,
            self.key,
            limit,
        )
        with trio.move_on_after(5), contextlib.suppress(Exception):
            await self.stream.send_all(
                self.conn.send(_p.Bye(reason=(Atom("too_many_channels"), limit)))
            )
            await _drain_after_refusal(self.stream)
        with trio.CancelScope(shield=True), contextlib.suppress(Exception):
            await self.stream.aclose()

    async def _next_event(self) -> Any:
        """``conn.next_event()``; a frame that may cost more than
        ``HEAVY_COST`` to decode is decoded in its turn (the node's ``heavy``
        lock, first come first served; a turn starts ``HEAVY_PACE`` times
        the previous heavy decode's time after it ended, ``Node.heavy_pace``),
        so that large terms cannot hold the event loop for many frames in a
        row, while a lone large request is not delayed.  Sets
        ``frame_cost``.  A checkpoint only for such a frame; a cancel while
        waiting for the turn leaves the frame buffered."""
        if self.conn.next_cost_bound() <= HEAVY_COST:
            event = self.conn.next_event()
        else:
            self._unbatch()  # what this read answered so far leaves before we wait
            async with self.node.heavy:
                await self.node.heavy_pace()
                start = time.perf_counter()
                try:
                    event = self.conn.next_event()
                finally:
                    took = time.perf_counter() - start
                    if took > HEAVY_PACE_MIN:
                        # The next heavy frame (of any channel) waits a
                        # while; this one's request runs at once.
                        self.node.heavy_after = trio.current_time() + took * HEAVY_PACE
            self.batching = True
        self.frame_cost = self.conn.last_cost
        return event

    def _hold(self, what: str, id: int | None) -> bool:
        """Charge the request being dispatched to the key; False (and, with
        an ``id``, an ``overload`` answer) when the key holds too much."""
        assert self.account is not None
        if self.account.charge(self.frame_cost):
            return True
        log.warning(
            "session %r (%s): %s refused: the key holds %d of %d units",
            self.pid,
            self.key,
            what,
            self.account.held,
            self.account.limit,
        )
        if id is not None:
            self.emit(_p.ErrorReply(id=id, cls=Atom("sshrpc"), reason=Atom("overload")))
        return False

    async def _holding(self, cost: int, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)``, then give the key back ``cost`` units."""
        try:
            await fn(*args)
        finally:
            assert self.account is not None
            self.account.release(cost)

    async def _drain(self) -> None:
        """Wait for open calls to end, then say ``{bye, normal}``."""
        self.closing = True
        while self.calls or self.casts:
            await self.idle.park()
        self.emit(_p.Bye(reason=Atom("normal")))

    async def _read_on(self) -> bool:
        """Be the channel's reader (``_reader``) until the reading ends --
        then end the channel (after a graceful bye: once open calls are
        answered) and return True -- or until an async call started here
        waits: then another task reads on, this one runs that call to its
        end, answers it and returns False.

        The reading runs inside a cancel scope of its own, which becomes
        the scope of the call that waits (``{cancel, Id}`` cancels it, its
        ``timeout`` is its deadline): the call's first step already ran
        inside it, so the scopes it entered nest properly."""
        scope = trio.CancelScope()
        held: list[Any] = []  # the call that waited: (call, open_call, start), its result
        graceful: bool | None = None
        try:
            with scope:
                graceful = await self._reader(scope, held)
        except _ChannelEnded:
            graceful = False
        except trio.Cancelled:
            if held:  # the channel ended under the call: its audit line says so
                call, open_call, start = held[:3]
                self._end_open_call(call, open_call)
                self._audit_call(call, "disconnected", start)
            raise
        if held:
            await self._answer_waited(scope, held)
            return False
        if graceful:
            await self._drain()
            with trio.move_on_after(10):
                await self.outbox.wait_empty()
        self.nursery.cancel_scope.cancel()
        return True

    async def _reader(self, scope: trio.CancelScope, held: list[Any]) -> bool | None:
        """Dispatch what is buffered, then read and dispatch, until the
        channel ends: True to end gracefully, False at once; None when an
        async call started by this task waited (see ``_start_async``): the
        reading was handed to another task and this one ran the call in
        ``scope`` (``held``: the call, then its result)."""
        conn = self.conn
        while True:
            self.batching = True
            try:
                while True:
                    try:
                        # The common frame (cheap to decode, a call while
                        # there is room) without a coroutine per step; the
                        # small frames of a read decoded in one go
                        # (``_read_events``), each with its own cost.
                        at = self._read_at
                        if at == len(self._read_events):
                            at = self._next_read_events()
                        if at >= 0:
                            event = self._read_events[at]
                            if type(event) is tuple:  # a plain call
                                if not self.outbox.full:
                                    self._plain_calls()
                                    if self._waiting is not None:
                                        await self._run_waiting_call(scope, held)
                                        return None
                                    continue
                                event = _p.call_event(event)  # (waits for room)
                            self.frame_cost = self._read_costs[at]
                            self._read_at = at + 1
                        elif conn.next_cost_bound() <= HEAVY_COST:
                            event = conn.next_event()
                            self.frame_cost = conn.last_cost
                        else:
                            event = await self._next_event()
                        if type(event) is _p.Call and not self.outbox.full:
                            self._start_call(event)
                            if (
                                len(self.outbox.frames) >= self._flush_at
                                and not _statistics().tasks_runnable
                            ):
                                self._flush()
                            if self._waiting is not None:
                                await self._run_waiting_call(scope, held)
                                return None
                            continue
                    except ProtocolError as exc:
                        log.warning("session %r (%s): %s", self.pid, self.key, exc)
                        if exc.bye is not None:
                            self.emit(_p.Bye(reason=exc.bye))
                        self.closing = True
                        self._unbatch()
                        with trio.move_on_after(5):
                            await self.outbox.wait_empty()
                        return False
                    if event is _p.NEED_DATA:
                        break
                    if event is _p.CLOSED:
                        return False
                    if await self._dispatch(event):
                        return True
                    if self._waiting is not None:
                        await self._run_waiting_call(scope, held)
                        return None
            finally:
                self._unbatch()
            await self.outbox.wait_room()
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                log.debug("session %r: channel closed by the client", self.pid)
                return False
            conn.receive_data(data)

    def _next_read_events(self) -> int:
        """Decode the small frames buffered now (``next_events_each``, the
        cost bound ``HEAVY_COST``: heavier frames keep their turn) into
        ``_read_events``; the index of the first, -1 if there are none."""
        costs: list[int] = []
        events = self.conn.next_events_each(costs, HEAVY_COST, plain_calls=True)
        self._read_events = events
        self._read_costs = costs
        self._read_at = 0
        # A large read's answers leave in two writes, not one per
        # ``flush_early``: the client works on the first half while the
        # node answers the second, for fewer writes (each costs sshd and
        # the client a packet and a system call).
        self._flush_at = max(self.flush_early, (len(events) + 1) >> 1)
        return 0 if events else -1

    def drop_read_events(self) -> None:
        """Forget the decoded events not yet dispatched (the node said bye)."""
        self._read_events = []
        self._read_costs = []
        self._read_at = 0

    def _unbatch(self) -> None:
        """End a read's batch: send what it queued.  Call before the reader
        awaits anything (the writer may be asleep with frames queued)."""
        self.batching = False
        if self._audited:
            self._audit_pending()
        self._flush()

    async def _dispatch(self, event: Any) -> bool:
        """Act on one event; True when the client said bye."""
        if self._audited:  # (its audit lines, if any, come after those)
            self._audit_pending()
        if isinstance(event, _p.Call):
            if self.outbox.full:
                # Inline calls answer right here: keep the bound on queued bytes.
                self._unbatch()
                await self.outbox.wait_room()
                self.batching = True
            self._start_call(event)
        elif isinstance(event, _p.Cancel):
            call = self.calls.get(event.id)
            if isinstance(call, _JobCall):
                self._cancel_job(call)
            elif call is not None:
                call.cancel_requested = True
                if call.scope is not None:  # (set before the next request is read)
                    call.scope.cancel()
        elif isinstance(event, _p.Credit):
            call = self.calls.get(event.id)
            if isinstance(call, _OpenCall) and call.credit_lot is not None:
                call.credit_lot.unpark_all()
        elif isinstance(event, _p.Ping):
            self.emit(_p.Pong(token=event.token))
        elif isinstance(event, _p.Cast):
            casts = self.casts
            self._start_cast(event)
            if self.casts > casts:
                # Let the cast's function begin before later requests are
                # dispatched (a call after it may run right here, in the
                # reader): a cast followed by a call on one channel begins
                # first, as the client sent them.  The cast's task wakes us.
                self._unbatch()
                await self._wait_for_cast_start()
                self.batching = True
        elif isinstance(event, _p.Spawn):
            self._spawn(event)
        elif isinstance(event, _p.Send):
            self._client_send(event)
        elif isinstance(event, _p.Hello):
            self._hello(event)
        elif isinstance(event, _p.Mfa):
            self._unbatch()
            await self._audit_cut_off("mfa", event, functools.partial(self._legacy, event))
            self.batching = True
        elif isinstance(event, _p.Bye):
            if event.reason == Atom("normal"):
                return True
            # Any other reason: the client is aborting; end like a disconnect.
            log.info("session %r: client said bye %s", self.pid, safe_repr(event.reason))
            raise _ChannelEnded
        elif isinstance(event, _p.Refused):
            log.info("session %r: refused (%s): %s", self.pid, clean(event.reason), event.detail)
            if event.id is None:
                self.emit(_p.Answer(result=(Atom("exec_error"), event.term), status=-1))
            else:
                self.emit(_p.ErrorReply(id=event.id, cls=Atom("sshrpc"), reason=event.reason))
        else:
            log.info("session %r: ignored %s", self.pid, safe_repr(getattr(event, "term", event)))
        return False

    def _hello(self, hello: _p.Hello) -> None:
        self.emit(self.conn.hello())

    # calls -------------------------------------------------------------------

    def _check(
        self, kind: str, module: str, function: str, arity: int, id: int | None
    ) -> Exported | None:
        # The table and this channel's key never change: decide each name
        # once (pattern matching per call showed in profiles), bounded so
        # that a client probing names cannot grow the cache.
        if module == "sshrpc" and function == "exports" and arity == 0:
            return self.node.builtin_exports
        name = (module, function, arity)
        decision = self._decisions.get(name)
        if decision is None:
            decision = self.node.table.decide(self.key, module, function, arity)
            if len(self._decisions) < DECISION_CACHE:
                self._decisions[name] = decision
                fast = decision.exported
                if (
                    decision.outcome == "allow"
                    and fast is not None
                    and (fast.inline or fast.kind == "async")
                ):
                    fn = fast.fn
                    self._fast[name] = (
                        fn,
                        _INLINE
                        if fast.inline
                        else _PLAIN_COROUTINE
                        if type(fn) is types.FunctionType and fn.__code__.co_flags & _CO_COROUTINE
                        else _ASYNC,
                    )
        if decision.outcome == "allow":
            return decision.exported
        if self._audited:
            self._audit_pending()
        audit(self.key, kind, module, function, arity, decision.outcome, 0.0)
        if id is not None:
            self.emit(
                _p.ErrorReply(
                    id=id,
                    cls=Atom("sshrpc"),
                    reason=Atom(decision.outcome),
                    details=self._denial_details(decision.outcome, module, function, arity),
                )
            )
        return None

    def _denial_details(
        self, outcome: str, module: str, function: str, arity: int
    ) -> dict[Atom, Any]:
        """What a ``forbidden``/``undef`` answer tells the caller: the
        module, function and arity it asked for, a message that says what
        to do and, for ``undef``, the arities of that function this key may
        call.  ``forbidden`` reads the same whether or not the function
        exists: a key learns only what it may call."""
        mfa = f"{module}:{function}/{arity}"
        details: dict[Atom, Any] = {
            Atom("module"): Atom(module),
            Atom("function"): Atom(function),
            Atom("arity"): arity,
        }
        if outcome == "undef":
            arities = self.node.table.callable_arities(self.key, module, function)
            details[Atom("arities")] = arities
            if arities:
                count = _arities_text(arities)
                noun = "argument" if count == "1" else "arguments"
                text = f"no {mfa}; {module}:{function} takes {count} {noun}"
            else:
                text = f"{module} has no function {function} this key may call"
        else:
            text = f"{mfa} is not exposed to this key"
        details[Atom("message")] = (
            f"{text}; sshrpc:exports() lists what this key may call"
        ).encode()
        return details

    def _start_call(self, call: _p.Call) -> None:
        if self.closing:
            self.emit(_p.ErrorReply(id=call.id, cls=Atom("sshrpc"), reason=Atom("shutting_down")))
            return
        if len(self.calls) >= self.node.max_calls:
            self.emit(_p.ErrorReply(id=call.id, cls=Atom("sshrpc"), reason=Atom("overload")))
            return
        exported = self._check("call", call.module, call.function, len(call.args), call.id)
        if exported is None or not self._hold("call", call.id):
            return
        if exported.inline:
            self._call_inline(call, exported)
            return
        if exported.kind == "sync":
            self._start_job(call, exported)
            return
        if exported.kind == "async":
            self._start_async(call, exported)
            return
        scope = trio.CancelScope()
        if call.timeout is not None:
            scope.deadline = trio.current_time() + call.timeout / 1000
        self.calls[call.id] = _OpenCall(scope, credit_lot=trio.lowlevel.ParkingLot())
        self.nursery.start_soon(
            self._audit_cut_off,
            "call",
            call,
            functools.partial(self._holding, self.frame_cost, self._run_call, call, exported),
        )

    # async calls: started by the reader, handed over when they wait ----------
    #
    # A task and a cancel scope per call cost about 12-15 us, and waking a
    # worker task per call about 5.  Instead, the reader starts each async
    # call's coroutine itself (``_drive.start``), in a fresh copy of the
    # channel's context, as a task of its own would run it: a call that
    # returns without waiting -- the common case: an echo, a lookup -- is
    # answered at once, like an inline call, its answer batched with the
    # read's others.  A call that waits must go on in the task that started
    # it (Trio code keeps ``current_task()``), so the *reading* moves
    # instead: the reader hands it to an idle worker task of the channel (or
    # a new one), which dispatches the rest of the read and reads on, and
    # this task runs the call to its end in the cancel scope it was reading
    # in (``_read_on``, ``_run_waiting_call``: ``{cancel, Id}`` cancels it,
    # a ``timeout`` is its deadline), answers, and becomes an idle worker.
    # (A scope per call would cost ~4.5 us; the first step of a call must
    # run inside the scope its waiting part runs in, so that the scopes it
    # enters -- ``trio.sleep``'s, say -- nest inside it.)

    def _start_async(self, call: _p.Call, exported: Exported) -> None:
        context = self._call_context()
        start = _clock()
        try:
            done, value, trap = _drive.start(context.run(exported.fn, *call.args), context)
        except Exception as exc:
            self._release(self.frame_cost)
            cls, reason, details = self.node.error_term(exc)
            self._audit_call(call, str(cls), start)
            self.emit(_p.ErrorReply(id=call.id, cls=cls, reason=reason, details=details))
            return
        if done:
            self._release(self.frame_cost)
            self._audited.append(((call.module, call.function, len(call.args)), start, _clock()))
            self._reply(call.id, value)
            return
        open_call = _OpenCall(None, cost=self.frame_cost)
        if call.timeout is not None:
            open_call.deadline = trio.current_time() + call.timeout / 1000
        self.calls[call.id] = open_call
        self._waiting = (call, value, context, trap, open_call, start)

    def _plain_calls(self) -> None:
        """Dispatch the read's plain calls (``_p.PlainCall``) from
        ``_read_at`` on, until another event, a full outbox or a call that
        waits (``_waiting``): ``_start_call`` in one loop, without a
        ``Call`` object or a frame per step for an allowed inline or async
        function (``_fast``) the key has room for: the same answers, audit
        lines, charges and early flushes.  Anything else goes to
        ``_start_call``."""
        events = self._read_events
        costs = self._read_costs
        at = self._read_at
        end = len(events)
        outbox = self.outbox
        frames = outbox.frames
        fast = self._fast
        audited = self._audited.append
        calls = self.calls
        max_calls = self.node.max_calls
        account = self.account
        assert account is not None
        send_reply = self.conn.send_reply
        # (``_queue`` while the read's answers are batched)
        put = outbox.put_batched if self.batching else self._queue
        flush_early = self._flush_at
        runnable = self._runnable
        run = _run_plain
        if run is not None:
            conn = self.conn
            kit = (
                fast,
                calls,
                max_calls,
                account,
                self,
                outbox,
                frames.append,
                frames,
                outbox.account,
                None if self.batching else put,
                flush_early,
                runnable,
                self._flush,
                self._audited,
                _current,
                self.context,
                send_reply,
                self._c_failed,
                self._c_unencodable,
                self._c_wait,
                conn.reply_kit(),
            )
            pos = [at, 0]
        try:
            while at < end:
                if run is not None:
                    # The calls the C loop takes (csrc/pynode.c): the same
                    # steps as below, for inline and plain async functions.
                    pos[0] = at
                    try:
                        run(kit, events, costs, pos)
                    finally:
                        at = pos[0]
                        if pos[1]:
                            conn.replies_sent(pos[1])
                            pos[1] = 0
                    if at >= end or self._waiting is not None:
                        return
                plain = events[at]
                if type(plain) is not tuple or outbox.nbytes >= outbox.limit:
                    return
                cost = costs[at]
                at += 1
                call_id, module, function, args, _, _, _ = plain
                name = (module, function, len(args))
                entry = fast.get(name)
                if (
                    entry is None
                    or self.closing
                    or len(calls) >= max_calls
                    or (cost > 0 and account.held + cost > account.limit)  # (``_hold``)
                ):
                    self._read_at = at
                    self.frame_cost = cost
                    self._start_call(_p.call_event(plain))
                    if self._waiting is not None:
                        return
                else:
                    # An inline call is answered before anything else runs:
                    # its charge (``_hold``) would be given back at once, so it
                    # is only checked.  An async call is charged before its
                    # first step, which may queue bytes for the key itself, and
                    # given back if it does not wait.
                    fn, how = entry
                    start = _clock()
                    if how == _INLINE:  # (``_call_inline``)
                        token = _current.set(self.context)
                        failed: Exception | None = None
                        try:
                            value = fn(*args)
                        except Exception as exc:
                            failed = exc
                        finally:
                            _current.reset(token)
                        if failed is not None:
                            self._answer_failed(_p.call_event(plain), failed, start)
                        else:
                            audited((name, start, _clock()))
                            try:
                                data = send_reply(call_id, value)
                            except Exception:  # (``_reply``)
                                self.emit(_p.Reply(id=call_id, value=value))
                            else:
                                put(data)
                    else:  # (``_start_async``)
                        base = self._context_base
                        context = self._call_context() if base is None else base.copy()
                        account.held += cost
                        it = None
                        try:
                            # (an ``async def``'s call runs none of its code)
                            coro = fn(*args) if how == _PLAIN_COROUTINE else context.run(fn, *args)
                            it = coro if type(coro) is _CoroutineType else coro.__await__()
                            trap = context.run(it.send, None)
                        except StopIteration as stop:
                            account.held -= cost
                            if it is None:
                                # Raised by the call itself (a plain function
                                # marked as a coroutine function), not its end.
                                self._answer_failed(_p.call_event(plain), stop, start)
                                continue
                            audited((name, start, _clock()))
                            try:
                                data = send_reply(call_id, stop.value)
                            except Exception:  # (``_reply``)
                                self.emit(_p.Reply(id=call_id, value=stop.value))
                            else:
                                put(data)
                        except Exception as exc:
                            account.held -= cost
                            self._answer_failed(_p.call_event(plain), exc, start)
                        else:
                            self._wait_for(_p.call_event(plain), cost, it, context, trap, start)
                            return
                if len(frames) >= flush_early and not runnable():
                    self._flush()
        finally:
            self._read_at = at  # (set here only: the next to dispatch)

    # (``_run_plain``'s hand-backs, the Python loop's steps for the same cases)
    def _c_failed(self, plain: _p.PlainCall, exc: Exception, start: float) -> None:
        self._answer_failed(_p.call_event(plain), exc, start)

    def _c_unencodable(self, call_id: int, value: Any) -> None:
        self.emit(_p.Reply(id=call_id, value=value))

    def _c_wait(
        self,
        plain: _p.PlainCall,
        cost: int,
        it: Any,
        context: contextvars.Context,
        trap: Any,
        start: float,
    ) -> None:
        self._wait_for(_p.call_event(plain), cost, it, context, trap, start)

    def _answer_failed(self, call: _p.Call, exc: Exception, start: float) -> None:
        """Answer ``call``, whose function raised ``exc``, and audit it."""
        cls, reason, details = self.node.error_term(exc)
        self._audit_call(call, str(cls), start)
        self.emit(_p.ErrorReply(id=call.id, cls=cls, reason=reason, details=details))

    def _wait_for(
        self,
        call: _p.Call,
        cost: int,
        it: Any,
        context: contextvars.Context,
        trap: Any,
        start: float,
    ) -> None:
        """The async ``call`` (charged ``cost``) waits: ``_waiting``."""
        open_call = _OpenCall(None, cost=cost)
        if call.timeout is not None:
            open_call.deadline = trio.current_time() + call.timeout / 1000
        self.calls[call.id] = open_call
        self._waiting = (call, it, context, trap, open_call, start)

    def _call_context(self) -> contextvars.Context:
        base = self._context_base
        if base is None:
            base = self._context_base = contextvars.copy_context()
            base.run(_current.set, self.context)
        return base.copy()

    async def _run_waiting_call(self, scope: trio.CancelScope, held: list[Any]) -> None:
        """The reader's async call waits (``_waiting``): hand the reading to
        a worker task, then run the call to its end here, in ``scope`` (the
        reading's); ``held`` gets the call and then its result."""
        assert self._waiting is not None
        call, it, context, trap, open_call, start = self._waiting
        self._waiting = None
        held += (call, open_call, start)
        open_call.scope = scope
        if open_call.deadline is not None:
            scope.deadline = open_call.deadline
        self._unbatch()
        if self._idle_workers:
            trio.lowlevel.reschedule(self._idle_workers.pop())
        else:
            self.nursery.start_soon(self._async_worker)
        try:
            held.append(_p.Reply(id=call.id, value=await _drive.Resume(it, context, trap)))
        except Exception as exc:
            cls, reason, details = self.node.error_term(exc)
            held.append(_p.ErrorReply(id=call.id, cls=cls, reason=reason, details=details))

    async def _answer_waited(self, scope: trio.CancelScope, held: list[Any]) -> None:
        """Answer the call ``_run_waiting_call`` ran, once its scope exited
        (no checkpoint in between: exactly one answer)."""
        call, open_call, start = held[:3]
        if scope.cancelled_caught:
            outcome = "cancelled" if open_call.cancel_requested else "timeout"
            answer = _p.ErrorReply(id=call.id, cls=Atom("sshrpc"), reason=Atom(outcome))
        else:
            answer = held[3]
            outcome = str(answer.cls) if isinstance(answer, _p.ErrorReply) else "ok"
        try:
            await self.outbox.wait_room()
        except trio.Cancelled:
            # The channel ended under the call: its audit line says so.
            self._audit_call(call, "disconnected", start)
            raise
        finally:
            self._end_open_call(call, open_call)
        self._audit_call(call, outcome, start)
        self.emit(answer)

    def _end_open_call(self, call: _p.Call, open_call: _OpenCall) -> None:
        del self.calls[call.id]
        self._release(open_call.cost)
        if not self.calls and self.idle:
            self.idle.unpark_all()

    async def _wait_as_idle_worker(self) -> None:
        task = trio.lowlevel.current_task()
        self._idle_workers.append(task)

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._idle_workers.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def _async_worker(self) -> None:
        """A worker task of the channel: the reader (from where the last
        one left, see above) until it runs an async call that waited; then
        idle until it is handed the reading again."""
        while not await self._read_on():
            await self._wait_as_idle_worker()

    def _call_inline(self, call: _p.Call, exported: Exported) -> None:
        """An ``inline=True`` function: run it now, on the loop, and answer.
        Nothing can interrupt it, so its answer always stands."""
        token = _current.set(self.context)
        start = _clock()
        answer: _p.Event | None = None
        outcome = "ok"
        try:
            value = exported.fn(*call.args)
        except Exception as exc:
            cls, reason, details = self.node.error_term(exc)
            outcome = str(cls)
            answer = _p.ErrorReply(id=call.id, cls=cls, reason=reason, details=details)
        finally:
            _current.reset(token)
            self._release(self.frame_cost)
        if answer is None:
            self._audited.append(((call.module, call.function, len(call.args)), start, _clock()))
            self._reply(call.id, value)
        else:
            self._audit_call(call, outcome, start)
            self.emit(answer)

    def _audit_call(self, call: _p.Call, outcome: str, start: float) -> None:
        """The audit line of a call that began at ``start`` (``_clock()``):
        ``audit``, one frame less (after the lines still collected)."""
        if self._audited:
            self._audit_pending()
        current_auditor.get().record_request(
            self.key,
            "call",
            call.module,
            call.function,
            len(call.args),
            outcome,
            _clock() - start,
        )

    # The audit lines of calls the reader answered ``ok`` (async calls that
    # did not wait, inline calls) are collected per read in ``_audited`` and
    # handed to the auditor together (``Auditor.record_calls``: one level
    # check, one hand-over; each line timed when its call ended): a line
    # each cost about 1.7 us.  They are handed over before the reader
    # awaits anything (``_unbatch``) and before any other audit line of the
    # channel (``_audit_call``, a denial in ``_check``, ``_dispatch`` of
    # another request), so the channel's lines keep their order.

    def _audit_pending(self) -> None:
        """Hand the collected ``ok`` lines to the auditor."""
        calls = self._audited[:]  # (the list stays: ``_plain_calls`` holds it)
        self._audited.clear()
        self._auditor.record_calls(self.key, calls)

    def _release(self, cost: int) -> None:
        """Give the key back the units a finished request held."""
        if self.account is not None and cost:
            self.account.release(cost)

    def _start_job(self, call: _p.Call, exported: Exported) -> None:
        """A sync function: straight into the worker pool, with no task and
        no cancel scope; ``_job_done`` answers on the loop when it returns,
        ``_cancel_job`` when ``{cancel, Id}`` or its deadline (``timeout``,
        kept by the channel's ``_job_timer``) comes first.
        """
        context = self._call_context()
        open_call = _JobCall(call, _clock(), cost=self.frame_cost)
        self.calls[call.id] = open_call
        if self._delivery_context is None:
            self._delivery_context = self._call_context()
        pool = self._pool
        if pool is None or pool.closed:  # (``Node.workers`` checks the run: once)
            pool = self._pool = self.node.workers()
        open_call.job = pool.submit(
            self.key.fingerprint,
            exported.fn,
            tuple(call.args),
            context,
            # In the channel's context (its node's auditor, ``current_auditor``),
            # not the pool's delivery callback's.
            functools.partial(self._delivery_context.run, self._job_done, open_call),  # type: ignore[call-arg]
            self._end_delivery,
        )
        if call.timeout is not None:
            self._add_job_deadline(open_call, trio.current_time() + call.timeout / 1000)

    # The deadlines of sync calls in the pool: one timer task per channel
    # (started with the first such call) sleeps until the earliest one, a
    # heap of (deadline, serial, call id); the serial tells a call from a
    # later one with the same id, and the heap holds no reference to the
    # call (nor its arguments).  A call that ends leaves its entry behind
    # (stale: skipped when it comes up); the heap is rebuilt from the live
    # entries when stale ones outnumber the open calls, so it stays within
    # a few times ``max_calls``.

    def _add_job_deadline(self, open_call: _JobCall, deadline: float) -> None:
        heap = self._job_deadlines
        self._job_serial += 1
        open_call.serial = self._job_serial
        heapq.heappush(heap, (deadline, self._job_serial, open_call.call.id))
        if len(heap) > 2 * len(self.calls) + 64:
            heap[:] = [entry for entry in heap if self._timed_job(entry) is not None]
            heapq.heapify(heap)
        if self._timer_scope is None:
            self._timer_at = deadline
            self._timer_scope = trio.CancelScope()
            self.nursery.start_soon(self._job_timer, self._timer_scope)
        elif deadline < self._timer_at:
            self._timer_at = -math.inf  # cancelled once until the timer looks again
            self._timer_scope.cancel()

    def _timed_job(self, entry: tuple[float, int, int]) -> _JobCall | None:
        """The call of a deadline heap entry, if it still runs in the pool."""
        open_call = self.calls.get(entry[2])
        if (
            type(open_call) is _JobCall
            and open_call.serial == entry[1]
            and open_call.job is not None
        ):
            return open_call
        return None

    async def _job_timer(self, scope: trio.CancelScope) -> None:
        """Answer ``timeout`` for each sync call in the pool whose deadline
        passes before its function returns (the function is flagged, as for
        a cancel).  Runs until the channel ends."""
        heap = self._job_deadlines
        while True:
            now = trio.current_time()
            self.batching = True
            while heap and (heap[0][0] <= now or self._timed_job(heap[0]) is None):
                open_call = self._timed_job(heapq.heappop(heap))
                if open_call is not None:
                    self._cancel_job(open_call, "timeout")
            self._unbatch()
            self._timer_at = heap[0][0] if heap else math.inf
            with scope:
                scope.deadline = self._timer_at
                await trio.sleep_forever()
            scope = self._timer_scope = trio.CancelScope()

    def _end_delivery(self) -> None:
        """After the pool handed over a round of results (``_job_done``,
        batched): they leave in one write."""
        if self.batching:
            self._unbatch()

    def _end_job(
        self, open_call: _JobCall, answer: _p.Event | None, outcome: str, value: Any = None
    ) -> None:
        """Answer a pool call: ``answer``, or (None) a reply of ``value``."""
        call = open_call.call
        open_call.job = None
        del self.calls[call.id]
        self._release(open_call.cost)
        if not self.calls and self.idle:
            self.idle.unpark_all()
        if answer is None and self.batching:
            # (a round of results: handed over as it ends, ``_end_delivery``)
            name = (call.module, call.function, len(call.args))
            self._audited.append((name, open_call.start, _clock()))
        else:
            self._audit_call(call, outcome, open_call.start)
        if answer is None:
            self._reply(call.id, value)
        else:
            self.emit(answer)

    def _job_done(self, open_call: _JobCall, result: Any) -> None:
        """On the loop, from the worker pool: the function returned.  While
        the answer queue is full, a task waits for room before answering (a
        cancel meanwhile changes nothing: the function returned first)."""
        call = open_call.call
        answer: _p.Event
        outcome = "ok"
        if isinstance(result, _Value):
            if not self.outbox.full:
                self.batching = True  # until the round ends (``_end_delivery``)
                self._end_job(open_call, None, outcome, result.value)
                return
            answer = _p.Reply(id=call.id, value=result.value)
        else:
            cls, reason, details = self.node.error_term(result.error)
            outcome = str(cls)
            answer = _p.ErrorReply(id=call.id, cls=cls, reason=reason, details=details)
        if self.outbox.full:
            open_call.job = None
            self.nursery.start_soon(self._end_job_when_room, open_call, answer, outcome)
        else:
            self.batching = True  # until the round ends (``_end_delivery``)
            self._end_job(open_call, answer, outcome)

    async def _end_job_when_room(self, open_call: _JobCall, answer: _p.Event, outcome: str) -> None:
        await self.outbox.wait_room()
        self._end_job(open_call, answer, outcome)

    def _cancel_job(self, open_call: _JobCall, outcome: str = "cancelled") -> None:
        """``{cancel, Id}`` (or the deadline, ``outcome="timeout"``) for a
        call in the worker pool: answer now; the function learns it from
        ``check_cancelled``."""
        if open_call.job is None:
            return  # it returned already; its answer waits for room
        open_call.job.pool.abandon(open_call.job)
        reason = Atom(outcome)
        answer = _p.ErrorReply(id=open_call.call.id, cls=Atom("sshrpc"), reason=reason)
        self._end_job(open_call, answer, outcome)

    async def _invoke(self, exported: Exported, args: list[Any], stream_id: int | None) -> Any:
        if exported.kind == "async":
            return await exported.fn(*args)
        if exported.kind == "sync":
            if exported.inline:
                return exported.fn(*args)
            return await self.node.workers().run(self.key.fingerprint, exported.fn, *args)
        agen = exported.fn(*args)
        items: list[Any] = []
        try:
            async for item in agen:
                if stream_id is None:
                    items.append(item)
                    continue
                open_call = self.calls[stream_id]
                assert isinstance(open_call, _OpenCall) and open_call.credit_lot is not None
                while self.conn.stream_credit(stream_id) <= 0:
                    await open_call.credit_lot.park()
                await self.outbox.wait_room()
                self.emit(_p.Chunk(id=stream_id, value=item))
        finally:
            await agen.aclose()
        return Atom("done") if stream_id is not None else items

    async def _run_call(self, call: _p.Call, exported: Exported) -> None:
        open_call = self.calls[call.id]
        assert isinstance(open_call, _OpenCall) and open_call.scope is not None
        token = _current.set(self.context)
        start = _clock()
        answer: _p.Event
        outcome = "ok"
        try:
            try:
                with open_call.scope:
                    stream_id = call.id if call.stream and exported.kind == "stream" else None
                    value = await self._invoke(exported, call.args, stream_id)
                    answer = _p.Reply(id=call.id, value=value)
            except MessageTooLarge:
                outcome = "too_large"
                answer = _p.ErrorReply(id=call.id, cls=Atom("sshrpc"), reason=Atom("too_large"))
            except Exception as exc:
                cls, reason, details = self.node.error_term(exc)
                outcome = str(cls)
                answer = _p.ErrorReply(id=call.id, cls=cls, reason=reason, details=details)
            if open_call.scope.cancelled_caught:
                outcome = "cancelled" if open_call.cancel_requested else "timeout"
                answer = _p.ErrorReply(id=call.id, cls=Atom("sshrpc"), reason=Atom(outcome))
            await self.outbox.wait_room()
        finally:
            _current.reset(token)
            del self.calls[call.id]
            if not self.calls and self.idle:
                self.idle.unpark_all()
        # Only reached when the channel is alive (a channel-wide cancel raises
        # Cancelled above): exactly one final answer.
        self._audit_call(call, outcome, start)
        self.emit(answer)

    async def _audit_cut_off(
        self, kind: str, request: _p.Call | _p.Cast | _p.Mfa, run: Callable[[], Awaitable[None]]
    ) -> None:
        """Run a call's, cast's or legacy request's task; if the channel ends
        under it (its audit line is written only once it answered), write
        the audit line with outcome ``disconnected``: one line per request,
        always."""
        start = trio.current_time()
        try:
            await run()
        except trio.Cancelled:
            duration = trio.current_time() - start
            m, f, args = request.module, request.function, request.args
            m = m if isinstance(m, str) else safe_repr(m, 60)
            f = f if isinstance(f, str) else safe_repr(f, 60)
            n = len(args) if isinstance(args, list) else 0
            audit(self.key, kind, m, f, n, "disconnected", duration)
            raise

    def _client_send(self, send: _p.Send) -> None:
        """A client's ``{send, Dest, Msg}``: delivered when the policy lets
        this key send there (registered names listed in its ``send``; pids of
        this session and its processes, or wider with ``send_pids``), then
        audited: ``ok``, ``forbidden``, ``noproc`` or ``dropped``."""
        node = self.node
        dest = send.dest
        target: _Channel | _Process | None = None
        if type(dest) is Atom:
            if node.table.policy.may_send_to_name(self.key, dest):
                pid = node.registry.get(dest)
                target = None if pid is None else node.pids.get(pid)
                outcome = "noproc" if target is None else "ok"
            else:
                outcome = "forbidden"
        elif isinstance(dest, Pid):
            target = node.pids.get(dest)
            if target is None:
                outcome = "noproc"
            else:
                outcome = "ok" if self._may_send_to(target) else "forbidden"
        else:
            outcome = "noproc"
        if outcome == "ok" and isinstance(target, _Process):
            # A message to a process holds the key's units until it is
            # received (or the process ends).
            assert self.account is not None
            if not self._hold("send", None):
                outcome = "dropped"
            elif not target.deliver(Held(send.msg, self.frame_cost, self.account)):
                self.account.release(self.frame_cost)
                outcome = "dropped"
        elif outcome == "ok" and target is not None and not target.deliver(send.msg):
            outcome = "dropped"
        audit_send(self.key, str(dest) if isinstance(dest, Pid) else safe_repr(dest, 120), outcome)

    def _may_send_to(self, target: _Channel | _Process) -> bool:
        owner = target.owner if isinstance(target, _Process) else target
        if owner is self:
            return True
        scope = self.node.table.policy.pid_scope(self.key)
        if scope == "any":
            return True
        return scope == "key" and owner is not None and owner.key == self.key

    def _start_cast(self, cast: _p.Cast) -> None:
        if self.closing:
            return
        # Casts have a bound of their own, the same size: PROTOCOL.md's
        # max_calls counts calls (a client waits for a free call slot, and
        # cannot see casts), and running casts must still be bounded.
        if self.casts >= self.node.max_calls:
            # Dropped; logged as a denial (rate-limited), not a line each.
            audit(self.key, "cast", cast.module, cast.function, len(cast.args), "overload", 0.0)
            return
        exported = self._check("cast", cast.module, cast.function, len(cast.args), None)
        if exported is None or not self._hold("cast", None):
            return
        self.casts += 1
        self.nursery.start_soon(
            self._audit_cut_off,
            "cast",
            cast,
            functools.partial(self._holding, self.frame_cost, self._run_cast, cast, exported),
        )

    async def _wait_for_cast_start(self) -> None:
        self._cast_waiter = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._cast_waiter = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def _run_cast(self, cast: _p.Cast, exported: Exported) -> None:
        waiter = self._cast_waiter
        if waiter is not None:  # the reader waits for this cast to begin
            self._cast_waiter = None
            trio.lowlevel.reschedule(waiter)
        token = _current.set(self.context)
        start = trio.current_time()
        outcome = "ok"
        try:
            await self._invoke(exported, cast.args, None)
        except Exception as exc:
            outcome = str(error_term(exc)[0])
            log.warning(
                "cast %s:%s/%d failed: %s",
                clean(cast.module),
                clean(cast.function),
                len(cast.args),
                safe_repr(exc),
            )
        finally:
            _current.reset(token)
            self.casts -= 1
            if not self.casts and self.idle:
                self.idle.unpark_all()
        audit(
            self.key,
            "cast",
            cast.module,
            cast.function,
            len(cast.args),
            outcome,
            trio.current_time() - start,
        )

    # processes ---------------------------------------------------------------

    def _spawn(self, spawn: _p.Spawn) -> None:
        if self.closing:
            self.emit(_p.ErrorReply(id=spawn.id, cls=Atom("sshrpc"), reason=Atom("shutting_down")))
            return
        if len(self.processes) >= self.node.max_calls:
            self.emit(_p.ErrorReply(id=spawn.id, cls=Atom("sshrpc"), reason=Atom("overload")))
            return
        exported = self._check("spawn", spawn.module, spawn.function, len(spawn.args), spawn.id)
        if exported is None or not self._hold("spawn", spawn.id):
            return
        process = _Process(self.node, self.node.new_pid(), self.node.mailbox_size, owner=self)
        self.processes[process.pid] = process
        self.node.pids[process.pid] = process
        self.emit(_p.Reply(id=spawn.id, value=process.pid))
        audit(self.key, "spawn", spawn.module, spawn.function, len(spawn.args), "ok", 0.0)
        self.nursery.start_soon(
            self._holding, self.frame_cost, self._run_process, process, exported, spawn.args
        )

    async def _run_process(self, process: _Process, exported: Exported, args: list[Any]) -> None:
        token = _current.set(_Context(self.node, self, process, self.key))
        reason: Any = Atom("normal")
        try:
            await self._invoke(exported, args, None)
        except Exception as exc:
            cls, term, _ = self.node.error_term(exc, traces=False)
            reason = (cls, term)
        finally:
            _current.reset(token)
            self.processes.pop(process.pid, None)
            self.node.forget(process)
        self.emit(_p.Down(pid=process.pid, reason=reason))

    # legacy ------------------------------------------------------------------

    async def _legacy(self, mfa: _p.Mfa) -> None:
        m, f, a = mfa.module, mfa.function, mfa.args
        if not (isinstance(m, str) and isinstance(f, str) and isinstance(a, list)):
            self.emit(_p.Answer(result=(Atom("exec_error"), (m, f, a)), status=-1))
            return
        exported = self._check("mfa", m, f, len(a), None)
        if exported is None:
            outcome = self.node.table.decide(self.key, m, f, len(a)).outcome
            self.emit(_p.Answer(result=(Atom("exec_badrpc"), Atom(outcome)), status=-1))
            return
        token = _current.set(self.context)
        start = trio.current_time()
        try:
            value = await self._invoke(exported, a, None)
        except Exception as exc:
            cls, reason, _ = self.node.error_term(exc, traces=False)
            audit(self.key, "mfa", m, f, len(a), str(cls), trio.current_time() - start)
            self.emit(_p.Answer(result=(Atom("exec_badrpc"), (cls, reason)), status=-1))
            return
        finally:
            _current.reset(token)
        audit(self.key, "mfa", m, f, len(a), "ok", trio.current_time() - start)
        self.emit(_p.Answer(result=value, status=0))


# -- the node ----------------------------------------------------------------------


class Node:
    """Services, processes, registered names and mailboxes shared by every
    channel.

    Args:
      services: ``Service`` objects (or nested lists of them).
      policy: who may call what (default: every exported function).
      name: the node atom in hellos and pids (default ``sshrpc@HOSTNAME``).
      authorized_keys: the file sshd reads keys from; used to find a key's
        comment for policy rules and logs.
      max_calls, max_frame, max_queued, worker_threads, mailbox_size: the
        bounds described in the module docstring.
      worker_threads_per_key: the most worker threads the sync calls of one
        key may hold at once (default ``max(1, worker_threads // 2)``), so
        that one key's long or cancelled-but-running calls cannot delay
        another key's.
      expose_traces: put ``trace => [Binary]`` in error details (off by
        default: no stack trace leaves the node).
      max_channels_per_key, max_held_per_key: per-key bounds
        (``sshrpc._bounds``): channels open at once, and cost units held
        by its requests (running calls' arguments, mailbox messages,
        queued answers).
      max_cost, max_inflate_ratio: the decode budget of one request
        (default: ``protocol.COST_PER_BYTE`` times ``max_frame``) and the
        inflate ratio allowed for a compressed one (``protocol.Connection``).
      redact_errors: an exception other than ``sshrpc.Error``/``Exit``/
        ``Throw`` reaches the client as ``{'ExceptionClassName', <<>>}``:
        its message (which may hold file paths, reprs, data) stays on the
        node.  Off by default here; ``sshrpc serve`` and ``sshrpc node``
        turn it on.
      audit_level: the level of audit lines for requests that ran (INFO by
        default); denials are WARNING lines, rate-limited (``Auditor``).
      audit_window: the rate limit's window in seconds (default 10).
      audit_stream: write audit lines to this text stream directly, in the
        format of ``logging.basicConfig(format=_auditlog.LOG_FORMAT)``,
        once per turn of the event loop (``_auditlog.AuditStream``): about
        15 µs less per call than a ``logging`` record each.  ``None`` (the
        default): through the ``sshrpc.audit`` logger.
      flush_early: while the calls of one read are answered, the answers
        queued so far leave once there are this many and no other task
        waits for the loop, so that the client (another process, on
        another core) works on them while the node answers the rest: with
        one client keeping 64 calls in flight, calls/s went from about
        53,000 to about 85,000 for 2-4 µs more CPU per call (more, smaller
        writes; ``bench/call_cpu.py``).  While other tasks wait, the
        answers of a read leave together, which costs the least CPU.  0:
        always together.  Default 16.  A read of more than twice as many
        calls flushes at its half instead (two writes per read: fewer
        packets for sshd and the client, same overlap).
      pass_fds: take the channel's descriptors from a relay that offers
        them (``sshrpc._fdpass``: the relay then copies nothing); False:
        such relays are told to copy (default True).
    """

    def __init__(
        self,
        services: Iterable[Service] | Mapping[str, Service],
        *,
        policy: Policy | None = None,
        name: str | None = None,
        authorized_keys: str | os.PathLike[str] | None = None,
        max_calls: int = DEFAULT_MAX_CALLS,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_queued: int = DEFAULT_MAX_QUEUED,
        worker_threads: int = DEFAULT_WORKER_THREADS,
        mailbox_size: int = DEFAULT_MAILBOX_SIZE,
        expose_traces: bool = False,
        worker_threads_per_key: int | None = None,
        max_channels_per_key: int = DEFAULT_MAX_CHANNELS_PER_KEY,
        max_held_per_key: int = DEFAULT_MAX_HELD_PER_KEY,
        max_cost: int | None = None,
        max_inflate_ratio: int = _p.DEFAULT_MAX_INFLATE_RATIO,
        redact_errors: bool = False,
        audit_level: int = logging.INFO,
        audit_window: float = 10.0,
        audit_stream: TextIO | None = None,
        flush_early: int = FLUSH_EARLY,
        pass_fds: bool = True,
    ) -> None:
        found = flatten_services(services.values() if isinstance(services, Mapping) else services)
        self.table = ExposureTable(found, policy or Policy.allow_all())
        #: The built-in ``sshrpc:exports/0`` (docs/protocol.md).
        self.builtin_exports = Exported("sshrpc", "exports", _exports, "async", 0, 0)
        self.name = name or f"sshrpc@{socket.gethostname().split('.')[0] or 'localhost'}"
        self.authorized_keys = authorized_keys
        self.max_calls = max_calls
        self.max_frame = max_frame
        self.max_queued = max_queued
        self.mailbox_size = mailbox_size
        self.expose_traces = expose_traces
        self.max_cost = max_cost
        self.max_inflate_ratio = max_inflate_ratio
        self.accounts = KeyAccounts(max_held_per_key, max_channels_per_key)
        #: Taken to decode a frame that may be expensive (``_Channel._next_event``).
        self.heavy = trio.Lock()
        #: Trio time before which no heavy frame is decoded (``heavy_pace``).
        self.heavy_after = -math.inf
        self.redact_errors = redact_errors
        if flush_early < 0:
            raise ValueError(f"flush_early must be 0 or more, not {flush_early}")
        self.flush_early = flush_early
        lines = None if audit_stream is None else AuditStream(audit_stream, AUDIT_LOGGER)
        self.auditor = Auditor(
            allowed_level=audit_level,
            window=audit_window,
            write=None if lines is None else lines.write,
            write_requests=None if lines is None else lines.write_requests,
            write_calls=None if lines is None else lines.write_calls,
        )
        self.worker_threads = worker_threads
        self.worker_threads_per_key = worker_threads_per_key
        # Checks the numbers now; its threads start with the first sync call.
        self._workers = WorkerPool(worker_threads, worker_threads_per_key)
        self.pids: dict[Pid, _Channel | _Process] = {}
        self.registry: dict[str, Pid] = {}
        self.channels: set[_Channel] = set()
        self.pass_fds = pass_fds
        #: Channels served on descriptors passed by their relay (``_fdpass``).
        self.channels_passed = 0
        #: Random per node (never 0), as Erlang's creation differs per start.
        self._creation = secrets.randbits(32) or 1

    def workers(self) -> WorkerPool:
        """The worker pool of sync functions, for the running Trio loop (a
        pool is bound to one loop; a node reused under another ``trio.run``
        gets a new one)."""
        pool = self._workers
        if pool.closed or (
            pool.token is not None and pool.token is not trio.lowlevel.current_trio_token()
        ):
            pool.close()
            pool = self._workers = WorkerPool(self.worker_threads, self.worker_threads_per_key)
        return pool

    def close_workers(self) -> None:
        """End the worker threads once their current functions return (they
        are also ended when the Trio run ends).  Sync calls made later start
        a new pool."""
        self._workers.close()

    async def heavy_pace(self) -> None:
        """Wait (holding ``heavy``) until ``heavy_after``: after a heavy
        decode that took ``t`` seconds the next one starts ``HEAVY_PACE * t``
        later, so large terms take at most about a fifth of the event loop.
        The pause is taken before the next heavy decode, not after this
        one, so the request just decoded runs at once.  A checkpoint;
        cancellable (the caller's frame stays buffered)."""
        wait = self.heavy_after - trio.current_time()
        if wait > 0:
            await trio.sleep(wait)

    def new_pid(self) -> Pid:
        """A fresh pid of this node, unguessable: 28 random bits (a 15-bit ID
        and a 13-bit serial, as ``PID_EXT`` allows) under a random creation;
        never the pid of a live process or session."""
        while True:
            bits = secrets.randbits(28)
            pid = Pid.new(self.name, bits & 0x7FFF, bits >> 15, self._creation)
            if pid not in self.pids:
                return pid

    def error_term(self, exc: BaseException, *, traces: bool | None = None) -> Any:
        """``service.error_term`` with this node's ``expose_traces`` (unless
        ``traces`` says otherwise) and ``redact_errors``."""
        return error_term(
            exc,
            traces=self.expose_traces if traces is None else traces,
            redact=self.redact_errors,
        )

    def send(self, dest: Pid | str, message: Any) -> bool:
        """Deliver to a pid or registered name; ``False`` if dropped.

        For service code (trusted): not checked against the policy.  Clients'
        sends go through the policy (``_Channel._client_send``).
        """
        if isinstance(dest, str):
            pid = self.registry.get(dest)
            if pid is None:
                return False
            dest = pid
        target = self.pids.get(dest) if isinstance(dest, Pid) else None
        if target is None:
            return False
        if not target.deliver(message):
            if isinstance(target, _Process):
                log.warning("mailbox of %r full; message dropped", target.pid)
            return False
        return True

    def register(self, name: str | bytes, pid: Pid) -> None:
        """Register ``pid`` under the atom ``name`` (a binary is taken as its
        UTF-8 text); ``ValueError`` if taken or ``pid`` is no live process."""
        if isinstance(name, bytes):
            name = name.decode("utf-8")
        name = Atom(name)
        if name in self.registry:
            raise ValueError(f"name {name!r} is already registered")
        target = self.pids.get(pid)
        if not isinstance(target, _Process):
            raise ValueError(f"no process {pid!r}")
        self.registry[name] = pid
        target.names.add(name)

    def forget(self, process: _Process) -> None:
        self.pids.pop(process.pid, None)
        for name in process.names:
            self.registry.pop(name, None)
        process.inbox_send.close()
        while True:  # messages never received give their senders' units back
            try:
                message = process.inbox_receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if type(message) is Held:
                message.take()

    async def shutdown(self, grace: float = 2.0) -> None:
        """Tell every channel ``{bye, shutting_down}`` and end it.

        New calls on those channels get ``shutting_down``; the bye is written
        (waiting at most ``grace`` seconds for slow readers), then each
        channel's tasks are cancelled: open calls get no answer, as
        PROTOCOL.md section 5 says for a server's bye.  The listener keeps
        running; cancel ``serve_unix``/``serve_node`` to stop it.
        """
        channels = list(self.channels)
        for channel in channels:
            channel.closing = True
            channel.emit(_p.Bye(reason=Atom("shutting_down")))
            # Requests decoded before the bye are not dispatched: after it,
            # the reader's next event is CLOSED (as frame by frame).
            channel.drop_read_events()
        with trio.move_on_after(grace):
            for channel in channels:
                await channel.outbox.wait_empty()
        for channel in channels:
            channel.nursery.cancel_scope.cancel()
        self.auditor.flush()

    def statistics(self) -> dict[str, int]:
        """Counts for leak checks: channels, open calls, processes, pids,
        registered names, and Trio tasks alive in this run."""
        return {
            "channels": len(self.channels),
            "calls": sum(len(c.calls) + c.casts for c in self.channels),
            "processes": sum(len(c.processes) for c in self.channels),
            "pids": len(self.pids),
            "registered": len(self.registry),
            "tasks": _count_tasks(),
            "held": self.accounts.held(),
        }

    async def serve_channel(
        self, stream: trio.abc.Stream, key: KeyIdentity = ANONYMOUS, peer: str = ""
    ) -> None:
        """Serve one RPC session on ``stream`` until it ends; then close it.

        Cancelling this cancels every task of the session; the stream is closed.
        """
        token = current_auditor.set(self.auditor)
        try:
            await _Channel(self, stream, key, peer).run()
        finally:
            self.auditor.flush(expired_only=True)
            current_auditor.reset(token)

    async def serve_unix(
        self,
        socket_path: str | os.PathLike[str],
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``socket_path`` for relays until cancelled.

        The socket's directory is created with mode 0700; an existing one must
        be a directory (not a symbolic link) owned by this user, or this raises
        ``PermissionError`` (whoever owns it could swap the socket); it is
        set to 0700.  Peers whose uid is
        not ours (``SO_PEERCRED``) are refused and logged.  ``task_status``
        gets the socket path once it listens.  Cancellation closes the socket
        (the file is removed) and every channel.
        """
        path = os.fspath(socket_path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.lstat(directory)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise PermissionError(
                f"node socket directory {directory} is not a directory owned by uid "
                f"{os.getuid()} (a symbolic link, or another user's): refusing to listen there"
            )
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.chmod(directory, 0o700)
        if os.path.exists(path):
            os.unlink(path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(path)
            sock.listen(128)
            listener = trio.SocketListener(sock)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._flush_audit)
                task_status.started(path)
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(self._serve_relay, stream)
        finally:
            sock.close()
            with contextlib.suppress(Exception):
                os.unlink(path)

    async def _flush_audit(self) -> None:
        """Write the audit counts of passed rate-limit windows, once a window."""
        while True:
            await trio.sleep(self.auditor.window)
            self.auditor.flush(expired_only=True)

    async def _serve_relay(self, stream: trio.SocketStream) -> None:
        passed: _fdpass.PassedStream | None = None
        try:
            creds = stream.socket.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
            )
            peer_pid, peer_uid, _ = struct.unpack("3i", creds)
            if peer_uid != os.getuid():
                log.warning(
                    "refused a connection to the node socket from uid %d (pid %d): "
                    "only uid %d's relay may connect",
                    peer_uid,
                    peer_pid,
                    os.getuid(),
                )
                return
            fds: list[int] = []
            try:
                with trio.move_on_after(HEADER_TIMEOUT) as scope:
                    header = await _read_header(stream, fds)
                if scope.cancelled_caught or header is None:
                    log.warning("relay pid %d sent no valid header; dropped", peer_pid)
                    return
                user_auth, ssh_connection, command, offered = header
                if offered:  # the relay sent the channel's descriptors: take them or say copy
                    passed = _fdpass.take_channel(fds) if self.pass_fds else None
                    try:
                        await stream.send_all(_fdpass.COPY if passed is None else _fdpass.TAKEN)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return  # the relay went away at once
            finally:
                _fdpass.close_fds(fds)
            key = identify_key(user_auth, self.authorized_keys)
            if command is not None:  # exec mode (_exec.py)
                from ._exec import serve_exec

                await serve_exec(self, stream, command, key, ssh_connection)
                return
            log.info(
                "channel from %s key %s%s",
                clean(ssh_connection or "-", 200),
                clean(str(key), 300),
                "" if passed is None else " (descriptors passed)",
            )
            if passed is None:
                await self.serve_channel(stream, key, ssh_connection)
                return
            self.channels_passed += 1
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_fdpass.watch_relay, stream, passed)
                await self.serve_channel(passed, key, ssh_connection)
                nursery.cancel_scope.cancel()
        except Exception:
            # A bug in one channel must not take the node down: log it.
            log.exception("channel failed")
        finally:
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                if passed is not None:  # the channel's descriptors first, then the relay
                    await passed.aclose()
                await stream.aclose()


async def _read_header(
    stream: trio.SocketStream, fds: list[int] | None = None
) -> tuple[str, str, bytes | None, bool] | None:
    """The relay's header: (auth info, SSH_CONNECTION, exec command or None
    for a subsystem channel, whether the relay offers the channel's
    descriptors (``_fdpass``)); None if it is not a valid header.  Descriptors that
    came with its first bytes are appended to ``fds`` (the caller closes
    what it does not take); without ``fds``, none are taken."""
    buf = bytearray()
    while len(buf) < 8:
        if fds is None:
            data = await stream.receive_some(8 - len(buf))
        else:
            data = await _fdpass.receive_header_start(stream, 8 - len(buf), fds)
        if not data:
            return None
        buf += data
    if buf[:4] not in (b"SRLY", _fdpass.MAGIC_PASSED):
        return None
    offered = buf[:4] == _fdpass.MAGIC_PASSED
    size = int.from_bytes(buf[4:8], "big")
    if size > MAX_HEADER:
        return None
    body = bytearray()
    while len(body) < size:
        data = await stream.receive_some(size - len(body))
        if not data:
            return None
        body += data
    auth, _, rest = bytes(body).partition(b"\0")
    conn, extended, mode = rest.partition(b"\0")
    command = None
    if extended:  # BODY = AUTH NUL CONN NUL "exec" NUL COMMAND
        if not mode.startswith(b"exec\0"):
            return None
        command = mode[5:]
        if offered:  # descriptors are passed for subsystem channels only
            return None
    return auth.decode("utf-8", "replace"), conn.decode("utf-8", "replace"), command, offered


def _arities_text(arities: list[int]) -> str:
    if len(arities) == 1:
        return str(arities[0])
    if arities == list(range(arities[0], arities[-1] + 1)):
        return f"{arities[0]}..{arities[-1]}"
    return ", ".join(map(str, arities))


async def _exports() -> list[tuple[Atom, Atom, Any]]:
    """``sshrpc:exports()``: what the calling key may call (built in, always
    allowed)."""
    ctx = _context()
    return ctx.node.table.exports(ctx.key)


def _count_tasks() -> int:
    try:
        root = trio.lowlevel.current_root_task()
    except RuntimeError:
        return 0
    if root is None:
        return 0
    count = 0
    todo = [root]
    while todo:
        task = todo.pop()
        count += 1
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return count


async def serve_node(
    services: Iterable[Service] | Mapping[str, Service],
    *,
    socket_path: str | os.PathLike[str],
    policy: Policy | None = None,
    task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
    **options: Any,
) -> None:
    """Run a node on ``socket_path`` until cancelled.

    ``options`` are ``Node``'s keyword arguments.  ``task_status`` gets the
    ``Node`` once the socket listens (use ``await nursery.start(...)``).
    Cancelling stops listening and cancels every channel's tasks.
    """
    node = Node(services, policy=policy, **options)

    async def serve(task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        await node.serve_unix(socket_path, task_status=task_status)

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            task_status.started(node)
    finally:
        node.close_workers()


class _StdioStream(trio.abc.Stream):
    """stdin + stdout as one stream (in-process mode)."""

    def __init__(self, fd_in: int = 0, fd_out: int = 1) -> None:
        self._in = trio.lowlevel.FdStream(os.dup(fd_in))
        self._out = trio.lowlevel.FdStream(os.dup(fd_out))
        self.out_fd = self._out.fileno()
        #: Reads ``_in`` in fewer system calls per request (``_fdpass.FdReader``).
        self._reader = _fdpass.FdReader(self._in.fileno())

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._out.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._out.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self._reader.receive(_fdpass.RECEIVE_SIZE if max_bytes is None else max_bytes)

    async def send_eof(self) -> None:
        await self._out.aclose()

    async def aclose(self) -> None:
        self._reader.closed = True
        await self._in.aclose()
        await self._out.aclose()


async def serve_stdio(
    services: Iterable[Service] | Mapping[str, Service],
    *,
    policy: Policy | None = None,
    user_auth: str | None = None,
    **options: Any,
) -> None:
    """In-process mode: serve one channel on stdin/stdout, then return.

    The key comes from ``user_auth`` (the text of sshd's ``$SSH_USER_AUTH``
    file; read from that variable when ``None``).  EOF on stdin ends the
    channel like a disconnect: open calls are cancelled.  ``options`` are
    ``Node``'s keyword arguments.
    """
    node = Node(services, policy=policy, **options)
    if user_auth is None:
        path = os.environ.get("SSH_USER_AUTH", "")
        user_auth = ""
        if path:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    user_auth = f.read(MAX_HEADER)
            except OSError:
                user_auth = ""
    key = identify_key(user_auth, node.authorized_keys)
    try:
        await node.serve_channel(_StdioStream(), key, os.environ.get("SSH_CONNECTION", ""))
    finally:
        node.close_workers()
