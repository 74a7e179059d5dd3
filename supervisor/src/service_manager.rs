//! The mechanism behind [`crate::policy::service_manager`]: the descriptors socket activation
//! passed to kmirror, and the relay that makes the app's notifications come from kmirror.

use crate::policy::service_manager::{LISTEN_FDS_START, NotifyAddress};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

/// One descriptor passed by socket activation.
pub struct Activated {
    pub fd: OwnedFd,
    /// The local port of a listening TCP socket: it takes part in incoming traffic like a
    /// listener the app opened itself.
    pub tcp_listener_port: Option<u16>,
}

/// Takes descriptors 3..3+count, marking them close-on-exec so that only the keeper (and
/// through it the app) inherits them, never the agent.
pub fn take_activated(count: u32) -> std::io::Result<Vec<Activated>> {
    (0..count as RawFd)
        .map(|i| {
            let raw = LISTEN_FDS_START + i;
            // SAFETY: F_SETFD with an int argument; fails with EBADF on a closed descriptor.
            if unsafe { libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
                let e = std::io::Error::last_os_error();
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("LISTEN_FDS says descriptor {raw} was passed, but it is not open ({e})"),
                ));
            }
            // SAFETY: the service manager passed this descriptor to this process, which owns it
            // from here on; nothing else in kmirror refers to descriptors it did not open.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let tcp_listener_port = (crate::sockets::is_listening(fd.as_fd())
                && crate::sockets::socket_type(fd.as_fd()) == Ok(libc::SOCK_STREAM)
                && matches!(crate::sockets::socket_domain(fd.as_fd()), Ok(libc::AF_INET | libc::AF_INET6)))
            .then(|| crate::sockets::local_port(fd.as_fd()).ok())
            .flatten();
            Ok(Activated { fd, tcp_listener_port })
        })
        .collect()
}

/// Most descriptors one notification carries (the kernel's SCM_MAX_FD).
const MAX_FDS: usize = 253;

/// Starts relaying the app's notifications: a datagram socket at `dir/notify`, whose path the
/// app gets as `NOTIFY_SOCKET`, and a thread that forwards every datagram (with the
/// descriptors it carries, e.g. `FDSTORE=1`) unchanged to `target`, so that the service
/// manager sees it come from kmirror, the unit's main process. Datagrams from processes
/// outside the app's tree (whose ancestry does not reach `keeper_pid`) are dropped.
pub fn start_notify_relay(dir: &Path, target: NotifyAddress, keeper_pid: u32) -> std::io::Result<PathBuf> {
    let path = dir.join("notify");
    let socket = UnixDatagram::bind(&path)?;
    // The app may drop privileges after it starts, as services do; the directory is kmirror's.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    crate::sockets::set_int_option(socket.as_fd(), libc::SOL_SOCKET, libc::SO_PASSCRED, 1)
        .map_err(std::io::Error::from_raw_os_error)?;
    let out = UnixDatagram::unbound()?;
    let target_addr = sockaddr_un(&target)?;
    std::thread::Builder::new().name("kmirror-notify".into()).spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match receive(&socket, &mut buf) {
                Ok(message) => {
                    if !message.sender.is_some_and(|pid| in_tree(pid, keeper_pid)) {
                        tracing::debug!(sender = ?message.sender, "dropped a notification from outside the app's tree");
                        continue;
                    }
                    if let Err(e) = send(&out, &target_addr, &buf[..message.len], &message.fds) {
                        tracing::warn!("cannot pass the app's notification on to the service manager: {e}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("the notification relay stopped: {e}");
                    return;
                }
            }
        }
    })?;
    Ok(path)
}

/// Whether `pid` is the keeper or descends from it (orphans are reparented to the keeper, a
/// subreaper, so daemons of the app count too).
fn in_tree(mut pid: u32, keeper_pid: u32) -> bool {
    for _ in 0..4096 {
        if pid == keeper_pid {
            return true;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
        match crate::keeper::tree::parse_stat(&stat) {
            Some((ppid, _)) if ppid > 1 => pid = ppid,
            _ => return false,
        }
    }
    false
}

struct Received {
    len: usize,
    fds: Vec<OwnedFd>,
    sender: Option<u32>,
}

/// Control-message space for MAX_FDS descriptors and one ucred.
const CMSG_SPACE: usize = 4096;

fn receive(socket: &UnixDatagram, buf: &mut [u8]) -> std::io::Result<Received> {
    let mut control = [0u8; CMSG_SPACE];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len();
    // SAFETY: recvmsg on our socket into buffers described by `msg`.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    let mut sender = None;
    // SAFETY: walking the control messages the kernel wrote into `control`, within
    // msg_controllen, with the CMSG_* helpers.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let data = libc::CMSG_DATA(cmsg);
            let data_len = (*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize;
            match ((*cmsg).cmsg_level, (*cmsg).cmsg_type) {
                (libc::SOL_SOCKET, libc::SCM_RIGHTS) => {
                    for i in 0..data_len / 4 {
                        let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                        // The kernel installed it in this process for us.
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                (libc::SOL_SOCKET, libc::SCM_CREDENTIALS) if data_len >= size_of::<libc::ucred>() => {
                    let cred = std::ptr::read_unaligned(data.cast::<libc::ucred>());
                    sender = Some(cred.pid as u32);
                }
                _ => {}
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        tracing::warn!("dropped a notification larger than any the service manager takes");
        return Ok(Received { len: 0, fds: Vec::new(), sender: None });
    }
    Ok(Received { len: n as usize, fds, sender })
}

fn sockaddr_un(target: &NotifyAddress) -> std::io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let (bytes, skip) = match target {
        NotifyAddress::Path(path) => (path.as_slice(), 0),
        NotifyAddress::Abstract(name) => (name.as_slice(), 1),
        NotifyAddress::Other => return Err(std::io::Error::other("not a socket path")),
    };
    if skip + bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::other("NOTIFY_SOCKET is longer than a socket address"));
    }
    for (i, b) in bytes.iter().enumerate() {
        addr.sun_path[skip + i] = *b as libc::c_char;
    }
    let base = std::mem::offset_of!(libc::sockaddr_un, sun_path);
    // A path is NUL-terminated; an abstract name is exactly its bytes after the leading NUL.
    let len = base + skip + bytes.len() + usize::from(skip == 0);
    Ok((addr, len as libc::socklen_t))
}

fn send(
    out: &UnixDatagram,
    target: &(libc::sockaddr_un, libc::socklen_t),
    payload: &[u8],
    fds: &[OwnedFd],
) -> std::io::Result<()> {
    let fds = &fds[..fds.len().min(MAX_FDS)];
    let mut control = [0u8; CMSG_SPACE];
    let mut iov = libc::iovec { iov_base: payload.as_ptr() as *mut _, iov_len: payload.len() };
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&target.0 as *const libc::sockaddr_un).cast_mut().cast();
    msg.msg_namelen = target.1;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let data_len = (fds.len() * size_of::<RawFd>()) as u32;
        // SAFETY: CMSG_SPACE is a pure computation.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(data_len) } as usize;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: `control` has room for one header and MAX_FDS descriptors; the header is
        // filled in and the descriptors copied within msg_controllen.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(data_len) as usize;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                std::ptr::write_unaligned(data.add(i), fd.as_raw_fd());
            }
        }
    }
    // SAFETY: sendmsg on our socket with the buffers described by `msg`.
    let n = unsafe { libc::sendmsg(out.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}
