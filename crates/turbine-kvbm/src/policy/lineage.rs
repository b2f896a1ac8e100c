//! Leaves first: a block with a present child stays until its children have gone, and the
//! least recently used leaf goes first. A prefix outlives its extensions, so what the tier
//! holds stays usable: a prefix cache cannot use a block whose parent is missing.

use std::collections::BTreeMap;

use super::{Key, KeyMap, Millis, Policy};

#[derive(Debug, Clone, Copy)]
struct Node {
    parent: Option<Key>,
    /// Last use, in the order of this policy's calls.
    seq: u64,
}

#[derive(Debug, Default)]
pub struct Lineage {
    seq: u64,
    nodes: KeyMap<Node>,
    /// Present blocks naming each key as their parent, whether that key is present or not:
    /// a parent the tier dropped on its own and stores again is interior at once.
    children: KeyMap<u32>,
    /// Present blocks without present children, by last use.
    leaves: BTreeMap<u64, Key>,
}

impl Lineage {
    pub fn new() -> Self {
        Self::default()
    }

    fn is_leaf(&self, key: Key) -> bool {
        !self.children.contains_key(&key)
    }

    fn unlink(&mut self, key: Key) -> bool {
        let Some(node) = self.nodes.remove(&key) else {
            return false;
        };
        if self.is_leaf(key) {
            self.leaves.remove(&node.seq);
        }
        if let Some(p) = node.parent {
            if let Some(c) = self.children.get_mut(&p) {
                *c -= 1;
                if *c == 0 {
                    self.children.remove(&p);
                    if let Some(pn) = self.nodes.get(&p) {
                        self.leaves.insert(pn.seq, p);
                    }
                }
            }
        }
        true
    }
}

impl Policy for Lineage {
    fn name(&self) -> &'static str {
        "lineage"
    }

    fn insert(&mut self, key: Key, parent: Option<Key>, _now: Millis) {
        self.unlink(key);
        // A block cannot hold itself in place.
        let parent = parent.filter(|&p| p != key);
        self.seq += 1;
        self.nodes.insert(key, Node { parent, seq: self.seq });
        if let Some(p) = parent {
            let c = self.children.entry(p).or_insert(0);
            *c += 1;
            if *c == 1 {
                if let Some(pn) = self.nodes.get(&p) {
                    self.leaves.remove(&pn.seq);
                }
            }
        }
        if self.is_leaf(key) {
            self.leaves.insert(self.seq, key);
        }
    }

    fn touch(&mut self, key: Key, _now: Millis) {
        let leaf = self.is_leaf(key);
        let Some(node) = self.nodes.get_mut(&key) else {
            return;
        };
        self.seq += 1;
        let old = std::mem::replace(&mut node.seq, self.seq);
        if leaf {
            self.leaves.remove(&old);
            self.leaves.insert(self.seq, key);
        }
    }

    fn remove(&mut self, key: Key) {
        self.unlink(key);
    }

    /// `None` when no leaf is evictable, even if interior blocks are: evicting one would
    /// strand its descendants. (Parents that form a cycle, which chained hashes cannot,
    /// would never become leaves.)
    fn victim(&mut self, _now: Millis, evictable: &mut dyn FnMut(Key) -> bool) -> Option<Key> {
        let key = self.leaves.values().copied().find(|&k| evictable(k))?;
        self.unlink(key);
        Some(key)
    }

    fn len(&self) -> usize {
        self.nodes.len()
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
