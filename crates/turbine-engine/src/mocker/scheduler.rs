//! The mocker's scheduler: vLLM-style continuous batching over the block pool, as a plain
//! state machine. [`Scheduler::schedule`] plans a step within the token budget and the
//! sequence cap, preempting when blocks run out; [`Scheduler::complete`] applies the step:
//! tokens computed, blocks registered, one new token per sequence that caught up.
//!
//! No clock and no I/O here: the engine loop decides when steps happen.
//!
//! Sequences live in a slab and carry their output sink (`T`), so that a step touches each
//! running sequence once: at a million tokens a second, memory traffic is the cost.
//!
//! A sequence's tokens are held as its engine needs them ([`SeqTokens`]): an engine that
//! feeds generated tokens back into a model keeps them ([`Stored`], the native engine's);
//! the mocker only counts them ([`Counted`]), since they are a function of position
//! ([`TokenSource`]), computed when a block fills and must be hashed, when a stop token
//! must be looked for, and by the reader. One scheduler serves both.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;

use turbine_kvbm::Loading;
use turbine_protocols::kv::{CachedBlock, KvEvent, KvSnapshot, WorkerLoad};
use turbine_protocols::FinishReason;
use turbine_tokens::{chain_hash, local_hash, BlockHash, HashMapOfHashes};

mod onboarding;
use onboarding::Onboarding;

use super::timing;
use super::MockerConfig;
use crate::pool::{BlockId, BlockPool};

pub type SeqId = u64;

/// What a request asks of the scheduler.
#[derive(Debug, Clone)]
pub struct SeqSpec {
    pub prompt: Vec<u32>,
    pub max_tokens: u32,
    pub stop_token_ids: Vec<u32>,
}

/// How the scheduler holds a sequence's tokens, prompt and generated.
pub trait SeqTokens {
    /// A sequence of `prompt` alone. Tokens the scheduler draws itself are seeded by
    /// `config` and `id`.
    fn new(prompt: Vec<u32>, config: &MockerConfig, id: SeqId) -> Self;
    /// Prompt and generated tokens.
    fn total(&self) -> usize;
    fn prompt_len(&self) -> usize;
    /// The tokens at `positions`, written to `scratch` if they are not stored.
    fn get<'a>(&'a self, positions: Range<usize>, scratch: &'a mut Vec<u32>) -> &'a [u32];
    /// Appends `token`, the next generated one.
    fn push(&mut self, token: u32);
}

/// Every token kept, for an engine that computes the next from them.
#[derive(Debug)]
pub struct Stored {
    tokens: Vec<u32>,
    prompt_len: usize,
}

impl SeqTokens for Stored {
    fn new(prompt: Vec<u32>, _: &MockerConfig, _: SeqId) -> Self {
        Self {
            prompt_len: prompt.len(),
            tokens: prompt,
        }
    }

    fn total(&self) -> usize {
        self.tokens.len()
    }

    fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    fn get<'a>(&'a self, positions: Range<usize>, _: &'a mut Vec<u32>) -> &'a [u32] {
        &self.tokens[positions]
    }

    fn push(&mut self, token: u32) {
        self.tokens.push(token);
    }
}

/// The prompt kept and generated tokens counted: their values come from a [`TokenSource`]
/// seeded by the engine's seed and the sequence's id, so the same requests in the same
/// order give the same tokens.
#[derive(Debug)]
pub struct Counted {
    prompt: Vec<u32>,
    generated: u32,
    source: TokenSource,
}

impl Counted {
    /// The token the sequence generates next.
    fn next(&self) -> u32 {
        self.source.token(self.generated)
    }
}

impl SeqTokens for Counted {
    fn new(prompt: Vec<u32>, config: &MockerConfig, id: SeqId) -> Self {
        Self {
            prompt,
            generated: 0,
            source: token_source(config, id),
        }
    }

    fn total(&self) -> usize {
        self.prompt.len() + self.generated as usize
    }

    fn prompt_len(&self) -> usize {
        self.prompt.len()
    }

    fn get<'a>(&'a self, positions: Range<usize>, scratch: &'a mut Vec<u32>) -> &'a [u32] {
        let p = self.prompt.len();
        scratch.clear();
        scratch.extend_from_slice(&self.prompt[positions.start.min(p)..positions.end.min(p)]);
        let generated = positions.start.saturating_sub(p) as u32..positions.end.saturating_sub(p) as u32;
        scratch.extend(generated.map(|i| self.source.token(i)));
        scratch
    }

    fn push(&mut self, _: u32) {
        self.generated += 1;
    }
}

/// The tokens a sequence generates: drawn uniformly from the vocabulary by a counter-based
/// SplitMix64, so that the `i`th depends only on the seed and `i`. Reproducible, not
/// unpredictable, and computable by whoever needs it without being stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenSource {
    seed: u64,
    vocab_start: u32,
    vocab_len: u32,
}

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl TokenSource {
    pub fn new(seed: u64, vocab: &Range<u32>) -> Self {
        Self {
            seed,
            vocab_start: vocab.start,
            // An empty vocabulary is refused by `MockerConfig::validate`; 1 keeps this total.
            vocab_len: vocab.end.saturating_sub(vocab.start).max(1),
        }
    }

    /// The `i`th generated token, counting from 0.
    pub fn token(&self, i: u32) -> u32 {
        let mut z = self.seed.wrapping_add(GOLDEN_GAMMA.wrapping_mul(u64::from(i) + 1));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // Scaled into the vocabulary by the high half of a product (Lemire's reduction):
        // a remainder would be a 64-bit division, slower than the rest of this together,
        // for every token the engine, its hashing and the reader compute.
        self.vocab_start + ((u128::from(z) * u128::from(self.vocab_len)) >> 64) as u32
    }
}

/// The tokens sequence `id` generates under `config`.
pub fn token_source(config: &MockerConfig, id: SeqId) -> TokenSource {
    TokenSource::new(config.seed ^ id.wrapping_mul(GOLDEN_GAMMA), &config.vocab)
}

#[derive(Debug)]
struct Seq<T, K> {
    id: SeqId,
    sink: T,
    tokens: K,
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
}

impl<T, K: SeqTokens> Seq<T, K> {
    fn generated(&self) -> usize {
        self.tokens.total() - self.tokens.prompt_len()
    }

    /// Tokens still to compute before the next token can be produced.
    fn pending(&self) -> usize {
        self.tokens.total() - self.computed
    }

    fn is_decoding(&self) -> bool {
        self.generated() > 0 && self.pending() == 1
    }

    /// Appends the next generated token, hashing the block it fills. `scratch` holds the
    /// block's tokens if they are not stored, so that hashing allocates nothing.
    fn push_token(&mut self, token: u32, block_size: usize, scratch: &mut Vec<u32>) {
        self.tokens.push(token);
        let len = self.tokens.total();
        if len % block_size == 0 {
            let local = local_hash(self.tokens.get(len - block_size..len, scratch));
            let sequence = self.hashes.last().map_or(local, |p| chain_hash(p.sequence, local));
            self.hashes.push(BlockHash { local, sequence });
        }
    }
}

/// The plan of one step: which sequences compute how many tokens.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Step {
    /// (slot, sequence, tokens to compute).
    pub entries: Vec<(usize, SeqId, usize)>,
    pub prefill_tokens: usize,
    pub decodes: usize,
    pub preempted: Vec<SeqId>,
    /// Blocks loaded from the tiers below the pool for the sequences admitted.
    pub onboarded: usize,
}

impl Step {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    #[cfg(test)]
    pub fn tokens(&self) -> usize {
        self.entries.iter().map(|(_, _, n)| n).sum()
    }
}

/// One entry of a step, as the engine that computes it sees it.
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a> {
    pub tokens: &'a [u32],
    /// Position of `tokens[0]` in the sequence.
    pub start: usize,
    /// The sequence's blocks, covering at least every position up to the last of `tokens`.
    pub blocks: &'a [BlockId],
    /// Whether the sequence's next token follows this entry.
    pub completes: bool,
}

/// A token produced for a sequence by a completed step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Produced {
    pub seq: SeqId,
    pub token: u32,
    /// Set on the sequence's first token.
    pub cached_tokens: Option<u32>,
    pub finish: Option<FinishReason>,
}

/// The tiers below the pool, as admission sees them: blocks a prefix can load instead of
/// computing. Implemented around the block manager by each engine, which owns the bytes.
pub trait LowerTiers {
    /// How many leading blocks of `hashes` (which follow the pool's cached prefix) the
    /// tiers hold and would load. Changes nothing.
    fn held(&mut self, hashes: &[BlockHash]) -> usize;
    /// Starts copying the first `blocks.len()` blocks of `hashes` into the pool's `blocks`
    /// (fresh, held by sequence `seq`): finished at once with how many leading ones were
    /// loaded, or pending until [`LowerTiers::finished`] reports it.
    fn load(&mut self, seq: SeqId, hashes: &[BlockHash], blocks: &[BlockId]) -> Loading;
    /// Pending loads finished since the last call: (sequence, leading blocks loaded).
    fn finished(&mut self) -> Vec<(SeqId, usize)> {
        Vec::new()
    }
    /// Blocks the pool evicted to make room, told before a load overwrites any of them
    /// (write-back offload copies them out here).
    fn evicted(&mut self, _blocks: Vec<(BlockId, CachedBlock)>) {}
    /// An admitted request's blocks that neither the pool nor the tiers held (following
    /// `parent`): the tiers' policies learn from misses as from hits.
    fn missed(&mut self, _hashes: &[BlockHash], _parent: Option<turbine_tokens::SequenceHash>) {}
    /// Whether the tiers want to hear of arrivals (they prefetch).
    fn prefetches(&self) -> bool {
        false
    }
    /// Sequence `seq` arrived, its blocks after the pool's prefix being `hashes`: the
    /// tiers may start bringing them closer (prefetch).
    fn arrived(&mut self, _seq: SeqId, _hashes: &[BlockHash]) {}
    /// Whether `seq`, its blocks after the pool's prefix being `hashes` now, may be
    /// admitted, as far as the tiers go: its prefetch may be waited for (and started, for
    /// blocks that have left the pool since it arrived).
    fn admissible(&mut self, _seq: SeqId, _hashes: &[BlockHash]) -> bool {
        true
    }
    /// `seq` was admitted or has ended: nothing waits on its prefetch.
    fn forget(&mut self, _seq: SeqId) {}
}

/// No tiers below the pool.
#[derive(Debug, Default)]
pub struct PoolOnly;

impl LowerTiers for PoolOnly {
    fn held(&mut self, _: &[BlockHash]) -> usize {
        0
    }

    fn load(&mut self, _: SeqId, _: &[BlockHash], _: &[BlockId]) -> Loading {
        Loading::Done(0)
    }
}

/// The scheduler of sequences whose tokens go to sinks of type `T`, held as `K`.
#[derive(Debug)]
pub struct Scheduler<T, K> {
    config: MockerConfig,
    pool: BlockPool,
    slots: Vec<Option<Seq<T, K>>>,
    free_slots: Vec<usize>,
    /// Slot of each live sequence, for cancellation by id.
    index: HashMap<SeqId, usize>,
    waiting: VecDeque<usize>,
    running: Vec<usize>,
    /// A block's tokens while they are hashed.
    scratch: Vec<u32>,
    /// Sequences whose blocks are being loaded from the tiers below, and loads whose
    /// sequence has gone (the blocks stay held until the copy ends).
    loading: HashMap<SeqId, Onboarding>,
    /// Blocks being loaded, and the sequence loading them: others that need them wait.
    in_flight: HashMapOfHashes<SeqId>,
    /// Sequences added, and ended, since the last schedule: the tiers hear of them then.
    arrived: Vec<(usize, SeqId)>,
    ended: Vec<SeqId>,
}

impl<T, K: SeqTokens> Scheduler<T, K> {
    pub fn new(config: MockerConfig) -> Self {
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
            loading: HashMap::new(),
            in_flight: HashMapOfHashes::default(),
            arrived: Vec::new(),
            ended: Vec::new(),
        }
    }

    /// Queues a sequence whose tokens go to `sink`; its prompt must fit in the pool.
    pub fn add(&mut self, id: SeqId, spec: SeqSpec, sink: T) {
        let bs = self.config.block_size;
        let hashes = turbine_tokens::block_hashes(&spec.prompt, bs);
        // A sequence longer than the whole pool would preempt itself forever: it ends,
        // with `Length`, when it would outgrow it.
        let room = (self.config.num_blocks * bs).saturating_sub(spec.prompt.len()) as u32;
        let seq = Seq {
            id,
            sink,
            tokens: K::new(spec.prompt, &self.config, id),
            max_tokens: spec.max_tokens.min(room).max(1),
            stop_token_ids: spec.stop_token_ids,
            blocks: Vec::new(),
            hashes,
            computed: 0,
            registered: 0,
            cached_tokens: None,
            reported_first: false,
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
        self.arrived.push((slot, id));
    }

    /// Drops a sequence wherever it is, freeing its blocks at once. False if unknown.
    pub fn cancel(&mut self, id: SeqId) -> bool {
        let Some(slot) = self.index.remove(&id) else {
            return false;
        };
        self.running.retain(|&s| s != slot);
        self.waiting.retain(|&s| s != slot);
        if let Some(load) = self.loading.get_mut(&id) {
            // The copy still writes its blocks: they are freed when it ends.
            if let Some(seq) = self.slots[slot].as_mut() {
                load.orphan(std::mem::take(&mut seq.blocks));
            }
        }
        self.ended.push(id);
        self.free(slot);
        true
    }

    fn free(&mut self, slot: usize) {
        if let Some(seq) = self.slots[slot].take() {
            self.pool.release(seq.blocks.iter().rev().copied());
            self.free_slots.push(slot);
        }
    }

    fn seq(&self, slot: usize) -> &Seq<T, K> {
        self.slots[slot].as_ref().expect("queued slots hold a sequence")
    }

    fn seq_mut(&mut self, slot: usize) -> &mut Seq<T, K> {
        self.slots[slot].as_mut().expect("queued slots hold a sequence")
    }

    #[cfg(test)]
    pub fn is_idle(&self) -> bool {
        self.index.is_empty()
    }

    /// Plans the next step: running sequences first (decodes and unfinished prefills, in
    /// admission order), then waiting ones in arrival order, within the token budget and
    /// the sequence cap. A running sequence that cannot get a block preempts the most
    /// recently admitted one (possibly itself), whose blocks are freed and which waits
    /// again at the front of the queue.
    pub fn schedule(&mut self) -> Step {
        self.schedule_with(&mut PoolOnly)
    }

    /// As [`Scheduler::schedule`], with prefixes that miss the pool loaded from `lower`
    /// where it holds them: a loaded block is registered at once, so that requests sharing
    /// it in this step use the same copy, and it is written before the step runs.
    pub fn schedule_with(&mut self, lower: &mut dyn LowerTiers) -> Step {
        let bs = self.config.block_size;
        let mut budget = self.config.max_num_batched_tokens;
        // Sized once: grown entry by entry, its reallocations cost more than its entries.
        let entries = (self.running.len() + self.waiting.len()).min(self.config.max_num_seqs);
        let mut step = Step {
            entries: Vec::with_capacity(entries),
            ..Step::default()
        };
        self.tell_tiers(&mut step, lower);
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
            self.admit(&mut step, budget, lower);
        }
        step
    }

    fn admit(&mut self, step: &mut Step, mut budget: usize, lower: &mut dyn LowerTiers) {
        let bs = self.config.block_size;
        let caching = self.config.enable_prefix_caching;
        let mut i = 0;
        while budget > 0 && self.running.len() + self.loads_of_live() < self.config.max_num_seqs {
            let Some(&slot) = self.waiting.get(i) else { break };
            let seq = self.seq(slot);
            let id = seq.id;
            // Reuse cached blocks, but always leave at least one token to compute: the
            // step that computes it produces the next token.
            let limit = (seq.tokens.total() - 1) / bs;
            let (in_pool, below) = if caching {
                let in_pool = self.pool.match_prefix(&seq.hashes).min(limit);
                // Blocks another sequence is loading are waited for, not loaded twice;
                // a sequence whose prefetch admission waits for stays too. Those behind
                // go on.
                let loading_next = in_pool < limit && self.in_flight.contains_key(&seq.hashes[in_pool].sequence);
                if loading_next || !lower.admissible(id, &seq.hashes[in_pool..limit]) {
                    i += 1;
                    continue;
                }
                (in_pool, lower.held(&seq.hashes[in_pool..limit]))
            } else {
                (0, 0)
            };
            let matched = in_pool + below;
            let n = (seq.tokens.total() - matched * bs).min(budget);
            let fresh_needed = (matched * bs + n).div_ceil(bs) - in_pool;
            let leaving_free_list = self.pool.free_among_prefix(&seq.hashes, in_pool);
            if self.pool.num_free() < fresh_needed + leaving_free_list {
                break;
            }
            self.waiting.remove(i);
            lower.forget(id);
            let seq = self.slots[slot].as_mut().expect("queued slots hold a sequence");
            let mut blocks = self.pool.acquire_prefix(&seq.hashes[..in_pool]);
            blocks.extend(self.pool.allocate(fresh_needed).unwrap_or_default());
            let loading = if below > 0 {
                let evicted = self.pool.take_evicted();
                if !evicted.is_empty() {
                    lower.evicted(evicted);
                }
                lower.load(id, &seq.hashes[in_pool..matched], &blocks[in_pool..matched])
            } else {
                Loading::Done(0)
            };
            let loaded = match loading {
                Loading::Done(n) => n,
                Loading::Pending => {
                    // Ready when the copy is: the sequence holds its blocks meanwhile, and
                    // is scheduled once `tell_tiers` hears the load has finished.
                    if matched < seq.hashes.len() {
                        lower.missed(&seq.hashes[matched..], Some(seq.hashes[matched - 1].sequence));
                    }
                    seq.blocks = blocks;
                    seq.computed = in_pool * bs;
                    seq.registered = in_pool;
                    let load = Onboarding::new(slot, in_pool, &seq.hashes[in_pool..matched], &seq.hashes[..in_pool]);
                    for h in &seq.hashes[in_pool..matched] {
                        self.in_flight.insert(h.sequence, id);
                    }
                    self.loading.insert(id, load);
                    continue;
                }
            };
            let matched = in_pool + loaded;
            if caching && matched < seq.hashes.len() {
                let parent = matched.checked_sub(1).map(|i| seq.hashes[i].sequence);
                lower.missed(&seq.hashes[matched..], parent);
            }
            if loaded > 0 {
                let parent = in_pool.checked_sub(1).map(|i| seq.hashes[i].sequence);
                self.pool
                    .register(&blocks[in_pool..matched], &seq.hashes[in_pool..matched], parent);
            }
            // Fewer loaded than held leaves more to compute, within the same blocks: the
            // step's end only moves back.
            let computed = matched * bs;
            let n = (seq.tokens.total() - computed).min(budget);
            seq.blocks = blocks;
            seq.computed = computed;
            seq.registered = matched;
            seq.cached_tokens.get_or_insert(computed as u32);
            self.running.push(slot);
            step.entries.push((slot, id, n));
            step.prefill_tokens += n;
            step.onboarded += loaded;
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
    pub fn duration(&self, step: &Step) -> std::time::Duration {
        let usage = self.pool.num_in_use() as f64 / self.pool.num_blocks() as f64;
        timing::step_duration(step.prefill_tokens, step.decodes, usage, self.config.speedup)
    }

    pub fn speedup(&self) -> f64 {
        self.config.speedup
    }

    /// Hands `touch` the sink of every sequence in `step`, before it is completed. The
    /// sinks are scattered in memory: visiting them all first, with nothing in between
    /// that waits on memory, lets their cache misses overlap instead of stalling one by
    /// one behind each delivery.
    pub fn touch_sinks(&self, step: &Step, mut touch: impl FnMut(&T)) {
        for &(slot, id, _) in &step.entries {
            if let Some(seq) = self.slots[slot].as_ref().filter(|s| s.id == id) {
                touch(&seq.sink);
            }
        }
    }

    /// Applies a finished step: `next` gives the token that follows, for the step's entry
    /// at that index, once its sequence caught up; each is handed to `emit` with the
    /// sequence's sink, and a sequence whose sink refuses it (`false`: nobody reads) is
    /// dropped. Sequences cancelled meanwhile are skipped.
    fn complete_inner(
        &mut self,
        step: &Step,
        mut next: impl FnMut(&mut Seq<T, K>, usize) -> u32,
        mut emit: impl FnMut(&T, Produced) -> bool,
    ) {
        let bs = self.config.block_size;
        let caching = self.config.enable_prefix_caching;
        for (i, &(slot, id, n)) in step.entries.iter().enumerate() {
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
            if seq.computed < seq.tokens.total() {
                continue;
            }
            let token = next(seq, i);
            seq.push_token(token, bs, &mut self.scratch);
            let finish = if seq.stop_token_ids.contains(&token) {
                Some(FinishReason::Stop)
            } else if seq.generated() >= seq.max_tokens as usize {
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

    pub fn load(&self) -> WorkerLoad {
        let prefill = |s: &Seq<T, K>| if s.is_decoding() { 0 } else { s.pending() as u64 };
        WorkerLoad {
            active_seqs: (self.running.len() + self.loads_of_live()) as u32,
            waiting_seqs: self.waiting.len() as u32,
            blocks_in_use: self.pool.num_in_use() as u32,
            blocks_total: self.pool.num_blocks() as u32,
            active_prefill_tokens: self.slots.iter().flatten().map(prefill).sum(),
        }
    }

    pub fn take_events(&mut self) -> Vec<KvEvent> {
        self.pool.take_events()
    }

    pub fn snapshot(&self) -> KvSnapshot {
        self.pool.snapshot()
    }

    #[cfg(test)]
    pub fn config(&self) -> &MockerConfig {
        &self.config
    }

    /// The pool, for engines that move KV blocks in and out of it (export and import).
    pub fn pool_mut(&mut self) -> &mut BlockPool {
        &mut self.pool
    }

    #[cfg(test)]
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    #[cfg(test)]
    pub fn running(&self) -> usize {
        self.running.len()
    }
}

impl<T> Scheduler<T, Counted> {
    /// Applies a finished step, handing each token produced to `emit` with its sequence's
    /// sink; a sequence whose sink refuses it (`false`: nobody reads) is dropped.
    /// Sequences cancelled meanwhile are skipped. Tokens come from each sequence's
    /// [`TokenSource`], as the mocker's do.
    pub fn complete(&mut self, step: &Step, emit: impl FnMut(&T, Produced) -> bool) {
        self.complete_inner(step, |seq, _| seq.tokens.next(), emit);
    }
}

impl<T> Scheduler<T, Stored> {
    /// Applies a finished step of an engine that computes its tokens: `next` is asked, for
    /// the step's entry at that index, the token that follows once its sequence caught up.
    /// Otherwise as [`Scheduler::complete`].
    pub fn complete_with(
        &mut self,
        step: &Step,
        mut next: impl FnMut(usize, &mut T) -> u32,
        emit: impl FnMut(&T, Produced) -> bool,
    ) {
        self.complete_inner(step, |seq, i| next(i, &mut seq.sink), emit);
    }

    /// What the step's entry computes: its tokens, the position of the first, and the
    /// sequence's blocks. `None` for a sequence cancelled since the step was planned.
    pub fn input(&self, entry: &(usize, SeqId, usize)) -> Option<StepInput<'_>> {
        let &(slot, id, n) = entry;
        let seq = self.slots.get(slot)?.as_ref().filter(|s| s.id == id)?;
        let tokens = &seq.tokens.tokens;
        Some(StepInput {
            tokens: &tokens[seq.computed..seq.computed + n],
            start: seq.computed,
            blocks: &seq.blocks,
            completes: seq.computed + n == tokens.len(),
        })
    }
}
