"""The sshrpc subsystem relay: stdin/stdout <-> the node's Unix socket.

sshd runs this once per channel as ``python -I -S _relay.py SOCKET``, so its
start-up time is paid by every channel: it imports only ``os``, ``socket``,
``select`` and ``sys`` (a test asserts it) and does no work beyond relaying.

It connects to the node, sends one header, then copies bytes both ways:

    header = b"SRLY" LENGTH(4 bytes, big-endian) BODY
    BODY   = SSH_USER_AUTH-file-contents NUL SSH_CONNECTION [NUL "exec" NUL COMMAND]

Which request sshd ran it for (the key's forced command runs for all three):

- subsystem: ``--subsystem`` is its last argument (the ``Subsystem`` line's
  command carries it, the forced command does not), or the last word of
  ``$SSH_ORIGINAL_COMMAND`` is ``--subsystem`` (sshd sets that variable to the
  Subsystem line's command when a forced command runs instead);
- exec: ``$SSH_ORIGINAL_COMMAND`` is set otherwise: the command (at most
  ``MAX_COMMAND + 1`` bytes) goes to the node in the header, which answers
  once, ``b"SRLX" STATUS(1) OUTLEN(4) ERRLEN(4) OUT ERR``; the relay copies
  OUT to stdout, ERR to stderr and exits with STATUS (sshrpc._exec);
- shell (neither): refused with one line on stderr, exit status 3.

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
MAX_COMMAND = 8192  # sshrpc._exec.MAX_COMMAND
MARKER = "--subsystem"
REFUSED = 3
SHELL_REFUSED = (
    "sshrpc relay: shell requests are refused; open the subsystem "
    "(ssh -s HOST sshrpc@k2r.org) or run one call: ssh HOST 'lists:reverse([1,2,3]).'\n"
)


def _header(command: bytes | None = None) -> bytes:
    auth = b""
    path = os.environ.get("SSH_USER_AUTH", "")
    if path:
        try:
            with open(path, "rb") as f:
                auth = f.read(MAX_HEADER // 2)
        except OSError:
            auth = b""
    body = auth.replace(b"\0", b"") + b"\0" + os.environ.get("SSH_CONNECTION", "").encode()[:1024]
    if command is not None:
        body += b"\0exec\0" + command[: MAX_COMMAND + 1]
    return b"SRLY" + len(body).to_bytes(4, "big") + body


def _connect(socket_path: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
    except OSError as exc:
        sys.stderr.write(f"sshrpc relay: cannot reach the node at {socket_path}: {exc.strerror}\n")
        sock.close()
        return None
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def _copy(sock: socket.socket, n: int, fd: int) -> bool:
    while n > 0:
        chunk = sock.recv(min(n, BUFFER))
        if not chunk:
            return False
        n -= len(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]
    return True


def exec_command(socket_path: str, command: bytes) -> int:
    """Exec mode: send ``command`` to the node, copy its answer out, and
    return its exit status.  If the client goes away first (POLLHUP on
    stdout), close the socket, which cancels the call."""
    sock = _connect(socket_path)
    if sock is None:
        return 1
    try:
        sock.sendall(_header(command))
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        poller.register(1, 0)
        while True:
            events = dict(poller.poll())
            if events.get(sock.fileno()):
                break
            if events.get(1):
                return 1  # the channel is gone: closing the socket cancels the call
        head = _recv_exactly(sock, 13)
        if head is None or head[:4] != b"SRLX":
            sys.stderr.write("sshrpc relay: the node closed the channel without an answer\n")
            return 1
        status = head[4]
        if not (
            _copy(sock, int.from_bytes(head[5:9], "big"), 1)
            and _copy(sock, int.from_bytes(head[9:13], "big"), 2)
        ):
            sys.stderr.write("sshrpc relay: the node's answer was cut short\n")
            return 1
        return status
    except OSError:
        return 1  # EPIPE: the client is gone; ECONNRESET: the node is
    finally:
        sock.close()


def relay(socket_path: str) -> int:
    sock = _connect(socket_path)
    if sock is None:
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
    argv = sys.argv[1:]
    if not (len(argv) == 1 or (len(argv) == 2 and argv[1] == MARKER)):
        sys.stderr.write(f"usage: python -I -S _relay.py SOCKET [{MARKER}]\n")
        return 2
    original = os.environb.get(b"SSH_ORIGINAL_COMMAND")
    if len(argv) == 2 or (original is not None and original.split()[-1:] == [MARKER.encode()]):
        return relay(argv[0])
    if original is not None:
        return exec_command(argv[0], original)
    sys.stderr.write(SHELL_REFUSED)
    return REFUSED


if __name__ == "__main__":
    sys.exit(main())
