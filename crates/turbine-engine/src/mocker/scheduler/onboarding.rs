//! Sequences waiting on loads from the tiers below the pool: admitted, holding their
//! blocks, but scheduled only once their copy has finished. A sequence cancelled meanwhile
//! leaves its blocks here until then, as the copy still writes them; what it loaded stays
//! cached in the pool.

use turbine_tokens::{BlockHash, SequenceHash};

use super::{LowerTiers, Scheduler, SeqTokens, Step};
use crate::pool::BlockId;

#[derive(Debug)]
pub(super) struct Onboarding {
    /// The sequence's slot; `None` once it has gone.
    slot: Option<usize>,
    /// The blocks of a sequence that has gone.
    blocks: Vec<BlockId>,
    /// Index of the first block loaded, and the hashes of those being loaded.
    from: usize,
    hashes: Vec<BlockHash>,
    parent: Option<SequenceHash>,
}

impl Onboarding {
    /// A load into the blocks of the sequence at `slot`, from its block `from`, of
    /// `hashes`, following the blocks `before` (which the pool holds).
    pub(super) fn new(slot: usize, from: usize, hashes: &[BlockHash], before: &[BlockHash]) -> Self {
        Self {
            slot: Some(slot),
            blocks: Vec::new(),
            from,
            hashes: hashes.to_vec(),
            parent: before.last().map(|h| h.sequence),
        }
    }

    /// The sequence has gone: its `blocks` wait here for the copy to end.
    pub(super) fn orphan(&mut self, blocks: Vec<BlockId>) {
        self.slot = None;
        self.blocks = blocks;
    }
}

impl<T, K: SeqTokens> Scheduler<T, K> {
    /// Loads running for sequences still live: they count against the sequence cap.
    pub(super) fn loads_of_live(&self) -> usize {
        self.loading.values().filter(|l| l.slot.is_some()).count()
    }

    /// Loads not yet finished, including those of sequences that have gone: the engine
    /// waits for them before it can call itself idle.
    pub fn loads_in_flight(&self) -> usize {
        self.loading.len()
    }

    /// Tells the tiers of arrivals and departures, and takes in the loads they finished:
    /// their blocks are registered and their sequences join the running ones.
    pub(super) fn tell_tiers(&mut self, step: &mut Step, lower: &mut dyn LowerTiers) {
        let bs = self.config.block_size;
        for id in std::mem::take(&mut self.ended) {
            lower.forget(id);
        }
        if self.config.enable_prefix_caching && lower.prefetches() {
            for (slot, id) in std::mem::take(&mut self.arrived) {
                let Some(seq) = self.slots[slot].as_ref().filter(|s| s.id == id) else {
                    continue;
                };
                let in_pool = self.pool.match_prefix(&seq.hashes);
                lower.arrived(id, &seq.hashes[in_pool..]);
            }
        } else {
            self.arrived.clear();
        }
        // Always asked: prefetches finish there too, with no load waiting on them.
        for (id, loaded) in lower.finished() {
            let Some(load) = self.loading.remove(&id) else { continue };
            for h in &load.hashes {
                if self.in_flight.get(&h.sequence) == Some(&id) {
                    self.in_flight.remove(&h.sequence);
                }
            }
            let loaded = loaded.min(load.hashes.len());
            let end = load.from + loaded;
            match load.slot {
                None => {
                    if loaded > 0 {
                        self.pool
                            .register(&load.blocks[load.from..end], &load.hashes[..loaded], load.parent);
                    }
                    self.pool.release(load.blocks.iter().rev().copied());
                }
                Some(slot) => {
                    let seq = self.slots[slot]
                        .as_mut()
                        .expect("a live load's slot holds its sequence");
                    if loaded > 0 {
                        self.pool
                            .register(&seq.blocks[load.from..end], &load.hashes[..loaded], load.parent);
                    }
                    // Fewer loaded than asked leaves more to compute, in the same blocks.
                    seq.computed = end * bs;
                    seq.registered = end;
                    seq.cached_tokens.get_or_insert((end * bs) as u32);
                    self.running.push(slot);
                    step.onboarded += loaded;
                }
            }
        }
    }
}
