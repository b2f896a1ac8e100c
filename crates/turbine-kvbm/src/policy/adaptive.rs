//! The adaptive policy: shadow caches of the fixed policies, with and without admission
//! control, fed the tier's access stream; the live tier evicts (and admits) as whichever
//! shadow has led its recent hit rate.
//!
//! Shadows are metadata only: each is a simulated cache as large as the tier, so its hit
//! rate is the one that policy would have had here, lately. Beside them, every candidate
//! policy also keeps a state over the tier's real contents, so that following another one
//! needs no rebuild: its next victim is ready at once.

use super::list::LinkedMap;
use super::{build, Key, KeyMap, KeySet, Millis, Policy, PolicyConfig, PolicyKind};

/// The fixed policies the adaptive one chooses among. TTL is left out: as a shadow of a
/// full cache it is LRU that also drops idle blocks, which can only lose hits.
const CANDIDATES: [PolicyKind; 5] = [
    PolicyKind::Lru,
    PolicyKind::Lfu,
    PolicyKind::Fifo,
    PolicyKind::Lineage,
    PolicyKind::Arc,
];

/// The doorkeeper remembers this many cache-fulls of recently looked-up keys (metadata of
/// eight keys per block of capacity): a block is admitted under pressure only if it was
/// looked up before within that reach. A block that missed comes back from beyond a
/// cache-full, that is why it missed: on the Mooncake trace, with admission, LRU and
/// leaves-first hit 0.8 to 2 points more with 8 than with 2, and no more with 16 or 32.
const DOORKEEPER_REACH: usize = 8;

#[derive(Debug)]
pub struct Adaptive {
    capacity: usize,
    /// Weight of one lookup in the shadows' moving hit rates.
    alpha: f64,
    margin: f64,
    /// Lookups a challenger must lead by the margin, without a break, before it is followed:
    /// an eighth of the window.
    hold: u64,
    /// One state per candidate over the tier's real contents, indexed like `CANDIDATES`.
    live: Vec<Box<dyn Policy>>,
    /// Present blocks and their parents: shadows need a touched block's parent.
    present: KeyMap<Option<Key>>,
    shadows: Vec<Shadow>,
    doorkeeper: Doorkeeper,
    /// The shadow followed.
    leader: usize,
    /// When some shadow began to lead the followed one by the margin, in lookups.
    leading_since: Option<u64>,
    lookups: u64,
    switches: u64,
}

impl Adaptive {
    pub fn new(capacity: usize, config: &PolicyConfig) -> Self {
        let window = f64::from(config.adaptive_window.max(1));
        let mut shadows = Vec::new();
        for admission in [false, true] {
            for (candidate, &kind) in CANDIDATES.iter().enumerate() {
                shadows.push(Shadow {
                    candidate,
                    admission,
                    policy: build(kind, capacity, config),
                    present: KeySet::default(),
                    rate: 0.0,
                    last: None,
                });
            }
        }
        Self {
            capacity,
            alpha: 1.0 / window,
            margin: config.adaptive_margin,
            hold: u64::from(config.adaptive_window / 8).max(1),
            live: CANDIDATES.iter().map(|&k| build(k, capacity, config)).collect(),
            present: KeyMap::default(),
            shadows,
            doorkeeper: Doorkeeper::new(capacity.saturating_mul(DOORKEEPER_REACH)),
            // LRU without admission until the shadows know better.
            leader: 0,
            leading_since: None,
            lookups: 0,
            switches: 0,
        }
    }

    /// The policy followed now, and whether admission control is on.
    pub fn following(&self) -> (&'static str, bool) {
        let s = &self.shadows[self.leader];
        (CANDIDATES[s.candidate].name(), s.admission)
    }

    /// How often the followed policy changed.
    pub fn switches(&self) -> u64 {
        self.switches
    }

    /// Every shadow's name, admission, and moving hit rate: for diagnostics.
    pub fn scores(&self) -> Vec<(&'static str, bool, f64)> {
        self.shadows
            .iter()
            .map(|s| (CANDIDATES[s.candidate].name(), s.admission, s.rate))
            .collect()
    }

    /// One lookup of `key`: the doorkeeper sees it, every shadow serves it, the leader may
    /// change.
    fn lookup(&mut self, key: Key, parent: Option<Key>, now: Millis) {
        self.lookups += 1;
        let repeat = self.doorkeeper.sight(key);
        for s in &mut self.shadows {
            s.lookup(key, parent, now, repeat, self.capacity, self.alpha);
        }
        self.elect();
    }

    /// Follows the best shadow once it has led the followed one by the margin for `hold`
    /// lookups in a row: a shadow ahead by a hair, or briefly, is noise.
    fn elect(&mut self) {
        let lead = self.shadows[self.leader].rate;
        let mut best = self.leader;
        for (i, s) in self.shadows.iter().enumerate() {
            if s.rate > self.shadows[best].rate {
                best = i;
            }
        }
        if best == self.leader || self.shadows[best].rate - lead <= self.margin {
            self.leading_since = None;
            return;
        }
        let since = *self.leading_since.get_or_insert(self.lookups);
        if self.lookups - since >= self.hold {
            self.leader = best;
            self.leading_since = None;
            self.switches += 1;
        }
    }
}

impl Policy for Adaptive {
    fn name(&self) -> &'static str {
        "adaptive"
    }

    /// Under pressure, and when the followed shadow is the one with admission control,
    /// only blocks seen before are stored; with room to spare everything is.
    fn admit(&mut self, key: Key, now: Millis) -> bool {
        for p in &mut self.live {
            p.admit(key, now);
        }
        !self.shadows[self.leader].admission || self.present.len() < self.capacity || self.doorkeeper.seen_again(key)
    }

    fn insert(&mut self, key: Key, parent: Option<Key>, now: Millis) {
        self.present.insert(key, parent);
        for p in &mut self.live {
            p.insert(key, parent, now);
        }
    }

    fn touch(&mut self, key: Key, now: Millis) {
        let Some(&parent) = self.present.get(&key) else {
            return;
        };
        self.lookup(key, parent, now);
        for p in &mut self.live {
            p.touch(key, now);
        }
    }

    fn miss(&mut self, key: Key, parent: Option<Key>, now: Millis) {
        self.lookup(key, parent, now);
    }

    fn remove(&mut self, key: Key) {
        if self.present.remove(&key).is_some() {
            for p in &mut self.live {
                p.remove(key);
            }
        }
    }

    fn victim(&mut self, now: Millis, evictable: &mut dyn FnMut(Key) -> bool) -> Option<Key> {
        let chosen = self.shadows[self.leader].candidate;
        let v = self.live[chosen].victim(now, evictable)?;
        for (i, p) in self.live.iter_mut().enumerate() {
            if i != chosen {
                p.evicted(v);
            }
        }
        self.present.remove(&v);
        Some(v)
    }

    fn len(&self) -> usize {
        self.present.len()
    }
}

/// A simulated cache of one candidate, with or without admission control.
#[derive(Debug)]
struct Shadow {
    candidate: usize,
    admission: bool,
    policy: Box<dyn Policy>,
    present: KeySet,
    /// Moving share of lookups that were prefix hits here.
    rate: f64,
    /// The previous lookup, and whether it was a prefix hit here: a block counts as a hit
    /// only if its parent did, as the tier's own prefix matching would have it.
    last: Option<(Key, bool)>,
}

impl Shadow {
    fn lookup(&mut self, key: Key, parent: Option<Key>, now: Millis, repeat: bool, capacity: usize, alpha: f64) {
        let present = self.present.contains(&key);
        let chain = match (parent, self.last) {
            (None, _) => true,
            (Some(p), Some((last, hit))) if last == p => hit,
            // Lookups of several requests interleaved: the parent's presence is the guess.
            (Some(p), _) => self.present.contains(&p),
        };
        let hit = present && chain;
        self.rate += alpha * (f64::from(u8::from(hit)) - self.rate);
        self.last = Some((key, hit));
        if present {
            self.policy.touch(key, now);
            return;
        }
        self.policy.miss(key, parent, now);
        let full = self.present.len() >= capacity;
        if capacity == 0 || !self.policy.admit(key, now) || (self.admission && full && !repeat) {
            return;
        }
        while self.present.len() >= capacity {
            let Some(v) = self.policy.victim(now, &mut |_| true) else {
                return;
            };
            self.present.remove(&v);
        }
        self.policy.insert(key, parent, now);
        self.present.insert(key);
    }
}

/// Keys looked up lately, each with whether it was looked up more than once: admission's
/// "second sighting". One for the tier and every shadow, since it follows lookups alone.
#[derive(Debug)]
struct Doorkeeper {
    reach: usize,
    /// Least recently looked up at the front; true once sighted twice.
    seen: LinkedMap<bool>,
}

impl Doorkeeper {
    fn new(reach: usize) -> Self {
        Self {
            reach,
            seen: LinkedMap::default(),
        }
    }

    /// Records a lookup of `key`; whether it had been looked up before.
    fn sight(&mut self, key: Key) -> bool {
        let before = self.seen.contains(key);
        self.seen.push_back(key, before);
        while self.seen.len() > self.reach && self.seen.pop_front().is_some() {}
        before
    }

    fn seen_again(&self, key: Key) -> bool {
        self.seen.get(key).copied().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{replay, Request};

    fn config(window: u32, margin: f64) -> PolicyConfig {
        PolicyConfig {
            adaptive_window: window,
            adaptive_margin: margin,
            ..PolicyConfig::default()
        }
    }

    /// A hot set of three single-block requests between scans of new blocks: recency
    /// alone keeps nothing of it in four slots, frequency or admission keep it all.
    fn hot_and_scans(rounds: u64) -> Vec<Request> {
        let mut t = Vec::new();
        for r in 0..rounds {
            for k in [1, 2, 3].into_iter().chain((0..3).map(|i| 100 + r * 3 + i)) {
                t.push(Request { at: r, blocks: vec![k] });
            }
        }
        t
    }

    #[test]
    fn follows_the_shadow_that_leads_and_matches_it() {
        let t = hot_and_scans(200);
        let lru = replay(&t, &mut build(PolicyKind::Lru, 4, &PolicyConfig::default()), 4);
        let lfu = replay(&t, &mut build(PolicyKind::Lfu, 4, &PolicyConfig::default()), 4);
        assert_eq!(lru.hit_blocks, 0);
        let mut a = Adaptive::new(4, &config(32, 0.05));
        let s = replay(&t, &mut a, 4);
        assert_ne!(a.following(), ("lru", false));
        assert_eq!(a.switches(), 1);
        // It pays for the lookups it took to notice, and no more.
        assert!(s.hit_blocks + 60 >= lfu.hit_blocks, "{s:?} vs {lfu:?}");
    }

    #[test]
    fn a_margin_never_reached_keeps_it_where_it_started() {
        let t = hot_and_scans(50);
        let mut a = Adaptive::new(4, &config(32, 1.0));
        let s = replay(&t, &mut a, 4);
        assert_eq!((a.following(), a.switches(), s.hit_blocks), (("lru", false), 0, 0));
    }

    #[test]
    fn a_brief_lead_is_not_followed() {
        // hold is 100 lookups; others lead from the second round on (6 lookups a round).
        let mut a = Adaptive::new(4, &config(800, 0.01));
        replay(&hot_and_scans(12), &mut a, 4);
        assert_eq!(a.following(), ("lru", false));
        let mut a = Adaptive::new(4, &config(800, 0.01));
        replay(&hot_and_scans(40), &mut a, 4);
        assert_ne!(a.following(), ("lru", false));
    }

    #[test]
    fn admission_refuses_first_sightings_only_when_full_and_following_it() {
        let mut a = Adaptive::new(2, &config(32, 0.0));
        // Force the follow of LRU with admission.
        a.leader = a.shadows.iter().position(|s| s.admission && s.candidate == 0).unwrap();
        a.miss(1, None, 0);
        assert!(a.admit(1, 0), "room to spare");
        a.insert(1, None, 0);
        a.miss(2, None, 0);
        a.admit(2, 0);
        a.insert(2, None, 0);
        a.leader = a.shadows.iter().position(|s| s.admission && s.candidate == 0).unwrap();
        a.miss(3, None, 0);
        assert!(!a.admit(3, 0), "full, and 3 is new");
        a.miss(3, None, 0);
        assert!(a.admit(3, 0), "3 is seen again");
        assert_eq!(a.victim(0, &mut |_| true), Some(1));
        a.insert(3, None, 0);
        assert_eq!(a.len(), 2);
    }

    #[test]
    fn every_candidate_keeps_the_live_contents() {
        let mut a = Adaptive::new(3, &config(8, 0.0));
        for k in 1..=3 {
            a.miss(k, None, 0);
            a.admit(k, 0);
            a.insert(k, None, 0);
        }
        a.touch(1, 1);
        // Whichever candidate is followed later, each tracks the same three blocks.
        let v = a.victim(2, &mut |_| true).unwrap();
        assert!(a.live.iter().all(|p| p.len() == 2), "{v}");
        a.remove(1);
        assert!(a.live.iter().all(|p| p.len() == a.len()));
    }
}
