//! The KV indexer: which workers hold which cached blocks, fed by the workers' KV events,
//! asked how many leading blocks of a request each worker already holds.
//!
//! A compressed radix tree over block hashes. Sequence hashes chain (a block's hash covers
//! every block before it), so each edge is a *run*: hashes that follow one another in a
//! chain and are held by exactly the same set of workers, stored contiguously with that set
//! once. A map from block hash to its place in a run lets a request enter the tree at any
//! block. Matching looks up the request's first hash, then compares the request against the
//! run's array for as long as they agree, and looks up again only where the run ends or the
//! request leaves it: a long shared prefix costs a few lookups and a linear scan instead of
//! one cache miss per block. A worker's overlap is where the intersection of the sets met
//! along the way dropped it.
//!
//! Runs are only an acceleration: every hash in a run has the run's set, whatever order the
//! hashes came in, so matching stays exact when a worker holds a block without its parent
//! (evicted first), where a tree keyed on parents would have to guess. A change to a block's
//! set takes it out of its run, splitting the run and moving the smaller side; stores that
//! follow a chain append to the run of the block before.
//!
//! Each worker's events carry consecutive ids. An event after a gap is not applied: the
//! indexer keeps waiting for the missing id, and the caller fetches the missed events (or a
//! snapshot, [`KvIndexer::apply_snapshot`]) from the worker.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use turbine_protocols::kv::{KvEvent, KvEventData, KvSnapshot};

use crate::WorkerId;

/// Most workers one indexer tracks: the width of [`WorkerSet`].
pub const MAX_WORKERS: usize = 128;

/// A set of workers, by their slot in the indexer. Two words rather than a `u128`, whose
/// 16-byte alignment would pad every run.
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

/// Block hashes are already uniformly distributed: hashing them again is wasted time.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Where a block hash sits: its run, and its offset there. Offsets are logical (see
/// [`Run::base`]) so that dropping a run's dead front moves no map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    run: u32,
    off: u32,
}

type BlockMap = HashMap<u64, Loc, BuildHasherDefault<PassThrough>>;

/// An edge of the tree: hashes held by exactly `set`, in chain order where the events gave
/// one. A free run (in [`Blocks::free`]) has no hashes.
#[derive(Debug, Default)]
struct Run {
    /// The live hashes are `hashes[start..]`. Blocks leave from the front as workers extend
    /// their coverage along a chain; the dead front is dropped once it is as long as the rest.
    hashes: Vec<u64>,
    start: u32,
    /// The logical offset of `hashes[0]`.
    base: u32,
    set: WorkerSet,
}

impl Run {
    fn live(&self) -> &[u64] {
        &self.hashes[self.start as usize..]
    }
    fn index(&self, off: u32) -> usize {
        (off - self.base) as usize
    }
    fn first_off(&self) -> u32 {
        self.base + self.start
    }
    fn end_off(&self) -> u32 {
        self.base + self.hashes.len() as u32
    }
    /// Keeps spare capacity within a constant factor of what is live.
    fn trim(&mut self) {
        if self.hashes.capacity() > 4 * self.hashes.len().max(4) {
            self.hashes.shrink_to_fit();
        }
    }
}

/// Blocks of a stored event looked up ahead of storing them.
const LOOKAHEAD: usize = 16;

/// Logical offsets stay below this; past it a run is renumbered from 0.
const MAX_BASE: u32 = u32::MAX / 2;

/// The tree: runs, and the map from each held block hash to its place in one.
#[derive(Debug, Default)]
struct Blocks {
    map: BlockMap,
    runs: Vec<Run>,
    free: Vec<u32>,
}

impl Blocks {
    fn new_run(&mut self, set: WorkerSet, hashes: Vec<u64>) -> u32 {
        new_run(&mut self.runs, &mut self.free, set, hashes)
    }

    fn free_run(&mut self, id: u32) {
        self.runs[id as usize] = Run::default();
        self.free.push(id);
    }

    /// Points the map at every live hash of run `id`, after they moved there.
    fn repoint(&mut self, id: u32) {
        let run = &self.runs[id as usize];
        let first = run.first_off();
        for (i, h) in run.live().iter().enumerate() {
            if let Some(loc) = self.map.get_mut(h) {
                *loc = Loc {
                    run: id,
                    off: first + i as u32,
                };
            }
        }
    }

    /// A new run of `set` holding `hashes`, with the map pointed at it.
    fn split_to(&mut self, set: WorkerSet, hashes: Vec<u64>) -> u32 {
        let id = self.new_run(set, hashes);
        self.repoint(id);
        id
    }

    /// Bounds run `id`'s waste by what it holds: drops its dead front once that is as long
    /// as the live rest, and spare capacity beyond a constant factor.
    fn compact(&mut self, id: u32) {
        let run = &mut self.runs[id as usize];
        let start = run.start as usize;
        if start > 0 && start >= run.hashes.len() - start {
            run.hashes.drain(..start);
            run.start = 0;
            if run.base > MAX_BASE - start as u32 {
                run.base = 0;
                run.trim();
                self.repoint(id);
                return;
            }
            run.base += start as u32;
        }
        run.trim();
    }

    /// Takes the block at `loc` out of its run, which keeps the larger side in place.
    fn detach(&mut self, loc: Loc) {
        let id = loc.run;
        let run = &mut self.runs[id as usize];
        let i = run.index(loc.off);
        let (start, end) = (run.start as usize, run.hashes.len());
        if i + 1 == end {
            run.hashes.pop();
            if run.hashes.len() == start {
                self.free_run(id);
            } else {
                self.compact(id);
            }
        } else if i == start {
            run.start += 1;
            self.compact(id);
        } else if i - start < end - i {
            let left = run.hashes[start..i].to_vec();
            run.start = i as u32 + 1;
            let set = run.set;
            self.compact(id);
            self.split_to(set, left);
        } else {
            let right = run.hashes.split_off(i + 1);
            run.hashes.pop();
            let set = run.set;
            self.compact(id);
            self.split_to(set, right);
        }
    }

    /// Makes the `len` blocks from `loc` a run of their own, returning it. Of the run's (up
    /// to three) pieces, the largest stays in place.
    fn isolate(&mut self, loc: Loc, len: usize) -> u32 {
        let id = loc.run;
        let run = &mut self.runs[id as usize];
        let a = run.index(loc.off);
        let b = a + len;
        let (start, end) = (run.start as usize, run.hashes.len());
        let (left, right) = (a - start, end - b);
        let set = run.set;
        if len >= left && len >= right {
            let right = (right > 0).then(|| run.hashes.split_off(b));
            let left = (left > 0).then(|| run.hashes[start..a].to_vec());
            run.start = a as u32;
            self.compact(id);
            for piece in [left, right].into_iter().flatten() {
                self.split_to(set, piece);
            }
            return id;
        }
        let middle = run.hashes[a..b].to_vec();
        if left >= right {
            let right = (right > 0).then(|| run.hashes.split_off(b));
            run.hashes.truncate(a);
            self.compact(id);
            if let Some(right) = right {
                self.split_to(set, right);
            }
        } else {
            let left = (left > 0).then(|| run.hashes[start..a].to_vec());
            run.start = b as u32;
            self.compact(id);
            if let Some(left) = left {
                self.split_to(set, left);
            }
        }
        self.split_to(set, middle)
    }

    fn place(&mut self, hash: u64, set: WorkerSet, prev: Option<Loc>) -> Loc {
        place(&mut self.runs, &mut self.free, hash, set, prev)
    }

    /// The block at `loc`, if `loc` is a live place.
    #[inline]
    fn hash_at(&self, loc: Loc) -> Option<u64> {
        let run = self.runs.get(loc.run as usize)?;
        (run.first_off() <= loc.off && loc.off < run.end_off()).then(|| run.hashes[run.index(loc.off)])
    }

    /// Adds `slot` to `hash`, the block after `prev` in its chain. Returns where the block
    /// is now, and whether `slot` is new to it.
    ///
    /// `hint` is where an earlier lookup found the block, checked before use: it may have
    /// moved since.
    // Inlined: returned through memory, the place is written in halves and read back whole,
    // and that read waits for every store in flight (the map's, which miss the cache).
    #[inline(always)]
    fn store(&mut self, slot: usize, hash: u64, prev: Option<Loc>, hint: Option<Loc>) -> (Loc, bool) {
        let found = match hint {
            Some(loc) if self.hash_at(loc) == Some(hash) => Some(loc),
            Some(_) => self.map.get(&hash).copied(),
            None => {
                let Self { map, runs, free } = self;
                match map.entry(hash) {
                    Entry::Occupied(e) => Some(*e.get()),
                    Entry::Vacant(e) => {
                        let at = place(runs, free, hash, WorkerSet::default().with(slot), prev);
                        e.insert(at);
                        return (at, true);
                    }
                }
            }
        };
        match found {
            Some(loc) => {
                let set = self.runs[loc.run as usize].set;
                if set.contains(slot) {
                    return (loc, false);
                }
                self.detach(loc);
                let at = self.place(hash, set.with(slot), prev);
                if let Some(l) = self.map.get_mut(&hash) {
                    *l = at;
                }
                (at, true)
            }
            None => {
                let at = self.place(hash, WorkerSet::default().with(slot), prev);
                self.map.insert(hash, at);
                (at, true)
            }
        }
    }

    /// Takes `slot` out of the blocks `hashes`, returning how many it held. Blocks that
    /// sit next to each other in a run leave it together, as one run.
    fn remove(&mut self, slot: usize, hashes: &[u64]) -> usize {
        let mut held: Vec<(Loc, u64)> = hashes
            .iter()
            .filter_map(|h| {
                let loc = *self.map.get(h)?;
                self.runs[loc.run as usize].set.contains(slot).then_some((loc, *h))
            })
            .collect();
        held.sort_unstable_by_key(|(loc, _)| (loc.run, loc.off));
        held.dedup_by_key(|(loc, _)| *loc);
        let mut i = 0;
        while i < held.len() {
            let (first, hash) = held[i];
            let mut len = 1;
            while i + len < held.len()
                && held[i + len].0.run == first.run
                && held[i + len].0.off == first.off + len as u32
            {
                len += 1;
            }
            i += len;
            // Earlier groups may have moved this one, whole, to another run.
            let Some(&loc) = self.map.get(&hash) else {
                continue;
            };
            let id = self.isolate(loc, len);
            let run = &mut self.runs[id as usize];
            run.set = run.set.without(slot);
            if run.set.is_empty() {
                for h in &run.hashes[run.start as usize..] {
                    self.map.remove(h);
                }
                self.free_run(id);
            }
        }
        held.len()
    }

    /// Takes `slot` out of every run: for the rare events that need it (a worker cleared,
    /// resynchronised or gone).
    fn clear_slot(&mut self, slot: usize) {
        for id in 0..self.runs.len() {
            let run = &mut self.runs[id];
            if !run.set.contains(slot) {
                continue;
            }
            run.set = run.set.without(slot);
            if run.set.is_empty() {
                for h in &run.hashes[run.start as usize..] {
                    self.map.remove(h);
                }
                self.free_run(id as u32);
            }
        }
    }
}

fn new_run(runs: &mut Vec<Run>, free: &mut Vec<u32>, set: WorkerSet, hashes: Vec<u64>) -> u32 {
    let run = Run {
        hashes,
        start: 0,
        base: 0,
        set,
    };
    match free.pop() {
        Some(id) => {
            runs[id as usize] = run;
            id
        }
        None => {
            runs.push(run);
            (runs.len() - 1) as u32
        }
    }
}

/// Puts `hash`, held by `set` and in no run, after `prev` (the block before it in its
/// chain) when that ends a run of the same set, else in a run of its own. The caller points
/// the map at the place returned.
#[inline(always)]
fn place(runs: &mut Vec<Run>, free: &mut Vec<u32>, hash: u64, set: WorkerSet, prev: Option<Loc>) -> Loc {
    if let Some(p) = prev {
        let run = &mut runs[p.run as usize];
        if run.set == set && p.off + 1 == run.end_off() && run.end_off() < MAX_BASE {
            run.hashes.push(hash);
            return Loc {
                run: p.run,
                off: p.off + 1,
            };
        }
    }
    Loc {
        run: new_run(runs, free, set, vec![hash]),
        off: 0,
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
    workers: HashMap<WorkerId, Worker>,
    by_slot: Vec<Option<WorkerId>>,
}

impl KvIndexer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one event of `worker`, unless it is out of order (see [`Applied`]).
    pub fn apply(&mut self, worker: WorkerId, event: &KvEvent) -> Result<Applied, IndexerError> {
        let w = self.worker(worker)?;
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
        let mut count = w.blocks;
        match &event.data {
            KvEventData::Stored { parent_hash, blocks } => {
                let mut prev = parent_hash.and_then(|p| self.blocks.map.get(&p).copied());
                // Looking a batch up first, independently of one another, lets their cache
                // misses overlap; storing each block depends on where the one before went.
                for chunk in blocks.chunks(LOOKAHEAD) {
                    let mut hints = [None; LOOKAHEAD];
                    for (hint, b) in hints.iter_mut().zip(chunk) {
                        let h = b.sequence_hash;
                        *hint = self.blocks.map.get(&h).copied();
                    }
                    for (b, hint) in chunk.iter().zip(hints) {
                        let (at, added) = self.blocks.store(slot, b.sequence_hash, prev, hint);
                        prev = Some(at);
                        count += usize::from(added);
                    }
                }
            }
            KvEventData::Removed { sequence_hashes } => {
                count -= self.blocks.remove(slot, sequence_hashes);
            }
            KvEventData::Cleared => {
                self.blocks.clear_slot(slot);
                count = 0;
            }
        }
        if let Some(w) = self.workers.get_mut(&worker) {
            w.blocks = count;
        }
        Ok(Applied::Applied)
    }

    /// Replaces everything known of `worker` by `snapshot`; its next event is the one after.
    pub fn apply_snapshot(&mut self, worker: WorkerId, snapshot: &KvSnapshot) -> Result<(), IndexerError> {
        let slot = self.worker(worker)?.slot;
        self.blocks.clear_slot(slot);
        let mut count = 0;
        // Snapshots list blocks in any order (sorted by hash, say): storing each after its
        // parent keeps chains in runs.
        for i in chain_order(snapshot) {
            let b = &snapshot.blocks[i];
            let prev = b.parent_hash.and_then(|p| self.blocks.map.get(&p).copied());
            count += usize::from(self.blocks.store(slot, b.block.sequence_hash, prev, None).1);
        }
        if let Some(w) = self.workers.get_mut(&worker) {
            w.blocks = count;
            w.next_event = Some(snapshot.last_event_id.map_or(0, |id| id + 1));
        }
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
        let mut depth = 0;
        let lookup = |depth: usize| hashes.get(depth).and_then(|h| self.blocks.map.get(h)).copied();
        let mut at = lookup(0);
        while let Some(loc) = at {
            let run = &self.blocks.runs[loc.run as usize];
            let next = if depth == 0 { run.set } else { active.and(run.set) };
            if next != active {
                for slot in active.and_not(next).slots() {
                    scores.extend(self.by_slot[slot].map(|w| (w, depth as u32)));
                }
                if next.is_empty() {
                    return Overlaps { scores };
                }
                active = next;
            }
            // Every hash of the run has its set: follow the run while the request does.
            let rest = &run.hashes[run.index(loc.off) + 1..];
            let end = depth + 1 + rest.len();
            // Where a request that follows the run to its end goes on: looked up before the
            // scan so that the lookup's cache misses overlap it.
            let after = lookup(end);
            depth += 1 + common_prefix(rest, &hashes[depth + 1..]);
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

    /// Bytes the tree occupies: the map's table (capacity times an entry and its control
    /// byte), the runs and their arrays. The per-worker bookkeeping is negligible beside it.
    pub fn memory_bytes(&self) -> usize {
        let b = &self.blocks;
        let arrays: usize = b.runs.iter().map(|r| r.hashes.capacity()).sum();
        b.map.capacity() * (std::mem::size_of::<(u64, Loc)>() + 1)
            + b.runs.capacity() * std::mem::size_of::<Run>()
            + arrays * std::mem::size_of::<u64>()
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

    fn worker(&mut self, worker: WorkerId) -> Result<&mut Worker, IndexerError> {
        match self.workers.entry(worker) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(e) => {
                let slot = match self.by_slot.iter().position(Option::is_none) {
                    Some(slot) => slot,
                    None if self.by_slot.len() < MAX_WORKERS => {
                        self.by_slot.push(None);
                        self.by_slot.len() - 1
                    }
                    None => return Err(IndexerError::TooManyWorkers),
                };
                self.by_slot[slot] = Some(worker);
                Ok(e.insert(Worker {
                    slot,
                    next_event: None,
                    blocks: 0,
                }))
            }
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
    let index: HashMap<u64, usize, BuildHasherDefault<PassThrough>> = blocks
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
    fn a_block_leaving_the_middle_of_a_run_splits_it() {
        let mut ix = KvIndexer::new();
        let chain: Vec<u64> = (100..110).collect();
        ix.apply(1, &stored(0, &chain)).unwrap();
        ix.apply(2, &stored(0, &chain)).unwrap();
        assert_eq!(runs(&ix), 1, "one chain, one set: one run");
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
        assert_eq!(runs(&ix), 3);
        ix.apply(2, &stored(2, &[104])).unwrap();
        let mut m = ix.find_matches(&chain).scores;
        m.sort();
        assert_eq!(m, [(1, 10), (2, 10)]);
    }

    #[test]
    fn a_snapshot_in_hash_order_rebuilds_chains_as_runs() {
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
        assert_eq!(runs(&ix), 2, "a chain and its fork");
        assert_eq!(ix.find_matches(&a).get(1), 8);
        assert_eq!(ix.find_matches(&b).get(1), 8);
    }

    fn runs(ix: &KvIndexer) -> usize {
        ix.blocks.runs.len() - ix.blocks.free.len()
    }

    impl KvIndexer {
        /// Checks the tree's own invariants, and that it holds exactly `model`'s blocks.
        fn check(&self, model: &BTreeMap<u64, BTreeSet<u64>>) {
            let b = &self.blocks;
            let (mut live, mut pairs) = (0, 0);
            for (id, run) in b.runs.iter().enumerate() {
                if run.hashes.is_empty() {
                    assert!(b.free.contains(&(id as u32)), "an empty run is free");
                    continue;
                }
                let start = run.start as usize;
                assert!(
                    start < run.hashes.len() - start,
                    "the dead front is below the live rest"
                );
                assert!(!run.set.is_empty(), "a run is held");
                for (i, h) in run.live().iter().enumerate() {
                    let at = Loc {
                        run: id as u32,
                        off: run.first_off() + i as u32,
                    };
                    assert_eq!(b.map.get(h), Some(&at), "the map points at each block's place");
                }
                live += run.live().len();
                pairs += run.live().len() * run.set.slots().count();
            }
            assert_eq!(live, b.map.len(), "every mapped block is in a run");
            assert_eq!(pairs, model.values().map(BTreeSet::len).sum::<usize>());
            for (w, held) in model {
                let slot = self.workers[w].slot;
                for h in held {
                    let loc = b.map[h];
                    assert!(b.runs[loc.run as usize].set.contains(slot), "worker {w} holds {h}");
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

        /// Chains of shared prefixes, stored and evicted in spans, so that runs grow long
        /// and split in their middles: the tree stays consistent and exact.
        #[test]
        fn runs_stay_exact_under_chain_workloads(ops in proptest::collection::vec(op(), 1..120)) {
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
