//! From ring-buffer chunks to mirrored byte streams.
//!
//! The TC program copies each segment to the `mirror_events` ring buffer as fixed-size chunks
//! (see `bpf/incoming.bpf.c`, `struct mirror_chunk`). Here chunks are joined into segments,
//! segments are sorted into flows by 4-tuple, and each flow that *started* (SYN seen) while
//! mirroring was on is reassembled into the client's byte stream. A flow that loses data is
//! reported broken and dropped — never patched over.

use super::reassembly::{self, Reassembler};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

/// Layout of `struct mirror_chunk`.
const HEADER: usize = 64;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Out-of-order bytes a flow may hold while waiting for a missing segment.
pub const FLOW_BUFFER_LIMIT: usize = 4 << 20;
/// Out-of-order bytes all flows together may hold.
pub const BUFFER_BUDGET: usize = 32 << 20;
/// Mirrored connections followed at once; a connection that completes its handshake while
/// this many are followed is not mirrored (and counted).
pub const MAX_FLOWS: usize = 1024;
/// Handshakes (SYN seen, the client's ACK not yet) tracked at once; SYNs beyond are ignored.
pub const MAX_HANDSHAKES: usize = 4096;
/// A handshake whose client ACK does not follow its last SYN within this time is forgotten:
/// the kernel dropped the SYN (a full accept queue), refused it, or the client was forged.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A gap that is not filled within this time is a lost segment.
const GAP_TIMEOUT: Duration = Duration::from_secs(3);
/// A packet whose chunks did not all arrive within this time lost some to a full ring.
const PARTIAL_TIMEOUT: Duration = Duration::from_millis(500);
/// Flows without any traffic for this long are forgotten.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub packet_id: u64,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    pub payload_len: u32,
    pub offset: u32,
    pub flags: u8,
    pub data: Vec<u8>,
}

fn addr(bytes: &[u8], port: u16) -> SocketAddr {
    let v6 = Ipv6Addr::from(<[u8; 16]>::try_from(bytes).expect("16 bytes"));
    let ip = v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6));
    SocketAddr::new(ip, port)
}

/// Decodes one ring-buffer record; `None` if it is malformed.
pub fn parse_chunk(raw: &[u8]) -> Option<Chunk> {
    if raw.len() < HEADER {
        return None;
    }
    let u16_at = |o: usize| u16::from_ne_bytes([raw[o], raw[o + 1]]);
    let u32_at = |o: usize| u32::from_ne_bytes(raw[o..o + 4].try_into().expect("4 bytes"));
    let chunk_len = u32_at(56) as usize;
    let data = raw.get(HEADER..HEADER + chunk_len)?.to_vec();
    Some(Chunk {
        packet_id: u64::from_ne_bytes(raw[0..8].try_into().expect("8 bytes")),
        src: addr(&raw[8..24], u16_at(40)),
        dst: addr(&raw[24..40], u16_at(42)),
        seq: u32_at(44),
        payload_len: u32_at(48),
        offset: u32_at(52),
        flags: raw[60],
        data,
    })
}

/// One whole TCP segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    pub flags: u8,
    pub payload: Vec<u8>,
}

struct Partial {
    first: Chunk,
    payload: Vec<u8>,
    received: usize,
    since: Instant,
}

/// Joins chunks into segments.
#[derive(Default)]
pub struct PacketAssembler {
    partial: HashMap<u64, Partial>,
}

impl PacketAssembler {
    pub fn push(&mut self, chunk: Chunk, now: Instant) -> Option<Segment> {
        let total = chunk.payload_len as usize;
        if chunk.data.len() == total && chunk.offset == 0 {
            return Some(Segment {
                src: chunk.src,
                dst: chunk.dst,
                seq: chunk.seq,
                flags: chunk.flags,
                payload: chunk.data,
            });
        }
        let entry = self.partial.entry(chunk.packet_id).or_insert_with(|| Partial {
            first: Chunk { data: Vec::new(), ..chunk.clone() },
            payload: vec![0; total],
            received: 0,
            since: now,
        });
        let at = chunk.offset as usize;
        let end = at + chunk.data.len();
        if end > entry.payload.len() {
            return None;
        }
        entry.payload[at..end].copy_from_slice(&chunk.data);
        entry.received += chunk.data.len();
        if entry.received < total {
            return None;
        }
        let done = self.partial.remove(&chunk.packet_id)?;
        Some(Segment {
            src: done.first.src,
            dst: done.first.dst,
            seq: done.first.seq,
            flags: done.first.flags,
            payload: done.payload,
        })
    }

    /// Packets that will never complete; their flows lost data.
    pub fn expire(&mut self, now: Instant) -> Vec<(SocketAddr, SocketAddr)> {
        let mut lost = Vec::new();
        self.partial.retain(|_, p| {
            let keep = now.duration_since(p.since) < PARTIAL_TIMEOUT;
            if !keep {
                lost.push((p.first.src, p.first.dst));
            }
            keep
        });
        lost
    }
}

/// A mirrored connection: the pod client and the pod address it connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client: SocketAddr,
    pub server: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlowEvent {
    Open(FlowKey),
    Data(FlowKey, Vec<u8>),
    /// The client closed (`reset` when it aborted).
    End(FlowKey, bool),
    /// Data was lost: the mirrored stream is dropped.
    Broken(FlowKey, &'static str),
}

struct Flow {
    isn: u32,
    reasm: Reassembler,
    last_progress: Instant,
    last_seen: Instant,
}

/// A connection whose SYN was seen but not yet the client's ACK of the server's SYN-ACK.
struct Handshake {
    isn: u32,
    since: Instant,
}

/// Segments sorted into mirrored flows. A flow is opened (and the local app connected) only
/// once the client's handshake completes: a SYN the kernel drops, refuses or never answers —
/// a SYN flood, a full accept queue — costs a small, capped and quickly expiring record.
#[derive(Default)]
pub struct FlowTable {
    flows: HashMap<FlowKey, Flow>,
    handshakes: HashMap<FlowKey, Handshake>,
    /// Out-of-order bytes held by all flows.
    buffered: usize,
    /// Flows dropped for lost data (kept for tests; the service counts what it reports).
    #[cfg_attr(not(test), allow(dead_code))]
    pub broken: u64,
    /// Connections not mirrored because a table was full.
    pub skipped: u64,
}

impl FlowTable {
    pub fn on_segment(&mut self, seg: Segment, now: Instant) -> Vec<FlowEvent> {
        let key = FlowKey { client: seg.src, server: seg.dst };
        let mut events = Vec::new();
        if seg.flags & TCP_SYN != 0 && seg.flags & TCP_ACK == 0 {
            if self.flows.get(&key).is_some_and(|f| f.isn == seg.seq) {
                return events; // a retransmitted SYN
            }
            if let Some(old) = self.flows.remove(&key) {
                self.buffered -= old.reasm.pending_bytes();
                events.push(FlowEvent::End(key, true));
            }
            if self.handshakes.len() >= MAX_HANDSHAKES && !self.handshakes.contains_key(&key) {
                self.skipped += 1;
                return events;
            }
            // A retransmitted SYN restarts the wait.
            self.handshakes.insert(key, Handshake { isn: seg.seq, since: now });
            return events;
        }
        if let Some(handshake) = self.handshakes.get(&key) {
            if seg.flags & TCP_RST != 0 {
                self.handshakes.remove(&key);
                return events;
            }
            // The handshake's ACK (or the first data after a SYN-cookie ACK) starts at ISN + 1;
            // anything else is not part of this connection's start.
            if seg.seq != handshake.isn.wrapping_add(1) || seg.flags & TCP_ACK == 0 {
                return events;
            }
            let isn = handshake.isn;
            self.handshakes.remove(&key);
            if self.flows.len() >= MAX_FLOWS {
                self.skipped += 1;
                return events;
            }
            let reasm = Reassembler::new(isn, FLOW_BUFFER_LIMIT);
            self.flows.insert(key, Flow { isn, reasm, last_progress: now, last_seen: now });
            events.push(FlowEvent::Open(key));
        }
        // Flows that started before mirroring began are not followed.
        let Some(flow) = self.flows.get_mut(&key) else { return events };
        flow.last_seen = now;
        if seg.flags & TCP_RST != 0 {
            self.remove(&key);
            events.push(FlowEvent::End(key, true));
            return events;
        }
        let held = flow.reasm.pending_bytes();
        let result = flow.reasm.segment(seg.seq, &seg.payload, seg.flags & TCP_FIN != 0);
        self.buffered = self.buffered - held + flow.reasm.pending_bytes();
        match result {
            Ok(_) if self.buffered > BUFFER_BUDGET => {
                self.remove(&key);
                self.broken += 1;
                events.push(FlowEvent::Broken(
                    key,
                    "too much data waiting for missing segments across mirrored streams",
                ));
            }
            Ok(bytes) => {
                if !bytes.is_empty() {
                    flow.last_progress = now;
                    events.push(FlowEvent::Data(key, bytes));
                }
                if flow.reasm.finished() {
                    self.remove(&key);
                    events.push(FlowEvent::End(key, false));
                }
            }
            Err(reassembly::Error::Overflow) => {
                self.remove(&key);
                self.broken += 1;
                events.push(FlowEvent::Broken(key, "too much data behind a missing segment"));
            }
        }
        events
    }

    fn remove(&mut self, key: &FlowKey) -> Option<Flow> {
        let flow = self.flows.remove(key)?;
        self.buffered -= flow.reasm.pending_bytes();
        Some(flow)
    }

    /// Flows and handshakes followed now, and out-of-order bytes held.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.flows.len(), self.handshakes.len(), self.buffered)
    }

    /// Marks flows broken whose packets were partly lost.
    pub fn lost(&mut self, client: SocketAddr, server: SocketAddr) -> Option<FlowEvent> {
        let key = FlowKey { client, server };
        if self.handshakes.remove(&key).is_some() {
            return None;
        }
        self.remove(&key)?;
        self.broken += 1;
        Some(FlowEvent::Broken(key, "a mirrored packet was lost"))
    }

    /// Drops flows stuck on a gap, forgets idle ones and handshakes that never completed.
    pub fn sweep(&mut self, now: Instant) -> Vec<FlowEvent> {
        let mut events = Vec::new();
        let mut broken = 0;
        let mut released = 0;
        self.flows.retain(|key, flow| {
            let ended = if flow.reasm.has_gap() && now.duration_since(flow.last_progress) > GAP_TIMEOUT {
                broken += 1;
                Some(FlowEvent::Broken(*key, "a segment never arrived"))
            } else if now.duration_since(flow.last_seen) > IDLE_TIMEOUT {
                Some(FlowEvent::End(*key, false))
            } else {
                None
            };
            match ended {
                Some(event) => {
                    released += flow.reasm.pending_bytes();
                    events.push(event);
                    false
                }
                None => true,
            }
        });
        self.buffered -= released;
        self.broken += broken;
        self.handshakes.retain(|_, h| now.duration_since(h.since) <= HANDSHAKE_TIMEOUT);
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_chunk(id: u64, seq: u32, flags: u8, payload_len: u32, offset: u32, data: &[u8]) -> Vec<u8> {
        let mut raw = vec![0u8; HEADER];
        raw[0..8].copy_from_slice(&id.to_ne_bytes());
        raw[8..24].copy_from_slice(&"::ffff:10.0.0.1".parse::<Ipv6Addr>().unwrap().octets());
        raw[24..40].copy_from_slice(&"::ffff:10.0.0.2".parse::<Ipv6Addr>().unwrap().octets());
        raw[40..42].copy_from_slice(&40000u16.to_ne_bytes());
        raw[42..44].copy_from_slice(&8080u16.to_ne_bytes());
        raw[44..48].copy_from_slice(&seq.to_ne_bytes());
        raw[48..52].copy_from_slice(&payload_len.to_ne_bytes());
        raw[52..56].copy_from_slice(&offset.to_ne_bytes());
        raw[56..60].copy_from_slice(&(data.len() as u32).to_ne_bytes());
        raw[60] = flags;
        raw.extend_from_slice(data);
        raw.resize(HEADER + 2048, 0);
        raw
    }

    #[test]
    fn chunks_become_segments_and_flows() {
        let now = Instant::now();
        let mut packets = PacketAssembler::default();
        let mut flows = FlowTable::default();
        let syn = parse_chunk(&raw_chunk(1, 999, TCP_SYN, 0, 0, &[])).unwrap();
        assert_eq!(syn.src, "10.0.0.1:40000".parse().unwrap());
        assert_eq!(syn.dst, "10.0.0.2:8080".parse().unwrap());
        // Nothing is opened before the client completes its handshake.
        assert!(flows.on_segment(packets.push(syn, now).unwrap(), now).is_empty());
        let key =
            FlowKey { client: "10.0.0.1:40000".parse().unwrap(), server: "10.0.0.2:8080".parse().unwrap() };
        let ack = parse_chunk(&raw_chunk(4, 1000, TCP_ACK, 0, 0, &[])).unwrap();
        assert_eq!(flows.on_segment(packets.push(ack, now).unwrap(), now), vec![FlowEvent::Open(key)]);
        // A two-chunk packet, chunks arriving in reverse order.
        let second = parse_chunk(&raw_chunk(2, 1000, TCP_ACK, 5, 3, b"lo")).unwrap();
        let first = parse_chunk(&raw_chunk(2, 1000, TCP_ACK, 5, 0, b"hel")).unwrap();
        assert!(packets.push(second, now).is_none());
        let seg = packets.push(first, now).unwrap();
        assert_eq!(flows.on_segment(seg, now), vec![FlowEvent::Data(key, b"hello".to_vec())]);
        let fin = parse_chunk(&raw_chunk(3, 1005, TCP_FIN | TCP_ACK, 0, 0, &[])).unwrap();
        assert_eq!(flows.on_segment(packets.push(fin, now).unwrap(), now), vec![FlowEvent::End(key, false)]);
    }

    #[test]
    fn flows_that_predate_mirroring_are_ignored_and_lost_packets_break_flows() {
        let now = Instant::now();
        let mut packets = PacketAssembler::default();
        let mut flows = FlowTable::default();
        let data = parse_chunk(&raw_chunk(1, 5, TCP_ACK, 3, 0, b"abc")).unwrap();
        assert!(flows.on_segment(packets.push(data, now).unwrap(), now).is_empty());

        let syn = parse_chunk(&raw_chunk(2, 0, TCP_SYN, 0, 0, &[])).unwrap();
        flows.on_segment(packets.push(syn, now).unwrap(), now);
        let ack = parse_chunk(&raw_chunk(4, 1, TCP_ACK, 0, 0, &[])).unwrap();
        flows.on_segment(packets.push(ack, now).unwrap(), now);
        let half = parse_chunk(&raw_chunk(3, 1, TCP_ACK, 4000, 0, &[1; 2048])).unwrap();
        assert!(packets.push(half, now).is_none());
        let lost = packets.expire(now + Duration::from_secs(1));
        assert_eq!(lost.len(), 1);
        assert!(matches!(flows.lost(lost[0].0, lost[0].1), Some(FlowEvent::Broken(_, _))));
        assert_eq!(flows.broken, 1);
    }

    #[test]
    fn a_gap_that_never_fills_breaks_the_flow() {
        let now = Instant::now();
        let mut flows = FlowTable::default();
        let src: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let dst: SocketAddr = "10.0.0.2:2".parse().unwrap();
        let seg = |seq, flags, payload: &[u8]| Segment { src, dst, seq, flags, payload: payload.to_vec() };
        flows.on_segment(seg(0, TCP_SYN, b""), now);
        flows.on_segment(seg(1, TCP_ACK, b""), now);
        assert!(flows.on_segment(seg(5, TCP_ACK, b"later"), now).is_empty());
        assert!(flows.sweep(now + Duration::from_secs(1)).is_empty());
        let swept = flows.sweep(now + GAP_TIMEOUT + Duration::from_secs(1));
        assert!(matches!(swept.as_slice(), [FlowEvent::Broken(_, _)]));
    }

    fn client(i: u32) -> SocketAddr {
        SocketAddr::from(([10, 1, (i >> 16) as u8, (i >> 8) as u8], i as u16))
    }

    #[test]
    fn a_syn_flood_opens_nothing_is_capped_and_expires() {
        let now = Instant::now();
        let mut flows = FlowTable::default();
        let dst: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        for i in 0..(MAX_HANDSHAKES as u32 * 3) {
            let syn = Segment { src: client(i), dst, seq: i, flags: TCP_SYN, payload: Vec::new() };
            assert!(flows.on_segment(syn, now).is_empty(), "a SYN alone opened a mirrored stream");
        }
        assert_eq!(flows.sizes(), (0, MAX_HANDSHAKES, 0));
        // A forged ACK that does not continue the SYN's sequence opens nothing either.
        let stray = Segment { src: client(1), dst, seq: 77, flags: TCP_ACK, payload: b"x".to_vec() };
        assert!(flows.on_segment(stray, now).is_empty());
        flows.sweep(now + HANDSHAKE_TIMEOUT + Duration::from_secs(1));
        assert_eq!(flows.sizes(), (0, 0, 0));
    }

    #[test]
    fn completed_connections_are_capped_and_buffers_budgeted() {
        let now = Instant::now();
        let mut flows = FlowTable::default();
        let dst: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        let mut opened = 0;
        for i in 0..(MAX_FLOWS as u32 + 10) {
            flows.on_segment(
                Segment { src: client(i), dst, seq: 0, flags: TCP_SYN, payload: Vec::new() },
                now,
            );
            let ack = Segment { src: client(i), dst, seq: 1, flags: TCP_ACK, payload: Vec::new() };
            opened += flows.on_segment(ack, now).iter().filter(|e| matches!(e, FlowEvent::Open(_))).count();
        }
        assert_eq!(opened, MAX_FLOWS);
        assert_eq!(flows.skipped, 10);
        // Out-of-order data behind a gap in many flows: the total stays within the budget.
        let chunk = vec![7u8; 64 * 1024];
        for i in 0..MAX_FLOWS as u32 {
            for k in 0..(FLOW_BUFFER_LIMIT / chunk.len()) as u32 {
                let seg = Segment {
                    src: client(i),
                    dst,
                    seq: 100 + k * chunk.len() as u32,
                    flags: TCP_ACK,
                    payload: chunk.clone(),
                };
                flows.on_segment(seg, now);
                assert!(flows.sizes().2 <= BUFFER_BUDGET, "{} bytes held", flows.sizes().2);
            }
        }
        assert!(flows.broken > 0);
        // A segment far beyond any window is ignored, not buffered.
        let far = Segment {
            src: client(MAX_FLOWS as u32 - 1),
            dst,
            seq: 1 << 30,
            flags: TCP_ACK,
            payload: chunk.clone(),
        };
        let before = flows.sizes().2;
        flows.on_segment(far, now);
        assert!(flows.sizes().2 <= before);
    }
}
