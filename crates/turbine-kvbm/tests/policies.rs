//! Property tests of the eviction policies against a model set of present blocks, and of
//! Belady's optimum against every policy on random prefix-sharing traces.

use std::collections::HashSet;

use proptest::prelude::*;
use turbine_kvbm::policy::{belady, build, replay, Key, Millis, Pinned, Policy, PolicyConfig, PolicyKind, Request};

#[derive(Debug, Clone)]
enum Op {
    /// A request's lookup of a block (with the block before it as parent): touched if
    /// present, else missed and offered.
    Lookup { key: Key, parent: Option<Key> },
    /// The tier drops the block on its own.
    Remove(Key),
    /// The tier asks for a victim while the blocks in `leased` cannot go.
    Victim { leased: Vec<Key> },
    /// The tier expires idle blocks.
    Expire,
    /// Time passes.
    Wait(Millis),
}

fn op() -> impl Strategy<Value = Op> {
    let key = 0u64..24;
    prop_oneof![
        6 => (key.clone(), proptest::option::of(0u64..24)).prop_map(|(key, parent)| Op::Lookup { key, parent }),
        1 => key.clone().prop_map(Op::Remove),
        2 => proptest::collection::vec(key, 0..6).prop_map(|leased| Op::Victim { leased }),
        1 => Just(Op::Expire),
        1 => (1u64..5_000).prop_map(Op::Wait),
    ]
}

fn config() -> PolicyConfig {
    PolicyConfig {
        ttl_ms: 3_000,
        lfu_half_life_ms: 2_000,
        adaptive_window: 16,
        adaptive_margin: 0.01,
    }
}

/// Drives `p` through `ops` as a tier of `capacity` blocks would, checking it against the
/// set of blocks actually present.
fn check(p: &mut dyn Policy, ops: &[Op], capacity: usize, pinned: &HashSet<Key>) -> Result<(), TestCaseError> {
    let mut present: HashSet<Key> = HashSet::new();
    let mut now: Millis = 0;
    for op in ops {
        match op {
            Op::Lookup { key, parent } => {
                if present.contains(key) {
                    p.touch(*key, now);
                } else {
                    p.miss(*key, *parent, now);
                    if !p.admit(*key, now) {
                        continue;
                    }
                    while present.len() >= capacity {
                        let Some(v) = p.victim(now, &mut |_| true) else { break };
                        prop_assert!(present.remove(&v), "{} named {v}, not present", p.name());
                        prop_assert!(!pinned.contains(&v), "{} named pinned {v}", p.name());
                    }
                    if present.len() < capacity {
                        p.insert(*key, *parent, now);
                        present.insert(*key);
                    }
                }
            }
            Op::Remove(key) => {
                if present.remove(key) {
                    p.remove(*key);
                }
            }
            Op::Victim { leased } => {
                if let Some(v) = p.victim(now, &mut |k| !leased.contains(&k)) {
                    prop_assert!(present.remove(&v), "{} named {v}, not present", p.name());
                    prop_assert!(!leased.contains(&v), "{} named leased {v}", p.name());
                    prop_assert!(!pinned.contains(&v), "{} named pinned {v}", p.name());
                }
            }
            Op::Expire => {
                while let Some(v) = p.expired(now, &mut |k| k % 5 != 0) {
                    prop_assert!(present.remove(&v), "{} expired {v}, not present", p.name());
                    prop_assert!(v % 5 != 0 && !pinned.contains(&v), "{} expired {v}", p.name());
                }
            }
            Op::Wait(ms) => now += ms,
        }
        prop_assert_eq!(p.len(), present.len(), "{}", p.name());
    }
    Ok(())
}

/// Requests that share prefixes as real ones do: each extends a prefix of an earlier one
/// with new blocks, so a key always has the same parent.
fn prefix_trace() -> impl Strategy<Value = Vec<Request>> {
    proptest::collection::vec((any::<prop::sample::Index>(), 0usize..8, 0usize..4, 0u64..3_000), 1..60).prop_map(
        |shape| {
            let mut next_key = 0;
            let mut trace: Vec<Request> = Vec::new();
            let mut at = 0;
            for (base, keep, fresh, gap) in shape {
                let mut blocks = if trace.is_empty() {
                    Vec::new()
                } else {
                    let b = &trace[base.index(trace.len())].blocks;
                    b[..keep.min(b.len())].to_vec()
                };
                for _ in 0..fresh.max(usize::from(blocks.is_empty())) {
                    blocks.push(next_key);
                    next_key += 1;
                }
                at += gap;
                trace.push(Request { at, blocks });
            }
            trace
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn every_policy_tracks_exactly_the_present_blocks(
        ops in proptest::collection::vec(op(), 1..200),
        capacity in 1usize..8,
    ) {
        for kind in PolicyKind::ALL {
            let mut p = build(kind, capacity, &config());
            check(&mut p, &ops, capacity, &HashSet::new())?;
        }
    }

    #[test]
    fn pinned_blocks_are_never_named(
        ops in proptest::collection::vec(op(), 1..200),
        capacity in 1usize..8,
        pins in proptest::collection::hash_set(0u64..24, 0..4),
    ) {
        for kind in PolicyKind::ALL {
            let mut p = Pinned::new(build(kind, capacity, &config()));
            for &k in &pins {
                p.pin(k);
            }
            check(&mut p, &ops, capacity, &pins)?;
        }
    }

    #[test]
    fn belady_beats_or_ties_every_policy(trace in prefix_trace(), capacity in 0usize..12) {
        let best = belady(&trace, capacity);
        for kind in PolicyKind::ALL {
            let s = replay(&trace, &mut build(kind, capacity, &config()), capacity);
            prop_assert_eq!(s.blocks, best.blocks);
            prop_assert!(
                s.hit_blocks <= best.hit_blocks,
                "{kind} hit {} blocks, Belady {}", s.hit_blocks, best.hit_blocks
            );
        }
    }
}
