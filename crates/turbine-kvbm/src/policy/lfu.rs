//! Least frequently used with decay: a block's count halves every half-life, so yesterday's
//! favourite does not squat forever; ties go to the least recently used. Counts of blocks
//! evicted lately are remembered, so that a popular block evicted once comes back with its
//! count rather than as a newcomer, first in line to go again.

use std::collections::BTreeSet;

use super::list::LinkedMap;
use super::{Key, KeyMap, Millis, Policy};

/// Counts live in the log domain against a moving origin: a block's score is
/// `log2(count) + now / half_life` as of its last use, and since every count decays at the
/// same rate, comparing scores compares today's counts without touching the blocks nobody
/// uses (the lazy halving).
#[derive(Debug)]
pub struct Lfu {
    half_life_ms: Millis,
    /// The first time seen, so that scores start near zero and keep their precision.
    origin: Option<Millis>,
    seq: u64,
    /// Score (the bits of a non-negative f64, which order like the number) and last use.
    entries: KeyMap<(u64, u64)>,
    order: BTreeSet<(u64, u64, Key)>,
    /// Scores of evicted blocks, oldest eviction first, at most `history` of them.
    ghosts: LinkedMap<u64>,
    history: usize,
}

impl Lfu {
    /// `half_life_ms` 0 never decays; the counts of the last `history` blocks evicted are
    /// remembered (the tier's capacity is a good size: a block evicted longer ago than a
    /// cache-full of evictions has decayed or was not popular).
    pub fn new(half_life_ms: Millis, history: usize) -> Self {
        Self {
            half_life_ms,
            origin: None,
            seq: 0,
            entries: KeyMap::default(),
            order: BTreeSet::new(),
            ghosts: LinkedMap::default(),
            history,
        }
    }

    /// `now` in half-lives since the origin.
    fn age(&mut self, now: Millis) -> f64 {
        let origin = *self.origin.get_or_insert(now);
        if self.half_life_ms == 0 {
            return 0.0;
        }
        now.saturating_sub(origin) as f64 / self.half_life_ms as f64
    }

    /// Counts one use of `key` at `now` on top of its decayed past score, if any.
    fn bump(&mut self, key: Key, previous: Option<f64>, now: Millis) {
        let u = self.age(now);
        // log2(2^(s - u) + 1) + u: the decayed count plus one, back in the log domain.
        let score = match previous {
            // The min keeps a clock that went back from overflowing the count.
            Some(s) => u + (s - u).min(1000.0).exp2().ln_1p() / std::f64::consts::LN_2,
            None => u,
        };
        self.seq += 1;
        let bits = score.max(0.0).to_bits();
        self.entries.insert(key, (bits, self.seq));
        self.order.insert((bits, self.seq, key));
    }

    fn unlink(&mut self, key: Key) -> Option<f64> {
        let (bits, seq) = self.entries.remove(&key)?;
        self.order.remove(&(bits, seq, key));
        Some(f64::from_bits(bits))
    }

    fn remember(&mut self, key: Key, score: f64) {
        if self.history > 0 {
            self.ghosts.push_back(key, score.to_bits());
            while self.ghosts.len() > self.history && self.ghosts.pop_front().is_some() {}
        }
    }

    /// The block's current count, decayed to `now`: for tests and diagnostics.
    #[cfg(test)]
    fn count(&mut self, key: Key, now: Millis) -> Option<f64> {
        let u = self.age(now);
        let &(bits, _) = self.entries.get(&key)?;
        Some((f64::from_bits(bits) - u).exp2())
    }
}

impl Policy for Lfu {
    fn name(&self) -> &'static str {
        "lfu"
    }

    fn insert(&mut self, key: Key, _parent: Option<Key>, now: Millis) {
        let past = self.unlink(key).or_else(|| self.ghosts.remove(key).map(f64::from_bits));
        self.bump(key, past, now);
    }

    fn touch(&mut self, key: Key, now: Millis) {
        if let Some(s) = self.unlink(key) {
            self.bump(key, Some(s), now);
        }
    }

    fn remove(&mut self, key: Key) {
        self.unlink(key);
    }

    fn evicted(&mut self, key: Key) {
        if let Some(score) = self.unlink(key) {
            self.remember(key, score);
        }
    }

    fn victim(&mut self, _now: Millis, evictable: &mut dyn FnMut(Key) -> bool) -> Option<Key> {
        let &(bits, _, key) = self.order.iter().find(|&&(_, _, k)| evictable(k))?;
        self.unlink(key);
        self.remember(key, f64::from_bits(bits));
        Some(key)
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_used_goes_first_and_ties_go_by_recency() {
        let mut p = Lfu::new(0, 0);
        for k in 1..=3 {
            p.insert(k, None, 0);
        }
        p.touch(1, 0);
        p.touch(1, 0);
        p.touch(3, 0);
        // 2 was used once; 3 and 1 more often.
        assert_eq!(p.victim(0, &mut |_| true), Some(2));
        p.insert(4, None, 0);
        p.touch(4, 0);
        // 3 and 4 both count two: 3 was used less recently.
        assert_eq!(p.victim(0, &mut |_| true), Some(3));
        assert_eq!(p.victim(0, &mut |k| k != 4), Some(1));
        assert!((p.count(4, 0).unwrap() - 2.0).abs() < 1e-9);
    }

    #[test]
    fn counts_halve_every_half_life() {
        let mut p = Lfu::new(1000, 0);
        p.insert(1, None, 0);
        for _ in 0..7 {
            p.touch(1, 0);
        }
        assert!((p.count(1, 0).unwrap() - 8.0).abs() < 1e-9);
        assert!((p.count(1, 1000).unwrap() - 4.0).abs() < 1e-9);
        assert!((p.count(1, 3000).unwrap() - 1.0).abs() < 1e-9);
        // Two uses now beat eight three half-lives ago (worth one).
        p.insert(2, None, 3000);
        p.touch(2, 3000);
        assert!((p.count(2, 3000).unwrap() - 2.0).abs() < 1e-9);
        assert_eq!(p.victim(3000, &mut |_| true), Some(1));
        // Without decay the old favourite would have stayed.
        let mut q = Lfu::new(0, 0);
        q.insert(1, None, 0);
        for _ in 0..7 {
            q.touch(1, 0);
        }
        q.insert(2, None, 3000);
        q.touch(2, 3000);
        assert_eq!(q.victim(3000, &mut |_| true), Some(2));
    }

    #[test]
    fn an_evicted_block_comes_back_with_its_count() {
        let mut p = Lfu::new(0, 1);
        p.insert(1, None, 0);
        for _ in 0..3 {
            p.touch(1, 0);
        }
        assert_eq!(p.victim(0, &mut |_| true), Some(1));
        p.insert(2, None, 0);
        p.touch(2, 0);
        // 1 counts five now (four before, one more), 2 counts two.
        p.insert(1, None, 0);
        assert!((p.count(1, 0).unwrap() - 5.0).abs() < 1e-9);
        assert_eq!(p.victim(0, &mut |_| true), Some(2));
        // Only one count is remembered: 1 pushed out 2's.
        assert_eq!(p.victim(0, &mut |_| true), Some(1));
        p.insert(2, None, 0);
        assert!((p.count(2, 0).unwrap() - 1.0).abs() < 1e-9);
        // A block the tier dropped on its own is forgotten.
        p.insert(3, None, 0);
        p.touch(3, 0);
        p.remove(3);
        p.insert(3, None, 0);
        assert!((p.count(3, 0).unwrap() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_touch_decays_before_it_counts() {
        let mut p = Lfu::new(1000, 0);
        p.insert(1, None, 0);
        p.touch(1, 0);
        // 2 halves to 1 over a half-life, then the use makes it 2.
        p.touch(1, 1000);
        assert!((p.count(1, 1000).unwrap() - 2.0).abs() < 1e-9);
    }
}
