/*
 * loadgen.c - the benchmark's load generator: one thread, one epoll set.
 *
 * One transaction is: a non-blocking connect, read until EOF, compare the
 * bytes with the expected greeting, close.  CONCURRENCY transactions are in
 * flight at all times; a finished slot starts its next connection at once.
 * It is written in C so that, on loopback, the thing that runs out of CPU
 * first is the server under test rather than the client.
 *
 * usage: loadgen HOST PORT CONCURRENCY SECONDS [-e HEX] [-t TIMEOUT_MS] [-c]
 *   HOST        a numeric loopback address (127.0.0.0/8 or ::1); nothing else
 *   -e HEX      the expected greeting, hex-encoded
 *               (default: "Thank you for connecting\r\n")
 *   -t MS       per-connection limit, connect start to EOF (default 5000)
 *   -c          close normally instead of with SO_LINGER {1, 0}
 *
 * Why SO_LINGER {1, 0} by default: the server closes first, so a normal
 * client close would leave each connection in TIME_WAIT on the server side
 * for 60 s.  At tens of thousands of connections a second that state piles
 * up over a run (and across runs), so later measurements would pay for
 * earlier ones.  An abortive close resets the server's already closed,
 * half-dead socket instead: the server process has finished with it by then.
 *
 * Prints one JSON object on a line to stdout: the greetings received whole,
 * errors by kind, and connect-to-EOF latency percentiles.  The run ends
 * SECONDS after it starts whatever the server does; connections still in
 * flight then are counted as "abandoned", not as errors.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_GREETING "Thank you for connecting\r\n"

/* ---- latency histogram ------------------------------------------------
 * Log-linear buckets in nanoseconds: values below 2*STEPS are exact, above
 * that each power of two is split into STEPS equal buckets, so a reported
 * percentile is within 1/STEPS (1.6%) of the true value, in fixed memory
 * and without allocating during the run. */
#define STEP_BITS 6
#define STEPS (1 << STEP_BITS)
#define EXACT (2 * STEPS)
#define POWERS 42 /* up to 2^48 ns, about three days */
#define BUCKETS (EXACT + POWERS * STEPS)

static uint64_t histogram[BUCKETS];
static uint64_t samples, slowest_ns;

static int bucket_index(uint64_t ns) {
    if (ns < EXACT) return (int)ns;
    int shift = (63 - __builtin_clzll(ns)) - STEP_BITS; /* >= 1 */
    int index = EXACT + (shift - 1) * STEPS + (int)((ns >> shift) - STEPS);
    return index < BUCKETS ? index : BUCKETS - 1;
}

static uint64_t bucket_low(int index) {
    if (index < EXACT) return (uint64_t)index;
    int shift = (index - EXACT) / STEPS + 1;
    return (uint64_t)((index - EXACT) % STEPS + STEPS) << shift;
}

static void record_latency(uint64_t ns) {
    histogram[bucket_index(ns)]++;
    samples++;
    if (ns > slowest_ns) slowest_ns = ns;
}

/* Nearest-rank percentile, reported as the middle of its bucket. */
static double percentile_ms(unsigned per_mille) {
    if (samples == 0) return 0.0;
    uint64_t rank = (samples * per_mille + 999) / 1000;
    if (rank == 0) rank = 1;
    uint64_t seen = 0;
    for (int i = 0; i < BUCKETS; i++) {
        seen += histogram[i];
        if (seen >= rank) {
            uint64_t low = bucket_low(i);
            uint64_t high = i + 1 < BUCKETS ? bucket_low(i + 1) : low + 1;
            uint64_t middle = low + (high - low) / 2;
            return (double)(middle < slowest_ns ? middle : slowest_ns) / 1e6;
        }
    }
    return (double)slowest_ns / 1e6;
}

/* ---- errors ----------------------------------------------------------- */
enum error_kind { REFUSED, RESET, TIMEOUT, SHORT, WRONG, ADDRNOTAVAIL, OTHER, KINDS };
static const char *const kind_names[KINDS] = {
    "refused", "reset", "timeout", "short", "wrong", "addrnotavail", "other"};
static uint64_t errors[KINDS];
static int other_errno;

static enum error_kind kind_of(int e) {
    switch (e) {
    case ECONNREFUSED: return REFUSED;
    case ECONNRESET: case EPIPE: return RESET;
    case ETIMEDOUT: return TIMEOUT;
    case EADDRNOTAVAIL: case EADDRINUSE: return ADDRNOTAVAIL;
    default: other_errno = e; return OTHER;
    }
}

/* ---- connections -------------------------------------------------------
 * Every connection has the same time limit, so the list of connections in
 * flight, kept in start order, is also their order of expiry: timeouts are
 * found at its head without a heap. */
struct slot {
    int fd;                   /* -1 while idle */
    uint64_t started_ns;
    uint32_t received;
    unsigned char *buffer;    /* expected_length + 1: one byte too many is wrong */
    struct slot *older, *newer;
};

static struct slot *slots, *oldest, *newest;
static int concurrency, idle;
static struct sockaddr_storage target;
static socklen_t target_length;
static unsigned char *expected;
static size_t expected_length;
static int abortive_close = 1;
static int epoll_fd;
static uint64_t started, greeted;
static const struct linger ABORT = {1, 0};

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void unlink_slot(struct slot *s) {
    if (s->older) s->older->newer = s->newer; else oldest = s->newer;
    if (s->newer) s->newer->older = s->older; else newest = s->older;
    s->older = s->newer = NULL;
}

static void finish(struct slot *s) {
    close(s->fd); /* also leaves the epoll set */
    s->fd = -1;
    unlink_slot(s);
    idle++;
}

static void fail(struct slot *s, enum error_kind kind) {
    errors[kind]++;
    finish(s);
}

/* Returns -1 only on a local failure that makes going on pointless. */
static int start(struct slot *s) {
    int fd = socket(target.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
            errors[OTHER]++;
            other_errno = errno;
            return 0; /* the slot stays idle and is retried on the next pass */
        }
        perror("loadgen: socket");
        return -1;
    }
    if (abortive_close) setsockopt(fd, SOL_SOCKET, SO_LINGER, &ABORT, sizeof ABORT);
    s->fd = fd;
    s->received = 0;
    s->started_ns = now_ns();
    s->newer = NULL;
    s->older = newest;
    if (newest) newest->newer = s; else oldest = s;
    newest = s;
    idle--;
    started++;
    if (connect(fd, (struct sockaddr *)&target, target_length) < 0 && errno != EINPROGRESS) {
        fail(s, kind_of(errno));
        return 0;
    }
    /* A refused connect shows as EPOLLERR; a greeting and its FIN as
     * EPOLLIN|EPOLLRDHUP.  Nothing is ever written, so no EPOLLOUT. */
    struct epoll_event event = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = s};
    if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &event) < 0) {
        perror("loadgen: epoll_ctl");
        return -1;
    }
    return 0;
}

static void check_and_finish(struct slot *s, uint64_t now) {
    if (s->received < expected_length) fail(s, SHORT);
    else if (s->received > expected_length || memcmp(s->buffer, expected, expected_length))
        fail(s, WRONG);
    else {
        greeted++;
        record_latency(now - s->started_ns);
        finish(s);
    }
}

static void on_event(struct slot *s, uint32_t events, uint64_t now) {
    if (events & EPOLLERR) {
        int e = 0;
        socklen_t size = sizeof e;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &e, &size);
        fail(s, kind_of(e ? e : ECONNRESET));
        return;
    }
    for (;;) {
        size_t room = expected_length + 1 - s->received;
        ssize_t n = read(s->fd, s->buffer + s->received, room);
        if (n == 0) {
            check_and_finish(s, now);
            return;
        }
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) return; /* more to come */
            fail(s, kind_of(errno));
            return;
        }
        s->received += (uint32_t)n;
        if (s->received > expected_length) {
            fail(s, WRONG);
            return;
        }
        /* The peer's FIN was already queued when epoll reported it, behind
         * all of its data: a read that did not fill the room emptied the
         * queue, so it is EOF, and the read() that would say so is saved. */
        if ((events & EPOLLRDHUP) && (size_t)n < room) {
            check_and_finish(s, now);
            return;
        }
    }
}

/* ---- arguments -------------------------------------------------------- */
static void usage(void) {
    fprintf(stderr, "usage: loadgen HOST PORT CONCURRENCY SECONDS "
                    "[-e HEX] [-t TIMEOUT_MS] [-c]\n");
    exit(2);
}

static int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static void set_expected(const char *hex) {
    size_t digits = strlen(hex);
    if (digits % 2) usage();
    expected_length = digits / 2;
    expected = malloc(expected_length + 1);
    for (size_t i = 0; i < expected_length; i++) {
        int high = hex_value(hex[2 * i]), low = hex_value(hex[2 * i + 1]);
        if (high < 0 || low < 0) usage();
        expected[i] = (unsigned char)(high * 16 + low);
    }
}

/* Loopback only: this tool opens connections as fast as the host allows. */
static void set_target(const char *host, long port) {
    struct sockaddr_in *v4 = (struct sockaddr_in *)&target;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&target;
    memset(&target, 0, sizeof target);
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        target_length = sizeof *v4;
        if ((ntohl(v4->sin_addr.s_addr) >> 24) == 127) return;
    } else if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        target_length = sizeof *v6;
        if (IN6_IS_ADDR_LOOPBACK(&v6->sin6_addr)) return;
    }
    fprintf(stderr, "loadgen: %s is not a numeric loopback address "
                    "(127.0.0.0/8 or ::1); refusing\n", host);
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 5) usage();
    char *end;
    long port = strtol(argv[2], &end, 10);
    if (*end || port < 1 || port > 65535) usage();
    concurrency = (int)strtol(argv[3], &end, 10);
    if (*end || concurrency < 1 || concurrency > 100000) usage();
    double seconds = strtod(argv[4], &end);
    if (*end || !(seconds > 0 && seconds <= 86400)) usage();
    long timeout_ms = 5000;
    const char *expected_hex = NULL;
    for (int i = 5; i < argc; i++) {
        if (!strcmp(argv[i], "-c")) abortive_close = 0;
        else if (!strcmp(argv[i], "-e") && i + 1 < argc) expected_hex = argv[++i];
        else if (!strcmp(argv[i], "-t") && i + 1 < argc) {
            timeout_ms = strtol(argv[++i], &end, 10);
            if (*end || timeout_ms < 1) usage();
        } else usage();
    }
    set_target(argv[1], port);
    if (expected_hex) set_expected(expected_hex);
    else {
        expected_length = strlen(DEFAULT_GREETING);
        expected = (unsigned char *)DEFAULT_GREETING;
    }

    struct rlimit files;
    rlim_t wanted = (rlim_t)concurrency + 32;
    if (getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < wanted) {
        files.rlim_cur = files.rlim_max < wanted ? files.rlim_max : wanted;
        setrlimit(RLIMIT_NOFILE, &files);
    }
    epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (epoll_fd < 0) {
        perror("loadgen: epoll_create1");
        return 1;
    }
    slots = calloc((size_t)concurrency, sizeof *slots);
    unsigned char *buffers = malloc((size_t)concurrency * (expected_length + 1));
    if (!slots || !buffers) {
        perror("loadgen: malloc");
        return 1;
    }
    for (int i = 0; i < concurrency; i++) {
        slots[i].fd = -1;
        slots[i].buffer = buffers + (size_t)i * (expected_length + 1);
    }
    idle = concurrency;

    const uint64_t timeout_ns = (uint64_t)timeout_ms * 1000000u;
    const uint64_t begin = now_ns();
    const uint64_t deadline = begin + (uint64_t)(seconds * 1e9);
    enum { BATCH = 256 };
    struct epoll_event events[BATCH];
    uint64_t now = begin;

    while (now < deadline) {
        /* Slots left idle by a failed start (say, no local port free) are
         * retried once per pass, not in a tight loop. */
        for (int i = 0; i < concurrency && idle > 0; i++)
            if (slots[i].fd < 0 && start(&slots[i]) < 0) return 1;

        uint64_t wake = deadline;
        if (oldest && oldest->started_ns + timeout_ns < wake) wake = oldest->started_ns + timeout_ns;
        int wait_ms = idle > 0 ? 1 : wake <= now ? 0 : (int)((wake - now + 999999) / 1000000);
        if (wait_ms > 100) wait_ms = 100;

        int n = epoll_wait(epoll_fd, events, BATCH, wait_ms);
        if (n < 0 && errno != EINTR) {
            perror("loadgen: epoll_wait");
            return 1;
        }
        /* One clock reading per batch: the moment the results became known. */
        now = now_ns();
        for (int i = 0; i < n; i++) {
            struct slot *s = events[i].data.ptr;
            if (s->fd < 0) continue;
            on_event(s, events[i].events, now);
            if (s->fd < 0 && now < deadline && start(s) < 0) return 1;
        }
        /* started_ns can be later than this batch's reading (slots restarted
         * above), so compare without subtracting. */
        while (oldest && oldest->started_ns + timeout_ns <= now) fail(oldest, TIMEOUT);
    }

    double elapsed = (double)(now - begin) / 1e9;
    uint64_t abandoned = 0;
    while (oldest) { /* dropped with a reset: nothing left in TIME_WAIT */
        struct slot *s = oldest;
        if (!abortive_close) setsockopt(s->fd, SOL_SOCKET, SO_LINGER, &ABORT, sizeof ABORT);
        finish(s);
        abandoned++;
    }

    uint64_t error_total = 0;
    printf("{\"loadgen\":\"c\",\"greeted\":%llu,\"errors\":{", (unsigned long long)greeted);
    for (int k = 0; k < KINDS; k++) {
        printf("%s\"%s\":%llu", k ? "," : "", kind_names[k], (unsigned long long)errors[k]);
        error_total += errors[k];
    }
    printf("},\"errors_total\":%llu,", (unsigned long long)error_total);
    if (errors[OTHER]) printf("\"other_error\":\"%s\",", strerror(other_errno));
    printf("\"seconds\":%.6f,\"started\":%llu,\"abandoned\":%llu,\"concurrency\":%d,"
           "\"close\":\"%s\",\"p50_ms\":%.4f,\"p90_ms\":%.4f,\"p99_ms\":%.4f,\"max_ms\":%.4f}\n",
           elapsed, (unsigned long long)started, (unsigned long long)abandoned, concurrency,
           abortive_close ? "abort" : "normal", percentile_ms(500), percentile_ms(900),
           percentile_ms(990), (double)slowest_ns / 1e6);
    return 0;
}
