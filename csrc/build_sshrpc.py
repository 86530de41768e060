"""cffi build script for ``sshrpc._sshrpc_c``: the C fast path (csrc/README.md).

One compiled module.  Its C surface is the declarations between the
``cdef-begin``/``cdef-end`` markers of each header: flat functions over
buffers that return status codes.  Python owns every policy decision and
every exception.
"""

from __future__ import annotations

import os
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
MODULES = ["etf", "framing", "pyenc", "pydec", "pyaudit", "pycall", "pynode", "pyreq"]


def _cdef(header: str) -> str:
    text = (HERE / header).read_text()
    return text.split("/* cdef-begin */", 1)[1].split("/* cdef-end */", 1)[0]


ffi = FFI()
ffi.cdef("\n".join(_cdef(f"{name}.h") for name in MODULES))
extra_compile_args = ["-O2", "-std=c99", "-Wall", "-Wextra", "-Wno-unused-parameter"]
extra_link_args: list[str] = []
if os.environ.get("SSHRPC_SANITIZE"):
    # Address and undefined-behaviour sanitizers, for the fuzz corpus.
    extra_compile_args += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
    extra_link_args += ["-fsanitize=address,undefined"]
# setuptools wants paths relative to the project root (its cwd); the atomic
# development rebuild (scripts/build-c) compiles elsewhere and asks for
# absolute ones.
ROOT = str(HERE.parent) + "/" if os.environ.get("SSHRPC_BUILD_ABSOLUTE") else ""
ffi.set_source(
    "sshrpc._sshrpc_c",
    "\n".join(f'#include "{name}.h"' for name in MODULES),
    sources=[f"{ROOT}csrc/{name}.c" for name in MODULES],
    include_dirs=[f"{ROOT}csrc"],
    extra_compile_args=extra_compile_args,
    extra_link_args=extra_link_args,
)

if __name__ == "__main__":
    ffi.compile(verbose=False)
