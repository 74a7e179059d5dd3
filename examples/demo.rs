//! `make demo`: builds a local pod on this machine (network + mount namespaces with its own DNS
//! server, services, files and environment) and runs the static Go fixture under `kmirror run`
//! against it, printing what the app got from the pod, then serves the pod's incoming traffic
//! from it (steal, then mirror).

use kmirror_suite::app::{BackgroundApp, HttpConn};
use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{fixture, kmirror};
use std::net::SocketAddr;
use std::time::Duration;

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
    incoming(&pod, go, "steal", "the pod's port 8080 answered by the local app");
    incoming(&pod, go, "mirror", "the pod's app answers; the local app gets a copy");
}

/// Serves the pod's port 8080 from the local app on port 18200 with `--incoming MODE`, and
/// asks the pod's IP from this host, as one of the pod's clients would.
fn incoming(pod: &LocalPod, go: &str, mode: &str, title: &str) {
    let flags = ["--incoming", mode, "--port-map", "18200:8080"];
    println!("$ kmirror run --target pid/{} {} -- {go} serve 18200 &", pod.target_pid, flags.join(" "));
    let app = BackgroundApp::start(pod.target_pid, &flags, &[go, "serve", "18200"]);
    app.wait_stdout("the app to listen", Duration::from_secs(30), |l| {
        l.iter().any(|l| l.starts_with("listening"))
    });
    app.wait_subscribed();
    let path = format!("/from-a-pod-client-{mode}");
    let answer = HttpConn::connect(SocketAddr::from((pod.pod_ip, 8080)))
        .and_then(|mut conn| conn.request("GET", &path, &[], b""))
        .map(|response| response.text())
        .unwrap_or_else(|e| format!("request failed: {e}\n"));
    println!("GET http://{}:8080{path}   (from this host, as one of the pod's clients)", pod.pod_ip);
    print!("{answer}");
    // The local app logs every request it gets, stolen or mirrored.
    app.wait_stdout("the local app's log line", Duration::from_secs(10), |l| {
        l.iter().any(|l| l.starts_with("request "))
    });
    for line in app.stdout_lines().iter().filter(|l| l.starts_with("request ")) {
        println!("  local app logged: {line}");
    }
    app.stop();
    println!("  ^ {title}\n");
}
