//! Passing termination signals on to the app.
//!
//! A signal sent to kmirror with kill(2) (systemd stopping a unit, `kill <pid>`, a CI runner's
//! timeout) is forwarded to the app's main process. A signal the terminal generated (Ctrl-C,
//! hang-up) already reached every process of the foreground process group, which the app
//! shares with kmirror, so forwarding it would deliver it twice; such signals are recognised by
//! `si_code == SI_KERNEL` and not forwarded. Once the main process has exited, kmirror is only
//! waiting for the rest of the tree, and [`route`] decides what a signal does then.

// Unsafe: the SA_SIGINFO handler, and dying of the app's signal (real-time ones too).
#![allow(unsafe_code)]

use std::os::fd::{AsFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

pub const FORWARDED: &[i32] =
    &[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2];
const SI_KERNEL: i32 = 0x80;

static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to SA_SIGINFO handlers; write(2) is
    // async-signal-safe and errno is restored.
    unsafe {
        let saved = *libc::__errno_location();
        let from_terminal = !info.is_null() && (*info).si_code == SI_KERNEL;
        let msg = [sig as u8, from_terminal as u8];
        libc::write(PIPE_WRITE.load(Ordering::Relaxed), msg.as_ptr().cast(), 2);
        *libc::__errno_location() = saved;
    }
}

/// Installs the handlers; from now on [`FORWARDED`] signals no longer kill kmirror itself.
/// Returns the read end of the pipe the handler reports to.
pub fn install() -> std::io::Result<OwnedFd> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal};
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // The handler writes to it for the rest of kmirror's life.
    PIPE_WRITE.store(write.into_raw_fd(), Ordering::Relaxed);
    let action = SigAction::new(
        SigHandler::SigAction(on_signal),
        SaFlags::SA_SIGINFO | SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for &sig in FORWARDED {
        // SAFETY: the handler only makes async-signal-safe calls (see `on_signal`).
        unsafe { nix::sys::signal::sigaction(Signal::try_from(sig)?, &action) }?;
    }
    Ok(read)
}

/// A signal kmirror received, and whether the terminal generated it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub sig: i32,
    pub from_terminal: bool,
}

/// Reports received signals on `to` until the pipe closes (runs on its own thread); the
/// session decides with [`route`] where they go.
pub fn report_to(read: OwnedFd, to: tokio::sync::mpsc::UnboundedSender<Received>) {
    std::thread::Builder::new()
        .name("kmirror-signals".into())
        .spawn(move || {
            let mut msg = [0u8; 2];
            loop {
                match nix::unistd::read(&read, &mut msg) {
                    Ok(2) => {
                        let received = Received { sig: msg[0] as i32, from_terminal: msg[1] != 0 };
                        if to.send(received).is_err() {
                            return;
                        }
                    }
                    Err(nix::errno::Errno::EINTR) => {}
                    _ => return,
                }
            }
        })
        .expect("cannot start the signal thread");
}

/// Where a received signal goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// To the main process (pidfd).
    Main,
    /// Nowhere: the terminal already delivered it to the main process's group.
    Nowhere,
    /// To the processes left after the main process exited (only those outside kmirror's
    /// process group if the terminal sent it, as the others already have it); with
    /// `then_end`, those still running after a grace period are SIGKILLed.
    Rest { outside_group_only: bool, then_end: bool },
}

/// While the main process runs, signals are its own, as they always were. After it exited,
/// kmirror only waits for the rest of the tree, which cannot outlive kmirror: a signal whose
/// default action would have ended kmirror (interrupt, quit, termination, hang-up) is passed
/// on and then ends the rest, so that Ctrl-C or a service manager's stop gets its answer;
/// SIGUSR1/2 are only passed on.
pub fn route(received: Received, main_running: bool) -> Route {
    match (main_running, received.from_terminal) {
        (true, false) => Route::Main,
        (true, true) => Route::Nowhere,
        (false, outside_group_only) => {
            Route::Rest { outside_group_only, then_end: ends_the_rest(received.sig) }
        }
    }
}

/// Whether `sig` asks the app to stop: once the main process has exited, such a signal ends
/// the rest of the tree. One that was passed to the main process (by kill(2), not the
/// terminal) is also passed to the rest when the main process exits: a request to stop the
/// app is not forgotten because the main process obeyed it first. A service manager that
/// signals only its main process (systemd's `KillMode=mixed` or `process`) would otherwise
/// wait out its stop timeout for processes nobody asked to stop.
pub fn ends_the_rest(sig: i32) -> bool {
    [libc::SIGINT, libc::SIGTERM, libc::SIGQUIT, libc::SIGHUP].contains(&sig)
}

/// A process handle that stays valid (and never names another process) after it exits.
pub struct Pidfd(OwnedFd);

impl Pidfd {
    pub fn open(pid: u32) -> std::io::Result<Pidfd> {
        crate::sys::pidfd_open(pid, 0).map(Pidfd)
    }

    /// Copies descriptor `fd` of the process into ours (pidfd_getfd).
    pub fn take_fd(&self, fd: RawFd) -> std::io::Result<OwnedFd> {
        crate::sys::pidfd_getfd(self.0.as_fd(), fd)
    }

    /// True once the process has exited (also while it is a zombie).
    pub fn has_exited(&self) -> bool {
        use nix::poll::{PollFd, PollFlags, PollTimeout};
        let mut pfd = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
        let rc = nix::poll::poll(&mut pfd, PollTimeout::ZERO).unwrap_or(-1);
        rc > 0 && pfd[0].revents().is_some_and(|r| r.contains(PollFlags::POLLIN))
    }

    /// Sends `sig`; a process that already exited is not an error.
    pub fn signal(&self, sig: i32) {
        let _ = crate::sys::pidfd_send_signal(self.0.as_fd(), sig);
    }
}

/// Ends kmirror the way the app ended: the same exit code, or death by the same signal.
pub fn exit_like(status: std::process::ExitStatus) -> ! {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        std::process::exit(code);
    }
    let sig = status.signal().unwrap_or(libc::SIGKILL);
    // SAFETY: restoring the default action and raising the signal on ourselves.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(sig);
    }
    // Signals whose default action is not fatal end up here.
    std::process::exit(128 + sig);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_go_to_the_main_process_while_it_runs_then_to_the_rest() {
        let killed = |sig| Received { sig, from_terminal: false };
        let typed = |sig| Received { sig, from_terminal: true };
        assert_eq!(route(killed(libc::SIGTERM), true), Route::Main);
        assert_eq!(route(killed(libc::SIGUSR1), true), Route::Main);
        assert_eq!(route(typed(libc::SIGINT), true), Route::Nowhere);
        assert_eq!(
            route(killed(libc::SIGTERM), false),
            Route::Rest { outside_group_only: false, then_end: true }
        );
        assert_eq!(
            route(typed(libc::SIGINT), false),
            Route::Rest { outside_group_only: true, then_end: true }
        );
        assert_eq!(
            route(killed(libc::SIGUSR2), false),
            Route::Rest { outside_group_only: false, then_end: false }
        );
    }

    #[test]
    fn a_pidfd_tells_when_its_process_has_exited() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pidfd = Pidfd::open(child.id()).unwrap();
        assert!(!pidfd.has_exited());
        child.kill().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !pidfd.has_exited() {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.wait().unwrap();
        assert!(pidfd.has_exited());
    }
}
