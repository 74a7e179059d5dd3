//! The same pod answers for every kind of client: Java (dual-stack sockets, glibc resolver),
//! glibc tools (getent, curl), and static Go under garbage-collector pressure.

use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{field, fixture, go_fixtures, kmirror, kmirror_cmd, ok, output_within};
use std::time::Duration;

fn java(pod: &LocalPod, args: &[&str]) -> String {
    let classes = fixture("java-app");
    let mut command = vec!["java", "-cp", classes.to_str().unwrap(), "App"];
    command.extend_from_slice(args);
    ok(&kmirror(pod.target_pid, &[], &command))
}

#[test]
fn java_uses_pod_dns_connections_env_and_files() {
    let pod = LocalPod::start(21);
    let out = java(&pod, &["get", "http://echo.default.svc.cluster.local:8080/java"]);
    assert_eq!(field(&out, "status"), Some("200"), "{out}");
    assert_eq!(field(&out, "body"), Some(format!("pod-echo {} /java", pod.index).as_str()));
    assert_eq!(field(&out, "peer"), Some(format!("{}:8080", pod.service_ip).as_str()));
    let out = java(&pod, &["dial", &format!("{}:7777", pod.service_ip)]);
    assert_eq!(field(&out, "echo"), Some(format!("pod-echo {}: ping", pod.index).as_str()));
    let out = java(&pod, &["udp", &format!("{}:7778", pod.service_ip), "j"]);
    assert_eq!(field(&out, "reply"), Some(format!("pod-udp {}: j", pod.index).as_str()));
    let out = java(&pod, &["env", "POD_ONLY_VAR"]);
    assert_eq!(field(&out, "env"), Some(format!("pod-value-{}", pod.index).as_str()));
    let out = java(&pod, &["cat", "/var/run/secrets/kubernetes.io/serviceaccount/token"]);
    assert_eq!(out, format!("pod-token-{}", pod.index));
    let out = java(&pod, &["resolve", "pod-hosts-only.internal"]);
    assert_eq!(field(&out, "addr"), Some(pod.service_ip.to_string().as_str()));
    let refused = kmirror(
        pod.target_pid,
        &[],
        &[
            "java",
            "-cp",
            fixture("java-app").to_str().unwrap(),
            "App",
            "connect",
            &format!("{}:1", pod.service_ip),
        ],
    );
    assert_eq!(field(&String::from_utf8_lossy(&refused.stdout), "errno"), Some("ECONNREFUSED"));
}

#[test]
fn glibc_clients_resolve_and_connect_through_the_pod() {
    let pod = LocalPod::start(22);
    let out = ok(&kmirror(pod.target_pid, &[], &["getent", "hosts", "echo.default.svc.cluster.local"]));
    assert_eq!(out.split_whitespace().next(), Some(pod.service_ip.to_string().as_str()), "{out}");
    // The search list comes from the pod's resolv.conf.
    let out = ok(&kmirror(pod.target_pid, &[], &["getent", "hosts", "echo"]));
    assert!(out.starts_with(&pod.service_ip.to_string()), "{out}");
    // A large answer is truncated over UDP; glibc retries over TCP, which is forwarded too.
    let out = ok(&kmirror(pod.target_pid, &[], &["getent", "ahostsv4", "big.default.svc.cluster.local"]));
    let distinct: std::collections::BTreeSet<_> =
        out.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(distinct.len(), 40, "{out}");
    let url = "http://echo.default.svc.cluster.local:8080/curl";
    let out = ok(&kmirror(
        pod.target_pid,
        &[],
        &["curl", "-sS", "--max-time", "10", "-w", "\n%{remote_ip}:%{remote_port}", url],
    ));
    assert_eq!(out, format!("pod-echo {} /curl\n\n{}:8080", pod.index, pod.service_ip));
    let missing_name = "nothing.default.svc.cluster.local";
    let asked =
        |log: &str| log.lines().any(|l| l.starts_with("dns ") && l.ends_with(&format!(" {missing_name}")));
    assert!(!asked(&pod.service_log()), "asked before the test did");
    let missing = kmirror(pod.target_pid, &[], &["getent", "hosts", missing_name]);
    assert_eq!(missing.status.code(), Some(2), "getent found {missing_name}");
    // Exit status 2 is any "not found": the pod's resolver must be the one that said so.
    let log = pod.service_log();
    assert!(asked(&log), "the pod's DNS server never saw the query for {missing_name}:\n{log}");
}

#[test]
fn loopback_stays_local() {
    let pod = LocalPod::start(23);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        let (conn, _) = listener.accept().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&conn).read_line(&mut line).unwrap();
        (&conn).write_all(format!("local: {line}").as_bytes()).unwrap();
    });
    let go = &go_fixtures()[0];
    let out =
        ok(&kmirror(pod.target_pid, &[], &[go.to_str().unwrap(), "dial", &format!("127.0.0.1:{port}")]));
    assert_eq!(field(&out, "echo"), Some("local: ping"));
    server.join().unwrap();
}

/// Under constant GC and SIGURG preemption each redirected connect is notified exactly once:
/// WAIT_KILLABLE_RECV keeps the signal from aborting and restarting the trapped call.
#[test]
fn go_gc_pressure_notifies_each_connect_once() {
    let pod = LocalPod::start(24);
    let iterations = 200;
    for go in go_fixtures() {
        let stats = std::env::temp_dir().join(format!("kmirror-stats-{}-{}", std::process::id(), pod.index));
        let mut cmd = kmirror_cmd(
            pod.target_pid,
            &[],
            &[go.to_str().unwrap(), "gcstress", &format!("{}:7777", pod.service_ip), &iterations.to_string()],
        );
        cmd.env("KMIRROR_STATS_FILE", &stats);
        let out = ok(&output_within(cmd, Duration::from_secs(120)));
        assert_eq!(field(&out, "ok"), Some(iterations.to_string().as_str()), "{out}");
        let numgc: u64 = field(&out, "numgc").unwrap().parse().unwrap();
        assert!(numgc > 10, "the fixture must actually collect garbage (numgc={numgc})");
        let report = std::fs::read_to_string(&stats).unwrap();
        let connects: u64 = report.lines().find_map(|l| l.strip_prefix("connect ")).unwrap().parse().unwrap();
        assert_eq!(connects, iterations, "connect notifications ({go:?}):\n{report}");
        std::fs::remove_file(stats).unwrap();
    }
}

/// io_uring would bypass every trap: the filter fails it with ENOSYS and the app falls back.
#[test]
fn io_uring_is_refused_and_the_app_falls_back() {
    let pod = LocalPod::start(25);
    let go = &go_fixtures()[1];
    // The control run: without kmirror io_uring works here, so ENOSYS below is kmirror's doing.
    let bare = std::process::Command::new(go).arg("uring").output().unwrap();
    let bare_out = String::from_utf8_lossy(&bare.stdout);
    assert_eq!(
        field(&bare_out, "io_uring"),
        Some("ok"),
        "io_uring must work without kmirror for this test to prove anything: {bare_out}"
    );
    let out = ok(&kmirror(pod.target_pid, &[], &[go.to_str().unwrap(), "uring"]));
    assert_eq!(field(&out, "io_uring"), Some("ENOSYS"));
    assert_eq!(field(&out, "hostname"), Some(pod.pod_hostname().as_str()));
}
