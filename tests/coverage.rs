//! What the README promises and no other test checked: IPv6 outgoing traffic to pod-only
//! addresses, writes to pod paths, the incoming modes and flags, the session's end, the
//! signals kmirror forwards and the size bound of pod files. Pod indices 100..=129.

use kmirror_suite::app::{BackgroundApp, HttpConn};
use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{alive, wait_until};
use kmirror_suite::run::{field, go_fixtures, kmirror, kmirror_cmd, ok, output_within};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Removes a file when dropped (test files written outside the pod's rootfs).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn pod_addr(pod: &LocalPod) -> SocketAddr {
    SocketAddr::from((pod.pod_ip, 8080))
}

/// The local port an app of pod `pod` listens on (mapped to the pod's 8080).
fn local_port(pod: &LocalPod) -> u16 {
    18000 + pod.index as u16
}

/// Starts `command` under kmirror with `--port-map <local>:8080` and `flags`, and waits until
/// it listens and (unless `subscribed` is false) its port is subscribed.
fn start_app(pod: &LocalPod, flags: &[&str], command: &[&str], subscribed: bool) -> BackgroundApp {
    let map = format!("{}:8080", local_port(pod));
    let mut flags = flags.to_vec();
    flags.extend(["--port-map", map.as_str()]);
    let app = BackgroundApp::start(pod.target_pid, &flags, command);
    app.wait_stdout("the app to listen", Duration::from_secs(30), |l| {
        l.iter().any(|l| l.starts_with("listening"))
    });
    if subscribed {
        app.wait_subscribed();
    }
    app
}

fn go_serve(pod: &LocalPod) -> Vec<String> {
    vec![go_fixtures()[0].to_str().unwrap().to_string(), "serve".into(), local_port(pod).to_string()]
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> kmirror_suite::app::Response {
    HttpConn::connect(addr).expect("connect to the pod").request("GET", path, headers, b"").expect("request")
}

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

/// Writes to pod paths go to the local file (docs/files.md, *Writes*): in `read` mode a file
/// that reads from the pod is appended to locally, the pod's copy is untouched, and creating a
/// file in a pod-only directory fails as it would locally.
#[test]
fn writes_to_pod_paths_stay_local() {
    let pod = LocalPod::start(101);
    let path = format!("/etc/kmirror-write-test-{}", pod.index);
    let local = PathBuf::from(&path);
    std::fs::write(&local, "local\n").unwrap();
    let _remove = RemoveOnDrop(local.clone());
    let in_pod = pod.rootfs.join(path.trim_start_matches('/'));
    std::fs::write(&in_pod, "pod\n").unwrap();
    let script = format!(
        "import errno, os\n\
         p = '{path}'\n\
         print('read=' + open(p).read().strip())\n\
         with open(p, 'a') as f: f.write('appended\\n')\n\
         fd = os.open(p, os.O_RDWR); os.write(fd, b'LOCAL'); os.close(fd)\n\
         print('after=' + open(p).read().strip())\n\
         try:\n\
         \x20   open('/data/created-{n}.txt', 'w').write('x'); print('create=ok')\n\
         except OSError as e: print('create=' + errno.errorcode[e.errno])\n",
        n = pod.index
    );
    let out = ok(&kmirror(pod.target_pid, &["--fs-mode", "read"], &["python3", "-c", &script]));
    assert_eq!(out, "read=pod\nafter=pod\ncreate=ENOENT\n");
    assert_eq!(
        std::fs::read_to_string(&local).unwrap(),
        "LOCAL\nappended\n",
        "the local file took the writes"
    );
    assert_eq!(std::fs::read_to_string(&in_pod).unwrap(), "pod\n", "the pod's file is untouched");
    assert!(!pod.rootfs.join(format!("data/created-{}.txt", pod.index)).exists());
}

/// `--steal-path`: only matching requests go to the local app, the others to the pod's app,
/// request by request on one keep-alive connection.
#[test]
fn steal_path_splits_requests_by_path() {
    let pod = LocalPod::start(102);
    let app = start_app(
        &pod,
        &["--incoming", "steal", "--steal-path", "^/local/"],
        &as_strs(&go_serve(&pod)),
        true,
    );
    let mut conn = HttpConn::connect(pod_addr(&pod)).unwrap();
    for round in 0..3 {
        let r = conn.request("GET", &format!("/local/a{round}"), &[], b"").unwrap();
        assert_eq!(r.text(), format!("local-app /local/a{round}\n"));
        let r = conn.request("POST", &format!("/other/b{round}"), &[], b"payload").unwrap();
        assert_eq!(r.text(), format!("pod-echo {} /other/b{round}\n", pod.index));
        let r = conn.request("GET", &format!("/x/local/c{round}"), &[], b"").unwrap();
        assert_eq!(r.text(), format!("pod-echo {} /x/local/c{round}\n", pod.index), "anchored regex");
    }
    let lines = app.stdout_lines();
    assert!(lines.iter().filter(|l| l.contains(" path=")).all(|l| l.contains(" path=/local/")), "{lines:?}");
}

/// `--incoming off`: the app listens, nothing is attached in the pod, and every pod client
/// keeps being answered by the pod's app.
#[test]
fn incoming_off_leaves_the_pods_traffic_alone() {
    let pod = LocalPod::start(103);
    let app = start_app(&pod, &["--incoming", "off"], &as_strs(&go_serve(&pod)), false);
    // The local app does serve: proof that it listens on the mapped port.
    let local = SocketAddr::from(([127, 0, 0, 1], local_port(&pod)));
    assert_eq!(get(local, "/direct", &[]).text(), "local-app /direct\n");
    for i in 0..5 {
        assert_eq!(
            get(pod_addr(&pod), &format!("/p{i}"), &[]).text(),
            format!("pod-echo {} /p{i}\n", pod.index)
        );
    }
    let log = app.stderr_text();
    assert!(!log.contains("incoming classifier attached"), "a classifier was attached:\n{log}");
    assert!(!log.contains("incoming traffic subscribed"), "a port was subscribed:\n{log}");
    let lines = app.stdout_lines();
    let served: Vec<&String> = lines.iter().filter(|l| l.contains(" path=")).collect();
    assert_eq!(served.len(), 1, "the local app served pod clients: {lines:?}");
    assert!(served[0].contains(" path=/direct "), "{lines:?}");
    assert!(app.stop().success());
}

/// Everything `stream` sends until it closes, with a deadline.
fn read_to_close(stream: &mut TcpStream) -> String {
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).expect("the peer did not close within 10 s");
    String::from_utf8_lossy(&bytes).into_owned()
}

/// With an HTTP filter, what the filter cannot judge request by request is passed to the pod's
/// app whole: a WebSocket `Upgrade` (and every later request on its connection), `CONNECT`,
/// and HTTP/2 with prior knowledge, even when their headers match the filter.
#[test]
fn upgrade_connect_and_http2_pass_to_the_pods_app_whole() {
    let pod = LocalPod::start(104);
    let app = start_app(
        &pod,
        &["--incoming", "steal", "--steal-header", "^X-Kmirror-Tag: alice$"],
        &as_strs(&go_serve(&pod)),
        true,
    );
    let alice = ("X-Kmirror-Tag", "alice");
    // The filter steals a plain matching request.
    assert_eq!(get(pod_addr(&pod), "/plain", &[alice]).text(), "local-app /plain\n");

    let mut conn = HttpConn::connect(pod_addr(&pod)).unwrap();
    let upgrade = [alice, ("Connection", "Upgrade"), ("Upgrade", "websocket")];
    let r = conn.request("GET", "/ws", &upgrade, b"").unwrap();
    assert_eq!(r.text(), format!("pod-echo {} /ws\n", pod.index), "an Upgrade request was stolen");
    let r = conn.request("GET", "/after-upgrade", &[alice], b"").unwrap();
    assert_eq!(
        r.text(),
        format!("pod-echo {} /after-upgrade\n", pod.index),
        "the upgraded connection was split"
    );

    let mut conn = HttpConn::connect(pod_addr(&pod)).unwrap();
    let r = conn.request("CONNECT", "example.internal:443", &[alice], b"").unwrap();
    assert_eq!(r.header("server"), Some("kmirror-podsvc"), "CONNECT was not the pod app's: {r:?}");

    let mut h2 = TcpStream::connect_timeout(&pod_addr(&pod), Duration::from_secs(5)).unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    // Python's http.server (the pod's app) answers the HTTP/2 preface with this, and closes.
    let answer = read_to_close(&mut h2);
    assert!(
        answer.contains("Invalid HTTP version (2.0)"),
        "HTTP/2 was not passed to the pod's app:\n{answer}\n{}\n{}",
        app.stderr_text(),
        pod.service_log()
    );

    let lines = app.stdout_lines();
    let served: Vec<&String> = lines.iter().filter(|l| l.contains(" path=")).collect();
    assert_eq!(served.len(), 1, "only the plain request reaches the local app: {lines:?}");
}

/// Serves one line-echo connection on `listener`, answering `<who>: <line>`.
fn serve_one_line(listener: TcpListener, who: &'static str) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line).unwrap();
        (&conn).write_all(format!("{who}: {line}").as_bytes()).unwrap();
    })
}

/// Loopback stays local by default; `--remote-loopback` sends it to the pod's loopback, where
/// a listener on the same port answers differently.
#[test]
fn remote_loopback_reaches_the_pods_loopback() {
    let pod = LocalPod::start(105);
    let host = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = host.local_addr().unwrap().port();
    let host_server = serve_one_line(host, "host");
    let script = format!(
        "import socket\n\
         l = socket.socket(); l.bind(('127.0.0.1', {port})); l.listen(4)\n\
         print('ready', flush=True)\n\
         c, _ = l.accept(); c.settimeout(10)\n\
         c.sendall(b'pod: ' + c.makefile('rb').readline())\n"
    );
    let mut in_pod = pod.command_in_pod("python3", &["-c", &script]);
    in_pod.stdout(std::process::Stdio::piped());
    let mut in_pod = in_pod.spawn().unwrap();
    let ready = kmirror_suite::run::LineReader::new(in_pod.stdout.take().unwrap());
    assert_eq!(ready.line_within(Duration::from_secs(20)), "ready");
    let go = go_fixtures()[0].to_str().unwrap().to_string();
    let target = format!("127.0.0.1:{port}");
    let out = ok(&kmirror(pod.target_pid, &[], &[&go, "dial", &target]));
    assert_eq!(field(&out, "echo"), Some("host: ping"), "{out}");
    host_server.join().unwrap();
    let out = ok(&kmirror(pod.target_pid, &["--remote-loopback"], &[&go, "dial", &target]));
    assert_eq!(field(&out, "echo"), Some("pod: ping"), "{out}");
    assert_eq!(field(&out, "peer"), Some(target.as_str()), "{out}");
    assert!(
        kmirror_suite::run::wait_within(&mut in_pod, "the pod's listener", Duration::from_secs(20)).success()
    );
}

/// `--no-remote-dns`: the app reads the local `/etc/resolv.conf` and `/etc/hosts` instead of
/// the pod's (with kmirror's forwarder as nameserver), and the pod's resolver is never asked.
#[test]
fn no_remote_dns_keeps_name_resolution_local() {
    let pod = LocalPod::start(106);
    let go = go_fixtures()[0].to_str().unwrap().to_string();
    let read = |flags: &[&str], path: &str| ok(&kmirror(pod.target_pid, flags, &[&go, "cat", path]));
    let resolv = read(&[], "/etc/resolv.conf");
    assert!(resolv.contains("search default.svc.cluster.local"), "{resolv}");
    assert!(resolv.contains("nameserver 127.77."), "{resolv}");
    assert!(read(&[], "/etc/hosts").contains("pod-hosts-only.internal"));
    let out = ok(&kmirror(pod.target_pid, &[], &[&go, "resolve", "echo.default.svc.cluster.local"]));
    assert_eq!(field(&out, "addr"), Some(pod.service_ip.to_string().as_str()));
    let asked = pod.service_log().lines().filter(|l| l.starts_with("dns ")).count();
    assert!(asked > 0);

    let local = |path: &str| std::fs::read_to_string(path).unwrap();
    assert_eq!(read(&["--no-remote-dns"], "/etc/resolv.conf"), local("/etc/resolv.conf"));
    assert_eq!(read(&["--no-remote-dns"], "/etc/hosts"), local("/etc/hosts"));
    // A name from the local /etc/hosts (IPv4, not the pod's): resolved from the local file,
    // without asking the pod. (Names the local resolver would look up in DNS are not tried:
    // tests send nothing off this machine.)
    let pod_hosts = read(&[], "/etc/hosts");
    let entry = local("/etc/hosts").lines().find_map(|l| {
        let mut words = l.split('#').next()?.split_whitespace();
        let addr: std::net::Ipv4Addr = words.next()?.parse().ok()?;
        let name = words.find(|n| !n.contains("localhost") && !pod_hosts.contains(n))?;
        Some((addr, name.to_string()))
    });
    match entry {
        Some((addr, name)) => {
            let out = ok(&kmirror(pod.target_pid, &["--no-remote-dns"], &[&go, "resolve", &name]));
            assert_eq!(field(&out, "addr"), Some(addr.to_string().as_str()), "{name}: {out}");
        }
        None => eprintln!("no IPv4 name of its own in the local /etc/hosts: local lookup not tried"),
    }
    let now = pod.service_log().lines().filter(|l| l.starts_with("dns ")).count();
    assert_eq!(now, asked, "the pod's DNS was asked with --no-remote-dns:\n{}", pod.service_log());
}

/// `--env-include`: only matching pod variables are taken; a code-loading variable (kept local
/// by default, even under a bare `*`) takes the pod's value when a pattern names it.
#[test]
fn env_include_takes_only_matching_pod_variables() {
    let pod = LocalPod::start(107);
    let go = go_fixtures()[0].to_str().unwrap().to_string();
    let local = [("SHARED_VAR", "from-local"), ("NODE_OPTIONS", "--local-option")];
    let env = |flags: &[&str], name: &str| {
        let mut cmd = kmirror_cmd(pod.target_pid, flags, &[&go, "env", name]);
        cmd.envs(local);
        let out = output_within(cmd, Duration::from_secs(60));
        match out.status.code() {
            Some(1) => None,
            _ => Some(field(&ok(&out), "env").unwrap().to_string()),
        }
    };
    let pod_value = format!("pod-value-{}", pod.index);
    let pods = ["--env-include", "POD_*"];
    assert_eq!(env(&pods, "POD_ONLY_VAR"), Some(pod_value.clone()));
    assert_eq!(env(&pods, "SHARED_VAR"), Some("from-local".into()), "a non-matching pod variable was taken");
    assert_eq!(env(&pods, "KUBERNETES_SERVICE_HOST"), None);
    assert_eq!(env(&[], "SHARED_VAR"), Some("from-pod".into()), "control: taken without --env-include");
    // Code-loading variables: local by default and under `*`, the pod's when named.
    assert_eq!(env(&[], "NODE_OPTIONS"), Some("--local-option".into()));
    assert_eq!(env(&["--env-include", "*"], "NODE_OPTIONS"), Some("--local-option".into()));
    assert_eq!(env(&["--env-include", "*"], "POD_ONLY_VAR"), Some(pod_value));
    assert_eq!(env(&["--env-include", "NODE_OPTIONS"], "NODE_OPTIONS"), Some("--no-warnings".into()));
    assert_eq!(env(&["--env-include", "NODE_OPTIONS"], "SHARED_VAR"), Some("from-local".into()));
}

/// When the target exits, kmirror stops the app with SIGTERM and, if the app is still there
/// 5 s later, SIGKILL; then it exits 1 with the reason.
#[test]
fn an_app_ignoring_sigterm_is_killed_5_s_after_the_target_exits() {
    let pod = LocalPod::start(108);
    let script = "import os, signal, time\n\
                  signal.signal(signal.SIGTERM, lambda *_: print('term', flush=True))\n\
                  print('ready pid=%d' % os.getpid(), flush=True)\n\
                  while True: time.sleep(1)\n";
    let mut app = BackgroundApp::start(pod.target_pid, &[], &["python3", "-c", script]);
    app.wait_stdout("ready", Duration::from_secs(30), |l| l.iter().any(|l| l.starts_with("ready pid=")));
    let pid: u32 =
        app.stdout_lines().iter().find_map(|l| l.strip_prefix("ready pid=")).unwrap().parse().unwrap();
    // Ending the pod's target process.
    let _ = kmirror_suite::run::signal(pod.target_pid, libc::SIGKILL);
    app.wait_stdout("the app's SIGTERM", Duration::from_secs(20), |l| l.iter().any(|l| l == "term"));
    let termed = Instant::now();
    wait_until("the app is killed", Duration::from_secs(30), || !alive(pid));
    let grace = termed.elapsed();
    eprintln!("SIGKILL came {grace:?} after SIGTERM");
    assert!(grace >= Duration::from_millis(4500), "killed {grace:?} after SIGTERM, before the 5 s grace");
    assert!(grace <= Duration::from_secs(10), "killed only {grace:?} after SIGTERM");
    let status = app.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{status:?}: {}", app.stderr_text());
    let log = app.stderr_text();
    assert!(log.contains(&format!("target process {} exited", pod.target_pid)), "{log}");
}

/// Pod files over 256 MiB are refused with EFBIG (stat still answers), while a smaller one
/// opens. Sparse files, so the pod costs no disk. (A file of exactly 256 MiB is not read here:
/// copying it takes about a minute in a debug build.)
#[test]
fn pod_files_over_256_mib_are_refused_with_efbig() {
    let pod = LocalPod::start(109);
    const BOUND: u64 = 256 << 20;
    for (name, len) in [("over.bin", BOUND + 1), ("small.bin", 1 << 20)] {
        std::fs::File::create(pod.rootfs.join("data").join(name)).unwrap().set_len(len).unwrap();
    }
    let script = "import errno, os\n\
                  for p in ('/data/over.bin', '/data/small.bin'):\n\
                  \x20   try:\n\
                  \x20       fd = os.open(p, os.O_RDONLY); print('%s=%d' % (p, os.fstat(fd).st_size)); os.close(fd)\n\
                  \x20   except OSError as e: print('%s=%s' % (p, errno.errorcode[e.errno]))\n\
                  print('stat=%d' % os.stat('/data/over.bin').st_size)\n";
    let out = ok(&kmirror(pod.target_pid, &["--fs-mode", "read"], &["python3", "-c", script]));
    assert_eq!(out, format!("/data/over.bin=EFBIG\n/data/small.bin={}\nstat={}\n", 1 << 20, BOUND + 1));
}

/// SIGQUIT, SIGUSR1 and SIGUSR2 sent to kmirror reach the app's handlers, each once.
#[test]
fn quit_and_user_signals_are_forwarded() {
    let pod = LocalPod::start(110);
    let script = "import signal\n\
                  h = lambda n, _: print('signal=' + signal.Signals(n).name, flush=True)\n\
                  for s in (signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2): signal.signal(s, h)\n\
                  print('ready', flush=True)\n\
                  while True: signal.pause()\n";
    let app = BackgroundApp::start(pod.target_pid, &[], &["python3", "-c", script]);
    app.wait_stdout("ready", Duration::from_secs(30), |l| l.iter().any(|l| l == "ready"));
    for (signal, name) in [(libc::SIGQUIT, "SIGQUIT"), (libc::SIGUSR1, "SIGUSR1"), (libc::SIGUSR2, "SIGUSR2")]
    {
        kmirror_suite::run::signal(app.child.id(), signal).unwrap();
        let line = format!("signal={name}");
        app.wait_stdout(&line, Duration::from_secs(20), |l| l.contains(&line));
    }
    let lines = app.stdout_lines();
    assert_eq!(lines, ["ready", "signal=SIGQUIT", "signal=SIGUSR1", "signal=SIGUSR2"]);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(app.stop().signal(), Some(libc::SIGTERM), "the app died of the forwarded SIGTERM");
}

/// Resumes a stopped process when dropped (the test's own agent, if an assertion fails).
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = kmirror_suite::run::signal(self.0, libc::SIGCONT);
    }
}

/// A mirrored stream that cannot be copied whole is dropped and reported, never patched: with
/// the agent stopped while a pod client sends 96 MiB, the classifier's 16 MiB ring overflows
/// (part of the stream is never copied), and the backlog it holds exceeds what may wait for
/// the local app (8 MiB), whichever the agent meets first. The pod's app gets every byte; the
/// local app's copy ends short with a reset (not a clean end of a request it got only part
/// of), and kmirror says why. (The lost-segment path itself is unit-tested in
/// agent/src/incoming/mirror.rs: here the backlog check always comes first.)
#[test]
fn a_mirrored_stream_that_loses_data_is_dropped_and_reported() {
    let pod = LocalPod::start(111);
    let script = format!(
        "import socket\n\
         l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         l.bind(('0.0.0.0', {port})); l.listen(8)\n\
         print('listening', flush=True)\n\
         c, _ = l.accept(); got = 0; end = 'eof'\n\
         try:\n\
         \x20   while True:\n\
         \x20       b = c.recv(1 << 20)\n\
         \x20       if not b: break\n\
         \x20       if got == 0: print('first', flush=True)\n\
         \x20       got += len(b)\n\
         except ConnectionResetError: end = 'reset'\n\
         print('got=%d end=%s' % (got, end), flush=True)\n",
        port = local_port(&pod)
    );
    let app = start_app(&pod, &["--incoming", "mirror"], &["python3", "-c", &script], true);
    const BODY: usize = 96 << 20;
    let head = format!("POST /big HTTP/1.1\r\nHost: pod\r\nContent-Length: {BODY}\r\n\r\n");
    let mut client = TcpStream::connect_timeout(&pod_addr(&pod), Duration::from_secs(5)).unwrap();
    client.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let chunk = vec![7u8; 64 << 10];
    client.write_all(head.as_bytes()).unwrap();
    client.write_all(&chunk).unwrap();
    app.wait_stdout("the first mirrored bytes", Duration::from_secs(30), |l| l.iter().any(|l| l == "first"));
    let agent = app.agent_pid();
    // Stopping the agent of our own kmirror child (resumed below, or by `Resume`).
    let _ = kmirror_suite::run::signal(agent, libc::SIGSTOP);
    let resume = Resume(agent);
    for _ in 1..BODY / chunk.len() {
        client.write_all(&chunk).unwrap();
    }
    let mut status = String::new();
    BufReader::new(&client).read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "the pod's app answers the whole request: {status:?}");
    drop(resume);
    // The client is done: a mirrored copy that lost nothing would now end cleanly.
    client.shutdown(std::net::Shutdown::Both).unwrap();
    app.wait_stdout("the end of the mirrored stream", Duration::from_secs(60), |l| {
        l.iter().any(|l| l.starts_with("got="))
    });
    let lines = app.stdout_lines();
    let end = lines.iter().find(|l| l.starts_with("got=")).unwrap();
    let got: usize = end.split_whitespace().next().unwrap()["got=".len()..].parse().unwrap();
    assert!(end.ends_with(" end=reset"), "the broken stream was not reset: {end}\n{}", app.stderr_text());
    assert!(got < head.len() + BODY, "all {got} bytes arrived: {end}");
    // The report comes on kmirror's stderr, read by another thread than the app's line.
    let report =
        || app.stderr_text().lines().find(|l| l.contains("mirrored stream dropped")).map(str::to_owned);
    // Roomy: after SIGCONT the agent first works through a full ring buffer.
    let deadline = Instant::now() + Duration::from_secs(30);
    while report().is_none() {
        assert!(Instant::now() < deadline, "the drop was not reported:\n{}", app.stderr_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("{}", report().unwrap());
}

/// Connections that existed before the session are not mirrored, end to end: requests on a
/// keep-alive connection opened before kmirror started never reach the app, while those on
/// connections opened later do.
#[test]
fn connections_from_before_the_session_are_not_mirrored() {
    let pod = LocalPod::start(112);
    let addr = pod_addr(&pod);
    let mut old = HttpConn::connect(addr).unwrap();
    assert_eq!(
        old.request("GET", "/old-0", &[], b"").unwrap().text(),
        format!("pod-echo {} /old-0\n", pod.index)
    );
    let app = start_app(&pod, &["--incoming", "mirror"], &as_strs(&go_serve(&pod)), true);
    for round in 1..=3 {
        let r = old.request("POST", &format!("/old-{round}"), &[], b"before").unwrap();
        assert_eq!(r.text(), format!("pod-echo {} /old-{round}\n", pod.index));
        let r = get(addr, &format!("/new-{round}"), &[]);
        assert_eq!(r.text(), format!("pod-echo {} /new-{round}\n", pod.index));
    }
    // The last new connection was opened after the last request on the old one.
    app.wait_stdout("the new connections' mirrored requests", Duration::from_secs(30), |l| {
        (1..=3).all(|r| l.iter().any(|l| l.contains(&format!(" path=/new-{r} "))))
    });
    let lines = app.stdout_lines();
    assert!(
        !lines.iter().any(|l| l.contains(" path=/old-")),
        "a connection from before was mirrored: {lines:?}"
    );
}
