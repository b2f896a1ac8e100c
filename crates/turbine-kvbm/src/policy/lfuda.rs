//! LFU with dynamic aging (Arlitt et al., "Evaluating content management techniques for Web
//! proxy caches", 2000), leaves first: one of the adaptive policy's candidates (it has no
//! `PolicyKind` of its own), and the lookup counts it is built on.
//!
//! A block's priority is its lookup count plus the priority of the latest victim as of its
//! last use, and the lowest-priority leaf goes first. A block used often outlasts one used
//! once since, while one nobody uses any more falls behind as victims raise the floor, so
//! an old favourite does not squat and there is no half-life to tune. With every count
//! equal it is LRU (GreedyDual with uniform costs), so it keeps recency's strength too.
//! Leaves first, because in a prefix cache a parent is looked up whenever its child is: a
//! parent's next use is never later than its child's.

use super::lineage::{Forest, Rank};
use super::list::LinkedMap;
use super::Key;

/// Keys looked up lately, each with how many of its lookups fell within reach: the
/// doorkeeper's second sightings (a count above one) and LFU-DA's counts, kept for blocks
/// present or not, so that a popular prefix evicted once comes back with its count. Bounded
/// by `reach` keys; the least recently looked up is forgotten first.
#[derive(Debug)]
pub(crate) struct Sightings {
    reach: usize,
    /// Least recently looked up at the front.
    seen: LinkedMap<u32>,
}

impl Sightings {
    pub(crate) fn new(reach: usize) -> Self {
        Self {
            reach,
            seen: LinkedMap::default(),
        }
    }

    /// Records a lookup of `key`; its count, this lookup included.
    pub(crate) fn sight(&mut self, key: Key) -> u32 {
        let n = self.count(key).saturating_add(1);
        self.seen.push_back(key, n);
        while self.seen.len() > self.reach && self.seen.pop_front().is_some() {}
        n
    }

    /// Lookups of `key` remembered; 0 if none.
    pub(crate) fn count(&self, key: Key) -> u32 {
        self.seen.get(key).copied().unwrap_or(0)
    }
}

/// LFU-DA's order over a set of present blocks. It counts nothing itself: callers pass each
/// block's count from the [`Sightings`] they share, so that the tier and its shadows keep
/// one history between them. Metadata per present block: its parent, its rank (priority and
/// sequence number), and its place among the leaves if it is one.
#[derive(Debug, Default)]
pub(crate) struct LfuDa {
    /// The aging floor: the priority of the latest victim, never lower than before.
    floor: u64,
    /// Breaks ties of priority by last use, so that ranks are distinct.
    seq: u64,
    forest: Forest,
}

impl LfuDa {
    fn rank(&mut self, count: u32) -> Rank {
        self.seq += 1;
        (self.floor.saturating_add(u64::from(count)), self.seq)
    }

    /// `key` was stored below `parent`, counting `count` lookups.
    pub(crate) fn insert(&mut self, key: Key, parent: Option<Key>, count: u32) {
        let rank = self.rank(count);
        self.forest.insert(key, parent, rank);
    }

    /// `key`, if present, was used again and counts `count` lookups now.
    pub(crate) fn touch(&mut self, key: Key, count: u32) {
        if self.forest.contains(key) {
            let rank = self.rank(count);
            self.forest.rerank(key, rank);
        }
    }

    pub(crate) fn remove(&mut self, key: Key) {
        self.forest.unlink(key);
    }

    /// Blocks tracked: for tests.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.forest.len()
    }

    /// `key` was evicted as another policy chose: it ages the rest as this order's own
    /// victim would have.
    pub(crate) fn evicted(&mut self, key: Key) {
        if let Some((priority, _)) = self.forest.unlink(key) {
            self.floor = self.floor.max(priority);
        }
    }

    /// The lowest-priority leaf `evictable` accepts, removed; it raises the floor. `None`
    /// when no leaf is evictable, even if interior blocks are.
    pub(crate) fn victim(&mut self, evictable: &mut dyn FnMut(Key) -> bool) -> Option<Key> {
        let (key, (priority, _)) = self.forest.pop_leaf(evictable)?;
        self.floor = self.floor.max(priority);
        Some(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lookup as the tier makes it: counted, then touched if present, else stored.
    fn look(p: &mut LfuDa, s: &mut Sightings, key: Key, parent: Option<Key>) {
        let n = s.sight(key);
        if p.forest.contains(key) {
            p.touch(key, n);
        } else {
            p.insert(key, parent, n);
        }
    }

    #[test]
    fn the_least_used_leaf_goes_first_and_ties_go_by_recency() {
        let (mut p, mut s) = (LfuDa::default(), Sightings::new(16));
        for k in [1, 2, 3, 1, 3, 1] {
            look(&mut p, &mut s, k, None);
        }
        // 2 counts one, 3 two, 1 three.
        assert_eq!(p.victim(&mut |_| true), Some(2));
        // The floor is 1 now: 4 enters at 1 + 1, level with 3 but used later.
        look(&mut p, &mut s, 4, None);
        assert_eq!(p.victim(&mut |_| true), Some(3));
        assert_eq!(p.victim(&mut |k| k != 4), Some(1));
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn a_prefix_outlives_its_extensions_whatever_their_counts() {
        let (mut p, mut s) = (LfuDa::default(), Sightings::new(16));
        look(&mut p, &mut s, 1, None);
        for _ in 0..3 {
            look(&mut p, &mut s, 2, Some(1));
        }
        // 1 counts one, its child 2 three: 2 goes first all the same.
        assert_eq!(p.victim(&mut |_| true), Some(2));
        assert_eq!(p.victim(&mut |_| true), Some(1));
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn victims_raise_the_floor_so_an_old_favourite_falls_behind() {
        let (mut p, mut s) = (LfuDa::default(), Sightings::new(16));
        // 1 is used three times, then never again; newcomers each used twice.
        for k in [1, 1, 1, 10, 10] {
            look(&mut p, &mut s, k, None);
        }
        // Priorities: 1 at 3, 10 at 2.
        assert_eq!(p.victim(&mut |_| true), Some(10));
        // The floor is 2: a newcomer used twice stands at 4, above the idle favourite.
        look(&mut p, &mut s, 11, None);
        look(&mut p, &mut s, 11, None);
        assert_eq!(p.victim(&mut |_| true), Some(1));
    }

    #[test]
    fn an_evicted_block_comes_back_with_its_count() {
        let (mut p, mut s) = (LfuDa::default(), Sightings::new(16));
        for _ in 0..3 {
            look(&mut p, &mut s, 1, None);
        }
        assert_eq!(p.victim(&mut |_| true), Some(1));
        // Floor 3. 1 returns counting four (priority 7); 2 is new (priority 4).
        look(&mut p, &mut s, 1, None);
        look(&mut p, &mut s, 2, None);
        assert_eq!(p.victim(&mut |_| true), Some(2));
        // Another policy's victim raises the floor as this order's own would.
        look(&mut p, &mut s, 3, None);
        p.evicted(1);
        assert_eq!(p.floor, 7);
        // A block the tier dropped on its own leaves the floor alone.
        p.remove(3);
        assert_eq!((p.len(), p.floor), (0, 7));
    }

    #[test]
    fn counts_reach_back_a_bounded_number_of_keys() {
        let mut s = Sightings::new(2);
        assert_eq!(s.sight(1), 1);
        assert_eq!(s.sight(1), 2);
        s.sight(2);
        s.sight(3);
        // 1 was the least recently looked up of three: forgotten.
        assert_eq!((s.count(1), s.count(2), s.count(3)), (0, 1, 1));
        assert_eq!(s.sight(1), 1);
    }
}
