//! Starting the app under the seccomp filter and taking its listener (or, for the ptrace
//! interceptor, attaching it before it execs: docs/ptrace.md).
//!
//! Sequence: the keeper (see [`crate::keeper`]), started at the beginning of the session,
//! receives a launch request and forks the app (std's `Command` with a `pre_exec` hook). In the
//! child, before exec: `PR_SET_PDEATHSIG(SIGKILL)` (if its parent, the keeper, dies, the app
//! dies too; the keeper is single-threaded, so the signal cannot come from a thread that merely
//! ended), then `seccomp(2)` with `NEW_LISTENER | WAIT_KILLABLE_RECV` (without the latter Go's
//! SIGURG preemption restarts trapped calls forever), then the child tells kmirror its pid and
//! the listener's number over a socketpair (kmirror copies the listener out with pidfd_getfd)
//! and waits for an acknowledgement before it execs. Only raw system calls run between fork and
//! exec. For the ptrace interceptor the filter traces instead of notifying and has no listener
//! (the descriptor number sent is -1), and kmirror's tracer thread attaches the child while it
//! waits for the acknowledgement.

// Unsafe: seccomp(2) and the hand-off between fork and exec, where only raw calls may run.
#![allow(unsafe_code)]

use crate::keeper::{Keeper, TreeControl, TreeEvent, wire::LaunchRequest};
use crate::seccomp::filter::Program;
use std::collections::BTreeMap;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

pub struct App {
    /// Signals the main process without ever hitting a process that reuses its pid.
    pub handle: crate::signals::Pidfd,
    /// The seccomp listener (none for the ptrace interceptor).
    pub listener: Option<OwnedFd>,
    /// The main process's exit, then the end of the whole tree.
    pub events: tokio::sync::mpsc::UnboundedReceiver<TreeEvent>,
    /// Signals or ends every process of the tree.
    pub tree: TreeControl,
    pub keeper_pid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot start {program}: {source}")]
    Spawn { program: String, source: std::io::Error },
    #[error("the app did not hand over its seccomp listener: {0}")]
    Handoff(std::io::Error),
    #[error("cannot trace the app (PTRACE_SEIZE): {0}; the ptrace interceptor needs ptrace rights over it")]
    Attach(std::io::Error),
    #[error("cannot set up the launcher: {0}")]
    Setup(std::io::Error),
}

/// What the app gets besides its command line.
pub struct Inheritance {
    pub env: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Variables of `env` set to the app's own pid when it starts.
    pub own_pid_vars: Vec<Vec<u8>>,
    /// Descriptors the keeper inherited for the app (see [`crate::keeper::spawn`]).
    pub pass_fds: Vec<RawFd>,
}

/// How the app's calls are to be trapped.
pub enum Trap {
    /// A seccomp listener, passed to the closure before the app execs.
    Listener(Box<dyn FnOnce(&OwnedFd) + Send>),
    /// ptrace: the tracer attaches the app before it execs.
    Tracer(crate::ptrace::Tracer),
}

/// Has the keeper start `program` with exactly `inherit.env`, its stdio inherited from kmirror.
pub fn launch(
    keeper: Keeper,
    program: PathBuf,
    args: Vec<std::ffi::OsString>,
    inherit: Inheritance,
    filter: Program,
    trap: Trap,
) -> Result<App, LaunchError> {
    let shown = program.display().to_string();
    let request = LaunchRequest {
        ignored: crate::keeper::ignored_signals(),
        program: program.as_os_str().as_bytes().to_vec(),
        args: args.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env: inherit.env.into_iter().collect(),
        filter: filter.instructions,
        listener: matches!(trap, Trap::Listener(_)),
        own_pid_vars: inherit.own_pid_vars,
        pass_fds: inherit.pass_fds,
    };
    keeper.launch(request).map_err(LaunchError::Setup)?;
    let Keeper { pid: keeper_pid, control, handoff, started, events } = keeper;

    // The child blocks before exec until we acknowledge, so the spawn cannot succeed before
    // the listener arrived here; it can only fail (exec of a bad program, ...).
    let (listener, child_pid, handle) = match receive_fd(&handoff, &started) {
        Ok(Handoff::Listener(fd, pid, handle)) => (fd, pid, handle),
        Ok(Handoff::SpawnFailed(source)) => return Err(LaunchError::Spawn { program: shown, source }),
        Err(e) => return Err(LaunchError::Handoff(e)),
    };
    match (trap, &listener) {
        (Trap::Listener(on_listener), Some(listener)) => on_listener(listener),
        // Without the acknowledgement the child fails before exec (and the keeper reports it).
        (Trap::Tracer(tracer), None) => tracer.seize(child_pid).map_err(LaunchError::Attach)?,
        _ => {
            return Err(LaunchError::Handoff(std::io::Error::other(
                "the app installed another kind of filter",
            )));
        }
    }
    send_ack(&handoff).map_err(LaunchError::Handoff)?;
    let pid = match started.recv() {
        Ok(Ok(pid)) => pid,
        Ok(Err(source)) => return Err(LaunchError::Spawn { program: shown, source }),
        Err(_) => return Err(LaunchError::Handoff(keeper_lost())),
    };
    debug_assert_eq!(pid, child_pid);
    tracing::debug!(pid, keeper_pid, "app started");
    Ok(App { handle, listener, events, tree: control, keeper_pid })
}

fn keeper_lost() -> std::io::Error {
    std::io::Error::other("the process keeper ended before the app started")
}

fn send_ack(mut sock: &UnixStream) -> std::io::Result<()> {
    use std::io::Write;
    sock.write_all(&[1])
}

enum Handoff {
    Listener(Option<OwnedFd>, u32, crate::signals::Pidfd),
    SpawnFailed(std::io::Error),
}

/// Waits for the listener descriptor, or for the news that the spawn failed.
fn receive_fd(
    sock: &UnixStream,
    started: &mpsc::Receiver<Result<u32, std::io::Error>>,
) -> std::io::Result<Handoff> {
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match recv_fd(sock) {
            Ok((fd, pid, handle)) => return Ok(Handoff::Listener(fd, pid, handle)),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                match started.try_recv() {
                    Ok(Err(spawn_error)) => return Ok(Handoff::SpawnFailed(spawn_error)),
                    Ok(Ok(_)) => return Err(std::io::Error::other("the app started without a filter")),
                    Err(mpsc::TryRecvError::Disconnected) => return Err(keeper_lost()),
                    Err(mpsc::TryRecvError::Empty) => {}
                }
                if std::time::Instant::now() > deadline {
                    return Err(std::io::Error::from(std::io::ErrorKind::TimedOut));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                // The child closed its end without sending: the spawn failed; its error follows.
                return match started.recv() {
                    Ok(Err(spawn_error)) => Ok(Handoff::SpawnFailed(spawn_error)),
                    _ => Err(e),
                };
            }
            Err(e) => return Err(e),
        }
    }
}

/// Receives the child's pid and the number of its listener descriptor, then copies the
/// listener out of the child with pidfd_getfd. (Not SCM_RIGHTS: `sendmsg` is itself trapped
/// once the filter is in place, and nobody would answer the child yet.) Number -1: no
/// listener (the ptrace interceptor's filter).
fn recv_fd(mut sock: &UnixStream) -> std::io::Result<(Option<OwnedFd>, u32, crate::signals::Pidfd)> {
    let mut msg = [0u8; 8];
    let n = std::io::Read::read(&mut sock, &mut msg)?;
    if n == 0 {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
    }
    if n != msg.len() {
        return Err(std::io::Error::other("short hand-off message"));
    }
    let pid = u32::from_ne_bytes(msg[..4].try_into().expect("4 bytes"));
    let fd = i32::from_ne_bytes(msg[4..].try_into().expect("4 bytes"));
    // Taken while the child waits for our ack: it cannot have exited yet.
    let child = crate::signals::Pidfd::open(pid)?;
    let listener = if fd < 0 { None } else { Some(child.take_fd(fd)?) };
    Ok((listener, pid, child))
}

unsafe extern "C" {
    /// The process's environment, as execvp passes it on.
    static environ: *const *mut libc::c_char;
}

/// Runs in the forked child, before exec: writes the child's pid into the value of each
/// variable in `names` (a [`PID_PLACEHOLDER`] the keeper put in its environment, which the
/// child inherited). No allocation: the strings are rewritten in place.
///
/// [`PID_PLACEHOLDER`]: crate::policy::service_manager::PID_PLACEHOLDER
pub fn write_own_pid(names: &[Vec<u8>]) {
    use crate::policy::service_manager::{PID_PLACEHOLDER, write_pid};
    if names.is_empty() {
        return;
    }
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u32;
    // SAFETY: `environ` is a NULL-terminated array of NUL-terminated strings that this
    // single-threaded child owns (its copy of the keeper's memory); each value is written only
    // when it is exactly the placeholder, so the write stays inside the string.
    unsafe {
        let mut entry = environ;
        while !entry.is_null() && !(*entry).is_null() {
            let text = (*entry).cast::<u8>();
            let len = libc::strlen(text.cast());
            let value_at = {
                let bytes = std::slice::from_raw_parts(text, len);
                names.iter().find_map(|name| {
                    let value_at = name.len() + 1;
                    (len == value_at + PID_PLACEHOLDER.len()
                        && bytes.starts_with(name)
                        && bytes[name.len()] == b'='
                        && &bytes[value_at..] == PID_PLACEHOLDER)
                        .then_some(value_at)
                })
            };
            if let Some(value_at) = value_at {
                // The placeholder's NUL terminator follows it: room for the pid's own.
                write_pid(std::slice::from_raw_parts_mut(text.add(value_at), PID_PLACEHOLDER.len() + 1), pid);
            }
            entry = entry.add(1);
        }
    }
}

/// Runs in the forked child (forked by the keeper, `parent_pid`): only raw system calls, no
/// allocation. Without `listener` the filter is installed on its own (the ptrace
/// interceptor's, which nests under any other).
pub fn install_filter(
    instructions: &[libc::sock_filter],
    listener: bool,
    sock: RawFd,
    parent_pid: libc::pid_t,
) -> std::io::Result<()> {
    let fail = || Err(std::io::Error::last_os_error());
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
    // The keeper may have died between fork and prctl: then nobody would end the app with
    // kmirror.
    if nix::unistd::getppid().as_raw() != parent_pid {
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: the whole block makes raw system calls on valid arguments and on memory allocated
    // before fork; nothing here allocates or takes locks.
    unsafe {
        let prog =
            libc::sock_fprog { len: instructions.len() as u16, filter: instructions.as_ptr() as *mut _ };
        let flags = if listener {
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER | libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
        } else {
            0
        };
        let mut rc = libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, flags, &prog);
        if rc < 0 && *libc::__errno_location() == libc::EACCES {
            // Without CAP_SYS_ADMIN a filter needs no_new_privs.
            nix::sys::prctl::set_no_new_privs()?;
            rc = libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, flags, &prog);
        }
        if rc < 0 {
            return fail();
        }
        // The listener's number, or -1 (a filter without one returns 0).
        let listener: RawFd = if listener { rc as RawFd } else { -1 };
        // Our pid (the parent takes a pidfd while we wait, so even an app that exits at once is
        // never confused with a process that later reuses its pid) and the listener's number,
        // which the parent copies out with pidfd_getfd. write(2) is not trapped; sendmsg is.
        let pid = nix::unistd::getpid().as_raw().to_ne_bytes();
        let fd = listener.to_ne_bytes();
        let msg = [pid[0], pid[1], pid[2], pid[3], fd[0], fd[1], fd[2], fd[3]];
        if libc::write(sock, msg.as_ptr().cast(), msg.len()) != msg.len() as isize {
            return fail();
        }
        // Wait until the supervisor owns the listener: the first trapped call (the dynamic
        // loader's opens) would otherwise wait for an answer nobody gives.
        let mut byte = [0u8; 1];
        loop {
            let n = libc::read(sock, byte.as_mut_ptr().cast(), 1);
            if n == 1 {
                break;
            }
            if n == 0 || *libc::__errno_location() != libc::EINTR {
                return fail();
            }
        }
        if listener >= 0 {
            libc::close(listener);
        }
        libc::close(sock);
    }
    Ok(())
}
