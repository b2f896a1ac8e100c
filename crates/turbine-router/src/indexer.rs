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
//! Each worker's events carry consecutive ids. An event after a gap is not applied: the
//! indexer keeps waiting for the missing id, and the caller fetches the missed events (or a
//! snapshot, [`KvIndexer::apply_snapshot`]) from the worker.

mod table;

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use turbine_protocols::kv::{KvEvent, KvEventData, KvSnapshot};

use crate::WorkerId;
use table::BlockTable;

/// Most workers one indexer tracks: the width of [`WorkerSet`].
pub const MAX_WORKERS: usize = 128;

/// A set of workers, by their slot in the indexer. Two words rather than a `u128`, whose
/// 16-byte alignment would pad every span.
#[derive(Debug, Clone, Copy, Default, Eq)]
struct WorkerSet([u64; 2]);

/// Word by word: a derived comparison loads each side as one 16-byte vector, and where a
/// side was just written a word at a time, that load waits for every store in flight.
impl PartialEq for WorkerSet {
    fn eq(&self, other: &Self) -> bool {
        self.0[0] == other.0[0] && self.0[1] == other.0[1]
    }
}

impl WorkerSet {
    fn with(mut self, slot: usize) -> Self {
        self.0[slot / 64] |= 1 << (slot % 64);
        self
    }
    fn without(mut self, slot: usize) -> Self {
        self.0[slot / 64] &= !(1 << (slot % 64));
        self
    }
    fn contains(self, slot: usize) -> bool {
        self.0[slot / 64] & (1 << (slot % 64)) != 0
    }
    fn is_empty(self) -> bool {
        self.0 == [0, 0]
    }
    fn and(self, other: Self) -> Self {
        Self([self.0[0] & other.0[0], self.0[1] & other.0[1]])
    }
    fn and_not(self, other: Self) -> Self {
        Self([self.0[0] & !other.0[0], self.0[1] & !other.0[1]])
    }
    fn slots(self) -> impl Iterator<Item = usize> {
        (0..2).flat_map(move |word| {
            let mut bits = self.0[word];
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let bit = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                Some(word * 64 + bit)
            })
        })
    }
}

/// Where a block sits: its segment (the high half) and its index there (the low half). One
/// word, written and read whole: a read of a value written in halves waits for every store
/// ahead of it, the map's cache-missing ones included.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Loc(u64);

impl Loc {
    /// No place: its offset is past any segment's end.
    const NONE: Self = Self(u64::MAX);

    fn new(seg: u32, off: u32) -> Self {
        Self(u64::from(seg) << 32 | u64::from(off))
    }
    fn seg(self) -> u32 {
        (self.0 >> 32) as u32
    }
    fn off(self) -> u32 {
        self.0 as u32
    }
    /// The place after this one in its segment (offsets stay below [`MAX_SEGMENT`]).
    fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl std::fmt::Debug for Loc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seg(), self.off())
    }
}

/// Blocks from `start` up to the next span (or the segment's end) are held by exactly `set`.
/// An empty set marks dead blocks: held by no worker, and not in the map.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u32,
    set: WorkerSet,
}

/// A piece of chain: hashes that followed one another in the events, and who holds which,
/// as spans. A free segment (in [`Blocks::free`]) has no hashes.
#[derive(Debug, Default)]
struct Segment {
    hashes: Vec<u64>,
    /// Sorted by start, the first at 0; neighbours' sets differ.
    spans: Vec<Span>,
    /// Blocks in spans with a non-empty set.
    live: u32,
}

impl Segment {
    fn len(&self) -> u32 {
        self.hashes.len() as u32
    }

    /// The span that offset `off` is in.
    #[inline]
    fn span_of(&self, off: u32) -> usize {
        self.spans.partition_point(|s| s.start <= off).saturating_sub(1)
    }

    #[inline]
    fn span_end(&self, i: usize) -> u32 {
        self.spans.get(i + 1).map_or(self.len(), |s| s.start)
    }

    #[inline]
    fn set_at(&self, off: u32) -> WorkerSet {
        self.spans[self.span_of(off)].set
    }

    /// Makes a span start at `at`, returning its index (the span count where `at` is the
    /// segment's end).
    fn split(&mut self, at: u32) -> usize {
        if at >= self.len() {
            return self.spans.len();
        }
        let i = self.span_of(at);
        if self.spans[i].start == at {
            return i;
        }
        let set = self.spans[i].set;
        self.spans.insert(i + 1, Span { start: at, set });
        i + 1
    }

    /// Maps the sets of blocks `a..b` through `f`. Returns how many blocks' sets changed.
    fn update(&mut self, a: u32, b: u32, f: impl Fn(WorkerSet) -> WorkerSet) -> u32 {
        let i = self.split(a);
        let j = self.split(b);
        let mut changed = 0;
        for k in i..j {
            let n = self.span_end(k) - self.spans[k].start;
            let (old, new) = (self.spans[k].set, f(self.spans[k].set));
            if new != old {
                changed += n;
                match (old.is_empty(), new.is_empty()) {
                    (true, false) => self.live += n,
                    (false, true) => self.live -= n,
                    _ => {}
                }
                self.spans[k].set = new;
            }
        }
        // Neighbours that now agree merge, across the range's edges too.
        let lo = i.saturating_sub(1);
        let hi = (j + 1).min(self.spans.len());
        let mut w = lo + 1;
        for r in lo + 1..hi {
            if self.spans[r].set != self.spans[w - 1].set {
                self.spans[w] = self.spans[r];
                w += 1;
            }
        }
        self.spans.drain(w.min(hi)..hi);
        changed
    }

    /// Appends `hash` as a dead block; the store that appends it then makes it live.
    fn push_dead(&mut self, hash: u64) -> u32 {
        let off = self.len();
        if self.spans.last().is_none_or(|s| !s.set.is_empty()) {
            self.spans.push(Span {
                start: off,
                set: WorkerSet::default(),
            });
        }
        self.hashes.push(hash);
        off
    }
}

/// Blocks of a stored event looked up ahead of storing them.
const LOOKAHEAD: usize = 16;

/// Segments stop growing at this length (offsets are `u32`); a chain goes on in another.
const MAX_SEGMENT: usize = 1 << 31;

/// A stored event in progress: where its last block went, and the blocks that `slot` is
/// to be added to, as one range of a segment (`(segment, from, to)`), applied when the
/// chain leaves it.
struct Store {
    slot: usize,
    prev: Option<Loc>,
    range: Option<(u32, u32, u32)>,
    added: usize,
}

/// The tree: segments, and the map from each held block hash to its place in one.
#[derive(Debug, Default)]
struct Blocks {
    map: BlockTable,
    segs: Vec<Segment>,
    free: Vec<u32>,
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

    /// Adds `slot` to the blocks `hashes`, a chain whose first block follows `parent`.
    /// `last` is a block stored before and where it went then, likely `parent`; it becomes
    /// the last of `hashes` and where that went. Returns how many blocks are new to `slot`.
    // The two halves of `last` are read and written apart: a read of both at once, of
    // values written one by one, would wait for every store ahead of them, the map's
    // cache-missing ones included.
    fn store(
        &mut self,
        slot: usize,
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
        let slot = st.slot;
        let seg = &mut self.segs[id as usize];
        // The common case, blocks just appended (dead, in a span of their own), goes without
        // the general splitting and merging.
        let n = seg.spans.len();
        if n > 0 && seg.spans[n - 1].start == a && seg.spans[n - 1].set.is_empty() && b == seg.len() {
            let set = WorkerSet::default().with(slot);
            if n > 1 && seg.spans[n - 2].set == set {
                seg.spans.pop();
            } else {
                seg.spans[n - 1].set = set;
            }
            seg.live += b - a;
            st.added += (b - a) as usize;
            return;
        }
        st.added += seg.update(a, b, |s| s.with(slot)) as usize;
    }

    /// Takes `slot` out of the blocks `hashes`, returning how many it held. Blocks next to
    /// each other in a segment change together, as one range.
    fn remove(&mut self, slot: usize, hashes: &[u64]) -> usize {
        let mut held: Vec<Loc> = hashes
            .iter()
            .filter_map(|h| {
                let loc = self.map.get(*h)?;
                self.segs[loc.seg() as usize]
                    .set_at(loc.off())
                    .contains(slot)
                    .then_some(loc)
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
            removed += self.segs[seg as usize].update(a, b, |s| s.without(slot)) as usize;
            self.unmap_dead(seg, a, b);
            // After the segment's last range: compacting moves what the others point at.
            if held.get(i).is_none_or(|l| l.seg() != seg) {
                self.compact(seg);
            }
        }
        removed
    }

    /// Takes `slot` out of every segment: for the rare events that need it (a worker
    /// cleared, resynchronised or gone).
    fn clear_slot(&mut self, slot: usize) {
        for id in 0..self.segs.len() as u32 {
            let seg = &mut self.segs[id as usize];
            if !seg.spans.iter().any(|s| s.set.contains(slot)) {
                continue;
            }
            let len = seg.len();
            seg.update(0, len, |s| s.without(slot));
            self.unmap_dead(id, 0, len);
            self.compact(id);
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
        let Self { map, segs, free } = self;
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
            if spans.last().is_none_or(|s| s.set != span.set) {
                spans.push(Span {
                    start: hashes.len() as u32,
                    set: span.set,
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

/// How many leading blocks of a request each worker holds (workers holding none are absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overlaps {
    pub scores: Vec<(WorkerId, u32)>,
}

impl Overlaps {
    pub fn get(&self, worker: WorkerId) -> u32 {
        self.scores.iter().find(|(w, _)| *w == worker).map_or(0, |(_, n)| *n)
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
        match &event.data {
            KvEventData::Stored {
                parent_hash,
                blocks: stored,
            } => {
                let hashes = stored.iter().map(|b| b.sequence_hash);
                w.blocks += blocks.store(w.slot, *parent_hash, &mut w.last, hashes);
            }
            KvEventData::Removed { sequence_hashes } => {
                w.blocks -= blocks.remove(w.slot, sequence_hashes);
            }
            KvEventData::Cleared => {
                blocks.clear_slot(w.slot);
                w.blocks = 0;
            }
        }
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
        blocks.clear_slot(w.slot);
        w.blocks = 0;
        w.last = (0, Loc::NONE);
        // Snapshots list blocks in any order (sorted by hash, say): storing each after its
        // parent keeps chains in segments.
        for i in chain_order(snapshot) {
            let b = &snapshot.blocks[i];
            let hash = std::iter::once(b.block.sequence_hash);
            w.blocks += blocks.store(w.slot, b.parent_hash, &mut w.last, hash);
        }
        w.next_event = Some(snapshot.last_event_id.map_or(0, |id| id + 1));
        Ok(())
    }

    /// Forgets `worker` and every block it held.
    pub fn remove_worker(&mut self, worker: WorkerId) {
        if let Some(w) = self.workers.remove(&worker) {
            self.blocks.clear_slot(w.slot);
            self.by_slot[w.slot] = None;
        }
    }

    /// For each worker, how many leading blocks of `hashes` (a request's sequence hashes,
    /// in order) it holds.
    pub fn find_matches(&self, hashes: &[u64]) -> Overlaps {
        let mut scores = Vec::new();
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
                        scores.extend(self.by_slot[slot].map(|w| (w, d as u32)));
                    }
                    if next.is_empty() {
                        return Overlaps { scores };
                    }
                    active = next;
                }
                let span_end = seg.span_end(k) as usize;
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
            scores.extend(self.by_slot[slot].map(|w| (w, depth as u32)));
        }
        Overlaps { scores }
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
            + b.segs.capacity() * std::mem::size_of::<Segment>()
            + arrays
            + b.free.capacity() * std::mem::size_of::<u32>()
    }

    /// (worker, block) pairs held: what the workers' events have stored and not removed.
    pub fn stored_pairs(&self) -> usize {
        self.workers.values().map(|w| w.blocks).sum()
    }

    /// Blocks `worker` holds, as far as its events tell.
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
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};
    use turbine_protocols::kv::{CachedBlock, StoredBlock};

    fn stored(id: u64, hashes: &[u64]) -> KvEvent {
        let blocks = hashes
            .iter()
            .map(|&h| StoredBlock {
                sequence_hash: h,
                local_hash: h,
            })
            .collect();
        KvEvent {
            event_id: id,
            data: KvEventData::Stored {
                parent_hash: None,
                blocks,
            },
        }
    }

    #[test]
    fn overlaps_count_leading_blocks_per_worker() {
        let mut ix = KvIndexer::new();
        assert_eq!(ix.apply(1, &stored(0, &[10, 11, 12])), Ok(Applied::Applied));
        assert_eq!(ix.apply(2, &stored(0, &[10, 11])), Ok(Applied::Applied));
        assert_eq!(
            ix.apply(3, &stored(0, &[11, 12])),
            Ok(Applied::Applied),
            "no block 10: overlap 0"
        );
        let mut m = ix.find_matches(&[10, 11, 12, 13]).scores;
        m.sort();
        assert_eq!(m, [(1, 3), (2, 2)]);
        assert_eq!(ix.find_matches(&[99]).scores, []);
        assert_eq!(ix.num_blocks(), 3);
    }

    #[test]
    fn gaps_wait_for_a_resync() {
        let mut ix = KvIndexer::new();
        assert_eq!(
            ix.apply(1, &stored(3, &[1])),
            Ok(Applied::NeedsResync { after: None }),
            "new worker"
        );
        let snapshot = KvSnapshot {
            last_event_id: Some(4),
            blocks: vec![CachedBlock {
                parent_hash: None,
                block: StoredBlock {
                    sequence_hash: 7,
                    local_hash: 7,
                },
            }],
        };
        ix.apply_snapshot(1, &snapshot).unwrap();
        assert_eq!(ix.apply(1, &stored(4, &[8])), Ok(Applied::Duplicate));
        assert_eq!(ix.apply(1, &stored(5, &[8])), Ok(Applied::Applied));
        assert_eq!(
            ix.apply(1, &stored(7, &[9])),
            Ok(Applied::NeedsResync { after: Some(5) })
        );
        assert_eq!(
            ix.apply(1, &stored(6, &[9])),
            Ok(Applied::Applied),
            "the missing event fills the gap"
        );
        assert_eq!(ix.apply(1, &stored(7, &[9])), Ok(Applied::Applied));
        assert_eq!(ix.worker_blocks(1), 3);
        ix.remove_worker(1);
        assert_eq!(ix.num_blocks(), 0);
    }

    #[test]
    fn a_block_leaving_the_middle_of_a_segment_splits_its_span() {
        let mut ix = KvIndexer::new();
        let chain: Vec<u64> = (100..110).collect();
        ix.apply(1, &stored(0, &chain)).unwrap();
        ix.apply(2, &stored(0, &chain)).unwrap();
        assert_eq!(shape(&ix), [1], "one chain, one set: one segment of one span");
        ix.apply(
            2,
            &KvEvent {
                event_id: 1,
                data: KvEventData::Removed {
                    sequence_hashes: vec![104],
                },
            },
        )
        .unwrap();
        let mut m = ix.find_matches(&chain).scores;
        m.sort();
        assert_eq!(m, [(1, 10), (2, 4)]);
        assert_eq!(shape(&ix), [3]);
        ix.apply(2, &stored(2, &[104])).unwrap();
        let mut m = ix.find_matches(&chain).scores;
        m.sort();
        assert_eq!(m, [(1, 10), (2, 10)]);
        assert_eq!(shape(&ix), [1], "the block found where it was, the spans merge back");
    }

    #[test]
    fn a_dead_block_is_matched_where_it_is_held_again() {
        let mut ix = KvIndexer::new();
        let remove = |id, hashes: &[u64]| KvEvent {
            event_id: id,
            data: KvEventData::Removed {
                sequence_hashes: hashes.to_vec(),
            },
        };
        ix.apply(1, &stored(0, &[1, 2, 3, 4, 5, 6])).unwrap();
        ix.apply(1, &remove(1, &[3])).unwrap();
        assert_eq!(shape(&ix), [3], "one dead block in six: kept in place");
        // Stored again without its parent: a segment of its own, while the dead copy stays.
        ix.apply(2, &stored(0, &[3])).unwrap();
        assert_eq!(ix.find_matches(&[1, 2, 3, 4]).scores, [(1, 2)]);
        let mut m = ix.find_matches(&[3, 4]).scores;
        m.sort();
        assert_eq!(m, [(2, 1)]);
        ix.apply(1, &remove(2, &[1, 2, 4])).unwrap();
        assert_eq!(shape(&ix), [1, 1], "dead blocks outnumbering the live ones are dropped");
        assert_eq!(ix.find_matches(&[5, 6]).scores, [(1, 2)]);
        assert_eq!(ix.num_blocks(), 3);
    }

    #[test]
    fn a_snapshot_in_hash_order_rebuilds_chains_as_segments() {
        let mut ix = KvIndexer::new();
        // Two chains sharing 5 blocks, with hashes in no particular order along them.
        let a = [9u64, 3, 7, 1, 8, 20, 2, 40];
        let b = [9u64, 3, 7, 1, 8, 5, 60, 4];
        let mut blocks: Vec<CachedBlock> = [a, b]
            .iter()
            .flat_map(|chain| {
                chain.iter().enumerate().map(|(i, &h)| CachedBlock {
                    parent_hash: i.checked_sub(1).map(|p| chain[p]),
                    block: StoredBlock {
                        sequence_hash: h,
                        local_hash: h,
                    },
                })
            })
            .collect();
        blocks.sort_by_key(|b| b.block.sequence_hash);
        let snapshot = KvSnapshot {
            last_event_id: None,
            blocks,
        };
        ix.apply_snapshot(1, &snapshot).unwrap();
        assert_eq!(ix.worker_blocks(1), 11);
        assert_eq!(shape(&ix), [1, 1], "a chain and its fork");
        assert_eq!(ix.find_matches(&a).get(1), 8);
        assert_eq!(ix.find_matches(&b).get(1), 8);
    }

    /// The span count of each segment in use, in order.
    fn shape(ix: &KvIndexer) -> Vec<usize> {
        ix.blocks
            .segs
            .iter()
            .filter(|s| !s.hashes.is_empty())
            .map(|s| s.spans.len())
            .collect()
    }

    impl KvIndexer {
        /// Checks the tree's own invariants, and that it holds exactly `model`'s blocks.
        fn check(&self, model: &BTreeMap<u64, BTreeSet<u64>>) {
            let b = &self.blocks;
            let (mut live, mut pairs) = (0, 0);
            for (id, seg) in b.segs.iter().enumerate() {
                if seg.hashes.is_empty() {
                    assert!(b.free.contains(&(id as u32)), "an empty segment is free");
                    assert!(seg.spans.is_empty());
                    continue;
                }
                assert_eq!(seg.spans[0].start, 0, "the spans cover the segment");
                for w in seg.spans.windows(2) {
                    assert!(w[0].start < w[1].start, "spans are sorted and not empty");
                    assert_ne!(w[0].set, w[1].set, "neighbouring spans differ");
                }
                assert!(seg.spans.last().is_some_and(|s| s.start < seg.len()));
                let mut seg_live = 0;
                for (k, span) in seg.spans.iter().enumerate() {
                    let n = (seg.span_end(k) - span.start) as usize;
                    if span.set.is_empty() {
                        continue;
                    }
                    seg_live += n;
                    pairs += n * span.set.slots().count();
                    for off in span.start..seg.span_end(k) {
                        let at = Loc::new(id as u32, off);
                        let h = seg.hashes[off as usize];
                        assert_eq!(b.map.get(h), Some(at), "the map points at each live block");
                    }
                }
                assert_eq!(seg.live as usize, seg_live);
                assert!(seg_live > 0, "a segment in use holds a live block");
                assert!(seg.hashes.len() - seg_live <= seg_live, "dead blocks are the minority");
                live += seg_live;
            }
            assert_eq!(live, b.map.len(), "every mapped block is live in a segment");
            assert_eq!(pairs, model.values().map(BTreeSet::len).sum::<usize>());
            for (w, held) in model {
                let slot = self.workers[w].slot;
                for h in held {
                    let loc = b.map.get(*h).expect("a held block is mapped");
                    let set = b.segs[loc.seg() as usize].set_at(loc.off());
                    assert!(set.contains(slot), "worker {w} holds {h}");
                }
                assert_eq!(self.worker_blocks(*w), held.len());
            }
        }
    }

    /// Block `pos` of chain `family`.
    fn block(family: u64, pos: u64) -> u64 {
        family << 32 | pos
    }

    const CHAIN: u64 = 40;

    #[derive(Debug, Clone)]
    enum Op {
        /// Blocks `from..from + len` of a chain, in chain order, in one event.
        Store(u64, u64, u64, u64),
        /// The same blocks evicted, last first or first first.
        Remove(u64, u64, u64, u64, bool),
        Clear(u64),
        Leave(u64),
        /// A resync from the worker's blocks listed in hash order.
        Resync(u64),
        /// The first `k` blocks of one chain, then another's from there on.
        Query(u64, u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let w = 0u64..4;
        let f = 0u64..4;
        let span = (0..CHAIN).prop_flat_map(|from| (Just(from), 1..=CHAIN - from));
        prop_oneof![
            8 => (w.clone(), f.clone(), span.clone()).prop_map(|(w, f, (a, n))| Op::Store(w, f, a, n)),
            4 => (w.clone(), f.clone(), span, any::<bool>()).prop_map(|(w, f, (a, n), r)| Op::Remove(w, f, a, n, r)),
            1 => w.clone().prop_map(Op::Clear),
            1 => w.clone().prop_map(Op::Leave),
            1 => w.prop_map(Op::Resync),
            4 => (f.clone(), 0..=CHAIN, f).prop_map(|(f, k, g)| Op::Query(f, k, g)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Chains of shared prefixes, stored and evicted in stretches, so that segments grow
        /// long and their spans split in the middle: the tree stays consistent and exact.
        #[test]
        fn segments_stay_exact_under_chain_workloads(ops in proptest::collection::vec(op(), 1..120)) {
            let mut ix = KvIndexer::new();
            let mut model: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
            let mut ids: BTreeMap<u64, u64> = BTreeMap::new();
            fn send(ix: &mut KvIndexer, ids: &mut BTreeMap<u64, u64>, w: u64, data: KvEventData) {
                let id = ids.entry(w).or_insert(0);
                let event = KvEvent { event_id: *id, data };
                *id += 1;
                assert_eq!(ix.apply(w, &event), Ok(Applied::Applied));
            }
            for op in ops {
                match op {
                    Op::Store(w, f, from, n) => {
                        let hashes: Vec<u64> = (from..from + n).map(|p| block(f, p)).collect();
                        let blocks = hashes.iter().map(|&h| StoredBlock { sequence_hash: h, local_hash: h }).collect();
                        let parent_hash = from.checked_sub(1).map(|p| block(f, p));
                        send(&mut ix, &mut ids, w, KvEventData::Stored { parent_hash, blocks });
                        model.entry(w).or_default().extend(hashes);
                    }
                    Op::Remove(w, f, from, n, last_first) => {
                        let mut hashes: Vec<u64> = (from..from + n).map(|p| block(f, p)).collect();
                        if last_first {
                            hashes.reverse();
                        }
                        let held = model.entry(w).or_default();
                        for h in &hashes {
                            held.remove(h);
                        }
                        send(&mut ix, &mut ids, w, KvEventData::Removed { sequence_hashes: hashes });
                    }
                    Op::Clear(w) => {
                        send(&mut ix, &mut ids, w, KvEventData::Cleared);
                        model.insert(w, BTreeSet::new());
                    }
                    Op::Leave(w) => {
                        ix.remove_worker(w);
                        model.remove(&w);
                        ids.remove(&w);
                    }
                    Op::Resync(w) => {
                        let held = model.entry(w).or_default();
                        let blocks = held.iter().map(|&h| CachedBlock {
                            parent_hash: (h & 0xffff_ffff > 0).then(|| h - 1),
                            block: StoredBlock { sequence_hash: h, local_hash: h },
                        }).collect();
                        let last = ids.get(&w).and_then(|id| id.checked_sub(1));
                        ix.apply_snapshot(w, &KvSnapshot { last_event_id: last, blocks }).unwrap();
                    }
                    Op::Query(f, k, g) => {
                        let query: Vec<u64> = (0..CHAIN).map(|p| block(if p < k { f } else { g }, p)).collect();
                        let mut got = ix.find_matches(&query).scores;
                        got.sort();
                        let want: Vec<(u64, u32)> = model
                            .iter()
                            .map(|(&w, held)| (w, query.iter().take_while(|h| held.contains(h)).count() as u32))
                            .filter(|&(_, n)| n > 0)
                            .collect();
                        prop_assert_eq!(got, want, "query {:?}", query);
                    }
                }
                ix.check(&model);
            }
        }
    }
}
