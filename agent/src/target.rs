//! The target process: its root directory and network namespace, held open for the session.
//!
//! A pid names a process only while that process exists: once it is reaped the number can be
//! reused. So the agent takes a pidfd first, opens `/proc/<pid>` and what it needs through
//! that directory, and then checks that the pidfd's process is still alive. If it is, the pid
//! was never free in between and everything opened belongs to it; later lookups go through
//! the held `/proc/<pid>` directory, which keeps naming that process (and fails once it is
//! gone) whatever the number comes to mean.

use crate::sys::pidfd_open;
use anyhow::{Context, Result};
use std::os::fd::{AsFd, OwnedFd};

pub struct Target {
    pub pid: u32,
    /// `/proc/<pid>`, as an `O_PATH` directory: per-process files are opened relative to it.
    pub proc_dir: OwnedFd,
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
        Target::open_as(pid, pidfd)
    }

    /// Opens `pid`'s root and network namespace, for the process `pidfd` refers to.
    fn open_as(pid: u32, pidfd: OwnedFd) -> Result<Target> {
        let proc_dir = open_at(None, &format!("/proc/{pid}"), libc::O_PATH | libc::O_DIRECTORY)
            .with_context(|| format!("cannot open /proc/{pid}"))?;
        let root = open_at(Some(&proc_dir), "root", libc::O_PATH | libc::O_DIRECTORY)
            .with_context(|| format!("cannot open the root directory of process {pid}"))?;
        let netns = open_at(Some(&proc_dir), "ns/net", libc::O_RDONLY)
            .with_context(|| format!("cannot open the network namespace of process {pid}"))?;
        ensure_alive(&pidfd).with_context(|| {
            format!(
                "target process {pid} exited while the agent opened it (its pid may name another process now)"
            )
        })?;
        Ok(Target { pid, proc_dir, root, netns, pidfd })
    }

    /// Opens a file of the target's `/proc/<pid>` directory (`environ`, say).
    pub fn open_proc_file(&self, name: &str) -> std::io::Result<OwnedFd> {
        open_at(Some(&self.proc_dir), name, libc::O_RDONLY)
    }

    /// Fails once the target process has been reaped: what was read through its pid before
    /// this check may have come from another process.
    pub fn ensure_alive(&self) -> std::io::Result<()> {
        ensure_alive(&self.pidfd)
    }

    /// Becomes readable when the target exits.
    pub fn exit_watch(&self) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
        crate::sys::async_fd(self.pidfd.try_clone()?)
    }
}

/// Signal 0 through the pidfd: succeeds while its process exists (a zombie included, whose
/// pid is not free yet), ESRCH once it has been reaped.
fn ensure_alive(pidfd: &OwnedFd) -> std::io::Result<()> {
    crate::sys::pidfd_send_signal(pidfd.as_fd(), 0)
}

fn open_at(dir: Option<&OwnedFd>, path: &str, flags: i32) -> std::io::Result<OwnedFd> {
    use nix::fcntl::OFlag;
    let dirfd = dir.map_or(nix::fcntl::AT_FDCWD, |d| d.as_fd());
    let flags = OFlag::from_bits_retain(flags | libc::O_CLOEXEC);
    Ok(nix::fcntl::openat(dirfd, path, flags, nix::sys::stat::Mode::empty())?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A pidfd whose process is gone (spawned, killed and reaped): what the agent holds when
    /// the target's pid is reused by another process.
    pub fn reaped_pidfd() -> OwnedFd {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pidfd = pidfd_open(child.id()).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        pidfd
    }

    #[test]
    fn a_live_target_opens() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let target = Target::open(child.id()).unwrap();
        assert!(target.ensure_alive().is_ok());
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(target.ensure_alive().unwrap_err().raw_os_error(), Some(libc::ESRCH));
    }

    /// The pid now names a live process (this test's own), but the pidfd's process is gone:
    /// what was opened by pid is someone else's, and the open is refused.
    #[test]
    fn a_reused_pid_is_detected() {
        let err =
            Target::open_as(std::process::id(), reaped_pidfd()).err().expect("the reused pid was accepted");
        assert!(format!("{err:#}").contains("exited while the agent opened it"), "{err:#}");
    }
}
