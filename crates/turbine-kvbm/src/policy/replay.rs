//! Offline replay of a request trace through one policy, as a prefix cache of a fixed
//! number of blocks sees it: the figures `turbine trace analyze --policy` prints.

use serde::Serialize;

use super::{Key, KeySet, Millis, Policy};

/// One request of a trace: when it arrived and its prompt's blocks, a chained prefix
/// (block `i`'s parent is block `i - 1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub at: Millis,
    pub blocks: Vec<Key>,
}

/// What a replay counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReplayStats {
    pub requests: u64,
    /// Blocks looked up, over all requests.
    pub blocks: u64,
    /// Blocks found in the leading run of each request's cached blocks.
    pub hit_blocks: u64,
    pub inserted: u64,
    /// Victims named to make room.
    pub evicted: u64,
    /// Blocks the policy expired (idle past a TTL).
    pub expired: u64,
    /// Missing blocks not stored: refused by admission, or no block could make room.
    pub refused: u64,
}

impl ReplayStats {
    /// Hit blocks over all blocks; 0 for an empty trace.
    pub fn hit_rate(&self) -> f64 {
        if self.blocks == 0 {
            0.0
        } else {
            self.hit_blocks as f64 / self.blocks as f64
        }
    }
}

/// Replays `trace` through `policy` over a cache of `capacity_blocks`.
///
/// Per request, at its arrival: expired blocks leave first; its hits are the leading run
/// of its blocks present (a prefix cache cannot use a block after a missing one); then
/// each of its blocks, in order, is touched if present, or missed and offered (admit, then
/// victims until there is room, then insert) if not.
pub fn replay(trace: &[Request], policy: &mut dyn Policy, capacity_blocks: usize) -> ReplayStats {
    let mut stats = ReplayStats::default();
    let mut present = KeySet::default();
    for r in trace {
        let now = r.at;
        while let Some(k) = policy.expired(now, &mut |_| true) {
            present.remove(&k);
            stats.expired += 1;
        }
        stats.requests += 1;
        stats.blocks += r.blocks.len() as u64;
        stats.hit_blocks += r.blocks.iter().take_while(|k| present.contains(k)).count() as u64;
        for (i, &key) in r.blocks.iter().enumerate() {
            if present.contains(&key) {
                policy.touch(key, now);
                continue;
            }
            let parent = i.checked_sub(1).map(|j| r.blocks[j]);
            policy.miss(key, parent, now);
            if capacity_blocks == 0 || !policy.admit(key, now) {
                stats.refused += 1;
                continue;
            }
            while present.len() >= capacity_blocks {
                let Some(v) = policy.victim(now, &mut |_| true) else {
                    break;
                };
                present.remove(&v);
                stats.evicted += 1;
            }
            if present.len() >= capacity_blocks {
                stats.refused += 1;
                continue;
            }
            policy.insert(key, parent, now);
            present.insert(key);
            stats.inserted += 1;
        }
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{belady, Lineage, Lru};

    fn trace(requests: &[&[Key]]) -> Vec<Request> {
        requests
            .iter()
            .enumerate()
            .map(|(i, b)| Request {
                at: i as Millis * 1000,
                blocks: b.to_vec(),
            })
            .collect()
    }

    #[test]
    fn counts_the_leading_run_of_cached_blocks() {
        // Four blocks of room.
        let t = trace(&[
            &[1, 2, 3],
            // 1, 2 hit; 4 is new.
            &[1, 2, 4],
            // 1 hits; 5 misses, so 3 cannot count though it may be cached.
            &[1, 5, 3],
            &[6, 7],
        ]);
        let lru = replay(&t, &mut Lru::new(), 4);
        // LRU: after request 2 the cache is 3,1,2,4 (oldest first). Request 3: 1 hits,
        // 5 evicts 3, then 3 evicts 2; 1 hit in all. Request 4 evicts 4 and 1.
        assert_eq!(
            lru,
            ReplayStats {
                requests: 4,
                blocks: 11,
                hit_blocks: 3,
                inserted: 8,
                evicted: 4,
                expired: 0,
                refused: 0,
            }
        );
        assert!((lru.hit_rate() - 3.0 / 11.0).abs() < 1e-12);
        // Leaves first keeps the prefix 1 and evicts the leaf 3, which request 3 re-reads.
        let lineage = replay(&t, &mut Lineage::new(), 4);
        assert_eq!(lineage.hit_blocks, 3);
        // The optimum: request 3 finds 1 (and 3, but after a miss) and nothing is reused
        // after it; 3 hits is the best any policy does here.
        assert_eq!(belady(&t, 4).hit_blocks, 3);
        assert_eq!(replay(&t, &mut Lru::new(), 0).hit_blocks, 0);
        assert_eq!(replay(&[], &mut Lru::new(), 4).hit_rate(), 0.0);
    }

    #[test]
    fn a_small_cache_keeps_the_shared_prefix_only_if_the_policy_does() {
        // A shared two-block prefix with one-block tails, capacity 3.
        let t = trace(&[&[1, 2, 10], &[1, 2, 11], &[1, 2, 12], &[1, 2, 13]]);
        let lru = replay(&t, &mut Lru::new(), 3);
        assert_eq!((lru.hit_blocks, lru.blocks), (6, 12));
        assert_eq!(belady(&t, 3).hit_blocks, 6);
    }
}
