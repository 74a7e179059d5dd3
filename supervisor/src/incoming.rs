//! The local end of incoming traffic: connections the agent delivers from the pod are
//! connected to the app's local listener. Stolen ones are relayed both ways; mirrored ones
//! carry the client's bytes to the app and the app's answers are read and discarded here.

use crate::policy::incoming::IncomingPolicy;
use kmirror_protocol::tunnel::{Inbound, Stream};
use kmirror_protocol::{Errno, IncomingMode};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Pod clients behind the loopback connections kmirror makes to the app: `accept` and
/// `getpeername` on the app's side show the pod client instead of kmirror's end.
///
/// Each IPv4 connection comes from its own loopback address, reserved for the client *before*
/// connecting, since the app may accept before our connect returns. Keying by address rather
/// than by port lets the port be chosen at connect time: a bind to port 0 scans for a port no
/// socket uses, which at thousands of short connections per second (and their TIME_WAITs)
/// costs milliseconds per bind.
#[derive(Default)]
pub struct IncomingPeers {
    table: Mutex<PeerTable>,
    /// Pod ports whose subscription failed: their listeners get no delivered connection, and
    /// their accepts stay the kernel's.
    unserved: Mutex<std::collections::HashSet<u16>>,
}

/// Who a delivered connection is from and what it reached in the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// The pod client: what `accept` and `getpeername` show.
    pub client: SocketAddr,
    /// The pod address and port the client connected to: what `getsockname` shows.
    pub server: SocketAddr,
}

/// kmirror's end of one delivered connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LocalEnd {
    /// A source address from the reserved loopback range.
    V4(Ipv4Addr),
    /// `[::1]` has no range to spare: the port, fixed by a bind before connecting.
    V6Port(u16),
}

#[derive(Default)]
struct PeerTable {
    clients: HashMap<LocalEnd, Delivered>,
    /// Where the search for a free source address resumes.
    cursor: u32,
}

/// Source addresses for delivered connections: 127.200.0.0/13, away from the DNS forwarder's
/// 127.77.0.0/16 and from 127.0.0.1, where apps' own clients come from.
const SOURCE_BASE: u32 = u32::from_be_bytes([127, 200, 0, 0]);
const SOURCE_COUNT: u32 = 1 << 19;

impl PeerTable {
    /// Reserves a source address no live connection uses.
    fn reserve_v4(&mut self, client: Delivered) -> Option<Ipv4Addr> {
        for _ in 0..SOURCE_COUNT {
            self.cursor = (self.cursor + 1) % SOURCE_COUNT;
            let ip = Ipv4Addr::from(SOURCE_BASE + self.cursor);
            // .0 and .255 read as network and broadcast addresses to some software.
            if matches!(ip.octets()[3], 0 | 255) {
                continue;
            }
            if let std::collections::hash_map::Entry::Vacant(slot) = self.clients.entry(LocalEnd::V4(ip)) {
                slot.insert(client);
                return Some(ip);
            }
        }
        None
    }
}

impl IncomingPeers {
    /// The delivered connection behind a loopback peer address the app sees.
    pub fn delivered_from(&self, peer: SocketAddr) -> Option<Delivered> {
        let end = match peer {
            SocketAddr::V4(v4) => LocalEnd::V4(*v4.ip()),
            SocketAddr::V6(v6) => LocalEnd::V6Port(v6.port()),
        };
        lock(&self.table).clients.get(&end).copied()
    }

    pub fn is_empty(&self) -> bool {
        lock(&self.table).clients.is_empty()
    }

    /// Records whether the subscription of `pod_port` failed.
    pub fn set_unserved(&self, pod_port: u16, unserved: bool) {
        let mut ports = lock(&self.unserved);
        if unserved {
            ports.insert(pod_port);
        } else {
            ports.remove(&pod_port);
        }
    }

    /// Whether the subscription of `pod_port` failed.
    pub fn is_unserved(&self, pod_port: u16) -> bool {
        lock(&self.unserved).contains(&pod_port)
    }

    fn release(&self, end: LocalEnd) {
        lock(&self.table).clients.remove(&end);
    }
}

/// How long a finished connection's client stays known (a closed socket can still be asked).
const PEER_GRACE: Duration = Duration::from_secs(30);

/// Connects to the app from a source reserved for `client` (see [`IncomingPeers`]).
///
/// An IPv6 client reaches the app over IPv6 loopback only, so only an IPv6 listener (IPv6-only
/// or dual-stack) gets it: in the pod, an IPv4-only listener never sees IPv6 clients (they are
/// refused), and an AF_INET socket cannot have an IPv6 peer to show. An IPv4 client goes to
/// 127.0.0.1 (an IPv4 or dual-stack listener), or else to an app listening on `[::1]` only,
/// which shows it as `::ffff:a.b.c.d`, as a dual-stack socket would.
async fn connect_local(
    port: u16,
    client: Delivered,
    peers: &IncomingPeers,
) -> std::io::Result<(TcpStream, LocalEnd)> {
    if crate::policy::net::canonical(client.client).is_ipv6() {
        return connect_local_v6(port, client, peers).await;
    }
    match connect_local_v4(port, client, peers).await {
        Ok(conn) => Ok(conn),
        // An app listening on [::1] only.
        Err(v4) => connect_local_v6(port, client, peers).await.map_err(|_| v4),
    }
}

async fn connect_local_v4(
    port: u16,
    client: Delivered,
    peers: &IncomingPeers,
) -> std::io::Result<(TcpStream, LocalEnd)> {
    let socket = TcpSocket::new_v4()?;
    crate::sockets::bind_address_only(socket.as_fd()).map_err(std::io::Error::from_raw_os_error)?;
    let source = lock(&peers.table)
        .reserve_v4(client)
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EADDRNOTAVAIL))?;
    let end = LocalEnd::V4(source);
    let connected = async {
        socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
        socket.connect(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)).await
    };
    match connected.await {
        Ok(conn) => Ok((conn, end)),
        Err(e) => {
            peers.release(end);
            Err(e)
        }
    }
}

async fn connect_local_v6(
    port: u16,
    client: Delivered,
    peers: &IncomingPeers,
) -> std::io::Result<(TcpStream, LocalEnd)> {
    let socket = TcpSocket::new_v6()?;
    socket.bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0))?;
    let end = LocalEnd::V6Port(socket.local_addr()?.port());
    lock(&peers.table).clients.insert(end, client);
    match socket.connect(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port)).await {
        Ok(conn) => Ok((conn, end)),
        Err(e) => {
            peers.release(end);
            Err(e)
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves one `Incoming` stream opened by the agent.
pub async fn serve(
    policy: Arc<IncomingPolicy>,
    peers: Arc<IncomingPeers>,
    stream: Stream,
    delivered: Delivered,
    mode: IncomingMode,
) {
    let (pod_port, client) = (delivered.server.port(), delivered.client);
    let local_port = policy.local_port(pod_port);
    let (conn, ours) = match connect_local(local_port, delivered, &peers).await {
        Ok(connected) => connected,
        Err(e) => {
            tracing::info!(%client, local_port, "the app does not accept on its port: {e}");
            stream.opened(Err(Errno(e.raw_os_error().unwrap_or(libc::ECONNREFUSED))));
            return;
        }
    };
    let _ = conn.set_nodelay(true);
    stream.opened(Ok(()));
    tracing::debug!(%client, pod_port, local_port, ?mode, "incoming connection");
    match mode {
        IncomingMode::Steal => {
            stream.relay_tcp(conn).await;
        }
        IncomingMode::Mirror => relay_mirror(stream, conn).await,
    }
    tokio::time::sleep(PEER_GRACE).await;
    peers.release(ours);
}

/// Client bytes to the app; the app's answers are drained and dropped (the pod's own app
/// answers the real client).
async fn relay_mirror(mut stream: Stream, conn: TcpStream) {
    let (mut rd, mut wr) = conn.into_split();
    let drain = tokio::spawn(async move {
        let mut sink = vec![0u8; 64 * 1024];
        while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    loop {
        match stream.recv().await {
            Inbound::Data(bytes) => {
                if wr.write_all(&bytes).await.is_err() {
                    stream.reset();
                    break;
                }
                stream.grant(bytes.len());
            }
            Inbound::Shutdown => {
                let _ = wr.shutdown().await;
                // The app finishes its answers and closes; then the agent may forget the flow.
                let _ = tokio::time::timeout(Duration::from_secs(30), drain).await;
                stream.shutdown();
                return;
            }
            Inbound::Reset => {
                // The agent dropped the stream (it lost data, or the app read too slowly): the
                // app must see the connection broken (RST), not a clean end of a request it got
                // only part of. SO_LINGER 0 turns the close into a RST; `forget` keeps the write
                // half from sending a FIN first; the close comes when the drain's read half goes.
                #[allow(deprecated)]
                let _ = wr.as_ref().set_linger(Some(Duration::ZERO));
                wr.forget();
                drain.abort();
                return;
            }
        }
    }
    drain.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(port: u16) -> Delivered {
        Delivered {
            client: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)), port),
            server: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 8080),
        }
    }

    #[test]
    fn each_live_connection_gets_its_own_source_address() {
        let mut table = PeerTable::default();
        let a = table.reserve_v4(client(1)).unwrap();
        let b = table.reserve_v4(client(2)).unwrap();
        assert_ne!(a, b);
        for ip in [a, b] {
            assert_eq!(ip.octets()[..2], [127, 200]);
        }
        assert_eq!(table.clients[&LocalEnd::V4(b)], client(2));
    }

    #[test]
    fn the_search_wraps_and_skips_addresses_still_in_use() {
        let mut table = PeerTable { cursor: SOURCE_COUNT - 3, ..Default::default() };
        let first = Ipv4Addr::from(SOURCE_BASE + 1);
        table.clients.insert(LocalEnd::V4(first), client(9));
        let picked: Vec<Ipv4Addr> = (0..3).map(|i| table.reserve_v4(client(i)).unwrap()).collect();
        // 127.207.255.254, then past .255, .0 (wrap) and the taken .1.
        assert_eq!(
            picked,
            [Ipv4Addr::new(127, 207, 255, 254), Ipv4Addr::new(127, 200, 0, 2), Ipv4Addr::new(127, 200, 0, 3)]
        );
    }

    #[test]
    fn a_full_range_is_reported_not_looped_forever() {
        let mut table = PeerTable::default();
        for offset in 0..SOURCE_COUNT {
            table.clients.insert(LocalEnd::V4(Ipv4Addr::from(SOURCE_BASE + offset)), client(1));
        }
        assert_eq!(table.reserve_v4(client(2)), None);
    }
}
