//! The ptrace interceptor (issue 15; docs/ptrace.md) against local pods (indices 249-254):
//! the same pod traffic, names and files as under the seccomp listener, for static Go, C
//! (musl) and Python; descriptors delivered without ADDFD as `open` gives them; threads,
//! children and exec followed; signals and job control unchanged; kmirror under kmirror.

use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{
    LineReader, field, fixture, go_fixtures, kmirror_bin, kmirror_cmd, ok, output_within,
};
use std::io::Write;
use std::process::{Output, Stdio};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `command` under kmirror with the ptrace interceptor, to completion.
fn traced(pod: &LocalPod, command: &[&str]) -> Output {
    output_within(kmirror_cmd(pod.target_pid, &["--interceptor", "ptrace", "--no-env"], command), LIMIT)
}

/// A Python script under kmirror with the ptrace interceptor; its stdout (it must succeed).
fn traced_python(pod: &LocalPod, script: &str) -> String {
    ok(&traced(pod, &["python3", "-c", script]))
}

/// The app really was traced, not served by a listener: its TracerPid is kmirror's tracer.
fn assert_traced(status: &str) {
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
            .unwrap_or_else(|| panic!("{key}: {status}"))
    };
    assert_ne!(field("TracerPid:"), "0", "the app is not traced:\n{status}");
    assert_eq!(field("Seccomp:"), "2", "the app has no filter:\n{status}");
}

#[test]
fn static_go_reaches_pod_services_files_and_names_under_ptrace() {
    let pod = LocalPod::start(249);
    for go in go_fixtures() {
        let go = go.to_str().unwrap();
        let out = ok(&traced(&pod, &[go, "get", "http://echo.default.svc.cluster.local:8080/ptrace"]));
        assert_eq!(field(&out, "status"), Some("200"), "{go}: {out}");
        assert_eq!(field(&out, "body"), Some(format!("pod-echo {} /ptrace", pod.index).as_str()), "{go}");
        assert_eq!(field(&out, "peer"), Some(format!("{}:8080", pod.service_ip).as_str()), "{go}");

        let out = ok(&traced(&pod, &[go, "resolve", "echo.default.svc.cluster.local"]));
        assert_eq!(field(&out, "addr"), Some(pod.service_ip.to_string().as_str()), "{go}: {out}");

        let out = ok(&traced(&pod, &[go, "cat", TOKEN]));
        assert!(out.contains(&format!("pod-token-{}", pod.index)), "{go}: {out}");

        let out = ok(&traced(&pod, &[go, "udp", &format!("{}:7778", pod.service_ip), "hi-udp"]));
        assert_eq!(field(&out, "reply"), Some(format!("pod-udp {}: hi-udp", pod.index).as_str()), "{go}");

        assert_traced(&ok(&traced(&pod, &[go, "cat", "/proc/self/status"])));
    }
}

#[test]
fn c_and_python_reach_pod_only_addresses_files_and_names_under_ptrace() {
    let pod = LocalPod::start(250);
    let c = fixture("c-app-musl");
    let c = c.to_str().unwrap();
    let out = ok(&traced(&pod, &[c, "get", "http://echo:8080/c"]));
    assert_eq!(field(&out, "body"), Some(format!("pod-echo {} /c", pod.index).as_str()), "{out}");
    let out = ok(&traced(&pod, &[c, "dial", &format!("{}:7777", pod.service_ip)]));
    assert_eq!(field(&out, "echo"), Some(format!("pod-echo {}: ping", pod.index).as_str()), "{out}");
    let out = ok(&traced(&pod, &[c, "resolve", "echo.default.svc.cluster.local"]));
    assert!(out.contains(&pod.service_ip.to_string()), "{out}");
    let out = ok(&traced(&pod, &[c, "cat", TOKEN]));
    assert!(out.contains(&format!("pod-token-{}", pod.index)), "{out}");

    let script = format!(
        "import socket\n\
         s = socket.create_connection(('{ip}', 7777)); s.sendall(b'py\\n')\n\
         print('echo=' + s.makefile().readline().strip(), 'peer=%s:%d' % s.getpeername())\n\
         print('token=' + open('{TOKEN}').read().strip())\n\
         print('name=' + socket.gethostbyname('echo.default.svc.cluster.local'))\n\
         print(open('/proc/self/status').read())\n",
        ip = pod.service_ip
    );
    let out = traced_python(&pod, &script);
    let first: Vec<&str> = out.lines().take(3).collect();
    assert_eq!(
        first,
        [
            format!("echo=pod-echo {}: py peer={}:7777", pod.index, pod.service_ip),
            format!("token=pod-token-{}", pod.index),
            format!("name={}", pod.service_ip),
        ],
        "{out}"
    );
    assert_traced(&out);
}

/// A pod file's descriptor arrives as `open` would give it: the lowest free number, with
/// close-on-exec as asked (Python's `os.open` always asks; libc's `open` as called), nothing
/// else left in the app's table (no socket of the exchange), and `EMFILE` when the app has no
/// descriptor left.
#[test]
fn pod_file_descriptors_arrive_as_open_gives_them() {
    let pod = LocalPod::start(251);
    let script = format!(
        "import ctypes, itertools, os, fcntl, errno, resource\n\
         def link(n):\n\
         \x20   try: return os.readlink('/proc/self/fd/' + n)\n\
         \x20   except OSError: return None\n\
         def table(): return sorted((n, l) for n in os.listdir('/proc/self/fd') for l in [link(n)] if l)\n\
         before = table()\n\
         os.close(0)\n\
         zero = os.open('{TOKEN}', os.O_RDONLY)\n\
         print('zero=%d' % zero, 'text=' + os.read(zero, 100).decode().strip())\n\
         a = os.open('{TOKEN}', os.O_RDONLY | os.O_CLOEXEC)\n\
         b = ctypes.CDLL(None, use_errno=True).open(b'{TOKEN}', os.O_RDONLY)\n\
         flags = lambda fd: fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC\n\
         print('cloexec=%d,%d' % (flags(a), flags(b)), 'next=%s' % (b == a + 1))\n\
         after = table()\n\
         print('sockets=%d' % sum(1 for _, link in after if link.startswith('socket:')))\n\
         print('grew=%d' % (len(after) - len(before)))\n\
         used = set(int(n) for n, _ in after)\n\
         free = next(n for n in itertools.count() if n not in used)\n\
         soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n\
         resource.setrlimit(resource.RLIMIT_NOFILE, (free, hard))\n\
         try: os.open('{TOKEN}', os.O_RDONLY); print('full=opened')\n\
         except OSError as e: print('full=' + errno.errorcode[e.errno])\n"
    );
    let out = traced_python(&pod, &script);
    assert_eq!(
        out,
        format!(
            "zero=0 text=pod-token-{}\ncloexec=1,0 next=True\nsockets=0\ngrew=2\nfull=EMFILE\n",
            pod.index
        )
    );
}

/// Threads, forked children and exec'd programs are followed from their first instruction:
/// each one's pod calls are served (and the main process's own too, after its children).
#[test]
fn threads_children_and_execs_are_followed() {
    let pod = LocalPod::start(252);
    let go = go_fixtures()[0].to_str().unwrap().to_string();
    let script = format!(
        "import os, threading, subprocess, urllib.request\n\
         url = 'http://echo.default.svc.cluster.local:8080/'\n\
         got = []\n\
         def get(i): got.append(urllib.request.urlopen(url + 't%d' % i).read().decode().strip())\n\
         ts = [threading.Thread(target=get, args=(i,)) for i in range(8)]\n\
         [t.start() for t in ts]; [t.join() for t in ts]\n\
         print('threads=%d' % len(set(got)))\n\
         r, w = os.pipe()\n\
         pid = os.fork()\n\
         if pid == 0:\n\
         \x20   os.write(w, urllib.request.urlopen(url + 'child').read()); os._exit(0)\n\
         os.waitpid(pid, 0); print('child=' + os.read(r, 100).decode().strip())\n\
         out = subprocess.run(['{go}', 'get', url + 'exec'], capture_output=True, text=True).stdout\n\
         print('exec=' + [l for l in out.splitlines() if l.startswith('body=')][0])\n\
         out = subprocess.run(['sh', '-c', 'cat {TOKEN} & wait'], capture_output=True, text=True).stdout\n\
         print('shell=' + out.strip())\n\
         print('main=' + urllib.request.urlopen(url + 'main').read().decode().strip())\n"
    );
    let out = traced_python(&pod, &script);
    let i = pod.index;
    assert_eq!(
        out,
        format!(
            "threads=8\nchild=pod-echo {i} /child\nexec=body=pod-echo {i} /exec\nshell=pod-token-{i}\nmain=pod-echo {i} /main\n"
        )
    );
}

/// Signals reach the app unchanged: handlers (a real-time signal too), default actions, and
/// job control (a stopped child is seen stopped by its parent, continued, and exits).
#[test]
fn signals_and_job_control_pass_unchanged() {
    let pod = LocalPod::start(253);
    let script = "import os, signal, sys\n\
         got = []\n\
         for s in (signal.SIGUSR1, signal.SIGRTMIN + 1): signal.signal(s, lambda n, f: got.append(n))\n\
         os.kill(os.getpid(), signal.SIGUSR1); os.kill(os.getpid(), signal.SIGRTMIN + 1)\n\
         print('handled=%s' % (got == [signal.SIGUSR1, signal.SIGRTMIN + 1]))\n\
         pid = os.fork()\n\
         if pid == 0:\n\
         \x20   os.kill(os.getpid(), signal.SIGSTOP)\n\
         \x20   os.open('/etc/hostname', os.O_RDONLY); os._exit(7)\n\
         _, st = os.waitpid(pid, os.WUNTRACED)\n\
         print('stopped=%s' % (os.WIFSTOPPED(st) and os.WSTOPSIG(st) == signal.SIGSTOP))\n\
         os.kill(pid, signal.SIGCONT)\n\
         _, st = os.waitpid(pid, os.WCONTINUED)\n\
         print('continued=%s' % os.WIFCONTINUED(st))\n\
         _, st = os.waitpid(pid, 0)\n\
         print('exit=%d' % os.WEXITSTATUS(st))\n\
         pid = os.fork()\n\
         if pid == 0: signal.pause()\n\
         os.kill(pid, signal.SIGTERM); _, st = os.waitpid(pid, 0)\n\
         print('killed=%s' % (os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGTERM))\n";
    let out = traced_python(&pod, script);
    assert_eq!(out, "handled=True\nstopped=True\ncontinued=True\nexit=7\nkilled=True\n");

    // A signal while the thread waits in a call kmirror holds for the pod (a UDP connect
    // whose pod side is stopped): the call returns EINTR for the handler, as a native one
    // would (ERESTARTSYS, restored at the call's exit).
    let script = format!(
        "import errno, signal, socket, sys, time\n\
         class Alarm(Exception): pass\n\
         def alarm(*_): raise Alarm()\n\
         signal.signal(signal.SIGALRM, alarm)\n\
         print('ready', flush=True)\n\
         sys.stdin.readline()\n\
         c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         signal.setitimer(signal.ITIMER_REAL, 0.3)\n\
         start = time.monotonic()\n\
         try: c.connect(('{ip}', 7778)); print('connect=done')\n\
         except Alarm: print('connect=alarm quick=%s' % (time.monotonic() - start < 1.5))\n\
         except OSError as e: print('connect=' + errno.errorcode[e.errno])\n\
         print('part-done', flush=True)\n\
         sys.stdin.readline()\n\
         c.connect(('{ip}', 7778)); c.send(b'again'); c.settimeout(5)\n\
         print('reply=' + c.recv(100).decode(), flush=True)\n",
        ip = pod.service_ip
    );
    let mut cmd =
        kmirror_cmd(pod.target_pid, &["--interceptor", "ptrace", "--no-env"], &["python3", "-c", &script]);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = kmirror_suite::run::spawn_tied(cmd).unwrap();
    let lines = LineReader::new(child.stdout.take().unwrap());
    let mut stdin = child.stdin.take().unwrap();
    assert_eq!(lines.line_within(LIMIT), "ready");
    let agent = kmirror_suite::run::agent_of(child.id());
    kmirror_suite::run::signal(agent, libc::SIGSTOP).unwrap();
    stdin.write_all(b"go\n").unwrap();
    let interrupted = lines.line_within(LIMIT);
    assert_eq!(lines.line_within(LIMIT), "part-done");
    kmirror_suite::run::signal(agent, libc::SIGCONT).unwrap();
    stdin.write_all(b"go\n").unwrap();
    let reply = lines.line_within(LIMIT);
    let status = kmirror_suite::run::wait_within(&mut child, "kmirror", LIMIT);
    assert_eq!(interrupted, "connect=alarm quick=True");
    assert_eq!(reply, format!("reply=pod-udp {}: again", pod.index));
    assert!(status.success());
}

/// kmirror under kmirror: the inner one cannot have a listener (the outer one's is in the
/// chain), so `auto` picks ptrace and says so, and its app reaches the pod. (With the same
/// target, the outer listener serves the calls both trap: docs/ptrace.md, *Nesting*.)
#[test]
fn kmirror_under_kmirror_picks_ptrace_and_reaches_the_pod() {
    let pod = LocalPod::start(254);
    let target = format!("pid/{}", pod.target_pid);
    let inner = kmirror_bin();
    let go = go_fixtures()[0].to_str().unwrap().to_string();
    let url = "http://echo.default.svc.cluster.local:8080/nested";
    let command = [inner.to_str().unwrap(), "run", "--target", &target, "--no-env", "--", &go, "get", url];
    let out = output_within(kmirror_cmd(pod.target_pid, &["--no-env"], &command), LIMIT);
    let stdout = ok(&out);
    assert_eq!(field(&stdout, "body"), Some(format!("pod-echo {} /nested", pod.index).as_str()), "{stdout}");
    let err = stderr(&out);
    assert!(err.contains("already runs under a seccomp listener"), "{err}");
    assert!(err.contains("intercepting the app's calls with ptrace instead"), "{err}");
    assert_eq!(err.matches("with ptrace instead").count(), 1, "said once: {err}");

    // The inner app is traced (by the inner kmirror) and filtered.
    let command = [
        inner.to_str().unwrap(),
        "run",
        "--target",
        &target,
        "--no-env",
        "--",
        &go,
        "cat",
        "/proc/self/status",
    ];
    assert_traced(&ok(&output_within(kmirror_cmd(pod.target_pid, &["--no-env"], &command), LIMIT)));

    // Forcing a listener there fails as the kernel says.
    let command = [
        inner.to_str().unwrap(),
        "run",
        "--target",
        &target,
        "--no-env",
        "--interceptor",
        "seccomp",
        "--",
        "true",
    ];
    let out = output_within(kmirror_cmd(pod.target_pid, &["--no-env"], &command), LIMIT);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("Device or resource busy"), "{}", stderr(&out));
}

/// Incoming traffic under ptrace: a stolen pod connection reaches the app's blocking
/// `accept`, which kmirror performs itself and answers with a descriptor handed over without
/// ADDFD, with the pod client as the peer.
#[test]
fn stolen_connections_reach_a_blocking_accept_under_ptrace() {
    use std::io::{BufRead, BufReader};
    let pod = LocalPod::start(251);
    let port = 18000 + u16::from(pod.index);
    let script = format!(
        "import socket\n\
         s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {port})); s.listen()\n\
         print('listening', flush=True)\n\
         c, peer = s.accept()\n\
         c.sendall(('local-py peer=%s fd=%d\\n' % (peer[0], c.fileno())).encode()); c.close()\n"
    );
    let map = format!("{port}:8080");
    let flags = ["--interceptor", "ptrace", "--no-env", "--incoming", "steal", "--port-map", map.as_str()];
    let mut app =
        kmirror_suite::app::BackgroundApp::start(pod.target_pid, &flags, &["python3", "-c", &script]);
    app.wait_stdout("the app to listen", LIMIT, |l| l.iter().any(|l| l == "listening"));
    app.wait_subscribed();
    let conn = std::net::TcpStream::connect((pod.pod_ip, 8080)).unwrap();
    conn.set_read_timeout(Some(LIMIT)).unwrap();
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line).unwrap();
    assert_eq!(line, format!("local-py peer={} fd=4\n", pod.host_ip), "{}", app.stderr_text());
    assert!(app.wait_exit(LIMIT).success());
}
