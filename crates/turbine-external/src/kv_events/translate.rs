//! The translation of an engine's KV event batches into Turbine's events: a pure state
//! machine, fed payloads and sequence numbers, that keeps what it needs to translate later
//! parents and removals.

use std::collections::HashMap;

use turbine_protocols::kv::{CachedBlock, KvEvent, KvEventData, KvSnapshot, StoredBlock};
use turbine_tokens::{chain_hash, local_hash, HashMapOfHashes};

use super::decode::{decode_batch, DecodeError, EngineEvent, Medium, Removed, Scope, Stored};

/// Translates one engine's published batches into Turbine events numbered from 0 without
/// gaps.
///
/// Turbine's block hashes are computed again from the token ids the engine publishes, so the
/// engine's hash function and seed never have to match the router's; the engine's hashes
/// only name blocks, and the translator remembers which Turbine block each one names.
#[derive(Debug)]
pub struct Translator {
    block_size: usize,
    /// `None`: the next batch is accepted whatever its seq (joining late, or after a reset).
    next_seq: Option<u64>,
    next_event_id: u64,
    /// Engine hash to the Turbine sequence hash of the block it names. Keyed with the
    /// default hasher: engine hashes may be small integers, not uniformly spread ones.
    engine: HashMap<u64, u64>,
    turbine: HashMapOfHashes<TurbineBlock>,
    /// Orders `turbine` for snapshots: blocks come out in the order they were stored.
    next_order: u64,
    stats: KvEventStats,
}

/// What became of one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The batch was applied; its events, possibly none, in order.
    Events(Vec<KvEvent>),
    /// Batches were missed: nothing was applied. Replay from `expected`, or
    /// [`Translator::reset`] and apply this batch again.
    Gap { expected: u64, got: u64 },
    /// The batch was applied before (a replay overlapping the live stream): ignored.
    Duplicate,
}

/// A batch that could not be read. It is consumed all the same: the next seq is expected
/// after it.
#[derive(Debug, thiserror::Error)]
#[error("KV event batch {seq} is malformed")]
pub struct TranslateError {
    pub seq: u64,
    #[source]
    pub source: DecodeError,
}

/// The engine caches blocks of a size other than the router's: its events cannot be hashed
/// into the router's blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the engine publishes KV events for blocks of {engine} tokens but the router hashes {router}-token blocks: \
     start the engine with --block-size {router} (SGLang: --page-size {router})"
)]
pub struct BlockSizeMismatch {
    pub engine: u64,
    pub router: usize,
}

/// What the translator has seen, as counters (of batches, events or blocks as named).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvEventStats {
    /// Batches applied.
    pub batches: u64,
    /// Batches seen again (replayed after being applied), ignored.
    pub duplicate_batches: u64,
    /// Batches that arrived after missing ones.
    pub gaps: u64,
    /// Times everything was forgotten because missed batches could not be replayed.
    pub resets: u64,
    /// Batches that could not be read.
    pub decode_errors: u64,
    /// Engine blocks stored and removed.
    pub stored_blocks: u64,
    pub removed_blocks: u64,
    /// `AllBlocksCleared` events applied.
    pub cleared: u64,
    /// Blocks stored again under an engine hash already stored: not stored twice.
    pub duplicate_blocks: u64,
    /// Stored events whose parent was never seen (stored before we joined): their blocks
    /// cannot be placed in a sequence, so they are skipped.
    pub unknown_parent: u64,
    /// Removed engine hashes that were never stored (or were skipped): dropped.
    pub unknown_removed: u64,
    /// Stored events refused for their block size; see `block_size_mismatch`.
    pub wrong_block_size: u64,
    /// Stored events whose token count is not their blocks' count times the block size.
    pub token_count_mismatch: u64,
    /// Events skipped for applying to another medium than the engine's own cache (vLLM's
    /// CPU offloading), to a LoRA adapter (Turbine requests carry none), or to a KV cache
    /// group other than the first (the one routed on).
    pub skipped_medium: u64,
    pub skipped_lora: u64,
    pub skipped_group: u64,
    /// The first block size mismatch seen, for the worker to report.
    pub block_size_mismatch: Option<BlockSizeMismatch>,
}

impl Translator {
    /// A translator for a router that hashes blocks of `block_size` tokens, accepting any
    /// seq first (a subscriber that joins a running engine).
    ///
    /// # Panics
    /// If `block_size` is zero: a block size is validated once when config is parsed.
    pub fn new(block_size: usize) -> Self {
        assert!(block_size > 0, "block_size must be positive");
        Self {
            block_size,
            next_seq: None,
            next_event_id: 0,
            engine: HashMap::new(),
            turbine: HashMapOfHashes::default(),
            next_order: 0,
            stats: KvEventStats::default(),
        }
    }

    /// A translator that expects `seq` first, so that a later first batch shows as a gap.
    ///
    /// # Panics
    /// If `block_size` is zero.
    pub fn expecting(block_size: usize, seq: u64) -> Self {
        Self {
            next_seq: Some(seq),
            ..Self::new(block_size)
        }
    }

    /// Applies the batch the engine published as `seq`.
    pub fn apply(&mut self, seq: u64, payload: &[u8]) -> Result<Applied, TranslateError> {
        if let Some(expected) = self.next_seq {
            if seq < expected {
                self.stats.duplicate_batches += 1;
                return Ok(Applied::Duplicate);
            }
            if seq > expected {
                self.stats.gaps += 1;
                return Ok(Applied::Gap { expected, got: seq });
            }
        }
        self.next_seq = Some(seq.wrapping_add(1));
        let events = decode_batch(payload).map_err(|source| {
            self.stats.decode_errors += 1;
            TranslateError { seq, source }
        })?;
        self.stats.batches += 1;
        let mut out = Vec::new();
        for event in events {
            match event {
                EngineEvent::Stored(stored) => self.store(stored, &mut out),
                EngineEvent::Removed(removed) => self.remove(removed, &mut out),
                EngineEvent::Cleared(scope) => {
                    if self.in_scope(scope) {
                        self.stats.cleared += 1;
                        self.engine.clear();
                        self.turbine.clear();
                        self.push(&mut out, KvEventData::Cleared);
                    }
                }
            }
        }
        Ok(Applied::Events(out))
    }

    /// Forgets everything, for when missed batches cannot be replayed: returns the `Cleared`
    /// event that tells the router so. The next batch is accepted whatever its seq.
    pub fn reset(&mut self) -> KvEvent {
        self.stats.resets += 1;
        self.next_seq = None;
        self.engine.clear();
        self.turbine.clear();
        let event = KvEvent {
            event_id: self.next_event_id,
            data: KvEventData::Cleared,
        };
        self.next_event_id += 1;
        event
    }

    /// Every block stored now, parents before children, as of the last event returned.
    pub fn snapshot(&self) -> KvSnapshot {
        let mut by_order: Vec<(&u64, &TurbineBlock)> = self.turbine.iter().collect();
        by_order.sort_unstable_by_key(|(_, b)| b.order);
        let mut emitted = HashMapOfHashes::<()>::default();
        let mut blocks = Vec::with_capacity(by_order.len());
        let mut chain = Vec::new();
        for (&sequence, _) in by_order {
            // A parent evicted and stored again comes after its children in store order:
            // walk up to the first ancestor already listed (or absent) and list down from it.
            // The length bound only matters if hashes ever formed a cycle.
            let mut at = Some(sequence);
            while let Some(hash) = at {
                if emitted.contains_key(&hash) || chain.len() > self.turbine.len() {
                    break;
                }
                let Some(block) = self.turbine.get(&hash) else { break };
                chain.push(hash);
                at = block.parent;
            }
            for hash in chain.drain(..).rev() {
                if let Some(block) = self.turbine.get(&hash) {
                    if emitted.insert(hash, ()).is_some() {
                        continue;
                    }
                    blocks.push(CachedBlock {
                        parent_hash: block.parent,
                        block: StoredBlock {
                            sequence_hash: hash,
                            local_hash: block.local,
                        },
                    });
                }
            }
        }
        KvSnapshot {
            last_event_id: self.next_event_id.checked_sub(1),
            blocks,
        }
    }

    pub fn stats(&self) -> KvEventStats {
        self.stats.clone()
    }

    /// The seq the next batch must have; `None` when any is accepted.
    pub fn next_seq(&self) -> Option<u64> {
        self.next_seq
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    fn in_scope(&mut self, scope: Scope) -> bool {
        if scope.medium != Medium::Gpu {
            self.stats.skipped_medium += 1;
        } else if scope.lora {
            self.stats.skipped_lora += 1;
        } else if scope.group_idx != 0 {
            self.stats.skipped_group += 1;
        } else {
            return true;
        }
        false
    }

    fn store(&mut self, stored: Stored, out: &mut Vec<KvEvent>) {
        if !self.in_scope(stored.scope) {
            return;
        }
        let bs = self.block_size;
        if stored.block_size != bs as u64 {
            self.stats.wrong_block_size += 1;
            self.stats.block_size_mismatch.get_or_insert(BlockSizeMismatch {
                engine: stored.block_size,
                router: bs,
            });
            return;
        }
        if stored.block_hashes.len().checked_mul(bs) != Some(stored.token_ids.len()) {
            self.stats.token_count_mismatch += 1;
            return;
        }
        let mut parent = match stored.parent {
            None => None,
            Some(engine_parent) => match self.engine.get(&engine_parent) {
                Some(&sequence) => Some(sequence),
                None => {
                    self.stats.unknown_parent += 1;
                    return;
                }
            },
        };
        // Blocks the router already has (stored again, or named by another engine hash: a
        // salted prefix) are left out, splitting the event into runs of new blocks.
        let mut run_parent = parent;
        let mut run = Vec::new();
        for (&engine_hash, tokens) in stored.block_hashes.iter().zip(stored.token_ids.chunks_exact(bs)) {
            let local = local_hash(tokens);
            let sequence = parent.map_or(local, |p| chain_hash(p, local));
            let new = if self.engine.contains_key(&engine_hash) {
                self.stats.duplicate_blocks += 1;
                false
            } else {
                self.stats.stored_blocks += 1;
                self.engine.insert(engine_hash, sequence);
                match self.turbine.get_mut(&sequence) {
                    Some(block) => {
                        block.names += 1;
                        false
                    }
                    None => {
                        self.turbine.insert(
                            sequence,
                            TurbineBlock {
                                parent,
                                local,
                                names: 1,
                                order: self.next_order,
                            },
                        );
                        self.next_order += 1;
                        true
                    }
                }
            };
            if new {
                if run.is_empty() {
                    run_parent = parent;
                }
                run.push(StoredBlock {
                    sequence_hash: sequence,
                    local_hash: local,
                });
            } else if !run.is_empty() {
                let blocks = std::mem::take(&mut run);
                self.push(
                    out,
                    KvEventData::Stored {
                        parent_hash: run_parent,
                        blocks,
                    },
                );
            }
            parent = Some(sequence);
        }
        if !run.is_empty() {
            self.push(
                out,
                KvEventData::Stored {
                    parent_hash: run_parent,
                    blocks: run,
                },
            );
        }
    }

    fn remove(&mut self, removed: Removed, out: &mut Vec<KvEvent>) {
        if !self.in_scope(removed.scope) {
            return;
        }
        let mut sequence_hashes = Vec::new();
        for engine_hash in removed.block_hashes {
            let Some(sequence) = self.engine.remove(&engine_hash) else {
                self.stats.unknown_removed += 1;
                continue;
            };
            self.stats.removed_blocks += 1;
            if let Some(block) = self.turbine.get_mut(&sequence) {
                block.names -= 1;
                if block.names == 0 {
                    self.turbine.remove(&sequence);
                    sequence_hashes.push(sequence);
                }
            }
        }
        if !sequence_hashes.is_empty() {
            self.push(out, KvEventData::Removed { sequence_hashes });
        }
    }

    fn push(&mut self, out: &mut Vec<KvEvent>, data: KvEventData) {
        out.push(KvEvent {
            event_id: self.next_event_id,
            data,
        });
        self.next_event_id += 1;
    }
}

/// A block as the router knows it.
#[derive(Debug)]
struct TurbineBlock {
    parent: Option<u64>,
    local: u64,
    /// How many engine hashes name this block: it is removed when the last one is.
    names: u32,
    order: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_events::decode::tests::{encode, ints, map, s};
    use rmpv::Value;
    use std::collections::HashSet;
    use turbine_tokens::block_hashes;

    const BS: usize = 4;

    fn prompt(len: u32, salt: u32) -> Vec<u32> {
        (0..len).map(|i| i * 7 + salt).collect()
    }

    /// The engine's own hash of block `i` of `tokens`: any function works, as long as the
    /// engine is consistent.
    fn engine_hash(tokens: &[u32], i: usize) -> i64 {
        let mut h: i64 = -1;
        for &t in &tokens[..(i + 1) * BS] {
            h = h.wrapping_mul(1_000_003).wrapping_add(i64::from(t));
        }
        h
    }

    /// An array-like BlockStored of blocks `from..to` of `tokens`.
    fn stored(tokens: &[u32], from: usize, to: usize) -> Value {
        stored_with(tokens, from, to, BS, Value::Nil, Value::Nil)
    }

    fn stored_with(tokens: &[u32], from: usize, to: usize, block_size: usize, lora: Value, medium: Value) -> Value {
        let hashes: Vec<i64> = (from..to).map(|i| engine_hash(tokens, i)).collect();
        let parent = if from == 0 {
            Value::Nil
        } else {
            Value::from(engine_hash(tokens, from - 1))
        };
        Value::Array(vec![
            s("BlockStored"),
            ints(&hashes),
            parent,
            ints(&tokens[from * BS..to * BS]),
            Value::from(block_size),
            lora,
            medium,
        ])
    }

    fn removed(tokens: &[u32], blocks: &[usize]) -> Value {
        let hashes: Vec<i64> = blocks.iter().map(|&i| engine_hash(tokens, i)).collect();
        Value::Array(vec![s("BlockRemoved"), ints(&hashes), Value::Nil])
    }

    fn cleared() -> Value {
        Value::Array(vec![s("AllBlocksCleared")])
    }

    fn batch(events: Vec<Value>) -> Vec<u8> {
        encode(&Value::Array(vec![Value::F64(0.0), Value::Array(events)]))
    }

    fn events_of(t: &mut Translator, seq: u64, events: Vec<Value>) -> Vec<KvEvent> {
        match t.apply(seq, &batch(events)) {
            Ok(Applied::Events(events)) => events,
            other => panic!("batch {seq}: {other:?}"),
        }
    }

    /// Turbine's hashes of blocks `from..to` of `tokens`, as the router computes them for a
    /// request with that prompt.
    fn turbine_blocks(tokens: &[u32], from: usize, to: usize) -> Vec<StoredBlock> {
        block_hashes(tokens, BS)[from..to]
            .iter()
            .map(|b| StoredBlock {
                sequence_hash: b.sequence,
                local_hash: b.local,
            })
            .collect()
    }

    fn seq_hash(tokens: &[u32], i: usize) -> u64 {
        block_hashes(tokens, BS)[i].sequence
    }

    fn stored_event(id: u64, parent_hash: Option<u64>, blocks: Vec<StoredBlock>) -> KvEvent {
        KvEvent {
            event_id: id,
            data: KvEventData::Stored { parent_hash, blocks },
        }
    }

    fn removed_event(id: u64, sequence_hashes: Vec<u64>) -> KvEvent {
        KvEvent {
            event_id: id,
            data: KvEventData::Removed { sequence_hashes },
        }
    }

    /// The router's view: the events applied to a set, in order, ids consecutive from 0.
    #[derive(Default)]
    struct Replica {
        next_id: u64,
        blocks: HashMap<u64, CachedBlock>,
    }

    impl Replica {
        fn apply(&mut self, events: &[KvEvent]) {
            for event in events {
                assert_eq!(event.event_id, self.next_id, "event ids have no gaps");
                self.next_id += 1;
                match &event.data {
                    KvEventData::Stored { parent_hash, blocks } => {
                        let mut parent = *parent_hash;
                        for &block in blocks {
                            let old = self.blocks.insert(
                                block.sequence_hash,
                                CachedBlock {
                                    parent_hash: parent,
                                    block,
                                },
                            );
                            assert!(old.is_none(), "{block:?} stored twice");
                            parent = Some(block.sequence_hash);
                        }
                    }
                    KvEventData::Removed { sequence_hashes } => {
                        for h in sequence_hashes {
                            assert!(self.blocks.remove(h).is_some(), "{h} removed but not stored");
                        }
                    }
                    KvEventData::Cleared => self.blocks.clear(),
                }
            }
        }

        /// Checks a snapshot against the replayed events, parents listed before children.
        fn check(&self, snapshot: &KvSnapshot) {
            assert_eq!(snapshot.last_event_id, self.next_id.checked_sub(1));
            let mut seen = HashSet::new();
            for b in &snapshot.blocks {
                if let Some(p) = b.parent_hash {
                    assert!(
                        seen.contains(&p) || !self.blocks.contains_key(&p),
                        "parent {p} listed after its child"
                    );
                }
                assert!(seen.insert(b.block.sequence_hash));
            }
            let listed: HashMap<u64, CachedBlock> =
                snapshot.blocks.iter().map(|b| (b.block.sequence_hash, *b)).collect();
            assert_eq!(listed, self.blocks);
        }
    }

    #[test]
    fn stored_blocks_get_the_routers_hashes() {
        let a = prompt(5 * BS as u32 + 2, 1);
        let mut t = Translator::new(BS);
        let mut replica = Replica::default();
        // Root blocks, then their children in the same batch and in a later one.
        let first = events_of(&mut t, 7, vec![stored(&a, 0, 2), stored(&a, 2, 3)]);
        assert_eq!(
            first,
            vec![
                stored_event(0, None, turbine_blocks(&a, 0, 2)),
                stored_event(1, Some(seq_hash(&a, 1)), turbine_blocks(&a, 2, 3)),
            ]
        );
        replica.apply(&first);
        let second = events_of(&mut t, 8, vec![stored(&a, 3, 5)]);
        assert_eq!(
            second,
            vec![stored_event(2, Some(seq_hash(&a, 2)), turbine_blocks(&a, 3, 5))]
        );
        replica.apply(&second);
        replica.check(&t.snapshot());
        let all: Vec<u64> = t.snapshot().blocks.iter().map(|b| b.block.sequence_hash).collect();
        let expected: Vec<u64> = block_hashes(&a, BS).iter().map(|b| b.sequence).collect();
        assert_eq!(all, expected, "the partial block is the router's to skip too");
        assert_eq!(t.stats().stored_blocks, 5);
        assert_eq!(t.next_seq(), Some(9));
    }

    #[test]
    fn removal_translates_known_hashes_and_drops_unknown_ones() {
        let a = prompt(3 * BS as u32, 1);
        let other = prompt(2 * BS as u32, 2);
        let mut t = Translator::new(BS);
        let mut replica = Replica::default();
        replica.apply(&events_of(&mut t, 0, vec![stored(&a, 0, 3)]));
        let events = events_of(&mut t, 1, vec![removed(&a, &[2, 1]), removed(&other, &[0])]);
        assert_eq!(events, vec![removed_event(1, vec![seq_hash(&a, 2), seq_hash(&a, 1)])]);
        replica.apply(&events);
        assert_eq!(
            events_of(&mut t, 2, vec![removed(&a, &[2])]),
            vec![],
            "an empty removal emits nothing"
        );
        replica.check(&t.snapshot());
        let stats = t.stats();
        assert_eq!((stats.removed_blocks, stats.unknown_removed), (2, 2));
    }

    #[test]
    fn clear_forgets_every_block() {
        let a = prompt(2 * BS as u32, 1);
        let mut t = Translator::new(BS);
        let mut replica = Replica::default();
        replica.apply(&events_of(&mut t, 0, vec![stored(&a, 0, 1)]));
        let events = events_of(&mut t, 1, vec![cleared(), stored(&a, 1, 2)]);
        // The second event's parent went with the clear.
        assert_eq!(
            events,
            vec![KvEvent {
                event_id: 1,
                data: KvEventData::Cleared
            }]
        );
        replica.apply(&events);
        replica.check(&t.snapshot());
        assert!(t.snapshot().blocks.is_empty());
        assert_eq!((t.stats().cleared, t.stats().unknown_parent), (1, 1));
    }

    #[test]
    fn blocks_whose_parent_was_missed_are_skipped() {
        let a = prompt(4 * BS as u32, 1);
        let mut t = Translator::new(BS);
        assert_eq!(events_of(&mut t, 40, vec![stored(&a, 1, 3)]), vec![]);
        assert_eq!(t.stats().unknown_parent, 1);
        assert_eq!(t.snapshot(), KvSnapshot::default());
        // Its children cannot be placed either, nor can its blocks be removed.
        assert_eq!(events_of(&mut t, 41, vec![stored(&a, 3, 4), removed(&a, &[1])]), vec![]);
        let stats = t.stats();
        assert_eq!((stats.unknown_parent, stats.unknown_removed), (2, 1));
    }

    #[test]
    fn blocks_stored_again_are_not_stored_twice() {
        let a = prompt(3 * BS as u32, 1);
        let mut t = Translator::new(BS);
        let mut replica = Replica::default();
        replica.apply(&events_of(&mut t, 0, vec![stored(&a, 1, 2)]));
        // Parent unknown above; now the whole prompt, then block 1 again.
        let events = events_of(&mut t, 1, vec![stored(&a, 0, 3), stored(&a, 1, 2)]);
        assert_eq!(events, vec![stored_event(0, None, turbine_blocks(&a, 0, 3))]);
        replica.apply(&events);
        assert_eq!(t.stats().duplicate_blocks, 1);
        replica.check(&t.snapshot());
    }

    #[test]
    fn one_block_named_by_two_engine_hashes_is_removed_with_the_last() {
        // vLLM salts a prompt's first block hash with its cache salt: equal tokens, other
        // engine hashes, one Turbine block.
        let a = prompt(2 * BS as u32, 1);
        let salted = |hash: i64| Value::from(hash ^ 0x5a17);
        let mut t = Translator::new(BS);
        let mut replica = Replica::default();
        replica.apply(&events_of(&mut t, 0, vec![stored(&a, 0, 2)]));
        let again = Value::Array(vec![
            s("BlockStored"),
            Value::Array(vec![salted(engine_hash(&a, 0)), salted(engine_hash(&a, 1))]),
            Value::Nil,
            ints(&a[..2 * BS]),
            Value::from(BS),
        ]);
        assert_eq!(events_of(&mut t, 1, vec![again]), vec![]);
        assert_eq!(events_of(&mut t, 2, vec![removed(&a, &[0, 1])]), vec![]);
        let salted_removal = Value::Array(vec![
            s("BlockRemoved"),
            Value::Array(vec![salted(engine_hash(&a, 1)), salted(engine_hash(&a, 0))]),
        ]);
        let events = events_of(&mut t, 3, vec![salted_removal]);
        assert_eq!(events, vec![removed_event(1, vec![seq_hash(&a, 1), seq_hash(&a, 0)])]);
        replica.apply(&events);
        replica.check(&t.snapshot());
    }

    #[test]
    fn only_new_blocks_are_announced_in_runs() {
        let a = prompt(4 * BS as u32, 1);
        let mut t = Translator::new(BS);
        let mut replica = Replica::default();
        replica.apply(&events_of(&mut t, 0, vec![stored(&a, 0, 4)]));
        replica.apply(&events_of(&mut t, 1, vec![removed(&a, &[0, 2])]));
        // Block 1 and 3 are still stored: blocks 0 and 2 come back as runs of their own.
        let events = events_of(&mut t, 2, vec![stored(&a, 0, 4)]);
        assert_eq!(
            events,
            vec![
                stored_event(2, None, turbine_blocks(&a, 0, 1)),
                stored_event(3, Some(seq_hash(&a, 1)), turbine_blocks(&a, 2, 3)),
            ]
        );
        replica.apply(&events);
        // Block 0 was stored again after its child: the snapshot still lists it first.
        let snapshot = t.snapshot();
        replica.check(&snapshot);
        assert_eq!(snapshot.blocks[0].block.sequence_hash, seq_hash(&a, 0));
    }

    #[test]
    fn seq_numbers_show_duplicates_and_gaps() {
        let a = prompt(3 * BS as u32, 1);
        let mut t = Translator::expecting(BS, 0);
        assert_eq!(
            t.apply(2, &batch(vec![stored(&a, 0, 1)])).ok(),
            Some(Applied::Gap { expected: 0, got: 2 })
        );
        assert_eq!(events_of(&mut t, 0, vec![stored(&a, 0, 1)]).len(), 1);
        assert_eq!(
            t.apply(0, &batch(vec![stored(&a, 0, 1)])).ok(),
            Some(Applied::Duplicate)
        );
        assert_eq!(events_of(&mut t, 1, vec![stored(&a, 1, 2)]).len(), 1);
        assert_eq!(
            t.apply(3, &batch(vec![stored(&a, 2, 3)])).ok(),
            Some(Applied::Gap { expected: 2, got: 3 })
        );
        let stats = t.stats();
        assert_eq!((stats.batches, stats.duplicate_batches, stats.gaps), (2, 1, 2));

        // Nothing to replay from: start over at the live batch.
        let mut replica = Replica::default();
        replica.apply(&[stored_event(0, None, turbine_blocks(&a, 0, 1))]);
        replica.apply(&[stored_event(1, Some(seq_hash(&a, 0)), turbine_blocks(&a, 1, 2))]);
        let reset = t.reset();
        assert_eq!(
            reset,
            KvEvent {
                event_id: 2,
                data: KvEventData::Cleared
            }
        );
        replica.apply(&[reset]);
        assert_eq!(t.next_seq(), None);
        assert_eq!(
            events_of(&mut t, 3, vec![stored(&a, 2, 3)]),
            vec![],
            "its parent was forgotten"
        );
        replica.apply(&events_of(&mut t, 4, vec![stored(&a, 0, 3)]));
        replica.check(&t.snapshot());
        assert_eq!(t.snapshot().blocks.len(), 3);
        assert_eq!(t.stats().resets, 1);
    }

    #[test]
    fn a_wrong_block_size_is_refused_and_reported() {
        let a = prompt(4 * BS as u32, 1);
        let mut t = Translator::new(BS);
        let doubled = stored_with(&a, 0, 2, 2 * BS, Value::Nil, Value::Nil);
        assert_eq!(events_of(&mut t, 0, vec![doubled]), vec![]);
        let stats = t.stats();
        assert_eq!(stats.wrong_block_size, 1);
        let mismatch = stats.block_size_mismatch.expect("the mismatch is reported");
        assert_eq!(
            mismatch.to_string(),
            "the engine publishes KV events for blocks of 8 tokens but the router hashes 4-token blocks: \
             start the engine with --block-size 4 (SGLang: --page-size 4)"
        );
        assert_eq!(t.snapshot().blocks, vec![]);
    }

    #[test]
    fn a_token_count_other_than_the_blocks_is_refused() {
        let a = prompt(4 * BS as u32, 1);
        let mut t = Translator::new(BS);
        let short = Value::Array(vec![
            s("BlockStored"),
            ints(&[1u64, 2]),
            Value::Nil,
            ints(&a[..2 * BS - 1]),
            Value::from(BS),
        ]);
        assert_eq!(events_of(&mut t, 0, vec![short]), vec![]);
        assert_eq!(t.stats().token_count_mismatch, 1);
        assert_eq!(t.snapshot().blocks, vec![]);
    }

    #[test]
    fn other_media_loras_and_groups_are_skipped() {
        let a = prompt(2 * BS as u32, 1);
        let mut t = Translator::new(BS);
        let mut replica = Replica::default();
        replica.apply(&events_of(&mut t, 0, vec![stored(&a, 0, 1)]));
        let cpu = stored_with(&a, 1, 2, BS, Value::Nil, s("CPU"));
        let lora = stored_with(&a, 1, 2, BS, Value::from(1), s("GPU"));
        let cpu_removal = Value::Array(vec![s("BlockRemoved"), ints(&[engine_hash(&a, 0)]), s("CPU")]);
        let group = map(vec![
            ("type", s("BlockRemoved")),
            ("block_hashes", ints(&[engine_hash(&a, 0)])),
            ("group_idx", Value::from(1)),
        ]);
        let named_lora = map(vec![("type", s("AllBlocksCleared")), ("lora_name", s("adapter"))]);
        assert_eq!(
            events_of(&mut t, 1, vec![cpu, lora, cpu_removal, group, named_lora]),
            vec![]
        );
        let stats = t.stats();
        assert_eq!(
            (stats.skipped_medium, stats.skipped_lora, stats.skipped_group),
            (2, 2, 1)
        );
        replica.check(&t.snapshot());
        assert_eq!(t.snapshot().blocks.len(), 1);
    }

    #[test]
    fn bytes_hashes_as_newer_vllm_sends_them() {
        let a = prompt(2 * BS as u32, 1);
        let digest = |i: u8| Value::Binary(vec![i; 32]);
        let store = map(vec![
            ("type", s("BlockStored")),
            ("block_hashes", Value::Array(vec![digest(1)])),
            ("parent_block_hash", Value::Nil),
            ("token_ids", ints(&a[..BS])),
            ("block_size", Value::from(BS)),
            ("medium", s("GPU")),
        ]);
        let child = map(vec![
            ("type", s("BlockStored")),
            ("block_hashes", Value::Array(vec![digest(2)])),
            ("parent_block_hash", digest(1)),
            ("token_ids", ints(&a[BS..])),
            ("block_size", Value::from(BS)),
        ]);
        let remove = map(vec![
            ("type", s("BlockRemoved")),
            ("block_hashes", Value::Array(vec![digest(1)])),
        ]);
        let payload = encode(&map(vec![
            ("ts", Value::F64(0.0)),
            ("events", Value::Array(vec![store, child, remove])),
        ]));
        let mut t = Translator::new(BS);
        let Ok(Applied::Events(events)) = t.apply(0, &payload) else {
            panic!("a valid batch")
        };
        assert_eq!(
            events,
            vec![
                stored_event(0, None, turbine_blocks(&a, 0, 1)),
                stored_event(1, Some(seq_hash(&a, 0)), turbine_blocks(&a, 1, 2)),
                removed_event(2, vec![seq_hash(&a, 0)]),
            ]
        );
        let mut replica = Replica::default();
        replica.apply(&events);
        replica.check(&t.snapshot());
    }

    #[test]
    fn negative_integer_hashes_name_blocks_like_any_other() {
        let a = prompt(2 * BS as u32, 1);
        let store = |hash: i64, parent: Value, from: usize| {
            Value::Array(vec![
                s("BlockStored"),
                ints(&[hash]),
                parent,
                ints(&a[from * BS..(from + 1) * BS]),
                Value::from(BS),
            ])
        };
        let mut t = Translator::new(BS);
        let events = events_of(
            &mut t,
            0,
            vec![store(-5, Value::Nil, 0), store(i64::MIN, Value::from(-5), 1)],
        );
        assert_eq!(
            events,
            vec![
                stored_event(0, None, turbine_blocks(&a, 0, 1)),
                stored_event(1, Some(seq_hash(&a, 0)), turbine_blocks(&a, 1, 2)),
            ]
        );
        // The unsigned spelling of the same bits names the same block.
        let removal = Value::Array(vec![s("BlockRemoved"), ints(&[i64::MIN as u64])]);
        assert_eq!(
            events_of(&mut t, 1, vec![removal]),
            vec![removed_event(2, vec![seq_hash(&a, 1)])]
        );
    }

    #[test]
    fn a_malformed_batch_is_consumed_and_reported() {
        let a = prompt(BS as u32, 1);
        let mut t = Translator::new(BS);
        let bad = Value::Array(vec![
            s("BlockStored"),
            ints(&[1u64]),
            Value::Nil,
            s("not tokens"),
            Value::from(BS),
        ]);
        let payload = batch(vec![stored(&a, 0, 1), bad]);
        let err = t.apply(5, &payload).expect_err("malformed");
        assert_eq!(err.to_string(), "KV event batch 5 is malformed");
        assert_eq!(
            err.source.to_string(),
            "event 1: BlockStored token_ids is not a list of integers"
        );
        assert!(t.apply(6, b"\x92\xcb").is_err());
        let stats = t.stats();
        assert_eq!((stats.decode_errors, stats.batches), (2, 0));
        assert_eq!(t.next_seq(), Some(7));
        assert_eq!(t.snapshot(), KvSnapshot::default(), "a malformed batch applies nothing");
    }
}
