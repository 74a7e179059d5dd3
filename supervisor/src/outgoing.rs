//! The local end of redirected connections.
//!
//! # TCP: the app's socket is connected only when its pod side is
//!
//! A redirected TCP socket of the app must look, at every moment, as a socket connecting to
//! the pod destination would: "connecting" (not writable, no peer, no pending error) until the
//! pod side has connected or failed, then connected or failed the same way. The connect is made
//! on the app's own socket (a duplicate of its descriptor, so the same open file description,
//! epoll registrations and options), in three steps:
//!
//! 1. **Hold.** The socket connects to a *hold point*: a loopback listener whose one-slot
//!    accept queue is kept full by a connection of our own, so the kernel drops every SYN sent
//!    to it. The app's socket is then in SYN-SENT, exactly as one waiting for a slow or filtered
//!    destination: `poll` does not report it writable, `getpeername` says ENOTCONN, SO_ERROR is
//!    0, and a blocking connect can wait in the kernel (signals and SO_SNDTIMEO act natively).
//!    A non-blocking connect is answered EINPROGRESS at once: no event loop waits for the pod.
//! 2. **Connected**: once the pod side has connected, a socket of ours bound to the hold
//!    point's own address (SO_REUSEPORT) connects to the app socket's address. The two SYNs
//!    cross (a TCP simultaneous open, RFC 793), both sockets become ESTABLISHED, and the app's
//!    socket is connected to ours, which relays to the pod stream. Only the socket that holds
//!    exactly that address pair in SYN-SENT can complete it, and kmirror holds a duplicate of
//!    the app's socket until then, so no other socket can take its place.
//! 3. **Failed**: the socket is disconnected and, for a refusal, connected once more, to a
//!    loopback port of ours that is bound but never listens: the kernel answers that SYN with a
//!    reset, so the socket fails with ECONNREFUSED exactly as a refused connect does (pending
//!    SO_ERROR, POLLERR, the same state for a later connect). Other errors (ETIMEDOUT,
//!    EHOSTUNREACH, ...) have no such local cause: the disconnect leaves ECONNRESET pending and
//!    kmirror answers the app's `getsockopt(SO_ERROR)` with the pod's errno instead.
//!
//! SO_REUSEPORT lets only sockets of kmirror's own user share the hold point's port; a process
//! of that user could join it, but such a process can already trace the app.
//!
//! # UDP
//!
//! UDP sockets get a relay socket per flow, connected to the app socket's exact address before
//! the app learns the relay's, so the kernel drops datagrams from anyone else. The table of
//! redirected sockets (by inode) lives here too: it answers `getpeername` and `getsockname`
//! for as long as the socket is likely to be asked (see [`FINISHED_KEPT`]).

use crate::handlers::lock;
use crate::sockets;
use kmirror_protocol::OpenTarget;
use kmirror_protocol::tunnel::{Inbound, Stream, Tunnel, TunnelError};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::watch;

/// Redirected sockets whose connection has ended, whose addresses `getpeername` and
/// `getsockname` still report: the most recently finished ones. Socket inodes are not reused
/// while the kernel runs (a 32-bit counter per boot, in practice), so an entry never describes
/// another socket; the bound only caps memory (about 100 bytes each).
pub const FINISHED_KEPT: usize = 16384;
/// Failed connects whose errno waits for the app's SO_ERROR, at most (the oldest go first).
const FAILURES_KEPT: usize = 4096;
/// A UDP flow idle this long in both directions is closed.
const UDP_IDLE: Duration = Duration::from_secs(300);
const UDP_OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long our end of a simultaneous open may take (both ends are on loopback: microseconds).
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(2);

/// A redirected socket of the app: the destination it asked for and, once the pod side is
/// connected, that connection's own address in the pod.
#[derive(Clone, Copy)]
struct Redirect {
    dest: SocketAddr,
    pod_local: Option<SocketAddr>,
    /// Tells this registration apart from a later one of the same socket.
    generation: u64,
}

/// The redirected sockets, live ones and the most recently finished ones.
#[derive(Default)]
struct Redirects {
    by_inode: HashMap<u64, Redirect>,
    /// Finished entries, oldest first, as (inode, generation).
    finished: VecDeque<(u64, u64)>,
    next_generation: u64,
}

impl Redirects {
    fn insert(&mut self, inode: u64, dest: SocketAddr, pod_local: Option<SocketAddr>) -> u64 {
        self.next_generation += 1;
        let generation = self.next_generation;
        self.by_inode.insert(inode, Redirect { dest, pod_local, generation });
        generation
    }

    /// Forgets the entry of `inode` if it is still registration `generation`.
    fn remove(&mut self, inode: u64, generation: u64) {
        if self.by_inode.get(&inode).is_some_and(|r| r.generation == generation) {
            self.by_inode.remove(&inode);
        }
    }

    /// The connection behind `inode` ended: its entry is kept among the last [`FINISHED_KEPT`].
    fn finish(&mut self, inode: u64, generation: u64) {
        self.finished.push_back((inode, generation));
        while self.finished.len() > FINISHED_KEPT {
            let Some((old, generation)) = self.finished.pop_front() else { break };
            self.remove(old, generation);
        }
    }
}

/// What a redirected TCP connect has come to, as the app's socket shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The pod side is still connecting; the app's socket is in SYN-SENT.
    Pending,
    /// Connected through to the pod.
    Connected,
    /// The pod side failed with this errno; so did the app's socket.
    Failed(i32),
    /// kmirror gave the pod side up (the app stopped waiting); the app's socket is left as is.
    Abandoned,
}

/// Where redirected TCP sockets wait for their pod side (see the module documentation).
struct HoldPoint {
    /// The listener whose accept queue is full.
    addr: SocketAddr,
    /// A port that is bound but never listens: a SYN to it is refused.
    refuser: SocketAddr,
    _listener: TcpListener,
    _filler: std::net::TcpStream,
    _refuser: TcpSocket,
}

impl HoldPoint {
    fn new(ip: IpAddr) -> std::io::Result<HoldPoint> {
        let socket = new_tcp(ip)?;
        socket.set_reuseport(true)?;
        socket.bind(SocketAddr::new(ip, 0))?;
        let listener = socket.listen(0)?;
        let addr = listener.local_addr()?;
        // A backlog of 0 queues one connection; with ours in it, every other SYN is dropped.
        let filler = std::net::TcpStream::connect(addr)?;
        let refuser_socket = new_tcp(ip)?;
        refuser_socket.bind(SocketAddr::new(ip, 0))?;
        let refuser = refuser_socket.local_addr()?;
        Ok(HoldPoint { addr, refuser, _listener: listener, _filler: filler, _refuser: refuser_socket })
    }
}

/// A TCP socket of `ip`'s family; an IPv6 one is IPv6-only (it serves IPv6-only app sockets).
fn new_tcp(ip: IpAddr) -> std::io::Result<TcpSocket> {
    match ip {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => {
            let socket = TcpSocket::new_v6()?;
            nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6V6Only, &true)?;
            Ok(socket)
        }
    }
}

/// A redirected connect still waiting for its pod side.
struct PendingConnect {
    outcome: watch::Receiver<Outcome>,
    /// The pod's errno, for SO_ERROR to report once the socket failed with a stand-in one.
    failed_with: Option<i32>,
    /// Orders failures, so the oldest unreported ones can be dropped.
    failed_seq: u64,
}

pub struct Proxy {
    tunnel: Tunnel,
    hold_v4: HoldPoint,
    /// `None` where the machine has no IPv6 loopback.
    hold_v6: Option<HoldPoint>,
    redirected: Mutex<Redirects>,
    /// Sockets whose pod side is connecting, or whose failure SO_ERROR has yet to report.
    pending: Mutex<HashMap<u64, PendingConnect>>,
    /// Relays of unconnected UDP sockets, by (socket inode, pod peer).
    sendto_relays: Mutex<HashMap<(u64, SocketAddr), SocketAddr>>,
    /// The pod sides of unconnected UDP sockets, by socket inode (opened once).
    pod_udp: Mutex<HashMap<u64, PodUdpSlot>>,
    /// Live UDP relays (connected flows and sendto relays).
    udp_flows: std::sync::atomic::AtomicUsize,
    /// Failures recorded so far (see [`Proxy::record_failure`]).
    failures: std::sync::atomic::AtomicU64,
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
        let hold_v4 = HoldPoint::new(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
        let hold_v6 = HoldPoint::new(IpAddr::V6(Ipv6Addr::LOCALHOST))
            .inspect_err(|e| tracing::info!("no IPv6 loopback ({e}): IPv6-only sockets cannot reach the pod"))
            .ok();
        Ok(Arc::new(Proxy {
            tunnel,
            hold_v4,
            hold_v6,
            redirected: Mutex::default(),
            pending: Mutex::default(),
            sendto_relays: Mutex::default(),
            pod_udp: Mutex::default(),
            udp_flows: Default::default(),
            failures: Default::default(),
        }))
    }

    /// The destination the app asked for on a redirected socket.
    pub fn redirect_of(&self, inode: u64) -> Option<SocketAddr> {
        lock(&self.redirected).by_inode.get(&inode).map(|r| r.dest)
    }

    /// The pod-side address of a redirected socket's connection: what `getsockname` shows.
    pub fn pod_local_of(&self, inode: u64) -> Option<SocketAddr> {
        lock(&self.redirected).by_inode.get(&inode).and_then(|r| r.pod_local)
    }

    /// Whether any socket of the app is redirected (most `getsockname` calls need no lookup).
    pub fn has_redirects(&self) -> bool {
        !lock(&self.redirected).by_inode.is_empty()
    }

    /// The outcome of the redirected connect of socket `inode` while it is pending.
    pub fn pending_outcome(&self, inode: u64) -> Option<watch::Receiver<Outcome>> {
        let pending = lock(&self.pending);
        pending.get(&inode).filter(|p| p.failed_with.is_none()).map(|p| p.outcome.clone())
    }

    /// Whether any connect's failure waits to be reported through SO_ERROR.
    pub fn has_failures_to_report(&self) -> bool {
        lock(&self.pending).values().any(|p| p.failed_with.is_some())
    }

    /// The pod's errno for socket `inode`, whose own pending error is a stand-in: reported
    /// once, as SO_ERROR reports an error once.
    pub fn take_failure(&self, inode: u64) -> Option<i32> {
        let mut pending = lock(&self.pending);
        let errno = pending.get(&inode)?.failed_with?;
        pending.remove(&inode);
        Some(errno)
    }

    /// Starts connecting the app's fresh TCP socket (`socket`, our duplicate of it) to `dest`
    /// through the pod, giving the pod side at most `limit`: the socket is put on hold at once
    /// (see the module documentation) and its outcome is reported on the returned channel.
    /// `Err` is the errno the connect itself reports (a socket that cannot connect at all).
    /// With `apps_limit`, `limit` is the app's own (SO_SNDTIMEO of a blocking connect): when it
    /// runs out the pod side is given up and the app's socket left connecting, as Linux leaves
    /// it; otherwise the connect fails with ETIMEDOUT.
    pub fn redirect_tcp(
        self: &Arc<Self>,
        socket: OwnedFd,
        inode: u64,
        dest: SocketAddr,
        (limit, apps_limit): (Duration, bool),
    ) -> Result<watch::Receiver<Outcome>, i32> {
        let fd = socket.as_fd();
        let family = sockets::socket_domain(fd)?;
        let hold = if family == libc::AF_INET6 && sockets::v6_only(fd) {
            // An IPv6-only socket cannot reach 127.0.0.1, not even as ::ffff:127.0.0.1.
            self.hold_v6.as_ref().ok_or(libc::ENETUNREACH)?
        } else {
            &self.hold_v4
        };
        let (hold_addr, refuser) = (hold.addr, hold.refuser);
        match sockets::connect_nonblocking(fd, &crate::policy::net::encode_sockaddr(hold_addr, family)) {
            Err(libc::EINPROGRESS) => {}
            // The socket's own state decides (EISCONN, EALREADY, ECONNABORTED after a failed
            // connect, EADDRNOTAVAIL, ...), as it would for the pod destination.
            Err(errno) => return Err(errno),
            Ok(()) => {
                // Our hold point answered a SYN, which its full queue cannot: the machine is
                // broken in a way we cannot hide.
                sockets::disconnect(fd);
                return Err(libc::ECONNREFUSED);
            }
        }
        let app = match sockets::local_addr(fd).map(|raw| crate::policy::net::parse_sockaddr(&raw)) {
            Ok(Some(crate::policy::net::Destination::Inet(app))) => canonical(app),
            _ => {
                sockets::disconnect(fd);
                return Err(libc::EAFNOSUPPORT);
            }
        };
        // Options the app set before connecting act on its pod-side connection too.
        let options = sockets::tcp_options(fd);
        let target = if options.any() && self.tunnel.version() >= kmirror_protocol::SOCKETS_VERSION {
            OpenTarget::TcpWith { addr: dest, options }
        } else {
            OpenTarget::Tcp(dest)
        };
        let generation = lock(&self.redirected).insert(inode, dest, None);
        let (report, outcome) = watch::channel(Outcome::Pending);
        lock(&self.pending)
            .insert(inode, PendingConnect { outcome: outcome.clone(), failed_with: None, failed_seq: 0 });
        let this = self.clone();
        tokio::spawn(async move {
            // On its timeout the tunnel resets the stream: the pod side is given up.
            let stream = match this.tunnel.open(target, limit).await {
                Ok(stream) => stream,
                Err(TunnelError::Timeout(_)) if apps_limit => {
                    tracing::debug!(%dest, "the app stopped waiting for this connect; given up in the pod too");
                    this.settle(inode, generation, &report, Outcome::Abandoned);
                    return;
                }
                Err(e) => {
                    let errno = crate::handlers::tunnel_errno(&e);
                    tracing::debug!(%dest, errno, "pod-side connect failed");
                    this.fail(&socket, inode, generation, refuser, errno, &report);
                    return;
                }
            };
            // Before the app can learn (it does as soon as its socket is connected), so its
            // getsockname already shows the pod side.
            if let Some(r) = lock(&this.redirected).by_inode.get_mut(&inode) {
                r.pod_local = stream.far_local();
            }
            let conn = match complete(socket.as_fd(), hold_addr, app).await {
                Ok(conn) => conn,
                Err(errno) => {
                    tracing::debug!(%dest, errno, "cannot complete the app's connect locally");
                    stream.reset();
                    this.fail(&socket, inode, generation, refuser, errno, &report);
                    return;
                }
            };
            // The duplicate must go now: the app's close has to close its socket.
            drop(socket);
            this.settle(inode, generation, &report, Outcome::Connected);
            let end = stream.relay_tcp(conn).await;
            tracing::debug!(%dest, ?end, "outgoing relay finished");
            lock(&this.redirected).finish(inode, generation);
        });
        Ok(outcome)
    }

    /// Reports a final outcome and forgets the pending connect (unless a failure waits for
    /// SO_ERROR, see [`Proxy::fail`]).
    fn settle(&self, inode: u64, generation: u64, report: &watch::Sender<Outcome>, outcome: Outcome) {
        if outcome != Outcome::Connected {
            lock(&self.redirected).remove(inode, generation);
        }
        {
            let mut pending = lock(&self.pending);
            if pending.get(&inode).is_some_and(|p| p.failed_with.is_none()) {
                pending.remove(&inode);
            }
        }
        let _ = report.send(outcome);
    }

    /// Makes the app's connecting socket fail with `errno`, as a failed connect would.
    fn fail(
        &self,
        socket: &OwnedFd,
        inode: u64,
        generation: u64,
        refuser: SocketAddr,
        errno: i32,
        report: &watch::Sender<Outcome>,
    ) {
        let fd = socket.as_fd();
        // Only a socket still waiting for us: one the app disconnected meanwhile is its own.
        if sockets::tcp_state(fd) == Some(sockets::TCP_SYN_SENT) {
            // From the disconnect on, the app may look (it is woken): SO_ERROR reports the
            // pod's errno, not the stand-in ECONNRESET the disconnect leaves.
            self.record_failure(inode, errno);
            sockets::abort_connect(fd);
            if errno == libc::ECONNREFUSED {
                let family = sockets::socket_domain(fd).unwrap_or(libc::AF_INET);
                let _ = sockets::take_error(fd);
                let refused =
                    sockets::connect_nonblocking(fd, &crate::policy::net::encode_sockaddr(refuser, family));
                tracing::trace!(?refused, "refused locally, as in the pod");
                // The socket reports the refusal itself now, on every path. If the app read the
                // error meanwhile it heard the refusal already, and this second one must go.
                if lock(&self.pending).remove(&inode).is_none() {
                    let _ = sockets::take_error(fd);
                }
            }
        }
        self.settle(inode, generation, report, Outcome::Failed(errno));
    }

    /// Keeps the pod's errno of a failed connect for the app's SO_ERROR, among the
    /// [`FAILURES_KEPT`] most recent (an app that never asks must not grow the table).
    fn record_failure(&self, inode: u64, errno: i32) {
        let mut pending = lock(&self.pending);
        let Some(p) = pending.get_mut(&inode) else { return };
        p.failed_with = Some(errno);
        p.failed_seq = self.failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let newest = p.failed_seq;
        if pending.len() > FAILURES_KEPT {
            pending.retain(|_, p| p.failed_with.is_none() || newest - p.failed_seq < FAILURES_KEPT as u64);
        }
    }

    /// Whether IPv6 sockets can have relays on `::1` (see [`app_endpoint`]).
    pub fn v6_loopback(&self) -> bool {
        self.hold_v6.is_some()
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
        let generation = lock(&self.redirected).insert(inode, dest, flow.stream.far_local());
        let this = self.clone();
        let counted = this.count_udp_flow();
        tokio::spawn(async move {
            let _counted = counted;
            flow.stream.relay_udp(flow.relay, UDP_IDLE).await;
            lock(&this.redirected).finish(inode, generation);
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
    /// created on first use (binding the socket first if it has none yet, as a send would).
    ///
    /// All datagrams of one app socket go through one unconnected socket in the pod, as the
    /// app's own would: one pod-side port for every destination, and replies from any address
    /// or port (TFTP, STUN, DNS servers that answer from another address) come back to the app,
    /// each from a relay of its own, which `recvfrom` reports as that pod address. (A peer
    /// without a protocol 4 agent gets one connected pod socket per destination instead.)
    pub async fn sendto_relay(
        self: &Arc<Self>,
        socket: &OwnedFd,
        inode: u64,
        dest: SocketAddr,
    ) -> Result<SocketAddr, i32> {
        if let Some(relay) = lock(&self.sendto_relays).get(&(inode, dest)) {
            return Ok(*relay);
        }
        sockets::ensure_bound(socket.as_fd())?;
        if self.tunnel.version() < kmirror_protocol::SOCKETS_VERSION {
            return self.connected_sendto_relay(socket, inode, dest).await;
        }
        let slot = lock(&self.pod_udp).entry(inode).or_default().clone();
        let pod = {
            let mut opened = slot.lock().await;
            match &*opened {
                Some(pod) => pod.clone(),
                None => {
                    let pod = self.open_pod_udp(socket, inode).await?;
                    *opened = Some(pod.clone());
                    pod
                }
            }
        };
        pod.relay(self, inode, dest).await
    }

    /// Opens the pod-side socket of the app's unconnected UDP socket and starts carrying its
    /// datagrams (see [`Proxy::sendto_relay`]).
    async fn open_pod_udp(self: &Arc<Self>, socket: &OwnedFd, inode: u64) -> Result<Arc<PodUdp>, i32> {
        let fd = socket.as_fd();
        let family = sockets::socket_domain(fd)?;
        let v6_only = family == libc::AF_INET6 && sockets::v6_only(fd);
        let v4_peer: SocketAddr = (Ipv4Addr::new(192, 0, 2, 1), 1).into();
        let v6_peer: SocketAddr = (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 1).into();
        let app_v4 = (!v6_only).then(|| app_endpoint(fd, v4_peer, self.v6_loopback()).ok()).flatten();
        let app_v6 = (family == libc::AF_INET6)
            .then(|| app_endpoint(fd, v6_peer, self.v6_loopback()).ok())
            .flatten()
            .filter(|a| a.is_ipv6());
        let target = OpenTarget::UdpUnconnected { v6: family == libc::AF_INET6, v6_only };
        let mut stream = self
            .tunnel
            .open(target, UDP_OPEN_TIMEOUT)
            .await
            .map_err(|e| crate::handlers::tunnel_errno(&e))?;
        let (to_pod, mut outbound) = tokio::sync::mpsc::channel::<(SocketAddr, Vec<u8>)>(256);
        let pod =
            Arc::new(PodUdp { to_pod, app_v4, app_v6, relays: Mutex::default(), readers: Mutex::default() });
        let (this, owner) = (self.clone(), pod.clone());
        tokio::spawn(async move {
            let _counted = this.count_udp_flow();
            loop {
                tokio::select! {
                    Some((peer, payload)) = outbound.recv() => {
                        if stream.send(&kmirror_protocol::encode_addressed(peer, &payload)).await.is_err() {
                            break;
                        }
                    }
                    event = stream.recv() => match event {
                        Inbound::Data(frame) => {
                            if let Some((from, payload)) = kmirror_protocol::decode_addressed(&frame)
                                && let Ok(relay) = owner.relay_socket(&this, inode, canonical(from)).await
                            {
                                let _ = relay.send(payload).await;
                            }
                            stream.grant(frame.len());
                        }
                        Inbound::Shutdown => {}
                        Inbound::Reset => break,
                    },
                    _ = tokio::time::sleep(UDP_IDLE) => break,
                }
            }
            stream.reset();
            lock(&this.sendto_relays).retain(|&(owner, _), _| owner != inode);
            lock(&this.pod_udp).remove(&inode);
            for reader in lock(&owner.readers).drain(..) {
                reader.abort();
            }
        });
        Ok(pod)
    }

    /// A relay for `dest` with its own connected pod socket (protocol before 4).
    async fn connected_sendto_relay(
        self: &Arc<Self>,
        socket: &OwnedFd,
        inode: u64,
        dest: SocketAddr,
    ) -> Result<SocketAddr, i32> {
        let flow = self.udp_flow(app_endpoint(socket.as_fd(), dest, self.v6_loopback())?, dest).await?;
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

/// Where the pod side of an unconnected UDP socket is opened once (the first sends wait here).
type PodUdpSlot = Arc<tokio::sync::Mutex<Option<Arc<PodUdp>>>>;

/// The pod side of one unconnected UDP socket of the app (see [`Proxy::sendto_relay`]).
struct PodUdp {
    /// Datagrams for the pod, with the pod peer each goes to.
    to_pod: tokio::sync::mpsc::Sender<(SocketAddr, Vec<u8>)>,
    /// Where the app's socket receives from relays on 127.0.0.1 and on ::1 (`None`: it cannot).
    app_v4: Option<SocketAddr>,
    app_v6: Option<SocketAddr>,
    /// A relay per pod peer.
    relays: Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>,
    readers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl PodUdp {
    /// The address of the relay for pod peer `peer`, created on first use.
    async fn relay(&self, proxy: &Arc<Proxy>, inode: u64, peer: SocketAddr) -> Result<SocketAddr, i32> {
        let relay = self.relay_socket(proxy, inode, peer).await?;
        relay.local_addr().map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
    }

    /// The relay socket for pod peer `peer`: it talks to the app's socket only, sends what the
    /// app sends it to `peer` in the pod, and is where datagrams from `peer` reach the app.
    async fn relay_socket(
        &self,
        proxy: &Arc<Proxy>,
        inode: u64,
        peer: SocketAddr,
    ) -> Result<Arc<UdpSocket>, i32> {
        if let Some(relay) = lock(&self.relays).get(&peer) {
            return Ok(relay.clone());
        }
        let app = match (peer.is_ipv6(), self.app_v4, self.app_v6) {
            (true, _, Some(app)) | (false, Some(app), _) | (_, Some(app), None) | (_, None, Some(app)) => app,
            (_, None, None) => return Err(libc::EAFNOSUPPORT),
        };
        let relay = Arc::new(udp_relay_for(app).await.map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?);
        let relay_addr = relay.local_addr().map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        {
            let mut relays = lock(&self.relays);
            if let Some(raced) = relays.get(&peer) {
                return Ok(raced.clone());
            }
            relays.insert(peer, relay.clone());
        }
        lock(&proxy.sendto_relays).insert((inode, peer), relay_addr);
        let (reader, to_pod) = (relay.clone(), self.to_pod.clone());
        let reading = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                match reader.recv(&mut buf).await {
                    Ok(n) => {
                        if to_pod.send((peer, buf[..n].to_vec())).await.is_err() {
                            return;
                        }
                    }
                    // An ICMP error of a datagram the relay sent to the app (its socket closed).
                    Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => continue,
                    Err(_) => return,
                }
            }
        });
        lock(&self.readers).push(reading);
        Ok(relay)
    }
}

/// Where datagrams of the app's socket (our duplicate of it) come from when it sends them to
/// a relay of kmirror's for `dest`: its local address, a wildcard read as the loopback address
/// the kernel picks as the source. The relay is on IPv6 loopback (`::1`) for an IPv6-only
/// socket, and for an IPv6 destination of a dual-stack socket (an IPv6 datagram may carry
/// 65527 bytes, an IPv4 one 65507); on 127.0.0.1 otherwise. `v6_loopback`: whether the
/// machine has `::1`.
pub fn app_endpoint(socket: BorrowedFd<'_>, dest: SocketAddr, v6_loopback: bool) -> Result<SocketAddr, i32> {
    let raw = sockets::local_addr(socket)?;
    let Some(crate::policy::net::Destination::Inet(local)) = crate::policy::net::parse_sockaddr(&raw) else {
        return Err(libc::EAFNOSUPPORT);
    };
    let family = sockets::socket_domain(socket)?;
    let v6 = family == libc::AF_INET6
        && (sockets::v6_only(socket)
            || (v6_loopback
                && canonical(dest).is_ipv6()
                && (local.ip().is_unspecified() || canonical(local).is_ipv6())));
    let local = if v6 { local } else { canonical(local) };
    if !local.ip().is_unspecified() {
        return Ok(local);
    }
    let loopback: IpAddr = if v6 { Ipv6Addr::LOCALHOST.into() } else { Ipv4Addr::LOCALHOST.into() };
    Ok(SocketAddr::new(loopback, local.port()))
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    crate::policy::net::canonical(addr)
}

/// A relay socket on loopback (127.0.0.1 or ::1, as `app`) connected to `app` before anyone
/// learns its port. A datagram that arrived between its bind and its connect came from
/// someone else (the app cannot know the port yet) and is dropped: a connected UDP socket
/// keeps what is already queued.
async fn udp_relay_for(app: SocketAddr) -> std::io::Result<UdpSocket> {
    let loopback: IpAddr =
        if app.is_ipv4() { Ipv4Addr::LOCALHOST.into() } else { Ipv6Addr::LOCALHOST.into() };
    let relay = UdpSocket::bind((loopback, 0)).await?;
    relay.connect(app).await?;
    let mut scratch = [0u8; 1];
    // The queue is finite (nothing new gets in once connected); the bound is a backstop.
    for _ in 0..65536 {
        let received =
            nix::sys::socket::recv(relay.as_raw_fd(), &mut scratch, nix::sys::socket::MsgFlags::MSG_DONTWAIT);
        // EAGAIN: the queue is empty. Another error is a queued ICMP error from the same
        // window, consumed by this call like the datagrams before it.
        if received == Err(nix::errno::Errno::EAGAIN) {
            break;
        }
    }
    Ok(relay)
}

/// Our end of a redirected connect: a socket on the hold point's address that connects to the
/// app's socket (`app`, our duplicate `socket`), which waits in SYN-SENT for exactly that
/// address. The crossing SYNs make a simultaneous open; once ours is established, the app's is
/// too (or follows at once: it only needs our ACK, which left before our connect returned).
async fn complete(socket: BorrowedFd<'_>, hold: SocketAddr, app: SocketAddr) -> Result<TcpStream, i32> {
    let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(libc::EIO);
    let ours = new_tcp(hold.ip()).map_err(errno)?;
    ours.set_reuseport(true).map_err(errno)?;
    ours.bind(hold).map_err(errno)?;
    let conn = match tokio::time::timeout(COMPLETE_TIMEOUT, ours.connect(app)).await {
        Ok(connected) => connected.map_err(errno)?,
        Err(_) => return Err(libc::ETIMEDOUT),
    };
    let _ = conn.set_nodelay(true);
    let deadline = tokio::time::Instant::now() + COMPLETE_TIMEOUT;
    let mut tries = 0u32;
    while matches!(sockets::tcp_state(socket), Some(sockets::TCP_SYN_SENT | sockets::TCP_SYN_RECV)) {
        if tokio::time::Instant::now() > deadline {
            return Err(libc::ETIMEDOUT);
        }
        tries += 1;
        if tries < 8 {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    Ok(conn)
}
