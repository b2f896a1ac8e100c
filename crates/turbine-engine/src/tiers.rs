//! The block manager below an engine's pool, as the engines built on the shared scheduler
//! drive it: admission loads prefixes that miss the pool from host memory or disk, blocks
//! the pool registers (or evicts) are offered down after each step, and the tiers' changes
//! join the pool's KV events, numbered in one stream, so that routers see every tier.
//! Loads that outlast admission (from disk, or any load of an engine that simulates its
//! KV) finish between later steps; the engine's loop waits for them when nothing else
//! runs.

use std::time::Duration;

use tokio::time::Instant;
use turbine_kvbm::{
    BlockBytes, BlockMeta, Kvbm, KvbmConfig, KvbmError, KvbmStats, Loading, PoolShape, TierEvent, TierKind, Waker,
};
use turbine_protocols::kv::{CachedBlock, KvEventData, KvSnapshot, StorageTier, StoredBlock};
use turbine_tokens::BlockHash;

use crate::pool::{BlockId, BlockPool};
use crate::scheduler::{LowerTiers, SeqId};

/// An engine's block manager, with what it has learnt of the engine's prefill speed.
#[derive(Debug)]
pub struct Tiers {
    kvbm: Kvbm,
    /// Seconds to compute one block's prefill, as measured; what a load must beat.
    recompute_secs_per_block: Option<f64>,
    block_size: usize,
    /// The copies' clock: tokio's, so that simulated copies keep a paused test's time.
    epoch: Instant,
}

impl Tiers {
    /// The tiers `config` asks for below `pool`, which from now on records its changes for
    /// them; `None` when no tier is configured.
    pub fn new(config: &KvbmConfig, shape: PoolShape, pool: &mut BlockPool) -> Result<Option<Self>, KvbmError> {
        if !config.enabled() {
            return Ok(None);
        }
        let mut kvbm = Kvbm::new(config.clone(), shape, pool.block_size())?;
        let pinned: Vec<u64> = config
            .pinned
            .iter()
            .flat_map(|tokens| turbine_tokens::block_hashes(tokens, pool.block_size()))
            .map(|h| h.sequence)
            .collect();
        kvbm.pin(&pinned)?;
        pool.track_changes();
        let mut tiers = Self {
            kvbm,
            recompute_secs_per_block: None,
            block_size: pool.block_size(),
            epoch: Instant::now(),
        };
        // A disk tier reopened with blocks announces them before anything else.
        tiers.publish(pool);
        Ok(Some(tiers))
    }

    /// Copies take simulated time at these rates (bytes per second), beside the steps.
    pub fn simulate_loads(&mut self, host_bytes_per_sec: f64, disk_bytes_per_sec: f64) {
        self.kvbm.simulate_copies(host_bytes_per_sec, disk_bytes_per_sec);
    }

    /// When the next simulated copy finishes, if one runs: an idle loop sleeps until then.
    pub fn next_ready(&self) -> Option<Instant> {
        self.kvbm.next_ready().map(|d| self.epoch + d)
    }

    /// Called from the copier's thread whenever a copy finishes, to wake an idle loop.
    pub fn set_waker(&mut self, waker: Waker) {
        self.kvbm.set_waker(waker);
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    pub fn stats(&self) -> std::sync::Arc<KvbmStats> {
        self.kvbm.stats()
    }

    pub fn kvbm(&self) -> &Kvbm {
        &self.kvbm
    }

    pub fn kvbm_mut(&mut self) -> &mut Kvbm {
        &mut self.kvbm
    }

    /// Admission's view of the tiers, loading into the engine's `bytes`.
    pub fn lower<'a>(&'a mut self, bytes: &'a mut dyn BlockBytes) -> impl LowerTiers + 'a {
        Lower { tiers: self, bytes }
    }

    /// A step computed `tokens` prompt tokens in `elapsed`: what recomputing a block costs.
    pub fn observe_prefill(&mut self, tokens: usize, elapsed: Duration) {
        if tokens < self.block_size {
            return;
        }
        let per_block = elapsed.as_secs_f64() * self.block_size as f64 / tokens as f64;
        self.recompute_secs_per_block = Some(
            self.recompute_secs_per_block
                .map_or(per_block, |r| 0.8 * r + 0.2 * per_block),
        );
    }

    /// After a step is planned, before it runs: blocks the pool evicted to make room are
    /// still intact, and a write-back copy takes them now.
    pub fn after_schedule(&mut self, pool: &mut BlockPool, bytes: &dyn BlockBytes) {
        let evicted = pool.take_evicted();
        if !evicted.is_empty() {
            self.kvbm
                .evicted(evicted.into_iter().map(|(id, c)| (id, meta(&c))), bytes);
        }
    }

    /// After a step: offers the blocks it registered, runs queued copies, and records the
    /// tiers' changes in the pool's event stream.
    pub fn after_step(&mut self, pool: &mut BlockPool, bytes: &dyn BlockBytes) {
        // Evictions since `after_schedule` (imports) are past saving; write-through has
        // their copies already, or their queued copies find the source gone.
        let registered = pool.take_registered();
        self.kvbm
            .registered(registered.into_iter().map(|(id, c)| (id, meta(&c))));
        let _ = pool.take_evicted();
        self.kvbm.drain(bytes, &|id, key| pool.holds(id, key));
        self.publish(pool);
    }

    fn publish(&mut self, pool: &mut BlockPool) {
        for event in self.kvbm.take_events() {
            pool.record(match event {
                TierEvent::Stored { tier, block } => KvEventData::Stored {
                    parent_hash: block.parent,
                    blocks: vec![StoredBlock {
                        sequence_hash: block.hash.sequence,
                        local_hash: block.hash.local,
                    }],
                    tier: storage(tier),
                },
                TierEvent::Removed { tier, key } => KvEventData::Removed {
                    sequence_hashes: vec![key],
                    tier: storage(tier),
                },
            });
        }
    }

    /// Adds the tiers' blocks to a snapshot of the pool's.
    pub fn extend_snapshot(&self, snapshot: &mut KvSnapshot) {
        snapshot
            .blocks
            .extend(self.kvbm.snapshot().into_iter().map(|(tier, m)| CachedBlock {
                parent_hash: m.parent,
                block: StoredBlock {
                    sequence_hash: m.hash.sequence,
                    local_hash: m.hash.local,
                },
                tier: storage(tier),
            }));
    }
}

fn meta(c: &CachedBlock) -> BlockMeta {
    BlockMeta {
        hash: BlockHash {
            local: c.block.local_hash,
            sequence: c.block.sequence_hash,
        },
        parent: c.parent_hash,
    }
}

fn storage(tier: TierKind) -> StorageTier {
    match tier {
        TierKind::Host => StorageTier::Host,
        TierKind::Disk => StorageTier::Disk,
    }
}

struct Lower<'a> {
    tiers: &'a mut Tiers,
    bytes: &'a mut dyn BlockBytes,
}

impl LowerTiers for Lower<'_> {
    fn held(&mut self, hashes: &[BlockHash]) -> usize {
        self.tiers.kvbm.held(hashes, self.tiers.recompute_secs_per_block)
    }

    fn missed(&mut self, hashes: &[BlockHash], parent: Option<u64>) {
        self.tiers.kvbm.missed(hashes, parent);
    }

    fn evicted(&mut self, blocks: Vec<(BlockId, CachedBlock)>) {
        self.tiers
            .kvbm
            .evicted(blocks.into_iter().map(|(id, c)| (id, meta(&c))), &*self.bytes);
    }

    fn load(&mut self, seq: SeqId, hashes: &[BlockHash], blocks: &[BlockId]) -> Loading {
        let now = self.tiers.now();
        self.tiers.kvbm.start_load(seq, hashes, blocks, self.bytes, now)
    }

    fn finished(&mut self) -> Vec<(SeqId, usize)> {
        let now = self.tiers.now();
        self.tiers.kvbm.finish(self.bytes, now)
    }

    fn prefetches(&self) -> bool {
        self.tiers.kvbm.prefetches()
    }

    fn arrived(&mut self, seq: SeqId, hashes: &[BlockHash]) {
        let now = self.tiers.now();
        self.tiers.kvbm.prefetch(seq, hashes, now);
    }

    fn admissible(&mut self, seq: SeqId, hashes: &[BlockHash]) -> bool {
        let now = self.tiers.now();
        self.tiers.kvbm.admissible(seq, hashes, now)
    }

    fn forget(&mut self, seq: SeqId) {
        self.tiers.kvbm.forget(seq);
    }
}
