//! Writing the target's files, confined to its root as reads are (`files`).
//!
//! Each request runs with the app's credentials (`identity`), so the pod's kernel decides
//! every permission as it would for the app, and creations get the app's umask. Paths resolve
//! with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`, so no symlink of the pod makes a
//! write land outside its root. A file is written only after its path resolved once to an
//! `O_PATH` descriptor that was checked to be a regular file on a plain file system, and is
//! then opened through that descriptor (as `files::open_regular` does for reads): device
//! nodes, FIFOs, sockets and the files of kernel file systems (`/proc`, `/sys`, cgroups, ...)
//! are never opened for writing (ENXIO). Names are created, removed and renamed relative to
//! their parent directory, itself resolved inside the root; a parent on a kernel file system
//! is refused (EPERM: `mkdir` in a cgroup file system would create a cgroup of the node).

use crate::files::{self, Handles, SharedHandles};
use kmirror_protocol::{Errno, FileStat, WRITE_OPEN_FLAGS};
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

/// A pod file open for writing: its file, and whether it appends (then every write goes to
/// its end, whatever offset the request names).
pub struct WriteFile {
    pub file: std::fs::File,
    pub append: bool,
}

/// What [`open_write`] answers: the handle, the file's metadata once opened (and truncated or
/// created), its first bytes when they count, and whether more remain to be read.
pub struct Opened {
    pub handle: u64,
    pub stat: FileStat,
    pub bytes: Vec<u8>,
    pub more: bool,
}

/// How many symlinks a creation follows to their missing target before ELOOP (the kernel's
/// limit for one lookup).
const MAX_LINKS: usize = 40;

fn io_errno(e: std::io::Error) -> Errno {
    Errno(e.raw_os_error().unwrap_or(libc::EIO))
}

/// The errno of a file that is no plain regular file: as for reads (EISDIR for a directory,
/// ELOOP for a symlink not followed, ENXIO for devices, FIFOs, sockets and kernel files).
fn check_writable(fd: &OwnedFd) -> Result<FileStat, Errno> {
    let st = files::fstat(fd)?;
    files::check_readable(st.mode, files::fs_type(fd)?)?;
    Ok(st)
}

/// Opens the file an `O_PATH` descriptor names, through its `/proc/self/fd` link (no second
/// lookup), with `flags`; fails unless it is still that file.
fn reopen(located: &OwnedFd, st: &FileStat, flags: i32) -> Result<std::fs::File, Errno> {
    let path = format!("/proc/self/fd/{}", located.as_raw_fd());
    let flags =
        nix::fcntl::OFlag::from_bits_retain(flags | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC);
    let file =
        nix::fcntl::open(path.as_str(), flags, nix::sys::stat::Mode::empty()).map_err(files::nix_errno)?;
    let opened = files::fstat(&file)?;
    if (opened.dev, opened.ino) != (st.dev, st.ino) {
        return Err(Errno(libc::ENXIO));
    }
    Ok(file.into())
}

/// The path a dangling symlink at `path` leads to: its target, relative to the link's
/// directory unless absolute (which `RESOLVE_IN_ROOT` takes from the pod's root).
fn through_link(path: &[u8], target: &[u8]) -> Vec<u8> {
    if target.first() == Some(&b'/') {
        return target.to_vec();
    }
    let dir = match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[..=i],
        None => b"/",
    };
    [dir, target].concat()
}

/// Opens a pod file for writing as open(2) would with `flags` ([`WRITE_OPEN_FLAGS`]; the
/// calling thread carries the app's credentials and umask), and keeps it as a handle. The
/// handle reads too when the app's copy must start with the file's content (no `O_TRUNC`, not
/// a write-only append): then the app needs read permission as well (docs/files.md).
pub fn open_write(
    handles: &SharedHandles,
    root: &OwnedFd,
    path: &[u8],
    flags: u32,
    mode: u32,
) -> Result<Opened, Errno> {
    let flags = (flags & WRITE_OPEN_FLAGS) as i32;
    let access = flags & libc::O_ACCMODE;
    let append = flags & libc::O_APPEND != 0;
    let want_content = flags & libc::O_TRUNC == 0 && !(append && access == libc::O_WRONLY);
    let access = if want_content && access == libc::O_WRONLY { libc::O_RDWR } else { access };
    let keep = flags & (libc::O_TRUNC | libc::O_APPEND);
    let nofollow = flags & libc::O_NOFOLLOW;
    let exclusive = flags & (libc::O_CREAT | libc::O_EXCL) == libc::O_CREAT | libc::O_EXCL;
    let mut path = path.to_vec();
    let mut created = false;
    let mut file = None;
    for _ in 0..=MAX_LINKS {
        match files::open_in_root(root, &path, libc::O_PATH | nofollow) {
            Ok(_) if exclusive => return Err(Errno(libc::EEXIST)),
            Ok(located) => {
                let st = files::fstat(&located)?;
                let dir = st.mode & libc::S_IFMT == libc::S_IFDIR;
                if flags & libc::O_DIRECTORY != 0 && !dir {
                    return Err(Errno(libc::ENOTDIR));
                }
                files::check_readable(st.mode, files::fs_type(&located)?)?;
                file = Some(reopen(&located, &st, access | keep)?);
                break;
            }
            Err(Errno(libc::ENOENT)) if flags & libc::O_CREAT != 0 => {
                if flags & libc::O_DIRECTORY != 0 {
                    return Err(Errno(libc::EINVAL));
                }
                let create = access | libc::O_CREAT | libc::O_EXCL | keep | libc::O_NONBLOCK | libc::O_NOCTTY;
                match files::open_in_root_mode(root, &path, create, mode) {
                    Ok(fd) => {
                        check_writable(&fd)?;
                        created = true;
                        file = Some(fd.into());
                        break;
                    }
                    // Something appeared meanwhile (look again), or the last component is a
                    // dangling symlink, which open(2) follows to create its target.
                    Err(Errno(libc::EEXIST)) if flags & libc::O_EXCL == 0 => {
                        if let (0, Ok(target)) = (nofollow, files::read_link(root, &path)) {
                            path = through_link(&path, &target);
                        }
                    }
                    Err(errno) => return Err(errno),
                }
            }
            Err(errno) => return Err(errno),
        }
    }
    let Some(mut file) = file else { return Err(Errno(libc::ELOOP)) };
    let stat = files::fstat(&file)?;
    let (bytes, more) = if want_content && !created {
        let (bytes, eof) = files::read_next(&mut file, files::MAX_READ_CHUNK)?;
        (bytes, !eof)
    } else {
        (Vec::new(), false)
    };
    let handle = Handles::insert_write(handles, WriteFile { file, append })?;
    Ok(Opened { handle, stat, bytes, more })
}

/// Writes `bytes` at `offset` (at the end for an appending handle); all of them or an error.
pub fn write_handle(handles: &SharedHandles, handle: u64, offset: u64, bytes: &[u8]) -> Result<u64, Errno> {
    Handles::with_write(handles, handle, |w| {
        let written = if w.append {
            std::io::Write::write_all(&mut &w.file, bytes)
        } else {
            w.file.write_all_at(bytes, offset)
        };
        written.map_err(io_errno)?;
        Ok(bytes.len() as u64)
    })
}

pub fn truncate_handle(handles: &SharedHandles, handle: u64, len: u64) -> Result<(), Errno> {
    Handles::with_write(handles, handle, |w| w.file.set_len(len).map_err(io_errno))
}

pub fn sync_handle(handles: &SharedHandles, handle: u64, data_only: bool) -> Result<(), Errno> {
    Handles::with_write(handles, handle, |w| {
        if data_only { w.file.sync_data() } else { w.file.sync_all() }.map_err(io_errno)
    })
}

/// The directory that holds `path`'s last component, resolved inside the root, and that
/// component. The root itself has no parent (EBUSY, as for the kernel's mount point); `.` and
/// `..` as last components are EINVAL; a parent on a kernel file system EPERM.
fn parent_of(root: &OwnedFd, path: &[u8]) -> Result<(OwnedFd, CString), Errno> {
    let (dir, name): (&[u8], &[u8]) = match path.iter().rposition(|&b| b == b'/') {
        Some(0) => (b"/", &path[1..]),
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (b"/", path),
    };
    match name {
        b"" => return Err(Errno(libc::EBUSY)),
        b"." | b".." => return Err(Errno(libc::EINVAL)),
        _ => {}
    }
    let parent = files::open_in_root(root, dir, libc::O_PATH | libc::O_DIRECTORY)?;
    if files::is_kernel_fs(files::fs_type(&parent)?) {
        return Err(Errno(libc::EPERM));
    }
    Ok((parent, CString::new(name).map_err(|_| Errno(libc::EINVAL))?))
}

/// `renameat2` inside the root. `RENAME_WHITEOUT` (an overlay file system's own) is EINVAL.
pub fn rename(root: &OwnedFd, from: &[u8], to: &[u8], flags: u32) -> Result<(), Errno> {
    const RENAME_WHITEOUT: u32 = 1 << 2;
    if flags & RENAME_WHITEOUT != 0 {
        return Err(Errno(libc::EINVAL));
    }
    let (from_dir, from_name) = parent_of(root, from)?;
    let (to_dir, to_name) = parent_of(root, to)?;
    let flags = nix::fcntl::RenameFlags::from_bits_retain(flags);
    nix::fcntl::renameat2(&from_dir, from_name.as_c_str(), &to_dir, to_name.as_c_str(), flags)
        .map_err(files::nix_errno)
}

/// `unlink`, or `rmdir` with `dir`.
pub fn unlink(root: &OwnedFd, path: &[u8], dir: bool) -> Result<(), Errno> {
    let (parent, name) = parent_of(root, path)?;
    use nix::unistd::UnlinkatFlags;
    let flags = if dir { UnlinkatFlags::RemoveDir } else { UnlinkatFlags::NoRemoveDir };
    nix::unistd::unlinkat(&parent, name.as_c_str(), flags).map_err(files::nix_errno)
}

/// `mkdir` (the calling thread's umask applies).
pub fn make_dir(root: &OwnedFd, path: &[u8], mode: u32) -> Result<(), Errno> {
    let (parent, name) = parent_of(root, path)?;
    let mode = nix::sys::stat::Mode::from_bits_truncate(mode & 0o7777);
    nix::sys::stat::mkdirat(&parent, name.as_c_str(), mode).map_err(files::nix_errno)
}

/// `symlink(target, path)`: the link's text is stored as given; it is resolved, inside the
/// root, only when a later request follows it.
pub fn symlink(root: &OwnedFd, target: &[u8], path: &[u8]) -> Result<(), Errno> {
    if target.is_empty() {
        return Err(Errno(libc::ENOENT));
    }
    let target = CString::new(target).map_err(|_| Errno(libc::EINVAL))?;
    let (parent, name) = parent_of(root, path)?;
    nix::unistd::symlinkat(target.as_c_str(), &parent, name.as_c_str()).map_err(files::nix_errno)
}

/// `truncate(path, len)` of a regular file (write permission needed, as for the app).
pub fn truncate(root: &OwnedFd, path: &[u8], len: u64) -> Result<(), Errno> {
    if len > i64::MAX as u64 {
        return Err(Errno(libc::EINVAL));
    }
    let located = files::open_in_root(root, path, libc::O_PATH)?;
    let st = check_writable(&located)?;
    reopen(&located, &st, libc::O_WRONLY)?.set_len(len).map_err(io_errno)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_root(name: &str) -> (std::path::PathBuf, OwnedFd) {
        let dir = std::env::temp_dir().join(format!("kmirror-agent-writes-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let root = nix::fcntl::open(
            dir.as_path(),
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        (dir, root)
    }

    const CREATE: u32 = (libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC) as u32;

    #[test]
    fn create_write_truncate_append_rename_remove() {
        let (dir, root) = temp_root("cycle");
        let handles = SharedHandles::default();
        let opened = open_write(&handles, &root, b"/data/new.txt", CREATE, 0o640).unwrap();
        assert_eq!((opened.stat.size, opened.bytes.len(), opened.more), (0, 0, false));
        assert_eq!(write_handle(&handles, opened.handle, 0, b"hello world").unwrap(), 11);
        truncate_handle(&handles, opened.handle, 5).unwrap();
        sync_handle(&handles, opened.handle, false).unwrap();
        Handles::close(&handles, opened.handle).unwrap();
        assert_eq!(std::fs::read(dir.join("data/new.txt")).unwrap(), b"hello");
        let mode = std::fs::metadata(dir.join("data/new.txt")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640 & !current_umask(), "mode under the thread's umask");
        // In place: the content comes with the handle; an append handle writes at the end.
        let rw = open_write(&handles, &root, b"/data/new.txt", libc::O_WRONLY as u32, 0).unwrap();
        assert_eq!(rw.bytes, b"hello");
        Handles::close(&handles, rw.handle).unwrap();
        let append = (libc::O_WRONLY | libc::O_APPEND) as u32;
        let app = open_write(&handles, &root, b"/data/new.txt", append, 0).unwrap();
        assert!(app.bytes.is_empty(), "a write-only append needs no content");
        write_handle(&handles, app.handle, 0, b" again").unwrap();
        Handles::close(&handles, app.handle).unwrap();
        assert_eq!(std::fs::read(dir.join("data/new.txt")).unwrap(), b"hello again");
        let excl = (libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL) as u32;
        assert_eq!(
            open_write(&handles, &root, b"/data/new.txt", excl, 0o600).err(),
            Some(Errno(libc::EEXIST))
        );
        rename(&root, b"/data/new.txt", b"/data/renamed.txt", 0).unwrap();
        assert!(!dir.join("data/new.txt").exists());
        std::fs::write(dir.join("data/other"), b"o").unwrap();
        assert_eq!(rename(&root, b"/data/renamed.txt", b"/data/other", 1), Err(Errno(libc::EEXIST)));
        truncate(&root, b"/data/renamed.txt", 2).unwrap();
        assert_eq!(std::fs::read(dir.join("data/renamed.txt")).unwrap(), b"he");
        make_dir(&root, b"/data/d", 0o777).unwrap();
        assert_eq!(unlink(&root, b"/data/d", false), Err(Errno(libc::EISDIR)));
        unlink(&root, b"/data/d", true).unwrap();
        symlink(&root, b"renamed.txt", b"/data/l").unwrap();
        assert_eq!(std::fs::read_link(dir.join("data/l")).unwrap(), std::path::Path::new("renamed.txt"));
        unlink(&root, b"/data/l", false).unwrap();
        unlink(&root, b"/data/renamed.txt", false).unwrap();
        assert_eq!(unlink(&root, b"/data/renamed.txt", false), Err(Errno(libc::ENOENT)));
        assert_eq!(unlink(&root, b"/", true), Err(Errno(libc::EBUSY)));
        assert_eq!(
            open_write(&handles, &root, b"/data", libc::O_WRONLY as u32, 0).err(),
            Some(Errno(libc::EISDIR))
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn current_umask() -> u32 {
        let mask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
        nix::sys::stat::umask(mask);
        mask.bits()
    }

    /// Symlinks of the pod, absolute or climbing, keep every write inside its root; devices,
    /// FIFOs and kernel files are never opened for writing.
    #[test]
    fn writes_stay_inside_the_root_and_off_special_files() {
        let (dir, root) = temp_root("escape");
        let host = std::env::temp_dir().join(format!("kmirror-writes-host-only-{}", std::process::id()));
        let _ = std::fs::remove_file(&host);
        std::fs::create_dir_all(dir.join(host.parent().unwrap().strip_prefix("/").unwrap())).unwrap();
        std::os::unix::fs::symlink(&host, dir.join("data/abs")).unwrap();
        std::os::unix::fs::symlink(format!("../../../../../..{}", host.display()), dir.join("data/rel"))
            .unwrap();
        let handles = SharedHandles::default();
        for link in [&b"/data/abs"[..], b"/data/rel"] {
            let opened = open_write(&handles, &root, link, CREATE, 0o644).unwrap();
            write_handle(&handles, opened.handle, 0, b"x").unwrap();
            Handles::close(&handles, opened.handle).unwrap();
        }
        assert!(!host.exists(), "a pod symlink made a write land on the host");
        assert_eq!(std::fs::read(dir.join(host.strip_prefix("/").unwrap())).unwrap(), b"x");
        let nofollow = CREATE | libc::O_NOFOLLOW as u32;
        assert_eq!(open_write(&handles, &root, b"/data/abs", nofollow, 0).err(), Some(Errno(libc::ELOOP)));
        nix::unistd::mkfifo(&dir.join("data/fifo"), nix::sys::stat::Mode::from_bits_truncate(0o666)).unwrap();
        assert_eq!(open_write(&handles, &root, b"/data/fifo", CREATE, 0).err(), Some(Errno(libc::ENXIO)));
        assert_eq!(truncate(&root, b"/data/fifo", 0), Err(Errno(libc::ENXIO)));
        let real_root = nix::fcntl::open(
            "/",
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        let append = (libc::O_WRONLY | libc::O_APPEND) as u32;
        assert_eq!(open_write(&handles, &real_root, b"/dev/null", append, 0).err(), Some(Errno(libc::ENXIO)));
        assert_eq!(
            open_write(&handles, &real_root, b"/proc/sys/kernel/hostname", append, 0).err(),
            Some(Errno(libc::ENXIO))
        );
        assert_eq!(make_dir(&real_root, b"/proc/kmirror-test", 0o755), Err(Errno(libc::EPERM)));
        assert_eq!(Handles::len(&handles), 0, "no handle of a refused open is left");
        let _ = std::fs::remove_file(&host);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A creation through a dangling symlink creates its target, inside the root, as open(2)
    /// does; with O_EXCL it is EEXIST.
    #[test]
    fn a_dangling_symlink_is_followed_to_create_its_target() {
        let (dir, root) = temp_root("dangling");
        std::os::unix::fs::symlink("target", dir.join("data/link")).unwrap();
        let handles = SharedHandles::default();
        let excl = (libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL) as u32;
        assert_eq!(open_write(&handles, &root, b"/data/link", excl, 0o600).err(), Some(Errno(libc::EEXIST)));
        let opened = open_write(&handles, &root, b"/data/link", CREATE, 0o600).unwrap();
        Handles::close(&handles, opened.handle).unwrap();
        assert!(dir.join("data/target").is_file());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
