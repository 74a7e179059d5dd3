//! `kmirror port-forward`: local ports whose connections are made from the target, to pod-only
//! addresses and to names only the pod's resolver knows (through its search list).

use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{LineReader, kmirror_bin, output_within, spawn_tied, wait_within};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

fn http_get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn forwards_reach_pod_only_addresses_and_names_until_a_signal() {
    let pod = LocalPod::start(238);
    let mut cmd = Command::new(kmirror_bin());
    cmd.args(["port-forward", "-t", &format!("pid/{}", pod.target_pid)])
        // `echo` is known only to the pod's resolver, as echo.default.svc.cluster.local (its
        // search list); the service address is pod-only (the host routes it nowhere).
        .args(["-L", "0:echo:8080", "-L", &format!("0:{}:8080", pod.service_ip), "-L", "0:nosuch:80"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_tied(cmd).expect("kmirror port-forward");
    let out = LineReader::new(child.stdout.take().unwrap());
    let errors = LineReader::new(child.stderr.take().unwrap());
    let ports: Vec<u16> = (0..3)
        .map(|_| {
            let line = out.line_within(Duration::from_secs(20));
            let port = line.strip_prefix("Forwarding from 127.0.0.1:").and_then(|r| r.split(' ').next());
            port.and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("unexpected line {line:?}"))
        })
        .collect();

    let by_name = http_get(ports[0], "/by-name");
    assert!(by_name.ends_with(&format!("pod-echo {} /by-name\n", pod.index)), "{by_name}");
    // Two at once, each its own connection in the pod.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| http_get(ports[1], "/one"));
        let b = s.spawn(|| http_get(ports[1], "/two"));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(a.ends_with(&format!("pod-echo {} /one\n", pod.index)), "{a}");
    assert!(b.ends_with(&format!("pod-echo {} /two\n", pod.index)), "{b}");
    // A name the pod cannot resolve: the connection is closed and the reason printed.
    assert_eq!(http_get(ports[2], "/"), "");
    let said = errors.line_within(Duration::from_secs(10));
    assert!(said.contains("nosuch:80 failed: the target's resolver does not know \"nosuch\""), "{said}");
    // The pod saw the request by name come from the pod side: its log names the path.
    assert!(pod.service_log().contains("/by-name"), "{}", pod.service_log());

    // SIGTERM (as Ctrl-C's SIGINT) ends it cleanly.
    kmirror_suite::run::signal(child.id(), libc::SIGTERM).unwrap();
    let status = wait_within(&mut child, "port-forward after SIGTERM", Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(TcpStream::connect(("127.0.0.1", ports[0])).is_err(), "the port is still open");
}

#[test]
fn a_malformed_forward_is_refused_before_anything_starts() {
    let mut cmd = Command::new(kmirror_bin());
    cmd.args(["port-forward", "-t", "pid/1", "-L", "8080:web"]);
    let out = output_within(cmd, Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is not [BIND:]LOCAL_PORT:HOST:PORT"), "{stderr}");
}
