//! `connect`, `getpeername`, `getsockname`, `listen` and `accept`.

use super::Context;
use crate::intercept::Notification;
use crate::outgoing::Outcome;
use crate::policy::filter::Proto;
use crate::policy::net::{self, Destination, Route};
use crate::{sockets, tracee};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Upper bound for the pod side of a connect (about Linux's own SYN retry time).
const BLOCKING_CONNECT_LIMIT: Duration = Duration::from_secs(75);

pub fn on_connect(ctx: &Arc<Context>, n: Notification) {
    let (fd, addr, len) = (n.args[0] as i32, n.args[1], n.args[2] as usize);
    if !(2..=128).contains(&len) {
        return ctx.interceptor.continue_call(n.id);
    }
    let Ok(raw) = tracee::read_bytes(n.tid, addr, len) else {
        return ctx.interceptor.continue_call(n.id);
    };
    let dest = match net::parse_sockaddr(&raw) {
        Some(Destination::Inet(dest)) => dest,
        Some(Destination::Unix(path)) if ctx.files.remote_dns && net::is_nscd_socket(&path) => {
            if ctx.interceptor.is_valid(n.id) {
                ctx.interceptor.return_errno(n.id, libc::ENOENT);
            }
            return;
        }
        _ => return ctx.interceptor.continue_call(n.id),
    };
    let Route::Remote(dest) = ctx.outgoing.route(dest) else {
        return ctx.interceptor.continue_call(n.id);
    };
    let Ok(socket) = ctx.threads.take_fd(n.tid, fd) else {
        // Not an open descriptor (any more): the kernel reports it.
        return ctx.interceptor.continue_call(n.id);
    };
    if !ctx.interceptor.is_valid(n.id) {
        return;
    }
    let family = net::family_of(&raw);
    match (sockets::socket_type(socket.as_fd()), sockets::socket_protocol(socket.as_fd())) {
        (Ok(libc::SOCK_STREAM), Ok(libc::IPPROTO_TCP)) if admits(ctx, dest, Proto::Tcp) => {
            let ctx = ctx.clone();
            super::spawn_answering(
                ctx.clone(),
                n.id,
                async move { connect_tcp(&ctx, n, socket, dest).await },
            );
        }
        (Ok(libc::SOCK_DGRAM), Ok(libc::IPPROTO_UDP)) if admits(ctx, dest, Proto::Udp) => {
            let ctx = ctx.clone();
            super::spawn_answering(ctx.clone(), n.id, async move {
                connect_udp(&ctx, n, socket, dest, family).await
            });
        }
        // Raw sockets, SCTP, MPTCP...: not tunnelled; the kernel handles them locally.
        _ => ctx.interceptor.continue_call(n.id),
    }
}

/// Whether a connection of `proto` to `dest` goes through the pod (the protocol switches and
/// the user's filter, with the names the app resolved to `dest`'s address).
pub fn admits(ctx: &Context, dest: SocketAddr, proto: Proto) -> bool {
    let names = if ctx.outgoing.needs_names() { ctx.names.names_of(dest.ip()) } else { Vec::new() };
    ctx.outgoing.admits(dest, proto, &names)
}

async fn connect_tcp(ctx: &Arc<Context>, n: Notification, socket: OwnedFd, dest: SocketAddr) {
    if let Some(result) = connect_through_pod(ctx, &n, socket, dest).await {
        super::answer(ctx, &n, result.map(|()| 0));
    }
}

/// Connects the app's TCP socket to `dest` through the pod (see [`crate::outgoing`] for how the
/// socket stays "connecting" until the pod side is known). The result is what the app's call
/// reports; `None` when the call was answered already (handed back to the kernel, or gone).
///
/// A non-blocking socket hears EINPROGRESS at once and learns the outcome from the socket
/// itself, as from any connect. A blocking one waits here, as long as SO_SNDTIMEO allows,
/// looking for signals meanwhile: on one, the call goes back to the kernel, whose own connect
/// on the socket (now waiting for kmirror's hold point) sees the signal and fails with EINTR,
/// or restarts under SA_RESTART and comes back here.
async fn connect_through_pod(
    ctx: &Arc<Context>,
    n: &Notification,
    socket: OwnedFd,
    dest: SocketAddr,
) -> Option<Result<(), i32>> {
    let fd = socket.as_fd();
    let Some(inode) = sockets::socket_inode(fd) else {
        ctx.interceptor.continue_call(n.id);
        return None;
    };
    let nonblocking = sockets::is_nonblocking(fd);
    let send_timeout = sockets::send_timeout(fd);
    // When the wait ends for a blocking connect (a restarted one starts its timeout anew, as
    // the kernel's does).
    let deadline = send_timeout.map(|t| tokio::time::Instant::now() + t);
    let outcome = if sockets::tcp_is_fresh(fd) {
        // A blocking connect's SO_SNDTIMEO is the app's limit for the pod side too.
        let limit = match send_timeout {
            Some(timeout) if !nonblocking => (timeout, true),
            _ => (BLOCKING_CONNECT_LIMIT, false),
        };
        let duplicate = match socket.try_clone() {
            Ok(duplicate) => duplicate,
            Err(e) => return Some(Err(e.raw_os_error().unwrap_or(libc::EIO))),
        };
        match ctx.proxy.redirect_tcp(duplicate, inode, dest, limit) {
            Ok(outcome) => outcome,
            Err(errno) => return Some(Err(errno)),
        }
    } else {
        match ctx.proxy.pending_outcome(inode) {
            // A blocking connect restarted after a signal, or a second thread's connect on a
            // socket whose pod side is still connecting: wait for it again.
            Some(outcome) if !nonblocking => outcome,
            // Connecting or connected: the kernel answers (EALREADY, EISCONN, or it waits).
            _ => {
                ctx.interceptor.continue_call(n.id);
                return None;
            }
        }
    };
    if nonblocking {
        return Some(Err(libc::EINPROGRESS));
    }
    match wait_for_outcome(ctx, n, outcome, deadline).await? {
        Outcome::Connected => Some(Ok(())),
        Outcome::Failed(errno) => {
            // A blocking connect that fails leaves the socket unconnected and its error
            // reported (by this call), free to connect again.
            sockets::disconnect(fd);
            ctx.proxy.take_failure(inode);
            Some(Err(errno))
        }
        // The app's timeout ran out (the pod side is given up at the same moment): the socket
        // stays as it is, as Linux leaves it after SO_SNDTIMEO.
        Outcome::Abandoned | Outcome::Pending => Some(Err(libc::EINPROGRESS)),
    }
}

/// The kernel's "interrupted by a signal; restart if its handler allows" return code
/// (include/linux/errno.h; not part of the user ABI, so not in libc).
const ERESTARTSYS: i32 = 512;

/// Awaits `work` for a call the app's thread waits in, looking for signals meanwhile as
/// [`super::wait_for_data`] does. On one, the call is answered ERESTARTSYS, which the kernel,
/// on the way back to the app, turns into exactly what an interrupted native call gives: the
/// handler runs, then EINTR, or under SA_RESTART the same call again (trapped anew). For calls
/// that have nothing of the app's in a waiting state that the kernel could take over (a UDP
/// connect or send waiting for its pod side), so they cannot be handed back with CONTINUE.
/// `None` when the call was answered that way or is gone; `work` is dropped then.
pub(super) async fn interruptible<T>(
    ctx: &Context,
    n: &Notification,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    let mut signals = tracee::SignalWatch::open(n.tid).ok();
    let started = tokio::time::Instant::now();
    let mut work = std::pin::pin!(work);
    loop {
        let slice = super::signal_check_interval(started.elapsed());
        if let Ok(done) = tokio::time::timeout(slice, &mut work).await {
            return Some(done);
        }
        if !ctx.interceptor.is_valid(n.id) {
            return None;
        }
        if signals.as_mut().is_some_and(|s| s.pending().unwrap_or(false)) {
            ctx.interceptor.return_errno(n.id, ERESTARTSYS);
            return None;
        }
    }
}

/// Waits for a blocking connect's outcome while the app's thread waits in its trapped call.
/// `None` once the call was handed back to the kernel for a signal (see
/// [`super::wait_for_data`]) or is gone. When `deadline` (the socket's SO_SNDTIMEO) passes
/// first, the pod side is given up and the call reports EINPROGRESS, as Linux does.
async fn wait_for_outcome(
    ctx: &Context,
    n: &Notification,
    mut outcome: watch::Receiver<Outcome>,
    deadline: Option<tokio::time::Instant>,
) -> Option<Outcome> {
    let mut signals = tracee::SignalWatch::open(n.tid).ok();
    let started = tokio::time::Instant::now();
    loop {
        let now = *outcome.borrow_and_update();
        if now != Outcome::Pending {
            return Some(now);
        }
        if !ctx.interceptor.is_valid(n.id) {
            return None;
        }
        if signals.as_mut().is_some_and(|s| s.pending().unwrap_or(false)) {
            ctx.interceptor.continue_call(n.id);
            return None;
        }
        let mut slice = super::signal_check_interval(started.elapsed());
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Some(Outcome::Abandoned);
            }
            slice = slice.min(left);
        }
        if let Ok(Err(_)) = tokio::time::timeout(slice, outcome.changed()).await {
            // The connect's task ended without a word: it can only have been abandoned.
            return Some(Outcome::Abandoned);
        }
    }
}

/// `sendto` with MSG_FASTOPEN to a pod address on a fresh TCP socket: a connect followed by
/// the send, as the kernel does it. A blocking socket gets the bytes sent once connected; a
/// non-blocking one gets EINPROGRESS with nothing sent, as TCP Fast Open without a cookie
/// answers (the app writes again once the socket is writable). A socket that is already
/// connected is the kernel's: it ignores the address.
/// `payload` is what the app's call carries, up to [`MAX_FASTOPEN_PAYLOAD`].
pub fn on_fastopen(
    ctx: &Arc<Context>,
    n: Notification,
    socket: OwnedFd,
    (dest, _family): (SocketAddr, i32),
    payload: Vec<u8>,
) {
    let ctx = ctx.clone();
    super::spawn_answering(ctx.clone(), n.id, async move {
        let writer = socket.try_clone();
        let result = match connect_through_pod(&ctx, &n, socket, dest).await {
            None => return,
            Some(Ok(())) => match writer {
                Ok(writer) => sockets::send(writer.as_fd(), &payload).map(|sent| sent as i64),
                Err(e) => Err(e.raw_os_error().unwrap_or(libc::EIO)),
            },
            Some(Err(errno)) => Err(errno),
        };
        super::answer(&ctx, &n, result);
    });
}

/// Most bytes a fast-open send carries here; the app sends the rest with later writes, as a
/// short write allows.
pub const MAX_FASTOPEN_PAYLOAD: usize = 64 * 1024;

/// `getsockopt(SOL_SOCKET, SO_ERROR)` (trapped for no other option): a redirected connect that
/// failed after the app heard EINPROGRESS left its socket with a stand-in error (ECONNRESET,
/// see [`crate::outgoing`]); the app reads the pod's errno instead. Every other socket is the
/// kernel's, at the cost of one lookup.
pub fn on_getsockopt(ctx: &Arc<Context>, n: Notification) {
    if !ctx.proxy.has_failures_to_report() {
        return ctx.interceptor.continue_call(n.id);
    }
    let (fd, value_ptr, len_ptr) = (n.args[0] as i32, n.args[3], n.args[4]);
    let Ok(socket) = ctx.threads.take_fd(n.tid, fd) else {
        return ctx.interceptor.continue_call(n.id);
    };
    let Some(errno) = sockets::socket_inode(socket.as_fd()).and_then(|inode| ctx.proxy.take_failure(inode))
    else {
        return ctx.interceptor.continue_call(n.id);
    };
    // The stand-in goes, as reading SO_ERROR clears the error.
    let _ = sockets::take_error(socket.as_fd());
    let result = (|| {
        let len_bytes = tracee::read_bytes(n.tid, len_ptr, 4).map_err(|_| libc::EFAULT)?;
        let len = i32::from_ne_bytes(len_bytes.try_into().expect("4 bytes"));
        if len < 0 {
            return Err(libc::EINVAL);
        }
        let memory = super::output_memory(ctx, &n).ok_or(0)?;
        let copy = (len as usize).min(4);
        memory.write(value_ptr, &errno.to_ne_bytes()[..copy]).map_err(|_| libc::EFAULT)?;
        memory.write(len_ptr, &(copy as u32).to_ne_bytes()).map_err(|_| libc::EFAULT)
    })();
    match result {
        Ok(()) => ctx.interceptor.return_value(n.id, 0),
        Err(0) => {}
        Err(errno) => ctx.interceptor.return_errno(n.id, errno),
    }
}

async fn connect_udp(ctx: &Arc<Context>, n: Notification, socket: OwnedFd, dest: SocketAddr, family: i32) {
    let Some(inode) = sockets::socket_inode(socket.as_fd()) else {
        return ctx.interceptor.continue_call(n.id);
    };
    // Bound first (as connect's own autobind would), so the relay can be tied to the socket's
    // address before the socket learns the relay's.
    let app = sockets::ensure_bound(socket.as_fd())
        .and_then(|_| crate::outgoing::app_endpoint(socket.as_fd(), dest, ctx.proxy.v6_loopback()));
    let app = match app {
        Ok(app) => app,
        Err(errno) => {
            if ctx.interceptor.is_valid(n.id) {
                ctx.interceptor.return_errno(n.id, errno);
            }
            return;
        }
    };
    // Waits for the pod side (bounded), interruptible by signals.
    let Some(flow) = interruptible(ctx, &n, ctx.proxy.udp_flow(app, dest)).await else { return };
    let flow = match flow {
        Ok(flow) => flow,
        Err(errno) => {
            if ctx.interceptor.is_valid(n.id) {
                ctx.interceptor.return_errno(n.id, errno);
            }
            return;
        }
    };
    let result = sockets::connect(socket.as_fd(), &net::encode_sockaddr(flow.relay_addr(), family));
    if result.is_ok() {
        ctx.proxy.start_udp(flow, inode, dest);
    }
    if !ctx.interceptor.is_valid(n.id) {
        return;
    }
    match result {
        Ok(()) => ctx.interceptor.return_value(n.id, 0),
        Err(errno) => ctx.interceptor.return_errno(n.id, errno),
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
    delivered_from(ctx, raw_peer).and_then(|d| net::encode_for_socket(d.client, family))
}

/// getpeername: a redirected socket shows the destination the app asked for instead of the
/// local proxy; a connection kmirror delivered from the pod shows the pod client.
pub fn on_getpeername(ctx: &Arc<Context>, n: Notification) {
    let (fd, addr_ptr, len_ptr) = (n.args[0] as i32, n.args[1], n.args[2]);
    let Ok(socket) = ctx.threads.take_fd(n.tid, fd) else {
        return ctx.interceptor.continue_call(n.id);
    };
    // Most sockets are neither redirected nor delivered: answer those with as few calls as possible.
    let redirected = sockets::socket_inode(socket.as_fd()).and_then(|inode| ctx.proxy.redirect_of(inode));
    if redirected.is_none() && ctx.incoming_peers.is_empty() {
        return ctx.interceptor.continue_call(n.id);
    }
    let Ok(family) = sockets::socket_domain(socket.as_fd()) else {
        return ctx.interceptor.continue_call(n.id);
    };
    let encoded = match redirected {
        Some(dest) => {
            // Only a connected socket has a peer: Go polls getpeername to learn whether a
            // connect finished, so an unfinished one must still say ENOTCONN.
            if let Err(errno) = sockets::peer_check(socket.as_fd()) {
                return ctx.interceptor.return_errno(n.id, errno);
            }
            net::encode_sockaddr(dest, family)
        }
        None => {
            match sockets::peer_addr(socket.as_fd()).ok().and_then(|raw| incoming_client(ctx, &raw, family)) {
                Some(client) => client,
                None => return ctx.interceptor.continue_call(n.id),
            }
        }
    };
    match write_sockaddr_out(ctx, &n, addr_ptr, len_ptr, &encoded) {
        Ok(()) => ctx.interceptor.return_value(n.id, 0),
        Err(0) => {}
        Err(errno) => ctx.interceptor.return_errno(n.id, errno),
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
        return ctx.interceptor.continue_call(n.id);
    }
    let (fd, addr_ptr, len_ptr) = (n.args[0] as i32, n.args[1], n.args[2]);
    let Ok(socket) = ctx.threads.take_fd(n.tid, fd) else {
        return ctx.interceptor.continue_call(n.id);
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
        return ctx.interceptor.continue_call(n.id);
    };
    let Some(encoded) = sockets::socket_domain(socket.as_fd())
        .ok()
        .and_then(|family| net::encode_for_socket(pod_local, family))
    else {
        return ctx.interceptor.continue_call(n.id);
    };
    match write_sockaddr_out(ctx, &n, addr_ptr, len_ptr, &encoded) {
        Ok(()) => ctx.interceptor.return_value(n.id, 0),
        Err(0) => {}
        Err(errno) => ctx.interceptor.return_errno(n.id, errno),
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
        return ctx.interceptor.continue_call(n.id);
    }
    let Ok(listening) = ctx.threads.take_fd(n.tid, fd) else {
        return ctx.interceptor.continue_call(n.id);
    };
    let nonblocking = sockets::is_nonblocking(listening.as_fd());
    if nonblocking && ctx.incoming_peers.is_empty() {
        return ctx.interceptor.continue_call(n.id);
    }
    // Only a TCP listener whose port receives pod traffic: any other (AF_UNIX, UDP-less
    // protocols, a port whose subscription failed) never gets a delivered connection, and its
    // accept stays the kernel's in every respect.
    let Some(family) = serves_pod_port(ctx, listening.as_fd()) else {
        return ctx.interceptor.continue_call(n.id);
    };
    if nonblocking {
        return deliver_accepted(ctx, &n, &listening, flags, family);
    }
    // SO_RCVTIMEO bounds a blocking accept (EAGAIN once it runs out), as natively.
    let deadline = sockets::recv_timeout(listening.as_fd()).map(|t| std::time::Instant::now() + t);
    // The wait can be long: never on the notify thread.
    let ctx2 = ctx.clone();
    super::spawn_answering(ctx.clone(), n.id, async move {
        wait_and_accept(&ctx2, &n, listening, flags, family, deadline).await
    });
}

/// The family of a listening socket that receives connections delivered from the pod: a TCP
/// socket (IPv4 or IPv6) whose port is subscribed.
fn serves_pod_port(ctx: &Context, listening: std::os::fd::BorrowedFd<'_>) -> Option<i32> {
    let family = sockets::socket_domain(listening).ok()?;
    let tcp = matches!(family, libc::AF_INET | libc::AF_INET6)
        && sockets::socket_type(listening) == Ok(libc::SOCK_STREAM)
        && sockets::socket_protocol(listening) == Ok(libc::IPPROTO_TCP);
    if !tcp {
        return None;
    }
    // A listener's subscription may still be on its way (an accept right after listen): only
    // one that failed rules the port out.
    let (pod_port, _) = ctx.incoming.subscription(sockets::local_port(listening).ok()?)?;
    (!ctx.incoming_peers.is_unserved(pod_port)).then_some(family)
}

/// Blocking accepts performed here take a queued connection one at a time: with several app
/// threads waiting on one listener, all see it readable, and the losers' accept would block
/// where no signal check runs.
static BLOCKING_ACCEPT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A blocking accept, performed here (see [`super::wait_for_data`] for how signals still reach
/// the waiting thread).
async fn wait_and_accept(
    ctx: &Arc<Context>,
    n: &Notification,
    listening: OwnedFd,
    flags: i32,
    family: i32,
    deadline: Option<std::time::Instant>,
) {
    let Some(listening) = super::waitable(listening) else {
        return ctx.interceptor.continue_call(n.id);
    };
    loop {
        match super::wait_for_data(ctx, n, &listening, deadline).await {
            super::Waited::Ready => {
                // The listener is the app's, in blocking mode: an accept that loses a race for
                // the connection (to a thread of the app accepting natively) blocks. So the
                // accept runs on a blocking thread, never on the runtime's only one.
                let Ok(fd) = listening.get_ref().try_clone() else {
                    return ctx.interceptor.continue_call(n.id);
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
                    Err(_) => return ctx.interceptor.return_errno(n.id, libc::EIO),
                }
            }
            super::Waited::TimedOut => return ctx.interceptor.return_errno(n.id, libc::EAGAIN),
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
        Err(errno) => return ctx.interceptor.return_errno(n.id, errno),
    };
    let encoded = incoming_client(ctx, &raw_peer, family).unwrap_or(raw_peer);
    match write_sockaddr_out(ctx, n, addr_ptr, len_ptr, &encoded) {
        Ok(()) => {}
        Err(0) => return,
        Err(errno) => return ctx.interceptor.return_errno(n.id, errno),
    }
    ctx.interceptor.return_new_fd(n.id, conn.as_raw_fd(), flags & libc::SOCK_CLOEXEC != 0);
}

/// Learns the ports the app serves: once its listen succeeds, the matching pod port is
/// subscribed (mirror or steal). The listen itself is the kernel's.
pub fn on_listen(ctx: &Arc<Context>, n: Notification) {
    let fd = n.args[0] as i32;
    let socket = ctx.threads.take_fd(n.tid, fd).ok();
    ctx.interceptor.continue_call(n.id);
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
        subscribe(&ctx, local_port).await;
    });
}

/// Subscribes the pod port that `local_port` maps to, for a listener the app did not open
/// with a trapped `listen` (socket activation hands it over already listening).
pub fn subscribe_listener(ctx: Arc<Context>, local_port: u16) {
    ctx.runtime.clone().spawn(async move { subscribe(&ctx, local_port).await });
}

async fn subscribe(ctx: &Arc<Context>, local_port: u16) {
    {
        let Some((pod_port, mode)) = ctx.incoming.subscription(local_port) else { return };
        if !super::lock(&ctx.subscribed).insert(pod_port) {
            return;
        }
        let filter = if mode == kmirror_protocol::IncomingMode::Steal && ctx.incoming.filters(pod_port) {
            ctx.incoming_filter.clone()
        } else {
            None
        };
        let request = kmirror_protocol::Request::Subscribe { port: pod_port, mode, filter };
        match ctx.tunnel.request(request, ctx.remote_timeout).await {
            Ok(kmirror_protocol::Response::Subscribed) => {
                ctx.incoming_peers.set_unserved(pod_port, false);
                tracing::info!(local_port, pod_port, ?mode, "incoming traffic subscribed");
            }
            outcome => {
                super::lock(&ctx.subscribed).remove(&pod_port);
                ctx.incoming_peers.set_unserved(pod_port, true);
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
    }
}
