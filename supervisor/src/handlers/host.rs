//! `uname`: the node name is the pod's host name.

use super::Context;
use crate::policy::host;
use crate::seccomp::Notification;
use crate::uts;
use std::sync::Arc;

pub fn on_uname(ctx: &Arc<Context>, n: Notification) {
    let Some(hostname) = &ctx.pod_hostname else {
        return ctx.listener.continue_call(n.id);
    };
    let Some(local) = uts::local() else {
        return ctx.listener.continue_call(n.id);
    };
    let Some(memory) = super::output_memory(ctx, &n) else {
        return; // The call is gone: nothing to answer.
    };
    match memory.write(n.args[0], &host::with_nodename(&local, hostname)) {
        Ok(()) => ctx.listener.return_value(n.id, 0),
        Err(_) => ctx.listener.return_errno(n.id, libc::EFAULT),
    }
}
