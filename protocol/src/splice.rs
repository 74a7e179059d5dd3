//! Zero-copy hand-offs between sockets through a pipe (`splice(2)`).
//!
//! A bulk relay moves each payload from the source socket into a pipe and from the pipe into the
//! destination socket. The kernel passes page references along instead of copying the bytes
//! through user space, which on a bulk transfer saves one copy in and one copy out at every hop.
//!
//! Readiness stays with tokio: every splice runs inside the socket's `try_io`, so a would-block
//! clears the socket's readiness exactly as a read would. The one would-block that is not the
//! socket's (the pipe has no free slot) is reported as [`SpliceIn::PipeFull`] instead, so tokio
//! does not forget that the socket still has data.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};

/// Pipe capacity asked for: 512 KiB holds the largest spliced frame; the default 64 KiB
/// measured about 10% slower on bulk transfers.
const PIPE_CAPACITY: usize = 512 * 1024;
/// Slots (pages) of a pipe the kernel creates by default.
const DEFAULT_PIPE_PAGES: usize = 16;
/// Pipe pages one tunnel end holds at most. The kernel counts every pipe's slots against its
/// user's quota (`fs.pipe-user-pages-soft`, 16384 pages by default), and a user over it gets
/// two-slot pipes everywhere, the app's own included. kmirror runs as the developer, so each
/// end keeps to a quarter of the default quota: 32 full-size pipes, or 256 default ones.
/// Streams beyond it relay by copying.
pub const PAGE_BUDGET: usize = 4096;

/// The pipe pages a set of pipes may hold together.
#[derive(Debug)]
pub struct PipeBudget {
    held: AtomicUsize,
    limit: usize,
}

impl PipeBudget {
    pub fn new(limit_pages: usize) -> Arc<PipeBudget> {
        Arc::new(PipeBudget { held: AtomicUsize::new(0), limit: limit_pages })
    }

    /// Reserves `pages`; false if the budget does not have them.
    fn reserve(&self, pages: usize) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held + pages <= self.limit).then_some(held + pages)
            })
            .is_ok()
    }

    fn release(&self, pages: usize) {
        self.held.fetch_sub(pages, Ordering::AcqRel);
    }
}

/// A non-blocking pipe that carries one relay direction's bytes between two splices.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Pages of `budget` this pipe holds.
    pages: usize,
    budget: Arc<PipeBudget>,
}

impl Pipe {
    /// A pipe of [`PIPE_CAPACITY`] if the budget allows, else of the default size; an error if
    /// the budget has no room even for that.
    pub fn new(budget: &Arc<PipeBudget>) -> io::Result<Pipe> {
        if !budget.reserve(DEFAULT_PIPE_PAGES) {
            return Err(io::Error::new(io::ErrorKind::OutOfMemory, "the relay pipe budget is spent"));
        }
        use nix::fcntl::OFlag;
        let (read, write) = match nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK) {
            Ok(ends) => ends,
            Err(e) => {
                budget.release(DEFAULT_PIPE_PAGES);
                return Err(e.into());
            }
        };
        let mut pipe = Pipe { read, write, pages: DEFAULT_PIPE_PAGES, budget: budget.clone() };
        let full_pages = PIPE_CAPACITY / 4096;
        if budget.reserve(full_pages - DEFAULT_PIPE_PAGES) {
            // Best effort: over the user's quota the kernel refuses, and the default size still
            // works, only with shorter splices.
            let resize = nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_CAPACITY as libc::c_int);
            if nix::fcntl::fcntl(&pipe.write, resize).is_ok() {
                pipe.pages = full_pages;
            } else {
                budget.release(full_pages - DEFAULT_PIPE_PAGES);
            }
        }
        Ok(pipe)
    }

    /// The end splices take bytes out of.
    pub(crate) fn read_fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Whether the pipe has a free slot (a splice into it would move something).
    fn has_room(&self) -> bool {
        use nix::poll::{PollFd, PollFlags, PollTimeout};
        let mut poll = [PollFd::new(self.write.as_fd(), PollFlags::POLLOUT)];
        nix::poll::poll(&mut poll, PollTimeout::ZERO) == Ok(1)
            && poll[0].revents().is_some_and(|r| r.contains(PollFlags::POLLOUT))
    }

    /// Reads up to `out.len()` bytes out of the pipe without waiting.
    pub fn read_some(&self, out: &mut [u8]) -> io::Result<usize> {
        Ok(nix::unistd::read(&self.read, out)?)
    }

    /// Copies `len` bytes that the pipe holds out of it (for consumers that cannot splice).
    pub fn read_exact(&self, len: usize) -> io::Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        let mut filled = 0;
        while filled < len {
            match self.read_some(&mut out[filled..])? {
                0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "relay pipe ran dry")),
                n => filled += n,
            }
        }
        Ok(out)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.budget.release(self.pages);
    }
}

/// One `splice` call that never blocks the thread.
pub(crate) fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    use nix::fcntl::SpliceFFlags;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    Ok(nix::fcntl::splice(from, None, to, None, len, flags)?)
}

/// A tokio socket whose readiness drives splices.
pub trait SpliceSocket: AsFd + Sync {
    fn ready_for(&self, interest: Interest) -> impl Future<Output = io::Result<()>> + Send;
    fn try_io_for<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
}

macro_rules! splice_socket {
    ($ty:ty) => {
        impl SpliceSocket for $ty {
            async fn ready_for(&self, interest: Interest) -> io::Result<()> {
                self.ready(interest).await.map(|_| ())
            }
            fn try_io_for<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
                self.try_io(interest, f)
            }
        }
    };
}
splice_socket!(TcpStream);
splice_socket!(UnixStream);

/// What a splice from a socket into a pipe did.
#[derive(Debug, PartialEq, Eq)]
pub enum SpliceIn {
    Moved(usize),
    /// The socket reached end of stream.
    Eof,
    /// The pipe has no free slot; the socket may still have data.
    PipeFull,
}

/// Moves up to `len` bytes that the socket has (waiting until it has some) into the pipe.
pub async fn splice_in(socket: &impl SpliceSocket, pipe: &Pipe, len: usize) -> io::Result<SpliceIn> {
    loop {
        socket.ready_for(Interest::READABLE).await?;
        let moved = socket.try_io_for(Interest::READABLE, || {
            match splice(socket.as_fd(), pipe.write.as_fd(), len) {
                // Not the socket's would-block: keep its readiness.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && !pipe.has_room() => Ok(None),
                other => other.map(Some),
            }
        });
        return match moved {
            Ok(Some(0)) => Ok(SpliceIn::Eof),
            Ok(Some(n)) => Ok(SpliceIn::Moved(n)),
            Ok(None) => Ok(SpliceIn::PipeFull),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => Err(e),
        };
    }
}

/// Moves exactly `len` bytes, which the pipe must hold, into the socket.
pub async fn splice_out(pipe: &Pipe, socket: &impl SpliceSocket, mut len: usize) -> io::Result<()> {
    while len > 0 {
        socket.ready_for(Interest::WRITABLE).await?;
        match socket.try_io_for(Interest::WRITABLE, || splice(pipe.read.as_fd(), socket.as_fd(), len)) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "relay pipe ran dry")),
            Ok(n) => len -= n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_cross_a_pipe_between_sockets_in_order() {
        let (mut from_app, from) = UnixStream::pair().unwrap();
        let (to, mut to_sink) = UnixStream::pair().unwrap();
        let pipe = Pipe::new(&PipeBudget::new(PAGE_BUDGET)).unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let writer = {
            let data = data.clone();
            tokio::spawn(async move {
                from_app.write_all(&data).await.unwrap();
                drop(from_app);
            })
        };
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            to_sink.read_to_end(&mut got).await.unwrap();
            got
        });
        loop {
            match splice_in(&from, &pipe, 64 * 1024).await.unwrap() {
                SpliceIn::Moved(n) => splice_out(&pipe, &to, n).await.unwrap(),
                SpliceIn::Eof => break,
                SpliceIn::PipeFull => panic!("the pipe is drained after every splice"),
            }
        }
        drop(to);
        writer.await.unwrap();
        assert_eq!(reader.await.unwrap(), data);
    }

    #[test]
    fn pipes_stay_within_the_page_budget_and_return_it() {
        let budget = PipeBudget::new(PAGE_BUDGET);
        let pipes: Vec<Pipe> = std::iter::from_fn(|| Pipe::new(&budget).ok()).take(1000).collect();
        // 32 full-size pipes, then default ones until the budget is spent.
        let full = pipes.iter().filter(|p| p.pages == PIPE_CAPACITY / 4096).count();
        assert_eq!(full, PAGE_BUDGET / (PIPE_CAPACITY / 4096));
        assert_eq!(pipes.len(), full, "the full-size pipes take the whole budget");
        assert_eq!(budget.held.load(Ordering::Acquire), PAGE_BUDGET);
        drop(pipes);
        assert_eq!(budget.held.load(Ordering::Acquire), 0, "dropped pipes return their pages");
        let small = PipeBudget::new(3 * DEFAULT_PIPE_PAGES);
        let pipes: Vec<Pipe> = std::iter::from_fn(|| Pipe::new(&small).ok()).take(10).collect();
        assert_eq!(pipes.len(), 3, "a budget too small for full-size pipes still gives default ones");
        assert!(pipes.iter().all(|p| p.pages == DEFAULT_PIPE_PAGES));
    }

    #[tokio::test]
    async fn a_full_pipe_is_told_apart_from_an_empty_socket() {
        let (mut app, from) = UnixStream::pair().unwrap();
        let pipe = Pipe::new(&PipeBudget::new(PAGE_BUDGET)).unwrap();
        // Fill the pipe completely by splicing without draining.
        let chunk = vec![7u8; 64 * 1024];
        let mut filled = 0;
        loop {
            app.write_all(&chunk).await.unwrap();
            match splice_in(&from, &pipe, chunk.len()).await.unwrap() {
                SpliceIn::Moved(n) => filled += n,
                SpliceIn::PipeFull => break,
                SpliceIn::Eof => panic!("the app did not close"),
            }
        }
        assert!(filled > 0);
        // The socket still holds data and must still count as readable for tokio.
        let mut probe = [0u8; 1];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            from.readable().await.unwrap();
            from.try_read(&mut probe)
        })
        .await
        .expect("readiness was kept")
        .unwrap();
        assert_eq!(n, 1);
        let mut out = vec![0u8; 4096];
        assert!(pipe.read_some(&mut out).unwrap() > 0);
    }
}
