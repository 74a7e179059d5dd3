//! Running kmirror and the fixtures from tests: binary locations and bounded waits.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

/// The workspace root (this package's manifest directory).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn built(name: &str, hint: &str) -> PathBuf {
    let dir =
        std::env::var_os("KMIRROR_BIN_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target/debug"));
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: {hint}", path.display());
    path
}

/// The `kmirror` binary (built by `cargo build --workspace`; `make test` does it).
pub fn kmirror_bin() -> PathBuf {
    let bin = built("kmirror", "build the workspace first (`make test` does)");
    built("kmirror-agent", "build the workspace first (`make test` does)");
    bin
}

/// A fixture built by scripts/build-fixtures.sh.
pub fn fixture(name: &str) -> PathBuf {
    let path = root().join("target/fixtures").join(name);
    assert!(path.exists(), "{} is missing: run scripts/build-fixtures.sh (`make test` does)", path.display());
    path
}

/// Both static Go builds: Debian's Go and the current release.
pub fn go_fixtures() -> Vec<PathBuf> {
    vec![fixture("go-app-static"), fixture("go-app-static-current")]
}

/// `kmirror run --target pid/<pid> <flags> -- <command>` as a Command. The kmirror it starts
/// is SIGKILLed if the thread that spawns it dies (see [`die_with_parent`]), and its app and
/// agent die with it, so a crashed test leaves no session behind.
pub fn kmirror_cmd(target_pid: u32, flags: &[&str], command: &[&str]) -> Command {
    let mut cmd = Command::new(kmirror_bin());
    cmd.arg("run").arg("--target").arg(format!("pid/{target_pid}")).args(flags).arg("--").args(command);
    die_with_parent(&mut cmd);
    cmd
}

pub use crate::sys::die_with_parent;

/// Sends signal `sig` to process `pid`.
pub fn signal(pid: impl Into<i64>, sig: i32) -> std::io::Result<()> {
    let pid = i32::try_from(pid.into()).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    let sig = nix::sys::signal::Signal::try_from(sig)?;
    Ok(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)?)
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` (with [`die_with_parent`]) from a thread that lives as long as the test
/// process, so the child dies with the process, not with whichever test thread started it.
pub fn spawn_tied(mut cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    die_with_parent(&mut cmd);
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("spawn-tied".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("cannot start the spawning thread");
        Mutex::new(tx)
    });
    let (reply, answer) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply))
        .expect("the spawning thread is gone");
    answer.recv().expect("the spawning thread is gone")
}

/// Reads a pipe to its end on a thread; the bytes arrive on the returned channel.
fn drain<R: Read + Send + 'static>(from: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut from) = from {
            let _ = from.read_to_end(&mut bytes);
        }
        let _ = tx.send(bytes);
    });
    rx
}

/// Waits for `child` (whose stdout and stderr may be piped), reading both pipes while it runs
/// so that any amount of output cannot block it; SIGKILLs it and panics after `limit`.
pub fn wait_output_within(mut child: Child, what: &str, limit: Duration) -> Output {
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // A grandchild that keeps a pipe open must not hang the test either.
    let collect = |rx: mpsc::Receiver<Vec<u8>>| rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
    let (stdout, stderr) = (collect(stdout), collect(stderr));
    let Some(status) = status else {
        panic!(
            "{what} did not finish within {limit:?}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    };
    Output { status, stdout, stderr }
}

/// Runs a command to completion with empty stdin, killing it after `limit`. Its output is
/// read while it runs.
pub fn output_within(mut cmd: Command, limit: Duration) -> Output {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let what = format!("{cmd:?}");
    let child = spawn_tied(cmd).unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    wait_output_within(child, &what, limit)
}

/// Waits for `child` to exit, SIGKILLing it and panicking after `limit`.
pub fn wait_within(child: &mut Child, what: &str, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The lines of a child's pipe, read on a thread, so that a test waits for each with a
/// deadline instead of blocking forever on a child that hangs.
pub struct LineReader {
    lines: mpsc::Receiver<String>,
}

impl LineReader {
    pub fn new<R: Read + Send + 'static>(from: R) -> LineReader {
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(from).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        LineReader { lines }
    }

    /// The next line (without its newline), or `None` at the end of the pipe; panics if
    /// none comes within `limit`.
    pub fn next_within(&self, limit: Duration) -> Option<String> {
        match self.lines.recv_timeout(limit) {
            Ok(line) => Some(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("no line within {limit:?}"),
        }
    }

    /// The next line; panics at the end of the pipe or if none comes within `limit`.
    pub fn line_within(&self, limit: Duration) -> String {
        self.next_within(limit).unwrap_or_else(|| panic!("the pipe ended before the next line"))
    }

    /// Every line up to the end of the pipe, joined with newlines; panics if the pipe is not
    /// closed within `limit`.
    pub fn rest_within(&self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        let mut text = String::new();
        while let Some(line) = self.next_within(deadline.saturating_duration_since(Instant::now())) {
            text.push_str(&line);
            text.push('\n');
        }
        text
    }
}

/// Runs kmirror against a target and returns its output (60 s limit).
pub fn kmirror(target_pid: u32, flags: &[&str], command: &[&str]) -> Output {
    output_within(kmirror_cmd(target_pid, flags, command), Duration::from_secs(60))
}

/// stdout as text, with stderr in the panic message if the exit status is not `code`.
pub fn expect_status(out: &Output, code: i32) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "unexpected exit status {:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// stdout of a successful run.
pub fn ok(out: &Output) -> String {
    expect_status(out, 0)
}

/// The value of `key=` in `key=value` lines.
pub fn field<'a>(stdout: &'a str, key: &str) -> Option<&'a str> {
    stdout.lines().find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Child processes of `pid` (all its threads' children).
pub fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
                .flat_map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>())
                .collect()
        })
        .unwrap_or_default()
}

/// Every process below `pid` (children, theirs, ...): the app runs below kmirror's keeper.
pub fn descendants_of(pid: u32) -> Vec<u32> {
    let mut found = children_of(pid);
    let mut next = 0;
    while next < found.len() {
        let more = children_of(found[next]);
        found.extend(more);
        next += 1;
    }
    found
}

/// The `kmirror-agent` that the kmirror process `kmirror_pid` started.
pub fn agent_of(kmirror_pid: u32) -> u32 {
    children_of(kmirror_pid)
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "kmirror-agent")
        })
        .expect("kmirror has no agent child")
}

/// A scratch directory of a test, removed when the test ends, also when it fails (a panic
/// unwinds through the drop).
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    /// `<temp>/kmirror-<name>-<pid>`, created empty.
    pub fn new(name: &str) -> ScratchDir {
        let dir = std::env::temp_dir().join(format!("kmirror-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        ScratchDir(dir)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// The command name of process `pid` (empty once it is gone).
pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string()
}

/// Polls `check` until it holds; panics naming `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The pid a process wrote to `file`, once it is there (at most `limit`).
pub fn pid_written_to(file: &Path, limit: Duration) -> u32 {
    let mut pid = None;
    wait_until(&format!("{} holds a pid", file.display()), limit, || {
        pid = std::fs::read_to_string(file).ok().and_then(|s| s.trim().parse().ok());
        pid.is_some()
    });
    pid.expect("checked above")
}
