//! The root agent against a hostile pod (issue 18, items 2, 3, 7 and 9): pod paths that lead
//! to kernel files, FIFOs and devices are not opened; a file replaced while it is read comes
//! whole; huge directories and request floods are served within stated bounds; the session
//! token is not left in the agent's environment.

use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{agent_of, kmirror, kmirror_cmd, output_within};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string()
}

/// Replaces the pod's `/etc/hostname` with a symlink to `target` (a path inside the pod).
fn point_hostname_at(pod: &LocalPod, target: &str) {
    let path = pod.rootfs.join("etc/hostname");
    std::fs::remove_file(&path).unwrap();
    symlink(target, &path).unwrap();
}

fn mkfifo(path: &Path) {
    let mode = nix::sys::stat::Mode::from_bits_retain(0o644);
    nix::unistd::mkfifo(path, mode).unwrap_or_else(|e| panic!("mkfifo {}: {e}", path.display()));
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A host name from a kernel file, FIFO or device is not read: kmirror starts at once and
/// the app sees the local host name. `/proc/kmsg` is never read (the host's kernel log keeps
/// its unread messages), and the app gets ENXIO for such files under `--fs-mode read`.
#[test]
fn hostname_and_pod_files_pointing_at_kernel_files_are_not_read() {
    let pod = LocalPod::start(150);
    // Make sure the kernel log has unread bytes that a read of /proc/kmsg would consume.
    std::fs::write("/dev/kmsg", "kmirror security_agent test: unread marker\n").unwrap();
    let unread = kmirror_suite::sys::kernel_log_unread();
    assert!(unread > 0, "the kernel log has nothing unread ({unread})");
    point_hostname_at(&pod, "/proc/kmsg");
    symlink("/proc/kmsg", pod.rootfs.join("data/kmsg")).unwrap();
    symlink("/proc/self/status", pod.rootfs.join("data/status")).unwrap();

    let started = Instant::now();
    let out = kmirror(pod.target_pid, &[], &["uname", "-n"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), local_hostname());
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());

    for file in ["/data/kmsg", "/data/status"] {
        let out = kmirror(pod.target_pid, &["--fs-mode", "read"], &["cat", file]);
        assert!(!out.status.success(), "cat {file} succeeded: {:?}", String::from_utf8_lossy(&out.stdout));
        assert!(out.stdout.is_empty(), "cat {file} printed something");
        assert!(stderr_of(&out).contains("No such device or address"), "{file}: {}", stderr_of(&out));
    }
    let after = kmirror_suite::sys::kernel_log_unread();
    assert!(after >= unread, "the host's kernel log was read: {unread} unread bytes before, {after} after");
}

/// A FIFO as the host name: nothing waits for it, and the agent does not even open it (a
/// writer blocked on it in the pod stays blocked; opening the FIFO would release it).
#[test]
fn a_fifo_hostname_is_neither_waited_for_nor_opened() {
    let pod = LocalPod::start(151);
    mkfifo(&pod.rootfs.join("etc/hostname-fifo"));
    point_hostname_at(&pod, "/etc/hostname-fifo");
    symlink("/etc/hostname-fifo", pod.rootfs.join("data/fifo")).unwrap();
    let mut writer = pod.command_in_pod("/bin/sh", &["-c", ": > /etc/hostname-fifo"]).spawn().unwrap();
    let wchan = format!("/proc/{}/wchan", writer.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&wchan).unwrap_or_default() != "wait_for_partner" {
        assert!(Instant::now() < deadline, "the pod's writer never blocked on the FIFO");
        std::thread::sleep(Duration::from_millis(5));
    }

    let out = kmirror(pod.target_pid, &[], &["uname", "-n"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), local_hostname());
    let out = kmirror(pod.target_pid, &["--fs-mode", "read"], &["cat", "/data/fifo"]);
    assert!(stderr_of(&out).contains("No such device or address"), "{}", stderr_of(&out));

    assert!(writer.try_wait().unwrap().is_none(), "the FIFO was opened: its writer was released");
    assert_eq!(std::fs::read_to_string(&wchan).unwrap(), "wait_for_partner");
    writer.kill().unwrap();
    writer.wait().unwrap();
}

/// A device node as the host name or a pod file: refused, nothing is read from it.
#[test]
fn a_device_hostname_falls_back_and_devices_give_enxio() {
    let pod = LocalPod::start(152);
    point_hostname_at(&pod, "/dev/zero");
    symlink("/dev/zero", pod.rootfs.join("data/zero")).unwrap();
    let out = kmirror(pod.target_pid, &[], &["uname", "-n"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), local_hostname());
    let out = kmirror(pod.target_pid, &["--fs-mode", "read"], &["head", "-c", "4", "/data/zero"]);
    assert!(out.stdout.is_empty());
    assert!(stderr_of(&out).contains("No such device or address"), "{}", stderr_of(&out));
    // A regular file beside it still reads (whole, from the answer that opened it).
    let out = kmirror(pod.target_pid, &["--fs-mode", "read"], &["cat", "/data/pod-only.txt"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "pod-only file 152\n", "{}", stderr_of(&out));
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 11) as u8).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A pod file replaced (renamed over) again and again while the app reads it: every read
/// gives one whole version, never chunks of both.
#[test]
fn a_file_replaced_while_it_is_read_comes_whole() {
    let pod = LocalPod::start(153);
    let data = pod.rootfs.join("data");
    // Seven 512 KiB chunks.
    let size = 3 * 1024 * 1024 + 1;
    let versions = [pattern(size, 1), pattern(size, 2)];
    for (i, v) in versions.iter().enumerate() {
        std::fs::write(data.join(format!("version-{i}")), v).unwrap();
    }
    std::fs::hard_link(data.join("version-0"), data.join("big")).unwrap();
    let expected = [sha256_hex(&versions[0]), sha256_hex(&versions[1])];

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let swapper = {
        let (stop, swaps, data) = (stop.clone(), swaps.clone(), data.clone());
        std::thread::spawn(move || {
            let mut i = 1;
            while !stop.load(Ordering::Relaxed) {
                let tmp = data.join("big.tmp");
                let _ = std::fs::remove_file(&tmp);
                std::fs::hard_link(data.join(format!("version-{i}")), &tmp).unwrap();
                std::fs::rename(&tmp, data.join("big")).unwrap();
                swaps.fetch_add(1, Ordering::Relaxed);
                i = 1 - i;
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let reads = 40;
    let script = format!("for i in $(seq {reads}); do sha256sum /data/big; done");
    let out = output_within(
        kmirror_cmd(pod.target_pid, &["--fs-mode", "read"], &["sh", "-c", &script]),
        Duration::from_secs(120),
    );
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    assert!(out.status.success(), "{}", stderr_of(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let hashes: Vec<&str> = stdout.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(hashes.len(), reads, "{stdout}");
    let torn = hashes.iter().filter(|h| !expected.iter().any(|e| e == *h)).count();
    let swaps = swaps.load(Ordering::Relaxed);
    assert_eq!(torn, 0, "{torn} of {reads} reads mixed two versions ({swaps} swaps meanwhile)");
    assert!(swaps > reads as u64, "the file was swapped only {swaps} times");
}

/// A directory far too large for one tunnel message lists completely, and soon (it used to
/// be dropped by the tunnel, and the app waited 30 s for ETIMEDOUT).
#[test]
fn a_directory_of_50k_entries_lists_completely() {
    let pod = LocalPod::start(154);
    let dir = pod.rootfs.join("data/many");
    std::fs::create_dir(&dir).unwrap();
    let count = 50_000;
    for i in 0..count {
        std::fs::File::create(dir.join(format!("entry-{i:06}"))).unwrap();
    }
    // The listing goes to a (local) file: it is larger than a pipe, which output_within reads
    // only at the end.
    let listing = std::env::temp_dir().join(format!("kmirror-security-agent-{}.txt", std::process::id()));
    let script = format!("ls -f /data/many > {}", listing.display());
    let started = Instant::now();
    let out = output_within(
        kmirror_cmd(pod.target_pid, &["--fs-mode", "read"], &["sh", "-c", &script]),
        Duration::from_secs(120),
    );
    let took = started.elapsed();
    let stdout = std::fs::read_to_string(&listing).unwrap_or_default();
    let _ = std::fs::remove_file(&listing);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let mut names: Vec<&str> = stdout.lines().filter(|n| *n != "." && *n != "..").collect();
    names.sort_unstable();
    let expected: Vec<String> = (0..count).map(|i| format!("entry-{i:06}")).collect();
    assert_eq!(names.len(), count);
    assert!(names.iter().zip(&expected).all(|(a, b)| a == b), "the listing differs");
    // Most of it is creating the 50k local placeholders (seconds on a loaded machine).
    assert!(took < Duration::from_secs(60), "listing took {took:?}");
}

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(field)?.trim().trim_end_matches(" kB").trim().parse().ok())
}

/// A Python app under kmirror, started and then driven over stdin/stdout.
fn python_app(pod: &LocalPod, flags: &[&str], script: &str) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut cmd = kmirror_cmd(pod.target_pid, flags, &["python3", "-c", script]);
    let mut child =
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    (child, out)
}

fn line(out: &mut BufReader<std::process::ChildStdout>) -> String {
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    line.trim().to_string()
}

/// The agent serves 200 threads of the app stat'ing pod files as fast as they can with its
/// threads and memory bounded: at most 32 requests run at once (48 blocking threads), the
/// rest wait as tasks or in the tunnel.
#[test]
fn a_request_flood_is_served_with_bounded_threads_and_memory() {
    let pod = LocalPod::start(155);
    let script = r#"
import os, sys, threading
print("start", flush=True)
sys.stdin.readline()
def work():
    for _ in range(150):
        os.stat("/data/pod-only.txt")
threads = [threading.Thread(target=work) for _ in range(200)]
for t in threads: t.start()
for t in threads: t.join()
print("done", flush=True)
"#;
    let (mut app, mut out) = python_app(&pod, &["--fs-mode", "read"], script);
    assert_eq!(line(&mut out), "start");
    let agent = agent_of(app.id());
    let (threads_before, rss_before) =
        (status_field(agent, "Threads:").unwrap(), status_field(agent, "VmRSS:").unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut threads, mut rss, mut samples) = (0, 0, 0);
            while !stop.load(Ordering::Relaxed) {
                if let (Some(t), Some(r)) = (status_field(agent, "Threads:"), status_field(agent, "VmRSS:")) {
                    (threads, rss, samples) = (threads.max(t), rss.max(r), samples + 1);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (threads, rss, samples)
        })
    };
    app.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
    assert_eq!(line(&mut out), "done");
    stop.store(true, Ordering::Relaxed);
    let (threads, rss_kib, samples) = sampler.join().unwrap();
    drop(app.stdin.take());
    assert!(app.wait().unwrap().success());
    eprintln!(
        "agent: {threads_before} threads and {rss_before} KiB before, at most {threads} threads and \
         {rss_kib} KiB during the flood ({samples} samples)"
    );
    assert!(samples > 10, "the flood ended before it could be observed");
    // 48 blocking threads, the runtime's own and the network namespace worker.
    assert!(threads <= 56, "the agent ran {threads} threads");
    assert!(rss_kib < 64 * 1024, "the agent's RSS reached {rss_kib} KiB");
}

/// The session token is not in the agent's environment while the session runs (it used to
/// stay in /proc/<agent>/environ after remove_var).
#[test]
fn the_session_token_is_not_in_the_agents_environment() {
    let pod = LocalPod::start(156);
    let script = "import sys\nprint('start', flush=True)\nsys.stdin.readline()\n";
    let (mut app, mut out) = python_app(&pod, &[], script);
    assert_eq!(line(&mut out), "start");
    let agent = agent_of(app.id());
    let environ = std::fs::read(format!("/proc/{agent}/environ")).unwrap();
    let leaked: Vec<String> = environ
        .split(|&b| b == 0)
        .filter(|entry| entry.starts_with(b"KMIRROR_SESSION_TOKEN="))
        .map(|entry| String::from_utf8_lossy(entry).into_owned())
        .collect();
    app.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
    assert!(app.wait().unwrap().success());
    assert!(leaked.is_empty(), "the agent's environment shows {leaked:?}");
}

/// A pod environment over the 1 MiB message limit is refused at once, with a way out.
#[test]
fn an_environment_too_large_for_the_tunnel_fails_fast_and_clearly() {
    let pod = LocalPod::start(157);
    // Ten 120 KiB variables (one may hold at most 128 KiB).
    let mut cmd = pod.command_in_pod("/bin/sleep", &["infinity"]);
    for i in 0..10 {
        cmd.env(format!("BIG_{i}"), "x".repeat(120 * 1024));
    }
    let mut big = cmd.stdin(Stdio::null()).spawn().unwrap();
    let comm = format!("/proc/{}/comm", big.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&comm).unwrap_or_default().trim() != "sleep" {
        assert!(Instant::now() < deadline, "the pod process never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let started = Instant::now();
    let out = kmirror(big.id(), &[], &["true"]);
    let took = started.elapsed();
    let without_env = kmirror(big.id(), &["--no-env"], &["true"]);
    big.kill().unwrap();
    big.wait().unwrap();
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("larger than one tunnel message"), "{}", stderr_of(&out));
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(without_env.status.success(), "{}", stderr_of(&without_env));
}
