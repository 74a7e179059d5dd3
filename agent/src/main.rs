//! `kmirror-agent`: serves one kmirror session from inside a target's namespaces.
//!
//! For local targets the supervisor spawns it as a child with the tunnel on an inherited socket
//! (`--tunnel-fd`) and the session token in `KMIRROR_SESSION_TOKEN`. The agent never moves
//! itself into the target: sockets are created by a thread that entered the target's network
//! namespace, and files are read through the target's root directory with `openat2`.

mod dns;
mod env;
mod files;
mod incoming;
mod netns;
mod outgoing;
mod session;
mod target;

use anyhow::{Context, Result, bail};
use std::os::fd::{FromRawFd, OwnedFd};

const USAGE: &str = "usage: kmirror-agent --tunnel-fd <fd> --target-pid <pid> [--parent-pid <pid>]";

struct Args {
    tunnel_fd: i32,
    target_pid: u32,
    /// The supervisor that spawned us: the agent dies with it.
    parent_pid: Option<u32>,
}

fn parse_args() -> Result<Args> {
    let mut tunnel_fd = None;
    let mut target_pid = None;
    let mut parent_pid = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value; {USAGE}"))?;
        match flag.as_str() {
            "--tunnel-fd" => tunnel_fd = Some(value.parse().context("--tunnel-fd")?),
            "--target-pid" => target_pid = Some(value.parse().context("--target-pid")?),
            "--parent-pid" => parent_pid = Some(value.parse().context("--parent-pid")?),
            _ => bail!("unknown argument {flag}; {USAGE}"),
        }
    }
    Ok(Args { tunnel_fd: tunnel_fd.context(USAGE)?, target_pid: target_pid.context(USAGE)?, parent_pid })
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

fn run() -> Result<()> {
    raise_fd_limit();
    let args = parse_args()?;
    if let Some(parent) = args.parent_pid {
        die_with_parent(parent)?;
    }
    let token = std::env::var("KMIRROR_SESSION_TOKEN")
        .context("KMIRROR_SESSION_TOKEN is not set; the agent is started by `kmirror run`")?;
    // SAFETY: removing our own variable before any thread exists.
    unsafe { std::env::remove_var("KMIRROR_SESSION_TOKEN") };
    let target = target::Target::open(args.target_pid)?;
    // SAFETY: the supervisor passed this descriptor to us and nothing else owns it.
    let tunnel_fd = unsafe { OwnedFd::from_raw_fd(args.tunnel_fd) };
    let netns = netns::NetnsWorker::start(&target)?;
    // One thread runs every task: a pod connection crosses several tasks (tunnel reader,
    // session, connect, writer), and on a thread of their own each hand-off is a cross-CPU
    // wake-up. Blocking file work goes to the blocking pool.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // The session runs as a task, not as `block_on`'s own future: waking that future goes
    // through the driver's eventfd even from the runtime's own thread, one system call and one
    // extra event-loop turn per stream open.
    runtime.block_on(async {
        tokio::spawn(session::serve(tunnel_fd, token.into_bytes(), target, netns))
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("the session task failed: {e}")))
    })
}
