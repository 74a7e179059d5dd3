/*
 * benchclient: the load generators and servers of kmirror's benchmark harness
 * (tests/bench/harness.rs builds it with `cc -O2 -pthread` into target/bench/).
 *
 * Every client mode prints its results as `key=value` lines on stdout and exits 0;
 * any failure prints `error=...` on stderr and exits 1. Times are nanoseconds.
 *
 * Clients:
 *   notifyfloor N [PATH]   getppid N times plainly, then N times trapped by a seccomp
 *                          user-notify filter whose supervisor (a thread of the parent)
 *                          answers CONTINUE with SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP set;
 *                          with PATH, open(PATH) + close instead, openat being trapped
 *   openloop N PATH        open(PATH) + close, N times
 *   vmread N PATH          process_vm_readv of PATH's 256-byte buffer from a forked child,
 *                          N times: what reading a trapped call's path costs a supervisor
 *   pipeloop N [allow-all-filter]  write 1 byte + read 1 byte on a pipe, N times
 *                          (optionally under a seccomp filter that allows everything)
 *   connectloop N IP PORT  connect, write 1 byte, read the echo, close; N times
 *   pingpong N IP PORT     one connection, N 1-byte round trips
 *   bulk BYTES IP PORT     stream BYTES to a sink, wait for its close, report bytes/s
 *   connectchain N IP PORT  `connectloop` through a minimal chain of a redirected connect's
 *                          shape, built in this process: the app thread hands its socket to
 *                          a supervisor thread (as a trapped connect does), which asks an
 *                          agent thread over a Unix socket pair to dial IP:PORT, then
 *                          connects the socket to its own loopback listener, accepts, answers
 *                          the app, and relays the echo through the agent. Blocking threads,
 *                          one connection at a time: a lower bound for kmirror's connect.
 *   pingchain N IP PORT    `pingpong` over one connection made through the same chain: each
 *                          byte crosses the supervisor and agent threads both ways, as it
 *                          crosses kmirror and its agent. A lower bound for kmirror's round trip.
 *   relaychain BYTES IP PORT  `bulk` through a minimal relay chain of the tunnel's shape,
 *                          built in this process: a loopback TCP hop into a relay thread
 *                          that splices length-framed payloads into a Unix socket pair, and
 *                          a relay thread that splices them out to IP:PORT. Blocking threads,
 *                          no multiplexing, no flow control: an upper bound for kmirror.
 *   hold N IP PORT         open N connections (each checked with a 1-byte echo),
 *                          print `ready`, wait for EOF on stdin
 *   burst RATE SECS IP PORT  short connections at RATE/s for SECS seconds, each sending
 *                          a self-describing payload (`KM <id> <len>\n` + pattern) and
 *                          expecting `ok\n` then EOF (the serve-reply protocol)
 * Servers (on PORT of every address, or on IP:PORT; print `listening PORT` once ready):
 *   serve-echo PORT [verbose]   epoll echo; verbose prints `accept` per connection
 *   serve-sink PORT             reads and discards; closes at EOF
 *   serve-reply PORT            reads one burst payload, answers `ok\n`, closes first
 *   serve-count PORT            reads each connection to EOF and prints
 *                               `conn id=<id> ok=<0|1> bytes=<n>` after checking the
 *                               burst payload
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SECCOMP_FILTER_FLAG_NEW_LISTENER
#define SECCOMP_FILTER_FLAG_NEW_LISTENER (1UL << 3)
#endif
#ifndef SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
#define SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV (1UL << 5)
#endif
#ifndef SECCOMP_USER_NOTIF_FLAG_CONTINUE
#define SECCOMP_USER_NOTIF_FLAG_CONTINUE (1UL << 0)
#endif
#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS _IOW('!', 4, __u64)
#endif
#define SYNC_WAKE_UP 1ULL

static void die(const char *what) {
    fprintf(stderr, "error=%s: %s\n", what, strerror(errno));
    exit(1);
}

static void fail(const char *what) {
    fprintf(stderr, "error=%s\n", what);
    exit(1);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static long parse_num(const char *s, const char *what) {
    char *end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || !end || *end || v < 0) fail(what);
    return v;
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/* ---- latency samples ---- */

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Prints <prefix>p50_ns, p99_ns, mean_ns and n for the samples (sorted in place). */
static void report(const char *prefix, uint64_t *s, size_t n) {
    if (n == 0) fail("no samples");
    double sum = 0;
    for (size_t i = 0; i < n; i++) sum += (double)s[i];
    qsort(s, n, sizeof *s, cmp_u64);
    size_t i99 = (n * 99) / 100;
    if (i99 >= n) i99 = n - 1;
    printf("%sp50_ns=%llu\n%sp99_ns=%llu\n%smean_ns=%.1f\n%sn=%zu\n", prefix,
           (unsigned long long)s[n / 2], prefix, (unsigned long long)s[i99], prefix, sum / (double)n,
           prefix, n);
}

static uint64_t *samples(size_t n) {
    uint64_t *s = calloc(n ? n : 1, sizeof *s);
    if (!s) fail("out of memory");
    return s;
}

/* ---- sockets ---- */

static struct sockaddr_in addr_of(const char *ip, const char *port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)parse_num(port, "bad port"));
    if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) fail("bad IPv4 address");
    return a;
}

static int dial(const struct sockaddr_in *a) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (const struct sockaddr *)a, sizeof *a) != 0) die("connect");
    return fd;
}

static void write_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) die("write");
        p += n;
        len -= (size_t)n;
    }
}

static void read_exact(int fd, void *buf, size_t len) {
    char *p = buf;
    while (len) {
        ssize_t n = read(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) die("read");
        if (n == 0) fail("read: unexpected EOF");
        p += n;
        len -= (size_t)n;
    }
}

/* Listens on PORT (all addresses) or IP:PORT. */
static int listen_on(const char *where) {
    raise_nofile();
    char ip[64] = "0.0.0.0";
    const char *port = where;
    const char *colon = strchr(where, ':');
    if (colon) {
        size_t len = (size_t)(colon - where);
        if (len >= sizeof ip) fail("bad listen address");
        memcpy(ip, where, len);
        ip[len] = 0;
        port = colon + 1;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)parse_num(port, "bad port"));
    if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) fail("bad listen address");
    if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0) die("bind");
    if (listen(fd, 4096) != 0) die("listen");
    printf("listening %s\n", port);
    fflush(stdout);
    return fd;
}

/* ---- notifyfloor ---- */

static int send_fd(int sock, int fd) {
    char data = 'F';
    struct iovec iov = {.iov_base = &data, .iov_len = 1};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    memset(&u, 0, sizeof u);
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof u.buf};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
    return sendmsg(sock, &msg, 0) == 1 ? 0 : -1;
}

static int recv_fd(int sock) {
    char data;
    struct iovec iov = {.iov_base = &data, .iov_len = 1};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof u.buf};
    if (recvmsg(sock, &msg, 0) != 1) return -1;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    if (!c || c->cmsg_type != SCM_RIGHTS) return -1;
    int fd;
    memcpy(&fd, CMSG_DATA(c), sizeof fd);
    return fd;
}

/* The supervisor: answers every notification with CONTINUE until the process exits. */
static void *answer_loop(void *arg) {
    int listener = *(int *)arg;
    struct seccomp_notif req;
    struct seccomp_notif_resp resp;
    for (;;) {
        memset(&req, 0, sizeof req);
        if (ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, &req) != 0) {
            if (errno == EINTR || errno == ENOENT) continue;
            return NULL;
        }
        memset(&resp, 0, sizeof resp);
        resp.id = req.id;
        resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
        ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, &resp);
    }
}

/* The call being timed: getppid, or open(floor_path) + close when a path is given. */
static const char *floor_path;

static void time_calls(uint64_t *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint64_t t0 = now_ns();
        if (floor_path) {
            int fd = open(floor_path, O_RDONLY | O_CLOEXEC);
            if (fd < 0) die("open");
            close(fd);
        } else {
            syscall(SYS_getppid);
        }
        s[i] = now_ns() - t0;
    }
}

static int notifyfloor(size_t n, const char *path) {
    floor_path = path;
    uint64_t *plain = samples(n);
    time_calls(plain, n / 10 + 1); /* warm-up */
    time_calls(plain, n);
    report("plain_", plain, n);
    fflush(stdout);

    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) die("socketpair");
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        close(sv[0]);
        struct sock_filter code[] = {
            BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
            BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, path ? SYS_openat : SYS_getppid, 0, 1),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        };
        struct sock_fprog prog = {.len = sizeof code / sizeof code[0], .filter = code};
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) die("PR_SET_NO_NEW_PRIVS");
        long listener = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
                                SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV, &prog);
        if (listener < 0) die("seccomp(NEW_LISTENER|WAIT_KILLABLE_RECV)");
        if (send_fd(sv[1], (int)listener) != 0) die("send listener fd");
        close((int)listener);
        char go;
        if (read(sv[1], &go, 1) != 1) fail("supervisor did not start");
        uint64_t *trapped = samples(n);
        time_calls(trapped, n / 10 + 1);
        time_calls(trapped, n);
        report("notify_", trapped, n);
        fflush(stdout);
        _exit(0);
    }
    close(sv[1]);
    int listener = recv_fd(sv[0]);
    if (listener < 0) die("receive listener fd");
    if (ioctl(listener, SECCOMP_IOCTL_NOTIF_SET_FLAGS, SYNC_WAKE_UP, 0) != 0) die("SECCOMP_IOCTL_NOTIF_SET_FLAGS");
    pthread_t thread;
    if (pthread_create(&thread, NULL, answer_loop, &listener) != 0) fail("pthread_create");
    if (write(sv[0], "g", 1) != 1) die("start child");
    int status;
    if (waitpid(child, &status, 0) != child) die("waitpid");
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) fail("trapped child failed");
    /* The answering thread is still blocked in NOTIF_RECV; exiting the process ends it. */
    fflush(stdout);
    _exit(0);
}

/* ---- simple loops ---- */

static int openloop(size_t n, const char *path) {
    uint64_t *s = samples(n);
    for (size_t i = 0; i < n / 10 + 1; i++) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) die("open");
        close(fd);
    }
    for (size_t i = 0; i < n; i++) {
        uint64_t t0 = now_ns();
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) die("open");
        close(fd);
        s[i] = now_ns() - t0;
    }
    report("", s, n);
    return 0;
}

static int vmread(size_t n, const char *path) {
    static char buf[256];
    snprintf(buf, sizeof buf, "%s", path);
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        pause();
        _exit(0);
    }
    uint64_t *s = samples(n);
    char copy[256];
    for (size_t i = 0; i < n / 10 + 1 + n; i++) {
        struct iovec local = {copy, sizeof copy}, remote = {buf, sizeof buf};
        uint64_t t0 = now_ns();
        if (process_vm_readv(child, &local, 1, &remote, 1, 0) != (ssize_t)sizeof copy) die("process_vm_readv");
        uint64_t took = now_ns() - t0;
        if (i > n / 10) s[i - n / 10 - 1] = took;
    }
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    report("", s, n);
    return 0;
}

/* Installs a seccomp filter that allows everything: the cost any filter adds to a syscall. */
static void allow_all_filter(void) {
    struct sock_filter code[] = {BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
    struct sock_fprog prog = {.len = 1, .filter = code};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) die("PR_SET_NO_NEW_PRIVS");
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) != 0) die("seccomp");
}

static int pipeloop(size_t n, int filtered) {
    if (filtered) allow_all_filter();
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0) die("pipe");
    char c = 'x';
    for (size_t i = 0; i < n / 10 + 1; i++) {
        if (write(p[1], &c, 1) != 1 || read(p[0], &c, 1) != 1) die("pipe io");
    }
    uint64_t t0 = now_ns();
    for (size_t i = 0; i < n; i++) {
        if (write(p[1], &c, 1) != 1 || read(p[0], &c, 1) != 1) die("pipe io");
    }
    uint64_t ns = now_ns() - t0;
    printf("total_ns=%llu\nops_per_s=%.1f\nn=%zu\n", (unsigned long long)ns, (double)n * 1e9 / (double)ns, n);
    return 0;
}

static void one_byte_roundtrip(int fd) {
    char c = 'p';
    write_all(fd, &c, 1);
    read_exact(fd, &c, 1);
}

/* Times N connections after a warm-up of N/20 + 1: each is dialled by DIAL_WITH(ARG), carries
 * one 1-byte round trip and is closed. */
static int time_connects(size_t n, int (*dial_with)(void *), void *arg) {
    uint64_t *s = samples(n);
    size_t warm = n / 20 + 1;
    for (size_t i = 0; i < warm + n; i++) {
        uint64_t t0 = now_ns();
        int fd = dial_with(arg);
        one_byte_roundtrip(fd);
        close(fd);
        if (i >= warm) s[i - warm] = now_ns() - t0;
    }
    report("", s, n);
    return 0;
}

/* Times N 1-byte round trips on FD after the same warm-up, then closes it. */
static int time_round_trips(size_t n, int fd) {
    uint64_t *s = samples(n);
    size_t warm = n / 20 + 1;
    for (size_t i = 0; i < warm + n; i++) {
        uint64_t t0 = now_ns();
        one_byte_roundtrip(fd);
        if (i >= warm) s[i - warm] = now_ns() - t0;
    }
    close(fd);
    report("", s, n);
    return 0;
}

static int dial_addr(void *a) { return dial(a); }

static int connectloop(size_t n, const char *ip, const char *port) {
    struct sockaddr_in a = addr_of(ip, port);
    return time_connects(n, dial_addr, &a);
}

static int pingpong(size_t n, const char *ip, const char *port) {
    struct sockaddr_in a = addr_of(ip, port);
    return time_round_trips(n, dial(&a));
}

static int bulk(size_t bytes, const char *ip, const char *port) {
    struct sockaddr_in a = addr_of(ip, port);
    size_t chunk = 256 * 1024;
    char *buf = malloc(chunk);
    if (!buf) fail("out of memory");
    memset(buf, 'b', chunk);
    int fd = dial(&a);
    uint64_t t0 = now_ns();
    size_t left = bytes;
    while (left) {
        size_t len = left < chunk ? left : chunk;
        write_all(fd, buf, len);
        left -= len;
    }
    if (shutdown(fd, SHUT_WR) != 0) die("shutdown");
    /* The sink closes once it has read everything: the time covers delivery. */
    for (;;) {
        ssize_t r = read(fd, buf, chunk);
        if (r == 0) break;
        if (r < 0 && errno != EINTR) die("read");
    }
    uint64_t ns = now_ns() - t0;
    close(fd);
    printf("bytes=%zu\ntotal_ns=%llu\nbytes_per_s=%.1f\n", bytes, (unsigned long long)ns, (double)bytes * 1e9 / (double)ns);
    return 0;
}

/* ---- relaychain (the tunnel's shape, minimal) ---- */

#define CHAIN_CHUNK (512 * 1024)

/* One relay direction: `in` to `out` through a pipe. `frame_out` puts a 4-byte length in
 * front of each payload; `frame_in` reads payloads behind such lengths. */
struct chain_relay {
    int in, out, frame_out, frame_in;
};

static void splice_exact(int from, int to, size_t len) {
    while (len) {
        ssize_t n = splice(from, NULL, to, NULL, len, SPLICE_F_MOVE);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) die("splice");
        if (n == 0) fail("splice: unexpected EOF");
        len -= (size_t)n;
    }
}

static void *chain_relay_thread(void *arg) {
    struct chain_relay *r = arg;
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0) die("pipe2");
    fcntl(p[1], F_SETPIPE_SZ, CHAIN_CHUNK);
    for (;;) {
        if (r->frame_in) {
            uint32_t len;
            ssize_t got = recv(r->in, &len, sizeof len, MSG_WAITALL);
            if (got == 0) break;
            if (got != (ssize_t)sizeof len) die("recv frame length");
            /* A frame may hold more pieces than the pipe has slots: pass it on piecewise. */
            for (size_t left = len; left;) {
                ssize_t n = splice(r->in, NULL, p[1], NULL, left, SPLICE_F_MOVE);
                if (n < 0 && errno == EINTR) continue;
                if (n <= 0) die("splice frame");
                splice_exact(p[0], r->out, (size_t)n);
                left -= (size_t)n;
            }
            continue;
        }
        ssize_t n = splice(r->in, NULL, p[1], NULL, CHAIN_CHUNK, SPLICE_F_MOVE);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) die("splice");
        if (n == 0) break;
        if (r->frame_out) {
            uint32_t len = (uint32_t)n;
            write_all(r->out, &len, sizeof len);
        }
        splice_exact(p[0], r->out, (size_t)n);
    }
    if (shutdown(r->out, SHUT_WR) != 0) die("shutdown");
    return NULL;
}

static int relaychain(size_t bytes, const char *ip, const char *port) {
    int listener = listen_on("127.0.0.1:0");
    int blocking = 0;
    ioctl(listener, FIONBIO, &blocking);
    struct sockaddr_in local;
    socklen_t len = sizeof local;
    if (getsockname(listener, (struct sockaddr *)&local, &len) != 0) die("getsockname");
    int tunnel[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, tunnel) != 0) die("socketpair");
    struct sockaddr_in far = addr_of(ip, port);
    int pod = dial(&far);
    /* The app's side connects from a thread of its own: `bulk` below. */
    pthread_t t[4];
    static struct chain_relay relays[4];
    char port_str[16];
    snprintf(port_str, sizeof port_str, "%u", ntohs(local.sin_port));
    pid_t app = fork();
    if (app < 0) die("fork");
    if (app == 0) _exit(bulk(bytes, "127.0.0.1", port_str));
    int accepted = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    if (accepted < 0) die("accept");
    /* Forward (app -> pod) and back (EOF only, so the app sees the sink's close). */
    relays[0] = (struct chain_relay){accepted, tunnel[0], 1, 0};
    relays[1] = (struct chain_relay){tunnel[1], pod, 0, 1};
    relays[2] = (struct chain_relay){pod, tunnel[1], 1, 0};
    relays[3] = (struct chain_relay){tunnel[0], accepted, 0, 1};
    for (int i = 0; i < 4; i++)
        if (pthread_create(&t[i], NULL, chain_relay_thread, &relays[i]) != 0) fail("pthread_create");
    int status;
    if (waitpid(app, &status, 0) != app) die("waitpid");
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

/* ---- connectchain (a redirected connect's shape, minimal) ---- */

/* Tunnel messages are two bytes: a kind and a data byte. */
struct connect_chain {
    int trap_app, trap_sup;     /* the app's "trapped connect" channel */
    int tunnel_sup, tunnel_agent;
    int listener;
    struct sockaddr_in listen_addr, far;
};

static void *connect_chain_agent(void *arg) {
    struct connect_chain *c = arg;
    char m[2];
    while (recv(c->tunnel_agent, m, 2, MSG_WAITALL) == 2) {
        int pod = dial(&c->far);
        write_all(c->tunnel_agent, "O-", 2);
        for (;;) {
            read_exact(c->tunnel_agent, m, 2);
            if (m[0] == 'C') break;
            write_all(pod, &m[1], 1);
            read_exact(pod, &m[1], 1);
            write_all(c->tunnel_agent, m, 2);
        }
        close(pod);
    }
    return NULL;
}

static void *connect_chain_supervisor(void *arg) {
    struct connect_chain *c = arg;
    int app;
    while ((app = recv_fd(c->trap_sup)) >= 0) {
        char m[2];
        write_all(c->tunnel_sup, "O-", 2);
        read_exact(c->tunnel_sup, m, 2);
        if (connect(app, (struct sockaddr *)&c->listen_addr, sizeof c->listen_addr) != 0) die("connect");
        close(app);
        int conn = accept4(c->listener, NULL, NULL, SOCK_CLOEXEC);
        if (conn < 0) die("accept");
        int one = 1;
        setsockopt(conn, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        write_all(c->trap_sup, "A", 1);
        m[0] = 'D';
        for (;;) {
            ssize_t r = read(conn, &m[1], 1);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break;
            write_all(c->tunnel_sup, m, 2);
            read_exact(c->tunnel_sup, m, 2);
            write_all(conn, &m[1], 1);
        }
        write_all(c->tunnel_sup, "C-", 2);
        close(conn);
    }
    return NULL;
}

/* Starts the chain's supervisor and agent threads; the agent dials IP:PORT. */
static struct connect_chain *start_connect_chain(const char *ip, const char *port) {
    static struct connect_chain c;
    c.listener = listen_on("127.0.0.1:0");
    int blocking = 0;
    ioctl(c.listener, FIONBIO, &blocking);
    socklen_t len = sizeof c.listen_addr;
    if (getsockname(c.listener, (struct sockaddr *)&c.listen_addr, &len) != 0) die("getsockname");
    c.far = addr_of(ip, port);
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) die("socketpair");
    c.trap_app = pair[0], c.trap_sup = pair[1];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) die("socketpair");
    c.tunnel_sup = pair[0], c.tunnel_agent = pair[1];
    pthread_t t[2];
    if (pthread_create(&t[0], NULL, connect_chain_supervisor, &c) != 0) fail("pthread_create");
    if (pthread_create(&t[1], NULL, connect_chain_agent, &c) != 0) fail("pthread_create");
    return &c;
}

/* A connect through the chain: the socket goes to the supervisor thread, as a trapped connect
 * goes to kmirror, and is usable once it answers. */
static int chain_dial(struct connect_chain *c) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (send_fd(c->trap_app, fd) != 0) die("send_fd");
    char answer;
    read_exact(c->trap_app, &answer, 1);
    return fd;
}

static int chain_dial_with(void *c) { return chain_dial(c); }

static int connectchain(size_t n, const char *ip, const char *port) {
    return time_connects(n, chain_dial_with, start_connect_chain(ip, port));
}

static int pingchain(size_t n, const char *ip, const char *port) {
    return time_round_trips(n, chain_dial(start_connect_chain(ip, port)));
}

static int hold(size_t n, const char *ip, const char *port) {
    raise_nofile();
    struct sockaddr_in a = addr_of(ip, port);
    int *fds = calloc(n ? n : 1, sizeof *fds);
    if (!fds) fail("out of memory");
    for (size_t i = 0; i < n; i++) {
        fds[i] = dial(&a);
        one_byte_roundtrip(fds[i]);
    }
    printf("ready\nheld=%zu\n", n);
    fflush(stdout);
    char buf[64];
    while (read(0, buf, sizeof buf) > 0) {
    }
    for (size_t i = 0; i < n; i++) close(fds[i]);
    return 0;
}

/* ---- burst (mirror fidelity load) ---- */

static unsigned char pattern_byte(unsigned long id, size_t i) {
    return (unsigned char)((id * 31u + i * 7u + 13u) & 0xff);
}

static size_t payload_len(unsigned long id) {
    return 64 + (id * 977u) % 1900u;
}

struct burst_shared {
    struct sockaddr_in addr;
    double rate;
    uint64_t start, end;
    unsigned threads;
};

struct burst_worker {
    struct burst_shared *shared;
    unsigned index;
    unsigned long sent, ok, failed;
};

static int burst_one(const struct sockaddr_in *a, unsigned long id) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timeval tv = {.tv_sec = 5, .tv_usec = 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (const struct sockaddr *)a, sizeof *a) != 0) {
        close(fd);
        return -1;
    }
    size_t len = payload_len(id);
    char msg[2100];
    int head = snprintf(msg, sizeof msg, "KM %lu %zu\n", id, len);
    for (size_t i = 0; i < len; i++) msg[head + (int)i] = (char)pattern_byte(id, i);
    size_t total = (size_t)head + len, off = 0;
    while (off < total) {
        ssize_t w = write(fd, msg + off, total - off);
        if (w <= 0) {
            close(fd);
            return -1;
        }
        off += (size_t)w;
    }
    char reply[8];
    size_t got = 0;
    for (;;) {
        ssize_t r = read(fd, reply + got, sizeof reply - got);
        if (r < 0) {
            close(fd);
            return -1;
        }
        if (r == 0) break;
        got += (size_t)r;
        if (got == sizeof reply) break;
    }
    close(fd);
    return (got == 3 && memcmp(reply, "ok\n", 3) == 0) ? 0 : -1;
}

static void *burst_thread(void *arg) {
    struct burst_worker *w = arg;
    struct burst_shared *sh = w->shared;
    for (unsigned long k = w->index;; k += sh->threads) {
        uint64_t due = sh->start + (uint64_t)((double)k * 1e9 / sh->rate);
        if (due >= sh->end) break;
        uint64_t now = now_ns();
        if (due > now) {
            uint64_t d = due - now;
            struct timespec ts = {.tv_sec = (time_t)(d / 1000000000ULL), .tv_nsec = (long)(d % 1000000000ULL)};
            nanosleep(&ts, NULL);
        }
        w->sent++;
        if (burst_one(&sh->addr, k) == 0) {
            w->ok++;
            printf("sent id=%lu\n", k);
        } else {
            w->failed++;
        }
    }
    return NULL;
}

static int burst(double rate, double secs, const char *ip, const char *port) {
    raise_nofile();
    struct burst_shared sh;
    sh.addr = addr_of(ip, port);
    sh.rate = rate;
    sh.threads = 8;
    sh.start = now_ns() + 1000000;
    sh.end = sh.start + (uint64_t)(secs * 1e9);
    struct burst_worker w[8];
    pthread_t t[8];
    for (unsigned i = 0; i < sh.threads; i++) {
        w[i] = (struct burst_worker){.shared = &sh, .index = i};
        if (pthread_create(&t[i], NULL, burst_thread, &w[i]) != 0) fail("pthread_create");
    }
    unsigned long sent = 0, ok = 0, failed = 0;
    for (unsigned i = 0; i < sh.threads; i++) {
        pthread_join(t[i], NULL);
        sent += w[i].sent;
        ok += w[i].ok;
        failed += w[i].failed;
    }
    uint64_t ns = now_ns() - sh.start;
    printf("sent=%lu\nok=%lu\nfailed=%lu\nrate_per_s=%.1f\n", sent, ok, failed, (double)sent * 1e9 / (double)ns);
    return 0;
}

/* ---- servers ---- */

enum server_kind { ECHO, SINK, REPLY, COUNT };

struct conn {
    int fd;
    size_t bytes;
    /* REPLY/COUNT: the received payload (up to 64 KiB), checked once complete. */
    char *buf;
    size_t stored;
    int overflow;
};

/* Checks a burst payload, a header `KM <id> <len>\n` then len pattern bytes:
 * 1 = complete and intact, 0 = a valid prefix so far, -1 = not a payload, or damaged. */
static int check_payload(const char *buf, size_t n, unsigned long *id_out) {
    const char *nl = memchr(buf, '\n', n < 64 ? n : 64);
    if (!nl) return n < 64 ? 0 : -1;
    size_t hl = (size_t)(nl - buf);
    char head[64];
    memcpy(head, buf, hl);
    head[hl] = 0;
    unsigned long id;
    size_t len;
    if (sscanf(head, "KM %lu %zu", &id, &len) != 2) return -1;
    *id_out = id;
    size_t body = n - hl - 1;
    for (size_t i = 0; i < body && i < len; i++)
        if ((unsigned char)buf[hl + 1 + i] != pattern_byte(id, i)) return -1;
    if (body > len) return -1;
    return body == len ? 1 : 0;
}

static void conn_append(struct conn *c, const char *data, size_t n) {
    if (c->overflow) return;
    if (c->stored + n > 65536) {
        c->overflow = 1;
        return;
    }
    if (!c->buf) {
        c->buf = malloc(65536);
        if (!c->buf) fail("out of memory");
    }
    memcpy(c->buf + c->stored, data, n);
    c->stored += n;
}

static void conn_close(int ep, struct conn *c, enum server_kind kind) {
    if (kind == COUNT) {
        unsigned long id = 0;
        int verdict = (c->buf && !c->overflow) ? check_payload(c->buf, c->stored, &id) : -1;
        printf("conn id=%lu ok=%d bytes=%zu\n", id, verdict == 1, c->bytes);
    }
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->buf);
    free(c);
}

/* Writes all of buf to a non-blocking socket, waiting for room when needed. */
static int send_all_nb(int fd, const char *buf, size_t len) {
    while (len) {
        ssize_t w = write(fd, buf, len);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            if (poll(&p, 1, 10000) <= 0) return -1;
            continue;
        }
        if (w <= 0) return -1;
        buf += w;
        len -= (size_t)w;
    }
    return 0;
}

static int serve(const char *port, enum server_kind kind, int verbose) {
    signal(SIGPIPE, SIG_IGN);
    int lfd = listen_on(port);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev) != 0) die("epoll_ctl");
    static char buf[256 * 1024];
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (!c) {
                for (;;) {
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) break;
                    int one = 1;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct conn *nc = calloc(1, sizeof *nc);
                    if (!nc) fail("out of memory");
                    nc->fd = fd;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = nc};
                    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev) != 0) die("epoll_ctl");
                    if (verbose) printf("accept\n");
                }
                continue;
            }
            int done = 0;
            for (;;) {
                ssize_t r = read(c->fd, buf, sizeof buf);
                if (r < 0 && errno == EINTR) continue;
                if (r < 0 && errno == EAGAIN) break;
                if (r <= 0) {
                    done = 1;
                    break;
                }
                c->bytes += (size_t)r;
                if (kind == ECHO && send_all_nb(c->fd, buf, (size_t)r) != 0) {
                    done = 1;
                    break;
                }
                if (kind == REPLY || kind == COUNT) conn_append(c, buf, (size_t)r);
                if (kind == REPLY) {
                    unsigned long id;
                    int verdict = c->overflow ? -1 : check_payload(c->buf, c->stored, &id);
                    if (verdict != 0) {
                        if (verdict == 1) send_all_nb(c->fd, "ok\n", 3);
                        done = 1;
                        break;
                    }
                }
            }
            if (done) conn_close(ep, c, kind);
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) fail("usage: benchclient MODE ARGS... (see the source)");
    const char *m = argv[1];
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (!strcmp(m, "notifyfloor") && (argc == 3 || argc == 4))
        return notifyfloor((size_t)parse_num(argv[2], "bad N"), argc == 4 ? argv[3] : NULL);
    if (!strcmp(m, "openloop") && argc == 4) return openloop((size_t)parse_num(argv[2], "bad N"), argv[3]);
    if (!strcmp(m, "vmread") && argc == 4) return vmread((size_t)parse_num(argv[2], "bad N"), argv[3]);
    if (!strcmp(m, "pipeloop") && (argc == 3 || (argc == 4 && !strcmp(argv[3], "allow-all-filter"))))
        return pipeloop((size_t)parse_num(argv[2], "bad N"), argc == 4);
    if (!strcmp(m, "connectloop") && argc == 5)
        return connectloop((size_t)parse_num(argv[2], "bad N"), argv[3], argv[4]);
    if (!strcmp(m, "pingpong") && argc == 5) return pingpong((size_t)parse_num(argv[2], "bad N"), argv[3], argv[4]);
    if (!strcmp(m, "bulk") && argc == 5) return bulk((size_t)parse_num(argv[2], "bad BYTES"), argv[3], argv[4]);
    if (!strcmp(m, "connectchain") && argc == 5)
        return connectchain((size_t)parse_num(argv[2], "bad N"), argv[3], argv[4]);
    if (!strcmp(m, "pingchain") && argc == 5)
        return pingchain((size_t)parse_num(argv[2], "bad N"), argv[3], argv[4]);
    if (!strcmp(m, "relaychain") && argc == 5)
        return relaychain((size_t)parse_num(argv[2], "bad BYTES"), argv[3], argv[4]);
    if (!strcmp(m, "hold") && argc == 5) return hold((size_t)parse_num(argv[2], "bad N"), argv[3], argv[4]);
    if (!strcmp(m, "burst") && argc == 6)
        return burst((double)parse_num(argv[2], "bad RATE"), atof(argv[3]), argv[4], argv[5]);
    if (!strcmp(m, "serve-echo") && (argc == 3 || argc == 4)) return serve(argv[2], ECHO, argc == 4);
    if (!strcmp(m, "serve-sink") && argc == 3) return serve(argv[2], SINK, 0);
    if (!strcmp(m, "serve-reply") && argc == 3) return serve(argv[2], REPLY, 0);
    if (!strcmp(m, "serve-count") && argc == 3) return serve(argv[2], COUNT, 0);
    fail("unknown mode or wrong arguments (see the source)");
    return 1;
}
