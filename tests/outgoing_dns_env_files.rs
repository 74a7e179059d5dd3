//! `kmirror run` against a local pod: outgoing traffic, DNS, environment and pod files, for the
//! static Go fixture (Debian's Go and the current release), each compared with the answer the
//! same fixture gives when run inside the pod.

use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{expect_status, field, go_fixtures, kmirror, ok};

fn run_go(pod: &LocalPod, go: &str, flags: &[&str], args: &[&str]) -> std::process::Output {
    let mut command = vec![go];
    command.extend_from_slice(args);
    kmirror(pod.target_pid, flags, &command)
}

#[test]
fn go_static_reaches_pod_services_by_cluster_name() {
    let pod = LocalPod::start(11);
    for go in go_fixtures() {
        let go = go.to_str().unwrap();
        let out = ok(&run_go(&pod, go, &[], &["get", "http://echo.default.svc.cluster.local:8080/hello"]));
        assert_eq!(field(&out, "status"), Some("200"), "{go}: {out}");
        assert_eq!(field(&out, "body"), Some(format!("pod-echo {} /hello", pod.index).as_str()), "{go}");
        assert_eq!(field(&out, "peer"), Some(format!("{}:8080", pod.service_ip).as_str()), "{go}");

        // Short name through the pod's search list, as in a real pod.
        let out = ok(&run_go(&pod, go, &[], &["get", "http://echo:8080/short"]));
        assert_eq!(field(&out, "body"), Some(format!("pod-echo {} /short", pod.index).as_str()));

        let out = ok(&run_go(&pod, go, &[], &["dial", &format!("{}:7777", pod.service_ip)]));
        assert_eq!(field(&out, "echo"), Some(format!("pod-echo {}: ping", pod.index).as_str()));
        assert_eq!(field(&out, "peer"), Some(format!("{}:7777", pod.service_ip).as_str()));

        let out = ok(&run_go(&pod, go, &[], &["udp", &format!("{}:7778", pod.service_ip), "hi-udp"]));
        assert_eq!(field(&out, "reply"), Some(format!("pod-udp {}: hi-udp", pod.index).as_str()));
        assert_eq!(field(&out, "peer"), Some(format!("{}:7778", pod.service_ip).as_str()));
    }
    let log = pod.service_log();
    assert!(log.contains("echo.default.svc.cluster.local"), "the pod's DNS server saw no query:\n{log}");
}

#[test]
fn refused_pod_destination_keeps_its_errno() {
    let pod = LocalPod::start(12);
    for go in go_fixtures() {
        let out = run_go(&pod, go.to_str().unwrap(), &[], &["connect", &format!("{}:1", pod.service_ip)]);
        let stdout = expect_status(&out, 1);
        assert_eq!(field(&stdout, "errno"), Some("ECONNREFUSED"), "{stdout}");
    }
}

#[test]
fn pod_environment_is_merged_with_local_only_variables_kept() {
    let pod = LocalPod::start(13);
    let go = &go_fixtures()[0];
    let go = go.to_str().unwrap();
    let out = ok(&run_go(&pod, go, &[], &["env", "POD_ONLY_VAR"]));
    assert_eq!(field(&out, "env"), Some(format!("pod-value-{}", pod.index).as_str()));
    let local_path = std::env::var("PATH").unwrap();
    let out = ok(&run_go(&pod, go, &[], &["env", "PATH"]));
    assert_eq!(field(&out, "env"), Some(local_path.as_str()), "PATH stays local");
    let out = run_go(&pod, go, &["--env-exclude", "POD_*"], &["env", "POD_ONLY_VAR"]);
    expect_status(&out, 1);
    let out = run_go(&pod, go, &["--no-env"], &["env", "SHARED_VAR"]);
    expect_status(&out, 1);
}

#[test]
fn pod_specific_files_come_from_the_pod_by_default() {
    let pod = LocalPod::start(14);
    for go in go_fixtures() {
        let go = go.to_str().unwrap();
        let token =
            ok(&run_go(&pod, go, &[], &["cat", "/var/run/secrets/kubernetes.io/serviceaccount/token"]));
        assert_eq!(token, format!("pod-token-{}", pod.index));
        let hostname = ok(&run_go(&pod, go, &[], &["cat", "/etc/hostname"]));
        assert_eq!(hostname.trim(), pod.pod_hostname());
        let hosts = ok(&run_go(&pod, go, &[], &["resolve", "pod-hosts-only.internal"]));
        assert_eq!(field(&hosts, "addr"), Some(pod.service_ip.to_string().as_str()), "pod /etc/hosts");
        let stat = ok(&run_go(&pod, go, &[], &["stat", "/etc/hostname"]));
        assert!(stat.starts_with(&format!("size={} ", hostname.len())), "{stat}");
        // Not pod-specific: stays local in the default mode.
        let missing = run_go(&pod, go, &[], &["cat", "/data/pod-only.txt"]);
        expect_status(&missing, 2);
    }
}

#[test]
fn read_mode_serves_the_pod_filesystem_and_matches_inside_answers() {
    let pod = LocalPod::start(15);
    let go = &go_fixtures()[1];
    let go = go.to_str().unwrap();
    let read = ["--fs-mode", "read"];
    let cases: &[&[&str]] = &[
        &["cat", "/data/pod-only.txt"],
        &["stat", "/data/pod-only.txt"],
        &["stat", "/data/link-to-a"],
        &["stat", "/data/dir"],
        &["ls", "/data/dir"],
        &["cat", "/data/link-to-a"],
        &["cat", "/etc/hostname"],
    ];
    for args in cases {
        let under_kmirror = ok(&run_go(&pod, go, &read, args));
        let inside = pod.exec_in_pod(go, args);
        assert_eq!(under_kmirror, ok(&inside), "{args:?} differs from the answer inside the pod");
    }
    assert_eq!(ok(&run_go(&pod, go, &read, &["ls", "/data/dir"])), "a.txt\nb.txt\nsub\n");
    // Missing in the pod: ENOENT, even though the local machine may have the path.
    expect_status(&run_go(&pod, go, &read, &["cat", "/data/missing"]), 2);
    expect_status(&run_go(&pod, go, &read, &["stat", "/data/escape"]), 0);
    expect_status(&run_go(&pod, go, &read, &["cat", "/data/escape"]), 2);
    // Local-only paths stay local in read mode: the binary itself and /proc.
    ok(&run_go(&pod, go, &read, &["stat", go]));
}

#[test]
fn local_mode_turns_file_access_off() {
    let pod = LocalPod::start(16);
    let go = &go_fixtures()[0];
    let out = ok(&run_go(&pod, go.to_str().unwrap(), &["--fs-mode", "local"], &["cat", "/etc/hostname"]));
    assert_eq!(out, std::fs::read_to_string("/etc/hostname").unwrap());
}
