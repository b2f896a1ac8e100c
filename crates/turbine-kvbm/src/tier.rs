//! One tier below the engine's pool: a fixed number of slots, an index from block to slot,
//! the policy that picks victims, and leases and pins that keep a block from being evicted.
//!
//! Invariants (checked by `check`):
//! - a key names at most one slot, and a slot in use is in the index under its key;
//! - every slot is either free or in use, never both, and the policy tracks exactly the
//!   slots in use;
//! - a slot with a lease or a pinned key is never chosen as a victim.

use std::collections::HashSet;

use turbine_tokens::HashMapOfHashes;

use crate::policy::{Key, Millis, Policy};
use crate::store::{BlockMeta, Store};
use crate::KvbmError;

/// Index of a slot in a tier.
pub type SlotId = u32;

#[derive(Debug, Clone, Copy)]
struct SlotState {
    meta: Option<BlockMeta>,
    /// Copies reading this slot now.
    leases: u32,
    /// Times the block was offered or matched while here: what promotes it a tier down.
    sightings: u32,
}

/// Why a block offered to a tier was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The tier has it already (it was touched instead).
    Present,
    /// The policy's admission control turned it away.
    NotAdmitted,
    /// Full, and every block is leased or pinned.
    Full,
}

/// Where an offered block goes, and what left to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub slot: SlotId,
    pub evicted: Option<BlockMeta>,
}

pub(crate) struct Tier {
    name: &'static str,
    slots: Vec<SlotState>,
    free: Vec<SlotId>,
    index: HashMapOfHashes<SlotId>,
    policy: Box<dyn Policy>,
    pinned: HashSet<Key>,
    pub(crate) store: Store,
}

impl Tier {
    pub(crate) fn new(name: &'static str, capacity: usize, policy: Box<dyn Policy>, store: Store) -> Self {
        Self {
            name,
            slots: vec![
                SlotState {
                    meta: None,
                    leases: 0,
                    sightings: 0
                };
                capacity
            ],
            free: (0..capacity as SlotId).rev().collect(),
            index: HashMapOfHashes::default(),
            policy,
            pinned: HashSet::new(),
            store,
        }
    }

    /// Puts back blocks a disk file held when it was opened.
    pub(crate) fn restore(&mut self, entries: Vec<(SlotId, BlockMeta)>, now: Millis) {
        for (slot, meta) in entries {
            let key = meta.hash.sequence;
            if slot as usize >= self.slots.len() || self.index.contains_key(&key) {
                continue;
            }
            self.free.retain(|&s| s != slot);
            self.slots[slot as usize].meta = Some(meta);
            self.index.insert(key, slot);
            self.policy.insert(key, meta.parent, now);
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    pub(crate) fn policy_name(&self) -> &'static str {
        self.policy.name()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    pub(crate) fn get(&self, key: Key) -> Option<SlotId> {
        self.index.get(&key).copied()
    }

    pub(crate) fn meta(&self, slot: SlotId) -> Option<BlockMeta> {
        self.slots.get(slot as usize).and_then(|s| s.meta)
    }

    /// A request used the block: the policy learns of it, and it counts as a sighting.
    /// Returns the sightings so far.
    pub(crate) fn touch(&mut self, key: Key, now: Millis) -> u32 {
        let Some(&slot) = self.index.get(&key) else { return 0 };
        self.policy.touch(key, now);
        let s = &mut self.slots[slot as usize];
        s.sightings = s.sightings.saturating_add(1);
        s.sightings
    }

    /// A request looked `key` up and the tier lacks it: what the adaptive policy's shadows
    /// and admission filter learn from.
    pub(crate) fn miss(&mut self, key: Key, parent: Option<Key>, now: Millis) {
        if !self.index.contains_key(&key) {
            self.policy.miss(key, parent, now);
        }
    }

    pub(crate) fn lease(&mut self, slot: SlotId) {
        self.slots[slot as usize].leases += 1;
    }

    pub(crate) fn unlease(&mut self, slot: SlotId) {
        let s = &mut self.slots[slot as usize];
        debug_assert!(s.leases > 0, "unleasing a slot with no lease");
        s.leases = s.leases.saturating_sub(1);
    }

    pub(crate) fn pin(&mut self, key: Key) {
        self.pinned.insert(key);
    }

    pub(crate) fn is_pinned(&self, key: Key) -> bool {
        self.pinned.contains(&key)
    }

    pub(crate) fn pinned(&self) -> usize {
        self.pinned.len()
    }

    pub(crate) fn unpin(&mut self, key: Key) {
        self.pinned.remove(&key);
    }

    /// Finds a slot for `meta`, evicting the policy's victim if the tier is full. The
    /// slot is reserved for it (indexed, tracked by the policy) but holds its bytes only
    /// once the caller has written them; a write that fails must be undone with
    /// [`Tier::remove`].
    pub(crate) fn place(&mut self, meta: BlockMeta, now: Millis) -> Result<Result<Placed, Refused>, KvbmError> {
        let key = meta.hash.sequence;
        if self.index.contains_key(&key) {
            self.touch(key, now);
            return Ok(Err(Refused::Present));
        }
        let mut evicted = None;
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                // An operator's pin outranks the policy's admission control.
                if !self.pinned.contains(&key) && !self.policy.admit(key, now) {
                    return Ok(Err(Refused::NotAdmitted));
                }
                let (slots, index, pinned) = (&self.slots, &self.index, &self.pinned);
                let mut evictable =
                    |k: Key| !pinned.contains(&k) && index.get(&k).is_some_and(|&s| slots[s as usize].leases == 0);
                let Some(victim) = self.policy.victim(now, &mut evictable) else {
                    return Ok(Err(Refused::Full));
                };
                let Some(slot) = self.index.remove(&victim) else {
                    // The policy named a block the tier does not hold: a policy bug, but
                    // not one worth losing the block for.
                    tracing::error!(tier = self.name, policy = self.policy.name(), "victim not in the tier");
                    return Ok(Err(Refused::Full));
                };
                evicted = self.slots[slot as usize].meta.take();
                self.store.clear(slot)?;
                slot
            }
        };
        self.slots[slot as usize] = SlotState {
            meta: Some(meta),
            leases: 0,
            sightings: 1,
        };
        self.index.insert(key, slot);
        self.policy.insert(key, meta.parent, now);
        Ok(Ok(Placed { slot, evicted }))
    }

    /// Blocks idle past the policy's expiry, removed; for policies with a TTL.
    pub(crate) fn expire(&mut self, now: Millis) -> Result<Vec<BlockMeta>, KvbmError> {
        let mut gone = Vec::new();
        loop {
            let (slots, index, pinned) = (&self.slots, &self.index, &self.pinned);
            let mut evictable =
                |k: Key| !pinned.contains(&k) && index.get(&k).is_some_and(|&s| slots[s as usize].leases == 0);
            let Some(key) = self.policy.expired(now, &mut evictable) else {
                break;
            };
            if let Some(slot) = self.index.remove(&key) {
                self.store.clear(slot)?;
                if let Some(meta) = self.slots[slot as usize].meta.take() {
                    gone.push(meta);
                }
                self.free.push(slot);
            }
        }
        Ok(gone)
    }

    /// Drops `key` (a failed write, or a block found bad); false if absent or leased.
    pub(crate) fn remove(&mut self, key: Key) -> Result<bool, KvbmError> {
        let Some(&slot) = self.index.get(&key) else {
            return Ok(false);
        };
        if self.slots[slot as usize].leases > 0 {
            return Ok(false);
        }
        self.index.remove(&key);
        self.policy.remove(key);
        self.store.clear(slot)?;
        self.slots[slot as usize].meta = None;
        self.free.push(slot);
        Ok(true)
    }

    /// Leases held now, over all slots: one per block of each copy running.
    pub(crate) fn leased(&self) -> usize {
        self.slots.iter().map(|s| s.leases as usize).sum()
    }

    /// Every block held, for snapshots.
    pub(crate) fn blocks(&self) -> impl Iterator<Item = BlockMeta> + '_ {
        self.slots.iter().filter_map(|s| s.meta)
    }

    /// Checks every invariant, naming the first broken.
    pub(crate) fn audit(&self) -> Result<(), String> {
        let used = self.slots.iter().filter(|s| s.meta.is_some()).count();
        let name = self.name;
        if used != self.index.len() {
            return Err(format!("{name}: {used} slots in use, {} indexed", self.index.len()));
        }
        if used + self.free.len() != self.slots.len() {
            return Err(format!(
                "{name}: {used} used and {} free of {} slots",
                self.free.len(),
                self.slots.len()
            ));
        }
        if self.policy.len() != used {
            return Err(format!(
                "{name}: the policy tracks {} of {used} blocks",
                self.policy.len()
            ));
        }
        for (&key, &slot) in &self.index {
            if self.slots[slot as usize].meta.map(|m| m.hash.sequence) != Some(key) {
                return Err(format!("{name}: slot {slot} does not hold the block indexed there"));
            }
        }
        if let Some(slot) = self.free.iter().find(|&&s| self.slots[s as usize].meta.is_some()) {
            return Err(format!("{name}: free slot {slot} holds a block"));
        }
        Ok(())
    }

    /// Panics unless every invariant holds; for tests.
    #[cfg(test)]
    pub(crate) fn check(&self) {
        if let Err(e) = self.audit() {
            panic!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{build, PolicyConfig, PolicyKind};
    use turbine_tokens::BlockHash;

    fn meta(k: u64) -> BlockMeta {
        BlockMeta {
            hash: BlockHash { local: k, sequence: k },
            parent: None,
        }
    }

    fn tier(capacity: usize) -> Tier {
        let policy = build(PolicyKind::Lru, capacity, &PolicyConfig::default());
        Tier::new("test", capacity, policy, Store::Metadata)
    }

    fn place(t: &mut Tier, k: u64, now: Millis) -> Result<Placed, Refused> {
        t.place(meta(k), now).unwrap_or(Err(Refused::Full))
    }

    #[test]
    fn leased_and_pinned_blocks_are_never_victims() {
        let mut t = tier(3);
        for k in 1..=3 {
            assert!(place(&mut t, k, k).is_ok());
        }
        // 1 is the least recently used, but leased; 2 is next, but pinned.
        let one = t.get(1).unwrap_or(u32::MAX);
        t.lease(one);
        t.pin(2);
        let placed = place(&mut t, 4, 10);
        assert_eq!(placed.map(|p| p.evicted.map(|m| m.hash.sequence)), Ok(Some(3)));
        t.check();
        // Only leased and pinned blocks, and 4 (the newest) left: 4 goes.
        assert_eq!(
            place(&mut t, 5, 11).map(|p| p.evicted.map(|m| m.hash.sequence)),
            Ok(Some(4))
        );
        t.pin(5);
        assert_eq!(place(&mut t, 6, 12), Err(Refused::Full), "everything leased or pinned");
        assert!(!t.remove(1).unwrap_or(true), "a leased block is not removed");
        t.unlease(one);
        t.unpin(2);
        assert_eq!(
            place(&mut t, 6, 13).map(|p| p.evicted.map(|m| m.hash.sequence)),
            Ok(Some(1))
        );
        assert_eq!(place(&mut t, 6, 14), Err(Refused::Present));
        t.check();
        assert_eq!(t.leased(), 0);
    }
}
