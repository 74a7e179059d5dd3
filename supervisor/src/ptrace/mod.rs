//! The ptrace interceptor (docs/ptrace.md): the app runs under a `SECCOMP_RET_TRACE` filter,
//! and one tracer thread of kmirror's turns each trapped call's stop into the
//! [`Notification`](crate::intercept::Notification) the handlers know, then applies their
//! answer with ptrace.
//!
//! [`Tracer`] is the handle the rest of kmirror holds; every ptrace request is made on the
//! tracer thread (`tracer.rs`), since the kernel takes them from the attaching thread only.
//! Answers given on other threads are queued for it and wake it through an eventfd.

mod inject;
mod sys;
mod tracer;

use crate::handlers::Context;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, mpsc};

/// How the handlers answered a stop.
pub(crate) enum Answer {
    /// Run the call as if it had not stopped.
    Continue,
    /// Skip the call; it returns this (`-errno` for an error).
    Value(i64),
    /// Skip the call; install this descriptor in the caller and return its number.
    NewFd(OwnedFd, bool),
}

enum Command {
    Seize(u32, mpsc::Sender<io::Result<()>>),
    Serve(Arc<Context>),
}

/// What the tracer thread and the handlers share.
struct Shared {
    /// The stop each thread waits in, by tid: answered stops are removed.
    stops: Mutex<HashMap<u32, u64>>,
    answers: Mutex<Vec<(u64, Answer)>>,
    commands: Mutex<Vec<Command>>,
    wake: OwnedFd,
}

thread_local! {
    /// Set on the tracer thread: its own answers need no wake-up.
    static ON_TRACER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[derive(Clone)]
pub struct Tracer {
    shared: Arc<Shared>,
}

impl Tracer {
    /// Starts the tracer thread. Call from a thread that blocks `SIGCHLD` (see
    /// [`block_sigchld`]): the tracer thread inherits the mask and takes the signal only while
    /// it waits.
    pub fn start() -> io::Result<Tracer> {
        let shared = Arc::new(Shared {
            stops: Mutex::default(),
            answers: Mutex::default(),
            commands: Mutex::default(),
            wake: sys::eventfd()?,
        });
        let theirs = shared.clone();
        std::thread::Builder::new().name("kmirror-tracer".into()).spawn(move || {
            ON_TRACER.with(|on| on.set(true));
            tracer::run(theirs)
        })?;
        Ok(Tracer { shared })
    }

    /// Attaches the app's main process (it waits before exec for this) with every option the
    /// interceptor needs.
    pub fn seize(&self, pid: u32) -> io::Result<()> {
        let (tx, rx) = mpsc::channel();
        self.command(Command::Seize(pid, tx));
        rx.recv().map_err(|_| io::Error::other("the tracer thread ended"))?
    }

    /// Hands the tracer the session's handlers: stops are dispatched from now on (earlier ones
    /// wait).
    pub fn serve(&self, ctx: Arc<Context>) {
        self.command(Command::Serve(ctx));
    }

    fn command(&self, command: Command) {
        crate::handlers::lock(&self.shared.commands).push(command);
        self.wake();
    }

    fn wake(&self) {
        let _ = nix::unistd::write(self.shared.wake.as_fd(), &1u64.to_ne_bytes());
    }

    fn answer(&self, id: u64, answer: Answer) {
        crate::handlers::lock(&self.shared.answers).push((id, answer));
        if !ON_TRACER.with(|on| on.get()) {
            self.wake();
        }
    }

    pub fn continue_call(&self, id: u64) {
        self.answer(id, Answer::Continue);
    }

    pub fn return_value(&self, id: u64, val: i64) {
        self.answer(id, Answer::Value(val));
    }

    pub fn return_errno(&self, id: u64, errno: i32) {
        self.answer(id, Answer::Value(-i64::from(errno)));
    }

    /// The descriptor is copied now: the caller may close its own as soon as this returns.
    pub fn return_new_fd(&self, id: u64, fd: RawFd, cloexec: bool) {
        match sys::dup_cloexec(fd) {
            Ok(copy) => self.answer(id, Answer::NewFd(copy, cloexec)),
            Err(_) => self.answer(id, Answer::Value(-i64::from(libc::EMFILE))),
        }
    }

    pub fn is_valid(&self, id: u64) -> bool {
        crate::handlers::lock(&self.shared.stops).get(&(id as u32)) == Some(&id)
    }
}

/// Blocks `SIGCHLD` for the calling thread and every thread it starts later: the tracer thread
/// then takes it only inside its `ppoll` (docs/ptrace.md, *The tracer thread*). Call before
/// any other thread of kmirror's exists.
pub fn block_sigchld() -> io::Result<()> {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGCHLD);
    Ok(set.thread_block()?)
}
