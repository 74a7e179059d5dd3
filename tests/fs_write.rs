//! Writes to pod files (`--fs-mode write`, `feature.fs.read_write`): what a program writes
//! under kmirror lands in the pod's files, as if it had run in the pod, with the app's
//! permissions and inside the pod's root. Each test runs the same program in the pod
//! (nsenter) and under kmirror on twin directories, compares the answers and the files left in
//! the pod, and checks the expected outcome so that two identical wrong answers cannot pass.

use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{expect_status, kmirror};
use std::os::unix::fs::{MetadataExt, PermissionsExt, chown};
use std::path::Path;

/// Creates, truncates, appends, renames and removes in the directory given as `$1`.
const CYCLE: &str = r#"set -e
B=$1
printf 'first\n' > $B/new.txt
printf 'second\n' >> $B/new.txt
cat $B/new.txt
printf 'trunc\n' > $B/old.txt
cat $B/old.txt
mv $B/new.txt $B/moved.txt
rm $B/gone.txt
rmdir $B/empty
mkdir $B/made
ln -s moved.txt $B/link
cat $B/link
ls $B
"#;

/// The pod's twin directories: `/data/<name>/p` (for the run in the pod) and `/data/<name>/k`
/// (under kmirror), with the same files, each `mode`.
fn twins(pod: &LocalPod, name: &str, mode: u32, files: &[(&str, &str)], dirs: &[&str]) {
    for side in ["p", "k"] {
        let base = pod.rootfs.join("data").join(name).join(side);
        std::fs::create_dir_all(&base).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(mode)).unwrap();
        for (file, content) in files {
            std::fs::write(base.join(file), content).unwrap();
        }
        for dir in dirs {
            std::fs::create_dir(base.join(dir)).unwrap();
        }
    }
}

/// Every entry below `dir` (sorted): its name, kind, mode, owner and content or link target.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let what = if meta.is_symlink() {
            format!("-> {}", std::fs::read_link(&path).unwrap().display())
        } else if meta.is_dir() {
            format!("dir [{}]", tree(&path).join(", "))
        } else {
            format!("{:?}", std::fs::read_to_string(&path).unwrap())
        };
        out.push(format!("{name} {:o} {}:{} {what}", meta.mode() & 0o7777, meta.uid(), meta.gid()));
    }
    out
}

/// Exit status, stdout and stderr, without kmirror's own notice about the pod's environment.
fn text(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr: String = stderr
        .lines()
        .filter(|l| !l.starts_with("kmirror: kept the pod's"))
        .map(|l| format!("{l}\n"))
        .collect();
    format!(
        "status {:?}\nstdout:\n{}stderr:\n{stderr}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout)
    )
}

#[test]
fn write_mode_round_trips_files_the_pod_then_reads() {
    let pod = LocalPod::start(240);
    twins(&pod, "cycle", 0o755, &[("old.txt", "old content\n"), ("gone.txt", "bye\n")], &["empty"]);
    let inside = pod.exec_in_pod("/bin/sh", &["-c", CYCLE, "sh", "/data/cycle/p"]);
    let under =
        kmirror(pod.target_pid, &["--fs-mode", "write"], &["/bin/sh", "-c", CYCLE, "sh", "/data/cycle/k"]);
    let stdout = expect_status(&under, 0);
    assert_eq!(text(&under).replace("/data/cycle/k", "B"), text(&inside).replace("/data/cycle/p", "B"));
    assert_eq!(stdout, "first\nsecond\ntrunc\nfirst\nsecond\nlink\nmade\nmoved.txt\nold.txt\n");
    let (p, k) = (tree(&pod.rootfs.join("data/cycle/p")), tree(&pod.rootfs.join("data/cycle/k")));
    assert_eq!(k, p, "the pod's files after the run under kmirror (left) and in the pod (right)");
    // What the app wrote is the pod's, for the pod's own programs.
    let seen = pod.exec_in_pod("/bin/cat", &["/data/cycle/k/moved.txt", "/data/cycle/k/old.txt"]);
    assert_eq!(String::from_utf8_lossy(&seen.stdout), "first\nsecond\ntrunc\n");
}

/// Writes through one descriptor in place (`r+`, seek, partial overwrite), `fsync`, and a
/// descriptor kept open by a child after the parent closed its own: the pod file gets exactly
/// what the app's file would hold, and `fsync` puts it there before it returns.
#[test]
fn in_place_writes_and_fsync_reach_the_pod() {
    let pod = LocalPod::start(245);
    twins(&pod, "inplace", 0o755, &[("f", "0123456789\n")], &[]);
    let probe = r#"
import os, sys
b = sys.argv[1]
with open(b + '/f', 'r+b') as f:
    f.seek(3)
    f.write(b'abc')
    f.flush()
    os.fsync(f.fileno())
    print(open(b + '/f', 'rb').read())
    f.seek(0, 2)
    f.write(b'tail\n')
print(open(b + '/f', 'rb').read())
fd = os.open(b + '/g', os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
if os.fork() == 0:
    os.write(fd, b'from the child\n')
    os._exit(0)
os.close(fd)
os.wait()
print(open(b + '/g', 'rb').read())
"#;
    let run = |base: &str, under: bool| {
        let args = ["-c", probe, base];
        if under {
            kmirror(pod.target_pid, &["--fs-mode", "write"], &[&["/usr/bin/python3"][..], &args].concat())
        } else {
            pod.exec_in_pod("/usr/bin/python3", &args)
        }
    };
    let inside = run("/data/inplace/p", false);
    let under = run("/data/inplace/k", true);
    let stdout = expect_status(&under, 0);
    assert_eq!(text(&under), text(&inside));
    assert_eq!(stdout, "b'012abc6789\\n'\nb'012abc6789\\ntail\\n'\nb'from the child\\n'\n");
    assert_eq!(tree(&pod.rootfs.join("data/inplace/k")), tree(&pod.rootfs.join("data/inplace/p")));
}

/// Runs each `op` and prints its answer or errno name; `umask` first.
const PERMS: &str = r#"
import errno, os, sys
os.umask(0o027)
base = sys.argv[1]
def attempt(name, op):
    try:
        result = op()
    except OSError as e:
        result = errno.errorcode.get(e.errno, e.errno)
    print(name, result)
attempt('write-root-owned', lambda: open('/data/perm/root-owned', 'w').write('x'))
attempt('append-root-owned', lambda: open('/data/perm/root-owned', 'a').write('x'))
attempt('create-in-root-dir', lambda: open('/data/perm/new', 'w').write('x'))
attempt('unlink-root-owned', lambda: os.unlink('/data/perm/root-owned'))
attempt('rename-root-owned', lambda: os.rename('/data/perm/root-owned', base + '/stolen'))
attempt('mkdir-in-root-dir', lambda: os.mkdir('/data/perm/d'))
attempt('create-own', lambda: open(base + '/mine', 'w').write('mine'))
attempt('mode-own', lambda: oct(os.stat(base + '/mine').st_mode))
attempt('owner-own', lambda: os.stat(base + '/mine').st_uid)
attempt('mkdir-own', lambda: os.mkdir(base + '/d', 0o777))
attempt('mode-dir', lambda: oct(os.stat(base + '/d').st_mode))
"#;

/// An app running as `nobody` cannot write, replace or remove a root-owned pod file, nor create
/// in a root-owned pod directory (EACCES, as in the pod), and what it creates is its own, with
/// its umask.
#[test]
fn an_unprivileged_app_writes_only_what_it_may_in_the_pod() {
    let pod = LocalPod::start(241);
    let perm = pod.rootfs.join("data/perm");
    std::fs::create_dir_all(&perm).unwrap();
    std::fs::write(perm.join("root-owned"), "root's\n").unwrap();
    std::fs::set_permissions(perm.join("root-owned"), std::fs::Permissions::from_mode(0o644)).unwrap();
    twins(&pod, "open", 0o777, &[], &[]);
    let nobody = ["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"];
    let args = |base: &'static str| -> Vec<&'static str> {
        [&nobody[..], &["/usr/bin/python3", "-c", PERMS, base]].concat()
    };
    let inside = pod.exec_in_pod("setpriv", &args("/data/open/p"));
    let under =
        kmirror(pod.target_pid, &["--fs-mode", "write"], &[&["setpriv"][..], &args("/data/open/k")].concat());
    let stdout = expect_status(&under, 0);
    assert_eq!(text(&under).replace("/data/open/k", "B"), text(&inside).replace("/data/open/p", "B"));
    for denied in [
        "write-root-owned",
        "append-root-owned",
        "create-in-root-dir",
        "unlink-root-owned",
        "rename-root-owned",
        "mkdir-in-root-dir",
    ] {
        assert!(stdout.contains(&format!("{denied} EACCES\n")), "{denied}: {stdout}");
    }
    assert!(stdout.contains("mode-own 0o100640\nowner-own 65534\n"), "{stdout}");
    assert!(stdout.contains("mode-dir 0o40750\n"), "{stdout}");
    assert_eq!(std::fs::read_to_string(perm.join("root-owned")).unwrap(), "root's\n");
    assert_eq!(tree(&pod.rootfs.join("data/open/k")), tree(&pod.rootfs.join("data/open/p")));
}

/// The pod's `/data/escape` is a symlink to `/etc/kmirror-host-only-<index>`, a path this
/// machine has too: a write through it lands in the pod's `/etc`, never in the host's.
#[test]
fn a_pod_symlink_cannot_make_a_write_land_on_the_host() {
    let pod = LocalPod::start(242);
    let host_file = pod.escape_target();
    let pod_file = pod.rootfs.join(host_file.strip_prefix("/").unwrap());
    let _ = std::fs::remove_file(&host_file);
    let script = "printf 'written through the link\\n' > /data/escape && cat /data/escape && \
                  printf 'more\\n' >> /data/escape/../data/escape; echo rc=$?";
    let under = kmirror(pod.target_pid, &["--fs-mode", "write"], &["/bin/sh", "-c", script]);
    let under_text = text(&under);
    let under_file = std::fs::read_to_string(&pod_file);
    assert!(!host_file.exists(), "a pod symlink made a write land on the host: {under_text}");
    let _ = std::fs::remove_file(&pod_file);
    let inside = pod.exec_in_pod("/bin/sh", &["-c", script]);
    assert_eq!(under_text, text(&inside));
    assert_eq!(under_file.ok(), std::fs::read_to_string(&pod_file).ok());
    assert_eq!(std::fs::read_to_string(&pod_file).unwrap(), "written through the link\n");
}

/// `read` mode keeps writes local, as documented; a `read_write` list sends the writes to its
/// paths to the pod even then.
#[test]
fn read_mode_writes_locally_and_read_write_paths_go_to_the_pod() {
    let pod = LocalPod::start(243);
    // A path this machine and the pod both have, which `read` mode reads from the pod.
    let dir = Path::new("/run/kmirror-fswrite-243");
    struct Remove(&'static Path);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0);
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let _cleanup = Remove(dir);
    std::fs::create_dir_all(pod.rootfs.join("run/kmirror-fswrite-243")).unwrap();
    std::fs::create_dir_all(pod.rootfs.join("data/rw")).unwrap();
    chown(pod.rootfs.join("data/rw"), Some(0), Some(0)).unwrap();
    let config = std::env::temp_dir().join(format!("kmirror-fswrite-243-{}.yaml", std::process::id()));
    std::fs::write(&config, "feature:\n  fs:\n    mode: read\n    read_write: [\"^/data/rw/\"]\n").unwrap();
    let script = "printf 'to the pod\\n' > /data/rw/x.txt && printf 'local\\n' > /run/kmirror-fswrite-243/out.txt \
                  && cat /data/rw/x.txt";
    let under = kmirror(pod.target_pid, &["-f", config.to_str().unwrap()], &["/bin/sh", "-c", script]);
    let _ = std::fs::remove_file(&config);
    assert_eq!(expect_status(&under, 0), "to the pod\n");
    assert_eq!(std::fs::read_to_string(pod.rootfs.join("data/rw/x.txt")).unwrap(), "to the pod\n");
    assert_eq!(std::fs::read_to_string(dir.join("out.txt")).unwrap(), "local\n", "read mode writes locally");
    assert!(!pod.rootfs.join("run/kmirror-fswrite-243/out.txt").exists());
    assert!(!Path::new("/data/rw/x.txt").exists());
}

/// `cd` into a pod directory works in `read` and `write` modes: relative paths resolve there,
/// for the shell and the programs it starts, and `pwd` (the shell's and `getcwd`'s) names it.
#[test]
fn cd_into_a_pod_directory_works_as_in_the_pod() {
    let pod = LocalPod::start(244);
    let script = "cd /data && cat ./pod-only.txt && pwd && /bin/pwd && ls dir && cat dir/../dir/a.txt && \
                  /bin/sh -c 'cat pod-only.txt; /bin/pwd' && \
                  /usr/bin/python3 -c 'import os; print(os.getcwd(), os.path.isfile(\"pod-only.txt\"))' && \
                  cd dir && /bin/pwd && cat a.txt && cd /tmp && pwd && /bin/pwd && \
                  /usr/bin/python3 -c 'import os; fd = os.open(\"/data/dir\", os.O_RDONLY); os.fchdir(fd); \
                  print(os.getcwd(), open(\"b.txt\").read().strip())'";
    let inside = pod.exec_in_pod("/bin/sh", &["-c", script]);
    for mode in ["read", "write"] {
        let under = kmirror(pod.target_pid, &["--fs-mode", mode], &["/bin/sh", "-c", script]);
        let stdout = expect_status(&under, 0);
        assert_eq!(text(&under), text(&inside), "--fs-mode {mode} (left) and in the pod (right)");
        let expected = "pod-only file 244\n/data\n/data\na.txt\nb.txt\nsub\na\npod-only file 244\n/data\n\
                        /data True\n/data/dir\na\n/tmp\n/tmp\n/data/dir bb\n";
        assert_eq!(stdout, expected);
    }
}
