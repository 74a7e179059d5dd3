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
