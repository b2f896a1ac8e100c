//! The KV indexer: which workers hold which cached blocks, fed by the workers' KV events,
//! asked how many leading blocks of a request each worker already holds.
//!
//! A compressed radix tree over block hashes. Sequence hashes chain (a block's hash covers
//! every block before it), so each edge is a *segment*: hashes that followed one another in
//! the events, stored contiguously, with who holds them as *spans* (a span is a stretch of
//! the segment held by exactly one set of workers). A map from block hash to its place in a
//! segment lets a request enter the tree at any block. Matching looks up the request's
//! first hash, then compares the request against the segment's array for as long as they
//! agree, intersecting the sets of the spans it crosses, and looks up again only where the
//! segment ends or the request leaves it: a long shared prefix costs a few lookups and a
//! linear scan instead of one cache miss per block. A worker's overlap is where the
//! intersection dropped it.
//!
//! Segments are only an acceleration: every hash in a span has the span's set, whatever
//! order the hashes came in, so matching stays exact when a worker holds a block without its
//! parent (evicted first), where a tree keyed on parents would have to guess.
//!
//! A block never moves when its set changes: only spans split and merge. So a worker storing
//! a chain that another already stored costs no map lookup for blocks found where the chain
//! goes on (the segment says so), and no map update. New blocks go after the block before
//! them when that ends a segment, else start one (a fork). Blocks no one holds any more stay
//! in place as dead spans, out of the map, until they outnumber the live ones and the segment
//! is compacted; a block stored again where its dead copy sits comes back to life there.
//!
//! A worker may hold a block in several storage tiers at once (on the device and copied to
//! host memory, say): a span's set is who holds its blocks in any tier, so matching follows
//! a worker for as long as some tier of it holds the request's blocks, and the span names
//! its holders tier by tier where any is off the device (`tiers.rs`). A match then counts,
//! for each worker, how many of its blocks are held at best in host memory or on disk.
//!
//! Each worker's events carry consecutive ids. An event after a gap is not applied: the
//! indexer keeps waiting for the missing id, and the caller fetches the missed events (or a
//! snapshot, [`KvIndexer::apply_snapshot`]) from the worker.

mod segment;
mod table;
mod tiers;

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use turbine_protocols::kv::{KvEvent, KvEventData, KvSnapshot, StorageTier};

use crate::WorkerId;
use segment::{Loc, Segment, Span, WorkerSet};
use table::BlockTable;
use tiers::{TierTable, Tiers};

/// Most workers one indexer tracks: the width of [`WorkerSet`].
pub const MAX_WORKERS: usize = 128;

/// Blocks of a stored event looked up ahead of storing them.
const LOOKAHEAD: usize = 16;

/// Segments stop growing at this length (offsets are `u32`); a chain goes on in another.
const MAX_SEGMENT: usize = 1 << 31;

/// A stored event in progress: where its last block went, and the blocks that `slot` is
/// to be added to, as one range of a segment (`(segment, from, to)`), applied when the
/// chain leaves it.
struct Store {
    slot: usize,
    tier: StorageTier,
    prev: Option<Loc>,
    range: Option<(u32, u32, u32)>,
    added: usize,
}

/// The tree: segments, the map from each held block hash to its place in one, and the tier
/// breakdowns that spans name.
#[derive(Debug, Default)]
struct Blocks {
    map: BlockTable,
    segs: Vec<Segment>,
    free: Vec<u32>,
    tiers: TierTable,
}

impl Blocks {
    fn new_segment(&mut self) -> u32 {
        match self.free.pop() {
            Some(id) => id,
            None => {
                self.segs.push(Segment::default());
                (self.segs.len() - 1) as u32
            }
        }
    }

    /// Adds `slot` in `tier` to the blocks `hashes`, a chain whose first block follows `parent`.
    /// `last` is a block stored before and where it went then, likely `parent`; it becomes
    /// the last of `hashes` and where that went. Returns how many blocks are new to `slot`.
    // The two halves of `last` are read and written apart: a read of both at once, of
    // values written one by one, would wait for every store ahead of them, the map's
    // cache-missing ones included.
    fn store(
        &mut self,
        slot: usize,
        tier: StorageTier,
        parent: Option<u64>,
        last: &mut (u64, Loc),
        mut hashes: impl Iterator<Item = u64>,
    ) -> usize {
        let prev = parent.and_then(|p| {
            // Still where it went (and live, so the map would say the same): no lookup.
            if last.0 == p && self.live(last.1) == Some(p) {
                Some(last.1)
            } else {
                self.map.get(p)
            }
        });
        let mut st = Store {
            slot,
            tier,
            prev,
            range: None,
            added: 0,
        };
        let mut last_hash = None;
        loop {
            let mut chunk = [0; LOOKAHEAD];
            let mut n = 0;
            for (c, h) in chunk.iter_mut().zip(&mut hashes) {
                *c = h;
                n += 1;
            }
            self.store_chunk(&mut st, &chunk[..n]);
            last_hash = chunk[..n].last().copied().or(last_hash);
            if n < LOOKAHEAD {
                break;
            }
        }
        self.flush(&mut st);
        if let (Some(h), Some(at)) = (last_hash, st.prev) {
            last.0 = h;
            last.1 = at;
        }
        st.added
    }

    /// The block at `at`, if `at` is a live place.
    #[inline]
    fn live(&self, at: Loc) -> Option<u64> {
        let seg = self.segs.get(at.seg() as usize)?;
        let &h = seg.hashes.get(at.off() as usize)?;
        (!seg.set_at(at.off()).is_empty()).then_some(h)
    }

    fn store_chunk(&mut self, st: &mut Store, chunk: &[u64]) {
        // Blocks that go on where their chain already is (another worker stored it) cost no
        // lookup: the segment says so.
        let mut i = 0;
        while let Some(&h) = chunk.get(i) {
            let Some(next) = st.prev.and_then(|p| self.live_after(p, h)) else {
                break;
            };
            self.extend(st, next);
            i += 1;
        }
        // The rest are looked up. Storing each depends on where the one before went, so
        // their lookups would wait on one another's cache misses: load every line first,
        // with nothing branching on what comes back, and the misses overlap.
        let rest = &chunk[i..];
        let mut touched = 0;
        for &h in rest {
            touched ^= self.map.touch(h);
        }
        std::hint::black_box(touched);
        for &h in rest {
            let at = self.locate(st.prev, h);
            self.extend(st, at);
        }
    }

    /// The place after `prev`, if it holds `hash`, live.
    #[inline]
    fn live_after(&self, prev: Loc, hash: u64) -> Option<Loc> {
        let seg = &self.segs[prev.seg() as usize];
        let off = prev.off() + 1;
        (seg.hashes.get(off as usize) == Some(&hash) && !seg.set_at(off).is_empty()).then_some(prev.next())
    }

    /// Where `hash`, the block after `prev` in its chain, is held, or goes if no worker holds
    /// it: after `prev` where that ends a segment (or where a dead copy of it sits), else at
    /// the start of a segment of its own.
    fn locate(&mut self, prev: Option<Loc>, hash: u64) -> Loc {
        let mut at = None;
        if let Some(p) = prev {
            let seg = &self.segs[p.seg() as usize];
            let next = p.next();
            match seg.hashes.get(next.off() as usize) {
                Some(&h) if h == hash => {
                    if !seg.set_at(next.off()).is_empty() {
                        return next;
                    }
                    at = Some(next);
                }
                None if seg.hashes.len() < MAX_SEGMENT => at = Some(next),
                _ => {}
            }
        }
        let vacant = match self.map.lookup(hash) {
            Ok(found) => return found,
            Err(vacant) => vacant,
        };
        let at = match at {
            Some(next) if next.off() < self.segs[next.seg() as usize].len() => next,
            Some(end) => Loc::new(end.seg(), self.segs[end.seg() as usize].push_dead(hash)),
            None => {
                let seg = self.new_segment();
                Loc::new(seg, self.segs[seg as usize].push_dead(hash))
            }
        };
        self.map.fill(vacant, at);
        at
    }

    /// Marks `at` as the event's next block: part of the pending range if it follows it.
    #[inline]
    fn extend(&mut self, st: &mut Store, at: Loc) {
        match &mut st.range {
            Some((seg, _, end)) if *seg == at.seg() && *end == at.off() => *end += 1,
            _ => {
                self.flush(st);
                st.range = Some((at.seg(), at.off(), at.off() + 1));
            }
        }
        st.prev = Some(at);
    }

    fn flush(&mut self, st: &mut Store) {
        let Some((id, a, b)) = st.range.take() else {
            return;
        };
        let (slot, tier) = (st.slot, st.tier);
        let seg = &mut self.segs[id as usize];
        // The common case, blocks just appended (dead, in a span of their own), goes without
        // the general splitting and merging.
        let n = seg.spans.len();
        if n > 0 && seg.spans[n - 1].start == a && seg.spans[n - 1].set.is_empty() && b == seg.len() {
            let span = Span {
                start: a,
                tiers: match tier {
                    StorageTier::Device => TierTable::NONE,
                    _ => self.tiers.intern(Tiers::default().with(slot, tier)),
                },
                set: WorkerSet::default().with(slot),
            };
            if n > 1 && seg.spans[n - 2].same(&span) {
                seg.spans.pop();
            } else {
                seg.spans[n - 1] = span;
            }
            seg.live += b - a;
            st.added += (b - a) as usize;
            return;
        }
        st.added += seg.update(a, b, &mut self.tiers, |t| t.with(slot, tier)) as usize;
    }

    /// Takes `slot` out of `tier` of the blocks `hashes`, returning how many it no longer
    /// holds in any tier. Blocks next to each other in a segment change together, as one
    /// range.
    fn remove(&mut self, slot: usize, tier: StorageTier, hashes: &[u64]) -> usize {
        let mut held: Vec<Loc> = hashes
            .iter()
            .filter_map(|h| {
                let loc = self.map.get(*h)?;
                let seg = &self.segs[loc.seg() as usize];
                let span = seg.spans[seg.span_of(loc.off())];
                self.tiers.get(span.set, span.tiers).contains(slot, tier).then_some(loc)
            })
            .collect();
        held.sort_unstable();
        held.dedup();
        let mut removed = 0;
        let mut i = 0;
        while i < held.len() {
            let (seg, a) = (held[i].seg(), held[i].off());
            let mut b = a + 1;
            i += 1;
            while held.get(i) == Some(&Loc::new(seg, b)) {
                b += 1;
                i += 1;
            }
            removed += self.segs[seg as usize].update(a, b, &mut self.tiers, |t| t.without(slot, tier)) as usize;
            self.unmap_dead(seg, a, b);
            // After the segment's last range: compacting moves what the others point at.
            if held.get(i).is_none_or(|l| l.seg() != seg) {
                self.compact(seg);
            }
        }
        removed
    }

    /// Maps every block `slot` holds through `f`, which changes only `slot`: for the rare
    /// events that need it (a worker's device cleared, or the worker resynchronised or
    /// gone). Returns how many blocks it no longer holds in any tier.
    fn clear_slot(&mut self, slot: usize, f: impl Fn(Tiers) -> Tiers) -> usize {
        let mut removed = 0;
        for id in 0..self.segs.len() as u32 {
            let seg = &mut self.segs[id as usize];
            if !seg.spans.iter().any(|s| s.set.contains(slot)) {
                continue;
            }
            let len = seg.len();
            removed += seg.update(0, len, &mut self.tiers, &f) as usize;
            self.unmap_dead(id, 0, len);
            self.compact(id);
        }
        removed
    }

    /// Drops the tier breakdowns no span names any more, once there may be many.
    fn collect_tiers(&mut self) {
        if self.tiers.needs_collecting(self.segs.len()) {
            self.drop_unused_tiers();
        }
    }

    fn drop_unused_tiers(&mut self) {
        let mut used: Vec<u32> = self
            .segs
            .iter()
            .flat_map(|s| s.spans.iter().map(|span| span.tiers))
            .filter(|&t| t != TierTable::NONE)
            .collect();
        used.sort_unstable();
        used.dedup();
        self.tiers.retain(&used);
        for span in self.segs.iter_mut().flat_map(|s| s.spans.iter_mut()) {
            if span.tiers != TierTable::NONE {
                // Every id a span names is in `used`.
                span.tiers = used
                    .binary_search(&span.tiers)
                    .map_or(TierTable::NONE, |i| i as u32 + 1);
            }
        }
    }

    /// Takes the dead blocks among `a..b` of segment `id` out of the map.
    fn unmap_dead(&mut self, id: u32, a: u32, b: u32) {
        let Self { map, segs, .. } = self;
        let seg = &segs[id as usize];
        let mut k = seg.span_of(a);
        while k < seg.spans.len() && seg.spans[k].start < b {
            if seg.spans[k].set.is_empty() {
                let (from, to) = (seg.spans[k].start.max(a), seg.span_end(k).min(b));
                for off in from..to {
                    map.remove_at(seg.hashes[off as usize], Loc::new(id, off));
                }
            }
            k += 1;
        }
    }

    /// Bounds segment `id`'s memory by what it holds: frees it once nothing in it is live,
    /// and drops its dead blocks once they outnumber the live ones.
    fn compact(&mut self, id: u32) {
        let Self { map, segs, free, .. } = self;
        let seg = &mut segs[id as usize];
        if seg.live == 0 {
            *seg = Segment::default();
            free.push(id);
            return;
        }
        if seg.len() - seg.live <= seg.live {
            return;
        }
        let mut hashes = Vec::with_capacity(seg.live as usize);
        let mut spans: Vec<Span> = Vec::new();
        let mut moved = None;
        for k in 0..seg.spans.len() {
            let span = seg.spans[k];
            if span.set.is_empty() {
                moved.get_or_insert(hashes.len());
                continue;
            }
            if spans.last().is_none_or(|s| !s.same(&span)) {
                spans.push(Span {
                    start: hashes.len() as u32,
                    ..span
                });
            }
            hashes.extend_from_slice(&seg.hashes[span.start as usize..seg.span_end(k) as usize]);
        }
        // Blocks before the first dead one keep their places.
        let moved = moved.unwrap_or(hashes.len());
        for (off, &h) in hashes.iter().enumerate().skip(moved) {
            map.set(h, Loc::new(id, off as u32));
        }
        seg.hashes = hashes;
        seg.spans = spans;
    }
}

/// What became of an event handed to [`KvIndexer::apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Applied,
    /// Already applied (an id below the next expected one): ignored.
    Duplicate,
    /// Events are missing before this one: ignored. The caller fetches the events after
    /// `after` (`None`: a full snapshot) from the worker, and applies them.
    NeedsResync {
        after: Option<u64>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexerError {
    #[error("the indexer tracks at most {MAX_WORKERS} workers")]
    TooManyWorkers,
}

#[derive(Debug)]
struct Worker {
    slot: usize,
    /// The id the next event must have; `None` until a snapshot or event 0 arrives.
    next_event: Option<u64>,
    blocks: usize,
    /// The last block the worker stored, and where it went: usually the next event's parent.
    last: (u64, Loc),
}

/// Worker ids may be small consecutive numbers: a folded multiply spreads them over all of
/// the word, and costs far less than the default hasher.
#[derive(Default)]
struct Mix(u64);

impl Hasher for Mix {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0 ^ u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        let m = u128::from(n ^ self.0) * 0x9E37_79B9_7F4A_7C15;
        self.0 = (m >> 64) as u64 ^ m as u64;
    }
}

/// How many leading blocks of a request each worker holds, in any tier (workers holding none
/// are absent), and where they are held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overlaps {
    pub scores: Vec<(WorkerId, u32)>,
    /// How the blocks of `scores` divide between tiers, for the workers holding some of them
    /// only off the device; a worker absent here holds all of them on the device.
    pub tiers: Vec<(WorkerId, TierBlocks)>,
}

impl Overlaps {
    /// The leading blocks `worker` holds, in any tier.
    pub fn get(&self, worker: WorkerId) -> u32 {
        self.scores.iter().find(|(w, _)| *w == worker).map_or(0, |(_, n)| *n)
    }

    /// The leading blocks `worker` holds, by the fastest tier that holds each.
    pub fn tiers(&self, worker: WorkerId) -> TierBlocks {
        match self.tiers.iter().find(|(w, _)| *w == worker) {
            Some(&(_, t)) => t,
            None => TierBlocks {
                device: self.get(worker),
                ..TierBlocks::default()
            },
        }
    }
}

/// A worker's matched blocks by the fastest tier that holds each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierBlocks {
    pub device: u32,
    pub host: u32,
    pub disk: u32,
}

impl TierBlocks {
    pub fn get(&self, tier: StorageTier) -> u32 {
        match tier {
            StorageTier::Device => self.device,
            StorageTier::Host => self.host,
            StorageTier::Disk => self.disk,
        }
    }

    pub fn total(&self) -> u32 {
        self.device + self.host + self.disk
    }
}

#[derive(Debug, Default)]
pub struct KvIndexer {
    blocks: Blocks,
    workers: HashMap<WorkerId, Worker, BuildHasherDefault<Mix>>,
    by_slot: Vec<Option<WorkerId>>,
}

impl KvIndexer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one event of `worker`, unless it is out of order (see [`Applied`]).
    pub fn apply(&mut self, worker: WorkerId, event: &KvEvent) -> Result<Applied, IndexerError> {
        let Self {
            blocks,
            workers,
            by_slot,
        } = self;
        let w = worker_entry(workers, by_slot, worker)?;
        match w.next_event {
            Some(next) if event.event_id < next => return Ok(Applied::Duplicate),
            // Keep waiting for `next`: the events the caller fetches start there.
            Some(next) if event.event_id > next => {
                return Ok(Applied::NeedsResync {
                    after: next.checked_sub(1),
                });
            }
            None if event.event_id != 0 => return Ok(Applied::NeedsResync { after: None }),
            _ => {}
        }
        w.next_event = Some(event.event_id + 1);
        let slot = w.slot;
        match &event.data {
            KvEventData::Stored {
                parent_hash,
                blocks: stored,
                tier,
            } => {
                let hashes = stored.iter().map(|b| b.sequence_hash);
                w.blocks += blocks.store(slot, *tier, *parent_hash, &mut w.last, hashes);
            }
            KvEventData::Removed { sequence_hashes, tier } => {
                w.blocks -= blocks.remove(slot, *tier, sequence_hashes);
            }
            KvEventData::Cleared => {
                w.blocks -= blocks.clear_slot(slot, |t| t.without(slot, StorageTier::Device));
            }
        }
        blocks.collect_tiers();
        Ok(Applied::Applied)
    }

    /// Replaces everything known of `worker` by `snapshot`; its next event is the one after.
    pub fn apply_snapshot(&mut self, worker: WorkerId, snapshot: &KvSnapshot) -> Result<(), IndexerError> {
        let Self {
            blocks,
            workers,
            by_slot,
        } = self;
        let w = worker_entry(workers, by_slot, worker)?;
        let slot = w.slot;
        blocks.clear_slot(slot, |t| t.without_slot(slot));
        w.blocks = 0;
        w.last = (0, Loc::NONE);
        // Snapshots list blocks in any order (sorted by hash, say): storing each after its
        // parent keeps chains in segments.
        for i in chain_order(snapshot) {
            let b = &snapshot.blocks[i];
            let hash = std::iter::once(b.block.sequence_hash);
            w.blocks += blocks.store(slot, b.tier, b.parent_hash, &mut w.last, hash);
        }
        w.next_event = Some(snapshot.last_event_id.map_or(0, |id| id + 1));
        blocks.collect_tiers();
        Ok(())
    }

    /// Forgets `worker` and every block it held.
    pub fn remove_worker(&mut self, worker: WorkerId) {
        if let Some(w) = self.workers.remove(&worker) {
            self.blocks.clear_slot(w.slot, |t| t.without_slot(w.slot));
            self.by_slot[w.slot] = None;
            self.blocks.collect_tiers();
        }
    }

    /// For each worker, how many leading blocks of `hashes` (a request's sequence hashes,
    /// in order) it holds in any tier, and in which: a worker's prefix ends at the first
    /// block none of its tiers holds.
    pub fn find_matches(&self, hashes: &[u64]) -> Overlaps {
        let mut out = Overlaps::default();
        // Per slot, blocks matched at best in host memory and on disk; allocated at the
        // first span with any, which most requests never meet.
        let mut off_device: Vec<[u32; 2]> = Vec::new();
        let done = |out: &mut Overlaps, off_device: &[[u32; 2]], slot: usize, depth: usize| {
            let Some(w) = self.by_slot[slot] else { return };
            out.scores.push((w, depth as u32));
            if let Some(&[host, disk]) = off_device.get(slot).filter(|c| **c != [0, 0]) {
                let device = depth as u32 - host - disk;
                out.tiers.push((w, TierBlocks { device, host, disk }));
            }
        };
        let mut active = WorkerSet::default();
        let mut started = false;
        let mut depth = 0;
        let lookup = |depth: usize| hashes.get(depth).and_then(|&h| self.blocks.map.get(h));
        let mut at = lookup(0);
        'enter: while let Some(loc) = at {
            let seg = &self.blocks.segs[loc.seg() as usize];
            let off = loc.off() as usize;
            // Follow the segment while the request does; every block there has its span's set.
            let rest = &seg.hashes[off + 1..];
            let end = depth + 1 + rest.len();
            // Where a request that follows the segment to its end goes on: looked up before
            // the scan so that the lookup's cache misses overlap it.
            let after = lookup(end);
            let matched = 1 + common_prefix(rest, &hashes[depth + 1..]);
            // The spans over the matched blocks, each dropping the workers not in its set.
            let mut k = seg.span_of(loc.off());
            let mut from = off;
            loop {
                let set = seg.spans[k].set;
                let d = depth + (from - off);
                if set.is_empty() {
                    // No one holds the block here: it may be held in another place.
                    depth = d;
                    at = lookup(depth);
                    continue 'enter;
                }
                let next = if started { active.and(set) } else { set };
                started = true;
                if next != active {
                    for slot in active.and_not(next).slots() {
                        done(&mut out, &off_device, slot, d);
                    }
                    if next.is_empty() {
                        return out;
                    }
                    active = next;
                }
                let span_end = seg.span_end(k) as usize;
                let tiers = seg.spans[k].tiers;
                if tiers != TierTable::NONE {
                    let (host, disk) = self.blocks.tiers.get(set, tiers).best_off_device(active);
                    if !(host.is_empty() && disk.is_empty()) {
                        let n = (span_end.min(off + matched) - from) as u32;
                        if off_device.is_empty() {
                            off_device = vec![[0; 2]; self.by_slot.len()];
                        }
                        for slot in host.slots() {
                            off_device[slot][0] += n;
                        }
                        for slot in disk.slots() {
                            off_device[slot][1] += n;
                        }
                    }
                }
                if span_end >= off + matched {
                    break;
                }
                from = span_end;
                k += 1;
            }
            depth += matched;
            at = if depth == end { after } else { lookup(depth) };
        }
        for slot in active.slots() {
            done(&mut out, &off_device, slot, depth);
        }
        out
    }

    /// Distinct blocks held by any worker.
    pub fn num_blocks(&self) -> usize {
        self.blocks.map.len()
    }

    /// Bytes the tree occupies: the map's table, the segments, their hashes and spans. The per-worker bookkeeping is negligible
    /// beside it.
    pub fn memory_bytes(&self) -> usize {
        let b = &self.blocks;
        let arrays: usize = b
            .segs
            .iter()
            .map(|s| {
                s.hashes.capacity() * std::mem::size_of::<u64>() + s.spans.capacity() * std::mem::size_of::<Span>()
            })
            .sum();
        b.map.memory_bytes()
            + b.tiers.memory_bytes()
            + b.segs.capacity() * std::mem::size_of::<Segment>()
            + arrays
            + b.free.capacity() * std::mem::size_of::<u32>()
    }

    /// (worker, block) pairs held in any tier: what the workers' events have stored and not
    /// removed.
    pub fn stored_pairs(&self) -> usize {
        self.workers.values().map(|w| w.blocks).sum()
    }

    /// Blocks `worker` holds in any tier, as far as its events tell.
    pub fn worker_blocks(&self, worker: WorkerId) -> usize {
        self.workers.get(&worker).map_or(0, |w| w.blocks)
    }

    pub fn workers(&self) -> impl Iterator<Item = WorkerId> + '_ {
        self.workers.keys().copied()
    }
}

/// `worker`'s bookkeeping, given a slot if it is new.
fn worker_entry<'a>(
    workers: &'a mut HashMap<WorkerId, Worker, BuildHasherDefault<Mix>>,
    by_slot: &mut Vec<Option<WorkerId>>,
    worker: WorkerId,
) -> Result<&'a mut Worker, IndexerError> {
    match workers.entry(worker) {
        Entry::Occupied(e) => Ok(e.into_mut()),
        Entry::Vacant(e) => {
            let slot = match by_slot.iter().position(Option::is_none) {
                Some(slot) => slot,
                None if by_slot.len() < MAX_WORKERS => {
                    by_slot.push(None);
                    by_slot.len() - 1
                }
                None => return Err(IndexerError::TooManyWorkers),
            };
            by_slot[slot] = Some(worker);
            Ok(e.insert(Worker {
                slot,
                next_event: None,
                blocks: 0,
                last: (0, Loc::NONE),
            }))
        }
    }
}

/// How many leading elements `a` and `b` share. Four at a time, with one branch for the
/// four: long matches are the common case.
fn common_prefix(a: &[u64], b: &[u64]) -> usize {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut i = 0;
    for (x, y) in a.chunks_exact(4).zip(b.chunks_exact(4)) {
        if (x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3]) != 0 {
            break;
        }
        i += 4;
    }
    i + a[i..].iter().zip(&b[i..]).take_while(|(x, y)| x == y).count()
}

/// The indices of `snapshot`'s blocks with each block after its parent, and a child right
/// after its parent where the parent has one (depth first). Blocks whose parent is absent
/// start a chain; any left over (a malformed cycle) come last.
fn chain_order(snapshot: &KvSnapshot) -> Vec<usize> {
    let blocks = &snapshot.blocks;
    let index: turbine_tokens::HashMapOfHashes<usize> = blocks
        .iter()
        .enumerate()
        .map(|(i, b)| (b.block.sequence_hash, i))
        .collect();
    let parent = |i: usize| {
        blocks[i]
            .parent_hash
            .and_then(|p| index.get(&p).copied())
            .filter(|&p| p != i)
    };
    // Children grouped by parent: (parent, child) pairs sorted, and where each group starts.
    let mut edges: Vec<(usize, usize)> = (0..blocks.len()).filter_map(|i| Some((parent(i)?, i))).collect();
    edges.sort_unstable();
    let mut order = Vec::with_capacity(blocks.len());
    let mut seen = vec![false; blocks.len()];
    let mut stack: Vec<usize> = (0..blocks.len()).filter(|&i| parent(i).is_none()).rev().collect();
    let visit = |stack: &mut Vec<usize>, order: &mut Vec<usize>, seen: &mut Vec<bool>| {
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            order.push(i);
            let from = edges.partition_point(|&(p, _)| p < i);
            let to = edges.partition_point(|&(p, _)| p <= i);
            stack.extend(edges[from..to].iter().rev().map(|&(_, c)| c));
        }
    };
    visit(&mut stack, &mut order, &mut seen);
    for i in 0..blocks.len() {
        if !seen[i] {
            stack.push(i);
            visit(&mut stack, &mut order, &mut seen);
        }
    }
    order
}

#[cfg(test)]
mod tests;
