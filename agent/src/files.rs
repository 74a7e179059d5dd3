//! Reading the target's files, confined to its root.
//!
//! Every path is resolved with `openat2(root, path, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`:
//! absolute symlinks, `..` and relative symlinks all stay inside the target's root, and `/proc`
//! magic links cannot lead out of it. (A plain path through `/proc/<pid>/root` would follow an
//! absolute symlink to the *host's* root.)
//!
//! The agent runs as root and the pod chooses what its paths lead to: a file is read only after
//! the descriptor its path resolved to was checked (see [`open_regular`]), and every later
//! read of that fetch goes through the same open file description ([`Handles`]).

use kmirror_protocol::{DirEntry, Errno, FileStat};
use std::collections::HashMap;
use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, FileTypeExt};
use std::sync::{Arc, Mutex};

/// Largest chunk one `ReadFile`/`ReadHandle` answer carries (well below the frame limit).
pub const MAX_READ_CHUNK: u32 = 512 * 1024;
/// Open file and directory handles one session may hold: the supervisor keeps one per fetch
/// in progress, so this is far above honest use, and bounds the descriptors a session pins.
pub const MAX_HANDLES: usize = 64;
/// Encoded size of the entries one directory answer carries (half the frame limit).
const DIR_PART_BYTES: usize = 512 * 1024;

pub fn nix_errno(e: nix::errno::Errno) -> Errno {
    Errno(e as i32)
}

fn io_errno(e: std::io::Error) -> Errno {
    Errno(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Opens `path` beneath `root`; `flags` are open(2) flags (O_CLOEXEC is added).
pub fn open_in_root(root: &OwnedFd, path: &[u8], flags: i32) -> Result<OwnedFd, Errno> {
    open_in_root_mode(root, path, flags, 0)
}

/// [`open_in_root`] with the `mode` of a file `O_CREAT` creates (the calling thread's umask
/// applies, as for any creation).
pub fn open_in_root_mode(root: &OwnedFd, path: &[u8], flags: i32, mode: u32) -> Result<OwnedFd, Errno> {
    let c_path = CString::new(path).map_err(|_| Errno(libc::EINVAL))?;
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    let mode = if flags & libc::O_CREAT != 0 { mode & 0o7777 } else { 0 };
    let how = || {
        OpenHow::new()
            .flags(OFlag::from_bits_retain(flags | libc::O_CLOEXEC))
            .mode(nix::sys::stat::Mode::from_bits_retain(mode))
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS)
    };
    loop {
        match nix::fcntl::openat2(root, c_path.as_c_str(), how()) {
            Ok(fd) => return Ok(fd),
            // RESOLVE_IN_ROOT returns EAGAIN when a concurrent rename raced the lookup.
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(nix_errno(e)),
        }
    }
}

/// File systems whose "regular files" are kernel interfaces: reading one has effects of its
/// own (`/proc/kmsg` drains the host's kernel log; tracing and debug files start and stop
/// things) or shows host state. A pod can point a symlink at them (its own `/proc` is such a
/// mount), so they are refused even though they report `S_IFREG`.
const KERNEL_FILE_SYSTEMS: &[(i64, &str)] = &[
    (0x9fa0, "proc"),
    (0x6265_6572, "sysfs"),
    (0x6462_6720, "debugfs"),
    (0x7472_6163, "tracefs"),
    (0x7363_6673, "securityfs"),
    (0x0027_e0eb, "cgroup"),
    (0x6367_7270, "cgroup2"),
    (0xcafe_4a11, "bpf"),
    (0x6265_6570, "configfs"),
    (0xde5e_81e4, "efivarfs"),
    (0x6165_676c, "pstore"),
    (0x6573_5543, "fusectl"),
    (0xf97c_ff8c, "selinuxfs"),
    (0x4341_5d53, "smackfs"),
    (0x4249_4e4d, "binfmt_misc"),
    (0x6e73_6673, "nsfs"),
    (0x1980_0202, "mqueue"),
];

/// Whether a file of `mode` on a file system of type `fs_type` may be read for the pod, and
/// the errno an app gets if not: a directory is EISDIR, a symlink (not followed) ELOOP, and
/// anything that is not a plain regular file on a plain file system ENXIO (device nodes,
/// FIFOs, sockets, kernel files).
pub fn check_readable(mode: u32, fs_type: i64) -> Result<(), Errno> {
    match mode & libc::S_IFMT {
        libc::S_IFREG if is_kernel_fs(fs_type) => Err(Errno(libc::ENXIO)),
        libc::S_IFREG => Ok(()),
        libc::S_IFDIR => Err(Errno(libc::EISDIR)),
        libc::S_IFLNK => Err(Errno(libc::ELOOP)),
        _ => Err(Errno(libc::ENXIO)),
    }
}

/// Whether a file system of type `fs_type` is one of the kernel's interfaces
/// ([`KERNEL_FILE_SYSTEMS`]).
pub fn is_kernel_fs(fs_type: i64) -> bool {
    KERNEL_FILE_SYSTEMS.iter().any(|&(magic, _)| magic == fs_type)
}

pub fn fs_type(fd: &OwnedFd) -> Result<i64, Errno> {
    Ok(nix::sys::statfs::fstatfs(fd).map_err(nix_errno)?.filesystem_type().0 as i64)
}

/// Opens a pod file for reading. Its path is resolved once, to an `O_PATH` descriptor that
/// has no effect on the file; that descriptor is checked ([`check_readable`]); only then is
/// the same file opened for reading through it (`/proc/self/fd`, no second path lookup), with
/// `O_NONBLOCK | O_NOCTTY`. So a device node, FIFO, socket or kernel file is never opened
/// (opening alone has effects: it releases a FIFO's waiting writer, arms a watchdog), and a
/// swap of the path after the check changes nothing.
pub fn open_regular(root: &OwnedFd, path: &[u8], follow: bool) -> Result<(std::fs::File, FileStat), Errno> {
    let located = open_in_root(root, path, libc::O_PATH | if follow { 0 } else { libc::O_NOFOLLOW })?;
    let st = fstat(&located)?;
    check_readable(st.mode, fs_type(&located)?)?;
    let c_path = CString::new(format!("/proc/self/fd/{}", located.as_raw_fd())).expect("no NUL");
    use nix::fcntl::OFlag;
    let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let file =
        nix::fcntl::open(c_path.as_c_str(), flags, nix::sys::stat::Mode::empty()).map_err(nix_errno)?;
    let opened = fstat(&file)?;
    if (opened.dev, opened.ino) != (st.dev, st.ino) {
        return Err(Errno(libc::ENXIO));
    }
    Ok((file.into(), opened))
}

pub fn stat(root: &OwnedFd, path: &[u8], follow: bool) -> Result<FileStat, Errno> {
    let flags = libc::O_PATH | if follow { 0 } else { libc::O_NOFOLLOW };
    let fd = open_in_root(root, path, flags)?;
    fstat(&fd)
}

pub fn fstat(fd: &impl std::os::fd::AsFd) -> Result<FileStat, Errno> {
    Ok(FileStat::from(&nix::sys::stat::fstat(fd).map_err(nix_errno)?))
}

/// Reads up to `len` bytes at `offset` (protocol 2's `ReadFile`; each call opens the file
/// anew); `eof` is set when the file ended within this chunk.
pub fn read_chunk(root: &OwnedFd, path: &[u8], offset: u64, len: u32) -> Result<(Vec<u8>, bool), Errno> {
    let (file, _) = open_regular(root, path, true)?;
    let len = len.min(MAX_READ_CHUNK) as usize;
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        match nix::sys::uio::pread(&file, &mut buf[filled..], (offset + filled as u64) as libc::off_t) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(nix_errno(e)),
        }
    }
    buf.truncate(filled);
    Ok((buf, filled < len))
}

/// Reads the next `len` bytes (at most [`MAX_READ_CHUNK`]); `eof` once the file ended.
pub fn read_next(file: &mut std::fs::File, len: u32) -> Result<(Vec<u8>, bool), Errno> {
    let len = len.min(MAX_READ_CHUNK) as usize;
    let mut buf = Vec::with_capacity(len);
    let read = file.by_ref().take(len as u64).read_to_end(&mut buf).map_err(io_errno)?;
    Ok((buf, read < len))
}

/// A directory being listed in parts: the entry that did not fit the last part comes first.
struct DirListing {
    entries: std::fs::ReadDir,
    carry: Option<DirEntry>,
}

enum Open {
    File(std::fs::File),
    Dir(DirListing),
    /// A file opened for writing (`writes`); also read from when its content is fetched.
    Write(crate::writes::WriteFile),
}

/// Write handles one session may hold: one per pod file the app has open for writing, kept
/// until its last descriptor there closes.
pub const MAX_WRITE_HANDLES: usize = 256;

/// The files and directories one session is reading, by handle. A handle is closed when its
/// end was read, when the supervisor closes it, or with the session.
#[derive(Default)]
pub struct Handles {
    next: u64,
    open: HashMap<u64, Arc<Mutex<Open>>>,
    /// Which of `open` are write handles (bounded apart: they live as long as the app's
    /// descriptors, the others only while a fetch or listing runs).
    writes: std::collections::HashSet<u64>,
}

pub type SharedHandles = Arc<Mutex<Handles>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Handles {
    fn insert(handles: &SharedHandles, open: Open) -> Result<u64, Errno> {
        let mut handles = lock(handles);
        let write = matches!(open, Open::Write(_));
        let (used, limit) = match write {
            true => (handles.writes.len(), MAX_WRITE_HANDLES),
            false => (handles.open.len() - handles.writes.len(), MAX_HANDLES),
        };
        if used >= limit {
            tracing::warn!("the supervisor holds {limit} open pod files already; refusing another");
            return Err(Errno(libc::EMFILE));
        }
        handles.next += 1;
        let handle = handles.next;
        handles.open.insert(handle, Arc::new(Mutex::new(open)));
        if write {
            handles.writes.insert(handle);
        }
        Ok(handle)
    }

    pub(crate) fn insert_write(
        handles: &SharedHandles,
        file: crate::writes::WriteFile,
    ) -> Result<u64, Errno> {
        Handles::insert(handles, Open::Write(file))
    }

    /// Runs `op` on a write handle's file.
    pub(crate) fn with_write<R>(
        handles: &SharedHandles,
        handle: u64,
        op: impl FnOnce(&mut crate::writes::WriteFile) -> Result<R, Errno>,
    ) -> Result<R, Errno> {
        let open = Handles::get(handles, handle)?;
        let mut open = lock(&open);
        match &mut *open {
            Open::Write(file) => op(file),
            _ => Err(Errno(libc::EBADF)),
        }
    }

    fn get(handles: &SharedHandles, handle: u64) -> Result<Arc<Mutex<Open>>, Errno> {
        lock(handles).open.get(&handle).cloned().ok_or(Errno(libc::EBADF))
    }

    pub fn close(handles: &SharedHandles, handle: u64) -> Result<(), Errno> {
        let mut handles = lock(handles);
        handles.writes.remove(&handle);
        handles.open.remove(&handle).map(drop).ok_or(Errno(libc::EBADF))
    }

    #[cfg(test)]
    pub fn len(handles: &SharedHandles) -> usize {
        lock(handles).open.len()
    }
}

/// Opens a regular file (see [`open_regular`]) and reads its first chunk; a handle to read
/// on is kept only if the file did not end within it.
pub fn open_file(
    handles: &SharedHandles,
    root: &OwnedFd,
    path: &[u8],
    follow: bool,
) -> Result<(Option<u64>, FileStat, Vec<u8>), Errno> {
    let (mut file, st) = open_regular(root, path, follow)?;
    let (bytes, eof) = read_next(&mut file, MAX_READ_CHUNK)?;
    let handle = if eof { None } else { Some(Handles::insert(handles, Open::File(file))?) };
    Ok((handle, st, bytes))
}

/// The next chunk of an open file; the handle is closed at the end of the file or on error.
pub fn read_handle(handles: &SharedHandles, handle: u64, len: u32) -> Result<(Vec<u8>, bool), Errno> {
    let open = Handles::get(handles, handle)?;
    let result = match &mut *lock(&open) {
        Open::File(file) => read_next(file, len),
        Open::Dir(_) => Err(Errno(libc::EISDIR)),
        // A write handle's content is read once, to start the app's copy; it stays open.
        Open::Write(w) => return read_next(&mut w.file, len),
    };
    if !matches!(result, Ok((_, false))) {
        let _ = Handles::close(handles, handle);
    }
    result
}

/// Opens a directory and lists its first entries; a handle to list on is kept only if more
/// remain.
pub fn open_dir(
    handles: &SharedHandles,
    root: &OwnedFd,
    path: &[u8],
) -> Result<(Vec<DirEntry>, Option<u64>), Errno> {
    let fd = open_in_root(root, path, libc::O_RDONLY | libc::O_DIRECTORY)?;
    let entries = std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(io_errno)?;
    let mut listing = DirListing { entries, carry: None };
    let (part, done) = next_entries(&mut listing)?;
    let more = if done { None } else { Some(Handles::insert(handles, Open::Dir(listing))?) };
    Ok((part, more))
}

/// The next entries of an open directory; the handle is closed once the listing is complete.
pub fn read_dir(handles: &SharedHandles, handle: u64) -> Result<(Vec<DirEntry>, Option<u64>), Errno> {
    let open = Handles::get(handles, handle)?;
    let result = match &mut *lock(&open) {
        Open::Dir(listing) => next_entries(listing),
        Open::File(_) | Open::Write(_) => Err(Errno(libc::ENOTDIR)),
    };
    match result {
        Ok((part, false)) => Ok((part, Some(handle))),
        Ok((part, true)) => {
            let _ = Handles::close(handles, handle);
            Ok((part, None))
        }
        Err(errno) => {
            let _ = Handles::close(handles, handle);
            Err(errno)
        }
    }
}

/// Entries up to [`DIR_PART_BYTES`] of encoding; `true` once the directory is exhausted.
fn next_entries(listing: &mut DirListing) -> Result<(Vec<DirEntry>, bool), Errno> {
    let mut part = Vec::new();
    let mut bytes = 0;
    loop {
        let entry = match listing.carry.take() {
            Some(entry) => entry,
            None => match listing.entries.next() {
                None => return Ok((part, true)),
                Some(entry) => dir_entry(entry.map_err(io_errno)?),
            },
        };
        // Name, length prefix, kind and inode number as bincode's varints encode them, at most.
        let size = entry.name.len() + 16;
        if bytes + size > DIR_PART_BYTES && !part.is_empty() {
            listing.carry = Some(entry);
            return Ok((part, false));
        }
        bytes += size;
        part.push(entry);
    }
}

fn dir_entry(entry: std::fs::DirEntry) -> DirEntry {
    let kind = entry.file_type().map(d_type).unwrap_or(libc::DT_UNKNOWN);
    DirEntry { name: entry.file_name().as_bytes().to_vec(), kind, ino: entry.ino() }
}

/// `faccessat2` of `path` for `mode` (`follow`: whether a final symlink is followed), checked
/// with the calling thread's file-system credentials: a request made as the app runs on a
/// thread that took the app's ids for exactly this check (real or effective, as the app's call
/// asked; see `identity`), so AT_EACCESS is always given here.
pub fn access(root: &OwnedFd, path: &[u8], mode: u32, follow: bool) -> Result<(), Errno> {
    let fd = open_in_root(root, path, libc::O_PATH | if follow { 0 } else { libc::O_NOFOLLOW })?;
    crate::sys::access_fd(fd.as_fd(), mode).map_err(io_errno)
}

pub fn read_link(root: &OwnedFd, path: &[u8]) -> Result<Vec<u8>, Errno> {
    let fd = open_in_root(root, path, libc::O_PATH | libc::O_NOFOLLOW)?;
    // An empty path reads the link the O_PATH descriptor refers to.
    match nix::fcntl::readlinkat(&fd, c"") {
        Ok(target) => Ok(std::os::unix::ffi::OsStringExt::into_vec(target)),
        // Not a symlink: readlink(2) says EINVAL.
        Err(nix::errno::Errno::ENOENT) => Err(Errno(libc::EINVAL)),
        Err(e) => Err(nix_errno(e)),
    }
}

/// Every entry of a directory in one answer (protocol 2's `ListDir`; a listing too large for
/// one frame is refused with E2BIG by the tunnel).
pub fn list_dir(root: &OwnedFd, path: &[u8]) -> Result<Vec<DirEntry>, Errno> {
    let fd = open_in_root(root, path, libc::O_RDONLY | libc::O_DIRECTORY)?;
    let dir = std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(io_errno)?;
    dir.map(|entry| entry.map(dir_entry).map_err(io_errno)).collect()
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

    /// A fresh root for one test (tests run in parallel).
    fn temp_root() -> (std::path::PathBuf, OwnedFd) {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("kmirror-agent-files-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(dir.join("etc/hosts"), b"10.0.0.1 pod\n").unwrap();
        std::fs::create_dir_all(dir.join("outside")).unwrap();
        // Escapes that must stay inside the root.
        std::os::unix::fs::symlink("/etc/hosts", dir.join("abs-link")).unwrap();
        std::os::unix::fs::symlink("../../../../../../etc/hosts", dir.join("rel-link")).unwrap();
        let root = open_dir_fd(dir.to_str().unwrap());
        (dir, root)
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
        assert!(access(&root, b"/etc/hosts", libc::R_OK as u32, true).is_ok());
        assert_eq!(access(&root, b"/nope", 0, true), Err(Errno(libc::ENOENT)));
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn open_dir_fd(path: &str) -> OwnedFd {
        use nix::fcntl::OFlag;
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        nix::fcntl::open(path, flags, nix::sys::stat::Mode::empty()).expect(path)
    }

    #[test]
    fn only_plain_regular_files_are_readable() {
        let ext4 = 0xef53;
        assert_eq!(check_readable(libc::S_IFREG | 0o644, ext4), Ok(()));
        assert_eq!(check_readable(libc::S_IFREG | 0o400, 0x9fa0), Err(Errno(libc::ENXIO)));
        assert_eq!(check_readable(libc::S_IFREG | 0o644, 0x6265_6572), Err(Errno(libc::ENXIO)));
        assert_eq!(check_readable(libc::S_IFDIR | 0o755, ext4), Err(Errno(libc::EISDIR)));
        assert_eq!(check_readable(libc::S_IFLNK | 0o777, ext4), Err(Errno(libc::ELOOP)));
        for kind in [libc::S_IFIFO, libc::S_IFCHR, libc::S_IFBLK, libc::S_IFSOCK] {
            assert_eq!(check_readable(kind | 0o666, ext4), Err(Errno(libc::ENXIO)));
        }
    }

    /// Kernel files, device nodes and FIFOs are refused without being read (nor, for a FIFO
    /// without a writer, waited on); the old per-read open read /proc/kmsg and the device.
    #[test]
    fn kernel_files_devices_and_fifos_are_refused() {
        let host = open_dir_fd("/");
        for path in ["/proc/self/status", "/sys/kernel/mm/transparent_hugepage/enabled", "/proc/kmsg"] {
            if std::path::Path::new(path).exists() {
                assert_eq!(
                    read_chunk(&host, path.as_bytes(), 0, 16).err(),
                    Some(Errno(libc::ENXIO)),
                    "{path}"
                );
            }
        }
        assert_eq!(read_chunk(&host, b"/dev/zero", 0, 16).err(), Some(Errno(libc::ENXIO)));
        let (dir, root) = temp_root();
        nix::unistd::mkfifo(&dir.join("fifo"), nix::sys::stat::Mode::from_bits_retain(0o644)).unwrap();
        assert_eq!(read_chunk(&root, b"/fifo", 0, 16).err(), Some(Errno(libc::ENXIO)));
        std::os::unix::fs::symlink("/fifo", dir.join("to-fifo")).unwrap();
        let handles = SharedHandles::default();
        assert_eq!(open_file(&handles, &root, b"/to-fifo", true).err(), Some(Errno(libc::ENXIO)));
        assert_eq!(open_file(&handles, &root, b"/to-fifo", false).err(), Some(Errno(libc::ELOOP)));
        assert_eq!(open_file(&handles, &root, b"/etc", true).err(), Some(Errno(libc::EISDIR)));
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A file read through its handle gives the content of the file that was opened, whole,
    /// however often the path is replaced meanwhile; the handle closes at its end.
    #[test]
    fn a_handle_reads_the_file_it_opened_despite_renames() {
        let (dir, root) = temp_root();
        let old: Vec<u8> = (0..3 * MAX_READ_CHUNK + 5).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.join("big"), &old).unwrap();
        let handles = SharedHandles::default();
        let (handle, stat, mut got) = open_file(&handles, &root, b"/big", true).unwrap();
        assert_eq!(stat.size as usize, old.len());
        let handle = handle.expect("more than one chunk");
        for round in 0.. {
            std::fs::write(dir.join("new"), vec![round as u8; old.len()]).unwrap();
            std::fs::rename(dir.join("new"), dir.join("big")).unwrap();
            let (bytes, eof) = read_handle(&handles, handle, MAX_READ_CHUNK).unwrap();
            got.extend_from_slice(&bytes);
            if eof {
                break;
            }
        }
        assert!(got == old, "the content changed while it was read");
        assert_eq!(Handles::len(&handles), 0, "the handle is closed at the end");
        assert_eq!(read_handle(&handles, handle, 1).err(), Some(Errno(libc::EBADF)));
        // A small file comes whole with the open, without a handle.
        let (handle, _, bytes) = open_file(&handles, &root, b"/etc/hosts", true).unwrap();
        assert_eq!((handle, bytes.as_slice()), (None, &b"10.0.0.1 pod\n"[..]));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn handles_are_bounded_and_closable() {
        let (dir, root) = temp_root();
        std::fs::write(dir.join("big"), vec![1u8; MAX_READ_CHUNK as usize + 1]).unwrap();
        let handles = SharedHandles::default();
        let open: Vec<u64> =
            (0..MAX_HANDLES).map(|_| open_file(&handles, &root, b"/big", true).unwrap().0.unwrap()).collect();
        assert_eq!(open_file(&handles, &root, b"/big", true).err(), Some(Errno(libc::EMFILE)));
        assert_eq!(Handles::close(&handles, open[0]), Ok(()));
        assert_eq!(Handles::close(&handles, open[0]), Err(Errno(libc::EBADF)));
        assert!(open_file(&handles, &root, b"/big", true).is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A directory too large for one frame is listed in parts, every entry exactly once.
    #[test]
    fn a_large_directory_is_listed_in_parts() {
        let (dir, root) = temp_root();
        let many = dir.join("many");
        std::fs::create_dir(&many).unwrap();
        let count = 12_000;
        for i in 0..count {
            std::fs::File::create(many.join(format!("{i:0>60}"))).unwrap();
        }
        let handles = SharedHandles::default();
        let (mut names, mut more) = open_dir(&handles, &root, b"/many").unwrap();
        let mut parts = 1;
        while let Some(handle) = more {
            let (part, next) = read_dir(&handles, handle).unwrap();
            names.extend(part);
            more = next;
            parts += 1;
        }
        assert!(parts > 1, "{count} long names fit one part");
        let unique: std::collections::HashSet<_> = names.iter().map(|e| e.name.clone()).collect();
        assert_eq!((names.len(), unique.len()), (count, count));
        assert_eq!(Handles::len(&handles), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
