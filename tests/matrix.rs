//! The runtime matrix: one app per runtime (static and dynamic Go, Java, static-musl and glibc
//! Rust, static-musl C, Python, Node.js) runs the same scenarios under `kmirror run` against a
//! local pod, and again inside the pod without kmirror to prove the fixture itself is right.
//! Prints a runtime × scenario table and fails if any cell fails.

use kmirror_suite::app::{BackgroundApp, HttpConn};
use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{fixture, kmirror, root};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

/// How to start one runtime's fixture: the program and the arguments before the scenario's.
struct Runtime {
    name: &'static str,
    /// On the host (under kmirror).
    host: Vec<String>,
    /// Inside the pod: a host binary (copied in by `exec_in_pod`), or an interpreter from the
    /// pod's PATH with its script or classes copied into the pod's root.
    pod: Vec<String>,
}

fn copy_into_pod(pod: &LocalPod, host_path: &std::path::Path, name: &str) -> String {
    let dir = pod.rootfs.join("kmirror-fixtures");
    std::fs::create_dir_all(&dir).unwrap();
    let target = dir.join(name);
    if host_path.is_dir() {
        std::fs::create_dir_all(&target).unwrap();
        for entry in std::fs::read_dir(host_path).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), target.join(entry.file_name())).unwrap();
        }
    } else {
        std::fs::copy(host_path, &target).unwrap();
    }
    format!("/kmirror-fixtures/{name}")
}

fn runtimes(pod: &LocalPod) -> Vec<Runtime> {
    let native = |name: &'static str, file: &str| {
        // exec_in_pod copies a host binary into the pod itself.
        let path = fixture(file).to_str().unwrap().to_string();
        Runtime { name, host: vec![path.clone()], pod: vec![path] }
    };
    // The real JVM path: /usr/bin/java goes through /etc/alternatives, which a pod lacks.
    let java = std::fs::canonicalize("/usr/bin/java").unwrap().to_str().unwrap().to_string();
    let java_classes = fixture("java-app");
    let java_in_pod = copy_into_pod(pod, &java_classes, "java-app");
    // A JDK image carries its configuration in /etc; the pod's minimal root gets the host's.
    let copied = std::process::Command::new("cp")
        .args(["-a", "/etc/java-17-openjdk"])
        .arg(pod.rootfs.join("etc"))
        .status()
        .unwrap();
    assert!(copied.success());
    let python = root().join("fixtures/python-app/app.py");
    let node = root().join("fixtures/node-app/app.js");
    let interpreted = |name: &'static str, interpreter: &str, script: PathBuf, file: &str| Runtime {
        name,
        host: vec![interpreter.into(), script.to_str().unwrap().into()],
        pod: vec![interpreter.into(), copy_into_pod(pod, &script, file)],
    };
    vec![
        native("go static (Debian Go)", "go-app-static"),
        native("go static (current Go)", "go-app-static-current"),
        native("go dynamic (cgo resolver)", "go-app-dynamic"),
        Runtime {
            name: "java 17",
            host: vec![java.clone(), "-cp".into(), java_classes.to_str().unwrap().into(), "App".into()],
            pod: vec![java, "-cp".into(), java_in_pod, "App".into()],
        },
        native("rust static (musl)", "rust-app-musl"),
        native("rust glibc", "rust-app-gnu"),
        native("c static (musl)", "c-app-musl"),
        interpreted("python 3", "python3", python, "app.py"),
        interpreted("node.js", "node", node, "app.js"),
    ]
}

/// Judges one run's output.
type Check = Box<dyn Fn(&Output) -> Result<(), String>>;

/// One scenario: arguments, kmirror flags, and what the output must be.
struct Scenario {
    name: &'static str,
    args: Vec<String>,
    flags: Vec<&'static str>,
    expect: Check,
}

fn lines_equal(expected: String) -> Check {
    Box::new(move |out: &Output| {
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && stdout == expected {
            Ok(())
        } else {
            Err(format!(
                "{:?}: {stdout:?} (stderr {:?})",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    })
}

fn scenarios(pod: &LocalPod) -> Vec<Scenario> {
    let (ip, n) = (pod.service_ip, pod.index);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        Scenario {
            name: "GET by cluster DNS name",
            args: s(&["get", "http://echo.default.svc.cluster.local:8080/matrix"]),
            flags: vec![],
            expect: lines_equal(format!("status=200\npeer={ip}:8080\nbody=pod-echo {n} /matrix\n")),
        },
        Scenario {
            name: "UDP request/response",
            args: s(&["udp", &format!("{ip}:7778"), "m"]),
            flags: vec![],
            expect: lines_equal(format!("peer={ip}:7778\nreply=pod-udp {n}: m\n")),
        },
        Scenario {
            name: "read a pod file",
            args: s(&["cat", "/data/pod-only.txt"]),
            flags: vec!["--fs-mode", "read"],
            expect: lines_equal(format!("pod-only file {n}\n")),
        },
        Scenario {
            name: "stat a pod file",
            args: s(&["stat", "/data/pod-only.txt"]),
            flags: vec!["--fs-mode", "read"],
            expect: lines_equal(format!(
                "size={} mode=0640 type=file\n",
                format!("pod-only file {n}\n").len()
            )),
        },
        Scenario {
            name: "list a pod directory",
            args: s(&["ls", "/data/dir"]),
            flags: vec!["--fs-mode", "read"],
            expect: lines_equal("a.txt\nb.txt\nsub\n".into()),
        },
        Scenario {
            name: "pod env var",
            args: s(&["env", "POD_ONLY_VAR"]),
            flags: vec![],
            expect: lines_equal(format!("env=pod-value-{n}\n")),
        },
        Scenario {
            name: "peer address",
            args: s(&["dial", &format!("{ip}:7777")]),
            flags: vec![],
            expect: lines_equal(format!("peer={ip}:7777\necho=pod-echo {n}: ping\n")),
        },
    ]
}

/// Serves HTTP under kmirror with stolen pod traffic; a client on the host asks the pod.
fn serve_scenario(pod: &LocalPod, runtime: &Runtime, local_port: u16) -> Result<(), String> {
    let mut command: Vec<&str> = runtime.host.iter().map(String::as_str).collect();
    let port = local_port.to_string();
    command.extend(["serve", &port]);
    let map = format!("{local_port}:8080");
    let mut app =
        BackgroundApp::start(pod.target_pid, &["--incoming", "steal", "--port-map", &map], &command);
    let started = std::time::Instant::now();
    while !app.stdout_lines().iter().any(|l| l.starts_with("listening"))
        || !app.stderr_text().contains("incoming traffic subscribed")
    {
        if let Ok(Some(status)) = app.child.try_wait() {
            return Err(format!("exited with {status} before serving: {}", app.stderr_text()));
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(format!("never listened: {}", app.stderr_text()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let path = format!("/served-by-{local_port}");
    let response = HttpConn::connect(SocketAddr::from((pod.pod_ip, 8080)))
        .and_then(|mut c| c.request("GET", &path, &[], b""))
        .map_err(|e| e.to_string())?;
    if response.text() != format!("local-app {path}\n") {
        return Err(format!("answered {:?}", response.text()));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !app
        .stdout_lines()
        .iter()
        .any(|l| l.starts_with("request ") && l.contains(&format!("path={path} ")))
    {
        if std::time::Instant::now() > deadline {
            return Err(format!("request not logged: {:?}", app.stdout_lines()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[test]
fn every_runtime_sees_the_pod_the_same_way() {
    let pod = LocalPod::start(81);
    let mut runtimes = runtimes(&pod);
    // KMIRROR_RUNTIMES="c static (musl),go static (Debian Go)" runs only those (the kernel
    // matrix does, under emulation).
    if let Ok(only) = std::env::var("KMIRROR_RUNTIMES") {
        let wanted: Vec<&str> = only.split(',').map(str::trim).collect();
        runtimes.retain(|r| wanted.contains(&r.name));
        assert_eq!(runtimes.len(), wanted.len(), "KMIRROR_RUNTIMES names an unknown runtime: {only}");
    }
    let scenarios = scenarios(&pod);
    let mut failures = Vec::new();
    let mut table = String::new();
    let width = 27;
    table.push_str(&format!("{:width$}", "runtime"));
    for s in &scenarios {
        table.push_str(&format!(" | {}", s.name));
    }
    table.push_str(" | serve HTTP (stolen)\n");
    for (i, runtime) in runtimes.iter().enumerate() {
        table.push_str(&format!("{:width$}", runtime.name));
        for scenario in &scenarios {
            let mut host: Vec<&str> = runtime.host.iter().map(String::as_str).collect();
            host.extend(scenario.args.iter().map(String::as_str));
            let under_kmirror = (scenario.expect)(&kmirror(pod.target_pid, &scenario.flags, &host));
            let (program, rest) = runtime.pod.split_first().unwrap();
            let mut pod_args: Vec<&str> = rest.iter().map(String::as_str).collect();
            pod_args.extend(scenario.args.iter().map(String::as_str));
            let inside = (scenario.expect)(&pod.exec_in_pod(program, &pod_args));
            let cell = match (&under_kmirror, &inside) {
                (Ok(()), Ok(())) => "pass",
                (_, Err(e)) => {
                    failures.push(format!(
                        "{} / {} inside the pod (fixture wrong): {e}",
                        runtime.name, scenario.name
                    ));
                    "FIXTURE"
                }
                (Err(e), Ok(())) => {
                    failures.push(format!("{} / {} under kmirror: {e}", runtime.name, scenario.name));
                    "FAIL"
                }
            };
            table.push_str(&format!(" | {:w$}", cell, w = scenario.name.len()));
        }
        let serve = serve_scenario(&pod, runtime, 18100 + i as u16);
        if let Err(e) = &serve {
            failures.push(format!("{} / serve HTTP: {e}", runtime.name));
        }
        table.push_str(&format!(" | {}\n", if serve.is_ok() { "pass" } else { "FAIL" }));
    }
    println!("\n{table}");
    assert!(failures.is_empty(), "{} failing cells:\n{}\n\n{table}", failures.len(), failures.join("\n"));
}
