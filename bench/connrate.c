/*
 * connrate: the C side of the TCP benchmark, so that neither the load nor the
 * backend is what limits a proxy's numbers (a Python client tops out well
 * below HAProxy's connection rate on one core).
 *
 *   connrate serve STATUSFILE
 *       Echo server on 127.0.0.1, ephemeral port. Prints "port N" once
 *       listening; keeps "ACCEPTED OPEN" in STATUSFILE, so the harness can
 *       wait until a proxy has really connected its backend side.
 *   connrate load PORT SECONDS CONCURRENCY SIZE
 *       Keeps CONCURRENCY connections in flight for SECONDS: each connects,
 *       sends SIZE bytes, reads SIZE bytes back, checks them and closes.
 *       Prints one JSON line with the count.
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
    uint32_t off, len; /* unsent echo bytes in buf[off, len) */
    char buf[4096];
};

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

static int serve(const char *status_path) {
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
                    c->off = c->len = 0;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
                    accepted++;
                    open_++;
                }
                continue;
            }
            struct econn *c = evs[i].data.ptr;
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
            ssize_t w = write(c->fd, c->buf, (size_t)r);
            if (w < 0 && errno != EAGAIN) { econn_close(ep, c, &open_); continue; }
            if (w < 0) w = 0;
            if (w < r) {
                c->off = (uint32_t)w;
                c->len = (uint32_t)r;
                struct epoll_event cev = {.events = EPOLLOUT, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &cev);
            }
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
};

static char *payload, *rbuf;
static int size;
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
                ssize_t w = write(c->fd, payload, (size_t)size);
                if (w != size) { lerror("write", w < 0 ? errno : EIO); lfinish(ep, c, &to); continue; }
                c->state = READING;
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

int main(int argc, char **argv) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    signal(SIGPIPE, SIG_IGN);
    if (argc == 3 && !strcmp(argv[1], "serve")) return serve(argv[2]);
    if (argc == 6 && !strcmp(argv[1], "load")) {
        size = atoi(argv[5]);
        if (size <= 0) size = 64;
        payload = malloc((size_t)size);
        rbuf = malloc((size_t)size);
        for (int i = 0; i < size; i++) payload[i] = (char)('a' + i % 26);
        return load(atoi(argv[2]), atof(argv[3]), atoi(argv[4]));
    }
    if (argc == 6 && !strcmp(argv[1], "hold"))
        return hold(atoi(argv[2]), atoi(argv[3]), atof(argv[4]), argv[5]);
    fprintf(stderr,
            "usage: connrate serve STATUSFILE\n"
            "       connrate load PORT SECONDS CONCURRENCY SIZE\n"
            "       connrate hold PORT COUNT SECONDS STATUSFILE\n");
    return 2;
}
