//! Outgoing connections made on the app's behalf from the pod's network namespace.

use crate::netns::NetnsWorker;
use kmirror_protocol::tunnel::Stream;
use kmirror_protocol::{Errno, OpenTarget};
use std::net::SocketAddr;
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

pub async fn open(netns: NetnsWorker, mut stream: Stream, target: OpenTarget) {
    match target {
        OpenTarget::Tcp(addr) => {
            let connecting = async {
                let fd = netns.socket(domain(&addr), libc::SOCK_STREAM).await?;
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
