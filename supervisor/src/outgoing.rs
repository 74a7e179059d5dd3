//! The local end of redirected connections.
//!
//! A redirected TCP socket of the app is connected (by the supervisor, through a duplicate of
//! its descriptor) to one loopback listener. The listener learns which pod stream belongs to
//! an accepted connection from the app socket's exact local address (address and port),
//! registered by the connect handler — which may happen just after the accept, since the
//! loopback handshake completes inside the handler's own connect — and, once the pod side is
//! connected too (the two connects overlap), relays bytes between the two. UDP sockets get a
//! relay socket per flow, connected to the app socket's exact address before the app learns
//! the relay's, so the kernel drops datagrams from anyone else.
//!
//! The listener is reachable by every local user, from every address of 127.0.0.0/8: a port
//! alone does not identify the app's socket (another user can connect from 127.0.0.2 with the
//! same port). A live TCP connection is identified by its 4-tuple, so an accepted connection
//! whose peer is the app socket's address, while the app's socket holds that address
//! connected to the proxy, is the app's; one whose peer has already gone (a stale connection
//! from a socket that held the address before) is not taken for it. The table of redirected sockets (by inode) lives here too: it answers
//! `getpeername` while the connection is alive and a little after.

use crate::handlers::lock;
use kmirror_protocol::OpenTarget;
use kmirror_protocol::tunnel::{Stream, Tunnel, TunnelError};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

/// How long an accepted connection waits for its registration.
const REGISTRATION_WAIT: Duration = Duration::from_secs(2);
/// How long a registration waits for its connection (normally claimed within microseconds;
/// generous, so a loaded machine does not fail connections). One left unclaimed (the app
/// abandoned its socket) must not be taken by a later socket that got the same address.
const REGISTRATION_TTL: Duration = Duration::from_secs(10);
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
    since: tokio::time::Instant,
}

pub struct Proxy {
    tunnel: Tunnel,
    tcp_addr: SocketAddr,
    /// By the app socket's local address (canonical: IPv4-mapped addresses as IPv4).
    waiting: Mutex<HashMap<SocketAddr, Registration>>,
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

    /// Announces the app connection coming from `app` (the app socket's local address, see
    /// [`app_endpoint`]), whose pod side comes through `upstream`.
    pub fn register(
        &self,
        app: SocketAddr,
        upstream: oneshot::Receiver<Stream>,
        inode: u64,
        dest: SocketAddr,
    ) {
        lock(&self.redirected).insert(inode, Redirect { dest, pod_local: None });
        let since = tokio::time::Instant::now();
        let mut waiting = lock(&self.waiting);
        // Registrations nobody claimed in time (their connection was refused meanwhile) must
        // not wait for a later socket that happens to get the same address.
        waiting.retain(|_, r| since.duration_since(r.since) < REGISTRATION_TTL);
        waiting.insert(canonical(app), Registration { upstream, inode, since });
        drop(waiting);
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
                    tokio::spawn(self.clone().serve(conn, canonical(peer)));
                }
                Err(e) => {
                    tracing::warn!("outgoing proxy accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// The registration of the app socket at the other end of `conn`, whose peer is `peer`.
    async fn registration(&self, peer: SocketAddr, conn: &TcpStream) -> Option<Registration> {
        let deadline = tokio::time::Instant::now() + REGISTRATION_WAIT;
        loop {
            // Created before the check, so a registration between check and wait is not missed.
            let notified = self.registered.notified();
            {
                let mut waiting = lock(&self.waiting);
                if let Some(found) = waiting.get(&peer) {
                    let now = tokio::time::Instant::now();
                    // The app's socket holds `peer` connected to us since it registered: a
                    // connection from `peer` that is still open now is its connection. One
                    // whose peer has gone is a stale one from an earlier holder of the
                    // address, and must leave the registration to the app's.
                    if !peer_still_there(conn) || now.duration_since(found.since) >= REGISTRATION_TTL {
                        return None;
                    }
                    return waiting.remove(&peer);
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    async fn serve(self: Arc<Self>, conn: TcpStream, peer: SocketAddr) {
        let port = peer.port();
        let Some(Registration { upstream, inode, .. }) = self.registration(peer, &conn).await else {
            tracing::warn!(%peer, "connection to the outgoing proxy from no redirected socket of the app; closing it");
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

    /// Opens the pod side of a UDP flow and a local relay socket for it that talks to the app
    /// socket at `app` only (see [`app_endpoint`]).
    pub async fn udp_flow(&self, app: SocketAddr, dest: SocketAddr) -> Result<UdpFlow, i32> {
        let relay = udp_relay_for(app).await.map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        let relay_addr = relay.local_addr().map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        let stream = self
            .tunnel
            .open(OpenTarget::Udp(dest), UDP_OPEN_TIMEOUT)
            .await
            .map_err(|e| crate::handlers::tunnel_errno(&e))?;
        Ok(UdpFlow { relay, stream, relay_addr })
    }

    /// Starts relaying once the app's socket is connected to the flow's relay.
    pub fn start_udp(self: &Arc<Self>, flow: UdpFlow, inode: u64, dest: SocketAddr) {
        lock(&self.redirected).insert(inode, Redirect { dest, pod_local: flow.stream.far_local() });
        let this = self.clone();
        let counted = this.count_udp_flow();
        tokio::spawn(async move {
            let _counted = counted;
            flow.stream.relay_udp(flow.relay, UDP_IDLE).await;
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
        crate::sockets::ensure_bound(socket.as_fd())?;
        let flow = self.udp_flow(app_endpoint(socket.as_fd())?, dest).await?;
        let relay = flow.relay_addr();
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

/// Where datagrams and connections of the app's socket (our duplicate of it) come from on
/// loopback: its local address, with a wildcard bind read as 127.0.0.1, the source the kernel
/// picks for a socket bound to the wildcard that sends to kmirror's loopback endpoints.
pub fn app_endpoint(socket: BorrowedFd<'_>) -> Result<SocketAddr, i32> {
    // SAFETY: zeroed storage is a valid (empty) sockaddr.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into `storage`.
    let rc = unsafe {
        libc::getsockname(socket.as_raw_fd(), (&mut storage as *mut libc::sockaddr_storage).cast(), &mut len)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO));
    }
    let len = (len as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: the first `len` bytes of `storage` are initialised (zeroed, then written).
    let raw =
        unsafe { std::slice::from_raw_parts((&storage as *const libc::sockaddr_storage).cast::<u8>(), len) };
    match crate::policy::net::parse_sockaddr(raw) {
        Some(crate::policy::net::Destination::Inet(addr)) => Ok(loopback_source(addr)),
        _ => Err(libc::EAFNOSUPPORT),
    }
}

/// The canonical form of a socket's local address as seen by a loopback peer (see
/// [`app_endpoint`]).
fn loopback_source(addr: SocketAddr) -> SocketAddr {
    let addr = canonical(addr);
    if addr.ip().is_unspecified() { SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()) } else { addr }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    crate::policy::net::canonical(addr)
}

/// A relay socket on 127.0.0.1 connected to `app` before anyone learns its port. A datagram
/// that arrived between its bind and its connect came from someone else (the app cannot
/// know the port yet) and is dropped: a connected UDP socket keeps what is already queued.
async fn udp_relay_for(app: SocketAddr) -> std::io::Result<UdpSocket> {
    let relay = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    relay.connect(app).await?;
    let mut scratch = [0u8; 1];
    // The queue is finite (nothing new gets in once connected); the bound is a backstop.
    for _ in 0..65536 {
        // SAFETY: recv writes at most one byte into `scratch`; MSG_DONTWAIT never blocks.
        let n = unsafe { libc::recv(relay.as_raw_fd(), scratch.as_mut_ptr().cast(), 1, libc::MSG_DONTWAIT) };
        // n < 0 with EAGAIN: the queue is empty. Another error is a queued ICMP error from
        // the same window, consumed by this call like the datagrams before it.
        if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) {
            break;
        }
    }
    Ok(relay)
}

/// Whether the peer of an accepted connection still exists: a connection whose peer reset it
/// (state CLOSE) no longer ties its 4-tuple to any socket.
fn peer_still_there(conn: &TcpStream) -> bool {
    let mut info = [0u8; 8];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: TCP_INFO writes at most `len` bytes into `info`; the first byte is tcpi_state.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    const TCP_ESTABLISHED: u8 = 1;
    // CLOSE_WAIT: the app sent its request and shut down its sending side before we looked;
    // its socket (FIN_WAIT2) still holds the 4-tuple.
    const TCP_CLOSE_WAIT: u8 = 8;
    rc == 0 && matches!(info[0], TCP_ESTABLISHED | TCP_CLOSE_WAIT)
}

/// Closes with RST, as a refused or reset connection would.
fn abort(conn: TcpStream) {
    // SO_LINGER 0 makes the close abortive; on a non-blocking socket it never blocks.
    #[allow(deprecated)]
    let _ = conn.set_linger(Some(Duration::ZERO));
}
