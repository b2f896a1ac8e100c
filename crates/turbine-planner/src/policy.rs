//! The scaling policy: each tick, from an observation and the time, every pool's target
//! size and why. A pure function of its inputs and the state it is handed, so it runs the
//! same in unit tests, in simulated time and in production.
//!
//! Two loops feed it. The fast one (every call) sizes each pool from its load now: the
//! prompt tokens queued and arriving against what a replica computes within the TTFT
//! target, sequences in decode against what a replica holds within the ITL target, KV
//! usage, and latency the clients saw above target. The slow one (every
//! `slow_interval`) sizes it from the forecast request rate and lengths through the
//! capacity model. A pool grows at once to what either needs; it shrinks only to the
//! largest size both asked for (with headroom) over the whole stabilization window, so a
//! load on a size boundary does not flap; and with nothing arriving and nothing in flight
//! it returns to its minimum. Nothing new is decided for a pool while a replica of it is
//! starting or draining, and the total cost, counting replicas still starting or draining,
//! never exceeds the budget.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::Duration;

use crate::capacity::CapacityModel;
use crate::config::{PlannerConfig, PoolKind};
use crate::observe::{Observation, Phase, PoolObservation};
use crate::predict::Predictor;

/// Why a pool's target is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Its size meets the targets and a smaller one would not keep the headroom.
    Hold,
    /// A replica is starting or draining: nothing new until that ends.
    Pending,
    /// Fewer replicas than the pool's minimum.
    BelowMin,
    /// More replicas than the pool's maximum.
    AboveMax,
    /// The load now (queued and arriving prompt tokens, sequences decoding, KV usage) needs more.
    Load,
    /// Clients saw TTFT or ITL above target with work still queued.
    Latency,
    /// The forecast rate needs more.
    Forecast,
    /// A smaller size was enough, with headroom, over the whole stabilization window.
    Stabilized,
    /// Nothing arrived and nothing ran for the idle time.
    Idle,
    /// The pool wanted `wanted` replicas; the budget allows the target.
    Budget { wanted: u32 },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Hold => f.write_str("hold"),
            Reason::Pending => f.write_str("pending"),
            Reason::BelowMin => f.write_str("below_min"),
            Reason::AboveMax => f.write_str("above_max"),
            Reason::Load => f.write_str("load"),
            Reason::Latency => f.write_str("latency"),
            Reason::Forecast => f.write_str("forecast"),
            Reason::Stabilized => f.write_str("stabilized"),
            Reason::Idle => f.write_str("idle"),
            Reason::Budget { wanted } => write!(f, "budget (wanted {wanted})"),
        }
    }
}

/// One pool's outcome of a tick.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Replicas the pool should have (starting and ready).
    pub replicas: u32,
    /// Replicas it has (starting and ready; draining ones are leaving).
    pub current: u32,
    pub reason: Reason,
    /// Replicas the load needs, fractional, by the fast and the slow loop.
    pub need_now: f64,
    pub need_forecast: f64,
    /// TTFT and ITL the capacity model expects at the target size.
    pub est_ttft: Duration,
    pub est_itl: Duration,
    /// Ready replicas to drain for a smaller target: those with the least in flight.
    pub drain: Vec<u64>,
}

/// What a tick decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub now: Duration,
    pub targets: BTreeMap<PoolKind, Target>,
    /// Replicas that have been starting for longer than the start timeout: to be stopped.
    pub cancel: Vec<(PoolKind, u64)>,
    /// The forecast used: requests a second, prompt and output tokens per request.
    pub predicted_rate: f64,
    pub predicted_isl: f64,
    pub predicted_osl: f64,
}

impl Decision {
    /// True when some pool's target differs from its size, or a start is cancelled.
    pub fn changes(&self) -> bool {
        !self.cancel.is_empty() || self.targets.values().any(|t| t.replicas != t.current)
    }
}

/// Counts summed over the slow loop's period.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    span: Duration,
    arrivals: u64,
    prompt_tokens: u64,
    completions: u64,
    output_tokens: u64,
}

/// What the policy remembers between ticks.
#[derive(Debug, Clone)]
pub struct PlannerState {
    config: PlannerConfig,
    model: CapacityModel,
    rate: Predictor,
    isl: Predictor,
    osl: Predictor,
    window: Window,
    last_slow: Option<Duration>,
    /// The slow loop's fractional need per pool, until its next run.
    forecast_need: BTreeMap<PoolKind, f64>,
    /// Each pool's recommended size per tick over the stabilization window.
    history: BTreeMap<PoolKind, VecDeque<(Duration, u32)>>,
    /// Since when each pool's history has been gathered: the first tick, or the last time
    /// its size changed by someone else's hand (an operator's edit, a crash).
    watching_since: BTreeMap<PoolKind, Duration>,
    /// The size each pool was last given.
    last_target: BTreeMap<PoolKind, u32>,
    last_busy: Option<Duration>,
    /// Replicas seen starting, and since when, until they are seen ready.
    starting_since: BTreeMap<(PoolKind, u64), Duration>,
    /// How long a replica takes to start, as observed (a moving average).
    startup: Option<Duration>,
}

/// Prompt and output lengths assumed before any request is seen.
const DEFAULT_ISL: f64 = 1024.0;
const DEFAULT_OSL: f64 = 128.0;

impl PlannerState {
    /// A planner for `config` (already validated) sizing replicas by `model`.
    pub fn new(config: PlannerConfig, model: CapacityModel) -> Self {
        let kind = config.predictor;
        Self {
            config,
            model,
            rate: Predictor::new(kind),
            isl: Predictor::new(kind),
            osl: Predictor::new(kind),
            window: Window::default(),
            last_slow: None,
            forecast_need: BTreeMap::new(),
            history: BTreeMap::new(),
            watching_since: BTreeMap::new(),
            last_target: BTreeMap::new(),
            last_busy: None,
            starting_since: BTreeMap::new(),
            startup: None,
        }
    }

    pub fn config(&self) -> &PlannerConfig {
        &self.config
    }

    pub fn model(&self) -> &CapacityModel {
        &self.model
    }

    /// How long replicas have taken to start, as observed so far.
    pub fn startup(&self) -> Option<Duration> {
        self.startup
    }

    /// Learns start-up time from replicas seen starting on one tick and ready on a later one.
    fn watch_starts(&mut self, kind: PoolKind, pool: &PoolObservation, now: Duration) {
        for w in &pool.workers {
            match w.phase {
                Phase::Starting { since } => {
                    self.starting_since.insert((kind, w.id), since);
                }
                Phase::Ready => {
                    if let Some(since) = self.starting_since.remove(&(kind, w.id)) {
                        let took = now.saturating_sub(since);
                        self.startup = Some(match self.startup {
                            Some(s) => (s + took) / 2,
                            None => took,
                        });
                    }
                }
                Phase::Draining { .. } => {
                    self.starting_since.remove(&(kind, w.id));
                }
            }
        }
        // Starts cancelled or lost leave no entry behind.
        self.starting_since
            .retain(|&(k, id), _| k != kind || pool.workers.iter().any(|w| w.id == id));
    }
}

/// The load one tick sizes a pool for.
struct Load {
    /// Prompt tokens a second arriving, prompt length, output length.
    prompt_rate: f64,
    /// The most prompt tokens that arrived within one second.
    peak_prompt_tokens: f64,
    isl: f64,
    osl: f64,
}

/// Decides every pool's target at `now` from `obs`, updating `state`.
pub fn decide(state: &mut PlannerState, obs: &Observation, now: Duration) -> Decision {
    let busy = obs.arrivals > 0 || obs.in_flight > 0 || obs.pools.values().any(|p| p.in_flight() > 0);
    if busy || state.last_busy.is_none() {
        state.last_busy = Some(now);
    }
    let idle = !busy
        && state
            .last_busy
            .is_some_and(|t| now.saturating_sub(t) >= state.config.idle_after);

    slow_loop(state, obs, now);
    let isl = state.isl.predict().unwrap_or(DEFAULT_ISL).max(1.0);
    let osl = state.osl.predict().unwrap_or(DEFAULT_OSL).max(1.0);
    let secs = obs.window.as_secs_f64();
    let now_isl = if obs.arrivals > 0 {
        obs.prompt_tokens as f64 / obs.arrivals as f64
    } else {
        isl
    };
    let load = Load {
        prompt_rate: if secs > 0.0 {
            obs.prompt_tokens as f64 / secs
        } else {
            0.0
        },
        peak_prompt_tokens: obs.peak_prompt_tokens_per_s as f64,
        isl: now_isl,
        osl,
    };

    let empty = PoolObservation::default();
    let mut targets = BTreeMap::new();
    let mut cancel = Vec::new();
    let config = state.config.clone();
    for (&kind, limits) in &config.pools {
        let pool = obs.pool(kind).unwrap_or(&empty);
        state.watch_starts(kind, pool, now);
        let stuck: Vec<u64> = pool
            .workers
            .iter()
            .filter(
                |w| matches!(w.phase, Phase::Starting { since } if now.saturating_sub(since) >= config.start_timeout),
            )
            .map(|w| w.id)
            .collect();
        cancel.extend(stuck.iter().map(|&id| (kind, id)));
        let starting = pool.starting() - stuck.len() as u32;
        let current = pool.ready() + starting;
        let need_now = need_now(state, kind, pool, obs, &load, current);
        let need_forecast = state.forecast_need.get(&kind).copied().unwrap_or(0.0);
        let settled = starting == 0 && pool.draining() == 0;
        if settled && state.last_target.get(&kind).is_some_and(|&t| t != current) {
            // Not our doing: what the pool is now is the new starting point, not a
            // deviation to undo, and a shrink needs a whole window from here.
            state.history.remove(&kind);
            state.watching_since.insert(kind, now);
        }
        let since = *state.watching_since.entry(kind).or_insert(now);
        let headroom = 1.0 - config.scale_down_headroom;
        let mut up = need_now.ceil().max(need_forecast.ceil()) as u32;
        if up > current {
            // Replicas there now that will still be clearing the backlog that builds while
            // the new ones start take no share of the arrivals.
            let clogged = clogged_by_startup(state, kind, pool, &load);
            if clogged > 0 {
                up = up.max(clogged + arrivals_need(state, kind, pool, &load).ceil() as u32);
            }
        }
        let keep = ((need_now / headroom).ceil().max((need_forecast / headroom).ceil()) as u32).max(up);

        let (replicas, reason) = if current < limits.min {
            (up.clamp(limits.min, limits.max), Reason::BelowMin)
        } else if current > limits.max {
            (limits.max, Reason::AboveMax)
        } else if !settled {
            (current, Reason::Pending)
        } else if idle {
            state.history.remove(&kind);
            (
                limits.min,
                if current > limits.min {
                    Reason::Idle
                } else {
                    Reason::Hold
                },
            )
        } else if up > current {
            let reason = if need_forecast.ceil() as u32 >= up && need_now.ceil() < need_forecast.ceil() {
                Reason::Forecast
            } else if latency_above_target(&config, obs, pool) {
                Reason::Latency
            } else {
                Reason::Load
            };
            (up.min(limits.max), reason)
        } else {
            let history = state.history.entry(kind).or_default();
            history.push_back((now, keep.clamp(limits.min, limits.max)));
            while history
                .front()
                .is_some_and(|&(t, _)| now.saturating_sub(t) > config.stabilization)
            {
                history.pop_front();
            }
            let held = history.iter().map(|&(_, n)| n).max().unwrap_or(current);
            if held < current && now.saturating_sub(since) >= config.stabilization {
                (held, Reason::Stabilized)
            } else {
                (current, Reason::Hold)
            }
        };
        if replicas > current {
            // What grows is recorded too, so that it cannot shrink back within the window.
            let history = state.history.entry(kind).or_default();
            history.push_back((now, replicas));
        }
        let (est_ttft, est_itl) = estimate(state, kind, pool, &load, replicas.max(1));
        targets.insert(
            kind,
            Target {
                replicas,
                current,
                reason,
                need_now,
                need_forecast,
                est_ttft,
                est_itl,
                drain: Vec::new(),
            },
        );
    }
    fit_budget(&config, obs, &mut targets);
    for (kind, target) in &targets {
        state.last_target.insert(*kind, target.replicas);
    }
    for (kind, target) in targets.iter_mut() {
        if target.replicas < target.current {
            target.drain = pick_drains(obs.pool(*kind).unwrap_or(&empty), target.current - target.replicas);
        }
    }
    Decision {
        now,
        targets,
        cancel,
        predicted_rate: state.rate.predict().unwrap_or(0.0),
        predicted_isl: isl,
        predicted_osl: osl,
    }
}

/// Every `slow_interval`: feeds the window's rate and lengths to the predictors and sizes
/// each pool for their forecast.
fn slow_loop(state: &mut PlannerState, obs: &Observation, now: Duration) {
    let w = &mut state.window;
    w.span += obs.window;
    w.arrivals += obs.arrivals;
    w.prompt_tokens += obs.prompt_tokens;
    w.completions += obs.completions;
    w.output_tokens += obs.output_tokens;
    let due = state
        .last_slow
        .is_none_or(|t| now.saturating_sub(t) >= state.config.slow_interval);
    if !due || w.span.is_zero() {
        return;
    }
    let w = std::mem::take(&mut state.window);
    state.last_slow = Some(now);
    state.rate.observe(w.arrivals as f64 / w.span.as_secs_f64());
    if w.arrivals > 0 {
        state.isl.observe(w.prompt_tokens as f64 / w.arrivals as f64);
    }
    if w.completions > 0 {
        state.osl.observe(w.output_tokens as f64 / w.completions as f64);
    }
    let rate = state.rate.predict().unwrap_or(0.0);
    let isl = state.isl.predict().unwrap_or(DEFAULT_ISL).max(1.0);
    let osl = state.osl.predict().unwrap_or(DEFAULT_OSL).max(1.0);
    let kinds: Vec<PoolKind> = state.config.pools.keys().copied().collect();
    for kind in kinds {
        let need = need_for(&state.config, &state.model, kind, rate, isl, osl);
        state.forecast_need.insert(kind, need);
    }
}

/// Replicas (fractional) pool `kind` needs for `rate` requests a second of `isl` prompt and
/// `osl` output tokens: the slow loop's sizing, for static fleets sized the same way.
pub fn need_for(config: &PlannerConfig, model: &CapacityModel, kind: PoolKind, rate: f64, isl: f64, osl: f64) -> f64 {
    let prefill = || prefill_need(config, model, rate * isl, isl);
    let decode = || {
        let (per_replica, itl) = decode_slots(config, model, isl, osl);
        // Little's law: each request spends `osl` ITLs decoding.
        let sequences = rate * osl * itl.as_secs_f64();
        sequences / (per_replica * config.target_utilization)
    };
    match kind {
        PoolKind::Prefill => prefill(),
        PoolKind::Decode => decode(),
        PoolKind::Aggregated => prefill() + decode(),
    }
}

/// Replicas that compute `prompt_rate` prompt tokens a second of `isl`-token prompts at the
/// utilisation the TTFT target allows.
fn prefill_need(config: &PlannerConfig, model: &CapacityModel, prompt_rate: f64, isl: f64) -> f64 {
    let rho = model.prefill_utilization(isl, config.sla.ttft, config.target_utilization);
    prompt_rate / (model.prefill_rate(isl) * rho)
}

/// Sequences one replica decodes within the ITL target at this context, and its ITL there.
fn decode_slots(config: &PlannerConfig, model: &CapacityModel, isl: f64, osl: f64) -> (f64, Duration) {
    let context = isl + osl / 2.0;
    let slots = model.decode_concurrency(context, config.sla.itl);
    (slots, model.itl(context, slots))
}

/// The fast loop: fractional replicas the pool's load needs now.
fn need_now(
    state: &PlannerState,
    kind: PoolKind,
    pool: &PoolObservation,
    obs: &Observation,
    load: &Load,
    current: u32,
) -> f64 {
    let c = &state.config;
    let mut need = arrivals_need(state, kind, pool, load);
    if matches!(kind, PoolKind::Prefill | PoolKind::Aggregated) {
        // A backlog the pool cannot clear within what the target leaves after a lone prefill
        // asks for one replica more. Not for as many as would clear it: what is queued is
        // queued on the replicas there now, and only new arrivals reach a new one.
        let per_replica = pool.queued_prefill_tokens() as f64 / f64::from(current.max(1));
        if per_replica / state.model.prefill_rate(load.isl) > prefill_slack(state, load) {
            need = need.max(f64::from(current) + 1.0);
        }
    }
    if latency_above_target(c, obs, pool) {
        // The model says enough, the clients say otherwise: one more than now.
        need.max(f64::from(current) + 1.0)
    } else {
        need
    }
}

/// Fractional replicas for what arrives and what decodes now, leaving out what is queued.
fn arrivals_need(state: &PlannerState, kind: PoolKind, pool: &PoolObservation, load: &Load) -> f64 {
    let c = &state.config;
    // Arriving prompt tokens must not outgrow the utilisation the TTFT target allows, at the
    // window's mean nor at its busiest second taken as if it went on: a step in load is
    // sized on the first tick that sees it, not on the mean of a window it only ends.
    let prefill = || {
        prefill_need(c, &state.model, load.prompt_rate, load.isl).max(prefill_need(
            c,
            &state.model,
            load.peak_prompt_tokens,
            load.isl,
        ))
    };
    let decode = || {
        let (slots, _) = decode_slots(c, &state.model, load.isl, load.osl);
        let sequences = pool.in_flight() as f64 / (slots * c.target_utilization);
        let kv = f64::from(pool.ready()) * pool.kv_usage() / c.max_kv_usage;
        sequences.max(kv)
    };
    match kind {
        PoolKind::Prefill => prefill(),
        PoolKind::Decode => decode(),
        PoolKind::Aggregated => prefill() + decode(),
    }
}

/// Seconds of queueing the TTFT target leaves after a lone prefill (at least a tenth of it).
fn prefill_slack(state: &PlannerState, load: &Load) -> f64 {
    let ttft = state.config.sla.ttft.as_secs_f64();
    (ttft - state.model.lone_ttft(load.isl).as_secs_f64()).max(0.1 * ttft)
}

/// Ready replicas that will still hold more queued prompt work than the TTFT target leaves
/// time for once a replica asked for now has started (as long as starts have taken so far),
/// the arrivals spread evenly over the ready replicas until then. New replicas must carry
/// the arrivals without them. Zero until a start has been seen to take time.
fn clogged_by_startup(state: &PlannerState, kind: PoolKind, pool: &PoolObservation, load: &Load) -> u32 {
    if kind == PoolKind::Decode {
        return 0;
    }
    let Some(startup) = state.startup.filter(|s| !s.is_zero()) else {
        return 0;
    };
    let ready = pool.ready();
    if ready == 0 {
        return 0;
    }
    let per_replica = state.model.prefill_rate(load.isl);
    let growth = (load.prompt_rate / f64::from(ready) - per_replica).max(0.0) * startup.as_secs_f64();
    let slack = prefill_slack(state, load);
    let clogged = pool
        .workers
        .iter()
        .filter(|w| w.is_ready())
        .filter(|w| (w.queued_prefill_tokens as f64 + growth) / per_replica > slack)
        .count();
    clogged as u32
}

/// Clients saw latency above target while the pool still has work queued (latency of
/// requests already served, with nothing left, is not a reason to grow).
fn latency_above_target(c: &PlannerConfig, obs: &Observation, pool: &PoolObservation) -> bool {
    let queued = pool.queued_prefill_tokens() > 0 || pool.workers.iter().any(|w| w.queue_depth > 0);
    let ttft = obs.ttft.max(obs.oldest_waiting).is_some_and(|t| t > c.sla.ttft);
    let itl = obs.itl.is_some_and(|t| t > c.sla.itl);
    (ttft && queued) || (itl && pool.in_flight() > 0)
}

/// TTFT and ITL the capacity model expects with `replicas` serving the load now.
fn estimate(
    state: &PlannerState,
    kind: PoolKind,
    pool: &PoolObservation,
    load: &Load,
    replicas: u32,
) -> (Duration, Duration) {
    let n = f64::from(replicas);
    let lone = state.model.lone_ttft(load.isl);
    let queue = pool.queued_prefill_tokens() as f64 / n / state.model.prefill_rate(load.isl);
    let ttft = lone + Duration::from_secs_f64(queue.min(1e6));
    let context = load.isl + load.osl / 2.0;
    let itl = state.model.itl(context, (pool.in_flight() as f64 / n).max(1.0));
    match kind {
        PoolKind::Prefill => (ttft, Duration::ZERO),
        PoolKind::Decode => (Duration::ZERO, itl),
        PoolKind::Aggregated => (ttft, itl),
    }
}

/// Trims growth to the budget. Spend counts every replica that runs: ready, starting and
/// draining (a replica shrunk away keeps costing until it has drained). The most urgent
/// pool, by need over size, is served first.
fn fit_budget(config: &PlannerConfig, obs: &Observation, targets: &mut BTreeMap<PoolKind, Target>) {
    let Some(budget) = config.budget else {
        return;
    };
    let empty = PoolObservation::default();
    let mut spent = 0.0;
    for (&kind, target) in targets.iter() {
        let pool = obs.pool(kind).unwrap_or(&empty);
        spent += config.pools[&kind].cost * f64::from(target.current + pool.draining());
    }
    let mut growing: Vec<(PoolKind, f64)> = targets
        .iter()
        .filter(|(_, t)| t.replicas > t.current)
        .map(|(&k, t)| (k, t.need_now.max(t.need_forecast) / f64::from(t.current.max(1))))
        .collect();
    growing.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (kind, _) in growing {
        let cost = config.pools[&kind].cost;
        let target = targets.get_mut(&kind).expect("growing pools have targets");
        let wanted = target.replicas;
        let room = if cost > 0.0 {
            ((budget - spent) / cost + 1e-9).floor().max(0.0) as u32
        } else {
            u32::MAX
        };
        let granted = (wanted - target.current).min(room);
        target.replicas = target.current + granted;
        spent += cost * f64::from(granted);
        if granted < wanted - target.current {
            target.reason = Reason::Budget { wanted };
        }
    }
}

/// The `count` replicas to drain: those still starting first (nothing lost), then the
/// ready ones with the least in flight (then the least queued, then the newest).
fn pick_drains(pool: &PoolObservation, count: u32) -> Vec<u64> {
    let mut counted: Vec<_> = pool.workers.iter().filter(|w| w.is_counted()).collect();
    counted.sort_by_key(|w| {
        (
            w.is_ready(),
            w.in_flight,
            w.queued_prefill_tokens,
            std::cmp::Reverse(w.id),
        )
    });
    counted.into_iter().take(count as usize).map(|w| w.id).collect()
}
