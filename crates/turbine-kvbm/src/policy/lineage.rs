//! Leaves first: a block with a present child stays until its children have gone, and the
//! least recently used leaf goes first. A prefix outlives its extensions, so what the tier
//! holds stays usable: a prefix cache cannot use a block whose parent is missing.

use std::collections::BTreeMap;

use super::{Key, KeyMap, Millis, Policy};

/// Where a leaf stands in the order of eviction: the least goes first. Lineage ranks by last
/// use alone (`(0, seq)`); LFU-DA puts its priority first.
pub(crate) type Rank = (u64, u64);

#[derive(Debug, Clone, Copy)]
struct Node {
    parent: Option<Key>,
    rank: Rank,
}

/// Present blocks as a forest: which of them are leaves, in rank order. Shared by the
/// policies that evict leaves first and differ only in how they rank them.
#[derive(Debug, Default)]
pub(crate) struct Forest {
    nodes: KeyMap<Node>,
    /// Present blocks naming each key as their parent, whether that key is present or not:
    /// a parent the tier dropped on its own and stores again is interior at once.
    children: KeyMap<u32>,
    /// Present blocks without present children, by rank.
    leaves: BTreeMap<Rank, Key>,
}

impl Forest {
    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    pub(crate) fn contains(&self, key: Key) -> bool {
        self.nodes.contains_key(&key)
    }

    fn is_leaf(&self, key: Key) -> bool {
        !self.children.contains_key(&key)
    }

    /// Stores `key` below `parent` at `rank`, replacing any earlier entry of it. Ranks must
    /// be distinct: the caller's sequence number breaks ties.
    pub(crate) fn insert(&mut self, key: Key, parent: Option<Key>, rank: Rank) {
        self.unlink(key);
        // A block cannot hold itself in place.
        let parent = parent.filter(|&p| p != key);
        self.nodes.insert(key, Node { parent, rank });
        if let Some(p) = parent {
            let c = self.children.entry(p).or_insert(0);
            *c += 1;
            if *c == 1 {
                if let Some(pn) = self.nodes.get(&p) {
                    self.leaves.remove(&pn.rank);
                }
            }
        }
        if self.is_leaf(key) {
            self.leaves.insert(rank, key);
        }
    }

    /// Gives `key` a new rank, if present.
    pub(crate) fn rerank(&mut self, key: Key, rank: Rank) {
        let leaf = self.is_leaf(key);
        let Some(node) = self.nodes.get_mut(&key) else {
            return;
        };
        let old = std::mem::replace(&mut node.rank, rank);
        if leaf {
            self.leaves.remove(&old);
            self.leaves.insert(rank, key);
        }
    }

    /// Removes `key`; its rank if it was present.
    pub(crate) fn unlink(&mut self, key: Key) -> Option<Rank> {
        let node = self.nodes.remove(&key)?;
        if self.is_leaf(key) {
            self.leaves.remove(&node.rank);
        }
        if let Some(p) = node.parent {
            if let Some(c) = self.children.get_mut(&p) {
                *c -= 1;
                if *c == 0 {
                    self.children.remove(&p);
                    if let Some(pn) = self.nodes.get(&p) {
                        self.leaves.insert(pn.rank, p);
                    }
                }
            }
        }
        Some(node.rank)
    }

    /// The least-ranked leaf that `evictable` accepts, removed, with its rank. `None` when no
    /// leaf is evictable, even if interior blocks are: evicting one would strand its
    /// descendants. (Parents that form a cycle, which chained hashes cannot, would never
    /// become leaves.)
    pub(crate) fn pop_leaf(&mut self, evictable: &mut dyn FnMut(Key) -> bool) -> Option<(Key, Rank)> {
        let key = self.leaves.values().copied().find(|&k| evictable(k))?;
        self.unlink(key).map(|rank| (key, rank))
    }
}

#[derive(Debug, Default)]
pub struct Lineage {
    /// Last use, in the order of this policy's calls.
    seq: u64,
    forest: Forest,
}

impl Lineage {
    pub fn new() -> Self {
        Self::default()
    }

    fn next(&mut self) -> Rank {
        self.seq += 1;
        (0, self.seq)
    }
}

impl Policy for Lineage {
    fn name(&self) -> &'static str {
        "lineage"
    }

    fn insert(&mut self, key: Key, parent: Option<Key>, _now: Millis) {
        let rank = self.next();
        self.forest.insert(key, parent, rank);
    }

    fn touch(&mut self, key: Key, _now: Millis) {
        if self.forest.contains(key) {
            let rank = self.next();
            self.forest.rerank(key, rank);
        }
    }

    fn remove(&mut self, key: Key) {
        self.forest.unlink(key);
    }

    fn victim(&mut self, _now: Millis, evictable: &mut dyn FnMut(Key) -> bool) -> Option<Key> {
        self.forest.pop_leaf(evictable).map(|(k, _)| k)
    }

    fn len(&self) -> usize {
        self.forest.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_outlives_its_extensions() {
        let mut p = Lineage::new();
        // Chain 1 <- 2 <- 3, then a sibling 4 of 2, used after everything.
        p.insert(1, None, 0);
        p.insert(2, Some(1), 0);
        p.insert(3, Some(2), 0);
        p.insert(4, Some(1), 0);
        p.touch(1, 1);
        // 1 is the least recently used but has children; 3 is the oldest leaf.
        assert_eq!(p.victim(2, &mut |_| true), Some(3));
        // 2 is a leaf now, older than 4.
        assert_eq!(p.victim(2, &mut |_| true), Some(2));
        // 4 is leased: 1 still has it as a present child, so nothing can go.
        assert_eq!(p.victim(2, &mut |k| k != 4), None);
        assert_eq!(p.victim(2, &mut |_| true), Some(4));
        assert_eq!(p.victim(2, &mut |_| true), Some(1));
        assert!(p.is_empty());
    }

    #[test]
    fn a_parent_dropped_by_the_tier_comes_back_interior() {
        let mut p = Lineage::new();
        p.insert(1, None, 0);
        p.insert(2, Some(1), 0);
        p.remove(1);
        // 2's parent is gone: 2 is an ordinary leaf.
        p.insert(5, None, 0);
        p.insert(1, None, 0);
        // 1 is back and 2 is present again below it: 1 must wait for 2.
        assert_eq!(p.victim(1, &mut |k| k != 2 && k != 5), None);
        assert_eq!(p.victim(1, &mut |_| true), Some(2));
        assert_eq!(p.victim(1, &mut |_| true), Some(5));
        assert_eq!(p.victim(1, &mut |_| true), Some(1));
    }

    #[test]
    fn touching_a_leaf_renews_it() {
        let mut p = Lineage::new();
        p.insert(1, None, 0);
        p.insert(2, None, 0);
        p.touch(1, 1);
        assert_eq!(p.victim(1, &mut |_| true), Some(2));
        assert_eq!(p.len(), 1);
    }
}
