//! One tunnel connection multiplexed into request/response exchanges and byte streams.
//!
//! A writer task owns the write half and batches queued frames into large writes; a reader task
//! owns the read half and routes each frame. Every stream has credit-based flow control: a side
//! may have at most [`STREAM_WINDOW`] unacknowledged payload bytes in flight per stream, and the
//! receiver returns credit only after the bytes left its buffer (written to the local socket). So
//! one slow consumer stalls only its own stream, and memory per stream is bounded.
//!
//! Over a Unix-socket tunnel, TCP relays that move bulk data splice their payloads: from the
//! local socket into a pipe and from the pipe into the tunnel on the sending side, and from the
//! tunnel into a pipe and on into the local socket on the receiving side, so payload bytes are
//! not copied through user space at either end (see [`crate::splice`]).

use crate::codec::{self, CodecError, Frame, Head, MAX_DATA_CHUNK};
use crate::link::{LinkReader, LinkWriter};
use crate::message::*;
use crate::splice::{PAGE_BUDGET, Pipe, PipeBudget, SpliceIn, splice_in, splice_out};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

/// Payload bytes a sender may have unacknowledged on one stream.
pub const STREAM_WINDOW: usize = 1024 * 1024;
/// Requests and stream opens from the peer that wait for this side to take them: beyond it
/// the reader stops reading the tunnel, so a peer that floods requests is slowed down by
/// the socket instead of growing this side's memory.
pub const INCOMING_QUEUE: usize = 64;
/// Encoded replies queued for the writer, in bytes: a responder waits beyond it, so a peer
/// that sends requests but reads no answers cannot make this side buffer them without bound.
/// Four times the largest frame, so one large answer never waits for another.
pub const MAX_QUEUED_REPLY_BYTES: usize = 4 * codec::MAX_FRAME;
/// Smallest read buffer of a relay (see `next_read_size`).
const MIN_READ_BUFFER: usize = 16 * 1024;

/// Doubles the read buffer after a read that filled it, halves it after one that used little.
fn next_read_size(size: usize, read: usize) -> usize {
    if read == size {
        (size * 2).min(MAX_DATA_CHUNK)
    } else if read < size / 4 {
        (size / 2).max(MIN_READ_BUFFER)
    } else {
        size
    }
}

/// Frames are coalesced into writes of up to this many bytes.
const WRITE_BATCH: usize = 256 * 1024;

/// Largest payload a bulk relay splices into one frame (see [`crate::splice`]).
const SPLICE_CHUNK: usize = 512 * 1024;
/// Smallest incoming payload worth splicing out of the tunnel: below it, a copy costs less
/// than the extra system calls.
const SPLICE_MIN: usize = 32 * 1024;

/// The tunnel's read half. A Unix socket lets bulk payloads be spliced out of it.
pub trait TunnelRead: AsyncRead + Unpin + Send + 'static {
    fn link(&self) -> Option<&LinkReader> {
        None
    }
}

/// The tunnel's write half. A Unix socket lets bulk payloads be spliced into it.
pub trait TunnelWrite: AsyncWrite + Unpin + Send + 'static {
    fn link(&mut self) -> Option<&mut LinkWriter> {
        None
    }
}

impl TunnelRead for LinkReader {
    fn link(&self) -> Option<&LinkReader> {
        Some(self)
    }
}

impl TunnelWrite for LinkWriter {
    fn link(&mut self) -> Option<&mut LinkWriter> {
        Some(self)
    }
}

impl<T: AsyncRead + Send + 'static> TunnelRead for tokio::io::ReadHalf<T> {}
impl<T: AsyncWrite + Send + 'static> TunnelWrite for tokio::io::WriteHalf<T> {}

/// One side of a relayed connection. A TCP socket lets bulk payloads be spliced.
pub trait RelayRead: AsyncRead + Unpin {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

/// The other side of a relayed connection; see [`RelayRead`].
pub trait RelayWrite: AsyncWrite + Unpin {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

impl RelayRead for tokio::net::tcp::ReadHalf<'_> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

impl RelayWrite for tokio::net::tcp::WriteHalf<'_> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.as_ref())
    }
}

impl<T: AsyncRead> RelayRead for tokio::io::ReadHalf<T> {}
impl<T: AsyncWrite> RelayWrite for tokio::io::WriteHalf<T> {}

/// Which end of the tunnel this is; decides the parity of stream ids it allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Supervisor,
    Agent,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TunnelError {
    #[error("the tunnel to the agent is closed ({0})")]
    Closed(String),
    #[error("no answer from the agent within {0:?}")]
    Timeout(Duration),
    /// Also reports a request too large for one frame (E2BIG), refused before it was sent.
    #[error("the pod side refused: errno {}", .0.0)]
    Refused(Errno),
}

/// What the peer asked of this side.
#[derive(Debug)]
pub enum Incoming {
    /// `caller`: the app the request acts for, when it came as [`Control::RequestAs`].
    Request {
        id: u64,
        body: Request,
        caller: Option<Identity>,
    },
    Open {
        stream: Stream,
        target: OpenTarget,
    },
    Goodbye {
        reason: String,
    },
}

/// An event on the receive side of a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    Data(Vec<u8>),
    /// The peer will send no more (FIN).
    Shutdown,
    /// The peer aborted the stream, or the tunnel died.
    Reset,
}

/// What the reader hands a stream's consumer.
#[derive(Debug)]
enum Event {
    Inbound(Inbound),
    /// This many payload bytes wait in the pipe, in order with the other events.
    Spliced(Arc<Pipe>, usize),
}

/// What the writer puts on the tunnel.
enum Outgoing {
    Frame(Frame),
    /// A control frame encoded by its sender (who checked its size); a queued reply holds its
    /// share of the reply budget until it is written.
    Encoded {
        bytes: Vec<u8>,
        _budget: Option<OwnedSemaphorePermit>,
    },
    /// A data frame whose `len`-byte payload waits in `pipe`; `drained` fires once it left.
    Spliced {
        stream: StreamId,
        pipe: Arc<Pipe>,
        len: usize,
        drained: oneshot::Sender<()>,
    },
}

struct Slot {
    inbound: mpsc::UnboundedSender<Event>,
    credit: Arc<Semaphore>,
    /// Payload bytes received but not yet granted back; a peer exceeding the window is cut off.
    unacked: Arc<AtomicUsize>,
    /// Whether the consumer can take spliced payloads, and the pipe they go through.
    splice: Option<Option<Arc<Pipe>>>,
}

struct Shared {
    out: mpsc::UnboundedSender<Outgoing>,
    side: Side,
    /// The protocol version negotiated in the handshake.
    version: u16,
    /// Bounds the bytes of replies queued for the writer ([`MAX_QUEUED_REPLY_BYTES`]).
    reply_budget: Arc<Semaphore>,
    /// Whether payloads can be spliced into the tunnel (its write half is a Unix socket).
    splice_out: bool,
    /// Whether payloads can be spliced out of the tunnel (its read half is a Unix socket).
    splice_in: bool,
    /// Bounds the relay pipes of this tunnel end.
    pipes: Arc<PipeBudget>,
    /// Payload bytes spliced out of the tunnel, and payloads copied because a pipe was full:
    /// logged when the tunnel closes, and checked by tests.
    spliced_in: AtomicU64,
    pipe_full_copies: AtomicU64,
    streams: Mutex<HashMap<StreamId, Slot>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Response>>>,
    opening: Mutex<HashMap<StreamId, oneshot::Sender<OpenVerdict>>>,
    next_request: AtomicU64,
    next_stream: AtomicU32,
    closed: watch::Sender<Option<String>>,
}

/// Handle to a running tunnel; cheap to clone.
#[derive(Clone)]
pub struct Tunnel {
    shared: Arc<Shared>,
}

impl Tunnel {
    /// Starts the reader and writer tasks on the current tokio runtime, for a peer that speaks
    /// this build's [`crate::PROTOCOL_VERSION`]. See [`Tunnel::start_with_version`].
    pub fn start<R: TunnelRead, W: TunnelWrite>(
        reader: R,
        writer: W,
        side: Side,
    ) -> (Tunnel, mpsc::Receiver<Incoming>) {
        Tunnel::start_with_version(reader, writer, side, crate::PROTOCOL_VERSION)
    }

    /// Starts the reader and writer tasks on the current tokio runtime. Call after the
    /// handshake, with the version it negotiated. Requests and stream opens from the peer
    /// arrive on the returned receiver, which holds at most [`INCOMING_QUEUE`] of them.
    pub fn start_with_version<R: TunnelRead, W: TunnelWrite>(
        reader: R,
        mut writer: W,
        side: Side,
        version: u16,
    ) -> (Tunnel, mpsc::Receiver<Incoming>) {
        let (out, out_rx) = mpsc::unbounded_channel();
        let (incoming_tx, incoming_rx) = mpsc::channel(INCOMING_QUEUE);
        let shared = Arc::new(Shared {
            out,
            side,
            version,
            reply_budget: Arc::new(Semaphore::new(MAX_QUEUED_REPLY_BYTES)),
            splice_out: writer.link().is_some(),
            splice_in: reader.link().is_some(),
            pipes: PipeBudget::new(PAGE_BUDGET),
            spliced_in: AtomicU64::new(0),
            pipe_full_copies: AtomicU64::new(0),
            streams: Mutex::default(),
            pending: Mutex::default(),
            opening: Mutex::default(),
            next_request: AtomicU64::new(1),
            next_stream: AtomicU32::new(match side {
                Side::Supervisor => 1,
                Side::Agent => 2,
            }),
            closed: watch::channel(None).0,
        });
        let tunnel = Tunnel { shared };
        tokio::spawn(write_loop(writer, out_rx, tunnel.clone()));
        tokio::spawn(read_loop(reader, incoming_tx, tunnel.clone()));
        (tunnel, incoming_rx)
    }

    /// The protocol version negotiated with the peer: message kinds newer than it must not
    /// be sent.
    pub fn version(&self) -> u16 {
        self.shared.version
    }

    /// Sends a request and waits for its answer, at most `timeout`. A request too large for
    /// one frame fails at once with E2BIG.
    pub async fn request(&self, body: Request, timeout: Duration) -> Result<Response, TunnelError> {
        self.send_request(|id| Control::Request { id, body }, timeout).await
    }

    /// Sends a request to be served with `caller`'s credentials ([`Control::RequestAs`]; the
    /// peer must speak [`crate::CREDENTIALS_VERSION`]) and waits for its answer, as
    /// [`Tunnel::request`].
    pub async fn request_as(
        &self,
        caller: Identity,
        body: Request,
        timeout: Duration,
    ) -> Result<Response, TunnelError> {
        self.send_request(|id| Control::RequestAs { id, caller, body }, timeout).await
    }

    async fn send_request(
        &self,
        control: impl FnOnce(u64) -> Control,
        timeout: Duration,
    ) -> Result<Response, TunnelError> {
        let id = self.shared.next_request.fetch_add(1, Ordering::Relaxed);
        let mut encoded = Vec::new();
        if let Err(e) = codec::encode(&Frame::Control(control(id)), &mut encoded) {
            tracing::warn!("a request cannot be sent: {e}");
            return Err(TunnelError::Refused(Errno(E2BIG)));
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.shared.pending).insert(id, tx);
        // `shut_down` marks the tunnel closed before it clears the waiters, so checking after
        // registering cannot miss a close.
        if self.is_closed() {
            lock(&self.shared.pending).remove(&id);
            return Err(self.closed_error());
        }
        let _ = self.shared.out.send(Outgoing::Encoded { bytes: encoded, _budget: None });
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(_)) => Err(self.closed_error()),
            Err(_) => {
                lock(&self.shared.pending).remove(&id);
                Err(TunnelError::Timeout(timeout))
            }
        }
    }

    /// Answers a request received as [`Incoming::Request`]. An answer too large for one frame
    /// is replaced by `Error(E2BIG)`, so the requester learns at once instead of timing out.
    /// Waits while [`MAX_QUEUED_REPLY_BYTES`] of answers are queued for the writer (a peer
    /// that does not read its answers).
    pub async fn respond(&self, id: u64, body: Response) {
        let bytes = encode_reply(id, body);
        let Ok(budget) = self.shared.reply_budget.clone().acquire_many_owned(bytes.len() as u32).await else {
            return; // the tunnel is closed
        };
        let _ = self.shared.out.send(Outgoing::Encoded { bytes, _budget: Some(budget) });
    }

    /// Asks the peer to open a stream to `target` and waits for its verdict, at most `timeout`.
    pub async fn open(&self, target: OpenTarget, timeout: Duration) -> Result<Stream, TunnelError> {
        let id = self.next_stream_id();
        let mut stream = self.register(id);
        let (tx, rx) = oneshot::channel();
        lock(&self.shared.opening).insert(id, tx);
        if self.is_closed() {
            lock(&self.shared.opening).remove(&id);
            return Err(self.closed_error());
        }
        self.send(Control::Open { stream: id, target });
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(local))) => {
                stream.far_local = local;
                Ok(stream)
            }
            Ok(Ok(Err(errno))) => Err(TunnelError::Refused(errno)),
            Ok(Err(_)) => Err(self.closed_error()),
            Err(_) => {
                lock(&self.shared.opening).remove(&id);
                stream.reset();
                Err(TunnelError::Timeout(timeout))
            }
        }
    }

    /// The next id for a stream this side opens: of this side's parity, never 0, and never
    /// one still in use (the counter wraps after 2^31 opens).
    fn next_stream_id(&self) -> StreamId {
        loop {
            let id = self.shared.next_stream.fetch_add(2, Ordering::Relaxed);
            if id != 0 && !lock(&self.shared.streams).contains_key(&id) {
                return id;
            }
        }
    }

    /// Whether `id` is one the peer may choose for a stream it opens.
    fn is_peer_stream_id(&self, id: StreamId) -> bool {
        let peer_ids_are_even = self.shared.side == Side::Supervisor;
        id != 0 && id.is_multiple_of(2) == peer_ids_are_even
    }

    /// Tells the peer the session is over.
    pub fn goodbye(&self, reason: String) {
        self.send(Control::Goodbye { reason });
    }

    /// Resolves with the reason once the tunnel has stopped working.
    pub async fn closed(&self) -> String {
        let mut rx = self.shared.closed.subscribe();
        let reason = rx.wait_for(Option::is_some).await.map(|r| r.clone());
        reason.ok().flatten().unwrap_or_else(|| "tunnel dropped".into())
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.borrow().is_some()
    }

    fn closed_error(&self) -> TunnelError {
        let reason = self.shared.closed.borrow().clone();
        TunnelError::Closed(reason.unwrap_or_else(|| "tunnel dropped".into()))
    }

    fn send(&self, msg: Control) {
        // A send after the writer stopped is harmless: the tunnel is closed and every waiter
        // learns that through `closed`.
        let _ = self.shared.out.send(Outgoing::Frame(Frame::Control(msg)));
    }

    fn register(&self, id: StreamId) -> Stream {
        let (tx, rx) = mpsc::unbounded_channel();
        let credit = Arc::new(Semaphore::new(STREAM_WINDOW));
        let unacked = Arc::new(AtomicUsize::new(0));
        let slot = Slot { inbound: tx, credit: credit.clone(), unacked: unacked.clone(), splice: None };
        if self.is_closed() {
            credit.close();
        } else {
            lock(&self.shared.streams).insert(id, slot);
        }
        Stream {
            id,
            tunnel: self.clone(),
            inbound: rx,
            credit,
            unacked,
            ungranted: AtomicUsize::new(0),
            far_local: None,
        }
    }

    fn shut_down(&self, reason: String) {
        let first = self.shared.closed.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(reason);
                true
            } else {
                false
            }
        });
        if first {
            tracing::debug!(
                spliced_in = self.shared.spliced_in.load(Ordering::Relaxed),
                pipe_full_copies = self.shared.pipe_full_copies.load(Ordering::Relaxed),
                "tunnel closed"
            );
        }
        for (_, slot) in lock(&self.shared.streams).drain() {
            slot.credit.close();
            let _ = slot.inbound.send(Event::Inbound(Inbound::Reset));
        }
        lock(&self.shared.pending).clear();
        lock(&self.shared.opening).clear();
        // Responders waiting for room in the queue give up: nothing will be written.
        self.shared.reply_budget.close();
    }

    /// Hands `len` received payload bytes of `stream` to its consumer, unless they overrun
    /// the window.
    fn deliver(&self, stream: StreamId, len: usize, event: Event) {
        let streams = lock(&self.shared.streams);
        if let Some(slot) = streams.get(&stream) {
            let unacked = slot.unacked.fetch_add(len, Ordering::AcqRel) + len;
            if unacked > STREAM_WINDOW {
                drop(streams);
                tracing::warn!(stream, unacked, "peer overran the stream window; resetting");
                self.reset_stream(stream);
            } else {
                let _ = slot.inbound.send(event);
            }
        }
    }

    /// The pipe to splice a `len`-byte payload of `stream` into, if its consumer takes spliced
    /// payloads and the payload is large enough to be worth it.
    fn splice_pipe(&self, stream: StreamId, len: usize) -> Option<Arc<Pipe>> {
        if !self.shared.splice_in || len < SPLICE_MIN {
            return None;
        }
        let mut streams = lock(&self.shared.streams);
        let pipe = streams.get_mut(&stream)?.splice.as_mut()?;
        if pipe.is_none() {
            *pipe = Some(Arc::new(Pipe::new(&self.shared.pipes).ok()?));
        }
        pipe.clone()
    }

    /// Lets the reader splice `stream`'s large payloads, for a consumer that can take them.
    fn accept_spliced(&self, stream: StreamId) {
        if self.shared.splice_in
            && let Some(slot) = lock(&self.shared.streams).get_mut(&stream)
        {
            slot.splice.get_or_insert(None);
        }
    }

    /// Acts on one control frame; returns what must be handed to this side's consumer.
    /// Frames no honest peer sends are a protocol violation (`Err`): the tunnel is closed.
    fn route(&self, control: Control) -> Result<Option<Incoming>, String> {
        match control {
            Control::Request { id, body } => return Ok(Some(Incoming::Request { id, body, caller: None })),
            Control::RequestAs { id, caller, body } => {
                return Ok(Some(Incoming::Request { id, body, caller: Some(caller) }));
            }
            Control::Response { id, body } => {
                if let Some(waiter) = lock(&self.shared.pending).remove(&id) {
                    let _ = waiter.send(body);
                }
            }
            Control::Open { stream, target } => {
                if !self.is_peer_stream_id(stream) {
                    return Err(format!("the peer opened stream {stream}, an id it may not choose"));
                }
                // A duplicate would replace a live stream's slot and take over its traffic.
                if lock(&self.shared.streams).contains_key(&stream) {
                    return Err(format!("the peer opened stream {stream}, which is still open"));
                }
                let stream = self.register(stream);
                return Ok(Some(Incoming::Open { stream, target }));
            }
            Control::Opened { stream, result, local } => {
                if let Some(waiter) = lock(&self.shared.opening).remove(&stream) {
                    let _ = waiter.send(result.map(|()| local));
                }
            }
            Control::Credit { stream, bytes } => {
                let streams = lock(&self.shared.streams);
                if let Some(slot) = streams.get(&stream) {
                    // The peer returns only credit for bytes it received: more than the window
                    // is a lie that would let this side buffer without bound (and overflow the
                    // semaphore).
                    if slot.credit.available_permits() + bytes as usize > STREAM_WINDOW {
                        drop(streams);
                        tracing::warn!(stream, bytes, "peer granted credit beyond the window; resetting");
                        self.reset_stream(stream);
                    } else {
                        slot.credit.add_permits(bytes as usize);
                    }
                }
            }
            Control::Shutdown { stream } => {
                if let Some(slot) = lock(&self.shared.streams).get(&stream) {
                    let _ = slot.inbound.send(Event::Inbound(Inbound::Shutdown));
                }
            }
            Control::Reset { stream } => {
                if let Some(slot) = lock(&self.shared.streams).remove(&stream) {
                    slot.credit.close();
                    let _ = slot.inbound.send(Event::Inbound(Inbound::Reset));
                }
            }
            Control::Goodbye { reason } => return Ok(Some(Incoming::Goodbye { reason })),
            Control::Hello(_) | Control::HelloReply(_) => {
                return Err("handshake message after the handshake".into());
            }
        }
        Ok(None)
    }

    fn reset_stream(&self, id: StreamId) {
        if let Some(slot) = lock(&self.shared.streams).remove(&id) {
            slot.credit.close();
            let _ = slot.inbound.send(Event::Inbound(Inbound::Reset));
        }
        self.send(Control::Reset { stream: id });
    }
}

/// The peer's answer to an open: its socket's own address (if it told), or why it failed.
type OpenVerdict = Result<Option<SocketAddr>, Errno>;

const E2BIG: i32 = 7;

/// The frame answering request `id` with `body`, or with `Error(E2BIG)` if `body` does not fit
/// in one frame.
fn encode_reply(id: u64, body: Response) -> Vec<u8> {
    let mut out = Vec::new();
    match codec::encode(&Frame::Control(Control::Response { id, body }), &mut out) {
        Ok(()) => out,
        Err(e) => {
            tracing::warn!("the answer to request {id} does not fit in one frame ({e}); answering E2BIG");
            out.clear();
            let refusal = Frame::Control(Control::Response { id, body: Response::Error(Errno(E2BIG)) });
            codec::encode(&refusal, &mut out).expect("an error answer fits in a frame");
            out
        }
    }
}

/// Payloads at least this long are written from their own buffer (a vectored write) instead
/// of being copied into the batch.
const INLINE_LIMIT: usize = 4 * 1024;

/// Where one piece of a batched write comes from.
enum Piece {
    /// Encoded bytes in the batch buffer.
    Encoded(std::ops::Range<usize>),
    /// The payload of the batch's frame at this index.
    Payload(usize),
    /// The spliced payload of the batch's item at this index.
    Pipe(usize),
}

async fn write_loop<W: TunnelWrite>(
    mut writer: W,
    mut queue: mpsc::UnboundedReceiver<Outgoing>,
    tunnel: Tunnel,
) {
    let mut encoded = Vec::with_capacity(WRITE_BATCH);
    let mut batch = Vec::new();
    let mut pieces = Vec::new();
    loop {
        let item = match queue.try_recv() {
            Ok(item) => item,
            Err(mpsc::error::TryRecvError::Disconnected) => return,
            Err(mpsc::error::TryRecvError::Empty) => {
                if let Some(link) = writer.link() {
                    link.idle();
                }
                let Some(item) = queue.recv().await else { return };
                item
            }
        };
        encoded.clear();
        batch.clear();
        pieces.clear();
        let mut size = 0;
        let mut next = Some(item);
        while let Some(item) = next.take() {
            let start = encoded.len();
            // A payload written from its own buffer or pipe, with its length.
            let (written, payload) = match &item {
                Outgoing::Frame(Frame::Data { stream, bytes }) if bytes.len() >= INLINE_LIMIT => (
                    codec::encode_data_header(*stream, bytes.len(), &mut encoded),
                    Some((Piece::Payload(batch.len()), bytes.len())),
                ),
                Outgoing::Frame(frame) => (codec::encode(frame, &mut encoded), None),
                Outgoing::Encoded { bytes, .. } => {
                    encoded.extend_from_slice(bytes);
                    (Ok(()), None)
                }
                Outgoing::Spliced { stream, len, .. } => (
                    codec::encode_data_header(*stream, *len, &mut encoded),
                    Some((Piece::Pipe(batch.len()), *len)),
                ),
            };
            if let Err(e) = written {
                tracing::error!("dropping unencodable frame: {e}");
                continue;
            }
            match pieces.last_mut() {
                // Consecutive encoded frames are one piece.
                Some(Piece::Encoded(range)) if range.end == start => range.end = encoded.len(),
                _ => pieces.push(Piece::Encoded(start..encoded.len())),
            }
            size += encoded.len() - start;
            if let Some((piece, len)) = payload {
                pieces.push(piece);
                size += len;
            }
            batch.push(item);
            if size < WRITE_BATCH {
                next = queue.try_recv().ok();
            }
        }
        if let Err(e) = write_batch(&mut writer, &pieces, &encoded, &batch).await {
            tunnel.shut_down(format!("write failed: {e}"));
            return;
        }
        for item in batch.drain(..) {
            if let Outgoing::Spliced { drained, .. } = item {
                let _ = drained.send(());
            }
        }
    }
}

/// Writes a batch's pieces in order: runs of in-memory pieces as one vectored write each,
/// spliced payloads straight from their pipes.
async fn write_batch<W: TunnelWrite>(
    writer: &mut W,
    pieces: &[Piece],
    encoded: &[u8],
    batch: &[Outgoing],
) -> std::io::Result<()> {
    let mut run: Vec<std::io::IoSlice<'_>> = Vec::with_capacity(pieces.len());
    for piece in pieces {
        match piece {
            Piece::Encoded(range) => run.push(std::io::IoSlice::new(&encoded[range.clone()])),
            Piece::Payload(i) => match &batch[*i] {
                Outgoing::Frame(Frame::Data { bytes, .. }) => run.push(std::io::IoSlice::new(bytes)),
                _ => unreachable!("only data frames have payload pieces"),
            },
            Piece::Pipe(i) => {
                let Outgoing::Spliced { pipe, len, .. } = &batch[*i] else {
                    unreachable!("only spliced items have pipe pieces")
                };
                write_all_vectored(writer, &mut run).await?;
                writer.flush().await?;
                run.clear();
                let link = writer.link().expect("payloads are spliced only into a Unix socket");
                link.splice_from(pipe, *len).await?;
            }
        }
    }
    write_all_vectored(writer, &mut run).await?;
    writer.flush().await
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    writer: &mut W,
    mut slices: &mut [std::io::IoSlice<'_>],
) -> std::io::Result<()> {
    std::io::IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match writer.write_vectored(slices).await? {
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            n => std::io::IoSlice::advance_slices(&mut slices, n),
        }
    }
    Ok(())
}

async fn read_loop<R: TunnelRead>(mut reader: R, incoming: mpsc::Sender<Incoming>, tunnel: Tunnel) {
    let mut frames = codec::FrameReader::default();
    let reason = loop {
        let head = match frames.read_head(&mut reader).await {
            Ok(Some(head)) => head,
            Ok(None) => break "the peer closed the tunnel".to_string(),
            Err(e) => break format!("{e}"),
        };
        let routed = match head {
            Head::Control(control) => {
                frames.set_lean(false);
                match tunnel.route(control) {
                    // Waits while the consumer is [`INCOMING_QUEUE`] behind: back-pressure on
                    // the peer. (A consumer that went away drops what comes.)
                    Ok(Some(item)) => {
                        let _ = incoming.send(item).await;
                        Ok(())
                    }
                    Ok(None) => Ok(()),
                    Err(reason) => Err(format!("protocol violation: {reason}")),
                }
            }
            Head::Data { stream, len } => match tunnel.splice_pipe(stream, len) {
                Some(pipe) => {
                    frames.set_lean(true);
                    tunnel.receive_spliced(&mut frames, &mut reader, stream, len, pipe).await
                }
                None => {
                    frames.set_lean(false);
                    match frames.read_payload(&mut reader, len).await {
                        Ok(bytes) => {
                            tunnel.deliver(stream, len, Event::Inbound(Inbound::Data(bytes)));
                            Ok(())
                        }
                        Err(e) => Err(format!("{e}")),
                    }
                }
            },
        };
        if let Err(reason) = routed {
            break reason;
        }
    };
    tunnel.shut_down(reason);
}

impl Tunnel {
    /// Moves a `len`-byte payload of `stream` from the tunnel into `pipe` without copying it;
    /// the part already read ahead, or any part the pipe has no room for, goes as a copy.
    async fn receive_spliced<R: TunnelRead>(
        &self,
        frames: &mut codec::FrameReader,
        reader: &mut R,
        stream: StreamId,
        len: usize,
        pipe: Arc<Pipe>,
    ) -> Result<(), String> {
        let buffered = frames.take_buffered(len).to_vec();
        let mut left = len - buffered.len();
        if !buffered.is_empty() {
            self.deliver(stream, buffered.len(), Event::Inbound(Inbound::Data(buffered)));
        }
        while left > 0 {
            let socket = reader.link().expect("splicing is enabled only on a Unix socket");
            let step = splice_in(socket, &pipe, left).await.map_err(|e| format!("tunnel i/o: {e}"))?;
            match step {
                SpliceIn::Moved(n) => {
                    self.shared.spliced_in.fetch_add(n as u64, Ordering::Relaxed);
                    self.deliver(stream, n, Event::Spliced(pipe.clone(), n));
                    left -= n;
                }
                SpliceIn::PipeFull => {
                    // The consumer is behind; copying keeps the other streams moving.
                    self.shared.pipe_full_copies.fetch_add(1, Ordering::Relaxed);
                    let bytes = frames.read_payload(reader, left).await.map_err(|e| format!("{e}"))?;
                    self.deliver(stream, left, Event::Inbound(Inbound::Data(bytes)));
                    left = 0;
                }
                SpliceIn::Eof => return Err("tunnel i/o: early eof".into()),
            }
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One multiplexed byte stream (or datagram flow). Dropping it forgets the stream locally.
#[derive(Debug)]
pub struct Stream {
    id: StreamId,
    tunnel: Tunnel,
    inbound: mpsc::UnboundedReceiver<Event>,
    credit: Arc<Semaphore>,
    unacked: Arc<AtomicUsize>,
    /// Consumed bytes whose credit is not returned yet (see [`CREDIT_BATCH`]).
    ungranted: AtomicUsize,
    /// For a stream this side opened: the peer's socket address at its own end, if it told.
    far_local: Option<SocketAddr>,
}

/// Credit goes back in batches: a credit frame per consumed chunk would double the frames, and
/// the peer's wakeups, of a chatty connection. Holding back less than a quarter of the window
/// never stalls the sender, which can always send the other three quarters.
const CREDIT_BATCH: usize = STREAM_WINDOW / 4;

/// Marks `n` received bytes consumed; returns their credit once a batch has gathered. Each
/// stream has one consumer, so the load/store pair does not race.
fn consumed(tunnel: &Tunnel, id: StreamId, unacked: &AtomicUsize, ungranted: &AtomicUsize, n: usize) {
    unacked.fetch_sub(n, Ordering::AcqRel);
    let pending = ungranted.load(Ordering::Acquire) + n;
    if pending >= CREDIT_BATCH {
        ungranted.store(0, Ordering::Release);
        tunnel.send(Control::Credit { stream: id, bytes: pending as u32 });
    } else {
        ungranted.store(pending, Ordering::Release);
    }
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel").field("closed", &self.is_closed()).finish()
    }
}

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both directions finished with an orderly close.
    Closed,
    /// One side aborted; the other was reset too.
    Reset,
}

impl Stream {
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// Answers an [`Incoming::Open`]: the stream is usable when `result` is Ok.
    pub fn opened(&self, result: Result<(), Errno>) {
        self.tunnel.send(Control::Opened { stream: self.id, result, local: None });
    }

    /// Answers an [`Incoming::Open`] with success, telling the opener where this side's socket
    /// is bound.
    pub fn opened_at(&self, local: SocketAddr) {
        self.tunnel.send(Control::Opened { stream: self.id, result: Ok(()), local: Some(local) });
    }

    /// For a stream opened with [`Tunnel::open`]: where the peer's socket is bound, if it said.
    pub fn far_local(&self) -> Option<SocketAddr> {
        self.far_local
    }

    /// Sends bytes, waiting for credit; splits large writes. Fails once the stream is reset.
    pub async fn send(&self, bytes: &[u8]) -> Result<(), TunnelError> {
        send_data(&self.tunnel, &self.credit, self.id, bytes).await
    }

    /// Next event from the peer. Data must be acknowledged with [`Stream::grant`] once consumed.
    pub async fn recv(&mut self) -> Inbound {
        next_inbound(&mut self.inbound).await
    }

    /// Marks `n` received bytes consumed, so the peer may send that much more.
    pub fn grant(&self, n: usize) {
        if n > 0 {
            consumed(&self.tunnel, self.id, &self.unacked, &self.ungranted, n);
        }
    }

    pub fn shutdown(&self) {
        self.tunnel.send(Control::Shutdown { stream: self.id });
    }

    pub fn reset(&self) {
        self.tunnel.reset_stream(self.id);
    }

    /// Relays between a TCP connection and this stream until both directions are closed or
    /// either side aborts. An abort is passed on as a reset (RST on the TCP side).
    pub async fn relay_tcp(mut self, mut socket: TcpStream) -> RelayEnd {
        let (rd, wr) = socket.split();
        let outcome = self.pump(rd, wr).await;
        if outcome == RelayEnd::Reset {
            // SO_LINGER 0 turns the close into a RST, which is how the far side's abort is
            // passed on; on a non-blocking socket it never blocks the thread.
            #[allow(deprecated)]
            let _ = socket.set_linger(Some(Duration::ZERO));
            self.reset();
        }
        outcome
    }

    /// Like [`Stream::relay_tcp`] for any byte stream (an in-process pipe, say).
    pub async fn relay_io<S: AsyncRead + AsyncWrite + Unpin>(mut self, io: S) -> RelayEnd {
        let (rd, wr) = tokio::io::split(io);
        let outcome = self.pump(rd, wr).await;
        if outcome == RelayEnd::Reset {
            self.reset();
        }
        outcome
    }

    /// Copies `rd` into the stream and the stream into `wr`, returning credit as bytes leave.
    /// Between TCP sockets and a Unix-socket tunnel, bulk payloads are spliced instead.
    async fn pump<R: RelayRead, W: RelayWrite>(&mut self, mut rd: R, mut wr: W) -> RelayEnd {
        if wr.tcp().is_some() {
            self.tunnel.accept_spliced(self.id);
        }
        let Stream { id, tunnel, inbound, credit, unacked, ungranted, .. } = self;
        let (id, tunnel, credit): (StreamId, &Tunnel, &Semaphore) = (*id, tunnel, credit);
        let upstream = async move {
            // Each read lands in the buffer that becomes the frame's payload (no copy). Its size
            // adapts: small while the connection is idle or chatty (a thousand idle
            // connections must not pin a full chunk each), growing to a full chunk for bulk.
            // Once reads fill full chunks, the connection is moving bulk data and payloads are
            // spliced, until a splice moves little again.
            let mut size = MIN_READ_BUFFER;
            let mut pipe: Option<Arc<Pipe>> = None;
            loop {
                if size == MAX_DATA_CHUNK
                    && tunnel.shared.splice_out
                    && let Some(socket) = rd.tcp()
                {
                    if pipe.is_none() {
                        pipe = Pipe::new(&tunnel.shared.pipes).ok().map(Arc::new);
                    }
                    if let Some(pipe) = &pipe {
                        match splice_in(socket, pipe, SPLICE_CHUNK).await {
                            Ok(SpliceIn::Moved(n)) => {
                                if n < MIN_READ_BUFFER {
                                    size = MIN_READ_BUFFER;
                                }
                                if send_spliced(tunnel, credit, id, pipe.clone(), n).await.is_err() {
                                    return RelayEnd::Reset;
                                }
                                continue;
                            }
                            Ok(SpliceIn::Eof) => {
                                tunnel.send(Control::Shutdown { stream: id });
                                return RelayEnd::Closed;
                            }
                            // The pipe is drained before every splice; a full one is a bug.
                            Ok(SpliceIn::PipeFull) | Err(_) => return RelayEnd::Reset,
                        }
                    }
                }
                // Read into uninitialised capacity: zeroing a 128 KiB buffer per read showed up
                // in bulk-transfer profiles.
                let mut buf = Vec::with_capacity(size);
                match rd.read_buf(&mut buf).await {
                    Ok(0) => {
                        tunnel.send(Control::Shutdown { stream: id });
                        return RelayEnd::Closed;
                    }
                    Ok(n) => {
                        size = next_read_size(size, n);
                        if send_chunk(tunnel, credit, id, buf).await.is_err() {
                            return RelayEnd::Reset;
                        }
                    }
                    Err(_) => return RelayEnd::Reset,
                }
            }
        };
        let downstream = async move {
            loop {
                let written = match inbound.recv().await.unwrap_or(Event::Inbound(Inbound::Reset)) {
                    Event::Inbound(Inbound::Data(bytes)) => wr.write_all(&bytes).await.map(|()| bytes.len()),
                    Event::Spliced(pipe, n) => match wr.tcp() {
                        Some(socket) => splice_out(&pipe, socket, n).await.map(|()| n),
                        None => match pipe.read_exact(n) {
                            Ok(bytes) => wr.write_all(&bytes).await.map(|()| n),
                            Err(e) => Err(e),
                        },
                    },
                    Event::Inbound(Inbound::Shutdown) => {
                        let _ = wr.shutdown().await;
                        return RelayEnd::Closed;
                    }
                    Event::Inbound(Inbound::Reset) => return RelayEnd::Reset,
                };
                match written {
                    Ok(n) => consumed(tunnel, id, unacked, ungranted, n),
                    Err(_) => return RelayEnd::Reset,
                }
            }
        };
        both_or_reset(upstream, downstream).await
    }

    /// Relays datagrams between a connected UDP socket and this stream until either side
    /// resets or the socket fails. `idle` ends a flow that carried nothing for that long.
    pub async fn relay_udp(mut self, socket: UdpSocket, idle: Duration) -> RelayEnd {
        let mut buf = vec![0u8; MAX_DATA_CHUNK];
        loop {
            tokio::select! {
                received = socket.recv(&mut buf) => match received {
                    Ok(n) => { if self.send(&buf[..n]).await.is_err() { return RelayEnd::Reset; } }
                    Err(e) if is_transient_udp_error(&e) => continue,
                    Err(_) => break,
                },
                event = next_inbound(&mut self.inbound) => match event {
                    Inbound::Data(datagram) => {
                        let _ = socket.send(&datagram).await;
                        self.grant(datagram.len());
                    }
                    Inbound::Shutdown => {}
                    Inbound::Reset => return RelayEnd::Reset,
                },
                _ = tokio::time::sleep(idle) => break,
            }
        }
        self.reset();
        RelayEnd::Closed
    }
}

async fn send_data(
    tunnel: &Tunnel,
    credit: &Semaphore,
    id: StreamId,
    mut bytes: &[u8],
) -> Result<(), TunnelError> {
    while !bytes.is_empty() {
        let n = bytes.len().min(MAX_DATA_CHUNK);
        send_chunk(tunnel, credit, id, bytes[..n].to_vec()).await?;
        bytes = &bytes[n..];
    }
    Ok(())
}

/// The next event of a consumer that takes no spliced payloads: any that arrive anyway are
/// read out of their pipe.
async fn next_inbound(events: &mut mpsc::UnboundedReceiver<Event>) -> Inbound {
    match events.recv().await {
        Some(Event::Inbound(inbound)) => inbound,
        Some(Event::Spliced(pipe, n)) => pipe.read_exact(n).map(Inbound::Data).unwrap_or(Inbound::Reset),
        None => Inbound::Reset,
    }
}

/// Hands `len` payload bytes waiting in `pipe` to the writer once the peer granted the credit,
/// and waits until they left the pipe (the next splice into it must find it empty).
async fn send_spliced(
    tunnel: &Tunnel,
    credit: &Semaphore,
    id: StreamId,
    pipe: Arc<Pipe>,
    len: usize,
) -> Result<(), TunnelError> {
    credit.acquire_many(len as u32).await.map_err(|_| TunnelError::Closed("stream reset".into()))?.forget();
    let (drained, done) = oneshot::channel();
    let _ = tunnel.shared.out.send(Outgoing::Spliced { stream: id, pipe, len, drained });
    done.await.map_err(|_| TunnelError::Closed("tunnel writer stopped".into()))
}

/// Sends one payload of at most [`MAX_DATA_CHUNK`] bytes once the peer granted the credit.
async fn send_chunk(
    tunnel: &Tunnel,
    credit: &Semaphore,
    id: StreamId,
    bytes: Vec<u8>,
) -> Result<(), TunnelError> {
    debug_assert!(bytes.len() <= MAX_DATA_CHUNK);
    credit
        .acquire_many(bytes.len() as u32)
        .await
        .map_err(|_| TunnelError::Closed("stream reset".into()))?
        .forget();
    let _ = tunnel.shared.out.send(Outgoing::Frame(Frame::Data { stream: id, bytes }));
    Ok(())
}

/// ICMP errors reported on a connected UDP socket must not end the flow.
fn is_transient_udp_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_errno::ECONNREFUSED | libc_errno::EHOSTUNREACH | libc_errno::ENETUNREACH)
    )
}

mod libc_errno {
    pub const ECONNREFUSED: i32 = 111;
    pub const EHOSTUNREACH: i32 = 113;
    pub const ENETUNREACH: i32 = 101;
}

/// Runs both halves of a relay; finishes when both close, or at once when either resets.
async fn both_or_reset(
    a: impl std::future::Future<Output = RelayEnd>,
    b: impl std::future::Future<Output = RelayEnd>,
) -> RelayEnd {
    tokio::pin!(a, b);
    let (mut a_done, mut b_done) = (false, false);
    while !(a_done && b_done) {
        let end = tokio::select! {
            end = &mut a, if !a_done => { a_done = true; end }
            end = &mut b, if !b_done => { b_done = true; end }
        };
        if end == RelayEnd::Reset {
            return RelayEnd::Reset;
        }
    }
    RelayEnd::Closed
}

impl Drop for Stream {
    fn drop(&mut self) {
        lock(&self.tunnel.shared.streams).remove(&self.id);
    }
}

/// Writes one control frame directly (used for the handshake, before [`Tunnel::start`]).
pub async fn write_control<W: AsyncWrite + Unpin>(writer: &mut W, msg: Control) -> Result<(), CodecError> {
    let mut buf = Vec::new();
    codec::encode(&Frame::Control(msg), &mut buf)?;
    writer.write_all(&buf).await?;
    writer.flush().await?;
    Ok(())
}

/// Reads one control frame directly (used for the handshake, before [`Tunnel::start`]).
pub async fn read_control<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Control, CodecError> {
    let mut buf = Vec::new();
    match codec::read_frame(reader, &mut buf).await? {
        Some(Frame::Control(msg)) => Ok(msg),
        Some(Frame::Data { .. }) => Err(CodecError::UnknownKind(1)),
        None => Err(CodecError::Io(std::io::ErrorKind::UnexpectedEof.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn pair() -> ((Tunnel, mpsc::Receiver<Incoming>), (Tunnel, mpsc::Receiver<Incoming>)) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        (Tunnel::start(ar, aw, Side::Supervisor), Tunnel::start(br, bw, Side::Agent))
    }

    /// Two tunnel ends over a Unix socket pair, where bulk payloads are spliced.
    fn unix_pair() -> ((Tunnel, mpsc::Receiver<Incoming>), (Tunnel, mpsc::Receiver<Incoming>)) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (ar, aw) = crate::link::split(a).unwrap();
        let (br, bw) = crate::link::split(b).unwrap();
        (Tunnel::start(ar, aw, Side::Supervisor), Tunnel::start(br, bw, Side::Agent))
    }

    /// Serves opens on `incoming` by connecting to the target with `send_buffer` (if any) and
    /// relaying.
    fn serve_opens(mut incoming: mpsc::Receiver<Incoming>, send_buffer: Option<u32>) {
        tokio::spawn(async move {
            while let Some(Incoming::Open { stream, target: OpenTarget::Tcp(addr) }) = incoming.recv().await {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                if let Some(size) = send_buffer {
                    socket.set_send_buffer_size(size).unwrap();
                }
                let sock = socket.connect(addr).await.unwrap();
                stream.opened(Ok(()));
                tokio::spawn(stream.relay_tcp(sock));
            }
        });
    }

    /// A client connection relayed through `tunnel` to `target`: what the app would hold.
    async fn relayed_client(
        tunnel: &Tunnel,
        target: SocketAddr,
    ) -> (TcpStream, tokio::task::JoinHandle<RelayEnd>) {
        let stream = tunnel.open(OpenTarget::Tcp(target), Duration::from_secs(5)).await.unwrap();
        let local = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = local.local_addr().unwrap();
        let relay = tokio::spawn(async move {
            let (s, _) = local.accept().await.unwrap();
            stream.relay_tcp(s).await
        });
        (TcpStream::connect(addr).await.unwrap(), relay)
    }

    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        (0..len as u32).map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8).collect()
    }

    /// Sends `up` to a server reached through `sup` while the server sends `down` back, both at
    /// once, and checks both arrive exact; returns how the app-side relay ended.
    async fn exchange_through(sup: &Tunnel, up: &[u8], down: &[u8]) -> RelayEnd {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = server.local_addr().unwrap();
        let down2 = down.to_vec();
        let server_task = tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let (mut r, mut w) = s.split();
            let send = async {
                w.write_all(&down2).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let (_, n) = tokio::join!(send, r.read_to_end(&mut got));
            n.unwrap();
            got
        });
        let (mut client, relay) = relayed_client(sup, target).await;
        let (mut r, mut w) = client.split();
        let send = async {
            w.write_all(up).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let (_, n) = tokio::join!(send, r.read_to_end(&mut got));
        n.unwrap();
        assert!(got == down, "bytes from the server differ ({} of {} received)", got.len(), down.len());
        assert!(server_task.await.unwrap() == up, "bytes to the server differ");
        relay.await.unwrap()
    }

    /// Bulk bytes in both directions at once through a Unix-socket tunnel arrive intact and in
    /// order while most of them are spliced, and the half-closes still propagate.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spliced_bulk_transfer_keeps_bytes_and_order() {
        let ((sup, _), (agent, agent_in)) = unix_pair();
        serve_opens(agent_in, None);
        let (up, down) = (pattern(24 << 20, 11), pattern(24 << 20, 7));
        assert_eq!(exchange_through(&sup, &up, &down).await, RelayEnd::Closed);
        let spliced =
            sup.shared.spliced_in.load(Ordering::Relaxed) + agent.shared.spliced_in.load(Ordering::Relaxed);
        assert!(spliced > (up.len() + down.len()) as u64 / 2, "only {spliced} bytes were spliced");
    }

    /// With its pipe budget spent, a tunnel end relays by copying, and the bytes stay exact.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_spent_pipe_budget_falls_back_to_copies() {
        let ((sup, _), (agent, agent_in)) = unix_pair();
        let hoard: Vec<Pipe> =
            std::iter::from_fn(|| Pipe::new(&sup.shared.pipes).ok()).take(10_000).collect();
        assert!(!hoard.is_empty() && hoard.len() < 10_000);
        serve_opens(agent_in, None);
        let (up, down) = (pattern(8 << 20, 1), pattern(8 << 20, 2));
        assert_eq!(exchange_through(&sup, &up, &down).await, RelayEnd::Closed);
        assert_eq!(sup.shared.spliced_in.load(Ordering::Relaxed), 0, "no pipe was left to splice into");
        assert!(agent.shared.spliced_in.load(Ordering::Relaxed) > 0, "the other end has its own budget");
    }

    /// A consumer too slow to drain its pipe: the reader copies instead of blocking, the other
    /// stream keeps moving, and no byte is lost or reordered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_pipe_falls_back_to_copies_without_stalling_others() {
        let ((sup, _), (agent, agent_in)) = unix_pair();
        serve_opens(agent_in, Some(4096));
        let slow = tokio::net::TcpSocket::new_v4().unwrap();
        slow.set_recv_buffer_size(4096).unwrap();
        slow.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let slow = slow.listen(1).unwrap();
        let fast = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (slow_addr, fast_addr) = (slow.local_addr().unwrap(), fast.local_addr().unwrap());
        let payload = pattern(12 << 20, 3);
        let drain = |listener: TcpListener, pace: bool| {
            tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut got = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break got;
                    }
                    got.extend_from_slice(&buf[..n]);
                    if pace && got.len() < 4 << 20 {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            })
        };
        let (slow_rx, fast_rx) = (drain(slow, true), drain(fast, false));
        let (mut slow_client, _) = relayed_client(&sup, slow_addr).await;
        let (mut fast_client, _) = relayed_client(&sup, fast_addr).await;
        let slow_send = async {
            slow_client.write_all(&payload).await.unwrap();
            slow_client.shutdown().await.unwrap();
        };
        let fast_done = async {
            fast_client.write_all(&payload).await.unwrap();
            fast_client.shutdown().await.unwrap();
            tokio::time::timeout(Duration::from_secs(20), fast_rx)
                .await
                .expect("fast stream stalled")
                .unwrap()
        };
        let (_, fast_got) = tokio::join!(slow_send, fast_done);
        assert!(fast_got == payload, "fast stream bytes differ");
        assert!(slow_rx.await.unwrap() == payload, "slow stream bytes differ");
        assert!(
            agent.shared.pipe_full_copies.load(Ordering::Relaxed) > 0,
            "the slow consumer never filled its pipe"
        );
        assert!(agent.shared.spliced_in.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn read_buffer_adapts_between_bounds() {
        assert_eq!(next_read_size(MIN_READ_BUFFER, MIN_READ_BUFFER), 2 * MIN_READ_BUFFER);
        assert_eq!(next_read_size(MAX_DATA_CHUNK, MAX_DATA_CHUNK), MAX_DATA_CHUNK);
        assert_eq!(next_read_size(MAX_DATA_CHUNK, 10), MAX_DATA_CHUNK / 2);
        assert_eq!(next_read_size(MIN_READ_BUFFER, 1), MIN_READ_BUFFER);
        assert_eq!(next_read_size(4 * MIN_READ_BUFFER, 2 * MIN_READ_BUFFER), 4 * MIN_READ_BUFFER);
    }

    #[tokio::test]
    async fn requests_are_matched_to_responses() {
        let ((sup, _), (agent, mut agent_in)) = pair();
        tokio::spawn(async move {
            while let Some(Incoming::Request { id, body, .. }) = agent_in.recv().await {
                let answer = match body {
                    Request::ReadLink { path } => Response::ReadLink(path),
                    _ => Response::Error(Errno(38)),
                };
                agent.respond(id, answer).await;
            }
        });
        let t = Duration::from_secs(5);
        let (a, b) = tokio::join!(
            sup.request(Request::ReadLink { path: b"x".to_vec() }, t),
            sup.request(Request::Environ, t)
        );
        assert_eq!(a.unwrap(), Response::ReadLink(b"x".to_vec()));
        assert_eq!(b.unwrap(), Response::Error(Errno(38)));
    }

    /// A request made as the app reaches the agent with the app's identity; a plain one without.
    #[tokio::test]
    async fn requests_as_the_app_carry_its_identity() {
        let ((sup, _), (agent, mut agent_in)) = pair();
        tokio::spawn(async move {
            while let Some(Incoming::Request { id, caller, .. }) = agent_in.recv().await {
                let answer = match caller {
                    Some(who) => Response::ReadLink(
                        format!("{} {} {:?} {:x}", who.uid, who.gid, who.groups, who.caps).into(),
                    ),
                    None => Response::Error(Errno(1)),
                };
                agent.respond(id, answer).await;
            }
        });
        let t = Duration::from_secs(5);
        let who = Identity { uid: 65534, gid: 65533, groups: vec![10, 20], caps: 0x6 };
        let stat = Request::Stat { path: b"/etc/shadow".to_vec(), follow: true };
        let (a, b) = tokio::join!(sup.request_as(who, stat.clone(), t), sup.request(stat, t));
        assert_eq!(a.unwrap(), Response::ReadLink(b"65534 65533 [10, 20] 6".to_vec()));
        assert_eq!(b.unwrap(), Response::Error(Errno(1)));
    }

    /// An agent-side tunnel end driven by hand: what a hostile or broken supervisor can send.
    fn raw_peer() -> (
        Tunnel,
        mpsc::Receiver<Incoming>,
        tokio::io::ReadHalf<tokio::io::DuplexStream>,
        tokio::io::WriteHalf<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let (tunnel, incoming) = Tunnel::start(ar, aw, Side::Agent);
        (tunnel, incoming, br, bw)
    }

    fn open_frame(stream: StreamId) -> Control {
        Control::Open { stream, target: OpenTarget::Tcp("10.0.0.1:1".parse().unwrap()) }
    }

    /// A stream id the peer may not choose (this side's parity, or 0), or one that is still
    /// open, ends the tunnel: a duplicate would take over the live stream's traffic.
    #[tokio::test]
    async fn foreign_and_duplicate_stream_ids_close_the_tunnel() {
        for (ids, why) in
            [(&[1u32, 1][..], "still open"), (&[2][..], "may not choose"), (&[0][..], "may not choose")]
        {
            let (agent, mut incoming, _peer_reads, mut peer) = raw_peer();
            let mut live = Vec::new();
            for (i, &id) in ids.iter().enumerate() {
                write_control(&mut peer, open_frame(id)).await.unwrap();
                if i + 1 < ids.len() {
                    let Some(Incoming::Open { stream, .. }) = incoming.recv().await else {
                        panic!("no open")
                    };
                    assert_eq!(stream.id(), id);
                    live.push(stream);
                }
            }
            let reason = tokio::time::timeout(Duration::from_secs(5), agent.closed())
                .await
                .unwrap_or_else(|_| panic!("stream ids {ids:?} were accepted"));
            assert!(reason.contains("protocol violation") && reason.contains(why), "{ids:?}: {reason}");
        }
    }

    /// Credit the peer never owed (more than the window) resets the stream instead of letting
    /// this side send without bound.
    #[tokio::test]
    async fn credit_beyond_the_window_resets_the_stream() {
        let (_agent, mut incoming, mut peer_reads, mut peer) = raw_peer();
        write_control(&mut peer, open_frame(1)).await.unwrap();
        let Some(Incoming::Open { mut stream, .. }) = incoming.recv().await else { panic!("no open") };
        write_control(&mut peer, Control::Credit { stream: 1, bytes: 1 }).await.unwrap();
        let event =
            tokio::time::timeout(Duration::from_secs(5), stream.recv()).await.expect("credit accepted");
        assert_eq!(event, Inbound::Reset);
        let reset =
            tokio::time::timeout(Duration::from_secs(5), read_control(&mut peer_reads)).await.unwrap();
        assert_eq!(reset.unwrap(), Control::Reset { stream: 1 });
    }

    /// An answer too large for one frame reaches the requester at once as E2BIG (instead of
    /// being dropped by the writer, which left the requester waiting for its timeout); a
    /// request too large fails before it is sent.
    #[tokio::test]
    async fn an_answer_too_large_for_a_frame_fails_at_once_with_e2big() {
        let ((sup, _), (agent, mut agent_in)) = pair();
        tokio::spawn(async move {
            while let Some(Incoming::Request { id, .. }) = agent_in.recv().await {
                let big: EnvVars =
                    (0..20).map(|i| (format!("V{i}").into_bytes(), vec![b'x'; 100_000])).collect();
                agent.respond(id, Response::Environ(big)).await;
            }
        });
        let started = std::time::Instant::now();
        let answer = sup.request(Request::Environ, Duration::from_secs(20)).await;
        assert_eq!(answer, Ok(Response::Error(Errno(E2BIG))));
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        let huge = Request::ReadLink { path: vec![b'a'; codec::MAX_FRAME] };
        assert_eq!(sup.request(huge, Duration::from_secs(20)).await, Err(TunnelError::Refused(Errno(E2BIG))));
    }

    /// A peer that asks but never reads its answers: answers queue up to the reply budget,
    /// then responders wait, instead of every answer being buffered.
    #[tokio::test]
    async fn answers_the_peer_does_not_read_are_bounded() {
        let (agent, _incoming, _unread, _peer) = raw_peer();
        const CHUNK: usize = 256 * 1024;
        const ANSWERS: usize = 64;
        let queued = Arc::new(AtomicUsize::new(0));
        for id in 0..ANSWERS as u64 {
            let (agent, queued) = (agent.clone(), queued.clone());
            tokio::spawn(async move {
                agent.respond(id, Response::FileChunk { bytes: vec![7; CHUNK], eof: false }).await;
                queued.fetch_add(1, Ordering::SeqCst);
            });
        }
        // The state itself: the reply budget spent, so the remaining responders wait for it.
        let spent = async {
            while agent.shared.reply_budget.available_permits() >= CHUNK {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), spent).await.expect("the reply budget was never spent");
        // Let the responders that got budget return (this runtime runs them while we sleep).
        tokio::time::sleep(Duration::from_millis(50)).await;
        let queued = queued.load(Ordering::SeqCst);
        assert!(queued > 0 && queued < ANSWERS, "{queued} answers queued");
        assert!(queued * CHUNK <= MAX_QUEUED_REPLY_BYTES, "{queued} answers queued");
        assert!(agent.shared.reply_budget.available_permits() < CHUNK);
    }

    /// Requests the consumer has not taken yet wait in the socket, not in memory: the queue
    /// holds at most INCOMING_QUEUE of them, and none is lost once the consumer catches up.
    #[tokio::test]
    async fn a_request_flood_waits_in_the_socket_and_loses_nothing() {
        let ((sup, _), (agent, mut agent_in)) = pair();
        const FLOOD: usize = 1000;
        let mut asked = Vec::new();
        for i in 0..FLOOD {
            let sup = sup.clone();
            let path = format!("/{i}").into_bytes();
            asked.push(tokio::spawn(async move {
                sup.request(Request::ReadLink { path: path.clone() }, Duration::from_secs(60)).await
                    == Ok(Response::ReadLink(path))
            }));
        }
        // Bounded wait for something that must not happen: the whole flood queued.
        let grows = async {
            while agent_in.len() < FLOOD {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        assert!(tokio::time::timeout(Duration::from_secs(1), grows).await.is_err());
        assert_eq!(agent_in.len(), INCOMING_QUEUE, "the reader fills the queue, then waits");
        tokio::spawn(async move {
            while let Some(Incoming::Request { id, body: Request::ReadLink { path }, .. }) =
                agent_in.recv().await
            {
                agent.respond(id, Response::ReadLink(path)).await;
            }
        });
        for answered in asked {
            assert!(answered.await.unwrap());
        }
    }

    #[tokio::test]
    async fn closed_tunnel_fails_requests_and_streams() {
        let (a, b) = tokio::io::duplex(1024);
        let (ar, aw) = tokio::io::split(a);
        let (sup, _incoming) = Tunnel::start(ar, aw, Side::Supervisor);
        drop(b); // the agent's end of the connection goes away
        let err = sup.request(Request::Environ, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, TunnelError::Closed(_)), "{err:?}");
        assert!(!sup.closed().await.is_empty());
    }

    #[tokio::test]
    async fn request_timeout_is_reported() {
        let ((sup, _), _agent) = pair();
        let err = sup.request(Request::Environ, Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(err, TunnelError::Timeout(Duration::from_millis(50)));
    }

    /// A TCP echo through two tunnel ends: bytes arrive intact and in order, both half-closes
    /// propagate, and the sender is throttled by credit rather than buffering without bound.
    #[tokio::test]
    async fn tcp_relay_round_trip_with_flow_control() {
        let ((sup, _), (_agent, agent_in)) = pair();
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let (mut r, mut w) = s.split();
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
        });
        serve_opens(agent_in, None);
        let (mut client, relay) = relayed_client(&sup, echo_addr).await;
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = client.split();
        let send = async {
            w.write_all(&payload).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let recv = r.read_to_end(&mut got);
        let (_, n) = tokio::join!(send, recv);
        assert_eq!(n.unwrap(), payload.len());
        assert!(got == payload, "echoed bytes differ");
        assert_eq!(relay.await.unwrap(), RelayEnd::Closed);
    }

    #[tokio::test]
    async fn refused_open_reports_errno() {
        let ((sup, _), (_agent, mut agent_in)) = pair();
        tokio::spawn(async move {
            while let Some(Incoming::Open { stream, .. }) = agent_in.recv().await {
                stream.opened(Err(Errno(111)));
            }
        });
        let err = sup
            .open(OpenTarget::Tcp("10.0.0.1:1".parse().unwrap()), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err, TunnelError::Refused(Errno(111)));
    }

    #[tokio::test]
    async fn window_overrun_resets_the_stream() {
        let ((sup, _), (_agent, mut agent_in)) = pair();
        let opener = tokio::spawn(async move {
            sup.open(OpenTarget::Tcp("10.0.0.1:1".parse().unwrap()), Duration::from_secs(5)).await
        });
        let Some(Incoming::Open { mut stream, .. }) = agent_in.recv().await else {
            panic!("expected an open")
        };
        stream.opened(Ok(()));
        let sup_stream = opener.await.unwrap().unwrap();
        // The agent side never grants credit: a well-behaved sender stops at the window. The
        // state says so, not a timeout: no credit is left, and a further send is waiting for
        // some (pending), not buffering.
        sup_stream.send(&vec![1u8; STREAM_WINDOW]).await.unwrap();
        assert_eq!(sup_stream.credit.available_permits(), 0, "the window is spent");
        {
            let mut more = std::pin::pin!(sup_stream.send(&[1]));
            let polled = std::future::poll_fn(|cx| std::task::Poll::Ready(more.as_mut().poll(cx))).await;
            assert!(polled.is_pending(), "sender must wait for credit");
        }
        assert_eq!(sup_stream.credit.available_permits(), 0);
        // A peer that ignores credit gets its stream reset instead of growing the buffer.
        let rogue = Frame::Data { stream: sup_stream.id(), bytes: vec![0; 8] };
        sup_stream.tunnel.shared.out.send(Outgoing::Frame(rogue)).unwrap();
        let mut events = Vec::new();
        loop {
            let event = tokio::time::timeout(Duration::from_secs(10), stream.recv())
                .await
                .expect("no reset within 10 s");
            let done = event == Inbound::Reset;
            events.push(event);
            if done {
                break;
            }
        }
        assert_eq!(events.len(), STREAM_WINDOW / MAX_DATA_CHUNK + 1);
    }
}
