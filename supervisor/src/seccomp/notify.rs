//! The seccomp user-notification listener: receive, validate, answer.
//!
//! Thin wrappers over the `SECCOMP_IOCTL_NOTIF_*` ioctls. Every answer goes through
//! [`Listener`], which may be shared by the notify thread and the async handlers: the kernel
//! serialises operations on the listener.

// Unsafe: the seccomp user-notify ioctls (RECV, SEND, ID_VALID, ADDFD), which nix does not wrap.
#![allow(unsafe_code)]

use crate::intercept::Notification;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

/// From linux/seccomp.h (6.6); not in the libc crate yet.
const SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP: libc::c_ulong = 1;

pub struct Listener {
    fd: OwnedFd,
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

impl Listener {
    pub fn new(fd: OwnedFd) -> Listener {
        Listener { fd }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Asks the kernel to switch the woken thread onto our CPU when we answer: an order of
    /// magnitude lower round trip for the short answers that dominate (Linux 6.6+).
    pub fn set_sync_wake_up_fd(fd: &OwnedFd) -> std::io::Result<()> {
        // SAFETY: SET_FLAGS takes the flag value itself as the argument.
        check(unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS,
                SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP,
            )
        })
    }

    /// Waits until a notification is pending or no task uses the filter any more.
    /// Returns false once the listener is hung up (every filtered task has exited).
    pub fn wait(&self) -> std::io::Result<bool> {
        use nix::poll::{PollFd, PollFlags, PollTimeout};
        let mut pfd = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        loop {
            match nix::poll::poll(&mut pfd, PollTimeout::NONE) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
                Ok(_) => {}
            }
            // The kernel reports only the events asked for and POLLERR, POLLHUP and POLLNVAL.
            let revents = pfd[0].revents().unwrap_or(PollFlags::empty());
            if revents.contains(PollFlags::POLLIN) {
                return Ok(true);
            }
            if revents.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL) {
                return Ok(false);
            }
        }
    }

    /// Receives one notification, blocking until one is pending. `Ok(None)` when it vanished
    /// before we got it (the caller was interrupted or killed; the kernel restarts the call and
    /// notifies again if needed), or when no task uses the filter any more.
    pub fn receive(&self) -> std::io::Result<Option<Notification>> {
        // SAFETY: the kernel requires a zeroed struct; all-zero is valid for this POD type.
        let mut raw: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: RECV writes one `seccomp_notif` into `raw`.
        let rc = unsafe { libc::ioctl(self.raw_fd(), libc::SECCOMP_IOCTL_NOTIF_RECV, &mut raw) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::EINTR) => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(Notification { id: raw.id, tid: raw.pid, nr: raw.data.nr as i64, args: raw.data.args }))
    }

    /// True while the notification is still waiting for our answer (the caller was not killed
    /// and its memory was not reused). Check after reading the caller's memory.
    pub fn is_valid(&self, id: u64) -> bool {
        // SAFETY: ID_VALID reads one u64 through the pointer.
        unsafe { libc::ioctl(self.raw_fd(), libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &id) == 0 }
    }

    fn send(&self, id: u64, val: i64, error: i32, flags: u32) {
        let mut resp = libc::seccomp_notif_resp { id, val, error, flags };
        // SAFETY: SEND reads one `seccomp_notif_resp`.
        let rc = unsafe { libc::ioctl(self.raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND, &mut resp) };
        if rc < 0 {
            // ENOENT: the caller was killed meanwhile; nothing to answer.
            tracing::trace!(id, "answer not delivered: {}", std::io::Error::last_os_error());
        }
    }

    /// Lets the kernel run the call as if it had not been trapped.
    pub fn continue_call(&self, id: u64) {
        self.send(id, 0, 0, libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32);
    }

    /// Completes the call with a return value.
    pub fn return_value(&self, id: u64, val: i64) {
        self.send(id, val, 0, 0);
    }

    /// Completes the call with `-errno`.
    pub fn return_errno(&self, id: u64, errno: i32) {
        self.send(id, 0, -errno, 0);
    }

    /// Installs `fd` in the caller as a new descriptor and completes the call with its number,
    /// atomically (no descriptor leaks into the caller if it is interrupted). If the caller
    /// cannot take another descriptor, the call fails with EMFILE as an open would; it is never
    /// left unanswered.
    pub fn return_new_fd(&self, id: u64, fd: RawFd, cloexec: bool) {
        let add = libc::seccomp_notif_addfd {
            id,
            flags: libc::SECCOMP_ADDFD_FLAG_SEND as u32,
            srcfd: fd as u32,
            newfd: 0,
            newfd_flags: if cloexec { libc::O_CLOEXEC as u32 } else { 0 },
        };
        // SAFETY: ADDFD reads one `seccomp_notif_addfd`; with FLAG_SEND it also answers.
        if let Err(e) = check(unsafe { libc::ioctl(self.raw_fd(), libc::SECCOMP_IOCTL_NOTIF_ADDFD, &add) }) {
            match e.raw_os_error() {
                // The caller is gone, or the notification was already answered.
                Some(libc::ENOENT) | Some(libc::EINPROGRESS) => {}
                // EBADF: the caller's RLIMIT_NOFILE is reached; EMFILE: beyond nr_open.
                Some(libc::EBADF) | Some(libc::EMFILE) => self.return_errno(id, libc::EMFILE),
                other => self.return_errno(id, other.unwrap_or(libc::EIO)),
            }
        }
    }
}
