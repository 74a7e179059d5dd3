//! What the running kernel offers, probed once: each feature kmirror's supervisor uses, the
//! kernel that brought it, and what kmirror does without it. Probes ask the kernel directly
//! (a flag it does not know is EINVAL before anything else happens), never the version
//! string: distribution kernels backport features.

// Unsafe: feature probes: raw calls with invalid arguments, a forked child with a filter.
#![allow(unsafe_code)]

use std::sync::OnceLock;

/// One probed feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    /// The mainline release that brought it.
    pub since: &'static str,
    pub present: bool,
    /// What kmirror does when it is missing.
    pub without: Without,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Without {
    /// kmirror cannot run: the reason says why.
    Refuse(&'static str),
    /// kmirror works another way, described here.
    Fallback(&'static str),
}

#[derive(Debug, Clone, Copy)]
pub struct Features {
    pub wait_killable_recv: Feature,
    pub pidfd_getfd: Feature,
    pub openat2: Feature,
    pub thread_pidfd: Feature,
}

impl Features {
    pub fn all(&self) -> [Feature; 4] {
        [self.wait_killable_recv, self.pidfd_getfd, self.openat2, self.thread_pidfd]
    }

    /// The first missing feature kmirror cannot do without, if any.
    pub fn refusal(&self) -> Option<Feature> {
        self.all().into_iter().find(|f| !f.present && matches!(f.without, Without::Refuse(_)))
    }

    /// The first missing feature that `mechanism` cannot do without: a listener cannot do
    /// without WAIT_KILLABLE_RECV, whose fallback is the ptrace interceptor.
    pub fn refusal_for(&self, mechanism: crate::intercept::Mechanism) -> Option<Feature> {
        let listener = self.wait_killable_recv;
        if mechanism == crate::intercept::Mechanism::Seccomp && !listener.present {
            return Some(Feature { without: Without::Refuse(LISTENER_NEEDS_IT), ..listener });
        }
        self.refusal()
    }

    /// Missing features that have a fallback in use.
    pub fn fallbacks(&self) -> Vec<Feature> {
        self.all().into_iter().filter(|f| !f.present && matches!(f.without, Without::Fallback(_))).collect()
    }
}

/// Why a seccomp listener cannot do without WAIT_KILLABLE_RECV.
const LISTENER_NEEDS_IT: &str = "without it Go programs livelock under a seccomp listener (their preemption \
     signal restarts every trapped call forever); --interceptor ptrace (or auto) works without it";

/// The features of this kernel, probed on first use.
pub fn features() -> &'static Features {
    static FEATURES: OnceLock<Features> = OnceLock::new();
    FEATURES.get_or_init(|| Features {
        wait_killable_recv: Feature {
            name: "seccomp WAIT_KILLABLE_RECV",
            since: "5.19",
            present: probe_wait_killable_recv(),
            without: Without::Fallback(
                "the ptrace interceptor (a listener without it livelocks Go programs: their preemption \
                 signal restarts every trapped call forever); --interceptor seccomp is refused",
            ),
        },
        pidfd_getfd: Feature {
            name: "pidfd_getfd",
            since: "5.6",
            present: probe_syscall_exists(libc::SYS_pidfd_getfd),
            without: Without::Refuse("kmirror acts on the app's sockets through copies of their descriptors"),
        },
        openat2: Feature {
            name: "openat2",
            since: "5.6",
            present: probe_syscall_exists(libc::SYS_openat2),
            without: Without::Refuse("pod files are resolved inside the pod's root with RESOLVE_IN_ROOT"),
        },
        thread_pidfd: Feature {
            name: "pidfd of a thread (PIDFD_THREAD)",
            since: "6.9",
            present: crate::tracee::thread_pidfds_supported(),
            without: Without::Fallback(
                "a pidfd of the app's process; each descriptor taken is checked (kcmp) to be the \
                 trapped thread's own",
            ),
        },
    })
}

/// `seccomp(SET_MODE_FILTER)` checks its flags before it reads the filter: an unknown flag is
/// EINVAL, a known one gets as far as the (null) filter pointer, EFAULT. Nothing is installed.
fn probe_wait_killable_recv() -> bool {
    let flags = libc::SECCOMP_FILTER_FLAG_NEW_LISTENER | libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV;
    // SAFETY: a null filter makes the call fail before it changes anything.
    let rc = unsafe {
        libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, flags, std::ptr::null::<u8>())
    };
    rc < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EFAULT)
}

/// A call with invalid arguments: ENOSYS only where the kernel lacks it.
fn probe_syscall_exists(nr: libc::c_long) -> bool {
    // SAFETY: -1 descriptors and null pointers make these calls fail without side effects.
    let rc = unsafe { libc::syscall(nr, -1, std::ptr::null::<u8>(), std::ptr::null::<u8>(), 0) };
    rc >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS)
}

/// The refusal a user sees on a kernel without `feature`.
pub fn refusal_message(feature: &Feature) -> String {
    let why = match feature.without {
        Without::Refuse(why) => why,
        Without::Fallback(_) => "",
    };
    format!(
        "this kernel ({}) lacks {}, which kmirror needs (Linux {} or later): {why}. Run kmirror on a newer \
         kernel (Debian 12 backports, Debian 13 and Ubuntu 22.10 or later have one).",
        release(),
        feature.name,
        feature.since
    )
}

/// SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP (6.6). A session tries it on its own listener and
/// logs a miss; `kmirror features` probes it in a child of its own (a listener needs a filter,
/// which kmirror must not install on itself).
pub fn sync_wake_up() -> Feature {
    Feature {
        name: "seccomp SYNC_WAKE_UP",
        since: "6.6",
        present: probe_sync_wake_up(),
        without: Without::Fallback("works; each answer wakes the app more slowly"),
    }
}

fn probe_sync_wake_up() -> bool {
    let filter = getppid_notify_filter();
    let program = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr().cast_mut() };
    let status = in_child(|| {
        let _ = nix::sys::prctl::set_no_new_privs();
        // SAFETY: raw system calls on memory prepared before the fork.
        unsafe {
            let listener = libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
                &program,
            );
            let ok = listener >= 0
                && libc::ioctl(listener as i32, libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS, 1 as libc::c_ulong) == 0;
            if ok { 0 } else { 1 }
        }
    });
    status == Ok(0)
}

/// An allow-all filter that notifies for one call nobody makes here (getppid): enough for a
/// listener.
fn getppid_notify_filter() -> [libc::sock_filter; 4] {
    let stmt = |code: u32, k: u32| libc::sock_filter { code: code as u16, jt: 0, jf: 0, k };
    [
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            jf: 1,
            k: libc::SYS_getppid as u32,
        },
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_USER_NOTIF),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Runs `probe` in a forked child, which leaves with the status `probe` returns: the status,
/// or the errno of a failed fork or wait. `probe` may make only raw system calls on memory
/// prepared before the fork (kmirror has threads).
fn in_child(probe: impl FnOnce() -> i32) -> Result<i32, i32> {
    // SAFETY: the child runs `probe` (raw system calls only, see above) and leaves with _exit.
    let child = unsafe { libc::fork() };
    if child == 0 {
        let status = probe();
        // SAFETY: ends the child without running anything of the parent's.
        unsafe { libc::_exit(status) };
    }
    if child < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EAGAIN));
    }
    use nix::sys::wait::{WaitStatus, waitpid};
    match waitpid(nix::unistd::Pid::from_raw(child), None) {
        Ok(WaitStatus::Exited(_, status)) => Ok(status),
        _ => Err(libc::ECHILD),
    }
}

/// Whether the app could be given a seccomp listener (see docs/ptrace.md, *Choosing the
/// interceptor*). Free when kmirror runs under no seccomp filter (the usual case); otherwise a
/// forked child tries to install one, since only the kernel knows whether a filter of the chain
/// has a listener already.
pub fn listener_available() -> Result<(), crate::intercept::NoListener> {
    use crate::intercept::NoListener;
    if !features().wait_killable_recv.present {
        return Err(NoListener::NoWaitKillableRecv);
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if crate::tracee::status_field(&status, "Seccomp_filters:") == Some("0") {
        return Ok(());
    }
    match probe_listener() {
        0 => Ok(()),
        libc::EBUSY => Err(NoListener::Busy),
        errno => Err(NoListener::Refused(errno)),
    }
}

/// Installs a listener the way the app's launcher does, in a forked child: 0, or the errno.
fn probe_listener() -> i32 {
    let filter = getppid_notify_filter();
    let program = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr().cast_mut() };
    let status = in_child(|| {
        // SAFETY: raw system calls on memory prepared before the fork.
        unsafe {
            let flags = libc::SECCOMP_FILTER_FLAG_NEW_LISTENER | libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV;
            let mut rc = libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, flags, &program);
            if rc < 0 && *libc::__errno_location() == libc::EACCES {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                rc = libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, flags, &program);
            }
            if rc >= 0 { 0 } else { (*libc::__errno_location()).clamp(1, 255) }
        }
    });
    status.unwrap_or_else(|errno| errno)
}

/// A table of every feature, one line each, for `kmirror features`.
pub fn report(features: &Features) -> String {
    let mut out = format!("kernel {}\n", release());
    for f in features.all().into_iter().chain([sync_wake_up()]) {
        let (state, note) = match (f.present, f.without) {
            (true, _) => ("present", String::new()),
            (false, Without::Fallback(how)) => ("fallback", format!(": {how}")),
            (false, Without::Refuse(why)) => ("MISSING", format!(": kmirror cannot run ({why})")),
        };
        out.push_str(&format!("{:<36} Linux {:<5} {state}{note}\n", f.name, f.since));
    }
    out
}

/// The running kernel's release string (`uname -r`).
pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_has_what_the_test_machine_has() {
        // The development and CI machines run 6.18: every probe must find its feature, so a
        // broken probe (one that reports a fallback where none is needed) fails here.
        let features = features();
        for feature in features.all() {
            assert!(feature.present, "{} not found on {}", feature.name, release());
        }
        assert!(features.refusal().is_none());
        assert!(features.fallbacks().is_empty());
        assert!(sync_wake_up().present, "SYNC_WAKE_UP on {}", release());
    }

    #[test]
    fn refusals_and_fallbacks_are_told_apart() {
        use crate::intercept::Mechanism;
        let mut features = *features();
        features.thread_pidfd.present = false;
        assert_eq!(features.fallbacks().len(), 1);
        assert!(features.refusal().is_none());
        // Without WAIT_KILLABLE_RECV: the ptrace interceptor instead; a listener is refused.
        features.wait_killable_recv.present = false;
        assert_eq!(features.fallbacks().len(), 2);
        assert_eq!(features.refusal(), None);
        assert_eq!(features.refusal_for(Mechanism::Ptrace), None, "ptrace needs no listener");
        let refused = features.refusal_for(Mechanism::Seccomp).unwrap();
        let message = refusal_message(&refused);
        assert!(message.contains("WAIT_KILLABLE_RECV") && message.contains("5.19"), "{message}");
        assert!(message.contains("--interceptor ptrace"), "{message}");
        features.openat2.present = false;
        assert_eq!(features.refusal_for(Mechanism::Ptrace).map(|f| f.name), Some("openat2"));
        assert_eq!(features.refusal().map(|f| f.name), Some("openat2"));
    }

    #[test]
    fn a_listener_can_be_had_outside_a_sandbox_and_not_under_a_listener() {
        // This test process runs under no filter: the free answer.
        assert_eq!(listener_available(), Ok(()));
        assert_eq!(probe_listener(), 0, "a forked child installs one");
        // Under a listener (a child that installed one first), another is refused with EBUSY.
        // SAFETY: the child makes raw system calls and the probe (fork, seccomp, waitpid) only,
        // then leaves with _exit.
        let child = unsafe { libc::fork() };
        if child == 0 {
            let first = probe_filter_with_listener();
            let second = if first { probe_listener() } else { 254 };
            // SAFETY: as above.
            unsafe { libc::_exit(second) };
        }
        use nix::sys::wait::{WaitStatus, waitpid};
        let status = waitpid(nix::unistd::Pid::from_raw(child), None).unwrap();
        assert_eq!(status, WaitStatus::Exited(nix::unistd::Pid::from_raw(child), libc::EBUSY));
    }

    /// Installs a listener on the calling (forked) process itself.
    fn probe_filter_with_listener() -> bool {
        let filter = [libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        }];
        let program = libc::sock_fprog { len: 1, filter: filter.as_ptr().cast_mut() };
        // SAFETY: a valid one-instruction program; the listener descriptor is left open.
        unsafe {
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
                &program,
            ) >= 0
        }
    }

    #[test]
    fn a_missing_system_call_is_told_from_a_failing_one() {
        assert!(probe_syscall_exists(libc::SYS_openat2));
        assert!(!probe_syscall_exists(100_000), "an unknown number is ENOSYS");
    }
}
