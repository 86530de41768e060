"""The sshd floor's server: a minimal blocking subsystem for OpenSSH's sshd
that echoes length-prefixed frames: one ``read`` of fd 0, then the complete
frames it finished written back to fd 1 in one ``write`` (a partial frame
waits for its rest).  No decoding, no imports beyond ``os`` and ``sys``:
the least a subsystem can do per frame, so that the sshd floor rows
(bench/call_cpu.py ``sshd_floor_*``) measure SSH itself.

Usage (an sshd ``Subsystem`` command): ``python -S bench/floors/sshd_echo.py``.
"""

import os


def main() -> None:
    pending = b""
    while True:
        data = os.read(0, 1 << 18)
        if not data:
            return
        buf = pending + data if pending else data
        end = 0
        while len(buf) - end >= 4:
            size = int.from_bytes(buf[end : end + 4], "big")
            if len(buf) - end - 4 < size:
                break
            end += 4 + size
        pending = buf[end:]
        if end:
            view = memoryview(buf)[:end]
            while view:
                view = view[os.write(1, view) :]


if __name__ == "__main__":
    main()
