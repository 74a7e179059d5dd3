//! How a trapped call reaches the handlers and how their answer reaches the kernel, whatever
//! mechanism stopped the call: the handlers see a [`Notification`] and answer through an
//! [`Interceptor`], never a mechanism of their own (docs/ptrace.md).
//!
//! An enum rather than a trait object: the notify path is hot, and a match on a variant that
//! never changes during a session costs a predicted branch, not an indirect call.

use std::os::fd::RawFd;

/// Which interceptor a session uses (`--interceptor`, `KMIRROR_INTERCEPTOR`, `interceptor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum InterceptorSetting {
    /// A seccomp listener where one can be installed, else ptrace.
    #[default]
    Auto,
    /// seccomp user notification (fails where a listener cannot be had).
    Seccomp,
    /// ptrace with a SECCOMP_RET_TRACE filter (works under another seccomp listener).
    Ptrace,
}

impl InterceptorSetting {
    pub fn name(self) -> &'static str {
        match self {
            InterceptorSetting::Auto => "auto",
            InterceptorSetting::Seccomp => "seccomp",
            InterceptorSetting::Ptrace => "ptrace",
        }
    }
}

/// The mechanism a session runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Seccomp,
    Ptrace,
}

/// Why no seccomp listener can be installed for the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoListener {
    /// The kernel lacks SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV (Linux 5.19).
    NoWaitKillableRecv,
    /// Another listener supervises kmirror's process already (the kernel allows one per
    /// filter chain): a container runtime's, a sandbox's, an outer kmirror's.
    Busy,
    /// The kernel refused a listener with this errno.
    Refused(i32),
}

impl std::fmt::Display for NoListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoListener::NoWaitKillableRecv => {
                write!(
                    f,
                    "this kernel lacks seccomp WAIT_KILLABLE_RECV, which a listener needs for Go programs \
                     (Linux 5.19 or later)"
                )
            }
            NoListener::Busy => write!(
                f,
                "kmirror already runs under a seccomp listener (a container runtime's, a sandbox's or another \
                 kmirror's), and the kernel allows one per process"
            ),
            NoListener::Refused(errno) => {
                write!(
                    f,
                    "the kernel refused a seccomp listener: {}",
                    std::io::Error::from_raw_os_error(*errno)
                )
            }
        }
    }
}

/// Picks the mechanism for `setting`, given whether a listener can be installed (`listener`
/// is asked only under `auto`: probing costs a fork where kmirror runs under a filter).
pub fn choose(setting: InterceptorSetting, listener: impl FnOnce() -> Result<(), NoListener>) -> Choice {
    match setting {
        InterceptorSetting::Seccomp => Choice { mechanism: Mechanism::Seccomp, because: None },
        InterceptorSetting::Ptrace => Choice { mechanism: Mechanism::Ptrace, because: None },
        InterceptorSetting::Auto => match listener() {
            Ok(()) => Choice { mechanism: Mechanism::Seccomp, because: None },
            Err(why) => Choice { mechanism: Mechanism::Ptrace, because: Some(why) },
        },
    }
}

/// The chosen mechanism, and why `auto` did not take seccomp if it did not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub mechanism: Mechanism,
    pub because: Option<NoListener>,
}

/// One trapped system call.
#[derive(Debug, Clone, Copy)]
pub struct Notification {
    /// Names this stop of this thread; answers and validity checks refer to it.
    pub id: u64,
    /// Thread id of the caller, in our pid namespace.
    pub tid: u32,
    pub nr: i64,
    pub args: [u64; 6],
}

/// The mechanism a session's calls are trapped with.
pub enum Interceptor {
    /// A seccomp user-notification listener.
    Seccomp(crate::seccomp::Listener),
    /// ptrace, with a `SECCOMP_RET_TRACE` filter (docs/ptrace.md).
    Ptrace(crate::ptrace::Tracer),
}

impl Interceptor {
    /// Lets the kernel run the call as if it had not been trapped.
    #[inline]
    pub fn continue_call(&self, id: u64) {
        match self {
            Interceptor::Seccomp(listener) => listener.continue_call(id),
            Interceptor::Ptrace(tracer) => tracer.continue_call(id),
        }
    }

    /// Completes the call with a return value, without running it.
    #[inline]
    pub fn return_value(&self, id: u64, val: i64) {
        match self {
            Interceptor::Seccomp(listener) => listener.return_value(id, val),
            Interceptor::Ptrace(tracer) => tracer.return_value(id, val),
        }
    }

    /// Completes the call with `-errno`, without running it.
    #[inline]
    pub fn return_errno(&self, id: u64, errno: i32) {
        match self {
            Interceptor::Seccomp(listener) => listener.return_errno(id, errno),
            Interceptor::Ptrace(tracer) => tracer.return_errno(id, errno),
        }
    }

    /// Installs `fd` (a copy of it) in the caller as its lowest free descriptor and completes
    /// the call with that number; `EMFILE` if the caller has no descriptor left.
    #[inline]
    pub fn return_new_fd(&self, id: u64, fd: RawFd, cloexec: bool) {
        match self {
            Interceptor::Seccomp(listener) => listener.return_new_fd(id, fd, cloexec),
            Interceptor::Ptrace(tracer) => tracer.return_new_fd(id, fd, cloexec),
        }
    }

    /// True while the call still waits for our answer (its thread was not killed). Check
    /// after reading the caller's memory and before writing its output buffers.
    #[inline]
    pub fn is_valid(&self, id: u64) -> bool {
        match self {
            Interceptor::Seccomp(listener) => listener.is_valid(id),
            Interceptor::Ptrace(tracer) => tracer.is_valid(id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_seccomp_when_a_listener_can_be_had_and_ptrace_otherwise() {
        let auto = InterceptorSetting::Auto;
        assert_eq!(choose(auto, || Ok(())), Choice { mechanism: Mechanism::Seccomp, because: None });
        assert_eq!(
            choose(auto, || Err(NoListener::Busy)),
            Choice { mechanism: Mechanism::Ptrace, because: Some(NoListener::Busy) }
        );
        // An explicit choice never probes.
        let probe = || -> Result<(), NoListener> { panic!("probed") };
        assert_eq!(choose(InterceptorSetting::Seccomp, probe).mechanism, Mechanism::Seccomp);
        assert_eq!(choose(InterceptorSetting::Ptrace, probe).mechanism, Mechanism::Ptrace);
    }

    #[test]
    fn reasons_say_what_stands_in_the_way() {
        assert!(NoListener::Busy.to_string().contains("already runs under a seccomp listener"));
        assert!(NoListener::NoWaitKillableRecv.to_string().contains("5.19"));
        assert!(NoListener::Refused(libc::EPERM).to_string().contains("not permitted"));
    }
}
