"""cffi build script for ``sshrpc._sshrpc_c``: the C fast path (csrc/README.md).

One compiled module; its C surface is the declarations in ``CDEF``: flat
functions over buffers that return status codes.  Python owns every policy
decision and every exception.
"""

from __future__ import annotations

import os
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = ["etf.c", "framing.c"]

CDEF = (HERE / "sshrpc.h").read_text().split("/* cdef-begin */", 1)[1].split("/* cdef-end */", 1)[0]

ffi = FFI()
ffi.cdef(CDEF)
extra_compile_args = ["-O2", "-std=c99", "-Wall", "-Wextra", "-Wno-unused-parameter"]
extra_link_args: list[str] = []
if os.environ.get("SSHRPC_SANITIZE"):
    # Address and undefined-behaviour sanitizers, for the fuzz corpus (docs/fuzzing.md).
    extra_compile_args += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
    extra_link_args += ["-fsanitize=address,undefined"]
ffi.set_source(
    "sshrpc._sshrpc_c",
    '#include "sshrpc.h"\n',
    # setuptools wants paths relative to the project root (the build cwd).
    sources=[f"csrc/{name}" for name in SOURCES],
    include_dirs=["csrc"],
    extra_compile_args=extra_compile_args,
    extra_link_args=extra_link_args,
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
