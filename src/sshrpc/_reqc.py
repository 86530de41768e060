"""The client's per-request bookkeeping in C (csrc/pyreq.c), or None.

``fields`` is the C type that stores ``Request``'s attributes (None: the
pure-Python ``__slots__`` class in ``_request`` is used), and
``new_requests``, ``finish_replies``, ``take_answers`` the builtins that
create, finish and hand out requests in batches (the request API's batch
forms and the read loop), and ``batch_frames`` the read's small frames as
one list term straight from the buffered read (csrc/pyreq.c says what each
promises).  All None
without the C module (``SSHRPC_PURE_PYTHON=1``) or with
``SSHRPC_NO_C_REQUESTS=1`` (for measurements and tests of the Python
path).
"""

from __future__ import annotations

import os
from typing import Any

fields: Any = None
new_requests: Any = None
finish_replies: Any = None
take_answers: Any = None
batch_frames: Any = None


def _install() -> dict[str, Any]:
    # (Not through ``_accel``, which imports the frame buffer, which uses
    # ``batch_frames``: the same switch, read here.)
    for switch in ("SSHRPC_PURE_PYTHON", "SSHRPC_NO_C_REQUESTS"):
        if os.environ.get(switch, "") not in ("", "0"):
            return {}
    try:
        from ._sshrpc_c import ffi, lib
    except ImportError:
        return {}
    install = getattr(lib, "sshrpc_pyreq_install", None)  # (None: a build from before it)
    target: dict[str, Any] = {}
    if install is None or install(ffi.cast("void *", id(target))):
        return {}  # pragma: no cover - out of memory at import
    return target


_builtins = _install()
if len(_builtins) == 5:
    fields = _builtins["RequestFields"]
    new_requests = _builtins["new_requests"]
    finish_replies = _builtins["finish_replies"]
    take_answers = _builtins["take_answers"]
    batch_frames = _builtins["batch_frames"]
