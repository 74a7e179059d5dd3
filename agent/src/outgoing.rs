//! Outgoing connections made on the app's behalf from the pod's network namespace.

use crate::netns::NetnsWorker;
use kmirror_protocol::tunnel::Inbound;
use kmirror_protocol::tunnel::Stream;
use kmirror_protocol::{Errno, OpenTarget, SocketOptions, decode_addressed, encode_addressed};
use nix::sys::socket::{setsockopt, sockopt};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Duration;

/// A UDP flow with no traffic in either direction for this long is closed.
const UDP_IDLE: Duration = Duration::from_secs(120);

fn domain(addr: &SocketAddr) -> i32 {
    if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 }
}

fn errno_of(e: &std::io::Error) -> Errno {
    Errno(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Answers the open with success and, so the app's `getsockname` can show it, the pod-side
/// socket's own address.
fn opened_at(stream: &Stream, local: std::io::Result<std::net::SocketAddr>) {
    match local {
        Ok(local) => stream.opened_at(local),
        Err(_) => stream.opened(Ok(())),
    }
}

/// Gives the pod-side socket the app socket's options, before it connects (so TCP_USER_TIMEOUT
/// bounds the handshake too, as on the app's socket).
fn apply_options(fd: BorrowedFd<'_>, options: &SocketOptions) -> std::io::Result<()> {
    if options.keepalive {
        setsockopt(&fd, sockopt::KeepAlive, &true)?;
    }
    // The kernel takes these as ints.
    let int = |value: u32| value.min(i32::MAX as u32);
    if let Some(value) = options.keep_idle {
        setsockopt(&fd, sockopt::TcpKeepIdle, &int(value))?;
    }
    if let Some(value) = options.keep_interval {
        setsockopt(&fd, sockopt::TcpKeepInterval, &int(value))?;
    }
    if let Some(value) = options.keep_count {
        setsockopt(&fd, sockopt::TcpKeepCount, &int(value))?;
    }
    if let Some(value) = options.user_timeout {
        setsockopt(&fd, sockopt::TcpUserTimeout, &int(value))?;
    }
    Ok(())
}

pub async fn open(netns: NetnsWorker, stream: Stream, target: OpenTarget) {
    match target {
        OpenTarget::Tcp(addr) => open_tcp(netns, stream, addr, SocketOptions::default()).await,
        OpenTarget::TcpWith { addr, options } => open_tcp(netns, stream, addr, options).await,
        OpenTarget::UdpUnconnected { v6, v6_only } => open_udp_unconnected(netns, stream, v6, v6_only).await,
        OpenTarget::Incoming { .. } => {
            // Only the agent opens incoming streams.
            stream.opened(Err(Errno(libc::EINVAL)));
        }
        OpenTarget::Udp(addr) => {
            let connected = async {
                let fd = netns.socket(domain(&addr), libc::SOCK_DGRAM).await?;
                let socket = tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(fd))?;
                socket.connect(addr).await?;
                Ok::<_, std::io::Error>(socket)
            };
            match connected.await {
                Ok(socket) => {
                    opened_at(&stream, socket.local_addr());
                    stream.relay_udp(socket, UDP_IDLE).await;
                }
                Err(e) => stream.opened(Err(errno_of(&e))),
            }
        }
    }
}

/// The pod side of an app's unconnected UDP socket: one socket, bound at once to a port of
/// its own, that sends each datagram where the supervisor says and passes on every datagram it
/// receives with its sender, whoever that is, as the app's socket in the pod would receive it.
async fn open_udp_unconnected(netns: NetnsWorker, mut stream: Stream, v6: bool, v6_only: bool) {
    let bound = async {
        let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        let fd = netns.socket(domain, libc::SOCK_DGRAM).await?;
        if v6 {
            setsockopt(&fd, sockopt::Ipv6V6Only, &v6_only)?;
        }
        let socket = tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(fd))?;
        let any: SocketAddr =
            if v6 { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() } else { ([0, 0, 0, 0], 0).into() };
        bind_to(&socket, any)?;
        Ok::<_, std::io::Error>(socket)
    };
    let socket = match bound.await {
        Ok(socket) => socket,
        Err(e) => return stream.opened(Err(errno_of(&e))),
    };
    opened_at(&stream, socket.local_addr());
    let mut buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            received = socket.recv_from(&mut buf) => match received {
                Ok((n, from)) => {
                    let from = canonical(from);
                    if stream.send(&encode_addressed(from, &buf[..n])).await.is_err() {
                        return;
                    }
                }
                // An ICMP error of an earlier send: the app's unconnected socket would not see it.
                Err(_) => continue,
            },
            event = stream.recv() => match event {
                Inbound::Data(frame) => {
                    if let Some((to, payload)) = decode_addressed(&frame) {
                        let to = if v6 { mapped(to) } else { to };
                        let _ = socket.send_to(payload, to).await;
                    }
                    stream.grant(frame.len());
                }
                Inbound::Shutdown => {}
                Inbound::Reset => return,
            },
            _ = tokio::time::sleep(UDP_IDLE) => break,
        }
    }
    stream.reset();
}

/// Binds an unbound tokio UDP socket (the worker hands out unbound ones).
fn bind_to(socket: &tokio::net::UdpSocket, addr: SocketAddr) -> std::io::Result<()> {
    Ok(nix::sys::socket::bind(socket.as_raw_fd(), &nix::sys::socket::SockaddrStorage::from(addr))?)
}

/// An IPv4 address as a dual-stack IPv6 socket needs it.
fn mapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    }
}

/// A v4-mapped IPv6 address as the IPv4 address it is.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

async fn open_tcp(netns: NetnsWorker, mut stream: Stream, addr: SocketAddr, options: SocketOptions) {
    let connecting = async {
        let fd = netns.socket(domain(&addr), libc::SOCK_STREAM).await?;
        apply_options(fd.as_fd(), &options)?;
        let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
        socket.connect(addr).await
    };
    // No timer here: the pod's kernel bounds the connect with its own SYN retries, as
    // it would for the app inside the pod, and the supervisor resets the stream when
    // the app's budget runs out first. (A timer with the agent's only deadline made
    // tokio wake its own event loop through the eventfd on every connect.) Before the
    // open is answered the supervisor sends nothing else, so anything arriving on the
    // stream means it gave up.
    let connected = tokio::select! {
        connected = connecting => connected,
        _ = stream.recv() => {
            tracing::debug!(%addr, "the supervisor gave up on this connect");
            return;
        }
    };
    match connected {
        Ok(socket) => {
            opened_at(&stream, socket.local_addr());
            let end = stream.relay_tcp(socket).await;
            tracing::debug!(%addr, ?end, "outgoing tcp relay finished");
        }
        Err(e) => {
            tracing::debug!(%addr, "pod-side connect failed: {e}");
            stream.opened(Err(errno_of(&e)));
        }
    }
}
