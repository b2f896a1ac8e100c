//! The indexer's tests: hand-stepped cases, and a property test of the tree against a
//! model of who holds what.

use super::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use turbine_protocols::kv::{CachedBlock, StoredBlock};

const DEVICE: StorageTier = StorageTier::Device;
const HOST: StorageTier = StorageTier::Host;
const DISK: StorageTier = StorageTier::Disk;

fn stored(id: u64, hashes: &[u64]) -> KvEvent {
    stored_in(id, DEVICE, hashes)
}

fn stored_in(id: u64, tier: StorageTier, hashes: &[u64]) -> KvEvent {
    let blocks = hashes
        .iter()
        .map(|&h| StoredBlock {
            sequence_hash: h,
            local_hash: h,
        })
        .collect();
    KvEvent {
        event_id: id,
        data: KvEventData::Stored {
            parent_hash: None,
            blocks,
            tier,
        },
    }
}

#[test]
fn overlaps_count_leading_blocks_per_worker() {
    let mut ix = KvIndexer::new();
    assert_eq!(ix.apply(1, &stored(0, &[10, 11, 12])), Ok(Applied::Applied));
    assert_eq!(ix.apply(2, &stored(0, &[10, 11])), Ok(Applied::Applied));
    assert_eq!(
        ix.apply(3, &stored(0, &[11, 12])),
        Ok(Applied::Applied),
        "no block 10: overlap 0"
    );
    let mut m = ix.find_matches(&[10, 11, 12, 13]).scores;
    m.sort();
    assert_eq!(m, [(1, 3), (2, 2)]);
    assert_eq!(ix.find_matches(&[99]).scores, []);
    assert_eq!(ix.num_blocks(), 3);
}

#[test]
fn gaps_wait_for_a_resync() {
    let mut ix = KvIndexer::new();
    assert_eq!(
        ix.apply(1, &stored(3, &[1])),
        Ok(Applied::NeedsResync { after: None }),
        "new worker"
    );
    let snapshot = KvSnapshot {
        last_event_id: Some(4),
        blocks: vec![CachedBlock {
            parent_hash: None,
            block: StoredBlock {
                sequence_hash: 7,
                local_hash: 7,
            },
            tier: DEVICE,
        }],
    };
    ix.apply_snapshot(1, &snapshot).unwrap();
    assert_eq!(ix.apply(1, &stored(4, &[8])), Ok(Applied::Duplicate));
    assert_eq!(ix.apply(1, &stored(5, &[8])), Ok(Applied::Applied));
    assert_eq!(
        ix.apply(1, &stored(7, &[9])),
        Ok(Applied::NeedsResync { after: Some(5) })
    );
    assert_eq!(
        ix.apply(1, &stored(6, &[9])),
        Ok(Applied::Applied),
        "the missing event fills the gap"
    );
    assert_eq!(ix.apply(1, &stored(7, &[9])), Ok(Applied::Applied));
    assert_eq!(ix.worker_blocks(1), 3);
    ix.remove_worker(1);
    assert_eq!(ix.num_blocks(), 0);
}

#[test]
fn a_block_leaving_the_middle_of_a_segment_splits_its_span() {
    let mut ix = KvIndexer::new();
    let chain: Vec<u64> = (100..110).collect();
    ix.apply(1, &stored(0, &chain)).unwrap();
    ix.apply(2, &stored(0, &chain)).unwrap();
    assert_eq!(shape(&ix), [1], "one chain, one set: one segment of one span");
    ix.apply(
        2,
        &KvEvent {
            event_id: 1,
            data: KvEventData::Removed {
                sequence_hashes: vec![104],
                tier: DEVICE,
            },
        },
    )
    .unwrap();
    let mut m = ix.find_matches(&chain).scores;
    m.sort();
    assert_eq!(m, [(1, 10), (2, 4)]);
    assert_eq!(shape(&ix), [3]);
    ix.apply(2, &stored(2, &[104])).unwrap();
    let mut m = ix.find_matches(&chain).scores;
    m.sort();
    assert_eq!(m, [(1, 10), (2, 10)]);
    assert_eq!(shape(&ix), [1], "the block found where it was, the spans merge back");
}

#[test]
fn a_dead_block_is_matched_where_it_is_held_again() {
    let mut ix = KvIndexer::new();
    let remove = |id, hashes: &[u64]| KvEvent {
        event_id: id,
        data: KvEventData::Removed {
            sequence_hashes: hashes.to_vec(),
            tier: DEVICE,
        },
    };
    ix.apply(1, &stored(0, &[1, 2, 3, 4, 5, 6])).unwrap();
    ix.apply(1, &remove(1, &[3])).unwrap();
    assert_eq!(shape(&ix), [3], "one dead block in six: kept in place");
    // Stored again without its parent: a segment of its own, while the dead copy stays.
    ix.apply(2, &stored(0, &[3])).unwrap();
    assert_eq!(ix.find_matches(&[1, 2, 3, 4]).scores, [(1, 2)]);
    let mut m = ix.find_matches(&[3, 4]).scores;
    m.sort();
    assert_eq!(m, [(2, 1)]);
    ix.apply(1, &remove(2, &[1, 2, 4])).unwrap();
    assert_eq!(shape(&ix), [1, 1], "dead blocks outnumbering the live ones are dropped");
    assert_eq!(ix.find_matches(&[5, 6]).scores, [(1, 2)]);
    assert_eq!(ix.num_blocks(), 3);
}

#[test]
fn a_snapshot_in_hash_order_rebuilds_chains_as_segments() {
    let mut ix = KvIndexer::new();
    // Two chains sharing 5 blocks, with hashes in no particular order along them.
    let a = [9u64, 3, 7, 1, 8, 20, 2, 40];
    let b = [9u64, 3, 7, 1, 8, 5, 60, 4];
    let mut blocks: Vec<CachedBlock> = [a, b]
        .iter()
        .flat_map(|chain| {
            chain.iter().enumerate().map(|(i, &h)| CachedBlock {
                parent_hash: i.checked_sub(1).map(|p| chain[p]),
                block: StoredBlock {
                    sequence_hash: h,
                    local_hash: h,
                },
                tier: DEVICE,
            })
        })
        .collect();
    blocks.sort_by_key(|b| b.block.sequence_hash);
    let snapshot = KvSnapshot {
        last_event_id: None,
        blocks,
    };
    ix.apply_snapshot(1, &snapshot).unwrap();
    assert_eq!(ix.worker_blocks(1), 11);
    assert_eq!(shape(&ix), [1, 1], "a chain and its fork");
    assert_eq!(ix.find_matches(&a).get(1), 8);
    assert_eq!(ix.find_matches(&b).get(1), 8);
}

/// The span count of each segment in use, in order.
fn shape(ix: &KvIndexer) -> Vec<usize> {
    ix.blocks
        .segs
        .iter()
        .filter(|s| !s.hashes.is_empty())
        .map(|s| s.spans.len())
        .collect()
}

fn removed_from(id: u64, tier: StorageTier, hashes: &[u64]) -> KvEvent {
    KvEvent {
        event_id: id,
        data: KvEventData::Removed {
            sequence_hashes: hashes.to_vec(),
            tier,
        },
    }
}

fn tiers(device: u32, host: u32, disk: u32) -> TierBlocks {
    TierBlocks { device, host, disk }
}

#[test]
fn a_block_copied_to_host_memory_is_held_until_both_copies_go() {
    let mut ix = KvIndexer::new();
    ix.apply(1, &stored(0, &[1, 2, 3, 4])).unwrap();
    ix.apply(1, &stored_in(1, HOST, &[1, 2])).unwrap();
    let m = ix.find_matches(&[1, 2, 3, 4]);
    assert_eq!((m.scores.as_slice(), m.tiers.as_slice()), (&[(1, 4)][..], &[][..]));
    assert_eq!(m.tiers(1), tiers(4, 0, 0), "on the device as well: the device counts");
    assert_eq!(ix.worker_blocks(1), 4, "a block in two tiers is one block");

    // Evicted from the device: the prefix goes on through the copies in host memory.
    ix.apply(1, &removed_from(2, DEVICE, &[1, 2])).unwrap();
    let m = ix.find_matches(&[1, 2, 3, 4]);
    assert_eq!(m.scores, [(1, 4)]);
    assert_eq!(m.tiers, [(1, tiers(2, 2, 0))]);
    assert_eq!(ix.worker_blocks(1), 4);

    // A removal from the host tier takes only that copy: block 1 is gone, the prefix too.
    ix.apply(1, &removed_from(3, HOST, &[1])).unwrap();
    assert_eq!(ix.find_matches(&[1, 2, 3, 4]).scores, []);
    let m = ix.find_matches(&[2, 3, 4]);
    assert_eq!((m.scores, m.tiers), (vec![(1, 3)], vec![(1, tiers(2, 1, 0))]));
    assert_eq!(ix.worker_blocks(1), 3);
    // Removing from a tier that does not hold it changes nothing.
    ix.apply(1, &removed_from(4, DISK, &[2, 3])).unwrap();
    assert_eq!(ix.worker_blocks(1), 3);
    assert_eq!(ix.num_blocks(), 3);
}

#[test]
fn cleared_empties_the_device_tier_only() {
    let mut ix = KvIndexer::new();
    ix.apply(1, &stored(0, &[1, 2, 3, 4])).unwrap();
    ix.apply(1, &stored_in(1, HOST, &[1, 2])).unwrap();
    ix.apply(1, &stored_in(2, DISK, &[2, 3])).unwrap();
    ix.apply(2, &stored(0, &[1, 2, 3, 4])).unwrap();
    ix.apply(
        1,
        &KvEvent {
            event_id: 3,
            data: KvEventData::Cleared,
        },
    )
    .unwrap();
    let mut m = ix.find_matches(&[1, 2, 3, 4]);
    m.scores.sort();
    assert_eq!(m.scores, [(1, 3), (2, 4)], "block 4 was on worker 1's device only");
    assert_eq!(
        m.tiers,
        [(1, tiers(0, 2, 1))],
        "block 2, in host memory and on disk, counts as host"
    );
    assert_eq!(ix.worker_blocks(1), 3);
    assert_eq!(ix.worker_blocks(2), 4);
}

#[test]
fn tiers_split_spans_and_merge_back() {
    let mut ix = KvIndexer::new();
    let chain: Vec<u64> = (100..110).collect();
    ix.apply(1, &stored(0, &chain)).unwrap();
    ix.apply(2, &stored(0, &chain)).unwrap();
    assert_eq!(shape(&ix), [1]);
    // Worker 2 copies a block in the middle to host memory: same holders, other tiers.
    ix.apply(2, &stored_in(1, HOST, &[104])).unwrap();
    assert_eq!(shape(&ix), [3]);
    ix.apply(2, &removed_from(2, DEVICE, &[104])).unwrap();
    let mut m = ix.find_matches(&chain);
    m.scores.sort();
    assert_eq!(m.scores, [(1, 10), (2, 10)]);
    assert_eq!(m.tiers, [(2, tiers(9, 1, 0))]);
    // Back on the device and out of host memory: the spans merge again.
    ix.apply(2, &stored(3, &[104])).unwrap();
    ix.apply(2, &removed_from(4, HOST, &[104])).unwrap();
    assert_eq!(shape(&ix), [1]);
    assert_eq!(ix.find_matches(&chain).tiers, []);
    // Breakdowns that no span names any more are dropped when collected.
    assert!(ix.blocks.tiers.len() > 0);
    ix.blocks.drop_unused_tiers();
    assert_eq!(ix.blocks.tiers.len(), 0);
}

#[test]
fn a_snapshot_carries_each_blocks_tiers() {
    let mut ix = KvIndexer::new();
    let cached = |h: u64, parent: Option<u64>, tier| CachedBlock {
        parent_hash: parent,
        block: StoredBlock {
            sequence_hash: h,
            local_hash: h,
        },
        tier,
    };
    let snapshot = KvSnapshot {
        last_event_id: Some(9),
        blocks: vec![
            cached(3, Some(2), DISK),
            cached(1, None, HOST),
            cached(2, Some(1), DEVICE),
            cached(1, None, DEVICE),
            cached(2, Some(1), HOST),
        ],
    };
    ix.apply_snapshot(1, &snapshot).unwrap();
    assert_eq!(ix.worker_blocks(1), 3);
    let m = ix.find_matches(&[1, 2, 3]);
    assert_eq!((m.scores, m.tiers), (vec![(1, 3)], vec![(1, tiers(2, 0, 1))]));
    // The next event follows the snapshot; a resync replaces every tier.
    ix.apply(1, &removed_from(10, DEVICE, &[1])).unwrap();
    assert_eq!(ix.find_matches(&[1, 2, 3]).tiers, [(1, tiers(1, 1, 1))]);
    let device_only = KvSnapshot {
        last_event_id: Some(10),
        blocks: vec![cached(1, None, DEVICE)],
    };
    ix.apply_snapshot(1, &device_only).unwrap();
    let m = ix.find_matches(&[1, 2, 3]);
    assert_eq!((m.scores, m.tiers), (vec![(1, 1)], vec![]));
}

/// Who holds what: worker, then block, then the tiers holding it.
type Model = BTreeMap<u64, BTreeMap<u64, BTreeSet<StorageTier>>>;

impl KvIndexer {
    /// Checks the tree's own invariants, and that it holds exactly `model`'s blocks, in
    /// exactly their tiers.
    fn check(&self, model: &Model) {
        let b = &self.blocks;
        let (mut live, mut pairs) = (0, 0);
        for (id, seg) in b.segs.iter().enumerate() {
            if seg.hashes.is_empty() {
                assert!(b.free.contains(&(id as u32)), "an empty segment is free");
                assert!(seg.spans.is_empty());
                continue;
            }
            assert_eq!(seg.spans[0].start, 0, "the spans cover the segment");
            for w in seg.spans.windows(2) {
                assert!(w[0].start < w[1].start, "spans are sorted and not empty");
                assert!(!w[0].same(&w[1]), "neighbouring spans differ");
            }
            assert!(seg.spans.last().is_some_and(|s| s.start < seg.len()));
            let mut seg_live = 0;
            for (k, span) in seg.spans.iter().enumerate() {
                if span.tiers != TierTable::NONE {
                    assert!((span.tiers as usize) <= b.tiers.len(), "a span names a breakdown");
                    let t = b.tiers.get(span.set, span.tiers);
                    assert!(t.off_device(), "a device-only span names none");
                    assert_eq!(t.union(), span.set, "the set is who holds the blocks in any tier");
                }
                let n = (seg.span_end(k) - span.start) as usize;
                if span.set.is_empty() {
                    continue;
                }
                seg_live += n;
                pairs += n * span.set.slots().count();
                for off in span.start..seg.span_end(k) {
                    let at = Loc::new(id as u32, off);
                    let h = seg.hashes[off as usize];
                    assert_eq!(b.map.get(h), Some(at), "the map points at each live block");
                }
            }
            assert_eq!(seg.live as usize, seg_live);
            assert!(seg_live > 0, "a segment in use holds a live block");
            assert!(seg.hashes.len() - seg_live <= seg_live, "dead blocks are the minority");
            live += seg_live;
        }
        assert_eq!(live, b.map.len(), "every mapped block is live in a segment");
        assert_eq!(pairs, model.values().map(BTreeMap::len).sum::<usize>());
        for (w, held) in model {
            let slot = self.workers[w].slot;
            for (h, in_tiers) in held {
                let loc = b.map.get(*h).expect("a held block is mapped");
                let seg = &b.segs[loc.seg() as usize];
                let span = seg.spans[seg.span_of(loc.off())];
                let t = b.tiers.get(span.set, span.tiers);
                for tier in StorageTier::ALL {
                    assert_eq!(
                        t.contains(slot, tier),
                        in_tiers.contains(&tier),
                        "worker {w}, block {h}, {tier:?}"
                    );
                }
            }
            assert_eq!(self.worker_blocks(*w), held.len());
        }
    }
}

/// Block `pos` of chain `family`.
fn block(family: u64, pos: u64) -> u64 {
    family << 32 | pos
}

const CHAIN: u64 = 40;

#[derive(Debug, Clone)]
enum Op {
    /// Blocks `from..from + len` of a chain, in chain order, in one event, in a tier.
    Store(u64, u64, u64, u64, StorageTier),
    /// The same blocks evicted from a tier, last first or first first.
    Remove(u64, u64, u64, u64, bool, StorageTier),
    Clear(u64),
    Leave(u64),
    /// A resync from the worker's blocks listed in hash order.
    Resync(u64),
    /// The first `k` blocks of one chain, then another's from there on.
    Query(u64, u64, u64),
    /// Tier breakdowns no span names dropped, as a large enough table would.
    Collect,
}

fn op(tier: impl Strategy<Value = StorageTier> + Clone) -> impl Strategy<Value = Op> {
    let w = 0u64..4;
    let f = 0u64..4;
    let span = (0..CHAIN).prop_flat_map(|from| (Just(from), 1..=CHAIN - from));
    prop_oneof![
        8 => (w.clone(), f.clone(), span.clone(), tier.clone()).prop_map(|(w, f, (a, n), t)| Op::Store(w, f, a, n, t)),
        4 => (w.clone(), f.clone(), span, any::<bool>(), tier).prop_map(|(w, f, (a, n), r, t)| Op::Remove(w, f, a, n, r, t)),
        1 => w.clone().prop_map(Op::Clear),
        1 => w.clone().prop_map(Op::Leave),
        1 => w.prop_map(Op::Resync),
        4 => (f.clone(), 0..=CHAIN, f).prop_map(|(f, k, g)| Op::Query(f, k, g)),
        1 => Just(Op::Collect),
    ]
}

/// Applies `ops` to an indexer and to `Model`, checking the tree after each and every
/// query's answer against the model's.
fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut ix = KvIndexer::new();
    let mut model = Model::new();
    let mut ids: BTreeMap<u64, u64> = BTreeMap::new();
    fn send(ix: &mut KvIndexer, ids: &mut BTreeMap<u64, u64>, w: u64, data: KvEventData) {
        let id = ids.entry(w).or_insert(0);
        let event = KvEvent { event_id: *id, data };
        *id += 1;
        assert_eq!(ix.apply(w, &event), Ok(Applied::Applied));
    }
    for op in ops {
        match op {
            Op::Store(w, f, from, n, tier) => {
                let hashes: Vec<u64> = (from..from + n).map(|p| block(f, p)).collect();
                let blocks = hashes
                    .iter()
                    .map(|&h| StoredBlock {
                        sequence_hash: h,
                        local_hash: h,
                    })
                    .collect();
                let parent_hash = from.checked_sub(1).map(|p| block(f, p));
                send(
                    &mut ix,
                    &mut ids,
                    w,
                    KvEventData::Stored {
                        parent_hash,
                        blocks,
                        tier,
                    },
                );
                let held = model.entry(w).or_default();
                for h in hashes {
                    held.entry(h).or_default().insert(tier);
                }
            }
            Op::Remove(w, f, from, n, last_first, tier) => {
                let mut hashes: Vec<u64> = (from..from + n).map(|p| block(f, p)).collect();
                if last_first {
                    hashes.reverse();
                }
                let held = model.entry(w).or_default();
                for h in &hashes {
                    if let Some(t) = held.get_mut(h) {
                        t.remove(&tier);
                        if t.is_empty() {
                            held.remove(h);
                        }
                    }
                }
                send(
                    &mut ix,
                    &mut ids,
                    w,
                    KvEventData::Removed {
                        sequence_hashes: hashes,
                        tier,
                    },
                );
            }
            Op::Clear(w) => {
                send(&mut ix, &mut ids, w, KvEventData::Cleared);
                let held = model.entry(w).or_default();
                for t in held.values_mut() {
                    t.remove(&DEVICE);
                }
                held.retain(|_, t| !t.is_empty());
            }
            Op::Leave(w) => {
                ix.remove_worker(w);
                model.remove(&w);
                ids.remove(&w);
            }
            Op::Resync(w) => {
                let held = model.entry(w).or_default();
                let blocks = held
                    .iter()
                    .flat_map(|(&h, in_tiers)| {
                        in_tiers.iter().map(move |&tier| CachedBlock {
                            parent_hash: (h & 0xffff_ffff > 0).then(|| h - 1),
                            block: StoredBlock {
                                sequence_hash: h,
                                local_hash: h,
                            },
                            tier,
                        })
                    })
                    .collect();
                let last = ids.get(&w).and_then(|id| id.checked_sub(1));
                ix.apply_snapshot(
                    w,
                    &KvSnapshot {
                        last_event_id: last,
                        blocks,
                    },
                )
                .unwrap();
            }
            Op::Query(f, k, g) => {
                let query: Vec<u64> = (0..CHAIN).map(|p| block(if p < k { f } else { g }, p)).collect();
                let mut got = ix.find_matches(&query);
                got.scores.sort();
                got.tiers.sort_by_key(|&(w, _)| w);
                let mut want = Overlaps::default();
                for (&w, held) in &model {
                    let mut t = TierBlocks::default();
                    for best in query.iter().map_while(|h| held.get(h)?.first()) {
                        match best {
                            StorageTier::Device => t.device += 1,
                            StorageTier::Host => t.host += 1,
                            StorageTier::Disk => t.disk += 1,
                        }
                    }
                    if t.total() > 0 {
                        want.scores.push((w, t.total()));
                    }
                    if t.host + t.disk > 0 {
                        want.tiers.push((w, t));
                    }
                }
                prop_assert_eq!(got, want, "query {:?}", query);
            }
            Op::Collect => ix.blocks.drop_unused_tiers(),
        }
        ix.check(&model);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Chains of shared prefixes, stored and evicted in stretches, so that segments grow
    /// long and their spans split in the middle: the tree stays consistent and exact.
    #[test]
    fn segments_stay_exact_under_chain_workloads(ops in proptest::collection::vec(op(Just(DEVICE)), 1..120)) {
        run(ops)?;
    }

    /// The same, with blocks stored in and evicted from every tier: each worker's prefix
    /// runs until a block no tier of it holds, counted by the fastest tier holding each.
    #[test]
    fn tiers_stay_exact_under_chain_workloads(
        ops in proptest::collection::vec(op(prop_oneof![2 => Just(DEVICE), 2 => Just(HOST), 1 => Just(DISK)]), 1..120)
    ) {
        run(ops)?;
    }
}
