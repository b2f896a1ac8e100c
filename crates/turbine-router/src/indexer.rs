//! The KV indexer: which workers hold which cached blocks, fed by the workers' KV events,
//! asked how many leading blocks of a request each worker already holds.
//!
//! Sequence hashes chain (a block's hash covers every block before it), so a request's
//! prefix is a path of hashes and the radix tree flattens into one map from block hash to
//! the set of workers holding that block. Matching walks the request's hashes in order,
//! intersecting worker sets until none is left; a worker's overlap is where it dropped out.
//! That stays exact when a worker holds a block without its parent (evicted first), where
//! a tree would have to guess.
//!
//! Each worker's events carry consecutive ids. An event after a gap is not applied: the
//! indexer keeps waiting for the missing id, and the caller fetches the missed events (or a
//! snapshot, [`KvIndexer::apply_snapshot`]) from the worker.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use turbine_protocols::kv::{KvEvent, KvEventData, KvSnapshot};

use crate::WorkerId;

/// Most workers one indexer tracks: the width of [`WorkerSet`].
pub const MAX_WORKERS: usize = 128;

/// A set of workers, by their slot in the indexer. Two words rather than a `u128`, whose
/// 16-byte alignment would pad every table slot by a third.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct WorkerSet([u64; 2]);

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

type BlockMap = HashMap<u64, WorkerSet, BuildHasherDefault<PassThrough>>;

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
    blocks: BlockMap,
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
            KvEventData::Stored { blocks, .. } => {
                for b in blocks {
                    let set = self.blocks.entry(b.sequence_hash).or_default();
                    if !set.contains(slot) {
                        *set = set.with(slot);
                        count += 1;
                    }
                }
            }
            KvEventData::Removed { sequence_hashes } => {
                for h in sequence_hashes {
                    if let Some(set) = self.blocks.get_mut(h) {
                        if set.contains(slot) {
                            *set = set.without(slot);
                            count -= 1;
                            if set.is_empty() {
                                self.blocks.remove(h);
                            }
                        }
                    }
                }
            }
            KvEventData::Cleared => {
                self.clear_slot(slot);
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
        self.clear_slot(slot);
        let mut count = 0;
        for b in &snapshot.blocks {
            let set = self.blocks.entry(b.block.sequence_hash).or_default();
            if !set.contains(slot) {
                *set = set.with(slot);
                count += 1;
            }
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
            self.clear_slot(w.slot);
            self.by_slot[w.slot] = None;
        }
    }

    /// For each worker, how many leading blocks of `hashes` (a request's sequence hashes,
    /// in order) it holds.
    pub fn find_matches(&self, hashes: &[u64]) -> Overlaps {
        let mut scores = Vec::new();
        let Some(&first) = hashes.first().and_then(|h| self.blocks.get(h)) else {
            return Overlaps { scores };
        };
        let mut active = first;
        for (depth, h) in hashes.iter().enumerate().skip(1) {
            let here = self.blocks.get(h).copied().unwrap_or_default();
            let next = active.and(here);
            if next != active {
                for slot in active.and_not(next).slots() {
                    scores.extend(self.by_slot[slot].map(|w| (w, depth as u32)));
                }
                if next.is_empty() {
                    return Overlaps { scores };
                }
                active = next;
            }
        }
        for slot in active.slots() {
            scores.extend(self.by_slot[slot].map(|w| (w, hashes.len() as u32)));
        }
        Overlaps { scores }
    }

    /// Distinct blocks held by any worker.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Bytes the block map occupies: its table's capacity times an entry and its control
    /// byte. The per-worker bookkeeping is negligible beside it.
    pub fn memory_bytes(&self) -> usize {
        self.blocks.capacity() * (std::mem::size_of::<(u64, WorkerSet)>() + 1)
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
        if !self.workers.contains_key(&worker) {
            let slot = match self.by_slot.iter().position(Option::is_none) {
                Some(slot) => slot,
                None if self.by_slot.len() < MAX_WORKERS => {
                    self.by_slot.push(None);
                    self.by_slot.len() - 1
                }
                None => return Err(IndexerError::TooManyWorkers),
            };
            self.by_slot[slot] = Some(worker);
            self.workers.insert(
                worker,
                Worker {
                    slot,
                    next_event: None,
                    blocks: 0,
                },
            );
        }
        Ok(self.workers.get_mut(&worker).expect("inserted above"))
    }

    /// Takes `slot` out of every block: a scan of the whole map, for the rare events that
    /// need it (a worker cleared, resynchronised or gone).
    fn clear_slot(&mut self, slot: usize) {
        self.blocks.retain(|_, set| {
            *set = set.without(slot);
            !set.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
