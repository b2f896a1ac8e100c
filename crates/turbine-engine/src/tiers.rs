//! The block manager below an engine's pool, as the engines built on the shared scheduler
//! drive it: admission loads prefixes that miss the pool from host memory or disk, blocks
//! the pool registers (or evicts) are offered down after each step, and the tiers' changes
//! join the pool's KV events, numbered in one stream, so that routers see every tier.

use std::time::Duration;

use turbine_kvbm::{BlockBytes, BlockMeta, Kvbm, KvbmConfig, KvbmError, KvbmStats, PoolShape, TierEvent, TierKind};
use turbine_protocols::kv::{CachedBlock, KvEventData, KvSnapshot, StorageTier, StoredBlock};
use turbine_tokens::BlockHash;

use crate::pool::{BlockId, BlockPool};
use crate::scheduler::LowerTiers;

/// An engine's block manager, with what it has learnt of the engine's prefill speed.
#[derive(Debug)]
pub struct Tiers {
    kvbm: Kvbm,
    /// Seconds to compute one block's prefill, as measured; what a load must beat.
    recompute_secs_per_block: Option<f64>,
    block_size: usize,
    /// For an engine that simulates its KV: the bandwidth of loads from host memory and
    /// from disk, and the simulated time of the loads since the last step.
    simulated: Option<SimulatedLoads>,
    block_bytes: usize,
}

/// How fast a simulated engine's loads are, in bytes per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimulatedLoads {
    pub host_bytes_per_sec: f64,
    pub disk_bytes_per_sec: f64,
    pub pending: Duration,
}

impl Tiers {
    /// The tiers `config` asks for below `pool`, which from now on records its changes for
    /// them; `None` when no tier is configured.
    pub fn new(config: &KvbmConfig, shape: PoolShape, pool: &mut BlockPool) -> Result<Option<Self>, KvbmError> {
        if !config.enabled() {
            return Ok(None);
        }
        let kvbm = Kvbm::new(config.clone(), shape, pool.block_size())?;
        pool.track_changes();
        let mut tiers = Self {
            kvbm,
            recompute_secs_per_block: None,
            block_size: pool.block_size(),
            simulated: None,
            block_bytes: shape.block_bytes,
        };
        // A disk tier reopened with blocks announces them before anything else.
        tiers.publish(pool);
        Ok(Some(tiers))
    }

    /// Loads take simulated time at these rates, collected by [`Tiers::take_load_time`].
    pub fn simulate_loads(&mut self, host_bytes_per_sec: f64, disk_bytes_per_sec: f64) {
        self.simulated = Some(SimulatedLoads {
            host_bytes_per_sec,
            disk_bytes_per_sec,
            pending: Duration::ZERO,
        });
    }

    /// The simulated time of the loads since the last call: what the step waits for.
    pub fn take_load_time(&mut self) -> Duration {
        self.simulated
            .as_mut()
            .map_or(Duration::ZERO, |s| std::mem::take(&mut s.pending))
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

    fn load(&mut self, hashes: &[BlockHash], blocks: &[BlockId]) -> usize {
        let tiers: Vec<Option<TierKind>> = match self.tiers.simulated {
            Some(_) => hashes.iter().map(|h| self.tiers.kvbm.tier_of(h.sequence)).collect(),
            None => Vec::new(),
        };
        let loaded = self.tiers.kvbm.load(hashes, blocks, self.bytes);
        let bytes = self.tiers.block_bytes as f64;
        if let Some(sim) = &mut self.tiers.simulated {
            for tier in tiers.iter().take(loaded).flatten() {
                let rate = match tier {
                    TierKind::Host => sim.host_bytes_per_sec,
                    TierKind::Disk => sim.disk_bytes_per_sec,
                };
                sim.pending += Duration::from_secs_f64(bytes / rate);
            }
        }
        loaded
    }
}
