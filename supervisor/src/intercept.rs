//! How a trapped call reaches the handlers and how their answer reaches the kernel, whatever
//! mechanism stopped the call: the handlers see a [`Notification`] and answer through an
//! [`Interceptor`], never a mechanism of their own (docs/ptrace.md).
//!
//! An enum rather than a trait object: the notify path is hot, and a match on a variant that
//! never changes during a session costs a predicted branch, not an indirect call.

use std::os::fd::RawFd;

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
}

impl Interceptor {
    /// Lets the kernel run the call as if it had not been trapped.
    #[inline]
    pub fn continue_call(&self, id: u64) {
        match self {
            Interceptor::Seccomp(listener) => listener.continue_call(id),
        }
    }

    /// Completes the call with a return value, without running it.
    #[inline]
    pub fn return_value(&self, id: u64, val: i64) {
        match self {
            Interceptor::Seccomp(listener) => listener.return_value(id, val),
        }
    }

    /// Completes the call with `-errno`, without running it.
    #[inline]
    pub fn return_errno(&self, id: u64, errno: i32) {
        match self {
            Interceptor::Seccomp(listener) => listener.return_errno(id, errno),
        }
    }

    /// Installs `fd` (a copy of it) in the caller as its lowest free descriptor and completes
    /// the call with that number; `EMFILE` if the caller has no descriptor left.
    #[inline]
    pub fn return_new_fd(&self, id: u64, fd: RawFd, cloexec: bool) {
        match self {
            Interceptor::Seccomp(listener) => listener.return_new_fd(id, fd, cloexec),
        }
    }

    /// True while the call still waits for our answer (its thread was not killed). Check
    /// after reading the caller's memory and before writing its output buffers.
    #[inline]
    pub fn is_valid(&self, id: u64) -> bool {
        match self {
            Interceptor::Seccomp(listener) => listener.is_valid(id),
        }
    }
}
