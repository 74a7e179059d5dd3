//! Fallbacks for kernel features the developer's kernel may lack, exercised on this one:
//! `KMIRROR_FORCE_FALLBACK` makes kmirror take the same path as on an older kernel (the qemu
//! kernel matrix, `make kernel-matrix`, runs the real kernels).

use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{field, go_fixtures, kmirror_bin, kmirror_cmd, ok, output_within};
use std::time::Duration;

/// Before Linux 6.9 a trapped thread cannot have a pidfd of its own: kmirror takes the app's
/// sockets through its process's pidfd instead and checks each one. Go's network calls run on
/// threads other than the main one, so this is the case that broke silently on 6.1.
#[test]
fn sockets_are_intercepted_without_thread_pidfds() {
    let pod = LocalPod::start(134);
    let features = output_within(
        {
            let mut c = std::process::Command::new(kmirror_bin());
            c.arg("features").env("KMIRROR_FORCE_FALLBACK", "thread-pidfd");
            c
        },
        Duration::from_secs(20),
    );
    let table = ok(&features);
    assert!(table.lines().any(|l| l.starts_with("pidfd of a thread") && l.contains("fallback")), "{table}");
    for go in go_fixtures() {
        let go = go.to_str().unwrap();
        let get = ["get", "http://echo.default.svc.cluster.local:8080/fallback"];
        let mut cmd = kmirror_cmd(pod.target_pid, &[], &[&[go][..], &get[..]].concat());
        cmd.env("KMIRROR_FORCE_FALLBACK", "thread-pidfd");
        let out = ok(&output_within(cmd, Duration::from_secs(60)));
        assert_eq!(field(&out, "body"), Some(format!("pod-echo {} /fallback", pod.index).as_str()), "{go}");
        assert_eq!(field(&out, "peer"), Some(format!("{}:8080", pod.service_ip).as_str()), "{go}");
        let udp = ["udp", &format!("{}:7778", pod.service_ip), "hi"];
        let mut cmd = kmirror_cmd(pod.target_pid, &[], &[&[go][..], &udp[..]].concat());
        cmd.env("KMIRROR_FORCE_FALLBACK", "thread-pidfd");
        let out = ok(&output_within(cmd, Duration::from_secs(60)));
        assert_eq!(field(&out, "reply"), Some(format!("pod-udp {}: hi", pod.index).as_str()), "{go}");
    }
}
