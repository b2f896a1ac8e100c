//! Who holds a block in which storage tier. A span's set says who holds its blocks in any
//! tier; where some holder has them off the device (host memory, disk), the span also names
//! its breakdown by tier, interned here. Nearly every span is device-only and names none, so
//! spans stay three words and matching and storing device blocks cost what they did.

use std::collections::HashMap;

use turbine_protocols::kv::StorageTier;

use super::segment::WorkerSet;

/// Who holds a block in each tier, by [`StorageTier::index`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub(super) struct Tiers([WorkerSet; 3]);

impl Tiers {
    /// Held by `set`, on the device only.
    pub(super) fn device(set: WorkerSet) -> Self {
        Self([set, WorkerSet::default(), WorkerSet::default()])
    }

    pub(super) fn with(mut self, slot: usize, tier: StorageTier) -> Self {
        self.0[tier.index()] = self.0[tier.index()].with(slot);
        self
    }

    pub(super) fn without(mut self, slot: usize, tier: StorageTier) -> Self {
        self.0[tier.index()] = self.0[tier.index()].without(slot);
        self
    }

    /// Without `slot` in any tier.
    pub(super) fn without_slot(self, slot: usize) -> Self {
        Self(self.0.map(|s| s.without(slot)))
    }

    pub(super) fn contains(self, slot: usize, tier: StorageTier) -> bool {
        self.0[tier.index()].contains(slot)
    }

    /// Who holds the block in any tier.
    pub(super) fn union(self) -> WorkerSet {
        self.0[0].or(self.0[1]).or(self.0[2])
    }

    /// Whether any holder has it off the device.
    pub(super) fn off_device(self) -> bool {
        !(self.0[1].is_empty() && self.0[2].is_empty())
    }

    /// Among `among`, who holds the block at best in host memory, and at best on disk.
    pub(super) fn best_off_device(self, among: WorkerSet) -> (WorkerSet, WorkerSet) {
        let [device, host, disk] = self.0;
        let host = among.and(host).and_not(device);
        let disk = among.and(disk).and_not(device).and_not(host);
        (host, disk)
    }
}

/// The breakdowns that spans name, each once. Id [`TierTable::NONE`] names none: the span's
/// holders have its blocks on the device only. Ids are never freed one by one (spans copy
/// them freely as they split); [`TierTable::retain`] drops those no span names any more.
#[derive(Debug, Default)]
pub(super) struct TierTable {
    tiers: Vec<Tiers>,
    ids: HashMap<Tiers, u32>,
    /// How many were named when the table was last collected.
    kept: usize,
}

/// The table is not collected below this many breakdowns.
const MIN_COLLECT: usize = 4096;

impl TierTable {
    pub(super) const NONE: u32 = 0;

    /// The breakdown of a span held by `set` that names `id`.
    #[inline]
    pub(super) fn get(&self, set: WorkerSet, id: u32) -> Tiers {
        match id {
            Self::NONE => Tiers::device(set),
            id => self.tiers[id as usize - 1],
        }
    }

    /// The id that names `tiers`.
    #[inline]
    pub(super) fn intern(&mut self, tiers: Tiers) -> u32 {
        if !tiers.off_device() {
            return Self::NONE;
        }
        self.intern_off_device(tiers)
    }

    /// Apart, so that storing device blocks inlines only the test above.
    #[inline(never)]
    fn intern_off_device(&mut self, tiers: Tiers) -> u32 {
        let Self { tiers: all, ids, .. } = self;
        *ids.entry(tiers).or_insert_with(|| {
            all.push(tiers);
            all.len() as u32
        })
    }

    /// Whether enough breakdowns may have fallen out of use to collect them; `spans`, the
    /// tree's size, makes a collection's scan cost no more than the stores that led to it.
    pub(super) fn needs_collecting(&self, spans: usize) -> bool {
        self.tiers.len() > (2 * self.kept).max(spans).max(MIN_COLLECT)
    }

    /// Keeps only the breakdowns `used` (ids, sorted, distinct); the one `used[i]` named is
    /// then `i + 1`.
    pub(super) fn retain(&mut self, used: &[u32]) {
        self.tiers = used.iter().map(|&id| self.tiers[id as usize - 1]).collect();
        self.ids = self.tiers.iter().enumerate().map(|(i, &t)| (t, i as u32 + 1)).collect();
        self.kept = used.len();
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.tiers.len()
    }

    pub(super) fn memory_bytes(&self) -> usize {
        let entry = std::mem::size_of::<Tiers>();
        // A hash map's entry and control byte; its own overhead is not exposed.
        self.tiers.capacity() * entry + self.ids.capacity() * (entry + 4 + 1)
    }
}
