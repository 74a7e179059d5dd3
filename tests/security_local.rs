//! The developer's machine stays the developer's: kmirror (run as root) never does for an app
//! what the app could not do itself, and the pod cannot make the local runtime load its code.
//!
//! No confused deputy on local files: Paths that step out of a pod directory follow the kernel's rules (a
//! component after a file is ENOTDIR), and whatever kmirror then carries out locally runs with
//! the app's own credentials.

use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::kmirror;
use std::path::PathBuf;

/// Runs `script` under kmirror as the unprivileged user 65534 (nobody).
fn as_nobody(pod: &LocalPod, flags: &[&str], script: &str) -> std::process::Output {
    let command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", script];
    kmirror(pod.target_pid, flags, &command)
}

/// Files this test creates on the host, removed whatever happens.
struct HostFiles(Vec<PathBuf>);

impl Drop for HostFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[test]
fn a_path_through_a_pod_file_is_not_a_directory() {
    let pod = LocalPod::start(130);
    let created = PathBuf::from(format!("/etc/kmirror-deputy-{}", std::process::id()));
    let _cleanup = HostFiles(vec![created.clone()]);
    let name = created.file_name().unwrap().to_str().unwrap();
    // Natively, /etc/hosts is a file and nothing lies below it.
    let script = format!(
        "head -c 20 /etc/hosts/../shadow; echo \"read=$?\"; echo x > /etc/hosts/../{name}; echo \"write=$?\"; \
         stat /etc/hosts/../passwd >/dev/null; echo \"stat=$?\"; test -e /etc/resolv.conf/../passwd; \
         echo \"access=$?\"; readlink /etc/hosts/../alternatives/awk; echo \"readlink=$?\""
    );
    let out = as_nobody(&pod, &[], &script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stdout.contains("root:"), "an unprivileged app read /etc/shadow through kmirror: {stdout}");
    for step in ["read", "write", "stat", "access", "readlink"] {
        assert!(
            stdout.contains(&format!("{step}=1")) || stdout.contains(&format!("{step}=2")),
            "{step} through a pod file must fail: {stdout}\n{stderr}"
        );
    }
    assert!(stderr.contains("Not a directory"), "the kernel's errno, ENOTDIR: {stderr}");
    assert!(!created.exists(), "kmirror created {} for an unprivileged app", created.display());
}

#[test]
fn local_files_reached_through_a_pod_directory_are_opened_with_the_apps_rights() {
    let pod = LocalPod::start(131);
    // /root is 0700 here: user 65534 may not even look inside it.
    let secret = PathBuf::from(format!("/root/kmirror-deputy-secret-{}", std::process::id()));
    let link = PathBuf::from(format!("/root/kmirror-deputy-link-{}", std::process::id()));
    let _cleanup = HostFiles(vec![secret.clone(), link.clone()]);
    std::fs::write(&secret, "root-only secret\n").unwrap();
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    let via_pod = |p: &PathBuf| format!("/data/..{}", p.display());
    let (secret_via_pod, link_via_pod) = (via_pod(&secret), via_pod(&link));
    let read = ["--fs-mode", "read"];
    // As root, the same paths work: /data is the pod's directory, `..` leads back to the local
    // /root (a local-only path in read mode).
    let out = kmirror(
        pod.target_pid,
        &read,
        &["sh", "-c", &format!("cat {secret_via_pod}; readlink {link_via_pod}")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("root-only secret"), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&secret.display().to_string()), "{stdout}");
    // As nobody, every call fails as it would natively on /root: EACCES.
    let script = format!(
        "cat {secret_via_pod}; echo \"read=$?\"; stat {secret_via_pod} >/dev/null; echo \"stat=$?\"; \
         test -r {secret_via_pod}; echo \"access=$?\"; readlink {link_via_pod}; echo \"readlink=$?\"; \
         /usr/bin/python3 -c 'import os,sys; os.getxattr(sys.argv[1], \"user.x\")' {secret_via_pod} 2>&1 | tail -1"
    );
    let out = as_nobody(&pod, &read, &script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stdout.contains("root-only secret"), "an unprivileged app read a root-only file: {stdout}");
    let secret_name = secret.display().to_string();
    assert!(!stdout.lines().any(|l| l == secret_name), "readlink answered as root: {stdout}");
    for step in ["read", "stat", "access", "readlink"] {
        assert!(stdout.contains(&format!("{step}=1")), "{step} must fail: {stdout}\n{stderr}");
    }
    assert!(stdout.contains("PermissionError"), "getxattr as nobody: EACCES: {stdout}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
}

#[test]
fn control_messages_are_sent_with_the_apps_capabilities() {
    let pod = LocalPod::start(132);
    // SO_MARK needs CAP_NET_ADMIN: nobody gets EPERM natively, and must under kmirror too,
    // although kmirror (root) sends the datagram on the app's behalf. Root may.
    let script = format!(
        "import socket, struct\n\
         u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         mark = [(socket.SOL_SOCKET, socket.SO_MARK, struct.pack('I', 7))]\n\
         try:\n    u.sendmsg([b'marked'], mark, 0, ('{ip}', 7778))\n    print('sent')\n\
         except PermissionError:\n    print('EPERM')\n",
        ip = pod.service_ip
    );
    let python = ["/usr/bin/python3", "-c", script.as_str()];
    let nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"];
    let out = kmirror(pod.target_pid, &[], &[&nobody[..], &python[..]].concat());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "EPERM\n", "{}", String::from_utf8_lossy(&out.stderr));
    let out = kmirror(pod.target_pid, &[], &python);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "sent\n", "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_pods_code_loading_variables_stay_out_unless_named() {
    let pod = LocalPod::start(133);
    let show = ["sh", "-c", "echo \"node=${NODE_OPTIONS-unset}\""];
    let out = kmirror(pod.target_pid, &[], &show);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "node=unset\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("kept the pod's NODE_OPTIONS") && stderr.contains("--env-include"), "{stderr}");
    let out = kmirror(pod.target_pid, &["--env-include", "NODE_OPTIONS"], &show);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "node=--no-warnings\n");
    let mut local = kmirror_suite::run::kmirror_cmd(pod.target_pid, &[], &show);
    local.env("NODE_OPTIONS", "--local");
    let out = kmirror_suite::run::output_within(local, std::time::Duration::from_secs(60));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "node=--local\n");
}
