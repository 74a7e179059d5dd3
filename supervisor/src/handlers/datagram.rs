//! `sendto`, `sendmsg` and `sendmmsg` that name a destination on a UDP socket (and `sendto`
//! with MSG_FASTOPEN on a TCP one, handed to the connect code).
//!
//! A datagram for a pod address goes through a relay for that (socket, destination) pair. It
//! is sent by the app's own socket (through our duplicate) to the relay, so the kernel binds
//! the socket as it would, and the relay receives it from the app's real address; the pod's
//! replies come back from the relay's address. Control messages (IP_TOS, UDP_SEGMENT, ...) go
//! with the datagram, so the kernel applies them to the hop to the relay: a GSO send arrives
//! at the relay as the segments the pod must see.
//!
//! A batch that mixes pod and other destinations is sent here message by message, in order,
//! the others with their own address, because the kernel cannot be given back half a batch.

use super::{Context, answer};
use crate::intercept::Notification;
use crate::policy::filter::Proto;
use crate::policy::net::{self, Destination, Route};
use crate::{sockets, tracee};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

/// Largest UDP payload over IPv4 (65535 less the IPv4 and UDP headers).
const MAX_DATAGRAM_V4: usize = 65_507;
/// Largest UDP payload over IPv6 without jumbograms (65535 less the UDP header: the IPv6
/// header is not counted in its payload length).
const MAX_DATAGRAM_V6: usize = 65_527;

/// Largest payload of one datagram to `dest` (a v4-mapped address is IPv4).
fn max_datagram(dest: SocketAddr) -> usize {
    if net::canonical(dest).is_ipv6() { MAX_DATAGRAM_V6 } else { MAX_DATAGRAM_V4 }
}
/// Most control bytes one message may carry (the kernel's `optmem_max` is smaller by default).
const MAX_CONTROL: usize = 64 * 1024;
/// `UIO_MAXIOV`: the most iovecs one message may have.
const MAX_IOV: u64 = 1024;
/// Layout of `struct msghdr` / `struct mmsghdr` / `struct iovec` on x86_64.
const MSGHDR_SIZE: usize = 56;
const MMSGHDR_SIZE: usize = 64;
const IOVEC_SIZE: usize = 16;

/// The fields of one `struct msghdr` kmirror needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MsgHeader {
    name: u64,
    name_len: usize,
    iov: u64,
    iov_len: u64,
    control: u64,
    control_len: usize,
}

/// Parses a `struct msghdr` (the first 56 bytes of `raw`).
fn parse_msghdr(raw: &[u8]) -> MsgHeader {
    let word = |o: usize| u64::from_ne_bytes(raw[o..o + 8].try_into().expect("8 bytes"));
    let name_len = u32::from_ne_bytes(raw[8..12].try_into().expect("4 bytes")) as usize;
    MsgHeader {
        name: word(0),
        name_len,
        iov: word(16),
        iov_len: word(24),
        control: word(32),
        control_len: word(40) as usize,
    }
}

/// One datagram to send, with where it goes.
struct Datagram {
    payload: Vec<u8>,
    control: Vec<u8>,
    /// The app's own address bytes (sent as given when the destination is not the pod's).
    name: Option<Vec<u8>>,
    /// The pod destination and the address family the app named it in.
    pod: Option<(SocketAddr, i32)>,
}

/// The pod destination named by `raw`, if any.
fn pod_destination(ctx: &Context, raw: &[u8]) -> Option<(SocketAddr, i32)> {
    let Some(Destination::Inet(dest)) = net::parse_sockaddr(raw) else { return None };
    let Route::Remote(dest) = ctx.outgoing.route(dest) else { return None };
    Some((dest, net::family_of(raw)))
}

/// Reads a destination address; `None` for none or an implausible one (the kernel judges it).
fn read_name(tid: u32, addr: u64, len: usize) -> Option<Vec<u8>> {
    (addr != 0 && (2..=128).contains(&len)).then(|| tracee::read_bytes(tid, addr, len).ok()).flatten()
}

/// The transports whose sends to a pod address kmirror takes over.
#[derive(PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

fn transport_of(socket: &OwnedFd) -> Option<Transport> {
    match (sockets::socket_type(socket.as_fd()), sockets::socket_protocol(socket.as_fd())) {
        (Ok(libc::SOCK_DGRAM), Ok(libc::IPPROTO_UDP)) => Some(Transport::Udp),
        (Ok(libc::SOCK_STREAM), Ok(libc::IPPROTO_TCP)) => Some(Transport::Tcp),
        _ => None,
    }
}

pub fn on_sendto(ctx: &Arc<Context>, n: Notification) {
    let (fd, buf, len, flags, addr, addr_len) =
        (n.args[0] as i32, n.args[1], n.args[2] as usize, n.args[3] as i32, n.args[4], n.args[5] as usize);
    let Some(name) = read_name(n.tid, addr, addr_len) else {
        return ctx.interceptor.continue_call(n.id);
    };
    let Some(pod) = pod_destination(ctx, &name) else {
        return ctx.interceptor.continue_call(n.id);
    };
    let Ok(socket) = ctx.threads.take_fd(n.tid, fd) else {
        return ctx.interceptor.continue_call(n.id);
    };
    let proto = match transport_of(&socket) {
        Some(Transport::Udp) => Proto::Udp,
        Some(Transport::Tcp) => Proto::Tcp,
        None => return ctx.interceptor.continue_call(n.id),
    };
    if !super::net::admits(ctx, pod.0, proto) {
        return ctx.interceptor.continue_call(n.id);
    }
    match transport_of(&socket) {
        Some(Transport::Udp) => {}
        // TCP Fast Open: connect and send in one call. A socket already connected (to the
        // proxy) is the kernel's: it ignores the address.
        Some(Transport::Tcp) if flags & libc::MSG_FASTOPEN != 0 && sockets::tcp_is_fresh(socket.as_fd()) => {
            let Ok(payload) = tracee::read_bytes(n.tid, buf, len.min(super::net::MAX_FASTOPEN_PAYLOAD))
            else {
                return ctx.interceptor.return_errno(n.id, libc::EFAULT);
            };
            return super::net::on_fastopen(ctx, n, socket, pod, payload);
        }
        _ => return ctx.interceptor.continue_call(n.id),
    }
    if len > max_datagram(pod.0) {
        return ctx.interceptor.return_errno(n.id, libc::EMSGSIZE);
    }
    let Ok(payload) = tracee::read_bytes(n.tid, buf, len) else {
        return ctx.interceptor.return_errno(n.id, libc::EFAULT);
    };
    let datagram = Datagram { payload, control: Vec::new(), name: Some(name), pod: Some(pod) };
    let ctx = ctx.clone();
    super::spawn_answering(ctx.clone(), n.id, async move {
        let Some(result) = send_all(&ctx, &n, &socket, std::slice::from_ref(&datagram), flags).await else {
            return;
        };
        answer(&ctx, &n, result.map(|sent| sent[0] as i64));
    });
}

/// Largest datagram `recvfrom` is emulated for in one call (UDP GRO can coalesce up to 64 KiB).
const MAX_RECEIVE: usize = 256 * 1024;

/// `recvfrom` asking for the sender on a socket whose datagrams come through a pod relay: the
/// receive is made here so that the sender reported is the pod address the app talks to, not
/// kmirror's relay. Every other `recvfrom` costs only the check that no relay exists.
pub fn on_recvfrom(ctx: &Arc<Context>, n: Notification) {
    if !ctx.proxy.relays_datagrams() {
        return ctx.interceptor.continue_call(n.id);
    }
    let (fd, flags) = (n.args[0] as i32, n.args[3] as i32);
    let Ok(socket) = ctx.threads.take_fd(n.tid, fd) else {
        return ctx.interceptor.continue_call(n.id);
    };
    let Some(inode) = sockets::socket_inode(socket.as_fd()) else {
        return ctx.interceptor.continue_call(n.id);
    };
    let relayed = ctx.proxy.redirect_of(inode).is_some() || ctx.proxy.has_sendto_relay(inode);
    if !relayed || transport_of(&socket) != Some(Transport::Udp) {
        return ctx.interceptor.continue_call(n.id);
    }
    if flags & libc::MSG_DONTWAIT != 0 || sockets::is_nonblocking(socket.as_fd()) {
        receive_now(ctx, &n, &socket, inode);
        return;
    }
    // A blocking receive can wait long: never on the notify thread.
    let deadline = sockets::recv_timeout(socket.as_fd()).map(|t| std::time::Instant::now() + t);
    let ctx2 = ctx.clone();
    super::spawn_answering(ctx.clone(), n.id, async move {
        let Some(socket) = super::waitable(socket) else {
            return ctx2.interceptor.continue_call(n.id);
        };
        loop {
            match super::wait_for_data(&ctx2, &n, &socket, deadline).await {
                super::Waited::Ready => {
                    // Another thread of the app may have taken the datagram: wait again.
                    if receive_now(&ctx2, &n, socket.get_ref(), inode) != Some(libc::EAGAIN) {
                        return;
                    }
                }
                super::Waited::TimedOut => return ctx2.interceptor.return_errno(n.id, libc::EAGAIN),
                super::Waited::Answered => return,
            }
        }
    });
}

/// Receives one datagram without blocking and answers the call with it, the sender rewritten
/// to the pod address behind a relay. Returns the errno when nothing was there (EAGAIN) or the
/// receive failed, having answered with it unless it is EAGAIN on a blocking socket.
fn receive_now(ctx: &Context, n: &Notification, socket: &OwnedFd, inode: u64) -> Option<i32> {
    let (buf, len, flags, addr_ptr, len_ptr) =
        (n.args[1], n.args[2] as usize, n.args[3] as i32, n.args[4], n.args[5]);
    let mut data = vec![0u8; len.min(MAX_RECEIVE)];
    let (received, raw_source) = match sockets::recv_from(socket.as_fd(), &mut data, flags) {
        Ok(received) => received,
        Err(errno) => {
            let blocking = flags & libc::MSG_DONTWAIT == 0 && !sockets::is_nonblocking(socket.as_fd());
            if !(errno == libc::EAGAIN && blocking) {
                ctx.interceptor.return_errno(n.id, errno);
            }
            return Some(errno);
        }
    };
    let family = sockets::socket_domain(socket.as_fd()).unwrap_or(libc::AF_INET);
    let source = match net::parse_sockaddr(&raw_source) {
        Some(Destination::Inet(from)) => {
            ctx.proxy.pod_source_of(inode, net::canonical(from)).map(|pod| net::encode_sockaddr(pod, family))
        }
        _ => None,
    };
    let source = source.unwrap_or(raw_source);
    // The call is gone (nothing to answer) when its memory cannot be had.
    let memory = super::output_memory(ctx, n)?;
    if memory.write(buf, &data[..received.min(data.len())]).is_err() {
        ctx.interceptor.return_errno(n.id, libc::EFAULT);
        return Some(libc::EFAULT);
    }
    // An address buffer without a length is EFAULT, after the datagram was taken, as the
    // kernel reports it.
    if addr_ptr != 0 {
        match super::net::write_sockaddr_out(ctx, n, addr_ptr, len_ptr, &source) {
            Ok(()) => {}
            Err(0) => return None,
            Err(errno) => {
                ctx.interceptor.return_errno(n.id, errno);
                return Some(errno);
            }
        }
    }
    ctx.interceptor.return_value(n.id, received as i64);
    None
}

/// `sendmsg`/`sendmmsg`: emulated when any message names a pod destination. Messages without
/// one (connected sockets, glibc's resolver) cost only the header read here.
pub fn on_sendmsg(ctx: &Arc<Context>, n: Notification) {
    let fd = n.args[0] as i32;
    let is_batch = n.nr == libc::SYS_sendmmsg;
    let (first, count, flags) = if is_batch {
        (n.args[1], n.args[2].min(MAX_IOV) as usize, n.args[3] as i32)
    } else {
        (n.args[1], 1, n.args[2] as i32)
    };
    let stride = if is_batch { MMSGHDR_SIZE } else { MSGHDR_SIZE };
    let Ok(raw) = tracee::read_bytes(n.tid, first, stride * count) else {
        return ctx.interceptor.continue_call(n.id);
    };
    let headers: Vec<MsgHeader> = raw.chunks_exact(stride).map(parse_msghdr).collect();
    let mut destinations = Vec::with_capacity(count);
    for hdr in &headers {
        let name = read_name(n.tid, hdr.name, hdr.name_len);
        let pod = name.as_deref().and_then(|raw| pod_destination(ctx, raw));
        destinations.push((name, pod));
    }
    if destinations.iter().all(|(_, pod)| pod.is_none()) {
        return ctx.interceptor.continue_call(n.id);
    }
    let Ok(socket) = ctx.threads.take_fd(n.tid, fd) else {
        return ctx.interceptor.continue_call(n.id);
    };
    let proto = match transport_of(&socket) {
        Some(Transport::Udp) => Proto::Udp,
        Some(Transport::Tcp) => Proto::Tcp,
        None => return ctx.interceptor.continue_call(n.id),
    };
    for (_, pod) in &mut destinations {
        *pod = pod.filter(|&(dest, _)| super::net::admits(ctx, dest, proto));
    }
    if destinations.iter().all(|(_, pod)| pod.is_none()) {
        return ctx.interceptor.continue_call(n.id);
    }
    match transport_of(&socket) {
        Some(Transport::Udp) => {}
        Some(Transport::Tcp)
            if !is_batch && flags & libc::MSG_FASTOPEN != 0 && sockets::tcp_is_fresh(socket.as_fd()) =>
        {
            let (hdr, (_, pod)) = (&headers[0], &destinations[0]);
            let pod = (*pod).expect("the only message names the pod");
            return match gather(n.tid, hdr, super::net::MAX_FASTOPEN_PAYLOAD, Overflow::Truncate) {
                // Control messages mean nothing to a TCP connect; they are dropped.
                Ok((payload, _)) => super::net::on_fastopen(ctx, n, socket, pod, payload),
                Err(errno) => ctx.interceptor.return_errno(n.id, errno),
            };
        }
        _ => return ctx.interceptor.continue_call(n.id),
    }
    // As the kernel does, a message that cannot be read ends the batch there; only a failure
    // on the first one is the call's error.
    let mut datagrams = Vec::with_capacity(count);
    for (hdr, (name, pod)) in headers.iter().zip(destinations) {
        // A message for a local destination is the kernel's to judge: the larger bound.
        let max = pod.map_or(MAX_DATAGRAM_V6, |(dest, _)| max_datagram(dest));
        match gather(n.tid, hdr, max, Overflow::Fail) {
            Ok((payload, control)) => datagrams.push(Datagram { payload, control, name, pod }),
            Err(errno) if datagrams.is_empty() => return ctx.interceptor.return_errno(n.id, errno),
            Err(_) => break,
        }
    }
    let ctx = ctx.clone();
    super::spawn_answering(ctx.clone(), n.id, async move {
        let Some(sent) = send_all(&ctx, &n, &socket, &datagrams, flags).await else { return };
        let answer_value = match sent {
            Ok(sent) if is_batch => {
                // Each mmsghdr's msg_len gets the bytes sent for it.
                let Some(memory) = super::output_memory(&ctx, &n) else { return };
                let written = sent.iter().enumerate().all(|(i, &len)| {
                    let at = first + (i * MMSGHDR_SIZE + MSGHDR_SIZE) as u64;
                    memory.write(at, &(len as u32).to_ne_bytes()).is_ok()
                });
                if written { Ok(sent.len() as i64) } else { Err(libc::EFAULT) }
            }
            Ok(sent) => Ok(sent[0] as i64),
            Err(errno) => Err(errno),
        };
        answer(&ctx, &n, answer_value);
    });
}

/// What [`gather`] does with a payload longer than its limit.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Overflow {
    /// EMSGSIZE, as for a datagram.
    Fail,
    /// Keep the first bytes, as a short write on a stream.
    Truncate,
}

/// The payload (gathered from its iovecs, at most `max` bytes) and control bytes of one message.
fn gather(tid: u32, hdr: &MsgHeader, max: usize, overflow: Overflow) -> Result<(Vec<u8>, Vec<u8>), i32> {
    if hdr.iov_len > MAX_IOV {
        return Err(libc::EMSGSIZE);
    }
    if hdr.control_len > MAX_CONTROL {
        return Err(libc::ENOBUFS);
    }
    let mut payload = Vec::new();
    if hdr.iov_len > 0 {
        let vecs =
            tracee::read_bytes(tid, hdr.iov, hdr.iov_len as usize * IOVEC_SIZE).map_err(|_| libc::EFAULT)?;
        for v in vecs.chunks_exact(IOVEC_SIZE) {
            let base = u64::from_ne_bytes(v[..8].try_into().expect("8 bytes"));
            let mut len = u64::from_ne_bytes(v[8..].try_into().expect("8 bytes")) as usize;
            if payload.len() + len > max {
                if overflow == Overflow::Fail {
                    return Err(libc::EMSGSIZE);
                }
                len = max - payload.len();
            }
            payload.extend(tracee::read_bytes(tid, base, len).map_err(|_| libc::EFAULT)?);
        }
    }
    let control = match hdr.control_len {
        0 => Vec::new(),
        len => tracee::read_bytes(tid, hdr.control, len).map_err(|_| libc::EFAULT)?,
    };
    Ok((payload, control))
}

/// Sends the datagrams in order; the bytes sent for each. A failure after the first ends the
/// batch with what was sent, as `sendmmsg` reports it. Waiting for the pod side of a new relay
/// is interruptible by signals (see [`super::net::interruptible`]): `None` when the call was
/// answered so.
async fn send_all(
    ctx: &Arc<Context>,
    n: &Notification,
    socket: &OwnedFd,
    datagrams: &[Datagram],
    flags: i32,
) -> Option<Result<Vec<usize>, i32>> {
    let Some(inode) = sockets::socket_inode(socket.as_fd()) else { return Some(Err(libc::ENOTSOCK)) };
    let tid = n.tid;
    let mut sent = Vec::with_capacity(datagrams.len());
    for datagram in datagrams {
        let name = match datagram.pod {
            Some((dest, family)) => {
                let relay = if sent.is_empty() {
                    super::net::interruptible(ctx, n, ctx.proxy.sendto_relay(socket, inode, dest)).await?
                } else {
                    // Part of the batch is sent: no restart may send it again.
                    ctx.proxy.sendto_relay(socket, inode, dest).await
                };
                match relay {
                    Ok(relay) => Some(net::encode_sockaddr(relay, family)),
                    Err(errno) if sent.is_empty() => return Some(Err(errno)),
                    Err(_) => break,
                }
            }
            None => datagram.name.clone(),
        };
        let result = if crate::policy::net::control_needs_privilege(&datagram.control) {
            send_as_app(tid, socket, datagram, name, flags).await
        } else {
            sockets::send_msg(socket.as_fd(), &datagram.payload, &datagram.control, name.as_deref(), flags)
        };
        match result {
            Ok(len) => sent.push(len),
            Err(errno) if sent.is_empty() => return Some(Err(errno)),
            Err(_) => break,
        }
    }
    Some(Ok(sent))
}

/// Sends one datagram with the app's credentials in force, so that control messages the kernel
/// checks against the sender's capabilities (SO_MARK, SO_PRIORITY above 6, ...) are judged by
/// the app's rights, never kmirror's.
async fn send_as_app(
    tid: u32,
    socket: &OwnedFd,
    datagram: &Datagram,
    name: Option<Vec<u8>>,
    flags: i32,
) -> Result<usize, i32> {
    let socket = socket.try_clone().map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
    let (payload, control) = (datagram.payload.clone(), datagram.control.clone());
    tokio::task::spawn_blocking(move || {
        let caller = crate::caller::Caller::of_thread(tid).map_err(|_| libc::ESRCH)?;
        crate::caller::run_as(&caller.credentials, crate::caller::Creates::Nothing, || {
            sockets::send_msg(socket.as_fd(), &payload, &control, name.as_deref(), flags)
        })?
    })
    .await
    .unwrap_or(Err(libc::EIO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msghdr_fields_come_from_their_x86_64_offsets() {
        let mut raw = vec![0u8; MMSGHDR_SIZE];
        raw[0..8].copy_from_slice(&0x1000u64.to_ne_bytes());
        raw[8..12].copy_from_slice(&16u32.to_ne_bytes());
        raw[16..24].copy_from_slice(&0x2000u64.to_ne_bytes());
        raw[24..32].copy_from_slice(&3u64.to_ne_bytes());
        raw[32..40].copy_from_slice(&0x3000u64.to_ne_bytes());
        raw[40..48].copy_from_slice(&24u64.to_ne_bytes());
        // msg_flags and an mmsghdr's msg_len are outputs, never read.
        raw[48..64].fill(0xff);
        let hdr = parse_msghdr(&raw);
        assert_eq!(
            hdr,
            MsgHeader {
                name: 0x1000,
                name_len: 16,
                iov: 0x2000,
                iov_len: 3,
                control: 0x3000,
                control_len: 24
            }
        );
    }
}
