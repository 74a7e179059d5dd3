//! Raw ptrace and wait calls the tracer needs and nix does not offer in a usable form:
//! restarts with any signal number (nix's `Signal` has no real-time signals, which glibc and
//! the JVM use, and a stop that cannot be decoded must never be lost), `PTRACE_LISTEN`, and
//! `waitpid` statuses decoded by hand for the same reason.

// Unsafe: ptrace requests and waitpid with raw signal numbers; siginfo bytes.
#![allow(unsafe_code)]

use std::io;

pub type Regs = libc::user_regs_struct;

fn check(rc: libc::c_long) -> io::Result<()> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn request(req: libc::c_uint, tid: u32, addr: usize, data: usize) -> io::Result<()> {
    // SAFETY: the requests made through here (CONT, SYSCALL, LISTEN, SEIZE) read no memory of
    // ours: `addr` and `data` are plain numbers for them.
    check(unsafe {
        libc::ptrace(req, tid as libc::pid_t, addr as *mut libc::c_void, data as *mut libc::c_void)
    })
}

/// Attaches `tid` without stopping it, with `options`.
pub fn seize(tid: u32, options: libc::c_int) -> io::Result<()> {
    request(libc::PTRACE_SEIZE, tid, 0, options as usize)
}

/// Resumes a stopped tracee, delivering `sig` (0: none).
pub fn cont(tid: u32, sig: i32) -> io::Result<()> {
    request(libc::PTRACE_CONT, tid, 0, sig as usize)
}

/// Resumes a stopped tracee until its next system-call entry or exit.
pub fn syscall(tid: u32, sig: i32) -> io::Result<()> {
    request(libc::PTRACE_SYSCALL, tid, 0, sig as usize)
}

/// Lets a tracee in group-stop stay stopped, but be woken (and reported) by SIGCONT.
pub fn listen(tid: u32) -> io::Result<()> {
    request(libc::PTRACE_LISTEN, tid, 0, 0)
}

pub fn getregs(tid: u32) -> io::Result<Regs> {
    Ok(nix::sys::ptrace::getregs(nix::unistd::Pid::from_raw(tid as libc::pid_t))?)
}

pub fn setregs(tid: u32, regs: &Regs) -> io::Result<()> {
    Ok(nix::sys::ptrace::setregs(nix::unistd::Pid::from_raw(tid as libc::pid_t), *regs)?)
}

/// The message of the last ptrace event (a new task's id, an exec's former tid).
pub fn event_message(tid: u32) -> io::Result<u64> {
    Ok(nix::sys::ptrace::getevent(nix::unistd::Pid::from_raw(tid as libc::pid_t))? as u64)
}

/// The `siginfo_t` of the signal a tracee is stopped for, as the kernel's 128 bytes.
pub fn siginfo(tid: u32) -> io::Result<[u8; 128]> {
    let info = nix::sys::ptrace::getsiginfo(nix::unistd::Pid::from_raw(tid as libc::pid_t))?;
    const _: () = assert!(std::mem::size_of::<libc::siginfo_t>() == 128);
    // SAFETY: siginfo_t is a plain 128-byte C struct (checked above); every byte pattern is a
    // valid [u8; 128].
    Ok(unsafe { std::mem::transmute::<libc::siginfo_t, [u8; 128]>(info) })
}

/// A non-blocking, close-on-exec eventfd: how other threads wake the tracer.
pub fn eventfd() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// A close-on-exec copy of a descriptor the caller holds open.
pub fn dup_cloexec(fd: std::os::fd::RawFd) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: the caller keeps `fd` open for the duration of this call.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    borrowed.try_clone_to_owned()
}

/// What one `waitpid` status says about a tracee.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// `PTRACE_EVENT_SECCOMP`: stopped in a call the filter traces.
    Seccomp,
    /// A system-call entry or exit stop (`PTRACE_SYSCALL`, with TRACESYSGOOD).
    Syscall,
    /// A signal is about to be delivered (`sig`): signal-delivery-stop.
    Signal(i32),
    /// `PTRACE_EVENT_STOP` with this signal: group-stop for a stop signal, else a new task's
    /// first stop (SIGTRAP) or a wake-up from `PTRACE_LISTEN`.
    Stop(i32),
    /// A new task was made (clone, fork, vfork); it is attached already.
    NewTask,
    /// The tracee exec'd.
    Exec,
    /// Another ptrace event kmirror does not ask for.
    Other,
    /// The tracee exited or was killed: it is gone.
    Gone,
}

/// Decodes a wait status (see wait(2) and ptrace(2)).
pub fn decode(status: i32) -> Event {
    if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
        return Event::Gone;
    }
    if !libc::WIFSTOPPED(status) {
        return Event::Other;
    }
    let sig = libc::WSTOPSIG(status);
    if sig == libc::SIGTRAP | 0x80 {
        return Event::Syscall;
    }
    match status >> 16 {
        0 => Event::Signal(sig),
        libc::PTRACE_EVENT_SECCOMP => Event::Seccomp,
        libc::PTRACE_EVENT_STOP => Event::Stop(sig),
        libc::PTRACE_EVENT_CLONE | libc::PTRACE_EVENT_FORK | libc::PTRACE_EVENT_VFORK => Event::NewTask,
        libc::PTRACE_EVENT_EXEC => Event::Exec,
        _ => Event::Other,
    }
}

/// One status of a tracee of this thread, without blocking: `None` when none is pending (or
/// there is no tracee at all).
pub fn wait_any() -> Option<(u32, i32)> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG | libc::__WALL | libc::__WNOTHREAD) };
        if pid > 0 {
            return Some((pid as u32, status));
        }
        if pid < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return None;
    }
}

/// The next status of tracee `tid`, blocking.
pub fn wait_for(tid: u32) -> io::Result<i32> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer.
        let pid = unsafe { libc::waitpid(tid as libc::pid_t, &mut status, libc::__WALL) };
        if pid > 0 {
            return Ok(status);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Whether `sig` stops a process by default (a group-stop under job control).
pub fn is_stop_signal(sig: i32) -> bool {
    matches!(sig, libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU)
}

/// A system call made directly (tests use it to make calls as the app's thread would).
#[cfg(test)]
pub fn raw_syscall(nr: libc::c_long, args: [u64; 6]) -> libc::c_long {
    // SAFETY: test-only; the callers pass arguments valid for the call they name.
    unsafe { libc::syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Statuses as the kernel builds them: `(event << 16) | (sig << 8) | 0x7f` for stops.
    fn stopped(sig: i32, event: i32) -> i32 {
        (event << 16) | (sig << 8) | 0x7f
    }

    #[test]
    fn wait_statuses_decode_into_events() {
        assert_eq!(decode(stopped(libc::SIGTRAP, libc::PTRACE_EVENT_SECCOMP)), Event::Seccomp);
        assert_eq!(decode(stopped(libc::SIGTRAP | 0x80, 0)), Event::Syscall);
        assert_eq!(decode(stopped(libc::SIGURG, 0)), Event::Signal(libc::SIGURG));
        // Real-time signals (glibc's 32 and 33, the JVM's) decode like any other.
        assert_eq!(decode(stopped(33, 0)), Event::Signal(33));
        assert_eq!(decode(stopped(libc::SIGSTOP, libc::PTRACE_EVENT_STOP)), Event::Stop(libc::SIGSTOP));
        assert_eq!(decode(stopped(libc::SIGTRAP, libc::PTRACE_EVENT_STOP)), Event::Stop(libc::SIGTRAP));
        for event in [libc::PTRACE_EVENT_CLONE, libc::PTRACE_EVENT_FORK, libc::PTRACE_EVENT_VFORK] {
            assert_eq!(decode(stopped(libc::SIGTRAP, event)), Event::NewTask);
        }
        assert_eq!(decode(stopped(libc::SIGTRAP, libc::PTRACE_EVENT_EXEC)), Event::Exec);
        assert_eq!(decode(3 << 8), Event::Gone, "exited with 3");
        assert_eq!(decode(libc::SIGKILL), Event::Gone, "killed");
        assert!(is_stop_signal(libc::SIGTSTP) && !is_stop_signal(libc::SIGCONT));
    }
}
