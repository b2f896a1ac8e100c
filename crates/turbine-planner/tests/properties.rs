//! Invariants of the policy over random fleets and loads: never above the budget, never
//! outside a pool's bounds, no new decision while an action is pending, a stuck start
//! cancelled after its timeout.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use turbine_planner::{
    decide, Observation, Phase, PlannerConfig, PoolConfig, PoolKind, PoolObservation, Reason, WorkerObservation,
};

/// A worker: (phase code, age in s, in flight, queued tokens, KV usage in %).
type WorkerSpec = (u8, u64, u32, u64, u8);

#[derive(Debug, Clone)]
struct Tick {
    arrivals: u64,
    isl: u64,
    ttft_ms: Option<u64>,
    pools: Vec<Vec<WorkerSpec>>,
}

fn tick(pools: usize) -> impl Strategy<Value = Tick> {
    let worker = (0u8..6, 0u64..400, 0u32..40, 0u64..100_000, 0u8..100);
    (
        0u64..2000,
        1u64..8000,
        proptest::option::of(0u64..10_000),
        proptest::collection::vec(proptest::collection::vec(worker, 0..12), pools),
    )
        .prop_map(|(arrivals, isl, ttft_ms, pools)| Tick {
            arrivals,
            isl,
            ttft_ms,
            pools,
        })
}

fn config(disaggregated: bool, mins: (u32, u32), spans: (u32, u32), costs: (u8, u8), slack: u8) -> PlannerConfig {
    let pool = |min: u32, span: u32, cost: u8| PoolConfig {
        min,
        max: (min + span).max(1),
        cost: f64::from(cost) / 2.0,
    };
    let pools: BTreeMap<_, _> = if disaggregated {
        [
            (PoolKind::Prefill, pool(mins.0, spans.0, costs.0)),
            (PoolKind::Decode, pool(mins.1, spans.1, costs.1)),
        ]
        .into()
    } else {
        [(PoolKind::Aggregated, pool(mins.0, spans.0, costs.0))].into()
    };
    let mut c = PlannerConfig {
        pools,
        start_timeout: Duration::from_secs(180),
        stabilization: Duration::from_secs(30),
        ..PlannerConfig::default()
    };
    c.budget = Some(c.minimum_cost() + f64::from(slack) + 0.5);
    c
}

fn observation(t: &Tick, kinds: &[PoolKind], now: u64) -> Observation {
    let mut pools = BTreeMap::new();
    let mut id = 0;
    for (kind, workers) in kinds.iter().zip(&t.pools) {
        let workers: Vec<WorkerObservation> = workers
            .iter()
            .map(|&(phase, age, in_flight, queued, kv)| {
                id += 1;
                let since = Duration::from_secs(now.saturating_sub(age));
                WorkerObservation {
                    id,
                    phase: match phase {
                        0 => Phase::Starting { since },
                        1 => Phase::Draining { since },
                        _ => Phase::Ready,
                    },
                    in_flight,
                    queued_prefill_tokens: queued,
                    kv_usage: f64::from(kv) / 100.0,
                    queue_depth: in_flight / 4,
                }
            })
            .collect();
        pools.insert(*kind, PoolObservation { workers });
    }
    Observation {
        window: Duration::from_secs(5),
        arrivals: t.arrivals,
        prompt_tokens: t.arrivals * t.isl,
        peak_prompt_tokens_per_s: t.arrivals * t.isl / 2,
        completions: t.arrivals,
        output_tokens: t.arrivals * 50,
        ttft: t.ttft_ms.map(Duration::from_millis),
        oldest_waiting: None,
        itl: None,
        in_flight: t.arrivals / 2,
        pools,
    }
}

fn spend(config: &PlannerConfig, obs: &Observation, size: impl Fn(PoolKind, &PoolObservation) -> u32) -> f64 {
    config
        .pools
        .iter()
        .map(|(kind, c)| {
            let pool = obs.pools.get(kind).cloned().unwrap_or_default();
            c.cost * f64::from(size(*kind, &pool) + pool.draining())
        })
        .sum()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn decisions_keep_every_invariant(
        disaggregated in any::<bool>(),
        mins in (0u32..3, 0u32..3),
        spans in (0u32..10, 0u32..10),
        costs in (0u8..6, 0u8..6),
        slack in 0u8..12,
        ticks in proptest::collection::vec(tick(2), 1..30),
    ) {
        let config = config(disaggregated, mins, spans, costs, slack);
        let kinds: Vec<PoolKind> = config.pools.keys().copied().collect();
        let mut state = common::planner(config.clone());
        let budget = config.budget.unwrap();
        for (i, t) in ticks.iter().enumerate() {
            let now = 5 * (i as u64 + 1);
            let obs = observation(t, &kinds, now);
            let d = decide(&mut state, &obs, Duration::from_secs(now));
            let stuck = |w: &WorkerObservation| matches!(w.phase, Phase::Starting { since } if now - since.as_secs() >= 180);
            // Every stuck start is cancelled, and nothing else is.
            let mut expected: Vec<(PoolKind, u64)> = Vec::new();
            for kind in &kinds {
                for w in &obs.pools[kind].workers {
                    if stuck(w) {
                        expected.push((*kind, w.id));
                    }
                }
            }
            prop_assert_eq!(&d.cancel, &expected);
            let before = spend(&config, &obs, |_, p| p.size());
            let after = spend(&config, &obs, |kind, p| {
                let stuck_here = p.workers.iter().filter(|w| stuck(w)).count() as u32;
                d.targets[&kind].replicas.max(p.size() - stuck_here)
            });
            if before <= budget + 1e-9 {
                prop_assert!(after <= budget + 1e-9, "spend {} of {} after {:?}", after, budget, d);
            }
            for kind in &kinds {
                let limits = config.pools[kind];
                let target = &d.targets[kind];
                let pool = &obs.pools[kind];
                prop_assert!(target.replicas <= limits.max, "{:?}", target);
                if !matches!(target.reason, Reason::Budget { .. }) {
                    prop_assert!(target.replicas >= limits.min, "{:?}", target);
                }
                let pending = pool.workers.iter().any(|w| matches!(w.phase, Phase::Draining { .. }) || (matches!(w.phase, Phase::Starting { .. }) && !stuck(w)));
                if pending && target.current >= limits.min && target.current <= limits.max {
                    prop_assert_eq!(target.replicas, target.current, "pending {:?}", target);
                    prop_assert_eq!(target.reason, Reason::Pending);
                }
                if target.replicas < target.current {
                    prop_assert_eq!(target.drain.len() as u32, target.current - target.replicas);
                } else {
                    prop_assert!(target.drain.is_empty());
                }
            }
        }
    }
}
