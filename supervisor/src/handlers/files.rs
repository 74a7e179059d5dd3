//! The file family: `open`/`openat`/`openat2`, the `stat` family, `access`/`faccessat(2)`,
//! `readlink(at)`.
//!
//! Remote regular files are fetched once per open and handed to the app as a sealed, read-only
//! memfd; remote directories are mirrored as a local directory of placeholder entries (same
//! names and types) so `getdents` works, and lookups relative to such a directory map back to
//! the pod. Metadata calls are answered with the pod's own `stat` data.

use super::{Context, answer, tunnel_errno};
use crate::caller::Caller;
use crate::policy::files::{self, FileRoute, VirtualFile};
use crate::policy::walk::{self, Node, Scope};
use crate::seccomp::Notification;
use crate::{abi, localfs, tracee};
use kmirror_protocol::{DirEntry, FileStat, Request, Response};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

/// Remote files larger than this are refused (EFBIG) rather than copied into memory.
const MAX_REMOTE_FILE: u64 = 256 << 20;
/// Pod directories with more entries than this are refused (EFBIG) rather than mirrored.
const MAX_DIR_ENTRIES: usize = 1 << 20;
/// Fetches and listings that may hold an agent handle at once: the agent refuses more than
/// 64 handles per session (EMFILE), so more concurrent opens of the app wait here instead.
/// (One session per process: a static is that session's.)
static HANDLE_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(32);
const READ_CHUNK: u32 = 512 * 1024;
const PATH_MAX: usize = libc::PATH_MAX as usize;
const XATTR_NAME_MAX: usize = 255;

/// How a call's path argument is served.
enum Plan {
    /// The kernel handles the call as made.
    Local,
    /// kmirror performs the call locally on this resolved path, as the app.
    LocalAt(Vec<u8>),
    Virtual(VirtualFile),
    Remote(Vec<u8>),
}

/// A trapped call's path argument.
#[derive(Clone, Copy)]
struct PathArg {
    dirfd: i32,
    ptr: u64,
    /// The call may modify (then the path is local: writes never reach the pod).
    write: bool,
    /// openat2's `resolve` flags (0 for other calls).
    resolve: u64,
}

/// Where a path argument leads, as far as its text tells.
enum Routing {
    Decided(Plan),
    /// It steps back (`..`, `.`, a trailing slash) through a pod directory: only a walk that
    /// looks at each such step can tell (see `policy::walk`).
    Walk {
        start: Vec<u8>,
        start_in_pod: bool,
        path: Vec<u8>,
        scope: Scope,
        no_symlinks: bool,
    },
}

/// Judges a path argument on the notify thread. Paths that are not about the pod (relative to
/// the working directory or to a local directory, empty, or confined by openat2 to a local
/// directory) stay with the kernel.
fn route_arg(ctx: &Context, tid: u32, arg: &PathArg) -> Routing {
    let Ok(raw) = tracee::read_cstring(tid, arg.ptr, PATH_MAX) else {
        return Routing::Decided(Plan::Local);
    };
    let scoped = arg.resolve & (localfs::RESOLVE_BENEATH | localfs::RESOLVE_IN_ROOT) != 0;
    let no_symlinks = arg.resolve & localfs::RESOLVE_NO_SYMLINKS != 0;
    if raw.first() == Some(&b'/') && !scoped {
        if let Some(pod_path) = ctx.files.pod_path_of_materialized(&raw) {
            // A path into kmirror's mirror of pod directories: the pod's, relative to its root.
            if !walk::steps_back(&pod_path) {
                return Routing::Decided(plan_for(ctx, pod_path, arg.write, true));
            }
            let path = pod_path.strip_prefix(b"/").unwrap_or(&pod_path).to_vec();
            return Routing::Walk {
                start: b"/".to_vec(),
                start_in_pod: true,
                path,
                scope: Scope::Root,
                no_symlinks,
            };
        }
        if files::is_normal(&raw) {
            return Routing::Decided(plan_for(ctx, raw, arg.write, false));
        }
        if !walk::needs_walk(&raw, |p| ctx.files.route(p, arg.write) != FileRoute::Local) {
            return Routing::Decided(Plan::Local);
        }
        return Routing::Walk {
            start: b"/".to_vec(),
            start_in_pod: false,
            path: raw,
            scope: Scope::Root,
            no_symlinks,
        };
    }
    if raw.is_empty() || arg.dirfd == libc::AT_FDCWD {
        return Routing::Decided(Plan::Local);
    }
    let Some(pod_dir) = tracee::proc_link(tid, &format!("fd/{}", arg.dirfd))
        .ok()
        .and_then(|dir| ctx.files.pod_path_of_materialized(&dir))
    else {
        return Routing::Decided(Plan::Local);
    };
    if !walk::steps_back(&raw) && !scoped && raw.first() != Some(&b'/') {
        return Routing::Decided(plan_for(ctx, files::join(&pod_dir, &raw), arg.write, true));
    }
    let scope = if arg.resolve & localfs::RESOLVE_IN_ROOT != 0 {
        Scope::InRoot
    } else if arg.resolve & localfs::RESOLVE_BENEATH != 0 {
        Scope::Beneath
    } else {
        Scope::Root
    };
    Routing::Walk { start: pod_dir, start_in_pod: true, path: raw, scope, no_symlinks }
}

/// The plan for a resolved path. `through_pod`: the raw argument passes through a pod
/// directory, so the local kernel could not resolve it and a local answer is kmirror's to give.
fn plan_for(ctx: &Context, path: Vec<u8>, write: bool, through_pod: bool) -> Plan {
    match ctx.files.route(&path, write) {
        FileRoute::Local if through_pod => Plan::LocalAt(path),
        FileRoute::Local => Plan::Local,
        FileRoute::Virtual(v) => Plan::Virtual(v),
        FileRoute::Remote => Plan::Remote(path),
    }
}

/// Answers a walk's questions: pod paths through the agent, local ones as the app.
struct WalkLookup<'a> {
    ctx: &'a Context,
    caller: &'a Arc<Caller>,
    write: bool,
}

impl walk::Lookup for WalkLookup<'_> {
    fn is_pod(&self, path: &[u8]) -> bool {
        self.ctx.files.route(path, self.write) != FileRoute::Local
    }

    async fn lookup(&self, path: &[u8]) -> Result<Node, i32> {
        match self.ctx.files.route(path, self.write) {
            FileRoute::Virtual(_) => Ok(Node::NotDir),
            FileRoute::Remote => {
                let st = remote_stat(self.ctx, path, false).await?;
                match st.mode & libc::S_IFMT {
                    libc::S_IFDIR => Ok(Node::Dir),
                    libc::S_IFLNK => match remote(self.ctx, Request::ReadLink { path: path.to_vec() }).await?
                    {
                        Response::ReadLink(target) => Ok(Node::Symlink(target)),
                        _ => Err(libc::EIO),
                    },
                    _ => Ok(Node::NotDir),
                }
            }
            FileRoute::Local => {
                let (caller, path) = (self.caller.clone(), path.to_vec());
                tokio::task::spawn_blocking(move || localfs::lookup(&caller, &path))
                    .await
                    .unwrap_or(Err(libc::EIO))
            }
        }
    }
}

fn caller_of(n: &Notification) -> Result<Caller, i32> {
    Caller::of_thread(n.tid).map_err(|e| e.raw_os_error().unwrap_or(libc::ESRCH))
}

/// Decides how to serve a call's path argument and runs `serve` with that plan: at once on the
/// notify thread when the text decides it, otherwise after a walk on the runtime.
fn with_plan(
    ctx: &Arc<Context>,
    n: Notification,
    arg: PathArg,
    serve: impl FnOnce(&Arc<Context>, Notification, Plan) + Send + 'static,
) {
    let (start, start_in_pod, path, scope, no_symlinks) = match route_arg(ctx, n.tid, &arg) {
        Routing::Decided(plan) => return serve(ctx, n, plan),
        Routing::Walk { start, start_in_pod, path, scope, no_symlinks } => {
            (start, start_in_pod, path, scope, no_symlinks)
        }
    };
    let task_ctx = ctx.clone();
    super::spawn_answering(ctx.clone(), n.id, async move {
        let ctx = task_ctx;
        let walked = async {
            let caller = Arc::new(caller_of(&n)?);
            let lookup = WalkLookup { ctx: &ctx, caller: &caller, write: arg.write };
            let request = walk::Walk { start: &start, start_in_pod, path: &path, scope, no_symlinks };
            walk::walk(&lookup, request).await
        }
        .await;
        match walked {
            Ok(walked) => {
                let plan = plan_for(&ctx, walked.path, arg.write, walked.through_pod);
                serve(&ctx, n, plan);
            }
            Err(errno) => answer(&ctx, &n, Err(errno)),
        }
    });
}

/// Runs a local operation as the app on a blocking thread (it may block, e.g. opening a FIFO,
/// and may need a thread of its own for the app's credentials), then `finish` with its result.
fn as_app<R: Send + 'static>(
    ctx: &Arc<Context>,
    n: Notification,
    op: impl FnOnce(&Caller) -> Result<R, i32> + Send + 'static,
    finish: impl FnOnce(&Context, &Notification, Result<R, i32>) + Send + 'static,
) {
    let task_ctx = ctx.clone();
    ctx.runtime.spawn_blocking(move || {
        let result = caller_of(&n).and_then(|caller| op(&caller));
        finish(&task_ctx, &n, result);
    });
}

async fn remote(ctx: &Context, request: Request) -> Result<Response, i32> {
    match ctx.tunnel.request(request, ctx.remote_timeout).await {
        Ok(Response::Error(errno)) => Err(errno.0),
        Ok(response) => Ok(response),
        Err(e) => Err(tunnel_errno(&e)),
    }
}

async fn remote_stat(ctx: &Context, path: &[u8], follow: bool) -> Result<FileStat, i32> {
    match remote(ctx, Request::Stat { path: path.to_vec(), follow }).await? {
        Response::Stat(st) => Ok(st),
        _ => Err(libc::EIO),
    }
}

/// A synthesised file's current content, as an open sealed memfd.
fn virtual_file(ctx: &Context, v: VirtualFile) -> Result<std::fs::File, i32> {
    match v {
        VirtualFile::Hostname => {
            sealed(b"hostname", crate::policy::host::proc_hostname_file(&ctx.hostname.get()).as_bytes())
        }
        _ => ctx.virtual_files[&v].try_clone().map_err(errno_of),
    }
}

fn sealed(name: &[u8], content: &[u8]) -> Result<std::fs::File, i32> {
    let memfd = new_memfd(name)?;
    memfd.as_file().write_all(content).map_err(errno_of)?;
    seal(&memfd)?;
    Ok(memfd.into_file())
}

/// An empty memfd that can be sealed, named after the file it will hold.
fn new_memfd(name: &[u8]) -> Result<memfd::Memfd, i32> {
    memfd::MemfdOptions::default()
        .allow_sealing(true)
        .create(format!("kmirror:{}", String::from_utf8_lossy(name)))
        .map_err(|_| libc::ENOMEM)
}

/// Makes a filled memfd read-only for good: no write, no resize, no unsealing.
fn seal(memfd: &memfd::Memfd) -> Result<(), i32> {
    memfd
        .add_seals(&[
            memfd::FileSeal::SealShrink,
            memfd::FileSeal::SealGrow,
            memfd::FileSeal::SealWrite,
            memfd::FileSeal::SealSeal,
        ])
        .map_err(|_| libc::EIO)
}

fn virtual_stat(ctx: &Context, v: VirtualFile) -> Result<FileStat, i32> {
    use std::os::unix::fs::MetadataExt;
    let meta = virtual_file(ctx, v)?.metadata().map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
    let ts = |sec: i64, nsec: i64| kmirror_protocol::Timestamp { sec, nsec: nsec as u32 };
    Ok(FileStat {
        dev: meta.dev(),
        ino: meta.ino(),
        mode: libc::S_IFREG | 0o644,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        size: meta.size() as i64,
        blksize: 4096,
        blocks: meta.size().div_ceil(512) as i64,
        atime: ts(meta.atime(), meta.atime_nsec()),
        mtime: ts(meta.mtime(), meta.mtime_nsec()),
        ctime: ts(meta.ctime(), meta.ctime_nsec()),
    })
}

// ---- open ----

pub fn on_open(ctx: &Arc<Context>, n: Notification) {
    let (dirfd, path_ptr, flags, mode, resolve) = match n.nr {
        libc::SYS_open => (libc::AT_FDCWD, n.args[0], n.args[1] as i32, n.args[2] as u32, 0),
        libc::SYS_openat => (n.args[0] as i32, n.args[1], n.args[2] as i32, n.args[3] as u32, 0),
        // openat2: `struct open_how` is the flags, the mode and the resolve flags; a smaller
        // size is the kernel's to refuse.
        _ => match tracee::read_bytes(n.tid, n.args[2], OPEN_HOW_SIZE) {
            Ok(how) if n.args[3] as usize >= OPEN_HOW_SIZE => {
                let field = |i: usize| u64::from_ne_bytes(how[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
                (n.args[0] as i32, n.args[1], field(0) as i32, field(1) as u32, field(2))
            }
            _ => return ctx.listener.continue_call(n.id),
        },
    };
    let write = flags & (libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND) != 0
        || flags & libc::O_TMPFILE == libc::O_TMPFILE;
    let arg = PathArg { dirfd, ptr: path_ptr, write, resolve };
    with_plan(ctx, n, arg, move |ctx, n, plan| match plan {
        Plan::Local => ctx.listener.continue_call(n.id),
        Plan::LocalAt(path) => as_app(
            ctx,
            n,
            move |caller| localfs::open(caller, &path, flags, mode, resolve),
            move |ctx, n, result| deliver_fd(ctx, n, result, flags),
        ),
        Plan::Virtual(v) => {
            let result = if flags & libc::O_DIRECTORY != 0 {
                Err(libc::ENOTDIR)
            } else if write && v == VirtualFile::Hostname {
                super::host::open_for_write(ctx, &n)
            } else if write {
                Err(libc::EACCES)
            } else {
                virtual_file(ctx, v).and_then(|f| reopen_read_only(f.as_raw_fd()).map_err(errno_of))
            };
            deliver_fd(ctx, &n, result, flags);
        }
        Plan::Remote(path) => {
            let ctx = ctx.clone();
            super::spawn_answering(ctx.clone(), n.id, async move {
                let result = open_remote(&ctx, &path, flags).await;
                deliver_fd(&ctx, &n, result, flags);
            });
        }
    });
}

/// The part of `struct open_how` kmirror reads: flags, mode, resolve.
const OPEN_HOW_SIZE: usize = 24;

fn deliver_fd(ctx: &Context, n: &Notification, result: Result<OwnedFd, i32>, flags: i32) {
    match result {
        Ok(fd) => {
            if ctx.listener.is_valid(n.id) {
                ctx.listener.return_new_fd(n.id, fd.as_raw_fd(), flags & libc::O_CLOEXEC != 0);
            }
        }
        Err(errno) => answer(ctx, n, Err(errno)),
    }
}

fn errno_of(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// A new, read-only open file description of an existing file (each app open gets its own
/// file offset).
fn reopen_read_only(fd: i32) -> std::io::Result<OwnedFd> {
    Ok(std::fs::File::open(format!("/proc/self/fd/{fd}"))?.into())
}

async fn open_remote(ctx: &Context, path: &[u8], flags: i32) -> Result<OwnedFd, i32> {
    let st = remote_stat(ctx, path, flags & libc::O_NOFOLLOW == 0).await?;
    match st.mode & libc::S_IFMT {
        libc::S_IFDIR => {
            let local = materialize_dir(ctx, path).await?;
            Ok(std::fs::File::open(local).map_err(errno_of)?.into())
        }
        _ if flags & libc::O_DIRECTORY != 0 => Err(libc::ENOTDIR),
        libc::S_IFREG => fetch_file(ctx, path, &st, flags & libc::O_NOFOLLOW == 0).await,
        libc::S_IFLNK => Err(libc::ELOOP),
        _ => Err(libc::ENXIO),
    }
}

async fn fetch_file(ctx: &Context, path: &[u8], st: &FileStat, follow: bool) -> Result<OwnedFd, i32> {
    if st.size.max(0) as u64 > MAX_REMOTE_FILE {
        return Err(libc::EFBIG);
    }
    let memfd = new_memfd(path.rsplit(|&b| b == b'/').next().unwrap_or(b"file"))?;
    let read = if ctx.tunnel.version() >= kmirror_protocol::HANDLES_VERSION {
        fetch_by_handle(ctx, path, follow, memfd.as_file()).await?
    } else {
        fetch_by_path(ctx, path, memfd.as_file()).await?;
        *st
    };
    seal(&memfd)?;
    let app_fd = reopen_read_only(memfd.as_file().as_raw_fd()).map_err(errno_of)?;
    // After the reopen (a mode without read permission must not stop it): the copy describes
    // the pod's file to fstat, as stat of its path does.
    dress_as(memfd.as_file(), &read);
    Ok(app_fd)
}

/// Gives a fetched copy the pod file's mode, owner and times, as far as this side may: an
/// app that checks its key file's mode (ssh) or compares times sees the pod's. The inode and
/// device stay the copy's own. Best effort: without root the owner stays kmirror's.
fn dress_as(file: &std::fs::File, st: &FileStat) {
    use std::os::unix::fs::PermissionsExt;
    let _ = file.set_permissions(std::fs::Permissions::from_mode(st.mode & 0o7777));
    let _ = std::os::unix::fs::fchown(file, Some(st.uid), Some(st.gid));
    let time = |t: &kmirror_protocol::Timestamp| {
        std::time::UNIX_EPOCH + std::time::Duration::new(t.sec.max(0) as u64, t.nsec)
    };
    let times = std::fs::FileTimes::new().set_accessed(time(&st.atime)).set_modified(time(&st.mtime));
    let _ = file.set_times(times);
}

/// A handle the agent holds for this side; closed in the agent if the fetch stops before the
/// agent closed it itself (an error, a file grown too large, the app's call abandoned).
struct RemoteHandle<'a> {
    ctx: &'a Context,
    handle: Option<u64>,
}

impl Drop for RemoteHandle<'_> {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let (tunnel, timeout) = (self.ctx.tunnel.clone(), self.ctx.remote_timeout);
            self.ctx.runtime.spawn(async move {
                let _ = tunnel.request(Request::CloseHandle { handle }, timeout).await;
            });
        }
    }
}

/// Copies a pod file into `file` through one open file description in the agent, so the
/// copy is one version of the file even if the pod replaces it meanwhile.
async fn fetch_by_handle(
    ctx: &Context,
    path: &[u8],
    follow: bool,
    mut file: &std::fs::File,
) -> Result<FileStat, i32> {
    let _slot = HANDLE_SLOTS.acquire().await.map_err(|_| libc::EIO)?;
    let opened = remote(ctx, Request::OpenFile { path: path.to_vec(), follow }).await?;
    let Response::FileOpened { handle, stat, bytes } = opened else { return Err(libc::EIO) };
    let mut handle = RemoteHandle { ctx, handle };
    if stat.size.max(0) as u64 > MAX_REMOTE_FILE {
        return Err(libc::EFBIG);
    }
    file.write_all(&bytes).map_err(errno_of)?;
    let mut copied = bytes.len() as u64;
    while let Some(id) = handle.handle {
        let chunk = remote(ctx, Request::ReadHandle { handle: id, len: READ_CHUNK }).await;
        if chunk.is_err() {
            handle.handle = None; // the agent closed it on its error (or the session is gone)
        }
        let Response::FileChunk { bytes, eof } = chunk? else { return Err(libc::EIO) };
        if eof {
            handle.handle = None;
        }
        file.write_all(&bytes).map_err(errno_of)?;
        copied += bytes.len() as u64;
        if copied > MAX_REMOTE_FILE {
            return Err(libc::EFBIG);
        }
    }
    Ok(stat)
}

/// Protocol 2: each chunk is read by path (a replaced file can mix versions).
async fn fetch_by_path(ctx: &Context, path: &[u8], mut file: &std::fs::File) -> Result<(), i32> {
    let mut offset = 0u64;
    loop {
        let chunk = remote(ctx, Request::ReadFile { path: path.to_vec(), offset, len: READ_CHUNK }).await?;
        let Response::FileChunk { bytes, eof } = chunk else { return Err(libc::EIO) };
        file.write_all(&bytes).map_err(errno_of)?;
        offset += bytes.len() as u64;
        if offset > MAX_REMOTE_FILE {
            return Err(libc::EFBIG);
        }
        if eof || bytes.is_empty() {
            return Ok(());
        }
    }
}

/// Mirrors a pod directory's entries (names and types, empty content) under the session's
/// materialisation root and returns the local directory.
async fn materialize_dir(ctx: &Context, path: &[u8]) -> Result<std::path::PathBuf, i32> {
    let entries = if ctx.tunnel.version() >= kmirror_protocol::HANDLES_VERSION {
        list_by_handle(ctx, path).await?
    } else {
        let Response::ListDir(entries) = remote(ctx, Request::ListDir { path: path.to_vec() }).await? else {
            return Err(libc::EIO);
        };
        entries
    };
    let local = ctx.materialized.join(std::ffi::OsStr::from_bytes(path.strip_prefix(b"/").unwrap_or(path)));
    let dir = local.clone();
    tokio::task::spawn_blocking(move || mirror_entries(&dir, &entries))
        .await
        .map_err(|_| libc::EIO)?
        .map_err(errno_of)?;
    Ok(local)
}

/// Lists a pod directory in as many answers as it takes (one frame holds some 30k names).
async fn list_by_handle(ctx: &Context, path: &[u8]) -> Result<Vec<DirEntry>, i32> {
    let _slot = HANDLE_SLOTS.acquire().await.map_err(|_| libc::EIO)?;
    let Response::DirEntries { mut entries, more } =
        remote(ctx, Request::OpenDir { path: path.to_vec() }).await?
    else {
        return Err(libc::EIO);
    };
    let mut handle = RemoteHandle { ctx, handle: more };
    while let Some(id) = handle.handle {
        if entries.len() > MAX_DIR_ENTRIES {
            return Err(libc::EFBIG);
        }
        let part = remote(ctx, Request::ReadDir { handle: id }).await;
        if part.is_err() {
            handle.handle = None; // the agent closed it on its error (or the session is gone)
        }
        let Response::DirEntries { entries: part, more } = part? else { return Err(libc::EIO) };
        handle.handle = more;
        entries.extend(part);
    }
    if entries.len() > MAX_DIR_ENTRIES {
        return Err(libc::EFBIG);
    }
    Ok(entries)
}

/// Whether a name from the agent can be joined to a local directory as one entry of it.
fn is_entry_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.iter().any(|&b| b == b'/' || b == 0)
}

/// The kind of placeholder that stands for a pod entry of `d_type` `kind`.
fn mirror_kind(kind: u8) -> u8 {
    match kind {
        libc::DT_DIR | libc::DT_LNK => kind,
        _ => libc::DT_REG,
    }
}

fn mirror_entries(dir: &std::path::Path, entries: &[DirEntry]) -> std::io::Result<()> {
    // Names come from the agent: one with a `/`, `..` or NUL would create or delete files
    // outside the mirror. The kernel never lists such names, so the listing is refused.
    if let Some(bad) = entries.iter().find(|e| !is_entry_name(&e.name)) {
        tracing::warn!(name = %String::from_utf8_lossy(&bad.name), "the agent listed an impossible entry name");
        return Err(std::io::Error::from_raw_os_error(libc::EIO));
    }
    std::fs::create_dir_all(dir)?;
    let wanted: std::collections::HashMap<&[u8], u8> =
        entries.iter().map(|e| (e.name.as_slice(), mirror_kind(e.kind))).collect();
    for existing in std::fs::read_dir(dir)? {
        let existing = existing?;
        let kind = existing.file_type().map(kind_of).unwrap_or(libc::DT_UNKNOWN);
        if wanted.get(existing.file_name().as_bytes()) != Some(&kind) {
            let p = existing.path();
            let _ = if kind == libc::DT_DIR { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        }
    }
    // One system call per entry, relative to the directory: a pod directory can hold tens of
    // thousands of entries, and each path lookup and extra call shows.
    let dirfd: OwnedFd = std::fs::File::open(dir)?.into();
    use nix::sys::stat::{Mode, SFlag, mkdirat, mknodat};
    for entry in entries {
        let name = std::ffi::CString::new(entry.name.as_slice()).expect("checked: no NUL");
        let made = match mirror_kind(entry.kind) {
            libc::DT_DIR => mkdirat(&dirfd, name.as_c_str(), Mode::from_bits_retain(0o755)),
            libc::DT_LNK => nix::unistd::symlinkat(c"kmirror-pod-symlink", &dirfd, name.as_c_str()),
            _ => mknodat(&dirfd, name.as_c_str(), SFlag::S_IFREG, Mode::from_bits_retain(0o644), 0),
        };
        // EEXIST: the entry was mirrored before (or by a concurrent listing of the directory).
        if let Err(e) = made
            && e != nix::errno::Errno::EEXIST
        {
            return Err(e.into());
        }
    }
    Ok(())
}

fn kind_of(ft: std::fs::FileType) -> u8 {
    if ft.is_dir() {
        libc::DT_DIR
    } else if ft.is_symlink() {
        libc::DT_LNK
    } else {
        libc::DT_REG
    }
}

// ---- stat family ----

pub fn on_stat(ctx: &Arc<Context>, n: Notification) {
    let (dirfd, path_ptr, buf, flags, statx) = match n.nr {
        libc::SYS_stat => (libc::AT_FDCWD, n.args[0], n.args[1], 0, false),
        libc::SYS_lstat => (libc::AT_FDCWD, n.args[0], n.args[1], libc::AT_SYMLINK_NOFOLLOW, false),
        libc::SYS_newfstatat => (n.args[0] as i32, n.args[1], n.args[2], n.args[3] as i32, false),
        _ => (n.args[0] as i32, n.args[1], n.args[4], n.args[2] as i32, true),
    };
    let follow = flags & libc::AT_SYMLINK_NOFOLLOW == 0;
    let encode = move |st: &FileStat| if statx { abi::encode_statx(st) } else { abi::encode_stat(st) };
    let arg = PathArg { dirfd, ptr: path_ptr, write: false, resolve: 0 };
    with_plan(ctx, n, arg, move |ctx, n, plan| match plan {
        Plan::Local => ctx.listener.continue_call(n.id),
        Plan::LocalAt(path) => as_app(
            ctx,
            n,
            move |caller| localfs::stat(caller, &path, follow),
            move |ctx, n, result| {
                let result = result.and_then(|st| write_out(ctx, n, buf, &encode(&st)));
                answer(ctx, n, result.map(|()| 0));
            },
        ),
        Plan::Virtual(v) => {
            let result = virtual_stat(ctx, v).and_then(|st| write_out(ctx, &n, buf, &encode(&st)));
            answer(ctx, &n, result.map(|()| 0));
        }
        Plan::Remote(path) => {
            let ctx = ctx.clone();
            super::spawn_answering(ctx.clone(), n.id, async move {
                let result = match remote_stat(&ctx, &path, follow).await {
                    Ok(st) => write_out(&ctx, &n, buf, &encode(&st)),
                    Err(errno) => Err(errno),
                };
                answer(&ctx, &n, result.map(|()| 0));
            });
        }
    });
}

/// Writes an output buffer of an emulated call, after checking the caller is still waiting.
fn write_out(ctx: &Context, n: &Notification, addr: u64, bytes: &[u8]) -> Result<(), i32> {
    let memory = super::output_memory(ctx, n).ok_or(libc::EINTR)?;
    memory.write(addr, bytes).map_err(|_| libc::EFAULT)
}

// ---- access ----

pub fn on_access(ctx: &Arc<Context>, n: Notification) {
    let (dirfd, path_ptr, mode, flags) = match n.nr {
        libc::SYS_access => (libc::AT_FDCWD, n.args[0], n.args[1] as u32, 0),
        libc::SYS_faccessat => (n.args[0] as i32, n.args[1], n.args[2] as u32, 0),
        _ => (n.args[0] as i32, n.args[1], n.args[2] as u32, n.args[3] as i32),
    };
    let arg = PathArg { dirfd, ptr: path_ptr, write: false, resolve: 0 };
    with_plan(ctx, n, arg, move |ctx, n, plan| match plan {
        Plan::Local => ctx.listener.continue_call(n.id),
        Plan::LocalAt(path) => as_app(
            ctx,
            n,
            move |caller| localfs::access(caller, &path, mode, flags),
            |ctx, n, result| answer(ctx, n, result.map(|()| 0)),
        ),
        Plan::Virtual(_) => {
            let denied = mode & (libc::W_OK | libc::X_OK) as u32 != 0;
            answer(ctx, &n, if denied { Err(libc::EACCES) } else { Ok(0) });
        }
        Plan::Remote(path) => {
            let ctx = ctx.clone();
            super::spawn_answering(ctx.clone(), n.id, async move {
                let result = remote(&ctx, Request::Access { path, mode }).await.map(|_| 0);
                answer(&ctx, &n, result);
            });
        }
    });
}

// ---- readlink ----

pub fn on_readlink(ctx: &Arc<Context>, n: Notification) {
    let (dirfd, path_ptr, buf, size) = match n.nr {
        libc::SYS_readlink => (libc::AT_FDCWD, n.args[0], n.args[1], n.args[2] as i64),
        _ => (n.args[0] as i32, n.args[1], n.args[2], n.args[3] as i64),
    };
    let copy_out = move |ctx: &Context, n: &Notification, target: Result<Vec<u8>, i32>| {
        let result = if size <= 0 {
            Err(libc::EINVAL)
        } else {
            target.and_then(|target| {
                let copy = target.len().min(size as usize);
                write_out(ctx, n, buf, &target[..copy]).map(|()| copy as i64)
            })
        };
        answer(ctx, n, result);
    };
    let arg = PathArg { dirfd, ptr: path_ptr, write: false, resolve: 0 };
    with_plan(ctx, n, arg, move |ctx, n, plan| match plan {
        Plan::Local => ctx.listener.continue_call(n.id),
        Plan::LocalAt(path) => as_app(ctx, n, move |caller| localfs::read_link(caller, &path), copy_out),
        Plan::Virtual(_) => answer(ctx, &n, Err(libc::EINVAL)),
        Plan::Remote(path) => {
            let ctx = ctx.clone();
            super::spawn_answering(ctx.clone(), n.id, async move {
                let target = match remote(&ctx, Request::ReadLink { path }).await {
                    Ok(Response::ReadLink(target)) => Ok(target),
                    Ok(_) => Err(libc::EIO),
                    Err(errno) => Err(errno),
                };
                copy_out(&ctx, &n, target);
            });
        }
    });
}

// ---- extended attributes ----

/// `getxattr`/`lgetxattr`/`listxattr`/`llistxattr`: pod files carry no extended attributes in
/// kmirror's view (ls and cp probe ACLs and SELinux labels on every file they touch). A local
/// file reached through a pod directory is asked as the app.
pub fn on_xattr(ctx: &Arc<Context>, n: Notification) {
    let list = matches!(n.nr, libc::SYS_listxattr | libc::SYS_llistxattr);
    let follow = matches!(n.nr, libc::SYS_getxattr | libc::SYS_listxattr);
    let arg = PathArg { dirfd: libc::AT_FDCWD, ptr: n.args[0], write: false, resolve: 0 };
    with_plan(ctx, n, arg, move |ctx, n, plan| match plan {
        Plan::Local => ctx.listener.continue_call(n.id),
        Plan::LocalAt(path) => {
            let (name, buf, size) = if list {
                (None, n.args[1], n.args[2] as usize)
            } else {
                match tracee::read_cstring(n.tid, n.args[1], XATTR_NAME_MAX) {
                    Ok(name) => (Some(name), n.args[2], n.args[3] as usize),
                    Err(e) => return answer(ctx, &n, Err(errno_of(e))),
                }
            };
            as_app(
                ctx,
                n,
                move |caller| localfs::xattr(caller, &path, follow, name.as_deref(), size),
                move |ctx, n, result| {
                    let result = result.and_then(|value| match value {
                        localfs::Xattr::Size(len) => Ok(len as i64),
                        localfs::Xattr::Bytes(bytes) => {
                            write_out(ctx, n, buf, &bytes).map(|()| bytes.len() as i64)
                        }
                    });
                    answer(ctx, n, result);
                },
            );
        }
        _ => answer(ctx, &n, if list { Ok(0) } else { Err(libc::ENODATA) }),
    });
}

#[cfg(test)]
mod mirror_tests {
    use super::*;

    fn entry(name: &[u8], kind: u8) -> DirEntry {
        DirEntry { name: name.to_vec(), kind, ino: 1 }
    }

    /// Names that would leave the mirror directory are refused before anything is created
    /// or removed; plain ones are mirrored by kind.
    #[test]
    fn entry_names_from_the_agent_cannot_leave_the_mirror() {
        let base = std::env::temp_dir().join(format!("kmirror-mirror-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let dir = base.join("pod/data");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(base.join("pod/keep"), b"x").unwrap();
        for bad in [&b"../escape"[..], b"..", b".", b"", b"a/b", b"/abs", b"nul\0byte", b"../../keep"] {
            let listing = [entry(b"fine", libc::DT_REG), entry(bad, libc::DT_DIR)];
            let err = mirror_entries(&dir, &listing).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EIO), "{bad:?}");
        }
        assert!(!base.join("pod/escape").exists() && !base.join("escape").exists());
        assert!(base.join("pod/keep").exists(), "a file outside the mirror was removed");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "nothing was mirrored from a bad listing");
        let good = [
            entry(b"a", libc::DT_REG),
            entry(b"d", libc::DT_DIR),
            entry(b"l", libc::DT_LNK),
            entry(b"f", libc::DT_FIFO),
        ];
        mirror_entries(&dir, &good).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["a", "d", "f", "l"]);
        std::fs::remove_dir_all(&base).unwrap();
    }
}
