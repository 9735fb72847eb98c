/*
 * connrate: the C side of the TCP benchmark, so that neither the load nor the
 * backend is what limits a proxy's numbers (a Python client tops out well
 * below HAProxy's connection rate on one core).
 *
 *   connrate serve STATUSFILE [proxy]
 *       Echo server on 127.0.0.1, ephemeral port. Prints "port N" once
 *       listening; keeps "ACCEPTED OPEN" in STATUSFILE, so the harness can
 *       wait until a proxy has really connected its backend side. With
 *       "proxy", every connection must begin with a PROXY header (v1 or v2,
 *       HAProxy's proxy-protocol.txt), which is not echoed; a connection
 *       without one is closed, so the load sees errors.
 *   connrate load PORT SECONDS CONCURRENCY SIZE [v1|v2]
 *       Keeps CONCURRENCY connections in flight for SECONDS: each connects,
 *       sends SIZE bytes, reads SIZE bytes back, checks them and closes.
 *       Prints one JSON line with the count. With v1 or v2, each connection
 *       first sends a PROXY header naming its own address and port, as
 *       HAProxy's send-proxy does, in the same write as its bytes.
 *   connrate http PORT SECONDS CONCURRENCY PATH [v1|v2]
 *       The same with an HTTP/1.1 GET of PATH with "Connection: close" on
 *       each connection: one request per connection, read until the server
 *       closes; a completion is a response that began "HTTP/1.1 200 ".
 *   connrate hold PORT COUNT SECONDS STATUSFILE
 *       Opens COUNT idle connections, then holds them until stdin closes or
 *       SECONDS pass; prints "connected COUNT" once all are up and one JSON
 *       line at the end. At most 32 are opened ahead of what the backend
 *       (STATUSFILE, from "serve") has accepted: a client finishes its
 *       handshake long before a proxy accepts, and running ahead would
 *       overflow the proxy's listen backlog (Twisted's default is 50) and
 *       turn the test into one of SYN retransmits.
 *
 * Every mode is single-threaded epoll and exits if its parent dies.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXEV 256
#define LISTEN_TAG ((uint64_t)-1)
#define STDIN_TAG ((uint64_t)-2)

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "connrate: %s: %s\n", what, strerror(errno));
    exit(2);
}

static struct sockaddr_in loopback(int port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
}

/* ---- serve ------------------------------------------------------------- */

struct econn {
    int fd;
    int header;        /* a PROXY header is due and not yet whole: buf[0, len) holds its start */
    uint32_t off, len; /* unsent echo bytes in buf[off, len) */
    char buf[4096];
};

static const char V2_SIGNATURE[12] = {'\r', '\n', '\r', '\n', 0, '\r', '\n', 'Q', 'U', 'I', 'T', '\n'};
#define V1_MAX 107 /* the longest v1 header, CRLF included */

/* The length of the PROXY header at the start of b[0, n): > 0 whole, 0 not yet, -1 none. */
static int header_length(const char *b, uint32_t n, uint32_t room) {
    if (n > 0 && b[0] == '\r') {
        if (memcmp(b, V2_SIGNATURE, n < 12 ? n : 12)) return -1;
        if (n < 16) return 0;
        uint32_t total = 16 + ((uint32_t)(uint8_t)b[14] << 8 | (uint8_t)b[15]);
        if (total > room) return -1;
        return n >= total ? (int)total : 0;
    }
    if (memcmp(b, "PROXY ", n < 6 ? n : 6)) return -1;
    for (uint32_t i = 1; i < n && i < V1_MAX; i++)
        if (b[i - 1] == '\r' && b[i] == '\n') return (int)i + 1;
    return n >= V1_MAX ? -1 : 0;
}

static void write_status(int fd, unsigned long long accepted, unsigned long long open) {
    char line[64];
    int n = snprintf(line, sizeof line, "%20llu %20llu\n", accepted, open);
    if (pwrite(fd, line, (size_t)n, 0) < 0) die("status");
}

static void econn_close(int ep, struct econn *c, unsigned long long *open) {
    (void)ep; /* closing the only descriptor also takes it out of the epoll set */
    close(c->fd);
    free(c);
    (*open)--;
}

/* Echo buf[0, n) back; what the socket does not take now waits for EPOLLOUT. */
static void echo(int ep, struct econn *c, ssize_t n, unsigned long long *open) {
    ssize_t w = write(c->fd, c->buf, (size_t)n);
    if (w < 0 && errno != EAGAIN) { econn_close(ep, c, open); return; }
    if (w < 0) w = 0;
    if (w < n) {
        c->off = (uint32_t)w;
        c->len = (uint32_t)n;
        struct epoll_event cev = {.events = EPOLLOUT, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &cev);
    }
}

static int serve(const char *status_path, int proxy) {
    int status = open(status_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (status < 0) die("open status file");
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (ls < 0) die("socket");
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = loopback(0);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(ls, 4096) < 0) die("listen");
    socklen_t alen = sizeof a;
    getsockname(ls, (struct sockaddr *)&a, &alen);

    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = LISTEN_TAG};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);

    unsigned long long accepted = 0, open_ = 0, shown_a = 1, shown_o = 1;
    write_status(status, 0, 0);
    printf("port %d\n", ntohs(a.sin_port));
    fflush(stdout);

    struct epoll_event evs[MAXEV];
    double last = 0;
    for (;;) {
        int n = epoll_wait(ep, evs, MAXEV, 2);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u64 == LISTEN_TAG) {
                for (;;) {
                    int fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) {
                        if (errno == EAGAIN || errno == ECONNABORTED || errno == EINTR) break;
                        if (errno == EMFILE || errno == ENFILE) break;
                        die("accept");
                    }
                    struct econn *c = malloc(sizeof *c);
                    if (!c) die("malloc");
                    c->fd = fd;
                    c->header = proxy;
                    c->off = c->len = 0;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
                    accepted++;
                    open_++;
                }
                continue;
            }
            struct econn *c = evs[i].data.ptr;
            if (c->header) {
                ssize_t r = read(c->fd, c->buf + c->len, sizeof c->buf - c->len);
                if (r < 0 && errno == EAGAIN) continue;
                if (r <= 0) { econn_close(ep, c, &open_); continue; }
                c->len += (uint32_t)r;
                int h = header_length(c->buf, c->len, sizeof c->buf);
                if (h < 0) { econn_close(ep, c, &open_); continue; }
                if (h == 0) continue;
                uint32_t rest = c->len - (uint32_t)h;
                memmove(c->buf, c->buf + h, rest);
                c->header = 0;
                c->len = 0;
                if (rest > 0) echo(ep, c, rest, &open_);
                continue;
            }
            if (c->len > c->off) { /* waiting to finish an echo */
                ssize_t w = write(c->fd, c->buf + c->off, c->len - c->off);
                if (w < 0 && errno == EAGAIN) continue;
                if (w < 0) { econn_close(ep, c, &open_); continue; }
                c->off += (uint32_t)w;
                if (c->off < c->len) continue;
                c->off = c->len = 0;
                struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &cev);
                continue;
            }
            ssize_t r = read(c->fd, c->buf, sizeof c->buf);
            if (r < 0 && errno == EAGAIN) continue;
            if (r <= 0) { econn_close(ep, c, &open_); continue; }
            echo(ep, c, r, &open_);
        }
        double t = now();
        if (t - last >= 0.002 && (accepted != shown_a || open_ != shown_o)) {
            write_status(status, accepted, open_);
            shown_a = accepted;
            shown_o = open_;
            last = t;
        }
    }
    return 0;
}

/* ---- load -------------------------------------------------------------- */

enum { CONNECTING, READING };

struct lconn {
    int fd;
    int state;
    int got;
    int ok; /* http: the response began with a 200 status line */
};

static char *payload, *rbuf, *wbuf;
static int size, rbuf_size;
static int header_version; /* 1 or 2: a PROXY header of that version first; 0: none */
static int http_mode;      /* one GET per connection, read until the server closes */
static unsigned long long completed, errors;
static char first_error[128];

static void lerror(const char *what, int err) {
    errors++;
    if (!first_error[0]) snprintf(first_error, sizeof first_error, "%s: %s", what, strerror(err));
}

static void lstart(int ep, struct lconn *c, const struct sockaddr_in *to) {
    for (;;) {
        c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (c->fd < 0) die("socket");
        c->state = CONNECTING;
        c->got = 0;
        c->ok = 0;
        if (connect(c->fd, (const struct sockaddr *)to, sizeof *to) < 0 && errno != EINPROGRESS) {
            lerror("connect", errno);
            close(c->fd);
            if (errors > 1000000) die("too many connect errors");
            continue;
        }
        /* Edge-triggered, both ways: one epoll_ctl per connection. */
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.ptr = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
        return;
    }
}

/* The PROXY header HAProxy's send-proxy(-v2) would send for this connection, into out; its length. */
static int proxy_header(int fd, const struct sockaddr_in *to, char *out) {
    struct sockaddr_in me;
    socklen_t len = sizeof me;
    if (getsockname(fd, (struct sockaddr *)&me, &len) < 0) return -1;
    if (header_version == 1) {
        char src[INET_ADDRSTRLEN], dst[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &me.sin_addr, src, sizeof src);
        inet_ntop(AF_INET, &to->sin_addr, dst, sizeof dst);
        return sprintf(out, "PROXY TCP4 %s %s %u %u\r\n", src, dst, ntohs(me.sin_port), ntohs(to->sin_port));
    }
    memcpy(out, V2_SIGNATURE, 12);
    out[12] = 0x21; /* version 2, PROXY */
    out[13] = 0x11; /* TCP over IPv4 */
    out[14] = 0;
    out[15] = 12; /* two addresses and two ports */
    memcpy(out + 16, &me.sin_addr, 4);
    memcpy(out + 20, &to->sin_addr, 4);
    memcpy(out + 24, &me.sin_port, 2);
    memcpy(out + 26, &to->sin_port, 2);
    return 28;
}

static void lfinish(int ep, struct lconn *c, const struct sockaddr_in *to) {
    close(c->fd); /* also removes it from the epoll set */
    lstart(ep, c, to);
}

static int load(int port, double seconds, int conc) {
    struct sockaddr_in to = loopback(port);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct lconn *conns = calloc((size_t)conc, sizeof *conns);
    for (int i = 0; i < conc; i++) lstart(ep, &conns[i], &to);

    struct epoll_event evs[MAXEV];
    double start = now(), end = start + seconds, t = start;
    while ((t = now()) < end) {
        int ms = (int)((end - t) * 1000) + 1;
        int n = epoll_wait(ep, evs, MAXEV, ms > 100 ? 100 : ms);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            struct lconn *c = evs[i].data.ptr;
            uint32_t e = evs[i].events;
            if (c->state == CONNECTING) {
                if (!(e & (EPOLLOUT | EPOLLERR | EPOLLHUP))) continue;
                if (e & (EPOLLERR | EPOLLHUP)) {
                    int err = 0;
                    socklen_t el = sizeof err;
                    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
                    lerror("connect", err ? err : ECONNRESET);
                    lfinish(ep, c, &to);
                    continue;
                }
                int h = header_version ? proxy_header(c->fd, &to, wbuf) : 0;
                if (h < 0) { lerror("getsockname", errno); lfinish(ep, c, &to); continue; }
                memcpy(wbuf + h, payload, (size_t)size);
                ssize_t w = write(c->fd, wbuf, (size_t)(h + size));
                if (w != h + size) { lerror("write", w < 0 ? errno : EIO); lfinish(ep, c, &to); continue; }
                c->state = READING;
            }
            if (http_mode) { /* READING until the server closes */
                for (;;) {
                    ssize_t r = read(c->fd, rbuf, (size_t)rbuf_size);
                    if (r < 0 && errno == EAGAIN) break;
                    if (r < 0) { lerror("read", errno); lfinish(ep, c, &to); break; }
                    if (r == 0) {
                        if (c->ok) completed++;
                        else lerror(c->got ? "status" : "read", c->got ? EBADMSG : ECONNRESET);
                        lfinish(ep, c, &to);
                        break;
                    }
                    if (c->got == 0) c->ok = r >= 13 && !memcmp(rbuf, "HTTP/1.1 200 ", 13);
                    c->got += (int)r;
                }
                continue;
            }
            /* READING: drain what is there (edge-triggered). */
            for (;;) {
                ssize_t r = read(c->fd, rbuf + c->got, (size_t)(size - c->got));
                if (r < 0 && errno == EAGAIN) break;
                if (r < 0) { lerror("read", errno); lfinish(ep, c, &to); break; }
                if (r == 0) { lerror("read", ECONNRESET); lfinish(ep, c, &to); break; }
                c->got += (int)r;
                if (c->got == size) {
                    if (memcmp(rbuf, payload, (size_t)size) != 0) lerror("echo", EBADMSG);
                    else completed++;
                    lfinish(ep, c, &to);
                    break;
                }
            }
        }
    }
    double elapsed = now() - start;
    printf("{\"completed\": %llu, \"errors\": %llu, \"seconds\": %.3f, \"rate\": %.1f, "
           "\"first_error\": \"%s\"}\n",
           completed, errors, elapsed, completed / elapsed, first_error);
    return 0;
}

/* ---- hold -------------------------------------------------------------- */

#define HOLD_AHEAD_MAX 32

/* Connections the backend holds now, from its status file; -1 if unreadable. */
static long long backend_open(int fd) {
    char line[64];
    ssize_t n = pread(fd, line, sizeof line - 1, 0);
    if (n <= 0) return -1;
    line[n] = 0;
    unsigned long long accepted, open_;
    if (sscanf(line, "%llu %llu", &accepted, &open_) != 2) return -1;
    return (long long)open_;
}

static int hold(int port, int count, double seconds, const char *status_path) {
    int status = open(status_path, O_RDONLY);
    if (status < 0) die("open status file");
    long long base = backend_open(status), seen = 0;
    if (base < 0) base = 0;
    struct sockaddr_in to = loopback(port);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    int *state = calloc((size_t)count, sizeof *state); /* 0 idle, 1 connecting, 2 up, 3 lost */
    int *fds = calloc((size_t)count, sizeof *fds);
    int next = 0, up = 0, lost = 0, failed = 0, announced = 0;
    struct epoll_event sev = {.events = EPOLLIN, .data.u64 = STDIN_TAG};
    int stdin_ok = epoll_ctl(ep, EPOLL_CTL_ADD, 0, &sev) == 0;

    struct epoll_event evs[MAXEV];
    double start = now(), end = start + seconds;
    int stop = 0;
    while (!stop && now() < end) {
        long long b = backend_open(status);
        if (b >= 0) seen = b - base;
        while (next < count && next - seen < HOLD_AHEAD_MAX) {
            int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            if (fd < 0) die("socket");
            if (connect(fd, (struct sockaddr *)&to, sizeof to) < 0 && errno != EINPROGRESS) {
                failed++;
                close(fd);
                break; /* try again after the next wait */
            }
            fds[next] = fd;
            state[next] = 1;
            struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP, .data.u64 = (uint64_t)next};
            epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
            next++;
        }
        if (!announced && up == count) {
            printf("connected %d\n", up);
            fflush(stdout);
            announced = 1;
        }
        int n = epoll_wait(ep, evs, MAXEV, next < count ? 2 : 100);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            uint64_t k = evs[i].data.u64;
            if (k == STDIN_TAG) {
                char b[64];
                if (read(0, b, sizeof b) <= 0) stop = 1;
                continue;
            }
            uint32_t e = evs[i].events;
            if (state[k] == 1) {
                int err = 0;
                socklen_t el = sizeof err;
                getsockopt(fds[k], SOL_SOCKET, SO_ERROR, &err, &el);
                if (err || (e & (EPOLLERR | EPOLLHUP))) {
                    /* Refused or reset while connecting: open it again. */
                    failed++;
                    epoll_ctl(ep, EPOLL_CTL_DEL, fds[k], NULL);
                    close(fds[k]);
                    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
                    if (fd < 0) die("socket");
                    connect(fd, (struct sockaddr *)&to, sizeof to);
                    fds[k] = fd;
                    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP, .data.u64 = k};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                    continue;
                }
                state[k] = 2;
                up++;
                struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u64 = k};
                epoll_ctl(ep, EPOLL_CTL_MOD, fds[k], &ev);
            } else if (state[k] == 2 && (e & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) {
                /* An idle connection has nothing to read: the far side gave up on it. */
                state[k] = 3;
                up--;
                lost++;
                epoll_ctl(ep, EPOLL_CTL_DEL, fds[k], NULL);
            }
        }
        if (!stdin_ok && announced) stop = 1;
    }
    for (int i = 0; i < next; i++) close(fds[i]);
    printf("{\"up\": %d, \"lost\": %d, \"failed\": %d, \"announced\": %d}\n", up, lost, failed, announced);
    return announced ? 0 : 1;
}

/* v1 or v2 as the optional last argument of load and http: the header version; -1 if neither. */
static int version_arg(int argc, char **argv) {
    if (argc == 6) return 0;
    if (!strcmp(argv[6], "v1")) return 1;
    if (!strcmp(argv[6], "v2")) return 2;
    return -1;
}

int main(int argc, char **argv) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    signal(SIGPIPE, SIG_IGN);
    if (argc == 3 && !strcmp(argv[1], "serve")) return serve(argv[2], 0);
    if (argc == 4 && !strcmp(argv[1], "serve") && !strcmp(argv[3], "proxy")) return serve(argv[2], 1);
    if ((argc == 6 || argc == 7) && (!strcmp(argv[1], "load") || !strcmp(argv[1], "http"))
        && (header_version = version_arg(argc, argv)) >= 0) {
        http_mode = !strcmp(argv[1], "http");
        if (http_mode) {
            size_t n = strlen(argv[5]) + 64;
            payload = malloc(n);
            size = snprintf(payload, n, "GET %s HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n", argv[5]);
            rbuf_size = 65536;
        } else {
            size = atoi(argv[5]);
            if (size <= 0) size = 64;
            payload = malloc((size_t)size);
            for (int i = 0; i < size; i++) payload[i] = (char)('a' + i % 26);
            rbuf_size = size;
        }
        rbuf = malloc((size_t)rbuf_size);
        wbuf = malloc((size_t)size + 128); /* a v1 header is at most 107 bytes, v2 here 28 */
        return load(atoi(argv[2]), atof(argv[3]), atoi(argv[4]));
    }
    if (argc == 6 && !strcmp(argv[1], "hold"))
        return hold(atoi(argv[2]), atoi(argv[3]), atof(argv[4]), argv[5]);
    fprintf(stderr,
            "usage: connrate serve STATUSFILE [proxy]\n"
            "       connrate load PORT SECONDS CONCURRENCY SIZE [v1|v2]\n"
            "       connrate http PORT SECONDS CONCURRENCY PATH [v1|v2]\n"
            "       connrate hold PORT COUNT SECONDS STATUSFILE\n");
    return 2;
}
