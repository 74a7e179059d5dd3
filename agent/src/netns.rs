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
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
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
    // SAFETY: setns on the calling thread only; `netns` is an open namespace descriptor.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sets an int-valued socket option.
pub fn set_int_option(fd: BorrowedFd<'_>, level: i32, name: i32, value: libc::c_int) -> std::io::Result<()> {
    // SAFETY: setsockopt reads one int from `value`; `fd` is borrowed, so open.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Lets an IPv6 socket carry IPv4 too (v4-mapped addresses), whatever the namespace's default.
pub fn set_dual_stack(fd: &OwnedFd) -> std::io::Result<()> {
    set_int_option(fd.as_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)
}

fn new_socket(domain: i32, kind: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) with plain integer arguments; the result is checked before use.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if kind == libc::SOCK_STREAM {
        // Every TCP socket of the agent relays bytes that must not wait for Nagle. Set here, on
        // the stocking thread, it costs a pod connect nothing (a listener passes it on to the
        // connections it accepts).
        set_int_option(fd.as_fd(), libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
    }
    Ok(fd)
}

/// The addresses of every interface of the calling thread's network namespace (loopback's
/// included): what a target in that namespace can be reached at.
pub fn interface_addresses() -> std::io::Result<Vec<std::net::IpAddr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list that we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut at = list;
    while !at.is_null() {
        // SAFETY: `at` is a node of the list getifaddrs returned, not freed yet.
        let entry = unsafe { &*at };
        if !entry.ifa_addr.is_null() {
            // SAFETY: a non-null ifa_addr points to a sockaddr whose family says its real type.
            match i32::from(unsafe { (*entry.ifa_addr).sa_family }) {
                libc::AF_INET => {
                    // SAFETY: AF_INET: a sockaddr_in.
                    let sin = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
                    out.push(std::net::IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()));
                }
                libc::AF_INET6 => {
                    // SAFETY: AF_INET6: a sockaddr_in6.
                    let sin6 = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in6) };
                    out.push(std::net::IpAddr::from(sin6.sin6_addr.s6_addr));
                }
                _ => {}
            }
        }
        at = entry.ifa_next;
    }
    // SAFETY: the list came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
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

    fn int_option(fd: &OwnedFd, level: i32, name: i32) -> i32 {
        let mut value: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes one int into `value`.
        let rc = unsafe {
            libc::getsockopt(fd.as_raw_fd(), level, name, (&mut value as *mut libc::c_int).cast(), &mut len)
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        value
    }

    #[test]
    fn tcp_sockets_come_without_nagle_and_non_blocking() {
        let tcp = new_socket(libc::AF_INET6, libc::SOCK_STREAM).unwrap();
        assert_eq!(int_option(&tcp, libc::IPPROTO_TCP, libc::TCP_NODELAY), 1);
        // SAFETY: F_GETFL has no pointer arguments.
        let flags = unsafe { libc::fcntl(tcp.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(flags & libc::O_NONBLOCK, 0);
        let udp = new_socket(libc::AF_INET, libc::SOCK_DGRAM).unwrap();
        assert_eq!(int_option(&udp, libc::SOL_SOCKET, libc::SO_TYPE), libc::SOCK_DGRAM);
    }
}
