"""The client's per-request bookkeeping in C (csrc/pyreq.c), or None.

``fields`` is the C type that stores ``Request``'s attributes (None: the
pure-Python ``__slots__`` class in ``_request`` is used), and
``new_requests``, ``finish_replies``, ``take_answers`` the builtins that
create, finish and hand out requests in batches (the request API's batch
forms and the read loop; csrc/pyreq.c says what each promises).  All None
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


def _install() -> dict[str, Any]:
    from ._accel import c_accelerated

    if not c_accelerated or os.environ.get("SSHRPC_NO_C_REQUESTS", "") not in ("", "0"):
        return {}
    from ._codec import ffi, lib

    install = getattr(lib, "sshrpc_pyreq_install", None)  # (None: a build from before it)
    target: dict[str, Any] = {}
    if install is None or install(ffi.cast("void *", id(target))):
        return {}  # pragma: no cover - out of memory at import
    return target


_builtins = _install()
if len(_builtins) == 4:
    fields = _builtins["RequestFields"]
    new_requests = _builtins["new_requests"]
    finish_replies = _builtins["finish_replies"]
    take_answers = _builtins["take_answers"]
