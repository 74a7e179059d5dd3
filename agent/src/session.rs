//! One session: handshake, then serve requests and stream opens until the supervisor leaves or
//! the target exits.

use crate::incoming::IncomingService;
use crate::{dns, env, files, netns::NetnsWorker, outgoing, target::Target};
use anyhow::{Context, Result, bail};
use kmirror_protocol::tunnel::{self, Incoming, Side, Tunnel};
use kmirror_protocol::{Control, Errno, HelloReply, Request, Response, constant_time_eq, negotiate_version};
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

/// Capabilities this agent offers; the supervisor only uses what is listed.
const CAPABILITIES: &[&str] = &["env", "files", "dns", "outgoing-tcp", "outgoing-udp", "incoming"];

pub async fn serve(tunnel_fd: OwnedFd, token: Vec<u8>, target: Target, netns: NetnsWorker) -> Result<()> {
    let socket = std::os::unix::net::UnixStream::from(tunnel_fd);
    let (mut reader, mut writer) = kmirror_protocol::link::split(socket).context("tunnel socket")?;

    let hello = tokio::time::timeout(Duration::from_secs(30), tunnel::read_control(&mut reader))
        .await
        .context("no handshake from the supervisor within 30 s")??;
    let Control::Hello(hello) = hello else { bail!("the first message was not a handshake") };
    let verdict = if !constant_time_eq(&hello.token, &token) {
        Err("wrong session token".to_string())
    } else {
        negotiate_version(hello.min_version, hello.max_version).ok_or_else(|| {
            format!(
                "no common protocol version (supervisor speaks {}..={}, agent {}..={})",
                hello.min_version,
                hello.max_version,
                kmirror_protocol::MIN_PROTOCOL_VERSION,
                kmirror_protocol::PROTOCOL_VERSION
            )
        })
    };
    let version = match verdict {
        Ok(version) => version,
        Err(reason) => {
            tracing::warn!("rejecting session: {reason}");
            tunnel::write_control(
                &mut writer,
                Control::HelloReply(HelloReply::Rejected { reason: reason.clone() }),
            )
            .await?;
            bail!("rejected a session: {reason}");
        }
    };
    tunnel::write_control(
        &mut writer,
        Control::HelloReply(HelloReply::Accepted {
            version,
            capabilities: CAPABILITIES.iter().map(|c| c.to_string()).collect(),
            target: format!("pid/{}", target.pid),
        }),
    )
    .await?;

    let (tunnel, mut incoming) = Tunnel::start(reader, writer, Side::Agent);
    let target = Arc::new(target);
    let nameservers = Arc::new(pod_nameservers(&target));
    let exited = target.exit_watch()?;
    let allow_host_network = hello.capabilities.iter().any(|c| c == kmirror_protocol::ALLOW_HOST_NETWORK);
    let incoming_service =
        IncomingService::new(tunnel.clone(), netns.clone(), target.netns.try_clone()?, allow_host_network);

    loop {
        tokio::select! {
            message = incoming.recv() => match message {
                Some(Incoming::Request { id, body: Request::Subscribe { port, mode, filter } }) => {
                    let (tunnel, service) = (tunnel.clone(), incoming_service.clone());
                    tokio::spawn(async move {
                        let answer = match service.subscribe(port, mode, filter).await {
                            Ok(()) => Response::Subscribed,
                            Err(errno) => Response::Error(errno),
                        };
                        tunnel.respond(id, answer);
                    });
                }
                Some(Incoming::Request { id, body }) => {
                    let (tunnel, target, netns, nameservers) =
                        (tunnel.clone(), target.clone(), netns.clone(), nameservers.clone());
                    tokio::spawn(async move {
                        let answer = answer(body, &target, &netns, &nameservers).await;
                        tunnel.respond(id, answer);
                    });
                }
                Some(Incoming::Open { stream, target }) => {
                    tokio::spawn(outgoing::open(netns.clone(), stream, target));
                }
                Some(Incoming::Goodbye { reason }) => {
                    tracing::info!("supervisor ended the session: {reason}");
                    incoming_service.shutdown().await;
                    return Ok(());
                }
                None => {
                    tracing::info!("tunnel closed: {}", tunnel.closed().await);
                    incoming_service.shutdown().await;
                    return Ok(());
                }
            },
            _ = exited.readable() => {
                let reason = format!("target process {} exited", target.pid);
                incoming_service.shutdown().await;
                tunnel.goodbye(reason.clone());
                // Let the writer flush the goodbye before the process ends.
                tokio::time::sleep(Duration::from_millis(100)).await;
                bail!(reason);
            }
        }
    }
}

fn pod_nameservers(target: &Target) -> Vec<IpAddr> {
    match files::read_chunk(&target.root, b"/etc/resolv.conf", 0, files::MAX_READ_CHUNK) {
        Ok((bytes, _)) => dns::nameservers(&String::from_utf8_lossy(&bytes)),
        Err(errno) => {
            tracing::warn!("the target has no readable /etc/resolv.conf (errno {}): DNS will fail", errno.0);
            Vec::new()
        }
    }
}

async fn answer(
    request: Request,
    target: &Arc<Target>,
    netns: &NetnsWorker,
    nameservers: &[IpAddr],
) -> Response {
    if let Request::Dns { query, tcp } = &request {
        return match dns::forward(netns, nameservers, query, *tcp).await {
            Ok(reply) => Response::Dns(reply),
            Err(errno) => Response::Error(errno),
        };
    }
    let target = target.clone();
    tokio::task::spawn_blocking(move || file_or_env(request, &target))
        .await
        .unwrap_or(Response::Error(Errno(libc::EIO)))
}

fn file_or_env(request: Request, target: &Target) -> Response {
    let result = match request {
        Request::Environ => env::read_environ(target.pid).map(Response::Environ),
        Request::Stat { path, follow } => files::stat(&target.root, &path, follow).map(Response::Stat),
        Request::ReadFile { path, offset, len } => files::read_chunk(&target.root, &path, offset, len)
            .map(|(bytes, eof)| Response::FileChunk { bytes, eof }),
        Request::Access { path, mode } => files::access(&target.root, &path, mode).map(|()| Response::Access),
        Request::ReadLink { path } => files::read_link(&target.root, &path).map(Response::ReadLink),
        Request::ListDir { path } => files::list_dir(&target.root, &path).map(Response::ListDir),
        Request::Dns { .. } | Request::Subscribe { .. } => Err(Errno(libc::EINVAL)),
    };
    result.unwrap_or_else(Response::Error)
}
