/* What an app sees of O_PATH descriptors and openat2's `how`, one line per case, so the same
 * program's lines inside a pod and under kmirror can be compared (tests/fidelity_opath.rs).
 * Only what the kernel promises is printed: no inode, device or descriptor numbers. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static const char *err(int e) {
    switch (e) {
    case ENOENT: return "ENOENT";
    case ENOTDIR: return "ENOTDIR";
    case ELOOP: return "ELOOP";
    case EXDEV: return "EXDEV";
    case EINVAL: return "EINVAL";
    case E2BIG: return "E2BIG";
    case EBADF: return "EBADF";
    case EFBIG: return "EFBIG";
    case ENXIO: return "ENXIO";
    case EACCES: return "EACCES";
    case EAGAIN: return "EAGAIN";
    case EISDIR: return "EISDIR";
    default: {
        static char buf[32];
        snprintf(buf, sizeof buf, "errno%d", e);
        return buf;
    }
    }
}

static const char *kind(mode_t m) {
    switch (m & S_IFMT) {
    case S_IFREG: return "reg";
    case S_IFDIR: return "dir";
    case S_IFLNK: return "lnk";
    case S_IFIFO: return "fifo";
    case S_IFCHR: return "chr";
    case S_IFBLK: return "blk";
    case S_IFSOCK: return "sock";
    }
    return "?";
}

/* Type, permissions, owner, size (not of directories: a directory's size is its file
 * system's business) and modification time. */
static void describe(const struct stat *st) {
    printf("%s %04o %u:%u", kind(st->st_mode), (unsigned)(st->st_mode & 07777), st->st_uid, st->st_gid);
    if (!S_ISDIR(st->st_mode)) printf(" size=%lld", (long long)st->st_size);
    printf(" mtime=%lld", (long long)st->st_mtime);
}

static int same(const struct stat *a, const struct stat *b) {
    return a->st_mode == b->st_mode && a->st_uid == b->st_uid && a->st_gid == b->st_gid &&
           (S_ISDIR(a->st_mode) || a->st_size == b->st_size) && a->st_mtim.tv_sec == b->st_mtim.tv_sec &&
           a->st_mtim.tv_nsec == b->st_mtim.tv_nsec && a->st_atim.tv_sec == b->st_atim.tv_sec;
}

/* The first line of what `fd` reads (at most 40 bytes), or the errno. */
static void first_line(int fd) {
    char buf[41];
    ssize_t n = read(fd, buf, 40);
    if (n < 0) { printf(" read=%s", err(errno)); return; }
    buf[n] = 0;
    buf[strcspn(buf, "\n")] = 0;
    printf(" read=\"%s\"", buf);
}

/* opath PATH FLAGS: open(PATH, O_PATH | FLAGS), then what the descriptor tells. */
static void opath(const char *path, int extra) {
    int fd = open(path, O_PATH | extra);
    printf("opath %s%s%s:", path, extra & O_NOFOLLOW ? " nofollow" : "", extra & O_DIRECTORY ? " directory" : "");
    if (fd < 0) { printf(" %s\n", err(errno)); return; }
    struct stat by_fd, by_empty, by_path;
    if (fstat(fd, &by_fd) != 0) { printf(" fstat=%s\n", err(errno)); return; }
    printf(" ");
    describe(&by_fd);
    first_line(fd);
    int flags = AT_EMPTY_PATH | (extra & O_NOFOLLOW ? AT_SYMLINK_NOFOLLOW : 0);
    if (fstatat(fd, "", &by_empty, flags) != 0) printf(" fstatat=%s", err(errno));
    else printf(" fstatat=%s", same(&by_fd, &by_empty) ? "same" : "differs");
    int rc = extra & O_NOFOLLOW ? lstat(path, &by_path) : stat(path, &by_path);
    if (rc != 0) printf(" stat=%s", err(errno));
    else printf(" stat=%s", same(&by_fd, &by_path) ? "same" : "differs");
    char target[256];
    ssize_t n = readlinkat(fd, "", target, sizeof target - 1);
    if (n < 0) printf(" readlinkat=%s", err(errno));
    else { target[n] = 0; printf(" readlinkat=%s", target); }
    printf("\n");
}

/* opath-raw PATH: the bare fstat system call on an O_PATH descriptor (Go makes it; libc's
 * fstat is fstatat with AT_EMPTY_PATH). */
static void opath_raw(const char *path) {
    int fd = open(path, O_PATH);
    printf("opath-raw %s:", path);
    if (fd < 0) { printf(" %s\n", err(errno)); return; }
    struct stat st;
    if (syscall(SYS_fstat, fd, &st) != 0) { printf(" fstat=%s\n", err(errno)); return; }
    printf(" ");
    describe(&st);
    printf("\n");
}

/* reopen PATH: what opening an O_PATH descriptor again gives. */
static void reopen(const char *path, int extra) {
    int fd = open(path, O_PATH | extra);
    printf("reopen %s%s:", path, extra & O_NOFOLLOW ? " nofollow" : "");
    if (fd < 0) { printf(" %s\n", err(errno)); return; }
    char link[64], named[512];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, named, sizeof named - 1);
    if (n < 0) printf(" readlink=%s", err(errno));
    else { named[n] = 0; printf(" readlink=%s", named); }
    int again = open(link, O_RDONLY);
    if (again < 0) printf(" proc=%s", err(errno));
    else { printf(" proc"); first_line(again); close(again); }
    again = open(link, O_PATH);
    struct stat st;
    if (again < 0) printf(" proc-path=%s", err(errno));
    else if (fstat(again, &st) != 0) printf(" proc-path-fstat=%s", err(errno));
    else printf(" proc-path=%s", kind(st.st_mode));
    snprintf(link, sizeof link, "/dev/fd/%d", fd);
    again = open(link, O_RDONLY);
    if (again < 0) printf(" devfd=%s", err(errno));
    else { printf(" devfd"); first_line(again); close(again); }
    again = openat(fd, "", O_RDONLY);
    printf(" empty=%s", again < 0 ? err(errno) : "opened");
    printf("\n");
}

/* dirfd DIR NAME: lookups relative to an O_PATH descriptor of a directory. */
static void dirfd_lookup(const char *dir, const char *name) {
    int fd = open(dir, O_PATH | O_DIRECTORY);
    printf("dirfd %s %s:", dir, name);
    if (fd < 0) { printf(" %s\n", err(errno)); return; }
    struct stat st;
    if (fstatat(fd, name, &st, 0) != 0) printf(" fstatat=%s", err(errno));
    else { printf(" fstatat="); describe(&st); }
    int file = openat(fd, name, O_RDONLY);
    if (file < 0) printf(" openat=%s", err(errno));
    else { printf(" openat"); first_line(file); }
    char path[512];
    snprintf(path, sizeof path, "/proc/self/fd/%d/%s", fd, name);
    file = open(path, O_RDONLY);
    if (file < 0) printf(" proc=%s", err(errno));
    else { printf(" proc"); first_line(file); }
    printf("\n");
}

/* openat2 DIR PATH FLAGS RESOLVE SIZE TAIL: DIR "-" is AT_FDCWD; FLAGS and RESOLVE are
 * numbers; SIZE is openat2's size argument; TAIL a byte written at offset 24 when SIZE
 * allows; MODE follows when given. */
static void openat2_case(char **a) {
    int dir = AT_FDCWD;
    if (strcmp(a[0], "-") != 0) dir = open(a[0], O_RDONLY | O_DIRECTORY);
    unsigned char how[64] = {0};
    struct open_how *h = (struct open_how *)how;
    h->flags = strtoull(a[2], 0, 0);
    h->resolve = strtoull(a[3], 0, 0);
    size_t size = strtoul(a[4], 0, 0);
    if (size > 24) how[24] = (unsigned char)strtoul(a[5], 0, 0);
    if (a[6]) h->mode = strtoull(a[6], 0, 0);
    printf("openat2 %s %s flags=%s resolve=%s size=%zu tail=%s%s%s:", a[0], a[1], a[2], a[3], size, a[5],
           a[6] ? " mode=" : "", a[6] ? a[6] : "");
    long fd = syscall(SYS_openat2, dir, a[1], how, size);
    if (fd < 0) { printf(" %s\n", err(errno)); return; }
    struct stat st;
    fstat(fd, &st);
    printf(" %s", kind(st.st_mode));
    if (!(h->flags & O_PATH) && S_ISREG(st.st_mode)) first_line(fd);
    printf("\n");
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "opath")) opath(argv[++i], 0);
        else if (!strcmp(argv[i], "opath-nofollow")) opath(argv[++i], O_NOFOLLOW);
        else if (!strcmp(argv[i], "opath-dir")) opath(argv[++i], O_DIRECTORY);
        else if (!strcmp(argv[i], "opath-raw")) opath_raw(argv[++i]);
        else if (!strcmp(argv[i], "reopen")) reopen(argv[++i], 0);
        else if (!strcmp(argv[i], "reopen-nofollow")) reopen(argv[++i], O_NOFOLLOW);
        else if (!strcmp(argv[i], "dirfd")) { dirfd_lookup(argv[i + 1], argv[i + 2]); i += 2; }
        else if (!strcmp(argv[i], "openat2")) {
            /* Seven words, the last ("-" for none) the mode. */
            char *a[7];
            for (int k = 0; k < 6; k++) a[k] = argv[i + 1 + k];
            a[6] = strcmp(argv[i + 7], "-") ? argv[i + 7] : NULL;
            openat2_case(a);
            i += 7;
        } else { fprintf(stderr, "unknown case %s\n", argv[i]); return 2; }
    }
    return 0;
}
