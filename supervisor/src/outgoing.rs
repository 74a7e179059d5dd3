//! The local end of redirected connections.
//!
//! A redirected TCP socket of the app is connected (by the supervisor, through a duplicate of
//! its descriptor) to one loopback listener. The listener learns which pod stream belongs to
//! an accepted connection from the app socket's local port, registered by the connect handler
//! — which may happen just after the accept, since the loopback handshake completes inside the
//! handler's own connect — and, once the pod side is connected too (the two connects overlap),
//! relays bytes between the two. UDP sockets get a relay socket
//! per flow. The table of redirected sockets (by inode) lives here too: it answers
//! `getpeername` while the connection is alive and a little after.

use crate::handlers::lock;
use kmirror_protocol::OpenTarget;
use kmirror_protocol::tunnel::{Stream, Tunnel, TunnelError};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

/// How long an accepted connection waits for its registration.
const REGISTRATION_WAIT: Duration = Duration::from_secs(2);
/// How long a finished connection's original destination stays known to `getpeername`.
const PEER_GRACE: Duration = Duration::from_secs(30);
/// A UDP flow idle this long in both directions is closed.
const UDP_IDLE: Duration = Duration::from_secs(300);
const UDP_OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// A redirected socket of the app: the destination it asked for and, once the pod side is
/// connected, that connection's own address in the pod.
#[derive(Clone, Copy)]
struct Redirect {
    dest: SocketAddr,
    pod_local: Option<SocketAddr>,
}

struct Registration {
    /// The pod side, once connected; a dropped sender means its connect failed or was
    /// abandoned.
    upstream: oneshot::Receiver<Stream>,
    inode: u64,
}

pub struct Proxy {
    tunnel: Tunnel,
    tcp_addr: SocketAddr,
    waiting: Mutex<HashMap<u16, Registration>>,
    registered: Notify,
    redirected: Mutex<HashMap<u64, Redirect>>,
    /// Relays of unconnected UDP sockets, by (socket inode, pod destination).
    sendto_relays: Mutex<HashMap<(u64, SocketAddr), SocketAddr>>,
    /// Live UDP relays (connected flows and sendto relays).
    udp_flows: std::sync::atomic::AtomicUsize,
}

/// A UDP relay socket with its pod-side flow, before the app's socket is connected to it.
pub struct UdpFlow {
    relay: UdpSocket,
    stream: Stream,
    relay_addr: SocketAddr,
}

impl UdpFlow {
    pub fn relay_addr(&self) -> SocketAddr {
        self.relay_addr
    }
}

impl Proxy {
    pub async fn start(tunnel: Tunnel) -> std::io::Result<Arc<Proxy>> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        // Accepted connections inherit it: no setsockopt per connection.
        socket.set_nodelay(true)?;
        socket.bind((Ipv4Addr::LOCALHOST, 0).into())?;
        let listener = socket.listen(1024)?;
        let proxy = Arc::new(Proxy {
            tunnel,
            tcp_addr: listener.local_addr()?,
            waiting: Mutex::default(),
            registered: Notify::new(),
            redirected: Mutex::default(),
            sendto_relays: Mutex::default(),
            udp_flows: Default::default(),
        });
        tokio::spawn(proxy.clone().accept_loop(listener));
        Ok(proxy)
    }

    /// Where redirected TCP sockets are connected.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    /// The destination the app asked for on a redirected socket.
    pub fn redirect_of(&self, inode: u64) -> Option<SocketAddr> {
        lock(&self.redirected).get(&inode).map(|r| r.dest)
    }

    /// The pod-side address of a redirected socket's connection: what `getsockname` shows.
    pub fn pod_local_of(&self, inode: u64) -> Option<SocketAddr> {
        lock(&self.redirected).get(&inode).and_then(|r| r.pod_local)
    }

    /// Whether any socket of the app is redirected (most `getsockname` calls need no lookup).
    pub fn has_redirects(&self) -> bool {
        !lock(&self.redirected).is_empty()
    }

    /// Records the pod-side address of a redirected socket's connection.
    pub fn set_pod_local(&self, inode: u64, pod_local: Option<SocketAddr>) {
        if let Some(redirect) = lock(&self.redirected).get_mut(&inode) {
            redirect.pod_local = pod_local;
        }
    }

    /// Forgets a redirected socket whose pod-side connect failed.
    pub fn forget(&self, inode: u64) {
        lock(&self.redirected).remove(&inode);
    }

    /// Announces the app connection coming from local `port`, whose pod side comes through
    /// `upstream`.
    pub fn register(&self, port: u16, upstream: oneshot::Receiver<Stream>, inode: u64, dest: SocketAddr) {
        lock(&self.redirected).insert(inode, Redirect { dest, pod_local: None });
        lock(&self.waiting).insert(port, Registration { upstream, inode });
        self.registered.notify_waiters();
    }

    /// Drops a pod connection that will never be used, closing it on the pod side too.
    pub fn discard(opening: JoinHandle<Result<Stream, TunnelError>>) {
        tokio::spawn(async move {
            if let Ok(Ok(stream)) = opening.await {
                stream.reset();
            }
        });
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((conn, peer)) => {
                    tokio::spawn(self.clone().serve(conn, peer.port()));
                }
                Err(e) => {
                    tracing::warn!("outgoing proxy accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn registration(&self, port: u16) -> Option<Registration> {
        let deadline = tokio::time::Instant::now() + REGISTRATION_WAIT;
        loop {
            // Created before the check, so a registration between check and wait is not missed.
            let notified = self.registered.notified();
            if let Some(found) = lock(&self.waiting).remove(&port) {
                return Some(found);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    async fn serve(self: Arc<Self>, conn: TcpStream, port: u16) {
        let Some(Registration { upstream, inode }) = self.registration(port).await else {
            tracing::warn!(port, "connection to the outgoing proxy from an unknown socket; closing it");
            return abort(conn);
        };
        match upstream.await {
            Ok(stream) => {
                self.set_pod_local(inode, stream.far_local());
                let end = stream.relay_tcp(conn).await;
                tracing::debug!(port, ?end, "outgoing relay finished");
            }
            Err(_) => {
                // The connect handler has forgotten the socket and told the app (or, if the
                // app heard EINPROGRESS already, the connection fails now, as a late failure of
                // a real connect would).
                tracing::debug!(port, "pod-side connect failed");
                abort(conn);
                return;
            }
        }
        tokio::time::sleep(PEER_GRACE).await;
        lock(&self.redirected).remove(&inode);
    }

    /// Opens the pod side of a UDP flow and a local relay socket for it.
    pub async fn udp_flow(&self, dest: SocketAddr) -> Result<UdpFlow, i32> {
        let relay = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        let relay_addr = relay.local_addr().map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        let stream = self
            .tunnel
            .open(OpenTarget::Udp(dest), UDP_OPEN_TIMEOUT)
            .await
            .map_err(|e| crate::handlers::tunnel_errno(&e))?;
        Ok(UdpFlow { relay, stream, relay_addr })
    }

    /// Starts relaying once the app's socket (local `port`) is connected to the flow's relay.
    pub fn start_udp(self: &Arc<Self>, flow: UdpFlow, port: u16, inode: u64, dest: SocketAddr) {
        lock(&self.redirected).insert(inode, Redirect { dest, pod_local: flow.stream.far_local() });
        let this = self.clone();
        let counted = this.count_udp_flow();
        tokio::spawn(async move {
            let _counted = counted;
            if flow.relay.connect((Ipv4Addr::LOCALHOST, port)).await.is_ok() {
                flow.stream.relay_udp(flow.relay, UDP_IDLE).await;
            }
            tokio::time::sleep(PEER_GRACE).await;
            lock(&this.redirected).remove(&inode);
        });
    }
}

impl Proxy {
    /// Whether any UDP datagrams of the app go through a relay (no relay: nothing to rewrite).
    pub fn relays_datagrams(&self) -> bool {
        self.udp_flows.load(std::sync::atomic::Ordering::Acquire) > 0
    }

    /// Whether the app's unconnected socket `inode` sent datagrams to the pod through a relay.
    pub fn has_sendto_relay(&self, inode: u64) -> bool {
        lock(&self.sendto_relays).keys().any(|&(owner, _)| owner == inode)
    }

    /// The pod address behind `source`, a relay that sends datagrams to the app's socket
    /// `inode`: what the app's `recvfrom` should report instead of the relay.
    pub fn pod_source_of(&self, inode: u64, source: SocketAddr) -> Option<SocketAddr> {
        let unconnected = lock(&self.sendto_relays)
            .iter()
            .find_map(|(&(owner, dest), &relay)| (owner == inode && relay == source).then_some(dest));
        // A connected socket talks to one relay only.
        unconnected.or_else(|| self.redirect_of(inode))
    }

    /// The local relay that carries datagrams of an unconnected socket to `dest` in the pod,
    /// created on first use: it is bound to the app socket's port (binding the socket first if
    /// it has none yet, as a send would) and ends after an idle period.
    pub async fn sendto_relay(
        self: &Arc<Self>,
        socket: &OwnedFd,
        inode: u64,
        dest: SocketAddr,
    ) -> Result<SocketAddr, i32> {
        if let Some(relay) = lock(&self.sendto_relays).get(&(inode, dest)) {
            return Ok(*relay);
        }
        let port = crate::sockets::ensure_bound(socket.as_fd())?;
        let flow = self.udp_flow(dest).await?;
        let relay = flow.relay_addr();
        flow.relay
            .connect((Ipv4Addr::LOCALHOST, port))
            .await
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        lock(&self.sendto_relays).insert((inode, dest), relay);
        let this = self.clone();
        let counted = self.count_udp_flow();
        tokio::spawn(async move {
            let _counted = counted;
            flow.stream.relay_udp(flow.relay, UDP_IDLE).await;
            lock(&this.sendto_relays).remove(&(inode, dest));
        });
        Ok(relay)
    }

    fn count_udp_flow(self: &Arc<Self>) -> UdpFlowCount {
        self.udp_flows.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        UdpFlowCount(self.clone())
    }
}

/// One live UDP relay, counted for [`Proxy::relays_datagrams`] until dropped.
struct UdpFlowCount(Arc<Proxy>);

impl Drop for UdpFlowCount {
    fn drop(&mut self) {
        self.0.udp_flows.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Closes with RST, as a refused or reset connection would.
fn abort(conn: TcpStream) {
    // SO_LINGER 0 makes the close abortive; on a non-blocking socket it never blocks.
    #[allow(deprecated)]
    let _ = conn.set_linger(Some(Duration::ZERO));
}
