//! Least recently used: the block whose last use is oldest goes first.

use super::list::LinkedMap;
use super::{Key, Millis, Policy};

#[derive(Debug, Default)]
pub struct Lru {
    /// Least recently used at the front.
    order: LinkedMap<()>,
}

impl Lru {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Policy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn insert(&mut self, key: Key, _parent: Option<Key>, _now: Millis) {
        self.order.push_back(key, ());
    }

    fn touch(&mut self, key: Key, _now: Millis) {
        self.order.move_to_back(key);
    }

    fn remove(&mut self, key: Key) {
        self.order.remove(key);
    }

    fn victim(&mut self, _now: Millis, evictable: &mut dyn FnMut(Key) -> bool) -> Option<Key> {
        self.order.remove_first(|k, _| evictable(k))
    }

    fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used_skipping_what_cannot_go() {
        let mut p = Lru::new();
        for k in 1..=4 {
            p.insert(k, None, 0);
        }
        p.touch(1, 1);
        assert_eq!(p.victim(2, &mut |_| true), Some(2));
        // 3 is leased: the next oldest goes, and 3 stays first in line.
        assert_eq!(p.victim(2, &mut |k| k != 3), Some(4));
        assert_eq!(p.victim(2, &mut |_| true), Some(3));
        p.remove(1);
        assert_eq!((p.victim(3, &mut |_| true), p.len()), (None, 0));
    }
}
