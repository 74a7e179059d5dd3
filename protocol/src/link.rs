//! The tunnel's Unix socket, split into a reader and a writer that ask the event loop only for
//! the wake-ups they use.
//!
//! tokio's `UnixStream` registers for readability and writability at once, edge-triggered. A
//! Unix socket reports "writable" to its writer every time the peer consumes a message, so a
//! tunnel end idling in `epoll_wait` was woken once for every frame the other end read: about
//! a third of all event-loop turns on a connection set-up, each one doing nothing. Here the
//! reader registers for readability only, and the writer writes without any registration,
//! registering (on its own duplicate of the descriptor) only after a write would block, and
//! dropping that registration when it has nothing left to send.

// Unsafe: tokio's AsyncFd registrations; recv(2) into ReadBuf's uninitialised bytes (nix's needs init).
#![allow(unsafe_code)]

use crate::splice::{Pipe, SpliceSocket, splice};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Most slices one `sendmsg` takes (Linux's IOV_MAX).
const MAX_SLICES: usize = 1024;

/// Splits a connected stream socket into the tunnel's two halves. Must run on a tokio runtime.
pub fn split(stream: std::os::unix::net::UnixStream) -> io::Result<(LinkReader, LinkWriter)> {
    stream.set_nonblocking(true)?;
    let write = OwnedFd::from(stream.try_clone()?);
    let read = OwnedFd::from(stream);
    // SAFETY: the AsyncFd owns the descriptor, so it stays open for as long as it is
    // registered.
    let read = unsafe { AsyncFd::register_with_interest(read, Interest::READABLE)? };
    Ok((LinkReader { fd: read }, LinkWriter { waiting: None, fd: write }))
}

/// The receiving half: registered for readability only.
#[derive(Debug)]
pub struct LinkReader {
    fd: AsyncFd<OwnedFd>,
}

/// The sending half.
#[derive(Debug)]
pub struct LinkWriter {
    /// Present only while a write waits for room. Declared before `fd` so it is deregistered
    /// before the descriptor closes.
    waiting: Option<AsyncFd<Borrowed>>,
    fd: OwnedFd,
}

/// The writer's descriptor as seen by its registration, which does not own it.
#[derive(Debug)]
struct Borrowed(RawFd);

impl AsRawFd for Borrowed {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

fn is_would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Runs a system call that returns a byte count or -1, again if a signal interrupted it.
fn retrying(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl AsyncRead for LinkReader {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let want = buf.remaining();
        if want == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            // SAFETY: recv only writes into the unfilled part, and only the bytes it reports
            // written are marked initialised below.
            let unfilled = unsafe { buf.unfilled_mut() };
            let fd = self.fd.as_raw_fd();
            // SAFETY: recv into memory we were lent, at most its length.
            match retrying(|| unsafe { libc::recv(fd, unfilled.as_mut_ptr().cast(), want, 0) }) {
                Ok(n) => {
                    // A short read drained the socket: the next data is a new edge, so the
                    // would-block read that would otherwise follow is skipped (tokio does the
                    // same for its own sockets). End of stream keeps its readiness.
                    if n > 0 && n < want {
                        guard.clear_ready();
                    }
                    // SAFETY: recv initialised the first `n` bytes of the unfilled part.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if is_would_block(&e) => guard.clear_ready(),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl SpliceSocket for LinkReader {
    async fn ready_for(&self, interest: Interest) -> io::Result<()> {
        self.fd.ready(interest).await.map(|_| ())
    }

    fn try_io_for<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        self.fd.try_io(interest, |_| f())
    }
}

impl AsRawFd for LinkReader {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for LinkReader {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

impl LinkWriter {
    /// Runs `op` on the socket until it does not would-block, registering for writability
    /// only once it has.
    fn poll_io<R>(
        &mut self,
        cx: &mut Context<'_>,
        mut op: impl FnMut(BorrowedFd<'_>) -> io::Result<R>,
    ) -> Poll<io::Result<R>> {
        let fd = self.fd.as_fd();
        loop {
            let Some(waiting) = &self.waiting else {
                match op(fd) {
                    Err(e) if is_would_block(&e) => {
                        // SAFETY: `self.fd` owns the descriptor and outlives the registration
                        // (see the field order).
                        let registration = unsafe {
                            AsyncFd::register_with_interest(Borrowed(fd.as_raw_fd()), Interest::WRITABLE)?
                        };
                        self.waiting = Some(registration);
                        continue;
                    }
                    other => return Poll::Ready(other),
                }
            };
            let mut guard = ready!(waiting.poll_write_ready(cx))?;
            match op(fd) {
                Err(e) if is_would_block(&e) => guard.clear_ready(),
                other => return Poll::Ready(other),
            }
        }
    }

    /// Drops the writability registration, if any: called when nothing is queued, so that the
    /// peer's reads stop waking this end.
    pub fn idle(&mut self) {
        self.waiting = None;
    }

    /// Moves exactly `len` bytes, which the pipe must hold, into the socket.
    pub async fn splice_from(&mut self, pipe: &Pipe, mut len: usize) -> io::Result<()> {
        while len > 0 {
            let n = std::future::poll_fn(|cx| self.poll_io(cx, |fd| splice(pipe.read_fd(), fd, len))).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "relay pipe ran dry"));
            }
            len -= n;
        }
        Ok(())
    }
}

/// Like tokio's write halves: the peer sees end of stream when the writer goes, even while
/// this end's reader still holds the socket open.
impl Drop for LinkWriter {
    fn drop(&mut self) {
        // Failure (already shut, not connected) is moot.
        let _ = nix::sys::socket::shutdown(self.fd.as_raw_fd(), nix::sys::socket::Shutdown::Write);
    }
}

fn send_slices(fd: BorrowedFd<'_>, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    use nix::sys::socket::{MsgFlags, SockaddrStorage, sendmsg};
    let bufs = &bufs[..bufs.len().min(MAX_SLICES)];
    // MSG_NOSIGNAL turns a closed peer into EPIPE instead of a signal.
    let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
    loop {
        match sendmsg::<SockaddrStorage>(fd.as_raw_fd(), bufs, &[], flags, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            sent => return Ok(sent?),
        }
    }
}

impl AsyncWrite for LinkWriter {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_io(cx, |fd| send_slices(fd, &[io::IoSlice::new(buf)]))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_io(cx, |fd| send_slices(fd, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(nix::sys::socket::shutdown(self.fd.as_raw_fd(), nix::sys::socket::Shutdown::Write)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pair() -> ((LinkReader, LinkWriter), (LinkReader, LinkWriter)) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        (split(a).unwrap(), split(b).unwrap())
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_shutdown_ends_the_stream() {
        let ((mut ar, mut aw), (mut br, mut bw)) = pair();
        aw.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        br.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        bw.write_all(b"pong").await.unwrap();
        bw.shutdown().await.unwrap();
        let mut rest = Vec::new();
        ar.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"pong");
        // The other direction still works after one side's shutdown, and dropping the writer
        // ends it even though this end's reader keeps the socket open.
        aw.write_all(b"more").await.unwrap();
        drop(aw);
        let mut tail = Vec::new();
        br.read_to_end(&mut tail).await.unwrap();
        assert_eq!(tail, b"more");
    }

    /// A writer that outpaces its reader blocks, registers, and resumes exactly where it was.
    #[tokio::test]
    async fn a_full_socket_makes_the_writer_wait_and_resume() {
        let ((_ar, mut aw), (mut br, _bw)) = pair();
        let data: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            let half = data.len() / 2;
            aw.write_all(&data[..half]).await.unwrap();
            let waited = aw.waiting.is_some();
            aw.idle();
            let mut slices =
                [io::IoSlice::new(&data[half..half + 1000]), io::IoSlice::new(&data[half + 1000..])];
            let mut slices = &mut slices[..];
            while !slices.is_empty() {
                let n = aw.write_vectored(slices).await.unwrap();
                io::IoSlice::advance_slices(&mut slices, n);
            }
            waited
        });
        let mut got = vec![0u8; expected.len()];
        br.read_exact(&mut got).await.unwrap();
        assert!(got == expected, "bytes differ");
        assert!(writer.await.unwrap(), "8 MiB cannot fit a socket buffer: the writer must have waited");
    }

    /// Many rounds of congestion, each ended by `idle`, with a reader that pauses: every
    /// registration and deregistration keeps the bytes exact and in order.
    #[tokio::test]
    async fn repeated_waits_and_idles_keep_the_stream_exact() {
        let ((_ar, mut aw), (mut br, _bw)) = pair();
        const ROUNDS: u32 = 40;
        const ROUND: usize = 512 * 1024;
        let writer = tokio::spawn(async move {
            let mut waits = 0;
            for round in 0..ROUNDS {
                let chunk: Vec<u8> = (0..ROUND).map(|i| (i as u32 ^ round).wrapping_mul(31) as u8).collect();
                aw.write_all(&chunk).await.unwrap();
                waits += usize::from(aw.waiting.is_some());
                aw.idle();
            }
            waits
        });
        let mut got = vec![0u8; ROUND];
        for round in 0..ROUNDS {
            if round % 4 == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            br.read_exact(&mut got).await.unwrap();
            let expected: Vec<u8> = (0..ROUND).map(|i| (i as u32 ^ round).wrapping_mul(31) as u8).collect();
            assert!(got == expected, "round {round} differs");
        }
        let waits = writer.await.unwrap();
        assert!(waits > 0, "half a MiB per round must have made the writer wait at least once");
    }

    #[tokio::test]
    async fn a_closed_peer_is_an_error_not_a_signal() {
        let ((_ar, mut aw), (br, bw)) = pair();
        drop((br, bw));
        let e = aw.write_all(b"x").await.unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPIPE));
    }
}
