//! The map from block hash to its place in the tree: open addressing with linear probing,
//! a byte of tag per slot in one array and the entries (hash and place) in another, as in
//! SwissTable. Probes scan the compact tag array, which stays in cache far better than the
//! entries, and read an entry only on a matching tag; an insert writes its entry without
//! reading it, and such a store does not hold up the instructions after it.
//!
//! What a standard map does not allow: the caller loads the lines every block of an event
//! will use before storing any, so that their cache misses overlap; one probe serves a
//! lookup and the insert after it; places are one word, written and read whole. The table
//! doubles at 3/4 full, where linear probes start to lengthen, and halves at 1/8.

use super::segment::Loc;

/// The smallest table, in bits of slot count.
const MIN_BITS: u32 = 4;

/// The tag of an empty slot; a full one's is below 0x80.
const EMPTY: u8 = 0xFF;

/// Fibonacci hashing: block hashes are uniform already, but tests' are small structured
/// numbers, and one multiply spreads them over the top bits a home is taken from.
fn spread(hash: u64) -> u64 {
    hash.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn tag(spread: u64) -> u8 {
    (spread & 0x7F) as u8
}

/// A slot found empty by [`BlockTable::lookup`].
pub(super) struct Vacant {
    slot: usize,
    hash: u64,
}

pub(super) struct BlockTable {
    /// A slot's tag, or [`EMPTY`].
    tags: Vec<u8>,
    /// A full slot's hash and place.
    entries: Vec<[u64; 2]>,
    len: usize,
    /// The slot count is `1 << bits`.
    bits: u32,
}

impl Default for BlockTable {
    fn default() -> Self {
        Self::with_bits(MIN_BITS)
    }
}

impl std::fmt::Debug for BlockTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockTable")
            .field("len", &self.len)
            .field("slots", &self.tags.len())
            .finish()
    }
}

impl BlockTable {
    fn with_bits(bits: u32) -> Self {
        Self {
            tags: vec![EMPTY; 1 << bits],
            entries: vec![[0; 2]; 1 << bits],
            len: 0,
            bits,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn memory_bytes(&self) -> usize {
        self.tags.capacity() + self.entries.capacity() * std::mem::size_of::<[u64; 2]>()
    }

    fn mask(&self) -> usize {
        (1 << self.bits) - 1
    }

    #[inline]
    fn home(&self, spread: u64) -> usize {
        (spread >> (64 - self.bits)) as usize
    }

    /// Loads the lines that a lookup of `hash`, and an insert after it, start on, and
    /// nothing else: the caller touches many blocks before looking any up, with nothing
    /// branching on the loads, so that their misses overlap.
    #[inline]
    pub(super) fn touch(&self, hash: u64) -> u64 {
        let home = self.home(spread(hash));
        u64::from(self.tags[home]) ^ self.entries[home][1]
    }

    /// The slot holding `hash`, or else the empty slot where it would go.
    #[inline]
    fn find(&self, hash: u64) -> Result<usize, usize> {
        let spread = spread(hash);
        let tag = tag(spread);
        let mask = self.mask();
        let mut i = self.home(spread);
        loop {
            let t = self.tags[i];
            if t == EMPTY {
                return Err(i);
            }
            if t == tag && self.entries[i][0] == hash {
                return Ok(i);
            }
            i = (i + 1) & mask;
        }
    }

    #[inline]
    pub(super) fn get(&self, hash: u64) -> Option<Loc> {
        self.find(hash).ok().map(|i| Loc(self.entries[i][1]))
    }

    /// Where `hash` is, or else where it would go, for [`Self::fill`]: one probe for a
    /// lookup and the insert that follows it.
    #[inline]
    pub(super) fn lookup(&self, hash: u64) -> Result<Loc, Vacant> {
        match self.find(hash) {
            Ok(i) => Ok(Loc(self.entries[i][1])),
            Err(slot) => Err(Vacant { slot, hash }),
        }
    }

    /// Adds the hash that `vacant` was looked up for at `loc`. The table must not have
    /// changed since.
    #[inline]
    pub(super) fn fill(&mut self, vacant: Vacant, loc: Loc) {
        if self.full() {
            self.insert(vacant.hash, loc);
            return;
        }
        self.tags[vacant.slot] = tag(spread(vacant.hash));
        self.entries[vacant.slot] = [vacant.hash, loc.0];
        self.len += 1;
    }

    /// Moves `hash`, if present, to `loc`.
    #[inline]
    pub(super) fn set(&mut self, hash: u64, loc: Loc) {
        if let Ok(i) = self.find(hash) {
            self.entries[i][1] = loc.0;
        }
    }

    /// Whether one more entry would take the table past 3/4 full, where it grows: linear
    /// probes lengthen quickly beyond.
    fn full(&self) -> bool {
        (self.len + 1) * 4 > 3 << self.bits
    }

    /// Adds `hash` at `loc`; a hash already present is moved there instead.
    pub(super) fn insert(&mut self, hash: u64, loc: Loc) {
        if self.full() {
            self.resize(self.bits + 1);
        }
        match self.find(hash) {
            Ok(i) => self.entries[i][1] = loc.0,
            Err(i) => {
                self.tags[i] = tag(spread(hash));
                self.entries[i] = [hash, loc.0];
                self.len += 1;
            }
        }
    }

    /// Removes `hash` if it is at `loc`; returns whether it was.
    pub(super) fn remove_at(&mut self, hash: u64, loc: Loc) -> bool {
        match self.find(hash) {
            Ok(i) if self.entries[i][1] == loc.0 => {
                self.remove_slot(i);
                true
            }
            _ => false,
        }
    }

    fn remove_slot(&mut self, mut i: usize) {
        let mask = self.mask();
        // Close the gap: later entries of the cluster whose probe passed slot `i` move back
        // into it, so that no probe stops short of its entry.
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            if self.tags[j] == EMPTY {
                break;
            }
            let home = self.home(spread(self.entries[j][0]));
            if j.wrapping_sub(home) & mask >= j.wrapping_sub(i) & mask {
                self.tags[i] = self.tags[j];
                self.entries[i] = self.entries[j];
                i = j;
            }
        }
        self.tags[i] = EMPTY;
        self.len -= 1;
        // Halved at 1/8 full, so that memory follows what is held, with room to grow
        // back before the next doubling.
        if self.bits > MIN_BITS && self.len * 8 < 1 << self.bits {
            self.resize(self.bits - 1);
        }
    }

    fn resize(&mut self, bits: u32) {
        let old = std::mem::replace(self, Self::with_bits(bits));
        self.len = old.len;
        // In table order, homes in the new table rise with the old ones: both arrays are
        // written front to back.
        for (&t, &entry) in old.tags.iter().zip(&old.entries) {
            if t != EMPTY {
                self.put(t, entry);
            }
        }
    }

    /// Puts an entry known to be absent in the first empty slot from its home.
    fn put(&mut self, tag: u8, entry: [u64; 2]) {
        let mask = self.mask();
        let mut i = self.home(spread(entry[0]));
        while self.tags[i] != EMPTY {
            i = (i + 1) & mask;
        }
        self.tags[i] = tag;
        self.entries[i] = entry;
    }

    #[cfg(test)]
    pub(super) fn slot_count(&self) -> usize {
        self.tags.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn loc(n: u64) -> Loc {
        Loc::new((n % 1000) as u32, (n / 7) as u32)
    }

    proptest! {
        /// Inserts, moves and removals of keys from a range (so that they collide, and
        /// clusters wrap round the table's end) agree with a standard map, through growing
        /// and shrinking.
        #[test]
        fn agrees_with_a_map(ops in proptest::collection::vec((0u8..3, 0u64..3000), 1..4000)) {
            let mut t = BlockTable::default();
            let mut m = HashMap::new();
            for (op, k) in ops {
                match op {
                    0 => {
                        m.insert(k, loc(k));
                        t.insert(k, loc(k));
                    }
                    1 => {
                        let l = loc(k + 1);
                        if let Some(v) = m.get_mut(&k) {
                            *v = l;
                        }
                        t.set(k, l);
                    }
                    _ => {
                        let at = m.get(&k).copied().unwrap_or(loc(k + 2));
                        prop_assert_eq!(t.remove_at(k, loc(k + 2)), at == loc(k + 2) && m.contains_key(&k));
                        prop_assert_eq!(t.remove_at(k, at), m.remove(&k).is_some());
                    }
                }
                prop_assert_eq!(t.len(), m.len());
                prop_assert!(t.len() * 4 <= t.slot_count() * 3);
                prop_assert!(t.slot_count() == 1 << MIN_BITS || t.len() * 8 >= t.slot_count());
            }
            for k in 0..3000 {
                prop_assert_eq!(t.get(k), m.get(&k).copied());
            }
        }
    }

    #[test]
    fn a_million_entries_grow_and_shrink_back() {
        let mut t = BlockTable::default();
        let keys: Vec<u64> = (0..1_000_000u64)
            .map(|i| i.wrapping_mul(0x2545_F491_4F6C_DD1D))
            .collect();
        for &k in &keys {
            t.insert(k, loc(k));
        }
        assert_eq!(t.slot_count(), 1 << 21);
        assert!(keys.iter().all(|&k| t.get(k) == Some(loc(k))));
        for &k in &keys[1..] {
            assert!(t.remove_at(k, loc(k)));
        }
        assert_eq!(t.get(keys[0]), Some(loc(keys[0])));
        assert_eq!(t.slot_count(), 1 << MIN_BITS, "removals free the table");
    }
}
