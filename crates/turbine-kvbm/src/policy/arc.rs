//! Adaptive Replacement Cache (Megiddo and Modha, FAST '03): blocks used once (T1) and
//! blocks used again (T2), each with a ghost list of keys it evicted lately (B1, B2); a
//! miss that hits a ghost moves the target size `p` of T1 towards the list that would
//! have kept it.

use super::list::LinkedMap;
use super::{Key, Millis, Policy};

#[derive(Debug)]
pub struct Arc {
    capacity: usize,
    /// Target size of T1, in blocks: 0 ..= capacity.
    p: usize,
    t1: LinkedMap<()>,
    t2: LinkedMap<()>,
    b1: LinkedMap<()>,
    b2: LinkedMap<()>,
    /// The block last offered (from `admit`), and so whose ghost hit already moved `p`:
    /// the tier asks for room before it inserts, and ARC's choice of list depends on
    /// whether the block coming in is in B2.
    incoming: Option<Key>,
}

impl Arc {
    /// `capacity` is the tier's, in blocks: it bounds `p` and the ghost lists.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            p: 0,
            t1: LinkedMap::default(),
            t2: LinkedMap::default(),
            b1: LinkedMap::default(),
            b2: LinkedMap::default(),
            incoming: None,
        }
    }

    /// The adaptive target size of the recency side (T1), in blocks.
    pub fn target(&self) -> usize {
        self.p
    }

    /// ARC's adaptation on a miss that hits a ghost list, at most once per offer.
    fn adapt(&mut self, key: Key) {
        if self.incoming == Some(key) {
            return;
        }
        self.incoming = Some(key);
        let (b1, b2) = (self.b1.len(), self.b2.len());
        if self.b1.contains(key) {
            let delta = if b1 >= b2 { 1 } else { b2 / b1 };
            self.p = (self.p + delta).min(self.capacity);
        } else if self.b2.contains(key) {
            let delta = if b2 >= b1 { 1 } else { b1 / b2 };
            self.p = self.p.saturating_sub(delta);
        }
    }

    /// Keeps the directory to ARC's bounds: |T1| + |B1| <= c and all four lists <= 2c.
    fn trim(&mut self) {
        let c = self.capacity;
        while self.t1.len() + self.b1.len() > c && self.b1.pop_front().is_some() {}
        while self.t1.len() + self.t2.len() + self.b1.len() + self.b2.len() > 2 * c
            && (self.b2.pop_front().is_some() || self.b1.pop_front().is_some())
        {}
    }
}

impl Policy for Arc {
    fn name(&self) -> &'static str {
        "arc"
    }

    fn admit(&mut self, key: Key, _now: Millis) -> bool {
        self.adapt(key);
        true
    }

    fn insert(&mut self, key: Key, _parent: Option<Key>, now: Millis) {
        if self.t1.contains(key) || self.t2.contains(key) {
            self.touch(key, now);
            return;
        }
        self.adapt(key);
        self.incoming = None;
        if self.b1.remove(key).is_some() || self.b2.remove(key).is_some() {
            self.t2.push_back(key, ());
        } else {
            self.t1.push_back(key, ());
        }
        self.trim();
    }

    fn touch(&mut self, key: Key, _now: Millis) {
        if self.t1.remove(key).is_some() || self.t2.contains(key) {
            self.t2.push_back(key, ());
        }
    }

    fn remove(&mut self, key: Key) {
        if self.t1.remove(key).is_none() {
            self.t2.remove(key);
        }
    }

    fn evicted(&mut self, key: Key) {
        if self.t1.remove(key).is_some() {
            self.b1.push_back(key, ());
        } else if self.t2.remove(key).is_some() {
            self.b2.push_back(key, ());
        }
        self.trim();
    }

    fn victim(&mut self, _now: Millis, evictable: &mut dyn FnMut(Key) -> bool) -> Option<Key> {
        let t1 = self.t1.len();
        let incoming_in_b2 = self.incoming.is_some_and(|k| self.b2.contains(k));
        let t1_first = t1 > 0 && (t1 > self.p || (incoming_in_b2 && t1 == self.p));
        for from_t1 in [t1_first, !t1_first] {
            let (list, ghosts) = if from_t1 {
                (&mut self.t1, &mut self.b1)
            } else {
                (&mut self.t2, &mut self.b2)
            };
            if let Some(k) = list.remove_first(|k, _| evictable(k)) {
                ghosts.push_back(k, ());
                self.trim();
                return Some(k);
            }
        }
        None
    }

    fn len(&self) -> usize {
        self.t1.len() + self.t2.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(l: &LinkedMap<()>) -> Vec<Key> {
        l.iter().map(|(k, _)| k).collect()
    }

    /// Offers `key` to a full tier as the tier does: admit, make room, insert.
    fn offer(p: &mut Arc, key: Key) -> Option<Key> {
        assert!(p.admit(key, 0));
        let v = p.victim(0, &mut |_| true);
        p.insert(key, None, 0);
        v
    }

    #[test]
    fn ghost_hits_move_the_target_towards_the_list_that_would_have_kept_them() {
        let mut p = Arc::new(4);
        for k in [1, 2] {
            p.insert(k, None, 0);
            p.touch(k, 0);
        }
        p.insert(3, None, 0);
        p.insert(4, None, 0);
        assert_eq!((keys(&p.t1), keys(&p.t2)), (vec![3, 4], vec![1, 2]));
        // p = 0: T1 gives up its oldest, remembered in B1.
        assert_eq!(offer(&mut p, 5), Some(3));
        assert_eq!(offer(&mut p, 6), Some(4));
        assert_eq!(keys(&p.b1), [3, 4]);
        // 3 comes back: a hit in B1, so recency deserved more room.
        assert_eq!(offer(&mut p, 3), Some(5));
        assert_eq!(p.target(), 1);
        assert_eq!((keys(&p.t1), keys(&p.t2)), (vec![6], vec![1, 2, 3]));
        // |T1| = p now: T2 gives up its oldest, remembered in B2.
        assert_eq!(offer(&mut p, 7), Some(1));
        assert_eq!(keys(&p.b2), [1]);
        // 1 comes back: a hit in B2 moves p down by |B1| / |B2| = 2.
        assert_eq!(offer(&mut p, 1), Some(6));
        assert_eq!(p.target(), 0);
        assert_eq!((keys(&p.t1), keys(&p.t2)), (vec![7], vec![2, 3, 1]));
        assert_eq!(p.len(), 4);
    }

    #[test]
    fn the_directory_stays_within_twice_the_capacity() {
        let mut p = Arc::new(3);
        for k in 0..3 {
            p.insert(k, None, 0);
        }
        for k in 3..50 {
            offer(&mut p, k);
            assert!(p.t1.len() + p.b1.len() <= 3);
            assert!(p.t1.len() + p.t2.len() + p.b1.len() + p.b2.len() <= 6);
        }
        assert_eq!(p.len(), 3);
    }

    #[test]
    fn evictions_chosen_elsewhere_are_remembered_as_ghosts() {
        let mut p = Arc::new(2);
        p.insert(1, None, 0);
        p.insert(2, None, 0);
        p.touch(2, 0);
        p.evicted(2);
        p.evicted(1);
        assert_eq!((keys(&p.b1), keys(&p.b2)), (vec![1], vec![2]));
        // A ghost hit in B2 comes back into T2 and moves p down (it is 0 already).
        assert!(p.admit(2, 0));
        p.insert(2, None, 0);
        assert_eq!((keys(&p.t2), p.target()), (vec![2], 0));
        p.remove(2);
        assert!(p.is_empty() && p.b2.len() == 0);
    }

    #[test]
    fn skips_what_cannot_go_across_both_lists() {
        let mut p = Arc::new(2);
        p.insert(1, None, 0);
        p.insert(2, None, 0);
        p.touch(2, 0);
        // T1 = [1], p = 0: T1 first, but 1 is leased, so T2's 2 goes.
        assert_eq!(p.victim(0, &mut |k| k != 1), Some(2));
        assert_eq!(p.victim(0, &mut |k| k != 1), None);
        p.remove(1);
        assert!(p.is_empty());
    }
}
