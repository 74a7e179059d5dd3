//! `make demo`: builds a local pod on this machine (network + mount namespaces with its own DNS
//! server, services, files and environment) and runs the static Go fixture under `kmirror run`
//! against it, printing what the app got from the pod.

use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{fixture, kmirror};

fn show(title: &str, pod: &LocalPod, command: &[&str]) {
    let out = kmirror(pod.target_pid, &[], command);
    println!("$ kmirror run --target pid/{} -- {}", pod.target_pid, command.join(" "));
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    if !stdout.ends_with('\n') {
        println!();
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.is_empty() {
        print!("{stderr}");
    }
    println!("  ^ {title} (exit {})\n", out.status.code().unwrap_or(-1));
}

fn main() {
    kmirror_suite::pod::require_root();
    let pod = LocalPod::start(200);
    let go = fixture("go-app-static");
    let go = go.to_str().unwrap();
    println!(
        "local pod ready: target process {} in netns {}; pod-only service {} (unreachable from this host)\n",
        pod.target_pid, pod.netns, pod.service_ip
    );
    let direct =
        std::process::Command::new(go).args(["connect", &format!("{}:8080", pod.service_ip)]).output();
    if let Ok(out) = direct {
        println!("$ {go} connect {}:8080   (without kmirror)", pod.service_ip);
        print!("{}", String::from_utf8_lossy(&out.stdout));
        println!("  ^ the host cannot reach the pod's service\n");
    }
    show(
        "HTTP by cluster DNS name, answered inside the pod",
        &pod,
        &[go, "get", "http://echo.default.svc.cluster.local:8080/demo"],
    );
    show("an environment variable of the pod's process", &pod, &[go, "env", "POD_ONLY_VAR"]);
    show(
        "the pod's service-account token",
        &pod,
        &[go, "cat", "/var/run/secrets/kubernetes.io/serviceaccount/token"],
    );
    show("the pod's hostname file", &pod, &[go, "cat", "/etc/hostname"]);
    show("curl (glibc) through the pod", &pod, &["curl", "-s", "http://echo:8080/from-curl"]);
}
