//! `uname`: the node name is the pod's host name.

use super::Context;
use crate::policy::host::{self, UTSNAME_SIZE};
use crate::seccomp::Notification;
use crate::tracee;
use std::sync::Arc;

pub fn on_uname(ctx: &Arc<Context>, n: Notification) {
    let Some(hostname) = &ctx.pod_hostname else {
        return ctx.listener.continue_call(n.id);
    };
    let Some(local) = local_utsname() else {
        return ctx.listener.continue_call(n.id);
    };
    match tracee::write_bytes(n.tid, n.args[0], &host::with_nodename(&local, hostname)) {
        Ok(()) => ctx.listener.return_value(n.id, 0),
        Err(_) => ctx.listener.return_errno(n.id, libc::EFAULT),
    }
}

/// This machine's `struct utsname`, as raw bytes.
fn local_utsname() -> Option<[u8; UTSNAME_SIZE]> {
    // SAFETY: an all-zero utsname is valid; uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname writes one utsname into `uts`.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return None;
    }
    const _: () = assert!(std::mem::size_of::<libc::utsname>() == UTSNAME_SIZE);
    // SAFETY: utsname is plain bytes (six char arrays) of exactly UTSNAME_SIZE.
    Some(unsafe { std::mem::transmute::<libc::utsname, [u8; UTSNAME_SIZE]>(uts) })
}
