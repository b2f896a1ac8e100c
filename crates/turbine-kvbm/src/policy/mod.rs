//! Eviction policies: which block a full tier gives up, and whether a new block is admitted
//! at all. Policies hold metadata only (keys, counters, order), never bytes, so that the
//! adaptive policy can run shadow copies of the others beside the live one.

mod adaptive;
mod arc;
mod belady;
mod fifo;
mod lfu;
mod lfuda;
mod lineage;
mod list;
mod lru;
mod pinned;
mod replay;
mod ttl;

use std::fmt;
use std::str::FromStr;

use turbine_tokens::SequenceHash;

pub use adaptive::Adaptive;
pub use arc::Arc;
pub use belady::belady;
pub use fifo::Fifo;
pub use lfu::Lfu;
pub use lineage::Lineage;
pub use lru::Lru;
pub use pinned::Pinned;
pub use replay::{replay, ReplayStats, Request};
pub use ttl::Ttl;

/// A block's identity in every tier: its sequence hash.
pub type Key = SequenceHash;

/// Time as policies see it: milliseconds from an arbitrary start (a trace's timestamps, or
/// an engine's clock). Only differences matter.
pub type Millis = u64;

/// An eviction policy over the blocks of one tier.
///
/// The tier tells the policy every change to its contents; the policy keeps whatever
/// order it needs and names a victim when asked. A block the tier must not evict now
/// (leased for a copy, pinned) is skipped through the `evictable` predicate and stays
/// in the policy's state.
///
/// Per block a request looks up, in the request's order, the tier calls [`Policy::touch`]
/// if the block is present, and [`Policy::miss`] if it is not; when an absent block is
/// offered later, [`Policy::admit`], then, if admitted, [`Policy::victim`] as often as it
/// needs room and [`Policy::insert`].
pub trait Policy: Send + std::fmt::Debug {
    /// The policy's name as the `--kvbm-policy` flag spells it.
    fn name(&self) -> &'static str;

    /// Whether a block that is not present should be stored when the tier is full.
    /// Called once per offer, before [`Policy::insert`]; policies without admission
    /// control admit everything.
    fn admit(&mut self, _key: Key, _now: Millis) -> bool {
        true
    }

    /// `key` was stored; `parent` is the block before it in its sequence, if any.
    fn insert(&mut self, key: Key, parent: Option<Key>, now: Millis);

    /// `key`, present, was used again (matched by a request, or offered again).
    fn touch(&mut self, key: Key, now: Millis);

    /// `key` was looked up and is not present; `parent` is the block before it in the
    /// request. Policies that learn from the whole access stream (the adaptive policy's
    /// shadows, its doorkeeper) need it; the others ignore it.
    fn miss(&mut self, _key: Key, _parent: Option<Key>, _now: Millis) {}

    /// `key` left the tier for a reason of the tier's own (invalidated, or a copy failed).
    fn remove(&mut self, key: Key);

    /// `key` was evicted as another policy chose (the adaptive policy's candidates that it
    /// does not follow). Policies that remember their victims (ARC's ghosts, LFU's counts)
    /// remember this one too, so that they are ready when followed; the rest forget it.
    fn evicted(&mut self, key: Key) {
        self.remove(key)
    }

    /// The block to evict next among those `evictable` accepts, removed from the policy's
    /// state; `None` if no present block is evictable.
    fn victim(&mut self, now: Millis, evictable: &mut dyn FnMut(Key) -> bool) -> Option<Key>;

    /// A present block past its idle expiry (TTL), removed from the policy's state; `None`
    /// if none has expired. Policies without expiry never expire anything.
    fn expired(&mut self, _now: Millis, _evictable: &mut dyn FnMut(Key) -> bool) -> Option<Key> {
        None
    }

    /// Blocks the policy tracks as present.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// So that wrappers such as `Pinned` take what `build` returns as well as a concrete policy.
impl<P: Policy + ?Sized> Policy for Box<P> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn admit(&mut self, key: Key, now: Millis) -> bool {
        (**self).admit(key, now)
    }
    fn insert(&mut self, key: Key, parent: Option<Key>, now: Millis) {
        (**self).insert(key, parent, now)
    }
    fn touch(&mut self, key: Key, now: Millis) {
        (**self).touch(key, now)
    }
    fn miss(&mut self, key: Key, parent: Option<Key>, now: Millis) {
        (**self).miss(key, parent, now)
    }
    fn remove(&mut self, key: Key) {
        (**self).remove(key)
    }
    fn evicted(&mut self, key: Key) {
        (**self).evicted(key)
    }
    fn victim(&mut self, now: Millis, evictable: &mut dyn FnMut(Key) -> bool) -> Option<Key> {
        (**self).victim(now, evictable)
    }
    fn expired(&mut self, now: Millis, evictable: &mut dyn FnMut(Key) -> bool) -> Option<Key> {
        (**self).expired(now, evictable)
    }
    fn len(&self) -> usize {
        (**self).len()
    }
}

/// The policies [`build`] makes, as `--kvbm-policy` and `turbine trace analyze --policy`
/// spell them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyKind {
    Lru,
    Lfu,
    Fifo,
    Ttl,
    Lineage,
    Arc,
    Adaptive,
}

impl PolicyKind {
    /// Every kind, in the order tables list them.
    pub const ALL: [PolicyKind; 7] = [
        PolicyKind::Lru,
        PolicyKind::Lfu,
        PolicyKind::Fifo,
        PolicyKind::Ttl,
        PolicyKind::Lineage,
        PolicyKind::Arc,
        PolicyKind::Adaptive,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Lru => "lru",
            PolicyKind::Lfu => "lfu",
            PolicyKind::Fifo => "fifo",
            PolicyKind::Ttl => "ttl",
            PolicyKind::Lineage => "lineage",
            PolicyKind::Arc => "arc",
            PolicyKind::Adaptive => "adaptive",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A policy name [`PolicyKind`] does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown policy {name:?} (expected one of lru, lfu, fifo, ttl, lineage, arc, adaptive)")]
pub struct UnknownPolicy {
    pub name: String,
}

impl FromStr for PolicyKind {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PolicyKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownPolicy { name: s.to_owned() })
    }
}

/// The tunables of the policies that have any; [`Default`] is the one source of defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    /// `ttl`: a block idle this long has expired.
    pub ttl_ms: Millis,
    /// `lfu`: counts halve every this many ms of the policy's clock; 0 never decays.
    pub lfu_half_life_ms: Millis,
    /// `adaptive`: block lookups over which shadows' hit rates are averaged (the time
    /// constant of their moving averages).
    pub adaptive_window: u32,
    /// `adaptive`: how far (a hit-rate difference, 0.01 is one point) another candidate must
    /// lead the one followed, for an eighth of a window without a break, before the live
    /// choice switches to it.
    pub adaptive_margin: f64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            ttl_ms: 10 * 60 * 1000,
            lfu_half_life_ms: 5 * 60 * 1000,
            adaptive_window: 16_384,
            adaptive_margin: 0.005,
        }
    }
}

/// A policy of `kind` for a tier of `capacity_blocks` blocks (LFU, ARC and the adaptive
/// policy size their memory of evicted blocks and their shadows by it; the others ignore it).
pub fn build(kind: PolicyKind, capacity_blocks: usize, config: &PolicyConfig) -> Box<dyn Policy> {
    match kind {
        PolicyKind::Lru => Box::new(Lru::new()),
        PolicyKind::Lfu => Box::new(Lfu::new(config.lfu_half_life_ms, capacity_blocks)),
        PolicyKind::Fifo => Box::new(Fifo::new()),
        PolicyKind::Ttl => Box::new(Ttl::new(config.ttl_ms)),
        PolicyKind::Lineage => Box::new(Lineage::new()),
        PolicyKind::Arc => Box::new(Arc::new(capacity_blocks)),
        PolicyKind::Adaptive => Box::new(Adaptive::new(capacity_blocks, config)),
    }
}

/// Hashes keys with one multiplication. Sequence hashes are uniform already, but trace ids
/// are small consecutive integers, which a pass-through hash (`turbine_tokens::PassThrough`)
/// would give all the same tag byte in the map's control bytes.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0 ^ u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let x = (n ^ self.0.rotate_left(5)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        // The product's low bits depend only on the key's low bits; fold the high ones in.
        self.0 = x ^ (x >> 32);
    }
}

pub(crate) type KeyMap<V> = std::collections::HashMap<Key, V, std::hash::BuildHasherDefault<KeyHasher>>;
pub(crate) type KeySet = std::collections::HashSet<Key, std::hash::BuildHasherDefault<KeyHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_print_their_names() {
        for k in PolicyKind::ALL {
            assert_eq!(k.to_string().parse::<PolicyKind>(), Ok(k));
            assert_eq!(build(k, 4, &PolicyConfig::default()).name(), k.name());
        }
        let e = "lruu".parse::<PolicyKind>().unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"unknown policy "lruu" (expected one of lru, lfu, fifo, ttl, lineage, arc, adaptive)"#
        );
    }
}
