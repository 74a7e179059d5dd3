//! Load: a thousand concurrent tunnelled connections and ten thousand sequential ones leave no
//! descriptors behind, and a slow reader of a fast pod-side writer keeps memory bounded
//! (per-stream flow control) while 1 GiB goes through.

use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{LineReader, agent_of, field, kmirror_cmd, wait_within};
use std::io::Write;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// VmRSS of `pid` in KiB; `None` once the process is gone (or its status has no VmRSS, as
/// for a zombie). Never a made-up 0: a bound checked against 0 proves nothing.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let value = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    Some(value.trim().trim_end_matches("kB").trim().parse().expect("VmRSS is a number of kB"))
}

/// How long one step of a load app may take (10k sequential connections among them).
const STEP_LIMIT: Duration = Duration::from_secs(300);

/// A Python app driven step by step over stdin/stdout; dropping it kills kmirror (and so the
/// app and the agent) if a failed test left it running.
struct Steps {
    child: std::process::Child,
    out: LineReader,
}

impl Drop for Steps {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Steps {
    fn start(pod: &LocalPod, script: &str) -> Steps {
        let mut cmd = kmirror_cmd(pod.target_pid, &[], &["python3", "-c", script]);
        let mut child =
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
        let out = LineReader::new(child.stdout.take().unwrap());
        Steps { child, out }
    }

    /// Waits for the app to exit by itself; its status.
    fn wait(&mut self) -> std::process::ExitStatus {
        wait_within(&mut self.child, "the load app", STEP_LIMIT)
    }

    /// Starts the app and waits for its `start` line; returns it with kmirror's and the
    /// agent's process ids.
    fn start_at_mark(pod: &LocalPod, script: &str) -> (Steps, u32, u32) {
        let mut app = Steps::start(pod, script);
        assert_eq!(app.line(), "start");
        let kmirror = app.child.id();
        (app, kmirror, agent_of(kmirror))
    }

    fn line(&mut self) -> String {
        self.out.line_within(STEP_LIMIT).trim().to_string()
    }

    fn next(&mut self) {
        self.child.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
    }
}

#[test]
fn thousands_of_tunnelled_connections_leave_no_descriptors_behind() {
    let pod = LocalPod::start(61);
    let script = format!(
        "import socket, sys, resource\n\
         resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))\n\
         addr = ('{ip}', 7777)\n\
         warm = socket.create_connection(addr, timeout=30); warm.close()\n\
         print('start', flush=True); sys.stdin.readline()\n\
         socks = [socket.create_connection(addr, timeout=30) for _ in range(1000)]\n\
         for s in socks: s.sendall(b'x\\n')\n\
         ok = sum(1 for s in socks if s.makefile().readline().startswith('pod-echo'))\n\
         print('concurrent=%d' % ok, flush=True); sys.stdin.readline()\n\
         for s in socks: s.close()\n\
         done = 0\n\
         for _ in range(10000):\n\
         \x20   s = socket.create_connection(addr, timeout=30); s.sendall(b'y\\n')\n\
         \x20   done += s.recv(100).startswith(b'pod-echo'); s.close()\n\
         print('sequential=%d' % done, flush=True); sys.stdin.readline()\n",
        ip = pod.service_ip
    );
    let (mut app, kmirror, agent) = Steps::start_at_mark(&pod, &script);
    let (sup_fds, agent_fds) = (fd_count(kmirror), fd_count(agent));
    app.next();
    assert_eq!(app.line(), "concurrent=1000");
    assert!(fd_count(kmirror) >= sup_fds + 990, "each tunnelled connection is really open");
    app.next();
    let started = Instant::now();
    let line = app.line();
    assert_eq!(field(&line, "sequential"), Some("10000"), "{line}");
    eprintln!("10k sequential tunnelled connections in {:?}", started.elapsed());
    // Relays end as the app closes; give the last ones a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while (fd_count(kmirror) > sup_fds + 2 || fd_count(agent) > agent_fds + 2) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        fd_count(kmirror) <= sup_fds + 2,
        "supervisor descriptors: {} before, {} after",
        sup_fds,
        fd_count(kmirror)
    );
    assert!(
        fd_count(agent) <= agent_fds + 2,
        "agent descriptors: {} before, {} after",
        agent_fds,
        fd_count(agent)
    );
    app.next();
    assert!(app.wait().success());
}

/// Bulk bytes both ways at once, which the tunnel splices rather than copies, arrive exact, and
/// the relay pipes are closed with the connection.
#[test]
fn bulk_bytes_through_the_tunnel_arrive_exact_both_ways() {
    let pod = LocalPod::start(63);
    let script = format!(
        "import socket, threading, hashlib, random, sys\n\
         data = random.Random(5).randbytes(48 << 20)\n\
         s = socket.create_connection(('{ip}', 7780), timeout=60)\n\
         print('start', flush=True); sys.stdin.readline()\n\
         def send():\n\
         \x20   s.sendall(data); s.shutdown(socket.SHUT_WR)\n\
         t = threading.Thread(target=send); t.start()\n\
         h = hashlib.sha256(); got = 0\n\
         while True:\n\
         \x20   b = s.recv(1 << 20)\n\
         \x20   if not b: break\n\
         \x20   h.update(b); got += len(b)\n\
         t.join(); s.close()\n\
         same = h.digest() == hashlib.sha256(data).digest()\n\
         print('received=%d' % got); print('same=%d' % same, flush=True); sys.stdin.readline()\n",
        ip = pod.service_ip
    );
    let (mut app, kmirror, agent) = Steps::start_at_mark(&pod, &script);
    let (sup_fds, agent_fds) = (fd_count(kmirror), fd_count(agent));
    app.next();
    let line = app.line();
    assert_eq!(field(&line, "received"), Some((48u64 << 20).to_string().as_str()), "{line}");
    let line = app.line();
    assert_eq!(field(&line, "same"), Some("1"), "the echoed bytes differ from those sent");
    // The app's connection was open when the baseline was taken; now it and its pipes are gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while (fd_count(kmirror) >= sup_fds || fd_count(agent) >= agent_fds) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        fd_count(kmirror) < sup_fds,
        "supervisor descriptors: {} before, {} after",
        sup_fds,
        fd_count(kmirror)
    );
    assert!(
        fd_count(agent) < agent_fds,
        "agent descriptors: {} before, {} after",
        agent_fds,
        fd_count(agent)
    );
    app.next();
    assert!(app.wait().success());
}

/// Stated bound: neither side grows beyond 64 MiB RSS while 1 GiB flows to a reader that
/// stops for seconds at a time; each stream may have at most 256 KiB in flight.
#[test]
fn a_slow_reader_keeps_memory_bounded_while_a_fast_writer_pushes_1_gib() {
    const BOUND_KIB: u64 = 64 * 1024;
    let pod = LocalPod::start(62);
    let script = format!(
        "import socket, sys, time\n\
         total = 1 << 30\n\
         s = socket.create_connection(('{ip}', 7779), timeout=60)\n\
         s.sendall(b'%d\\n' % total)\n\
         got = 0; pauses = 0\n\
         print('start', flush=True)\n\
         while got < total:\n\
         \x20   data = s.recv(1 << 20)\n\
         \x20   if not data: break\n\
         \x20   got += len(data)\n\
         \x20   if got >= (pauses + 1) * (256 << 20) and pauses < 3:\n\
         \x20       pauses += 1; time.sleep(2)\n\
         print('received=%d' % got, flush=True)\n",
        ip = pod.service_ip
    );
    let mut app = Steps::start(&pod, &script);
    assert_eq!(app.line(), "start");
    let kmirror = app.child.id();
    let agent = agent_of(kmirror);
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let (mut peak, mut samples) = ((0, 0), 0u64);
            // Both live until the app has received everything; a sample that cannot be taken
            // before then is a failure, not a 0.
            while !done.load(Ordering::Acquire) {
                match (rss_kib(kmirror), rss_kib(agent)) {
                    (Some(s), Some(a)) => {
                        peak = (peak.0.max(s), peak.1.max(a));
                        samples += 1;
                    }
                    missing => {
                        // The app may exit just after its last line, before `done` is set.
                        std::thread::sleep(Duration::from_secs(1));
                        assert!(
                            done.load(Ordering::Acquire),
                            "cannot read the RSS of kmirror or its agent mid-transfer: {missing:?}"
                        );
                        break;
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (peak, samples)
        })
    };
    let line = app.line();
    done.store(true, Ordering::Release);
    assert_eq!(field(&line, "received"), Some((1u64 << 30).to_string().as_str()), "{line}");
    assert!(app.wait().success());
    let ((supervisor_peak, agent_peak), samples) = sampler.join().unwrap();
    eprintln!("peak RSS: supervisor {supervisor_peak} KiB, agent {agent_peak} KiB ({samples} samples)");
    assert!(samples >= 10, "only {samples} RSS samples were taken during the transfer");
    assert!(
        supervisor_peak > 1024 && agent_peak > 1024,
        "implausible RSS: {supervisor_peak}, {agent_peak} KiB"
    );
    assert!(supervisor_peak < BOUND_KIB, "supervisor peaked at {supervisor_peak} KiB");
    assert!(agent_peak < BOUND_KIB, "agent peaked at {agent_peak} KiB");
}
