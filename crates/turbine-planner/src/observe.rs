//! What the planner sees each tick: load where requests arrive (the frontend) and each
//! worker's own report, gathered by whoever runs the planner.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::PoolKind;

/// Where a replica is in its life, as its connector reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Asked for at `since` (planner time), not yet registered.
    Starting { since: Duration },
    /// Registered and taking requests.
    Ready,
    /// Marked draining at `since`: routers send it nothing new, it finishes what it has.
    Draining { since: Duration },
}

/// One replica, as its load report and its connector describe it.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerObservation {
    pub id: u64,
    pub phase: Phase,
    /// Requests it is running or queueing.
    pub in_flight: u32,
    /// Prompt tokens admitted or queued but not yet computed.
    pub queued_prefill_tokens: u64,
    /// Share of its KV cache in use.
    pub kv_usage: f64,
    /// Requests waiting for admission.
    pub queue_depth: u32,
}

impl WorkerObservation {
    /// A replica whose load is not known (yet): nothing in flight, nothing queued.
    pub fn unloaded(id: u64, phase: Phase) -> Self {
        Self {
            id,
            phase,
            in_flight: 0,
            queued_prefill_tokens: 0,
            kv_usage: 0.0,
            queue_depth: 0,
        }
    }

    /// A replica that is taking requests now.
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// A replica that counts toward the pool's size: starting or ready, not leaving.
    pub fn is_counted(&self) -> bool {
        !matches!(self.phase, Phase::Draining { .. })
    }
}

/// A pool's replicas.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolObservation {
    pub workers: Vec<WorkerObservation>,
}

impl PoolObservation {
    pub fn ready(&self) -> u32 {
        self.workers.iter().filter(|w| w.is_ready()).count() as u32
    }

    pub fn starting(&self) -> u32 {
        self.workers
            .iter()
            .filter(|w| matches!(w.phase, Phase::Starting { .. }))
            .count() as u32
    }

    pub fn draining(&self) -> u32 {
        self.workers
            .iter()
            .filter(|w| matches!(w.phase, Phase::Draining { .. }))
            .count() as u32
    }

    /// The pool's size as scaling counts it: ready and starting replicas.
    pub fn size(&self) -> u32 {
        self.ready() + self.starting()
    }

    pub fn queued_prefill_tokens(&self) -> u64 {
        self.workers
            .iter()
            .filter(|w| w.is_counted())
            .map(|w| w.queued_prefill_tokens)
            .sum()
    }

    pub fn in_flight(&self) -> u64 {
        self.workers.iter().map(|w| u64::from(w.in_flight)).sum()
    }

    /// Mean KV usage of the ready replicas.
    pub fn kv_usage(&self) -> f64 {
        let ready: Vec<f64> = self
            .workers
            .iter()
            .filter(|w| w.is_ready())
            .map(|w| w.kv_usage)
            .collect();
        if ready.is_empty() {
            0.0
        } else {
            ready.iter().sum::<f64>() / ready.len() as f64
        }
    }
}

/// One tick's view: counts since the previous observation and the state now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observation {
    /// How long the counts below cover.
    pub window: Duration,
    /// Requests that arrived at the frontend (offered load, not completions).
    pub arrivals: u64,
    /// Their prompt tokens.
    pub prompt_tokens: u64,
    /// The most prompt tokens that arrived within any one second of the window: how
    /// bursty the load is inside it (0 if unknown: the window's mean is used).
    pub peak_prompt_tokens_per_s: u64,
    /// Requests that completed, and the tokens they generated.
    pub completions: u64,
    pub output_tokens: u64,
    /// The worst TTFT clients saw over the window (a high percentile, queueing included),
    /// and the age of the oldest request still without its first token.
    pub ttft: Option<Duration>,
    pub oldest_waiting: Option<Duration>,
    /// A high percentile of inter-token latency over the window.
    pub itl: Option<Duration>,
    /// Requests in flight at the frontend.
    pub in_flight: u64,
    pub pools: BTreeMap<PoolKind, PoolObservation>,
}

impl Observation {
    /// Requests a second over the window.
    pub fn rate(&self) -> f64 {
        let secs = self.window.as_secs_f64();
        if secs > 0.0 {
            self.arrivals as f64 / secs
        } else {
            0.0
        }
    }

    pub fn pool(&self, kind: PoolKind) -> Option<&PoolObservation> {
        self.pools.get(&kind)
    }
}
