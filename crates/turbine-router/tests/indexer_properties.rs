//! The indexer against a naive reference model (worker → set of blocks) under random event
//! streams, with dropped events (gaps) and resyncs from event history or snapshots.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use turbine_protocols::kv::{CachedBlock, KvEvent, KvEventData, KvSnapshot, StorageTier, StoredBlock};
use turbine_router::indexer::{Applied, KvIndexer};

#[derive(Debug, Clone)]
enum Action {
    /// Worker stores these blocks (hashes from a small universe, so workers overlap).
    Store(u64, Vec<u64>),
    /// Worker evicts blocks, chosen by index into what it holds.
    Remove(u64, Vec<usize>),
    Clear(u64),
    /// The next event of this worker is lost on its way.
    Drop(u64),
    /// Compare every worker's overlap for this query.
    Query(Vec<u64>),
    Leave(u64),
}

fn action() -> impl Strategy<Value = Action> {
    let worker = 0u64..5;
    let hashes = proptest::collection::vec(0u64..24, 1..6);
    prop_oneof![
        6 => (worker.clone(), hashes.clone()).prop_map(|(w, h)| Action::Store(w, h)),
        3 => (worker.clone(), proptest::collection::vec(any::<usize>(), 1..4)).prop_map(|(w, i)| Action::Remove(w, i)),
        1 => worker.clone().prop_map(Action::Clear),
        2 => worker.clone().prop_map(Action::Drop),
        4 => proptest::collection::vec(0u64..24, 1..8).prop_map(Action::Query),
        1 => worker.prop_map(Action::Leave),
    ]
}

/// A worker as it really is: its blocks and every event it has emitted.
#[derive(Default)]
struct Truth {
    blocks: BTreeSet<u64>,
    log: Vec<KvEvent>,
    drop_next: bool,
}

impl Truth {
    fn emit(&mut self, data: KvEventData) -> KvEvent {
        let event = KvEvent {
            event_id: self.log.len() as u64,
            data,
        };
        self.log.push(event.clone());
        event
    }

    fn snapshot(&self) -> KvSnapshot {
        let blocks = self
            .blocks
            .iter()
            .map(|&h| CachedBlock {
                parent_hash: None,
                block: StoredBlock {
                    sequence_hash: h,
                    local_hash: h,
                },
                tier: StorageTier::Device,
            })
            .collect();
        KvSnapshot {
            last_event_id: self.log.len().checked_sub(1).map(|i| i as u64),
            blocks,
        }
    }
}

/// The reference model's answer: leading blocks of `query` that each worker holds.
fn reference(model: &BTreeMap<u64, BTreeSet<u64>>, query: &[u64]) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = model
        .iter()
        .map(|(&w, held)| (w, query.iter().take_while(|h| held.contains(h)).count() as u32))
        .filter(|&(_, n)| n > 0)
        .collect();
    out.sort();
    out
}

fn apply_all(ix: &mut KvIndexer, w: u64, events: &[KvEvent], model: &mut BTreeMap<u64, BTreeSet<u64>>) {
    for e in events {
        assert_eq!(
            ix.apply(w, e),
            Ok(Applied::Applied),
            "replaying history applies in order"
        );
        replay(model.entry(w).or_default(), e);
    }
}

fn replay(held: &mut BTreeSet<u64>, e: &KvEvent) {
    match &e.data {
        KvEventData::Stored { blocks, .. } => held.extend(blocks.iter().map(|b| b.sequence_hash)),
        KvEventData::Removed { sequence_hashes, .. } => {
            for h in sequence_hashes {
                held.remove(h);
            }
        }
        KvEventData::Cleared => held.clear(),
    }
}

/// Delivers `event` from `w` as a router would: apply, and resync when told to, from the
/// worker's history if it covers the gap (half the time, as if it had been trimmed), else
/// from a snapshot.
fn deliver(
    ix: &mut KvIndexer,
    w: u64,
    truth: &Truth,
    event: &KvEvent,
    model: &mut BTreeMap<u64, BTreeSet<u64>>,
    use_history: bool,
) {
    match ix.apply(w, event).expect("few workers") {
        Applied::Applied => replay(model.entry(w).or_default(), event),
        Applied::Duplicate => {}
        Applied::NeedsResync { after: Some(after) } if use_history => {
            apply_all(ix, w, &truth.log[(after + 1) as usize..], model);
        }
        Applied::NeedsResync { .. } => {
            ix.apply_snapshot(w, &truth.snapshot()).expect("few workers");
            model.insert(w, truth.blocks.clone());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn indexer_matches_reference_model(actions in proptest::collection::vec((action(), any::<bool>()), 1..150)) {
        let mut ix = KvIndexer::new();
        let mut truths: BTreeMap<u64, Truth> = BTreeMap::new();
        // What the router has been told: the reference the indexer must agree with.
        let mut model: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        for (action, use_history) in actions {
            let (w, data) = match action {
                Action::Store(w, hashes) => {
                    let t = truths.entry(w).or_default();
                    t.blocks.extend(&hashes);
                    let blocks = hashes.iter().map(|&h| StoredBlock { sequence_hash: h, local_hash: h }).collect();
                    (w, KvEventData::Stored { parent_hash: None, blocks, tier: StorageTier::Device })
                }
                Action::Remove(w, picks) => {
                    let t = truths.entry(w).or_default();
                    let held: Vec<u64> = t.blocks.iter().copied().collect();
                    if held.is_empty() {
                        continue;
                    }
                    let gone: BTreeSet<u64> = picks.iter().map(|i| held[i % held.len()]).collect();
                    for h in &gone {
                        t.blocks.remove(h);
                    }
                    (w, KvEventData::Removed { sequence_hashes: gone.into_iter().collect(), tier: StorageTier::Device })
                }
                Action::Clear(w) => {
                    truths.entry(w).or_default().blocks.clear();
                    (w, KvEventData::Cleared)
                }
                Action::Drop(w) => {
                    truths.entry(w).or_default().drop_next = true;
                    continue;
                }
                Action::Query(query) => {
                    let mut got = ix.find_matches(&query).scores;
                    got.sort();
                    prop_assert_eq!(got, reference(&model, &query), "query {:?}", query);
                    continue;
                }
                Action::Leave(w) => {
                    ix.remove_worker(w);
                    model.remove(&w);
                    truths.remove(&w);
                    continue;
                }
            };
            let t = truths.entry(w).or_default();
            let event = t.emit(data);
            if std::mem::take(&mut t.drop_next) {
                continue;
            }
            deliver(&mut ix, w, t, &event, &mut model, use_history);
        }
        // Once every worker's latest state is delivered, the indexer knows the truth.
        for (&w, t) in &truths {
            if let Some(last) = t.log.last() {
                deliver(&mut ix, w, t, last, &mut model, false);
            }
            prop_assert_eq!(model.get(&w).cloned().unwrap_or_default(), t.blocks.clone(), "worker {} in sync", w);
            prop_assert_eq!(ix.worker_blocks(w), t.blocks.len());
        }
        let all: Vec<u64> = (0..24).collect();
        for start in 0..24 {
            let mut got = ix.find_matches(&all[start..]).scores;
            got.sort();
            prop_assert_eq!(got, reference(&model, &all[start..]));
        }
    }
}
