//! TCP stream reassembly for mirrored connections (client → server direction only).
//!
//! Segments arrive as copies from the TC program: out of order, duplicated, overlapping,
//! retransmitted with different segmentation, or missing. The reassembler emits each stream
//! byte exactly once, in order, and only bytes it actually received at their true position:
//! when a gap cannot be filled the caller drops the stream, it is never spliced over.
//!
//! Positions are 64-bit offsets from the first payload byte (ISN + 1), unwrapped from the
//! 32-bit sequence space relative to the bytes delivered so far, so streams longer than 4 GiB
//! and sequence numbers that wrap work.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// More out-of-order data is waiting than the limit allows: a segment is missing.
    Overflow,
}

#[derive(Debug)]
pub struct Reassembler {
    /// Sequence number of stream offset 0 (ISN + 1).
    base: u32,
    /// Bytes delivered so far (the next expected offset).
    delivered: u64,
    /// Out-of-order data by start offset; entries never overlap each other.
    pending: BTreeMap<u64, Vec<u8>>,
    pending_bytes: usize,
    limit: usize,
    /// Offset at which the stream ends (the FIN's sequence number), once known.
    fin_at: Option<u64>,
}

impl Reassembler {
    /// A stream whose SYN carried sequence number `isn`; at most `limit` bytes wait out of order.
    pub fn new(isn: u32, limit: usize) -> Reassembler {
        Reassembler {
            base: isn.wrapping_add(1),
            delivered: 0,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            limit,
            fin_at: None,
        }
    }

    /// Stream offset of sequence number `seq`, taking the position closest to what has been
    /// delivered (segments are never more than 2 GiB away from it).
    fn offset_of(&self, seq: u32) -> Option<u64> {
        let relative = seq.wrapping_sub(self.base);
        let near = self.delivered as u32;
        let delta = relative.wrapping_sub(near) as i32 as i64;
        let offset = self.delivered as i64 + delta;
        (offset >= 0).then_some(offset as u64)
    }

    /// Offers one segment; returns the bytes that became contiguous.
    pub fn segment(&mut self, seq: u32, payload: &[u8], fin: bool) -> Result<Vec<u8>, Error> {
        let Some(start) = self.offset_of(seq) else { return Ok(Vec::new()) };
        if fin {
            self.fin_at.get_or_insert(start + payload.len() as u64);
        }
        let end = start + payload.len() as u64;
        if end <= self.delivered || payload.is_empty() {
            return Ok(Vec::new());
        }
        // Beyond anything we could hold, so beyond any window this stream's receiver can have
        // offered us: the kernel drops such a segment, and so do we (a forged one must not
        // break the stream).
        if start > self.delivered + self.limit as u64 {
            return Ok(Vec::new());
        }
        // Keep only the part not delivered yet.
        let (start, payload) = if start < self.delivered {
            (self.delivered, &payload[(self.delivered - start) as usize..])
        } else {
            (start, payload)
        };
        self.store(start, payload)?;
        Ok(self.drain())
    }

    /// Inserts `payload` at `start`, keeping only bytes no pending entry already covers
    /// (the first copy of a byte wins).
    fn store(&mut self, start: u64, payload: &[u8]) -> Result<(), Error> {
        let end = start + payload.len() as u64;
        let mut cursor = start;
        let mut pieces = Vec::new();
        // Entries that start before `end` and may overlap [start, end).
        let first = self.pending.range(..start).next_back().map(|(&s, v)| (s, s + v.len() as u64));
        if let Some((_, e)) = first {
            cursor = cursor.max(e);
        }
        for (&s, v) in self.pending.range(start..end) {
            if s > cursor {
                pieces.push((cursor, s));
            }
            cursor = cursor.max(s + v.len() as u64);
        }
        if cursor < end {
            pieces.push((cursor, end));
        }
        for (s, e) in pieces {
            let bytes = payload[(s - start) as usize..(e - start) as usize].to_vec();
            self.pending_bytes += bytes.len();
            self.pending.insert(s, bytes);
        }
        if self.pending_bytes > self.limit {
            return Err(Error::Overflow);
        }
        Ok(())
    }

    fn drain(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() != self.delivered {
                break;
            }
            let bytes = entry.remove();
            self.pending_bytes -= bytes.len();
            self.delivered += bytes.len() as u64;
            if out.is_empty() {
                out = bytes;
            } else {
                out.extend_from_slice(&bytes);
            }
        }
        out
    }

    /// Out-of-order bytes held, waiting for a missing segment.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// True once every byte up to the FIN has been delivered.
    pub fn finished(&self) -> bool {
        self.fin_at.is_some_and(|f| self.delivered >= f)
    }

    /// True while received data waits for a missing segment.
    pub fn has_gap(&self) -> bool {
        !self.pending.is_empty() || self.fin_at.is_some_and(|f| self.delivered < f)
    }

    #[cfg(test)]
    pub fn delivered(&self) -> u64 {
        self.delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic PRNG (xorshift) so property tests need no extra crate and are
    /// reproducible from their seed.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    fn stream(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = Rng(seed | 1);
        (0..len).map(|_| rng.next() as u8).collect()
    }

    /// Cuts `data` into segments (seq numbers from `isn + 1`), with random boundaries.
    fn segments(data: &[u8], isn: u32, rng: &mut Rng) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let len = 1 + rng.below(3000) as usize;
            let end = (at + len).min(data.len());
            out.push((isn.wrapping_add(1).wrapping_add(at as u32), data[at..end].to_vec()));
            at = end;
        }
        out
    }

    fn shuffle<T>(items: &mut [T], rng: &mut Rng) {
        for i in (1..items.len()).rev() {
            items.swap(i, rng.below(i as u64 + 1) as usize);
        }
    }

    #[test]
    fn in_order_and_fin() {
        let mut r = Reassembler::new(100, 1 << 20);
        assert_eq!(r.segment(101, b"hello ", false).unwrap(), b"hello ");
        assert_eq!(r.segment(107, b"world", true).unwrap(), b"world");
        assert!(r.finished());
        assert!(!r.has_gap());
    }

    #[test]
    fn shuffled_duplicated_and_overlapping_segments_reassemble_exactly() {
        for seed in 1..200u64 {
            let mut rng = Rng(seed * 7919);
            let data = stream(20_000 + rng.below(20_000) as usize, seed);
            // Near the wrap point half of the time.
            let isn = if seed % 2 == 0 { u32::MAX - rng.below(30_000) as u32 } else { rng.next() as u32 };
            let mut segs = segments(&data, isn, &mut rng);
            // Retransmits with different boundaries: overlapping re-cuts of random ranges.
            for _ in 0..10 {
                let a = rng.below(data.len() as u64) as usize;
                let b = (a + 1 + rng.below(5000) as usize).min(data.len());
                segs.push((isn.wrapping_add(1).wrapping_add(a as u32), data[a..b].to_vec()));
            }
            let dups: Vec<_> = segs.iter().take(5).cloned().collect();
            segs.extend(dups);
            shuffle(&mut segs, &mut rng);
            let mut r = Reassembler::new(isn, 1 << 24);
            let mut out = Vec::new();
            for (seq, payload) in &segs {
                out.extend(r.segment(*seq, payload, false).unwrap());
            }
            assert!(out == data, "seed {seed}: reassembled stream differs");
            assert!(!r.has_gap());
        }
    }

    #[test]
    fn missing_segment_never_emits_bytes_past_the_gap() {
        for seed in 1..100u64 {
            let mut rng = Rng(seed * 104_729);
            let data = stream(30_000, seed);
            let isn = rng.next() as u32;
            let mut segs = segments(&data, isn, &mut rng);
            let missing = segs.remove(rng.below(segs.len() as u64) as usize);
            let gap_at = missing.0.wrapping_sub(isn.wrapping_add(1)) as usize;
            shuffle(&mut segs, &mut rng);
            let mut r = Reassembler::new(isn, 1 << 24);
            let mut out = Vec::new();
            for (seq, payload) in &segs {
                out.extend(r.segment(*seq, payload, false).unwrap());
            }
            assert_eq!(out.len(), gap_at, "seed {seed}: delivered exactly up to the gap");
            assert!(out == data[..gap_at], "seed {seed}: bytes before the gap are intact");
            assert!(r.has_gap() || gap_at + missing.1.len() == data.len(), "seed {seed}: the gap is known");
        }
    }

    #[test]
    fn first_copy_of_a_byte_wins_and_old_data_is_ignored() {
        let mut r = Reassembler::new(0, 1 << 20);
        assert_eq!(r.segment(3, b"CD", false).unwrap(), b"");
        // A conflicting overlap does not replace what was received first.
        assert_eq!(r.segment(1, b"ABxx", false).unwrap(), b"ABCD");
        assert_eq!(r.segment(1, b"zzzz", false).unwrap(), b"", "already delivered");
        assert_eq!(r.delivered(), 4);
    }

    #[test]
    fn overflow_is_reported() {
        let mut r = Reassembler::new(0, 10);
        // Starting beyond what could be held: outside any window, ignored.
        assert_eq!(r.segment(100, &[0; 11], false), Ok(Vec::new()));
        assert_eq!(r.pending_bytes(), 0);
        assert_eq!(r.segment(6, &[0; 11], false), Err(Error::Overflow));
    }

    #[test]
    fn long_streams_cross_the_4gib_sequence_space() {
        let isn = 5u32;
        let mut r = Reassembler::new(isn, 1 << 20);
        let chunk = vec![7u8; 1 << 20];
        let mut seq = isn.wrapping_add(1);
        for _ in 0..4100 {
            assert_eq!(r.segment(seq, &chunk, false).unwrap().len(), chunk.len());
            seq = seq.wrapping_add(chunk.len() as u32);
        }
        assert_eq!(r.delivered(), 4100 << 20);
    }
}
