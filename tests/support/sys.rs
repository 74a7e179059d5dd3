//! What the suite does between fork and exec of the processes it starts, and the one system
//! call it makes that nix has no wrapper for (`klogctl`). `pre_exec` hooks are unsafe by
//! nature: each here makes only async-signal-safe calls on memory prepared before the fork.

// Unsafe: pre_exec hooks, and klogctl, which nix does not wrap.
#![allow(unsafe_code)]

use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes the process `cmd` starts get SIGKILL when its parent dies (`PR_SET_PDEATHSIG`), so
/// a test binary that crashes or is killed leaves none of its helpers running.
///
/// The kernel ties the signal to the *thread* that forks: spawn such a command on a thread
/// that outlives the child (a test's own thread does), or with [`crate::run::spawn_tied`],
/// whose spawning thread lives as long as the test process.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
    // functions (prctl, getppid, _exit) with plain integer arguments.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            // The parent died before the prctl: nobody would ever signal us.
            if nix::unistd::getppid().as_raw() as u32 != parent {
                libc::_exit(137);
            }
            Ok(())
        })
    };
    cmd
}

/// Lets the process `cmd` starts inherit descriptor `fd` (clears its close-on-exec in the
/// child only, so no other child of the test process inherits it meanwhile).
pub fn inherit_fd(cmd: &mut Command, fd: RawFd) -> &mut Command {
    // SAFETY: only fcntl between fork and exec, on a number the caller keeps open until the
    // spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    cmd
}

/// Starts `cmd` in a session of its own whose controlling terminal is its stdin (a pty's
/// slave), so its process group is the terminal's foreground group.
pub fn with_controlling_terminal(cmd: &mut Command) -> &mut Command {
    // SAFETY: only raw system calls between fork and exec (setsid, an ioctl with an int).
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    cmd
}

/// Starts `cmd` with signal `sig` ignored, as `nohup`-like wrappers start their child.
pub fn ignoring(cmd: &mut Command, sig: i32) -> &mut Command {
    // SAFETY: only a raw system call between fork and exec; SIG_IGN needs no handler.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(sig, libc::SIG_IGN);
            Ok(())
        })
    };
    cmd
}

/// Bytes of the kernel log that no one has read through `/proc/kmsg` (or `syslog(2)`) yet.
pub fn kernel_log_unread() -> i32 {
    const SYSLOG_ACTION_SIZE_UNREAD: i32 = 9;
    // SAFETY: SIZE_UNREAD takes no buffer.
    unsafe { libc::klogctl(SYSLOG_ACTION_SIZE_UNREAD, std::ptr::null_mut(), 0) }
}
