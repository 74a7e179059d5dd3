//! Mechanism for write-backs (`writeback`): inotify close events of the app's copies of pod
//! files, and a lease probe that tells whether anyone else still has a file open.

// Unsafe: file leases (F_SETLEASE) have no wrapper in nix, and the inotify descriptor is
// polled by the runtime as a plain OwnedFd, read here with the events parsed by hand.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// An inotify instance (non-blocking, close-on-exec).
pub fn init() -> io::Result<OwnedFd> {
    // SAFETY: no pointers; the descriptor is owned below.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Watches `path` for the last close of each of its open file descriptions; the watch id.
pub fn watch_closes(inotify: &OwnedFd, path: &std::path::Path) -> io::Result<i32> {
    let c_path =
        CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mask = libc::IN_CLOSE_WRITE | libc::IN_CLOSE_NOWRITE;
    // SAFETY: a NUL-terminated path and an inotify descriptor.
    let wd = unsafe { libc::inotify_add_watch(inotify.as_raw_fd(), c_path.as_ptr(), mask) };
    if wd < 0 { Err(io::Error::last_os_error()) } else { Ok(wd) }
}

pub fn unwatch(inotify: &OwnedFd, wd: i32) {
    // SAFETY: no pointers; an unknown watch id is EINVAL, which changes nothing.
    unsafe { libc::inotify_rm_watch(inotify.as_raw_fd(), wd) };
}

/// One event: its watch and mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub wd: i32,
    pub mask: u32,
}

/// Every event queued now (none once the queue is empty).
pub fn read_events(inotify: &OwnedFd) -> io::Result<Vec<Event>> {
    let mut events = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: the buffer is writable for its length.
        let n = unsafe { libc::read(inotify.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(events),
                Some(libc::EINTR) => continue,
                _ => Err(e),
            };
        }
        events.extend(parse(&buf[..n as usize]));
    }
}

/// Splits a read of an inotify descriptor into events (`struct inotify_event`: wd, mask,
/// cookie, len, then `len` bytes of name).
fn parse(mut bytes: &[u8]) -> Vec<Event> {
    let mut events = Vec::new();
    while bytes.len() >= 16 {
        let word = |i: usize| u32::from_ne_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let (wd, mask, len) = (word(0) as i32, word(4), word(12) as usize);
        events.push(Event { wd, mask });
        bytes = bytes.get(16 + len..).unwrap_or_default();
    }
    events
}

/// Whether `file` (kmirror's own descriptor of a regular file) is the only open file
/// description of it left: a write lease is granted only then (the kernel counts the file's
/// readers and writers). The lease is given back at once.
pub fn alone(file: &std::fs::File) -> io::Result<bool> {
    // SAFETY: fcntl on an open descriptor with integer arguments.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK) } != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(false),
            _ => Err(e),
        };
    }
    // SAFETY: as above; releases the lease just taken.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A close of the last description opened for writing is seen as IN_CLOSE_WRITE, and the
    /// lease probe tells whether another description is still open.
    #[test]
    fn closes_are_seen_and_other_opens_counted() {
        let dir = std::env::temp_dir().join(format!("kmirror-inotify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, b"x").unwrap();
        let inotify = init().unwrap();
        let wd = watch_closes(&inotify, &path).unwrap();
        let ours = std::fs::File::open(&path).unwrap();
        assert!(alone(&ours).unwrap());
        let writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let dup = writer.try_clone().unwrap();
        assert!(!alone(&ours).unwrap(), "a writer is open");
        drop(writer);
        assert!(read_events(&inotify).unwrap().is_empty(), "a duplicate still holds the description");
        drop(dup);
        let events = read_events(&inotify).unwrap();
        assert_eq!(events, [Event { wd, mask: libc::IN_CLOSE_WRITE }]);
        let reader = std::fs::File::open(&path).unwrap();
        assert!(!alone(&ours).unwrap(), "a reader is open");
        drop(reader);
        assert_eq!(read_events(&inotify).unwrap(), [Event { wd, mask: libc::IN_CLOSE_NOWRITE }]);
        assert!(alone(&ours).unwrap());
        unwatch(&inotify, wd);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
