//! Belady's offline optimum over a trace: the block whose next use is farthest goes, and a
//! block reused later than everything cached is not stored at all. The ceiling every
//! online policy is measured against.

use std::collections::BTreeSet;

use super::replay::{ReplayStats, Request};
use super::{Key, KeyMap};

/// A block's rank for eviction: its next use (position in the trace's block stream,
/// `usize::MAX` for never), then its depth in its request, so that among blocks never used
/// again the deeper goes first and what stays is prefix-closed.
type Rank = (usize, usize);

/// Replays `trace` with the offline optimum over `capacity_blocks`, counting as
/// [`super::replay`] does.
///
/// Bypassing matters: a policy with admission control may decline a block, and the optimum
/// must be allowed the same. With chained keys (a block has the same parent wherever it
/// appears) a parent is looked up before its children every time, so its next use is never
/// later than theirs, and what the optimum holds is prefix-closed: every block it hits is
/// in a leading run, and its block hits are its prefix hits.
pub fn belady(trace: &[Request], capacity_blocks: usize) -> ReplayStats {
    run(trace, capacity_blocks).0
}

/// The replay, and what it holds at the end.
fn run(trace: &[Request], capacity_blocks: usize) -> (ReplayStats, KeyMap<Rank>) {
    let next_use = next_uses(trace);
    let mut stats = ReplayStats::default();
    let mut cached: KeyMap<Rank> = KeyMap::default();
    let mut order: BTreeSet<(Rank, Key)> = BTreeSet::new();
    let mut at = 0;
    for r in trace {
        stats.requests += 1;
        stats.blocks += r.blocks.len() as u64;
        stats.hit_blocks += r.blocks.iter().take_while(|k| cached.contains_key(k)).count() as u64;
        for (depth, &key) in r.blocks.iter().enumerate() {
            let rank = (next_use[at], depth);
            at += 1;
            if let Some(old) = cached.get_mut(&key) {
                order.remove(&(*old, key));
                *old = rank;
                order.insert((rank, key));
                continue;
            }
            if cached.len() >= capacity_blocks {
                match order.last().copied() {
                    Some((far, victim)) if rank < far => {
                        order.remove(&(far, victim));
                        cached.remove(&victim);
                        stats.evicted += 1;
                    }
                    _ => {
                        stats.refused += 1;
                        continue;
                    }
                }
            }
            cached.insert(key, rank);
            order.insert((rank, key));
            stats.inserted += 1;
        }
    }
    (stats, cached)
}

/// For each position of the trace's block stream, the position of the same key's next
/// lookup, or `usize::MAX`.
fn next_uses(trace: &[Request]) -> Vec<usize> {
    let total = trace.iter().map(|r| r.blocks.len()).sum();
    let mut next = vec![usize::MAX; total];
    let mut seen: KeyMap<usize> = KeyMap::default();
    let mut at = total;
    for key in trace.iter().rev().flat_map(|r| r.blocks.iter().rev()) {
        at -= 1;
        if let Some(later) = seen.insert(*key, at) {
            next[at] = later;
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(requests: &[&[Key]]) -> Vec<Request> {
        requests
            .iter()
            .map(|b| Request {
                at: 0,
                blocks: b.to_vec(),
            })
            .collect()
    }

    #[test]
    fn evicts_the_farthest_next_use_and_bypasses_what_comes_back_last() {
        // Room for one block: 1 comes back before 2 does, so 2 is not stored.
        let t = trace(&[&[1], &[2], &[1], &[2]]);
        let s = belady(&t, 1);
        assert_eq!((s.hit_blocks, s.inserted, s.refused), (1, 1, 2));
        // Room for two: 3 replaces 2, which is used later than 1.
        let t = trace(&[&[1], &[2], &[3], &[1], &[3], &[2]]);
        let s = belady(&t, 2);
        assert_eq!((s.hit_blocks, s.evicted), (2, 1));
    }

    #[test]
    fn among_blocks_never_used_again_the_deeper_goes_first() {
        // 1, 2, 3 are never used again; 4's chain needs two slots, freed from the deep end.
        let t = trace(&[&[1, 2, 3], &[4, 5], &[4, 5]]);
        let (s, cached) = run(&t, 3);
        assert_eq!((s.hit_blocks, s.evicted), (2, 2));
        let mut kept: Vec<Key> = cached.into_keys().collect();
        kept.sort_unstable();
        assert_eq!(kept, [1, 4, 5]);
        let next = next_uses(&t);
        assert_eq!(next, [usize::MAX, usize::MAX, usize::MAX, 5, 6, usize::MAX, usize::MAX]);
    }

    #[test]
    fn the_chain_stays_prefix_closed_under_pressure() {
        // A shared prefix 1, 2 and two tails, room for 3: the optimum keeps 1, 2.
        let t = trace(&[&[1, 2, 3], &[1, 2, 4], &[1, 2, 3], &[1, 2, 4]]);
        let s = belady(&t, 3);
        // Request 2 hits 1, 2; request 3 hits 1, 2 and 3 if it kept 3 over 4 (3 is reused
        // sooner): 4 is bypassed. Request 4 hits 1, 2.
        assert_eq!(s.hit_blocks, 2 + 3 + 2);
    }
}
