//! The block manager an engine's loop owns: it offers blocks its pool registers (or
//! evicts) to host memory, promotes blocks seen often enough from host memory to disk, and
//! loads a request's blocks back into the pool when its prefix misses there but hits below.
//!
//! Offloads run on the engine's thread between steps ([`Kvbm::drain`] after each step), so
//! a pool block never changes under its copy. Loads from host memory run there too, as the
//! request is admitted (on a CPU a copy on another thread would only move the same memcpy);
//! loads from disk and prefetches run on the copier's thread ([`onboard`]), beside the
//! steps. On a GPU every copy would be enqueued on a copy stream and fenced before the step
//! that reads it. Every copy holds a lease on its tier slot, so that nothing evicts a block
//! while it is read.

mod onboard;
pub use onboard::Loading;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use turbine_tokens::{BlockHash, HashMapOfHashes};
use turbine_transfer::{Agent, AgentOptions, Compat};

use crate::bucket::TokenBucket;
use crate::config::{KvbmConfig, OffloadMode, PoolShape, PrefetchPolicy, Sizes};
use crate::copier::Copier;
use crate::policy::{self, Key, Millis};
use crate::stats::{KvbmStats, Path, Skip, TierKind};
use crate::store::{BlockMeta, DiskFile, Store};
use crate::tier::{Placed, Refused, Tier};
use crate::KvbmError;

/// The engine's own KV storage, block by block, as the tiers copy it: each block's bytes as
/// pieces in a fixed order (the same order for reading and writing).
pub trait BlockBytes {
    /// `None` if `block` is not a block of the pool.
    fn pieces(&self, block: u32) -> Option<Vec<&[u8]>>;
    fn pieces_mut(&mut self, block: u32) -> Option<Vec<&mut [u8]>>;
}

/// An engine that simulates its KV: blocks have no bytes.
#[derive(Debug, Default)]
pub struct NoBytes;

impl BlockBytes for NoBytes {
    fn pieces(&self, _: u32) -> Option<Vec<&[u8]>> {
        Some(Vec::new())
    }

    fn pieces_mut(&mut self, _: u32) -> Option<Vec<&mut [u8]>> {
        Some(Vec::new())
    }
}

/// A change to what a tier holds, for the engine to publish as a KV event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierEvent {
    Stored { tier: TierKind, block: BlockMeta },
    Removed { tier: TierKind, key: Key },
}

pub struct Kvbm {
    host: Option<Tier>,
    disk: Option<Tier>,
    config: KvbmConfig,
    block_bytes: usize,
    block_tokens: usize,
    start: Instant,
    /// Blocks the pool registered, waiting for their copy down (write-through).
    queue: VecDeque<(u32, BlockMeta)>,
    /// Host blocks seen often enough to be written to disk.
    to_disk: VecDeque<Key>,
    host_bucket: Option<TokenBucket>,
    disk_bucket: Option<TokenBucket>,
    /// Sightings of blocks offered straight to disk before they reach it.
    seen: HashMapOfHashes<u32>,
    /// Blocks loaded since the last drain: the pool registers them again, and their offer
    /// back down is the same use as the load, not a second sighting.
    loaded: HashMapOfHashes<()>,
    events: Vec<TierEvent>,
    scratch: Vec<u8>,
    stats: Arc<KvbmStats>,
    /// Seconds per block loaded, host and disk, as measured (an exponential average).
    load_secs: [Option<f64>; 2],
    copies: onboard::Copies,
    _agent: Option<Arc<Agent>>,
}

impl std::fmt::Debug for Kvbm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kvbm")
            .field("host", &self.host.as_ref().map(|t| (t.len(), t.capacity())))
            .field("disk", &self.disk.as_ref().map(|t| (t.len(), t.capacity())))
            .finish_non_exhaustive()
    }
}

impl Kvbm {
    /// The tiers `config` asks for below a pool of `pool`'s shape, whose blocks hold
    /// `block_tokens` tokens. A disk tier reopens the blocks its file holds, announced as
    /// the first events.
    pub fn new(config: KvbmConfig, pool: PoolShape, block_tokens: usize) -> Result<Self, KvbmError> {
        let Sizes { host, disk } = config.sizes(&pool)?;
        let bb = pool.block_bytes;
        let agent = if bb > 0 && !pool.simulated {
            let compat = Compat::new([("kv", format!("{:016x}", pool.compat))]);
            Some(Arc::new(Agent::new(AgentOptions::new("kvbm", compat))?))
        } else {
            None
        };
        let build = |kind, capacity| policy::build(kind, capacity, &config.policy);
        let host_tier = match (&agent, config.host.is_set()) {
            (_, false) => None,
            (Some(a), true) => Some(Tier::new(
                "host",
                host,
                build(config.host_policy, host),
                Store::host(a.clone(), host, bb)?,
            )),
            (None, true) => Some(Tier::new(
                "host",
                host,
                build(config.host_policy, host),
                Store::Metadata,
            )),
        };
        let mut events = Vec::new();
        let disk_tier = match (&agent, config.disk.is_set(), &config.disk_dir) {
            (_, false, _) | (_, true, None) => None,
            (Some(a), true, Some(dir)) => {
                let (file, entries) = DiskFile::open(a.clone(), dir, pool.compat, disk, bb)?;
                tracing::info!(path = %file.path().display(), blocks = entries.len(), "disk tier opened");
                let mut tier = Tier::new("disk", disk, build(config.disk_policy, disk), Store::Disk(file));
                events.extend(entries.iter().map(|(_, m)| TierEvent::Stored {
                    tier: TierKind::Disk,
                    block: *m,
                }));
                tier.restore(entries, 0);
                Some(tier)
            }
            (None, true, Some(_)) => Some(Tier::new(
                "disk",
                disk,
                build(config.disk_policy, disk),
                Store::Metadata,
            )),
        };
        // A burst of a tenth of a second of credit, and at least one block, so that
        // copies go in batches but a large block is never stuck.
        let bucket = |rate: Option<f64>| rate.map(|r| TokenBucket::new(r, (r / 10.0).max(bb as f64)));
        let stats = Arc::new(KvbmStats::default());
        if let Some(t) = &host_tier {
            *stats.host_policy.lock() = t.policy_name();
            stats
                .host_capacity
                .store(t.capacity() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(t) = &disk_tier {
            *stats.disk_policy.lock() = t.policy_name();
            stats
                .disk_capacity
                .store(t.capacity() as u64, std::sync::atomic::Ordering::Relaxed);
            stats
                .disk_blocks
                .store(t.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        // Reads from disk run on a thread of their own; host memory is read in place.
        let copier = match &disk_tier {
            Some(_) if agent.is_some() => Some(Copier::start().map_err(|source| KvbmError::Io {
                path: config.disk_dir.clone().unwrap_or_default(),
                what: "starting the copier thread",
                source,
            })?),
            _ => None,
        };
        Ok(Self {
            copies: onboard::Copies::new(copier),
            host_bucket: bucket(config.host_bytes_per_sec),
            disk_bucket: bucket(config.disk_bytes_per_sec),
            host: host_tier,
            disk: disk_tier,
            config,
            block_bytes: bb,
            block_tokens,
            start: Instant::now(),
            queue: VecDeque::new(),
            to_disk: VecDeque::new(),
            seen: HashMapOfHashes::default(),
            loaded: HashMapOfHashes::default(),
            events,
            scratch: Vec::new(),
            stats,
            load_secs: [None; 2],
            _agent: agent,
        })
    }

    pub fn stats(&self) -> Arc<KvbmStats> {
        self.stats.clone()
    }

    /// Blocks held and slots, per tier present.
    pub fn usage(&self) -> Vec<(TierKind, usize, usize)> {
        let mut out = Vec::new();
        if let Some(t) = &self.host {
            out.push((TierKind::Host, t.len(), t.capacity()));
        }
        if let Some(t) = &self.disk {
            out.push((TierKind::Disk, t.len(), t.capacity()));
        }
        out
    }

    /// The policy each tier runs.
    pub fn policies(&self) -> Vec<(TierKind, &'static str)> {
        let mut out = Vec::new();
        if let Some(t) = &self.host {
            out.push((TierKind::Host, t.policy_name()));
        }
        if let Some(t) = &self.disk {
            out.push((TierKind::Disk, t.policy_name()));
        }
        out
    }

    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn now_ms(&self) -> Millis {
        self.now().as_millis() as Millis
    }

    fn tier_mut(&mut self, kind: TierKind) -> Option<&mut Tier> {
        match kind {
            TierKind::Host => self.host.as_mut(),
            TierKind::Disk => self.disk.as_mut(),
        }
    }

    /// The tier holding `key`, host first.
    pub fn tier_of(&self, key: Key) -> Option<TierKind> {
        if self.host.as_ref().is_some_and(|t| t.get(key).is_some()) {
            Some(TierKind::Host)
        } else if self.disk.as_ref().is_some_and(|t| t.get(key).is_some()) {
            Some(TierKind::Disk)
        } else {
            None
        }
    }

    /// How many leading blocks of `hashes` the tiers hold, and are worth loading: none if
    /// loading them is estimated to take longer than recomputing, at
    /// `recompute_secs_per_block` (unknown: loading is assumed to win). With prefetching
    /// on, only blocks in host memory count: disk blocks come up through it. Changes
    /// nothing.
    pub fn held(&self, hashes: &[BlockHash], recompute_secs_per_block: Option<f64>) -> usize {
        let mut n = 0;
        let mut copy_secs = 0.0;
        let prefetching = self.config.prefetch != PrefetchPolicy::Off;
        for h in hashes {
            let Some(tier) = self.tier_of(h.sequence) else { break };
            if prefetching && tier == TierKind::Disk {
                break;
            }
            copy_secs += self.load_secs[(tier == TierKind::Disk) as usize].unwrap_or(0.0);
            n += 1;
        }
        if let Some(r) = recompute_secs_per_block {
            if n > 0 && copy_secs > r * n as f64 {
                KvbmStats::add(&self.stats.onboard_skipped_slower, 1);
                return 0;
            }
        }
        n
    }

    /// A request was admitted that looked up the blocks of `hashes` (after `parent`) below
    /// the pool and found none of them: each tier's policy learns of the misses.
    pub fn missed(&mut self, hashes: &[BlockHash], parent: Option<Key>) {
        let now = self.now_ms();
        for tier in [&mut self.host, &mut self.disk].into_iter().flatten() {
            let mut parent = parent;
            for h in hashes {
                tier.miss(h.sequence, parent, now);
                parent = Some(h.sequence);
            }
        }
    }

    /// A request used `key` from `kind`: tell its policy, and queue a host block seen often
    /// enough for the disk.
    fn sighted(&mut self, kind: TierKind, key: Key, now: Millis) {
        let tier = match kind {
            TierKind::Host => self.host.as_mut(),
            TierKind::Disk => self.disk.as_mut(),
        };
        let Some(tier) = tier else { return };
        let seen = tier.touch(key, now);
        if kind == TierKind::Host && seen == self.config.disk_after_sightings {
            self.queue_for_disk(key);
        }
    }

    fn queue_for_disk(&mut self, key: Key) {
        if self.disk.as_ref().is_some_and(|d| d.get(key).is_none()) {
            self.to_disk.push_back(key);
        }
    }

    /// Blocks the pool has just registered, at `(block, meta)`: queued for their copy down
    /// when offloading writes through.
    pub fn registered(&mut self, blocks: impl IntoIterator<Item = (u32, BlockMeta)>) {
        if self.config.offload != OffloadMode::WriteThrough {
            return;
        }
        for job in blocks {
            if self.queue.len() >= self.config.queue_blocks {
                self.stats.skipped(Skip::QueueFull);
                continue;
            }
            self.queue.push_back(job);
        }
        self.stats
            .queue_depth
            .store(self.queue.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Blocks the pool is evicting, whose bytes are still intact: copied down now when
    /// offloading writes back (their bytes are reused as soon as the caller goes on).
    pub fn evicted(&mut self, blocks: impl IntoIterator<Item = (u32, BlockMeta)>, pool: &dyn BlockBytes) {
        if self.config.offload != OffloadMode::WriteBack {
            return;
        }
        let now = self.now();
        for (block, meta) in blocks {
            if self.present_below(meta.hash.sequence) {
                self.stats.skipped(Skip::Present);
                continue;
            }
            if !self.take_credit(now) {
                self.stats.skipped(Skip::Bandwidth);
                continue;
            }
            if let Some(pieces) = pool.pieces(block) {
                self.offer_down(meta, &pieces);
            }
        }
    }

    /// Whether the first tier below the pool has `key` (host, or disk without a host).
    fn present_below(&self, key: Key) -> bool {
        match (&self.host, &self.disk) {
            (Some(h), _) => h.get(key).is_some(),
            (None, Some(d)) => d.get(key).is_some(),
            (None, None) => true,
        }
    }

    fn take_credit(&mut self, now: Duration) -> bool {
        let bucket = if self.host.is_some() {
            &mut self.host_bucket
        } else {
            &mut self.disk_bucket
        };
        bucket.as_mut().is_none_or(|b| b.take(self.block_bytes as u64, now))
    }

    /// Runs queued copies within the bandwidth limits, at most the in-flight cap of each:
    /// pool blocks down to the first tier below (skipping those `holds(block, key)` says the
    /// pool has reused), then host blocks to disk. Expires idle blocks under a TTL policy.
    pub fn drain(&mut self, pool: &dyn BlockBytes, holds: &dyn Fn(u32, Key) -> bool) {
        let now = self.now();
        let mut copies = 0;
        while copies < self.config.max_in_flight {
            let Some(&(block, meta)) = self.queue.front() else {
                break;
            };
            let key = meta.hash.sequence;
            if !holds(block, key) {
                self.queue.pop_front();
                self.stats.skipped(Skip::SourceGone);
                continue;
            }
            if self.present_below(key) {
                self.queue.pop_front();
                if self.loaded.remove(&key).is_none() {
                    let ms = now.as_millis() as Millis;
                    match self.host.is_some() {
                        true => self.sighted(TierKind::Host, key, ms),
                        false => self.sighted(TierKind::Disk, key, ms),
                    }
                }
                self.stats.skipped(Skip::Present);
                continue;
            }
            if self.host.is_none() && !self.seen_enough(key) {
                self.queue.pop_front();
                self.stats.skipped(Skip::Unseen);
                continue;
            }
            if !self.take_credit(now) {
                break;
            }
            self.queue.pop_front();
            if let Some(pieces) = pool.pieces(block) {
                self.offer_down(meta, &pieces);
            }
            copies += 1;
        }
        self.stats
            .queue_depth
            .store(self.queue.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if self.queue.is_empty() {
            self.loaded.clear();
        }
        let mut copies = 0;
        while copies < self.config.max_in_flight {
            let Some(&key) = self.to_disk.front() else { break };
            if self
                .disk_bucket
                .as_mut()
                .is_some_and(|b| !b.take(self.block_bytes as u64, now))
            {
                break;
            }
            self.to_disk.pop_front();
            self.host_to_disk(key);
            copies += 1;
        }
        self.expire();
        for (tier, gauge) in [
            (&self.host, &self.stats.host_blocks),
            (&self.disk, &self.stats.disk_blocks),
        ] {
            if let Some(t) = tier {
                gauge.store(t.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Counts a sighting of a block bound straight for disk; true once it has enough.
    fn seen_enough(&mut self, key: Key) -> bool {
        let need = self.config.disk_after_sightings;
        if need <= 1 {
            return true;
        }
        // Bounded: forgetting old sightings only delays a block's first write.
        let limit = 4 * self.disk.as_ref().map_or(0, |d| d.capacity()).max(1024);
        if self.seen.len() >= limit {
            self.seen.clear();
        }
        let n = self.seen.entry(key).or_insert(0);
        *n += 1;
        if *n >= need {
            self.seen.remove(&key);
            true
        } else {
            false
        }
    }

    /// Stores a pool block's `pieces` in the first tier below the pool.
    fn offer_down(&mut self, meta: BlockMeta, pieces: &[&[u8]]) {
        let (kind, path) = if self.host.is_some() {
            (TierKind::Host, Path::OffloadD2h)
        } else {
            (TierKind::Disk, Path::OffloadD2d)
        };
        if self.store(kind, path, meta, pieces) && kind == TierKind::Host && self.config.disk_after_sightings <= 1 {
            self.queue_for_disk(meta.hash.sequence);
        }
    }

    fn host_to_disk(&mut self, key: Key) {
        let (Some(host), true) = (self.host.as_mut(), self.disk.is_some()) else {
            return;
        };
        let Some(slot) = host.get(key) else { return };
        let Some(meta) = host.meta(slot) else { return };
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(self.block_bytes, 0);
        host.lease(slot);
        let read = host.store.read(slot, self.block_bytes, &mut [&mut scratch[..]]);
        host.unlease(slot);
        match read {
            Ok(()) => {
                self.store(TierKind::Disk, Path::OffloadH2d, meta, &[&scratch[..]]);
            }
            Err(e) => tracing::warn!(error = %e, "reading a host block for the disk tier"),
        }
        self.scratch = scratch;
    }

    /// Places and writes one block in tier `kind`; true if it is stored there now.
    fn store(&mut self, kind: TierKind, path: Path, meta: BlockMeta, pieces: &[&[u8]]) -> bool {
        let now = self.now_ms();
        let bb = self.block_bytes;
        let tier = match kind {
            TierKind::Host => self.host.as_mut(),
            TierKind::Disk => self.disk.as_mut(),
        };
        let Some(tier) = tier else { return false };
        let started = Instant::now();
        let placed = match tier.place(meta, now) {
            Ok(Ok(placed)) => placed,
            Ok(Err(refused)) => {
                self.stats.skipped(match refused {
                    Refused::Present => Skip::Present,
                    Refused::NotAdmitted => Skip::NotAdmitted,
                    Refused::Full => Skip::TargetFull,
                });
                return false;
            }
            Err(e) => {
                tracing::warn!(tier = kind.label(), error = %e, "making room in a KV tier");
                return false;
            }
        };
        let Placed { slot, evicted } = placed;
        if let Some(gone) = evicted {
            KvbmStats::add(
                match kind {
                    TierKind::Host => &self.stats.host_evictions,
                    TierKind::Disk => &self.stats.disk_evictions,
                },
                1,
            );
            self.events.push(TierEvent::Removed {
                tier: kind,
                key: gone.hash.sequence,
            });
        }
        if let Err(e) = tier.store.write(slot, bb, &meta, pieces) {
            tracing::warn!(tier = kind.label(), error = %e, "writing a KV block to its tier");
            let _ = tier.remove(meta.hash.sequence);
            return false;
        }
        self.stats.copied(path, 1, bb as u64, started.elapsed());
        self.events.push(TierEvent::Stored {
            tier: kind,
            block: meta,
        });
        true
    }

    fn expire(&mut self) {
        let now = self.now_ms();
        for (kind, tier) in [(TierKind::Host, &mut self.host), (TierKind::Disk, &mut self.disk)] {
            let Some(tier) = tier else { continue };
            match tier.expire(now) {
                Ok(gone) => {
                    for m in gone {
                        self.events.push(TierEvent::Removed {
                            tier: kind,
                            key: m.hash.sequence,
                        });
                    }
                }
                Err(e) => tracing::warn!(tier = kind.label(), error = %e, "expiring KV blocks"),
            }
        }
    }

    /// Marks blocks an operator wants kept (a system prompt's), present or to come: never
    /// evicted from any tier. Refused if they would fill more than half a tier, which
    /// would leave too little room for everything else.
    pub fn pin(&mut self, keys: &[Key]) -> Result<(), KvbmError> {
        for t in [&self.host, &self.disk].into_iter().flatten() {
            let pinned = keys.iter().filter(|&&k| !t.is_pinned(k)).count() + t.pinned();
            if pinned > t.capacity() / 2 {
                return Err(KvbmError::Config(format!(
                    "{pinned} pinned blocks are more than half of the {} tier's {} blocks",
                    t.name(),
                    t.capacity()
                )));
            }
        }
        for t in [&mut self.host, &mut self.disk].into_iter().flatten() {
            for &k in keys {
                t.pin(k);
            }
        }
        Ok(())
    }

    pub fn unpin(&mut self, keys: &[Key]) {
        for t in [&mut self.host, &mut self.disk].into_iter().flatten() {
            for &k in keys {
                t.unpin(k);
            }
        }
    }

    /// Changes to the tiers since the last call, in order.
    pub fn take_events(&mut self) -> Vec<TierEvent> {
        std::mem::take(&mut self.events)
    }

    /// Every block each tier holds, for a snapshot of the worker's cache.
    pub fn snapshot(&self) -> Vec<(TierKind, BlockMeta)> {
        let mut out = Vec::new();
        for (kind, t) in [(TierKind::Host, &self.host), (TierKind::Disk, &self.disk)] {
            if let Some(t) = t {
                out.extend(t.blocks().map(|m| (kind, m)));
            }
        }
        out
    }

    /// Copies queued and not yet run.
    pub fn pending(&self) -> usize {
        self.queue.len() + self.to_disk.len()
    }

    /// Checks every tier's invariants, and that the only leased slots are those of copies
    /// in flight: what a leak would break.
    pub fn audit(&self) -> Result<(), String> {
        for (kind, t) in [(TierKind::Host, &self.host), (TierKind::Disk, &self.disk)] {
            let Some(t) = t else { continue };
            t.audit()?;
            let expected = self.copies.leases(kind);
            if t.leased() != expected {
                return Err(format!(
                    "{}: {} slots leased, {expected} by copies in flight",
                    t.name(),
                    t.leased()
                ));
            }
        }
        Ok(())
    }

    /// Panics unless [`Kvbm::audit`] passes; for tests.
    pub fn check(&self) {
        if let Err(e) = self.audit() {
            panic!("{e}");
        }
    }
}
