//! The file family: `open`/`openat`/`openat2`, the `stat` family, `access`/`faccessat(2)`,
//! `readlink(at)`.
//!
//! Remote regular files are fetched once per open and handed to the app as a sealed, read-only
//! memfd; remote directories are mirrored as a local directory of placeholder entries (same
//! names and types) so `getdents` works, and lookups relative to such a directory map back to
//! the pod. Metadata calls are answered with the pod's own `stat` data.

use super::{Context, answer, tunnel_errno};
use crate::caller::Caller;
use crate::intercept::Notification;
use crate::policy::files::{self, FileRoute, VirtualFile};
use crate::policy::walk::{self, Node, Scope};
use crate::{abi, localfs, tracee};
use kmirror_protocol::{DirEntry, FileStat, Identity, Request, Response};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

/// Remote files larger than this are refused (EFBIG) rather than copied into memory.
pub(super) const MAX_REMOTE_FILE: u64 = 256 << 20;
/// Pod directories with more entries than this are refused (EFBIG) rather than mirrored.
const MAX_DIR_ENTRIES: usize = 1 << 20;
/// Fetches and listings that may hold an agent handle at once: the agent refuses more than
/// 64 handles per session (EMFILE), so more concurrent opens of the app wait here instead.
/// (One session per process: a static is that session's.)
static HANDLE_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(32);
pub(super) const READ_CHUNK: u32 = 512 * 1024;
pub(super) const PATH_MAX: usize = libc::PATH_MAX as usize;
const XATTR_NAME_MAX: usize = 255;

/// How a call's path argument is served.
pub(super) enum Plan {
    /// The kernel handles the call as made.
    Local,
    /// kmirror performs the call locally on this resolved path, as the app.
    LocalAt(Vec<u8>),
    Virtual(VirtualFile),
    Remote(Vec<u8>),
    /// The pod file one of kmirror's descriptors stands for (a mirrored directory, an O_PATH
    /// stand-in), asked about through the descriptor itself: with `follow` false it is the
    /// symlink itself, whatever the call's own flags say.
    PodFile(files::PodFile),
    /// The path does not exist for the app (`feature.fs.not_found`).
    Missing,
}

/// A trapped call's path argument.
#[derive(Clone, Copy)]
pub(super) struct PathArg {
    pub dirfd: i32,
    pub ptr: u64,
    /// The call may modify (then the path is the pod's only where writes go to the pod).
    pub write: bool,
    /// openat2's `resolve` flags (0 for other calls).
    pub resolve: u64,
    /// The call follows a symlink in the last component.
    pub follow_last: bool,
    /// An empty path names the descriptor `dirfd` itself (AT_EMPTY_PATH, readlinkat).
    pub empty_is_fd: bool,
}

/// Where a path argument leads, as far as its text tells.
enum Routing {
    Decided(Plan),
    /// It steps back (`..`, `.`, a trailing slash) through a pod directory, or openat2's
    /// resolve flags constrain each component: only a walk that looks at each such step can
    /// tell (see `policy::walk`).
    Walk {
        start: Vec<u8>,
        start_in_pod: bool,
        path: Vec<u8>,
        rules: walk::Rules,
    },
}

/// Judges a path argument on the notify thread. Paths that are not about the pod (relative to
/// the working directory or to a local directory, empty, or confined by openat2 to a local
/// directory) stay with the kernel.
fn route_arg(ctx: &Context, tid: u32, arg: &PathArg) -> Routing {
    let Ok(raw) = tracee::read_cstring(tid, arg.ptr, PATH_MAX) else {
        return Routing::Decided(Plan::Local);
    };
    let rules = walk::Rules::of_resolve(arg.resolve, arg.follow_last);
    if raw.is_empty() {
        // Asked about a descriptor itself: the pod file, if the descriptor stands for one.
        let ours = arg.empty_is_fd && arg.dirfd >= 0 && ctx.standins.any_handed_out();
        return Routing::Decided(match ours {
            true => pod_file_of_fd(ctx, tid, arg.dirfd).map_or(Plan::Local, Plan::PodFile),
            false => Plan::Local,
        });
    }
    if let Some(routing) = route_through_fd_link(ctx, tid, &raw, arg, rules) {
        return routing;
    }
    let scoped = rules.scope != Scope::Root;
    if raw.first() == Some(&b'/') && !scoped {
        if let Some(pod_path) = ctx.files.pod_path_of_materialized(&raw) {
            // A path into kmirror's mirror of pod directories: the pod's, relative to its root.
            return route_pod_path(ctx, pod_path, arg.write, rules);
        }
        if !rules.strict && files::is_normal(&raw) {
            return Routing::Decided(plan_for(ctx, raw, arg.write, false));
        }
        if !walk::needs_walk(&raw, rules.strict, |p| ctx.files.route(p, arg.write) != FileRoute::Local) {
            return Routing::Decided(Plan::Local);
        }
        return Routing::Walk { start: b"/".to_vec(), start_in_pod: false, path: raw, rules };
    }
    let pod_dir = if arg.dirfd == libc::AT_FDCWD {
        // Relative to the working directory: the pod's, after a chdir into a pod directory.
        cwd_in_pod(ctx, tid)
    } else {
        tracee::proc_link(tid, &format!("fd/{}", arg.dirfd))
            .ok()
            .and_then(|dir| ctx.files.pod_path_of_fd_link(&dir))
    };
    let Some(pod_dir) = pod_dir else {
        return Routing::Decided(Plan::Local);
    };
    if !walk::steps_back(&raw) && !rules.strict && raw.first() != Some(&b'/') {
        return Routing::Decided(plan_for(ctx, files::join(&pod_dir, &raw), arg.write, true));
    }
    Routing::Walk { start: pod_dir, start_in_pod: true, path: raw, rules }
}

/// The pod directory thread `tid`'s process works in, if it entered one (see `cwd`).
pub(super) fn cwd_in_pod(ctx: &Context, tid: u32) -> Option<Vec<u8>> {
    if !ctx.cwds.any() {
        return None;
    }
    ctx.cwds.pod_dir(Caller::of_thread(tid).ok()?.tgid)
}

/// Routes an absolute pod path the app reached through one of kmirror's local trees.
fn route_pod_path(ctx: &Context, pod_path: Vec<u8>, write: bool, rules: walk::Rules) -> Routing {
    if !walk::steps_back(&pod_path) && !rules.strict {
        return Routing::Decided(plan_for(ctx, pod_path, write, true));
    }
    // Relative to the pod's root, so the walk counts it as passing through the pod.
    let path = pod_path.strip_prefix(b"/").unwrap_or(&pod_path).to_vec();
    Routing::Walk { start: b"/".to_vec(), start_in_pod: true, path, rules }
}

/// Routes a path through one of the caller's own descriptor links (`/proc/self/fd/N[/...]`)
/// when that descriptor stands for a pod file (a mirrored directory, an O_PATH stand-in):
/// opening the local node would give its empty content. A link that is not followed (the
/// last component of a call that does not follow), resolve flags that refuse magic links,
/// and names below a pod symlink's own stand-in (ENOTDIR, from the kernel as from the pod)
/// are the kernel's business.
fn route_through_fd_link(
    ctx: &Context,
    tid: u32,
    raw: &[u8],
    arg: &PathArg,
    rules: walk::Rules,
) -> Option<Routing> {
    if !ctx.standins.any_handed_out() {
        return None;
    }
    let link = files::fd_link(raw)?;
    let refused = libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_SYMLINKS | walk::SCOPES;
    if arg.resolve & refused != 0 || (link.rest.is_empty() && !arg.follow_last) {
        return None;
    }
    let file = own_pod_file(ctx, tid, &link)?;
    if link.rest.is_empty() {
        // The link leads to the descriptor's file and no further, as the kernel's does.
        return Some(Routing::Decided(Plan::PodFile(file)));
    }
    if !file.follow {
        return None;
    }
    // Steps back are the walk's to take, as the kernel would from the descriptor's file.
    let path = match walk::steps_back(link.rest) {
        true => [&file.path[..], link.rest].concat(),
        false => files::join(&file.path, link.rest),
    };
    Some(route_pod_path(ctx, path, arg.write, rules))
}

/// The pod file behind a descriptor link, if the link is the caller's own.
fn own_pod_file(ctx: &Context, tid: u32, link: &files::FdLink) -> Option<files::PodFile> {
    let own = match link.owner {
        files::FdOwner::Process | files::FdOwner::Thread => true,
        files::FdOwner::Task(t) => t == tid,
        files::FdOwner::Pid(p) => p == tid || Caller::of_thread(tid).is_ok_and(|c| c.tgid == p),
    };
    own.then(|| pod_file_of_fd(ctx, tid, link.fd)).flatten()
}

/// The pod file descriptor `fd` of thread `tid` stands for, if any: a fetched copy, a
/// mirrored directory or an O_PATH stand-in.
fn pod_file_of_fd(ctx: &Context, tid: u32, fd: i32) -> Option<files::PodFile> {
    let link = tracee::proc_link(tid, &format!("fd/{fd}")).ok()?;
    if let Some(path) = ctx.pod_fds.path_of_link(&link) {
        return Some(files::PodFile { path, follow: true });
    }
    ctx.files.pod_file_of_fd_link(&link)
}

/// The plan for a resolved path. `through_pod`: the raw argument passes through a pod
/// directory, so the local kernel could not resolve it and a local answer is kmirror's to give.
fn plan_for(ctx: &Context, path: Vec<u8>, write: bool, through_pod: bool) -> Plan {
    match ctx.files.route(&path, write) {
        FileRoute::Local if through_pod => Plan::LocalAt(path),
        FileRoute::Local => Plan::Local,
        FileRoute::Virtual(v) => Plan::Virtual(v),
        FileRoute::Remote => Plan::Remote(path),
        FileRoute::NotFound => Plan::Missing,
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
            FileRoute::NotFound => Err(libc::ENOENT),
            FileRoute::Remote => {
                let who = self.caller.credentials.identity();
                let st = remote_stat(self.ctx, &who, path, false).await?;
                match st.mode & libc::S_IFMT {
                    libc::S_IFDIR => Ok(Node::Dir),
                    libc::S_IFLNK => {
                        match remote_as(self.ctx, &who, Request::ReadLink { path: path.to_vec() }).await? {
                            Response::ReadLink(target) => Ok(Node::Symlink(target)),
                            _ => Err(libc::EIO),
                        }
                    }
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

    async fn device(&self, path: &[u8], pod: bool) -> Result<u64, i32> {
        if pod {
            let who = self.caller.credentials.identity();
            return Ok(remote_stat(self.ctx, &who, path, false).await?.dev);
        }
        let (caller, path) = (self.caller.clone(), path.to_vec());
        tokio::task::spawn_blocking(move || localfs::stat(&caller, &path, false).map(|st| st.dev))
            .await
            .unwrap_or(Err(libc::EIO))
    }
}

pub(super) fn caller_of(n: &Notification) -> Result<Caller, i32> {
    Caller::of_thread(n.tid).map_err(|e| e.raw_os_error().unwrap_or(libc::ESRCH))
}

/// Who a pod-file request of the calling thread acts for: its file-system credentials.
pub(super) fn identity_of(n: &Notification) -> Result<Identity, i32> {
    Ok(caller_of(n)?.credentials.identity())
}

/// Decides how to serve a call's path argument and runs `serve` with that plan: at once on the
/// notify thread when the text decides it, otherwise after a walk on the runtime.
pub(super) fn with_plan(
    ctx: &Arc<Context>,
    n: Notification,
    arg: PathArg,
    serve: impl FnOnce(&Arc<Context>, Notification, Plan) + Send + 'static,
) {
    let (start, start_in_pod, path, rules) = match route_arg(ctx, n.tid, &arg) {
        Routing::Decided(plan) => return serve(ctx, n, plan),
        Routing::Walk { start, start_in_pod, path, rules } => (start, start_in_pod, path, rules),
    };
    let task_ctx = ctx.clone();
    super::spawn_answering(ctx.clone(), n.id, async move {
        let ctx = task_ctx;
        let walked = async {
            let caller = Arc::new(caller_of(&n)?);
            let lookup = WalkLookup { ctx: &ctx, caller: &caller, write: arg.write };
            let request = walk::Walk { start: &start, start_in_pod, path: &path, rules };
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

pub(super) async fn remote(ctx: &Context, request: Request) -> Result<Response, i32> {
    match ctx.tunnel.request(request, ctx.remote_timeout).await {
        Ok(Response::Error(errno)) => Err(errno.0),
        Ok(response) => Ok(response),
        Err(e) => Err(tunnel_errno(&e)),
    }
}

/// A request about a pod path, served by the agent with `who`'s credentials, so the pod's
/// permissions apply to the app as in the pod. An agent older than protocol 5 serves it as
/// root (the app then reads what its user could not in the pod). What the app's closed
/// descriptors wrote is in the pod first (see `writeback`).
pub(super) async fn remote_as(ctx: &Context, who: &Identity, request: Request) -> Result<Response, i32> {
    ctx.writebacks.settle().await;
    if ctx.tunnel.version() < kmirror_protocol::CREDENTIALS_VERSION {
        let request = match request {
            Request::AccessAt { path, mode, .. } => Request::Access { path, mode },
            request => request,
        };
        return remote(ctx, request).await;
    }
    match ctx.tunnel.request_as(who.clone(), request, ctx.remote_timeout).await {
        Ok(Response::Error(errno)) => Err(errno.0),
        Ok(response) => Ok(response),
        Err(e) => Err(tunnel_errno(&e)),
    }
}

pub(super) async fn remote_stat(
    ctx: &Context,
    who: &Identity,
    path: &[u8],
    follow: bool,
) -> Result<FileStat, i32> {
    match remote_as(ctx, who, Request::Stat { path: path.to_vec(), follow }).await? {
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
    // The mode `virtual_stat` reports, so fstat of the descriptor agrees with stat of the path.
    use std::os::unix::fs::PermissionsExt;
    memfd.as_file().set_permissions(std::fs::Permissions::from_mode(0o644)).map_err(errno_of)?;
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
        libc::SYS_creat => {
            (libc::AT_FDCWD, n.args[0], libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC, n.args[1] as u32, 0)
        }
        libc::SYS_openat => (n.args[0] as i32, n.args[1], n.args[2] as i32, n.args[3] as u32, 0),
        _ => match read_open_how(&n) {
            Some(Ok(how)) => (n.args[0] as i32, n.args[1], how.flags as i32, how.mode as u32, how.resolve),
            // `how` is one the kernel refuses before it looks at the path: its answer.
            Some(Err(errno)) => return answer(ctx, &n, Err(errno)),
            // Too small, too large or unreadable: the kernel's to refuse as it does.
            None => return ctx.interceptor.continue_call(n.id),
        },
    };
    // O_PATH ignores every flag that would write.
    let write = flags & libc::O_PATH == 0
        && (flags & (libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND) != 0
            || flags & libc::O_TMPFILE == libc::O_TMPFILE);
    let follow_last = flags & libc::O_NOFOLLOW == 0;
    let arg = PathArg { dirfd, ptr: path_ptr, write, resolve, follow_last, empty_is_fd: false };
    with_plan(ctx, n, arg, move |ctx, n, plan| match plan {
        Plan::Local => ctx.interceptor.continue_call(n.id),
        Plan::Missing => answer(ctx, &n, Err(libc::ENOENT)),
        Plan::LocalAt(path) => as_app(
            ctx,
            n,
            // The walk that found this path applied the scope flags already.
            move |caller| localfs::open(caller, &path, flags, mode, resolve & !walk::SCOPES),
            move |ctx, n, result| deliver_fd(ctx, n, result, flags),
        ),
        Plan::Virtual(v) => {
            let result = if flags & libc::O_DIRECTORY != 0 {
                Err(libc::ENOTDIR)
            } else if flags & libc::O_PATH != 0 {
                // See `standin` for why not a real O_PATH descriptor.
                virtual_file(ctx, v).and_then(|f| reopen(f.as_raw_fd(), libc::O_ACCMODE).map_err(errno_of))
            } else if write && v == VirtualFile::Hostname {
                super::host::open_for_write(ctx, &n)
            } else if write {
                Err(libc::EACCES)
            } else {
                virtual_file(ctx, v).and_then(|f| reopen(f.as_raw_fd(), libc::O_RDONLY).map_err(errno_of))
            };
            deliver_fd(ctx, &n, result, flags);
        }
        Plan::Remote(path) if write => super::writes::open_for_write(ctx, n, path, flags, mode),
        Plan::Remote(path) => open_pod_file(ctx, n, path, flags),
        Plan::PodFile(file) => {
            let nofollow = if file.follow { 0 } else { libc::O_NOFOLLOW };
            let flags = (flags & !libc::O_NOFOLLOW) | nofollow;
            match write && ctx.files.route(&file.path, true) == FileRoute::Remote {
                true => super::writes::open_for_write(ctx, n, file.path, flags, mode),
                false => open_pod_file(ctx, n, file.path, flags),
            }
        }
    });
}

fn open_pod_file(ctx: &Arc<Context>, n: Notification, path: Vec<u8>, flags: i32) {
    let ctx = ctx.clone();
    super::spawn_answering(ctx.clone(), n.id, async move {
        let result = match identity_of(&n) {
            Ok(who) if flags & libc::O_PATH != 0 => open_path_only(&ctx, &who, &path, flags).await,
            Ok(who) => open_remote(&ctx, &who, &path, flags).await,
            Err(errno) => Err(errno),
        };
        deliver_fd(&ctx, &n, result, flags);
    });
}

/// openat2's `struct open_how`: its first three fields, which are all this kernel knows.
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Reads openat2's `how` (`args[2]`, `args[3]` bytes) as the kernel does: `None` when the
/// kernel refuses it before reading it whole (a size below the first version's or above a
/// page) or cannot read it, `Some(Err)` when the kernel refuses what it says, which the kernel
/// itself tells (see `localfs::check_open_how`).
fn read_open_how(n: &Notification) -> Option<Result<OpenHow, i32>> {
    let size = n.args[3] as usize;
    if !(OPEN_HOW_SIZE..=page_size()).contains(&size) {
        return None;
    }
    let how = tracee::read_bytes(n.tid, n.args[2], size).ok()?;
    if let Err(errno) = localfs::check_open_how(&how) {
        return Some(Err(errno));
    }
    let field = |i: usize| u64::from_ne_bytes(how[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    Some(Ok(OpenHow { flags: field(0), mode: field(1), resolve: field(2) }))
}

fn page_size() -> usize {
    static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|size| usize::try_from(size).ok())
            .unwrap_or(4096)
    })
}

/// openat2's `struct open_how` as its first version: flags, mode, resolve.
const OPEN_HOW_SIZE: usize = 24;

/// `O_PATH` of a pod path: the pod file is looked at, never opened or read (a FIFO, a device,
/// a file of any size), and the app gets a descriptor of a stand-in dressed as it, which the
/// calls about a descriptor map back to the pod file (see `standin`).
async fn open_path_only(ctx: &Context, who: &Identity, path: &[u8], flags: i32) -> Result<OwnedFd, i32> {
    let st = remote_stat(ctx, who, path, flags & libc::O_NOFOLLOW == 0).await?;
    let kind = st.mode & libc::S_IFMT;
    if flags & libc::O_DIRECTORY != 0 && kind != libc::S_IFDIR {
        return Err(libc::ENOTDIR);
    }
    let path = path.to_vec();
    let standins = ctx.standins.clone();
    tokio::task::spawn_blocking(move || standins.make(&path, &st)).await.unwrap_or(Err(libc::EIO))
}

pub(super) fn deliver_fd(ctx: &Context, n: &Notification, result: Result<OwnedFd, i32>, flags: i32) {
    match result {
        Ok(fd) => {
            if ctx.interceptor.is_valid(n.id) {
                ctx.interceptor.return_new_fd(n.id, fd.as_raw_fd(), flags & libc::O_CLOEXEC != 0);
            }
        }
        Err(errno) => answer(ctx, n, Err(errno)),
    }
}

fn errno_of(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// A new open file description of an existing file, with access mode `access` (each app open
/// gets its own file offset).
fn reopen(fd: i32, access: i32) -> std::io::Result<OwnedFd> {
    // Access mode 3 (O_PATH stand-ins) is not among OFlag's named flags: kept as given.
    let flags = nix::fcntl::OFlag::from_bits_retain(access) | nix::fcntl::OFlag::O_CLOEXEC;
    Ok(nix::fcntl::open(format!("/proc/self/fd/{fd}").as_str(), flags, nix::sys::stat::Mode::empty())?)
}

pub(super) async fn open_remote(
    ctx: &Context,
    who: &Identity,
    path: &[u8],
    flags: i32,
) -> Result<OwnedFd, i32> {
    let st = remote_stat(ctx, who, path, flags & libc::O_NOFOLLOW == 0).await?;
    match st.mode & libc::S_IFMT {
        libc::S_IFDIR => {
            let local = materialize_dir(ctx, who, path).await?;
            ctx.standins.note_handed_out();
            Ok(std::fs::File::open(local).map_err(errno_of)?.into())
        }
        _ if flags & libc::O_DIRECTORY != 0 => Err(libc::ENOTDIR),
        libc::S_IFREG => fetch_file(ctx, who, path, &st, flags & libc::O_NOFOLLOW == 0).await,
        libc::S_IFLNK => Err(libc::ELOOP),
        _ => Err(libc::ENXIO),
    }
}

async fn fetch_file(
    ctx: &Context,
    who: &Identity,
    path: &[u8],
    st: &FileStat,
    follow: bool,
) -> Result<OwnedFd, i32> {
    if st.size.max(0) as u64 > MAX_REMOTE_FILE {
        return Err(libc::EFBIG);
    }
    let (id, name) = ctx.pod_fds.next_name();
    let memfd = new_memfd(name.as_bytes())?;
    let read = if ctx.tunnel.version() >= kmirror_protocol::HANDLES_VERSION {
        fetch_by_handle(ctx, who, path, follow, memfd.as_file()).await?
    } else {
        fetch_by_path(ctx, who, path, memfd.as_file()).await?;
        *st
    };
    seal(&memfd)?;
    let app_fd = reopen(memfd.as_file().as_raw_fd(), libc::O_RDONLY).map_err(errno_of)?;
    // After the reopen (a mode without read permission must not stop it): the copy describes
    // the pod's file to fstat, as stat of its path does (calls about the descriptor are
    // answered from the pod through pod_fds; the dressing covers what reads it untrapped).
    dress_as(memfd.as_file(), &read);
    ctx.pod_fds.insert(id, path);
    ctx.standins.note_handed_out();
    Ok(app_fd)
}

/// Gives a fetched copy the pod file's mode, owner and times, as far as this side may: an
/// app that checks its key file's mode (ssh) or compares times sees the pod's. Best effort:
/// without root the owner stays kmirror's.
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
pub(super) struct RemoteHandle<'a> {
    pub ctx: &'a Context,
    pub handle: Option<u64>,
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
    who: &Identity,
    path: &[u8],
    follow: bool,
    mut file: &std::fs::File,
) -> Result<FileStat, i32> {
    let _slot = HANDLE_SLOTS.acquire().await.map_err(|_| libc::EIO)?;
    let opened = remote_as(ctx, who, Request::OpenFile { path: path.to_vec(), follow }).await?;
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
async fn fetch_by_path(
    ctx: &Context,
    who: &Identity,
    path: &[u8],
    mut file: &std::fs::File,
) -> Result<(), i32> {
    let mut offset = 0u64;
    loop {
        let chunk =
            remote_as(ctx, who, Request::ReadFile { path: path.to_vec(), offset, len: READ_CHUNK }).await?;
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
async fn materialize_dir(ctx: &Context, who: &Identity, path: &[u8]) -> Result<std::path::PathBuf, i32> {
    let entries = if ctx.tunnel.version() >= kmirror_protocol::HANDLES_VERSION {
        list_by_handle(ctx, who, path).await?
    } else {
        let Response::ListDir(entries) =
            remote_as(ctx, who, Request::ListDir { path: path.to_vec() }).await?
        else {
            return Err(libc::EIO);
        };
        entries
    };
    // Entries that do not exist for the app (`feature.fs.not_found`) are not listed either.
    let mut entries = entries;
    if !ctx.files.lists.not_found.is_empty() {
        entries.retain(|e| ctx.files.route(&files::join(path, &e.name), false) != FileRoute::NotFound);
    }
    let local = ctx.materialized.join(std::ffi::OsStr::from_bytes(path.strip_prefix(b"/").unwrap_or(path)));
    let dir = local.clone();
    tokio::task::spawn_blocking(move || mirror_entries(&dir, &entries))
        .await
        .map_err(|_| libc::EIO)?
        .map_err(errno_of)?;
    Ok(local)
}

/// Lists a pod directory in as many answers as it takes (one frame holds some 30k names).
async fn list_by_handle(ctx: &Context, who: &Identity, path: &[u8]) -> Result<Vec<DirEntry>, i32> {
    let _slot = HANDLE_SLOTS.acquire().await.map_err(|_| libc::EIO)?;
    let Response::DirEntries { mut entries, more } =
        remote_as(ctx, who, Request::OpenDir { path: path.to_vec() }).await?
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

/// `fstat(fd, buf)`, the system call itself (Go's, musl's; glibc's fstat is `newfstatat` with
/// `AT_EMPTY_PATH`): a descriptor that stands for a pod file is described as the pod's file;
/// every other one is the kernel's (and costs only a check while none was handed out).
pub fn on_fstat(ctx: &Arc<Context>, n: Notification) {
    let (fd, buf) = (n.args[0] as i32, n.args[1]);
    let file = if ctx.standins.any_handed_out() { pod_file_of_fd(ctx, n.tid, fd) } else { None };
    let Some(file) = file else { return ctx.interceptor.continue_call(n.id) };
    let ctx = ctx.clone();
    super::spawn_answering(ctx.clone(), n.id, async move {
        let stat = match identity_of(&n) {
            Ok(who) => remote_stat(&ctx, &who, &file.path, file.follow).await,
            Err(errno) => Err(errno),
        };
        let result = stat.and_then(|st| write_out(&ctx, &n, buf, &abi::encode_stat(&st)));
        answer(&ctx, &n, result.map(|()| 0));
    });
}

pub fn on_stat(ctx: &Arc<Context>, n: Notification) {
    let (dirfd, path_ptr, buf, flags, statx) = match n.nr {
        libc::SYS_stat => (libc::AT_FDCWD, n.args[0], n.args[1], 0, false),
        libc::SYS_lstat => (libc::AT_FDCWD, n.args[0], n.args[1], libc::AT_SYMLINK_NOFOLLOW, false),
        libc::SYS_newfstatat => (n.args[0] as i32, n.args[1], n.args[2], n.args[3] as i32, false),
        _ => (n.args[0] as i32, n.args[1], n.args[4], n.args[2] as i32, true),
    };
    let follow = flags & libc::AT_SYMLINK_NOFOLLOW == 0;
    let encode = move |st: &FileStat| if statx { abi::encode_statx(st) } else { abi::encode_stat(st) };
    let empty_is_fd = flags & libc::AT_EMPTY_PATH != 0;
    let arg = PathArg { dirfd, ptr: path_ptr, write: false, resolve: 0, follow_last: follow, empty_is_fd };
    with_plan(ctx, n, arg, move |ctx, n, plan| match plan {
        Plan::Local => ctx.interceptor.continue_call(n.id),
        Plan::Missing => answer(ctx, &n, Err(libc::ENOENT)),
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
        Plan::Remote(_) | Plan::PodFile(_) => {
            // Through a descriptor, the descriptor says what is followed.
            let (path, follow) = match plan {
                Plan::PodFile(file) => (file.path, file.follow),
                Plan::Remote(path) => (path, follow),
                _ => unreachable!("matched above"),
            };
            let ctx = ctx.clone();
            super::spawn_answering(ctx.clone(), n.id, async move {
                let stat = match identity_of(&n) {
                    Ok(who) => remote_stat(&ctx, &who, &path, follow).await,
                    Err(errno) => Err(errno),
                };
                let result = stat.and_then(|st| write_out(&ctx, &n, buf, &encode(&st)));
                answer(&ctx, &n, result.map(|()| 0));
            });
        }
    });
}

/// Writes an output buffer of an emulated call, after checking the caller is still waiting.
pub(super) fn write_out(ctx: &Context, n: &Notification, addr: u64, bytes: &[u8]) -> Result<(), i32> {
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
    // The kernel refuses these before it looks at the path.
    if mode & !0o7 != 0 || flags & !(libc::AT_EACCESS | libc::AT_SYMLINK_NOFOLLOW | libc::AT_EMPTY_PATH) != 0
    {
        return answer(ctx, &n, Err(libc::EINVAL));
    }
    let follow_last = flags & libc::AT_SYMLINK_NOFOLLOW == 0;
    let empty_is_fd = flags & libc::AT_EMPTY_PATH != 0;
    let arg = PathArg { dirfd, ptr: path_ptr, write: false, resolve: 0, follow_last, empty_is_fd };
    with_plan(ctx, n, arg, move |ctx, n, plan| match plan {
        Plan::Local => ctx.interceptor.continue_call(n.id),
        Plan::Missing => answer(ctx, &n, Err(libc::ENOENT)),
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
        Plan::Remote(path) | Plan::PodFile(files::PodFile { path, .. }) => {
            let ctx = ctx.clone();
            super::spawn_answering(ctx.clone(), n.id, async move {
                // access(2) checks with the real ids unless AT_EACCESS asks for the effective ones.
                let who = caller_of(&n).map(|caller| match flags & libc::AT_EACCESS {
                    0 => caller.credentials.for_real_id_check().identity(),
                    _ => caller.credentials.identity(),
                });
                let follow = flags & libc::AT_SYMLINK_NOFOLLOW == 0;
                let result = match who {
                    Ok(who) => {
                        remote_as(&ctx, &who, Request::AccessAt { path, mode, follow }).await.map(|_| 0)
                    }
                    Err(errno) => Err(errno),
                };
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
    // The link of a descriptor that stands for a pod file names the pod path, as in the pod.
    if dirfd == libc::AT_FDCWD && ctx.standins.any_handed_out() {
        let raw = tracee::read_cstring(n.tid, path_ptr, PATH_MAX).unwrap_or_default();
        let link = files::fd_link(&raw).filter(|link| link.rest.is_empty());
        if let Some(file) = link.as_ref().and_then(|link| own_pod_file(ctx, n.tid, link)) {
            return copy_out(ctx, &n, Ok(file.path));
        }
        // The app's copy of a pod file it writes: the pod path too.
        let copy = link.filter(|link| matches!(link.owner, files::FdOwner::Process | files::FdOwner::Thread));
        let pod_path = copy.and_then(|link| tracee::proc_link(n.tid, &format!("fd/{}", link.fd)).ok());
        if let Some(path) = pod_path.and_then(|target| ctx.writebacks.pod_path_of_link(&target)) {
            return copy_out(ctx, &n, Ok(path));
        }
    }
    // An empty path reads the link a descriptor stands for (Linux 2.6.39).
    let arg =
        PathArg { dirfd, ptr: path_ptr, write: false, resolve: 0, follow_last: false, empty_is_fd: true };
    with_plan(ctx, n, arg, move |ctx, n, plan| match plan {
        Plan::Local => ctx.interceptor.continue_call(n.id),
        Plan::Missing => answer(ctx, &n, Err(libc::ENOENT)),
        Plan::LocalAt(path) => as_app(ctx, n, move |caller| localfs::read_link(caller, &path), copy_out),
        Plan::Virtual(_) => answer(ctx, &n, Err(libc::EINVAL)),
        // readlinkat(fd, "") of a descriptor that is not a symlink's own.
        Plan::PodFile(files::PodFile { follow: true, .. }) => copy_out(ctx, &n, Err(libc::ENOENT)),
        Plan::Remote(path) | Plan::PodFile(files::PodFile { path, .. }) => {
            let ctx = ctx.clone();
            super::spawn_answering(ctx.clone(), n.id, async move {
                let response = match identity_of(&n) {
                    Ok(who) => remote_as(&ctx, &who, Request::ReadLink { path }).await,
                    Err(errno) => Err(errno),
                };
                let target = match response {
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
    let arg = PathArg {
        dirfd: libc::AT_FDCWD,
        ptr: n.args[0],
        write: false,
        resolve: 0,
        follow_last: follow,
        empty_is_fd: false,
    };
    with_plan(ctx, n, arg, move |ctx, n, plan| match plan {
        Plan::Local => ctx.interceptor.continue_call(n.id),
        Plan::Missing => answer(ctx, &n, Err(libc::ENOENT)),
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
        Plan::Virtual(_) => answer(ctx, &n, if list { Ok(0) } else { Err(libc::ENODATA) }),
        // As the kernel checks before it looks for attributes: the path (ENOENT, ENOTDIR,
        // EACCES from the pod), and for a `user.` attribute read permission on the file
        // (xattr_permission); then there is none.
        Plan::Remote(path) | Plan::PodFile(files::PodFile { path, .. }) => {
            let user_name = !list
                && tracee::read_cstring(n.tid, n.args[1], XATTR_NAME_MAX)
                    .is_ok_and(|name| name.starts_with(b"user."));
            let ctx = ctx.clone();
            super::spawn_answering(ctx.clone(), n.id, async move {
                let result = match identity_of(&n) {
                    Ok(who) if user_name => {
                        let request = Request::AccessAt { path, mode: libc::R_OK as u32, follow };
                        remote_as(&ctx, &who, request).await.map(|_| ())
                    }
                    Ok(who) => remote_stat(&ctx, &who, &path, follow).await.map(|_| ()),
                    Err(errno) => Err(errno),
                };
                answer(&ctx, &n, result.and(if list { Ok(0) } else { Err(libc::ENODATA) }));
            });
        }
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
