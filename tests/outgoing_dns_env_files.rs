//! `kmirror run` against a local pod: outgoing traffic, DNS, environment and pod files, for the
//! static Go fixture (Debian's Go and the current release), each compared with the answer the
//! same fixture gives when run inside the pod.

use kmirror_suite::app::BackgroundApp;
use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{expect_status, field, go_fixtures, kmirror, kmirror_cmd, ok, output_within};
use std::time::{Duration, Instant};

/// Runs a Python script under kmirror against `pod`; its stdout (the run must succeed).
fn python_under_kmirror(pod: &LocalPod, script: &str) -> String {
    ok(&kmirror(pod.target_pid, &[], &["python3", "-c", script]))
}

fn run_go(pod: &LocalPod, go: &str, flags: &[&str], args: &[&str]) -> std::process::Output {
    run_go_with_env(pod, go, flags, args, &[])
}

/// Like [`run_go`], with variables set in kmirror's (so the app's local) environment.
fn run_go_with_env(
    pod: &LocalPod,
    go: &str,
    flags: &[&str],
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    let mut command = vec![go];
    command.extend_from_slice(args);
    let mut cmd = kmirror_cmd(pod.target_pid, flags, &command);
    cmd.envs(env.iter().copied());
    output_within(cmd, Duration::from_secs(60))
}

#[test]
fn go_static_reaches_pod_services_by_cluster_name() {
    let pod = LocalPod::start(11);
    for go in go_fixtures() {
        let go = go.to_str().unwrap();
        let out = ok(&run_go(&pod, go, &[], &["get", "http://echo.default.svc.cluster.local:8080/hello"]));
        assert_eq!(field(&out, "status"), Some("200"), "{go}: {out}");
        assert_eq!(field(&out, "body"), Some(format!("pod-echo {} /hello", pod.index).as_str()), "{go}");
        assert_eq!(field(&out, "peer"), Some(format!("{}:8080", pod.service_ip).as_str()), "{go}");

        // Short name through the pod's search list, as in a real pod.
        let out = ok(&run_go(&pod, go, &[], &["get", "http://echo:8080/short"]));
        assert_eq!(field(&out, "body"), Some(format!("pod-echo {} /short", pod.index).as_str()));

        let out = ok(&run_go(&pod, go, &[], &["dial", &format!("{}:7777", pod.service_ip)]));
        assert_eq!(field(&out, "echo"), Some(format!("pod-echo {}: ping", pod.index).as_str()));
        assert_eq!(field(&out, "peer"), Some(format!("{}:7777", pod.service_ip).as_str()));

        let out = ok(&run_go(&pod, go, &[], &["udp", &format!("{}:7778", pod.service_ip), "hi-udp"]));
        assert_eq!(field(&out, "reply"), Some(format!("pod-udp {}: hi-udp", pod.index).as_str()));
        assert_eq!(field(&out, "peer"), Some(format!("{}:7778", pod.service_ip).as_str()));
    }
    let log = pod.service_log();
    assert!(log.contains("echo.default.svc.cluster.local"), "the pod's DNS server saw no query:\n{log}");
}

#[test]
fn refused_pod_destination_keeps_its_errno() {
    let pod = LocalPod::start(12);
    for go in go_fixtures() {
        let out = run_go(&pod, go.to_str().unwrap(), &[], &["connect", &format!("{}:1", pod.service_ip)]);
        let stdout = expect_status(&out, 1);
        assert_eq!(field(&stdout, "errno"), Some("ECONNREFUSED"), "{stdout}");
    }
}

/// After a refused pod connect the socket is as a failed connect leaves it: no pending error,
/// not connected, and free to connect again. (kmirror connects it to its local proxy while the
/// pod side connects, and undoes that when the pod refuses.)
#[test]
fn a_refused_socket_can_connect_again() {
    let pod = LocalPod::start(35);
    let script = format!(
        "import socket, errno\n\
         s = socket.socket()\n\
         try:\n\
         \x20   s.connect(('{ip}', 1)); print('first=connected')\n\
         except OSError as e: print('first=' + errno.errorcode[e.errno])\n\
         print('so_error=%d' % s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))\n\
         try:\n\
         \x20   s.getpeername(); print('peer=connected')\n\
         except OSError as e: print('peer=' + errno.errorcode[e.errno])\n\
         s.connect(('{ip}', 7777)); s.sendall(b'again\\n')\n\
         print('second=' + s.makefile().readline().strip())\n\
         print('peer=%s:%d' % s.getpeername())\n",
        ip = pod.service_ip
    );
    let out = python_under_kmirror(&pod, &script);
    let native = pod.exec_in_pod("python3", &["-c", &script]);
    assert_eq!(out, String::from_utf8_lossy(&native.stdout), "under kmirror vs inside the pod");
    assert_eq!(
        out,
        format!(
            "first=ECONNREFUSED\nso_error=0\npeer=ENOTCONN\nsecond=pod-echo {}: again\npeer={}:7777\n",
            pod.index, pod.service_ip
        )
    );
}

/// A connect that the app's SO_SNDTIMEO ends (with EINPROGRESS, as Linux reports it) is
/// abandoned in the pod too: the agent's half-open socket goes, instead of retrying SYNs for as
/// long as the pod's kernel would.
#[test]
fn a_connect_the_app_gives_up_on_is_abandoned_in_the_pod() {
    let pod = LocalPod::start(34);
    let script = format!(
        "import socket, struct, time, errno\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack('ll', 1, 500000))\n\
         start = time.monotonic()\n\
         try:\n\
         \x20   s.connect(('{}', 7781)); print('result=connected', flush=True)\n\
         except OSError as e: print('result=' + errno.errorcode[e.errno], flush=True)\n\
         print('waited_ms=%d' % ((time.monotonic() - start) * 1000), flush=True)\n\
         time.sleep(60)\n",
        pod.service_ip
    );
    // The pod's half-open connections to the stalled listener, as `ss` lists them.
    let half_open = || {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &pod.netns, "ss", "-Htn", "state", "syn-sent", "dport", "=", ":7781"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let wait_for = |what: &str, want_empty: bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let listed = half_open();
            if listed.is_empty() == want_empty {
                return;
            }
            assert!(Instant::now() < deadline, "{what}:\n{listed}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let app = BackgroundApp::start(pod.target_pid, &[], &["python3", "-c", &script]);
    wait_for("the agent never dialled the stalled listener", false);
    app.wait_stdout("the connect's result", Duration::from_secs(20), |lines| {
        lines.iter().any(|l| l.starts_with("waited_ms="))
    });
    let stdout = app.stdout_lines().join("\n");
    assert_eq!(field(&stdout, "result"), Some("EINPROGRESS"), "{stdout}");
    let waited: u64 = field(&stdout, "waited_ms").unwrap().parse().unwrap();
    assert!(waited >= 1400, "the connect ended before the app's timeout: {stdout}");
    wait_for("the agent still dials the pod for a connect the app gave up on", true);
    app.stop();
}

/// Each variable is also set locally, to a value the pod does not have, so that every answer
/// tells which side it came from.
#[test]
fn pod_environment_is_merged_with_local_only_variables_kept() {
    let pod = LocalPod::start(13);
    let go = &go_fixtures()[0];
    let go = go.to_str().unwrap();
    let env = |flags: &[&str], name: &str, local: &[(&str, &str)]| {
        let out = run_go_with_env(&pod, go, flags, &["env", name], local);
        match out.status.code() {
            Some(1) => None,
            _ => Some(field(&ok(&out), "env").unwrap().to_string()),
        }
    };
    let pod_value = format!("pod-value-{}", pod.index);
    let local = [("POD_ONLY_VAR", "local-value"), ("SHARED_VAR", "from-local")];
    assert_eq!(env(&[], "POD_ONLY_VAR", &[]), Some(pod_value.clone()));
    // The pod's value beats the local one.
    assert_eq!(env(&[], "POD_ONLY_VAR", &local), Some(pod_value.clone()));
    assert_eq!(env(&[], "SHARED_VAR", &local), Some("from-pod".into()));
    // PATH stays local: a local value the pod's PATH cannot share.
    let local_path = format!("{}:/kmirror-local-path-marker", std::env::var("PATH").unwrap());
    assert_eq!(env(&[], "PATH", &[("PATH", &local_path)]), Some(local_path.clone()), "PATH stays local");
    // --env-exclude: the pod's variable is not taken, the local one stays.
    let exclude = ["--env-exclude", "POD_*"];
    assert_eq!(env(&exclude, "POD_ONLY_VAR", &local), Some("local-value".into()));
    assert_eq!(env(&exclude, "POD_ONLY_VAR", &[]), None);
    assert_eq!(env(&exclude, "SHARED_VAR", &local), Some("from-pod".into()), "only matches are excluded");
    // --no-env: nothing from the pod, everything local stays.
    assert_eq!(env(&["--no-env"], "SHARED_VAR", &local), Some("from-local".into()));
    assert_eq!(env(&["--no-env"], "POD_ONLY_VAR", &local), Some("local-value".into()));
    assert_eq!(env(&["--no-env"], "KUBERNETES_SERVICE_HOST", &local), None);
}

#[test]
fn pod_specific_files_come_from_the_pod_by_default() {
    let pod = LocalPod::start(14);
    for go in go_fixtures() {
        let go = go.to_str().unwrap();
        let token =
            ok(&run_go(&pod, go, &[], &["cat", "/var/run/secrets/kubernetes.io/serviceaccount/token"]));
        assert_eq!(token, format!("pod-token-{}", pod.index));
        let hostname = ok(&run_go(&pod, go, &[], &["cat", "/etc/hostname"]));
        assert_eq!(hostname.trim(), pod.pod_hostname());
        let hosts = ok(&run_go(&pod, go, &[], &["resolve", "pod-hosts-only.internal"]));
        assert_eq!(field(&hosts, "addr"), Some(pod.service_ip.to_string().as_str()), "pod /etc/hosts");
        let stat = ok(&run_go(&pod, go, &[], &["stat", "/etc/hostname"]));
        assert!(stat.starts_with(&format!("size={} ", hostname.len())), "{stat}");
        // Not pod-specific: stays local in the default mode.
        let missing = run_go(&pod, go, &[], &["cat", "/data/pod-only.txt"]);
        expect_status(&missing, 2);
    }
}

#[test]
fn read_mode_serves_the_pod_filesystem_and_matches_inside_answers() {
    let pod = LocalPod::start(15);
    let go = &go_fixtures()[1];
    let go = go.to_str().unwrap();
    let read = ["--fs-mode", "read"];
    let cases: &[&[&str]] = &[
        &["cat", "/data/pod-only.txt"],
        &["stat", "/data/pod-only.txt"],
        &["stat", "/data/link-to-a"],
        &["stat", "/data/dir"],
        &["ls", "/data/dir"],
        &["cat", "/data/link-to-a"],
        &["cat", "/etc/hostname"],
    ];
    for args in cases {
        let under_kmirror = ok(&run_go(&pod, go, &read, args));
        let inside = pod.exec_in_pod(go, args);
        assert_eq!(under_kmirror, ok(&inside), "{args:?} differs from the answer inside the pod");
    }
    assert_eq!(ok(&run_go(&pod, go, &read, &["ls", "/data/dir"])), "a.txt\nb.txt\nsub\n");
    // Missing in the pod: ENOENT, even though the local machine may have the path.
    expect_status(&run_go(&pod, go, &read, &["cat", "/data/missing"]), 2);
    // The pod's /data/escape names an absolute host path. Create it on the host, so that a
    // link followed on the host would read it: resolved inside the pod's root it is ENOENT.
    let escape = pod.escape_target();
    std::fs::write(&escape, "host-only secret\n").unwrap();
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _remove = Remove(escape.clone());
    assert_eq!(
        ok(&kmirror(pod.target_pid, &["--fs-mode", "local"], &[go, "cat", escape.to_str().unwrap()])),
        "host-only secret\n"
    );
    expect_status(&run_go(&pod, go, &read, &["stat", "/data/escape"]), 0);
    let escaped = run_go(&pod, go, &read, &["cat", "/data/escape"]);
    assert!(
        !String::from_utf8_lossy(&escaped.stdout).contains("host-only"),
        "the pod's link reached a host file"
    );
    expect_status(&escaped, 2);
    // Local-only paths stay local in read mode: the binary itself and /proc.
    ok(&run_go(&pod, go, &read, &["stat", go]));
    // `..` out of a pod directory into a local-only one: resolved by kmirror, served locally
    // (the local kernel would fail: /data does not exist on this machine). The pod's /usr is
    // the host's, so the pod gets a file of its own over /usr/lib/os-release (in its mount
    // namespace only): the answer then tells which side served it.
    let local = std::fs::read_to_string("/usr/lib/os-release").unwrap();
    std::fs::write(pod.rootfs.join("data/os-release-pod"), "POD_OS_RELEASE=1\n").unwrap();
    let mounted = pod.exec_in_pod("mount", &["--bind", "/data/os-release-pod", "/usr/lib/os-release"]);
    assert!(mounted.status.success(), "{}", String::from_utf8_lossy(&mounted.stderr));
    assert_eq!(ok(&pod.exec_in_pod("cat", &["/usr/lib/os-release"])), "POD_OS_RELEASE=1\n");
    assert_ne!(local, "POD_OS_RELEASE=1\n");
    assert_eq!(ok(&run_go(&pod, go, &read, &["cat", "/data/../usr/lib/os-release"])), local);
    assert!(ok(&run_go(&pod, go, &read, &["stat", "/data/dir/../../usr"])).ends_with("type=dir\n"));
}

#[test]
fn local_mode_turns_file_access_off() {
    let pod = LocalPod::start(16);
    let go = &go_fixtures()[0];
    let out = ok(&run_go(&pod, go.to_str().unwrap(), &["--fs-mode", "local"], &["cat", "/etc/hostname"]));
    assert_eq!(out, std::fs::read_to_string("/etc/hostname").unwrap());
}

/// A dual-stack AF_INET6 socket (as Java and Python use them) connecting to a v4-mapped pod
/// address sees the mapped original destination in getpeername, with the kernel's
/// value-result semantics for a short buffer.
#[test]
fn dual_stack_socket_sees_the_original_peer() {
    let pod = LocalPod::start(17);
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\n\
         s.connect(('::ffff:{ip}', 7777))\n\
         print('peer=%s:%d' % s.getpeername()[:2])\n\
         s.sendall(b'v6\\n')\n\
         print('echo=' + s.makefile().readline().strip())\n\
         u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
         u.connect(('::ffff:{ip}', 7778))\n\
         u.send(b'd')\n\
         print('udp=' + u.recv(100).decode())\n\
         print('udppeer=%s:%d' % u.getpeername()[:2])\n\
         u.send(b'e')\n\
         print('udpfrom=%s:%d' % u.recvfrom(100)[1][:2])\n",
        ip = pod.service_ip
    );
    let out = python_under_kmirror(&pod, &script);
    assert_eq!(field(&out, "peer"), Some(format!("::ffff:{}:7777", pod.service_ip).as_str()), "{out}");
    assert_eq!(field(&out, "echo"), Some(format!("pod-echo {}: v6", pod.index).as_str()));
    assert_eq!(field(&out, "udp"), Some(format!("pod-udp {}: d", pod.index).as_str()));
    assert_eq!(field(&out, "udppeer"), Some(format!("::ffff:{}:7778", pod.service_ip).as_str()));
    assert_eq!(field(&out, "udpfrom"), Some(format!("::ffff:{}:7778", pod.service_ip).as_str()));
}

/// Errors are the pod's: an address the pod cannot route gives EHOSTUNREACH (the host, which
/// prohibits that range, would have said EACCES), and access(2) answers for the pod's file.
#[test]
fn errors_and_access_checks_come_from_the_pod() {
    let pod = LocalPod::start(18);
    // The pod's scratch range: its host routes go with the pod, even after a crash.
    let range = pod.scratch_range.clone();
    let ip = |args: &[&str]| {
        let status = std::process::Command::new("ip").args(args).status().unwrap();
        assert!(status.success(), "ip {args:?}");
    };
    ip(&["route", "replace", "prohibit", &range]);
    ip(&["-n", &pod.netns, "route", "add", "unreachable", &range]);
    let target = format!("10.212.{}.5:80", pod.index);
    let go = &go_fixtures()[0];
    let bare = std::process::Command::new(go).args(["connect", &target]).output().unwrap();
    let bare_out = String::from_utf8_lossy(&bare.stdout).into_owned();
    let out = run_go(&pod, go.to_str().unwrap(), &[], &["connect", &target]);
    let stdout = expect_status(&out, 1);
    assert_eq!(field(&stdout, "errno"), Some("EHOSTUNREACH"), "{stdout}");
    assert_eq!(field(&bare_out, "errno"), Some("OTHER"), "locally the range is prohibited: {bare_out}");

    let check = "import os,sys\nfor p in sys.argv[1:]: print(p, os.access(p, os.R_OK), os.path.exists(p))";
    let out = ok(&kmirror(
        pod.target_pid,
        &["--fs-mode", "read"],
        &["python3", "-c", check, "/data/pod-only.txt", "/data/missing", "/data/dir"],
    ));
    assert_eq!(out, "/data/pod-only.txt True True\n/data/missing False False\n/data/dir True True\n");
}

/// Unconnected UDP: `sendto` with a pod destination goes through the pod (replies come back,
/// and `recvfrom` names the pod address as their sender, on non-blocking and blocking sockets),
/// for IPv4 and dual-stack sockets, while a local destination stays local.
#[test]
fn unconnected_udp_sendto_reaches_the_pod() {
    let pod = LocalPod::start(19);
    let local_port = local_udp_echo();
    let script = format!(
        "import socket, struct\n\
         u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)\n\
         show = lambda key, got: print('%s=%s from %s:%d' % (key, got[0].decode(), got[1][0], got[1][1]))\n\
         for m in (b'a', b'b'):\n\
         \x20   u.sendto(m, ('{ip}', 7778)); show('reply', u.recvfrom(100))\n\
         u.sendto(b'l', ('127.0.0.1', {local_port})); show('local', u.recvfrom(100))\n\
         v = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); v.settimeout(5)\n\
         v.sendto(b'c', ('::ffff:{ip}', 7778)); show('reply6', v.recvfrom(100))\n\
         w = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         w.sendto(b'd', ('{ip}', 7778)); show('blocking', w.recvfrom(100))\n\
         w.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack('ll', 0, 200000))\n\
         try:\n\
         \x20   w.recvfrom(100); print('quiet=data')\n\
         except BlockingIOError:\n\
         \x20   print('quiet=timed out')\n",
        ip = pod.service_ip
    );
    let out = python_under_kmirror(&pod, &script);
    let n = pod.index;
    assert_eq!(
        out,
        format!(
            "reply=pod-udp {n}: a from {ip}:7778\nreply=pod-udp {n}: b from {ip}:7778\n\
             local=local:l from 127.0.0.1:{local_port}\nreply6=pod-udp {n}: c from ::ffff:{ip}:7778\n\
             blocking=pod-udp {n}: d from {ip}:7778\nquiet=timed out\n",
            ip = pod.service_ip
        )
    );
}

/// Emulated blocking receives wait as tasks, not threads: 600 app threads block at once in
/// `recvfrom` on relayed sockets (more than a thread pool's 512), and each one is answered,
/// last to block first.
#[test]
fn hundreds_of_blocked_receives_are_all_answered() {
    let pod = LocalPod::start(29);
    let script = format!(
        "import socket, threading, queue, time\n\
         n = 600; got = queue.Queue(); blocked = threading.Barrier(n + 1)\n\
         socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]\n\
         for s in socks: s.sendto(b'x', ('{ip}', 7778))\n\
         def wait(i):\n\
         \x20   socks[i].recvfrom(100)\n\
         \x20   blocked.wait()\n\
         \x20   got.put((i, socks[i].recvfrom(100)[0]))\n\
         for i in range(n): threading.Thread(target=wait, args=(i,), daemon=True).start()\n\
         blocked.wait(); time.sleep(1)\n\
         poke = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         answered = 0\n\
         for i in reversed(range(n)):\n\
         \x20   poke.sendto(b'%d' % i, ('127.0.0.1', socks[i].getsockname()[1]))\n\
         \x20   j, data = got.get(timeout=10)\n\
         \x20   answered += j == i and data == b'%d' % i\n\
         print('answered=%d' % answered)\n",
        ip = pod.service_ip
    );
    let out = python_under_kmirror(&pod, &script);
    assert_eq!(out, "answered=600\n");
}

/// A local UDP echo server that prefixes replies with `local:`; its port.
fn local_udp_echo() -> u16 {
    let local = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = local.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 100];
        while let Ok((n, from)) = local.recv_from(&mut buf) {
            let _ = local.send_to(&[b"local:", &buf[..n]].concat(), from);
        }
    });
    port
}

/// `sendmsg` with control messages to a pod destination goes through the pod with them
/// applied (a UDP_SEGMENT send arrives as its segments), and a `sendmmsg` batch that mixes pod
/// and local destinations delivers every message to its own destination, in order.
#[test]
fn udp_control_messages_and_mixed_batches_reach_their_destinations() {
    let pod = LocalPod::start(20);
    let local_port = local_udp_echo();
    let script = format!(
        "import ctypes, socket, struct\n\
         u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)\n\
         replies = lambda k: ','.join(sorted(u.recvfrom(100)[0].decode() for _ in range(k)))\n\
         u.sendmsg([b't'], [(socket.IPPROTO_IP, socket.IP_TOS, struct.pack('i', 0x10))], 0, ('{ip}', 7778))\n\
         print('tos=' + replies(1))\n\
         u.sendmsg([b'xyz'], [(socket.SOL_UDP, 103, struct.pack('H', 1))], 0, ('{ip}', 7778))\n\
         print('gso=' + replies(3))\n\
         class Iov(ctypes.Structure): _fields_ = [('base', ctypes.c_char_p), ('len', ctypes.c_size_t)]\n\
         class Hdr(ctypes.Structure): _fields_ = [('name', ctypes.c_char_p), ('namelen', ctypes.c_uint32),\n\
         \x20   ('iov', ctypes.POINTER(Iov)), ('iovlen', ctypes.c_size_t), ('control', ctypes.c_void_p),\n\
         \x20   ('controllen', ctypes.c_size_t), ('flags', ctypes.c_int)]\n\
         class Msg(ctypes.Structure): _fields_ = [('hdr', Hdr), ('sent', ctypes.c_uint)]\n\
         addr = lambda h, p: struct.pack('=H', socket.AF_INET) + struct.pack('!H', p) + socket.inet_aton(h) + bytes(8)\n\
         batch = [(b'm1', addr('{ip}', 7778)), (b'l1', addr('127.0.0.1', {local_port})), (b'm2', addr('{ip}', 7778))]\n\
         iovs = [Iov(data, len(data)) for data, _ in batch]\n\
         msgs = (Msg * 3)(*[Msg(Hdr(name, len(name), ctypes.pointer(iov), 1)) for (_, name), iov in zip(batch, iovs)])\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         sent = libc.sendmmsg(u.fileno(), msgs, 3, 0)\n\
         print('batch=%d errno=%d lens=%s' % (sent, ctypes.get_errno(), [m.sent for m in msgs]))\n\
         print('replies=' + replies(3))\n",
        ip = pod.service_ip
    );
    let out = python_under_kmirror(&pod, &script);
    let n = pod.index;
    assert_eq!(
        out,
        format!(
            "tos=pod-udp {n}: t\ngso=pod-udp {n}: x,pod-udp {n}: y,pod-udp {n}: z\n\
             batch=3 errno=0 lens=[2, 2, 2]\nreplies=local:l1,pod-udp {n}: m1,pod-udp {n}: m2\n"
        )
    );
}

/// TCP Fast Open (`sendto` or `sendmsg` with MSG_FASTOPEN) to a pod address connects through
/// the pod like `connect` + `send`: a blocking socket's data is sent at once, a non-blocking one answers
/// EINPROGRESS as fast open without a cookie does and sends once writable.
#[test]
fn tcp_fast_open_sends_reach_the_pod() {
    let pod = LocalPod::start(26);
    let script = format!(
        "import select, socket\n\
         b = socket.socket()\n\
         print('sent=%d' % b.sendto(b'tfo\\n', socket.MSG_FASTOPEN, ('{ip}', 7777)))\n\
         print('reply=' + b.makefile().readline().strip())\n\
         print('peer=%s:%d' % b.getpeername())\n\
         n = socket.socket(); n.setblocking(False)\n\
         try:\n\
         \x20   n.sendto(b'x\\n', socket.MSG_FASTOPEN, ('{ip}', 7777)); print('nonblocking=sent')\n\
         except BlockingIOError as e:\n\
         \x20   print('nonblocking=%s' % e.errno)\n\
         select.select([], [n], [], 5); n.setblocking(True); n.settimeout(5)\n\
         n.send(b'later\\n'); print('reply=' + n.makefile().readline().strip())\n\
         m = socket.socket()\n\
         print('sendmsg=%d' % m.sendmsg([b'via', b'msg\\n'], [], socket.MSG_FASTOPEN, ('{ip}', 7777)))\n\
         print('reply=' + m.makefile().readline().strip())\n",
        ip = pod.service_ip
    );
    let out = python_under_kmirror(&pod, &script);
    let n = pod.index;
    assert_eq!(
        out,
        format!(
            "sent=4\nreply=pod-echo {n}: tfo\npeer={ip}:7777\nnonblocking={einprogress}\nreply=pod-echo {n}: later\n\
             sendmsg=7\nreply=pod-echo {n}: viamsg\n",
            ip = pod.service_ip,
            einprogress = libc::EINPROGRESS
        )
    );
}

/// A redirected socket's own address (`getsockname`) is the one its connection has in the pod,
/// as the same script run inside the pod shows: for TCP, for a connected UDP socket (the usual
/// "which address do I go out from" lookup) and for a dual-stack socket.
#[test]
fn getsockname_shows_the_pod_side_address() {
    let pod = LocalPod::start(27);
    let script = format!(
        "import socket\n\
         t = socket.create_connection(('{ip}', 7777), timeout=5)\n\
         print('tcp=' + t.getsockname()[0])\n\
         u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.connect(('{ip}', 7778))\n\
         print('udp=' + u.getsockname()[0])\n\
         d = socket.socket(socket.AF_INET6, socket.SOCK_STREAM); d.settimeout(5)\n\
         d.connect(('::ffff:{ip}', 7777))\n\
         print('dual=' + d.getsockname()[0])\n\
         l = socket.socket(); l.bind(('127.0.0.1', 0))\n\
         print('local=' + l.getsockname()[0])\n",
        ip = pod.service_ip
    );
    let in_pod = pod.exec_in_pod("python3", &["-c", &script]);
    assert!(in_pod.status.success(), "{}", String::from_utf8_lossy(&in_pod.stderr));
    let expected = String::from_utf8_lossy(&in_pod.stdout).into_owned();
    assert!(expected.contains("tcp=10."), "{expected}");
    let out = python_under_kmirror(&pod, &script);
    assert_eq!(out, expected);
}

/// The host name is the pod's: `gethostname` and `uname` (glibc asks the kernel with `uname`)
/// and `/proc/sys/kernel/hostname` (Go's `os.Hostname` reads it) answer as inside the pod,
/// while the rest of `uname` (the shared kernel) is unchanged.
#[test]
fn the_host_name_is_the_pods() {
    let pod = LocalPod::start(28);
    let script = "import os, socket\n\
                  print('gethostname=' + socket.gethostname())\n\
                  u = os.uname(); print('uname=%s %s %s %s' % (u.sysname, u.nodename, u.release, u.machine))\n\
                  print('proc=' + open('/proc/sys/kernel/hostname').read().strip())\n";
    let in_pod = pod.exec_in_pod("python3", &["-c", script]);
    assert!(in_pod.status.success(), "{}", String::from_utf8_lossy(&in_pod.stderr));
    let expected = String::from_utf8_lossy(&in_pod.stdout).into_owned();
    assert!(expected.contains(&format!("gethostname={}\n", pod.pod_hostname())), "{expected}");
    let out = python_under_kmirror(&pod, script);
    assert_eq!(out, expected);
    let go = go_fixtures()[0].to_str().unwrap().to_string();
    let go_out = ok(&kmirror(pod.target_pid, &[], &[&go, "cat", "/proc/sys/kernel/hostname"]));
    assert_eq!(go_out.trim(), pod.pod_hostname());
}
