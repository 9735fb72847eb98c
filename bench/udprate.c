/*
 * udprate: the C side of the UDP benchmark, so that neither the client nor
 * the backend is what limits a proxy's round-trip rate.
 *
 *   udprate serve
 *       Echo server on 127.0.0.1, ephemeral port: every datagram goes back
 *       to where it came from. Prints "port N" once bound.
 *   udprate load PORT SECONDS SIZE
 *       One datagram in flight: sends SIZE bytes (a sequence number first),
 *       waits for the echo, checks it, sends the next. A datagram not
 *       answered within 200 ms counts as lost and the next one goes out.
 *       Prints one JSON line: round trips, losses, errors, rate and the
 *       50th/99th percentile round-trip time.
 *
 * Both exit if their parent dies.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define LOSS_MS 200
#define HIST_US 20000 /* round-trip histogram, 1 us buckets; slower ones share the last */

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noreturn)) static void die(const char *what) {
    fprintf(stderr, "udprate: %s: %s\n", what, strerror(errno));
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

static int serve(void) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) die("socket");
    int buf = 4 << 20;
    setsockopt(s, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
    struct sockaddr_in a = loopback(0);
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    socklen_t alen = sizeof a;
    getsockname(s, (struct sockaddr *)&a, &alen);
    printf("port %d\n", ntohs(a.sin_port));
    fflush(stdout);
    char data[65536];
    for (;;) {
        struct sockaddr_in from;
        socklen_t flen = sizeof from;
        ssize_t n = recvfrom(s, data, sizeof data, 0, (struct sockaddr *)&from, &flen);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("recvfrom");
        }
        if (sendto(s, data, (size_t)n, 0, (struct sockaddr *)&from, flen) < 0 && errno != EAGAIN &&
            errno != ENOBUFS && errno != ECONNREFUSED)
            die("sendto");
    }
}

static unsigned hist[HIST_US + 1];

static int percentile_us(unsigned long long total, double p) {
    unsigned long long want = (unsigned long long)(total * p), seen = 0;
    for (int i = 0; i <= HIST_US; i++) {
        seen += hist[i];
        if (seen > want) return i;
    }
    return HIST_US;
}

static int load(int port, double seconds, int size) {
    if (size < 8 || size > 65000) size = 64;
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) die("socket");
    struct sockaddr_in to = loopback(port);
    /* Connected: only the proxy's answers arrive, and an ICMP error shows. */
    if (connect(s, (struct sockaddr *)&to, sizeof to) < 0) die("connect");
    char *out = malloc((size_t)size), *in = malloc((size_t)size + 1);
    for (int i = 0; i < size; i++) out[i] = (char)('a' + i % 26);

    unsigned long long done = 0, lost = 0, errors = 0, stale = 0, bad = 0;
    char first_error[128] = "";
    uint64_t seq = 0;
    double start = now(), end = start + seconds, t;
    while ((t = now()) < end) {
        seq++;
        memcpy(out, &seq, sizeof seq);
        /* Timed from before the send: on one core the echo can run inside it. */
        double sent = now();
        if (send(s, out, (size_t)size, 0) != size) {
            errors++;
            if (!first_error[0]) snprintf(first_error, sizeof first_error, "send: %s", strerror(errno));
            usleep(1000);
            continue;
        }
        for (;;) {
            int left = LOSS_MS - (int)((now() - sent) * 1000);
            struct pollfd p = {.fd = s, .events = POLLIN};
            if (left <= 0 || poll(&p, 1, left) == 0) {
                lost++;
                break;
            }
            ssize_t n = recv(s, in, (size_t)size + 1, 0);
            if (n < 0) {
                if (errno == EINTR || errno == EAGAIN) continue;
                errors++; /* ECONNREFUSED: nothing listens (yet) */
                if (!first_error[0]) snprintf(first_error, sizeof first_error, "recv: %s", strerror(errno));
                usleep(1000);
                break;
            }
            uint64_t got;
            memcpy(&got, in, sizeof got);
            if (n != size || got > seq) { bad++; continue; }
            if (got < seq) { stale++; continue; } /* the late answer to one counted lost */
            if (memcmp(in + 8, out + 8, (size_t)size - 8) != 0) { bad++; break; }
            double us = (now() - sent) * 1e6;
            hist[us >= HIST_US ? HIST_US : (int)us]++;
            done++;
            break;
        }
    }
    double elapsed = now() - start;
    printf("{\"round_trips\": %llu, \"lost\": %llu, \"errors\": %llu, \"stale\": %llu, \"bad\": %llu, "
           "\"seconds\": %.3f, \"rate\": %.1f, \"p50_us\": %d, \"p99_us\": %d, \"first_error\": \"%s\"}\n",
           done, lost, errors, stale, bad, elapsed, done / elapsed, percentile_us(done, 0.5),
           percentile_us(done, 0.99), first_error);
    return 0;
}

int main(int argc, char **argv) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    signal(SIGPIPE, SIG_IGN);
    if (argc == 2 && !strcmp(argv[1], "serve")) return serve();
    if (argc == 5 && !strcmp(argv[1], "load")) return load(atoi(argv[2]), atof(argv[3]), atoi(argv[4]));
    fprintf(stderr, "usage: udprate serve\n       udprate load PORT SECONDS SIZE\n");
    return 2;
}
