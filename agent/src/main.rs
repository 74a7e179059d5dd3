//! `kmirror-agent`: serves one kmirror session from inside a target's namespaces.
//!
//! For local targets the supervisor spawns it as a child with the tunnel on an inherited socket
//! (`--tunnel-fd`) and the session token in an inherited pipe (`--token-fd`; never in the
//! environment, which `/proc/<pid>/environ` shows for the process's whole life). The agent never moves
//! itself into the target: sockets are created by a thread that entered the target's network
//! namespace, and files are read through the target's root directory with `openat2`.

mod dns;
mod env;
mod files;
mod identity;
mod incoming;
mod netns;
mod outgoing;
mod session;
mod target;
mod writes;

use anyhow::{Context, Result, bail};
use std::os::fd::{FromRawFd, OwnedFd};

const USAGE: &str =
    "usage: kmirror-agent --tunnel-fd <fd> --target-pid <pid> [--token-fd <fd>] [--parent-pid <pid>]";

/// Threads for blocking file work: requests are bounded by the session
/// (`session::MAX_CONCURRENT_REQUESTS`); the rest is head room for other blocking tasks.
const MAX_BLOCKING_THREADS: usize = session::MAX_CONCURRENT_REQUESTS + 16;

struct Args {
    tunnel_fd: i32,
    /// A pipe holding the session token (written and closed by the supervisor).
    token_fd: Option<i32>,
    target_pid: u32,
    /// The supervisor that spawned us: the agent dies with it.
    parent_pid: Option<u32>,
}

fn parse_args() -> Result<Args> {
    let mut tunnel_fd = None;
    let mut target_pid = None;
    let mut parent_pid = None;
    let mut token_fd = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value; {USAGE}"))?;
        match flag.as_str() {
            "--tunnel-fd" => tunnel_fd = Some(value.parse().context("--tunnel-fd")?),
            "--target-pid" => target_pid = Some(value.parse().context("--target-pid")?),
            "--parent-pid" => parent_pid = Some(value.parse().context("--parent-pid")?),
            "--token-fd" => token_fd = Some(value.parse().context("--token-fd")?),
            _ => bail!("unknown argument {flag}; {USAGE}"),
        }
    }
    Ok(Args {
        tunnel_fd: tunnel_fd.context(USAGE)?,
        token_fd,
        target_pid: target_pid.context(USAGE)?,
        parent_pid,
    })
}

/// Ties the agent's life to the supervisor's: SIGKILL when it goes. Done here rather than
/// between fork and exec in the supervisor, so that its spawn can take the posix_spawn path;
/// the parent check closes the window before the prctl.
fn die_with_parent(parent: u32) -> Result<()> {
    // SAFETY: prctl with integer arguments on the calling process.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot tie the agent to its supervisor");
    }
    // SAFETY: getppid has no arguments.
    if unsafe { libc::getppid() } as u32 != parent {
        bail!("the supervisor (pid {parent}) exited before the agent started");
    }
    Ok(())
}

/// The session token: read from the inherited pipe `fd` to its end, or (for agents started
/// otherwise) taken from `KMIRROR_SESSION_TOKEN` and wiped from memory.
fn session_token(fd: Option<i32>) -> Result<String> {
    if let Some(fd) = fd {
        use std::io::Read;
        // SAFETY: the supervisor passed this descriptor to us and nothing else owns it.
        let pipe = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut token = String::new();
        pipe.take(4096).read_to_string(&mut token).context("cannot read the session token (--token-fd)")?;
        return Ok(token);
    }
    take_env_secret(TOKEN_VAR).context(
        "no session token (--token-fd or KMIRROR_SESSION_TOKEN); the agent is started by `kmirror run`",
    )
}

const TOKEN_VAR: &str = "KMIRROR_SESSION_TOKEN";

unsafe extern "C" {
    /// The C library's environment block: pointers to `NAME=value` strings, at first in the
    /// memory the kernel set up at exec, which is what `/proc/<pid>/environ` shows.
    static mut environ: *mut *mut libc::c_char;
}

/// Removes variable `name` from the environment and overwrites its value where it lies, so
/// `/proc/<pid>/environ` no longer shows it (`remove_var` only unlinks the entry). Call
/// before any thread exists.
fn take_env_secret(name: &str) -> Option<String> {
    let value = std::env::var(name).ok()?;
    let prefix = format!("{name}=");
    // SAFETY: single-threaded (the caller's contract); `environ` is a NULL-terminated array of
    // pointers to NUL-terminated strings, each writable (the initial stack or the heap).
    unsafe {
        let mut entry = environ;
        while !entry.is_null() && !(*entry).is_null() {
            let text = std::ffi::CStr::from_ptr(*entry).to_bytes();
            if text.starts_with(prefix.as_bytes()) {
                let start = (*entry).add(prefix.len());
                for i in 0..text.len() - prefix.len() {
                    std::ptr::write_volatile(start.add(i), 0);
                }
            }
            entry = entry.add(1);
        }
        std::env::remove_var(name);
    }
    Some(value)
}

/// Each pod connection of the app holds a descriptor in the agent.
fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: get/setrlimit on a valid struct; failure leaves the limit as it was.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KMIRROR_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    if let Err(e) = run() {
        eprintln!("kmirror-agent: {e:#}");
        std::process::exit(1);
    }
}

/// Requests to stop do not end the agent: they are meant for the app, and the agent ends with
/// kmirror anyway (its tunnel closes, or PDEATHSIG). A service manager stopping kmirror's unit
/// (systemd's default `KillMode=control-group`) sends SIGTERM to every process in it, the
/// agent too, while the app's shutdown may still need the pod: its last writes to a pod
/// database, a deregistration. tokio's first registration of a signal installs a handler that
/// stays for the life of the process, so the streams need not be kept or read.
fn outlive_stop_signals(runtime: &tokio::runtime::Runtime) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let _context = runtime.enter();
    for kind in [SignalKind::terminate(), SignalKind::interrupt(), SignalKind::hangup(), SignalKind::quit()] {
        drop(signal(kind)?);
    }
    Ok(())
}

fn run() -> Result<()> {
    raise_fd_limit();
    let args = parse_args()?;
    if let Some(parent) = args.parent_pid {
        die_with_parent(parent)?;
    }
    let token = session_token(args.token_fd)?;
    let target = target::Target::open(args.target_pid)?;
    // SAFETY: the supervisor passed this descriptor to us and nothing else owns it.
    let tunnel_fd = unsafe { OwnedFd::from_raw_fd(args.tunnel_fd) };
    let netns = netns::NetnsWorker::start(&target)?;
    // One thread runs every task: a pod connection crosses several tasks (tunnel reader,
    // session, connect, writer), and on a thread of their own each hand-off is a cross-CPU
    // wake-up. Blocking file work goes to the blocking pool.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    outlive_stop_signals(&runtime).context("cannot install the agent's signal handlers")?;
    // The session runs as a task, not as `block_on`'s own future: waking that future goes
    // through the driver's eventfd even from the runtime's own thread, one system call and one
    // extra event-loop turn per stream open.
    runtime.block_on(async {
        tokio::spawn(session::serve(tunnel_fd, token.into_bytes(), target, netns))
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("the session task failed: {e}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The secret's bytes are overwritten where the environment held them, not just unlinked.
    #[test]
    fn an_environment_secret_is_wiped_where_it_lay() {
        let name = "KMIRROR_TEST_SECRET_WIPE";
        // SAFETY: this test alone touches this variable.
        unsafe { std::env::set_var(name, "s3cret-value") };
        let prefix = format!("{name}=");
        // SAFETY: reading the environment block; see take_env_secret.
        let held = unsafe {
            let mut entry = environ;
            loop {
                assert!(!(*entry).is_null(), "the variable is not in environ");
                if std::ffi::CStr::from_ptr(*entry).to_bytes().starts_with(prefix.as_bytes()) {
                    break *entry;
                }
                entry = entry.add(1);
            }
        };
        assert_eq!(take_env_secret(name).as_deref(), Some("s3cret-value"));
        assert!(std::env::var(name).is_err());
        // SAFETY: the string is still allocated (unsetenv does not free it) and as long as before.
        let value = unsafe { std::slice::from_raw_parts(held.add(prefix.len()).cast::<u8>(), 12) };
        assert_eq!(value, &[0u8; 12], "the value is still in memory");
    }
}
