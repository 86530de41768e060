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
    # A bytearray that the complete frames leave from the front: linear in
    # the bytes, also for a 16 MiB frame in 256 KiB reads (the bulk row).
    buf = bytearray()
    while True:
        data = os.read(0, 1 << 18)
        if not data:
            return
        buf += data
        end = 0
        while len(buf) - end >= 4:
            size = int.from_bytes(buf[end : end + 4], "big")
            if len(buf) - end - 4 < size:
                break
            end += 4 + size
        if end:
            with memoryview(buf) as whole:
                view = whole[:end]
                while view:
                    view = view[os.write(1, view) :]
                view.release()
            del buf[:end]


if __name__ == "__main__":
    main()
