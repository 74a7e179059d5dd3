//! Hostile neighbours on the network side: other local users against kmirror's loopback
//! proxy and relays, pod clients against the root agent's memory and descriptors, and targets
//! that share the host's network namespace.

use kmirror_suite::app::{BackgroundApp, HttpConn};
use kmirror_suite::pod::LocalPod;
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PYTHON: &str = "/usr/bin/python3";

/// A file whose appearance tells a waiting test app to go on.
struct GoFile(PathBuf);

impl GoFile {
    fn new(pod: &LocalPod, name: &str) -> GoFile {
        let path =
            std::env::temp_dir().join(format!("kmirror-secnet-{}-{}-{name}", std::process::id(), pod.index));
        let _ = std::fs::remove_file(&path);
        GoFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }

    fn go(&self) {
        std::fs::write(&self.0, b"go").expect("write the go file");
    }
}

impl Drop for GoFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A process running as `nobody` (another local user than kmirror's and the app's), with its
/// stdout lines collected.
struct Stranger {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Stranger {
    fn start(script: &str, args: &[String]) -> Stranger {
        let mut child = Command::new("/usr/bin/setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", PYTHON, "-c", script])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start the other user's process");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let stdout = child.stdout.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Stranger { child, lines }
    }

    fn wait_line(&self, prefix: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.lines.lock().unwrap().iter().any(|l| l.starts_with(prefix)) {
            assert!(
                Instant::now() < deadline,
                "no `{prefix}` from the other user's process: {:?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for the exit and returns every line.
    fn finish(mut self, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        while self.child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "the other user's process did not finish: {:?}", self.lines());
            std::thread::sleep(Duration::from_millis(20));
        }
        // The reader thread drains the pipe to its end.
        std::thread::sleep(Duration::from_millis(50));
        self.lines()
    }
}

impl Drop for Stranger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Ports of `pid`'s own sockets on 127.0.0.1 (from its /proc view of the network namespace
/// and its descriptors), in TCP state `state` ("0A" listen) or any state.
fn own_loopback_ports(pid: u32, proto: &str, state: Option<&str>) -> Vec<u16> {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .filter_map(|link| {
                    let link = link.to_string_lossy().into_owned();
                    Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/{proto}")).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, st, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
            let (ip, port) = local.split_once(':')?;
            let wanted = ip == "0100007F" && state.is_none_or(|s| s == *st) && inodes.contains(*inode);
            wanted.then(|| u16::from_str_radix(port, 16).ok()).flatten()
        })
        .collect()
}

/// The app: binds a fixed source port (SO_REUSEADDR, as clients that pick their port do),
/// waits for the go file, connects to the pod's line echo and prints what comes back.
const TCP_APP: &str = r#"
import os, socket, sys, time
service, port, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.settimeout(6)
try:
    s.connect((service, 7777))
    s.sendall(b"hello-from-app\n")
    print("app-got", s.makefile("rb").readline().decode().strip(), flush=True)
except OSError as e:
    print("app-error", e, flush=True)
"#;

/// The other user: connects to the proxy from 127.0.0.2..=127.0.0.21 with the app's port, says
/// something on each connection, and reports whatever any of them receives.
const TCP_STRANGER: &str = r#"
import select, socket, sys, time
proxy, port = int(sys.argv[1]), int(sys.argv[2])
conns = []
for i in range(2, 22):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.%d" % i, port))
    s.connect(("127.0.0.1", proxy))
    s.sendall(b"stranger\n")
    conns.append(s)
print("attached", len(conns), flush=True)
deadline = time.time() + 4
while conns and time.time() < deadline:
    ready, _, _ = select.select(conns, [], [], 0.1)
    for s in ready:
        try:
            data = s.recv(4096)
        except OSError as e:
            data = b""
        if data:
            print("stranger-got", data, flush=True)
        else:
            conns.remove(s)
print("done", flush=True)
"#;

/// Another local user connecting to kmirror's outgoing proxy from another loopback address with
/// the app's source port gets nothing of the app's pod connection, which stays intact.
#[test]
fn outgoing_proxy_takes_connections_from_the_app_socket_only() {
    let pod = LocalPod::start(170);
    let go = GoFile::new(&pod, "tcp");
    let port = (41000 + pod.index as u16).to_string();
    let service = pod.service_ip.to_string();
    let app = BackgroundApp::start(pod.target_pid, &[], &[PYTHON, "-c", TCP_APP, &service, &port, go.path()]);
    app.wait_stdout("the app to start", Duration::from_secs(30), |l| l.iter().any(|l| l == "ready"));
    let proxies = own_loopback_ports(app.child.id(), "tcp", Some("0A"));
    assert_eq!(proxies.len(), 1, "expected one loopback listener of kmirror: {proxies:?}");

    let stranger = Stranger::start(TCP_STRANGER, &[proxies[0].to_string(), port.clone()]);
    stranger.wait_line("attached", Duration::from_secs(10));
    go.go();
    app.wait_stdout("the app's answer", Duration::from_secs(20), |l| {
        l.iter().any(|l| l.starts_with("app-got") || l.starts_with("app-error"))
    });
    let seen = stranger.finish(Duration::from_secs(10));
    let got: Vec<&String> = seen.iter().filter(|l| l.starts_with("stranger-got")).collect();
    assert!(got.is_empty(), "another user received bytes of the app's pod connection: {got:?}");
    let answer = app.stdout_lines().into_iter().find(|l| l.starts_with("app-")).unwrap();
    assert_eq!(answer, format!("app-got pod-echo {}: hello-from-app", pod.index), "{}", app.stderr_text());
}

/// The app: a UDP socket on 127.0.0.2 with a fixed port, "connected" to the pod's UDP echo;
/// after the go file it sends one datagram and prints the answer.
const UDP_APP: &str = r#"
import os, socket, sys, time
service, port, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.2", port))
s.connect((service, 7778))
print("connected", flush=True)
while not os.path.exists(go):
    time.sleep(0.01)
s.settimeout(3)
try:
    s.send(b"hello-from-app")
    print("app-got", s.recv(4096).decode(), flush=True)
except OSError as e:
    print("app-error", e, flush=True)
# And an unconnected dual-stack socket (bound by its first send, to the wildcard).
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.settimeout(3)
try:
    u.sendto(b"sendto-from-app", ("::ffff:" + service, 7778))
    print("app-sendto", u.recvfrom(4096)[0].decode(), flush=True)
except OSError as e:
    print("app-sendto-error", e, flush=True)
"#;

/// The other user: sends from 127.0.0.1 with the app's port to each of kmirror's loopback UDP
/// sockets and reports any answer.
const UDP_STRANGER: &str = r#"
import socket, sys, time
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", port))
for relay in sys.argv[2:]:
    s.sendto(b"stranger", ("127.0.0.1", int(relay)))
print("sent", flush=True)
s.settimeout(0.2)
deadline = time.time() + 2
while time.time() < deadline:
    try:
        data, peer = s.recvfrom(4096)
        print("stranger-got", data, peer, flush=True)
    except OSError:
        pass
print("done", flush=True)
"#;

/// Datagrams to a UDP relay from anyone but the app's socket are not carried to the pod, and
/// the pod's answers reach the app's socket only.
#[test]
fn udp_relay_talks_to_the_app_socket_only() {
    let pod = LocalPod::start(171);
    let go = GoFile::new(&pod, "udp");
    let port = (41000 + pod.index as u16).to_string();
    let service = pod.service_ip.to_string();
    let app = BackgroundApp::start(pod.target_pid, &[], &[PYTHON, "-c", UDP_APP, &service, &port, go.path()]);
    app.wait_stdout("the app to connect", Duration::from_secs(30), |l| l.iter().any(|l| l == "connected"));
    let relays: Vec<String> =
        own_loopback_ports(app.child.id(), "udp", None).into_iter().map(|p| p.to_string()).collect();
    assert!(!relays.is_empty(), "kmirror has no loopback UDP relay");

    let mut args = vec![port.clone()];
    args.extend(relays);
    let stranger = Stranger::start(UDP_STRANGER, &args);
    stranger.wait_line("sent", Duration::from_secs(10));
    go.go();
    let seen = stranger.finish(Duration::from_secs(10));
    app.wait_stdout("the app's answer", Duration::from_secs(20), |l| {
        l.iter().any(|l| l.starts_with("app-got") || l.starts_with("app-error"))
    });
    let got: Vec<&String> = seen.iter().filter(|l| l.starts_with("stranger-got")).collect();
    assert!(got.is_empty(), "another user's datagrams reached the pod through the app's relay: {got:?}");
    let answer = app.stdout_lines().into_iter().find(|l| l.starts_with("app-")).unwrap();
    assert_eq!(answer, format!("app-got pod-udp {}: hello-from-app", pod.index), "{}", app.stderr_text());
    app.wait_stdout("the unconnected socket's answer", Duration::from_secs(20), |l| {
        l.iter().any(|l| l.starts_with("app-sendto"))
    });
    let answer = app.stdout_lines().into_iter().find(|l| l.starts_with("app-sendto")).unwrap();
    assert_eq!(answer, format!("app-sendto pod-udp {}: sendto-from-app", pod.index), "{}", app.stderr_text());
    assert!(
        !pod.service_log().contains("stranger"),
        "the pod's echo saw another user's datagram: {}",
        pod.service_log()
    );
}

#[allow(dead_code)]
fn pod_addr(pod: &LocalPod) -> SocketAddr {
    SocketAddr::from((pod.pod_ip, 8080))
}

#[allow(dead_code)]
fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut conn = HttpConn::connect(addr)?;
    Ok(conn.request("GET", path, &[], b"")?.text())
}
