//! Answering DNS queries with the pod's own resolver.
//!
//! The supervisor serves the app's resolver locally and hands each raw DNS message here; the
//! agent sends it, unchanged, to the first nameserver of the pod's `/etc/resolv.conf` from the
//! pod's network namespace (over UDP or TCP, as the app asked) and returns the raw answer.

use crate::netns::NetnsWorker;
use kmirror_protocol::Errno;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Nameserver addresses listed in a resolv.conf, in order.
pub fn nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            // A scope suffix (fe80::1%eth0) cannot be parsed as an IpAddr; skip such entries.
            words.next()?.parse().ok()
        })
        .collect()
}

pub async fn forward(
    netns: &NetnsWorker,
    servers: &[IpAddr],
    query: &[u8],
    tcp: bool,
) -> Result<Vec<u8>, Errno> {
    let mut last = Errno(libc::EHOSTUNREACH);
    for server in servers {
        let addr = SocketAddr::new(*server, 53);
        let attempt =
            if tcp { over_tcp(netns, addr, query).await } else { over_udp(netns, addr, query).await };
        match attempt {
            Ok(answer) => return Ok(answer),
            Err(e) => {
                tracing::debug!(%addr, "pod nameserver failed: {e}");
                last = Errno(e.raw_os_error().unwrap_or(libc::ETIMEDOUT));
            }
        }
    }
    Err(last)
}

fn domain(addr: &SocketAddr) -> i32 {
    if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 }
}

async fn over_udp(netns: &NetnsWorker, addr: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let fd: OwnedFd = netns.socket(domain(&addr), libc::SOCK_DGRAM).await?;
    let socket = tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(fd))?;
    socket.connect(addr).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(QUERY_TIMEOUT, socket.recv(&mut buf))
        .await
        .map_err(|_| std::io::Error::from_raw_os_error(libc::ETIMEDOUT))??;
    buf.truncate(n);
    Ok(buf)
}

async fn over_tcp(netns: &NetnsWorker, addr: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let fd: OwnedFd = netns.socket(domain(&addr), libc::SOCK_STREAM).await?;
    let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
    let exchange = async {
        let mut stream = socket.connect(addr).await?;
        let len =
            u16::try_from(query.len()).map_err(|_| std::io::Error::from_raw_os_error(libc::EMSGSIZE))?;
        stream.write_all(&len.to_be_bytes()).await?;
        stream.write_all(query).await?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await?;
        let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
        stream.read_exact(&mut answer).await?;
        Ok(answer)
    };
    tokio::time::timeout(QUERY_TIMEOUT, exchange)
        .await
        .map_err(|_| std::io::Error::from_raw_os_error(libc::ETIMEDOUT))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nameservers_in_order() {
        let conf = "search a.svc cluster.local\n# nameserver 9.9.9.9\nnameserver 10.96.0.10\n\
                    nameserver fe80::1%eth0\nnameserver  fd00::53 \noptions ndots:5\n";
        assert_eq!(
            nameservers(conf),
            vec!["10.96.0.10".parse::<IpAddr>().unwrap(), "fd00::53".parse().unwrap()]
        );
        assert!(nameservers("").is_empty());
    }
}
