//! Stand-ins: the local nodes behind the app's `O_PATH` descriptors of pod files.
//!
//! An `O_PATH` descriptor names a file without opening it: no content is read (a FIFO is not
//! released, a device not opened, a file of any size is fine), `read` gives EBADF, and what
//! the app does with it is ask about the file (`fstat`, `fstatat(fd, "", AT_EMPTY_PATH)`,
//! `readlinkat(fd, "")`), look up names relative to it, or open it again through its
//! `/proc/self/fd/N` link.
//!
//! The seccomp notifier cannot hand out an `O_PATH` descriptor (`SECCOMP_IOCTL_NOTIF_ADDFD`
//! takes its source with `fget`, which refuses them: EBADF). So the app gets a descriptor of a
//! local node that opens without effects and is dressed with the pod file's metadata: mode,
//! owner, size (a sparse file: no content, no memory), access and modification times.
//! - a regular file (also for a pod file the node cannot be: a device, a socket, or the
//!   symlink itself under `O_NOFOLLOW`) is opened with access mode 3, "neither read nor
//!   write": `read` and `write` give EBADF, as on an `O_PATH` descriptor;
//! - a directory is an empty directory opened read-only (`read` is EISDIR, `getdents` lists
//!   nothing, where an `O_PATH` descriptor gives EBADF);
//! - a FIFO is a FIFO of its own opened with `O_RDONLY | O_NONBLOCK` (no writer: `read` is
//!   end of file).
//!
//! Each node lives at the pod path inside a private tree (`<scratch>/path/<pod path>`; nodes
//! standing for a symlink itself in `<scratch>/link/<pod path>`; mode 0700), so the
//! descriptor's link names the pod path: the calls that ask about the descriptor and are
//! trapped (`fstatat`/`statx` with `AT_EMPTY_PATH`, `readlinkat(fd, "")`), lookups relative to
//! it and opens through its `/proc` link are answered from the pod
//! (`FilePolicy::pod_file_of_fd_link`), never from the empty node. A bare `fstat` system call
//! (Go's) is not trapped and sees the dressed node: its type (a regular file for a device,
//! socket or symlink), inode, change time and link count are the node's own; without root
//! the owner stays kmirror's. Regular nodes never carry the set-user-ID or set-group-ID bit.

use kmirror_protocol::{FileStat, Timestamp};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub struct StandIns {
    /// `<scratch>/path`: what the pod's paths lead to.
    root: PathBuf,
    /// `<scratch>/link`: the pod's symlinks themselves (`O_PATH | O_NOFOLLOW`).
    links: PathBuf,
    /// `<scratch>/path-new`: nodes are made and dressed here, then renamed into place, so a
    /// node appears whole and concurrent opens of one path never dress each other's node.
    spare: PathBuf,
    next: AtomicU64,
    /// The app was given a descriptor that stands for a pod file (a stand-in, a listed
    /// directory): until then no descriptor needs looking up (libc's every `fstat` is trapped).
    handed_out: AtomicBool,
}

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl StandIns {
    /// Creates the private trees below the session's scratch directory.
    pub fn create(scratch: &Path) -> io::Result<StandIns> {
        let (root, links, spare) = (scratch.join("path"), scratch.join("link"), scratch.join("path-new"));
        for dir in [&root, &links, &spare] {
            // 0700: other users of the machine must not reach (or plant anything in) nodes
            // that carry a pod file's owner.
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(StandIns { root, links, spare, next: AtomicU64::new(0), handed_out: AtomicBool::new(false) })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn links(&self) -> &Path {
        &self.links
    }

    /// Notes that a descriptor standing for a pod file is about to reach the app.
    pub fn note_handed_out(&self) {
        self.handed_out.store(true, Ordering::Relaxed);
    }

    /// Whether any descriptor of the app may stand for a pod file.
    pub fn any_handed_out(&self) -> bool {
        self.handed_out.load(Ordering::Relaxed)
    }

    /// A descriptor of a node standing for the pod file at `path` (absolute, normalised) whose
    /// metadata is `st` (a symlink's own when `st` says so: the node then stands for the
    /// symlink itself).
    pub fn make(&self, path: &[u8], st: &FileStat) -> Result<OwnedFd, i32> {
        self.note_handed_out();
        let parts: Vec<&[u8]> = path.split(|&b| b == b'/').filter(|p| !p.is_empty()).collect();
        if parts.iter().any(|p| matches!(*p, b"." | b"..")) {
            return Err(libc::EINVAL);
        }
        let kind = st.mode & libc::S_IFMT;
        let mut local = if kind == libc::S_IFLNK { self.links.clone() } else { self.root.clone() };
        for part in &parts[..parts.len().saturating_sub(1)] {
            local.push(std::ffi::OsStr::from_bytes(part));
            ensure_dir(&local)?;
        }
        if let Some(name) = parts.last() {
            local.push(std::ffi::OsStr::from_bytes(name));
        }
        if kind == libc::S_IFDIR {
            ensure_dir(&local)?;
            dress(&local, st, kind);
            return open(&local, libc::O_RDONLY | libc::O_DIRECTORY);
        }
        let fresh = self.spare.join(self.next.fetch_add(1, Ordering::Relaxed).to_string());
        let made = make_node(&fresh, st, kind).and_then(|flags| {
            // Opened before it is dressed: a mode without write permission must not stop it.
            let fd = open(&fresh, flags)?;
            dress(&fresh, st, kind);
            if std::fs::symlink_metadata(&local).is_ok_and(|m| m.is_dir()) {
                let _ = std::fs::remove_dir_all(&local);
            }
            std::fs::rename(&fresh, &local).map_err(|e| errno_of(&e))?;
            Ok(fd)
        });
        if made.is_err() {
            let _ = std::fs::remove_file(&fresh);
        }
        made
    }
}

/// Makes `path` a directory, replacing a node of another kind (an earlier stand-in).
fn ensure_dir(path: &Path) -> Result<(), i32> {
    for _ in 0..3 {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => return Ok(()),
            Ok(_) => {
                let _ = std::fs::remove_file(path);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(errno_of(&e)),
        }
        match std::fs::DirBuilder::new().mode(0o755).create(path) {
            Ok(()) => return Ok(()),
            // A concurrent stand-in made it (or something else): look again.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(errno_of(&e)),
        }
    }
    Err(libc::EIO)
}

/// "Neither read nor write": the descriptor is for fstat and the like only.
const NO_ACCESS: i32 = libc::O_ACCMODE;

/// Makes the node standing for a pod file of `kind` and returns the flags to open it with.
fn make_node(path: &Path, st: &FileStat, kind: u32) -> Result<i32, i32> {
    if kind == libc::S_IFIFO {
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_retain(0o600)).map_err(|e| e as i32)?;
        return Ok(libc::O_RDONLY | libc::O_NONBLOCK);
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| errno_of(&e))?;
    // Sparse: the size costs no space. A size this file system cannot hold stays smaller.
    let _ = file.set_len(st.size.max(0) as u64);
    Ok(NO_ACCESS)
}

/// Gives a node the pod file's owner, mode and times, as far as this side may.
fn dress(path: &Path, st: &FileStat, kind: u32) {
    use nix::sys::stat::{FchmodatFlags, Mode, UtimensatFlags};
    use nix::unistd::{Gid, Uid};
    // Owner first: chown clears the set-ID bits the mode may then set. lchown does not follow
    // a symlink.
    let _ = nix::unistd::fchownat(
        nix::fcntl::AT_FDCWD,
        path,
        Some(Uid::from_raw(st.uid)),
        Some(Gid::from_raw(st.gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    );
    let mut mode = st.mode & 0o7777;
    if kind != libc::S_IFDIR && kind != libc::S_IFIFO {
        mode &= !(libc::S_ISUID | libc::S_ISGID);
    }
    if kind == libc::S_IFDIR && !nix::unistd::geteuid().is_root() {
        mode |= 0o700;
    }
    let _ = nix::sys::stat::fchmodat(
        nix::fcntl::AT_FDCWD,
        path,
        Mode::from_bits_retain(mode),
        FchmodatFlags::FollowSymlink,
    );
    let ts = |t: &Timestamp| nix::sys::time::TimeSpec::new(t.sec, t.nsec.into());
    let _ = nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &ts(&st.atime),
        &ts(&st.mtime),
        UtimensatFlags::NoFollowSymlink,
    );
}

fn open(path: &Path, flags: i32) -> Result<OwnedFd, i32> {
    use nix::fcntl::OFlag;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NOFOLLOW | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    nix::fcntl::open(path, flags, nix::sys::stat::Mode::empty()).map_err(|e| e as i32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;

    fn stat_of(mode: u32, size: i64) -> FileStat {
        let t = |sec| Timestamp { sec, nsec: 250 };
        FileStat {
            dev: 1,
            ino: 2,
            mode,
            nlink: 1,
            uid: 1234,
            gid: 1235,
            rdev: 0x0103,
            size,
            blksize: 4096,
            blocks: 0,
            atime: t(1_500_000_000),
            mtime: t(1_600_000_000),
            ctime: t(1_600_000_001),
        }
    }

    fn fstat(fd: &OwnedFd) -> libc::stat {
        nix::sys::stat::fstat(fd).unwrap()
    }

    /// Each kind of pod file gets a node with the pod's metadata, at the pod path, opened so
    /// that it reads nothing; a node of another kind at that path (an earlier stand-in) is
    /// replaced.
    #[test]
    fn nodes_stand_for_pod_files_with_their_metadata() {
        let scratch = std::env::temp_dir().join(format!("kmirror-standin-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        let standins = StandIns::create(&scratch).unwrap();
        assert_eq!(std::fs::metadata(standins.root()).unwrap().mode() & 0o7777, 0o700);
        let big = 300 << 20;
        let fd = standins.make(b"/data/big", &stat_of(libc::S_IFREG | 0o4440, big)).unwrap();
        let st = fstat(&fd);
        assert_eq!(st.st_mode, libc::S_IFREG | 0o440, "set-user-ID dropped; opened despite no write bit");
        assert_eq!((st.st_uid, st.st_gid, st.st_size), (1234, 1235, big));
        assert_eq!((st.st_atime, st.st_mtime, st.st_mtime_nsec), (1_500_000_000, 1_600_000_000, 250));
        assert!(st.st_blocks < 8, "sparse: {} blocks", st.st_blocks);
        let mut buf = [0u8; 1];
        assert_eq!(nix::unistd::read(&fd, &mut buf), Err(nix::errno::Errno::EBADF));
        assert_eq!(nix::unistd::write(&fd, &buf), Err(nix::errno::Errno::EBADF));
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        assert_eq!(link, standins.root().join("data/big"));

        let fd = standins.make(b"/data/big", &stat_of(libc::S_IFLNK | 0o777, 9)).unwrap();
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        assert_eq!(link, standins.links().join("data/big"), "the symlink itself has a tree of its own");
        let fd = standins.make(b"/data/fifo", &stat_of(libc::S_IFIFO | 0o644, 0)).unwrap();
        assert_eq!(fstat(&fd).st_mode, libc::S_IFIFO | 0o644);
        let fd = standins.make(b"/data/null", &stat_of(libc::S_IFCHR | 0o666, 0)).unwrap();
        assert_eq!(fstat(&fd).st_mode, libc::S_IFREG | 0o666, "no device node is ever made");
        // A directory where a file stood, then a file below it.
        let fd = standins.make(b"/data/big", &stat_of(libc::S_IFDIR | 0o750, 4096)).unwrap();
        assert_eq!(fstat(&fd).st_mode, libc::S_IFDIR | 0o750);
        standins.make(b"/data/big/inner", &stat_of(libc::S_IFREG | 0o600, 5)).unwrap();
        assert_eq!(std::fs::metadata(standins.root().join("data/big/inner")).unwrap().len(), 5);
        assert_eq!(standins.make(b"/data/../x", &stat_of(libc::S_IFREG, 0)).err(), Some(libc::EINVAL));
        assert_eq!(std::fs::read_dir(scratch.join("path-new")).unwrap().count(), 0, "nothing left behind");
        std::fs::remove_dir_all(&scratch).unwrap();
    }
}
