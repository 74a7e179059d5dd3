//! Reading the target's files, confined to its root.
//!
//! Every path is resolved with `openat2(root, path, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`:
//! absolute symlinks, `..` and relative symlinks all stay inside the target's root, and `/proc`
//! magic links cannot lead out of it. (A plain path through `/proc/<pid>/root` would follow an
//! absolute symlink to the *host's* root.)

use kmirror_protocol::{DirEntry, Errno, FileStat};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirEntryExt, FileTypeExt};

/// Largest chunk one `ReadFile` answer carries (well below the frame limit).
pub const MAX_READ_CHUNK: u32 = 512 * 1024;

fn last_errno() -> Errno {
    Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
}

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_IN_ROOT: u64 = 0x10;

/// Opens `path` beneath `root`; `flags` are open(2) flags (O_CLOEXEC is added).
pub fn open_in_root(root: &OwnedFd, path: &[u8], flags: i32) -> Result<OwnedFd, Errno> {
    let c_path = CString::new(path).map_err(|_| Errno(libc::EINVAL))?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
    };
    loop {
        // SAFETY: openat2 reads `how` (sized as passed) and the NUL-terminated path.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root.as_raw_fd(),
                c_path.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd >= 0 {
            // SAFETY: the kernel returned a new descriptor that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        }
        let errno = last_errno();
        // RESOLVE_IN_ROOT returns EAGAIN when a concurrent rename raced the lookup.
        if errno.0 != libc::EAGAIN && errno.0 != libc::EINTR {
            return Err(errno);
        }
    }
}

pub fn stat(root: &OwnedFd, path: &[u8], follow: bool) -> Result<FileStat, Errno> {
    let flags = libc::O_PATH | if follow { 0 } else { libc::O_NOFOLLOW };
    let fd = open_in_root(root, path, flags)?;
    fstat(&fd)
}

fn fstat(fd: &OwnedFd) -> Result<FileStat, Errno> {
    // SAFETY: an all-zero `stat` is a valid value; fstat fills it in.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable `struct stat`.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(last_errno());
    }
    Ok(FileStat::from(&st))
}

/// Reads up to `len` bytes at `offset`; `eof` is set when the file ended within this chunk.
pub fn read_chunk(root: &OwnedFd, path: &[u8], offset: u64, len: u32) -> Result<(Vec<u8>, bool), Errno> {
    // O_NONBLOCK keeps a FIFO in the pod from hanging the agent.
    let fd = open_in_root(root, path, libc::O_RDONLY | libc::O_NOCTTY | libc::O_NONBLOCK)?;
    let st = fstat(&fd)?;
    if st.mode & libc::S_IFMT == libc::S_IFDIR {
        return Err(Errno(libc::EISDIR));
    }
    let len = len.min(MAX_READ_CHUNK) as usize;
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        // SAFETY: the destination range lies within `buf`.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf[filled..].as_mut_ptr().cast(),
                len - filled,
                (offset + filled as u64) as libc::off_t,
            )
        };
        match n {
            0 => break,
            n if n > 0 => filled += n as usize,
            _ => {
                let errno = last_errno();
                if errno.0 != libc::EINTR {
                    return Err(errno);
                }
            }
        }
    }
    buf.truncate(filled);
    Ok((buf, filled < len))
}

pub fn access(root: &OwnedFd, path: &[u8], mode: u32) -> Result<(), Errno> {
    let fd = open_in_root(root, path, libc::O_PATH)?;
    // SAFETY: faccessat2 with an empty path and AT_EMPTY_PATH checks the descriptor itself.
    let rc = unsafe {
        libc::syscall(libc::SYS_faccessat2, fd.as_raw_fd(), c"".as_ptr(), mode, libc::AT_EMPTY_PATH)
    };
    if rc == 0 { Ok(()) } else { Err(last_errno()) }
}

pub fn read_link(root: &OwnedFd, path: &[u8]) -> Result<Vec<u8>, Errno> {
    let fd = open_in_root(root, path, libc::O_PATH | libc::O_NOFOLLOW)?;
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: readlinkat with an empty path reads the link the O_PATH descriptor refers to.
    let n = unsafe { libc::readlinkat(fd.as_raw_fd(), c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let errno = last_errno();
        // Not a symlink: readlink(2) says EINVAL.
        return Err(if errno.0 == libc::ENOENT { Errno(libc::EINVAL) } else { errno });
    }
    buf.truncate(n as usize);
    Ok(buf)
}

pub fn list_dir(root: &OwnedFd, path: &[u8]) -> Result<Vec<DirEntry>, Errno> {
    let fd = open_in_root(root, path, libc::O_RDONLY | libc::O_DIRECTORY)?;
    let dir = std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let mut entries = Vec::new();
    for entry in dir {
        let entry = entry.map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EIO)))?;
        let kind = entry.file_type().map(d_type).unwrap_or(libc::DT_UNKNOWN);
        use std::os::unix::ffi::OsStrExt;
        entries.push(DirEntry { name: entry.file_name().as_bytes().to_vec(), kind, ino: entry.ino() });
    }
    Ok(entries)
}

fn d_type(ft: std::fs::FileType) -> u8 {
    if ft.is_dir() {
        libc::DT_DIR
    } else if ft.is_file() {
        libc::DT_REG
    } else if ft.is_symlink() {
        libc::DT_LNK
    } else if ft.is_fifo() {
        libc::DT_FIFO
    } else if ft.is_socket() {
        libc::DT_SOCK
    } else if ft.is_char_device() {
        libc::DT_CHR
    } else if ft.is_block_device() {
        libc::DT_BLK
    } else {
        libc::DT_UNKNOWN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_root() -> (std::path::PathBuf, OwnedFd) {
        let dir = std::env::temp_dir().join(format!("kmirror-agent-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(dir.join("etc/hosts"), b"10.0.0.1 pod\n").unwrap();
        std::fs::create_dir_all(dir.join("outside")).unwrap();
        // Escapes that must stay inside the root.
        std::os::unix::fs::symlink("/etc/hosts", dir.join("abs-link")).unwrap();
        std::os::unix::fs::symlink("../../../../../../etc/hosts", dir.join("rel-link")).unwrap();
        let c = CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid path; descriptor owned below.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: just opened.
        (dir, unsafe { OwnedFd::from_raw_fd(fd) })
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let (dir, root) = temp_root();
        for path in [&b"/etc/hosts"[..], b"/abs-link", b"/rel-link", b"/../../etc/hosts"] {
            let (bytes, eof) = read_chunk(&root, path, 0, 1024).unwrap();
            assert_eq!(bytes, b"10.0.0.1 pod\n", "{}", String::from_utf8_lossy(path));
            assert!(eof);
        }
        assert_eq!(read_link(&root, b"/abs-link").unwrap(), b"/etc/hosts");
        assert_eq!(read_link(&root, b"/etc/hosts"), Err(Errno(libc::EINVAL)));
        assert_eq!(stat(&root, b"/missing", true), Err(Errno(libc::ENOENT)));
        let st = stat(&root, b"/abs-link", false).unwrap();
        assert_eq!(st.mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!(stat(&root, b"/abs-link", true).unwrap().size, 13);
        assert_eq!(read_chunk(&root, b"/etc", 0, 10), Err(Errno(libc::EISDIR)));
        assert_eq!(read_chunk(&root, b"/etc/hosts", 3, 4).unwrap(), (b"0.0.".to_vec(), false));
        let mut names: Vec<_> = list_dir(&root, b"/").unwrap().into_iter().map(|e| e.name).collect();
        names.sort();
        assert_eq!(
            names,
            vec![b"abs-link".to_vec(), b"etc".to_vec(), b"outside".to_vec(), b"rel-link".to_vec()]
        );
        assert!(access(&root, b"/etc/hosts", libc::R_OK as u32).is_ok());
        assert_eq!(access(&root, b"/nope", 0), Err(Errno(libc::ENOENT)));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
