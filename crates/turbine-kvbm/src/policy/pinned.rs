//! Pins: blocks the operator marks (a system prompt every request shares) that no policy
//! may choose, neither as a victim nor as expired, whatever it thinks of them.

use super::{Key, KeySet, Millis, Policy};

/// `P` with a set of pinned keys. A pinned block stays in `P`'s state, so that unpinning
/// it hands it back to `P` where its use has put it.
#[derive(Debug)]
pub struct Pinned<P> {
    inner: P,
    pins: KeySet,
}

impl<P: Policy> Pinned<P> {
    pub fn new(inner: P) -> Self {
        Self {
            inner,
            pins: KeySet::default(),
        }
    }

    /// Pins `key`, present or not: a block pinned before it is stored is pinned once stored.
    pub fn pin(&mut self, key: Key) {
        self.pins.insert(key);
    }

    pub fn unpin(&mut self, key: Key) {
        self.pins.remove(&key);
    }

    pub fn is_pinned(&self, key: Key) -> bool {
        self.pins.contains(&key)
    }

    pub fn inner(&self) -> &P {
        &self.inner
    }
}

impl<P: Policy> Policy for Pinned<P> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn admit(&mut self, key: Key, now: Millis) -> bool {
        // The inner policy hears of every offer (ARC adapts on it), pinned or not.
        let admitted = self.inner.admit(key, now);
        admitted || self.pins.contains(&key)
    }
    fn insert(&mut self, key: Key, parent: Option<Key>, now: Millis) {
        self.inner.insert(key, parent, now)
    }
    fn touch(&mut self, key: Key, now: Millis) {
        self.inner.touch(key, now)
    }
    fn miss(&mut self, key: Key, parent: Option<Key>, now: Millis) {
        self.inner.miss(key, parent, now)
    }
    fn remove(&mut self, key: Key) {
        self.inner.remove(key)
    }
    fn evicted(&mut self, key: Key) {
        self.inner.evicted(key)
    }
    fn victim(&mut self, now: Millis, evictable: &mut dyn FnMut(Key) -> bool) -> Option<Key> {
        let pins = &self.pins;
        self.inner.victim(now, &mut |k| !pins.contains(&k) && evictable(k))
    }
    fn expired(&mut self, now: Millis, evictable: &mut dyn FnMut(Key) -> bool) -> Option<Key> {
        let pins = &self.pins;
        self.inner.expired(now, &mut |k| !pins.contains(&k) && evictable(k))
    }
    fn len(&self) -> usize {
        self.inner.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{build, PolicyConfig, PolicyKind, Ttl};

    #[test]
    fn pinned_blocks_are_never_victims_of_any_policy() {
        for kind in PolicyKind::ALL {
            let mut p = Pinned::new(build(kind, 3, &PolicyConfig::default()));
            p.pin(1);
            for k in 1..=3 {
                p.miss(k, None, 0);
                assert!(p.admit(k, 0));
                p.insert(k, None, 0);
            }
            let mut out = Vec::new();
            while let Some(v) = p.victim(1, &mut |_| true) {
                out.push(v);
            }
            out.sort_unstable();
            assert_eq!(out, [2, 3], "{kind}");
            assert_eq!(p.len(), 1, "{kind}");
            p.unpin(1);
            assert_eq!(p.victim(1, &mut |_| true), Some(1), "{kind}");
        }
    }

    #[test]
    fn pinned_blocks_do_not_expire() {
        let mut p = Pinned::new(Ttl::new(10));
        p.pin(7);
        p.insert(7, None, 0);
        p.insert(8, None, 0);
        assert_eq!(p.expired(100, &mut |_| true), Some(8));
        assert_eq!(p.expired(100, &mut |_| true), None);
        assert!(p.is_pinned(7) && p.inner().len() == 1);
    }
}
