//! The mocker's scheduler: vLLM-style continuous batching over the block pool, as a plain
//! state machine. [`Scheduler::schedule`] plans a step within the token budget and the
//! sequence cap, preempting when blocks run out; [`Scheduler::complete`] applies the step:
//! tokens computed, blocks registered, one new token per sequence that caught up.
//!
//! No clock and no I/O here: the engine loop decides when steps happen.
//!
//! Sequences live in a slab and carry their output sink (`T`), so that a step touches each
//! running sequence once: at a million tokens a second, memory traffic is the cost. For
//! the same reason generated tokens are not stored: they are a function of position
//! ([`TokenSource`]), computed when a block fills and must be hashed, when a stop token
//! must be looked for, and by the reader.

use std::collections::{HashMap, VecDeque};

use turbine_protocols::kv::{KvEvent, KvSnapshot, WorkerLoad};
use turbine_protocols::FinishReason;
use turbine_tokens::{chain_hash, local_hash, BlockHash};

use super::output::TokenSource;
use super::timing;
use super::MockerConfig;
use crate::pool::{BlockId, BlockPool};

pub(crate) type SeqId = u64;

/// What a request asks of the scheduler.
#[derive(Debug, Clone)]
pub(crate) struct SeqSpec {
    pub(crate) prompt: Vec<u32>,
    pub(crate) max_tokens: u32,
    pub(crate) stop_token_ids: Vec<u32>,
}

#[derive(Debug)]
struct Seq<T> {
    id: SeqId,
    sink: T,
    prompt: Vec<u32>,
    /// Tokens generated so far; their values come from `source`.
    generated: usize,
    max_tokens: u32,
    stop_token_ids: Vec<u32>,
    blocks: Vec<BlockId>,
    /// Hashes of every full block of the prompt and generated tokens.
    hashes: Vec<BlockHash>,
    /// Tokens whose KV is computed.
    computed: usize,
    /// Leading blocks registered in (or found in) the pool.
    registered: usize,
    /// Prompt tokens found cached when first admitted; reported on the first token.
    cached_tokens: Option<u32>,
    reported_first: bool,
    source: TokenSource,
}

impl<T> Seq<T> {
    /// Prompt and generated tokens.
    fn len(&self) -> usize {
        self.prompt.len() + self.generated
    }

    /// Tokens still to compute before the next token can be produced.
    fn pending(&self) -> usize {
        self.len() - self.computed
    }

    fn is_decoding(&self) -> bool {
        self.generated > 0 && self.pending() == 1
    }

    /// Counts the next generated token, hashing the block it fills. `scratch` keeps the
    /// block's tokens, so that hashing allocates nothing.
    fn push_token(&mut self, block_size: usize, scratch: &mut Vec<u32>) {
        self.generated += 1;
        let len = self.len();
        if len % block_size != 0 {
            return;
        }
        scratch.clear();
        let start = len - block_size;
        if start < self.prompt.len() {
            scratch.extend_from_slice(&self.prompt[start..]);
        }
        let first_generated = start.saturating_sub(self.prompt.len()) as u32;
        scratch.extend((first_generated..self.generated as u32).map(|i| self.source.token(i)));
        let local = local_hash(scratch);
        let sequence = self.hashes.last().map_or(local, |p| chain_hash(p.sequence, local));
        self.hashes.push(BlockHash { local, sequence });
    }
}

/// The tokens sequence `id` generates: seeded by the engine's seed and `id`, so the same
/// requests in the same order give the same tokens.
pub(crate) fn token_source(config: &MockerConfig, id: SeqId) -> TokenSource {
    TokenSource::new(config.seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15), &config.vocab)
}

/// The plan of one step: which sequences compute how many tokens.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    /// (slot, sequence, tokens to compute).
    pub(crate) entries: Vec<(usize, SeqId, usize)>,
    pub(crate) prefill_tokens: usize,
    pub(crate) decodes: usize,
    pub(crate) preempted: Vec<SeqId>,
}

impl Step {
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    #[cfg(test)]
    pub(crate) fn tokens(&self) -> usize {
        self.entries.iter().map(|(_, _, n)| n).sum()
    }
}

/// A token produced for a sequence by a completed step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Produced {
    pub(crate) seq: SeqId,
    pub(crate) token: u32,
    /// Set on the sequence's first token.
    pub(crate) cached_tokens: Option<u32>,
    pub(crate) finish: Option<FinishReason>,
}

#[derive(Debug)]
pub(crate) struct Scheduler<T> {
    config: MockerConfig,
    pool: BlockPool,
    slots: Vec<Option<Seq<T>>>,
    free_slots: Vec<usize>,
    /// Slot of each live sequence, for cancellation by id.
    index: HashMap<SeqId, usize>,
    waiting: VecDeque<usize>,
    running: Vec<usize>,
    /// A block's tokens while they are hashed.
    scratch: Vec<u32>,
}

impl<T> Scheduler<T> {
    pub(crate) fn new(config: MockerConfig) -> Self {
        let pool = BlockPool::new(config.num_blocks, config.block_size);
        Self {
            config,
            pool,
            slots: Vec::new(),
            free_slots: Vec::new(),
            index: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Queues a sequence whose tokens go to `sink`; its prompt must fit in the pool.
    pub(crate) fn add(&mut self, id: SeqId, spec: SeqSpec, sink: T) {
        let bs = self.config.block_size;
        let hashes = turbine_tokens::block_hashes(&spec.prompt, bs);
        // A sequence longer than the whole pool would preempt itself forever: it ends,
        // with `Length`, when it would outgrow it.
        let room = (self.config.num_blocks * bs).saturating_sub(spec.prompt.len()) as u32;
        let seq = Seq {
            id,
            sink,
            prompt: spec.prompt,
            generated: 0,
            max_tokens: spec.max_tokens.min(room).max(1),
            stop_token_ids: spec.stop_token_ids,
            blocks: Vec::new(),
            hashes,
            computed: 0,
            registered: 0,
            cached_tokens: None,
            reported_first: false,
            source: token_source(&self.config, id),
        };
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.slots[slot] = Some(seq);
                slot
            }
            None => {
                self.slots.push(Some(seq));
                self.slots.len() - 1
            }
        };
        self.index.insert(id, slot);
        self.waiting.push_back(slot);
    }

    /// Drops a sequence wherever it is, freeing its blocks at once. False if unknown.
    pub(crate) fn cancel(&mut self, id: SeqId) -> bool {
        let Some(slot) = self.index.remove(&id) else {
            return false;
        };
        self.running.retain(|&s| s != slot);
        self.waiting.retain(|&s| s != slot);
        self.free(slot);
        true
    }

    fn free(&mut self, slot: usize) {
        if let Some(seq) = self.slots[slot].take() {
            self.pool.release(seq.blocks.iter().rev().copied());
            self.free_slots.push(slot);
        }
    }

    fn seq(&self, slot: usize) -> &Seq<T> {
        self.slots[slot].as_ref().expect("queued slots hold a sequence")
    }

    fn seq_mut(&mut self, slot: usize) -> &mut Seq<T> {
        self.slots[slot].as_mut().expect("queued slots hold a sequence")
    }

    #[cfg(test)]
    pub(crate) fn is_idle(&self) -> bool {
        self.index.is_empty()
    }

    /// Plans the next step: running sequences first (decodes and unfinished prefills, in
    /// admission order), then waiting ones in arrival order, within the token budget and
    /// the sequence cap. A running sequence that cannot get a block preempts the most
    /// recently admitted one (possibly itself), whose blocks are freed and which waits
    /// again at the front of the queue.
    pub(crate) fn schedule(&mut self) -> Step {
        let bs = self.config.block_size;
        let mut budget = self.config.max_num_batched_tokens;
        let mut step = Step::default();
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let slot = self.running[i];
            let seq = self.seq(slot);
            let (id, n, decoding) = (seq.id, seq.pending().min(budget), seq.is_decoding());
            let need = (seq.computed + n).div_ceil(bs).saturating_sub(seq.blocks.len());
            let mut scheduled = true;
            while self.pool.num_free() < need {
                let Some(victim) = self.running.pop() else { break };
                step.preempted.push(self.seq(victim).id);
                self.preempt(victim);
                if victim == slot {
                    scheduled = false;
                    break;
                }
            }
            if !scheduled {
                break;
            }
            if need > 0 {
                let fresh = self.pool.allocate(need).unwrap_or_default();
                self.seq_mut(slot).blocks.extend(fresh);
            }
            step.entries.push((slot, id, n));
            if decoding {
                step.decodes += 1;
            } else {
                step.prefill_tokens += n;
            }
            budget -= n;
            i += 1;
        }
        // After a preemption, admitting more would only preempt again; but a step in which
        // the running sequences preempted each other down to nothing must admit, or the
        // engine would stall.
        if step.preempted.is_empty() || step.entries.is_empty() {
            self.admit(&mut step, budget);
        }
        step
    }

    fn admit(&mut self, step: &mut Step, mut budget: usize) {
        let bs = self.config.block_size;
        while budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(&slot) = self.waiting.front() else { break };
            let seq = self.seq(slot);
            // Reuse cached blocks, but always leave at least one token to compute: the
            // step that computes it produces the next token.
            let matched = if self.config.enable_prefix_caching {
                self.pool.match_prefix(&seq.hashes).min((seq.len() - 1) / bs)
            } else {
                0
            };
            let computed = matched * bs;
            let n = (seq.len() - computed).min(budget);
            let fresh_needed = (computed + n).div_ceil(bs) - matched;
            let leaving_free_list = self.pool.free_among_prefix(&seq.hashes, matched);
            if self.pool.num_free() < fresh_needed + leaving_free_list {
                break;
            }
            let seq = self.slots[slot].as_mut().expect("queued slots hold a sequence");
            let mut blocks = self.pool.acquire_prefix(&seq.hashes[..matched]);
            blocks.extend(self.pool.allocate(fresh_needed).unwrap_or_default());
            seq.blocks = blocks;
            seq.computed = computed;
            seq.registered = matched;
            seq.cached_tokens.get_or_insert(computed as u32);
            let id = seq.id;
            self.waiting.pop_front();
            self.running.push(slot);
            step.entries.push((slot, id, n));
            step.prefill_tokens += n;
            budget -= n;
        }
    }

    fn preempt(&mut self, slot: usize) {
        let seq = self.slots[slot].as_mut().expect("preempted slots hold a sequence");
        self.pool.release(seq.blocks.drain(..).rev());
        seq.computed = 0;
        seq.registered = 0;
        self.waiting.push_front(slot);
    }

    /// How long `step` takes under the timing model.
    pub(crate) fn duration(&self, step: &Step) -> std::time::Duration {
        let usage = self.pool.num_in_use() as f64 / self.pool.num_blocks() as f64;
        timing::step_duration(step.prefill_tokens, step.decodes, usage, self.config.speedup)
    }

    /// Hands `touch` the sink of every sequence in `step`, before [`Self::complete`]. The
    /// sinks are scattered in memory: visiting them all first, with nothing in between
    /// that waits on memory, lets their cache misses overlap instead of stalling one by
    /// one behind each delivery.
    pub(crate) fn touch_sinks(&self, step: &Step, mut touch: impl FnMut(&T)) {
        for &(slot, id, _) in &step.entries {
            if let Some(seq) = self.slots[slot].as_ref().filter(|s| s.id == id) {
                touch(&seq.sink);
            }
        }
    }

    /// Applies a finished step, handing each token produced to `emit` with its sequence's
    /// sink; a sequence whose sink refuses it (`false`: nobody reads) is dropped.
    /// Sequences cancelled meanwhile are skipped.
    pub(crate) fn complete(&mut self, step: &Step, mut emit: impl FnMut(&T, Produced) -> bool) {
        let bs = self.config.block_size;
        let caching = self.config.enable_prefix_caching;
        for &(slot, id, n) in &step.entries {
            let Some(seq) = self.slots[slot].as_mut().filter(|s| s.id == id) else {
                continue;
            };
            seq.computed += n;
            let full = seq.computed / bs;
            if caching && full > seq.registered {
                let parent = seq.registered.checked_sub(1).map(|i| seq.hashes[i].sequence);
                self.pool.register(
                    &seq.blocks[seq.registered..full],
                    &seq.hashes[seq.registered..full],
                    parent,
                );
                seq.registered = full;
            }
            if seq.computed < seq.len() {
                continue;
            }
            let token = seq.source.token(seq.generated as u32);
            seq.push_token(bs, &mut self.scratch);
            let finish = if seq.stop_token_ids.contains(&token) {
                Some(FinishReason::Stop)
            } else if seq.generated >= seq.max_tokens as usize {
                Some(FinishReason::Length)
            } else {
                None
            };
            let cached_tokens = if seq.reported_first { None } else { seq.cached_tokens };
            seq.reported_first = true;
            let delivered = emit(
                &seq.sink,
                Produced {
                    seq: id,
                    token,
                    cached_tokens,
                    finish,
                },
            );
            if finish.is_some() || !delivered {
                self.cancel(id);
            }
        }
    }

    pub(crate) fn load(&self) -> WorkerLoad {
        let prefill = |s: &Seq<T>| if s.is_decoding() { 0 } else { s.pending() as u64 };
        WorkerLoad {
            active_seqs: self.running.len() as u32,
            waiting_seqs: self.waiting.len() as u32,
            blocks_in_use: self.pool.num_in_use() as u32,
            blocks_total: self.pool.num_blocks() as u32,
            active_prefill_tokens: self.slots.iter().flatten().map(prefill).sum(),
        }
    }

    pub(crate) fn take_events(&mut self) -> Vec<KvEvent> {
        self.pool.take_events()
    }

    pub(crate) fn snapshot(&self) -> KvSnapshot {
        self.pool.snapshot()
    }

    #[cfg(test)]
    pub(crate) fn config(&self) -> &MockerConfig {
        &self.config
    }

    #[cfg(test)]
    pub(crate) fn pool(&self) -> &BlockPool {
        &self.pool
    }

    #[cfg(test)]
    pub(crate) fn running(&self) -> usize {
        self.running.len()
    }
}
