/* The sshrpc subsystem relay in C: stdin/stdout <-> the node's Unix socket.
 *
 * The same program as src/sshrpc/_relay.py (same header, same flow control,
 * same endings and exit statuses), for a per-channel start-up of about a
 * millisecond instead of a Python interpreter's tens of milliseconds.
 * setup.py compiles it when the package is built, into the package as the
 * executable sshrpc/sshrpc-relay (sshrpc.subsystem.native_relay() finds it);
 * nothing is compiled at run time.  Without it, the Python relay is used.
 *
 *   usage: relay [--pass-fds] SOCKET [--subsystem]
 *
 * Header sent to the node first (the node checks SO_PEERCRED):
 *   "SRLY" LENGTH(4 bytes, big-endian) BODY
 *   BODY = contents of $SSH_USER_AUTH (at most 32 KiB, NULs removed)
 *          NUL $SSH_CONNECTION (at most 1024 bytes)
 *          [NUL "exec" NUL $SSH_ORIGINAL_COMMAND (at most MAX_COMMAND + 1 bytes)]
 *
 * The request sshd runs it for (a key's forced command runs for all three):
 * subsystem when the last argument is --subsystem (the Subsystem line has it,
 * the forced command not) or $SSH_ORIGINAL_COMMAND's last word is
 * --subsystem (sshd puts the Subsystem line's command there when it runs a
 * forced command instead); exec when $SSH_ORIGINAL_COMMAND is set otherwise
 * (the node answers once: "SRLX" STATUS(1) OUTLEN(4) ERRLEN(4) OUT ERR,
 * copied to stdout and stderr, and the relay exits with STATUS); a shell
 * (neither) is refused with one line on stderr and exit status 3.
 *
 * Each direction has one bounded buffer, read into only while it has room,
 * and written out as soon as it holds bytes.
 * EOF on stdin stops reading stdin only; POLLHUP/POLLERR on stdout or EPIPE
 * ends the relay; EOF from the node ends it once its last bytes are written.
 * Exit status 0 on a clean end, 1 (one line on stderr) on failure, 2 usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define BUFFER (256 * 1024)
#define MAX_AUTH (32 * 1024)
#define MAX_CONN 1024
#define MAX_COMMAND 8192 /* sshrpc._exec.MAX_COMMAND */
#define MARKER "--subsystem"
#define PASS_FDS "--pass-fds"
#define REFUSED 3

struct buf {
    size_t start, end;
    unsigned char data[BUFFER];
};

static struct buf up, down; /* stdin -> node, node -> stdout */

static size_t buf_len(const struct buf *b) { return b->end - b->start; }

/* Room to read into at the end, moving the unsent bytes down if needed. */
static size_t buf_room(struct buf *b) {
    if (b->start == b->end) {
        b->start = b->end = 0;
    } else if (b->end == BUFFER && b->start > 0) {
        memmove(b->data, b->data + b->start, b->end - b->start);
        b->end -= b->start;
        b->start = 0;
    }
    return BUFFER - b->end;
}

static int write_all(int fd, const unsigned char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* The header (magic "SRLY", or "SRLF" when descriptors go with it) into
   head; its length. */
static unsigned char header[8 + MAX_AUTH + 1 + MAX_CONN + 6 + MAX_COMMAND + 1];

static size_t build_header(const char *command, const char *magic) {
    size_t n = 8;
    const char *path = getenv("SSH_USER_AUTH");
    if (path && *path) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            unsigned char auth[MAX_AUTH];
            size_t got = 0;
            while (got < MAX_AUTH) {
                ssize_t r = read(fd, auth + got, MAX_AUTH - got);
                if (r < 0 && errno == EINTR) continue;
                if (r <= 0) break;
                got += (size_t)r;
            }
            close(fd);
            for (size_t i = 0; i < got; i++)
                if (auth[i] != 0) header[n++] = auth[i];
        }
    }
    header[n++] = 0;
    const char *conn = getenv("SSH_CONNECTION");
    if (conn) {
        size_t len = strlen(conn);
        if (len > MAX_CONN) len = MAX_CONN;
        memcpy(header + n, conn, len);
        n += len;
    }
    if (command) {
        size_t len = strlen(command);
        if (len > MAX_COMMAND + 1) len = MAX_COMMAND + 1;
        memcpy(header + n, "\0exec\0", 6);
        n += 6;
        memcpy(header + n, command, len);
        n += len;
    }
    size_t body = n - 8;
    memcpy(header, magic, 4);
    header[4] = (unsigned char)(body >> 24);
    header[5] = (unsigned char)(body >> 16);
    header[6] = (unsigned char)(body >> 8);
    header[7] = (unsigned char)body;
    return n;
}

static int send_header(int sock, const char *command) {
    return write_all(sock, header, build_header(command, "SRLY"));
}

/* Is the last white-space separated word of text the marker? */
static int ends_with_marker(const char *text) {
    size_t end = strlen(text);
    while (end > 0 && strchr(" \t\n\r\v\f", text[end - 1])) end--;
    size_t start = end;
    while (start > 0 && !strchr(" \t\n\r\v\f", text[start - 1])) start--;
    return end - start == strlen(MARKER) && memcmp(text + start, MARKER, end - start) == 0;
}

static int connect_node(const char *path) {
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof addr.sun_path) {
        fprintf(stderr, "sshrpc relay: cannot reach the node at %s: %s\n", path,
                strerror(ENAMETOOLONG));
        return -1;
    }
    strcpy(addr.sun_path, path);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0) {
        fprintf(stderr, "sshrpc relay: cannot reach the node at %s: %s\n", path,
                strerror(errno));
        if (sock >= 0) close(sock);
        return -1;
    }
    return sock;
}

static int recv_exactly(int sock, unsigned char *p, size_t n) {
    while (n > 0) {
        ssize_t r = recv(sock, p, n, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

/* Copy n bytes from the node to fd: 0, or -1 when cut short, -2 on a write error. */
static int copy_out(int sock, size_t n, int fd) {
    while (n > 0) {
        size_t want = n < BUFFER ? n : BUFFER;
        ssize_t r = recv(sock, down.data, want, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        if (write_all(fd, down.data, (size_t)r) < 0) return -2;
        n -= (size_t)r;
    }
    return 0;
}

static size_t be32(const unsigned char *p) {
    return ((size_t)p[0] << 24) | ((size_t)p[1] << 16) | ((size_t)p[2] << 8) | (size_t)p[3];
}

/* Exec mode: the command goes to the node, its one answer comes back. */
static int exec_command(const char *path, const char *command) {
    int sock = connect_node(path);
    if (sock < 0) return 1;
    if (send_header(sock, command) < 0) {
        close(sock);
        return 1;
    }
    for (;;) {
        /* stdout watched for POLLHUP/POLLERR: the client went away, and
           closing the socket cancels the call. */
        struct pollfd fds[2] = {{sock, POLLIN, 0}, {1, 0, 0}};
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            close(sock);
            return 1;
        }
        if (fds[0].revents) break;
        if (fds[1].revents) {
            close(sock);
            return 1;
        }
    }
    unsigned char head[13];
    if (recv_exactly(sock, head, sizeof head) < 0 || memcmp(head, "SRLX", 4) != 0) {
        fputs("sshrpc relay: the node closed the channel without an answer\n", stderr);
        close(sock);
        return 1;
    }
    int status = head[4];
    int rc = copy_out(sock, be32(head + 5), 1);
    if (rc == 0) rc = copy_out(sock, be32(head + 9), 2);
    close(sock);
    if (rc == -1) {
        fputs("sshrpc relay: the node's answer was cut short\n", stderr);
        return 1;
    }
    return rc == 0 ? status : 1;
}

static int gone_errno(void) { return errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR; }


/* --- descriptor passing (--pass-fds) ---------------------------------------
 *
 * The relay sends the channel's descriptors to the node with the header
 * ("SRLF" instead of "SRLY", the descriptors attached with SCM_RIGHTS): fd 0
 * when sshd gave the channel as one socket on fd 0 and fd 1 (OpenSSH's
 * socketpair), fd 0 and fd 1 when they are pipes (OpenSSH built with
 * USE_PIPES).  The node answers one byte: 'F', it serves the channel on
 * them itself, or 'C', copy as usual (see src/sshrpc/_fdpass.py).  After 'F' the relay copies nothing: it
 * stays alive (sshd stops delivering the client's data once the subsystem
 * process exits) blocked in poll() on the node's socket and on fd 1, and
 * exits 0 when the node closes its socket (the node ended the channel) or
 * fd 1 reports POLLHUP/POLLERR (sshd closed the channel): closing the socket
 * tells the node the channel is gone, as the copying relay does.
 */

/* The descriptors to pass: 1 (fd 0) when fd 0 and fd 1 are the same socket,
   2 (fd 0 and fd 1) when both are pipes, 0 (copy) otherwise. */
static int channel_fds(void) {
    struct stat in, out;
    if (fstat(0, &in) < 0 || fstat(1, &out) < 0) return 0;
    if (S_ISSOCK(in.st_mode) && in.st_dev == out.st_dev && in.st_ino == out.st_ino) return 1;
    if (S_ISFIFO(in.st_mode) && S_ISFIFO(out.st_mode)) return 2;
    return 0;
}

/* Send the "SRLF" header with fds 0..count-1 attached.  0 when sent; -1 when sendmsg
   failed before sending anything (then nothing was sent: the caller may send
   a plain header instead); -2 when the socket failed midway. */
static int send_header_fds(int sock, int count) {
    size_t n = build_header(NULL, "SRLF");
    union {
        char buf[CMSG_SPACE(2 * sizeof(int))];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = {header, n};
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = CMSG_SPACE((size_t)count * sizeof(int));
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN((size_t)count * sizeof(int));
    int fds[2] = {0, 1};
    memcpy(CMSG_DATA(cmsg), fds, (size_t)count * sizeof(int));
    ssize_t w;
    do {
        w = sendmsg(sock, &msg, MSG_NOSIGNAL);
    } while (w < 0 && errno == EINTR);
    if (w < 0) return -1;
    return write_all(sock, header + w, n - (size_t)w) < 0 ? -2 : 0;
}

/* The node serves the channel on the passed socket: wait for the end. */
static int hold(int sock) {
    const short gone = POLLHUP | POLLERR | POLLNVAL;
    unsigned char scrap[256];
    for (;;) {
        struct pollfd fds[2] = {{sock, POLLIN, 0}, {1, 0, 0}};
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            break;
        }
        if (fds[0].revents) {
            ssize_t r = recv(sock, scrap, sizeof scrap, 0);
            if (r == 0 || (r < 0 && gone_errno())) break;
        }
        if (fds[1].revents & gone) break;
    }
    close(sock);
    return 0;
}

int main(int argc, char **argv) {
    int pass_fds = argc > 1 && strcmp(argv[1], PASS_FDS) == 0;
    if (pass_fds) {
        argv++;
        argc--;
    }
    if (!(argc == 2 || (argc == 3 && strcmp(argv[2], MARKER) == 0))) {
        fputs("usage: relay [" PASS_FDS "] SOCKET [" MARKER "]\n", stderr);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    const char *original = getenv("SSH_ORIGINAL_COMMAND");
    if (argc == 2 && !(original && ends_with_marker(original))) {
        if (original) return exec_command(argv[1], original);
        fputs("sshrpc relay: shell requests are refused; open the subsystem "
              "(ssh -s HOST sshrpc@k2r.org) or run one call: "
              "ssh HOST 'lists:reverse([1,2,3]).'\n",
              stderr);
        return REFUSED;
    }
    int sock = connect_node(argv[1]);
    if (sock < 0) return 1;
    int offered = 0;
    int count = pass_fds ? channel_fds() : 0;
    if (count) {
        int rc = send_header_fds(sock, count);
        if (rc == -2) return 0; /* the node went away at once */
        offered = rc == 0;
    }
    if (offered) {
        unsigned char verdict;
        if (recv_exactly(sock, &verdict, 1) < 0) return 0; /* the node went away */
        if (verdict == 'F') return hold(sock);
        /* 'C' (or anything else): copy as usual. */
    } else if (send_header(sock, NULL) < 0) {
        return 0; /* the node went away at once */
    }
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    fcntl(1, F_SETFL, fcntl(1, F_GETFL) | O_NONBLOCK);
    fcntl(sock, F_SETFL, fcntl(sock, F_GETFL) | O_NONBLOCK);
    int stdin_open = 1, node_open = 1;
    const short gone = POLLHUP | POLLERR | POLLNVAL;
    while (node_open || buf_len(&down)) {
        struct pollfd fds[3];
        int want_in = stdin_open && buf_room(&up) > 0;
        int want_node = node_open && buf_room(&down) > 0;
        fds[0].fd = want_in ? 0 : -1;
        fds[0].events = POLLIN;
        /* stdout is always watched: POLLHUP/POLLERR there means sshd closed
           the channel (the client is gone), even with nothing to write. */
        fds[1].fd = 1;
        fds[1].events = buf_len(&down) ? POLLOUT : 0;
        fds[2].events = (short)((want_node ? POLLIN : 0) | (buf_len(&up) ? POLLOUT : 0));
        fds[2].fd = fds[2].events ? sock : -1;
        if (poll(fds, 3, -1) < 0) {
            if (errno == EINTR) continue;
            break;
        }
        short in_ev = want_in ? fds[0].revents : 0;
        short out_ev = fds[1].revents;
        short sock_ev = fds[2].fd >= 0 ? fds[2].revents : 0;
        if (in_ev) {
            ssize_t r = read(0, up.data + up.end, BUFFER - up.end);
            if (r > 0) {
                up.end += (size_t)r;
            } else if (r == 0) {
                /* EOF from the client, which may still read: keep relaying
                   answers; the node learns the channel is gone when we close. */
                stdin_open = 0;
            } else if (gone_errno()) {
                break;
            }
        }
        if (want_node && (sock_ev & (POLLIN | gone))) {
            ssize_t r = recv(sock, down.data + down.end, BUFFER - down.end, 0);
            if (r > 0) {
                down.end += (size_t)r;
            } else if (r == 0) {
                node_open = 0;
            } else if (gone_errno()) {
                break;
            }
        }
        /* Bytes just read are offered at once (non-blocking), not after
           another poll: one wake-up per frame and direction. */
        if (buf_len(&up)) {
            ssize_t w = send(sock, up.data + up.start, buf_len(&up), MSG_NOSIGNAL);
            if (w > 0) {
                up.start += (size_t)w;
            } else if (w < 0 && gone_errno()) {
                break;
            }
        }
        if (buf_len(&down)) {
            ssize_t w = write(1, down.data + down.start, buf_len(&down));
            if (w > 0) {
                down.start += (size_t)w;
            } else if (w < 0 && gone_errno()) {
                break;
            }
        } else if (out_ev & gone) {
            break;
        }
    }
    close(sock);
    return 0;
}
