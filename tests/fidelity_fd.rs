//! A descriptor of a pod file is the pod's file to every way of asking: `fstat` (the raw system
//! call, as Go and musl make it), `fstatat`/`statx` with `AT_EMPTY_PATH` (glibc's fstat) and
//! `stat` of the path agree on device, inode, mode, owner, size and time, the inode is the same
//! on every open, and `/proc/self/fd/N` names the pod path. Compared with the same program run
//! inside the pod.

use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{ScratchDir, kmirror};
use std::path::Path;
use std::process::Command;

const PROBE_C: &str = r#"
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static void show(const char *how, const struct stat *st) {
    printf("%s dev=%lu ino=%lu mode=%o uid=%u gid=%u size=%ld mtime=%ld\n", how,
           (unsigned long)st->st_dev, (unsigned long)st->st_ino, st->st_mode, st->st_uid,
           st->st_gid, (long)st->st_size, (long)st->st_mtime);
}

int main(int argc, char **argv) {
    struct stat st;
    struct statx stx;
    char link[4096], proc[64];
    if (stat(argv[1], &st) != 0) { perror("stat"); return 1; }
    show("stat", &st);
    for (int round = 0; round < 2; round++) {
        int fd = open(argv[1], O_RDONLY);
        if (fd < 0) { perror("open"); return 1; }
        if (syscall(SYS_fstat, fd, &st) != 0) { perror("fstat"); return 1; }
        show("fstat", &st);
        if (fstatat(fd, "", &st, AT_EMPTY_PATH) != 0) { perror("fstatat"); return 1; }
        show("fstatat", &st);
        if (statx(fd, "", AT_EMPTY_PATH, STATX_BASIC_STATS, &stx) != 0) { perror("statx"); return 1; }
        printf("statx ino=%llu mode=%o uid=%u size=%llu mtime=%lld\n", (unsigned long long)stx.stx_ino,
               stx.stx_mode, stx.stx_uid, (unsigned long long)stx.stx_size, (long long)stx.stx_mtime.tv_sec);
        snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
        ssize_t n = readlink(proc, link, sizeof link - 1);
        if (n < 0) { perror("readlink"); return 1; }
        link[n] = 0;
        printf("link %s\n", link);
        close(fd);
    }
    return 0;
}
"#;

fn compile(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("probe.c");
    std::fs::write(&src, PROBE_C).unwrap();
    let bin = dir.join("fd-probe");
    let out = Command::new("cc").arg("-O1").arg("-o").arg(&bin).arg(&src).output().expect("cc");
    assert!(out.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&out.stderr));
    bin
}

#[test]
fn a_pod_files_descriptor_is_the_pod_file_to_fstat_statx_and_proc() {
    let pod = LocalPod::start(239);
    let dir = ScratchDir::new("fidelity-fd");
    let probe = compile(&dir.0);
    // An owner and a time that a fresh copy on this side would not have by chance.
    let file = pod.rootfs.join("data/pod-only.txt");
    std::os::unix::fs::chown(&file, Some(1234), Some(1235)).unwrap();
    let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000);
    std::fs::File::options().write(true).open(&file).unwrap().set_modified(old).unwrap();
    let path = "/data/pod-only.txt";

    let under = kmirror(pod.target_pid, &["--fs-mode", "read"], &[probe.to_str().unwrap(), path]);
    let inside = pod.exec_in_pod(probe.to_str().unwrap(), &[path]);
    let (under_text, inside_text) =
        (String::from_utf8_lossy(&under.stdout), String::from_utf8_lossy(&inside.stdout));
    assert!(under.status.success(), "{under_text}\n{}", String::from_utf8_lossy(&under.stderr));
    assert!(inside.status.success(), "{inside_text}\n{}", String::from_utf8_lossy(&inside.stderr));
    assert_eq!(under_text, inside_text, "under kmirror (left) and in the pod (right)");

    // And within the one run: every way of asking agrees with stat of the path.
    let lines: Vec<&str> = under_text.lines().collect();
    let from_stat = lines[0].strip_prefix("stat ").unwrap();
    for line in &lines[1..] {
        if let Some(rest) = line.strip_prefix("fstat ").or_else(|| line.strip_prefix("fstatat ")) {
            assert_eq!(rest, from_stat, "{under_text}");
        }
    }
    assert!(
        from_stat.contains(" mode=100640 uid=1234 gid=1235 ") && from_stat.ends_with(" mtime=1600000000"),
        "{under_text}"
    );
    assert_eq!(lines.iter().filter(|l| **l == format!("link {path}")).count(), 2, "{under_text}");
}
