//! The translator's tests: engine batches as the engines lay them out, and the events and
//! snapshots they become, checked against a replica of the router's view.

use super::*;
use crate::kv_events::decode::tests::{encode, ints, map, s};
use rmpv::Value;
use std::collections::HashSet;
use turbine_tokens::block_hashes;

const BS: usize = 4;

fn prompt(len: u32, salt: u32) -> Vec<u32> {
    (0..len).map(|i| i * 7 + salt).collect()
}

/// The engine's own hash of block `i` of `tokens`: any function works, as long as the
/// engine is consistent.
fn engine_hash(tokens: &[u32], i: usize) -> i64 {
    let mut h: i64 = -1;
    for &t in &tokens[..(i + 1) * BS] {
        h = h.wrapping_mul(1_000_003).wrapping_add(i64::from(t));
    }
    h
}

/// An array-like BlockStored of blocks `from..to` of `tokens`.
fn stored(tokens: &[u32], from: usize, to: usize) -> Value {
    stored_with(tokens, from, to, BS, Value::Nil, Value::Nil)
}

fn stored_with(tokens: &[u32], from: usize, to: usize, block_size: usize, lora: Value, medium: Value) -> Value {
    let hashes: Vec<i64> = (from..to).map(|i| engine_hash(tokens, i)).collect();
    let parent = if from == 0 {
        Value::Nil
    } else {
        Value::from(engine_hash(tokens, from - 1))
    };
    Value::Array(vec![
        s("BlockStored"),
        ints(&hashes),
        parent,
        ints(&tokens[from * BS..to * BS]),
        Value::from(block_size),
        lora,
        medium,
    ])
}

fn removed(tokens: &[u32], blocks: &[usize]) -> Value {
    let hashes: Vec<i64> = blocks.iter().map(|&i| engine_hash(tokens, i)).collect();
    Value::Array(vec![s("BlockRemoved"), ints(&hashes), Value::Nil])
}

fn cleared() -> Value {
    Value::Array(vec![s("AllBlocksCleared")])
}

fn batch(events: Vec<Value>) -> Vec<u8> {
    encode(&Value::Array(vec![Value::F64(0.0), Value::Array(events)]))
}

fn events_of(t: &mut Translator, seq: u64, events: Vec<Value>) -> Vec<KvEvent> {
    match t.apply(seq, &batch(events)) {
        Ok(Applied::Events(events)) => events,
        other => panic!("batch {seq}: {other:?}"),
    }
}

/// Turbine's hashes of blocks `from..to` of `tokens`, as the router computes them for a
/// request with that prompt.
fn turbine_blocks(tokens: &[u32], from: usize, to: usize) -> Vec<StoredBlock> {
    block_hashes(tokens, BS)[from..to]
        .iter()
        .map(|b| StoredBlock {
            sequence_hash: b.sequence,
            local_hash: b.local,
        })
        .collect()
}

fn seq_hash(tokens: &[u32], i: usize) -> u64 {
    block_hashes(tokens, BS)[i].sequence
}

fn stored_event(id: u64, parent_hash: Option<u64>, blocks: Vec<StoredBlock>) -> KvEvent {
    stored_event_in(id, StorageTier::Device, parent_hash, blocks)
}

fn stored_event_in(id: u64, tier: StorageTier, parent_hash: Option<u64>, blocks: Vec<StoredBlock>) -> KvEvent {
    KvEvent {
        event_id: id,
        data: KvEventData::Stored {
            parent_hash,
            blocks,
            tier,
        },
    }
}

fn removed_event(id: u64, sequence_hashes: Vec<u64>) -> KvEvent {
    removed_event_in(id, StorageTier::Device, sequence_hashes)
}

fn removed_event_in(id: u64, tier: StorageTier, sequence_hashes: Vec<u64>) -> KvEvent {
    KvEvent {
        event_id: id,
        data: KvEventData::Removed { sequence_hashes, tier },
    }
}

/// The router's view: the events applied to a set per tier, in order, ids consecutive
/// from 0.
#[derive(Default)]
struct Replica {
    next_id: u64,
    blocks: HashMap<(StorageTier, u64), CachedBlock>,
}

impl Replica {
    fn apply(&mut self, events: &[KvEvent]) {
        for event in events {
            assert_eq!(event.event_id, self.next_id, "event ids have no gaps");
            self.next_id += 1;
            match &event.data {
                KvEventData::Stored {
                    parent_hash,
                    blocks,
                    tier,
                } => {
                    let mut parent = *parent_hash;
                    for &block in blocks {
                        let old = self.blocks.insert(
                            (*tier, block.sequence_hash),
                            CachedBlock {
                                parent_hash: parent,
                                block,
                                tier: *tier,
                            },
                        );
                        assert!(old.is_none(), "{block:?} stored twice in {tier:?}");
                        parent = Some(block.sequence_hash);
                    }
                }
                KvEventData::Removed { sequence_hashes, tier } => {
                    for h in sequence_hashes {
                        let gone = self.blocks.remove(&(*tier, *h));
                        assert!(gone.is_some(), "{h} removed from {tier:?} but not stored there");
                    }
                }
                KvEventData::Cleared => self.blocks.retain(|(tier, _), _| *tier != StorageTier::Device),
            }
        }
    }

    /// Checks a snapshot against the replayed events, parents listed before children
    /// within each tier.
    fn check(&self, snapshot: &KvSnapshot) {
        assert_eq!(snapshot.last_event_id, self.next_id.checked_sub(1));
        let mut seen = HashSet::new();
        for b in &snapshot.blocks {
            if let Some(p) = b.parent_hash {
                assert!(
                    seen.contains(&(b.tier, p)) || !self.blocks.contains_key(&(b.tier, p)),
                    "parent {p} listed after its child"
                );
            }
            assert!(seen.insert((b.tier, b.block.sequence_hash)));
        }
        let listed: HashMap<(StorageTier, u64), CachedBlock> = snapshot
            .blocks
            .iter()
            .map(|b| ((b.tier, b.block.sequence_hash), *b))
            .collect();
        assert_eq!(listed, self.blocks);
    }
}

#[test]
fn stored_blocks_get_the_routers_hashes() {
    let a = prompt(5 * BS as u32 + 2, 1);
    let mut t = Translator::new(BS);
    let mut replica = Replica::default();
    // Root blocks, then their children in the same batch and in a later one.
    let first = events_of(&mut t, 7, vec![stored(&a, 0, 2), stored(&a, 2, 3)]);
    assert_eq!(
        first,
        vec![
            stored_event(0, None, turbine_blocks(&a, 0, 2)),
            stored_event(1, Some(seq_hash(&a, 1)), turbine_blocks(&a, 2, 3)),
        ]
    );
    replica.apply(&first);
    let second = events_of(&mut t, 8, vec![stored(&a, 3, 5)]);
    assert_eq!(
        second,
        vec![stored_event(2, Some(seq_hash(&a, 2)), turbine_blocks(&a, 3, 5))]
    );
    replica.apply(&second);
    replica.check(&t.snapshot());
    let all: Vec<u64> = t.snapshot().blocks.iter().map(|b| b.block.sequence_hash).collect();
    let expected: Vec<u64> = block_hashes(&a, BS).iter().map(|b| b.sequence).collect();
    assert_eq!(all, expected, "the partial block is the router's to skip too");
    assert_eq!(t.stats().stored_blocks, 5);
    assert_eq!(t.next_seq(), Some(9));
}

#[test]
fn removal_translates_known_hashes_and_drops_unknown_ones() {
    let a = prompt(3 * BS as u32, 1);
    let other = prompt(2 * BS as u32, 2);
    let mut t = Translator::new(BS);
    let mut replica = Replica::default();
    replica.apply(&events_of(&mut t, 0, vec![stored(&a, 0, 3)]));
    let events = events_of(&mut t, 1, vec![removed(&a, &[2, 1]), removed(&other, &[0])]);
    assert_eq!(events, vec![removed_event(1, vec![seq_hash(&a, 2), seq_hash(&a, 1)])]);
    replica.apply(&events);
    assert_eq!(
        events_of(&mut t, 2, vec![removed(&a, &[2])]),
        vec![],
        "an empty removal emits nothing"
    );
    replica.check(&t.snapshot());
    let stats = t.stats();
    assert_eq!((stats.removed_blocks, stats.unknown_removed), (2, 2));
}

#[test]
fn clear_forgets_every_block() {
    let a = prompt(2 * BS as u32, 1);
    let mut t = Translator::new(BS);
    let mut replica = Replica::default();
    replica.apply(&events_of(&mut t, 0, vec![stored(&a, 0, 1)]));
    let events = events_of(&mut t, 1, vec![cleared(), stored(&a, 1, 2)]);
    // The second event's parent went with the clear.
    assert_eq!(
        events,
        vec![KvEvent {
            event_id: 1,
            data: KvEventData::Cleared
        }]
    );
    replica.apply(&events);
    replica.check(&t.snapshot());
    assert!(t.snapshot().blocks.is_empty());
    assert_eq!((t.stats().cleared, t.stats().unknown_parent), (1, 1));
}

#[test]
fn blocks_whose_parent_was_missed_are_skipped() {
    let a = prompt(4 * BS as u32, 1);
    let mut t = Translator::new(BS);
    assert_eq!(events_of(&mut t, 40, vec![stored(&a, 1, 3)]), vec![]);
    assert_eq!(t.stats().unknown_parent, 1);
    assert_eq!(t.snapshot(), KvSnapshot::default());
    // Its children cannot be placed either, nor can its blocks be removed.
    assert_eq!(events_of(&mut t, 41, vec![stored(&a, 3, 4), removed(&a, &[1])]), vec![]);
    let stats = t.stats();
    assert_eq!((stats.unknown_parent, stats.unknown_removed), (2, 1));
}

#[test]
fn blocks_stored_again_are_not_stored_twice() {
    let a = prompt(3 * BS as u32, 1);
    let mut t = Translator::new(BS);
    let mut replica = Replica::default();
    replica.apply(&events_of(&mut t, 0, vec![stored(&a, 1, 2)]));
    // Parent unknown above; now the whole prompt, then block 1 again.
    let events = events_of(&mut t, 1, vec![stored(&a, 0, 3), stored(&a, 1, 2)]);
    assert_eq!(events, vec![stored_event(0, None, turbine_blocks(&a, 0, 3))]);
    replica.apply(&events);
    assert_eq!(t.stats().duplicate_blocks, 1);
    replica.check(&t.snapshot());
}

#[test]
fn one_block_named_by_two_engine_hashes_is_removed_with_the_last() {
    // vLLM salts a prompt's first block hash with its cache salt: equal tokens, other
    // engine hashes, one Turbine block.
    let a = prompt(2 * BS as u32, 1);
    let salted = |hash: i64| Value::from(hash ^ 0x5a17);
    let mut t = Translator::new(BS);
    let mut replica = Replica::default();
    replica.apply(&events_of(&mut t, 0, vec![stored(&a, 0, 2)]));
    let again = Value::Array(vec![
        s("BlockStored"),
        Value::Array(vec![salted(engine_hash(&a, 0)), salted(engine_hash(&a, 1))]),
        Value::Nil,
        ints(&a[..2 * BS]),
        Value::from(BS),
    ]);
    assert_eq!(events_of(&mut t, 1, vec![again]), vec![]);
    assert_eq!(events_of(&mut t, 2, vec![removed(&a, &[0, 1])]), vec![]);
    let salted_removal = Value::Array(vec![
        s("BlockRemoved"),
        Value::Array(vec![salted(engine_hash(&a, 1)), salted(engine_hash(&a, 0))]),
    ]);
    let events = events_of(&mut t, 3, vec![salted_removal]);
    assert_eq!(events, vec![removed_event(1, vec![seq_hash(&a, 1), seq_hash(&a, 0)])]);
    replica.apply(&events);
    replica.check(&t.snapshot());
}

#[test]
fn only_new_blocks_are_announced_in_runs() {
    let a = prompt(4 * BS as u32, 1);
    let mut t = Translator::new(BS);
    let mut replica = Replica::default();
    replica.apply(&events_of(&mut t, 0, vec![stored(&a, 0, 4)]));
    replica.apply(&events_of(&mut t, 1, vec![removed(&a, &[0, 2])]));
    // Block 1 and 3 are still stored: blocks 0 and 2 come back as runs of their own.
    let events = events_of(&mut t, 2, vec![stored(&a, 0, 4)]);
    assert_eq!(
        events,
        vec![
            stored_event(2, None, turbine_blocks(&a, 0, 1)),
            stored_event(3, Some(seq_hash(&a, 1)), turbine_blocks(&a, 2, 3)),
        ]
    );
    replica.apply(&events);
    // Block 0 was stored again after its child: the snapshot still lists it first.
    let snapshot = t.snapshot();
    replica.check(&snapshot);
    assert_eq!(snapshot.blocks[0].block.sequence_hash, seq_hash(&a, 0));
}

#[test]
fn seq_numbers_show_duplicates_and_gaps() {
    let a = prompt(3 * BS as u32, 1);
    let mut t = Translator::expecting(BS, 0);
    assert_eq!(
        t.apply(2, &batch(vec![stored(&a, 0, 1)])).ok(),
        Some(Applied::Gap { expected: 0, got: 2 })
    );
    assert_eq!(events_of(&mut t, 0, vec![stored(&a, 0, 1)]).len(), 1);
    assert_eq!(
        t.apply(0, &batch(vec![stored(&a, 0, 1)])).ok(),
        Some(Applied::Duplicate)
    );
    assert_eq!(events_of(&mut t, 1, vec![stored(&a, 1, 2)]).len(), 1);
    assert_eq!(
        t.apply(3, &batch(vec![stored(&a, 2, 3)])).ok(),
        Some(Applied::Gap { expected: 2, got: 3 })
    );
    let stats = t.stats();
    assert_eq!((stats.batches, stats.duplicate_batches, stats.gaps), (2, 1, 2));

    // Nothing to replay from: start over at the live batch.
    let mut replica = Replica::default();
    replica.apply(&[stored_event(0, None, turbine_blocks(&a, 0, 1))]);
    replica.apply(&[stored_event(1, Some(seq_hash(&a, 0)), turbine_blocks(&a, 1, 2))]);
    let reset = t.reset();
    assert_eq!(
        reset,
        vec![KvEvent {
            event_id: 2,
            data: KvEventData::Cleared
        }]
    );
    replica.apply(&reset);
    assert_eq!(t.next_seq(), None);
    assert_eq!(
        events_of(&mut t, 3, vec![stored(&a, 2, 3)]),
        vec![],
        "its parent was forgotten"
    );
    replica.apply(&events_of(&mut t, 4, vec![stored(&a, 0, 3)]));
    replica.check(&t.snapshot());
    assert_eq!(t.snapshot().blocks.len(), 3);
    assert_eq!(t.stats().resets, 1);
}

#[test]
fn a_wrong_block_size_is_refused_and_reported() {
    let a = prompt(4 * BS as u32, 1);
    let mut t = Translator::new(BS);
    let doubled = stored_with(&a, 0, 2, 2 * BS, Value::Nil, Value::Nil);
    assert_eq!(events_of(&mut t, 0, vec![doubled]), vec![]);
    let stats = t.stats();
    assert_eq!(stats.wrong_block_size, 1);
    let mismatch = stats.block_size_mismatch.expect("the mismatch is reported");
    assert_eq!(
        mismatch.to_string(),
        "the engine publishes KV events for blocks of 8 tokens but the router hashes 4-token blocks: \
         start the engine with --block-size 4 (SGLang: --page-size 4)"
    );
    assert_eq!(t.snapshot().blocks, vec![]);
}

#[test]
fn a_token_count_other_than_the_blocks_is_refused() {
    let a = prompt(4 * BS as u32, 1);
    let mut t = Translator::new(BS);
    let short = Value::Array(vec![
        s("BlockStored"),
        ints(&[1u64, 2]),
        Value::Nil,
        ints(&a[..2 * BS - 1]),
        Value::from(BS),
    ]);
    assert_eq!(events_of(&mut t, 0, vec![short]), vec![]);
    assert_eq!(t.stats().token_count_mismatch, 1);
    assert_eq!(t.snapshot().blocks, vec![]);
}

#[test]
fn other_media_loras_and_groups_are_skipped() {
    let a = prompt(2 * BS as u32, 1);
    let mut t = Translator::new(BS);
    let mut replica = Replica::default();
    replica.apply(&events_of(&mut t, 0, vec![stored(&a, 0, 1)]));
    let cpu = stored_with(&a, 1, 2, BS, Value::Nil, s("REMOTE"));
    let lora = stored_with(&a, 1, 2, BS, Value::from(1), s("GPU"));
    let cpu_removal = Value::Array(vec![s("BlockRemoved"), ints(&[engine_hash(&a, 0)]), s("REMOTE")]);
    let group = map(vec![
        ("type", s("BlockRemoved")),
        ("block_hashes", ints(&[engine_hash(&a, 0)])),
        ("group_idx", Value::from(1)),
    ]);
    let named_lora = map(vec![("type", s("AllBlocksCleared")), ("lora_name", s("adapter"))]);
    assert_eq!(
        events_of(&mut t, 1, vec![cpu, lora, cpu_removal, group, named_lora]),
        vec![]
    );
    let stats = t.stats();
    assert_eq!(
        (stats.skipped_medium, stats.skipped_lora, stats.skipped_group),
        (2, 2, 1)
    );
    replica.check(&t.snapshot());
    assert_eq!(t.snapshot().blocks.len(), 1);
}

#[test]
fn bytes_hashes_as_newer_vllm_sends_them() {
    let a = prompt(2 * BS as u32, 1);
    let digest = |i: u8| Value::Binary(vec![i; 32]);
    let store = map(vec![
        ("type", s("BlockStored")),
        ("block_hashes", Value::Array(vec![digest(1)])),
        ("parent_block_hash", Value::Nil),
        ("token_ids", ints(&a[..BS])),
        ("block_size", Value::from(BS)),
        ("medium", s("GPU")),
    ]);
    let child = map(vec![
        ("type", s("BlockStored")),
        ("block_hashes", Value::Array(vec![digest(2)])),
        ("parent_block_hash", digest(1)),
        ("token_ids", ints(&a[BS..])),
        ("block_size", Value::from(BS)),
    ]);
    let remove = map(vec![
        ("type", s("BlockRemoved")),
        ("block_hashes", Value::Array(vec![digest(1)])),
    ]);
    let payload = encode(&map(vec![
        ("ts", Value::F64(0.0)),
        ("events", Value::Array(vec![store, child, remove])),
    ]));
    let mut t = Translator::new(BS);
    let Ok(Applied::Events(events)) = t.apply(0, &payload) else {
        panic!("a valid batch")
    };
    assert_eq!(
        events,
        vec![
            stored_event(0, None, turbine_blocks(&a, 0, 1)),
            stored_event(1, Some(seq_hash(&a, 0)), turbine_blocks(&a, 1, 2)),
            removed_event(2, vec![seq_hash(&a, 0)]),
        ]
    );
    let mut replica = Replica::default();
    replica.apply(&events);
    replica.check(&t.snapshot());
}

#[test]
fn negative_integer_hashes_name_blocks_like_any_other() {
    let a = prompt(2 * BS as u32, 1);
    let store = |hash: i64, parent: Value, from: usize| {
        Value::Array(vec![
            s("BlockStored"),
            ints(&[hash]),
            parent,
            ints(&a[from * BS..(from + 1) * BS]),
            Value::from(BS),
        ])
    };
    let mut t = Translator::new(BS);
    let events = events_of(
        &mut t,
        0,
        vec![store(-5, Value::Nil, 0), store(i64::MIN, Value::from(-5), 1)],
    );
    assert_eq!(
        events,
        vec![
            stored_event(0, None, turbine_blocks(&a, 0, 1)),
            stored_event(1, Some(seq_hash(&a, 0)), turbine_blocks(&a, 1, 2)),
        ]
    );
    // The unsigned spelling of the same bits names the same block.
    let removal = Value::Array(vec![s("BlockRemoved"), ints(&[i64::MIN as u64])]);
    assert_eq!(
        events_of(&mut t, 1, vec![removal]),
        vec![removed_event(2, vec![seq_hash(&a, 1)])]
    );
}

#[test]
fn a_malformed_batch_is_consumed_and_reported() {
    let a = prompt(BS as u32, 1);
    let mut t = Translator::new(BS);
    let bad = Value::Array(vec![
        s("BlockStored"),
        ints(&[1u64]),
        Value::Nil,
        s("not tokens"),
        Value::from(BS),
    ]);
    let payload = batch(vec![stored(&a, 0, 1), bad]);
    let err = t.apply(5, &payload).expect_err("malformed");
    assert_eq!(err.to_string(), "KV event batch 5 is malformed");
    assert_eq!(
        err.source.to_string(),
        "event 1: BlockStored token_ids is not a list of integers"
    );
    assert!(t.apply(6, b"\x92\xcb").is_err());
    let stats = t.stats();
    assert_eq!((stats.decode_errors, stats.batches), (2, 0));
    assert_eq!(t.next_seq(), Some(7));
    assert_eq!(t.snapshot(), KvSnapshot::default(), "a malformed batch applies nothing");
}

/// A BlockStored as vLLM's offloading connector sends it: engine hashes, no tokens.
fn offloaded(tokens: &[u32], blocks: &[usize], block_size: usize, medium: &str) -> Value {
    let hashes: Vec<i64> = blocks.iter().map(|&i| engine_hash(tokens, i)).collect();
    Value::Array(vec![
        s("BlockStored"),
        ints(&hashes),
        Value::Nil,
        ints::<u32>(&[]),
        Value::from(block_size),
        Value::Nil,
        s(medium),
    ])
}

fn removed_in(tokens: &[u32], blocks: &[usize], medium: &str) -> Value {
    let hashes: Vec<i64> = blocks.iter().map(|&i| engine_hash(tokens, i)).collect();
    Value::Array(vec![s("BlockRemoved"), ints(&hashes), s(medium)])
}

#[test]
fn each_medium_is_a_tier_holding_blocks_of_its_own() {
    use StorageTier::{Device, Host};
    let a = prompt(3 * BS as u32, 1);
    let mut t = Translator::new(BS);
    let mut replica = Replica::default();
    replica.apply(&events_of(&mut t, 0, vec![stored(&a, 0, 3)]));
    // The same blocks stored with their tokens in host memory: new to that tier.
    let cpu = stored_with(&a, 0, 2, BS, Value::Nil, s("cpu"));
    let events = events_of(&mut t, 1, vec![cpu]);
    assert_eq!(events, vec![stored_event_in(1, Host, None, turbine_blocks(&a, 0, 2))]);
    replica.apply(&events);
    // Evicted from the device, they stay in host memory until removed there.
    let events = events_of(&mut t, 2, vec![removed(&a, &[0, 1, 2]), removed_in(&a, &[1], "CPU")]);
    assert_eq!(
        events,
        vec![
            removed_event(2, vec![seq_hash(&a, 0), seq_hash(&a, 1), seq_hash(&a, 2)]),
            removed_event_in(3, Host, vec![seq_hash(&a, 1)]),
        ]
    );
    replica.apply(&events);
    let snapshot = t.snapshot();
    replica.check(&snapshot);
    assert_eq!(
        snapshot
            .blocks
            .iter()
            .map(|b| (b.tier, b.block.sequence_hash))
            .collect::<Vec<_>>(),
        [(Host, seq_hash(&a, 0))]
    );
    // A child stored on the device whose parent only host memory holds still chains.
    let events = events_of(&mut t, 3, vec![stored(&a, 1, 2)]);
    assert_eq!(
        events,
        vec![stored_event_in(
            4,
            Device,
            Some(seq_hash(&a, 0)),
            turbine_blocks(&a, 1, 2)
        )]
    );
    assert_eq!(t.stats().skipped_medium, 0);
}

#[test]
fn offloaded_blocks_named_by_hash_alone_take_the_hashes_seen_on_the_device() {
    use StorageTier::{Disk, Host};
    let a = prompt(4 * BS as u32, 1);
    let mut t = Translator::new(BS);
    let mut replica = Replica::default();
    replica.apply(&events_of(&mut t, 0, vec![stored(&a, 0, 4)]));
    let events = events_of(
        &mut t,
        1,
        vec![
            offloaded(&a, &[0, 1], BS, "CPU"),
            // Not following the block before: a run of its own.
            offloaded(&a, &[3], 0, "CPU"),
            offloaded(&a, &[1, 2], 0, "STORAGE"),
        ],
    );
    assert_eq!(
        events,
        vec![
            stored_event_in(1, Host, None, turbine_blocks(&a, 0, 2)),
            stored_event_in(2, Host, Some(seq_hash(&a, 2)), turbine_blocks(&a, 3, 4)),
            stored_event_in(3, Disk, Some(seq_hash(&a, 0)), turbine_blocks(&a, 1, 3)),
        ]
    );
    replica.apply(&events);
    // Gone from the device, the blocks are still named in host memory and on disk.
    replica.apply(&events_of(&mut t, 2, vec![removed(&a, &[0, 1, 2, 3])]));
    let events = events_of(
        &mut t,
        3,
        vec![removed_in(&a, &[3, 0], "CPU"), removed_in(&a, &[2], "STORAGE")],
    );
    assert_eq!(
        events,
        vec![
            removed_event_in(5, Host, vec![seq_hash(&a, 3), seq_hash(&a, 0)]),
            removed_event_in(6, Disk, vec![seq_hash(&a, 2)]),
        ]
    );
    replica.apply(&events);
    replica.check(&t.snapshot());
    // A name no tier has seen cannot be placed; an offloading block size of another
    // size than the router's is refused.
    let other = prompt(BS as u32, 9);
    assert_eq!(events_of(&mut t, 4, vec![offloaded(&other, &[0], 0, "CPU")]), vec![]);
    assert_eq!(events_of(&mut t, 5, vec![offloaded(&a, &[1], 2 * BS, "CPU")]), vec![]);
    let stats = t.stats();
    assert_eq!((stats.unresolved_blocks, stats.wrong_block_size), (1, 1));
    replica.check(&t.snapshot());
}

#[test]
fn a_cleared_tier_off_the_device_is_removed_block_by_block() {
    use StorageTier::{Disk, Host};
    let a = prompt(2 * BS as u32, 1);
    let mut t = Translator::new(BS);
    let mut replica = Replica::default();
    replica.apply(&events_of(&mut t, 0, vec![stored(&a, 0, 2)]));
    replica.apply(&events_of(
        &mut t,
        1,
        vec![offloaded(&a, &[0, 1], BS, "CPU"), offloaded(&a, &[0], BS, "DISK")],
    ));
    let clear_cpu = map(vec![("type", s("AllBlocksCleared")), ("medium", s("CPU"))]);
    let events = events_of(&mut t, 2, vec![clear_cpu]);
    assert!(
        matches!(&events[..], [KvEvent { data: KvEventData::Removed { sequence_hashes, tier: Host }, .. }]
            if sequence_hashes.len() == 2),
        "{events:?}"
    );
    replica.apply(&events);
    replica.check(&t.snapshot());
    // A reset forgets every tier: the device by `Cleared`, the others block by block.
    let reset = t.reset();
    assert_eq!(
        reset,
        vec![
            KvEvent {
                event_id: 4,
                data: KvEventData::Cleared
            },
            removed_event_in(5, Disk, vec![seq_hash(&a, 0)]),
        ]
    );
    replica.apply(&reset);
    assert!(replica.blocks.is_empty());
    assert_eq!(t.snapshot().blocks, vec![]);
}
