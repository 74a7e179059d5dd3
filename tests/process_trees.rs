//! Process trees: every process the app starts is served until the last one exits, kmirror
//! then exits the way the main process did, and no process of the tree outlives kmirror.
//!
//! The small C programs below are compiled by each test with `cc` into its own temp dir.

use kmirror_suite::app::BackgroundApp;
use kmirror_suite::pod::LocalPod;
use kmirror_suite::run::{alive, comm, pid_written_to, wait_until};
use kmirror_suite::run::{children_of, kmirror, kmirror_bin, kmirror_cmd};
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Shared by the C programs: an HTTP GET to a pod address and a liveness check.
const C_COMMON: &str = r#"
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static int dial(const char *ip, int port) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    inet_pton(AF_INET, ip, &a.sin_addr);
    if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) != 0) {
        int e = errno;
        if (s >= 0) close(s);
        errno = e;
        return -1;
    }
    return s;
}

/* GET `path` from ip:8080 and write the whole response to `out` (or why it failed). */
static void http_get(const char *ip, const char *path, int out) {
    int s = dial(ip, 8080);
    if (s < 0) {
        dprintf(out, "connect: %s\n", strerror(errno));
        return;
    }
    dprintf(s, "GET %s HTTP/1.0\r\nHost: pod\r\n\r\n", path);
    char buf[4096];
    ssize_t n;
    while ((n = read(s, buf, sizeof buf)) > 0) write(out, buf, n);
    close(s);
}

/* The process exists and is not a zombie. */
static int running(pid_t pid) {
    char path[64], stat[512];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return 0;
    ssize_t n = read(fd, stat, sizeof stat - 1);
    close(fd);
    if (n <= 0) return 0;
    stat[n] = 0;
    char *p = strrchr(stat, ')');
    return p && p[1] == ' ' && p[2] != 'Z';
}
"#;

/// A daemon the classic way: fork, the main process returns at once, setsid, fork again, the
/// middle process exits. Once both are gone, the daemon fetches a page from the pod and
/// writes it, with the name of the parent it was reparented to, to argv[1].
const DAEMON_C: &str = r#"
int main(int argc, char **argv) {
    if (argc != 3) return 2;
    pid_t main_pid = getpid();
    pid_t first = fork();
    if (first < 0) return 1;
    if (first > 0) return 0;
    if (setsid() < 0) _exit(1);
    pid_t middle = getpid();
    pid_t second = fork();
    if (second < 0) _exit(1);
    if (second > 0) _exit(0);
    int null = open("/dev/null", O_RDWR);
    dup2(null, 0); dup2(null, 1); dup2(null, 2);
    while (running(main_pid) || running(middle)) usleep(1000);
    int out = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    char path[64], comm[64] = "";
    snprintf(path, sizeof path, "/proc/%d/comm", getppid());
    int fd = open(path, O_RDONLY);
    if (fd >= 0) { ssize_t n = read(fd, comm, sizeof comm - 1); if (n > 0) comm[n] = 0; close(fd); }
    dprintf(out, "parent=%s", comm);
    http_get(argv[2], "/daemon", out);
    close(out);
    return 0;
}
"#;

/// argv: dir, pod ip, count. After `ready`, waits for dir/go, then forks `count` children one
/// after the other, every second one leaving an orphan behind (a double fork); each does one
/// round trip with the pod's line echo and reports success on a pipe. Prints `done <n>` with
/// the number of successes, then waits for dir/stop.
const MANY_C: &str = r#"
static int echo_once(const char *ip) {
    int s = dial(ip, 7777);
    if (s < 0) return 0;
    char buf[256];
    size_t got = 0;
    write(s, "hi\n", 3);
    while (got < sizeof buf - 1) {
        ssize_t n = read(s, buf + got, sizeof buf - 1 - got);
        if (n <= 0) break;
        got += n;
        if (memchr(buf, '\n', got)) break;
    }
    close(s);
    return got > 8 && strncmp(buf, "pod-echo", 8) == 0;
}

int main(int argc, char **argv) {
    if (argc != 4) return 2;
    char go[4096], stop[4096];
    snprintf(go, sizeof go, "%s/go", argv[1]);
    snprintf(stop, sizeof stop, "%s/stop", argv[1]);
    int count = atoi(argv[3]);
    printf("ready\n");
    fflush(stdout);
    while (access(go, F_OK) != 0) usleep(10000);
    int p[2];
    if (pipe(p) != 0) return 1;
    for (int i = 0; i < count; i++) {
        pid_t pid = fork();
        if (pid < 0) return 1;
        if (pid == 0) {
            close(p[0]);
            if (i % 2 && fork() != 0) _exit(0);
            if (echo_once(argv[2])) write(p[1], "x", 1);
            _exit(0);
        }
        waitpid(pid, NULL, 0);
    }
    close(p[1]);
    int ok = 0;
    char c;
    while (read(p[0], &c, 1) == 1) ok++;
    printf("done %d\n", ok);
    fflush(stdout);
    while (access(stop, F_OK) != 0) usleep(10000);
    return 0;
}
"#;

/// argv: out file, pod ip. The main process forks a child that handles SIGINT, prints
/// `ready` and waits to be interrupted (default action). The child, once interrupted and once
/// the main process is gone, fetches a page from the pod into the out file.
const CTRL_C_C: &str = r#"
static volatile sig_atomic_t interrupted;
static void on_int(int sig) { (void)sig; interrupted = 1; }

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    int ready[2];
    if (pipe(ready) != 0) return 1;
    pid_t main_pid = getpid();
    pid_t child = fork();
    if (child < 0) return 1;
    if (child == 0) {
        sigset_t block, none;
        sigemptyset(&block);
        sigaddset(&block, SIGINT);
        sigemptyset(&none);
        sigprocmask(SIG_BLOCK, &block, NULL);
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_int;
        sigaction(SIGINT, &sa, NULL);
        write(ready[1], "r", 1);
        while (!interrupted) sigsuspend(&none);
        while (running(main_pid)) usleep(1000);
        int out = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
        dprintf(out, "child interrupted\n");
        http_get(argv[2], "/ctrl-c", out);
        close(out);
        _exit(0);
    }
    char c;
    read(ready[0], &c, 1);
    printf("ready\n");
    fflush(stdout);
    for (;;) pause();
}
"#;

/// A fresh directory for one test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kmirror-trees-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Compiles one of the C programs above into `dir`.
fn compile(dir: &Path, name: &str, source: &str) -> PathBuf {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, format!("{C_COMMON}\n{source}")).unwrap();
    let bin = dir.join(name);
    let out =
        Command::new("cc").arg("-O1").arg("-o").arg(&bin).arg(&src).output().expect("cc (build-essential)");
    assert!(out.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&out.stderr));
    bin
}

/// Kills, when dropped, the processes a test started that may outlive a failed test: by pid
/// and name (so a reused pid is left alone), or every process whose command line holds a
/// marker (the test's own temp dir).
struct Leftovers {
    pids: Vec<(u32, &'static str)>,
    marker: Option<String>,
}

impl Leftovers {
    fn pids(pids: Vec<(u32, &'static str)>) -> Leftovers {
        Leftovers { pids, marker: None }
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let mut doomed: Vec<u32> = self
            .pids
            .iter()
            .filter(|&&(pid, name)| alive(pid) && comm(pid) == name)
            .map(|&(pid, _)| pid)
            .collect();
        if let Some(marker) = &self.marker {
            let me = std::process::id();
            for entry in std::fs::read_dir("/proc").unwrap().flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
                    continue;
                };
                let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
                if pid != me && String::from_utf8_lossy(&cmdline).contains(marker.as_str()) {
                    doomed.push(pid);
                }
            }
        }
        for pid in doomed {
            // SIGKILL to a process this test started (checked above).
            let _ = kmirror_suite::run::signal(pid, libc::SIGKILL);
        }
    }
}

/// The keeper kmirror `kmirror_pid` started.
fn keeper_of(kmirror_pid: u32) -> Option<u32> {
    children_of(kmirror_pid).into_iter().find(|&p| comm(p) == "kmirror-keeper")
}

/// The process waits in nanosleep (`/proc/<pid>/syscall` names the call it is blocked in).
fn sleeping(pid: u32) -> bool {
    let call = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
    let nr = call.split_whitespace().next().unwrap_or("");
    nr == libc::SYS_clock_nanosleep.to_string() || nr == libc::SYS_nanosleep.to_string()
}

fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit(')')
        .next()
        .and_then(|f| f.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// The issue's example: a background job started by a script that returns at once reaches
/// the pod and writes its file; kmirror returns after it with the script's status.
#[test]
fn a_background_job_is_served_after_the_main_process_exits() {
    let pod = LocalPod::start(190);
    let dir = temp_dir("background");
    let out = dir.join("out");
    let script = format!("(sleep 1; curl -s http://echo:8080/background > {}) & exit 3", out.display());
    let started = Instant::now();
    let run = kmirror(pod.target_pid, &[], &["sh", "-c", &script]);
    let took = started.elapsed();
    assert_eq!(run.status.code(), Some(3), "stderr: {}", String::from_utf8_lossy(&run.stderr));
    assert!(
        took >= Duration::from_secs(1),
        "kmirror returned after {took:?}, before the background job ended"
    );
    // Written completely before kmirror returned: no waiting here.
    let body = std::fs::read_to_string(&out).unwrap_or_default();
    assert_eq!(body, "pod-echo 190 /background\n");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A double-forking, setsid'd daemon is reparented to kmirror's keeper, reaches the pod after
/// both of its parents exited, and kmirror exits 0 (the main process's status) after it.
#[test]
fn a_double_forking_daemon_is_served_until_it_exits() {
    let pod = LocalPod::start(191);
    let dir = temp_dir("daemon");
    let daemon = compile(&dir, "daemon", DAEMON_C);
    let out = dir.join("out");
    let run = kmirror(
        pod.target_pid,
        &[],
        &[daemon.to_str().unwrap(), out.to_str().unwrap(), &pod.service_ip.to_string()],
    );
    assert_eq!(run.status.code(), Some(0), "stderr: {}", String::from_utf8_lossy(&run.stderr));
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(
        text.starts_with("parent=kmirror-keeper\n"),
        "the orphan was not reparented to the keeper: {text}"
    );
    assert!(text.ends_with("pod-echo 191 /daemon\n"), "the daemon did not reach the pod: {text}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `redis-server --daemonize yes`, made a replica of the pod's line echo (a pod-only address):
/// its connection, made after its main process exited, reaches the pod, whose echo of the first
/// line of redis's PING shows up in redis's log as the master's reply. kmirror exits when redis
/// is stopped.
#[test]
fn redis_server_daemonized_reaches_the_pod() {
    let redis = Path::new("/usr/bin/redis-server");
    assert!(redis.exists(), "redis-server is missing: run scripts/setup.sh (`make test` does)");
    let pod = LocalPod::start(192);
    let dir = temp_dir("redis");
    let (log, pidfile) = (dir.join("redis.log"), dir.join("redis.pid"));
    // redis rewrites its command line to show its socket, in `dir`.
    let _leftovers = Leftovers { pids: Vec::new(), marker: Some(dir.display().to_string()) };
    let mut app = BackgroundApp::start(
        pod.target_pid,
        &[],
        &[
            redis.to_str().unwrap(),
            "--daemonize",
            "yes",
            "--port",
            "0",
            "--unixsocket",
            dir.join("redis.sock").to_str().unwrap(),
            "--save",
            "",
            "--replicaof",
            &pod.service_ip.to_string(),
            "7777",
            "--dir",
            dir.to_str().unwrap(),
            "--logfile",
            log.to_str().unwrap(),
            "--pidfile",
            pidfile.to_str().unwrap(),
        ],
    );
    let echoed = "from master: 'pod-echo 192: ";
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log).is_ok_and(|l| l.contains(echoed)) {
        assert!(
            Instant::now() < deadline,
            "redis's PING did not reach the pod's echo; redis's log:\n{}\nkmirror: {}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            app.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let redis_pid = pid_written_to(&pidfile, Duration::from_secs(20));
    assert!(app.child.try_wait().unwrap().is_none(), "kmirror exited while redis ran");
    // SIGTERM to the redis this test started.
    let _ = kmirror_suite::run::signal(redis_pid, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = app.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "kmirror did not exit after redis: {}", app.stderr_text());
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0), "{}", app.stderr_text());
    std::fs::remove_dir_all(dir).unwrap();
}

/// `--exit-with-main`: the rest of the tree ends with the main process, and kmirror returns at
/// once with its status.
#[test]
fn exit_with_main_ends_the_rest_of_the_tree() {
    let pod = LocalPod::start(193);
    let dir = temp_dir("exit-with-main");
    let pidfile = dir.join("sleep.pid");
    let script = format!("sleep 300 & echo $! > {}; exit 5", pidfile.display());
    let started = Instant::now();
    let run = kmirror(pod.target_pid, &["--exit-with-main"], &["sh", "-c", &script]);
    assert_eq!(run.status.code(), Some(5), "stderr: {}", String::from_utf8_lossy(&run.stderr));
    assert!(started.elapsed() < Duration::from_secs(20));
    let sleep = pid_written_to(&pidfile, Duration::from_secs(20));
    let _leftovers = Leftovers::pids(vec![(sleep, "sleep")]);
    // Ended (and reaped) before kmirror returned.
    assert!(!alive(sleep), "the background sleep outlived the main process");
    std::fs::remove_dir_all(dir).unwrap();
}

/// kmirror SIGKILLed while a grandchild and a setsid'd, double-forked orphan run: both end
/// within a second, and so does the keeper.
#[test]
fn killing_kmirror_ends_every_process_of_the_tree() {
    let pod = LocalPod::start(194);
    let dir = temp_dir("sigkill");
    let (grandchild_file, daemon_file) = (dir.join("grandchild"), dir.join("daemon"));
    let script = format!(
        "sh -c 'sleep 300 & echo $! > {gc}; wait' & setsid sh -c 'sleep 300 & echo $! > {daemon}'; wait",
        gc = grandchild_file.display(),
        daemon = daemon_file.display()
    );
    let mut app = BackgroundApp::start(pod.target_pid, &[], &["sh", "-c", &script]);
    let (grandchild, daemon) = (
        pid_written_to(&grandchild_file, Duration::from_secs(20)),
        pid_written_to(&daemon_file, Duration::from_secs(20)),
    );
    let _leftovers = Leftovers::pids(vec![(grandchild, "sleep"), (daemon, "sleep")]);
    // The daemon's parent (the setsid'd shell) has exited: it is an orphan now.
    wait_until("the daemon was orphaned", Duration::from_secs(10), || comm(parent_of(daemon)) != "sh");
    // Both past their start-up (the loader's trapped calls), which a dead listener would fail.
    wait_until("both sleeps sleep", Duration::from_secs(10), || sleeping(grandchild) && sleeping(daemon));
    let keeper = keeper_of(app.child.id());
    app.child.kill().unwrap(); // SIGKILL
    app.child.wait().unwrap();
    let killed = Instant::now();
    wait_until("the grandchild and the daemon ended within a second", Duration::from_secs(1), || {
        !alive(grandchild) && !alive(daemon)
    });
    let keeper = keeper.expect("kmirror had a keeper");
    wait_until("the keeper ended", Duration::from_secs(1), || !alive(keeper));
    eprintln!("the tree ended {:?} after kmirror was killed", killed.elapsed());
    std::fs::remove_dir_all(dir).unwrap();
}

/// A tree of a few hundred short-lived processes, half of them orphans of double forks: all are
/// served (kmirror's counters), every orphan is reaped (none is left as a zombie under the
/// keeper) and kmirror keeps no descriptor of any of them once they are gone.
#[test]
fn hundreds_of_short_lived_processes_leave_nothing_behind() {
    const COUNT: usize = 300;
    let pod = LocalPod::start(195);
    let dir = temp_dir("many");
    let many = compile(&dir, "many", MANY_C);
    let stats = dir.join("stats");
    let mut app = BackgroundApp::start_with_env(
        pod.target_pid,
        &[],
        &[many.to_str().unwrap(), dir.to_str().unwrap(), &pod.service_ip.to_string(), &COUNT.to_string()],
        &[("KMIRROR_STATS_FILE", stats.to_str().unwrap())],
    );
    app.wait_stdout("ready", Duration::from_secs(20), |l| l.iter().any(|l| l == "ready"));
    let kmirror_pid = app.child.id();
    let before = fd_count(kmirror_pid);
    std::fs::write(dir.join("go"), "").unwrap();
    let done = format!("done {COUNT}");
    app.wait_stdout(&done, Duration::from_secs(120), |l| l.iter().any(|l| l.starts_with("done")));
    assert!(app.stdout_lines().contains(&done), "not every child reached the pod: {:?}", app.stdout_lines());
    let mut after = 0;
    let settled = Instant::now() + Duration::from_secs(5);
    while Instant::now() < settled {
        after = fd_count(kmirror_pid);
        if after <= before + 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        after <= before + 4,
        "kmirror holds {after} descriptors after {COUNT} processes, {before} before"
    );
    std::fs::write(dir.join("stop"), "").unwrap();
    let status = app.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", app.stderr_text());
    let counts = std::fs::read_to_string(&stats).unwrap();
    let connects: u64 = counts
        .lines()
        .find_map(|l| l.strip_prefix("connect "))
        .and_then(|n| n.parse().ok())
        .expect("a connect count");
    assert!(connects >= COUNT as u64, "{connects} connects trapped for {COUNT} processes:\n{counts}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Ctrl-C in a terminal reaches every process of the foreground group, as without kmirror:
/// the main process dies of it, a child that handles it goes on and is still served, and
/// kmirror then dies of SIGINT like the main process.
#[test]
fn ctrl_c_reaches_the_foreground_group_and_the_rest_is_still_served() {
    let pod = LocalPod::start(196);
    let dir = temp_dir("ctrl-c");
    let program = compile(&dir, "ctrlc", CTRL_C_C);
    let out = dir.join("out");
    let (mut master, slave) = open_pty();
    let mut cmd = kmirror_cmd(
        pod.target_pid,
        &[],
        &[program.to_str().unwrap(), out.to_str().unwrap(), &pod.service_ip.to_string()],
    );
    cmd.stdin(slave.try_clone().unwrap()).stdout(slave.try_clone().unwrap()).stderr(slave);
    // A new session whose controlling terminal is the pty, so kmirror's process group is the
    // terminal's foreground group.
    kmirror_suite::sys::with_controlling_terminal(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    let screen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let screen = screen.clone();
        let mut reader = master.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                screen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
    }
    let text = || String::from_utf8_lossy(&screen.lock().unwrap()).into_owned();
    wait_until("the app is ready", Duration::from_secs(20), || text().contains("ready"));
    master.write_all(&[0x03]).unwrap(); // Ctrl-C
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "kmirror did not end: {}", text());
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.signal(), Some(libc::SIGINT), "{status:?}: {}", text());
    let written = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(
        written.starts_with("child interrupted\n") && written.ends_with("\r\n\r\npod-echo 196 /ctrl-c\n"),
        "{written}\nterminal: {}",
        text()
    );
    std::fs::remove_dir_all(dir).unwrap();
}

fn open_pty() -> (std::fs::File, std::fs::File) {
    let pty = nix::pty::openpty(None, None).expect("openpty");
    (pty.master.into(), pty.slave.into())
}

/// After the main process exited, kmirror only waits for the rest of the tree: a SIGTERM sent
/// to it then goes to the rest, and whatever ignores it is SIGKILLed after the grace period;
/// kmirror exits with the main process's status.
#[test]
fn a_termination_signal_after_the_main_process_exited_ends_the_rest() {
    let pod = LocalPod::start(197);
    let dir = temp_dir("term-rest");
    let (main_file, polite_file, stubborn_file) =
        (dir.join("main"), dir.join("polite"), dir.join("stubborn"));
    let script = format!(
        "echo $$ > {main}; sleep 300 & echo $! > {polite}; (trap '' TERM; exec sleep 301) & echo $! > {stubborn}; exit 4",
        main = main_file.display(),
        polite = polite_file.display(),
        stubborn = stubborn_file.display()
    );
    let mut app = BackgroundApp::start(pod.target_pid, &[], &["sh", "-c", &script]);
    let (main, polite, stubborn) = (
        pid_written_to(&main_file, Duration::from_secs(20)),
        pid_written_to(&polite_file, Duration::from_secs(20)),
        pid_written_to(&stubborn_file, Duration::from_secs(20)),
    );
    let _leftovers = Leftovers::pids(vec![(polite, "sleep"), (stubborn, "sleep")]);
    wait_until("the main process exited", Duration::from_secs(10), || !alive(main));
    wait_until("both sleeps sleep", Duration::from_secs(10), || sleeping(polite) && sleeping(stubborn));
    assert!(app.child.try_wait().unwrap().is_none(), "kmirror exited with the main process");
    // SIGTERM to the kmirror this test started.
    let _ = kmirror_suite::run::signal(app.child.id(), libc::SIGTERM);
    let sent = Instant::now();
    wait_until("the sleep that takes SIGTERM ended", Duration::from_secs(3), || !alive(polite));
    assert!(alive(stubborn), "the sleep that ignores SIGTERM is left to the grace period");
    let status = loop {
        if let Some(status) = app.child.try_wait().unwrap() {
            break status;
        }
        assert!(sent.elapsed() < Duration::from_secs(15), "kmirror did not end: {}", app.stderr_text());
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        sent.elapsed() >= Duration::from_secs(4),
        "ended after {:?}, before the grace period",
        sent.elapsed()
    );
    assert_eq!(status.code(), Some(4), "{}", app.stderr_text());
    assert!(!alive(stubborn));
    std::fs::remove_dir_all(dir).unwrap();
}

/// The keeper never runs without kmirror: started by hand, it says what it is and exits.
#[test]
fn the_keeper_refuses_to_run_on_its_own() {
    use std::os::unix::process::CommandExt;
    let out = Command::new(kmirror_bin()).arg0("kmirror-keeper").stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("started by kmirror only"), "{stderr}");
}

/// Should the keeper be killed on its own, the main process dies with it (PDEATHSIG) and its
/// orphans come to kmirror (a child subreaper too), which ends them and says what happened.
#[test]
fn a_killed_keeper_takes_the_tree_with_it_and_kmirror_says_so() {
    let pod = LocalPod::start(198);
    let dir = temp_dir("keeper-killed");
    let (orphan_file, main_file) = (dir.join("orphan"), dir.join("main"));
    let script = format!(
        "sh -c 'sleep 300 & echo $! > {}'; echo $$ > {}; exec sleep 300",
        orphan_file.display(),
        main_file.display()
    );
    let mut app = BackgroundApp::start(pod.target_pid, &[], &["sh", "-c", &script]);
    let (orphan, main) = (
        pid_written_to(&orphan_file, Duration::from_secs(20)),
        pid_written_to(&main_file, Duration::from_secs(20)),
    );
    let _leftovers = Leftovers::pids(vec![(orphan, "sleep"), (main, "sleep")]);
    wait_until("both sleep", Duration::from_secs(10), || sleeping(orphan) && sleeping(main));
    let keeper = keeper_of(app.child.id()).expect("kmirror has a keeper");
    // SIGKILL to the keeper of the kmirror this test started.
    let _ = kmirror_suite::run::signal(keeper, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = app.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "kmirror did not end: {}", app.stderr_text());
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(!status.success());
    assert!(!alive(orphan), "the orphan outlived the keeper and kmirror");
    assert!(!alive(main), "the main process outlived the keeper");
    let stderr = app.stderr_text();
    assert!(stderr.contains("the process keeper") && stderr.contains("ended unexpectedly"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// The app starts with the signal dispositions it had when kmirror forked it itself: what
/// kmirror inherited as ignored stays ignored, SIGPIPE (which Rust ignores) is default, and
/// nothing else is ignored (glibc's posix_spawn, which starts the keeper, leaves its internal
/// signal 33 ignored in the new program; the keeper puts it back).
#[test]
fn the_app_starts_with_the_signal_dispositions_kmirror_had() {
    let pod = LocalPod::start(199);
    let ignored = |status: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .expect("SigIgn")
    };
    let bit = |sig: i32| 1u64 << (sig - 1);
    let mine = ignored(&std::fs::read_to_string("/proc/self/status").unwrap());
    let mut cmd = kmirror_cmd(pod.target_pid, &[], &["cat", "/proc/self/status"]);
    // kmirror starts with SIGALRM ignored, as under `nohup`-like wrappers that ignore a signal
    // for their child.
    kmirror_suite::sys::ignoring(&mut cmd, libc::SIGALRM);
    let out = kmirror_suite::run::output_within(cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let app = ignored(&String::from_utf8_lossy(&out.stdout));
    let expected = (mine | bit(libc::SIGALRM)) & !bit(libc::SIGPIPE);
    assert_eq!(app, expected, "the app ignores {app:#x}, expected {expected:#x}");
}
