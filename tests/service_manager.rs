//! kmirror under a service manager: socket activation (`LISTEN_FDS`) and notifications
//! (`NOTIFY_SOCKET`, `WATCHDOG_PID`), proven with Debian's `systemd-socket-activate` and
//! `systemd-notify` and a notification listener of the test's own that checks the sender's
//! credentials the way systemd does for `NotifyAccess=main`.

use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{LineReader, ScratchDir, kmirror_bin, spawn_tied, wait_output_within};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

/// One HTTP/1.0 GET; the whole answer.
fn get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Serves two requests on descriptor 3 (socket activation's first), after checking that
/// `LISTEN_PID` names this very process, as sd_listen_fds does.
const ACTIVATED_APP: &str = r#"
import os, socket
ok = os.environ.get("LISTEN_PID") == str(os.getpid())
print("LISTEN_PID", "matches" if ok else "is " + repr(os.environ.get("LISTEN_PID")), flush=True)
print("LISTEN_FDS", os.environ.get("LISTEN_FDS"), os.environ.get("LISTEN_FDNAMES"), flush=True)
s = socket.socket(fileno=3)
for _ in range(2):
    c, peer = s.accept()
    req = b""
    while b"\r\n\r\n" not in req:
        req += c.recv(1000)
    path = req.split(b" ")[1]
    c.sendall(b"HTTP/1.0 200 OK\r\n\r\nactivated " + path)
    print("served", peer[0], flush=True)
    c.close()
"#;

#[test]
fn socket_activated_listeners_serve_local_and_stolen_pod_traffic() {
    let pod = LocalPod::start(236);
    let local = "127.0.0.1:19236";
    // systemd-socket-activate listens, and on the first connection execs kmirror with the
    // listener as descriptor 3 and LISTEN_PID set to kmirror's pid.
    let mut cmd = Command::new("systemd-socket-activate");
    // It passes on only the environment it is told to (-E).
    cmd.args(["-l", local, "--fdname=http", "-E", "KMIRROR_LOG=info"])
        .arg(kmirror_bin())
        .args(["run", "--target", &format!("pid/{}", pod.target_pid)])
        .args(["--incoming", "steal", "--port-map", "19236:8080", "--", "python3", "-c", ACTIVATED_APP])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_tied(cmd).expect("systemd-socket-activate");
    // It is listening once it printed so; the connection starts kmirror.
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&seen).contains("Listening on") {
        assert_eq!(
            stderr.read(&mut byte).unwrap(),
            1,
            "systemd-socket-activate said: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.push(byte[0]);
    }
    assert_eq!(get(local, "/local").split("\r\n\r\n").nth(1), Some("activated /local"));

    // The pod's port 8080 is stolen for the inherited listener (local port 19236).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = stderr.read_to_end(&mut rest);
        let _ = tx.send(rest);
    });
    let pod_addr = format!("{}:8080", pod.pod_ip);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let stolen = loop {
        let answer = get(&pod_addr, "/from-pod");
        if answer.contains("activated") || std::time::Instant::now() > deadline {
            break answer;
        }
        // Until the subscription is in place the pod's own server answers.
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(stolen.split("\r\n\r\n").nth(1), Some("activated /from-pod"), "{stolen}");
    let out = wait_output_within(child, "the activated app", Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log =
        String::from_utf8_lossy(&rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default()).into_owned();
    assert!(out.status.success(), "{stdout}\n{log}");
    assert!(stdout.contains("LISTEN_PID matches"), "{stdout}");
    assert!(stdout.contains("LISTEN_FDS 1 http"), "{stdout}");
    // The stolen connection shows the pod client (the host end of the pod's veth).
    assert!(stdout.contains(&format!("served {}", pod.host_ip)), "{stdout}\n{log}");
    assert!(log.contains("incoming traffic subscribed"), "{log}");
}

/// Receives `count` notifications on a socket at `path` (SO_PASSCRED, as systemd's) and
/// prints each as `from=<pid> msg=<text>` plus what descriptors it carried.
const RECEIVER: &str = r#"
import array, os, socket, struct, sys
path, count = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
s.settimeout(30)
print("ready", flush=True)
for _ in range(count):
    msg, anc, flags, addr = s.recvmsg(4096, socket.CMSG_SPACE(12) + socket.CMSG_SPACE(4 * 16))
    pid, fds = None, []
    for level, kind, data in anc:
        if kind == socket.SCM_CREDENTIALS:
            pid = struct.unpack("iII", data[:12])[0]
        if kind == socket.SCM_RIGHTS:
            a = array.array("i"); a.frombytes(data[: len(data) - len(data) % 4]); fds += list(a)
    # A stored descriptor is read; any other (BARRIER=1's pipe end) is only counted.
    if msg.startswith(b"FDSTORE=1"):
        carried = "".join(" fd=" + os.read(fd, 100).decode() for fd in fds)
    else:
        carried = " fds=%d" % len(fds) if fds else ""
    for fd in fds:
        os.close(fd)
    print("from=%s msg=%r%s" % (pid, msg.decode(), carried), flush=True)
"#;

/// Checks WATCHDOG_PID, waits for the test's intruder message to have been sent (the file
/// `argv[1]` exists), then notifies READY with a status, and stores a pipe with FDSTORE=1.
const NOTIFYING_APP: &str = r#"
import array, os, socket, sys, time
addr = os.environ["NOTIFY_SOCKET"]
print("WATCHDOG_PID", "matches" if os.environ.get("WATCHDOG_PID") == str(os.getpid()) else "differs", flush=True)
print("NOTIFY_SOCKET=" + addr, flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.02)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1\nSTATUS=serving", addr)
r, w = os.pipe()
os.write(w, b"stored")
s.sendmsg([b"FDSTORE=1\nFDNAME=cache"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]).tobytes())], 0, addr)
"#;

#[test]
fn notifications_reach_the_manager_from_kmirror_and_only_from_the_apps_tree() {
    let pod = LocalPod::start(237);
    let dir = ScratchDir::new("notify");
    let manager = dir.join("manager.sock");
    let go = dir.join("go");
    let mut receiver = Command::new("python3");
    receiver
        .args(["-c", RECEIVER, manager.to_str().unwrap(), "4"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut receiver = spawn_tied(receiver).expect("python3");
    let receiver_out = LineReader::new(receiver.stdout.take().unwrap());
    assert_eq!(receiver_out.line_within(Duration::from_secs(10)), "ready");

    // As systemd starts a unit's main process: NOTIFY_SOCKET, and WATCHDOG_PID naming kmirror
    // itself (the shell's pid, which exec hands to kmirror).
    // The app is python itself (the main process), so WATCHDOG_PID must become its pid.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "echo kmirror=$$; WATCHDOG_PID=$$ WATCHDOG_USEC=30000000 exec {} run --target pid/{} -- python3 -c \"$APP\" {}",
            kmirror_bin().display(),
            pod.target_pid,
            go.display()
        ))
        .env("APP", NOTIFYING_APP)
        .env("NOTIFY_SOCKET", &manager)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut session = spawn_tied(cmd).expect("kmirror");
    let session_out = LineReader::new(session.stdout.take().unwrap());
    let kmirror_pid: u32 =
        session_out.line_within(Duration::from_secs(10)).strip_prefix("kmirror=").unwrap().parse().unwrap();
    assert_eq!(session_out.line_within(Duration::from_secs(20)), "WATCHDOG_PID matches");
    let relay = session_out.line_within(Duration::from_secs(10));
    let relay = relay.strip_prefix("NOTIFY_SOCKET=").unwrap_or_else(|| panic!("{relay}"));
    assert_ne!(relay, manager.to_str().unwrap(), "the app must talk to kmirror's relay");
    // A process outside the app's tree (this test) cannot borrow kmirror's standing.
    std::os::unix::net::UnixDatagram::unbound().unwrap().send_to(b"STATUS=intruder", relay).unwrap();
    std::fs::write(&go, b"").unwrap();
    let out = wait_output_within(session, "the notifying app", Duration::from_secs(30));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // systemd-notify as the main process: its barrier (BARRIER=1 with a pipe) completes
    // through the relay, so it returns.
    let mut cmd = Command::new(kmirror_bin());
    cmd.args(["run", "--target", &format!("pid/{}", pod.target_pid), "--"])
        .args(["systemd-notify", "--status=from-systemd-notify"])
        .env("NOTIFY_SOCKET", &manager)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let notify = spawn_tied(cmd).expect("kmirror");
    let notify_pid = notify.id();
    let notify = wait_output_within(notify, "systemd-notify under kmirror", Duration::from_secs(30));
    assert!(notify.status.success(), "{}", String::from_utf8_lossy(&notify.stderr));

    let lines: Vec<String> = (0..4).map(|_| receiver_out.line_within(Duration::from_secs(20))).collect();
    let _ = receiver.wait();
    assert_eq!(lines[0], format!("from={kmirror_pid} msg='READY=1\\nSTATUS=serving'"), "{lines:?}");
    assert_eq!(lines[1], format!("from={kmirror_pid} msg='FDSTORE=1\\nFDNAME=cache' fd=stored"), "{lines:?}");
    assert_eq!(lines[2], format!("from={notify_pid} msg='STATUS=from-systemd-notify'"), "{lines:?}");
    assert_eq!(lines[3], format!("from={notify_pid} msg='BARRIER=1' fds=1"), "{lines:?}");
    assert!(lines.iter().all(|l| !l.contains("intruder")), "{lines:?}");
}
