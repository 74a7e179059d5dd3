//! The DNS forwarder the app's resolver talks to.
//!
//! resolv.conf cannot name a port and glibc/musl drop answers that do not come from a listed
//! nameserver, so the forwarder listens on port 53 of its own loopback address (127.77.x.y,
//! chosen per session so parallel sessions do not collide) and answers from there. Each
//! query is passed verbatim to the agent, which asks the pod's nameserver.

use kmirror_protocol::tunnel::Tunnel;
use kmirror_protocol::{Request, Response};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const QUERY_TIMEOUT: Duration = Duration::from_secs(8);

pub struct DnsForwarder {
    pub addr: Ipv4Addr,
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(
        "cannot bind a DNS forwarder on port 53 of 127.77.0.0/16: {0}. Run kmirror as root, or \
         grant it `sudo setcap cap_net_bind_service=+ep $(which kmirror)`, or pass --no-remote-dns"
    )]
    Bind(std::io::Error),
}

pub async fn start(tunnel: Tunnel) -> Result<DnsForwarder, DnsError> {
    let mut last = std::io::Error::from_raw_os_error(libc::EADDRINUSE);
    for _ in 0..64 {
        let [a, b] = crate::random::bytes::<2>();
        let addr = Ipv4Addr::new(127, 77, a, b.max(1));
        let udp = match UdpSocket::bind((addr, 53)).await {
            Ok(s) => s,
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
                last = e;
                continue;
            }
            Err(e) => return Err(DnsError::Bind(e)),
        };
        let tcp = match TcpListener::bind((addr, 53)).await {
            Ok(s) => s,
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
                last = e;
                continue;
            }
            Err(e) => return Err(DnsError::Bind(e)),
        };
        tokio::spawn(serve_udp(Arc::new(udp), tunnel.clone()));
        tokio::spawn(serve_tcp(tcp, tunnel));
        return Ok(DnsForwarder { addr });
    }
    Err(DnsError::Bind(last))
}

async fn ask_pod(tunnel: &Tunnel, query: Vec<u8>, tcp: bool) -> Option<Vec<u8>> {
    match tunnel.request(Request::Dns { query, tcp }, QUERY_TIMEOUT).await {
        Ok(Response::Dns(answer)) => Some(answer),
        Ok(other) => {
            tracing::debug!("pod DNS failed: {other:?}");
            None
        }
        Err(e) => {
            tracing::debug!("pod DNS failed: {e}");
            None
        }
    }
}

async fn serve_udp(socket: Arc<UdpSocket>, tunnel: Tunnel) {
    let mut buf = vec![0u8; 65535];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else { continue };
        let (socket, tunnel, query) = (socket.clone(), tunnel.clone(), buf[..n].to_vec());
        tokio::spawn(async move {
            // No answer at all lets the resolver retry or time out, as with a lost packet.
            if let Some(answer) = ask_pod(&tunnel, query, false).await {
                let _ = socket.send_to(&answer, from).await;
            }
        });
    }
}

async fn serve_tcp(listener: TcpListener, tunnel: Tunnel) {
    while let Ok((conn, _)) = listener.accept().await {
        tokio::spawn(serve_tcp_conn(conn, tunnel.clone()));
    }
}

async fn serve_tcp_conn(mut conn: TcpStream, tunnel: Tunnel) -> Option<()> {
    loop {
        let mut len = [0u8; 2];
        conn.read_exact(&mut len).await.ok()?;
        let mut query = vec![0u8; u16::from_be_bytes(len) as usize];
        conn.read_exact(&mut query).await.ok()?;
        let answer = ask_pod(&tunnel, query, true).await?;
        let len = u16::try_from(answer.len()).ok()?;
        conn.write_all(&len.to_be_bytes()).await.ok()?;
        conn.write_all(&answer).await.ok()?;
    }
}
