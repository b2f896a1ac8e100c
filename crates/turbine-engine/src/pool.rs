//! The paged KV block pool shared by the engines that cache KV: a fixed set of blocks,
//! reference-counted, with full blocks registered under their sequence hash for prefix
//! reuse, and free blocks kept reusable in LRU order until they are needed.
//!
//! The pool records a [`KvEvent`] for every block it registers (`Stored`) and every
//! registered block it evicts (`Removed`), numbered without gaps, so that replaying its
//! events reproduces exactly the set of registered blocks.
//!
//! Invariants (checked by the property tests):
//! - a block with a reference is never on the free list, and so is never evicted;
//! - a sequence hash names at most one block; a registered block is in `cached` under it;
//! - every block is either referenced or on the free list, never both.

use std::collections::hash_map::Entry;

use turbine_protocols::kv::{CachedBlock, KvEvent, KvEventData, KvSnapshot, StorageTier, StoredBlock};
use turbine_tokens::{BlockHash, HashMapOfHashes, SequenceHash};

/// Index of a block in the pool.
pub type BlockId = u32;

const NIL: BlockId = BlockId::MAX;

#[derive(Debug, Clone)]
struct Block {
    refs: u32,
    /// Set once the block is full and registered.
    hash: Option<CachedBlock>,
    /// Links of the free list; meaningful only while `refs == 0`.
    prev: BlockId,
    next: BlockId,
}

#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    blocks: Vec<Block>,
    /// Free blocks, least recently freed first: allocation takes from the head.
    head: BlockId,
    tail: BlockId,
    free: usize,
    cached: HashMapOfHashes<BlockId>,
    next_event_id: u64,
    events: Vec<KvEvent>,
    /// Set when a block manager below the pool copies blocks out: registrations and
    /// evictions are then recorded with their block ids (`take_registered`, `take_evicted`).
    tracking: bool,
    registered: Vec<(BlockId, CachedBlock)>,
    evicted: Vec<(BlockId, CachedBlock)>,
}

impl BlockPool {
    /// # Panics
    /// If `num_blocks` or `block_size` is zero, or `num_blocks` does not fit a [`BlockId`]:
    /// configuration is validated before engines are built.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(num_blocks > 0 && block_size > 0, "pool needs blocks of positive size");
        assert!(num_blocks < NIL as usize, "too many blocks");
        let mut pool = Self {
            block_size,
            blocks: vec![
                Block {
                    refs: 0,
                    hash: None,
                    prev: NIL,
                    next: NIL
                };
                num_blocks
            ],
            head: NIL,
            tail: NIL,
            free: 0,
            cached: HashMapOfHashes::default(),
            next_event_id: 0,
            events: Vec::new(),
            tracking: false,
            registered: Vec::new(),
            evicted: Vec::new(),
        };
        for id in 0..num_blocks as BlockId {
            pool.push_free(id);
        }
        pool
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks not referenced by any sequence (cached or empty).
    pub fn num_free(&self) -> usize {
        self.free
    }

    pub fn num_in_use(&self) -> usize {
        self.blocks.len() - self.free
    }

    /// Registered blocks, in use or not.
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    /// How many leading blocks of `hashes` are cached.
    pub fn match_prefix(&self, hashes: &[BlockHash]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.cached.contains_key(&h.sequence))
            .count()
    }

    /// How many of the first `n` blocks of `hashes` (which must be cached) are free now, and
    /// so would leave the free list if acquired.
    pub fn free_among_prefix(&self, hashes: &[BlockHash], n: usize) -> usize {
        hashes[..n]
            .iter()
            .filter(|h| {
                self.cached
                    .get(&h.sequence)
                    .is_some_and(|&id| self.blocks[id as usize].refs == 0)
            })
            .count()
    }

    /// Takes a reference on each of the leading cached blocks of `hashes`, returning them.
    pub fn acquire_prefix(&mut self, hashes: &[BlockHash]) -> Vec<BlockId> {
        let mut ids = Vec::new();
        for h in hashes {
            let Some(&id) = self.cached.get(&h.sequence) else {
                break;
            };
            self.take_ref(id);
            ids.push(id);
        }
        ids
    }

    /// `n` empty blocks with one reference each, evicting the least recently freed cached
    /// blocks as needed; `None`, and no change, if fewer than `n` blocks are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.free {
            return None;
        }
        let mut ids = Vec::with_capacity(n);
        let mut evicted = Vec::new();
        for _ in 0..n {
            let id = self.head;
            self.unlink_free(id);
            let block = &mut self.blocks[id as usize];
            block.refs = 1;
            if let Some(cached) = block.hash.take() {
                self.cached.remove(&cached.block.sequence_hash);
                evicted.push(cached.block.sequence_hash);
                if self.tracking {
                    self.evicted.push((id, cached));
                }
            }
            ids.push(id);
        }
        if !evicted.is_empty() {
            self.emit(KvEventData::Removed {
                sequence_hashes: evicted,
                tier: StorageTier::Device,
            });
        }
        Some(ids)
    }

    /// Registers full blocks of one sequence under their hashes. `blocks[i]` holds the
    /// tokens hashed as `hashes[i]`, and `parent` is the sequence hash of the block before
    /// `hashes[0]`. A hash already registered for another block leaves this block
    /// unregistered: it is freed like any other, and the first stays the cached one.
    pub fn register(&mut self, blocks: &[BlockId], hashes: &[BlockHash], parent: Option<SequenceHash>) {
        let mut run_parent = parent;
        let mut run: Vec<StoredBlock> = Vec::with_capacity(blocks.len().min(hashes.len()));
        let mut prev = parent;
        for (&id, h) in blocks.iter().zip(hashes) {
            let block = &mut self.blocks[id as usize];
            // One probe of `cached` both finds a hash already registered and claims a new one.
            let claimed = block.hash.is_none()
                && match self.cached.entry(h.sequence) {
                    Entry::Vacant(entry) => {
                        entry.insert(id);
                        true
                    }
                    Entry::Occupied(_) => false,
                };
            if claimed {
                let stored = StoredBlock {
                    sequence_hash: h.sequence,
                    local_hash: h.local,
                };
                block.hash = Some(CachedBlock {
                    parent_hash: prev,
                    block: stored,
                    tier: StorageTier::Device,
                });
                run.push(stored);
                if self.tracking {
                    self.registered.extend(block.hash.map(|c| (id, c)));
                }
            } else {
                if !run.is_empty() {
                    self.emit(KvEventData::Stored {
                        parent_hash: run_parent,
                        blocks: std::mem::take(&mut run),
                        tier: StorageTier::Device,
                    });
                }
                run_parent = Some(h.sequence);
            }
            prev = Some(h.sequence);
        }
        if !run.is_empty() {
            self.emit(KvEventData::Stored {
                parent_hash: run_parent,
                blocks: run,
                tier: StorageTier::Device,
            });
        }
    }

    /// Drops one reference on each block, in the order given; a block left with none joins
    /// the free list's tail. Pass a sequence's blocks last first, so that its tail is
    /// evicted before the prefix that other requests are likelier to share.
    pub fn release(&mut self, blocks: impl IntoIterator<Item = BlockId>) {
        for id in blocks {
            let block = &mut self.blocks[id as usize];
            debug_assert!(block.refs > 0, "releasing a free block");
            block.refs = block.refs.saturating_sub(1);
            if block.refs == 0 {
                self.push_free(id);
            }
        }
    }

    /// Unregisters every cached block that no sequence uses. Emits `Cleared` when that
    /// empties the cache, `Removed` otherwise.
    pub fn clear_cache(&mut self) {
        let mut removed = Vec::new();
        for (id, block) in self.blocks.iter_mut().enumerate().filter(|(_, b)| b.refs == 0) {
            if let Some(cached) = block.hash.take() {
                self.cached.remove(&cached.block.sequence_hash);
                removed.push(cached.block.sequence_hash);
                if self.tracking {
                    self.evicted.push((id as BlockId, cached));
                }
            }
        }
        if self.cached.is_empty() {
            self.emit(KvEventData::Cleared);
        } else if !removed.is_empty() {
            self.emit(KvEventData::Removed {
                sequence_hashes: removed,
                tier: StorageTier::Device,
            });
        }
    }

    /// Records registrations and evictions with their block ids from now on, for a block
    /// manager that copies blocks out of the pool.
    pub fn track_changes(&mut self) {
        self.tracking = true;
    }

    /// Blocks registered since the last call (with [`BlockPool::track_changes`]).
    pub fn take_registered(&mut self) -> Vec<(BlockId, CachedBlock)> {
        std::mem::take(&mut self.registered)
    }

    /// Blocks evicted since the last call (with [`BlockPool::track_changes`]): their bytes
    /// are intact until the caller lets the blocks' new owners write them.
    pub fn take_evicted(&mut self) -> Vec<(BlockId, CachedBlock)> {
        std::mem::take(&mut self.evicted)
    }

    /// Whether block `id` still holds the block registered as `hash`.
    pub fn holds(&self, id: BlockId, hash: SequenceHash) -> bool {
        self.blocks
            .get(id as usize)
            .and_then(|b| b.hash)
            .is_some_and(|c| c.block.sequence_hash == hash)
    }

    /// Numbers an event about the worker's cache that the pool did not make (a tier below
    /// it changed) into the pool's stream, so that one sequence orders both.
    pub fn record(&mut self, data: KvEventData) {
        self.emit(data);
    }

    /// The events recorded since the last call.
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        // The next step's events usually number about as many: sized now, their vector is
        // not grown (and copied) event by event.
        let room = self.events.len();
        std::mem::replace(&mut self.events, Vec::with_capacity(room))
    }

    /// Every registered block with its parent, sorted by sequence hash so that two
    /// snapshots of the same state are equal.
    pub fn snapshot(&self) -> KvSnapshot {
        let mut blocks: Vec<CachedBlock> = self.blocks.iter().filter_map(|b| b.hash).collect();
        blocks.sort_by_key(|b| b.block.sequence_hash);
        KvSnapshot {
            last_event_id: self.next_event_id.checked_sub(1),
            blocks,
        }
    }

    fn emit(&mut self, data: KvEventData) {
        self.events.push(KvEvent {
            event_id: self.next_event_id,
            data,
        });
        self.next_event_id += 1;
    }

    fn take_ref(&mut self, id: BlockId) {
        if self.blocks[id as usize].refs == 0 {
            self.unlink_free(id);
        }
        self.blocks[id as usize].refs += 1;
    }

    fn push_free(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        b.prev = self.tail;
        b.next = NIL;
        if self.tail == NIL {
            self.head = id;
        } else {
            self.blocks[self.tail as usize].next = id;
        }
        self.tail = id;
        self.free += 1;
    }

    fn unlink_free(&mut self, id: BlockId) {
        let (prev, next) = (self.blocks[id as usize].prev, self.blocks[id as usize].next);
        if prev == NIL {
            self.head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        self.free -= 1;
    }

    /// Panics unless every invariant holds; for tests, here and in other crates.
    pub fn check_invariants(&self) {
        let mut on_list = vec![false; self.blocks.len()];
        let mut id = self.head;
        let mut n = 0;
        while id != NIL {
            assert!(!on_list[id as usize], "free list has a cycle");
            on_list[id as usize] = true;
            n += 1;
            id = self.blocks[id as usize].next;
        }
        assert_eq!(n, self.free);
        for (i, b) in self.blocks.iter().enumerate() {
            assert_eq!(
                on_list[i],
                b.refs == 0,
                "block {i}: refs {} but on free list {}",
                b.refs,
                on_list[i]
            );
            if let Some(h) = b.hash {
                assert_eq!(self.cached.get(&h.block.sequence_hash), Some(&(i as BlockId)));
            }
        }
        assert_eq!(
            self.cached.len(),
            self.blocks.iter().filter(|b| b.hash.is_some()).count()
        );
    }
}

/// The set of registered blocks as an observer of a pool's events knows it: what a router
/// reconstructs, in its simplest form. Checks the event stream as it goes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EventReplica {
    /// Blocks in the pool (the device tier).
    pub registered: std::collections::HashSet<SequenceHash>,
    /// Blocks in the tiers below the pool, with their tier.
    pub below: std::collections::HashSet<(SequenceHash, StorageTier)>,
    next_event_id: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplayError {
    #[error("expected event {expected}, got {got}")]
    Gap { expected: u64, got: u64 },
    #[error("block {0:#x} stored while already registered")]
    StoredTwice(SequenceHash),
    #[error("block {0:#x} removed but never stored")]
    RemovedUnknown(SequenceHash),
}

impl EventReplica {
    pub fn apply(&mut self, event: &KvEvent) -> Result<(), ReplayError> {
        if event.event_id != self.next_event_id {
            return Err(ReplayError::Gap {
                expected: self.next_event_id,
                got: event.event_id,
            });
        }
        self.next_event_id += 1;
        match &event.data {
            KvEventData::Stored { blocks, tier, .. } => {
                for b in blocks {
                    let new = match tier {
                        StorageTier::Device => self.registered.insert(b.sequence_hash),
                        t => self.below.insert((b.sequence_hash, *t)),
                    };
                    if !new {
                        return Err(ReplayError::StoredTwice(b.sequence_hash));
                    }
                }
            }
            KvEventData::Removed { sequence_hashes, tier } => {
                for h in sequence_hashes {
                    let known = match tier {
                        StorageTier::Device => self.registered.remove(h),
                        t => self.below.remove(&(*h, *t)),
                    };
                    if !known {
                        return Err(ReplayError::RemovedUnknown(*h));
                    }
                }
            }
            KvEventData::Cleared => self.registered.clear(),
        }
        Ok(())
    }

    /// The device blocks of `snapshot`, for comparison with `registered`.
    pub fn of(snapshot: &KvSnapshot) -> std::collections::HashSet<SequenceHash> {
        snapshot
            .blocks
            .iter()
            .filter(|b| b.tier == StorageTier::Device)
            .map(|b| b.block.sequence_hash)
            .collect()
    }

    /// The blocks of `snapshot` below the pool, for comparison with `below`.
    pub fn below_of(snapshot: &KvSnapshot) -> std::collections::HashSet<(SequenceHash, StorageTier)> {
        snapshot
            .blocks
            .iter()
            .filter(|b| b.tier != StorageTier::Device)
            .map(|b| (b.block.sequence_hash, b.tier))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use turbine_tokens::block_hashes;

    #[test]
    fn prefix_reuse_and_lru_eviction() {
        let mut pool = BlockPool::new(4, 2);
        let a = block_hashes(&[1, 2, 3, 4], 2);
        let ids = pool.allocate(2).unwrap();
        pool.register(&ids, &a, None);
        assert_eq!(pool.match_prefix(&a), 2);
        pool.release(ids.iter().rev().copied());
        assert_eq!((pool.num_free(), pool.num_cached()), (4, 2));

        // A new request with the same prefix reuses both blocks.
        let reused = pool.acquire_prefix(&a);
        assert_eq!(reused, ids);
        pool.release(reused.iter().rev().copied());

        // Filling the pool evicts the two empty blocks first, then the cached tail block.
        let fresh = pool.allocate(3).unwrap();
        assert_eq!(pool.match_prefix(&a), 1, "tail evicted, prefix kept");
        let events = pool.take_events();
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[1],
            KvEvent {
                event_id: 1,
                data: KvEventData::Removed {
                    sequence_hashes: vec![a[1].sequence],
                    tier: StorageTier::Device,
                }
            }
        );
        assert!(pool.allocate(2).is_none(), "only one free block left");
        pool.release(fresh);
        pool.check_invariants();
    }

    #[test]
    fn duplicate_hash_keeps_the_first_block() {
        let mut pool = BlockPool::new(4, 2);
        let h = block_hashes(&[9, 9], 2);
        let x = pool.allocate(1).unwrap();
        let y = pool.allocate(1).unwrap();
        pool.register(&x, &h, None);
        pool.register(&y, &h, None);
        assert_eq!(pool.take_events().len(), 1, "stored once");
        pool.release(y);
        pool.release(x);
        assert_eq!(pool.num_cached(), 1);
        pool.check_invariants();
    }
}
