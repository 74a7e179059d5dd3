//! Reaching into a trapped thread: its memory and its file descriptors.
//!
//! Reads use `process_vm_readv`, resolved against the thread's current address space at each
//! call (a cached `/proc/<pid>/mem` would go stale across exec). Writes ([`Memory`]) are used
//! only for *output* buffers of emulated calls, never to rewrite a call's inputs.

use std::os::fd::{AsFd, OwnedFd, RawFd};

const PAGE: u64 = 4096;
/// `PIDFD_THREAD` (= O_EXCL): a pidfd for a thread that is not its group's leader (6.9+).
const PIDFD_THREAD: libc::c_uint = libc::O_EXCL as libc::c_uint;

/// Reads exactly `len` bytes at `addr` in thread `tid`.
pub fn read_bytes(tid: u32, addr: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let n = read_into(tid, addr, &mut buf)?;
    if n != len {
        return Err(std::io::Error::from_raw_os_error(libc::EFAULT));
    }
    Ok(buf)
}

fn read_into(tid: u32, addr: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    if buf.is_empty() {
        return Ok(0);
    }
    let remote = nix::sys::uio::RemoteIoVec { base: addr as usize, len: buf.len() };
    let pid = nix::unistd::Pid::from_raw(tid as libc::pid_t);
    Ok(nix::sys::uio::process_vm_readv(pid, &mut [std::io::IoSliceMut::new(buf)], &[remote])?)
}

/// Reads a NUL-terminated string of at most `max` bytes, page by page so that a string ending
/// just before an unmapped page still reads. Fails with ENAMETOOLONG past `max`.
pub fn read_cstring(tid: u32, addr: u64, max: usize) -> std::io::Result<Vec<u8>> {
    if addr == 0 {
        return Err(std::io::Error::from_raw_os_error(libc::EFAULT));
    }
    // One buffer, read into in place: this runs for every trapped path, on the notify thread.
    let mut out = Vec::new();
    let mut at = addr;
    // A string of `max` bytes plus its NUL fits; one byte more cannot.
    while out.len() <= max {
        let start = out.len();
        let chunk = ((PAGE - at % PAGE) as usize).min(max + 1 - start);
        out.resize(start + chunk, 0);
        let n = read_into(tid, at, &mut out[start..])?;
        if n == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EFAULT));
        }
        if let Some(end) = out[start..start + n].iter().position(|&b| b == 0) {
            out.truncate(start + end);
            return Ok(out);
        }
        out.truncate(start + n);
        at += n as u64;
    }
    Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG))
}

/// A thread's address space, opened to write the output buffers of an emulated call.
///
/// Open it *before* checking that the trapped call is still waiting: the descriptor then names
/// that thread's memory for good, so a write can never land in another process that reused the
/// thread id after the check (a write by tid, as `process_vm_writev` does, could). Writes go
/// through `/proc/<tid>/mem`, which, unlike `process_vm_writev`, also reaches read-only pages;
/// the buffers written are the ones the app passed for output.
pub struct Memory(std::fs::File);

impl Memory {
    pub fn open(tid: u32) -> std::io::Result<Memory> {
        Ok(Memory(std::fs::OpenOptions::new().write(true).open(format!("/proc/{tid}/mem"))?))
    }

    /// Writes `bytes` at `addr`; an address the thread has not mapped fails (EFAULT for the app).
    pub fn write(&self, addr: u64, bytes: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.0.write_all_at(bytes, addr)
    }
}

/// Whether this kernel opens pidfds of single threads (PIDFD_THREAD, Linux 6.9). Older kernels
/// reject the flag: our own main thread is a thread, so asking for it tells.
/// `KMIRROR_FORCE_FALLBACK=thread-pidfd` makes kmirror behave as on such a kernel (to test and
/// compare the fallback on a current one).
pub fn thread_pidfds_supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let forced_off =
            std::env::var("KMIRROR_FORCE_FALLBACK").is_ok_and(|v| v.split(',').any(|f| f == "thread-pidfd"));
        !forced_off && crate::sys::pidfd_open(std::process::id(), PIDFD_THREAD).is_ok()
    })
}

/// Whether `ours` (in this process) is the open file that thread `tid` has as `fd`.
fn same_open_file(tid: u32, fd: RawFd, ours: &OwnedFd) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    match crate::sys::kcmp_files(std::process::id(), tid, ours.as_raw_fd(), fd) {
        Ok(0) => Ok(true),
        Ok(1..=3) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            // Kernels built without kcmp: the same inode and device is the same socket or file.
            use std::os::unix::fs::MetadataExt;
            let theirs = std::fs::metadata(format!("/proc/{tid}/fd/{fd}"))?;
            let ours = std::fs::File::from(ours.try_clone()?).metadata()?;
            Ok((theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()))
        }
        Ok(_) => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
        Err(e) => Err(e),
    }
}

/// How a trapped thread's descriptors are reached.
struct Handle {
    pidfd: OwnedFd,
    /// The pidfd names the thread's process, not the thread (kernels before 6.9): pidfd_getfd
    /// then reads the process leader's descriptor table, which a thread may not share, and a
    /// cached entry may name the process that had this tid before. Each descriptor taken is
    /// checked against the thread's own.
    of_process: bool,
}

fn open_handle(tid: u32, thread_pidfds: bool) -> std::io::Result<Handle> {
    if thread_pidfds {
        return Ok(Handle { pidfd: crate::sys::pidfd_open(tid, PIDFD_THREAD)?, of_process: false });
    }
    let status = std::fs::read_to_string(format!("/proc/{tid}/status"))?;
    let tgid = status_field(&status, "Tgid:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    Ok(Handle { pidfd: crate::sys::pidfd_open(tgid, 0)?, of_process: true })
}

/// A descriptor taken from the process leader's table is not the trapped thread's.
const NOT_THE_THREADS: i32 = libc::EXDEV;

/// pidfds of the app's threads, kept across calls: opening one costs about as much as the rest
/// of a fast answer (getpeername is trapped on every socket). A thread pidfd names one thread
/// for good: once that thread is gone, a call through it fails with ESRCH — even if its tid was
/// reused — and the entry is reopened. On kernels without thread pidfds, see [`Handle`].
/// Handles of threads that have exited are let go within a second ([`forget_exited`], called
/// by the session), so a tree of many short-lived processes leaves no descriptors behind.
///
/// [`forget_exited`]: ThreadHandles::forget_exited
pub struct ThreadHandles {
    cache: std::sync::Mutex<std::collections::HashMap<u32, std::sync::Arc<Handle>>>,
    thread_pidfds: bool,
}

impl Default for ThreadHandles {
    fn default() -> ThreadHandles {
        ThreadHandles::new(thread_pidfds_supported())
    }
}

/// Entries kept before the cache starts over (threads come and go).
const THREAD_CACHE_LIMIT: usize = 4096;

impl ThreadHandles {
    fn new(thread_pidfds: bool) -> ThreadHandles {
        ThreadHandles { cache: Default::default(), thread_pidfds }
    }

    fn handle(&self, tid: u32, fresh: bool) -> std::io::Result<std::sync::Arc<Handle>> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if !fresh && let Some(handle) = cache.get(&tid) {
            return Ok(handle.clone());
        }
        if cache.len() >= THREAD_CACHE_LIMIT {
            cache.clear();
        }
        let handle = std::sync::Arc::new(open_handle(tid, self.thread_pidfds)?);
        cache.insert(tid, handle.clone());
        Ok(handle)
    }

    fn take_with(handle: &Handle, tid: u32, fd: RawFd) -> std::io::Result<OwnedFd> {
        let taken = crate::sys::pidfd_getfd(handle.pidfd.as_fd(), fd)?;
        if handle.of_process && !same_open_file(tid, fd, &taken)? {
            return Err(std::io::Error::from_raw_os_error(NOT_THE_THREADS));
        }
        Ok(taken)
    }

    /// Closes the handles of threads that have exited (a thread pidfd polls readable then; a
    /// process pidfd, without thread pidfds, once the process has).
    pub fn forget_exited(&self) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.is_empty() {
            return;
        }
        use nix::poll::{PollFd, PollFlags, PollTimeout};
        let tids: Vec<u32> = cache.keys().copied().collect();
        let mut fds: Vec<PollFd<'_>> =
            tids.iter().map(|tid| PollFd::new(cache[tid].pidfd.as_fd(), PollFlags::POLLIN)).collect();
        if nix::poll::poll(&mut fds, PollTimeout::ZERO).unwrap_or(0) <= 0 {
            return;
        }
        let exited: Vec<bool> = fds.iter().map(|fd| fd.revents().is_none_or(|r| !r.is_empty())).collect();
        for (tid, exited) in tids.iter().zip(exited) {
            if exited {
                cache.remove(tid);
            }
        }
    }

    #[cfg(test)]
    fn cached(&self) -> usize {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Duplicates descriptor `fd` of thread `tid` into this process. The copy shares the open
    /// file description: connecting or binding it acts on the app's own socket.
    pub fn take_fd(&self, tid: u32, fd: RawFd) -> std::io::Result<OwnedFd> {
        match Self::take_with(&*self.handle(tid, false)?, tid, fd) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ESRCH | NOT_THE_THREADS)) => {
                let result = Self::take_with(&*self.handle(tid, true)?, tid, fd);
                if result.as_ref().is_err_and(|e| e.raw_os_error() == Some(NOT_THE_THREADS)) {
                    static SAID: std::sync::Once = std::sync::Once::new();
                    SAID.call_once(|| {
                        tracing::warn!(
                            "thread {tid} has a descriptor table of its own: without thread pidfds \
                             (Linux 6.9) kmirror cannot reach its sockets, so their calls run unredirected"
                        )
                    });
                }
                result
            }
            result => result,
        }
    }
}

/// Reads the target of a `/proc` symlink (cwd, fd/N) of thread `tid`.
pub fn proc_link(tid: u32, what: &str) -> std::io::Result<Vec<u8>> {
    use std::os::unix::ffi::OsStringExt;
    Ok(std::fs::read_link(format!("/proc/{tid}/{what}"))?.into_os_string().into_vec())
}

/// A thread's `/proc/<tid>/status`, kept open for repeated signal checks: re-reading an open
/// proc file costs about 6 µs here, opening it again about 10.
pub struct SignalWatch {
    status: std::fs::File,
    buf: Vec<u8>,
}

impl SignalWatch {
    pub fn open(tid: u32) -> std::io::Result<SignalWatch> {
        Ok(SignalWatch { status: std::fs::File::open(format!("/proc/{tid}/status"))?, buf: Vec::new() })
    }

    /// Whether the thread has a signal pending that it does not block and that is most likely
    /// its to handle: one the kernel would deliver as soon as the thread ran.
    pub fn pending(&mut self) -> std::io::Result<bool> {
        use std::os::unix::fs::FileExt;
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        loop {
            match self.status.read_at(&mut chunk, self.buf.len() as u64)? {
                0 => break,
                n => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
        let status = String::from_utf8_lossy(&self.buf);
        Ok(deliverable_signals(&status).is_some_and(|set| set != 0))
    }
}

/// The value of one `Key:` line of a `/proc/<tid>/status` text, trimmed.
pub fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.lines().find_map(|line| line.strip_prefix(key)).map(str::trim)
}

/// Signals pending for this thread and not blocked, from a `/proc/<tid>/status` text. A
/// process-wide signal (`kill`, a terminal's Ctrl-C) counts only for the thread-group leader:
/// the kernel offers it to the leader first, and every other waiting thread that handed its
/// call back for it would then sit in the kernel's call instead, out of kmirror's reach.
fn deliverable_signals(status: &str) -> Option<u64> {
    let field = |key: &str| status_field(status, key);
    let mask = |key: &str| field(key).and_then(|hex| u64::from_str_radix(hex, 16).ok());
    let leader = field("Tgid:")? == field("Pid:")?;
    let shared = if leader { mask("ShdPnd:")? } else { 0 };
    Some((mask("SigPnd:")? | shared) & !mask("SigBlk:")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliverable_signals_are_pending_and_unblocked() {
        let status = |tid: u32| {
            format!(
                "Name:\tapp\nTgid:\t100\nPid:\t{tid}\nSigQ:\t1/63\nSigPnd:\t0000000000000200\n\
                 ShdPnd:\t0000000000006000\nSigBlk:\t0000000000004000\nSigIgn:\t0000000000001000\n"
            )
        };
        // The leader: SIGUSR1 (bit 9) pending for it and process-wide SIGALRM (bit 13);
        // SIGTERM (bit 14) is pending but blocked.
        assert_eq!(deliverable_signals(&status(100)), Some(0x2200));
        // Another thread: only what was sent to it.
        assert_eq!(deliverable_signals(&status(101)), Some(0x200));
        assert_eq!(deliverable_signals("Tgid:\t1\nPid:\t1\nSigPnd:\t0\nShdPnd:\t0\nSigBlk:\t0\n"), Some(0));
        assert_eq!(deliverable_signals("SigPnd:\t0\n"), None);
    }

    #[test]
    fn a_signal_sent_to_a_thread_is_seen_pending() {
        use nix::sys::signal::{SigSet, Signal};
        let me = gettid();
        // SIGUSR2 is blocked for this test thread only and then sent to it, so it stays pending
        // (never delivered) until sigwait consumes it; the mask is restored after.
        let mut set = SigSet::empty();
        set.add(Signal::SIGUSR2);
        set.thread_block().unwrap();
        // One watch, read again after the signal: a kept-open status file shows news.
        let mut watch = SignalWatch::open(me).unwrap();
        assert!(!watch.pending().unwrap());
        nix::sys::pthread::pthread_kill(nix::sys::pthread::pthread_self(), Signal::SIGUSR2).unwrap();
        // Blocked: pending, but not deliverable.
        assert!(!watch.pending().unwrap());
        let status = String::from_utf8_lossy(&watch.buf);
        assert!(status.lines().any(|l| l.starts_with("SigPnd:") && l.trim_end().ends_with("800")));
        assert_eq!(set.wait().unwrap(), Signal::SIGUSR2);
        set.thread_unblock().unwrap();
    }

    #[test]
    fn handles_of_exited_threads_are_let_go() {
        let handles = ThreadHandles::default();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Descriptor 0 of the child: the pipe.
        handles.take_fd(child.id(), 0).unwrap();
        handles.forget_exited();
        assert_eq!(handles.cached(), 1, "a running thread keeps its handle");
        child.kill().unwrap();
        child.wait().unwrap();
        handles.forget_exited();
        assert_eq!(handles.cached(), 0, "an exited thread's handle is closed");
    }

    #[test]
    fn memory_stays_bound_to_the_thread_it_was_opened_for() {
        // Once that thread is gone, writes fail, whatever process gets its id next: the
        // descriptor names an address space, not a number.
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", child.id())).unwrap();
        let writable = maps.lines().find(|l| l.split_whitespace().nth(1) == Some("rw-p")).unwrap();
        let addr = u64::from_str_radix(writable.split('-').next().unwrap(), 16).unwrap();
        let memory = Memory::open(child.id()).unwrap();
        memory.write(addr, b"x").unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(memory.write(addr, b"x").is_err());
    }

    fn gettid() -> u32 {
        nix::unistd::gettid().as_raw() as u32
    }

    #[test]
    fn descriptors_are_taken_with_and_without_thread_pidfds() {
        assert!(thread_pidfds_supported(), "this machine's kernel has PIDFD_THREAD");
        // A thread other than the leader, with a descriptor of its own number.
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let file = std::fs::File::open("/etc/hostname").unwrap();
            tid_tx.send((gettid(), std::os::fd::AsRawFd::as_raw_fd(&file))).unwrap();
            done_rx.recv().unwrap();
        });
        let (tid, fd) = tid_rx.recv().unwrap();
        for thread_pidfds in [true, false] {
            let taken = ThreadHandles::new(thread_pidfds).take_fd(tid, fd).unwrap();
            assert!(same_open_file(tid, fd, &taken).unwrap(), "thread pidfds: {thread_pidfds}");
        }
        done_tx.send(()).unwrap();
        thread.join().unwrap();
    }

    #[test]
    fn a_thread_with_its_own_descriptor_table_is_not_confused_with_its_process() {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let shared = std::fs::File::open("/etc/hostname").unwrap();
        let number = std::os::fd::AsRawFd::as_raw_fd(&shared);
        let thread = std::thread::spawn(move || {
            // unshare(CLONE_FILES) gives this thread a private copy of the table; another file
            // then takes the same number in that copy only (closed with the copy when the thread
            // ends).
            use nix::fcntl::{FcntlArg, fcntl};
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_FILES).unwrap();
            let other = std::fs::File::open("/etc/passwd").unwrap();
            nix::unistd::close(number).unwrap();
            assert_eq!(fcntl(&other, FcntlArg::F_DUPFD_CLOEXEC(number)), Ok(number));
            tid_tx.send(gettid()).unwrap();
            done_rx.recv().unwrap();
        });
        let tid = tid_rx.recv().unwrap();
        // A thread pidfd reaches the thread's own table.
        let taken = ThreadHandles::new(true).take_fd(tid, number).unwrap();
        assert!(same_open_file(tid, number, &taken).unwrap());
        // A process pidfd would reach the leader's: refused instead of handing the wrong file.
        let refused = ThreadHandles::new(false).take_fd(tid, number).unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(NOT_THE_THREADS));
        done_tx.send(()).unwrap();
        thread.join().unwrap();
        drop(shared);
    }

    #[test]
    fn reads_and_writes_own_memory() {
        let me = std::process::id();
        let text = b"hello\0world";
        assert_eq!(read_cstring(me, text.as_ptr() as u64, 64).unwrap(), b"hello");
        assert_eq!(read_bytes(me, text.as_ptr() as u64 + 6, 5).unwrap(), b"world");
        assert_eq!(read_cstring(me, text.as_ptr() as u64, 5).unwrap(), b"hello");
        let too_long = read_cstring(me, text.as_ptr() as u64, 4).unwrap_err();
        assert_eq!(too_long.raw_os_error(), Some(libc::ENAMETOOLONG));
        assert!(read_cstring(me, 0, 10).is_err());
        let mut target = [0u8; 4];
        let memory = Memory::open(me).unwrap();
        memory.write(target.as_mut_ptr() as u64, b"abcd").unwrap();
        assert_eq!(std::hint::black_box(target), *b"abcd");
        assert!(memory.write(0, b"x").is_err(), "an unmapped address fails");
    }
}
