//! The system calls and process state the agent needs that nix has no safe wrapper for, each
//! behind a small safe function. Raw calls live only here and in `incoming::datapath` (the
//! tcx link, through libbpf's C API).

// Unsafe: this module is the home of the raw calls nix has no wrapper for.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `pidfd_open(pid, 0)`.
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags by value; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_send_signal(pidfd, sig, NULL, 0)`; signal 0 only checks that the process exists.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: i32) -> std::io::Result<()> {
    // SAFETY: no siginfo (a null pointer) and no flags; the rest are integers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// `faccessat2(fd, "", mode, AT_EMPTY_PATH | AT_EACCESS)`: checks the descriptor's own file
/// with the calling thread's file-system credentials (nix's `faccessat` goes through glibc,
/// which emulates flags the kernel lacks in user space).
pub fn access_fd(fd: BorrowedFd<'_>, mode: u32) -> std::io::Result<()> {
    let flags = libc::AT_EMPTY_PATH | libc::AT_EACCESS;
    // SAFETY: an empty NUL-terminated path; the rest are integers.
    let rc = unsafe { libc::syscall(libc::SYS_faccessat2, fd.as_raw_fd(), c"".as_ptr(), mode, flags) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Registers `fd` with the runtime (tokio's registration is unsafe: it cannot check that a
/// descriptor stays open).
pub fn async_fd(fd: OwnedFd) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is an open descriptor that stays open, and the same, until dropped,
    // and the AsyncFd owns it.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// Takes ownership of descriptor `fd`, which the process that started the agent passed on
/// for it (`--tunnel-fd`, `--token-fd`). Call once per such number, before anything else of
/// the agent could have opened or closed it.
pub fn inherited_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: the spawner passed this descriptor to us and nothing else in the agent owns it
    // (the caller's contract above).
    unsafe { OwnedFd::from_raw_fd(fd) }
}

unsafe extern "C" {
    /// The C library's environment block: pointers to `NAME=value` strings, at first in the
    /// memory the kernel set up at exec, which is what `/proc/<pid>/environ` shows.
    static mut environ: *mut *mut libc::c_char;
}

/// Removes variable `name` from the environment and overwrites its value where it lies, so
/// `/proc/<pid>/environ` no longer shows it (`remove_var` only unlinks the entry). Call
/// before any thread exists.
pub fn take_env_secret(name: &str) -> Option<String> {
    let value = std::env::var(name).ok()?;
    let prefix = format!("{name}=");
    // SAFETY: single-threaded (the caller's contract); `environ` is a NULL-terminated array of
    // pointers to NUL-terminated strings, each writable (the initial stack or the heap).
    unsafe {
        let mut entry = environ;
        while !entry.is_null() && !(*entry).is_null() {
            let text = std::ffi::CStr::from_ptr(*entry).to_bytes();
            if text.starts_with(prefix.as_bytes()) {
                let start = (*entry).add(prefix.len());
                for i in 0..text.len() - prefix.len() {
                    std::ptr::write_volatile(start.add(i), 0);
                }
            }
            entry = entry.add(1);
        }
        std::env::remove_var(name);
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The secret's bytes are overwritten where the environment held them, not just unlinked.
    #[test]
    fn an_environment_secret_is_wiped_where_it_lay() {
        let name = "KMIRROR_TEST_SECRET_WIPE";
        // SAFETY: this test alone touches this variable.
        unsafe { std::env::set_var(name, "s3cret-value") };
        let prefix = format!("{name}=");
        // SAFETY: reading the environment block; see take_env_secret.
        let held = unsafe {
            let mut entry = environ;
            loop {
                assert!(!(*entry).is_null(), "the variable is not in environ");
                if std::ffi::CStr::from_ptr(*entry).to_bytes().starts_with(prefix.as_bytes()) {
                    break *entry;
                }
                entry = entry.add(1);
            }
        };
        assert_eq!(take_env_secret(name).as_deref(), Some("s3cret-value"));
        assert!(std::env::var(name).is_err());
        // SAFETY: the string is still allocated (unsetenv does not free it) and as long as before.
        let value = unsafe { std::slice::from_raw_parts(held.add(prefix.len()).cast::<u8>(), 12) };
        assert_eq!(value, &[0u8; 12], "the value is still in memory");
    }
}
