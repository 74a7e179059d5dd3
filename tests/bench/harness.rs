//! kmirror-bench: what kmirror costs, measured against baselines taken in the same run.
//!
//! `cargo run --release -p kmirror-suite --bin kmirror-bench -- [--quick]` (or `make bench`)
//! builds `tests/bench/benchclient.c` into `target/bench/`, starts local pod 210, runs every
//! figure (see BENCHMARKS.md for the method), prints a table and writes
//! `target/bench/results.json`. Timings are reported, never asserted: the exit status is
//! non-zero when a measurement could not be run at all, and when a figure was skipped for a
//! missing tool that `--optional` does not name (CI proves the bench measures everything).

use kmirror_suite::pod::LocalPod;
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

/// Pod index of the bench (210..=220 are reserved for it; the tests use lower ones).
const POD_INDEX: u8 = 210;
/// In-pod servers (benchclient, bound to 0.0.0.0): echo, sink, and the mirror load's replier.
const ECHO_PORT: u16 = 9001;
const SINK_PORT: u16 = 9002;
const REPLY_PORT: u16 = 9003;
/// Local listener ports of the incoming-traffic sessions (`--port-map LOCAL:POD`).
const STEAL_LOCAL_PORT: u16 = 19210;
const MIRROR_LOCAL_PORT: u16 = 19211;
/// Longest any single measurement run may take before it counts as failed.
const RUN_LIMIT: Duration = Duration::from_secs(180);

/// The order of the figures in the table and the JSON.
const FIGURE_ORDER: [&str; 13] = [
    "notify_floor_us",
    "trapped_local_us",
    "untrapped_ratio",
    "ptrace_trapped_us",
    "preload_connect_us",
    "tunnel_throughput_ratio",
    "tunnel_rtt_overhead_us",
    "conn_setup_overhead_us",
    "startup_overhead_ms",
    "jvm_startup_ratio",
    "supervisor_rss_mb_1k_conns",
    "steal_rtt_overhead_us",
    "mirror_fidelity",
];

type Res<T> = Result<T, String>;

/// Iteration counts: `--quick` trades precision for a run well under two minutes.
struct Plan {
    quick: bool,
    repeats: usize,
    /// Repeats of the cheap local loops (notify floor, open, pipe), which are noisier
    /// relative to the effects they measure.
    micro_repeats: usize,
    notify_n: usize,
    open_n: usize,
    pipe_n: usize,
    pingpong_n: usize,
    connect_n: usize,
    bulk_bytes: usize,
    startup_runs: usize,
    jvm_runs: usize,
    hold_conns: usize,
    mirror_rate: usize,
    mirror_secs: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                repeats: 3,
                micro_repeats: 9,
                notify_n: 100_000,
                open_n: 20_000,
                pipe_n: 300_000,
                pingpong_n: 5_000,
                connect_n: 500,
                bulk_bytes: 256 << 20,
                startup_runs: 10,
                jvm_runs: 7,
                hold_conns: 1000,
                mirror_rate: 5000,
                mirror_secs: 2,
            }
        } else {
            Plan {
                quick,
                repeats: 5,
                micro_repeats: 15,
                notify_n: 300_000,
                open_n: 50_000,
                pipe_n: 500_000,
                pingpong_n: 20_000,
                connect_n: 1_000,
                bulk_bytes: 1 << 30,
                startup_runs: 20,
                jvm_runs: 11,
                hold_conns: 1000,
                mirror_rate: 5000,
                mirror_secs: 10,
            }
        }
    }
}

/// One reported figure, as it appears in the table and in results.json.
struct Figure {
    name: &'static str,
    value: Option<f64>,
    unit: &'static str,
    baseline: Vec<(String, f64)>,
    target: String,
    met: Option<bool>,
    /// One line for the table: the baseline numbers that matter most.
    summary: String,
    /// Why there is no value (skipped or failed), or a caveat.
    note: Option<String>,
    /// The missing tool a skipped figure needed (see `--optional`).
    skipped_for: Option<&'static str>,
}

/// A latency overhead: kmirror's p50 minus the in-pod client's, with every baseline (in-pod,
/// host over the veth, kmirror; p50 and p99) and the target on the p50.
fn latency_overhead(name: &'static str, s: &Series, target_p50_us: f64) -> Figure {
    let p50 = s.med("km_p50") - s.med("inpod_p50");
    Figure::new(name, p50, "us", &format!("p50 <= {target_p50_us} us"))
        .base("inpod_p50_us", s.med("inpod_p50"))
        .base("inpod_p99_us", s.med("inpod_p99"))
        .base("host_veth_p50_us", s.med("veth_p50"))
        .base("host_veth_p99_us", s.med("veth_p99"))
        .base("kmirror_p50_us", s.med("km_p50"))
        .base("kmirror_p99_us", s.med("km_p99"))
        .base("overhead_p99_us", s.med("km_p99") - s.med("inpod_p99"))
        .base("overhead_vs_veth_p50_us", s.med("km_p50") - s.med("veth_p50"))
        .met(p50 <= target_p50_us)
        .summary(format!(
            "p50/p99 us: in-pod {:.0}/{:.0}, veth {:.0}/{:.0}, kmirror {:.0}/{:.0}",
            s.med("inpod_p50"),
            s.med("inpod_p99"),
            s.med("veth_p50"),
            s.med("veth_p99"),
            s.med("km_p50"),
            s.med("km_p99")
        ))
}

/// Adds a latency figure's floor: the same measurement through a minimal chain of kmirror's
/// hops (`{kind}chain` in benchclient), as `{kind}_chain_p50_us` and its overhead over in-pod.
fn with_chain(figure: Figure, s: &Series, kind: &str) -> Figure {
    let chain_overhead = s.med("chain_p50") - s.med("inpod_p50");
    let summary = format!(
        "{}, minimal {kind} chain {:.0} (+{:.0})",
        figure.summary,
        s.med("chain_p50"),
        chain_overhead
    );
    figure
        .base(&format!("{kind}_chain_p50_us"), s.med("chain_p50"))
        .base(&format!("{kind}_chain_overhead_p50_us"), chain_overhead)
        .summary(summary)
}

impl Figure {
    fn new(name: &'static str, value: f64, unit: &'static str, target: &str) -> Figure {
        Figure {
            name,
            value: Some(value),
            unit,
            baseline: Vec::new(),
            target: target.to_string(),
            met: None,
            summary: String::new(),
            note: None,
            skipped_for: None,
        }
    }

    fn without_value(name: &'static str, note: String) -> Figure {
        Figure {
            name,
            value: None,
            unit: "",
            baseline: Vec::new(),
            target: String::new(),
            met: None,
            summary: String::new(),
            note: Some(note),
            skipped_for: None,
        }
    }

    /// A figure not measured because `tool` is missing: a failure unless `--optional` names it.
    fn skipped(name: &'static str, tool: &'static str, why: &str) -> Figure {
        Figure { skipped_for: Some(tool), ..Figure::without_value(name, format!("skipped: {why}")) }
    }

    fn base(mut self, key: &str, value: f64) -> Figure {
        self.baseline.push((key.to_string(), value));
        self
    }

    fn met(mut self, met: bool) -> Figure {
        self.met = Some(met);
        self
    }

    fn summary(mut self, text: String) -> Figure {
        self.summary = text;
        self
    }
}

/// `key=value` lines of a benchclient run, numbers only.
struct Kv(BTreeMap<String, f64>);

impl Kv {
    fn parse(text: &str) -> Kv {
        Kv(text
            .lines()
            .filter_map(|l| l.split_once('='))
            .filter_map(|(k, v)| v.trim().parse().ok().map(|v| (k.trim().to_string(), v)))
            .collect())
    }

    fn get(&self, key: &str) -> Res<f64> {
        self.0.get(key).copied().ok_or_else(|| format!("no `{key}` in the output ({:?})", self.0))
    }

    /// A nanosecond field in microseconds.
    fn us(&self, key: &str) -> Res<f64> {
        Ok(self.get(key)? / 1000.0)
    }
}

/// Repeated samples of named quantities; figures are their medians.
#[derive(Default)]
struct Series(BTreeMap<String, Vec<f64>>);

impl Series {
    fn add(&mut self, key: &str, value: f64) {
        self.0.entry(key.to_string()).or_default().push(value);
    }

    fn med(&self, key: &str) -> f64 {
        self.0.get(key).map_or(f64::NAN, |v| median(v))
    }

    fn max(&self, key: &str) -> f64 {
        self.0.get(key).and_then(|v| v.iter().copied().reduce(f64::max)).unwrap_or(f64::NAN)
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn progress(start: Instant, what: &str) {
    eprintln!("[{:6.1}s] {what}", start.elapsed().as_secs_f64());
}

/// Waits for `child` to exit, SIGKILLing it at `limit`. The exit is observed with
/// `WNOWAIT` first, so the watchdog can only ever signal our own unreaped child.
fn wait_with_deadline(child: &mut Child, limit: Duration) -> Res<ExitStatus> {
    let pid = child.id();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let watchdog = thread::spawn(move || {
        if let Err(RecvTimeoutError::Timeout) = done_rx.recv_timeout(limit) {
            // `pid` is our child and not yet reaped (the main thread reaps it only after this
            // thread was joined), so it cannot name another process.
            let _ = kmirror_suite::run::signal(pid, libc::SIGKILL);
            return true;
        }
        false
    });
    // WNOWAIT leaves the child reapable by `child.wait()` below.
    let flags = nix::sys::wait::WaitPidFlag::WEXITED | nix::sys::wait::WaitPidFlag::WNOWAIT;
    let id = || nix::sys::wait::Id::Pid(nix::unistd::Pid::from_raw(pid as libc::pid_t));
    while nix::sys::wait::waitid(id(), flags) == Err(nix::errno::Errno::EINTR) {}
    let _ = done_tx.send(());
    let killed = watchdog.join().unwrap_or(false);
    let status = child.wait().map_err(|e| format!("wait: {e}"))?;
    if killed {
        return Err(format!("killed after {limit:?} without finishing"));
    }
    Ok(status)
}

/// Runs `cmd` to completion (stdin empty) and returns its stdout; a non-zero exit is an error.
fn run_out(mut cmd: Command, what: &str) -> Res<String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: cannot start {cmd:?}: {e}"))?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let status = wait_with_deadline(&mut child, RUN_LIMIT).map_err(|e| format!("{what}: {e}"))?;
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    if !status.success() {
        return Err(format!("{what}: exited with {status}: {}", tail(&err)));
    }
    Ok(out)
}

fn drain<R: Read + Send + 'static>(from: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut from) = from {
            let _ = from.read_to_string(&mut text);
        }
        text
    })
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(6)..].join(" | ")
}

/// Runs `cmd` and returns its wall time in milliseconds (output discarded).
fn time_ms(mut cmd: Command, what: &str) -> Res<(f64, ExitStatus)> {
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("{what}: cannot start {cmd:?}: {e}"))?;
    let status = wait_with_deadline(&mut child, RUN_LIMIT).map_err(|e| format!("{what}: {e}"))?;
    Ok((start.elapsed().as_secs_f64() * 1000.0, status))
}

/// A background process (a server, or kmirror with a long-running app) whose output lines are
/// collected; dropping it stops it (SIGTERM, then SIGKILL).
struct Bg {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<Vec<String>>>,
    err: Arc<Mutex<Vec<String>>>,
}

fn collect_lines<R: Read + Send + 'static>(from: Option<R>) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    thread::spawn(move || {
        let Some(from) = from else { return };
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            lock(&sink).push(line);
        }
    });
    lines
}

impl Bg {
    fn start(mut cmd: Command, name: &str, piped_stdin: bool) -> Res<Bg> {
        cmd.stdin(if piped_stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("cannot start {name} ({cmd:?}): {e}"))?;
        let out = collect_lines(child.stdout.take());
        let err = collect_lines(child.stderr.take());
        let stdin = child.stdin.take();
        Ok(Bg { name: name.to_string(), child, stdin, out, err })
    }

    fn out(&self) -> MutexGuard<'_, Vec<String>> {
        lock(&self.out)
    }

    fn err_text(&self) -> String {
        lock(&self.err).join("\n")
    }

    /// Waits until `pred` holds for the stdout lines, failing early if the process exits.
    fn wait_out(&mut self, what: &str, limit: Duration, pred: impl Fn(&[String]) -> bool) -> Res<()> {
        let deadline = Instant::now() + limit;
        loop {
            if pred(&self.out()) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                thread::sleep(Duration::from_millis(50));
                return Err(format!(
                    "{} exited ({status}) before {what}: {}",
                    self.name,
                    tail(&self.err_text())
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("{}: no {what} within {limit:?}: {}", self.name, tail(&self.err_text())));
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn wait_err(&mut self, needle: &str, limit: Duration) -> Res<()> {
        let deadline = Instant::now() + limit;
        loop {
            if lock(&self.err).iter().any(|l| l.contains(needle)) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("{} exited ({status}) before logging {needle:?}", self.name));
            }
            if Instant::now() > deadline {
                return Err(format!("{}: never logged {needle:?}: {}", self.name, tail(&self.err_text())));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes stdin (the app's cue to exit) and waits for the exit.
    fn finish(&mut self, limit: Duration) -> Res<ExitStatus> {
        drop(self.stdin.take());
        wait_with_deadline(&mut self.child, limit)
    }

    fn stop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        // Our own unreaped child: its pid cannot have been reused.
        let _ = kmirror_suite::run::signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        self.stop();
    }
}

/// VmRSS of a process, in MiB.
fn rss_mb(pid: u32) -> Res<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no VmRSS for pid {pid}"))?;
    Ok(kb / 1024.0)
}

/// The kmirror-agent child of kmirror process `pid`, if any.
fn agent_of(pid: u32) -> Option<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()).collect::<Vec<_>>())
        .find(|c| {
            std::fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|n| n.trim() == "kmirror-agent")
        })
}

/// Host conditions that explain noise: load averages and the CPU time stolen by the hypervisor.
struct HostLoad {
    loadavg: String,
    /// (total jiffies, steal jiffies) from /proc/stat.
    cpu: (u64, u64),
}

impl HostLoad {
    fn now() -> HostLoad {
        let loadavg = std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        let total = fields.iter().take(8).sum();
        HostLoad { loadavg, cpu: (total, fields.get(7).copied().unwrap_or(0)) }
    }

    /// Percentage of CPU time stolen between `self` and `later`.
    fn steal_pct(&self, later: &HostLoad) -> f64 {
        let total = later.cpu.0.saturating_sub(self.cpu.0);
        let steal = later.cpu.1.saturating_sub(self.cpu.1);
        if total == 0 { 0.0 } else { steal as f64 * 100.0 / total as f64 }
    }
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

// ---- a tiny SOCKS5 server for the LD_PRELOAD comparison ----

/// Serves SOCKS5 CONNECT on 127.0.0.1 (no authentication, one thread per connection). Every
/// destination is reached at `upstream_ip` with the requested port: the pod's veth address, the
/// one path from the host into the pod that needs no kmirror.
fn start_socks(upstream_ip: Ipv4Addr) -> Res<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("SOCKS listener: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            thread::spawn(move || {
                let _ = socks_session(conn, upstream_ip);
            });
        }
    });
    Ok(port)
}

fn socks_session(mut client: TcpStream, upstream_ip: Ipv4Addr) -> io::Result<()> {
    client.set_nodelay(true)?;
    let mut greeting = [0u8; 2];
    client.read_exact(&mut greeting)?;
    let mut methods = vec![0u8; usize::from(greeting[1])];
    client.read_exact(&mut methods)?;
    if greeting[0] != 5 || !methods.contains(&0) {
        return client.write_all(&[5, 0xff]);
    }
    client.write_all(&[5, 0])?;
    let mut request = [0u8; 4];
    client.read_exact(&mut request)?;
    let address_len = match request[3] {
        1 => 4,
        4 => 16,
        3 => {
            let mut len = [0u8; 1];
            client.read_exact(&mut len)?;
            usize::from(len[0])
        }
        _ => return client.write_all(&[5, 8, 0, 1, 0, 0, 0, 0, 0, 0]),
    };
    let mut address_and_port = vec![0u8; address_len + 2];
    client.read_exact(&mut address_and_port)?;
    if request[1] != 1 {
        return client.write_all(&[5, 7, 0, 1, 0, 0, 0, 0, 0, 0]);
    }
    let port = u16::from_be_bytes([address_and_port[address_len], address_and_port[address_len + 1]]);
    let upstream = match TcpStream::connect((upstream_ip, port)) {
        Ok(s) => s,
        Err(_) => return client.write_all(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]),
    };
    upstream.set_nodelay(true)?;
    client.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0])?;
    relay(&client, &upstream);
    Ok(())
}

/// Copies both directions with poll(2) on one thread until both sides are closed.
fn relay(a: &TcpStream, b: &TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut open = [true, true];
    let ends = [a, b];
    while open[0] || open[1] {
        use nix::poll::{PollFd, PollFlags, PollTimeout};
        let mut fds = [0, 1].map(|i| {
            PollFd::new(ends[i].as_fd(), if open[i] { PollFlags::POLLIN } else { PollFlags::empty() })
        });
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
            Ok(_) => {}
        }
        let ready = fds.map(|fd| fd.revents().is_none_or(|r| !r.is_empty()));
        for i in 0..2 {
            if !ready[i] || !open[i] {
                continue;
            }
            let (mut from, mut to) = (ends[i], ends[1 - i]);
            match from.read(&mut buf) {
                Ok(0) | Err(_) => {
                    open[i] = false;
                    let _ = to.shutdown(Shutdown::Write);
                }
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

// ---- the bench ----

struct Bench {
    plan: Plan,
    start: Instant,
    root: PathBuf,
    kmirror: PathBuf,
    client: PathBuf,
    open_file: PathBuf,
    /// In-pod servers; declared before `pod` so they stop before it is torn down.
    servers: Vec<Bg>,
    pod: LocalPod,
    floor_us: Option<f64>,
}

impl Bench {
    fn setup(plan: Plan, start: Instant) -> Res<Bench> {
        let root = kmirror_suite::run::root();
        let bin_dir = std::env::var_os("KMIRROR_BIN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/release"));
        let kmirror = bin_dir.join("kmirror");
        for bin in [kmirror.clone(), bin_dir.join("kmirror-agent")] {
            if !bin.is_file() {
                return Err(format!(
                    "{} is missing: run `make bench`, or `cargo build --release --workspace` first",
                    bin.display()
                ));
            }
        }
        let bench_dir = root.join("target/bench");
        std::fs::create_dir_all(&bench_dir).map_err(|e| format!("{}: {e}", bench_dir.display()))?;
        let client = bench_dir.join("benchclient");
        let source = root.join("tests/bench/benchclient.c");
        progress(start, "compiling tests/bench/benchclient.c");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
        let mut compile = Command::new(&cc);
        compile.args(["-O2", "-Wall", "-pthread", "-o"]).arg(&client).arg(&source);
        run_out(compile, "compiling benchclient")?;
        let open_file = bench_dir.join("open-target.txt");
        std::fs::write(&open_file, "a local file\n").map_err(|e| format!("{}: {e}", open_file.display()))?;

        progress(start, &format!("starting local pod {POD_INDEX}"));
        let pod = std::panic::catch_unwind(|| LocalPod::start(POD_INDEX))
            .map_err(|p| format!("cannot start local pod {POD_INDEX}: {}", panic_text(&p)))?;
        let mut bench =
            Bench { plan, start, root, kmirror, client, open_file, servers: Vec::new(), pod, floor_us: None };
        for (mode, port) in
            [("serve-echo", ECHO_PORT), ("serve-sink", SINK_PORT), ("serve-reply", REPLY_PORT)]
        {
            let port = port.to_string();
            let cmd = bench.in_pod(&[mode, &port]);
            let mut server = Bg::start(cmd, &format!("in-pod {mode}"), false)?;
            server.wait_out("`listening`", Duration::from_secs(10), |l| {
                l.iter().any(|l| l.starts_with("listening"))
            })?;
            bench.servers.push(server);
        }
        Ok(bench)
    }

    fn client_str(&self) -> &str {
        self.client.to_str().unwrap_or("benchclient")
    }

    fn bare(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.client);
        cmd.args(args);
        cmd
    }

    fn in_pod(&self, args: &[&str]) -> Command {
        self.pod.command_in_pod(self.client_str(), args)
    }

    /// `kmirror run --target pid/<pod> FLAGS -- PROGRAM ARGS`.
    fn kmirror(&self, flags: &[&str], program: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.kmirror);
        cmd.arg("run")
            .arg("--target")
            .arg(format!("pid/{}", self.pod.target_pid))
            .args(flags)
            .arg("--")
            .arg(program)
            .args(args);
        cmd
    }

    fn km_client(&self, args: &[&str]) -> Command {
        self.kmirror(&[], &self.client, args)
    }

    fn step(&self, what: &str) {
        progress(self.start, what);
    }

    fn service_ip(&self) -> String {
        self.pod.service_ip.to_string()
    }

    fn pod_ip(&self) -> String {
        self.pod.pod_ip.to_string()
    }

    // ---- seccomp and local syscalls ----

    fn notify_floor(&mut self) -> Res<Vec<Figure>> {
        self.step("notify_floor_us: raw user-notify round trip vs plain getppid");
        let n = self.plan.notify_n.to_string();
        let mut s = Series::default();
        for _ in 0..self.plan.micro_repeats {
            let kv = Kv::parse(&run_out(self.bare(&["notifyfloor", &n]), "notifyfloor")?);
            let (plain, trapped) = (kv.us("plain_p50_ns")?, kv.us("notify_p50_ns")?);
            s.add("plain_p50_us", plain);
            s.add("notify_p50_us", trapped);
            s.add("notify_p99_us", kv.us("notify_p99_ns")?);
            s.add("floor_p50_us", trapped - plain);
            s.add("floor_mean_us", kv.us("notify_mean_ns")? - kv.us("plain_mean_ns")?);
        }
        let floor = s.med("floor_p50_us");
        self.floor_us = Some(floor);
        Ok(vec![
            Figure::new("notify_floor_us", floor, "us", "reference for trapped_local_us (no target)")
                .base("plain_getppid_p50_us", s.med("plain_p50_us"))
                .base("trapped_getppid_p50_us", s.med("notify_p50_us"))
                .base("trapped_getppid_p99_us", s.med("notify_p99_us"))
                .base("floor_mean_us", s.med("floor_mean_us"))
                .summary(format!(
                    "getppid p50 {:.2} us plain, {:.2} us trapped (CONTINUE, SYNC_WAKE_UP)",
                    s.med("plain_p50_us"),
                    s.med("notify_p50_us")
                )),
        ])
    }

    fn open_loops(&mut self) -> Res<Vec<Figure>> {
        self.step("trapped_local_us / ptrace_trapped_us: openat of a local file");
        let n = self.plan.open_n.to_string();
        // ptrace stops are slow; the per-call p50 needs fewer calls.
        let strace_n = (self.plan.open_n / 4).to_string();
        let path = self.open_file.to_string_lossy().into_owned();
        let strace = which("strace");
        let mut s = Series::default();
        for round in 0..self.plan.micro_repeats {
            let bare = Kv::parse(&run_out(self.bare(&["openloop", &n, &path]), "openloop (bare)")?);
            let km = Kv::parse(&run_out(self.km_client(&["openloop", &n, &path]), "openloop (kmirror)")?);
            s.add("bare_p50", bare.us("p50_ns")?);
            s.add("bare_p99", bare.us("p99_ns")?);
            s.add("km_p50", km.us("p50_ns")?);
            s.add("km_p99", km.us("p99_ns")?);
            s.add("km_extra", km.us("p50_ns")? - bare.us("p50_ns")?);
            let read = Kv::parse(&run_out(self.bare(&["vmread", &n, &path]), "vmread")?);
            s.add("path_read", read.us("p50_ns")?);
            // The floor for this very call: a minimal supervisor answering CONTINUE to openat.
            let floor = Kv::parse(&run_out(self.bare(&["notifyfloor", &n, &path]), "notifyfloor openat")?);
            s.add("open_floor", floor.us("notify_p50_ns")? - floor.us("plain_p50_ns")?);
            if let Some(strace) = strace.as_ref().filter(|_| round < self.plan.repeats) {
                for (key, extra) in [("strace", &[][..]), ("strace_bpf", &["--seccomp-bpf"][..])] {
                    let mut cmd = Command::new(strace);
                    cmd.args(extra).args(["-f", "-e", "trace=openat", "-o", "/dev/null"]);
                    cmd.arg(&self.client).args(["openloop", &strace_n, &path]);
                    let kv = Kv::parse(&run_out(cmd, "openloop (strace)")?);
                    s.add(&format!("{key}_p50"), kv.us("p50_ns")?);
                    s.add(&format!("{key}_extra"), kv.us("p50_ns")? - bare.us("p50_ns")?);
                }
            }
        }
        let trapped = s.med("km_extra");
        let mut figures = Vec::new();
        let mut fig = Figure::new("trapped_local_us", trapped, "us", "<= 1.5 x notify_floor_us")
            .base("bare_open_p50_us", s.med("bare_p50"))
            .base("bare_open_p99_us", s.med("bare_p99"))
            .base("kmirror_open_p50_us", s.med("km_p50"))
            .base("kmirror_open_p99_us", s.med("km_p99"));
        if let Some(floor) = self.floor_us {
            let ratio = trapped / floor;
            fig = fig
                .base("notify_floor_us", floor)
                .base("ratio_to_floor", ratio)
                .base("path_read_us", s.med("path_read"))
                .base("openat_notify_floor_us", s.med("open_floor"))
                .base("ratio_to_openat_floor", trapped / s.med("open_floor"))
                .met(ratio <= 1.5)
                .summary(format!(
                    "open+close p50 {:.2} us bare, {:.2} us kmirror; {:.2} x floor; {:.2} x a minimal \
                     supervisor's trapped openat ({:.2} us); reading a path alone: {:.2} us",
                    s.med("bare_p50"),
                    s.med("km_p50"),
                    ratio,
                    trapped / s.med("open_floor"),
                    s.med("open_floor"),
                    s.med("path_read")
                ));
        }
        figures.push(fig);
        figures.push(if strace.is_some() {
            let ptrace = s.med("strace_extra");
            let ratio = trapped / ptrace;
            Figure::new("ptrace_trapped_us", ptrace, "us", "kmirror trapped_local_us / ptrace <= 0.5")
                .base("bare_open_p50_us", s.med("bare_p50"))
                .base("strace_open_p50_us", s.med("strace_p50"))
                .base("strace_seccomp_bpf_extra_us", s.med("strace_bpf_extra"))
                .base("kmirror_trapped_local_us", trapped)
                .base("kmirror_over_ptrace", ratio)
                .met(ratio <= 0.5)
                .summary(format!(
                    "kmirror/strace {:.2} (strace --seccomp-bpf: +{:.1} us)",
                    ratio,
                    s.med("strace_bpf_extra")
                ))
        } else {
            Figure::skipped("ptrace_trapped_us", "strace", "strace not installed")
        });
        Ok(figures)
    }

    fn pipe_loops(&mut self) -> Res<Vec<Figure>> {
        self.step("untrapped_ratio: pipe write+read throughput");
        let n = self.plan.pipe_n.to_string();
        let mut s = Series::default();
        for _ in 0..self.plan.micro_repeats {
            let bare =
                Kv::parse(&run_out(self.bare(&["pipeloop", &n]), "pipeloop (bare)")?).get("ops_per_s")?;
            let km = Kv::parse(&run_out(self.km_client(&["pipeloop", &n]), "pipeloop (kmirror)")?)
                .get("ops_per_s")?;
            let filtered = Kv::parse(&run_out(
                self.bare(&["pipeloop", &n, "allow-all-filter"]),
                "pipeloop (allow-all seccomp filter)",
            )?)
            .get("ops_per_s")?;
            s.add("bare", bare);
            s.add("km", km);
            s.add("filtered", filtered);
            s.add("ratio", km / bare);
            s.add("filtered_ratio", filtered / bare);
        }
        let ratio = s.med("ratio");
        Ok(vec![
            Figure::new("untrapped_ratio", ratio, "ratio", ">= 0.98")
                .base("bare_ops_per_s", s.med("bare"))
                .base("kmirror_ops_per_s", s.med("km"))
                .base("ratio_of_best_runs", s.max("km") / s.max("bare"))
                .base("allow_all_filter_ops_per_s", s.med("filtered"))
                .base("allow_all_filter_ratio", s.med("filtered_ratio"))
                .met(ratio >= 0.98)
                .summary(format!(
                    "{:.0} k/s bare, {:.0} k/s kmirror, {:.0} k/s allow-all filter ({:.3})",
                    s.med("bare") / 1e3,
                    s.med("km") / 1e3,
                    s.med("filtered") / 1e3,
                    s.med("filtered_ratio")
                )),
        ])
    }

    // ---- outgoing network ----

    /// The three ways to reach an in-pod server: from inside the pod, from the host over the
    /// veth, and under kmirror through the tunnel (to the pod-only service address).
    fn three_ways(&self, mode: &str, count: &str, port: u16) -> [(&'static str, Command); 3] {
        let port = port.to_string();
        let (svc, pod_ip) = (self.service_ip(), self.pod_ip());
        [
            ("inpod", self.in_pod(&[mode, count, &svc, &port])),
            ("veth", self.bare(&[mode, count, &pod_ip, &port])),
            ("km", self.km_client(&[mode, count, &svc, &port])),
        ]
    }

    fn network(&mut self) -> Res<Vec<Figure>> {
        let proxychains = which("proxychains4");
        let proxy_conf = self.root.join("target/bench/proxychains.conf");
        if proxychains.is_some() {
            let port = start_socks(self.pod.pod_ip)?;
            let conf = format!(
                "strict_chain\nquiet_mode\ntcp_read_time_out 15000\ntcp_connect_time_out 8000\n\
                 [ProxyList]\nsocks5 127.0.0.1 {port}\n"
            );
            std::fs::write(&proxy_conf, conf).map_err(|e| format!("{}: {e}", proxy_conf.display()))?;
        }

        self.step("tunnel_rtt_overhead_us: 1-byte ping-pong on one connection");
        let n = self.plan.pingpong_n.to_string();
        let mut rtt = Series::default();
        for _ in 0..self.plan.repeats {
            let mut ways: Vec<(&str, Command)> = self.three_ways("pingpong", &n, ECHO_PORT).into();
            // The same round trip through a minimal chain of kmirror's hops, inside the pod.
            ways.push(("chain", self.in_pod(&["pingchain", &n, &self.pod_ip(), &ECHO_PORT.to_string()])));
            for (way, cmd) in ways {
                let kv = Kv::parse(&run_out(cmd, &format!("pingpong ({way})"))?);
                rtt.add(&format!("{way}_p50"), kv.us("p50_ns")?);
                rtt.add(&format!("{way}_p99"), kv.us("p99_ns")?);
            }
        }

        self.step("conn_setup_overhead_us / preload_connect_us: connect + first byte + close");
        let n = self.plan.connect_n.to_string();
        let mut conn = Series::default();
        for _ in 0..self.plan.repeats {
            let mut ways: Vec<(&str, Command)> = self.three_ways("connectloop", &n, ECHO_PORT).into();
            if let Some(pc) = &proxychains {
                let mut cmd = Command::new(pc);
                cmd.arg("-q").arg("-f").arg(&proxy_conf).arg(&self.client);
                cmd.args(["connectloop", &n, &self.service_ip(), &ECHO_PORT.to_string()]);
                ways.push(("preload", cmd));
            }
            // A redirected connect's shape built minimally inside the pod. It dials the pod IP,
            // not the service IP, so its TIME_WAITs do not crowd the in-pod and kmirror runs'
            // port range (see BENCHMARKS.md on the connect cliff).
            let chain = self.in_pod(&["connectchain", &n, &self.pod_ip(), &ECHO_PORT.to_string()]);
            ways.push(("chain", chain));
            for (way, cmd) in ways {
                let kv = Kv::parse(&run_out(cmd, &format!("connectloop ({way})"))?);
                conn.add(&format!("{way}_p50"), kv.us("p50_ns")?);
                conn.add(&format!("{way}_p99"), kv.us("p99_ns")?);
            }
        }

        self.step("tunnel_throughput_ratio: bulk transfer to an in-pod sink");
        let bytes = self.plan.bulk_bytes.to_string();
        let mut bulk = Series::default();
        for _ in 0..self.plan.repeats {
            let mut rates = BTreeMap::new();
            let mut ways: Vec<(&str, Command)> = self.three_ways("bulk", &bytes, SINK_PORT).into();
            // The tunnel's shape built minimally inside the pod: what any design with these
            // hops could reach here.
            ways.push((
                "chain",
                self.in_pod(&["relaychain", &bytes, &self.service_ip(), &SINK_PORT.to_string()]),
            ));
            for (way, cmd) in ways {
                let rate = Kv::parse(&run_out(cmd, &format!("bulk ({way})"))?).get("bytes_per_s")?;
                bulk.add(way, rate / 1e6);
                rates.insert(way, rate);
            }
            bulk.add("ratio_inpod", rates["km"] / rates["inpod"]);
            bulk.add("ratio_veth", rates["km"] / rates["veth"]);
            bulk.add("ratio_chain", rates["km"] / rates["chain"]);
            bulk.add("chain_inpod", rates["chain"] / rates["inpod"]);
        }

        let mut figures = Vec::new();
        let conn50 = conn.med("km_p50") - conn.med("inpod_p50");
        figures.push(with_chain(latency_overhead("tunnel_rtt_overhead_us", &rtt, 50.0), &rtt, "ping"));
        figures.push(with_chain(latency_overhead("conn_setup_overhead_us", &conn, 200.0), &conn, "connect"));
        figures.push(if proxychains.is_some() {
            // Each redirector against the direct path its last leg takes: the SOCKS server
            // dials over the veth, kmirror's agent dials inside the pod.
            let preload = conn.med("preload_p50") - conn.med("veth_p50");
            Figure::new("preload_connect_us", preload, "us", "kmirror conn overhead <= proxychains overhead")
                .base("host_veth_p50_us", conn.med("veth_p50"))
                .base("proxychains_p50_us", conn.med("preload_p50"))
                .base("proxychains_p99_us", conn.med("preload_p99"))
                .base("proxychains_overhead_p99_us", conn.med("preload_p99") - conn.med("veth_p99"))
                .base("kmirror_p50_us", conn.med("km_p50"))
                .base("kmirror_overhead_p50_us", conn50)
                .base("kmirror_over_preload", conn50 / preload)
                .met(conn50 <= preload)
                .summary(format!(
                    "proxychains4+SOCKS5 p50 {:.0} us (+{:.0}), kmirror p50 {:.0} us (+{:.0})",
                    conn.med("preload_p50"),
                    preload,
                    conn.med("km_p50"),
                    conn50
                ))
        } else {
            Figure::skipped("preload_connect_us", "proxychains4", "proxychains4 not installed")
        });
        let ratio = bulk.med("ratio_inpod");
        figures.push(
            Figure::new("tunnel_throughput_ratio", ratio, "ratio", ">= 0.7 (vs in-pod)")
                .base("inpod_MBps", bulk.med("inpod"))
                .base("host_veth_MBps", bulk.med("veth"))
                .base("kmirror_MBps", bulk.med("km"))
                .base("ratio_vs_host_veth", bulk.med("ratio_veth"))
                .base("relay_chain_MBps", bulk.med("chain"))
                .base("relay_chain_ratio_vs_inpod", bulk.med("chain_inpod"))
                .base("ratio_vs_relay_chain", bulk.med("ratio_chain"))
                .met(ratio >= 0.7)
                .summary(format!(
                    "MB/s: in-pod {:.0}, veth {:.0}, minimal relay chain {:.0} ({:.2} of in-pod), \
                     kmirror {:.0} ({:.2} of veth, {:.2} of the chain)",
                    bulk.med("inpod"),
                    bulk.med("veth"),
                    bulk.med("chain"),
                    bulk.med("chain_inpod"),
                    bulk.med("km"),
                    bulk.med("ratio_veth"),
                    bulk.med("ratio_chain")
                )),
        );
        Ok(figures)
    }

    // ---- start-up ----

    fn startup(&mut self) -> Res<Vec<Figure>> {
        self.step("startup_overhead_ms: /bin/true");
        let mut s = Series::default();
        for _ in 0..self.plan.startup_runs {
            let (bare, status) = time_ms(Command::new("/bin/true"), "/bin/true")?;
            if !status.success() {
                return Err(format!("/bin/true exited with {status}"));
            }
            let (km, status) = time_ms(self.kmirror(&[], Path::new("/bin/true"), &[]), "kmirror /bin/true")?;
            if !status.success() {
                return Err(format!("kmirror run -- /bin/true exited with {status}"));
            }
            s.add("bare", bare);
            s.add("km", km);
        }
        let extra = s.med("km") - s.med("bare");
        Ok(vec![
            Figure::new("startup_overhead_ms", extra, "ms", "reported (no target)")
                .base("bare_ms", s.med("bare"))
                .base("kmirror_ms", s.med("km"))
                .summary(format!(
                    "/bin/true {:.1} ms bare, {:.1} ms under kmirror",
                    s.med("bare"),
                    s.med("km")
                )),
        ])
    }

    fn jvm(&mut self) -> Res<Vec<Figure>> {
        self.step("jvm_startup_ratio: java App env POD_ONLY_VAR");
        let classes = self.root.join("target/fixtures/java-app");
        let Some(java) = which("java") else {
            return Ok(vec![Figure::skipped("jvm_startup_ratio", "java", "java not installed")]);
        };
        if !classes.join("App.class").is_file() {
            return Ok(vec![Figure::skipped(
                "jvm_startup_ratio",
                "java",
                "target/fixtures/java-app missing (run scripts/build-fixtures.sh)",
            )]);
        }
        let classes = classes.to_string_lossy().into_owned();
        let args = ["-cp", classes.as_str(), "App", "env", "POD_ONLY_VAR"];
        let expected = format!("env=pod-value-{POD_INDEX}");
        // Correctness first (outside the timings): under kmirror the pod's variable is seen.
        let out = run_out(self.kmirror(&[], &java, &args), "java under kmirror")?;
        if !out.contains(&expected) {
            return Err(format!("java under kmirror printed {out:?}, expected {expected:?}"));
        }
        let mut s = Series::default();
        for _ in 0..self.plan.jvm_runs {
            // The bare run gets the variable locally, so both runs do the same work.
            let mut bare = Command::new(&java);
            bare.args(args).env("POD_ONLY_VAR", format!("pod-value-{POD_INDEX}"));
            let (bare_ms, status) = time_ms(bare, "java (bare)")?;
            if !status.success() {
                return Err(format!("bare java exited with {status}"));
            }
            let (km_ms, status) = time_ms(self.kmirror(&[], &java, &args), "java (kmirror)")?;
            if !status.success() {
                return Err(format!("java under kmirror exited with {status}"));
            }
            s.add("bare", bare_ms);
            s.add("km", km_ms);
            s.add("ratio", km_ms / bare_ms);
        }
        let ratio = s.med("ratio");
        Ok(vec![
            Figure::new("jvm_startup_ratio", ratio, "ratio", "<= 1.2")
                .base("bare_ms", s.med("bare"))
                .base("kmirror_ms", s.med("km"))
                .met(ratio <= 1.2)
                .summary(format!("{:.0} ms bare, {:.0} ms under kmirror", s.med("bare"), s.med("km"))),
        ])
    }

    // ---- memory ----

    /// kmirror running `benchclient hold N` to the pod's echo: (kmirror RSS, agent RSS) in MiB
    /// once every connection is up.
    fn rss_holding(&self, conns: usize) -> Res<(f64, f64)> {
        let n = conns.to_string();
        let cmd = self.km_client(&["hold", &n, &self.service_ip(), &ECHO_PORT.to_string()]);
        let mut app = Bg::start(cmd, &format!("kmirror hold {conns}"), true)?;
        app.wait_out("`ready`", Duration::from_secs(60), |l| l.iter().any(|l| l == "ready"))?;
        thread::sleep(Duration::from_millis(300));
        let kmirror = rss_mb(app.pid())?;
        let agent = agent_of(app.pid()).map(rss_mb).transpose()?.unwrap_or(f64::NAN);
        let status = app.finish(Duration::from_secs(30))?;
        if !status.success() {
            return Err(format!("kmirror hold {conns} exited with {status}: {}", tail(&app.err_text())));
        }
        Ok((kmirror, agent))
    }

    fn memory(&mut self) -> Res<Vec<Figure>> {
        let conns = self.plan.hold_conns;
        self.step(&format!("supervisor_rss_mb_1k_conns: kmirror holding {conns} tunnelled connections"));
        let (idle, idle_agent) = self.rss_holding(0)?;
        let (busy, busy_agent) = self.rss_holding(conns)?;
        Ok(vec![
            Figure::new("supervisor_rss_mb_1k_conns", busy, "MB", "<= 64 MB")
                .base("kmirror_idle_rss_mb", idle)
                .base("agent_idle_rss_mb", idle_agent)
                .base("agent_rss_mb_1k_conns", busy_agent)
                .base("connections", conns as f64)
                .met(busy <= 64.0)
                .summary(format!(
                    "VmRSS MiB idle {idle:.1} -> {busy:.1} with {conns} conns (agent {idle_agent:.1} -> {busy_agent:.1})"
                )),
        ])
    }

    // ---- incoming traffic ----

    fn steal(&mut self) -> Res<Vec<Figure>> {
        self.step("steal_rtt_overhead_us: pod-port ping-pong answered by a stolen local app");
        let n = self.plan.pingpong_n.to_string();
        let (pod_ip, port) = (self.pod_ip(), ECHO_PORT.to_string());
        let mut s = Series::default();
        for _ in 0..self.plan.repeats {
            let kv = Kv::parse(&run_out(self.bare(&["pingpong", &n, &pod_ip, &port]), "pingpong (pod app)")?);
            s.add("direct_p50", kv.us("p50_ns")?);
            s.add("direct_p99", kv.us("p99_ns")?);
        }
        let map = format!("{STEAL_LOCAL_PORT}:{ECHO_PORT}");
        let local = format!("127.0.0.1:{STEAL_LOCAL_PORT}");
        let mut cmd = self.kmirror(
            &["--incoming", "steal", "--port-map", &map],
            &self.client,
            &["serve-echo", &local, "verbose"],
        );
        cmd.env("KMIRROR_LOG", "info");
        let mut app = Bg::start(cmd, "kmirror steal serve-echo", false)?;
        app.wait_out("`listening`", Duration::from_secs(30), |l| {
            l.iter().any(|l| l.starts_with("listening"))
        })?;
        app.wait_err("incoming traffic subscribed", Duration::from_secs(30))?;
        for _ in 0..self.plan.repeats {
            let kv = Kv::parse(&run_out(self.bare(&["pingpong", &n, &pod_ip, &port]), "pingpong (stolen)")?);
            s.add("steal_p50", kv.us("p50_ns")?);
            s.add("steal_p99", kv.us("p99_ns")?);
        }
        let accepted = app.out().iter().filter(|l| *l == "accept").count();
        drop(app);
        if accepted < self.plan.repeats {
            return Err(format!(
                "the local app accepted {accepted} of {} stolen connections: the ping-pong did not go to it",
                self.plan.repeats
            ));
        }
        let extra = s.med("steal_p50") - s.med("direct_p50");
        Ok(vec![
            Figure::new("steal_rtt_overhead_us", extra, "us", "reported (no target)")
                .base("pod_app_p50_us", s.med("direct_p50"))
                .base("pod_app_p99_us", s.med("direct_p99"))
                .base("stolen_p50_us", s.med("steal_p50"))
                .base("stolen_p99_us", s.med("steal_p99"))
                .base("overhead_p99_us", s.med("steal_p99") - s.med("direct_p99"))
                .summary(format!(
                    "host->pod IP p50/p99 us: pod's app {:.0}/{:.0}, stolen by local app {:.0}/{:.0}",
                    s.med("direct_p50"),
                    s.med("direct_p99"),
                    s.med("steal_p50"),
                    s.med("steal_p99")
                )),
        ])
    }

    fn mirror(&mut self) -> Res<Vec<Figure>> {
        let (rate, secs) = (self.plan.mirror_rate, self.plan.mirror_secs);
        self.step(&format!(
            "mirror_fidelity: {rate} short connections/s for {secs} s, mirrored to a local app"
        ));
        let map = format!("{MIRROR_LOCAL_PORT}:{REPLY_PORT}");
        let local = format!("127.0.0.1:{MIRROR_LOCAL_PORT}");
        let mut cmd = self.kmirror(
            &["--incoming", "mirror", "--port-map", &map],
            &self.client,
            &["serve-count", &local],
        );
        cmd.env("KMIRROR_LOG", "info");
        let mut app = Bg::start(cmd, "kmirror mirror serve-count", false)?;
        app.wait_out("`listening`", Duration::from_secs(30), |l| {
            l.iter().any(|l| l.starts_with("listening"))
        })?;
        app.wait_err("incoming traffic subscribed", Duration::from_secs(30))?;
        let load = self.bare(&[
            "burst",
            &rate.to_string(),
            &secs.to_string(),
            &self.pod_ip(),
            &REPLY_PORT.to_string(),
        ]);
        let out = run_out(load, "burst load")?;
        let kv = Kv::parse(&out);
        let sent: HashSet<u64> = out
            .lines()
            .filter_map(|l| l.strip_prefix("sent id="))
            .filter_map(|id| id.trim().parse().ok())
            .collect();
        // Let the mirror drain: until every answered connection arrived, or nothing new for 3 s.
        let deadline = Instant::now() + Duration::from_secs(if self.plan.quick { 10 } else { 30 });
        let (mut seen, mut last_change) = (0, Instant::now());
        while Instant::now() < deadline && last_change.elapsed() < Duration::from_secs(3) {
            let now = app.out().iter().filter(|l| l.starts_with("conn ")).count();
            if now >= sent.len() {
                break;
            }
            if now != seen {
                (seen, last_change) = (now, Instant::now());
            }
            thread::sleep(Duration::from_millis(100));
        }
        let (mut complete, mut damaged, mut total) = (HashSet::new(), 0usize, 0usize);
        for line in app.out().iter().filter_map(|l| l.strip_prefix("conn ")) {
            total += 1;
            let field = |key: &str| {
                line.split_whitespace().find_map(|w| w.strip_prefix(key)).and_then(|v| v.parse::<u64>().ok())
            };
            match (field("id="), field("ok=")) {
                (Some(id), Some(1)) if sent.contains(&id) => {
                    complete.insert(id);
                }
                (_, Some(1)) => {}
                _ => damaged += 1,
            }
        }
        let dropped_reports =
            app.err_text().lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).count() as f64;
        drop(app);
        if sent.is_empty() {
            return Err(format!("the burst load completed no connection: {}", tail(&out)));
        }
        let fidelity = complete.len() as f64 / sent.len() as f64;
        Ok(vec![
            Figure::new("mirror_fidelity", fidelity, "fraction", "reported (ideal 1.0)")
                .base("answered_connections", sent.len() as f64)
                .base("failed_connections", kv.get("failed").unwrap_or(f64::NAN))
                .base("achieved_rate_per_s", kv.get("rate_per_s").unwrap_or(f64::NAN))
                .base("mirrored_complete", complete.len() as f64)
                .base("mirrored_damaged", damaged as f64)
                .base("mirrored_total", total as f64)
                .base("kmirror_warn_or_error_lines", dropped_reports)
                .summary(format!(
                    "{} of {} answered connections mirrored intact ({damaged} damaged) at {:.0}/s",
                    complete.len(),
                    sent.len(),
                    kv.get("rate_per_s").unwrap_or(f64::NAN)
                )),
        ])
    }
}

fn panic_text(payload: &Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".to_string())
}

/// Runs one group of figures; a failure (error or panic) is recorded against each of `names`.
/// The figures gathered so far, and which sections to run.
struct Sections {
    figures: Vec<Figure>,
    failed: bool,
    /// `--only`: run just the sections that produce one of these figures.
    only: Option<Vec<String>>,
}

impl Sections {
    /// Runs one section (unless `--only` leaves it out); a failure or panic marks its figures.
    fn run(&mut self, names: &[&'static str], f: impl FnOnce() -> Res<Vec<Figure>>) {
        if let Some(only) = &self.only
            && !names.iter().any(|n| only.iter().any(|o| o == n))
        {
            return;
        }
        let result = std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| Err(panic_text(&p)));
        match result {
            Ok(list) => self.figures.extend(list),
            Err(e) => {
                eprintln!("kmirror-bench: {}: {e}", names.join(", "));
                self.failed = true;
                self.figures.extend(names.iter().map(|n| Figure::without_value(n, format!("failed: {e}"))));
            }
        }
    }
}

// ---- output ----

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_num(v: f64) -> String {
    if !v.is_finite() {
        "null".into()
    } else if v == v.trunc() && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{:.4}", v)
    }
}

fn to_json(figures: &[Figure], plan: &Plan, elapsed: f64, load: (&HostLoad, &HostLoad)) -> String {
    let mut out = String::from("{\n");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(out, "  \"mode\": {},", json_str(if plan.quick { "quick" } else { "full" }));
    let _ = writeln!(out, "  \"repeats\": {},", plan.repeats);
    let _ = writeln!(out, "  \"kernel\": {},", json_str(kernel.trim()));
    let _ = writeln!(out, "  \"cpus\": {cpus},");
    let _ = writeln!(out, "  \"duration_s\": {},", json_num((elapsed * 10.0).round() / 10.0));
    let _ = writeln!(out, "  \"loadavg_start\": {},", json_str(&load.0.loadavg));
    let _ = writeln!(out, "  \"loadavg_end\": {},", json_str(&load.1.loadavg));
    let _ = writeln!(
        out,
        "  \"cpu_steal_pct\": {},",
        json_num((load.0.steal_pct(load.1) * 100.0).round() / 100.0)
    );
    out.push_str("  \"figures\": [\n");
    for (i, f) in figures.iter().enumerate() {
        let baseline: Vec<String> =
            f.baseline.iter().map(|(k, v)| format!("{}: {}", json_str(k), json_num(*v))).collect();
        let _ = write!(
            out,
            "    {{\"name\": {}, \"value\": {}, \"unit\": {}, \"baseline\": {{{}}}, \"target\": {}, \"met\": {}",
            json_str(f.name),
            f.value.map_or("null".into(), json_num),
            json_str(f.unit),
            baseline.join(", "),
            json_str(&f.target),
            f.met.map_or("null".into(), |m| m.to_string()),
        );
        if let Some(note) = &f.note {
            let _ = write!(out, ", \"note\": {}", json_str(note));
        }
        out.push('}');
        out.push_str(if i + 1 < figures.len() { ",\n" } else { "\n" });
    }
    out.push_str("  ]\n}\n");
    out
}

fn format_value(f: &Figure) -> String {
    match f.value {
        None => "-".into(),
        Some(v) if f.unit == "ratio" || f.unit == "fraction" => format!("{v:.3}"),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0} {}", f.unit),
        Some(v) => format!("{v:.2} {}", f.unit),
    }
}

fn table(figures: &[Figure]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| figure | value | target | met | baseline (same run, medians) |");
    let _ = writeln!(out, "|---|---|---|---|---|");
    for f in figures {
        let met = match f.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        let detail = match (&f.note, f.summary.is_empty()) {
            (Some(note), true) => note.clone(),
            (Some(note), false) => format!("{}; {note}", f.summary),
            (None, _) => f.summary.clone(),
        };
        let _ = writeln!(out, "| {} | {} | {} | {met} | {detail} |", f.name, format_value(f), f.target);
    }
    out
}

const USAGE: &str = "usage: kmirror-bench [--quick] [--only FIGURE[,FIGURE...]] [--optional TOOL[,TOOL...]]   \
                     (as root; writes target/bench/results.json)";

/// Tools whose absence skips a figure (see [`Figure::skipped`]).
const SKIPPABLE_TOOLS: [&str; 3] = ["strace", "proxychains4", "java"];

/// The skipped figures whose tool `optional` does not name, one message each: each fails the
/// run, since a bench that silently measures less proves less than it says.
fn unexcused_skips(figures: &[Figure], optional: &[String]) -> Vec<String> {
    figures
        .iter()
        .filter_map(|f| {
            let tool = f.skipped_for?;
            (!optional.iter().any(|o| o == tool)).then(|| {
                format!(
                    "{} was not measured ({}); install {tool} (scripts/setup.sh does) or pass \
                     --optional {tool} where it may be missing",
                    f.name,
                    f.note.as_deref().unwrap_or("skipped")
                )
            })
        })
        .collect()
}

fn main() {
    let mut quick = false;
    let mut only = None;
    let mut optional: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--only" => match args.next() {
                Some(list) => only = Some(list.split(',').map(str::to_owned).collect::<Vec<_>>()),
                None => {
                    eprintln!("kmirror-bench: --only needs a figure name ({USAGE})");
                    std::process::exit(2);
                }
            },
            "--optional" => match args.next() {
                Some(list) => optional.extend(list.split(',').map(str::to_owned)),
                None => {
                    eprintln!("kmirror-bench: --optional needs a tool name ({USAGE})");
                    std::process::exit(2);
                }
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            other => {
                eprintln!("kmirror-bench: unknown argument {other:?} ({USAGE})");
                std::process::exit(2);
            }
        }
    }
    if let Some(unknown) = optional.iter().find(|t| !SKIPPABLE_TOOLS.contains(&t.as_str())) {
        eprintln!(
            "kmirror-bench: no figure is skipped for {unknown:?}; tools: {}",
            SKIPPABLE_TOOLS.join(", ")
        );
        std::process::exit(2);
    }
    if let Some(unknown) = only.iter().flatten().find(|n| !FIGURE_ORDER.contains(&n.as_str())) {
        eprintln!("kmirror-bench: no figure named {unknown:?}; figures: {}", FIGURE_ORDER.join(", "));
        std::process::exit(2);
    }
    let start = Instant::now();
    let load_start = HostLoad::now();
    let plan = Plan::new(quick);
    let mut bench = match Bench::setup(plan, start) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("kmirror-bench: {e}");
            std::process::exit(1);
        }
    };
    let mut sections = Sections { figures: Vec::new(), failed: false, only };
    sections.run(&["notify_floor_us"], || bench.notify_floor());
    sections.run(&["trapped_local_us", "ptrace_trapped_us"], || bench.open_loops());
    sections.run(&["untrapped_ratio"], || bench.pipe_loops());
    sections.run(
        &[
            "tunnel_rtt_overhead_us",
            "conn_setup_overhead_us",
            "preload_connect_us",
            "tunnel_throughput_ratio",
        ],
        || bench.network(),
    );
    sections.run(&["startup_overhead_ms"], || bench.startup());
    sections.run(&["jvm_startup_ratio"], || bench.jvm());
    sections.run(&["supervisor_rss_mb_1k_conns"], || bench.memory());
    sections.run(&["steal_rtt_overhead_us"], || bench.steal());
    sections.run(&["mirror_fidelity"], || bench.mirror());
    let Sections { mut figures, failed, .. } = sections;
    let root = bench.root.clone();
    let plan = Plan::new(quick);
    bench.step("tearing down the pod");
    drop(bench);

    figures.sort_by_key(|f| FIGURE_ORDER.iter().position(|n| *n == f.name).unwrap_or(FIGURE_ORDER.len()));
    let elapsed = start.elapsed().as_secs_f64();
    let load_end = HostLoad::now();
    println!();
    println!(
        "kmirror-bench ({} mode, {} repeats, {:.0} s; load average {} at start, {} at end; {:.1}% CPU steal):",
        if plan.quick { "quick" } else { "full" },
        plan.repeats,
        elapsed,
        load_start.loadavg,
        load_end.loadavg,
        load_start.steal_pct(&load_end)
    );
    print!("{}", table(&figures));
    let path = root.join("target/bench/results.json");
    if let Err(e) = std::fs::write(&path, to_json(&figures, &plan, elapsed, (&load_start, &load_end))) {
        eprintln!("kmirror-bench: cannot write {}: {e}", path.display());
        std::process::exit(1);
    }
    println!("\nresults: {}", path.display());
    let skips = unexcused_skips(&figures, &optional);
    for skip in &skips {
        eprintln!("kmirror-bench: {skip}");
    }
    if failed || !skips.is_empty() {
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skipped_figure_fails_the_run_unless_its_tool_is_optional() {
        let figures = [
            Figure::skipped("ptrace_trapped_us", "strace", "strace not installed"),
            Figure::without_value("notify_floor_us", "failed: elsewhere".into()),
            Figure::new("startup_overhead_ms", 1.0, "ms", "<= 50 ms"),
        ];
        let skips = unexcused_skips(&figures, &[]);
        assert_eq!(skips.len(), 1, "{skips:?}");
        assert!(skips[0].starts_with("ptrace_trapped_us was not measured (skipped: strace not installed)"));
        assert!(skips[0].contains("--optional strace"), "{skips:?}");
        assert!(unexcused_skips(&figures, &["strace".into()]).is_empty());
        assert_eq!(unexcused_skips(&figures, &["java".into()]).len(), 1);
    }
}
