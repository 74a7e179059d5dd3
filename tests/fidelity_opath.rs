//! O_PATH descriptors and openat2's `how` for pod paths: what a program sees under kmirror is
//! what the same program sees inside the pod (tests/pod/opath-probe.c prints one line per
//! case; the lines are compared whole, and checked against what the kernel promises).

use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{ScratchDir, kmirror};
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Path, PathBuf};

const PROBE_SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/pod/opath-probe.c");

/// Builds the probe into `dir`.
fn probe(dir: &ScratchDir) -> PathBuf {
    let binary = dir.join("opath-probe");
    let cc = std::process::Command::new("cc")
        .args(["-O1", "-Wall", "-o"])
        .arg(&binary)
        .arg(PROBE_SOURCE)
        .output()
        .expect("cc (build-essential)");
    assert!(cc.status.success(), "cc: {}", String::from_utf8_lossy(&cc.stderr));
    binary
}

/// The probe's lines inside the pod and under kmirror (`--fs-mode read`: /data is the pod's).
fn both(pod: &LocalPod, binary: &Path, cases: &[&str]) -> (String, String) {
    let bin = binary.to_str().unwrap();
    let inside = pod.exec_in_pod(bin, cases);
    let under = kmirror(pod.target_pid, &["--fs-mode", "read"], &[&[bin], cases].concat());
    let text = |out: &std::process::Output, side: &str| {
        assert!(out.status.success(), "{side}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    (text(&inside, "in the pod"), text(&under, "under kmirror"))
}

fn assert_same_lines(inside: &str, under: &str) {
    for (i, u) in inside.lines().zip(under.lines()) {
        assert_eq!(u, i, "under kmirror (left) and in the pod (right)");
    }
    assert_eq!(
        under.lines().count(),
        inside.lines().count(),
        "in the pod:\n{inside}\nunder kmirror:\n{under}"
    );
}

fn line<'a>(out: &'a str, start: &str) -> &'a str {
    out.lines().find(|l| l.starts_with(start)).unwrap_or_else(|| panic!("no `{start}` line in:\n{out}"))
}

fn set_times(path: &Path, sec: u64) {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(sec);
    let times = std::fs::FileTimes::new().set_accessed(t).set_modified(t);
    std::fs::File::options().read(true).open(path).unwrap().set_times(times).unwrap();
}

fn mknod(path: &Path, mode: u32, dev: libc::dev_t) {
    let kind = nix::sys::stat::SFlag::from_bits_truncate(mode & libc::S_IFMT);
    let perm = nix::sys::stat::Mode::from_bits_truncate(mode & 0o7777);
    nix::sys::stat::mknod(path, kind, perm, dev).unwrap_or_else(|e| panic!("mknod {}: {e}", path.display()));
    // Whatever the test's umask took away.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777)).unwrap();
}

/// O_PATH of pod files that kmirror cannot or must not read (a file above its fetch limit, a
/// FIFO, a device), of directories and of symlinks succeeds as in the pod, and the descriptor
/// behaves as an O_PATH descriptor of the pod file: `read` is EBADF, `fstat` and
/// `fstatat(fd, "", AT_EMPTY_PATH)` agree with `stat` of the path, a symlink's target reads
/// through `readlinkat(fd, "")`, relative lookups work, and opening it again through
/// `/proc/self/fd/N` (or `/dev/fd/N`) gives the pod file's content, never the stand-in's.
#[test]
fn o_path_descriptors_of_pod_files_behave_as_in_the_pod() {
    let pod = LocalPod::start(213);
    let dir = ScratchDir::new("opath-213");
    let binary = probe(&dir);
    let data = pod.rootfs.join("data");
    // Above kmirror's 256 MiB fetch limit; sparse, so it costs no disk.
    let big = data.join("big");
    std::fs::File::create(&big).unwrap().set_len(300 << 20).unwrap();
    std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o640)).unwrap();
    chown(&big, Some(1234), Some(1235)).unwrap();
    set_times(&big, 1_600_000_000);
    mknod(&data.join("fifo"), libc::S_IFIFO | 0o620, 0);
    mknod(&data.join("nulldev"), libc::S_IFCHR | 0o660, libc::makedev(1, 3));
    std::os::unix::fs::symlink("/b.txt", data.join("dir/abs")).unwrap();
    let pod_dir = data.join("dir");
    std::fs::set_permissions(&pod_dir, std::fs::Permissions::from_mode(0o750)).unwrap();
    chown(&pod_dir, Some(1234), Some(1235)).unwrap();
    set_times(&pod_dir, 1_500_000_000);
    let cases = [
        "opath",
        "/data/big",
        "opath",
        "/data/fifo",
        "opath",
        "/data/nulldev",
        "opath",
        "/data/dir",
        "opath-dir",
        "/data/dir",
        "opath-dir",
        "/data/big",
        "opath",
        "/data/link-to-a",
        "opath-nofollow",
        "/data/link-to-a",
        "opath-nofollow",
        "/data/dir/abs",
        "opath",
        "/data/nosuch",
        "opath",
        "/etc/hostname",
        "opath-raw",
        "/data/big",
        "opath-raw",
        "/data/fifo",
        "opath-raw",
        "/data/dir",
        "reopen",
        "/data/pod-only.txt",
        "reopen-nofollow",
        "/data/link-to-a",
        "dirfd",
        "/data/dir",
        "a.txt",
        "dirfd",
        "/data/dir",
        "sub",
        "dirfd",
        "/data/dir",
        "nosuch",
    ];
    let (inside, under) = both(&pod, &binary, &cases);
    eprintln!("in the pod:\n{inside}\nunder kmirror:\n{under}");
    // What the kernel promises, checked on the pod's side so the comparison means something.
    assert_eq!(
        line(&inside, "opath /data/big:"),
        "opath /data/big: reg 0640 1234:1235 size=314572800 mtime=1600000000 read=EBADF fstatat=same \
         stat=same readlinkat=ENOENT"
    );
    assert!(line(&inside, "opath /data/fifo:").starts_with("opath /data/fifo: fifo 0620 0:0 size=0 "));
    assert!(line(&inside, "opath /data/nulldev:").starts_with("opath /data/nulldev: chr 0660 0:0 size=0 "));
    assert!(
        line(&inside, "opath /data/dir:")
            .starts_with("opath /data/dir: dir 0750 1234:1235 mtime=1500000000 ")
    );
    let link = line(&inside, "opath /data/link-to-a nofollow:");
    assert!(link.contains(" lnk 0777 0:0 size=9 ") && link.ends_with(" readlinkat=dir/a.txt"), "{link}");
    assert!(line(&inside, "opath /data/dir/abs nofollow:").ends_with(" readlinkat=/b.txt"));
    assert_eq!(
        line(&inside, "opath-raw /data/big:"),
        "opath-raw /data/big: reg 0640 1234:1235 size=314572800 mtime=1600000000"
    );
    assert_eq!(
        line(&inside, "reopen /data/pod-only.txt:"),
        "reopen /data/pod-only.txt: readlink=/data/pod-only.txt proc read=\"pod-only file 213\" proc-path=reg \
         devfd read=\"pod-only file 213\" empty=ENOENT"
    );
    assert!(
        line(&inside, "reopen /data/link-to-a nofollow:").contains(" proc=ELOOP proc-path=lnk devfd=ELOOP ")
    );
    let relative = line(&inside, "dirfd /data/dir a.txt:");
    assert!(relative.starts_with("dirfd /data/dir a.txt: fstatat=reg 0644 0:0 size=2 mtime="), "{relative}");
    assert!(relative.ends_with(" openat read=\"a\" proc read=\"a\""), "{relative}");
    // Where kmirror cannot hand out a true O_PATH descriptor (docs/files.md): a FIFO's
    // stand-in reads as end of file and a directory's as a directory, not EBADF.
    let inside = inside
        .lines()
        .map(|l| match l.split(':').next() {
            Some("opath /data/fifo") => l.replace(" read=EBADF ", " read=\"\" "),
            Some("opath /data/dir" | "opath /data/dir directory") => {
                l.replace(" read=EBADF ", " read=EISDIR ")
            }
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert_same_lines(&inside, &under);

    // Opened again through its link, a file above the fetch limit is refused as an open of
    // its path is (EFBIG), never read as the stand-in's zeros.
    let bin = binary.to_str().unwrap();
    let out = kmirror(pod.target_pid, &["--fs-mode", "read"], &[bin, "reopen", "/data/big"]);
    let reopened = String::from_utf8_lossy(&out.stdout);
    assert!(reopened.contains(" proc=EFBIG proc-path=reg devfd=EFBIG "), "{reopened}");

    // A file kmirror synthesises (resolv.conf pointing at its DNS forwarder) is no readable
    // descriptor under O_PATH either.
    let out = kmirror(pod.target_pid, &[], &[bin, "opath", "/etc/resolv.conf", "reopen", "/etc/resolv.conf"]);
    let virtual_file = String::from_utf8_lossy(&out.stdout);
    assert!(virtual_file.starts_with("opath /etc/resolv.conf: reg 0644 0:0 "), "{virtual_file}");
    assert!(virtual_file.contains(" read=EBADF fstatat=same stat=same "), "{virtual_file}");
    assert!(
        line(&virtual_file, "reopen /etc/resolv.conf:").contains(" proc read=\"# written by kmirror"),
        "{virtual_file}"
    );
}

/// openat2 on pod paths: the `resolve` flags constrain every component as the kernel's do in
/// the pod (RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH, RESOLVE_IN_ROOT from a pod directory,
/// RESOLVE_NO_XDEV across a mount of the pod), and a `how` the kernel refuses is refused
/// with its errno (a size below the first version, unknown non-zero bytes beyond it, unknown
/// resolve bits, a mode without O_CREAT, flags O_PATH does not allow).
#[test]
fn openat2_resolves_pod_paths_as_in_the_pod() {
    let pod = LocalPod::start(214);
    let dir = ScratchDir::new("opath-214");
    let binary = probe(&dir);
    let data = pod.rootfs.join("data");
    std::os::unix::fs::symlink("/b.txt", data.join("dir/abs")).unwrap();
    std::fs::create_dir(data.join("mnt")).unwrap();
    // A mount in the pod only (its own mount namespace), on another file system.
    let mounted = pod.exec_in_pod(
        "/bin/sh",
        &["-c", "mount -t tmpfs -o size=1m tmpfs /data/mnt && echo m > /data/mnt/m.txt"],
    );
    assert!(mounted.status.success(), "{}", String::from_utf8_lossy(&mounted.stderr));
    // Flags and resolve bits as numbers: O_PATH|O_NOFOLLOW, O_PATH|O_RDWR.
    let path_nofollow = (libc::O_PATH | libc::O_NOFOLLOW).to_string();
    let path_rdwr = (libc::O_PATH | libc::O_RDWR).to_string();
    #[rustfmt::skip]
    let cases: Vec<[&str; 7]> = vec![
        // dirfd, path, flags, resolve, size, tail byte, mode
        ["-", "/data/link-to-a", "0", "4", "24", "0", "-"],
        ["-", "/data/link-to-a", &path_nofollow, "4", "24", "0", "-"],
        ["-", "/data/dir/a.txt", "0", "4", "24", "0", "-"],
        ["-", "/etc/hostname", "0", "4", "24", "0", "-"],
        ["/data", "link-to-a", "0", "8", "24", "0", "-"],
        ["/data", "escape", "0", "8", "24", "0", "-"],
        ["/data/dir", "../pod-only.txt", "0", "8", "24", "0", "-"],
        ["/data", "/etc/hostname", "0", "8", "24", "0", "-"],
        ["/data/dir", "abs", "0", "8", "24", "0", "-"],
        ["/data/dir", "abs", "0", "16", "24", "0", "-"],
        ["/data/dir", "/a.txt", "0", "16", "24", "0", "-"],
        ["/data/dir", "../../dir/b.txt", "0", "16", "24", "0", "-"],
        ["/data", "escape", "0", "16", "24", "0", "-"],
        ["/data", "escape", "0", "0", "24", "0", "-"],
        ["-", "/data/mnt/m.txt", "0", "1", "24", "0", "-"],
        ["-", "/data/dir/a.txt", "0", "1", "24", "0", "-"],
        ["/data/mnt", "m.txt", "0", "1", "24", "0", "-"],
        ["/data/mnt", "../dir/a.txt", "0", "1", "24", "0", "-"],
        ["-", "/data/dir/a.txt", "0", "2", "24", "0", "-"],
        ["-", "/data/dir/a.txt", "0", "0", "16", "0", "-"],
        ["-", "/data/dir/a.txt", "0", "0", "32", "1", "-"],
        ["-", "/data/dir/a.txt", "0", "0", "32", "0", "-"],
        ["-", "/data/dir/a.txt", "0", "64", "24", "0", "-"],
        ["-", "/data/dir/a.txt", "0", "24", "24", "0", "-"],
        ["-", "/data/dir/a.txt", "0", "0", "24", "0", "0644"],
        ["-", "/data/dir/a.txt", &path_rdwr, "0", "24", "0", "-"],
    ];
    let args: Vec<&str> =
        cases.iter().flat_map(|case| std::iter::once("openat2").chain(case.iter().copied())).collect();
    let (inside, under) = both(&pod, &binary, &args);
    eprintln!("in the pod:\n{inside}\nunder kmirror:\n{under}");
    let answers: Vec<&str> = inside.lines().map(|l| l.rsplit(':').next().unwrap().trim()).collect();
    #[rustfmt::skip]
    let expected = [
        "ELOOP", "lnk", "reg read=\"a\"", "reg read=\"kmirror-pod-214\"",
        "reg read=\"a\"", "EXDEV", "EXDEV", "EXDEV", "EXDEV", "reg read=\"bb\"", "reg read=\"a\"",
        "ENOENT", "ENOENT", "ENOENT",
        "EXDEV", "reg read=\"a\"", "reg read=\"m\"", "EXDEV", "reg read=\"a\"",
        "EINVAL", "E2BIG", "reg read=\"a\"", "EINVAL", "EINVAL", "EINVAL", "EINVAL",
    ];
    assert_eq!(answers, expected, "in the pod:\n{inside}");
    assert_same_lines(&inside, &under);
}
