//! The mechanism behind [`crate::policy::service_manager`]: the descriptors socket activation
//! passed to kmirror, and the relay that makes the app's notifications come from kmirror.

use crate::policy::service_manager::{LISTEN_FDS_START, NotifyAddress};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
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
            let fd = crate::sys::take_inherited(raw).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("LISTEN_FDS says descriptor {raw} was passed, but it is not open ({e})"),
                )
            })?;
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
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::PassCred, &true)?;
    let out = UnixDatagram::unbound()?;
    let target_addr = unix_addr(&target)?;
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

fn receive(socket: &UnixDatagram, buf: &mut [u8]) -> std::io::Result<Received> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut control = nix::cmsg_space!([RawFd; MAX_FDS], libc::ucred);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(&mut control), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let (len, flags) = (msg.bytes, msg.flags);
    let mut fds = Vec::new();
    let mut sender = None;
    for cmsg in msg.cmsgs()? {
        match cmsg {
            ControlMessageOwned::ScmRights(received) => fds.extend(crate::sys::adopt_received(&received)),
            ControlMessageOwned::ScmCredentials(cred) => sender = Some(cred.pid() as u32),
            _ => {}
        }
    }
    if flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
        tracing::warn!("dropped a notification larger than any the service manager takes");
        return Ok(Received { len: 0, fds: Vec::new(), sender: None });
    }
    Ok(Received { len, fds, sender })
}

fn unix_addr(target: &NotifyAddress) -> std::io::Result<nix::sys::socket::UnixAddr> {
    use nix::sys::socket::UnixAddr;
    Ok(match target {
        NotifyAddress::Path(path) => UnixAddr::new(std::ffi::OsStr::from_bytes(path))?,
        NotifyAddress::Abstract(name) => UnixAddr::new_abstract(name)?,
        NotifyAddress::Other => return Err(std::io::Error::other("not a socket path")),
    })
}

fn send(
    out: &UnixDatagram,
    target: &nix::sys::socket::UnixAddr,
    payload: &[u8],
    fds: &[OwnedFd],
) -> std::io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let raw: Vec<RawFd> = fds.iter().take(MAX_FDS).map(|fd| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let control: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
    let iov = [std::io::IoSlice::new(payload)];
    sendmsg(out.as_raw_fd(), &iov, control, MsgFlags::MSG_NOSIGNAL, Some(target))?;
    Ok(())
}
