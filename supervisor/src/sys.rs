//! The system calls kmirror makes that nix has no safe wrapper for, each behind a small safe
//! function. Raw calls live only here and in the modules that cannot avoid them: the seccomp
//! listener's ioctls, the signal handlers, the code that runs between fork and exec, and the
//! socket calls on raw sockaddr bytes (`sockets`).

// Unsafe: this module is the home of the raw system calls nix has no wrapper for.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

fn last() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// `pidfd_open(pid, flags)`: a handle that names this process (or, with `PIDFD_THREAD`, this
/// thread) for good, even once its number is reused.
pub fn pidfd_open(pid: u32, flags: libc::c_uint) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags by value; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor from the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_getfd(pidfd, fd, 0)`: a copy of descriptor `fd` of the pidfd's process, sharing its
/// open file description.
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes descriptors and flags by value; the result is checked.
    let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if dup < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor from the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(dup as RawFd) })
}

/// `pidfd_send_signal(pidfd, sig, NULL, 0)`.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: i32) -> std::io::Result<()> {
    // SAFETY: no siginfo (a null pointer) and no flags; the rest are integers.
    let rc = unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), sig, std::ptr::null::<u8>(), 0)
    };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// `kcmp(ours, theirs, KCMP_FILE, our_fd, their_fd)`: 0 when both descriptors are the same
/// open file, 1 to 3 (an ordering) when not.
pub fn kcmp_files(ours: u32, theirs: u32, our_fd: RawFd, their_fd: RawFd) -> std::io::Result<i64> {
    const KCMP_FILE: libc::c_int = 0;
    // SAFETY: kcmp compares two descriptors' open files by their owners' ids; no memory.
    let rc = unsafe {
        libc::syscall(libc::SYS_kcmp, ours as libc::pid_t, theirs as libc::pid_t, KCMP_FILE, our_fd, their_fd)
    };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
}

/// `openat2(AT_FDCWD, "", how)` with `how` exactly as given (all its bytes): the kernel
/// judges `how` before it reads the path (see `localfs::check_open_how`). Ok(None) for the
/// expected ENOENT.
pub fn openat2_empty_path(how: &[u8]) -> Result<Option<OwnedFd>, i32> {
    // SAFETY: openat2 reads `how.len()` bytes of `how` and the empty, NUL-terminated path.
    let fd =
        unsafe { libc::syscall(libc::SYS_openat2, libc::AT_FDCWD, c"".as_ptr(), how.as_ptr(), how.len()) };
    if fd >= 0 {
        // SAFETY: a descriptor the kernel just returned.
        return Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }));
    }
    match last() {
        libc::ENOENT => Ok(None),
        errno => Err(errno),
    }
}

/// Owns descriptors the kernel installed in this process with an SCM_RIGHTS message.
pub fn adopt_received(fds: &[RawFd]) -> Vec<OwnedFd> {
    // SAFETY: recvmsg just installed each of these in this process for the caller, and
    // nothing else refers to them.
    fds.iter().map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect()
}

/// Takes ownership of descriptor `raw`, which this process inherited (socket activation passes
/// descriptors by number), marking it close-on-exec. Fails if it is not open.
pub fn take_inherited(raw: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_SETFD with an int argument; fails with EBADF on a closed descriptor.
    if unsafe { libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open and was passed to this process, which owns it from here;
    // nothing else in kmirror refers to descriptors it did not open.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// `faccessat2(fd, "", mode, AT_EMPTY_PATH | flags)`: checks the descriptor's own file with the
/// calling thread's credentials (nix's `faccessat` goes through glibc, which emulates flags
/// the kernel lacks in user space instead of failing).
pub fn access_fd(fd: BorrowedFd<'_>, mode: u32, flags: i32) -> Result<(), i32> {
    // SAFETY: an empty NUL-terminated path; the rest are integers.
    let rc = unsafe {
        libc::syscall(libc::SYS_faccessat2, fd.as_raw_fd(), c"".as_ptr(), mode, libc::AT_EMPTY_PATH | flags)
    };
    if rc == 0 { Ok(()) } else { Err(last()) }
}

/// `getxattr(path, name)` (with a name) or `listxattr(path)` (without) into `buf`; an empty
/// `buf` asks for the size.
pub fn xattr(path: &CStr, name: Option<&CStr>, buf: &mut [u8]) -> Result<usize, i32> {
    let (ptr, len) = if buf.is_empty() { (std::ptr::null_mut(), 0) } else { (buf.as_mut_ptr(), buf.len()) };
    // SAFETY: the path and name are NUL-terminated; `ptr` is null with length 0 or a writable
    // buffer of `len` bytes.
    let n = unsafe {
        match name {
            Some(name) => libc::getxattr(path.as_ptr(), name.as_ptr(), ptr.cast(), len),
            None => libc::listxattr(path.as_ptr(), ptr.cast(), len),
        }
    };
    if n < 0 { Err(last()) } else { Ok(n as usize) }
}

/// `getrandom(buf, 0)`: the byte count written, or the errno.
pub fn getrandom(buf: &mut [u8]) -> Result<usize, i32> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 { Err(last()) } else { Ok(n as usize) }
}

/// Registers `fd` with the runtime for readability (tokio's registration is unsafe: it cannot
/// check that a descriptor stays open).
pub fn register_readable(fd: OwnedFd) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is an open descriptor that stays open, and the same, until dropped,
    // and the AsyncFd owns it.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}
