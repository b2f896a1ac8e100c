//! Loads into the pool, and prefetches from disk to host memory, that outlast the call that
//! starts them: disk reads run on the copier's thread (an engine that simulates its KV
//! gives them the simulated time of their bytes instead), and finish between steps, when
//! the engine's thread scatters them into the pool's blocks or stores them in host memory.
//!
//! Ownership during a copy: the source slot is leased (no policy evicts it), and the
//! destination pool blocks belong to the caller, which neither registers them nor lets
//! anything else read or reuse them until the load is reported finished.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use turbine_tokens::{BlockHash, HashMapOfHashes};

use super::{BlockBytes, Kvbm, TierEvent};
use crate::config::PrefetchPolicy;
use crate::copier::{Copier, Done, Job, Waker};
use crate::policy::Key;
use crate::stats::{KvbmStats, Path, TierKind};
use crate::store::BlockMeta;
use crate::tier::SlotId;

/// What became of a load as it was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loading {
    /// Finished in the call: this many leading blocks were loaded.
    Done(usize),
    /// Still copying: [`Kvbm::finish`] reports it under its tag.
    Pending,
}

#[derive(Debug, Clone, Copy)]
struct Item {
    kind: TierKind,
    key: Key,
    slot: SlotId,
    /// The pool block a load writes (unused by a prefetch).
    block: u32,
    meta: Option<BlockMeta>,
}

enum Kind {
    /// A load for the caller's `tag`; `first` blocks before the items were loaded at once.
    Load { tag: u64, first: usize },
    /// A prefetch for the request of `tag`, which holds what arrives.
    Prefetch { tag: u64 },
}

struct InFlight {
    kind: Kind,
    items: Vec<Item>,
    /// Leading items copied so far, and whether one failed (none after it counts).
    done: usize,
    broken: bool,
}

impl InFlight {
    fn new(kind: Kind, items: Vec<Item>) -> Self {
        Self {
            kind,
            items,
            done: 0,
            broken: false,
        }
    }

    fn items(&self) -> &[Item] {
        &self.items
    }
}

/// Copies of an engine that simulates its KV: one copy engine, so that each waits for the
/// one before.
struct Simulated {
    host_bytes_per_sec: f64,
    disk_bytes_per_sec: f64,
    /// When the copy engine is next free.
    free_at: Duration,
    /// Jobs by the time they finish, in order (the copy engine runs them in turn).
    ready: VecDeque<(Duration, u64)>,
}

/// A request's prefetch, as admission waits on it.
struct Wait {
    arrived: Duration,
    jobs: Vec<u64>,
}

#[derive(Default)]
pub(super) struct Copies {
    copier: Option<Copier>,
    jobs: HashMap<u64, InFlight>,
    next: u64,
    sim: Option<Simulated>,
    /// Results collected while [`Kvbm::load`] waited for its own.
    early: Vec<(u64, usize)>,
    waits: HashMap<u64, Wait>,
    /// Blocks a prefetch is bringing up, and its job.
    prefetching: HashMapOfHashes<u64>,
    /// Host slots held (leased) for the waiting requests that prefetched them, until each
    /// is admitted: without, the prefetches of requests queued together evict each other's
    /// blocks before any is admitted.
    held: HashMap<u64, Vec<SlotId>>,
}

impl Copies {
    pub(super) fn new(copier: Option<Copier>) -> Self {
        Self {
            copier,
            ..Self::default()
        }
    }

    /// Leases on slots of `kind`: copies in flight, and host blocks held for requests.
    pub(super) fn leases(&self, kind: TierKind) -> usize {
        let copies = self
            .jobs
            .values()
            .flat_map(|j| j.items())
            .filter(|i| i.kind == kind)
            .count();
        copies + if kind == TierKind::Host { self.reserved() } else { 0 }
    }

    /// Host blocks held for requests.
    fn reserved(&self) -> usize {
        self.held.values().map(Vec::len).sum()
    }

    /// Host slots prefetching takes now or will on arrival: what its budget counts.
    fn prefetch_load(&self) -> usize {
        let coming: usize = self
            .jobs
            .values()
            .filter(|j| matches!(j.kind, Kind::Prefetch { .. }))
            .map(|j| j.items.len())
            .sum();
        coming + self.reserved()
    }
}

impl Kvbm {
    /// Copies take simulated time at these rates (bytes per second), for an engine that
    /// simulates its KV: loads and prefetches finish when [`Kvbm::finish`] is called with
    /// a `now` past their end.
    pub fn simulate_copies(&mut self, host_bytes_per_sec: f64, disk_bytes_per_sec: f64) {
        self.copies.sim = Some(Simulated {
            host_bytes_per_sec,
            disk_bytes_per_sec,
            free_at: Duration::ZERO,
            ready: VecDeque::new(),
        });
    }

    /// Called from the copier's thread whenever a copy finishes.
    pub fn set_waker(&mut self, waker: Waker) {
        if let Some(c) = &self.copies.copier {
            c.set_waker(waker);
        }
    }

    /// Whether requests' arrivals start prefetches.
    pub fn prefetches(&self) -> bool {
        self.config.prefetch != PrefetchPolicy::Off
    }

    /// Loads and prefetches not yet reported finished.
    pub fn in_flight(&self) -> usize {
        self.copies.jobs.len()
    }

    /// When the next simulated copy finishes, if one runs.
    pub fn next_ready(&self) -> Option<Duration> {
        self.copies.sim.as_ref()?.ready.front().map(|&(t, _)| t)
    }

    /// Starts copying the blocks of `hashes` (as [`Kvbm::held`] found them) into the
    /// pool's `blocks`, for the caller's `tag`. Leading blocks in host memory are copied at
    /// once; from the first block on disk on, the rest is read on the copier's thread.
    pub fn start_load(
        &mut self,
        tag: u64,
        hashes: &[BlockHash],
        blocks: &[u32],
        pool: &mut dyn BlockBytes,
        now: Duration,
    ) -> Loading {
        let mut first = 0;
        let mut items = Vec::new();
        let prefetching = self.config.prefetch != PrefetchPolicy::Off;
        for (h, &block) in hashes.iter().zip(blocks) {
            let key = h.sequence;
            let Some(kind) = self.tier_of(key) else { break };
            if prefetching && kind == TierKind::Disk {
                break;
            }
            let at_once = items.is_empty()
                && self.copies.sim.is_none()
                && (kind == TierKind::Host || self.copies.copier.is_none());
            let Some(tier) = self.tier_mut(kind) else { break };
            let Some(slot) = tier.get(key) else { break };
            if at_once {
                if !self.copy_now(kind, key, slot, block, pool) {
                    break;
                }
                first += 1;
            } else {
                tier.lease(slot);
                items.push(Item {
                    kind,
                    key,
                    slot,
                    block,
                    meta: None,
                });
            }
        }
        if items.is_empty() {
            KvbmStats::add(&self.stats.matched_tokens, (first * self.block_tokens) as u64);
            return Loading::Done(first);
        }
        match self.submit(InFlight::new(Kind::Load { tag, first }, items), now) {
            Some(_) => Loading::Pending,
            None => {
                KvbmStats::add(&self.stats.matched_tokens, (first * self.block_tokens) as u64);
                Loading::Done(first)
            }
        }
    }

    /// Loads as [`Kvbm::start_load`] does and waits for the copy: for a caller with no
    /// other copy in flight (tests, benchmarks); others' results wait for the next
    /// [`Kvbm::finish`]. Returns how many leading blocks were loaded: fewer if a block has
    /// gone or a copy failed (that block is dropped from its tier, as it cannot be trusted).
    pub fn load(&mut self, hashes: &[BlockHash], blocks: &[u32], pool: &mut dyn BlockBytes) -> usize {
        const TAG: u64 = u64::MAX;
        if let Loading::Done(n) = self.start_load(TAG, hashes, blocks, pool, Duration::ZERO) {
            return n;
        }
        loop {
            let mut found = None;
            for (tag, n) in self.finish(pool, Duration::MAX) {
                if tag == TAG {
                    found = Some(n);
                } else {
                    self.copies.early.push((tag, n));
                }
            }
            if let Some(n) = found {
                return n;
            }
            let Some(copier) = self.copies.copier.as_ref() else {
                return self.abandon(TAG);
            };
            match copier.wait_done(Duration::from_secs(1)) {
                Ok(Some(d)) => {
                    let mut out = Vec::new();
                    self.complete(d.id, Some(d), pool, &mut out);
                    self.copies.early.extend(out);
                }
                Ok(None) => {}
                Err(_) => return self.abandon(TAG),
            }
        }
    }

    /// Gives up the load of `tag`, whose copies will not finish.
    fn abandon(&mut self, tag: u64) -> usize {
        tracing::error!("the KV copier has stopped; the blocks it was loading are recomputed");
        let id = self
            .copies
            .jobs
            .iter()
            .find(|(_, j)| matches!(j.kind, Kind::Load { tag: t, .. } if t == tag))
            .map(|(&id, _)| id);
        id.and_then(|id| self.drop_job(id)).map_or(0, |(_, n)| n)
    }

    /// Drops job `id`, whose copies will not finish: its leases are given back, and for a
    /// load, (tag, what it loaded before).
    fn drop_job(&mut self, id: u64) -> Option<(u64, usize)> {
        let job = self.copies.jobs.remove(&id)?;
        for i in &job.items {
            if let Some(t) = self.tier_mut(i.kind) {
                t.unlease(i.slot);
            }
            if self.copies.prefetching.get(&i.key) == Some(&id) {
                self.copies.prefetching.remove(&i.key);
            }
        }
        match job.kind {
            Kind::Load { tag, first } => Some((tag, first + job.done)),
            Kind::Prefetch { .. } => None,
        }
    }

    /// Collects finished copies: loads are scattered into the pool and reported as (tag,
    /// leading blocks loaded); prefetched blocks are stored in host memory.
    pub fn finish(&mut self, pool: &mut dyn BlockBytes, now: Duration) -> Vec<(u64, usize)> {
        let mut out = std::mem::take(&mut self.copies.early);
        while let Some(d) = self.copies.copier.as_ref().and_then(|c| c.try_done()) {
            self.complete(d.id, Some(d), pool, &mut out);
        }
        if self.copies.copier.as_ref().is_some_and(|c| c.is_gone()) && self.copies.sim.is_none() {
            let ids: Vec<u64> = self.copies.jobs.keys().copied().collect();
            if !ids.is_empty() {
                tracing::error!("the KV copier has stopped; the blocks it was loading are recomputed");
            }
            out.extend(ids.into_iter().filter_map(|id| self.drop_job(id)));
        }
        while let Some(&(at, id)) = self.copies.sim.as_ref().and_then(|s| s.ready.front()) {
            if at > now {
                break;
            }
            if let Some(s) = &mut self.copies.sim {
                s.ready.pop_front();
            }
            self.complete(id, None, pool, &mut out);
        }
        out
    }

    /// A request arrived whose blocks `hashes` follow what the pool holds: those only on
    /// disk start up to host memory, so that they load from there when it is admitted.
    pub fn prefetch(&mut self, tag: u64, hashes: &[BlockHash], now: Duration) {
        if self.config.prefetch == PrefetchPolicy::Off {
            return;
        }
        // Half the host tier at most, for one request and for all together, counting the
        // request's blocks already there: more would evict the blocks it brings up (or
        // holds) to bring up others.
        let half = self.host.as_ref().map_or(0, |h| h.capacity() / 2);
        let mut budget = half.saturating_sub(self.copies.prefetch_load());
        let mut jobs = Vec::new();
        let mut items = Vec::new();
        for h in hashes.iter().take(half) {
            let key = h.sequence;
            if let Some(slot) = self.host.as_ref().and_then(|t| t.get(key)) {
                // Held for the request from now, as if it had just come up.
                let held = self.copies.held.entry(tag).or_default();
                if !held.contains(&slot) {
                    if budget == 0 {
                        break;
                    }
                    budget -= 1;
                    held.push(slot);
                    if let Some(t) = self.host.as_mut() {
                        t.lease(slot);
                    }
                }
                continue;
            }
            if let Some(&job) = self.copies.prefetching.get(&key) {
                if !jobs.contains(&job) {
                    jobs.push(job);
                }
                continue;
            }
            let Some(disk) = self.disk.as_mut() else { break };
            let Some(slot) = disk.get(key) else { break };
            if budget == 0 {
                break;
            }
            budget -= 1;
            disk.lease(slot);
            items.push(Item {
                kind: TierKind::Disk,
                key,
                slot,
                block: 0,
                meta: disk.meta(slot),
            });
        }
        if !items.is_empty() {
            let keys: Vec<Key> = items.iter().map(|i| i.key).collect();
            if let Some(id) = self.submit(InFlight::new(Kind::Prefetch { tag }, items), now) {
                for k in keys {
                    self.copies.prefetching.insert(k, id);
                }
                jobs.push(id);
            }
        }
        if !jobs.is_empty() {
            // A request keeps the time it first waited: a timeout runs from its arrival.
            let wait = self.copies.waits.entry(tag).or_insert(Wait {
                arrived: now,
                jobs: Vec::new(),
            });
            for j in jobs {
                if !wait.jobs.contains(&j) {
                    wait.jobs.push(j);
                }
            }
        }
    }

    /// Whether the request of `tag`, its blocks after the pool's prefix being `hashes` now,
    /// may be admitted as far as its prefetch goes. Blocks that left the pool for disk since
    /// it arrived start up now, and are waited for as its policy says.
    pub fn admissible(&mut self, tag: u64, hashes: &[BlockHash], now: Duration) -> bool {
        if self.config.prefetch == PrefetchPolicy::Off {
            return true;
        }
        self.prefetch(tag, hashes, now);
        let Some(wait) = self.copies.waits.get(&tag) else {
            return true;
        };
        let done = wait.jobs.iter().all(|j| !self.copies.jobs.contains_key(j));
        let ready = done
            || match self.config.prefetch {
                PrefetchPolicy::Off | PrefetchPolicy::BestEffort => true,
                PrefetchPolicy::WaitComplete => false,
                PrefetchPolicy::Timeout(t) => now.saturating_sub(wait.arrived) >= t,
            };
        if ready && !done {
            KvbmStats::add(&self.stats.prefetch_abandoned, 1);
        }
        ready
    }

    /// The request of `tag` was admitted (and has loaded what it held) or has ended: its
    /// prefetch goes on unwaited, and the host blocks held for it may be evicted again.
    pub fn forget(&mut self, tag: u64) {
        self.copies.waits.remove(&tag);
        for slot in self.copies.held.remove(&tag).unwrap_or_default() {
            if let Some(t) = self.host.as_mut() {
                t.unlease(slot);
            }
        }
    }

    /// Holds `key`'s host slot for the request of `tag`, if it still waits.
    fn hold_for(&mut self, tag: u64, key: Key) {
        if !self.copies.waits.contains_key(&tag) {
            return;
        }
        let Some(host) = self.host.as_mut() else { return };
        let Some(slot) = host.get(key) else { return };
        let held = self.copies.held.entry(tag).or_default();
        if !held.contains(&slot) {
            host.lease(slot);
            held.push(slot);
        }
    }

    /// Copies one block from host memory (or, with no copier, disk) into the pool now.
    fn copy_now(&mut self, kind: TierKind, key: Key, slot: SlotId, block: u32, pool: &mut dyn BlockBytes) -> bool {
        let bb = self.block_bytes;
        let Some(tier) = self.tier_mut(kind) else { return false };
        let Some(mut pieces) = pool.pieces_mut(block) else {
            return false;
        };
        let started = Instant::now();
        tier.lease(slot);
        let read = tier.store.read(slot, bb, &mut pieces);
        tier.unlease(slot);
        if let Err(e) = read {
            tracing::warn!(tier = kind.label(), error = %e, "loading a KV block failed; it is recomputed");
            self.drop_untrusted(kind, key);
            return false;
        }
        self.loaded_block(kind, key, started.elapsed());
        true
    }

    fn drop_untrusted(&mut self, kind: TierKind, key: Key) {
        KvbmStats::add(&self.stats.onboard_failed, 1);
        if self.tier_mut(kind).is_some_and(|t| t.remove(key).unwrap_or(false)) {
            self.events.push(TierEvent::Removed { tier: kind, key });
        }
    }

    /// Counts a block loaded from `kind` in `elapsed`, and tells its tier it was used.
    fn loaded_block(&mut self, kind: TierKind, key: Key, elapsed: Duration) {
        let (path, i, hits) = match kind {
            TierKind::Host => (Path::OnboardH2d, 0, &self.stats.host_hits),
            TierKind::Disk => (Path::OnboardD2d, 1, &self.stats.disk_hits),
        };
        KvbmStats::add(hits, 1);
        self.stats.copied(path, 1, self.block_bytes as u64, elapsed);
        let secs = elapsed.as_secs_f64();
        self.load_secs[i] = Some(self.load_secs[i].map_or(secs, |s| 0.9 * s + 0.1 * secs));
        let now = self.now_ms();
        self.sighted(kind, key, now);
        self.loaded.insert(key, ());
    }

    /// Hands `job` to the copier, or to the simulated copy engine; `None` (leases given
    /// back) if neither can take it.
    fn submit(&mut self, job: InFlight, now: Duration) -> Option<u64> {
        let id = self.copies.next;
        self.copies.next += 1;
        let bb = self.block_bytes;
        let accepted = if let Some(sim) = &mut self.copies.sim {
            let secs: f64 = job
                .items()
                .iter()
                .map(|i| {
                    bb as f64
                        / match i.kind {
                            TierKind::Host => sim.host_bytes_per_sec,
                            TierKind::Disk => sim.disk_bytes_per_sec,
                        }
                })
                .sum();
            let end = sim.free_at.max(now) + Duration::from_secs_f64(secs);
            sim.free_at = end;
            sim.ready.push_back((end, id));
            true
        } else {
            let reads: Option<Vec<_>> = job
                .items()
                .iter()
                .map(|i| {
                    let tier = match i.kind {
                        TierKind::Host => self.host.as_ref(),
                        TierKind::Disk => self.disk.as_ref(),
                    };
                    tier.and_then(|t| t.store.source(i.slot, bb))
                })
                .collect();
            match (reads, &self.copies.copier) {
                (Some(reads), Some(c)) => c.submit(Job {
                    id,
                    reads,
                    block_bytes: bb,
                }),
                _ => false,
            }
        };
        if !accepted {
            for i in job.items() {
                if let Some(t) = self.tier_mut(i.kind) {
                    t.unlease(i.slot);
                }
            }
            return None;
        }
        self.copies.jobs.insert(id, job);
        self.stats
            .in_flight
            .store(self.copies.jobs.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Some(id)
    }

    /// Applies a chunk of a job: `done` from the copier, or `None` for a simulated copy
    /// (every block arrived at once, with no bytes). A load's blocks are scattered into
    /// the pool, a prefetch's stored in host memory; the job's last chunk gives its leases
    /// back and, for a load, reports it.
    fn complete(&mut self, id: u64, done: Option<Done>, pool: &mut dyn BlockBytes, out: &mut Vec<(u64, usize)>) {
        let Some(mut job) = self.copies.jobs.remove(&id) else {
            return;
        };
        let bb = self.block_bytes;
        let n = job.items.len();
        let (first, ok, data, error, last, elapsed) = match done {
            Some(d) => (d.first, d.ok, d.data, d.error, d.last, d.elapsed),
            None => (0, n, Vec::new(), None, true, Duration::ZERO),
        };
        if let Some(e) = &error {
            tracing::warn!(error = %e, "reading KV blocks from a tier failed; they are recomputed");
        }
        let per_block = elapsed / ok.max(1) as u32;
        for j in 0..ok {
            let item = job.items[first + j];
            let bytes: &[u8] = if data.is_empty() {
                &[]
            } else {
                &data[j * bb..(j + 1) * bb]
            };
            match job.kind {
                Kind::Load { .. } => {
                    if job.broken || job.done != first + j {
                        break;
                    }
                    if !bytes.is_empty() {
                        let Some(mut pieces) = pool.pieces_mut(item.block) else {
                            job.broken = true;
                            break;
                        };
                        let mut src = bytes;
                        for p in pieces.iter_mut() {
                            let (head, rest) = src.split_at(p.len().min(src.len()));
                            p.copy_from_slice(head);
                            src = rest;
                        }
                    }
                    self.loaded_block(item.kind, item.key, per_block);
                    job.done += 1;
                }
                Kind::Prefetch { tag } => {
                    if let Some(meta) = item.meta {
                        let pieces: &[&[u8]] = if bytes.is_empty() { &[] } else { &[bytes] };
                        if self.store(TierKind::Host, Path::Prefetch, meta, pieces) {
                            self.hold_for(tag, item.key);
                        }
                    }
                }
            }
        }
        // A block whose read failed is dropped from its tier once its lease is given
        // back; a failure always ends the job.
        let untrusted = match error {
            Some(_) => job.items.get(first + ok).map(|i| (i.kind, i.key)),
            None => None,
        };
        if error.is_some() {
            job.broken = true;
        }
        if let Some(c) = self.copies.copier.as_ref().filter(|_| !data.is_empty()) {
            c.recycle(data);
        }
        if !last {
            self.copies.jobs.insert(id, job);
            return;
        }
        self.stats
            .in_flight
            .store(self.copies.jobs.len() as u64, std::sync::atomic::Ordering::Relaxed);
        for i in &job.items {
            if let Some(t) = self.tier_mut(i.kind) {
                t.unlease(i.slot);
            }
            if self.copies.prefetching.get(&i.key) == Some(&id) {
                self.copies.prefetching.remove(&i.key);
            }
        }
        if let Some((kind, key)) = untrusted {
            self.drop_untrusted(kind, key);
        }
        if let Kind::Load { tag, first } = job.kind {
            let loaded = first + job.done;
            KvbmStats::add(&self.stats.matched_tokens, (loaded * self.block_tokens) as u64);
            out.push((tag, loaded));
        }
    }
}
