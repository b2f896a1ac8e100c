//! Idle expiry: a block unused for the TTL has expired and goes whether or not the tier is
//! full; when it is full before anything expires, the least recently used goes.

use super::list::LinkedMap;
use super::{Key, Millis, Policy};

#[derive(Debug)]
pub struct Ttl {
    ttl_ms: Millis,
    /// Last use of each block, least recent at the front: the expired are a leading run.
    order: LinkedMap<Millis>,
}

impl Ttl {
    /// Blocks idle for `ttl_ms` or longer have expired.
    pub fn new(ttl_ms: Millis) -> Self {
        Self {
            ttl_ms,
            order: LinkedMap::default(),
        }
    }
}

impl Policy for Ttl {
    fn name(&self) -> &'static str {
        "ttl"
    }

    fn insert(&mut self, key: Key, _parent: Option<Key>, now: Millis) {
        self.order.push_back(key, now);
    }

    fn touch(&mut self, key: Key, now: Millis) {
        if self.order.contains(key) {
            self.order.push_back(key, now);
        }
    }

    fn remove(&mut self, key: Key) {
        self.order.remove(key);
    }

    fn victim(&mut self, _now: Millis, evictable: &mut dyn FnMut(Key) -> bool) -> Option<Key> {
        self.order.remove_first(|k, _| evictable(k))
    }

    fn expired(&mut self, now: Millis, evictable: &mut dyn FnMut(Key) -> bool) -> Option<Key> {
        let ttl = self.ttl_ms;
        let key = self
            .order
            .iter()
            .take_while(|&(_, &used)| now.saturating_sub(used) >= ttl)
            .find(|&(k, _)| evictable(k))
            .map(|(k, _)| k)?;
        self.order.remove(key);
        Some(key)
    }

    fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_blocks_expire_and_a_use_renews_them() {
        let mut p = Ttl::new(100);
        p.insert(1, None, 0);
        p.insert(2, None, 10);
        p.insert(3, None, 20);
        p.touch(1, 50);
        assert_eq!(p.expired(109, &mut |_| true), None);
        assert_eq!(p.expired(110, &mut |_| true), Some(2));
        assert_eq!(p.expired(110, &mut |_| true), None);
        // 3 has expired but is leased; 1 has not expired yet.
        assert_eq!(p.expired(140, &mut |k| k != 3), None);
        assert_eq!(p.expired(150, &mut |k| k != 3), Some(1));
        assert_eq!(p.expired(150, &mut |_| true), Some(3));
        assert!(p.is_empty());
    }

    #[test]
    fn full_before_expiry_it_is_lru() {
        let mut p = Ttl::new(1_000);
        for k in 1..=3 {
            p.insert(k, None, k);
        }
        p.touch(1, 5);
        assert_eq!(p.victim(6, &mut |_| true), Some(2));
        assert_eq!(p.victim(6, &mut |k| k != 3), Some(1));
        assert_eq!(p.len(), 1);
    }
}
