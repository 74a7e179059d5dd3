//! One session: handshake, then serve requests and stream opens until the supervisor leaves or
//! the target exits.

use crate::incoming::IncomingService;
use crate::{dns, env, files, identity, netns::NetnsWorker, outgoing, target::Target, writes};
use anyhow::{Context, Result, bail};
use kmirror_protocol::tunnel::{self, Incoming, Side, Tunnel};
use kmirror_protocol::{
    Control, Errno, HelloReply, Identity, Request, Response, constant_time_eq, negotiate_version,
};
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Requests served at once. File requests each hold a blocking thread and at most one 512 KiB
/// chunk, so this also bounds the agent's threads and buffers for them (about 16 MiB).
pub const MAX_CONCURRENT_REQUESTS: usize = 32;
/// Requests taken from the tunnel that wait for one of those slots (a task each, no thread).
/// Beyond it the agent stops taking messages and requests wait in the tunnel (see `serve`):
/// a burst of lookups does not hold up stream opens and relays until it is that deep.
const MAX_PENDING_REQUESTS: usize = 256;
/// How long the agent waits for the pod's resolv.conf before DNS gives up on it.
const RESOLV_CONF_TIMEOUT: Duration = Duration::from_secs(5);

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

    let (tunnel, mut incoming) = Tunnel::start_with_version(reader, writer, Side::Agent, version);
    let target = Arc::new(target);
    let handles = files::SharedHandles::default();
    // The pod's resolv.conf is read off the runtime thread (a stalled network file system must
    // not hang the agent), once, while the first DNS query may already wait for it.
    let nameservers: Nameservers = Arc::default();
    tokio::spawn({
        let (nameservers, target) = (nameservers.clone(), target.clone());
        async move {
            nameservers.get_or_init(|| pod_nameservers(target)).await;
        }
    });
    let exited = target.exit_watch()?;
    let allow_host_network = hello.capabilities.iter().any(|c| c == kmirror_protocol::ALLOW_HOST_NETWORK);
    let incoming_service =
        IncomingService::new(tunnel.clone(), netns.clone(), target.netns.try_clone()?, allow_host_network);
    let running = Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS));
    let pending = Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS + MAX_PENDING_REQUESTS));

    loop {
        // A request is taken only with a pending slot, acquired before the next message is
        // read: at the bound the tunnel's incoming queue fills and its reader stops reading the
        // socket, so a flood of requests waits in the supervisor, not in the agent's memory.
        // It then runs once one of the running slots is free: threads stay bounded too.
        let permit = tokio::select! {
            permit = pending.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = exited.readable() => return target_exited(&target, &tunnel, &incoming_service).await,
        };
        tokio::select! {
            message = incoming.recv() => match message {
                Some(Incoming::Request { id, body: Request::Subscribe { port, mode, filter }, caller: None }) => {
                    let (tunnel, service, running) = (tunnel.clone(), incoming_service.clone(), running.clone());
                    tokio::spawn(async move {
                        let _running = running.acquire().await.expect("the semaphore is never closed");
                        let answer = match service.subscribe(port, mode, filter).await {
                            Ok(()) => Response::Subscribed,
                            Err(errno) => Response::Error(errno),
                        };
                        tunnel.respond(id, answer).await;
                        drop(permit);
                    });
                }
                Some(Incoming::Request { id, body, caller }) => {
                    let (tunnel, target, netns, nameservers, handles, running) = (
                        tunnel.clone(),
                        target.clone(),
                        netns.clone(),
                        nameservers.clone(),
                        handles.clone(),
                        running.clone(),
                    );
                    tokio::spawn(async move {
                        let _running = running.acquire().await.expect("the semaphore is never closed");
                        let answer = match caller {
                            None => answer(body, &target, &netns, &nameservers, &handles).await,
                            Some(caller) => answer_as(caller, body, &target, &handles).await,
                        };
                        tunnel.respond(id, answer).await;
                        drop(permit);
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
            _ = exited.readable() => return target_exited(&target, &tunnel, &incoming_service).await,
        }
    }
}

async fn target_exited(
    target: &Target,
    tunnel: &Tunnel,
    incoming_service: &Arc<IncomingService>,
) -> Result<()> {
    let reason = format!("target process {} exited", target.pid);
    incoming_service.shutdown().await;
    tunnel.goodbye(reason.clone());
    // Let the writer flush the goodbye before the process ends.
    tokio::time::sleep(Duration::from_millis(100)).await;
    bail!(reason);
}

/// The pod's nameservers, read once.
type Nameservers = Arc<tokio::sync::OnceCell<Vec<IpAddr>>>;

async fn pod_nameservers(target: Arc<Target>) -> Vec<IpAddr> {
    let read = tokio::task::spawn_blocking(move || {
        files::read_chunk(&target.root, b"/etc/resolv.conf", 0, files::MAX_READ_CHUNK)
    });
    match tokio::time::timeout(RESOLV_CONF_TIMEOUT, read).await {
        Ok(Ok(Ok((bytes, _)))) => dns::nameservers(&String::from_utf8_lossy(&bytes)),
        Ok(Ok(Err(errno))) => {
            tracing::warn!("the target has no readable /etc/resolv.conf (errno {}): DNS will fail", errno.0);
            Vec::new()
        }
        Ok(Err(e)) => {
            tracing::warn!("reading the target's /etc/resolv.conf failed ({e}): DNS will fail");
            Vec::new()
        }
        Err(_) => {
            tracing::warn!(
                "the target's /etc/resolv.conf could not be read within {RESOLV_CONF_TIMEOUT:?} \
                 (a stalled file system?): DNS will fail"
            );
            Vec::new()
        }
    }
}

async fn answer(
    request: Request,
    target: &Arc<Target>,
    netns: &NetnsWorker,
    nameservers: &Nameservers,
    handles: &files::SharedHandles,
) -> Response {
    if let Request::Dns { query, tcp } = &request {
        let target = target.clone();
        let servers = nameservers.get_or_init(|| pod_nameservers(target)).await;
        return match dns::forward(netns, servers, query, *tcp).await {
            Ok(reply) => Response::Dns(reply),
            Err(errno) => Response::Error(errno),
        };
    }
    let (target, handles) = (target.clone(), handles.clone());
    tokio::task::spawn_blocking(move || match creating_umask(&request) {
        // Never with the agent's own umask: with the one the request carries.
        Some(umask) => kmirror_protocol::creds::on_own_thread(
            || kmirror_protocol::creds::take_umask(umask),
            || file_or_env(request, &target, &handles),
        )
        .unwrap_or_else(|errno| Response::Error(Errno(errno))),
        None => file_or_env(request, &target, &handles),
    })
    .await
    .unwrap_or(Response::Error(Errno(libc::EIO)))
}

/// The umask under which a request creates files, if it creates any.
fn creating_umask(request: &Request) -> Option<u32> {
    match request {
        Request::OpenWrite { flags, umask, .. } if *flags & libc::O_CREAT as u32 != 0 => Some(*umask),
        Request::MakeDir { umask, .. } => Some(*umask),
        _ => None,
    }
}

/// A pod-file request served with the app's credentials (see `identity`); a request that
/// names no pod path cannot be made so (EINVAL).
async fn answer_as(
    caller: Identity,
    request: Request,
    target: &Arc<Target>,
    handles: &files::SharedHandles,
) -> Response {
    if !request.names_pod_path() {
        return Response::Error(Errno(libc::EINVAL));
    }
    let (target, handles) = (target.clone(), handles.clone());
    tokio::task::spawn_blocking(move || {
        let served = match creating_umask(&request) {
            Some(umask) => identity::run_creating(&caller, umask, || file_or_env(request, &target, &handles)),
            None => identity::run_as(&caller, || file_or_env(request, &target, &handles)),
        };
        served.unwrap_or_else(Response::Error)
    })
    .await
    .unwrap_or(Response::Error(Errno(libc::EIO)))
}

fn file_or_env(request: Request, target: &Target, handles: &files::SharedHandles) -> Response {
    let result = match request {
        Request::Environ => env::read_environ(target).map(Response::Environ),
        Request::Stat { path, follow } => files::stat(&target.root, &path, follow).map(Response::Stat),
        Request::ReadFile { path, offset, len } => files::read_chunk(&target.root, &path, offset, len)
            .map(|(bytes, eof)| Response::FileChunk { bytes, eof }),
        Request::Access { path, mode } => {
            files::access(&target.root, &path, mode, true).map(|()| Response::Access)
        }
        Request::AccessAt { path, mode, follow } => {
            files::access(&target.root, &path, mode, follow).map(|()| Response::Access)
        }
        Request::ReadLink { path } => files::read_link(&target.root, &path).map(Response::ReadLink),
        Request::ListDir { path } => files::list_dir(&target.root, &path).map(Response::ListDir),
        Request::OpenFile { path, follow } => files::open_file(handles, &target.root, &path, follow)
            .map(|(handle, stat, bytes)| Response::FileOpened { handle, stat, bytes }),
        Request::ReadHandle { handle, len } => {
            files::read_handle(handles, handle, len).map(|(bytes, eof)| Response::FileChunk { bytes, eof })
        }
        Request::OpenDir { path } => files::open_dir(handles, &target.root, &path)
            .map(|(entries, more)| Response::DirEntries { entries, more }),
        Request::ReadDir { handle } => {
            files::read_dir(handles, handle).map(|(entries, more)| Response::DirEntries { entries, more })
        }
        Request::CloseHandle { handle } => files::Handles::close(handles, handle).map(|()| Response::Closed),
        Request::OpenWrite { path, flags, mode, umask: _ } => {
            writes::open_write(handles, &target.root, &path, flags, mode).map(|o| Response::WriteOpened {
                handle: o.handle,
                stat: o.stat,
                bytes: o.bytes,
                more: o.more,
            })
        }
        Request::WriteHandle { handle, offset, bytes } => {
            writes::write_handle(handles, handle, offset, &bytes).map(Response::Written)
        }
        Request::TruncateHandle { handle, len } => {
            writes::truncate_handle(handles, handle, len).map(|()| Response::Done)
        }
        Request::SyncHandle { handle, data_only } => {
            writes::sync_handle(handles, handle, data_only).map(|()| Response::Done)
        }
        Request::Rename { from, to, flags } => {
            writes::rename(&target.root, &from, &to, flags).map(|()| Response::Done)
        }
        Request::Unlink { path, dir } => writes::unlink(&target.root, &path, dir).map(|()| Response::Done),
        Request::MakeDir { path, mode, umask: _ } => {
            writes::make_dir(&target.root, &path, mode).map(|()| Response::Done)
        }
        Request::Symlink { target: link, path } => {
            writes::symlink(&target.root, &link, &path).map(|()| Response::Done)
        }
        Request::Truncate { path, len } => {
            writes::truncate(&target.root, &path, len).map(|()| Response::Done)
        }
        Request::Dns { .. } | Request::Subscribe { .. } => Err(Errno(libc::EINVAL)),
    };
    result.unwrap_or_else(Response::Error)
}
