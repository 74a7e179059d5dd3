//! `chdir`, `fchdir`, `getcwd` and relative `execve` in `read` and `write` modes: a working
//! directory in the pod, kept by kmirror (see `crate::cwd` for why the kernel's cannot be
//! moved there).

use super::files::{self, PathArg, Plan};
use super::{Context, answer};
use crate::caller::Caller;
use crate::intercept::Notification;
use crate::tracee;
use kmirror_protocol::Request;
use std::sync::Arc;

/// Calls trapped besides [`super::TRAPPED`] in `read` and `write` modes.
/// (`execve` cannot be among them: the launcher's own exec of the app would wait for a
/// supervisor that starts serving only once the app runs.)
pub const TRAPPED_FOR_CWD: &[&str] = &["chdir", "fchdir", "getcwd"];

fn tgid_of(tid: u32) -> Option<u32> {
    Caller::of_thread(tid).ok().map(|c| c.tgid)
}

/// Ends a process's pod working directory when it moves to a local one the kernel takes.
fn leaving(ctx: &Context, n: &Notification, local_dir: Option<&[u8]>) {
    if !ctx.cwds.any() {
        return;
    }
    use std::os::unix::ffi::OsStrExt;
    let is_dir = local_dir
        .is_none_or(|dir| std::fs::metadata(std::ffi::OsStr::from_bytes(dir)).is_ok_and(|m| m.is_dir()));
    if let (true, Some(tgid)) = (is_dir, tgid_of(n.tid)) {
        ctx.cwds.set(tgid, None);
    }
}

pub fn on_chdir(ctx: &Arc<Context>, n: Notification) {
    let arg = PathArg {
        dirfd: libc::AT_FDCWD,
        ptr: n.args[0],
        write: false,
        resolve: 0,
        follow_last: true,
        empty_is_fd: false,
    };
    let raw = tracee::read_cstring(n.tid, n.args[0], files::PATH_MAX).unwrap_or_default();
    files::with_plan(ctx, n, arg, move |ctx, n, plan| match plan {
        Plan::Local => {
            // Relative paths here are the kernel's only without a pod working directory.
            leaving(ctx, &n, raw.starts_with(b"/").then_some(&raw[..]));
            ctx.interceptor.continue_call(n.id)
        }
        Plan::Missing => answer(ctx, &n, Err(libc::ENOENT)),
        Plan::Virtual(_) => answer(ctx, &n, Err(libc::ENOTDIR)),
        // A local directory reached through a pod one: the kernel cannot be sent there.
        Plan::LocalAt(_) => answer(ctx, &n, Err(libc::EXDEV)),
        Plan::Remote(path) | Plan::PodFile(crate::policy::files::PodFile { path, .. }) => {
            let ctx = ctx.clone();
            super::spawn_answering(ctx.clone(), n.id, async move {
                let result = enter(&ctx, &n, path).await;
                answer(&ctx, &n, result.map(|()| 0));
            });
        }
    });
}

/// Checks, in the pod and as the app, that `path` is a directory it may search, and makes
/// it the calling process's working directory.
async fn enter(ctx: &Context, n: &Notification, path: Vec<u8>) -> Result<(), i32> {
    let caller = files::caller_of(n)?;
    let who = caller.credentials.identity();
    let st = files::remote_stat(ctx, &who, &path, true).await?;
    if st.mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(libc::ENOTDIR);
    }
    let search = Request::AccessAt { path: path.clone(), mode: libc::X_OK as u32, follow: true };
    files::remote_as(ctx, &who, search).await?;
    ctx.cwds.set(caller.tgid, Some(path));
    Ok(())
}

pub fn on_fchdir(ctx: &Arc<Context>, n: Notification) {
    let fd = n.args[0] as i32;
    let link = tracee::proc_link(n.tid, &format!("fd/{fd}")).ok();
    let pod_dir = link.as_deref().and_then(|link| ctx.files.pod_path_of_fd_link(link));
    let is_dir = || std::fs::metadata(format!("/proc/{}/fd/{fd}", n.tid)).is_ok_and(|m| m.is_dir());
    match pod_dir {
        // A listed pod directory or its O_PATH stand-in: the pod directory it stands for.
        Some(path) if is_dir() => match tgid_of(n.tid) {
            Some(tgid) => {
                ctx.cwds.set(tgid, Some(path));
                answer(ctx, &n, Ok(0));
            }
            None => answer(ctx, &n, Err(libc::ESRCH)),
        },
        _ => {
            if is_dir() {
                leaving(ctx, &n, None);
            }
            ctx.interceptor.continue_call(n.id)
        }
    }
}

pub fn on_getcwd(ctx: &Arc<Context>, n: Notification) {
    let Some(dir) = files::cwd_in_pod(ctx, n.tid) else { return ctx.interceptor.continue_call(n.id) };
    let (buf, size) = (n.args[0], n.args[1] as usize);
    let bytes = [&dir[..], b"\0"].concat();
    let result = if size < bytes.len() {
        Err(libc::ERANGE)
    } else {
        files::write_out(ctx, &n, buf, &bytes).map(|()| bytes.len() as i64)
    };
    answer(ctx, &n, result);
}
