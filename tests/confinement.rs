//! Pod file access never leaves the target's root: symlinks in the pod that point at a file
//! that exists only on the host (absolute, relative with `..`, through /proc magic links) do not
//! reach it.

use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{go_fixtures, kmirror};

#[test]
fn escaping_symlinks_in_the_pod_cannot_reach_host_files() {
    let pod = LocalPod::start(71);
    let secret_path = format!("/etc/kmirror-host-only-{}", pod.index);
    let secret = "host-only secret";
    std::fs::write(&secret_path, secret).unwrap();
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _cleanup = Remove(secret_path.clone());
    let data = pod.rootfs.join("data");
    std::os::unix::fs::symlink(format!("../../../../../../..{secret_path}"), data.join("rel-escape"))
        .unwrap();
    std::os::unix::fs::symlink(format!("/proc/self/root{secret_path}"), data.join("magic-escape")).unwrap();
    std::os::unix::fs::symlink(format!("/proc/1/root{secret_path}"), data.join("pid1-escape")).unwrap();
    let go = go_fixtures()[0].to_str().unwrap().to_string();
    // `escape` is the harness's absolute symlink to the same host path.
    for link in ["escape", "rel-escape", "magic-escape", "pid1-escape"] {
        let path = format!("/data/{link}");
        for command in [vec![go.as_str(), "cat", &path], vec!["cat", &path]] {
            let out = kmirror(pod.target_pid, &["--fs-mode", "read"], &command);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(!stdout.contains(secret), "{command:?} read the host's file through the pod");
            assert!(!out.status.success(), "{command:?} must fail");
        }
    }
    // The host path itself, asked for directly, is the pod's (which lacks it).
    let out = kmirror(pod.target_pid, &["--fs-mode", "read"], &[&go, "cat", &secret_path]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(secret));
}
