//! Incoming traffic: the pod's connections delivered to the local app, mirrored or stolen.
//!
//! A dedicated thread in the target's network namespace owns the BPF datapath (`datapath`):
//! it applies subscriptions and drains the mirror ring buffer. Stolen connections land on
//! the agent's listener (found by the classifier through a SOCKMAP) and are relayed to the
//! supervisor as `Incoming` streams; mirrored segments are reassembled (`mirror`,
//! `reassembly`) and the client's bytes are sent on as write-only streams.

mod datapath;
mod http;
mod http_wire;
mod mirror;
mod reassembly;

use crate::netns::NetnsWorker;
use datapath::Datapath;
use kmirror_protocol::tunnel::{Stream, Tunnel};
use kmirror_protocol::{Errno, HttpFilter, IncomingMode, OpenTarget};
use mirror::{FlowEvent, FlowKey};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Stolen connections served at once (relayed to the local app, or read request by request
/// by the HTTP filter). Further ones wait in the kernel's accept queue of the agent's listener
/// (1024 deep, then the kernel drops SYNs and clients retry), costing the agent nothing.
pub const MAX_STOLEN: usize = 256;
/// Mirrored bytes queued for one flow (the local app reads slower than the client sends)
/// before the flow is dropped rather than buffered further.
pub const FLOW_QUEUE_LIMIT: usize = 8 << 20;
/// Mirrored bytes queued for all flows together.
pub const QUEUE_BUDGET: usize = 32 << 20;

enum Command {
    SetPort { port: u16, mode: u8, reply: oneshot::Sender<Result<(), String>> },
    SetListener { listener: OwnedFd, reply: oneshot::Sender<Result<(), String>> },
}

struct Subscription {
    filter: Option<Arc<http::Filter>>,
}

pub struct IncomingService {
    tunnel: Tunnel,
    netns: NetnsWorker,
    target_netns: OwnedFd,
    /// The user allowed incoming traffic of a target in the host's network namespace.
    allow_host_network: bool,
    state: tokio::sync::Mutex<State>,
    subscriptions: Mutex<HashMap<u16, Subscription>>,
    /// Mirrored streams dropped because data was lost (reported at the end of the session).
    mirror_dropped: std::sync::atomic::AtomicU64,
    mirror_streams: std::sync::atomic::AtomicU64,
    /// Mirrored bytes queued for the local app, all flows together.
    mirror_queued: Arc<AtomicUsize>,
}

#[derive(Default)]
struct State {
    datapath: Option<std::sync::mpsc::Sender<Command>>,
    /// Joined at shutdown, so attachments are removed before the agent exits.
    datapath_thread: Option<std::thread::JoinHandle<()>>,
    listening: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl IncomingService {
    pub fn new(
        tunnel: Tunnel,
        netns: NetnsWorker,
        target_netns: OwnedFd,
        allow_host_network: bool,
    ) -> Arc<IncomingService> {
        Arc::new(IncomingService {
            tunnel,
            netns,
            target_netns,
            allow_host_network,
            state: tokio::sync::Mutex::new(State::default()),
            subscriptions: Mutex::default(),
            mirror_dropped: Default::default(),
            mirror_streams: Default::default(),
            mirror_queued: Default::default(),
        })
    }

    /// Starts delivering connections to pod `port` in `mode`.
    pub async fn subscribe(
        self: &Arc<Self>,
        port: u16,
        mode: IncomingMode,
        filter: Option<HttpFilter>,
    ) -> Result<(), Errno> {
        let filter = match filter.map(|f| http::Filter::new(&f)).transpose() {
            Ok(f) => f.map(Arc::new),
            Err(e) => {
                tracing::warn!("invalid HTTP filter: {e}");
                return Err(Errno(libc::EINVAL));
            }
        };
        if !self.allow_host_network && crate::netns::is_host_namespace(&self.target_netns) != Some(false) {
            tracing::error!(
                "refusing to {} pod port {port}: the target shares the host's network namespace \
                 (or the agent cannot tell), so the port's traffic there belongs to every program \
                 on the node, not only to the target; pass --allow-host-network to kmirror run to \
                 take it anyway (only traffic to the node's own addresses is taken)",
                if mode == IncomingMode::Steal { "steal" } else { "mirror" }
            );
            return Err(Errno(libc::EPERM));
        }
        let mut state = self.state.lock().await;
        if state.datapath.is_none() {
            let (commands, thread) = self.start_datapath().await.map_err(|e| {
                tracing::error!("incoming traffic unavailable: {e}");
                Errno(libc::EOPNOTSUPP)
            })?;
            state.datapath = Some(commands);
            state.datapath_thread = Some(thread);
        }
        let commands = state.datapath.clone().expect("started above");
        if mode == IncomingMode::Steal && !state.listening {
            let listener = self.steal_listener().await.map_err(|e| {
                tracing::error!("cannot create the steal listener: {e}");
                Errno(e.raw_os_error().unwrap_or(libc::EIO))
            })?;
            let fd = listener_fd(&listener).map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EIO)))?;
            call(&commands, |reply| Command::SetListener { listener: fd, reply }).await?;
            tokio::spawn(self.clone().accept_stolen(listener));
            state.listening = true;
        }
        lock(&self.subscriptions).insert(port, Subscription { filter });
        let bpf_mode = if mode == IncomingMode::Steal { datapath::MODE_STEAL } else { datapath::MODE_MIRROR };
        call(&commands, |reply| Command::SetPort { port, mode: bpf_mode, reply }).await?;
        tracing::info!(port, ?mode, "incoming subscription active");
        Ok(())
    }

    /// Detaches the classifier (a classic tc filter would otherwise outlive the agent).
    pub async fn shutdown(&self) {
        let (dropped, total) =
            (self.mirror_dropped.load(Ordering::Relaxed), self.mirror_streams.load(Ordering::Relaxed));
        if dropped > 0 {
            tracing::warn!("{dropped} of {total} mirrored connections were dropped because data was lost");
        } else if total > 0 {
            tracing::info!("{total} connections mirrored, none lost");
        }
        let mut state = self.state.lock().await;
        state.datapath = None;
        if let Some(thread) = state.datapath_thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    async fn start_datapath(
        self: &Arc<Self>,
    ) -> Result<(std::sync::mpsc::Sender<Command>, std::thread::JoinHandle<()>), String> {
        let netns = self.target_netns.try_clone().map_err(|e| e.to_string())?;
        let (commands, command_rx) = std::sync::mpsc::channel();
        let (chunks, chunk_rx) = mpsc::channel(8192);
        let (ready_tx, ready_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("kmirror-bpf".into())
            .spawn(move || datapath_thread(netns, command_rx, chunks, ready_tx))
            .map_err(|e| e.to_string())?;
        ready_rx.await.map_err(|_| "the datapath thread died".to_string())??;
        tokio::spawn(self.clone().mirror_loop(chunk_rx));
        Ok((commands, thread))
    }

    /// One dual-stack listener takes stolen IPv4 and IPv6 connections alike.
    async fn steal_listener(&self) -> std::io::Result<TcpListener> {
        let fd = self.netns.socket(libc::AF_INET6, libc::SOCK_STREAM).await?;
        crate::netns::set_dual_stack(&fd)?;
        let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
        socket.set_reuseaddr(true)?;
        socket.bind("[::]:0".parse().expect("valid"))?;
        socket.listen(1024)
    }

    async fn accept_stolen(self: Arc<Self>, listener: TcpListener) {
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_STOLEN));
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else { return };
            match listener.accept().await {
                Ok((conn, client)) => {
                    let this = self.clone();
                    tokio::spawn(async move {
                        this.serve_stolen(conn, client).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!("steal listener: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn serve_stolen(self: Arc<Self>, conn: TcpStream, client: SocketAddr) {
        // The classifier hands us the connection with its original destination intact.
        let Ok(original) = conn.local_addr() else { return };
        let port = original.port();
        let filter = lock(&self.subscriptions).get(&port).and_then(|s| s.filter.clone());
        let _ = conn.set_nodelay(true);
        if let Some(filter) = filter {
            http::serve_filtered(conn, client, original, filter, self.tunnel.clone(), self.netns.clone())
                .await;
            return;
        }
        let server = SocketAddr::new(original.ip().to_canonical(), original.port());
        let target = OpenTarget::Incoming { server, client, mode: IncomingMode::Steal };
        match self.tunnel.open(target, OPEN_TIMEOUT).await {
            Ok(stream) => {
                stream.relay_tcp(conn).await;
            }
            Err(e) => {
                // The local app cannot take it: the pod's own app answers instead.
                tracing::info!(%client, port, "local app unavailable ({e}); passing the connection to the pod's app");
                pass_to_pod_app(&self.netns, conn, original).await;
            }
        }
    }

    /// Turns ring-buffer chunks into mirrored streams.
    async fn mirror_loop(self: Arc<Self>, mut chunks: mpsc::Receiver<mirror::Chunk>) {
        let mut packets = mirror::PacketAssembler::default();
        let mut flows = mirror::FlowTable::default();
        let mut outputs: HashMap<FlowKey, FlowSender> = HashMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut skipped_reported = 0;
        loop {
            let events = tokio::select! {
                chunk = chunks.recv() => {
                    let Some(chunk) = chunk else { return };
                    let now = Instant::now();
                    match packets.push(chunk, now) {
                        Some(segment) => flows.on_segment(segment, now),
                        None => Vec::new(),
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    let mut events: Vec<FlowEvent> =
                        packets.expire(now).into_iter().filter_map(|(c, s)| flows.lost(c, s)).collect();
                    events.extend(flows.sweep(now));
                    if flows.skipped > skipped_reported {
                        tracing::warn!(
                            "{} pod connections not mirrored: more than {} at once (or {} handshakes)",
                            flows.skipped - skipped_reported,
                            mirror::MAX_FLOWS,
                            mirror::MAX_HANDSHAKES
                        );
                        skipped_reported = flows.skipped;
                    }
                    events
                }
            };
            for event in events {
                self.route_mirror_event(event, &mut outputs);
            }
        }
    }

    fn route_mirror_event(self: &Arc<Self>, event: FlowEvent, outputs: &mut HashMap<FlowKey, FlowSender>) {
        match event {
            FlowEvent::Open(key) => {
                self.mirror_streams.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = mpsc::unbounded_channel();
                let queued = Arc::new(AtomicUsize::new(0));
                tokio::spawn(mirror_flow(self.tunnel.clone(), key, rx));
                outputs.insert(key, FlowSender { tx, queued });
            }
            FlowEvent::Data(key, bytes) => {
                if let Some(out) = outputs.get(&key) {
                    let len = bytes.len();
                    let flow_full = out.queued.load(Ordering::Acquire) + len > FLOW_QUEUE_LIMIT;
                    let all_full = self.mirror_queued.load(Ordering::Acquire) + len > QUEUE_BUDGET;
                    if flow_full || all_full {
                        self.mirror_dropped.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            client = %key.client,
                            "mirrored stream dropped: the local app reads too slowly ({} MiB queued for it{})",
                            if flow_full { FLOW_QUEUE_LIMIT >> 20 } else { QUEUE_BUDGET >> 20 },
                            if flow_full { "" } else { " across all mirrored streams" }
                        );
                        let _ = out.tx.send(FlowMessage::Broken);
                        outputs.remove(&key);
                    } else {
                        let charge = Charge::new(len, &out.queued, &self.mirror_queued);
                        let _ = out.tx.send(FlowMessage::Data(bytes, charge));
                    }
                }
            }
            FlowEvent::End(key, reset) => {
                if let Some(out) = outputs.remove(&key) {
                    let _ = out.tx.send(if reset { FlowMessage::Broken } else { FlowMessage::End });
                }
            }
            FlowEvent::Broken(key, why) => {
                self.mirror_dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(client = %key.client, server = %key.server, "mirrored stream dropped: {why}");
                if let Some(out) = outputs.remove(&key) {
                    let _ = out.tx.send(FlowMessage::Broken);
                }
            }
        }
    }
}

struct FlowSender {
    tx: mpsc::UnboundedSender<FlowMessage>,
    queued: Arc<AtomicUsize>,
}

enum FlowMessage {
    Data(Vec<u8>, Charge),
    End,
    Broken,
}

/// Queued bytes counted against their flow's limit and the budget of all flows, until the
/// message is sent or dropped (a flow whose stream never opened drops its queue at once).
struct Charge {
    len: usize,
    counters: [Arc<AtomicUsize>; 2],
}

impl Charge {
    fn new(len: usize, flow: &Arc<AtomicUsize>, all: &Arc<AtomicUsize>) -> Charge {
        flow.fetch_add(len, Ordering::AcqRel);
        all.fetch_add(len, Ordering::AcqRel);
        Charge { len, counters: [flow.clone(), all.clone()] }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        for counter in &self.counters {
            counter.fetch_sub(self.len, Ordering::AcqRel);
        }
    }
}

/// Sends one mirrored flow to the supervisor; the local app's answers are discarded there.
async fn mirror_flow(tunnel: Tunnel, key: FlowKey, mut rx: mpsc::UnboundedReceiver<FlowMessage>) {
    let target = OpenTarget::Incoming { server: key.server, client: key.client, mode: IncomingMode::Mirror };
    let stream: Stream = match tunnel.open(target, OPEN_TIMEOUT).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(client = %key.client, "mirrored connection not taken by the local app: {e}");
            return;
        }
    };
    while let Some(message) = rx.recv().await {
        match message {
            FlowMessage::Data(bytes, charge) => {
                let sent = stream.send(&bytes).await;
                drop(charge);
                if sent.is_err() {
                    return;
                }
            }
            FlowMessage::End => {
                stream.shutdown();
                break;
            }
            FlowMessage::Broken => {
                stream.reset();
                return;
            }
        }
    }
    // Keep the stream registered until the supervisor side closes too.
    let mut stream = stream;
    while !matches!(
        stream.recv().await,
        kmirror_protocol::tunnel::Inbound::Reset | kmirror_protocol::tunnel::Inbound::Shutdown
    ) {}
}

async fn call(
    commands: &std::sync::mpsc::Sender<Command>,
    make: impl FnOnce(oneshot::Sender<Result<(), String>>) -> Command,
) -> Result<(), Errno> {
    let (reply, rx) = oneshot::channel();
    commands.send(make(reply)).map_err(|_| Errno(libc::EIO))?;
    rx.await.map_err(|_| Errno(libc::EIO))?.map_err(|e| {
        tracing::error!("{e}");
        Errno(libc::EIO)
    })
}

fn listener_fd(listener: &TcpListener) -> std::io::Result<OwnedFd> {
    listener.as_fd().try_clone_to_owned()
}

/// Relays a connection to the pod's own app. The agent connects from inside the pod's network
/// namespace, over its loopback, which the classifier does not see.
pub async fn pass_to_pod_app(netns: &NetnsWorker, mut conn: TcpStream, original: SocketAddr) {
    let upstream = async {
        let domain = if original.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
        let fd = netns.socket(domain, libc::SOCK_STREAM).await?;
        tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd)).connect(original).await
    };
    match upstream.await {
        Ok(mut pod_app) => {
            let _ = tokio::io::copy_bidirectional(&mut conn, &mut pod_app).await;
        }
        Err(e) => tracing::warn!(%original, "the pod's app is unreachable too: {e}"),
    }
}

/// The datapath thread: enters the target's network namespace, loads and attaches the
/// classifier, then serves commands and drains the mirror ring buffer until the agent ends.
fn datapath_thread(
    netns: OwnedFd,
    commands: std::sync::mpsc::Receiver<Command>,
    chunks: mpsc::Sender<mirror::Chunk>,
    ready: oneshot::Sender<Result<(), String>>,
) {
    if let Err(e) = crate::netns::enter(&netns) {
        let _ = ready.send(Err(format!("cannot enter the target's network namespace: {e}")));
        return;
    }
    let datapath = match Datapath::load_and_attach() {
        Ok(d) => d,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut builder = libbpf_rs::RingBufferBuilder::new();
    let added = builder.add(datapath.mirror_events(), move |raw| {
        if let Some(chunk) = mirror::parse_chunk(raw) {
            // Blocking here lets the ring fill, and the program then counts losses: a slow
            // consumer costs mirrored streams, never unbounded memory.
            let _ = chunks.blocking_send(chunk);
        }
        0
    });
    if let Err(e) = added {
        let _ = ready.send(Err(format!("cannot read the mirror ring buffer: {e}")));
        return;
    }
    let ring = match builder.build() {
        Ok(ring) => ring,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot read the mirror ring buffer: {e}")));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut last_report = Instant::now();
    loop {
        loop {
            match commands.try_recv() {
                Ok(Command::SetPort { port, mode, reply }) => {
                    let _ = reply.send(datapath.set_port(port, mode));
                }
                Ok(Command::SetListener { listener, reply }) => {
                    let _ = reply.send(datapath.set_steal_listener(listener.as_fd()));
                    // The map holds its own reference; the listener stays open in the agent.
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
            }
        }
        let _ = ring.poll(Duration::from_millis(20));
        if last_report.elapsed() > Duration::from_secs(5) {
            let stats = datapath.stats();
            if stats.mirror_lost > 0 || stats.steal_assign_failed > 0 {
                tracing::warn!(?stats, "incoming datapath counters");
            } else {
                tracing::debug!(?stats, "incoming datapath counters");
            }
            last_report = Instant::now();
        }
    }
}
