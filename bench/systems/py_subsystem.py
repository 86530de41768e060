"""A tiny stdio subsystem for OpenSSH's sshd: answers hello and
``sshrpc_bench:echo`` calls with sshrpc's framing and codec, one blocking loop
over fds 0 and 1.  The stand-in node for the paramiko system until (and
unless) ``sshrpc serve`` is available.

Usage (as an sshd ``Subsystem`` command): ``python bench/systems/py_subsystem.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.floors._wire import CALL, HELLO, REPLY, FrameBuffer, frame, hello_frame
from bench.systems._common import MAX_FRAME

from sshrpc import decode


def main() -> None:
    frames = FrameBuffer(MAX_FRAME)
    while True:
        data = os.read(0, 1 << 18)
        if not data:
            return
        frames.feed(data)
        out = []
        while (p := frames.pop()) is not None:
            term = decode(p)
            if term[0] == CALL:
                out.append(frame((REPLY, term[1], term[4][0])))
            elif term[0] == HELLO:
                out.append(hello_frame(MAX_FRAME, "py-subsystem/1", "server"))
        if out:
            view = memoryview(b"".join(out))
            while view:
                view = view[os.write(1, view) :]


if __name__ == "__main__":
    main()
