//! The translation of an engine's KV event batches into Turbine's events: a pure state
//! machine, fed payloads and sequence numbers, that keeps what it needs to translate later
//! parents and removals.
//!
//! Each medium an engine reports becomes a storage tier (vLLM's `"GPU"` the device, `"CPU"`
//! host memory, `"STORAGE"` disk), each tier with its own record of what it holds, since one
//! block may be held in several. vLLM's offloading announces blocks stored off the device
//! by their engine hashes alone, without tokens: those are blocks the device held first, so
//! the translator finds their Turbine hashes in what any tier has seen.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use turbine_protocols::kv::{CachedBlock, KvEvent, KvEventData, KvSnapshot, StorageTier, StoredBlock};
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
    /// What each tier holds, by [`StorageTier::index`].
    tiers: [Tier; 3],
    /// Orders each tier's `turbine` for snapshots: blocks come out in the order they were
    /// stored.
    next_order: u64,
    stats: KvEventStats,
}

/// The blocks one tier of the engine holds.
#[derive(Debug, Default)]
struct Tier {
    /// Engine hash to the Turbine sequence hash of the block it names. Keyed with the
    /// default hasher: engine hashes may be small integers, not uniformly spread ones.
    engine: HashMap<u64, u64>,
    turbine: HashMapOfHashes<TurbineBlock>,
}

impl Tier {
    fn clear(&mut self) {
        self.engine.clear();
        self.turbine.clear();
    }
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
    /// Blocks stored off the device by their engine hashes alone (vLLM's offloading) that
    /// name no block any tier has seen: they cannot be given Turbine hashes, so are skipped.
    pub unresolved_blocks: u64,
    /// Events skipped for applying to a medium that is no storage tier the router knows,
    /// to a LoRA adapter (Turbine requests carry none), or to a KV cache group other than
    /// the first (the one routed on).
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
            tiers: Default::default(),
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
                    if let Some(tier) = self.in_scope(scope) {
                        self.stats.cleared += 1;
                        self.clear(tier, &mut out);
                    }
                }
            }
        }
        Ok(Applied::Events(out))
    }

    /// Forgets everything, for when missed batches cannot be replayed: returns the events
    /// that tell the router so (`Cleared`, and the removal of every block off the device).
    /// The next batch is accepted whatever its seq.
    pub fn reset(&mut self) -> Vec<KvEvent> {
        self.stats.resets += 1;
        self.next_seq = None;
        let mut out = Vec::new();
        for tier in StorageTier::ALL {
            self.clear(tier, &mut out);
        }
        out
    }

    /// Every block stored now, tier by tier, parents before children within a tier, as of
    /// the last event returned.
    pub fn snapshot(&self) -> KvSnapshot {
        let mut blocks = Vec::new();
        for tier in StorageTier::ALL {
            let turbine = &self.tiers[tier.index()].turbine;
            let mut by_order: Vec<(&u64, &TurbineBlock)> = turbine.iter().collect();
            by_order.sort_unstable_by_key(|(_, b)| b.order);
            let mut emitted = HashMapOfHashes::<()>::default();
            let mut chain = Vec::new();
            for (&sequence, _) in by_order {
                // A parent evicted and stored again comes after its children in store order:
                // walk up to the first ancestor already listed (or absent) and list down from
                // it. The length bound only matters if hashes ever formed a cycle.
                let mut at = Some(sequence);
                while let Some(hash) = at {
                    if emitted.contains_key(&hash) || chain.len() > turbine.len() {
                        break;
                    }
                    let Some(block) = turbine.get(&hash) else { break };
                    chain.push(hash);
                    at = block.parent;
                }
                for hash in chain.drain(..).rev() {
                    if let Some(block) = turbine.get(&hash) {
                        if emitted.insert(hash, ()).is_some() {
                            continue;
                        }
                        blocks.push(CachedBlock {
                            parent_hash: block.parent,
                            block: StoredBlock {
                                sequence_hash: hash,
                                local_hash: block.local,
                            },
                            tier,
                        });
                    }
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

    /// The tier an event applies to, if the router follows it.
    fn in_scope(&mut self, scope: Scope) -> Option<StorageTier> {
        match scope.medium {
            Medium::Other => self.stats.skipped_medium += 1,
            _ if scope.lora => self.stats.skipped_lora += 1,
            _ if scope.group_idx != 0 => self.stats.skipped_group += 1,
            Medium::Tier(tier) => return Some(tier),
        }
        None
    }

    /// Forgets what `tier` holds, telling the router: `Cleared` for the device, the removal
    /// of each block for another tier (`Cleared` leaves those).
    fn clear(&mut self, tier: StorageTier, out: &mut Vec<KvEvent>) {
        let held = &mut self.tiers[tier.index()];
        let data = match tier {
            StorageTier::Device => KvEventData::Cleared,
            _ if held.turbine.is_empty() => return,
            _ => KvEventData::Removed {
                sequence_hashes: held.turbine.iter().map(|(&h, _)| h).collect(),
                tier,
            },
        };
        held.clear();
        self.push(out, data);
    }

    /// The Turbine sequence hash of the block `engine_hash` names, in `tier` first, then in
    /// any other: a name means the same content in every tier.
    fn resolve(&self, tier: StorageTier, engine_hash: u64) -> Option<u64> {
        let first = self.tiers[tier.index()].engine.get(&engine_hash);
        first
            .or_else(|| self.tiers.iter().find_map(|t| t.engine.get(&engine_hash)))
            .copied()
    }

    /// The parent and local hash of the Turbine block `sequence`, from any tier holding it.
    fn block(&self, sequence: u64) -> Option<(Option<u64>, u64)> {
        self.tiers
            .iter()
            .find_map(|t| t.turbine.get(&sequence))
            .map(|b| (b.parent, b.local))
    }

    fn store(&mut self, stored: Stored, out: &mut Vec<KvEvent>) {
        let Some(tier) = self.in_scope(stored.scope) else {
            return;
        };
        if tier != StorageTier::Device && stored.token_ids.is_empty() && !stored.block_hashes.is_empty() {
            self.store_known(tier, stored, out);
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
            Some(engine_parent) => match self.resolve(tier, engine_parent) {
                Some(sequence) => Some(sequence),
                None => {
                    self.stats.unknown_parent += 1;
                    return;
                }
            },
        };
        // Blocks the router already has (stored again, or named by another engine hash: a
        // salted prefix) are left out, splitting the event into runs of new blocks.
        let mut run = Run::new(tier);
        for (&engine_hash, tokens) in stored.block_hashes.iter().zip(stored.token_ids.chunks_exact(bs)) {
            let local = local_hash(tokens);
            let sequence = parent.map_or(local, |p| chain_hash(p, local));
            self.store_block(&mut run, engine_hash, sequence, parent, local, out);
            parent = Some(sequence);
        }
        run.flush(self, out);
    }

    /// A store that names its blocks by engine hash alone (vLLM's offloading to host memory
    /// or storage), each a block some tier has seen with its tokens.
    fn store_known(&mut self, tier: StorageTier, stored: Stored, out: &mut Vec<KvEvent>) {
        // Offloading announces its own block size, or 0: another size would name blocks
        // that are not the router's.
        if stored.block_size != 0 && stored.block_size != self.block_size as u64 {
            self.stats.wrong_block_size += 1;
            self.stats.block_size_mismatch.get_or_insert(BlockSizeMismatch {
                engine: stored.block_size,
                router: self.block_size,
            });
            return;
        }
        let mut run = Run::new(tier);
        for engine_hash in stored.block_hashes {
            let Some((sequence, (parent, local))) =
                self.resolve(tier, engine_hash).and_then(|s| Some((s, self.block(s)?)))
            else {
                self.stats.unresolved_blocks += 1;
                continue;
            };
            // Blocks named one by one need not chain: a block that does not follow the one
            // before starts a run of its own.
            if run.last != parent {
                run.flush(self, out);
            }
            self.store_block(&mut run, engine_hash, sequence, parent, local, out);
        }
        run.flush(self, out);
    }

    /// Records that `engine_hash` names `sequence` in `run`'s tier, adding the block to the
    /// run if the tier did not hold it (else ending the run, so that runs are all new).
    fn store_block(
        &mut self,
        run: &mut Run,
        engine_hash: u64,
        sequence: u64,
        parent: Option<u64>,
        local: u64,
        out: &mut Vec<KvEvent>,
    ) {
        let held = &mut self.tiers[run.tier.index()];
        let new = match held.engine.entry(engine_hash) {
            Entry::Occupied(_) => {
                self.stats.duplicate_blocks += 1;
                false
            }
            Entry::Vacant(name) => {
                self.stats.stored_blocks += 1;
                name.insert(sequence);
                match held.turbine.get_mut(&sequence) {
                    Some(block) => {
                        block.names += 1;
                        false
                    }
                    None => {
                        held.turbine.insert(
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
            }
        };
        if new {
            if run.blocks.is_empty() {
                run.parent = parent;
            }
            run.blocks.push(StoredBlock {
                sequence_hash: sequence,
                local_hash: local,
            });
        } else {
            run.flush(self, out);
        }
        run.last = Some(sequence);
    }

    fn remove(&mut self, removed: Removed, out: &mut Vec<KvEvent>) {
        let Some(tier) = self.in_scope(removed.scope) else {
            return;
        };
        let held = &mut self.tiers[tier.index()];
        let mut sequence_hashes = Vec::new();
        for engine_hash in removed.block_hashes {
            let Some(sequence) = held.engine.remove(&engine_hash) else {
                self.stats.unknown_removed += 1;
                continue;
            };
            self.stats.removed_blocks += 1;
            if let Some(block) = held.turbine.get_mut(&sequence) {
                block.names -= 1;
                if block.names == 0 {
                    held.turbine.remove(&sequence);
                    sequence_hashes.push(sequence);
                }
            }
        }
        if !sequence_hashes.is_empty() {
            self.push(out, KvEventData::Removed { sequence_hashes, tier });
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

/// New blocks of one store event, announced as one `Stored` each time the chain of new
/// blocks breaks.
struct Run {
    tier: StorageTier,
    parent: Option<u64>,
    blocks: Vec<StoredBlock>,
    /// The block placed last, new or not: the parent the next one must have to join the run.
    last: Option<u64>,
}

impl Run {
    fn new(tier: StorageTier) -> Self {
        Self {
            tier,
            parent: None,
            blocks: Vec::new(),
            last: None,
        }
    }

    fn flush(&mut self, t: &mut Translator, out: &mut Vec<KvEvent>) {
        if !self.blocks.is_empty() {
            let data = KvEventData::Stored {
                parent_hash: self.parent,
                blocks: std::mem::take(&mut self.blocks),
                tier: self.tier,
            };
            t.push(out, data);
        }
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
mod tests;
