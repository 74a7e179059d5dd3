//! Running kmirror and the fixtures from tests: binary locations and bounded waits.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
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

/// `kmirror run --target pid/<pid> <flags> -- <command>` as a Command.
pub fn kmirror_cmd(target_pid: u32, flags: &[&str], command: &[&str]) -> Command {
    let mut cmd = Command::new(kmirror_bin());
    cmd.arg("run").arg("--target").arg(format!("pid/{target_pid}")).args(flags).arg("--").args(command);
    cmd
}

/// Runs a command to completion with empty stdin, killing it after `limit`.
pub fn output_within(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{cmd:?} did not finish within {limit:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
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

/// The `kmirror-agent` that the kmirror process `kmirror_pid` started.
pub fn agent_of(kmirror_pid: u32) -> u32 {
    children_of(kmirror_pid)
        .into_iter()
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "kmirror-agent")
        })
        .expect("kmirror has no agent child")
}
