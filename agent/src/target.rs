//! The target process: its root directory and network namespace, held open for the session.

use anyhow::{Context, Result};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub struct Target {
    pub pid: u32,
    /// `/proc/<pid>/root`, opened as a directory: every pod path is resolved beneath it.
    pub root: OwnedFd,
    /// `/proc/<pid>/ns/net`.
    pub netns: OwnedFd,
    /// A pidfd: readable once the target exits.
    pub pidfd: OwnedFd,
}

impl Target {
    pub fn open(pid: u32) -> Result<Target> {
        let pidfd = pidfd_open(pid).with_context(|| {
            format!("target process {pid} does not exist (or is not visible to the agent)")
        })?;
        let root = open_path(&format!("/proc/{pid}/root"), libc::O_PATH | libc::O_DIRECTORY)
            .with_context(|| format!("cannot open the root directory of process {pid}"))?;
        let netns = open_path(&format!("/proc/{pid}/ns/net"), libc::O_RDONLY)
            .with_context(|| format!("cannot open the network namespace of process {pid}"))?;
        Ok(Target { pid, root, netns, pidfd })
    }
}

impl Target {
    /// Becomes readable when the target exits.
    pub fn exit_watch(&self) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
        let fd = self.pidfd.try_clone()?;
        // SAFETY: `fd` is an owned pidfd that the AsyncFd keeps open and never replaces.
        unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(Into::into)
    }
}

fn open_path(path: &str, flags: i32) -> std::io::Result<OwnedFd> {
    let c = CString::new(path).expect("no NUL in proc paths");
    // SAFETY: `c` is a valid C string; the returned descriptor is owned by us.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is not owned elsewhere.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    debug_assert!(fd.as_raw_fd() >= 0);
    Ok(fd)
}
