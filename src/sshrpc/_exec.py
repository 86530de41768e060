"""Exec mode: ``ssh HOST 'lists:reverse([1,2,3]).'`` from a plain OpenSSH client.

The original sshrpc's second door.  sshd runs the relay (the key's forced
command) for an exec request too; the relay sends the command in its header
(``SRLY`` ... ``NUL "exec" NUL COMMAND``, at most ``MAX_COMMAND`` bytes are
accepted) and waits for one framed answer:

    answer = b"SRLX" STATUS(1 byte) OUTLEN(4, big-endian) ERRLEN(4) OUT ERR

which it copies to its stdout and stderr before exiting with ``STATUS``.

The command is decoded strictly as UTF-8 and **parsed**, never evaluated:

    command = ["etf" WS] Module ":" Function "(" Args ")" "."

``Module`` and ``Function`` are atoms (plain or quoted, at most 255
characters), ``Args`` zero or more Erlang term literals (``sshrpc._literal``:
its nesting and atom limits apply).  Nothing may follow the final dot but
white space.

The call then runs through the node's ordinary call path: a private channel
(``Node.serve_channel`` on a socket pair) to which this module talks as a
sans-io client (hello, one ``call``), so policy, the audit line, ``max_calls``,
worker threads and answer-size limits are those of a subsystem call.  If the
SSH client goes away (the relay closes its socket) the call is cancelled.

Output: the result as Erlang text (``format_term``) and a newline on stdout,
exit status 0.  An error: one line on stderr and a status from
``EXIT_STATUSES``.  With the leading word ``etf``, stdout holds one frame
(4-byte length, ETF payload) ``{answer, {Result, 0}}``, or for an error
``{answer, {{exec_badrpc, Reason}, -1}}`` (``{exec_error, <<"message">>}``
for a command that does not parse), as the original's legacy answers; the
exit status and the stderr line are the same as in text mode.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
from dataclasses import dataclass
from typing import Any

import trio

from . import protocol as _p
from ._codec import encode_frame
from ._errors import ProtocolError
from ._literal import LiteralError, _Parser, format_term, parse
from ._types import Atom
from .policy import KeyIdentity

__all__ = [
    "EXIT_STATUSES",
    "MAX_COMMAND",
    "CommandError",
    "ExecCommand",
    "ExecOutcome",
    "answer_bytes",
    "parse_command",
    "run_exec",
    "serve_exec",
]

log = logging.getLogger("sshrpc.node")

#: Longest exec command accepted, in bytes (the relay sends one byte more at
#: most, so that an overlong one is seen as such).
MAX_COMMAND = 8192

#: Exit status per outcome.  1 and 2 are the relay's own (cannot reach the
#: node; usage), 3 the relay's refusal of a shell request.
OK = 0
RELAY_FAILED = 1
USAGE = 2
REFUSED = 3
BAD_COMMAND = 4
FORBIDDEN = 5
UNDEF = 6
RAISED = 7
TIMEOUT = 8
UNAVAILABLE = 9
FAILED = 10

EXIT_STATUSES: dict[str, int] = {
    "ok": OK,
    "relay failed (node unreachable, no answer)": RELAY_FAILED,
    "relay usage": USAGE,
    "refused request (shell, no command)": REFUSED,
    "bad command (not UTF-8, too long, not one Module:Function(Args).)": BAD_COMMAND,
    "forbidden (the policy does not expose it)": FORBIDDEN,
    "undef (no such function or arity)": UNDEF,
    "the function raised (error, exit, throw)": RAISED,
    "timeout or cancelled": TIMEOUT,
    "overload or shutting_down (try again later)": UNAVAILABLE,
    "any other failure (too_large, badarg, notsup, channel error)": FAILED,
}

_BY_REASON = {
    "forbidden": FORBIDDEN,
    "undef": UNDEF,
    "timeout": TIMEOUT,
    "cancelled": TIMEOUT,
    "overload": UNAVAILABLE,
    "shutting_down": UNAVAILABLE,
}

_ATOM = r"(?:[a-z][a-zA-Z0-9_@]*|'(?:[^'\\]|\\.)*')"
_COMMAND = re.compile(
    rf"\s*(?:(?P<etf>etf)\s+)?(?P<m>{_ATOM})\s*:\s*(?P<f>{_ATOM})\s*\((?P<args>.*)\)\s*\.\s*",
    re.DOTALL,
)


class CommandError(ValueError):
    """An exec command that is not one ``Module:Function(Args).``; the
    message says why, in one line."""


@dataclass(frozen=True)
class ExecCommand:
    """A parsed exec command."""

    module: Atom
    function: Atom
    args: list[Any]
    etf: bool = False


@dataclass(frozen=True)
class ExecOutcome:
    """What the relay writes and the status it exits with."""

    status: int
    stdout: bytes = b""
    stderr: bytes = b""


def _atom_name(text: str) -> Atom:
    value = parse(text)
    # parse() maps true/false/undefined to Python values; they are atoms here.
    if value is True or value is False or value is None:
        return Atom(text.strip("'"))
    if not isinstance(value, Atom):  # pragma: no cover - the pattern allows atoms only
        raise CommandError(f"{text!r} is not an atom")
    return value


def _arguments(text: str) -> list[Any]:
    """Zero or more comma-separated term literals, and nothing else."""
    parser = _Parser(text)
    args: list[Any] = []
    if parser.peek() is None:
        return args
    args.append(parser.term(1))
    while parser.at(","):
        parser.take()
        args.append(parser.term(1))
    if parser.peek() is not None:
        raise parser.error("unexpected text after the arguments")
    return args


def parse_command(raw: bytes) -> ExecCommand:
    """Parse an exec command; ``CommandError`` says what is wrong.  Never
    evaluates anything."""
    if len(raw) > MAX_COMMAND:
        raise CommandError(f"command longer than {MAX_COMMAND} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CommandError(f"command is not UTF-8 (byte {exc.start})") from None
    match = _COMMAND.fullmatch(text)
    if match is None:
        if text.rstrip().endswith(")"):
            raise CommandError("end the call with a '.': Module:Function(Args).")
        raise CommandError(
            "expected one call Module:Function(Args). such as 'lists:reverse([1,2,3]).'"
        )
    try:
        module = _atom_name(match["m"])
        function = _atom_name(match["f"])
        args = _arguments(match["args"])
    except LiteralError as exc:
        raise CommandError(f"bad arguments: {exc}") from None
    except RecursionError:
        raise CommandError("bad arguments: nested too deeply") from None
    return ExecCommand(module, function, args, etf=match["etf"] is not None)


def _line(text: str) -> bytes:
    return (" ".join(text.split()) + "\n").encode("utf-8", "replace")


def _error_outcome(
    command: ExecCommand | None, status: int, message: str, badrpc: Any
) -> ExecOutcome:
    stdout = b""
    if command is not None and command.etf:
        stdout = encode_frame((Atom("answer"), (badrpc, -1)))
    return ExecOutcome(status, stdout, _line(f"sshrpc: {message}"))


def _answer_outcome(command: ExecCommand, event: _p.Event) -> ExecOutcome:
    name = f"{command.module}:{command.function}/{len(command.args)}"
    if isinstance(event, _p.Reply):
        if command.etf:
            return ExecOutcome(OK, encode_frame((Atom("answer"), (event.value, 0))))
        return ExecOutcome(OK, (format_term(event.value) + "\n").encode("utf-8"))
    if isinstance(event, _p.ErrorReply):
        cls, reason = str(event.cls), event.reason
        if cls == "sshrpc":
            status = _BY_REASON.get(str(reason), FAILED)
            badrpc: Any = reason
        else:
            status = RAISED
            badrpc = (event.cls, reason)
        message = ""
        if isinstance(event.details, dict):
            text = event.details.get(Atom("message"))
            if isinstance(text, bytes):
                message = f" ({text.decode('utf-8', 'replace')})"
        return _error_outcome(
            command,
            status,
            f"{name} failed: {cls} {format_term(reason)}{message}",
            (Atom("exec_badrpc"), badrpc),
        )
    reason = event.reason if isinstance(event, _p.Bye) else Atom("closed")
    return _error_outcome(
        command,
        UNAVAILABLE if reason == Atom("shutting_down") else FAILED,
        f"{name} failed: the node ended the call ({format_term(reason)})",
        (Atom("exec_badrpc"), reason),
    )


async def _call(
    node: Any, command: ExecCommand, key: KeyIdentity, peer: str, gone: trio.Event
) -> _p.Event:
    """One call over a private channel of ``node``; the final answer (or the
    node's bye).  When ``gone`` is set the call is cancelled (``cancel``
    frame), and its answer is still awaited, so the node audits it."""
    ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = trio.SocketStream(ours)
    conn = _p.Connection(_p.Role.CLIENT, max_frame=node.max_frame)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.serve_channel, trio.SocketStream(theirs), key, peer)
        try:
            call = _p.Call(
                id=1, module=command.module, function=command.function, args=command.args
            )
            await stream.send_all(conn.send(conn.hello()) + conn.send(call))

            async def cancel_when_gone() -> None:
                await gone.wait()
                await stream.send_all(conn.send(_p.Cancel(id=1)))

            nursery.start_soon(cancel_when_gone)
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return _p.Bye(reason=Atom("closed"))
                conn.receive_data(data)
                while (event := conn.next_event()) is not _p.NEED_DATA:
                    if event is _p.CLOSED:
                        return _p.Bye(reason=Atom("closed"))
                    if isinstance(event, _p.Reply | _p.ErrorReply | _p.Bye):
                        return event
        except ProtocolError as exc:  # pragma: no cover - our own node misbehaving
            return _p.Bye(reason=Atom(f"protocol_error: {exc}"))
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await stream.aclose()
    raise AssertionError("unreachable")  # pragma: no cover


async def run_exec(
    node: Any, raw: bytes, key: KeyIdentity, peer: str = "", gone: trio.Event | None = None
) -> ExecOutcome:
    """Parse and run one exec command on ``node``; never raises for bad
    input.  ``gone`` (set when the SSH client went away) cancels the call.
    Cancelling this cancels the call's channel (no audit line then)."""
    try:
        command = parse_command(raw)
    except CommandError as exc:
        etf = raw.lstrip()[:4] in (b"etf ", b"etf\t", b"etf\n")
        message = str(exc)
        return ExecOutcome(
            BAD_COMMAND,
            encode_frame((Atom("answer"), ((Atom("exec_error"), message.encode()), -1)))
            if etf
            else b"",
            _line(f"sshrpc: bad command: {message}"),
        )
    event = await _call(node, command, key, peer, gone if gone is not None else trio.Event())
    return _answer_outcome(command, event)


def answer_bytes(outcome: ExecOutcome) -> bytes:
    """The relay's framed answer: ``SRLX STATUS OUTLEN ERRLEN OUT ERR``."""
    return (
        b"SRLX"
        + bytes([outcome.status & 0xFF])
        + len(outcome.stdout).to_bytes(4, "big")
        + len(outcome.stderr).to_bytes(4, "big")
        + outcome.stdout
        + outcome.stderr
    )


async def serve_exec(
    node: Any, stream: trio.abc.Stream, raw: bytes, key: KeyIdentity, peer: str
) -> None:
    """Answer one relay's exec request on ``stream`` (the relay's socket,
    after its header).  Anything the relay sends after the header, or EOF,
    means the client is gone: the call is cancelled."""
    gone = trio.Event()
    outcome: ExecOutcome | None = None

    async def watch() -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.receive_some(1)
        gone.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        outcome = await run_exec(node, raw, key, peer, gone)
        nursery.cancel_scope.cancel()
    log.info("exec from %s key %s: exit status %d", peer or "-", key, outcome.status)
    if not gone.is_set():
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(answer_bytes(outcome))
