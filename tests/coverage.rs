//! What the README promises and no other test checked: IPv6 outgoing traffic to pod-only
//! addresses, writes to pod paths, the incoming modes and flags, the session's end, the
//! signals kmirror forwards and the size bound of pod files. Pod indices 100..=129.

use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{field, go_fixtures, kmirror, ok};

/// Outgoing IPv6: TCP and UDP to the pod-only IPv6 service address (which the host cannot
/// route: it has an `unreachable` guard) go through the pod, from static Go and from Python,
/// with the pod's address as the peer.
#[test]
fn ipv6_outgoing_reaches_pod_only_addresses() {
    let pod = LocalPod::start(100);
    let ip6 = pod.service_ip6;
    // Without kmirror the host cannot reach it at all.
    let go = go_fixtures()[0].to_str().unwrap().to_string();
    let bare = std::process::Command::new(&go).args(["connect", &format!("[{ip6}]:7777")]).output().unwrap();
    assert_eq!(bare.status.code(), Some(1), "the host reached a pod-only address");
    for go in go_fixtures() {
        let go = go.to_str().unwrap();
        let out = ok(&kmirror(pod.target_pid, &[], &[go, "dial", &format!("[{ip6}]:7777")]));
        assert_eq!(
            field(&out, "echo"),
            Some(format!("pod-echo {}: ping", pod.index).as_str()),
            "{go}: {out}"
        );
        assert_eq!(field(&out, "peer"), Some(format!("[{ip6}]:7777").as_str()), "{go}: {out}");
        let out = ok(&kmirror(pod.target_pid, &[], &[go, "udp", &format!("[{ip6}]:7778"), "v6"]));
        assert_eq!(field(&out, "reply"), Some(format!("pod-udp {}: v6", pod.index).as_str()), "{go}: {out}");
        assert_eq!(field(&out, "peer"), Some(format!("[{ip6}]:7778").as_str()), "{go}: {out}");
    }
    let script = format!(
        "import socket\n\
         t = socket.create_connection(('{ip6}', 7777), timeout=10)\n\
         t.sendall(b'py6\\n')\n\
         print('echo=' + t.makefile().readline().strip())\n\
         print('peer=%s:%d' % t.getpeername()[:2])\n\
         u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.settimeout(10)\n\
         u.sendto(b'd6', ('{ip6}', 7778))\n\
         data, sender = u.recvfrom(100)\n\
         print('udp=%s from %s:%d' % (data.decode(), sender[0], sender[1]))\n"
    );
    let out = ok(&kmirror(pod.target_pid, &[], &["python3", "-c", &script]));
    let n = pod.index;
    assert_eq!(
        out,
        format!("echo=pod-echo {n}: py6\npeer={ip6}:7777\nudp=pod-udp {n}: d6 from {ip6}:7778\n")
    );
}

/// The harness reads a child's output while it runs: more than a pipe holds (64 KiB) must
/// not block the child until the deadline.
#[test]
fn output_beyond_a_pipe_buffer_does_not_block_the_child() {
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "head -c 1048576 /dev/zero; head -c 200000 /dev/zero >&2"]);
    let out = kmirror_suite::run::output_within(cmd, std::time::Duration::from_secs(20));
    assert!(out.status.success());
    assert_eq!((out.stdout.len(), out.stderr.len()), (1 << 20, 200_000));
}
