//! `connect`, `getpeername`, `getsockname`, `listen` and `accept`.

use super::{Context, tunnel_errno};
use crate::outgoing::Proxy;
use crate::policy::net::{self, Destination, Route};
use crate::seccomp::Notification;
use crate::{sockets, tracee};
use kmirror_protocol::OpenTarget;
use kmirror_protocol::tunnel::{Stream, TunnelError};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// How long a non-blocking connect waits for the pod side before answering EINPROGRESS. Within
/// it, refusals and unreachable destinations come back as the kernel would report them.
const NONBLOCKING_BUDGET: Duration = Duration::from_millis(100);
/// Upper bound for a blocking connect without SO_SNDTIMEO (about Linux's own SYN retry time).
const BLOCKING_CONNECT_LIMIT: Duration = Duration::from_secs(75);

pub fn on_connect(ctx: &Arc<Context>, n: Notification) {
    let (fd, addr, len) = (n.args[0] as i32, n.args[1], n.args[2] as usize);
    if !(2..=128).contains(&len) {
        return ctx.listener.continue_call(n.id);
    }
    let Ok(raw) = tracee::read_bytes(n.tid, addr, len) else {
        return ctx.listener.continue_call(n.id);
    };
    let dest = match net::parse_sockaddr(&raw) {
        Some(Destination::Inet(dest)) => dest,
        Some(Destination::Unix(path)) if ctx.files.remote_dns && net::is_nscd_socket(&path) => {
            if ctx.listener.is_valid(n.id) {
                ctx.listener.return_errno(n.id, libc::ENOENT);
            }
            return;
        }
        _ => return ctx.listener.continue_call(n.id),
    };
    let Route::Remote(dest) = ctx.outgoing.route(dest) else {
        return ctx.listener.continue_call(n.id);
    };
    let Ok(socket) = ctx.threads.take_fd(n.tid, fd) else {
        // Not an open descriptor (any more): the kernel reports it.
        return ctx.listener.continue_call(n.id);
    };
    if !ctx.listener.is_valid(n.id) {
        return;
    }
    let family = net::family_of(&raw);
    match (sockets::socket_type(socket.as_fd()), sockets::socket_protocol(socket.as_fd())) {
        (Ok(libc::SOCK_STREAM), Ok(libc::IPPROTO_TCP)) => {
            let ctx = ctx.clone();
            super::spawn_answering(ctx.clone(), n.id, async move {
                connect_tcp(&ctx, n, socket, dest, family).await
            });
        }
        (Ok(libc::SOCK_DGRAM), Ok(libc::IPPROTO_UDP)) => {
            let ctx = ctx.clone();
            super::spawn_answering(ctx.clone(), n.id, async move {
                connect_udp(&ctx, n, socket, dest, family).await
            });
        }
        // Raw sockets, SCTP, MPTCP...: not tunnelled; the kernel handles them locally.
        _ => ctx.listener.continue_call(n.id),
    }
}

async fn connect_tcp(ctx: &Arc<Context>, n: Notification, socket: OwnedFd, dest: SocketAddr, family: i32) {
    let result = redirect_tcp(ctx, &socket, dest, family).await;
    super::answer(ctx, &n, result.map(|()| 0));
}

/// Dials `dest` in the pod and connects the app's socket (through our duplicate) to the local
/// proxy; the result is what the app's connect reports.
///
/// Both connects run at once: on loopback the proxy handshake completes inside its connect
/// call, so it costs the app nothing while the pod side is still connecting. Should the pod
/// side fail, the app's socket is disconnected again before the app learns why, leaving it as
/// a failed connect leaves a socket.
async fn redirect_tcp(
    ctx: &Arc<Context>,
    socket: &OwnedFd,
    dest: SocketAddr,
    family: i32,
) -> Result<(), i32> {
    let proxy_addr = net::encode_sockaddr(ctx.proxy.tcp_addr(), family);
    // A connect on a socket that is already connecting or connected is forwarded as is: the
    // kernel answers EALREADY / EISCONN for the same socket the first connect used.
    if !sockets::tcp_is_fresh(socket.as_fd()) {
        return sockets::connect(socket.as_fd(), &proxy_addr);
    }
    let inode = sockets::socket_inode(socket.as_fd()).ok_or(libc::ENOTSOCK)?;
    let send_timeout = sockets::send_timeout(socket.as_fd());
    let mut opening = {
        let tunnel = ctx.tunnel.clone();
        let limit = send_timeout.unwrap_or(BLOCKING_CONNECT_LIMIT);
        tokio::spawn(async move { tunnel.open(OpenTarget::Tcp(dest), limit).await })
    };
    // Lets the open task queue its request and the tunnel's writer send it before the proxy
    // connect below, so the pod side starts first.
    tokio::task::yield_now().await;
    let local = sockets::connect(socket.as_fd(), &proxy_addr);
    let app = match local {
        Ok(()) | Err(libc::EINPROGRESS) => crate::outgoing::app_endpoint(socket.as_fd()),
        Err(errno) => Err(errno),
    };
    let app = match app {
        Ok(app) => app,
        Err(errno) => {
            Proxy::discard(opening);
            return Err(errno);
        }
    };
    let (verdict, upstream) = oneshot::channel();
    ctx.proxy.register(app, upstream, inode, dest);
    let opened = if sockets::is_nonblocking(socket.as_fd()) {
        match tokio::time::timeout(NONBLOCKING_BUDGET, &mut opening).await {
            Ok(opened) => opened.unwrap_or_else(|e| Err(closed(e))),
            Err(_) => {
                // The app hears EINPROGRESS now and the outcome later, through its socket.
                let proxy = ctx.proxy.clone();
                tokio::spawn(async move {
                    let opened = opening.await.unwrap_or_else(|e| Err(closed(e)));
                    let _ = pass_verdict(&proxy, inode, opened, verdict);
                });
                return Err(libc::EINPROGRESS);
            }
        }
    } else {
        opening.await.unwrap_or_else(|e| Err(closed(e)))
    };
    match pass_verdict(&ctx.proxy, inode, opened, verdict) {
        Ok(()) => local,
        Err(e) => {
            sockets::disconnect(socket.as_fd());
            let errno = match e {
                // SO_SNDTIMEO expiring on a blocking connect reports EINPROGRESS on Linux.
                TunnelError::Timeout(_) if send_timeout.is_some() => libc::EINPROGRESS,
                e => tunnel_errno(&e),
            };
            tracing::debug!(%dest, errno, "pod-side connect failed");
            Err(errno)
        }
    }
}

/// Hands a successful pod-side connect to the proxy connection that waits for it; forgets the
/// socket on a failure (dropping `verdict` makes that connection abort).
fn pass_verdict(
    proxy: &Proxy,
    inode: u64,
    opened: Result<Stream, TunnelError>,
    verdict: oneshot::Sender<Stream>,
) -> Result<(), TunnelError> {
    match opened {
        Ok(stream) => {
            // Before the app's connect returns, so its getsockname already shows the pod side.
            proxy.set_pod_local(inode, stream.far_local());
            if let Err(stream) = verdict.send(stream) {
                // The proxy dropped the registration: the session is ending.
                stream.reset();
                proxy.forget(inode);
                return Err(TunnelError::Closed("the local proxy lost the connection".into()));
            }
            Ok(())
        }
        Err(e) => {
            proxy.forget(inode);
            Err(e)
        }
    }
}

/// `sendto` with MSG_FASTOPEN to a pod address on a fresh TCP socket: a connect followed by
/// the send, as the kernel does it. A blocking socket gets the bytes sent once connected; a
/// non-blocking one gets EINPROGRESS with nothing sent, as TCP Fast Open without a cookie
/// answers (the app writes again once the socket is writable). A socket that is already
/// connected (to the proxy) is the kernel's: it ignores the address.
/// `payload` is what the app's call carries, up to [`MAX_FASTOPEN_PAYLOAD`].
pub fn on_fastopen(
    ctx: &Arc<Context>,
    n: Notification,
    socket: OwnedFd,
    (dest, family): (SocketAddr, i32),
    payload: Vec<u8>,
) {
    let ctx = ctx.clone();
    super::spawn_answering(ctx.clone(), n.id, async move {
        let nonblocking = sockets::is_nonblocking(socket.as_fd());
        let result = match redirect_tcp(&ctx, &socket, dest, family).await {
            Ok(()) if nonblocking => Err(libc::EINPROGRESS),
            Ok(()) => sockets::send(socket.as_fd(), &payload).map(|sent| sent as i64),
            Err(errno) => Err(errno),
        };
        super::answer(&ctx, &n, result);
    });
}

/// Most bytes a fast-open send carries here; the app sends the rest with later writes, as a
/// short write allows.
pub const MAX_FASTOPEN_PAYLOAD: usize = 64 * 1024;

fn closed(e: tokio::task::JoinError) -> TunnelError {
    TunnelError::Closed(format!("connect task failed: {e}"))
}

async fn connect_udp(ctx: &Arc<Context>, n: Notification, socket: OwnedFd, dest: SocketAddr, family: i32) {
    let Some(inode) = sockets::socket_inode(socket.as_fd()) else {
        return ctx.listener.continue_call(n.id);
    };
    // Bound first (as connect's own autobind would), so the relay can be tied to the socket's
    // address before the socket learns the relay's.
    let app =
        sockets::ensure_bound(socket.as_fd()).and_then(|_| crate::outgoing::app_endpoint(socket.as_fd()));
    let app = match app {
        Ok(app) => app,
        Err(errno) => {
            if ctx.listener.is_valid(n.id) {
                ctx.listener.return_errno(n.id, errno);
            }
            return;
        }
    };
    let flow = match ctx.proxy.udp_flow(app, dest).await {
        Ok(flow) => flow,
        Err(errno) => {
            if ctx.listener.is_valid(n.id) {
                ctx.listener.return_errno(n.id, errno);
            }
            return;
        }
    };
    let result = sockets::connect(socket.as_fd(), &net::encode_sockaddr(flow.relay_addr(), family));
    if result.is_ok() {
        ctx.proxy.start_udp(flow, inode, dest);
    }
    if !ctx.listener.is_valid(n.id) {
        return;
    }
    match result {
        Ok(()) => ctx.listener.return_value(n.id, 0),
        Err(errno) => ctx.listener.return_errno(n.id, errno),
    }
}

/// Writes a sockaddr result with the kernel's value-result rules: `*len_ptr` says how much room
/// the caller has, at most that much is copied, and the full length is written back.
/// `Err(0)` means the caller went away meanwhile (nothing to answer).
pub(super) fn write_sockaddr_out(
    ctx: &Context,
    n: &Notification,
    addr_ptr: u64,
    len_ptr: u64,
    encoded: &[u8],
) -> Result<(), i32> {
    let len_bytes = tracee::read_bytes(n.tid, len_ptr, 4).map_err(|_| libc::EFAULT)?;
    let len = i32::from_ne_bytes(len_bytes.try_into().expect("4 bytes"));
    if len < 0 {
        return Err(libc::EINVAL);
    }
    let memory = super::output_memory(ctx, n).ok_or(0)?;
    let copy = (len as usize).min(encoded.len());
    memory.write(addr_ptr, &encoded[..copy]).map_err(|_| libc::EFAULT)?;
    memory.write(len_ptr, &(encoded.len() as u32).to_ne_bytes()).map_err(|_| libc::EFAULT)
}

/// The delivered connection behind a loopback peer address kmirror connected to the app from.
fn delivered_from(ctx: &Context, raw_peer: &[u8]) -> Option<crate::incoming::Delivered> {
    let Some(Destination::Inet(peer)) = net::parse_sockaddr(raw_peer) else { return None };
    let peer = net::canonical(peer);
    if !peer.ip().is_loopback() {
        return None;
    }
    ctx.incoming_peers.delivered_from(peer)
}

/// The pod client behind a loopback connection kmirror made to the app, in the socket's family.
fn incoming_client(ctx: &Context, raw_peer: &[u8], family: i32) -> Option<Vec<u8>> {
    delivered_from(ctx, raw_peer).map(|d| net::encode_sockaddr(d.client, family))
}

/// getpeername: a redirected socket shows the destination the app asked for instead of the
/// local proxy; a connection kmirror delivered from the pod shows the pod client.
pub fn on_getpeername(ctx: &Arc<Context>, n: Notification) {
    let (fd, addr_ptr, len_ptr) = (n.args[0] as i32, n.args[1], n.args[2]);
    let Ok(socket) = ctx.threads.take_fd(n.tid, fd) else {
        return ctx.listener.continue_call(n.id);
    };
    // Most sockets are neither redirected nor delivered: answer those with as few calls as possible.
    let redirected = sockets::socket_inode(socket.as_fd()).and_then(|inode| ctx.proxy.redirect_of(inode));
    if redirected.is_none() && ctx.incoming_peers.is_empty() {
        return ctx.listener.continue_call(n.id);
    }
    let Ok(family) = sockets::socket_domain(socket.as_fd()) else {
        return ctx.listener.continue_call(n.id);
    };
    let encoded = match redirected {
        Some(dest) => {
            // Only a connected socket has a peer: Go polls getpeername to learn whether a
            // connect finished, so an unfinished one must still say ENOTCONN.
            if let Err(errno) = sockets::peer_check(socket.as_fd()) {
                return ctx.listener.return_errno(n.id, errno);
            }
            net::encode_sockaddr(dest, family)
        }
        None => {
            match sockets::peer_addr(socket.as_fd()).ok().and_then(|raw| incoming_client(ctx, &raw, family)) {
                Some(client) => client,
                None => return ctx.listener.continue_call(n.id),
            }
        }
    };
    match write_sockaddr_out(ctx, &n, addr_ptr, len_ptr, &encoded) {
        Ok(()) => ctx.listener.return_value(n.id, 0),
        Err(0) => {}
        Err(errno) => ctx.listener.return_errno(n.id, errno),
    }
}

/// getsockname: a redirected socket shows the address its pod-side connection has in the pod
/// (the pod's IP and that connection's port) instead of kmirror's loopback end, as it would
/// inside the pod; "which address do I go out from" lookups (connect a UDP socket, read its
/// name) then learn the pod's IP. A connection delivered from the pod shows the pod address
/// its client reached. Every other socket is the kernel's.
pub fn on_getsockname(ctx: &Arc<Context>, n: Notification) {
    let (redirects, deliveries) = (ctx.proxy.has_redirects(), !ctx.incoming_peers.is_empty());
    if !redirects && !deliveries {
        return ctx.listener.continue_call(n.id);
    }
    let (fd, addr_ptr, len_ptr) = (n.args[0] as i32, n.args[1], n.args[2]);
    let Ok(socket) = ctx.threads.take_fd(n.tid, fd) else {
        return ctx.listener.continue_call(n.id);
    };
    let redirected = redirects
        .then(|| sockets::socket_inode(socket.as_fd()).and_then(|inode| ctx.proxy.pod_local_of(inode)))
        .flatten();
    let delivered = || {
        deliveries
            .then(|| sockets::peer_addr(socket.as_fd()).ok().and_then(|raw| delivered_from(ctx, &raw)))
            .flatten()
            .map(|d| d.server)
    };
    let Some(pod_local) = redirected.or_else(delivered) else {
        return ctx.listener.continue_call(n.id);
    };
    let Ok(family) = sockets::socket_domain(socket.as_fd()) else {
        return ctx.listener.continue_call(n.id);
    };
    match write_sockaddr_out(ctx, &n, addr_ptr, len_ptr, &net::encode_sockaddr(pod_local, family)) {
        Ok(()) => ctx.listener.return_value(n.id, 0),
        Err(0) => {}
        Err(errno) => ctx.listener.return_errno(n.id, errno),
    }
}

/// accept/accept4 on a listener that receives connections kmirror delivers from the pod:
/// performed here so the address the app gets is the pod client's.
pub fn on_accept(ctx: &Arc<Context>, n: Notification) {
    let (fd, addr_ptr) = (n.args[0] as i32, n.args[1]);
    let flags = if n.nr == libc::SYS_accept4 { n.args[3] as i32 } else { 0 };
    // Nothing to show when the app does not ask who connected, or when it serves no port that
    // receives pod traffic (incoming off, say).
    if addr_ptr == 0
        || !ctx.incoming.receives_pod_traffic()
        || flags & !(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) != 0
    {
        return ctx.listener.continue_call(n.id);
    }
    let Ok(listening) = ctx.threads.take_fd(n.tid, fd) else {
        return ctx.listener.continue_call(n.id);
    };
    let Ok(family) = sockets::socket_domain(listening.as_fd()) else {
        return ctx.listener.continue_call(n.id);
    };
    if sockets::is_nonblocking(listening.as_fd()) {
        if ctx.incoming_peers.is_empty() {
            return ctx.listener.continue_call(n.id);
        }
        return deliver_accepted(ctx, &n, &listening, flags, family);
    }
    let serves_pod_port =
        sockets::local_port(listening.as_fd()).is_ok_and(|port| ctx.incoming.subscription(port).is_some());
    if !serves_pod_port {
        return ctx.listener.continue_call(n.id);
    }
    // The wait can be long: never on the notify thread.
    let ctx2 = ctx.clone();
    super::spawn_answering(ctx.clone(), n.id, async move {
        wait_and_accept(&ctx2, &n, listening, flags, family).await
    });
}

/// Blocking accepts performed here take a queued connection one at a time: with several app
/// threads waiting on one listener, all see it readable, and the losers' accept would block
/// where no signal check runs.
static BLOCKING_ACCEPT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A blocking accept, performed here (see [`super::wait_for_data`] for how signals still reach
/// the waiting thread).
async fn wait_and_accept(ctx: &Arc<Context>, n: &Notification, listening: OwnedFd, flags: i32, family: i32) {
    let Some(listening) = super::waitable(listening) else {
        return ctx.listener.continue_call(n.id);
    };
    loop {
        match super::wait_for_data(ctx, n, &listening, None).await {
            super::Waited::Ready => {
                // The listener is the app's, in blocking mode: an accept that loses a race for
                // the connection (to a thread of the app accepting natively) blocks. So the
                // accept runs on a blocking thread, never on the runtime's only one.
                let Ok(fd) = listening.get_ref().try_clone() else {
                    return ctx.listener.continue_call(n.id);
                };
                let (ctx2, n2) = (ctx.clone(), *n);
                let accepted = tokio::task::spawn_blocking(move || {
                    let _one_at_a_time = super::lock(&BLOCKING_ACCEPT);
                    let ready = sockets::wait_readable(fd.as_fd(), Duration::ZERO) == Ok(true);
                    if ready {
                        deliver_accepted(&ctx2, &n2, &fd, flags, family);
                    }
                    ready
                });
                match accepted.await {
                    Ok(true) => return,
                    // Another waiter took the connection: wait for the next.
                    Ok(false) => {}
                    Err(_) => return ctx.listener.return_errno(n.id, libc::EIO),
                }
            }
            super::Waited::TimedOut => return ctx.listener.return_errno(n.id, libc::EAGAIN),
            super::Waited::Answered => return,
        }
    }
}

/// Accepts on the app's listener and answers with the new descriptor and the pod client's
/// address (the loopback peer's, for connections kmirror did not deliver).
fn deliver_accepted(ctx: &Context, n: &Notification, listening: &OwnedFd, flags: i32, family: i32) {
    let (addr_ptr, len_ptr) = (n.args[1], n.args[2]);
    let (conn, raw_peer) = match sockets::accept(listening.as_fd(), flags & libc::SOCK_NONBLOCK) {
        Ok(accepted) => accepted,
        Err(errno) => return ctx.listener.return_errno(n.id, errno),
    };
    let encoded = incoming_client(ctx, &raw_peer, family).unwrap_or(raw_peer);
    match write_sockaddr_out(ctx, n, addr_ptr, len_ptr, &encoded) {
        Ok(()) => {}
        Err(0) => return,
        Err(errno) => return ctx.listener.return_errno(n.id, errno),
    }
    ctx.listener.return_new_fd(n.id, conn.as_raw_fd(), flags & libc::SOCK_CLOEXEC != 0);
}

/// Learns the ports the app serves: once its listen succeeds, the matching pod port is
/// subscribed (mirror or steal). The listen itself is the kernel's.
pub fn on_listen(ctx: &Arc<Context>, n: Notification) {
    let fd = n.args[0] as i32;
    let socket = ctx.threads.take_fd(n.tid, fd).ok();
    ctx.listener.continue_call(n.id);
    let Some(socket) = socket else { return };
    if !matches!(sockets::socket_type(socket.as_fd()), Ok(libc::SOCK_STREAM)) {
        return;
    }
    let Ok(local_port) = sockets::local_port(socket.as_fd()) else { return };
    let ctx = ctx.clone();
    super::spawn_answering(ctx.clone(), n.id, async move {
        // An unbound socket gets its port from listen itself, which runs once we answered.
        let mut local_port = local_port;
        for _ in 0..50 {
            if local_port != 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
            local_port = sockets::local_port(socket.as_fd()).unwrap_or(0);
        }
        if local_port == 0 {
            return;
        }
        let Some((pod_port, mode)) = ctx.incoming.subscription(local_port) else { return };
        if !super::lock(&ctx.subscribed).insert(pod_port) {
            return;
        }
        let filter =
            if mode == kmirror_protocol::IncomingMode::Steal { ctx.incoming_filter.clone() } else { None };
        let request = kmirror_protocol::Request::Subscribe { port: pod_port, mode, filter };
        match ctx.tunnel.request(request, ctx.remote_timeout).await {
            Ok(kmirror_protocol::Response::Subscribed) => {
                tracing::info!(local_port, pod_port, ?mode, "incoming traffic subscribed");
            }
            outcome => {
                super::lock(&ctx.subscribed).remove(&pod_port);
                let why = match outcome {
                    Ok(kmirror_protocol::Response::Error(errno)) => {
                        std::io::Error::from_raw_os_error(errno.0).to_string()
                    }
                    Ok(other) => format!("unexpected answer {other:?}"),
                    Err(e) => e.to_string(),
                };
                eprintln!(
                    "kmirror: cannot {mode:?} pod port {pod_port} to local port {local_port}: {why} (see the agent's message above)"
                );
            }
        }
    });
}
