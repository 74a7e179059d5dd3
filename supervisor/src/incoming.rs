//! The local end of incoming traffic: connections the agent delivers from the pod are
//! connected to the app's local listener. Stolen ones are relayed both ways; mirrored ones
//! carry the client's bytes to the app and the app's answers are read and discarded here.

use crate::policy::incoming::IncomingPolicy;
use kmirror_protocol::tunnel::{Inbound, Stream};
use kmirror_protocol::{Errno, IncomingMode};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Pod clients behind the loopback connections kmirror makes to the app, by the local port of
/// kmirror's end: `accept` and `getpeername` on the app's side show the pod client instead.
#[derive(Default)]
pub struct IncomingPeers {
    by_port: Mutex<HashMap<u16, SocketAddr>>,
}

impl IncomingPeers {
    pub fn client_of(&self, loopback_port: u16) -> Option<SocketAddr> {
        lock(&self.by_port).get(&loopback_port).copied()
    }

    pub fn is_empty(&self) -> bool {
        lock(&self.by_port).is_empty()
    }
}

/// How long a finished connection's client stays known (a closed socket can still be asked).
const PEER_GRACE: Duration = Duration::from_secs(30);

/// Connects to the app, registering the pod client under our local port *before* connecting,
/// since the app may accept before our connect returns.
async fn connect_local(
    port: u16,
    client: SocketAddr,
    peers: &IncomingPeers,
) -> std::io::Result<(TcpStream, u16)> {
    let attempt = |ip: IpAddr| async move {
        let socket = if ip.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.bind(SocketAddr::new(ip, 0))?;
        let ours = socket.local_addr()?.port();
        lock(&peers.by_port).insert(ours, client);
        match socket.connect(SocketAddr::new(ip, port)).await {
            Ok(conn) => Ok((conn, ours)),
            Err(e) => {
                lock(&peers.by_port).remove(&ours);
                Err(e)
            }
        }
    };
    match attempt(IpAddr::V4(Ipv4Addr::LOCALHOST)).await {
        Ok(conn) => Ok(conn),
        // An app listening on [::1] only.
        Err(v4) => attempt(IpAddr::V6(Ipv6Addr::LOCALHOST)).await.map_err(|_| v4),
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
    pod_port: u16,
    client: SocketAddr,
    mode: IncomingMode,
) {
    let local_port = policy.local_port(pod_port);
    let (conn, ours) = match connect_local(local_port, client, &peers).await {
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
    lock(&peers.by_port).remove(&ours);
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
            Inbound::Reset => break,
        }
    }
    drain.abort();
}
