//! Starting the agent for a local target and opening the tunnel to it.

use anyhow::{Context as _, Result, bail};
use kmirror_protocol::tunnel::{self, Incoming, Side, Tunnel};
use kmirror_protocol::{Control, Hello, HelloReply, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;

pub struct Agent {
    pub tunnel: Tunnel,
    pub incoming: mpsc::Receiver<Incoming>,
    pub child: tokio::process::Child,
}

/// The agent binary: `KMIRROR_AGENT` if set, else `kmirror-agent` beside this executable.
fn agent_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("KMIRROR_AGENT") {
        return Ok(PathBuf::from(path));
    }
    let me = std::env::current_exe().context("cannot locate the kmirror executable")?;
    let path = me.with_file_name("kmirror-agent");
    if !path.exists() {
        bail!(
            "the agent binary {} is missing: install kmirror-agent next to kmirror, or set \
             KMIRROR_AGENT to its path",
            path.display()
        );
    }
    Ok(path)
}

/// Clears close-on-exec: children spawned from now on inherit `fd`.
fn make_inheritable(fd: impl std::os::fd::AsFd) -> std::io::Result<()> {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))?;
    Ok(())
}

/// Spawns the agent for process `pid` and completes the handshake. `allow_host_network`: the
/// user allows incoming traffic of a target in the host's network namespace.
pub async fn start_local(pid: u32, allow_host_network: bool) -> Result<Agent> {
    let binary = agent_binary()?;
    let token = crate::random::token();
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().context("socketpair for the agent")?;
    let their_fd = theirs.as_raw_fd();
    // The token goes through a pipe: in the agent's environment it would stay readable in
    // /proc/<agent>/environ for the agent's whole life. It fits the pipe's buffer, so the
    // write end can be closed before the agent starts.
    let (token_read, mut token_write) = std::io::pipe().context("pipe for the session token")?;
    std::io::Write::write_all(&mut token_write, token.as_bytes()).context("cannot pass the session token")?;
    drop(token_write);
    let mut command = tokio::process::Command::new(&binary);
    command
        .arg("--tunnel-fd")
        .arg(their_fd.to_string())
        .arg("--token-fd")
        .arg(token_read.as_raw_fd().to_string())
        .arg("--target-pid")
        .arg(pid.to_string())
        .env_remove("KMIRROR_SESSION_TOKEN")
        .stdin(std::process::Stdio::null())
        // A group of its own: a terminal's Ctrl-C is for the app's foreground group, and the
        // agent must keep serving the app's processes that outlive it (it ends with kmirror).
        .process_group(0)
        .kill_on_drop(true);
    // The agent inherits its tunnel end: close-on-exec is cleared on it for this spawn only,
    // and nothing else is spawned meanwhile (the app starts after the handshake). With no code
    // to run between fork and exec (the agent ties its life to ours itself, `--parent-pid`),
    // the spawn takes the posix_spawn path (a vfork, no copy of our page tables): 0.15 ms
    // less before the app starts, measured over 240 runs.
    make_inheritable(&theirs).context("cannot pass the tunnel to the agent")?;
    make_inheritable(&token_read).context("cannot pass the session token to the agent")?;
    command.arg("--parent-pid").arg(std::process::id().to_string());
    let spawned = command.spawn();
    drop(theirs);
    drop(token_read);
    let child = spawned.with_context(|| format!("cannot start the agent {}", binary.display()))?;

    let (mut reader, mut writer) = kmirror_protocol::link::split(ours)?;
    let hello = Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        token: token.into_bytes(),
        capabilities: ["outgoing", "dns", "files", "env"]
            .into_iter()
            .chain(allow_host_network.then_some(kmirror_protocol::ALLOW_HOST_NETWORK))
            .map(String::from)
            .collect(),
    };
    tunnel::write_control(&mut writer, Control::Hello(hello)).await.context("cannot reach the agent")?;
    let reply = tokio::time::timeout(Duration::from_secs(30), tunnel::read_control(&mut reader))
        .await
        .context("the agent did not answer the handshake within 30 s")?
        .context("the agent ended the session during the handshake (see its message above)")?;
    let version = match reply {
        Control::HelloReply(HelloReply::Accepted { version, capabilities, target }) => {
            tracing::debug!(version, ?capabilities, target, "agent ready");
            if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
                bail!(
                    "the agent chose protocol version {version}, outside this kmirror's \
                     {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}: install matching versions"
                );
            }
            version
        }
        Control::HelloReply(HelloReply::Rejected { reason }) => {
            bail!("the agent refused the session: {reason}")
        }
        other => bail!("unexpected first message from the agent: {other:?}"),
    };
    let (tunnel, incoming) = Tunnel::start_with_version(reader, writer, Side::Supervisor, version);
    Ok(Agent { tunnel, incoming, child })
}
