//! Approximate mode: for engines that publish no KV events, the router predicts what each
//! worker caches from its own decisions. A prompt routed to a worker is taken as cached
//! there until its TTL passes or the size bound pushes it out, oldest first.
//!
//! Built on [`KvIndexer`]: predictions become the events the worker would have sent, so
//! matching is the same code and the same speed. Time is passed in, so tests control it.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use turbine_protocols::kv::{KvEvent, KvEventData, StorageTier, StoredBlock};

use crate::indexer::{IndexerError, KvIndexer, Overlaps};
use crate::WorkerId;

#[derive(Debug)]
pub struct ApproxIndexer {
    indexer: KvIndexer,
    ttl: Duration,
    max_blocks: usize,
    next_event: HashMap<WorkerId, u64>,
    /// When each predicted (worker, block) was last routed: an older queue entry for it is stale.
    latest: HashMap<(WorkerId, u64), Instant>,
    /// Predictions in the order they were made.
    queue: VecDeque<(Instant, WorkerId, u64)>,
}

impl ApproxIndexer {
    /// Predictions last `ttl`; at most `max_blocks` (worker, block) predictions are kept.
    pub fn new(ttl: Duration, max_blocks: usize) -> Self {
        Self {
            indexer: KvIndexer::new(),
            ttl,
            max_blocks,
            next_event: HashMap::new(),
            latest: HashMap::new(),
            queue: VecDeque::new(),
        }
    }

    /// `worker` was sent a prompt with these block hashes at `now`: it will have them cached.
    pub fn routed(&mut self, worker: WorkerId, hashes: &[u64], now: Instant) -> Result<(), IndexerError> {
        self.expire(now);
        let blocks = hashes
            .iter()
            .map(|&h| StoredBlock {
                sequence_hash: h,
                local_hash: h,
            })
            .collect();
        self.emit(
            worker,
            KvEventData::Stored {
                parent_hash: None,
                blocks,
                tier: StorageTier::Device,
            },
        )?;
        for &h in hashes {
            self.latest.insert((worker, h), now);
            self.queue.push_back((now, worker, h));
        }
        // The bound counts predictions, not queue entries (some of which are stale).
        while self.latest.len() > self.max_blocks {
            let Some((at, w, h)) = self.queue.pop_front() else {
                break;
            };
            self.forget(at, w, h)?;
        }
        Ok(())
    }

    pub fn find_matches(&mut self, hashes: &[u64], now: Instant) -> Overlaps {
        self.expire(now);
        self.indexer.find_matches(hashes)
    }

    pub fn remove_worker(&mut self, worker: WorkerId) {
        self.indexer.remove_worker(worker);
        self.next_event.remove(&worker);
        self.latest.retain(|(w, _), _| *w != worker);
        self.queue.retain(|(_, w, _)| *w != worker);
    }

    /// Workers with predictions.
    pub fn workers(&self) -> impl Iterator<Item = WorkerId> + '_ {
        self.indexer.workers()
    }

    /// Predicted (worker, block) pairs.
    pub fn len(&self) -> usize {
        self.latest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.latest.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(at, w, h)) = self.queue.front() {
            if now.saturating_duration_since(at) < self.ttl {
                break;
            }
            self.queue.pop_front();
            // Removing a block of a worker already known cannot hit the worker limit.
            let _ = self.forget(at, w, h);
        }
    }

    /// Drops the prediction made at `at`, unless the block was routed again since.
    fn forget(&mut self, at: Instant, worker: WorkerId, hash: u64) -> Result<(), IndexerError> {
        if self.latest.get(&(worker, hash)) != Some(&at) {
            return Ok(());
        }
        self.latest.remove(&(worker, hash));
        self.emit(
            worker,
            KvEventData::Removed {
                sequence_hashes: vec![hash],
                tier: StorageTier::Device,
            },
        )
    }

    fn emit(&mut self, worker: WorkerId, data: KvEventData) -> Result<(), IndexerError> {
        let id = self.next_event.entry(worker).or_insert(0);
        self.indexer.apply(worker, &KvEvent { event_id: *id, data })?;
        *id += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predictions_expire_and_respect_the_bound() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut ix = ApproxIndexer::new(Duration::from_secs(10), 5);
        ix.routed(1, &[1, 2, 3], t0).unwrap();
        ix.routed(2, &[1, 2], t0 + s).unwrap();
        assert_eq!(ix.find_matches(&[1, 2, 3], t0 + 2 * s).scores.len(), 2);
        assert_eq!(ix.find_matches(&[1, 2, 3], t0 + 2 * s).get(1), 3);

        // Routing [1] to worker 1 again keeps block 1 alive past its first TTL.
        ix.routed(1, &[1], t0 + 5 * s).unwrap();
        let m = ix.find_matches(&[1, 2, 3], t0 + 10 * s);
        assert_eq!(
            (m.get(1), m.get(2)),
            (1, 2),
            "worker 1's blocks 2 and 3 expired, block 1 not"
        );
        assert_eq!(ix.find_matches(&[1, 2], t0 + 16 * s).scores, [], "all expired");
        assert!(ix.is_empty());

        // The bound: 5 predictions; the oldest go first.
        ix.routed(3, &[10, 11, 12], t0 + 20 * s).unwrap();
        ix.routed(4, &[20, 21, 22], t0 + 21 * s).unwrap();
        assert_eq!(ix.len(), 5);
        let m = ix.find_matches(&[10, 11, 12], t0 + 22 * s);
        assert_eq!(m.get(3), 0, "worker 3's first block was pushed out");
        assert_eq!(ix.find_matches(&[20, 21, 22], t0 + 22 * s).get(4), 3);
        ix.remove_worker(4);
        assert_eq!(ix.len(), 2);
    }
}
