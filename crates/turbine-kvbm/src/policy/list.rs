//! An insertion-ordered map of keys with O(1) push, move-to-back and removal: the recency
//! and arrival orders of LRU, FIFO, TTL, ARC's four lists and the doorkeeper.

use super::{Key, KeyMap};

#[derive(Debug, Clone)]
struct Node<V> {
    prev: Option<Key>,
    next: Option<Key>,
    value: V,
}

/// Keys from front (oldest) to back (newest), each with a value.
#[derive(Debug, Clone)]
pub(crate) struct LinkedMap<V> {
    nodes: KeyMap<Node<V>>,
    head: Option<Key>,
    tail: Option<Key>,
}

impl<V> Default for LinkedMap<V> {
    fn default() -> Self {
        Self {
            nodes: KeyMap::default(),
            head: None,
            tail: None,
        }
    }
}

impl<V> LinkedMap<V> {
    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    pub(crate) fn contains(&self, key: Key) -> bool {
        self.nodes.contains_key(&key)
    }

    pub(crate) fn get(&self, key: Key) -> Option<&V> {
        self.nodes.get(&key).map(|n| &n.value)
    }

    /// Appends `key` at the back, or moves it there with its new value if present.
    pub(crate) fn push_back(&mut self, key: Key, value: V) {
        self.remove(key);
        let node = Node {
            prev: self.tail,
            next: None,
            value,
        };
        match self.tail {
            Some(t) => self.set_next(t, Some(key)),
            None => self.head = Some(key),
        }
        self.tail = Some(key);
        self.nodes.insert(key, node);
    }

    /// Moves `key` to the back; false if absent.
    pub(crate) fn move_to_back(&mut self, key: Key) -> bool {
        match self.remove(key) {
            Some(v) => {
                self.push_back(key, v);
                true
            }
            None => false,
        }
    }

    pub(crate) fn remove(&mut self, key: Key) -> Option<V> {
        let node = self.nodes.remove(&key)?;
        match node.prev {
            Some(p) => self.set_next(p, node.next),
            None => self.head = node.next,
        }
        match node.next {
            Some(n) => self.set_prev(n, node.prev),
            None => self.tail = node.prev,
        }
        Some(node.value)
    }

    pub(crate) fn pop_front(&mut self) -> Option<(Key, V)> {
        let k = self.head?;
        self.remove(k).map(|v| (k, v))
    }

    /// The first key from the front that `accept` takes, removed; skipped keys stay.
    pub(crate) fn remove_first(&mut self, mut accept: impl FnMut(Key, &V) -> bool) -> Option<Key> {
        let mut at = self.head;
        while let Some(k) = at {
            let node = self.nodes.get(&k)?;
            if accept(k, &node.value) {
                self.remove(k);
                return Some(k);
            }
            at = node.next;
        }
        None
    }

    /// Keys from front to back.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (Key, &V)> + '_ {
        let mut at = self.head;
        std::iter::from_fn(move || {
            let k = at?;
            let node = self.nodes.get(&k)?;
            at = node.next;
            Some((k, &node.value))
        })
    }

    // Neighbours named by a node are present by construction (every unlink mends both
    // sides), so a missing one is never silently skipped in practice.
    fn set_next(&mut self, key: Key, next: Option<Key>) {
        if let Some(n) = self.nodes.get_mut(&key) {
            n.next = next;
        }
    }

    fn set_prev(&mut self, key: Key, prev: Option<Key>) {
        if let Some(n) = self.nodes.get_mut(&key) {
            n.prev = prev;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(l: &LinkedMap<()>) -> Vec<Key> {
        l.iter().map(|(k, _)| k).collect()
    }

    #[test]
    fn keeps_order_through_moves_and_removals() {
        let mut l = LinkedMap::default();
        for k in [1, 2, 3, 4] {
            l.push_back(k, ());
        }
        assert!(l.move_to_back(2));
        assert_eq!(keys(&l), [1, 3, 4, 2]);
        l.remove(4);
        assert_eq!(keys(&l), [1, 3, 2]);
        assert_eq!(l.remove_first(|k, _| k != 1), Some(3));
        assert_eq!(keys(&l), [1, 2]);
        assert_eq!(l.pop_front(), Some((1, ())));
        assert_eq!(l.pop_front(), Some((2, ())));
        assert_eq!((l.pop_front(), l.len()), (None, 0));
        assert!(!l.move_to_back(9));
    }
}
