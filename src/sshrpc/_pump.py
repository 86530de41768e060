"""Bytes <-> SSH channels of one connection, over libssh2 (ssh2-python) in
non-blocking mode, under Trio.

Theory of operation
-------------------

libssh2 is not thread-safe and knows nothing of Trio.  A ``Pump`` owns one
libssh2 session, its socket and one channel, and one task (the pump task,
``Pump.run``) makes the libssh2 calls once the connection is set up -- with
two exceptions: while the pump task is parked on the socket waiting for
inbound packets and nothing is queued, ``send_nowait`` offers a frame to the
channel from the caller's task (one thread, and the pump is not inside
libssh2 then), which saves a pump wake-up per sequential call; and such a
caller, alone in flight, then waits on the socket and reads its answer
itself ("The lone caller" below).  With other requests in flight frames
are left to the pump, which writes all that is queued at once (fewer,
fuller SSH packets).
(Set-up -- handshake, host key check, auth, channel open -- runs in the task
that opens the connection, before the pump task exists, through the same
``retry`` helper, so there is still only ever one caller at a time.)

Every call goes through one shape of loop (``retry``): make the call; if
libssh2 says ``LIBSSH2_ERROR_EAGAIN``, wait with ``trio.lowlevel.wait_readable``
or ``wait_writable`` on the socket as ``session.block_directions()`` says, and
make the *same call with the same arguments* again.  Cancellation can only
interrupt the wait, never a libssh2 call half-way.

The steady-state loop (``run``) does three things per turn, without blocking:

1. offer the head of the outgoing buffer to ``channel.write`` in slices of at
   most ``WRITE_SLICE`` bytes.  A write may return ``(EAGAIN, n)`` with
   ``n > 0``: those ``n`` bytes *were* accepted; drop them and re-offer the
   rest later.  Slicing keeps re-offers from being quadratic in the payload.
2. read the channel (stdout, then stderr if queued) unless the consumer asked for a
   pause (too many answers nobody has taken).  Reading is what makes libssh2
   send WINDOW_ADJUST to the server; while paused the server's window closes
   and the server stops sending: receive-side backpressure.  Write EAGAINs
   are usually our peer window being full, which only inbound WINDOW_ADJUST
   packets cure, so the pump keeps reading while writers wait.
   Any libssh2 call may pull packets off the socket into libssh2's own
   queue, so the pump only sleeps on the socket when nothing of the channel
   waits inside libssh2 (otherwise a reply already there would wait for the
   next unrelated packet: a lost wake-up).  libssh2's channel read drains
   the socket until EAGAIN and then takes every queued stdout packet that
   fits, so after a read that did not fill its buffer only stderr data or
   the EOF flag can be left: ``poll_channel_read(1)`` (true for data of
   either stream) and, if the read returned bytes, ``eof()`` -- two queue
   checks, no second read.  A sequential call costs 7 libssh2 calls: the
   caller's write and its two checks, then the read, its two checks and
   ``block_directions`` (by the caller itself: "The lone caller").
3. when neither made progress, sleep until the socket is ready in the
   direction libssh2 is blocked on, or until another task wakes the pump
   (new bytes to write, reading resumed, close requested).  The wake-up is a
   cancel scope around the pump's turns that ``wake()`` cancels: it
   interrupts whatever the pump awaits (a wait or a checkpoint, never a
   libssh2 call), and the next turn runs in a new scope -- a scope per
   wake-up, not per wait.  Before it writes, the pump lets the tasks that
   queued frames since its last look run first (a checkpoint while the queue
   keeps growing, at most ``DEFER_ROUNDS`` rounds or ``WRITE_SLICE`` bytes),
   so frames of one batch leave in one write.  A wake-up while the pump is
   not asleep (in a checkpoint of its turns) cancels nothing: the pump looks
   at everything again before it sleeps (a ``wake()`` since its last look
   makes it take another turn instead).  After a read that answered several
   waiting tasks the pump takes a checkpoint rather than sleeping, so those
   tasks queue their next frames while it is awake and they leave in the
   next write without a cancel and a new scope per batch.

Many channels
-------------

``Connection.open_channel`` asks for one more SSH session channel with the
sshrpc subsystem on the same session (``open_lane``).  Its state is a
``Lane``: a channel, an outgoing buffer, a pause flag, callbacks; it offers
what a ``Connection`` uses of a ``Pump``, so the child is an ordinary
``Connection`` on a lane.  The pump task still makes every libssh2 call:
while there are lanes or channel opens/closes queued (``_multi``), ``_turns``
hands over to ``_lane_turns``, which does the same three steps for each
"end" (our own channel, then each lane) and returns to the single-channel
loop, untouched, when the last lane is gone.  Rules of that loop:

- Opens and closes are operations (``_LaneOp``) queued for the pump and done
  one at a time, oldest first (libssh2 keeps one channel open in progress
  per session): ``open_session`` then ``subsystem``, or ``close``.  A refusal
  becomes ``ChannelRefused`` for the opener; the connection is unaffected.
- libssh2 holds at most one half-sent packet per session.  Until it is sent
  every other send answers EAGAIN ("address different"), so the call that
  started it must be repeated first, whatever happens to its channel
  meanwhile (paused, failed, closing).  The pump records that call's owner
  (``_owner``: an end and whether it was a write, a read -- whose window
  adjust was half sent -- or an operation) when a call answers EAGAIN and
  the session's block directions now include outbound, and repeats it at
  the start of every turn; operations wait while an owner is recorded, and
  a lane's channel is never freed while it owns the packet.  A write on a
  channel whose peer window is 0 is skipped while another end owns the
  packet: libssh2 would set the block directions to inbound only and hide
  the pending outbound bytes.
- Each end pauses on its own (its ``should_read``): a paused lane's window
  closes and the server stops sending on that channel only.
- Lost wake-ups: any libssh2 call may pull packets of any channel off the
  socket, so before sleeping the pump checks every reading end's queue
  (``poll_channel_read``, ``eof``), not only the last one read.  Every
  lane's ``wake`` wakes the one pump.
- The caller-writes-directly shortcut (``send_nowait(direct=True)``) is
  off while there are lanes: every write goes through the pump and its
  owner bookkeeping.
- Our channel's end ends the connection (``ConnectionLost`` for every lane
  too, ``_end_lanes``); a lane's end (EOF, error, ``Lane.aclose``) ends that
  lane only.  ``aclose`` drops the lanes' channels before it frees the
  session (a channel holds its session).

The lone caller
---------------

A sequential call used to cost two scheduler rounds and two task steps:
the pump task woke on the socket, read the answer and rescheduled the
caller, which ran in the next round.  When a call is alone in flight (its
caller wrote the frame itself and ``send_nowait`` answered True: the pump
is parked on the socket for inbound packets, nothing queued, no lanes),
the caller waits on the socket itself (``wait_answer``) and reads the
answer in its own task: one round, one task step.

The socket wait is lent, not shared: the pump parks in ``_park``, a copy of
Trio's ``wait_readable`` on Trio's epoll registration (private attributes
of Trio's ``EpollIOManager``; ``_epoll_manager`` checks them once per run
and the shortcut is off when they are not there, or with ``LONE_CALLER``
false).  The caller swaps itself in as the registration's reader
(``read_task``; the fd stays armed: no system call) while the pump stays
parked.  libssh2 is still called by one task at a time: while a caller
holds the wait the pump is parked, never inside libssh2.  ``_lone`` says
who holds it:

- The socket wakes the caller: it reads as the pump's turn would
  (``_lone_read``: the same read and queue checks, the answer dispatched by
  ``on_data``), then lends the wait back to the still parked pump (re-armed:
  one ``epoll_ctl``, as the pump's own wait costs).  Anything unusual (EOF,
  an error, a full read, stderr, a half-sent packet, reading paused) wakes
  the pump, and the caller waits as usual.
- Anything that wakes the pump (another call, a cancel frame, a ping, a
  channel open, ``fail``, the run's cancel) makes it take the socket back
  before anything else (``_reclaim``, on leaving ``_park``): a caller still
  asleep becomes an ordinary waiter on its request (``req._task``,
  rescheduled by the answer's dispatch); one the socket has already woken
  finds ``_lone`` gone when it runs and waits as usual (its answer may be
  there already).  So other tasks never wait for the lone caller: their
  wake-up reaches the pump as before.
- A cancel of the sleeping caller (``_Lone.abort``) gives the registration
  back to the parked pump synchronously (or drops it if the pump is awake:
  it registers again when it parks); the call is then abandoned as usual
  (``{cancel, Id}`` through the pump).
- Lanes: ``wait_answer`` declines while ``_multi`` (as the direct write
  does), and opening one wakes the pump, which takes the socket back.

Closing (``aclose``) frees the libssh2 session *before* closing its socket:
freeing a session restores the blocking mode the fd had at handshake time,
and if the socket were closed first, its fd number could already belong to a
new connection, which would turn blocking and hang the whole event loop.
(Our sockets are Trio's, non-blocking before the handshake, so libssh2
records "non-blocking" as the original mode; the order is kept anyway, and
tests/integration/test_client.py runs a reconnect loop with failures in it.)
"""

from __future__ import annotations

import logging
import socket as _stdsocket
from collections import deque
from collections.abc import Callable
from typing import Any

import trio
from ssh2 import exceptions as ssh2_exc
from ssh2.error_codes import LIBSSH2_ERROR_EAGAIN
from ssh2.session import (
    LIBSSH2_SESSION_BLOCK_INBOUND,
    LIBSSH2_SESSION_BLOCK_OUTBOUND,
    Session,
)

from ._errors import ChannelRefused, ConnectionLost

__all__ = [
    "DEFAULT_WRITE_LIMIT",
    "DEFER_ROUNDS",
    "EAGAIN",
    "READ_SIZE",
    "WRITE_SLICE",
    "Lane",
    "Pump",
]

log = logging.getLogger("sshrpc.client")

EAGAIN = LIBSSH2_ERROR_EAGAIN
#: Largest slice offered to one ``channel.write``: libssh2 sends at most one
#: 32 KiB packet per call anyway, and a bounded slice keeps re-offering the
#: remainder after a partial write linear in the payload size.
WRITE_SLICE = 32 * 1024
#: Bytes the pump writes at most per turn, slice after slice, while the
#: channel takes whole slices (``Pump._write_burst``).
WRITE_BURST = 256 * 1024
#: Scheduler rounds the pump waits at most, while tasks keep queueing
#: frames, before it writes what is queued (bounds the added latency).
DEFER_ROUNDS = 64
#: Bytes asked of one ``channel.read``.
READ_SIZE = 64 * 1024
#: The lone caller's shortcut (``Pump.wait_answer``); off: every answer is
#: read by the pump task.  It lends Trio's private epoll registration, so
#: it is on only for the Trio releases it was tested with (a newer Trio
#: takes the pump path until this range is widened after testing).
LONE_CALLER = True
LONE_CALLER_TRIO = ((0, 35), (0, 35))
#: Default bound on request bytes queued but not yet accepted by the channel:
#: libssh2's default channel window (2 MiB), so one window's worth can wait.
DEFAULT_WRITE_LIMIT = 2 * 1024 * 1024
#: How long closing waits for the server to confirm the channel close.
CLOSE_TIMEOUT = 2.0


def _epoll_manager() -> Any:
    """Trio's epoll I/O manager of this run, if it looks as expected (the
    lone caller's shortcut lends its registrations), else None."""
    try:
        version = tuple(int(x) for x in trio.__version__.split(".")[:2])
        if not LONE_CALLER_TRIO[0] <= version <= LONE_CALLER_TRIO[1]:
            return None
        io: Any = trio._core._run.GLOBAL_RUN_CONTEXT.runner.io_manager
        factory: Any = io._registered.default_factory
        ok = type(io).__name__ == "EpollIOManager" and callable(io._update_registrations)
        ok = ok and hasattr(factory(), "read_task")
    except (AttributeError, TypeError, ValueError):
        return None
    return io if ok else None


class _Sending:
    """The outgoing side that ``Pump`` (its own channel) and ``Lane`` (one
    more channel) share: a bounded buffer of bytes for the pump task to
    write, and the error that ended it."""

    _out: bytearray
    _room: trio.Event
    error: BaseException | None
    closing: bool
    write_limit: int
    #: What ends with ``error``, for ``ConnectionLost``'s text.
    _what = "connection"

    def _queued(self) -> None:
        """Tell the pump task that bytes were queued."""
        raise NotImplementedError

    def _lost(self) -> ConnectionLost:
        if isinstance(self.error, ConnectionLost):
            return ConnectionLost(str(self.error))
        return ConnectionLost(f"{self._what} closed ({self.error or 'closed locally'})")

    async def send(self, data: bytes) -> None:
        """Queue ``data`` for the channel; wait while ``write_limit`` bytes are
        already queued.

        A checkpoint.  If cancelled, nothing of ``data`` was queued.  Raises
        ``ConnectionLost`` if the connection is (or becomes) unusable.
        """
        while True:
            if self.error is not None or self.closing:
                raise self._lost()
            if len(self._out) < self.write_limit:
                break
            if self._room.is_set():
                self._room = trio.Event()
            await self._room.wait()
        await trio.lowlevel.checkpoint_if_cancelled()
        self._out += data
        self._queued()

    async def flush(self) -> None:
        """Wait (bounded by the caller's scope) until every queued byte was
        accepted by the channel or the pump stopped."""
        while self._out and self.error is None:
            if self._room.is_set():
                self._room = trio.Event()
            await self._room.wait()


class Pump(_Sending):
    """One libssh2 session + socket + channel, driven by one pump task.

    Construct with a connected, non-blocking socket and a session that has
    been switched to non-blocking; call ``retry`` for set-up, then
    ``attach_channel`` and run ``run`` in a task.  ``send`` queues bytes (and
    waits for room), ``on_data`` receives every chunk read, ``should_read``
    says whether the consumer has room for more.
    """

    def __init__(self, sock: trio.socket.SocketType, session: Session) -> None:
        self.sock = sock
        self.session: Session | None = session
        self.channel: Any = None
        self._out = bytearray()
        self.write_limit = DEFAULT_WRITE_LIMIT
        self._room = trio.Event()
        self._wake_scope: trio.CancelScope | None = None
        self._wake_pending = False
        self.closing = False
        self.closed = False
        self.error: BaseException | None = None
        self._done = trio.Event()
        self._close_done = trio.Event()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.paused = False
        #: True while the pump task sleeps on the socket for inbound packets
        #: only, with nothing of ours half-sent: another task may then make
        #: the channel write itself (``send_nowait``).
        self._parked = False
        #: Frames were queued since the pump last looked: more may follow
        #: from tasks that have not run yet (see ``run``).
        self._fresh = False
        #: More channels on this session (``open_lane``): the child lanes,
        #: the channel opens and closes waiting for the pump, and the lane
        #: or operation whose packet libssh2 has half sent (see "Many
        #: channels" in the module docstring).  ``_multi`` is true while
        #: there are lanes or operations: the pump then runs ``_lane_turns``.
        self._lanes: list[Lane] = []
        self._ops: deque[_LaneOp] = deque()
        self._owner: tuple[Any, int] | None = None
        self._multi = False
        self._on_data: Callable[[bytes], object] | None = None
        self._should_read: Callable[[], bool] | None = None
        #: The subsystem the first channel opened (new lanes open it too),
        #: and the receive window asked for it (``window=``; None: libssh2's).
        self.subsystem = ""
        self.window: int | None = None
        #: Channels opened on this session after the first one.
        self.lanes_opened = 0
        #: True while the pump task is in its turns and not asleep: it looks
        #: at everything again before it sleeps, so ``wake()`` need not
        #: interrupt it (no cancel, no new scope).
        self._busy = False
        #: The lone caller (see "The lone caller" in the module docstring):
        #: Trio's epoll I/O manager (None: not available, the shortcut is
        #: off), the socket's fd, the pump task, whether it sleeps in
        #: ``_park`` (registered on the socket or lent to a caller), and the
        #: caller holding the socket wait.
        self._io: Any = None
        self._fd = -1
        self._task: trio.lowlevel.Task | None = None
        self._in_park = False
        self._lone: _Lone | None = None

    # -- the retry loop ------------------------------------------------------

    async def wait_socket(self, directions: int | None = None) -> None:
        """Wait until the socket is ready the way libssh2 is blocked on
        (``directions``, else ``session.block_directions()``).

        A checkpoint.  Returns early (without error) when ``wake()`` is called.
        """
        if directions is None:
            session = self.session
            directions = session.block_directions() if session is not None else 0
        with trio.CancelScope() as scope:
            self._wake_scope = scope
            if self._wake_pending:
                scope.cancel()
            try:
                await self._wait_for(directions)
            finally:
                self._wake_scope = None
                self._wake_pending = False

    async def _wait_for(self, directions: int) -> None:
        """Wait until the socket is ready for ``directions`` (a checkpoint)."""
        if directions & LIBSSH2_SESSION_BLOCK_OUTBOUND and not (
            directions & LIBSSH2_SESSION_BLOCK_INBOUND
        ):
            await trio.lowlevel.wait_writable(self.sock)
        elif directions & LIBSSH2_SESSION_BLOCK_OUTBOUND:
            # Both ways: wait for whichever comes first.  Rare (during key
            # re-exchange), so a small nursery is fine here.
            async with trio.open_nursery() as nursery:

                async def one(fn: Callable[[Any], Any]) -> None:
                    await fn(self.sock)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(one, trio.lowlevel.wait_readable)
                nursery.start_soon(one, trio.lowlevel.wait_writable)
        else:
            await trio.lowlevel.wait_readable(self.sock)

    def wake(self) -> None:
        """Make the pump task look at its buffers again (from any task)."""
        if self._wake_pending:
            # Already woken (its wait's scope cancelled, or the next wait
            # will cancel itself): a second cancel() costs microseconds.
            return
        self._wake_pending = True
        if self._wake_scope is not None and not self._busy:
            self._wake_scope.cancel()

    async def retry(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` repeated with the same arguments until it does not
        answer ``LIBSSH2_ERROR_EAGAIN``; returns its result.

        Cancellation interrupts only the wait between attempts.  libssh2
        errors propagate as ssh2-python exceptions.
        """
        while True:
            result = fn(*args)
            if result == EAGAIN or (isinstance(result, tuple) and result and result[0] == EAGAIN):
                await self.wait_socket()
                continue
            await trio.lowlevel.checkpoint_if_cancelled()
            return result

    # -- steady state ----------------------------------------------------------

    def attach_channel(self, channel: Any) -> None:
        self.channel = channel

    @property
    def queued_bytes(self) -> int:
        """Bytes accepted by ``send`` but not yet by the channel."""
        return len(self._out)

    def send_nowait(self, data: bytes | bytearray, direct: bool = False) -> bool:
        """Queue ``data`` without waiting for room.  Raises ``ConnectionLost``
        if closed.  True when the calling task wrote all of ``data`` itself
        (``direct``, below) and the pump still sleeps on the socket: the
        caller may then wait for its answer with ``wait_answer``.

        With ``direct`` (the caller expects no other frame soon: nothing else
        is in flight), when the pump task is parked on the socket waiting for
        inbound packets and nothing is queued, the calling task offers
        ``data`` to the channel itself (the pump is not inside libssh2 then, and all
        tasks share one thread): a sequential call then costs no pump
        wake-up.  Whatever the channel did not take is queued for the pump,
        exactly as after the pump's own partial write, and the pump is woken
        if that write left anything for it: bytes queued, or packets that
        libssh2 pulled off the socket into its own queue (which the pump's
        socket wait would not see).
        """
        if self.error is not None:
            raise self._lost()
        channel = self.channel
        if (
            direct
            and self._parked
            and not self._out
            and channel is not None
            and len(data) <= WRITE_SLICE
        ):
            try:
                _, n = channel.write(data)  # an error: the pump's own write reports it
            except ssh2_exc.SSH2Error:
                n = 0
            if n > 0:
                self.bytes_sent += n
            # A write drains the socket into libssh2's queue first.
            # poll_channel_read(1) is true for queued data of either stream
            # (libssh2's channel.c), so two queue checks, no system call.
            if n == len(data) and not channel.poll_channel_read(1) and not channel.eof():
                return True
            data = data[n:] if n > 0 else data
        if data:
            if not self._out and type(data) is bytearray:
                # A large frame made for this queue (``Connection._frame_of_call``):
                # taken over, not copied.
                self._out = data
            else:
                self._out += data
            self._fresh = True
        if not self._wake_pending:  # (else already woken: wake() returns)
            self.wake()
        return False

    def _queued(self) -> None:
        self.wake()

    def fail(self, error: BaseException) -> None:
        """Mark the connection broken (first error wins) and wake everyone."""
        if self.error is None:
            self.error = error
        self._room.set()
        self.wake()

    async def run(
        self,
        on_data: Callable[[bytes], object],
        should_read: Callable[[], bool],
        on_eof: Callable[[BaseException], None],
    ) -> None:
        """The pump task: move bytes until the channel ends or ``fail`` is called.

        ``on_data`` gets every chunk of channel data (a true result: it
        handed answers to several waiting tasks, which the pump lets run
        before it sleeps, so their frames leave at once); ``should_read`` is asked
        before each read; ``on_eof(error)`` is called once when the pump stops,
        with the ``ConnectionLost`` that ended it.  Never raises for network
        failures (they go to ``on_eof``); a cancel stops it at once.
        """
        channel = self.channel
        assert channel is not None
        self._on_data, self._should_read = on_data, should_read
        self._task = trio.lowlevel.current_task()
        self._io = _epoll_manager() if LONE_CALLER else None
        self._fd = self.sock.fileno()
        try:
            while self.error is None:
                # One cancel scope for as many turns as pass without a
                # wake(): wake() cancels it, which interrupts whatever the
                # pump awaits (a checkpoint or a wait; never a libssh2
                # call), and the next turn starts in a new scope.  A scope
                # per wake-up, not per wait.
                with trio.CancelScope() as scope:
                    self._wake_scope = scope
                    try:
                        await self._turns(channel, on_data, should_read)
                    finally:
                        self._wake_scope = None
                        self._busy = False
        except ssh2_exc.SSH2Error as exc:
            self.fail(ConnectionLost(f"SSH connection failed: {type(exc).__name__} {exc}"))
        except ConnectionLost as exc:
            self.fail(exc)
        except OSError as exc:
            self.fail(ConnectionLost(f"SSH connection failed: {exc}"))
        finally:
            if self.error is None:
                self.fail(ConnectionLost("the connection was closed"))
            self._done.set()
            assert self.error is not None
            self._end_lanes(self.error)
            on_eof(self.error)

    async def _turns(
        self, channel: Any, on_data: Callable[[bytes], object], should_read: Callable[[], bool]
    ) -> None:
        """``run``'s loop, inside the wake-up scope (see ``run``)."""
        # A read answered waiting tasks that have not been seen to queue
        # anything since, and whether the pump has given them the one more
        # scheduler round it gives them before sleeping (see the sleep).
        woke = waited = False
        while self.error is None:
            if self._multi:
                # More channels than ours: the general loop (module
                # docstring), where every wake() interrupts the pump.
                self._busy = False
                await self._lane_turns()
                continue
            self._busy = True
            # Frames arrived since the last look: let the tasks that
            # queue them run first (one checkpoint per batch, while the
            # queue keeps growing), so that one task keeping many
            # requests open, or many tasks, share one write.
            rounds = 0
            if self._fresh:
                if woke:
                    # Queued by the tasks the last read woke: they all ran
                    # in the round just given to them (one scheduler
                    # batch), so no round more can bring more of theirs.
                    self._fresh = False
                woke = False
            while self._fresh and len(self._out) < WRITE_SLICE and rounds < DEFER_ROUNDS:
                self._fresh = False
                rounds += 1
                await trio.lowlevel.checkpoint()
            # The pump looks at everything a wake() asks it to look at
            # (queued bytes, should_read, the error) from here on, so
            # earlier wake-ups are served; a later one makes the next
            # wait return at once.
            self._wake_pending = False
            progress = False
            if self._out:
                progress = self._write_burst(channel)
            if should_read():
                self.paused = False
                # Any libssh2 call may pull packets of either stream off
                # the socket into libssh2's queue, and the pump must not
                # sleep on the socket with data queued inside libssh2 (a
                # lost wake-up).  libssh2's channel read first drains the
                # socket until EAGAIN, then takes every queued stdout
                # packet that fits.  So unless the read filled the whole
                # buffer, all that can still wait inside libssh2 is
                # stderr data (poll_channel_read(1), true for either
                # stream, means exactly that now) or the EOF flag (a
                # read with no bytes reports it as 0, so only a read
                # that returned data needs eof()).  Two queue checks,
                # no second read, before the pump sleeps.
                rc, data = channel.read(READ_SIZE)
                if rc > 0:
                    self.bytes_received += rc
                    if on_data(data):
                        # Answers for several waiting tasks: they will
                        # queue frames when they run, so let them run
                        # before sleeping (their wake() then interrupts
                        # nothing), and write what they queued.
                        progress = woke = True
                        waited = False
                    if rc == READ_SIZE:
                        progress = True  # more stdout may be queued
                elif rc != EAGAIN:
                    if channel.eof():
                        raise ConnectionLost("the server closed the channel")
                    if rc < 0:
                        raise ConnectionLost(f"channel read failed (libssh2 error {rc})")
                if not progress:
                    if channel.poll_channel_read(1):
                        self._read_stderr(channel)
                        progress = True
                    elif rc > 0 and channel.eof():
                        raise ConnectionLost("the server closed the channel")
            else:
                self.paused = True
            if progress or self._wake_pending:
                # (_wake_pending: a wake() since this turn looked, which
                # did not interrupt the busy pump: look again.)
                await trio.lowlevel.checkpoint()
            elif woke and not waited:
                # The tasks a read woke run in the same scheduler batch as
                # the pump's checkpoint after it, in either order (Trio
                # reverses half its batches): if the pump ran first, one
                # more round lets them queue their frames now, instead of
                # cancelling the pump's sleep on the socket a moment later
                # (two epoll_ctl, a cancel and a new scope).
                waited = True
                await trio.lowlevel.checkpoint()
            elif self.paused and not self._out:
                # Nothing to write and not reading: sleep until woken.
                self._busy = False
                await trio.sleep_forever()
            else:
                self._busy = False
                session = self.session
                directions = session.block_directions() if session is not None else 0
                # Not inside libssh2 while parked: a caller may write.
                self._parked = not self._out and not (directions & LIBSSH2_SESSION_BLOCK_OUTBOUND)
                try:
                    if self._parked:
                        if self._io is not None:
                            # A wait a lone caller may take over
                            # (wait_answer; "The lone caller").
                            await self._park()
                        else:
                            # _wait_for's common case, one coroutine frame
                            # less to resume per wake-up.
                            await trio.lowlevel.wait_readable(self.sock)
                    else:
                        await self._wait_for(directions)
                finally:
                    self._parked = False

    def _write_burst(self, channel: Any) -> bool:
        """``_turns``' write: offer the head of the outgoing buffer in
        slices of ``WRITE_SLICE`` while the channel takes whole slices, up
        to ``WRITE_BURST`` bytes (a large frame: one read and one scheduler
        round per burst, not per 32 KiB packet; libssh2's write drains the
        socket's inbound packets itself, window adjusts included).  True if
        bytes were taken and another turn is due.  Raises ``ConnectionLost`` for a write error."""
        out = self._out
        sent = 0
        while True:
            rc, n = channel.write(bytes(out[:WRITE_SLICE]))
            if n > 0:
                del out[:n]
                sent += n
            elif rc < 0 and rc != EAGAIN:
                raise ConnectionLost(f"channel write failed (libssh2 error {rc})")
            if rc < 0 or n < WRITE_SLICE or not out or sent >= WRITE_BURST:
                break
        if not sent:
            return False
        self.bytes_sent += sent
        if len(out) < self.write_limit:
            self._room.set()
        # Another turn if there is more to write, or writers may wait for
        # room (the queue was full); a write that emptied a short queue
        # needs none: the read that follows takes whatever it pulled off
        # the socket.
        return bool(out) or sent >= self.write_limit

    @staticmethod
    def _read_stderr(channel: Any) -> None:
        rc, data = channel.read_stderr(READ_SIZE)
        if rc > 0:
            for line in data.decode("utf-8", "replace").splitlines():
                log.warning("server stderr: %s", line)

    # -- the lone caller (module docstring, "The lone caller") ---------------

    async def _park(self) -> None:
        """The pump's sleep on the socket for inbound packets (``_turns``):
        Trio's ``wait_readable``, written out on Trio's epoll registration
        so that ``wait_answer`` can lend the wait to a caller and take it
        back without a system call.  Returns when the socket is readable
        or on ``wake()``; reclaims the socket from a lone caller first."""
        io, fd, task = self._io, self._fd, self._task
        waiters = io._registered[fd]
        if waiters.read_task is not None:
            raise trio.BusyResourceError("another task is already reading this socket")
        waiters.read_task = task
        io._update_registrations(fd)
        self._in_park = True
        try:
            await trio.lowlevel.wait_task_rescheduled(self._park_abort)
        finally:
            self._in_park = False
            if self._lone is not None:
                self._reclaim()

    def _park_abort(self, _: Any) -> trio.lowlevel.Abort:
        # wake() (or the run's cancel) interrupts the park; a lone caller
        # keeps the registration until the pump takes it back (_reclaim).
        self._in_park = False
        waiters = self._io._registered.get(self._fd)
        if waiters is not None and waiters.read_task is self._task:
            waiters.read_task = None
            self._io._update_registrations(self._fd)
        return trio.lowlevel.Abort.SUCCEEDED

    def _reclaim(self) -> None:
        """The pump task runs again (its park ended): it takes the socket
        back from the lone caller.  A caller still parked becomes an
        ordinary waiter on its request (woken by the answer's dispatch);
        one the socket already woke finds out when it runs."""
        lone = self._lone
        assert lone is not None
        self._lone = None
        waiters = self._io._registered.get(self._fd)
        if waiters is not None and waiters.read_task is lone.task:
            waiters.read_task = None
            self._io._update_registrations(self._fd)
            lone.converted = True
            if lone.req.done:
                # Finished while its waiter slept on the socket (a request
                # set emptied or answered from elsewhere): nothing more
                # will reschedule it.
                trio.lowlevel.reschedule(lone.task)
            else:
                lone.req._task = lone.task

    def _lend_back(self) -> None:
        """The lone caller is done with the socket: the parked pump waits
        on it again (re-armed: the socket's readiness was used up)."""
        if self._in_park:
            io, fd = self._io, self._fd
            waiters = io._registered[fd]
            waiters.read_task = self._task
            io._update_registrations(fd)

    async def wait_answer(self, req: Any) -> bool | None:
        """Wait in the calling task until ``req.done`` (a request whose frame
        the caller has just written itself: ``send_nowait`` answered True),
        reading the channel in this task while the pump sleeps: one
        scheduler round and one task step per sequential call instead of
        two (module docstring, "The lone caller").

        Returns None at once (nothing done: wait as usual) when the pump is
        not parked on the socket, lanes exist or the shortcut is off; else,
        once ``req`` is done, whether it was finished by a dispatch that
        woke this task (counted as woken by the connection) rather than
        read here.  ``req`` needs ``done`` and ``_task`` (the task a
        dispatch reschedules).  If cancelled, the socket wait is back with
        the pump before ``Cancelled`` propagates, and nothing read is lost
        (what this task read was dispatched).
        """
        if not self._in_park or self._lone is not None or self._multi or self.error is not None:
            return None
        io, fd = self._io, self._fd
        task = trio.lowlevel.current_task()
        lone = _Lone(self, task, req)
        while True:
            waiters = io._registered.get(fd)
            if waiters is None or waiters.read_task is not self._task:
                break  # (not the pump's wait: leave it alone)
            waiters.read_task = task  # (still armed: no system call)
            self._lone = lone
            await trio.lowlevel.wait_task_rescheduled(lone.abort)
            if self._lone is not lone:
                # The pump took the socket back while this task slept (it
                # was then woken by the dispatch) or was already woken.
                if lone.converted or req.done:
                    return lone.converted
                break
            self._lone = None
            # The socket woke this task, and the pump is parked or at
            # least not inside libssh2: read as its turn would.
            if not self._lone_read():
                self.wake()  # anything unusual: the pump's turn sees to it
                if req.done:
                    return False
                break
            if req.done:
                self._lend_back()
                return False
            if not self._in_park:
                break  # woken meanwhile: the pump looks itself
            self._lend_back()
        # An ordinary wait (the pump reads).
        if req.done:
            await trio.lowlevel.checkpoint()
            return False
        req._task = task
        await trio.lowlevel.wait_task_rescheduled(req._abort)
        return True

    def _lone_read(self) -> bool:
        """One read of the channel by the lone caller, as the pump's turn
        reads; False when the pump must look (not reading, EOF, error,
        more queued inside libssh2, a packet half sent)."""
        channel = self.channel
        session = self.session
        if channel is None or session is None or self.error is not None:
            return False
        should_read = self._should_read
        if should_read is None or not should_read():
            return False
        try:
            rc, data = channel.read(READ_SIZE)
        except ssh2_exc.SSH2Error as exc:
            self.fail(ConnectionLost(f"SSH connection failed: {type(exc).__name__} {exc}"))
            return False
        if rc > 0:
            self.bytes_received += rc
            on_data = self._on_data
            assert on_data is not None
            on_data(data)
            if rc == READ_SIZE or channel.poll_channel_read(1) or channel.eof():
                return False
        elif rc != EAGAIN:
            return False
        return not (
            self.error is not None
            or self._out
            or session.block_directions() & LIBSSH2_SESSION_BLOCK_OUTBOUND
        )

    # -- many channels (module docstring, "Many channels") ---------------------

    async def open_lane(self) -> Lane:
        """Open one more session channel on this SSH connection and request
        ``self.subsystem`` on it; return it as a ``Lane`` whose bytes this
        pump moves.  The pump task makes the libssh2 calls; the caller waits.

        A checkpoint.  Raises ``ChannelRefused`` (sshd refused the channel
        or the subsystem: this connection is unaffected) or
        ``ConnectionLost`` (the connection ended).  If cancelled, the
        channel is closed again by the pump once it is open.
        """
        if self.error is not None or self.closing:
            raise self._lost()
        lane = Lane(self)
        op = _LaneOp(_OPEN, lane)
        self._add_op(op)
        try:
            await op.done.wait()
        except BaseException:
            op.abandoned = True
            if op.done.is_set() and op.error is None:
                # The pump finished the open after the cancel was delivered
                # but before this task ran: close it here instead.
                lane.fail(ConnectionLost("open_channel was cancelled"))
                self._add_op(_LaneOp(_CLOSE, lane))
            raise
        if op.error is not None:
            raise op.error
        return lane

    def _add_op(self, op: _LaneOp) -> None:
        self._ops.append(op)
        self._multi = True
        # The pump looks again before any caller writes on its own.
        self._parked = False
        self.wake()

    def _end_lanes(self, error: BaseException) -> None:
        """The connection ended: every lane and pending open/close ends."""
        lost = ConnectionLost(f"the SSH connection ended ({error})")
        for lane in self._lanes:
            lane.fail(lost)
        ops, self._ops = self._ops, deque()
        for op in ops:
            if op.error is None and op.kind == _OPEN:
                op.error = lost
            op.lane.fail(lost)
            op.done.set()

    async def _lane_turns(self) -> None:
        """The pump's loop while there are more channels than ours: the
        same three steps as ``_turns`` for every channel ("ends": ours and
        the lanes), plus the opens and closes, one at a time.  Returns when
        no lane and no operation is left.  Errors of our own channel raise
        (they end the connection); a lane's end only that lane."""
        session = self.session
        assert session is not None
        if self._owner is None and session.block_directions() & LIBSSH2_SESSION_BLOCK_OUTBOUND:
            # Coming from the single-channel loop (or a caller's direct
            # write) with a packet half sent: it can only be ours.
            self._owner = (self, _WRITE if self._out else _READ)
        while self.error is None and (self._lanes or self._ops):
            if self._fresh:
                # Frames were queued: let the queueing tasks finish first.
                self._fresh = False
                await trio.lowlevel.checkpoint()
            self._wake_pending = False
            progress = False
            if self._owner is not None:
                progress = self._retry_owner(session)
            if self._owner is None and self._ops:
                progress = self._advance_op(session) or progress
            ends: list[Any] = [self, *self._lanes]
            for end in ends:
                if end._out and end.channel is not None and end.error is None:
                    progress = self._write_end(session, end) or progress
            reading: list[Any] = []
            for end in ends:
                if end.error is not None or end.channel is None or end._should_read is None:
                    continue
                if not end._should_read():
                    end.paused = True
                    continue
                end.paused = False
                reading.append(end)
                progress = self._read_end(session, end) or progress
            if not progress and self._owner is None:
                # A later read may have pulled an earlier channel's packets
                # into libssh2's queue: look before sleeping (lost wake-ups).
                for end in reading:
                    if end.error is not None:
                        continue
                    channel = end.channel
                    if channel.poll_channel_read(1):
                        self._read_stderr(channel)
                        progress = True
                    elif channel.eof():
                        self._end_of(end, ConnectionLost("the server closed the channel"))
                        progress = True
            if progress:
                await trio.lowlevel.checkpoint()
            elif (
                self._owner is None
                and not self._ops
                and not reading
                and not any(end._out for end in ends if end.error is None)
            ):
                await trio.sleep_forever()  # nothing to do until woken
            else:
                await self._wait_for(session.block_directions())
        self._multi = bool(self._lanes or self._ops)
        if not self._multi:
            # Only our channel is left (a half-sent packet can only be
            # ours now), and the single-channel loop repeats its calls.
            self._owner = None

    def _end_of(self, end: Any, error: ConnectionLost) -> None:
        """``end``'s channel ended: ours ends the connection, a lane itself."""
        if end is self:
            raise error
        end.fail(error)

    def _note_owner(self, session: Session, end: Any, kind: int) -> None:
        """After a call of ``end``'s that answered EAGAIN: if libssh2 now
        holds a half-sent packet and nobody owned one before, it is
        ``end``'s (see "Many channels")."""
        if self._owner is None and session.block_directions() & LIBSSH2_SESSION_BLOCK_OUTBOUND:
            self._owner = (end, kind)

    def _write_end(self, session: Session, end: Any) -> bool:
        channel = end.channel
        owner = self._owner
        if owner is not None and owner[0] is not end and channel.window_write() <= 0:
            # libssh2 would answer "no window" by setting the session's
            # block directions to inbound only, hiding the half-sent packet.
            return False
        try:
            rc, n = channel.write(bytes(end._out[:WRITE_SLICE]))
        except ssh2_exc.SSH2Error as exc:
            if end is self:
                raise
            end.fail(ConnectionLost(f"channel write failed: {type(exc).__name__} {exc}"))
            return True
        progress = False
        if n > 0:
            del end._out[:n]
            end.bytes_sent += n
            progress = True
            if len(end._out) < end.write_limit:
                end._room.set()
        if rc == EAGAIN:
            self._note_owner(session, end, _WRITE)
        elif rc < 0:
            self._end_of(end, ConnectionLost(f"channel write failed (libssh2 error {rc})"))
            progress = True
        return progress

    def _read_end(self, session: Session, end: Any) -> bool:
        channel = end.channel
        try:
            rc, data = channel.read(READ_SIZE)
        except ssh2_exc.SSH2Error as exc:
            if end is self:
                raise
            end.fail(ConnectionLost(f"channel read failed: {type(exc).__name__} {exc}"))
            return True
        if rc > 0:
            end.bytes_received += rc
            end._on_data(data)
            return True
        if rc == EAGAIN:
            self._note_owner(session, end, _READ)
            return False
        if channel.eof():
            self._end_of(end, ConnectionLost("the server closed the channel"))
            return True
        if rc < 0:
            self._end_of(end, ConnectionLost(f"channel read failed (libssh2 error {rc})"))
            return True
        return False

    def _retry_owner(self, session: Session) -> bool:
        """Repeat the call that left a packet half sent (before any other
        call that sends), whatever the state of its channel: paused,
        failed or closing.  True if it got further."""
        assert self._owner is not None
        end, kind = self._owner
        self._owner = None
        progress = False
        try:
            if kind == _OP:
                return self._advance_op(session)
            channel = end.channel
            if kind == _WRITE and end._out:
                rc, n = channel.write(bytes(end._out[:WRITE_SLICE]))
                if n > 0:
                    del end._out[:n]
                    end.bytes_sent += n
                    end._room.set()
                    progress = True
            else:
                rc, data = channel.read(READ_SIZE)
                if rc > 0:
                    end.bytes_received += rc
                    if end.error is None and end._on_data is not None:
                        end._on_data(data)
                    progress = True
        except ssh2_exc.SSH2Error as exc:
            if end is self:
                raise
            end.fail(ConnectionLost(f"channel failed: {type(exc).__name__} {exc}"))
            return True
        if rc == EAGAIN and session.block_directions() & LIBSSH2_SESSION_BLOCK_OUTBOUND:
            self._owner = (end, kind)
        return progress

    def _advance_op(self, session: Session) -> bool:
        """One step of the oldest channel open or close (libssh2 opens one
        channel at a time per session).  True if it finished a step."""
        op = self._ops[0]
        lane = op.lane
        try:
            if op.kind == _OPEN:
                if lane.channel is None:
                    channel = session.open_session()
                    if channel == EAGAIN or channel is None:
                        self._note_owner(session, op, _OP)
                        return False
                    lane.channel = channel
                if not op.step:
                    rc = lane.channel.subsystem(self.subsystem)
                    if rc == EAGAIN:
                        self._note_owner(session, op, _OP)
                        return False
                    op.step = 1
                window = self.window
                if window is not None and lane.channel.window_read() < window:
                    # The connection's ``window=`` for this channel too.
                    grow = window - lane.channel.window_read()
                    if lane.channel.receive_window_adjust2(grow, True) == EAGAIN:
                        self._note_owner(session, op, _OP)
                        return False
                self._lanes.append(lane)
                self.lanes_opened += 1
                if op.abandoned:
                    # Nobody waits for it any more: close it again.
                    lane.fail(ConnectionLost("open_channel was cancelled"))
                    op.kind = _CLOSE
                    return True
            else:
                if lane.channel is not None:
                    rc = lane.channel.close()
                    if rc == EAGAIN:
                        self._note_owner(session, op, _OP)
                        return False
                self._drop_lane(lane)
        except ssh2_exc.SSH2Error as exc:
            if op.kind == _OPEN:
                what = "channel" if lane.channel is None else f"{self.subsystem!r} subsystem"
                op.error = ChannelRefused(
                    f"the server refused a new {what} ({type(exc).__name__}"
                    + (f": {exc}" if str(exc) else "")
                    + "): sshd's MaxSessions, or the connection is going away"
                )
                lane.fail(op.error)
                if lane.channel is not None:
                    # Close what was opened; the waiter hears the error now.
                    op.done.set()
                    op.kind = _CLOSE
                    return True
            else:
                self._drop_lane(lane)
        self._ops.popleft()
        op.done.set()
        return True

    def _drop_lane(self, lane: Lane) -> None:
        if lane in self._lanes:
            self._lanes.remove(lane)
        lane.channel = None  # (the owner never gets here: ops wait for it)

    async def aclose(self) -> None:
        """Close the channel and session, then the socket.  Idempotent: a
        second caller waits until the first has finished.

        Called after the pump task has stopped.  Best effort: the channel
        close and SSH disconnect are bounded by ``CLOSE_TIMEOUT`` and shielded
        from cancellation so that the socket is always closed last.
        """
        if self.closed:
            await self._close_done.wait()
            return
        self.closed = True
        self.closing = True
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            scope.shield = True
            try:
                if self.channel is not None and self.session is not None:
                    await self.retry(self.channel.close)
                if self.session is not None:
                    await self.retry(self.session.disconnect)
            except (ssh2_exc.SSH2Error, OSError):
                pass
        # Free the session (restoring the fd's blocking mode) while the fd is
        # still ours, and only then close the socket (see module docstring).
        # The lanes' channels hold the session too: drop them first.
        self._end_lanes(self.error or ConnectionLost("the connection was closed"))
        for lane in self._lanes:
            lane.channel = None
        self._lanes.clear()
        self.channel = None
        self.session = None
        self.sock.close()
        self._close_done.set()


class _Lone:
    """A caller waiting on the pump's socket itself (``Pump.wait_answer``)."""

    __slots__ = ("converted", "pump", "req", "task")

    def __init__(self, pump: Pump, task: trio.lowlevel.Task, req: Any) -> None:
        self.pump = pump
        self.task = task
        self.req = req
        #: The pump took the socket back while the caller slept: the caller
        #: now waits as ``req._task``, woken by the answer's dispatch.
        self.converted = False

    def abort(self, _: Any) -> trio.lowlevel.Abort:
        """The caller is cancelled while it sleeps: the socket wait goes
        back to the pump (still parked: no system call), or is dropped if
        the pump is awake (it registers again when it parks)."""
        pump = self.pump
        if pump._lone is self:
            pump._lone = None
            io, fd = pump._io, pump._fd
            waiters = io._registered.get(fd)
            if waiters is not None and waiters.read_task is self.task:
                if pump._in_park:
                    waiters.read_task = pump._task
                else:
                    waiters.read_task = None
                    io._update_registrations(fd)
        self.req._task = None
        return trio.lowlevel.Abort.SUCCEEDED


#: ``_LaneOp`` kinds, and what the half-sent packet's owner was doing.
_OPEN, _CLOSE = 1, 2
_WRITE, _READ, _OP = 1, 2, 3


class _LaneOp:
    """A channel open (session channel + subsystem) or close, for the pump
    task to make; ``done`` is set when it is over (``error`` if it failed)."""

    __slots__ = ("abandoned", "done", "error", "kind", "lane", "step")

    def __init__(self, kind: int, lane: Lane) -> None:
        self.kind = kind
        self.lane = lane
        self.done = trio.Event()
        self.error: BaseException | None = None
        #: The opener was cancelled: close the channel once it is open.
        self.abandoned = False
        #: An open whose subsystem request is done (1).
        self.step = 0


class Lane(_Sending):
    """One more channel on a ``Pump``'s SSH connection (``Pump.open_lane``).

    Offers what a ``Connection`` uses of a ``Pump`` (``send``,
    ``send_nowait``, ``run``, ``fail``, ``aclose``, ``wake``, the counters),
    so a ``Connection`` can run on a lane as on a pump; the lane's bytes are
    moved by the pump's task (``Pump._lane_turns``), never by its own.
    ``fail`` and ``aclose`` end this channel only.
    """

    _what = "channel"
    #: A lane lends no socket wait (``Pump.wait_answer``): never parked.
    _in_park = False

    def __init__(self, pump: Pump) -> None:
        self.pump = pump
        self.channel: Any = None
        self._out = bytearray()
        self.write_limit = pump.write_limit
        self._room = trio.Event()
        self.error: BaseException | None = None
        self.closing = False
        self.closed = False
        self.paused = False
        self.bytes_sent = 0
        self.bytes_received = 0
        self._on_data: Callable[[bytes], object] | None = None
        self._should_read: Callable[[], bool] | None = None
        self._done = trio.Event()
        self._close_done = trio.Event()

    @property
    def queued_bytes(self) -> int:
        """Bytes accepted by ``send`` but not yet by the channel."""
        return len(self._out)

    def wake(self) -> None:
        """Make the pump task look at this lane again."""
        self.pump.wake()

    def _queued(self) -> None:
        self.pump._fresh = True
        self.pump.wake()

    def send_nowait(self, data: bytes | bytearray, direct: bool = False) -> bool:
        """Queue ``data`` for the pump to write (``direct`` is ignored: a
        lane never writes from the caller's task, so this returns False).
        Raises ``ConnectionLost`` if this channel has ended."""
        if self.error is not None:
            raise self._lost()
        self._out += data
        self.pump._fresh = True
        self.pump.wake()
        return False

    async def wait_answer(self, req: Any) -> bool | None:
        """As ``Pump.wait_answer``; a lane's answers are always read by the
        pump task: None (not a checkpoint)."""
        return None

    def fail(self, error: BaseException) -> None:
        """End this channel (first error wins) and wake its waiters."""
        if self.error is None:
            self.error = error
        self._room.set()
        self._done.set()
        self.pump.wake()

    async def run(
        self,
        on_data: Callable[[bytes], object],
        should_read: Callable[[], bool],
        on_eof: Callable[[BaseException], None],
    ) -> None:
        """As ``Pump.run`` for this channel: the pump task calls ``on_data``
        and ``should_read``; this task waits until the channel ends and
        then calls ``on_eof(error)`` once (also when cancelled)."""
        self._on_data, self._should_read = on_data, should_read
        self.pump.wake()
        try:
            await self._done.wait()
        finally:
            if self.error is None:
                self.fail(ConnectionLost("the channel was closed"))
            assert self.error is not None
            on_eof(self.error)

    async def aclose(self) -> None:
        """Close this channel (the SSH connection stays).  Idempotent;
        bounded by ``CLOSE_TIMEOUT`` and shielded from cancellation."""
        if self.closed:
            await self._close_done.wait()
            return
        self.closed = True
        self.closing = True
        self.fail(ConnectionLost("the channel was closed"))
        pump = self.pump
        if self.channel is not None and pump.error is None and not pump.closing:
            op = _LaneOp(_CLOSE, self)
            pump._add_op(op)
            with trio.move_on_after(CLOSE_TIMEOUT) as scope:
                scope.shield = True
                await op.done.wait()
        self._close_done.set()


async def connect_socket(host: str, port: int) -> trio.socket.SocketType:
    """A TCP connection to ``host:port`` with TCP_NODELAY set (Nagle costs
    tens of milliseconds during SSH set-up).  A checkpoint; raises
    ``OSError`` (e.g. ``ConnectionRefusedError``, ``socket.gaierror``)."""
    infos = await trio.socket.getaddrinfo(host, port, type=_stdsocket.SOCK_STREAM)
    if not infos:
        raise OSError(f"no address for {host}")
    last: OSError | None = None
    for family, type_, proto, _, addr in infos:
        sock = trio.socket.socket(family, type_, proto)
        try:
            sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
            await sock.connect(addr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    assert last is not None
    raise last
