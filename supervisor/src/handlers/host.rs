//! The host name the app sees: `uname`'s node name, `sethostname` and the
//! `/proc/sys/kernel/hostname` file (whose reads and writes `handlers::files` routes here).
//!
//! It starts as the pod's host name (or the machine's, when the pod has none). The app may
//! change it, as a pod's processes may change the pod's: the change is kmirror's to keep, seen
//! by the app and every process it starts, and never reaches the developer's machine.

use super::Context;
use crate::intercept::Notification;
use crate::policy::host;
use crate::{caller, tracee, uts};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

/// The host name the app's processes share.
pub struct Hostname(Mutex<String>);

impl Hostname {
    pub fn new(initial: String) -> Hostname {
        Hostname(Mutex::new(initial))
    }

    pub fn get(&self) -> String {
        super::lock(&self.0).clone()
    }

    fn set(&self, name: String) {
        *super::lock(&self.0) = name;
    }
}

/// The machine's own host name, for a pod that names none.
pub fn local_hostname() -> String {
    uts::local().map(|u| host::nodename(&u)).unwrap_or_default()
}

pub fn on_uname(ctx: &Arc<Context>, n: Notification) {
    let Some(local) = uts::local() else {
        return ctx.interceptor.continue_call(n.id);
    };
    let Some(memory) = super::output_memory(ctx, &n) else {
        return; // The call is gone: nothing to answer.
    };
    match memory.write(n.args[0], &host::with_nodename(&local, &ctx.hostname.get())) {
        Ok(()) => ctx.interceptor.return_value(n.id, 0),
        Err(_) => ctx.interceptor.return_errno(n.id, libc::EFAULT),
    }
}

/// Whether the calling thread could change a host name natively: CAP_SYS_ADMIN.
fn may_set(n: &Notification) -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    caller::Caller::of_thread(n.tid).is_ok_and(|c| c.credentials.cap_effective & (1 << CAP_SYS_ADMIN) != 0)
}

/// `sethostname(name, len)`: EPERM without CAP_SYS_ADMIN, EINVAL past 64 bytes, as the kernel.
pub fn on_sethostname(ctx: &Arc<Context>, n: Notification) {
    let len = n.args[1] as usize;
    let result = if len > host::HOST_NAME_MAX {
        Err(libc::EINVAL)
    } else if !may_set(&n) {
        Err(libc::EPERM)
    } else {
        tracee::read_bytes(n.tid, n.args[0], len).map_err(|_| libc::EFAULT).map(|bytes| {
            ctx.hostname.set(String::from_utf8_lossy(&bytes).into_owned());
            0
        })
    };
    super::answer(ctx, &n, result);
}

/// A descriptor for an app that opened `/proc/sys/kernel/hostname` to write: the write end of a
/// pipe whose content, once the app closes it, becomes the host name (without a trailing
/// newline, as the kernel's sysctl takes it). Root only, like the file (mode 0644, root's).
pub fn open_for_write(ctx: &Arc<Context>, n: &Notification) -> Result<OwnedFd, i32> {
    let root = caller::Caller::of_thread(n.tid).map_err(|_| libc::ESRCH)?.credentials.uids[3] == 0;
    if !root {
        return Err(libc::EACCES);
    }
    let may_set = may_set(n);
    let (mut reader, writer) = std::io::pipe().map_err(|e| e.raw_os_error().unwrap_or(libc::EMFILE))?;
    let ctx = ctx.clone();
    ctx.runtime.clone().spawn_blocking(move || {
        let mut written = Vec::new();
        if reader.by_ref().take(host::HOST_NAME_MAX as u64 + 1).read_to_end(&mut written).is_ok()
            && may_set
            && let Some(name) = host::name_written(&written)
        {
            ctx.hostname.set(name);
        }
    });
    Ok(writer.into())
}
