//! The tracer thread: attach, wait for stops, dispatch trapped calls, apply answers
//! (docs/ptrace.md).

use super::sys::{self, Event, Regs};
use super::{Answer, Command, Shared};
use crate::handlers::{self, Context, lock};
use crate::intercept::Notification;
use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::Arc;

/// Everything `PTRACE_SEIZE` asks for (docs/ptrace.md, *Who traces*).
const OPTIONS: libc::c_int = libc::PTRACE_O_TRACESECCOMP
    | libc::PTRACE_O_TRACECLONE
    | libc::PTRACE_O_TRACEFORK
    | libc::PTRACE_O_TRACEVFORK
    | libc::PTRACE_O_TRACEEXEC
    | libc::PTRACE_O_TRACESYSGOOD
    | libc::PTRACE_O_EXITKILL;

/// The kernel's restart errnos (include/linux/errno.h): a call answered with one of these must
/// keep its number for the signal code (docs/ptrace.md, *Restarts*).
pub(super) fn is_restart(value: i64) -> bool {
    matches!(-value, 512..=514 | 516)
}

/// The tracer thread's own state.
pub(super) struct Loop {
    shared: Arc<Shared>,
    ctx: Option<Arc<Context>>,
    /// Stops that came before the handlers did.
    waiting: Vec<Notification>,
    /// Registers of each thread stopped in a trapped call, as the stop found them.
    regs: HashMap<u32, Regs>,
    /// Per process (tgid): kmirror's scratch page for injected calls' arguments.
    pub(super) scratch: HashMap<u32, u64>,
    /// Takes the app's descriptors (its end of a socketpair, to send on).
    pub(super) handles: crate::tracee::ThreadHandles,
    seq: u32,
    /// Answers taken off the shared queue, applied outside its lock.
    batch: Vec<(u64, Answer)>,
}

pub(super) fn run(shared: Arc<Shared>) {
    // Inherited blocked already (see `super::block_sigchld`); blocked here too so a stop never
    // interrupts this thread outside its wait.
    let _ = super::block_sigchld();
    let mut wait_mask = nix::sys::signal::SigSet::thread_get_mask().unwrap_or_else(|_| {
        let mut all = nix::sys::signal::SigSet::empty();
        all.add(nix::sys::signal::Signal::SIGCHLD);
        all
    });
    wait_mask.remove(nix::sys::signal::Signal::SIGCHLD);
    let mut lp = Loop {
        shared,
        ctx: None,
        waiting: Vec::new(),
        regs: HashMap::new(),
        scratch: HashMap::new(),
        handles: Default::default(),
        seq: 0,
        batch: Vec::new(),
    };
    loop {
        lp.run_commands();
        while let Some((tid, status)) = sys::wait_any() {
            lp.on_status(tid, status);
            lp.apply_answers();
        }
        lp.apply_answers();
        // A stop raises SIGCHLD, which only this wait lets in: one that came while the thread
        // worked is pending and ends the wait at once. Answers and commands write the eventfd.
        let mut fds = [nix::poll::PollFd::new(lp.shared.wake.as_fd(), nix::poll::PollFlags::POLLIN)];
        let _ = nix::poll::ppoll(&mut fds, None, Some(wait_mask));
        let mut count = [0u8; 8];
        let _ = nix::unistd::read(&lp.shared.wake, &mut count);
    }
}

impl Loop {
    fn run_commands(&mut self) {
        let commands = std::mem::take(&mut *lock(&self.shared.commands));
        for command in commands {
            match command {
                Command::Seize(pid, reply) => {
                    let _ = reply.send(sys::seize(pid, OPTIONS));
                }
                Command::Serve(ctx) => {
                    self.ctx = Some(ctx.clone());
                    for n in std::mem::take(&mut self.waiting) {
                        handlers::dispatch(&ctx, n);
                        self.apply_answers();
                    }
                }
            }
        }
    }

    fn on_status(&mut self, tid: u32, status: i32) {
        match sys::decode(status) {
            Event::Seccomp => self.on_trapped_call(tid),
            Event::Signal(sig) => {
                let _ = sys::cont(tid, sig);
            }
            Event::Stop(sig) if sys::is_stop_signal(sig) => {
                let _ = sys::listen(tid);
            }
            Event::Exec => {
                // A multi-threaded exec: the exec'ing thread took the leader's tid; the others
                // (and any stop they were in) are gone, and so is the old image's scratch page.
                if let Ok(former) = sys::event_message(tid) {
                    self.forget(former as u32);
                }
                self.forget(tid);
                let _ = sys::cont(tid, 0);
            }
            Event::Gone => self.forget(tid),
            Event::Stop(_) | Event::NewTask | Event::Syscall | Event::Other => {
                let _ = sys::cont(tid, 0);
            }
        }
    }

    /// Drops what is known of thread (or process) `tid`.
    fn forget(&mut self, tid: u32) {
        lock(&self.shared.stops).remove(&tid);
        self.regs.remove(&tid);
        self.scratch.remove(&tid);
    }

    fn on_trapped_call(&mut self, tid: u32) {
        let Ok(regs) = sys::getregs(tid) else { return };
        self.seq = self.seq.wrapping_add(1);
        // The tid in the low half: answers and validity checks find the thread from the id.
        let id = u64::from(self.seq) << 32 | u64::from(tid);
        lock(&self.shared.stops).insert(tid, id);
        self.regs.insert(tid, regs);
        let n = Notification {
            id,
            tid,
            nr: regs.orig_rax as i64,
            args: [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9],
        };
        match &self.ctx {
            Some(ctx) => handlers::dispatch(ctx, n),
            None => self.waiting.push(n),
        }
    }

    fn apply_answers(&mut self) {
        loop {
            std::mem::swap(&mut *lock(&self.shared.answers), &mut self.batch);
            if self.batch.is_empty() {
                return;
            }
            let mut batch = std::mem::take(&mut self.batch);
            for (id, answer) in batch.drain(..) {
                self.apply(id, answer);
            }
            self.batch = batch;
        }
    }

    fn apply(&mut self, id: u64, answer: Answer) {
        let tid = id as u32;
        {
            let mut stops = lock(&self.shared.stops);
            // Answered already (a second answer, as the kernel refuses for a listener), or the
            // thread is gone.
            if stops.get(&tid) != Some(&id) {
                return;
            }
            stops.remove(&tid);
        }
        let Some(regs) = self.regs.remove(&tid) else { return };
        match answer {
            Answer::Continue => {
                let _ = sys::cont(tid, 0);
            }
            Answer::Value(value) if is_restart(value) => {
                super::inject::answer_restart(self, tid, regs, value)
            }
            Answer::Value(value) => {
                // seccomp(2): a skipped call returns what the tracer puts in the return register.
                let mut skip = regs;
                skip.orig_rax = u64::MAX;
                skip.rax = value as u64;
                if sys::setregs(tid, &skip).is_ok() {
                    let _ = sys::cont(tid, 0);
                }
            }
            Answer::NewFd(fd, cloexec) => super::inject::deliver_fd(self, tid, regs, fd, cloexec),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_kernels_restart_errnos_keep_the_call() {
        assert!(is_restart(-512) && is_restart(-513) && is_restart(-514) && is_restart(-516));
        assert!(!is_restart(-515) && !is_restart(-libc::EINTR as i64) && !is_restart(512) && !is_restart(0));
    }
}
