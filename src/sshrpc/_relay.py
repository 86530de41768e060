"""The sshrpc subsystem relay: stdin/stdout <-> the node's Unix socket.

sshd runs this once per channel as ``python -I -S _relay.py SOCKET``, so its
start-up time is paid by every channel: it imports only ``os``, ``socket``,
``select`` and ``sys`` (a test asserts it) and does no work beyond relaying.

It connects to the node, sends one header, then copies bytes both ways:

    header = b"SRLY" LENGTH(4 bytes, big-endian) BODY
    BODY   = SSH_USER_AUTH-file-contents NUL SSH_CONNECTION

``$SSH_USER_AUTH`` (sshd's ``ExposeAuthInfo``) names a file that says which
key authenticated; the node trusts it only because it checks, with
``SO_PEERCRED``, that this process runs as the node's own user.

Flow control: each direction has one bounded buffer; a side is read only while
its buffer has room, so a reader that stops reading stops the writer (the
node's socket fills, then the SSH window closes).  EOF on stdin (the client
sent EOF but may still read) stops reading stdin only; the channel being
closed (POLLHUP/POLLERR on stdout, or EPIPE) ends the relay, and closing the
socket tells the node the client is gone.  EOF from the node ends the relay
once its last bytes are written.  Exit status 0 on a clean end,
1 (with one line on stderr, which ssh shows as diagnostics) on failure.
"""

import os
import select
import socket
import sys

BUFFER = 65536
MAX_HEADER = 65536


def _header() -> bytes:
    auth = b""
    path = os.environ.get("SSH_USER_AUTH", "")
    if path:
        try:
            with open(path, "rb") as f:
                auth = f.read(MAX_HEADER // 2)
        except OSError:
            auth = b""
    body = auth.replace(b"\0", b"") + b"\0" + os.environ.get("SSH_CONNECTION", "").encode()[:1024]
    return b"SRLY" + len(body).to_bytes(4, "big") + body


def relay(socket_path: str) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
    except OSError as exc:
        sys.stderr.write(f"sshrpc relay: cannot reach the node at {socket_path}: {exc.strerror}\n")
        return 1
    sock.sendall(_header())
    sock.setblocking(False)
    os.set_blocking(0, False)
    os.set_blocking(1, False)
    up = bytearray()  # stdin -> node
    down = bytearray()  # node -> stdout
    stdin_open = True
    node_open = True
    sock_fd = sock.fileno()
    poller = select.poll()
    gone = select.POLLHUP | select.POLLERR | select.POLLNVAL
    while node_open or down:
        want_in = stdin_open and len(up) < BUFFER
        if want_in:
            poller.register(0, select.POLLIN)
        # stdout is always watched: POLLHUP/POLLERR there means sshd closed
        # the channel (the client is gone), even with nothing to write.
        poller.register(1, select.POLLOUT if down else 0)
        sock_want = (select.POLLIN if node_open and len(down) < BUFFER else 0) | (
            select.POLLOUT if up else 0
        )
        if sock_want:
            poller.register(sock_fd, sock_want)
        events = dict(poller.poll())
        for fd in (0, 1, sock_fd):
            try:  # noqa: SIM105 -- contextlib would cost start-up time
                poller.unregister(fd)
            except KeyError:
                pass
        stdin_ev = events.get(0, 0)
        stdout_ev = events.get(1, 0)
        sock_ev = events.get(sock_fd, 0)
        try:
            if want_in and stdin_ev:
                data = os.read(0, BUFFER)
                if data:
                    up += data
                else:
                    # EOF from the client, which may still read: keep relaying
                    # answers; the node learns the channel is gone when we close.
                    stdin_open = False
            if node_open and sock_ev & (select.POLLIN | gone) and len(down) < BUFFER:
                data = sock.recv(BUFFER)
                if data:
                    down += data
                else:
                    node_open = False
            if up and sock_ev & (select.POLLOUT | gone):
                del up[: sock.send(up)]
            if down and stdout_ev:
                del down[: os.write(1, down)]
            elif stdout_ev & gone:
                break
        except BlockingIOError:
            pass
        except OSError:
            # EPIPE/ECONNRESET: the client (stdout) or the node (socket) is gone.
            break
    sock.close()
    return 0


def main() -> int:
    if len(sys.argv) != 2:
        sys.stderr.write("usage: python -I -S _relay.py SOCKET\n")
        return 2
    return relay(sys.argv[1])


if __name__ == "__main__":
    sys.exit(main())
