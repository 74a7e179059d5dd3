//! Two cases the fidelity review named: OpenSSH's key loading (it refuses a private key that
//! others may read, and reads the mode from the open descriptor) with a key that lives in the
//! pod, and the errno of extended-attribute calls on pod paths. Each compares the same program
//! run inside the pod with it run under kmirror.

use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::kmirror;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

/// Status, stdout and stderr, without kmirror's own notices.
fn text(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let theirs: String =
        stderr.lines().filter(|l| !l.starts_with("kmirror: ")).map(|l| format!("{l}\n")).collect();
    format!("status={:?}\n{}{theirs}", out.status.code(), String::from_utf8_lossy(&out.stdout))
}

#[test]
fn ssh_keygen_takes_a_protected_pod_key_and_refuses_an_open_one() {
    let pod = LocalPod::start(246);
    let key = pod.rootfs.join("data/id_pod");
    let _ = std::fs::remove_file(&key);
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "pod-key", "-f"])
        .arg(&key)
        .output()
        .expect("ssh-keygen (openssh-client)");
    assert!(made.status.success(), "{}", text(&made));
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let args = ["-y", "-f", "/data/id_pod"];

    // 0600, owned by root (the user running): OpenSSH accepts it and derives the public key.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let under = kmirror(pod.target_pid, &["--fs-mode", "read"], &[&["ssh-keygen"][..], &args].concat());
    let inside = pod.exec_in_pod("ssh-keygen", &args);
    assert!(under.status.success(), "under kmirror: {}", text(&under));
    assert_eq!(text(&under), text(&inside), "under kmirror (left) and in the pod (right)");
    let derived = String::from_utf8_lossy(&under.stdout);
    assert_eq!(
        derived.split_whitespace().take(2).collect::<Vec<_>>(),
        public.split_whitespace().take(2).collect::<Vec<_>>()
    );

    // 0644: both refuse it as unprotected.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let under = kmirror(pod.target_pid, &["--fs-mode", "read"], &[&["ssh-keygen"][..], &args].concat());
    let inside = pod.exec_in_pod("ssh-keygen", &args);
    assert!(!under.status.success(), "{}", text(&under));
    assert!(text(&under).contains("UNPROTECTED PRIVATE KEY FILE"), "{}", text(&under));
    assert_eq!(text(&under), text(&inside), "under kmirror (left) and in the pod (right)");
}

/// getxattr on a pod path answers what the kernel would: the path's own errno first (a
/// missing file, a directory the app may not search), then "no such attribute".
#[test]
fn xattr_calls_on_pod_paths_give_the_paths_errno_first() {
    let pod = LocalPod::start(247);
    let locked = pod.rootfs.join("data/locked");
    std::fs::create_dir_all(&locked).unwrap();
    std::fs::write(locked.join("inner.txt"), "x").unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700)).unwrap();
    let script = "import os, sys\n\
                  for p in sys.argv[1:]:\n    \
                  try:\n        os.getxattr(p, 'user.kmirror'); print(p, 'found')\n    \
                  except OSError as e:\n        print(p, e.errno)\n";
    // pod-only.txt is 0640 root: nobody may not read it, so not its user. attributes either.
    let readable = pod.rootfs.join("data/readable.txt");
    std::fs::write(&readable, "r").unwrap();
    std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o644)).unwrap();
    let paths = [
        "/data/readable.txt",
        "/data/pod-only.txt",
        "/data/nosuch.txt",
        "/data/nosuch/x",
        "/data/readable.txt/x",
        "/data/locked/inner.txt",
    ];
    let nobody =
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", script];
    let under = kmirror(pod.target_pid, &["--fs-mode", "read"], &[&nobody[..], &paths].concat());
    let inside = pod.exec_in_pod("setpriv", &[&nobody[1..], &paths[..]].concat());
    assert_eq!(text(&under), text(&inside), "under kmirror (left) and in the pod (right)");
    let expected = format!(
        "/data/readable.txt {}\n/data/pod-only.txt {}\n/data/nosuch.txt {}\n/data/nosuch/x {}\n/data/readable.txt/x {}\n/data/locked/inner.txt {}\n",
        libc::ENODATA,
        libc::EACCES,
        libc::ENOENT,
        libc::ENOENT,
        libc::ENOTDIR,
        libc::EACCES
    );
    assert_eq!(String::from_utf8_lossy(&under.stdout), expected, "{}", text(&under));
}
