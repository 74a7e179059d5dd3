//! Socket operations on descriptors duplicated out of the app (see [`crate::tracee::ThreadHandles::take_fd`]).

// Unsafe: calls on the app's raw sockaddr and control bytes, TCP_INFO, plain-int options.
#![allow(unsafe_code)]

use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

fn last() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// Inode number of a socket, the key of per-socket state (fd numbers get reused, inodes don't
/// while the socket lives). `None` when `fd` is not a socket.
pub fn socket_inode(fd: BorrowedFd<'_>) -> Option<u64> {
    let st = nix::sys::stat::fstat(fd).ok()?;
    (st.st_mode & libc::S_IFMT == libc::S_IFSOCK).then_some(st.st_ino)
}

/// An int-valued option that nix has no typed wrapper for (SO_TYPE as a plain number,
/// SO_DOMAIN, SO_PROTOCOL).
fn int_option(fd: BorrowedFd<'_>, level: i32, name: i32) -> Result<i32, i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for an int-sized option.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), level, name, (&mut value as *mut libc::c_int).cast(), &mut len)
    };
    if rc == 0 { Ok(value) } else { Err(last()) }
}

/// IP_BIND_ADDRESS_NO_PORT: a bind to port 0 takes only the address; the port is chosen at
/// connect, where it only has to be unique per 4-tuple instead of scanning for a free port.
pub fn bind_address_only(fd: BorrowedFd<'_>) -> Result<(), i32> {
    setsockopt(&fd, sockopt::IpBindAddressNoPort, &true).map_err(|e| e as i32)
}

/// `SO_TYPE` (SOCK_STREAM, SOCK_DGRAM, ...).
pub fn socket_type(fd: BorrowedFd<'_>) -> Result<i32, i32> {
    int_option(fd, libc::SOL_SOCKET, libc::SO_TYPE)
}

/// `SO_DOMAIN`: whether the app sees IPv4 or (dual-stack) IPv6 addresses on this socket.
/// Whether `fd` is a socket in the listening state (`SO_ACCEPTCONN`).
pub fn is_listening(fd: BorrowedFd<'_>) -> bool {
    int_option(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN).is_ok_and(|v| v != 0)
}

pub fn socket_domain(fd: BorrowedFd<'_>) -> Result<i32, i32> {
    int_option(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)
}

/// `SO_PROTOCOL` (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_MPTCP, ...).
pub fn socket_protocol(fd: BorrowedFd<'_>) -> Result<i32, i32> {
    int_option(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL)
}

/// Whether the open file description is non-blocking (shared with the app's descriptor).
pub fn is_nonblocking(fd: BorrowedFd<'_>) -> bool {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).is_ok_and(|flags| flags & libc::O_NONBLOCK != 0)
}

/// True when a TCP socket has never been connected (state CLOSE), i.e. a first connect.
pub fn tcp_is_fresh(fd: BorrowedFd<'_>) -> bool {
    const TCP_CLOSE: u8 = 7;
    tcp_state(fd) == Some(TCP_CLOSE)
}

/// The send timeout the app set (SO_SNDTIMEO), which also bounds a blocking connect.
pub fn send_timeout(fd: BorrowedFd<'_>) -> Option<std::time::Duration> {
    timeout_of(getsockopt(&fd, sockopt::SendTimeout).ok()?)
}

/// SO_RCVTIMEO, if set.
pub fn recv_timeout(fd: BorrowedFd<'_>) -> Option<std::time::Duration> {
    timeout_of(getsockopt(&fd, sockopt::ReceiveTimeout).ok()?)
}

fn timeout_of(tv: nix::sys::time::TimeVal) -> Option<std::time::Duration> {
    let (sec, usec) = (tv.tv_sec(), tv.tv_usec());
    (sec > 0 || usec > 0).then(|| std::time::Duration::new(sec as u64, usec as u32 * 1000))
}

/// connect(2) with raw sockaddr bytes; returns the errno on failure (EINPROGRESS included).
pub fn connect(fd: BorrowedFd<'_>, sockaddr: &[u8]) -> Result<(), i32> {
    // SAFETY: `sockaddr` is a readable buffer of the given length.
    let rc =
        unsafe { libc::connect(fd.as_raw_fd(), sockaddr.as_ptr().cast(), sockaddr.len() as libc::socklen_t) };
    if rc == 0 { Ok(()) } else { Err(last()) }
}

/// Undoes a TCP connect (connect to AF_UNSPEC; an established peer gets a RST) and clears the
/// error that leaves behind, so the socket is as a failed connect leaves it: unconnected, no
/// pending error, free to connect again.
pub fn disconnect(fd: BorrowedFd<'_>) {
    abort_connect(fd);
    let _ = take_error(fd);
}

/// Disconnects a TCP socket (connect to AF_UNSPEC). A connecting or connected one is left with
/// the error ECONNRESET pending, and the kernel wakes whoever waits on it.
pub fn abort_connect(fd: BorrowedFd<'_>) {
    let unspec = (libc::AF_UNSPEC as libc::sa_family_t).to_ne_bytes();
    let _ = connect(fd, &unspec);
}

/// Whether the socket is connected, as getpeername(2) would answer (Err(ENOTCONN) if not).
pub fn peer_check(fd: BorrowedFd<'_>) -> Result<(), i32> {
    peer_addr(fd).map(drop)
}

/// The local port of a socket (after connect or bind).
pub fn local_port(fd: BorrowedFd<'_>) -> Result<u16, i32> {
    // SAFETY: getsockname writes at most `len` bytes into the storage `sockaddr_out` provides.
    let raw = sockaddr_out(|addr, len| unsafe { libc::getsockname(fd.as_raw_fd(), addr, len) })?.1;
    // sin_port and sin6_port sit at the same offset, in network order.
    Ok(raw.get(2..4).map_or(0, |p| u16::from_be_bytes([p[0], p[1]])))
}

/// Runs a call that fills a sockaddr (getsockname, getpeername, accept4) and returns its
/// result and the bytes it wrote.
fn sockaddr_out(
    call: impl FnOnce(*mut libc::sockaddr, *mut libc::socklen_t) -> libc::c_int,
) -> Result<(libc::c_int, Vec<u8>), i32> {
    // SAFETY: zeroed storage is a valid (empty) sockaddr.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let rc = call((&mut addr as *mut libc::sockaddr_storage).cast(), &mut len);
    if rc < 0 {
        return Err(last());
    }
    let len = (len as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: the first `len` bytes of `addr` are initialised (zeroed, then written by the call).
    let raw =
        unsafe { std::slice::from_raw_parts((&addr as *const libc::sockaddr_storage).cast::<u8>(), len) };
    Ok((rc, raw.to_vec()))
}

/// recvfrom(2) that never blocks; the byte count (the datagram's full length under
/// MSG_TRUNC) and the sender's raw sockaddr.
pub fn recv_from(fd: BorrowedFd<'_>, buf: &mut [u8], flags: i32) -> Result<(usize, Vec<u8>), i32> {
    // SAFETY: recvfrom writes at most `buf.len()` bytes into `buf` and at most `len` bytes into
    // the storage `sockaddr_out` provides.
    let (n, raw) = sockaddr_out(|addr, len| unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            flags | libc::MSG_DONTWAIT,
            addr,
            len,
        ) as libc::c_int
    })?;
    Ok((n as usize, raw))
}

/// Waits up to `timeout` for `fd` to be readable (a listener: to have a connection queued).
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: std::time::Duration) -> Result<bool, i32> {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    let mut pfd = [PollFd::new(fd, PollFlags::POLLIN)];
    let timeout =
        PollTimeout::try_from(timeout.as_millis().min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX);
    let polled = nix::poll::poll(&mut pfd, timeout);
    // The kernel reports only the events asked for and POLLERR, POLLHUP and POLLNVAL.
    let revents = pfd[0].revents().unwrap_or(PollFlags::empty());
    match polled {
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(e as i32),
        Ok(0) => Ok(false),
        _ if revents.contains(PollFlags::POLLNVAL) => Err(libc::EBADF),
        _ => Ok(revents.intersects(PollFlags::POLLIN | PollFlags::POLLERR | PollFlags::POLLHUP)),
    }
}

/// `send` that never blocks the caller (our thread): a full buffer gives a short count or EAGAIN.
pub fn send(fd: BorrowedFd<'_>, payload: &[u8]) -> Result<usize, i32> {
    use nix::sys::socket::MsgFlags;
    nix::sys::socket::send(fd.as_raw_fd(), payload, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL)
        .map_err(|e| e as i32)
}

/// `sendmsg` of one buffer with the given control bytes and, if any, destination address.
pub fn send_msg(
    fd: BorrowedFd<'_>,
    payload: &[u8],
    control: &[u8],
    sockaddr: Option<&[u8]>,
    flags: i32,
) -> Result<usize, i32> {
    // cmsghdr needs 8-byte alignment, which a byte vector does not promise.
    let mut aligned = vec![0u64; control.len().div_ceil(8)];
    // SAFETY: `aligned` holds at least `control.len()` bytes and does not overlap `control`.
    unsafe { std::ptr::copy_nonoverlapping(control.as_ptr(), aligned.as_mut_ptr().cast(), control.len()) };
    let mut iov = libc::iovec { iov_base: payload.as_ptr().cast_mut().cast(), iov_len: payload.len() };
    // SAFETY: an all-zero msghdr is valid: no name, no buffers, no control.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(name) = sockaddr {
        msg.msg_name = name.as_ptr().cast_mut().cast();
        msg.msg_namelen = name.len() as libc::socklen_t;
    }
    if !control.is_empty() {
        msg.msg_control = aligned.as_mut_ptr().cast();
        msg.msg_controllen = control.len();
    }
    // SAFETY: every pointer in `msg` refers to a live buffer of the stated length; the kernel
    // only reads them.
    let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, flags | libc::MSG_NOSIGNAL) };
    if n < 0 { Err(last()) } else { Ok(n as usize) }
}

/// Binds an unbound socket to the wildcard address with an ephemeral port, as the kernel does
/// on a first send; a socket that already has a port is left alone. Returns the port.
pub fn ensure_bound(fd: BorrowedFd<'_>) -> Result<u16, i32> {
    match local_port(fd)? {
        0 => {}
        port => return Ok(port),
    }
    // A wildcard address of the socket's family, port 0.
    let bound = if int_option(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)? == libc::AF_INET6 {
        let any = std::net::SocketAddrV6::new(std::net::Ipv6Addr::UNSPECIFIED, 0, 0, 0);
        nix::sys::socket::bind(fd.as_raw_fd(), &nix::sys::socket::SockaddrIn6::from(any))
    } else {
        let any = std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0);
        nix::sys::socket::bind(fd.as_raw_fd(), &nix::sys::socket::SockaddrIn::from(any))
    };
    bound.map_err(|e| e as i32)?;
    local_port(fd)
}

/// accept4(2) on a (duplicated) listening socket: the new connection and its peer's raw
/// sockaddr.
pub fn accept(fd: BorrowedFd<'_>, flags: i32) -> Result<(OwnedFd, Vec<u8>), i32> {
    // SAFETY: accept4 writes at most `len` bytes into the storage `sockaddr_out` provides.
    let (conn, raw) = sockaddr_out(|addr, len| unsafe { libc::accept4(fd.as_raw_fd(), addr, len, flags) })?;
    // SAFETY: a fresh descriptor from the kernel.
    Ok((unsafe { OwnedFd::from_raw_fd(conn) }, raw))
}

/// The peer's raw sockaddr (getpeername(2)).
pub fn peer_addr(fd: BorrowedFd<'_>) -> Result<Vec<u8>, i32> {
    // SAFETY: getpeername writes at most `len` bytes into the storage `sockaddr_out` provides.
    Ok(sockaddr_out(|addr, len| unsafe { libc::getpeername(fd.as_raw_fd(), addr, len) })?.1)
}

/// TCP states (`tcpi_state`), as the kernel numbers them.
pub const TCP_SYN_SENT: u8 = 2;
pub const TCP_SYN_RECV: u8 = 3;

/// The TCP state of a socket (`tcpi_state`), `None` if it cannot be read.
pub fn tcp_state(fd: BorrowedFd<'_>) -> Option<u8> {
    let mut info = [0u8; 8];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: TCP_INFO writes at most `len` bytes into `info`; the first byte is tcpi_state.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(info[0])
}

/// Whether an AF_INET6 socket is IPv6-only (IPV6_V6ONLY): it cannot reach IPv4 addresses,
/// v4-mapped ones included.
pub fn v6_only(fd: BorrowedFd<'_>) -> bool {
    getsockopt(&fd, sockopt::Ipv6V6Only).unwrap_or(false)
}

/// Reads and clears the socket's pending error (SO_ERROR); 0 if none.
pub fn take_error(fd: BorrowedFd<'_>) -> i32 {
    getsockopt(&fd, sockopt::SocketError).unwrap_or(0)
}

/// Starts a connect without waiting for it, whether or not the app's socket is in blocking
/// mode: `Err(EINPROGRESS)` once the SYN is sent. O_NONBLOCK lives on the open file
/// description the app shares, so on a blocking socket it is set for the duration of this one
/// call only; the app's thread that asked for the connect is stopped in its trapped call
/// meanwhile, and no other thread has a reason to use a socket that is not yet connected.
pub fn connect_nonblocking(fd: BorrowedFd<'_>, sockaddr: &[u8]) -> Result<(), i32> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(|e| e as i32)?;
    if flags & libc::O_NONBLOCK != 0 {
        return connect(fd, sockaddr);
    }
    fcntl(fd, FcntlArg::F_SETFL(OFlag::from_bits_retain(flags | libc::O_NONBLOCK))).map_err(|e| e as i32)?;
    let result = connect(fd, sockaddr);
    // Restores the flags the app had.
    let _ = fcntl(fd, FcntlArg::F_SETFL(OFlag::from_bits_retain(flags)));
    result
}

/// The socket's own raw sockaddr (getsockname(2)).
pub fn local_addr(fd: BorrowedFd<'_>) -> Result<Vec<u8>, i32> {
    // SAFETY: getsockname writes at most `len` bytes into the storage `sockaddr_out` provides.
    Ok(sockaddr_out(|addr, len| unsafe { libc::getsockname(fd.as_raw_fd(), addr, len) })?.1)
}

/// The options of the app's TCP socket that change what its connection does and that the
/// pod-side socket can take: SO_KEEPALIVE, TCP_KEEPIDLE/KEEPINTVL/KEEPCNT and TCP_USER_TIMEOUT.
/// A keepalive value equal to this machine's default (its sysctl) counts as not set, so the
/// pod's own default applies, as it would to the app in the pod. (SO_BINDTODEVICE names a
/// device of this machine, meaningless in the pod; it is not carried.)
pub fn tcp_options(fd: BorrowedFd<'_>) -> kmirror_protocol::SocketOptions {
    static DEFAULTS: std::sync::OnceLock<[Option<i32>; 3]> = std::sync::OnceLock::new();
    let defaults = DEFAULTS.get_or_init(|| {
        let read = |name: &str| {
            std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
                .ok()
                .and_then(|v| v.trim().parse().ok())
        };
        [read("tcp_keepalive_time"), read("tcp_keepalive_intvl"), read("tcp_keepalive_probes")]
    });
    fn set<O: nix::sys::socket::GetSockOpt<Val = u32>>(
        fd: BorrowedFd<'_>,
        option: O,
        default: Option<i32>,
    ) -> Option<u32> {
        getsockopt(&fd, option)
            .ok()
            .map(|v| v as i32)
            .filter(|&v| Some(v) != default && v > 0)
            .map(|v| v as u32)
    }
    kmirror_protocol::SocketOptions {
        keepalive: getsockopt(&fd, sockopt::KeepAlive).unwrap_or(false),
        keep_idle: set(fd, sockopt::TcpKeepIdle, defaults[0]),
        keep_interval: set(fd, sockopt::TcpKeepInterval, defaults[1]),
        keep_count: set(fd, sockopt::TcpKeepCount, defaults[2]),
        user_timeout: set(fd, sockopt::TcpUserTimeout, Some(0)),
    }
}
