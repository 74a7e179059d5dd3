//! Creating sockets inside the target's network namespace.
//!
//! Namespaces are per thread, and a socket stays in the namespace it was created in. One
//! dedicated thread enters the target's network namespace with `setns` and creates sockets on
//! request; everything else (connecting, relaying) runs on tokio in the agent's own namespace,
//! which is harmless because the socket already belongs to the pod's stack.

use crate::target::Target;
use anyhow::{Context, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use tokio::sync::oneshot;

struct SocketRequest {
    domain: i32,
    kind: i32,
    reply: oneshot::Sender<std::io::Result<OwnedFd>>,
}

#[derive(Clone)]
pub struct NetnsWorker {
    requests: mpsc::Sender<SocketRequest>,
}

impl NetnsWorker {
    pub fn start(target: &Target) -> Result<NetnsWorker> {
        let netns = target.netns.try_clone().context("dup of the netns descriptor")?;
        let (tx, rx) = mpsc::channel::<SocketRequest>();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("kmirror-netns".into())
            .spawn(move || {
                // SAFETY: setns on this thread only; `netns` is an open namespace descriptor.
                let entered = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
                let _ =
                    ready_tx.send(if entered == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) });
                if entered != 0 {
                    return;
                }
                for request in rx {
                    let _ = request.reply.send(new_socket(request.domain, request.kind));
                }
            })
            .context("cannot start the network-namespace thread")?;
        ready_rx
            .recv()
            .context("the network-namespace thread died")?
            .context("cannot enter the target's network namespace (the agent needs CAP_SYS_ADMIN)")?;
        Ok(NetnsWorker { requests: tx })
    }

    /// A new non-blocking, close-on-exec socket that lives in the target's network namespace.
    pub async fn socket(&self, domain: i32, kind: i32) -> std::io::Result<OwnedFd> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(SocketRequest { domain, kind, reply })
            .map_err(|_| std::io::Error::other("network-namespace thread is gone"))?;
        rx.await.map_err(|_| std::io::Error::other("network-namespace thread is gone"))?
    }
}

/// Moves the calling thread into the network namespace `netns`.
pub fn enter(netns: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: setns on the calling thread only; `netns` is an open namespace descriptor.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn new_socket(domain: i32, kind: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) with plain integer arguments; the result is checked before use.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
