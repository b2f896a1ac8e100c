//! The adaptive policy: shadow caches of the fixed policies and of LFU-DA, with and without
//! admission control, fed the tier's access stream; the live tier evicts (and admits) as
//! whichever shadow has led its recent hit rate, with hysteresis.
//!
//! Shadows are metadata only: each is a simulated cache as large as the tier, so its hit
//! rate is the one that policy would have had here, lately. Beside them, every candidate
//! policy also keeps a state over the tier's real contents, so that following another one
//! needs no rebuild: its next victim is ready at once.

use super::lfuda::{LfuDa, Sightings};
use super::{build, Key, KeyMap, KeySet, Millis, Policy, PolicyConfig, PolicyKind};

/// A policy the adaptive one can follow: a fixed one, or LFU-DA (leaves first, see
/// [`super::lfuda`]), which has no `PolicyKind` of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Candidate {
    Fixed(PolicyKind),
    LfuDa,
}

impl Candidate {
    fn name(self) -> &'static str {
        match self {
            Candidate::Fixed(k) => k.name(),
            Candidate::LfuDa => "lfu-da",
        }
    }

    fn build(self, capacity: usize, config: &PolicyConfig) -> Order {
        match self {
            Candidate::Fixed(k) => Order::Fixed(build(k, capacity, config)),
            Candidate::LfuDa => Order::LfuDa(LfuDa::default()),
        }
    }
}

/// The policies the adaptive one chooses among. TTL is left out: as a shadow of a full cache
/// it is LRU that also drops idle blocks, which can only lose hits.
const CANDIDATES: [Candidate; 6] = [
    Candidate::Fixed(PolicyKind::Lru),
    Candidate::Fixed(PolicyKind::Lfu),
    Candidate::Fixed(PolicyKind::Fifo),
    Candidate::Fixed(PolicyKind::Lineage),
    Candidate::Fixed(PolicyKind::Arc),
    Candidate::LfuDa,
];

/// The doorkeeper remembers this many cache-fulls of recently looked-up keys, each with a
/// count (metadata of sixteen keys per block of capacity): a block is admitted under
/// pressure only if it was looked up before within that reach, and LFU-DA's counts reach as
/// far. A block that missed comes back from beyond a cache-full, that is why it missed: on
/// the Mooncake trace, with admission, LRU and leaves-first hit 0.8 to 2 points more with 8
/// than with 2, and no more with 16 or 32; on the synthetic trace LFU-DA with admission hits
/// 0.2 to 0.6 points more with 16 than with 8 (at 6% and 3% of its distinct blocks), and no
/// more with 32.
const DOORKEEPER_REACH: usize = 16;

/// A challenger must also lead the followed shadow over a window this many times as long as
/// the one rates are compared over. With a dozen candidates one is nearly always ahead
/// lately by luck, and following it costs hits; a lead that has lasted is less often luck.
/// On the synthetic trace at 6% of its distinct blocks the tier hits 0.2 points more with
/// 8 than with none, and the same with 16.
const SUSTAINED_WINDOWS: f64 = 8.0;

/// A candidate's state: a fixed policy, or LFU-DA's order, which takes its counts from the
/// doorkeeper's.
#[derive(Debug)]
enum Order {
    Fixed(Box<dyn Policy>),
    LfuDa(LfuDa),
}

impl Order {
    fn admit(&mut self, key: Key, now: Millis) -> bool {
        match self {
            Order::Fixed(p) => p.admit(key, now),
            Order::LfuDa(_) => true,
        }
    }

    fn insert(&mut self, key: Key, parent: Option<Key>, count: u32, now: Millis) {
        match self {
            Order::Fixed(p) => p.insert(key, parent, now),
            Order::LfuDa(o) => o.insert(key, parent, count),
        }
    }

    fn touch(&mut self, key: Key, count: u32, now: Millis) {
        match self {
            Order::Fixed(p) => p.touch(key, now),
            Order::LfuDa(o) => o.touch(key, count),
        }
    }

    fn miss(&mut self, key: Key, parent: Option<Key>, now: Millis) {
        if let Order::Fixed(p) = self {
            p.miss(key, parent, now);
        }
    }

    fn remove(&mut self, key: Key) {
        match self {
            Order::Fixed(p) => p.remove(key),
            Order::LfuDa(o) => o.remove(key),
        }
    }

    fn evicted(&mut self, key: Key) {
        match self {
            Order::Fixed(p) => p.evicted(key),
            Order::LfuDa(o) => o.evicted(key),
        }
    }

    fn victim(&mut self, now: Millis, evictable: &mut dyn FnMut(Key) -> bool) -> Option<Key> {
        match self {
            Order::Fixed(p) => p.victim(now, evictable),
            Order::LfuDa(o) => o.victim(evictable),
        }
    }

    /// Blocks tracked: for tests, which check every state keeps the tier's contents.
    #[cfg(test)]
    fn len(&self) -> usize {
        match self {
            Order::Fixed(p) => p.len(),
            Order::LfuDa(o) => o.len(),
        }
    }
}

/// Metadata per block of capacity: the doorkeeper's sixteen keys with a count each, and per
/// candidate two shadow states (with and without admission) with their sets of present keys,
/// and one live state.
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
    live: Vec<Order>,
    /// Present blocks and their parents: shadows need a touched block's parent.
    present: KeyMap<Option<Key>>,
    shadows: Vec<Shadow>,
    /// The doorkeeper (a count above one is a second sighting), and LFU-DA's counts.
    sightings: Sightings,
    /// The shadow followed.
    leader: usize,
    /// When some shadow began to lead the followed one by the margin, in lookups.
    leading_since: Option<u64>,
    lookups: u64,
    /// What the moving rates would read had every lookup hit: `1 - (1 - alpha)^lookups`.
    /// Rates start at zero, which is no measurement; dividing a lead by this undoes that
    /// start, so that early on a lead is judged at its size rather than shrunk towards zero.
    warmth: f64,
    switches: u64,
}

impl Adaptive {
    pub fn new(capacity: usize, config: &PolicyConfig) -> Self {
        let window = f64::from(config.adaptive_window.max(1));
        let mut shadows = Vec::new();
        for admission in [false, true] {
            for (candidate, &c) in CANDIDATES.iter().enumerate() {
                shadows.push(Shadow {
                    candidate,
                    admission,
                    order: c.build(capacity, config),
                    present: KeySet::default(),
                    rate: 0.0,
                    sustained: 0.0,
                    last: None,
                });
            }
        }
        Self {
            capacity,
            alpha: 1.0 / window,
            margin: config.adaptive_margin,
            hold: u64::from(config.adaptive_window / 8).max(1),
            live: CANDIDATES.iter().map(|&c| c.build(capacity, config)).collect(),
            present: KeyMap::default(),
            shadows,
            sightings: Sightings::new(capacity.saturating_mul(DOORKEEPER_REACH)),
            // LRU without admission until the shadows know better.
            leader: 0,
            leading_since: None,
            lookups: 0,
            warmth: 0.0,
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
        let warmth = self.warmth.max(self.alpha);
        self.shadows
            .iter()
            .map(|s| (CANDIDATES[s.candidate].name(), s.admission, s.rate / warmth))
            .collect()
    }

    /// One lookup of `key`: the doorkeeper counts it, every shadow serves it, the leader may
    /// change. Returns its count.
    fn lookup(&mut self, key: Key, parent: Option<Key>, now: Millis) -> u32 {
        self.lookups += 1;
        self.warmth += self.alpha * (1.0 - self.warmth);
        let count = self.sightings.sight(key);
        let weights = (self.alpha, self.alpha / SUSTAINED_WINDOWS);
        for s in &mut self.shadows {
            s.lookup(key, parent, count, now, self.capacity, weights);
        }
        self.elect();
        count
    }

    /// Follows the best shadow once it has led the followed one by the margin for `hold`
    /// lookups in a row, and over the longer window too: a shadow ahead by a hair, briefly,
    /// or only lately, is noise.
    fn elect(&mut self) {
        let followed = &self.shadows[self.leader];
        let mut best = self.leader;
        for (i, s) in self.shadows.iter().enumerate() {
            if s.rate > self.shadows[best].rate && s.sustained > followed.sustained {
                best = i;
            }
        }
        if best == self.leader || (self.shadows[best].rate - followed.rate) / self.warmth <= self.margin {
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
        !self.shadows[self.leader].admission || self.present.len() < self.capacity || self.sightings.count(key) > 1
    }

    fn insert(&mut self, key: Key, parent: Option<Key>, now: Millis) {
        self.present.insert(key, parent);
        // Stored without a lookup first (a block the engine offloads): one use.
        let count = self.sightings.count(key).max(1);
        for p in &mut self.live {
            p.insert(key, parent, count, now);
        }
    }

    fn touch(&mut self, key: Key, now: Millis) {
        let Some(&parent) = self.present.get(&key) else {
            return;
        };
        let count = self.lookup(key, parent, now);
        for p in &mut self.live {
            p.touch(key, count, now);
        }
    }

    fn miss(&mut self, key: Key, parent: Option<Key>, now: Millis) {
        self.lookup(key, parent, now);
        for p in &mut self.live {
            p.miss(key, parent, now);
        }
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
    order: Order,
    present: KeySet,
    /// Moving share of lookups that were prefix hits here.
    rate: f64,
    /// The same over `SUSTAINED_WINDOWS` windows.
    sustained: f64,
    /// The previous lookup, and whether it was a prefix hit here: a block counts as a hit
    /// only if its parent did, as the tier's own prefix matching would have it.
    last: Option<(Key, bool)>,
}

impl Shadow {
    /// A lookup of `key`, its `count`-th within the doorkeeper's reach; `weights` are one
    /// lookup's in `rate` and in `sustained`.
    fn lookup(&mut self, key: Key, parent: Option<Key>, count: u32, now: Millis, capacity: usize, weights: (f64, f64)) {
        let present = self.present.contains(&key);
        let chain = match (parent, self.last) {
            (None, _) => true,
            (Some(p), Some((last, hit))) if last == p => hit,
            // Lookups of several requests interleaved: the parent's presence is the guess.
            (Some(p), _) => self.present.contains(&p),
        };
        let hit = f64::from(u8::from(present && chain));
        self.rate += weights.0 * (hit - self.rate);
        self.sustained += weights.1 * (hit - self.sustained);
        self.last = Some((key, present && chain));
        if present {
            self.order.touch(key, count, now);
            return;
        }
        self.order.miss(key, parent, now);
        let full = self.present.len() >= capacity;
        if capacity == 0 || !self.order.admit(key, now) || (self.admission && full && count < 2) {
            return;
        }
        while self.present.len() >= capacity {
            let Some(v) = self.order.victim(now, &mut |_| true) else {
                return;
            };
            self.present.remove(&v);
        }
        self.order.insert(key, parent, count, now);
        self.present.insert(key);
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

    fn shadow(a: &Adaptive, name: &str, admission: bool) -> usize {
        a.shadows
            .iter()
            .position(|s| CANDIDATES[s.candidate].name() == name && s.admission == admission)
            .expect("a shadow of every candidate, with and without admission")
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
    fn a_lead_only_lately_is_not_followed() {
        let mut a = Adaptive::new(4, &config(8, 0.0));
        let lineage = shadow(&a, "lineage", false);
        a.warmth = 1.0;
        // Lineage leads lately, but LRU has led longer: hold (one lookup) passes, no switch.
        a.shadows[0].sustained = 0.3;
        a.shadows[lineage].rate = 0.5;
        a.shadows[lineage].sustained = 0.2;
        for _ in 0..3 {
            a.lookups += 1;
            a.elect();
        }
        assert_eq!(a.following(), ("lru", false));
        a.shadows[lineage].sustained = 0.31;
        for _ in 0..2 {
            a.lookups += 1;
            a.elect();
        }
        assert_eq!((a.following(), a.switches()), (("lineage", false), 1));
    }

    #[test]
    fn admission_refuses_first_sightings_only_when_full_and_following_it() {
        let mut a = Adaptive::new(2, &config(32, 0.0));
        // Force the follow of LRU with admission.
        a.leader = shadow(&a, "lru", true);
        a.miss(1, None, 0);
        assert!(a.admit(1, 0), "room to spare");
        a.insert(1, None, 0);
        a.miss(2, None, 0);
        a.admit(2, 0);
        a.insert(2, None, 0);
        a.leader = shadow(&a, "lru", true);
        a.miss(3, None, 0);
        assert!(!a.admit(3, 0), "full, and 3 is new");
        a.miss(3, None, 0);
        assert!(a.admit(3, 0), "3 is seen again");
        assert_eq!(a.victim(0, &mut |_| true), Some(1));
        a.insert(3, None, 0);
        assert_eq!(a.len(), 2);
    }

    #[test]
    fn followed_lfu_da_evicts_leaves_first_by_count() {
        let mut a = Adaptive::new(3, &config(8, 1.0));
        a.leader = shadow(&a, "lfu-da", false);
        for (k, parent) in [(1, None), (2, Some(1)), (3, None)] {
            a.miss(k, parent, 0);
            a.insert(k, parent, 0);
        }
        a.touch(3, 1);
        a.touch(1, 1);
        // 1 holds 2 in place; of the leaves 2 counts least. Then 1 and 3 count two each,
        // and 3 was used longer ago.
        assert_eq!(a.victim(2, &mut |_| true), Some(2));
        assert_eq!(a.victim(2, &mut |_| true), Some(3));
        assert_eq!(a.victim(2, &mut |_| true), Some(1));
        assert_eq!(a.len(), 0);
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

    #[test]
    fn early_leads_are_judged_at_their_size() {
        let mut a = Adaptive::new(2, &config(4, 0.0));
        for k in 1..=3 {
            a.miss(k, None, 0);
        }
        // 1 - (3/4)^3: what three lookups of a rate averaged over four make of a sure hit.
        assert!((a.warmth - 0.578_125).abs() < 1e-12);
    }
}
