"""Python values <-> ETF bytes, the fast path behind ``sshrpc.encode``/``decode``.

Same contract as the reference codec ``sshrpc._etf``, which documents it:
same values, same bytes, and ``TermError`` with the same message and offset
for malformed input.  No I/O.  csrc/README.md explains the design and the
measurements that chose it; in short:

- decode, first: ``decode`` and ``decode_cost`` are builtins (csrc/pydec.c,
  installed once through cffi) that build the objects of the common terms
  (numbers, atoms, binaries, tuples, proper lists, maps with distinct
  scalar keys) straight from ETF, with the reference's cost; for any other
  term or call they hand the arguments unchanged to ``_decode_py`` /
  ``_decode_cost_py``, the path below, which answers or raises.
- decode, fallback: C (``sshrpc_etf_to_pickle``) validates the term and transcodes it
  into a pickle protocol 5 stream, which CPython's C unpickler turns into
  objects.  The stream never names a global: the few callables it needs
  (``Atom``, ``BitString``, ...) sit at fixed memo indices of a per-thread
  unpickler, put there once from a stream built here.  Atoms are cached
  across calls in the same memo (bounded by ``ATOM_CACHE``), binaries of
  ``OOB_MIN`` bytes or more travel out of band as one slice of the input.
- encode: first ``encode_direct`` (csrc/pyenc.c), a builtin that writes ETF
  straight from the common exact types (installed once through cffi; it
  answers None for anything else).  Then a per-thread fast-mode
  ``pickle.Pickler`` (C) flattens the value;
  C (``sshrpc_pickle_to_etf``) transcodes that stream into canonical ETF.
  Anything the transcoder does not know (a subclass, an unsupported type, a
  cycle, a value the reference rejects) is handed to the reference encoder,
  which encodes it or raises the documented error.

Neither direction holds a lock: each thread has its own state, and a call
that re-enters (from a finalizer) uses a fresh one.
"""

from __future__ import annotations

import array
import collections
import contextvars
import copyreg
import gc
import io
import math
import os
import pickle
import struct
import sys
import threading
import types
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _etf
from ._bulk import encode_big
from ._errors import TermError
from ._etf import (
    DEFAULT_MAX_BIG_BYTES,
    DEFAULT_MAX_COST,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_INFLATED,
    _inflate,
    _make_map,
)
from ._types import Atom, BitString, Export, Fun, ImproperList, Map, Pid, Port, Reference

try:
    from ._sshrpc_c import ffi, lib
except ImportError as exc:  # pragma: no cover - a broken install
    raise ImportError(
        "sshrpc's C module is missing; reinstall sshrpc (pip install .) or, in a "
        "checkout, run scripts/build-c"
    ) from exc

__all__ = ["decode", "decode_cost", "encode", "encode_frame"]

#: The C module this Python code was written against (csrc/etf.h).
C_VERSION = 10
if lib.sshrpc_c_version() != C_VERSION:  # pragma: no cover - a stale build
    raise ImportError(
        f"sshrpc's C module is version {lib.sshrpc_c_version()}, this Python code needs "
        f"{C_VERSION}: rebuild it (scripts/build-c in a checkout, else pip install .)"
    )

#: Distinct atoms each thread's decoder keeps as ready ``Atom`` objects.
#: Atoms past this many are built per call; a peer sending many distinct
#: atoms costs at most this many small strings per thread.
ATOM_CACHE = 4096
#: Binaries at least this long are sliced out of the input directly instead
#: of being copied through the pickle stream.
OOB_MIN = 2048
# The encoder writes terms up to this size straight into a per-thread buffer.
_ENCODE_BUFFER = 64 * 1024
# A thread keeps a stream buffer up to this size between calls.
_KEEP_OUT = 1 << 20
_MAX_C_LIMIT = 2**63
# The pickle path runs only while the recursion limit is at most this: the
# C pickler then nests at most about 10,000 levels (about 2 MiB of C stack;
# 8 MiB overflowed at about 50,000).
_PICKLE_MAX_RECURSION = 20_000
#: Terms at least this long decode with the cyclic garbage collector paused:
#: a term is a tree (no cycles), and a collection pass over the containers
#: still being built made decoding many small lists about 2.7 times slower
#: (docs/security.md, "Work bounds").
GC_PAUSE_MIN = 64 * 1024


def _string_float(raw: bytes, pos: int) -> float:
    text = raw.split(b"\0", 1)[0]
    try:
        value = float(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise TermError(f"FLOAT_EXT is not a number: {text!r}", pos) from None
    if not math.isfinite(value):
        raise TermError("float is not finite (Erlang has no NaN or infinity)", pos)
    return value


_INT32 = next(code for code in "ilh" if array.array(code).itemsize == 4)
_SWAP = sys.byteorder == "big"


def _int_list(packed: bytes) -> list[int]:
    values = array.array(_INT32, packed)
    if _SWAP:
        values.byteswap()
    return values.tolist()


def _float_list(packed: bytes) -> list[float]:
    values = array.array("d", packed)
    if _SWAP:
        values.byteswap()
    return values.tolist()


def _map_from_flat(_empty: dict[Any, Any], flat: tuple[Any, ...]) -> dict[Any, Any] | Map:
    it = iter(flat)
    return _make_map(list(zip(it, it, strict=True)))


_MEMO_CALLABLES: dict[int, tuple[str, str, Any]] = {
    lib.SSHRPC_M_IMPROPER: ("sshrpc._types", "ImproperList", ImproperList),
    lib.SSHRPC_M_ATOM: ("sshrpc._types", "Atom", Atom),
    lib.SSHRPC_M_MAP: ("sshrpc._codec", "_map_from_flat", _map_from_flat),
    lib.SSHRPC_M_BITSTRING: ("sshrpc._types", "BitString", BitString),
    lib.SSHRPC_M_PID: ("sshrpc._types", "Pid", Pid),
    lib.SSHRPC_M_PORT: ("sshrpc._types", "Port", Port),
    lib.SSHRPC_M_REFERENCE: ("sshrpc._types", "Reference", Reference),
    lib.SSHRPC_M_FUN: ("sshrpc._types", "Fun", Fun),
    lib.SSHRPC_M_EXPORT: ("sshrpc._types", "Export", Export),
    lib.SSHRPC_M_SFLOAT: ("sshrpc._codec", "_string_float", _string_float),
    lib.SSHRPC_M_INTS: ("sshrpc._codec", "_int_list", _int_list),
    lib.SSHRPC_M_FLOATS: ("sshrpc._codec", "_float_list", _float_list),
    lib.SSHRPC_M_BYTELIST: ("builtins", "list", list),
}
_ALLOWED = {(module, name): obj for module, name, obj in _MEMO_CALLABLES.values()}


def _short_unicode(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


# PROTO 5; per callable: module, name, STACK_GLOBAL, BINPUT index, POP; NONE, STOP.
_WARMUP = (
    b"\x80\x05"
    + b"".join(
        _short_unicode(module) + _short_unicode(name) + b"\x93q" + bytes([index]) + b"0"
        for index, (module, name, _) in _MEMO_CALLABLES.items()
    )
    + b"N."
)


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Only the warm-up stream names globals; the C transcoder never does.
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None


class _DecodeState:
    """One thread's transcoder, atom cache, unpickler and stream buffer.

    The C transcoder writes the stream straight into the unpickler's BytesIO
    (through an exported buffer), so a call costs a seek, not a copy.
    """

    __slots__ = ("bio", "busy", "c_out", "cap", "io", "pending", "unpickler", "view")

    def __init__(self, atom_cache: int) -> None:
        handle = lib.sshrpc_io_new(atom_cache)
        if handle == ffi.NULL:
            raise MemoryError("cannot allocate the term decoder")
        self.io = ffi.gc(handle, lib.sshrpc_io_free)
        self.busy = False
        self.view: memoryview | None = None
        self.c_out: Any = None
        self.cap = 0
        self.fresh_unpickler()

    def _release(self) -> None:
        if self.view is not None:
            ffi.release(self.c_out)
            self.view.release()
            self.view = self.c_out = None

    def resize(self, size: int) -> None:
        """Make the stream buffer ``size`` bytes long."""
        self._release()
        self.bio.seek(0)
        self.bio.truncate()
        self.bio.seek(size - 1)
        self.bio.write(b"\0")  # zero-fills the rest
        self.view = self.bio.getbuffer()
        self.c_out = ffi.from_buffer(self.view)
        self.cap = size

    def fresh_unpickler(self) -> None:
        """Start over with an unpickler whose memo holds only the callables."""
        self._release()
        lib.sshrpc_dec_forget_atoms(self.io)
        self.bio = io.BytesIO(_WARMUP)
        self.pending: collections.deque[bytes] = collections.deque()
        self.unpickler = _Unpickler(self.bio, buffers=iter(self.pending.popleft, None))
        self.unpickler.load()
        self.resize(_KEEP_OUT // 16)


_local = threading.local()


def _no_direct_decode(
    data: bytes, max_depth: int, max_big: int, max_cost: int, want_cost: bool
) -> Any:
    return NotImplemented


def _install_direct_decode() -> dict[str, Any]:
    """The direct decoder (csrc/pydec.c): builtins that build the objects of
    the common small terms straight from ETF, or answer NotImplemented
    (never a decoded value) so the transcoder path decides, with the
    reference's value or error.  Installed like the direct encoder (see
    ``_install_direct``); ``SSHRPC_NO_DIRECT_DECODE=1`` turns it off.
    Returns {} when it is not in use."""
    if sys.implementation.name != "cpython" or os.environ.get("SSHRPC_NO_DIRECT_DECODE"):
        return {}
    target: dict[str, Any] = {}
    if lib.sshrpc_pydec_install(ffi.cast("void *", id(target)), ffi.cast("void *", id(Atom))):
        return {}  # pragma: no cover - out of memory at import
    return target


_direct_decoder = _install_direct_decode()
#: ``decode_direct(data, max_depth, max_big, max_cost, want_cost)`` -> the
#: value, or ``(value, cost)`` if ``want_cost``, or NotImplemented (then
#: ``_decode_c`` decides).  It takes exact ``bytes`` only.
_direct_decode: Callable[[bytes, int, int, int, bool], Any] = _direct_decoder.get(
    "decode_direct", _no_direct_decode
)


def _decode_py(
    data: bytes | bytearray | memoryview,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_big_bytes: int = DEFAULT_MAX_BIG_BYTES,
    max_inflated: int = DEFAULT_MAX_INFLATED,
    max_cost: int = DEFAULT_MAX_COST,
) -> Any:
    """``decode`` after the direct decoder answered NotImplemented (or
    without one): the transcoder path."""
    return _decode_cost(data, max_depth, max_big_bytes, max_inflated, max_cost, _untried(data))[0]


def _decode_cost_py(
    data: bytes | bytearray | memoryview,
    *,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_big_bytes: int = DEFAULT_MAX_BIG_BYTES,
    max_inflated: int = DEFAULT_MAX_INFLATED,
    max_cost: int = DEFAULT_MAX_COST,
) -> tuple[Any, int]:
    """``decode_cost`` after the direct decoder answered NotImplemented (or
    without one): the transcoder path."""
    return _decode_cost(data, max_depth, max_big_bytes, max_inflated, max_cost, _untried(data))


def _entry(fallback: Callable[..., Any], want_cost: bool) -> Callable[..., Any]:
    """The public ``decode`` (or ``decode_cost``): a builtin (csrc/pydec.c)
    that takes ``data`` and the limits as keywords, answers directly when it
    can and otherwise calls ``fallback`` with the same arguments; or
    ``fallback`` itself without the direct decoder."""
    make = _direct_decoder.get("entry")
    if make is None:
        return fallback
    return make(  # type: ignore[no-any-return]
        fallback, want_cost, DEFAULT_MAX_DEPTH, DEFAULT_MAX_BIG_BYTES, DEFAULT_MAX_COST, __name__
    )


if TYPE_CHECKING:

    def decode(
        data: bytes | bytearray | memoryview,
        *,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_big_bytes: int = DEFAULT_MAX_BIG_BYTES,
        max_inflated: int = DEFAULT_MAX_INFLATED,
        max_cost: int = DEFAULT_MAX_COST,
    ) -> Any:
        """Decode one complete term, version byte included.

        Exactly ``sshrpc._etf.decode``: raises ``TermError`` (and nothing
        else) for anything that is not one valid term within the limits.
        """

    def decode_cost(
        data: bytes | bytearray | memoryview,
        *,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_big_bytes: int = DEFAULT_MAX_BIG_BYTES,
        max_inflated: int = DEFAULT_MAX_INFLATED,
        max_cost: int = DEFAULT_MAX_COST,
    ) -> tuple[Any, int]:
        """``decode``, and the term's cost: the sum of its tags'
        ``sshrpc._etf.TERM_COST``, an estimate of the bytes of objects it
        became (exactly ``sshrpc._etf.decode_cost``)."""

else:
    # Builtins (their docstrings say the same as the stubs above): the
    # Python call layer alone cost about as much as msgpack's whole decode
    # of a call tuple.
    decode = _entry(_decode_py, False)
    decode_cost = _entry(_decode_cost_py, True)


def _untried(data: object) -> bool:
    """Whether the direct decoder has not seen these bytes yet after it
    answered NotImplemented: it takes only exact bytes, and a compressed
    term is new to it once inflated."""
    return type(data) is not bytes or data[1:2] == b"\x50"


def _decode_cost(
    data: bytes | bytearray | memoryview,
    max_depth: int,
    max_big_bytes: int,
    max_inflated: int,
    max_cost: int,
    direct: bool,
) -> tuple[Any, int]:
    """``decode_cost``; ``direct`` False skips the direct decoder (the
    caller tried it on these very bytes)."""
    if type(data) is not bytes:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"decode needs bytes, not {type(data).__name__}")
        data = bytes(data)
    if not (
        0 <= max_depth < _MAX_C_LIMIT
        and 0 <= max_big_bytes < _MAX_C_LIMIT
        and 0 <= max_cost < _MAX_C_LIMIT
    ):
        return _etf.decode_cost(
            data,
            max_depth=max_depth,
            max_big_bytes=max_big_bytes,
            max_inflated=max_inflated,
            max_cost=max_cost,
        )
    inflated = len(data) > 1 and data[1] == 80 and data[0] == 131
    if inflated:
        data = _inflate(data, max_inflated)
    if direct:
        # The direct decoder pauses the collector itself for a large term.
        pair = _direct_decode(data, max_depth, max_big_bytes, max_cost, True)
        if pair is not NotImplemented:
            return pair  # type: ignore[no-any-return]
    if len(data) < GC_PAUSE_MIN or not gc.isenabled():
        return _decode_c(data, max_depth, max_big_bytes, max_cost, inflated)
    gc.disable()
    try:
        return _decode_c(data, max_depth, max_big_bytes, max_cost, inflated)
    finally:
        gc.enable()


def _decode_c(
    data: bytes, max_depth: int, max_big_bytes: int, max_cost: int, inflated: bool
) -> tuple[Any, int]:
    try:
        state: _DecodeState = _local.decoder
    except AttributeError:
        state = _local.decoder = _DecodeState(ATOM_CACHE)
    if state.busy:  # re-entered (a finalizer decoding during a decode)
        state = _DecodeState(0)
    state.busy = True
    try:
        rc = lib.sshrpc_etf_to_pickle(
            state.io,
            data,
            len(data),
            max_depth,
            max_big_bytes,
            max_cost,
            OOB_MIN,
            state.c_out,
            state.cap,
        )
        if rc < 0 or rc & 3:
            rc = _decode_rare(state, data, rc, max_depth, max_big_bytes, max_cost, inflated)
        cost = int(state.io.cost)
        state.bio.seek(0)
        try:
            value = state.unpickler.load()
        except TermError as exc:  # a bad FLOAT_EXT, found by _string_float
            state.fresh_unpickler()
            if inflated:
                raise TermError(exc.detail + " (in the inflated term)", exc.offset) from None
            raise
        except BaseException:
            state.fresh_unpickler()
            raise
        if state.cap > _KEEP_OUT:
            state.resize(_KEEP_OUT // 16)
        return value, cost
    finally:
        state.busy = False


def _decode_rare(
    state: _DecodeState,
    data: bytes,
    rc: int,
    max_depth: int,
    max_big: int,
    max_cost: int,
    inflated: bool,
) -> int:
    """The transcoder's uncommon outcomes: a larger stream buffer, errors,
    out-of-band binaries.  Returns the final status."""
    while rc == -3:
        state.resize(max(2 * state.cap, len(data) + 64))
        rc = lib.sshrpc_etf_to_pickle(
            state.io, data, len(data), max_depth, max_big, max_cost, OOB_MIN, state.c_out, state.cap
        )
    if ((rc >= 0 and rc & 2) or rc == -1) and state.io.n_floats:
        # String floats, in document order: the first bad one is the error.
        for pos in ffi.unpack(state.io.floats, state.io.n_floats):
            try:
                _string_float(data[pos + 1 : pos + 32], pos)
            except TermError as exc:
                if rc >= 0:
                    # The transcoder succeeded and cached this term's new
                    # atoms at memo slots the stream (never loaded now)
                    # would have filled: forget them with the stream.
                    state.fresh_unpickler()
                if inflated:
                    raise TermError(exc.detail + " (in the inflated term)", exc.offset) from None
                raise
    if rc < 0:
        if rc == -2:
            raise MemoryError("out of memory decoding a term")
        detail = ffi.string(state.io.err).decode()
        if inflated:
            detail += " (in the inflated term)"
        raise TermError(detail, state.io.err_offset)
    if rc & 1:
        oob = ffi.unpack(state.io.oob, 2 * state.io.n_oob)
        state.pending.extend([data[oob[i] : oob[i] + oob[i + 1]] for i in range(0, len(oob), 2)])
    return int(rc)


# ----------------------------------------------------------------------------
# Encoding


class _AtomReducers(dict[Atom, tuple[Any, tuple[str]]]):
    """``copyreg`` reducer for ``Atom``: the same value ``Atom.__reduce__``
    gives, cached, so pickling an atom costs a dict lookup."""

    def __missing__(self, atom: Atom) -> tuple[Any, tuple[str]]:
        reduced = (Atom, (str.__str__(atom),))
        if len(self) < ATOM_CACHE:
            self[atom] = reduced
        return reduced


# The dispatch table is keyed by exact type, so only Atom instances get here.
copyreg.pickle(Atom, _AtomReducers().__getitem__)


class _EncodeState:
    """One thread's pickler, transcoder and output buffer.

    The pickler is reused in fast mode with a memo that holds only the sshrpc
    classes (the C side knows the same memo), so a stream never pays for a
    global lookup; it writes into ``chunks``.
    """

    __slots__ = ("busy", "c_out", "cap", "chunks", "io", "out", "pickler", "preamble")

    def __init__(self) -> None:
        handle = lib.sshrpc_io_new(0)
        if handle == ffi.NULL:
            raise MemoryError("cannot allocate the term encoder")
        self.io = ffi.gc(handle, lib.sshrpc_io_free)
        self.busy = False
        self.out = bytearray(_ENCODE_BUFFER)
        self.c_out = ffi.from_buffer("char[]", self.out)
        self.cap = len(self.out)
        self.chunks: list[bytes] = []
        self.pickler = pickle.Pickler(types.SimpleNamespace(write=self.chunks.append), 5)
        self.pickler.dump((Atom, BitString, ImproperList, Map, Pid, Port, Reference, Fun, Export))
        self.preamble = b"".join(self.chunks)
        self.chunks.clear()
        # No memo puts from here on, so the memo keeps exactly the preamble's
        # entries across calls; shared objects are written twice (the C side
        # would emit them twice anyway) and a cycle raises ValueError.
        self.pickler.fast = True
        if lib.sshrpc_enc_preamble(self.io, self.preamble, len(self.preamble)):
            raise ImportError("sshrpc's C encoder rejected the pickle preamble")


def _no_direct(obj: Any, max_depth: int, reserve: int) -> bytes | None:
    return None


def _install_direct() -> Callable[[Any, int, int], bytes | None]:
    """The direct encoder (csrc/pyenc.c): a builtin that writes ETF for the
    common exact types straight from the objects, or returns None so the
    pickle path (and then the reference encoder) decides.  C gets the target
    dict and the ``Atom`` type by address, which is ``id()`` only on CPython;
    elsewhere (or if installing fails) every value takes the pickle path."""
    if sys.implementation.name != "cpython" or os.environ.get("SSHRPC_NO_DIRECT_ENCODE"):
        return _no_direct
    target: dict[str, Any] = {}
    if lib.sshrpc_pyenc_install(ffi.cast("void *", id(target)), ffi.cast("void *", id(Atom))):
        return _no_direct  # pragma: no cover - out of memory at import
    return target["encode_direct"]  # type: ignore[no-any-return]


#: ``encode_direct(obj, max_depth, reserve)`` -> the ETF after ``reserve``
#: (0 or 4: the frame length) bytes, or None (then ``_encode_c`` decides).
_direct = _install_direct()


def _encode_c(obj: Any, max_depth: int, reserve: int) -> bytes | None:
    """ETF for ``obj`` after ``reserve`` bytes (see sshrpc_pickle_to_etf), or
    None if the transcoder cannot (then the reference encoder decides)."""
    if type(obj) is bytes and len(obj) <= 0xFFFFFFFF:
        head = struct.pack(">BBI", 131, 109, len(obj))
        if reserve:
            head = bytes(reserve - 4) + struct.pack(">I", len(obj) + 6) + head
        return head + obj
    if sys.getrecursionlimit() > _PICKLE_MAX_RECURSION:
        # The C pickler recurses on the C stack up to the recursion limit,
        # which the reference raises for a large max_depth: past this bound
        # a deep value would overflow the stack, so the reference decides.
        return None
    try:
        state: _EncodeState = _local.encoder
    except AttributeError:
        state = _local.encoder = _EncodeState()
    if state.busy:  # re-entered (a __reduce__ or finalizer encoding)
        state = _EncodeState()
    state.busy = True
    try:
        chunks = state.chunks
        try:
            state.pickler.dump(obj)
        except BaseException as exc:
            # Unpicklable, a cycle, too deep: the reference decides.  The
            # pickler may be mid-way, so this thread gets a new one.
            if _local.__dict__.get("encoder") is state:
                del _local.encoder
            if isinstance(exc, Exception):
                return None
            raise
        stream = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        rc = lib.sshrpc_pickle_to_etf(
            state.io, stream, len(stream), max_depth, reserve, state.c_out, state.cap
        )
        if rc < 0:
            if rc == -2:
                raise MemoryError("out of memory encoding a term")
            return None
        n = rc >> 2
        out = lib.sshrpc_io_out(state.io) if rc & 1 else state.c_out
        if not rc & 2:
            return ffi.unpack(out, n)  # type: ignore[no-any-return]
        # Large binaries were left in the pickle stream: join them in.
        view = memoryview(ffi.buffer(out, n))
        source = memoryview(stream)
        splices = ffi.unpack(state.io.oob, 3 * state.io.n_oob)
        parts: list[memoryview] = []
        done = 0
        for i in range(0, len(splices), 3):
            at, offset, length = splices[i : i + 3]
            parts += (view[done:at], source[offset : offset + length])
            done = at
        parts.append(view[done:])
        return b"".join(parts)
    finally:
        state.busy = False


def encode(
    obj: Any, *, compressed: bool | int = False, max_depth: int = DEFAULT_MAX_DEPTH
) -> bytes:
    """Encode ``obj`` as one term, version byte included.

    Exactly ``sshrpc._etf.encode``: the same bytes, ``TypeError`` for a value
    with no Erlang term, ``TermError`` for a value that cannot be a term.
    """
    data = _direct(obj, max_depth, 0)
    if data is None and 0 <= max_depth < _MAX_C_LIMIT:
        # (large binaries: copied once, src/sshrpc/_bulk.py)
        data = encode_big(obj, max_depth, 0, encode)
        if data is None:
            data = _encode_c(obj, max_depth, 0)
    if data is None:
        return _etf.encode(obj, compressed=compressed, max_depth=max_depth)
    if compressed:
        level = 6 if compressed is True else int(compressed)
        body = data[1:]
        return b"\x83\x50" + struct.pack(">I", len(body)) + zlib.compress(body, level)
    return data


def encode_frame(obj: Any) -> bytes:
    """``obj`` encoded as one frame: a 4-byte big-endian length, then the term.

    The term is written once, after four reserved bytes that are then set to
    its length, so a large payload is copied only into the result.
    """
    frame = _direct(obj, DEFAULT_MAX_DEPTH, 4)
    if frame is None:
        frame = encode_big(obj, DEFAULT_MAX_DEPTH, 4, encode)
    if frame is None:
        frame = _encode_c(obj, DEFAULT_MAX_DEPTH, 4)
    if frame is None:
        payload = _etf.encode(obj)
        return struct.pack(">I", len(payload)) + payload
    return frame


def install_node_builtins() -> dict[str, Any]:
    """The node's plain-call loop (csrc/pynode.c), or {} where the direct
    encoder is not in use: ``run_plain(kit, events, costs, pos)``, the loop
    of ``node._Channel._plain_calls`` (documented there and in pynode.c)."""
    if _direct is _no_direct:
        return {}
    target: dict[str, Any] = {}
    config = (
        _direct,
        DEFAULT_MAX_DEPTH,
        contextvars.Context.copy,
        contextvars.Context.run,
        contextvars.ContextVar.set,
        contextvars.ContextVar.reset,
        types.CoroutineType,
    )
    if lib.sshrpc_pynode_install(ffi.cast("void *", id(target)), ffi.cast("void *", id(config))):
        return {}  # pragma: no cover - out of memory at import
    return target


def install_client_builtins(head5: bytes, head6: bytes, timeout_opts: bytes) -> dict[str, Any]:
    """The client's per-call builtins (csrc/pycall.c), or {} where the
    direct encoder is not in use.  The heads are fixed by the first call.

    ``call_frame(call_id, names, args, timeout)`` returns the whole frame
    of ``{call, Id, M, F, Args}`` (``head5``: its version byte, tuple head
    and ``call`` atom), or with ``timeout`` not None ``{call, Id, M, F, Args,
    #{timeout => T}}`` (``head6``, then ``timeout_opts`` before T): the
    4-byte length and the payload, ``names`` being M's and F's atoms
    without version bytes and ``args`` (a list) encoded as ``encode``
    would.  It returns None (nothing decided) for what the caller's own
    path must handle: an id or timeout outside 0..2**31-1, or ``args`` the
    direct encoder does not take.

    ``plain_replies(terms, opened, reply)`` counts the leading terms of the
    list ``terms`` that are exact 3-tuples ``(reply, Id, Value)`` (``reply``
    an exact ``Atom``, ``Id`` an exact int that is a key of the dict
    ``opened``), deleting each such ``Id`` from ``opened``, and stops at the
    first that is not."""
    if _direct is _no_direct:
        return {}
    target: dict[str, Any] = {}
    config = (_direct, DEFAULT_MAX_DEPTH, head5, head6, timeout_opts)
    if lib.sshrpc_pycall_install(ffi.cast("void *", id(target)), ffi.cast("void *", id(config))):
        return {}  # pragma: no cover - out of memory at import
    return target
