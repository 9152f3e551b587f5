/* hvkit-vsock: AF_VSOCK stream client and server for hvkit's Linux guests.
 *
 *   hvkit-vsock connect CID PORT   connect to CID:PORT (the host is CID 2)
 *   hvkit-vsock listen PORT        accept one connection on PORT
 *   hvkit-vsock echo PORT [N]      accept N connections (default 1), one
 *                                  after another, and send each its bytes back
 *
 * connect and listen copy stdin to the stream and the stream to stdout; at
 * the end of stdin the sending side is shut down, and the tool exits when
 * the peer closes. The servers print "hvkit-vsock: listening on PORT" to
 * stderr once the port is bound, so a script can start one in the
 * background and wait for it. busybox has no vsock applet; this is static
 * with no libc, like hvkit-poweroff, so it runs in any initramfs.
 * Exit status: 0 done, 1 a system call failed (named with its errno), 2 usage. */
#include "syscall.h"

#define SYS_read 0
#define SYS_close 3
#define SYS_poll 7
#define SYS_socket 41
#define SYS_connect 42
#define SYS_accept 43
#define SYS_shutdown 48
#define SYS_bind 49
#define SYS_listen 50

#define AF_VSOCK 40
#define SOCK_STREAM 1
#define SHUT_WR 1
#define VMADDR_CID_ANY 0xFFFFFFFFu
#define POLLIN 0x001
#define POLLERR 0x008
#define POLLHUP 0x010
#define EINTR 4
#define EAGAIN 11

struct sockaddr_vm {
    unsigned short svm_family;
    unsigned short svm_reserved1;
    unsigned int svm_port;
    unsigned int svm_cid;
    unsigned char svm_flags;
    unsigned char svm_zero[3];
};

struct pollfd {
    int fd;
    short events;
    short revents;
};

static char *fmt_uint(char *end, unsigned long v)
{
    *--end = 0;
    do {
        *--end = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return end;
}

static __attribute__((noreturn)) void die(const char *what, long err)
{
    char num[24];
    say("hvkit-vsock: ");
    say(what);
    say(" failed: errno ");
    say(fmt_uint(num + sizeof(num), (unsigned long)-err));
    say("\n");
    sys3(SYS_exit, 1, 0, 0);
    __builtin_unreachable();
}

static __attribute__((noreturn)) void usage(void)
{
    say("usage: hvkit-vsock connect CID PORT | listen PORT | echo PORT [N]\n");
    sys3(SYS_exit, 2, 0, 0);
    __builtin_unreachable();
}

static int parse_u32(const char *s, unsigned int *out)
{
    unsigned long v = 0;
    if (!*s)
        return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        v = v * 10 + (unsigned long)(*s - '0');
        if (v > 0xFFFFFFFFul)
            return -1;
    }
    *out = (unsigned int)v;
    return 0;
}

static int streq(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

static void vsock_addr(struct sockaddr_vm *sa, unsigned int cid, unsigned int port)
{
    unsigned char *p = (unsigned char *)sa;
    for (unsigned long i = 0; i < sizeof(*sa); i++)
        p[i] = 0;
    sa->svm_family = AF_VSOCK;
    sa->svm_port = port;
    sa->svm_cid = cid;
}

static int new_socket(void)
{
    long fd = sys3(SYS_socket, AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0)
        die("socket(AF_VSOCK)", fd);
    return (int)fd;
}

/* All of buf to fd; 0, or a negative errno. */
static long write_all(int fd, const char *buf, long n)
{
    while (n > 0) {
        long w = sys3(SYS_write, fd, (long)buf, n);
        if (w == -EINTR || w == -EAGAIN)
            continue;
        if (w < 0)
            return w;
        buf += w;
        n -= w;
    }
    return 0;
}

static char buf[64 << 10];

/* Copy between the stream and (in, out) until the peer closes; in < 0
 * means echo: what arrives goes back on the stream. */
static void pump(int sock, int in, int out)
{
    int in_open = in >= 0;
    for (;;) {
        struct pollfd fds[2];
        fds[0].fd = sock;
        fds[0].events = POLLIN;
        fds[0].revents = 0;
        fds[1].fd = in_open ? in : -1;
        fds[1].events = POLLIN;
        fds[1].revents = 0;
        long r = sys3(SYS_poll, (long)fds, 2, -1);
        if (r == -EINTR)
            continue;
        if (r < 0)
            die("poll", r);
        if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
            long n = sys3(SYS_read, sock, (long)buf, sizeof(buf));
            if (n == -EINTR || n == -EAGAIN)
                continue;
            if (n < 0)
                die("read from the stream", n);
            if (n == 0)
                return;                     /* the peer closed */
            long w = write_all(in >= 0 ? out : sock, buf, n);
            if (w < 0)
                die(in >= 0 ? "write to stdout" : "write to the stream", w);
        }
        if (in_open && fds[1].revents & (POLLIN | POLLHUP | POLLERR)) {
            long n = sys3(SYS_read, in, (long)buf, sizeof(buf));
            if (n == -EINTR || n == -EAGAIN)
                continue;
            if (n < 0)
                die("read from stdin", n);
            if (n == 0) {
                in_open = 0;
                sys3(SYS_shutdown, sock, SHUT_WR, 0);
                continue;
            }
            long w = write_all(sock, buf, n);
            if (w < 0)
                die("write to the stream", w);
        }
    }
}

static int listen_on(unsigned int port)
{
    struct sockaddr_vm sa;
    char num[16];
    int s = new_socket();
    vsock_addr(&sa, VMADDR_CID_ANY, port);
    long r = sys3(SYS_bind, s, (long)&sa, sizeof(sa));
    if (r < 0)
        die("bind", r);
    r = sys3(SYS_listen, s, 8, 0);
    if (r < 0)
        die("listen", r);
    say("hvkit-vsock: listening on ");
    say(fmt_uint(num + sizeof(num), port));
    say("\n");
    return s;
}

static int accept_one(int s)
{
    for (;;) {
        long c = sys3(SYS_accept, s, 0, 0);
        if (c == -EINTR)
            continue;
        if (c < 0)
            die("accept", c);
        return (int)c;
    }
}

__attribute__((used)) void start_c(long *sp)
{
    long argc = sp[0];
    char **argv = (char **)(sp + 1);
    unsigned int cid, port, count = 1;
    if (argc < 3)
        usage();
    if (streq(argv[1], "connect")) {
        if (argc != 4 || parse_u32(argv[2], &cid) || parse_u32(argv[3], &port))
            usage();
        struct sockaddr_vm sa;
        int s = new_socket();
        vsock_addr(&sa, cid, port);
        long r = sys3(SYS_connect, s, (long)&sa, sizeof(sa));
        if (r < 0)
            die("connect", r);
        pump(s, 0, 1);
    } else if (streq(argv[1], "listen")) {
        if (argc != 3 || parse_u32(argv[2], &port))
            usage();
        int s = listen_on(port);
        int c = accept_one(s);
        sys3(SYS_close, s, 0, 0);
        pump(c, 0, 1);
    } else if (streq(argv[1], "echo")) {
        if (argc > 4 || parse_u32(argv[2], &port) || (argc == 4 && parse_u32(argv[3], &count)))
            usage();
        int s = listen_on(port);
        for (unsigned int i = 0; i < count; i++) {
            int c = accept_one(s);
            pump(c, -1, -1);
            sys3(SYS_close, c, 0, 0);
        }
    } else {
        usage();
    }
    sys3(SYS_exit, 0, 0, 0);
}

TOOL_ENTRY;
