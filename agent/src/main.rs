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
mod sys;
mod target;
mod writes;

use anyhow::{Context, Result, bail};

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
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(std::io::Error::from)
        .context("cannot tie the agent to its supervisor")?;
    if nix::unistd::getppid().as_raw() as u32 != parent {
        bail!("the supervisor (pid {parent}) exited before the agent started");
    }
    Ok(())
}

/// The session token: read from the inherited pipe `fd` to its end, or (for agents started
/// otherwise) taken from `KMIRROR_SESSION_TOKEN` and wiped from memory.
fn session_token(fd: Option<i32>) -> Result<String> {
    if let Some(fd) = fd {
        use std::io::Read;
        let pipe = std::fs::File::from(sys::inherited_fd(fd));
        let mut token = String::new();
        pipe.take(4096).read_to_string(&mut token).context("cannot read the session token (--token-fd)")?;
        return Ok(token);
    }
    sys::take_env_secret(TOKEN_VAR).context(
        "no session token (--token-fd or KMIRROR_SESSION_TOKEN); the agent is started by `kmirror run`",
    )
}

const TOKEN_VAR: &str = "KMIRROR_SESSION_TOKEN";

/// Each pod connection of the app holds a descriptor in the agent.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    // Failure leaves the limit as it was.
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
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
    let tunnel_fd = sys::inherited_fd(args.tunnel_fd);
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
