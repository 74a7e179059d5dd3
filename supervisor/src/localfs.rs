//! File operations kmirror performs locally on the app's behalf, for paths the local kernel
//! could not resolve from the raw argument (it steps out of a pod directory; see
//! `policy::walk`). Each runs with the calling thread's credentials and umask
//! ([`crate::caller::run_as`]), inside the app's root directory, with `/proc/self` meaning the
//! app: kmirror must never reach what the app itself could not.

use crate::caller::{Caller, Creates, run_as};
use crate::policy::walk::Node;
use kmirror_protocol::FileStat;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use libc::RESOLVE_IN_ROOT;

/// Where the app's absolute paths start: its root directory, when it is not kmirror's.
struct AppRoot(Option<OwnedFd>);

impl AppRoot {
    fn of(caller: &Caller) -> Result<AppRoot, i32> {
        let same = |what: &str| -> Result<bool, i32> {
            let theirs =
                std::fs::metadata(format!("/proc/{}/{what}", caller.tid)).map_err(|e| errno_of(&e))?;
            let ours = std::fs::metadata(format!("/proc/self/{what}")).map_err(|e| errno_of(&e))?;
            use std::os::unix::fs::MetadataExt;
            Ok((theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()))
        };
        if same("root")? && same("ns/mnt")? {
            return Ok(AppRoot(None));
        }
        let path = format!("/proc/{}/root", caller.tid);
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        Ok(AppRoot(Some(nix::fcntl::open(path.as_str(), flags, Mode::empty()).map_err(|e| e as i32)?)))
    }

    /// The directory descriptor and resolve flags that make an absolute path start at the root.
    fn base(&self) -> (BorrowedFd<'_>, u64) {
        match &self.0 {
            None => (nix::fcntl::AT_FDCWD, 0),
            Some(root) => (root.as_fd(), RESOLVE_IN_ROOT),
        }
    }
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// `/proc/self` and `/proc/thread-self` name the app's process and thread, not kmirror's.
fn as_app_path(caller: &Caller, path: &[u8]) -> Result<CString, i32> {
    let rewritten = if let Some(rest) = strip_dir(path, b"/proc/self") {
        [format!("/proc/{}", caller.tgid).as_bytes(), rest].concat()
    } else if let Some(rest) = strip_dir(path, b"/proc/thread-self") {
        [format!("/proc/{}/task/{}", caller.tgid, caller.tid).as_bytes(), rest].concat()
    } else {
        path.to_vec()
    };
    CString::new(rewritten).map_err(|_| libc::EINVAL)
}

fn strip_dir<'a>(path: &'a [u8], dir: &[u8]) -> Option<&'a [u8]> {
    let rest = path.strip_prefix(dir)?;
    (rest.is_empty() || rest[0] == b'/').then_some(rest)
}

fn openat2(
    dirfd: BorrowedFd<'_>,
    path: &CString,
    flags: i32,
    mode: u32,
    resolve: u64,
) -> Result<OwnedFd, i32> {
    let creates = flags & libc::O_CREAT != 0 || flags & libc::O_TMPFILE == libc::O_TMPFILE;
    let how = || {
        OpenHow::new()
            .flags(OFlag::from_bits_retain(flags | libc::O_CLOEXEC))
            .mode(Mode::from_bits_retain(if creates { mode & 0o7777 } else { 0 }))
            .resolve(ResolveFlag::from_bits_retain(resolve))
    };
    loop {
        match nix::fcntl::openat2(dirfd, path.as_c_str(), how()) {
            Ok(fd) => return Ok(fd),
            // RESOLVE_IN_ROOT asks to retry when a concurrent rename raced the lookup.
            Err(nix::errno::Errno::EAGAIN) if resolve & RESOLVE_IN_ROOT != 0 => continue,
            Err(errno) => return Err(errno as i32),
        }
    }
}

/// Whether the kernel accepts openat2's `how`, as the app passed it (all its bytes). The
/// kernel judges `how` before it reads the path, so an empty path asks exactly that, with no
/// lookup: ENOENT means accepted; otherwise the kernel's own refusal (EINVAL for unknown or
/// contradictory flags and for a mode without O_CREAT, E2BIG for non-zero bytes it does not
/// know, EAGAIN for RESOLVE_CACHED with O_CREAT). No copy of the kernel's rules to go stale.
pub fn check_open_how(how: &[u8]) -> Result<(), i32> {
    crate::sys::openat2_empty_path(how).map(drop)
}

/// Opens `path` as the app would, with its open flags and its openat2 `resolve` flags.
pub fn open(caller: &Caller, path: &[u8], flags: i32, mode: u32, resolve: u64) -> Result<OwnedFd, i32> {
    let creates =
        if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 { Creates::Files } else { Creates::Nothing };
    let root = AppRoot::of(caller)?;
    let path = as_app_path(caller, path)?;
    let (dirfd, in_root) = root.base();
    // Flags openat2 rejects but open(2) ignores (unknown bits) would turn into EINVAL: keep to
    // the flags open(2) defines.
    let flags = match flags & VALID_OPEN_FLAGS {
        // With O_PATH open(2) ignores every flag but these; openat2 would refuse the others.
        f if f & libc::O_PATH != 0 => {
            f & (libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        }
        f => f,
    };
    run_as(&caller.credentials, creates, || openat2(dirfd, &path, flags, mode, resolve | in_root))?
}

const VALID_OPEN_FLAGS: i32 = libc::O_ACCMODE
    | libc::O_CREAT
    | libc::O_EXCL
    | libc::O_NOCTTY
    | libc::O_TRUNC
    | libc::O_APPEND
    | libc::O_NONBLOCK
    | libc::O_DSYNC
    | libc::O_ASYNC
    | libc::O_DIRECT
    | libc::O_LARGEFILE
    | libc::O_DIRECTORY
    | libc::O_NOFOLLOW
    | libc::O_NOATIME
    | libc::O_CLOEXEC
    | libc::O_SYNC
    | libc::O_PATH
    | libc::O_TMPFILE;

/// An O_PATH descriptor of `path` opened as the app, for the calls that act on one.
fn locate(caller: &Caller, path: &[u8], follow: bool) -> Result<(OwnedFd, AppRoot), i32> {
    let root = AppRoot::of(caller)?;
    let c_path = as_app_path(caller, path)?;
    let (dirfd, in_root) = root.base();
    let flags = libc::O_PATH | if follow { 0 } else { libc::O_NOFOLLOW };
    let fd = run_as(&caller.credentials, Creates::Nothing, || openat2(dirfd, &c_path, flags, 0, in_root))??;
    Ok((fd, root))
}

fn fstat_of(fd: &OwnedFd) -> Result<libc::stat, i32> {
    // An empty path with AT_EMPTY_PATH describes the descriptor itself.
    nix::sys::stat::fstatat(fd, c"", nix::fcntl::AtFlags::AT_EMPTY_PATH).map_err(|e| e as i32)
}

pub fn stat(caller: &Caller, path: &[u8], follow: bool) -> Result<FileStat, i32> {
    let (fd, _) = locate(caller, path, follow)?;
    Ok(FileStat::from(&fstat_of(&fd)?))
}

/// `faccessat2` as the app: `flags` may hold AT_EACCESS (check with the effective ids, as
/// `access(2)` does not) and AT_SYMLINK_NOFOLLOW.
pub fn access(caller: &Caller, path: &[u8], mode: u32, flags: i32) -> Result<(), i32> {
    let (fd, _) = locate(caller, path, flags & libc::AT_SYMLINK_NOFOLLOW == 0)?;
    let creds = if flags & libc::AT_EACCESS != 0 {
        caller.credentials.clone()
    } else {
        caller.credentials.for_real_id_check()
    };
    // This thread carries the credentials to check with, so AT_EACCESS uses exactly them.
    run_as(&creds, Creates::Nothing, || crate::sys::access_fd(fd.as_fd(), mode, libc::AT_EACCESS))?
}

fn read_link_of(fd: &OwnedFd) -> Result<Vec<u8>, i32> {
    use std::os::unix::ffi::OsStringExt;
    // An empty path reads the link an O_PATH|O_NOFOLLOW descriptor refers to.
    match nix::fcntl::readlinkat(fd, c"") {
        Ok(target) => Ok(target.into_vec()),
        // Not a symlink: readlinkat on an empty path says ENOENT where readlink(2) says EINVAL.
        Err(nix::errno::Errno::ENOENT) => Err(libc::EINVAL),
        Err(errno) => Err(errno as i32),
    }
}

pub fn read_link(caller: &Caller, path: &[u8]) -> Result<Vec<u8>, i32> {
    let (fd, _) = locate(caller, path, false)?;
    read_link_of(&fd)
}

/// An extended attribute call's answer: the size asked for (a zero-sized buffer), or the bytes.
pub enum Xattr {
    Size(usize),
    Bytes(Vec<u8>),
}

/// `getxattr` (with `name`) or `listxattr` (without) of `path` as the app, for a buffer of
/// `size` bytes (0 asks for the size).
pub fn xattr(
    caller: &Caller,
    path: &[u8],
    follow: bool,
    name: Option<&[u8]>,
    size: usize,
) -> Result<Xattr, i32> {
    let (fd, _) = locate(caller, path, follow)?;
    // The *xattr calls take no O_PATH descriptor, but its /proc magic link names the same file.
    let by_fd = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL");
    let name = name.map(|n| CString::new(n).map_err(|_| libc::EINVAL)).transpose()?;
    let mut buf = vec![0u8; size.min(XATTR_SIZE_MAX)];
    run_as(&caller.credentials, Creates::Nothing, || {
        // An empty buffer (size 0) asks for the size. The `l` variants do not follow the magic
        // link's own target a second time: the O_PATH descriptor already is the file.
        let n = crate::sys::xattr(&by_fd, name.as_deref(), &mut buf)?;
        Ok(if size == 0 {
            Xattr::Size(n as usize)
        } else {
            buf.truncate(n as usize);
            Xattr::Bytes(std::mem::take(&mut buf))
        })
    })?
}

const XATTR_SIZE_MAX: usize = 65536;

/// What `path` is, for a walk (`policy::walk`): found as the app would find it.
pub fn lookup(caller: &Caller, path: &[u8]) -> Result<Node, i32> {
    let (fd, _) = locate(caller, path, false)?;
    Ok(match fstat_of(&fd)?.st_mode & libc::S_IFMT {
        libc::S_IFDIR => Node::Dir,
        libc::S_IFLNK => Node::Symlink(read_link_of(&fd)?),
        _ => Node::NotDir,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Caller {
        Caller::of_thread(nix::unistd::gettid().as_raw() as u32).unwrap()
    }

    fn nobody() -> Caller {
        let mut caller = me();
        caller.credentials.uids = [65534; 4];
        caller.credentials.gids = [65534; 4];
        caller.credentials.groups.clear();
        caller.credentials.cap_effective = 0;
        caller
    }

    #[test]
    fn operations_check_the_callers_rights_not_kmirrors() {
        assert_eq!(me().credentials.uids[3], 0, "run the tests as root");
        assert!(open(&me(), b"/etc/shadow", libc::O_RDONLY, 0, 0).is_ok());
        assert_eq!(open(&nobody(), b"/etc/shadow", libc::O_RDONLY, 0, 0).err(), Some(libc::EACCES));
        assert_eq!(access(&nobody(), b"/etc/shadow", libc::R_OK as u32, 0), Err(libc::EACCES));
        assert_eq!(access(&nobody(), b"/etc/passwd", libc::R_OK as u32, 0), Ok(()));
        assert_eq!(access(&nobody(), b"/etc/passwd", libc::W_OK as u32, 0), Err(libc::EACCES));
        let dir = std::env::temp_dir().join(format!("kmirror-localfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("created");
        let target_bytes = target.as_os_str().as_encoded_bytes();
        let creat = libc::O_WRONLY | libc::O_CREAT;
        assert_eq!(open(&nobody(), target_bytes, creat, 0o644, 0).err(), Some(libc::EACCES));
        assert!(!target.exists(), "nothing is created where the caller may not write");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The kernel itself judges openat2's `how`: what it accepts and what it refuses, with its
    /// errno, and nothing is looked up or created on the way.
    #[test]
    fn the_kernel_judges_open_how() {
        let how = |flags: i32, mode: u64, resolve: u64, extra: &[u8]| {
            let mut bytes =
                [(flags as u64).to_ne_bytes(), mode.to_ne_bytes(), resolve.to_ne_bytes()].concat();
            bytes.extend_from_slice(extra);
            check_open_how(&bytes)
        };
        assert_eq!(how(libc::O_RDONLY, 0, 0, &[]), Ok(()));
        assert_eq!(
            how(libc::O_RDONLY, 0, libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_BENEATH, &[0; 8]),
            Ok(())
        );
        assert_eq!(how(libc::O_RDONLY, 0, 0, &[0, 0, 1, 0, 0, 0, 0, 0]), Err(libc::E2BIG));
        assert_eq!(how(libc::O_RDONLY, 0o644, 0, &[]), Err(libc::EINVAL), "a mode without O_CREAT");
        assert_eq!(how(libc::O_CREAT | libc::O_WRONLY, 0o644, 0, &[]), Ok(()));
        assert_eq!(how(libc::O_CREAT | libc::O_WRONLY, 0o10644, 0, &[]), Err(libc::EINVAL));
        assert_eq!(how(libc::O_RDONLY, 0, 0x40, &[]), Err(libc::EINVAL), "an unknown resolve bit");
        let scopes = libc::RESOLVE_BENEATH | libc::RESOLVE_IN_ROOT;
        assert_eq!(how(libc::O_RDONLY, 0, scopes, &[]), Err(libc::EINVAL));
        assert_eq!(how(libc::O_PATH | libc::O_RDWR, 0, 0, &[]), Err(libc::EINVAL));
        assert_eq!(how(libc::O_CREAT | libc::O_WRONLY, 0, libc::RESOLVE_CACHED, &[]), Err(libc::EAGAIN));
    }

    #[test]
    fn proc_self_names_the_caller_and_openat2_flags_hold() {
        let mut sleeper = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let other = Caller::of_thread(sleeper.id()).unwrap();
        let exe = read_link(&other, b"/proc/self/exe");
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        assert!(exe.unwrap().ends_with(b"/sleep"), "/proc/self is the caller's process");
        let caller = me();
        assert_eq!(as_app_path(&caller, b"/proc/selfish").unwrap().as_bytes(), b"/proc/selfish");
        // /proc/self/exe is a symlink: refused under RESOLVE_NO_SYMLINKS, as the kernel would.
        let no_symlinks = open(&caller, b"/proc/self/exe", libc::O_RDONLY, 0, libc::RESOLVE_NO_SYMLINKS);
        assert_eq!(no_symlinks.err(), Some(libc::ELOOP));
        assert_eq!(lookup(&caller, b"/proc/self/exe").map(|n| matches!(n, Node::Symlink(_))), Ok(true));
        assert_eq!(lookup(&caller, b"/etc"), Ok(Node::Dir));
        assert_eq!(lookup(&caller, b"/etc/passwd"), Ok(Node::NotDir));
        assert_eq!(stat(&caller, b"/etc/passwd/x", true).err(), Some(libc::ENOTDIR));
        assert_eq!(read_link(&caller, b"/etc/passwd").err(), Some(libc::EINVAL));
        let path_only = open(&caller, b"/etc/passwd", libc::O_PATH | libc::O_RDWR | libc::O_NOCTTY, 0, 0);
        assert!(path_only.is_ok(), "O_PATH ignores other flags, as open(2) does: {path_only:?}");
    }
}
