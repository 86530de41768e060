"""Build steps pyproject.toml cannot declare: the cffi module, and the C relay.

The relay (csrc/relay.c) is a small executable sshd starts per channel; it is
compiled here, with the same compiler as the extension, into the package
directory next to the extension (``sshrpc/sshrpc-relay``), so an installed
sshrpc never needs a C compiler at run time.
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_ext import build_ext

RELAY_SOURCE = "csrc/relay.c"
RELAY_NAME = "sshrpc-relay"


class build_ext_with_relay(build_ext):  # noqa: N801 - setuptools' naming
    """``build_ext`` that also links the C relay executable into the package."""

    def _relay_path(self) -> str:
        return os.path.join(os.path.dirname(self.get_ext_fullpath("sshrpc._sshrpc_c")), RELAY_NAME)

    def run(self) -> None:
        super().run()
        target = self._relay_path()
        objects = self.compiler.compile(
            [RELAY_SOURCE], output_dir=self.build_temp, extra_postargs=["-O2", "-Wall"]
        )
        os.makedirs(os.path.dirname(target), exist_ok=True)
        self.compiler.link_executable(
            objects, RELAY_NAME, output_dir=os.path.dirname(target) or "."
        )
        os.chmod(target, 0o755)

    def get_outputs(self) -> list[str]:
        return [*super().get_outputs(), self._relay_path()]


setup(
    cffi_modules=["csrc/build_sshrpc.py:ffi"],
    cmdclass={"build_ext": build_ext_with_relay},
)
