//! Builders shared by the planner's tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use turbine_planner::capacity::{DecodePoint, PrefillPoint};
use turbine_planner::{
    CapacityModel, Observation, Phase, PlannerConfig, PlannerState, PoolKind, PoolObservation, WorkerObservation,
};

pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A replica whose prefill takes 10 ms plus 0.1 ms a token alone and computes 20,000
/// tokens a second saturated, and whose ITL is 10 ms plus 0.5 ms a sequence at 1,000
/// tokens of context, twice that slope at 3,000.
pub fn model() -> CapacityModel {
    let prefill = [100, 1000, 4000]
        .map(|isl| PrefillPoint {
            isl,
            ttft_ms: 10.0 + 0.1 * f64::from(isl),
            tokens_per_s: 20_000.0,
        })
        .to_vec();
    let mut decode = Vec::new();
    for (context, slope) in [(1000, 0.5), (3000, 1.0)] {
        for concurrency in [1, 16, 64, 256] {
            decode.push(DecodePoint {
                context,
                concurrency,
                itl_ms: 10.0 + slope * f64::from(concurrency),
            });
        }
    }
    CapacityModel {
        engine: "test".into(),
        prefill,
        decode,
        max_concurrency: 256,
        kv_tokens: 262_144,
    }
    .validated()
    .expect("the test model is valid")
}

pub fn planner(config: PlannerConfig) -> PlannerState {
    config.validate().expect("the test configuration is valid");
    PlannerState::new(config, model())
}

pub fn worker(id: u64, phase: Phase, in_flight: u32, queued_prefill_tokens: u64) -> WorkerObservation {
    WorkerObservation {
        id,
        phase,
        in_flight,
        queued_prefill_tokens,
        kv_usage: 0.1,
        queue_depth: 0,
    }
}

pub fn pool(workers: &[WorkerObservation]) -> PoolObservation {
    PoolObservation {
        workers: workers.to_vec(),
    }
}

/// `arrivals` requests of `isl` prompt tokens over `window_s`, on an aggregated pool of
/// `workers` (none: no aggregated pool).
pub fn obs(window_s: u64, arrivals: u64, isl: u64, workers: &[WorkerObservation]) -> Observation {
    let mut pools = BTreeMap::new();
    if !workers.is_empty() {
        pools.insert(PoolKind::Aggregated, pool(workers));
    }
    Observation {
        window: secs(window_s),
        arrivals,
        prompt_tokens: arrivals * isl,
        peak_prompt_tokens_per_s: 0,
        completions: arrivals,
        output_tokens: arrivals * 32,
        ttft: None,
        oldest_waiting: None,
        itl: None,
        in_flight: workers.iter().map(|w| u64::from(w.in_flight)).sum(),
        pools,
    }
}
