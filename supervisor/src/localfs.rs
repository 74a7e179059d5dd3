//! File operations kmirror performs locally on the app's behalf, for paths whose raw form the
//! kernel would resolve differently than kmirror does (see `handlers::files`).

use kmirror_protocol::FileStat;
use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};

fn c_path(path: &[u8]) -> Result<CString, i32> {
    CString::new(path).map_err(|_| libc::EINVAL)
}

fn last() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

pub fn open(path: &[u8], flags: i32, mode: u32) -> Result<OwnedFd, i32> {
    let p = c_path(path)?;
    // SAFETY: valid C string; the descriptor is owned below.
    let fd = unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        return Err(last());
    }
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn stat(path: &[u8], follow: bool) -> Result<FileStat, i32> {
    let p = c_path(path)?;
    // SAFETY: zeroed stat is valid; fstatat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let flags = if follow { 0 } else { libc::AT_SYMLINK_NOFOLLOW };
    // SAFETY: valid path and output buffer.
    if unsafe { libc::fstatat(libc::AT_FDCWD, p.as_ptr(), &mut st, flags) } != 0 {
        return Err(last());
    }
    Ok(FileStat::from(&st))
}

pub fn access(path: &[u8], mode: u32) -> Result<(), i32> {
    let p = c_path(path)?;
    // SAFETY: valid path.
    if unsafe { libc::access(p.as_ptr(), mode as i32) } == 0 { Ok(()) } else { Err(last()) }
}

pub fn read_link(path: &[u8]) -> Result<Vec<u8>, i32> {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    std::fs::read_link(std::ffi::OsStr::from_bytes(path))
        .map(|t| t.into_os_string().into_vec())
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
}
