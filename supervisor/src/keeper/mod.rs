//! The keeper: a small process between kmirror and the app that keeps the app's process tree
//! together, so that kmirror serves it until its last process exits and no process of it
//! outlives kmirror (see docs/process-trees.md for the design and the alternatives).
//!
//! ```text
//! kmirror (child subreaper) ── kmirror-keeper (child subreaper) ── app main ── ...
//!                                                               └─ orphans of the tree
//! ```
//!
//! - It is kmirror's own binary started again (`/proc/self/exe`, argv[0] `kmirror-keeper`), at
//!   the very start of a session, so its start-up overlaps the agent's. It is single-threaded
//!   and runs nothing of the session: it waits for one launch request on its socket to kmirror,
//!   forks the app with the seccomp filter (the same pre-exec code as ever), and from then on
//!   only reaps, reports and signals.
//! - It is a child subreaper: every process of the tree whose parent exits (double forks,
//!   `setsid` daemons, `nohup x &` from a wrapper that returns) becomes its child, so it can
//!   reap them, and the tree ends exactly when it has no child left (`waitpid` says ECHILD).
//! - It reports the main process's wait status when the main process ends, and that the tree
//!   has ended before it exits: kmirror then exits the way the main process did, without
//!   waiting for the keeper's own exit (a process exit and a wake-up later, up to a few ms).
//! - It learns that kmirror is gone from end-of-file on their socket, whatever ended kmirror
//!   (SIGKILL, a crash, the OOM killer): the kernel closes a dead process's descriptors and
//!   kmirror's end is never inherited by anyone. It then SIGKILLs every process under it,
//!   walking `/proc` again until none is left, and exits. The app's main process also keeps
//!   `PR_SET_PDEATHSIG(SIGKILL)`, now tied to the keeper.
//! - It ignores the termination signals kmirror forwards (a terminal's Ctrl-C reaches it as it
//!   reaches every process of the foreground group): it ends with the tree, never before. The
//!   handlers it installs are reset by exec, so the app starts with default dispositions.

// Unsafe: pre_exec, signal handlers, raw rt_sigaction and wait statuses, inherited fds.
#![allow(unsafe_code)]

pub mod tree;
pub mod wire;

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::ExitStatus;
use std::sync::{Arc, mpsc};
use std::time::Duration;
use wire::{Command, LaunchRequest, Report};

/// argv[0] of the keeper; `main` checks it before anything else.
pub const ARGV0: &str = "kmirror-keeper";

/// While ending a tree, how often the keeper walks it again (a SIGCHLD also wakes it).
const END_ROUND: Duration = Duration::from_millis(10);

/// Termination signals the keeper outlives (see the module docs).
const OUTLIVED: &[i32] =
    &[libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2];

/// True when this process was started as the keeper.
pub fn invoked() -> bool {
    std::env::args_os().next().is_some_and(|arg0| arg0 == ARGV0)
}

/// What kmirror learns about the tree once the app runs.
#[derive(Debug)]
pub enum TreeEvent {
    /// The main process ended like this.
    MainExited(ExitStatus),
    /// The last process of the tree has ended.
    TreeEnded,
    /// The keeper ended before the tree (killed on its own, or failed), like this.
    KeeperDied(ExitStatus),
}

/// Sends commands to the keeper; cheap to clone. A keeper that is gone ignores them.
#[derive(Clone)]
pub struct TreeControl(Arc<UnixStream>);

impl TreeControl {
    fn send(&self, command: &Command) -> std::io::Result<()> {
        (&*self.0).write_all(&command.encode())
    }

    /// Sends `sig` to every process of the tree, or only to those outside kmirror's process
    /// group (which a terminal's signal already reached).
    pub fn signal(&self, sig: i32, outside_group_only: bool) {
        let _ = self.send(&Command::Signal { sig, outside_group_only });
    }

    /// SIGKILLs every process of the tree.
    pub fn end(&self) {
        let _ = self.send(&Command::EndTree);
    }
}

/// kmirror's side of a keeper that has not launched the app yet.
pub struct Keeper {
    pub pid: u32,
    pub control: TreeControl,
    /// kmirror's end of the socket on which the app hands over its listener.
    pub handoff: UnixStream,
    /// The app's pid once it has exec'd, or why it could not start.
    pub started: mpsc::Receiver<Result<u32, std::io::Error>>,
    pub events: tokio::sync::mpsc::UnboundedReceiver<TreeEvent>,
}

/// Sets or clears close-on-exec: cleared, children spawned from now on inherit `fd`.
fn set_cloexec(fd: impl AsFd, cloexec: bool) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag};
    let flags = if cloexec { FdFlag::FD_CLOEXEC } else { FdFlag::empty() };
    nix::fcntl::fcntl(fd, FcntlArg::F_SETFD(flags))?;
    Ok(())
}

/// Starts the keeper. kmirror becomes a child subreaper itself: should the keeper be killed
/// on its own, the tree's orphans come to kmirror, which then ends them ([`end_leftovers`]).
///
/// The keeper's ends of its two sockets, and `pass` (descriptors for the app: socket
/// activation), are inheritable only for this spawn, and nothing else is spawned meanwhile
/// (the agent starts after it). With nothing to run between fork and exec the spawn takes the
/// posix_spawn path (a vfork, no copy of kmirror's page tables).
pub fn spawn(pass: &[BorrowedFd<'_>]) -> std::io::Result<Keeper> {
    nix::sys::prctl::set_child_subreaper(true)?;
    let (control, control_theirs) = UnixStream::pair()?;
    let (handoff, handoff_theirs) = UnixStream::pair()?;
    set_cloexec(&control_theirs, false)?;
    set_cloexec(&handoff_theirs, false)?;
    for fd in pass {
        set_cloexec(fd, false)?;
    }
    let mut command = std::process::Command::new("/proc/self/exe");
    command
        .arg0(ARGV0)
        .arg(control_theirs.as_raw_fd().to_string())
        .arg(handoff_theirs.as_raw_fd().to_string())
        .env_clear();
    let spawned = command.spawn();
    drop((control_theirs, handoff_theirs));
    for fd in pass {
        set_cloexec(fd, true)?;
    }
    let mut child = spawned?;
    let pid = child.id();

    let (started_tx, started) = mpsc::channel();
    let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
    let mut reports = control.try_clone()?;
    std::thread::Builder::new().name("kmirror-keeper".into()).spawn(move || {
        let mut started_tx = Some(started_tx);
        let mut tree_ended = false;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 256];
        'read: loop {
            match reports.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("cannot read from the process keeper: {e}; ending it");
                    let _ = child.kill();
                    break;
                }
            }
            loop {
                let report = match Report::decode(&mut buf) {
                    Ok(Some(report)) => report,
                    Ok(None) => break,
                    Err(e) => {
                        // Cannot happen between two copies of one binary; if it does, the keeper
                        // cannot be trusted to report the end of the tree: end it (and kmirror
                        // then ends what is left, as for a keeper killed from outside).
                        tracing::error!("the process keeper sent {e}; ending it");
                        let _ = child.kill();
                        break 'read;
                    }
                };
                match report {
                    Report::Started(pid) => {
                        started_tx.take().map(|tx| tx.send(Ok(pid)));
                    }
                    Report::SpawnFailed(errno) => {
                        started_tx.take().map(|tx| tx.send(Err(std::io::Error::from_raw_os_error(errno))));
                    }
                    Report::MainExited(status) => {
                        let _ = events_tx.send(TreeEvent::MainExited(ExitStatus::from_raw(status)));
                    }
                    Report::TreeEnded => {
                        tree_ended = true;
                        let _ = events_tx.send(TreeEvent::TreeEnded);
                    }
                }
            }
        }
        drop(started_tx);
        let status = child.wait().unwrap_or_else(|_| ExitStatus::from_raw(1 << 8));
        tracing::debug!(?status, "the keeper exited");
        if !tree_ended {
            let _ = events_tx.send(TreeEvent::KeeperDied(status));
        }
    })?;
    Ok(Keeper { pid, control: TreeControl(Arc::new(control)), handoff, started, events })
}

impl Keeper {
    /// Asks the keeper to start the app.
    pub fn launch(&self, request: LaunchRequest) -> std::io::Result<()> {
        self.control.send(&Command::Launch(request))
    }
}

/// Ends what is left of the tree after the keeper died on its own: its orphans are now
/// kmirror's children (kmirror is a child subreaper). Every child but the agent is SIGKILLed
/// and reaped, until none is left or `limit` has passed.
pub fn end_leftovers(agent: Option<u32>, limit: Duration) -> usize {
    let me = std::process::id();
    let skip: Vec<u32> = agent.into_iter().collect();
    let deadline = std::time::Instant::now() + limit;
    let mut ended = 0;
    loop {
        let found = tree::signal_all(me, &skip, libc::SIGKILL, None);
        ended = ended.max(found);
        for pid in tree::children_of(me).into_iter().filter(|p| !skip.contains(p)) {
            // Not the agent: tokio waits for that one.
            let flags = nix::sys::wait::WaitPidFlag::WNOHANG | nix::sys::wait::WaitPidFlag::__WALL;
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as libc::pid_t), Some(flags));
        }
        if found == 0 || std::time::Instant::now() > deadline {
            return ended;
        }
        std::thread::sleep(END_ROUND);
    }
}

/// The keeper process: never returns.
pub fn main() -> ! {
    let code = match keep() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("kmirror-keeper: {e}");
            1
        }
    };
    std::process::exit(code)
}

extern "C" fn on_signal(_: libc::c_int) {}

/// Catches the termination signals (a handler, not SIG_IGN: exec resets handlers, so the app
/// starts with the default dispositions) and SIGCHLD, which stays blocked except while the
/// keeper waits in ppoll, so that no child's exit slips between a reap and the wait.
fn install_signal_handlers() -> std::io::Result<()> {
    for &sig in OUTLIVED.iter().chain(&[libc::SIGCHLD]) {
        // SAFETY: a zeroed sigaction with a handler that does nothing is valid.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as usize;
            action.sa_flags = if sig == libc::SIGCHLD { libc::SA_NOCLDSTOP } else { libc::SA_RESTART };
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(sig, &action, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    // Blocked for this (only) thread; std's spawn clears the mask in the child.
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGCHLD);
    set.thread_block()?;
    Ok(())
}

/// The kernel's `struct sigaction` (x86_64), for raw `rt_sigaction`: glibc's wrapper refuses
/// its internal signals (32 and 33).
#[repr(C)]
#[derive(Default)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// The disposition of `sig` (0 default, 1 ignored, else a handler), or None if unreadable.
fn disposition(sig: i32) -> Option<usize> {
    let mut old = KernelSigaction::default();
    // SAFETY: rt_sigaction that only reads into a kernel-layout struct of the right size.
    let rc = unsafe {
        libc::syscall(libc::SYS_rt_sigaction, sig, std::ptr::null::<KernelSigaction>(), &mut old, 8)
    };
    (rc == 0).then_some(old.handler)
}

/// Signals ignored in this process, bit n-1 for signal n.
pub fn ignored_signals() -> u64 {
    (1..=64).filter(|&sig| disposition(sig) == Some(libc::SIG_IGN)).fold(0, |mask, sig| mask | 1 << (sig - 1))
}

/// Makes the keeper ignore exactly the signals kmirror ignores (those it catches itself reset
/// at exec anyway), so the app inherits the same as when kmirror forked it. The keeper's own
/// start differs: glibc's posix_spawn, which started it, leaves glibc's internal signals (32,
/// 33) ignored in the new program.
fn ignore_like(ignored: u64) {
    for sig in 1..=64 {
        if matches!(sig, libc::SIGKILL | libc::SIGSTOP | libc::SIGCHLD) || OUTLIVED.contains(&sig) {
            continue;
        }
        let wanted = if ignored & 1 << (sig - 1) != 0 { libc::SIG_IGN } else { libc::SIG_DFL };
        match disposition(sig) {
            Some(now) if now != wanted && (now == libc::SIG_IGN || now == libc::SIG_DFL) => {
                let action = KernelSigaction { handler: wanted, ..Default::default() };
                // SAFETY: rt_sigaction setting SIG_IGN or SIG_DFL, which need no restorer.
                unsafe {
                    libc::syscall(
                        libc::SYS_rt_sigaction,
                        sig,
                        &action,
                        std::ptr::null_mut::<KernelSigaction>(),
                        8,
                    )
                };
            }
            _ => {}
        }
    }
}

fn fd_arg(arg: Option<String>) -> std::io::Result<RawFd> {
    arg.and_then(|a| a.parse().ok()).ok_or_else(|| {
        std::io::Error::other("started without its descriptors (it is started by kmirror only)")
    })
}

fn keep() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (control_fd, handoff_fd) = (fd_arg(args.next())?, fd_arg(args.next())?);
    // SAFETY: kmirror made these two descriptors for us; nothing else owns them.
    let (mut control, handoff) =
        unsafe { (UnixStream::from_raw_fd(control_fd), UnixStream::from_raw_fd(handoff_fd)) };
    // Descriptors kmirror passed on for us: owned from here, and not passed on to the app
    // (the hand-off socket is used before exec only).
    set_cloexec(&control, true)?;
    set_cloexec(&handoff, true)?;
    nix::sys::prctl::set_name(c"kmirror-keeper")?;
    nix::sys::prctl::set_child_subreaper(true)?;
    install_signal_handlers()?;

    let mut buf = Vec::new();
    let request = loop {
        let mut chunk = [0u8; 64 * 1024];
        match control.read(&mut chunk) {
            // kmirror ended before it started the app.
            Ok(0) => return Ok(()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        match Command::decode(&mut buf).map_err(std::io::Error::other)? {
            Some(Command::Launch(request)) => break request,
            Some(_) => return Err(std::io::Error::other("a command before the launch request")),
            None => {}
        }
    };

    ignore_like(request.ignored);
    // The app's environment becomes the keeper's own (kmirror started the keeper with an empty
    // one), so the child inherits it through `environ`: a Command with its own environment
    // installs that only after the pre-exec hook, which must write the app's pid into the
    // variables that name it (see policy::service_manager).
    for (name, value) in &request.env {
        // What no environment can hold (set_var would panic on it); none of kmirror's making.
        if name.is_empty() || name.contains(&b'=') || name.contains(&0) || value.contains(&0) {
            continue;
        }
        // SAFETY: the keeper is single-threaded: nothing reads the environment concurrently.
        unsafe { std::env::set_var(OsStr::from_bytes(name), OsStr::from_bytes(value)) };
    }
    let mut command = std::process::Command::new(OsStr::from_bytes(&request.program));
    command.args(request.args.iter().map(|a| OsStr::from_bytes(a)));
    let filter = request.filter;
    let listener = request.listener;
    let own_pid_vars = request.own_pid_vars;
    let sock = handoff.as_raw_fd();
    let me = nix::unistd::getpid().as_raw();
    // SAFETY: the hook only makes raw, async-signal-safe system calls and writes into memory
    // that was allocated before fork.
    unsafe {
        command.pre_exec(move || {
            crate::launch::write_own_pid(&own_pid_vars);
            crate::launch::install_filter(&filter, listener, sock, me)
        });
    }
    let spawned = command.spawn();
    for &fd in &request.pass_fds {
        // SAFETY: kmirror passed these for the app only; the keeper holds no other reference.
        unsafe { libc::close(fd) };
    }
    let main = match spawned {
        Ok(child) => child.id(),
        Err(e) => {
            let _ = control.write_all(&Report::SpawnFailed(e.raw_os_error().unwrap_or(libc::EIO)).encode());
            return Ok(());
        }
    };
    drop(handoff);
    let _ = control.write_all(&Report::Started(main).encode());
    watch(control, buf, main)
}

/// Reaps, reports and signals until the tree has ended (see the module docs).
fn watch(mut control: UnixStream, mut buf: Vec<u8>, main: u32) -> std::io::Result<()> {
    let me = std::process::id();
    let group = nix::unistd::getpgrp().as_raw();
    let mut main = Some(main);
    let mut kmirror_gone = false;
    let mut ending = false;
    loop {
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid status pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG | libc::__WALL) };
            if pid > 0 {
                if main == Some(pid as u32) {
                    main = None;
                    if !kmirror_gone {
                        let _ = control.write_all(&Report::MainExited(status).encode());
                    }
                }
                continue;
            }
            if pid == 0 {
                break;
            }
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::ECHILD) => {
                    let _ = control.write_all(&Report::TreeEnded.encode());
                    return Ok(());
                }
                Some(libc::EINTR) => continue,
                _ => return Err(std::io::Error::last_os_error()),
            }
        }
        if ending {
            tree::signal_all(me, &[], libc::SIGKILL, None);
        }

        // One descriptor (or none), a timeout while ending, and an empty signal mask (SIGCHLD
        // is deliverable only inside this call).
        let mut pfd = [nix::poll::PollFd::new(control.as_fd(), nix::poll::PollFlags::POLLIN)];
        let fds = if kmirror_gone { &mut pfd[..0] } else { &mut pfd[..] };
        let round = ending.then(|| nix::sys::time::TimeSpec::from_duration(END_ROUND));
        let rc = nix::poll::ppoll(fds, round, Some(nix::sys::signal::SigSet::empty())).unwrap_or(-1);
        if rc <= 0 || kmirror_gone || pfd[0].revents().is_some_and(|r| r.is_empty()) {
            continue;
        }
        let mut chunk = [0u8; 4096];
        let n = match control.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        if n == 0 {
            // kmirror is gone: nothing serves the tree's trapped calls any more.
            kmirror_gone = true;
            ending = true;
            continue;
        }
        buf.extend_from_slice(&chunk[..n]);
        loop {
            match Command::decode(&mut buf) {
                Ok(Some(Command::Signal { sig, outside_group_only })) => {
                    tree::signal_all(me, &[], sig, outside_group_only.then_some(group));
                }
                Ok(Some(Command::EndTree)) => ending = true,
                Ok(Some(Command::Launch(_))) => {}
                Ok(None) => break,
                Err(e) => {
                    eprintln!("kmirror-keeper: kmirror sent {e}; ending the app");
                    ending = true;
                    break;
                }
            }
        }
    }
}
