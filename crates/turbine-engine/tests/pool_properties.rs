//! Property tests of the block pool against a reference model, under random interleavings
//! of sequences starting (with shared prefixes), growing, finishing and cache clears.

use std::collections::HashSet;

use proptest::prelude::*;
use turbine_engine::pool::{BlockId, BlockPool, EventReplica};
use turbine_tokens::{block_hashes, BlockHash};

const BLOCK: usize = 4;

#[derive(Debug, Clone)]
enum Op {
    /// Start a sequence of these tokens (a tiny alphabet, so prefixes are shared).
    Start(Vec<u32>),
    /// Append tokens to a live sequence, registering blocks as they fill.
    Grow(usize, Vec<u32>),
    /// Finish (or cancel: the pool cannot tell) a live sequence.
    Finish(usize),
    Clear,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => proptest::collection::vec(0u32..3, 0..24).prop_map(Op::Start),
        3 => (any::<usize>(), proptest::collection::vec(0u32..3, 1..9)).prop_map(|(i, t)| Op::Grow(i, t)),
        3 => any::<usize>().prop_map(Op::Finish),
        1 => Just(Op::Clear),
    ]
}

struct Seq {
    tokens: Vec<u32>,
    blocks: Vec<BlockId>,
    /// Hashes of the full blocks that were registered, or found cached, for this sequence.
    hashed: Vec<BlockHash>,
}

/// `held` lists the blocks every other live sequence holds: allocation must never hand
/// out one of them, which is what "a block in use is never evicted" means.
fn fill(pool: &mut BlockPool, seq: &mut Seq, held: &HashSet<BlockId>) -> bool {
    let need = seq.tokens.len().div_ceil(BLOCK).saturating_sub(seq.blocks.len());
    match pool.allocate(need) {
        Some(ids) => {
            for id in &ids {
                assert!(
                    !held.contains(id) && !seq.blocks.contains(id),
                    "allocated block {id}, which is in use"
                );
            }
            seq.blocks.extend(ids)
        }
        None => return false,
    }
    let hashes = block_hashes(&seq.tokens, BLOCK);
    let done = seq.hashed.len();
    if hashes.len() > done {
        let parent = done.checked_sub(1).map(|i| hashes[i].sequence);
        pool.register(&seq.blocks[done..hashes.len()], &hashes[done..], parent);
        seq.hashed = hashes;
    }
    true
}

fn held_by(seqs: &[Seq]) -> HashSet<BlockId> {
    seqs.iter().flat_map(|s| s.blocks.iter().copied()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn pool_matches_reference_model(ops in proptest::collection::vec(op(), 1..120), num_blocks in 4usize..24) {
        let mut pool = BlockPool::new(num_blocks, BLOCK);
        let mut seqs: Vec<Seq> = Vec::new();
        let mut replica = EventReplica::default();
        for op in ops {
            match op {
                Op::Start(tokens) => {
                    let hashes = block_hashes(&tokens, BLOCK);
                    let matched = pool.match_prefix(&hashes);
                    let blocks = pool.acquire_prefix(&hashes[..matched]);
                    prop_assert_eq!(blocks.len(), matched);
                    let mut seq = Seq { tokens, blocks, hashed: hashes[..matched].to_vec() };
                    if fill(&mut pool, &mut seq, &held_by(&seqs)) {
                        seqs.push(seq);
                    } else {
                        pool.release(seq.blocks.iter().rev().copied());
                    }
                }
                Op::Grow(i, more) if !seqs.is_empty() => {
                    let i = i % seqs.len();
                    let before = seqs[i].tokens.len();
                    let others = held_by(&seqs);
                    seqs[i].tokens.extend(more);
                    if !fill(&mut pool, &mut seqs[i], &others) {
                        seqs[i].tokens.truncate(before);
                    }
                }
                Op::Finish(i) if !seqs.is_empty() => {
                    let seq = seqs.swap_remove(i % seqs.len());
                    pool.release(seq.blocks.iter().rev().copied());
                }
                Op::Clear => pool.clear_cache(),
                _ => {}
            }
            pool.check_invariants();
            for event in pool.take_events() {
                prop_assert_eq!(replica.apply(&event), Ok(()));
            }
            prop_assert_eq!(&replica.registered, &EventReplica::of(&pool.snapshot()), "replayed events equal the registered set");
            prop_assert_eq!(pool.num_in_use(), held_by(&seqs).len());
        }
        for seq in seqs.drain(..) {
            pool.release(seq.blocks.iter().rev().copied());
        }
        prop_assert_eq!(pool.num_free(), num_blocks, "no block leaks");
        pool.check_invariants();
    }
}
