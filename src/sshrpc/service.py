"""Python functions -> callable RPC services: the registry.  No I/O.

A ``Service`` is a named module of exported functions, as an Erlang module is
a named set of exported functions.  ``@svc.export`` exposes a function under
its name; nothing else in the service is reachable.

- A plain ``def`` is a *sync* function: the node runs it in a worker thread
  (bounded in number), so it cannot block the node's event loop.
- ``@svc.export(inline=True)`` on a plain ``def`` runs it directly on the
  node's loop: the fastest path, for short pure functions only (see
  ``Service.export``).
- An ``async def`` runs on the node's Trio loop.
- An ``async def`` containing ``yield`` (an async generator) is a *stream*
  function: a ``stream => true`` call gets one ``chunk`` per item it yields,
  then ``{reply, Id, done}``; a plain call gets the list of all items.

A function answers with its return value.  To answer with an exact Erlang
error it raises ``sshrpc.Error(Reason)``, ``sshrpc.Exit(Reason)`` or
``sshrpc.Throw(Value)``; any other exception becomes class ``error`` with
reason ``{'ExceptionClassName', <<"message">>}`` (``error_term``).
"""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, overload

from ._errors import _Raised
from ._types import Atom

__all__ = ["Exported", "Service", "error_term", "flatten_services"]

F = TypeVar("F", bound=Callable[..., Any])

Kind = Literal["sync", "async", "stream"]


@dataclass(frozen=True, slots=True)
class Exported:
    """One exported function: ``service:name/arity`` for each arity in
    ``min_arity..max_arity`` (``max_arity`` is ``None`` for ``*args``)."""

    service: str
    name: str
    fn: Callable[..., Any]
    kind: Kind
    min_arity: int
    max_arity: int | None
    #: A sync function run on the node's loop (``export(inline=True)``).
    inline: bool = False

    def accepts(self, arity: int) -> bool:
        """True when the function can be called with ``arity`` arguments."""
        return arity >= self.min_arity and (self.max_arity is None or arity <= self.max_arity)

    @property
    def arity_text(self) -> str:
        if self.max_arity == self.min_arity:
            return str(self.min_arity)
        upper = "" if self.max_arity is None else str(self.max_arity)
        return f"{self.min_arity}..{upper}"


def _arity(fn: Callable[..., Any]) -> tuple[int, int | None]:
    lowest = 0
    highest: int | None = 0
    for param in inspect.signature(fn).parameters.values():
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            assert highest is not None
            highest += 1
            if param.default is param.empty:
                lowest += 1
        elif param.kind is param.VAR_POSITIONAL:
            highest = None
        elif param.kind is param.KEYWORD_ONLY and param.default is param.empty:
            raise TypeError(
                f"{fn.__qualname__}: keyword-only parameter {param.name!r} has no default; "
                "RPC arguments are positional"
            )
    return lowest, highest


class Service:
    """A named module of exported functions.

    >>> calc = Service("calc")
    >>> @calc.export
    ... def add(a, b):
    ...     return a + b

    The name must be an atom (1..255 characters).  Exporting a second
    function under a name already taken raises ``ValueError``.
    """

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not 0 < len(name) <= 255:
            raise ValueError(f"a service name is 1..255 characters, not {name!r}")
        if name == "sshrpc":
            raise ValueError(
                "the service name 'sshrpc' is reserved for the node's built-ins "
                "(sshrpc:exports/0); choose another"
            )
        self.name = Atom(name)
        self.functions: dict[str, Exported] = {}

    @overload
    def export(self, fn: F, /) -> F: ...

    @overload
    def export(
        self, fn: None = None, /, *, name: str | None = None, inline: bool = False
    ) -> Callable[[F], F]: ...

    def export(
        self, fn: F | None = None, /, *, name: str | None = None, inline: bool = False
    ) -> F | Callable[[F], F]:
        """Decorator: expose ``fn`` as ``service:name`` (default: its ``__name__``).

        Returns ``fn`` unchanged, so it stays callable locally.

        ``inline=True`` (plain ``def`` only; ``TypeError`` for an ``async
        def`` or an async generator) runs the function directly on the
        node's event loop, in the middle of reading its channel: no thread,
        no task, no cancel scope -- the cheapest call there is.  The
        trade-off: while it runs, *every* channel of the node waits, and no
        cancel, timeout or disconnect can interrupt it (its answer always
        stands).  Use it for short pure functions (a few microseconds to a
        millisecond: arithmetic, lookups, small transformations), never for
        I/O, locks or work whose size a caller controls.
        """

        def register(fn: F) -> F:
            exported_name = name or fn.__name__
            if not 0 < len(exported_name) <= 255:
                raise ValueError(f"a function name is 1..255 characters, not {exported_name!r}")
            if exported_name in self.functions:
                raise ValueError(f"{self.name}:{exported_name} is already exported")
            kind: Kind
            if inspect.isasyncgenfunction(fn):
                kind = "stream"
            elif inspect.iscoroutinefunction(fn):
                kind = "async"
            elif callable(fn):
                kind = "sync"
            else:
                raise TypeError(f"cannot export {fn!r}: not a function")
            if inline and kind != "sync":
                raise TypeError(
                    f"{self.name}:{exported_name}: inline=True is for plain (sync) functions; "
                    f"an async function already runs on the node's loop"
                )
            lowest, highest = _arity(fn)
            self.functions[exported_name] = Exported(
                self.name, exported_name, fn, kind, lowest, highest, inline
            )
            return fn

        if fn is not None:
            return register(fn)
        return register

    def lookup(self, function: str, arity: int) -> Exported | None:
        """The exported function ``function/arity``, or ``None``."""
        exported = self.functions.get(function)
        if exported is None or not exported.accepts(arity):
            return None
        return exported

    def __repr__(self) -> str:
        return f"Service({self.name!r}, functions={sorted(self.functions)!r})"


def flatten_services(items: Iterable[Any]) -> dict[str, Service]:
    """``{name: Service}`` from Services and (nested) lists of them.

    Raises ``TypeError`` for anything that is not a ``Service`` and
    ``ValueError`` for two services with the same name.
    """
    found: dict[str, Service] = {}

    def add(item: Any) -> None:
        if isinstance(item, Service):
            if item.name in found and found[item.name] is not item:
                raise ValueError(f"two services are named {item.name!r}")
            found[item.name] = item
        elif isinstance(item, list | tuple):
            for sub in item:
                add(sub)
        else:
            raise TypeError(f"not a sshrpc.Service: {item!r}")

    add(list(items))
    return found


def error_term(
    exc: BaseException, *, traces: bool = False, redact: bool = False
) -> tuple[Atom, Any, dict[Any, Any]]:
    """``(Class, Reason, Details)`` for an exception raised by service code.

    ``sshrpc.Error``/``Exit``/``Throw`` keep their class and exact reason.
    Anything else is ``error`` with ``{'ExceptionClassName', <<"message">>}``,
    or ``{'ExceptionClassName', <<>>}`` when ``redact`` is true (the message
    may hold file paths, reprs or data the client should not see).
    ``Details`` holds ``trace => [Binary]`` only when ``traces`` is true.
    """
    details: dict[Any, Any] = {}
    if traces:
        details[Atom("trace")] = [
            line.encode() for line in traceback.format_exception(exc) if line.strip()
        ]
    if isinstance(exc, _Raised):
        return Atom(exc.erlang_class), exc.reason, details
    if redact:
        return Atom("error"), (Atom(type(exc).__name__[:255]), b""), details
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not lose the answer
        message = f"<{type(exc).__name__} (str failed)>"
    return (
        Atom("error"),
        (Atom(type(exc).__name__[:255]), message.encode("utf-8", "replace")),
        details,
    )
