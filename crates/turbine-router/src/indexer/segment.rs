//! The tree's pieces: sets of workers, places of blocks, and segments, the arrays of chained
//! hashes with the spans that say who holds them.

use std::hash::Hasher;

use super::tiers::{TierTable, Tiers};

/// A set of workers, by their slot in the indexer. Two words rather than a `u128`, whose
/// 16-byte alignment would pad every span.
#[derive(Debug, Clone, Copy, Default, Eq)]
pub(super) struct WorkerSet([u64; 2]);

/// Word by word: a derived comparison loads each side as one 16-byte vector, and where a
/// side was just written a word at a time, that load waits for every store in flight.
impl PartialEq for WorkerSet {
    fn eq(&self, other: &Self) -> bool {
        self.0[0] == other.0[0] && self.0[1] == other.0[1]
    }
}

impl std::hash::Hash for WorkerSet {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl WorkerSet {
    pub(super) fn with(mut self, slot: usize) -> Self {
        self.0[slot / 64] |= 1 << (slot % 64);
        self
    }
    pub(super) fn without(mut self, slot: usize) -> Self {
        self.0[slot / 64] &= !(1 << (slot % 64));
        self
    }
    pub(super) fn contains(self, slot: usize) -> bool {
        self.0[slot / 64] & (1 << (slot % 64)) != 0
    }
    pub(super) fn is_empty(self) -> bool {
        self.0 == [0, 0]
    }
    pub(super) fn or(self, other: Self) -> Self {
        Self([self.0[0] | other.0[0], self.0[1] | other.0[1]])
    }
    pub(super) fn and(self, other: Self) -> Self {
        Self([self.0[0] & other.0[0], self.0[1] & other.0[1]])
    }
    pub(super) fn and_not(self, other: Self) -> Self {
        Self([self.0[0] & !other.0[0], self.0[1] & !other.0[1]])
    }
    pub(super) fn slots(self) -> impl Iterator<Item = usize> {
        (0..2).flat_map(move |word| {
            let mut bits = self.0[word];
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let bit = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                Some(word * 64 + bit)
            })
        })
    }
}

/// Where a block sits: its segment (the high half) and its index there (the low half). One
/// word, written and read whole: a read of a value written in halves waits for every store
/// ahead of it, the map's cache-missing ones included.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Loc(pub(super) u64);

impl Loc {
    /// No place: its offset is past any segment's end.
    pub(super) const NONE: Self = Self(u64::MAX);

    pub(super) fn new(seg: u32, off: u32) -> Self {
        Self(u64::from(seg) << 32 | u64::from(off))
    }
    pub(super) fn seg(self) -> u32 {
        (self.0 >> 32) as u32
    }
    pub(super) fn off(self) -> u32 {
        self.0 as u32
    }
    /// The place after this one in its segment (offsets stay below the segment size limit).
    pub(super) fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl std::fmt::Debug for Loc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seg(), self.off())
    }
}

/// Blocks from `start` up to the next span (or the segment's end) are held by exactly `set`,
/// in any tier, and tier by tier as `tiers` names in the [`TierTable`]. An empty set marks
/// dead blocks: held by no worker, and not in the map.
#[derive(Debug, Clone, Copy)]
pub(super) struct Span {
    pub(super) start: u32,
    /// [`TierTable::NONE`] where every holder has the blocks on the device only. It fills
    /// what would be the padding after `start`: a span is 24 bytes either way.
    pub(super) tiers: u32,
    pub(super) set: WorkerSet,
}

impl Span {
    /// Whether two spans hold their blocks alike: interned, equal breakdowns have equal ids.
    #[inline]
    pub(super) fn same(&self, other: &Span) -> bool {
        self.set == other.set && self.tiers == other.tiers
    }
}

/// A piece of chain: hashes that followed one another in the events, and who holds which,
/// as spans. A free segment (on the tree's free list) has no hashes.
#[derive(Debug, Default)]
pub(super) struct Segment {
    pub(super) hashes: Vec<u64>,
    /// Sorted by start, the first at 0; neighbours differ (set or tiers).
    pub(super) spans: Vec<Span>,
    /// Blocks in spans with a non-empty set.
    pub(super) live: u32,
}

impl Segment {
    pub(super) fn len(&self) -> u32 {
        self.hashes.len() as u32
    }

    /// The span that offset `off` is in.
    #[inline]
    pub(super) fn span_of(&self, off: u32) -> usize {
        self.spans.partition_point(|s| s.start <= off).saturating_sub(1)
    }

    #[inline]
    pub(super) fn span_end(&self, i: usize) -> u32 {
        self.spans.get(i + 1).map_or(self.len(), |s| s.start)
    }

    #[inline]
    pub(super) fn set_at(&self, off: u32) -> WorkerSet {
        self.spans[self.span_of(off)].set
    }

    /// Makes a span start at `at`, returning its index (the span count where `at` is the
    /// segment's end).
    pub(super) fn split(&mut self, at: u32) -> usize {
        if at >= self.len() {
            return self.spans.len();
        }
        let i = self.span_of(at);
        if self.spans[i].start == at {
            return i;
        }
        let span = Span {
            start: at,
            ..self.spans[i]
        };
        self.spans.insert(i + 1, span);
        i + 1
    }

    /// Maps who holds blocks `a..b`, tier by tier, through `f`. Returns how many blocks'
    /// sets (holders in any tier) changed.
    pub(super) fn update(&mut self, a: u32, b: u32, table: &mut TierTable, f: impl Fn(Tiers) -> Tiers) -> u32 {
        let i = self.split(a);
        let j = self.split(b);
        let mut changed = 0;
        for k in i..j {
            let span = self.spans[k];
            let old = table.get(span.set, span.tiers);
            let new = f(old);
            if new == old {
                continue;
            }
            let set = new.union();
            if set != span.set {
                let n = self.span_end(k) - span.start;
                changed += n;
                match (span.set.is_empty(), set.is_empty()) {
                    (true, false) => self.live += n,
                    (false, true) => self.live -= n,
                    _ => {}
                }
            }
            self.spans[k].set = set;
            self.spans[k].tiers = table.intern(new);
        }
        // Neighbours that now agree merge, across the range's edges too.
        let lo = i.saturating_sub(1);
        let hi = (j + 1).min(self.spans.len());
        let mut w = lo + 1;
        for r in lo + 1..hi {
            if !self.spans[r].same(&self.spans[w - 1]) {
                self.spans[w] = self.spans[r];
                w += 1;
            }
        }
        self.spans.drain(w.min(hi)..hi);
        changed
    }

    /// Appends `hash` as a dead block; the store that appends it then makes it live.
    pub(super) fn push_dead(&mut self, hash: u64) -> u32 {
        let off = self.len();
        if self.spans.last().is_none_or(|s| !s.set.is_empty()) {
            self.spans.push(Span {
                start: off,
                tiers: TierTable::NONE,
                set: WorkerSet::default(),
            });
        }
        self.hashes.push(hash);
        off
    }
}
