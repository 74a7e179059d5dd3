//! Paths walked as the kernel walks them: what `stat`, `cat` and `ls` say under kmirror for
//! paths that step back (`..`, `.`, a trailing slash) is what they say inside the pod.

use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::kmirror;

/// Each command's stdout and exit status, then stderr's errno text, for one shell line.
fn answers(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errno = ["No such file or directory", "Not a directory", "Too many levels of symbolic links"]
        .into_iter()
        .find(|e| stderr.contains(e))
        .unwrap_or("-");
    format!("{}errno={errno}", String::from_utf8_lossy(&out.stdout))
}

#[test]
fn paths_that_step_back_resolve_as_in_the_pod() {
    let pod = LocalPod::start(135);
    // In localwithoverrides mode /etc/hostname is the pod's; in read mode /data is too.
    let cases: &[(&[&str], &str)] = &[
        (&[], "stat -c %F /etc/hostname/"),
        (&[], "cat /etc/nosuch/../hostname"),
        (&[], "cat /etc/hostname/."),
        (&["--fs-mode", "read"], "stat -c %F /data/dir/"),
        (&["--fs-mode", "read"], "stat -c %F /data/link-to-a/"),
        (&["--fs-mode", "read"], "stat -c %F /data/dir/../pod-only.txt"),
        (&["--fs-mode", "read"], "cat /data/dir/a.txt/../b.txt"),
        (&["--fs-mode", "read"], "cat /data/nosuch/../pod-only.txt"),
        (&["--fs-mode", "read"], "ls /data/dir/./sub/.."),
    ];
    for (flags, line) in cases {
        let script = format!("{line}; echo \"rc=$?\"");
        let under = answers(&kmirror(pod.target_pid, flags, &["sh", "-c", &script]));
        let inside = answers(&pod.exec_in_pod("/bin/sh", &["-c", &script]));
        assert_eq!(under, inside, "{line} under kmirror (left) and in the pod (right)");
    }
}

/// A root app that renames its host renames the pod's view only: `sethostname` and writes to
/// `/proc/sys/kernel/hostname` are kmirror's to keep, for the app and its children; the
/// machine's name never changes. Without CAP_SYS_ADMIN the rename fails as it would natively.
#[test]
fn renaming_the_host_stays_with_the_app() {
    let pod = LocalPod::start(136);
    let before = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    // Should kmirror fail, the machine gets its name back.
    struct Restore(String);
    impl Drop for Restore {
        fn drop(&mut self) {
            if std::fs::read_to_string("/proc/sys/kernel/hostname").ok().as_ref() != Some(&self.0) {
                let _ = std::fs::write("/proc/sys/kernel/hostname", self.0.trim_end());
            }
        }
    }
    let _restore = Restore(before.clone());
    let script = "hostname renamed-by-call && hostname && cat /proc/sys/kernel/hostname && \
                  echo renamed-by-file > /proc/sys/kernel/hostname && \
                  for i in $(seq 100); do [ \"$(hostname)\" = renamed-by-file ] && break; sleep 0.02; done; \
                  sh -c hostname";
    let out = kmirror(pod.target_pid, &[], &["sh", "-c", script]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "renamed-by-call\nrenamed-by-call\nrenamed-by-file\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(), before, "the machine's name");
    let nobody =
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "sh", "-c"];
    let out = kmirror(pod.target_pid, &[], &[&nobody[..], &["hostname nope; echo rc=$?; hostname"]].concat());
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("rc=1\n{}\n", pod.pod_hostname()));
    assert_eq!(std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(), before);
}

/// An opened pod file describes itself as `stat` of its path does: mode, owner, size and
/// modification time (an app checking its key file's mode, as ssh does, sees the pod's).
#[test]
fn an_open_pod_file_fstats_like_its_path() {
    let pod = LocalPod::start(137);
    // An owner and a time that a fresh copy on this side would not have by chance.
    let file = pod.rootfs.join("data/pod-only.txt");
    std::os::unix::fs::chown(&file, Some(1234), Some(1235)).unwrap();
    let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000);
    std::fs::File::options().write(true).open(&file).unwrap().set_modified(old).unwrap();
    let script = "import os, sys\n\
                  p = sys.argv[1]\n\
                  s = os.stat(p)\n\
                  f = open(p, 'rb')\n\
                  t = os.fstat(f.fileno())\n\
                  for st in (s, t):\n    print(oct(st.st_mode), st.st_uid, st.st_gid, st.st_size, int(st.st_mtime))\n";
    let path = "/data/pod-only.txt";
    let under = kmirror(pod.target_pid, &["--fs-mode", "read"], &["/usr/bin/python3", "-c", script, path]);
    let inside = pod.exec_in_pod("/usr/bin/python3", &["-c", script, path]);
    let (under, inside) = (String::from_utf8_lossy(&under.stdout), String::from_utf8_lossy(&inside.stdout));
    let lines: Vec<&str> = under.lines().collect();
    assert_eq!(lines.len(), 2, "{under}");
    assert_eq!(lines[0], lines[1], "fstat of the open file (right) against stat of its path (left)");
    assert_eq!(under, inside, "under kmirror (left) and in the pod (right)");
    assert!(lines[0].starts_with("0o100640 1234 1235 "), "the pod file's mode and owner: {under}");
    assert!(lines[0].ends_with(" 1600000000"), "the pod file's time: {under}");
}
