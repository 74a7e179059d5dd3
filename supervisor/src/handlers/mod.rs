//! Handling trapped system calls: decode the call, ask the policy, act through the mechanism
//! modules, answer the kernel.
//!
//! [`dispatch`] runs on the notify thread. Calls that can be decided from local state (the
//! large majority: local paths, local destinations, unknown sockets) are answered right there,
//! in microseconds — important because Go makes `getpeername` as a raw syscall that holds up
//! its garbage collector. Calls that need the pod are handed to tokio and run concurrently.

mod cwd;
mod datagram;
mod files;
pub mod host;
mod net;
mod pod_fds;
mod writes;
pub use cwd::TRAPPED_FOR_CWD;
pub use net::subscribe_listener;
pub use writes::TRAPPED_FOR_WRITES;

use crate::intercept::{Interceptor, Notification};
use crate::outgoing::Proxy;
use crate::policy::files::{FilePolicy, VirtualFile};
use crate::policy::incoming::IncomingPolicy;
use crate::policy::net::OutgoingPolicy;
use kmirror_protocol::tunnel::Tunnel;
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::unix::AsyncFd;

/// Calls the filter sends to the supervisor.
pub const TRAPPED: &[&str] = &[
    "connect",
    "listen",
    "accept",
    "accept4",
    "sendmsg",
    "sendmmsg",
    "getpeername",
    "getsockname",
    "open",
    "openat",
    "openat2",
    "stat",
    "lstat",
    "fstat",
    "newfstatat",
    "statx",
    "access",
    "faccessat",
    "faccessat2",
    "readlink",
    "readlinkat",
    "getxattr",
    "lgetxattr",
    "listxattr",
    "llistxattr",
    "uname",
    "sethostname",
];

/// Calls trapped only when an argument is set: `sendto` with a destination address and
/// `recvfrom` asking for the sender's (both argument 4).
pub const TRAPPED_WITH_ARG: &[(&str, u32)] = &[("sendto", 4), ("recvfrom", 4)];

/// Calls trapped only when (32-bit) arguments have given values: `getsockopt(SOL_SOCKET,
/// SO_ERROR)`, through which a non-blocking connect's failure is read.
pub const TRAPPED_WHEN_EQUAL: &[(&str, &[(u32, u64)])] =
    &[("getsockopt", &[(1, libc::SOL_SOCKET as u64), (2, libc::SO_ERROR as u64)])];

/// Calls failed with ENOSYS inside the filter: io_uring would bypass every trap, and runtimes
/// (libuv, tokio-uring, liburing users) fall back to plain system calls when it is missing.
pub const DISABLED: &[&str] = &["io_uring_setup", "io_uring_enter", "io_uring_register"];

/// Everything handlers share for one session.
pub struct Context {
    /// How trapped calls are answered (whichever mechanism trapped them).
    pub interceptor: Arc<Interceptor>,
    pub tunnel: Tunnel,
    pub runtime: tokio::runtime::Handle,
    pub outgoing: OutgoingPolicy,
    pub files: FilePolicy,
    pub proxy: Arc<Proxy>,
    /// pidfds of the app's threads, for taking their descriptors.
    pub threads: crate::tracee::ThreadHandles,
    /// Content of the synthesised files, kept in sealed memfds.
    pub virtual_files: HashMap<VirtualFile, std::fs::File>,
    /// Where listings of pod directories are mirrored so the app can read them as directories.
    pub materialized: PathBuf,
    /// Local nodes behind the app's O_PATH descriptors of pod files.
    pub standins: Arc<crate::standin::StandIns>,
    pub incoming: Arc<IncomingPolicy>,
    pub incoming_filter: Option<kmirror_protocol::HttpFilter>,
    /// Pod clients of the loopback connections kmirror makes to the app's listeners.
    pub incoming_peers: Arc<crate::incoming::IncomingPeers>,
    /// The host name the app sees (`uname`, `/proc/sys/kernel/hostname`, `sethostname`).
    pub hostname: host::Hostname,
    /// Pod ports already subscribed (a listener may be re-created).
    pub subscribed: Mutex<std::collections::HashSet<u16>>,
    /// Upper bound of any single request to the agent.
    pub remote_timeout: Duration,
    /// The pod files behind the memfd copies handed to the app.
    pub pod_fds: pod_fds::PodFds,
    /// Which names the app resolved to each address (for outgoing filter rules with names).
    pub names: Arc<crate::names::NameBook>,
    /// The app's copies of pod files it has open for writing.
    pub writebacks: Arc<crate::writeback::WriteBacks>,
    /// Processes of the app working in a pod directory.
    pub cwds: crate::cwd::Cwds,
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs a handler that answers notification `id` on the runtime. Should it panic, the call
/// fails with EIO rather than leaving the app blocked forever (a second answer to an already
/// answered notification is refused by the kernel and harmless). The panic is caught inside
/// the handler's own task: a watcher task per notification cost a task and a wake-up on every
/// trapped call.
pub fn spawn_answering(
    ctx: Arc<Context>,
    id: u64,
    handler: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let interceptor = ctx.interceptor.clone();
    ctx.runtime.spawn(async move {
        if CatchUnwind(Box::pin(handler)).await.is_err() {
            tracing::error!("a handler panicked; the app's call gets EIO");
            interceptor.return_errno(id, libc::EIO);
        }
    });
}

/// A future that turns a panic while polling its inner future into an `Err`.
struct CatchUnwind<F>(std::pin::Pin<Box<F>>);

impl<F: std::future::Future> std::future::Future for CatchUnwind<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Ok(std::task::Poll::Ready(value)) => std::task::Poll::Ready(Ok(value)),
            Err(panic) => std::task::Poll::Ready(Err(panic)),
        }
    }
}

/// Answers `n` with `result` (a value or an errno). If its caller went away meanwhile, the
/// kernel refuses the answer, which is harmless, so there is no validity check first.
pub fn answer(ctx: &Context, n: &Notification, result: Result<i64, i32>) {
    match result {
        Ok(value) => ctx.interceptor.return_value(n.id, value),
        Err(errno) => ctx.interceptor.return_errno(n.id, errno),
    }
}

/// The calling thread's memory, for writing an emulated call's output buffers; `None` once the
/// call is no longer waiting (nothing may be written, and nothing needs an answer). The memory
/// is opened before the check, so a thread id reused after it cannot redirect the writes.
pub fn output_memory(ctx: &Context, n: &Notification) -> Option<crate::tracee::Memory> {
    let memory = crate::tracee::Memory::open(n.tid).ok()?;
    ctx.interceptor.is_valid(n.id).then_some(memory)
}

/// How often a blocking call emulated here looks for signals sent to the waiting thread: often
/// at first, less often once the wait has lasted [`LONG_WAIT`], so that hundreds of threads
/// idling in emulated calls cost little (600 idle waiters took 65% of a CPU at a steady 20 ms,
/// 14% with this).
const SIGNAL_CHECK_INTERVAL: Duration = Duration::from_millis(20);
const SIGNAL_CHECK_INTERVAL_LONG: Duration = Duration::from_millis(100);
const LONG_WAIT: Duration = Duration::from_secs(1);

pub(super) fn signal_check_interval(waited: Duration) -> Duration {
    if waited < LONG_WAIT { SIGNAL_CHECK_INTERVAL } else { SIGNAL_CHECK_INTERVAL_LONG }
}

/// How a wait in [`wait_for_data`] ended.
pub enum Waited {
    /// `fd` is readable: perform the call.
    Ready,
    /// The deadline passed first.
    TimedOut,
    /// The notification is answered (handed back to the kernel) or gone.
    Answered,
}

/// Waits, for a blocking call performed here, until `fd` is readable or `deadline` passes.
/// Meanwhile the app's thread waits in its trapped call, where only fatal signals reach it, so
/// this also watches the thread's pending signals: once one is pending, the call goes back to
/// the kernel (CONTINUE), whose own call sees the signal and returns as a native one would,
/// restarted after an SA_RESTART handler (and trapped again) or failing with EINTR. Signals so
/// reach a thread blocked here within 20 ms, or 100 ms once it has waited a second (see
/// [`signal_check_interval`]). The wait is a task, not a thread: any number of the app's
/// threads may block in emulated calls at once.
pub async fn wait_for_data(
    ctx: &Context,
    n: &Notification,
    fd: &AsyncFd<OwnedFd>,
    deadline: Option<std::time::Instant>,
) -> Waited {
    let Ok(mut signals) = crate::tracee::SignalWatch::open(n.tid) else {
        // The thread is gone, or its signals cannot be watched: the kernel's call can wait.
        return hand_back(ctx, n);
    };
    let started = std::time::Instant::now();
    loop {
        if !ctx.interceptor.is_valid(n.id) {
            return Waited::Answered;
        }
        if signals.pending().unwrap_or(false) {
            ctx.interceptor.continue_call(n.id);
            return Waited::Answered;
        }
        let interval = signal_check_interval(started.elapsed());
        let slice = match deadline.map(|d| d.saturating_duration_since(std::time::Instant::now())) {
            Some(left) if left.is_zero() => return Waited::TimedOut,
            Some(left) => left.min(interval),
            None => interval,
        };
        match tokio::time::timeout(slice, fd.readable()).await {
            // Readiness may be stale (another thread of the app took what arrived): only a
            // socket that is readable now counts.
            Ok(Ok(mut ready)) => match crate::sockets::wait_readable(fd.get_ref().as_fd(), Duration::ZERO) {
                Ok(true) => return Waited::Ready,
                Ok(false) => ready.clear_ready(),
                Err(_) => return hand_back(ctx, n),
            },
            Ok(Err(_)) => return hand_back(ctx, n),
            Err(_elapsed) => {}
        }
    }
}

/// Hands a call back to the kernel, which reports what is wrong with its descriptor.
fn hand_back(ctx: &Context, n: &Notification) -> Waited {
    ctx.interceptor.continue_call(n.id);
    Waited::Answered
}

/// Registers a descriptor the app waits on with the runtime, for [`wait_for_data`]; `None` if
/// it cannot be waited on (the caller hands the call back to the kernel).
pub fn waitable(fd: OwnedFd) -> Option<AsyncFd<OwnedFd>> {
    crate::sys::register_readable(fd).ok()
}

/// Routes one notification to its handler.
pub fn dispatch(ctx: &Arc<Context>, n: Notification) {
    crate::stats::count(n.nr);
    match n.nr {
        libc::SYS_connect => net::on_connect(ctx, n),
        libc::SYS_getpeername => net::on_getpeername(ctx, n),
        libc::SYS_getsockname => net::on_getsockname(ctx, n),
        libc::SYS_getsockopt => net::on_getsockopt(ctx, n),
        libc::SYS_uname => host::on_uname(ctx, n),
        libc::SYS_sethostname => host::on_sethostname(ctx, n),
        libc::SYS_listen => net::on_listen(ctx, n),
        libc::SYS_accept | libc::SYS_accept4 => net::on_accept(ctx, n),
        libc::SYS_sendto => datagram::on_sendto(ctx, n),
        libc::SYS_recvfrom => datagram::on_recvfrom(ctx, n),
        libc::SYS_sendmsg | libc::SYS_sendmmsg => datagram::on_sendmsg(ctx, n),
        libc::SYS_open | libc::SYS_openat | libc::SYS_openat2 | libc::SYS_creat => files::on_open(ctx, n),
        libc::SYS_rename | libc::SYS_renameat | libc::SYS_renameat2 => writes::on_rename(ctx, n),
        libc::SYS_unlink | libc::SYS_unlinkat | libc::SYS_rmdir => writes::on_unlink(ctx, n),
        libc::SYS_mkdir | libc::SYS_mkdirat => writes::on_mkdir(ctx, n),
        libc::SYS_symlink | libc::SYS_symlinkat => writes::on_symlink(ctx, n),
        libc::SYS_truncate => writes::on_truncate(ctx, n),
        libc::SYS_fsync | libc::SYS_fdatasync => writes::on_fsync(ctx, n),
        libc::SYS_chdir => cwd::on_chdir(ctx, n),
        libc::SYS_fchdir => cwd::on_fchdir(ctx, n),
        libc::SYS_getcwd => cwd::on_getcwd(ctx, n),
        libc::SYS_stat | libc::SYS_lstat | libc::SYS_newfstatat | libc::SYS_statx => files::on_stat(ctx, n),
        libc::SYS_fstat => files::on_fstat(ctx, n),
        libc::SYS_access | libc::SYS_faccessat | libc::SYS_faccessat2 => files::on_access(ctx, n),
        libc::SYS_readlink | libc::SYS_readlinkat => files::on_readlink(ctx, n),
        libc::SYS_getxattr | libc::SYS_lgetxattr | libc::SYS_listxattr | libc::SYS_llistxattr => {
            files::on_xattr(ctx, n)
        }
        _ => ctx.interceptor.continue_call(n.id),
    }
}

/// Maps a tunnel failure to the errno an app would get for an unreachable network resource.
pub fn tunnel_errno(e: &kmirror_protocol::tunnel::TunnelError) -> i32 {
    use kmirror_protocol::tunnel::TunnelError;
    match e {
        TunnelError::Refused(errno) => errno.0,
        TunnelError::Timeout(_) => libc::ETIMEDOUT,
        TunnelError::Closed(_) => libc::ENETUNREACH,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_handler_is_caught_and_a_finishing_one_passes_through() {
        let fine = CatchUnwind(Box::pin(async {
            tokio::task::yield_now().await;
            7
        }));
        assert_eq!(fine.await.ok(), Some(7));
        let panicking = CatchUnwind(Box::pin(async {
            tokio::task::yield_now().await;
            panic!("handler bug");
        }));
        assert!(panicking.await.is_err());
    }

    #[test]
    fn signal_checks_slow_down_once_a_wait_lasts() {
        assert_eq!(signal_check_interval(Duration::ZERO), SIGNAL_CHECK_INTERVAL);
        assert_eq!(signal_check_interval(LONG_WAIT - Duration::from_millis(1)), SIGNAL_CHECK_INTERVAL);
        assert_eq!(signal_check_interval(LONG_WAIT), SIGNAL_CHECK_INTERVAL_LONG);
        assert_eq!(signal_check_interval(Duration::from_secs(3600)), SIGNAL_CHECK_INTERVAL_LONG);
    }
}
