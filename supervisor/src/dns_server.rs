//! The DNS forwarder the app's resolver talks to.
//!
//! resolv.conf cannot name a port and glibc/musl drop answers that do not come from a listed
//! nameserver, so the forwarder listens on port 53 of its own loopback address (127.77.x.y,
//! chosen per session so parallel sessions do not collide) and answers from there. Each
//! query is passed verbatim to the agent, which asks the pod's nameserver, or, when the DNS
//! filter (`feature.network.dns.filter`) keeps its name local, to this machine's own
//! nameservers (those of the local `/etc/resolv.conf`). The addresses of every answer are
//! noted for the outgoing filter's name rules (`crate::names`).

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

/// Where each query goes and what is noted of the answers.
#[derive(Clone, Default)]
pub struct Routing {
    /// Which names the pod resolves; `None`: all of them.
    pub filter: Option<crate::policy::filter::NameFilter>,
    /// The pod's search list (a filter name matches the names it makes of it).
    pub search: Vec<String>,
    /// This machine's nameservers, for names the filter keeps local.
    pub local_servers: Vec<std::net::SocketAddr>,
    /// Where answers are noted, when outgoing filter rules name hosts.
    pub names: Option<Arc<crate::names::NameBook>>,
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(
        "cannot bind a DNS forwarder on port 53 of 127.77.0.0/16: {0}. Run kmirror as root, or \
         grant it `sudo setcap cap_net_bind_service=+ep $(which kmirror)`, or pass --no-remote-dns"
    )]
    Bind(std::io::Error),
}

pub async fn start(tunnel: Tunnel, routing: Routing) -> Result<DnsForwarder, DnsError> {
    let routing = Arc::new(routing);
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
        tokio::spawn(serve_udp(Arc::new(udp), tunnel.clone(), routing.clone()));
        tokio::spawn(serve_tcp(tcp, tunnel, routing));
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

/// Answers one query: from the pod, or from this machine's nameservers for names the filter
/// keeps local; notes the answer's addresses.
async fn resolve(tunnel: &Tunnel, routing: &Routing, query: Vec<u8>, tcp: bool) -> Option<Vec<u8>> {
    let name = crate::policy::dns::question_name(&query);
    let local = match (&routing.filter, &name) {
        (Some(filter), Some(name)) => !filter.remote(name, &routing.search),
        _ => false,
    };
    let answer = if local {
        ask_local(&routing.local_servers, &query, tcp).await
    } else {
        ask_pod(tunnel, query, tcp).await
    }?;
    if let Some(book) = &routing.names
        && let Some((asked, addresses)) = crate::policy::dns::answer_addresses(&answer)
    {
        for ip in addresses {
            book.record(&asked, ip);
        }
    }
    Some(answer)
}

/// Asks this machine's nameservers in turn, over the transport the app used.
async fn ask_local(servers: &[std::net::SocketAddr], query: &[u8], tcp: bool) -> Option<Vec<u8>> {
    for &server in servers {
        let attempt = async {
            if tcp {
                let mut conn = TcpStream::connect(server).await.ok()?;
                let len = u16::try_from(query.len()).ok()?;
                conn.write_all(&[&len.to_be_bytes()[..], query].concat()).await.ok()?;
                let mut len = [0u8; 2];
                conn.read_exact(&mut len).await.ok()?;
                let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
                conn.read_exact(&mut answer).await.ok()?;
                Some(answer)
            } else {
                let bind: std::net::SocketAddr = if server.is_ipv4() {
                    (Ipv4Addr::UNSPECIFIED, 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let socket = UdpSocket::bind(bind).await.ok()?;
                socket.connect(server).await.ok()?;
                socket.send(query).await.ok()?;
                let mut answer = vec![0u8; 65535];
                let n = socket.recv(&mut answer).await.ok()?;
                answer.truncate(n);
                Some(answer)
            }
        };
        match tokio::time::timeout(QUERY_TIMEOUT, attempt).await {
            Ok(Some(answer)) => return Some(answer),
            _ => tracing::debug!(%server, "local DNS failed"),
        }
    }
    None
}

async fn serve_udp(socket: Arc<UdpSocket>, tunnel: Tunnel, routing: Arc<Routing>) {
    let mut buf = vec![0u8; 65535];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else { continue };
        let (socket, tunnel, query, routing) =
            (socket.clone(), tunnel.clone(), buf[..n].to_vec(), routing.clone());
        tokio::spawn(async move {
            // No answer at all lets the resolver retry or time out, as with a lost packet.
            if let Some(answer) = resolve(&tunnel, &routing, query, false).await {
                let _ = socket.send_to(&answer, from).await;
            }
        });
    }
}

async fn serve_tcp(listener: TcpListener, tunnel: Tunnel, routing: Arc<Routing>) {
    while let Ok((conn, _)) = listener.accept().await {
        tokio::spawn(serve_tcp_conn(conn, tunnel.clone(), routing.clone()));
    }
}

async fn serve_tcp_conn(mut conn: TcpStream, tunnel: Tunnel, routing: Arc<Routing>) -> Option<()> {
    loop {
        let mut len = [0u8; 2];
        conn.read_exact(&mut len).await.ok()?;
        let mut query = vec![0u8; u16::from_be_bytes(len) as usize];
        conn.read_exact(&mut query).await.ok()?;
        let answer = resolve(&tunnel, &routing, query, true).await?;
        let len = u16::try_from(answer.len()).ok()?;
        conn.write_all(&len.to_be_bytes()).await.ok()?;
        conn.write_all(&answer).await.ok()?;
    }
}
