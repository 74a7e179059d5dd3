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

/// The floods below load both cores for seconds; a test that waits on an answer meanwhile
/// would measure the flood, not kmirror. Each test here holds this while it runs.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

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
/// something on each connection that gets through (kmirror's listener drops connection
/// requests, so they stay connecting), and reports whatever any of them receives.
const TCP_STRANGER: &str = r#"
import select, socket, sys, time
proxy, port = int(sys.argv[1]), int(sys.argv[2])
conns = []
for i in range(2, 22):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.%d" % i, port))
    s.setblocking(False)
    s.connect_ex(("127.0.0.1", proxy))
    conns.append(s)
print("attached", len(conns), flush=True)
said = set()
deadline = time.time() + 4
while conns and time.time() < deadline:
    ready, writable, _ = select.select(conns, [s for s in conns if s not in said], [], 0.1)
    for s in writable:
        said.add(s)
        try:
            s.send(b"stranger\n")
        except OSError:
            pass
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
    let _serial = one_at_a_time();
    let pod = LocalPod::start(170);
    let go = GoFile::new(&pod, "tcp");
    // Below the ephemeral range (32768-60999), so no connection of another test holds it.
    let port = (21000 + pod.index as u16).to_string();
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
    let _serial = one_at_a_time();
    let pod = LocalPod::start(171);
    let go = GoFile::new(&pod, "udp");
    // Below the ephemeral range (32768-60999), so no connection of another test holds it.
    let port = (21000 + pod.index as u16).to_string();
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

fn pod_addr(pod: &LocalPod) -> SocketAddr {
    SocketAddr::from((pod.pod_ip, 8080))
}

fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut conn = HttpConn::connect(addr)?;
    Ok(conn.request("GET", path, &[], b"")?.text())
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// The highest VmRSS and descriptor count of `pid`, sampled every 5 ms until dropped.
struct Watch {
    peak: Arc<Mutex<(u64, usize)>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Watch {
    fn start(pid: u32) -> Watch {
        let peak = Arc::new(Mutex::new((0, 0)));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, st) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                let (rss, fds) = (rss_kib(pid), fd_count(pid));
                let mut peak = p.lock().unwrap();
                *peak = (peak.0.max(rss), peak.1.max(fds));
                drop(peak);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Watch { peak, stop }
    }

    fn peak(&self) -> (u64, usize) {
        *self.peak.lock().unwrap()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The pod's own app answers a request made inside the pod (over its loopback, which kmirror's
/// classifier never sees).
fn pod_app_answers(pod: &LocalPod, path: &str) -> bool {
    let script = format!(
        "import urllib.request; print(urllib.request.urlopen('http://{}:8080{path}', timeout=5).read().decode())",
        pod.pod_ip
    );
    let out = pod.exec_in_pod(PYTHON, &["-c", &script]);
    String::from_utf8_lossy(&out.stdout).starts_with(&format!("pod-echo {} {path}", pod.index))
}

fn local_port(pod: &LocalPod) -> String {
    (18000 + pod.index as u16).to_string()
}

fn start_incoming(pod: &LocalPod, flags: &[&str]) -> BackgroundApp {
    let go = kmirror_suite::run::go_fixtures()[0].to_str().unwrap().to_string();
    let map = format!("{}:8080", local_port(pod));
    let mut flags = flags.to_vec();
    flags.extend(["--port-map", map.as_str()]);
    let app = BackgroundApp::start(pod.target_pid, &flags, &[&go, "serve", &local_port(pod)]);
    app.wait_stdout("the app to listen", Duration::from_secs(30), |l| {
        l.iter().any(|l| l.starts_with("listening"))
    });
    app.wait_subscribed();
    app
}

/// How much the agent may grow under one hostile client: its head limit (64 KiB), a few read
/// buffers, and allocator slack.
const ONE_CLIENT_GROWTH_KIB: u64 = 16 * 1024;

/// A pod client streaming a 1 GiB header line at a port stolen with an HTTP filter is cut off
/// once the head limit is reached: the agent's memory stays flat, and the pod's app (and the
/// filter, for other clients) keeps answering.
#[test]
fn an_endless_header_line_is_cut_off_at_the_head_limit() {
    let _serial = one_at_a_time();
    use std::io::Write;
    let pod = LocalPod::start(172);
    let app = start_incoming(&pod, &["--incoming", "steal", "--steal-header", "^X-Dev: me$"]);
    let agent = app.agent_pid();
    let addr = pod_addr(&pod);
    assert_eq!(get(addr, "/before").unwrap(), format!("pod-echo {} /before\n", pod.index));
    let (base_rss, base_fds) = (rss_kib(agent), fd_count(agent));
    let watch = Watch::start(agent);

    let mut attacker = std::net::TcpStream::connect(addr).unwrap();
    attacker.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    attacker.write_all(b"GET /x HTTP/1.1\r\nX-Dev: me\r\nX-Long: ").unwrap();
    let block = vec![b'a'; 64 * 1024];
    let mut sent: u64 = 0;
    let refused = loop {
        if sent >= 1 << 30 {
            break None;
        }
        if let Err(e) = attacker.write_all(&block) {
            break Some(e);
        }
        sent += block.len() as u64;
        let grown = watch.peak().0.saturating_sub(base_rss);
        assert!(
            grown < ONE_CLIENT_GROWTH_KIB,
            "the agent grew by {grown} KiB after {} MiB of one header line",
            sent >> 20
        );
        if sent.is_multiple_of(64 << 20) {
            assert!(pod_app_answers(&pod, "/during"), "the pod's app stopped answering");
        }
    };
    assert!(refused.is_some(), "the agent read a whole 1 GiB header line without closing the connection");
    assert!(sent < 64 << 20, "{} MiB of the line went in before the agent refused it", sent >> 20);
    // The filter still serves other clients, and the pod's app answers.
    assert_eq!(get(addr, "/after").unwrap(), format!("pod-echo {} /after\n", pod.index));
    assert!(pod_app_answers(&pod, "/after-inside"));
    let (peak_rss, peak_fds) = watch.peak();
    assert!(
        peak_rss.saturating_sub(base_rss) < ONE_CLIENT_GROWTH_KIB,
        "peak {peak_rss} KiB, base {base_rss} KiB"
    );
    assert!(peak_fds <= base_fds + 8, "peak {peak_fds} descriptors, base {base_fds}");
}

/// Raises this process's descriptor limit to its maximum (the floods below hold many sockets).
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Stolen connections served at once by the agent (README: incoming bounds).
const MAX_STOLEN: usize = 256;

/// A flood of idle connections against a port stolen with an HTTP filter: the agent takes at
/// most its stated number at once (the rest wait in the kernel's queue), its descriptors and
/// memory stay within bounds, and the pod's app keeps answering.
#[test]
fn a_connection_flood_against_a_stolen_port_stays_within_bounds() {
    let _serial = one_at_a_time();
    raise_fd_limit();
    let pod = LocalPod::start(173);
    let app = start_incoming(&pod, &["--incoming", "steal", "--steal-header", "^X-Dev: me$"]);
    let agent = app.agent_pid();
    let addr = pod_addr(&pod);
    assert_eq!(get(addr, "/before").unwrap(), format!("pod-echo {} /before\n", pod.index));
    let (base_rss, base_fds) = (rss_kib(agent), fd_count(agent));
    let watch = Watch::start(agent);
    let flood: Vec<std::net::TcpStream> = (0..1000)
        .filter_map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok())
        .collect();
    assert!(flood.len() > 2 * MAX_STOLEN, "only {} flood connections were made", flood.len());
    // Give the agent time to take what it will.
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(pod_app_answers(&pod, "/during"), "the pod's app stopped answering");
    let (peak_rss, peak_fds) = watch.peak();
    drop(flood);
    assert!(
        peak_fds <= base_fds + MAX_STOLEN + 16,
        "the agent held {peak_fds} descriptors (base {base_fds}) for {MAX_STOLEN} connections at most"
    );
    assert!(peak_rss.saturating_sub(base_rss) < 64 * 1024, "peak {peak_rss} KiB, base {base_rss} KiB");
    // Once the flood is gone, the filter serves again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(addr, "/after").ok() != Some(format!("pod-echo {} /after\n", pod.index)) {
        assert!(Instant::now() < deadline, "the filter did not serve again after the flood");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `count` forged SYNs to `dst:port` from addresses that answer nothing (pod-only
/// addresses the host routes nowhere), as a SYN flood does.
const SYN_FLOOD: &str = r#"
import socket, struct, sys
dst, port, count, prefix = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    s = (s >> 16) + (s & 0xffff)
    s += s >> 16
    return ~s & 0xffff
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
d = socket.inet_aton(dst)
for i in range(count):
    src = socket.inet_aton(prefix + str(100 + i % 150))
    sport = 20000 + i // 150
    tcp = struct.pack("!HHIIBBHHH", sport, port, i * 7919, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = src + d + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), i & 0xffff, 0, 64, socket.IPPROTO_TCP, 0, src, d)
    raw.sendto(ip + tcp, (dst, 0))
print("sent", count, flush=True)
"#;

/// A SYN flood and a connection flood against a mirrored port: SYNs that never complete a
/// handshake open nothing and expire, completed connections beyond the cap are not mirrored,
/// and the agent's memory and descriptors stay within bounds while the pod's app answers.
#[test]
fn floods_against_a_mirrored_port_stay_within_bounds() {
    let _serial = one_at_a_time();
    raise_fd_limit();
    let pod = LocalPod::start(174);
    let app = start_incoming(&pod, &["--incoming", "mirror"]);
    let agent = app.agent_pid();
    let kmirror = app.child.id();
    let addr = pod_addr(&pod);
    assert_eq!(get(addr, "/before").unwrap(), format!("pod-echo {} /before\n", pod.index));
    let (base_rss, base_fds, base_kmirror_fds) = (rss_kib(agent), fd_count(agent), fd_count(kmirror));
    let watch = Watch::start(agent);
    let kmirror_watch = Watch::start(kmirror);

    let prefix = format!("10.213.{}.", pod.index);
    let flood = Command::new(PYTHON)
        .args(["-c", SYN_FLOOD, &pod.pod_ip.to_string(), "8080", "30000", &prefix])
        .output()
        .expect("run the SYN flood");
    assert!(String::from_utf8_lossy(&flood.stdout).starts_with("sent"), "{flood:?}");
    // Real connections too, many at once, each sending a request.
    let conns: Vec<std::net::TcpStream> = (0..600)
        .filter_map(|_| {
            use std::io::Write;
            let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
            c.write_all(b"GET /flood HTTP/1.1\r\nHost: pod\r\n\r\n").ok()?;
            Some(c)
        })
        .collect();
    assert!(conns.len() > 500, "only {} flood connections were made", conns.len());
    assert_eq!(get(addr, "/during").unwrap(), format!("pod-echo {} /during\n", pod.index));
    assert!(pod_app_answers(&pod, "/during-inside"));
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(conns);
    let (peak_rss, peak_fds) = watch.peak();
    let kmirror_fds = kmirror_watch.peak().1;
    // The forged SYNs opened no connection to the local app: kmirror holds at most one per
    // real connection.
    assert!(
        kmirror_fds <= base_kmirror_fds + 700,
        "kmirror held {kmirror_fds} descriptors (base {base_kmirror_fds}): forged SYNs reached the app"
    );
    assert!(peak_fds <= base_fds + 16, "the agent held {peak_fds} descriptors (base {base_fds})");
    assert!(peak_rss.saturating_sub(base_rss) < 96 * 1024, "peak {peak_rss} KiB, base {base_rss} KiB");
    assert_eq!(get(addr, "/after").unwrap(), format!("pod-echo {} /after\n", pod.index));
}

/// A process of this test in the host's network namespace, as a target.
struct HostProcess(Child);

impl HostProcess {
    fn start() -> HostProcess {
        HostProcess(Command::new("/bin/sleep").arg("300").spawn().expect("start sleep"))
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Stealing or mirroring for a target in the host's network namespace would take every
/// program's traffic on that port: it is refused, saying why and how to allow it; with
/// `--allow-host-network` it is allowed.
#[test]
fn incoming_traffic_of_a_host_network_target_needs_an_explicit_flag() {
    let _serial = one_at_a_time();
    let target = HostProcess::start();
    let go = kmirror_suite::run::go_fixtures()[0].to_str().unwrap().to_string();
    let port = "18176";
    let app = BackgroundApp::start(target.0.id(), &["--incoming", "steal"], &[&go, "serve", port]);
    app.wait_stdout("the app to listen", Duration::from_secs(30), |l| {
        l.iter().any(|l| l.starts_with("listening"))
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !app.stderr_text().contains("cannot Steal pod port") {
        assert!(
            !app.stderr_text().contains("incoming traffic subscribed"),
            "a host-network target's port was stolen: {}",
            app.stderr_text()
        );
        assert!(Instant::now() < deadline, "no refusal: {}", app.stderr_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let stderr = app.stderr_text();
    for what in ["shares the host's network namespace", "--allow-host-network", "Operation not permitted"] {
        assert!(stderr.contains(what), "the refusal does not say `{what}`: {stderr}");
    }
    drop(app);

    let allowed = BackgroundApp::start(
        target.0.id(),
        &["--incoming", "mirror", "--allow-host-network"],
        &[&go, "serve", port],
    );
    allowed.wait_stdout("the app to listen", Duration::from_secs(30), |l| {
        l.iter().any(|l| l.starts_with("listening"))
    });
    allowed.wait_subscribed();
}

/// Only packets to the target's own addresses are stolen: a destination the pod's namespace
/// accepts as local through a route (not an address of its interfaces) reaches the pod's app.
#[test]
fn only_traffic_to_the_targets_addresses_is_stolen() {
    let _serial = one_at_a_time();
    let pod = LocalPod::start(175);
    let extra = format!("10.213.{}.77", pod.index);
    let run = |argv: &[&str]| {
        let out = Command::new(argv[0]).args(&argv[1..]).output().expect("run ip");
        assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    // The pod takes `extra` as local (AnyIP) without it being an address of an interface, and
    // the host routes it over the pod's veth (the route goes with the veth).
    run(&["ip", "-n", &pod.netns, "route", "add", "local", &format!("{extra}/32"), "dev", "lo"]);
    let host_veth = pod.host_veth.clone();
    run(&["ip", "route", "add", &format!("{extra}/32"), "via", &pod.pod_ip.to_string(), "dev", &host_veth]);
    let other = SocketAddr::from((extra.parse::<std::net::Ipv4Addr>().unwrap(), 8080));
    assert_eq!(get(other, "/before").unwrap(), format!("pod-echo {} /before\n", pod.index));

    let _app = start_incoming(&pod, &["--incoming", "steal"]);
    assert_eq!(get(pod_addr(&pod), "/stolen").unwrap(), "local-app /stolen\n");
    assert_eq!(
        get(other, "/not-stolen").unwrap(),
        format!("pod-echo {} /not-stolen\n", pod.index),
        "traffic to an address that is not the target's was stolen"
    );
}
