//! The local end of incoming traffic: connections the agent delivers from the pod are
//! connected to the app's local listener. Stolen ones are relayed both ways; mirrored ones
//! carry the client's bytes to the app and the app's answers are read and discarded here.

use crate::policy::incoming::IncomingPolicy;
use kmirror_protocol::tunnel::{Inbound, Stream};
use kmirror_protocol::{Errno, IncomingMode};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn connect_local(port: u16) -> std::io::Result<TcpStream> {
    match TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await {
        Ok(conn) => Ok(conn),
        // An app listening on [::1] only.
        Err(v4) => TcpStream::connect(SocketAddr::from((Ipv6Addr::LOCALHOST, port))).await.map_err(|_| v4),
    }
}

/// Serves one `Incoming` stream opened by the agent.
pub async fn serve(
    policy: Arc<IncomingPolicy>,
    stream: Stream,
    pod_port: u16,
    client: SocketAddr,
    mode: IncomingMode,
) {
    let local_port = policy.local_port(pod_port);
    let conn = match connect_local(local_port).await {
        Ok(conn) => conn,
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
