//! Running system calls of kmirror's in a stopped thread of the app, and with them getting a
//! descriptor into the app without `SECCOMP_IOCTL_NOTIF_ADDFD` (docs/ptrace.md, *Descriptors
//! without ADDFD*, which has the register-level steps).

use super::sys::{self, Event, Regs};
use super::tracer::Loop;
use std::os::fd::{AsRawFd, OwnedFd};

/// kmirror's scratch page in a process, and where its parts lie.
const SCRATCH_LEN: u64 = 4096;
const AT_PAIR: u64 = 0;
const AT_MSGHDR: u64 = 64;
const AT_IOVEC: u64 = 128;
const AT_BYTE: u64 = 160;
const AT_CONTROL: u64 = 192;
const AT_SIGINFO: u64 = 256;
/// CMSG_SPACE(sizeof(int)) on x86_64.
const CONTROL_LEN: u64 = 24;

/// The thread went away during the sequence (killed, or replaced by another thread's exec):
/// its call needs no answer any more.
#[derive(Debug)]
pub(super) struct Gone;

/// A signal that arrived while kmirror's calls ran, to be delivered once they are done.
enum Deferred {
    /// Its `siginfo_t`, as the signal-delivery stop showed it.
    Info([u8; 128]),
    /// A group-stop this thread took part in, by its stop signal.
    Stop(i32),
}

/// A thread stopped in a trapped call (`saved`: its registers then), running calls of
/// kmirror's before its own call is answered.
pub(super) struct Injection {
    tid: u32,
    saved: Regs,
    /// Past the first injected call: the thread is at a syscall-exit stop, not in the trapped
    /// call's entry.
    at_exit: bool,
    deferred: Vec<Deferred>,
    /// The thread's process exec'd meanwhile: its scratch page is gone.
    pub(super) exec_seen: bool,
}

impl Injection {
    pub(super) fn new(tid: u32, saved: Regs) -> Injection {
        Injection { tid, saved, at_exit: false, deferred: Vec::new(), exec_seen: false }
    }

    /// Makes the thread run system call `nr`; its raw result (`-errno` on failure).
    pub(super) fn call(&mut self, nr: i64, args: [u64; 6]) -> Result<i64, Gone> {
        let mut regs = self.saved;
        (regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9) =
            (args[0], args[1], args[2], args[3], args[4], args[5]);
        if !self.at_exit {
            // In the trapped call's own slot: the kernel runs (after re-checking the filters)
            // whatever number `orig_rax` holds when the thread resumes.
            regs.orig_rax = nr as u64;
            sys::setregs(self.tid, &regs).map_err(|_| Gone)?;
            self.resume_to_syscall_stop()?;
        } else {
            // Back to the app's own `syscall` instruction, with our number: an entry stop,
            // then the exit stop. `orig_rax = -1`: no restart logic applies on the way there.
            regs.rip = self.saved.rip - 2;
            regs.rax = nr as u64;
            regs.orig_rax = u64::MAX;
            sys::setregs(self.tid, &regs).map_err(|_| Gone)?;
            self.resume_to_syscall_stop()?;
            self.resume_to_syscall_stop()?;
        }
        self.at_exit = true;
        Ok(sys::getregs(self.tid).map_err(|_| Gone)?.rax as i64)
    }

    /// Resumes the thread until its next system-call stop, holding back signals meanwhile.
    fn resume_to_syscall_stop(&mut self) -> Result<(), Gone> {
        sys::syscall(self.tid, 0).map_err(|_| Gone)?;
        loop {
            let status = sys::wait_for(self.tid).map_err(|_| Gone)?;
            match sys::decode(status) {
                Event::Syscall => return Ok(()),
                Event::Gone => return Err(Gone),
                Event::Exec => {
                    // Another thread exec'd and took this tid: this thread is gone.
                    self.exec_seen = true;
                    let _ = sys::cont(self.tid, 0);
                    return Err(Gone);
                }
                Event::Signal(sig) => {
                    // Held back: delivered after our calls, where the app's call returns.
                    self.deferred.push(match sys::siginfo(self.tid) {
                        Ok(info) => Deferred::Info(info),
                        Err(_) => Deferred::Stop(sig),
                    });
                }
                Event::Stop(sig) if sys::is_stop_signal(sig) => self.deferred.push(Deferred::Stop(sig)),
                Event::Stop(_) | Event::Seccomp | Event::NewTask | Event::Other => {}
            }
            sys::syscall(self.tid, 0).map_err(|_| Gone)?;
        }
    }

    /// Completes the app's call with `value`: its registers as they were, the result in
    /// `rax`. Signals held back are sent again first (`scratch` holds their siginfo).
    pub(super) fn finish(mut self, value: i64, scratch: Option<(u32, u64)>) {
        if !self.at_exit && self.deferred.is_empty() {
            let mut skip = self.saved;
            skip.orig_rax = u64::MAX;
            skip.rax = value as u64;
            if sys::setregs(self.tid, &skip).is_ok() {
                let _ = sys::cont(self.tid, 0);
            }
            return;
        }
        if self.redeliver(scratch).is_err() {
            return;
        }
        let mut done = self.saved;
        done.rax = value as u64;
        if sys::setregs(self.tid, &done).is_ok() {
            let _ = sys::cont(self.tid, 0);
        }
    }

    /// The thread sends itself each signal held back, with its original siginfo where there
    /// is memory for it (a process may queue any siginfo to itself).
    fn redeliver(&mut self, scratch: Option<(u32, u64)>) -> Result<(), Gone> {
        // Bounded: each round may hold back new signals (a storm of SIGURG, say).
        for _ in 0..16 {
            let pending = std::mem::take(&mut self.deferred);
            if pending.is_empty() {
                return Ok(());
            }
            for signal in pending {
                let tgid = scratch.map_or(self.tid, |(tgid, _)| tgid);
                match (signal, scratch) {
                    (Deferred::Info(info), Some((_, page))) => {
                        let written = crate::tracee::Memory::open(self.tid)
                            .and_then(|m| m.write(page + AT_SIGINFO, &info))
                            .is_ok();
                        let signo = i32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
                        if written {
                            self.call(
                                libc::SYS_rt_tgsigqueueinfo,
                                [u64::from(tgid), u64::from(self.tid), signo as u64, page + AT_SIGINFO, 0, 0],
                            )?;
                        } else {
                            self.call(
                                libc::SYS_tgkill,
                                [u64::from(tgid), u64::from(self.tid), signo as u64, 0, 0, 0],
                            )?;
                        }
                    }
                    (Deferred::Info(info), None) => {
                        let signo = i32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
                        self.call(
                            libc::SYS_tgkill,
                            [u64::from(tgid), u64::from(self.tid), signo as u64, 0, 0, 0],
                        )?;
                    }
                    (Deferred::Stop(sig), _) => {
                        self.call(
                            libc::SYS_tgkill,
                            [u64::from(tgid), u64::from(self.tid), sig as u64, 0, 0, 0],
                        )?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The thread-group id of thread `tid`.
fn tgid_of(tid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    crate::tracee::status_field(&status, "Tgid:")?.parse().ok()
}

/// kmirror's scratch page in the thread's process, mapped by the thread on first use.
fn scratch_page(lp: &mut Loop, inj: &mut Injection, tgid: u32) -> Result<Result<u64, i64>, Gone> {
    if let Some(&page) = lp.scratch.get(&tgid) {
        return Ok(Ok(page));
    }
    let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
    let page = inj.call(libc::SYS_mmap, [0, SCRATCH_LEN, prot, flags, u64::MAX, 0])?;
    if (-4095..0).contains(&page) {
        return Ok(Err(page));
    }
    lp.scratch.insert(tgid, page as u64);
    Ok(Ok(page as u64))
}

/// Answers a call with a restart errno (docs/ptrace.md, *Restarts*): a harmless call runs in
/// its slot, and at that call's exit the registers get the original number back with `value`.
pub(super) fn answer_restart(lp: &mut Loop, tid: u32, regs: Regs, value: i64) {
    let mut inj = Injection::new(tid, regs);
    if inj.call(libc::SYS_getpid, [0; 6]).is_err() {
        return;
    }
    let tgid = tgid_of(tid);
    let scratch = tgid.and_then(|tgid| lp.scratch.get(&tgid).map(|&page| (tgid, page)));
    inj.finish(value, scratch);
}

/// Installs `fd` in the stopped thread's process as its lowest free descriptor and completes
/// the thread's call with that number (docs/ptrace.md, *Descriptors without ADDFD*).
pub(super) fn deliver_fd(lp: &mut Loop, tid: u32, regs: Regs, fd: OwnedFd, cloexec: bool) {
    let mut inj = Injection::new(tid, regs);
    let Some(tgid) = tgid_of(tid) else {
        // Its process cannot be read: the call fails rather than waiting forever.
        return inj.finish(-i64::from(libc::EIO), None);
    };
    match deliver(lp, &mut inj, tgid, &fd, cloexec) {
        Ok(result) => {
            let scratch = lp.scratch.get(&tgid).map(|&page| (tgid, page));
            inj.finish(result, scratch);
        }
        Err(Gone) => {
            if inj.exec_seen {
                lp.scratch.remove(&tgid);
            }
        }
    }
}

/// The steps; the app call's result (`-errno` when the descriptor could not be delivered).
fn deliver(lp: &mut Loop, inj: &mut Injection, tgid: u32, fd: &OwnedFd, cloexec: bool) -> Result<i64, Gone> {
    let page = match scratch_page(lp, inj, tgid)? {
        Ok(page) => page,
        Err(error) => return Ok(error),
    };
    let tid = inj.tid;
    let kind = (libc::SOCK_DGRAM | libc::SOCK_CLOEXEC) as u64;
    let made = inj.call(libc::SYS_socketpair, [libc::AF_UNIX as u64, kind, 0, page + AT_PAIR, 0, 0])?;
    if made < 0 {
        // EMFILE or ENFILE, as an open would fail.
        return Ok(made);
    }
    let pair = crate::tracee::read_bytes(tid, page + AT_PAIR, 8);
    let Ok(pair) = pair else { return Ok(-i64::from(libc::EIO)) };
    let a = i32::from_ne_bytes([pair[0], pair[1], pair[2], pair[3]]);
    let b = i32::from_ne_bytes([pair[4], pair[5], pair[6], pair[7]]);
    // Our copy of the app's end `a`: what is sent on it waits in `b`.
    let sent = lp.handles.take_fd(tid, a).and_then(|ours| send_fd(&ours, fd));
    inj.call(libc::SYS_close, [a as u64, 0, 0, 0, 0, 0])?;
    let mut result = match sent {
        Ok(()) => receive(inj, page, b, cloexec)?,
        Err(e) => -i64::from(e.raw_os_error().unwrap_or(libc::EIO)),
    };
    inj.call(libc::SYS_close, [b as u64, 0, 0, 0, 0, 0])?;
    if result == i64::from(b) {
        // Cannot be: `b` was open while the descriptor arrived.
        result = -i64::from(libc::EIO);
    }
    Ok(result)
}

fn send_fd(on: &OwnedFd, fd: &OwnedFd) -> std::io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
    let fds = [fd.as_raw_fd()];
    sendmsg::<UnixAddr>(
        on.as_raw_fd(),
        &[std::io::IoSlice::new(&[0])],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_DONTWAIT,
        None,
    )?;
    Ok(())
}

/// The thread receives on `b`: the number of the descriptor it got, or `-errno`.
fn receive(inj: &mut Injection, page: u64, b: i32, cloexec: bool) -> Result<i64, Gone> {
    let tid = inj.tid;
    let msghdr = msghdr_bytes(page);
    let iovec = [(page + AT_BYTE).to_ne_bytes(), 1u64.to_ne_bytes()].concat();
    let written = crate::tracee::Memory::open(tid).and_then(|m| {
        m.write(page + AT_MSGHDR, &msghdr)?;
        m.write(page + AT_IOVEC, &iovec)?;
        m.write(page + AT_CONTROL, &[0u8; CONTROL_LEN as usize])
    });
    if written.is_err() {
        return Ok(-i64::from(libc::EIO));
    }
    let mut flags = libc::MSG_DONTWAIT;
    if cloexec {
        flags |= libc::MSG_CMSG_CLOEXEC;
    }
    let got = inj.call(libc::SYS_recvmsg, [b as u64, page + AT_MSGHDR, flags as u64, 0, 0, 0])?;
    if got < 0 {
        return Ok(got);
    }
    let header = crate::tracee::read_bytes(tid, page + AT_MSGHDR, 56);
    let control = crate::tracee::read_bytes(tid, page + AT_CONTROL, CONTROL_LEN as usize);
    match (header, control) {
        (Ok(header), Ok(control)) => Ok(received_fd(&header, &control)),
        _ => Ok(-i64::from(libc::EIO)),
    }
}

/// The `struct msghdr` (x86_64, 56 bytes) for one byte into the iovec at `AT_IOVEC` and one
/// descriptor's control message at `AT_CONTROL`.
fn msghdr_bytes(page: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(56);
    h.extend_from_slice(&0u64.to_ne_bytes()); // msg_name
    h.extend_from_slice(&0u64.to_ne_bytes()); // msg_namelen + padding
    h.extend_from_slice(&(page + AT_IOVEC).to_ne_bytes()); // msg_iov
    h.extend_from_slice(&1u64.to_ne_bytes()); // msg_iovlen
    h.extend_from_slice(&(page + AT_CONTROL).to_ne_bytes()); // msg_control
    h.extend_from_slice(&CONTROL_LEN.to_ne_bytes()); // msg_controllen
    h.extend_from_slice(&0u64.to_ne_bytes()); // msg_flags + padding
    h
}

/// The descriptor number a received `SCM_RIGHTS` message carries, from the message header and
/// control buffer as the kernel left them; `-EMFILE` when it was dropped (`MSG_CTRUNC`: the
/// receiver had no descriptor left), as `ADDFD` reports it.
fn received_fd(header: &[u8], control: &[u8]) -> i64 {
    let word = |b: &[u8], at: usize| u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let int = |b: &[u8], at: usize| i32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let flags = int(header, 48);
    let controllen = word(header, 40);
    if flags & libc::MSG_CTRUNC != 0 || controllen < 20 {
        return -i64::from(libc::EMFILE);
    }
    let (len, level, kind) = (word(control, 0), int(control, 8), int(control, 12));
    if len < 20 || level != libc::SOL_SOCKET || kind != libc::SCM_RIGHTS {
        return -i64::from(libc::EMFILE);
    }
    i64::from(int(control, 16))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout written for the app's recvmsg is the C library's: a real recvmsg on a real
    /// socketpair fills it, and the number found in it is the descriptor received.
    #[test]
    fn the_message_layout_receives_a_descriptor_as_the_kernel_fills_it() {
        let mut page = vec![0u8; SCRATCH_LEN as usize];
        let base = page.as_mut_ptr() as u64;
        let header = msghdr_bytes(base);
        page[AT_MSGHDR as usize..AT_MSGHDR as usize + 56].copy_from_slice(&header);
        let iovec = [(base + AT_BYTE).to_ne_bytes(), 1u64.to_ne_bytes()].concat();
        page[AT_IOVEC as usize..AT_IOVEC as usize + 16].copy_from_slice(&iovec);
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let file = std::fs::File::open("/etc/hostname").unwrap();
        send_fd(&OwnedFd::from(a), &OwnedFd::from(file.try_clone().unwrap())).unwrap();
        let got = recvmsg_raw(&b, base + AT_MSGHDR);
        assert_eq!(got, 1);
        let fd = received_fd(
            &page[AT_MSGHDR as usize..AT_MSGHDR as usize + 56],
            &page[AT_CONTROL as usize..(AT_CONTROL + CONTROL_LEN) as usize],
        );
        assert!(fd > 2, "{fd}");
        use std::os::unix::fs::MetadataExt;
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        assert_eq!(std::fs::metadata(link).unwrap().ino(), file.metadata().unwrap().ino());
        nix::unistd::close(fd as i32).unwrap();
        std::hint::black_box(&page);
    }

    #[test]
    fn a_truncated_or_foreign_control_message_is_emfile() {
        let mut header = msghdr_bytes(0);
        header[40..48].copy_from_slice(&24u64.to_ne_bytes());
        let mut control = vec![0u8; 24];
        control[0..8].copy_from_slice(&20u64.to_ne_bytes());
        control[8..12].copy_from_slice(&libc::SOL_SOCKET.to_ne_bytes());
        control[12..16].copy_from_slice(&libc::SCM_RIGHTS.to_ne_bytes());
        control[16..20].copy_from_slice(&7i32.to_ne_bytes());
        assert_eq!(received_fd(&header, &control), 7);
        let mut truncated = header.clone();
        truncated[48..52].copy_from_slice(&libc::MSG_CTRUNC.to_ne_bytes());
        assert_eq!(received_fd(&truncated, &control), -i64::from(libc::EMFILE));
        control[12..16].copy_from_slice(&libc::SCM_CREDENTIALS.to_ne_bytes());
        assert_eq!(received_fd(&header, &control), -i64::from(libc::EMFILE));
    }

    /// recvmsg into the message header at `at` (in this process), as the app's thread does.
    fn recvmsg_raw(sock: &std::os::unix::net::UnixDatagram, at: u64) -> i64 {
        let rc = nix::errno::Errno::result(recvmsg_syscall(sock.as_raw_fd(), at)).unwrap();
        rc as i64
    }

    fn recvmsg_syscall(fd: i32, at: u64) -> libc::c_long {
        super::super::sys::raw_syscall(libc::SYS_recvmsg, [fd as u64, at, 0, 0, 0, 0])
    }
}
