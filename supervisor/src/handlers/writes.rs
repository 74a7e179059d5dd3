//! The write family for pod paths, in sessions whose writes reach the pod (`--fs-mode write`,
//! `feature.fs.read_write`): opens for writing (`open`/`openat`/`openat2`/`creat` with write
//! flags), `rename(at,at2)`, `unlink(at)`, `rmdir`, `mkdir(at)`, `symlink(at)`, `truncate`,
//! and `fsync`/`fdatasync` of the app's copies of pod files. Only those sessions trap these
//! calls (see [`TRAPPED_FOR_WRITES`]); a path the policy keeps local is the kernel's.
//!
//! The data path is `writeback`'s: the app writes a local copy, written back to the pod file
//! through an agent handle when its descriptors close and on `fsync`.

use super::files::{self, PathArg, Plan};
use super::{Context, answer};
use crate::intercept::Notification;
use crate::tracee;
use crate::writeback;
use kmirror_protocol::{Request, Response};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// Calls trapped besides [`super::TRAPPED`] when writes reach the pod.
pub const TRAPPED_FOR_WRITES: &[&str] = &[
    "creat",
    "rename",
    "renameat",
    "renameat2",
    "unlink",
    "unlinkat",
    "rmdir",
    "mkdir",
    "mkdirat",
    "symlink",
    "symlinkat",
    "truncate",
    "fsync",
    "fdatasync",
];

/// An open of a pod path for writing: the agent opens (creates, truncates) the pod file as the
/// app, and the app gets a descriptor of a local copy that is written back to it.
pub fn open_for_write(ctx: &Arc<Context>, n: Notification, path: Vec<u8>, flags: i32, mode: u32) {
    let ctx = ctx.clone();
    super::spawn_answering(ctx.clone(), n.id, async move {
        let result = open_copy(&ctx, &n, &path, flags, mode).await;
        files::deliver_fd(&ctx, &n, result, flags);
    });
}

async fn open_copy(
    ctx: &Context,
    n: &Notification,
    path: &[u8],
    flags: i32,
    mode: u32,
) -> Result<OwnedFd, i32> {
    // An unnamed file in a pod directory has no copy to stand for it; callers fall back.
    if flags & libc::O_TMPFILE == libc::O_TMPFILE {
        return Err(libc::EOPNOTSUPP);
    }
    if ctx.tunnel.version() < kmirror_protocol::WRITES_VERSION {
        return Err(libc::EROFS);
    }
    let caller = files::caller_of(n)?;
    let who = caller.credentials.identity();
    let request = Request::OpenWrite {
        path: path.to_vec(),
        flags: flags as u32,
        mode,
        umask: caller.credentials.umask,
    };
    let Response::WriteOpened { handle, stat, bytes, more } = files::remote_as(ctx, &who, request).await?
    else {
        return Err(libc::EIO);
    };
    let mut held = files::RemoteHandle { ctx, handle: Some(handle) };
    if flags & libc::O_ACCMODE == libc::O_RDONLY {
        // O_CREAT or O_TRUNC with a read-only descriptor: created or truncated in the pod now;
        // the app reads the pod file as any read-only open does.
        drop(held);
        let read = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC);
        return files::open_remote(ctx, &who, path, read).await;
    }
    if more && stat.size.max(0) as u64 > files::MAX_REMOTE_FILE {
        return Err(libc::EFBIG);
    }
    let copy = ctx.writebacks.new_copy()?;
    let filled = fill(ctx, handle, &copy, bytes, more).await;
    let append = flags & libc::O_APPEND != 0;
    let sent = match filled {
        // A write-only append starts from a sparse copy of the pod file's size (no content):
        // what the app appends lies beyond it, and only that is sent.
        Ok(_) if append && flags & libc::O_ACCMODE == libc::O_WRONLY => {
            copy.file.set_len(stat.size.max(0) as u64).map(|()| stat.size.max(0) as u64).map_err(errno_of)
        }
        other => other,
    };
    let sent = match sent {
        Ok(sent) => sent,
        Err(errno) => {
            let _ = std::fs::remove_file(&copy.path);
            return Err(errno);
        }
    };
    let opened = writeback::Opened { handle, stat, append, sent, flags };
    let fd = ctx.writebacks.register(path, copy, opened)?;
    held.handle = None;
    // Its /proc link is looked up from now on (readlink names the pod path).
    ctx.standins.note_handed_out();
    Ok(fd)
}

fn errno_of(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// Fills a new copy with the pod file's content (its first bytes, then the rest through the
/// handle); the bytes copied.
async fn fill(
    ctx: &Context,
    handle: u64,
    copy: &writeback::NewCopy,
    first: Vec<u8>,
    mut more: bool,
) -> Result<u64, i32> {
    let mut file = &copy.file;
    file.write_all(&first).map_err(errno_of)?;
    let mut copied = first.len() as u64;
    while more {
        let chunk = files::remote(ctx, Request::ReadHandle { handle, len: files::READ_CHUNK }).await?;
        let Response::FileChunk { bytes, eof } = chunk else { return Err(libc::EIO) };
        file.write_all(&bytes).map_err(errno_of)?;
        copied += bytes.len() as u64;
        if copied > files::MAX_REMOTE_FILE {
            return Err(libc::EFBIG);
        }
        more = !eof && !bytes.is_empty();
    }
    Ok(copied)
}

fn write_arg(dirfd: i32, ptr: u64, follow_last: bool) -> PathArg {
    PathArg { dirfd, ptr, write: true, resolve: 0, follow_last, empty_is_fd: false }
}

/// Serves a call on one path: the kernel's when local, the agent's (as the app) for a pod
/// path. A path that walks out of a pod directory to a local one is EXDEV (docs/files.md).
fn on_path(
    ctx: &Arc<Context>,
    n: Notification,
    arg: PathArg,
    request: impl FnOnce(Vec<u8>, &crate::caller::Caller) -> Request + Send + 'static,
) {
    files::with_plan(ctx, n, arg, move |ctx, n, plan| match plan {
        Plan::Local => ctx.interceptor.continue_call(n.id),
        Plan::Missing => answer(ctx, &n, Err(libc::ENOENT)),
        Plan::Remote(path) => {
            let ctx = ctx.clone();
            super::spawn_answering(ctx.clone(), n.id, async move {
                let result = match files::caller_of(&n) {
                    Ok(caller) => {
                        let request = request(path, &caller);
                        let who = caller.credentials.identity();
                        files::remote_as(&ctx, &who, request).await.map(|_| 0)
                    }
                    Err(errno) => Err(errno),
                };
                answer(&ctx, &n, result);
            });
        }
        Plan::LocalAt(_) | Plan::Virtual(_) | Plan::PodFile(_) => answer(ctx, &n, Err(libc::EXDEV)),
    });
}

pub fn on_unlink(ctx: &Arc<Context>, n: Notification) {
    let (dirfd, ptr, dir) = match n.nr {
        libc::SYS_unlink => (libc::AT_FDCWD, n.args[0], false),
        libc::SYS_rmdir => (libc::AT_FDCWD, n.args[0], true),
        _ => {
            let flags = n.args[2] as i32;
            if flags & !libc::AT_REMOVEDIR != 0 {
                return answer(ctx, &n, Err(libc::EINVAL));
            }
            (n.args[0] as i32, n.args[1], flags & libc::AT_REMOVEDIR != 0)
        }
    };
    on_path(ctx, n, write_arg(dirfd, ptr, false), move |path, _| Request::Unlink { path, dir });
}

pub fn on_mkdir(ctx: &Arc<Context>, n: Notification) {
    let (dirfd, ptr, mode) = match n.nr {
        libc::SYS_mkdir => (libc::AT_FDCWD, n.args[0], n.args[1] as u32),
        _ => (n.args[0] as i32, n.args[1], n.args[2] as u32),
    };
    on_path(ctx, n, write_arg(dirfd, ptr, false), move |path, caller| Request::MakeDir {
        path,
        mode,
        umask: caller.credentials.umask,
    });
}

pub fn on_symlink(ctx: &Arc<Context>, n: Notification) {
    let (target_ptr, dirfd, ptr) = match n.nr {
        libc::SYS_symlink => (n.args[0], libc::AT_FDCWD, n.args[1]),
        _ => (n.args[0], n.args[1] as i32, n.args[2]),
    };
    let target = match tracee::read_cstring(n.tid, target_ptr, files::PATH_MAX) {
        Ok(target) => target,
        // Unreadable or too long: the kernel's own errno.
        Err(_) => return ctx.interceptor.continue_call(n.id),
    };
    on_path(ctx, n, write_arg(dirfd, ptr, false), move |path, _| Request::Symlink { target, path });
}

pub fn on_truncate(ctx: &Arc<Context>, n: Notification) {
    let len = n.args[1] as i64;
    if len < 0 {
        return answer(ctx, &n, Err(libc::EINVAL));
    }
    on_path(ctx, n, write_arg(libc::AT_FDCWD, n.args[0], true), move |path, _| Request::Truncate {
        path,
        len: len as u64,
    });
}

pub fn on_rename(ctx: &Arc<Context>, n: Notification) {
    let (from_dir, from_ptr, to_dir, to_ptr, flags) = match n.nr {
        libc::SYS_rename => (libc::AT_FDCWD, n.args[0], libc::AT_FDCWD, n.args[1], 0),
        libc::SYS_renameat => (n.args[0] as i32, n.args[1], n.args[2] as i32, n.args[3], 0),
        _ => (n.args[0] as i32, n.args[1], n.args[2] as i32, n.args[3], n.args[4] as u32),
    };
    let (from, to) = (write_arg(from_dir, from_ptr, false), write_arg(to_dir, to_ptr, false));
    files::with_plan(ctx, n, from, move |ctx, n, from| {
        files::with_plan(ctx, n, to, move |ctx, n, to| match (from, to) {
            (Plan::Local, Plan::Local) => ctx.interceptor.continue_call(n.id),
            (Plan::Missing, _) | (_, Plan::Missing) => answer(ctx, &n, Err(libc::ENOENT)),
            (Plan::Remote(from), Plan::Remote(to)) => {
                let ctx = ctx.clone();
                super::spawn_answering(ctx.clone(), n.id, async move {
                    let result = match files::identity_of(&n) {
                        Ok(who) => {
                            files::remote_as(&ctx, &who, Request::Rename { from, to, flags }).await.map(|_| 0)
                        }
                        Err(errno) => Err(errno),
                    };
                    answer(&ctx, &n, result);
                });
            }
            // Between the pod and this machine, as between two file systems: `mv` copies.
            _ => answer(ctx, &n, Err(libc::EXDEV)),
        })
    });
}

/// `fsync`/`fdatasync` of the app's copy of a pod file: written back and synced in the pod
/// before the call returns. Every other descriptor is the kernel's.
pub fn on_fsync(ctx: &Arc<Context>, n: Notification) {
    if !ctx.writebacks.any() {
        return ctx.interceptor.continue_call(n.id);
    }
    let link = tracee::proc_link(n.tid, &format!("fd/{}", n.args[0] as i32)).unwrap_or_default();
    if ctx.writebacks.pod_path_of_link(&link).is_none() {
        return ctx.interceptor.continue_call(n.id);
    }
    let data_only = n.nr == libc::SYS_fdatasync;
    let ctx = ctx.clone();
    super::spawn_answering(ctx.clone(), n.id, async move {
        match ctx.writebacks.sync(&link, data_only).await {
            Some(result) => answer(&ctx, &n, result.map(|()| 0)),
            None => ctx.interceptor.continue_call(n.id),
        }
    });
}
