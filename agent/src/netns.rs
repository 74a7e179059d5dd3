//! Creating sockets inside the target's network namespace.
//!
//! Namespaces are per thread, and a socket stays in the namespace it was created in. One
//! dedicated thread enters the target's network namespace with `setns` and creates sockets;
//! everything else (connecting, relaying) runs on tokio in the agent's own namespace, which is
//! harmless because the socket already belongs to the pod's stack.
//!
//! A hop to that thread and back costs two cross-CPU wake-ups on every pod connection, so the
//! thread keeps a small stock of fresh sockets per kind. It is refilled once half of it is
//! used, not after each socket taken: waking the thread mid-connect competes with the connect
//! itself for the CPU. An unused socket in stock is just an unbound descriptor.

use crate::target::Target;
use anyhow::{Context, Result};
use nix::sys::socket::{setsockopt, sockopt};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, mpsc};
use tokio::sync::oneshot;

/// Sockets kept ready per (domain, type).
const STOCK: usize = 16;
/// The stock is topped up when it falls to this many.
const LOW_WATER: usize = STOCK / 2;

type Stock = Arc<Mutex<HashMap<(i32, i32), Vec<OwnedFd>>>>;

enum Job {
    /// Create one socket now and hand it back.
    Create { domain: i32, kind: i32, reply: oneshot::Sender<std::io::Result<OwnedFd>> },
    /// Top the stock of this kind up.
    Refill { domain: i32, kind: i32 },
}

#[derive(Clone)]
pub struct NetnsWorker {
    jobs: mpsc::Sender<Job>,
    stock: Stock,
}

impl NetnsWorker {
    pub fn start(target: &Target) -> Result<NetnsWorker> {
        let netns = target.netns.try_clone().context("dup of the netns descriptor")?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let stock = Stock::default();
        let thread_stock = stock.clone();
        std::thread::Builder::new()
            .name("kmirror-netns".into())
            .spawn(move || {
                let entered = enter(&netns);
                let failed = entered.is_err();
                let _ = ready_tx.send(entered);
                if failed {
                    return;
                }
                for job in rx {
                    match job {
                        Job::Create { domain, kind, reply } => {
                            let _ = reply.send(new_socket(domain, kind));
                        }
                        Job::Refill { domain, kind } => refill(&thread_stock, domain, kind),
                    }
                }
            })
            .context("cannot start the network-namespace thread")?;
        ready_rx
            .recv()
            .context("the network-namespace thread died")?
            .context("cannot enter the target's network namespace (the agent needs CAP_SYS_ADMIN)")?;
        Ok(NetnsWorker { jobs, stock })
    }

    /// A new non-blocking, close-on-exec socket that lives in the target's network namespace.
    pub async fn socket(&self, domain: i32, kind: i32) -> std::io::Result<OwnedFd> {
        let (stocked, left) = {
            let mut stock = lock(&self.stock);
            let kind_stock = stock.entry((domain, kind)).or_default();
            (kind_stock.pop(), kind_stock.len())
        };
        if left <= LOW_WATER {
            let _ = self.jobs.send(Job::Refill { domain, kind });
        }
        if let Some(fd) = stocked {
            return Ok(fd);
        }
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::Create { domain, kind, reply })
            .map_err(|_| std::io::Error::other("network-namespace thread is gone"))?;
        rx.await.map_err(|_| std::io::Error::other("network-namespace thread is gone"))?
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn refill(stock: &Stock, domain: i32, kind: i32) {
    loop {
        if lock(stock).get(&(domain, kind)).map_or(0, Vec::len) >= STOCK {
            return;
        }
        match new_socket(domain, kind) {
            Ok(fd) => lock(stock).entry((domain, kind)).or_default().push(fd),
            Err(_) => return,
        }
    }
}

/// Moves the calling thread into the network namespace `netns`.
pub fn enter(netns: &OwnedFd) -> std::io::Result<()> {
    Ok(nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)?)
}

/// Lets an IPv6 socket carry IPv4 too (v4-mapped addresses), whatever the namespace's default.
pub fn set_dual_stack(fd: &OwnedFd) -> std::io::Result<()> {
    Ok(setsockopt(fd, sockopt::Ipv6V6Only, &false)?)
}

fn new_socket(domain: i32, kind: i32) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType};
    // The kernel's answers for a family or type it does not know.
    let family = AddressFamily::from_i32(domain)
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EAFNOSUPPORT))?;
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    let fd = nix::sys::socket::socket(family, SockType::try_from(kind)?, flags, None)?;
    if kind == libc::SOCK_STREAM {
        // Every TCP socket of the agent relays bytes that must not wait for Nagle. Set here, on
        // the stocking thread, it costs a pod connect nothing (a listener passes it on to the
        // connections it accepts).
        setsockopt(&fd, sockopt::TcpNoDelay, &true)?;
    }
    Ok(fd)
}

/// The addresses of every interface of the calling thread's network namespace (loopback's
/// included): what a target in that namespace can be reached at.
pub fn interface_addresses() -> std::io::Result<Vec<std::net::IpAddr>> {
    let mut out = Vec::new();
    for entry in nix::ifaddrs::getifaddrs()? {
        let Some(addr) = entry.address else { continue };
        if let Some(sin) = addr.as_sockaddr_in() {
            out.push(sin.ip().into());
        } else if let Some(sin6) = addr.as_sockaddr_in6() {
            out.push(sin6.ip().into());
        }
    }
    Ok(out)
}

/// Whether `netns` (a `/proc/<pid>/ns/net` descriptor) is the host's network namespace: the one
/// PID 1 (the node's init) lives in, when the agent can see it, or the agent's own (kmirror
/// starts the agent for local targets in the network namespace kmirror itself runs in; an
/// agent pod has a namespace of its own). `None` when neither can be read.
pub fn is_host_namespace(netns: &OwnedFd) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let id = |m: std::fs::Metadata| (m.dev(), m.ino());
    let target = id(std::fs::File::from(netns.try_clone().ok()?).metadata().ok()?);
    // /proc/self: the thread-group leader, which never enters another namespace.
    let hosts: Vec<_> = ["/proc/1/ns/net", "/proc/self/ns/net"]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok().map(id))
        .collect();
    if hosts.is_empty() {
        return None;
    }
    Some(hosts.contains(&target))
}

#[cfg(test)]
mod tests {
    use super::*;

    use nix::sys::socket::getsockopt;

    #[test]
    fn tcp_sockets_come_without_nagle_and_non_blocking() {
        let tcp = new_socket(libc::AF_INET6, libc::SOCK_STREAM).unwrap();
        assert!(getsockopt(&tcp, sockopt::TcpNoDelay).unwrap());
        let flags = nix::fcntl::fcntl(&tcp, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_ne!(flags & libc::O_NONBLOCK, 0);
        let udp = new_socket(libc::AF_INET, libc::SOCK_DGRAM).unwrap();
        assert_eq!(getsockopt(&udp, sockopt::SockType).unwrap(), nix::sys::socket::SockType::Datagram);
    }
}
