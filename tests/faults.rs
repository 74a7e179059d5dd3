//! Faults and interception edges: kmirror killed, agent killed, target gone, wrong session
//! token, children and exec'd programs, 32-bit system calls.

use kmirror_suite::app::BackgroundApp;
use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{
    LineReader, agent_of, children_of, descendants_of, field, go_fixtures, kmirror, kmirror_bin, ok,
    output_within, wait_output_within,
};
use kmirror_suite::run::{alive, wait_until};
use std::time::{Duration, Instant};

/// The app's main process: the child of kmirror's keeper (kmirror's child that is not the agent).
fn app_pid(app: &BackgroundApp) -> u32 {
    let agent = app.agent_pid();
    let keeper = children_of(app.child.id()).into_iter().find(|&p| p != agent).expect("the keeper process");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(&main) = children_of(keeper).first() {
            return main;
        }
        assert!(Instant::now() < deadline, "the keeper never started the app");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn killing_kmirror_kills_the_app() {
    let pod = LocalPod::start(51);
    let go = go_fixtures()[0].to_str().unwrap().to_string();
    let mut app = BackgroundApp::start(pod.target_pid, &[], &[&go, "wait-signal"]);
    app.wait_stdout("ready", Duration::from_secs(20), |l| l.iter().any(|l| l == "ready"));
    let app_pid = app_pid(&app);
    assert!(alive(app_pid));
    let agent = app.agent_pid();
    app.child.kill().unwrap(); // SIGKILL
    app.child.wait().unwrap();
    wait_until(
        "the app died with kmirror (no app left running with ENOSYS)",
        Duration::from_secs(20),
        || !alive(app_pid),
    );
    wait_until("the agent died with kmirror", Duration::from_secs(20), || !alive(agent));
}

/// An agent whose supervisor is not its parent (any more) refuses to start: it could not die
/// with it.
#[test]
fn the_agent_refuses_to_outlive_a_supervisor_that_is_gone() {
    let agent_bin = kmirror_bin().with_file_name("kmirror-agent");
    let mut cmd = std::process::Command::new(agent_bin);
    cmd.args(["--tunnel-fd", "0", "--target-pid", "1", "--parent-pid", "1"]);
    let out = output_within(cmd, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the supervisor (pid 1) exited before the agent started"), "{stderr}");
}

#[test]
fn losing_the_agent_resets_pod_connections_keeps_local_ones_and_fails_the_session() {
    let pod = LocalPod::start(52);
    let local = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let local_port = local.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in local.incoming().flatten() {
            use std::io::Write;
            let _ = (&conn).write_all(b"local-ok\n");
        }
    });
    let script = format!(
        "import socket, sys, time\n\
         pod = socket.create_connection(('{ip}', 7777), timeout=10)\n\
         pod.sendall(b'one\\n')\n\
         print('first=' + pod.makefile().readline().strip(), flush=True)\n\
         sys.stdin.readline()\n\
         start = time.time()\n\
         try:\n\
         \x20   pod.sendall(b'two\\n')\n\
         \x20   data = pod.recv(100)\n\
         \x20   print('after=' + ('eof' if not data else 'data'), flush=True)\n\
         except OSError as e:\n\
         \x20   print('after=' + type(e).__name__, flush=True)\n\
         print('seconds=%d' % (time.time() - start), flush=True)\n\
         loc = socket.create_connection(('127.0.0.1', {local_port}), timeout=5)\n\
         print('local=' + loc.makefile().readline().strip(), flush=True)\n",
        ip = pod.service_ip
    );
    let mut cmd = kmirror_suite::run::kmirror_cmd(pod.target_pid, &[], &["python3", "-c", &script]);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stdout = LineReader::new(child.stdout.take().unwrap());
    let line = stdout.line_within(Duration::from_secs(30));
    assert_eq!(line, format!("first=pod-echo {}: one", pod.index));
    let agent = agent_of(child.id());
    // Killing the agent of our own kmirror child.
    let _ = kmirror_suite::run::signal(agent, libc::SIGKILL);
    wait_until("the agent is gone", Duration::from_secs(20), || !alive(agent));
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let rest = stdout.rest_within(Duration::from_secs(30));
    let out = wait_output_within(child, "kmirror", Duration::from_secs(30));
    let after = field(&rest, "after").unwrap_or("missing");
    assert!(
        ["eof", "ConnectionResetError", "BrokenPipeError"].contains(&after),
        "pod socket after agent loss: {rest}"
    );
    assert_eq!(field(&rest, "seconds"), Some("0"), "promptly: {rest}");
    assert_eq!(field(&rest, "local"), Some("local-ok"), "local traffic keeps working: {rest}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lost the connection to the pod agent"), "{stderr}");
    assert_eq!(out.status.code(), Some(1), "the app exited 0 but the session failed");
}

#[test]
fn target_exit_ends_the_session_with_a_clear_message() {
    let pod = LocalPod::start(53);
    let go = go_fixtures()[0].to_str().unwrap().to_string();
    let app = BackgroundApp::start(pod.target_pid, &[], &[&go, "wait-signal"]);
    app.wait_stdout("ready", Duration::from_secs(20), |l| l.iter().any(|l| l == "ready"));
    // Ending the pod's target process.
    let _ = kmirror_suite::run::signal(pod.target_pid, libc::SIGKILL);
    wait_until("the app is stopped", Duration::from_secs(20), || {
        app.stdout_lines().iter().any(|l| l == "signal=TERM")
    });
    let mut app = app;
    let status = app.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1));
    assert!(
        app.stderr_text().contains(&format!("target process {} exited", pod.target_pid)),
        "{}",
        app.stderr_text()
    );
}

/// Forked children and exec'd programs are intercepted, not merely handed the pod's
/// environment (which execve passes on by itself): each answer here needs a trapped call.
#[test]
fn children_and_exec_inherit_interception() {
    let pod = LocalPod::start(54);
    let go = go_fixtures()[0].to_str().unwrap().to_string();
    // A shell forks a static Go child with an emptied environment (so nothing pod-specific is
    // inherited), which reads a pod file and asks the pod's DNS and services; another shell
    // exec's it.
    let script = format!(
        "env -i {go} cat /etc/hostname | sed 's/^/child-hostname=/'; \
         env -i {go} resolve pod-hosts-only.internal | sed 's/^/child-/'; \
         sh -c 'exec env -i {go} get http://echo.default.svc.cluster.local:8080/grandchild' | grep body="
    );
    let out = ok(&kmirror(pod.target_pid, &[], &["sh", "-c", &script]));
    assert!(out.contains(&format!("child-hostname={}\n", pod.pod_hostname())), "{out}");
    assert!(out.contains(&format!("child-addr={}\n", pod.service_ip)), "{out}");
    assert!(out.contains(&format!("body=pod-echo {} /grandchild", pod.index)), "{out}");
}

#[test]
fn thirty_two_bit_system_calls_are_refused() {
    let pod = LocalPod::start(55);
    let dir = kmirror_suite::run::ScratchDir::new("int80");
    let source = dir.join("int80.c");
    // getpid through the i386 entry point (int $0x80, syscall 20), from a 64-bit program.
    std::fs::write(
        &source,
        "#include <stdio.h>\nint main(void){long r; __asm__ volatile(\"int $0x80\" : \"=a\"(r) : \"a\"(20L) : \"memory\");\
         printf(\"result=%ld\\n\", r); return 0;}\n",
    )
    .unwrap();
    let binary = dir.join("int80");
    let cc =
        std::process::Command::new("cc").arg("-O0").arg("-o").arg(&binary).arg(&source).status().unwrap();
    assert!(cc.success());
    let bare = output_within(std::process::Command::new(&binary), Duration::from_secs(30));
    let bare_result: i64 = field(&String::from_utf8_lossy(&bare.stdout), "result").unwrap().parse().unwrap();
    assert!(bare_result > 0, "without kmirror the i386 getpid works");
    let out = ok(&kmirror(pod.target_pid, &[], &[binary.to_str().unwrap()]));
    assert_eq!(field(&out, "result"), Some(format!("-{}", libc::ENOSYS).as_str()));
}

/// The agent accepts a session only with its token; a wrong one is rejected and logged.
#[test]
fn the_agent_rejects_a_wrong_session_token() {
    let pod = LocalPod::start(56);
    let agent_bin = kmirror_bin().with_file_name("kmirror-agent");
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
    let mut cmd = std::process::Command::new(agent_bin);
    cmd.args(["--tunnel-fd", &fd.to_string(), "--target-pid", &pod.target_pid.to_string()])
        .env("KMIRROR_SESSION_TOKEN", "the-right-token")
        .stderr(std::process::Stdio::piped());
    // The agent inherits its end.
    kmirror_suite::sys::inherit_fd(&mut cmd, fd);
    let child = cmd.spawn().unwrap();
    drop(theirs);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let reply = runtime.block_on(async {
        ours.set_nonblocking(true).unwrap();
        let mut socket = tokio::net::UnixStream::from_std(ours).unwrap();
        let hello = kmirror_protocol::Hello {
            min_version: kmirror_protocol::MIN_PROTOCOL_VERSION,
            max_version: kmirror_protocol::PROTOCOL_VERSION,
            token: b"a-wrong-token".to_vec(),
            capabilities: Vec::new(),
        };
        kmirror_protocol::tunnel::write_control(&mut socket, kmirror_protocol::Control::Hello(hello))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(30), kmirror_protocol::tunnel::read_control(&mut socket))
            .await
            .expect("the agent did not answer the hello within 30 s")
            .unwrap()
    });
    assert!(
        matches!(&reply, kmirror_protocol::Control::HelloReply(kmirror_protocol::HelloReply::Rejected { reason }) if reason.contains("token")),
        "{reply:?}"
    );
    let out = wait_output_within(child, "the agent", Duration::from_secs(30));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong session token"));
}

/// A hung agent never hangs the app: pod operations time out with ETIMEDOUT.
#[test]
fn a_hung_agent_times_out_instead_of_hanging_the_app() {
    let pod = LocalPod::start(57);
    let go = go_fixtures()[0].to_str().unwrap().to_string();
    let script = format!("read line; {go} cat /etc/hostname; echo rc=$?");
    let mut cmd =
        kmirror_suite::run::kmirror_cmd(pod.target_pid, &["--remote-timeout", "1"], &["sh", "-c", &script]);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    // The session is up once the app runs: wait for the shell to block reading its stdin.
    let deadline = Instant::now() + Duration::from_secs(30);
    let app = loop {
        let shell = descendants_of(child.id()).into_iter().find(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sh")
                && std::fs::read_to_string(format!("/proc/{p}/syscall"))
                    .is_ok_and(|s| s.split_whitespace().next() == Some(&libc::SYS_read.to_string()))
        });
        if let Some(shell) = shell {
            break shell;
        }
        assert!(Instant::now() < deadline, "the app never blocked reading its stdin");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(alive(app));
    let agent = agent_of(child.id());
    // Stopping (then resuming) the agent of our own kmirror child.
    let _ = kmirror_suite::run::signal(agent, libc::SIGSTOP);
    let started = Instant::now();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = wait_output_within(child, "kmirror", Duration::from_secs(60));
    let elapsed = started.elapsed();
    let _ = kmirror_suite::run::signal(agent, libc::SIGCONT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        field(&stdout, "rc"),
        Some("1"),
        "the read failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("timed out"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(elapsed < Duration::from_secs(20), "bounded by the timeout, took {elapsed:?}");
}

/// openat2(2) is trapped like openat: a pod-specific path opened with it comes from the pod.
#[test]
fn openat2_is_intercepted() {
    let pod = LocalPod::start(58);
    let dir = kmirror_suite::run::ScratchDir::new("openat2");
    let source = dir.join("openat2.c");
    std::fs::write(
        &source,
        "#include <stdio.h>\n#include <fcntl.h>\n#include <unistd.h>\n#include <sys/syscall.h>\n#include <string.h>\n\
         struct how { unsigned long long flags, mode, resolve; };\n\
         int main(void){ struct how h; memset(&h, 0, sizeof h); h.flags = O_RDONLY;\n\
         int fd = syscall(SYS_openat2, AT_FDCWD, \"/etc/hostname\", &h, sizeof h);\n\
         if (fd < 0) { perror(\"openat2\"); return 1; }\n\
         char buf[256]; int n = read(fd, buf, sizeof buf - 1); buf[n > 0 ? n : 0] = 0; printf(\"%s\", buf); return 0; }\n",
    )
    .unwrap();
    let binary = dir.join("openat2");
    assert!(std::process::Command::new("cc").arg("-o").arg(&binary).arg(&source).status().unwrap().success());
    let out = ok(&kmirror(pod.target_pid, &[], &[binary.to_str().unwrap()]));
    assert_eq!(out.trim(), pod.pod_hostname());
}

/// An app at its descriptor limit gets EMFILE for a pod file, as for a local one, instead of
/// hanging: the descriptor kmirror hands over cannot be installed.
#[test]
fn a_full_descriptor_table_gets_emfile_for_pod_files() {
    let pod = LocalPod::start(59);
    let script = "import resource, os, errno\n\
                  resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))\n\
                  held = []\n\
                  try:\n\
                  \x20   while True: held.append(os.open('/dev/null', os.O_RDONLY))\n\
                  except OSError as e: print('local=' + errno.errorcode[e.errno])\n\
                  try: open('/etc/hostname').read(); print('pod=opened')\n\
                  except OSError as e: print('pod=' + errno.errorcode[e.errno])\n\
                  os.close(held.pop()); print('after=' + open('/etc/hostname').read().strip())\n";
    let out = ok(&kmirror(pod.target_pid, &["--remote-timeout", "10"], &["python3", "-c", script]));
    assert_eq!(out, format!("local=EMFILE\npod=EMFILE\nafter={}\n", pod.pod_hostname()));
}
