//! A discrete-event simulation of a fleet: a trace's requests arrive, a router sends each
//! to the least loaded ready replica, replicas step in simulated time, and a controller
//! (the planner, or a static size) starts and drains replicas, with a start-up delay.
//! Scale-down drains as in production: the replica takes nothing new, finishes what it has,
//! and what is left at the drain deadline migrates to another replica with the tokens it
//! already produced.
//!
//! What a replica computes is behind [`SimWorker`]: the binary plugs the mocker's
//! scheduler in, tests a toy.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::config::PoolKind;
use crate::observe::{Observation, Phase, PoolObservation, WorkerObservation};
use crate::policy::{decide, Decision, PlannerState};

/// One request of a trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimRequest {
    pub arrival: Duration,
    pub isl: u32,
    pub osl: u32,
}

/// A replica's load, as it would report it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SimLoad {
    pub in_flight: u32,
    pub queued_prefill_tokens: u64,
    pub kv_usage: f64,
    pub queue_depth: u32,
}

/// One simulated replica: an engine stepping in simulated time.
pub trait SimWorker {
    /// Takes request `id` of `isl` prompt tokens, of which `generated` were produced
    /// elsewhere (migrated), to produce `osl - generated` more.
    fn add(&mut self, id: u64, isl: u32, osl: u32, generated: u32);
    /// Plans the next step; its duration, or `None` with nothing to run.
    fn step(&mut self) -> Option<Duration>;
    /// Completes the step planned, telling `token` of each token produced (request id,
    /// whether it was the request's last).
    fn complete(&mut self, token: &mut dyn FnMut(u64, bool));
    fn load(&self) -> SimLoad;
    /// Gives up every request it holds (a drain deadline): ids only, the fleet knows the rest.
    fn take_all(&mut self) -> Vec<u64>;
}

/// Who sizes the fleet.
pub enum Controller {
    /// `n` replicas from the start, never changed.
    Static(u32),
    /// The planner, ticking every `config.fast_interval`.
    Planner(Box<PlannerState>),
}

/// The simulation's settings.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// From a replica's start to its first request.
    pub startup: Duration,
    /// A draining replica's requests migrate after this long.
    pub drain_deadline: Duration,
    pub ttft_target: Duration,
    pub itl_target: Duration,
    /// Replicas ready at time zero under the planner.
    pub initial: u32,
    /// Attainment is also reported per window of this length.
    pub window: Duration,
    /// Keep the fleet (and the planner) running at least this long, past the last request.
    pub run_until: Duration,
}

/// How a run went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SimReport {
    pub requests: usize,
    /// Requests whose TTFT and mean ITL were both within target, as a share.
    pub attainment: f64,
    pub ttft_p50: Duration,
    pub ttft_p90: Duration,
    pub ttft_p99: Duration,
    /// Replica-seconds paid for, starting and draining included.
    pub worker_seconds: f64,
    pub duration: Duration,
    pub peak_replicas: u32,
    pub scale_ups: u32,
    pub scale_downs: u32,
    pub migrated: u32,
    /// Requests that never finished (none, unless the fleet is left with no replica).
    pub unfinished: usize,
    /// Requests that finished with fewer tokens than they asked for (a cut stream).
    pub truncated: usize,
    /// (window start, share of the requests that arrived in it within SLO).
    pub windows: Vec<(Duration, f64)>,
    /// (time, replicas ready or starting) after every change.
    pub sizes: Vec<(Duration, u32)>,
    /// Every planner decision that changed something.
    pub decisions: Vec<Decision>,
}

impl SimReport {
    /// Mean replicas over the run.
    pub fn mean_replicas(&self) -> f64 {
        let secs = self.duration.as_secs_f64();
        if secs > 0.0 {
            self.worker_seconds / secs
        } else {
            0.0
        }
    }
}

enum State {
    Starting { since: Duration, ready_at: Duration },
    Ready,
    Draining { since: Duration, deadline: Duration },
    Stopped,
}

struct Replica<W> {
    id: u64,
    worker: W,
    state: State,
    /// The step running, ending then.
    busy_until: Option<Duration>,
}

#[derive(Default, Clone)]
struct Progress {
    first: Option<Duration>,
    last: Duration,
    tokens: u32,
    done: bool,
}

/// Runs `trace` (sorted by arrival) on replicas made by `make`, sized by `controller`.
/// The pool simulated is an aggregated one.
pub fn simulate<W: SimWorker>(
    trace: &[SimRequest],
    config: &SimConfig,
    mut controller: Controller,
    mut make: impl FnMut() -> W,
) -> SimReport {
    let mut fleet: Vec<Replica<W>> = Vec::new();
    let mut next_id = 0u64;
    let mut spawn = |fleet: &mut Vec<Replica<W>>, now: Duration, ready: bool| {
        next_id += 1;
        fleet.push(Replica {
            id: next_id,
            worker: make(),
            state: if ready {
                State::Ready
            } else {
                State::Starting {
                    since: now,
                    ready_at: now + config.startup,
                }
            },
            busy_until: None,
        });
    };
    let initial = match &controller {
        Controller::Static(n) => *n,
        Controller::Planner(_) => config.initial,
    };
    for _ in 0..initial {
        spawn(&mut fleet, Duration::ZERO, true);
    }
    let tick = match &controller {
        Controller::Static(_) => None,
        Controller::Planner(p) => Some(p.config().fast_interval),
    };
    let mut report = SimReport::default();
    let mut progress = vec![Progress::default(); trace.len()];
    // Requests no replica could take yet (none ready), and migrated ones, with tokens done.
    let mut unplaced: VecDeque<(u64, u32)> = VecDeque::new();
    let mut next_arrival = 0usize;
    let mut next_tick = tick.map(|t| t.min(Duration::from_secs(1)));
    let mut window = WindowCounts::default();
    let mut worker_seconds = 0.0;
    let mut now = Duration::ZERO;
    let end_of_trace = trace.last().map_or(Duration::ZERO, |r| r.arrival);
    report.sizes.push((now, initial));
    loop {
        // Everything that has to happen at `now` happens before time moves on.
        place(&mut fleet, &mut unplaced, trace);
        for r in fleet.iter_mut() {
            if r.busy_until.is_none() && !matches!(r.state, State::Stopped | State::Starting { .. }) {
                r.busy_until = r.worker.step().map(|d| now + d.max(Duration::from_nanos(1)));
            }
        }
        let finished = next_arrival >= trace.len() && unplaced.is_empty() && progress.iter().all(|p| p.done);
        if finished && now >= end_of_trace.max(config.run_until) {
            break;
        }
        let mut next = Duration::MAX;
        if let Some(r) = trace.get(next_arrival) {
            next = next.min(r.arrival);
        }
        for r in &fleet {
            if let Some(t) = r.busy_until {
                next = next.min(t);
            }
            match r.state {
                State::Starting { ready_at, .. } => next = next.min(ready_at),
                State::Draining { deadline, .. } => next = next.min(deadline),
                _ => {}
            }
        }
        if let Some(t) = next_tick {
            // Ticks stop once the trace is over, the fleet is quiet and the run is long enough.
            if !finished || t <= config.run_until {
                next = next.min(t);
            }
        }
        if next == Duration::MAX {
            // Nothing can make progress: requests with nowhere to go.
            break;
        }
        let alive = fleet.iter().filter(|r| !matches!(r.state, State::Stopped)).count();
        worker_seconds += alive as f64 * (next - now).as_secs_f64();
        now = next;

        while trace.get(next_arrival).is_some_and(|r| r.arrival <= now) {
            let r = &trace[next_arrival];
            window.arrivals += 1;
            window.prompt_tokens += u64::from(r.isl);
            window.add_to_second(r.arrival, u64::from(r.isl));
            unplaced.push_back((next_arrival as u64, 0));
            next_arrival += 1;
        }
        for r in fleet.iter_mut() {
            match r.state {
                State::Starting { ready_at, .. } if ready_at <= now => r.state = State::Ready,
                _ => {}
            }
            if r.busy_until.is_some_and(|t| t <= now) {
                r.busy_until = None;
                r.worker.complete(&mut |id, last| {
                    let p = &mut progress[id as usize];
                    if p.first.is_none() {
                        p.first = Some(now);
                        window.ttfts.push(now - trace[id as usize].arrival);
                    }
                    p.tokens += 1;
                    p.last = now;
                    if last {
                        p.done = true;
                        window.completions += 1;
                        window.output_tokens += u64::from(p.tokens);
                        if p.tokens > 1 {
                            let first = p.first.unwrap_or(now);
                            window.itls.push((now - first) / (p.tokens - 1));
                        }
                    }
                });
            }
            if let State::Draining { deadline, .. } = r.state {
                if r.busy_until.is_none() && r.worker.load().in_flight == 0 {
                    r.state = State::Stopped;
                } else if deadline <= now {
                    // Migrate, never abort: the request goes on elsewhere from where it was.
                    for id in r.worker.take_all() {
                        report.migrated += 1;
                        unplaced.push_back((id, progress[id as usize].tokens));
                    }
                    r.busy_until = None;
                    r.state = State::Stopped;
                }
            }
        }
        if next_tick.is_some_and(|t| t <= now) {
            let period = tick.unwrap_or(Duration::from_secs(1));
            if let Controller::Planner(state) = &mut controller {
                let obs = observe(&fleet, &window, &unplaced, trace, &progress, period, now);
                let decision = decide(state, &obs, now);
                if apply(&decision, &mut fleet, &mut spawn, now, config, &mut report) {
                    report.decisions.push(decision);
                }
            }
            window = WindowCounts::default();
            next_tick = Some(now + period);
        }
        let size = fleet
            .iter()
            .filter(|r| matches!(r.state, State::Ready | State::Starting { .. }))
            .count() as u32;
        if report.sizes.last().is_none_or(|&(_, n)| n != size) {
            report.sizes.push((now, size));
        }
        report.peak_replicas = report.peak_replicas.max(size);
    }
    report.duration = now;
    report.worker_seconds = worker_seconds;
    summarize(&mut report, trace, &progress, config);
    report
}

/// Hands queued requests to the least loaded ready replicas.
fn place<W: SimWorker>(fleet: &mut [Replica<W>], unplaced: &mut VecDeque<(u64, u32)>, trace: &[SimRequest]) {
    while let Some(&(id, generated)) = unplaced.front() {
        let best = fleet
            .iter_mut()
            .filter(|r| matches!(r.state, State::Ready))
            .min_by_key(|r| {
                let l = r.worker.load();
                (l.queued_prefill_tokens, l.in_flight, r.id)
            });
        let Some(replica) = best else {
            return;
        };
        unplaced.pop_front();
        let r = &trace[id as usize];
        replica.worker.add(id, r.isl, r.osl.max(1), generated);
    }
}

#[derive(Default)]
struct WindowCounts {
    arrivals: u64,
    prompt_tokens: u64,
    /// Prompt tokens of the second being counted, and the most of any second so far.
    second: (u64, u64),
    peak_second: u64,
    completions: u64,
    output_tokens: u64,
    ttfts: Vec<Duration>,
    itls: Vec<Duration>,
}

impl WindowCounts {
    fn add_to_second(&mut self, at: Duration, tokens: u64) {
        let s = at.as_secs();
        if self.second.0 != s {
            self.second = (s, 0);
        }
        self.second.1 += tokens;
        self.peak_second = self.peak_second.max(self.second.1);
    }
}

fn observe<W: SimWorker>(
    fleet: &[Replica<W>],
    window: &WindowCounts,
    unplaced: &VecDeque<(u64, u32)>,
    trace: &[SimRequest],
    progress: &[Progress],
    period: Duration,
    now: Duration,
) -> Observation {
    let mut workers = Vec::new();
    for r in fleet {
        let phase = match r.state {
            State::Starting { since, .. } => Phase::Starting { since },
            State::Ready => Phase::Ready,
            State::Draining { since, .. } => Phase::Draining { since },
            State::Stopped => continue,
        };
        let l = r.worker.load();
        workers.push(WorkerObservation {
            id: r.id,
            phase,
            in_flight: l.in_flight,
            queued_prefill_tokens: l.queued_prefill_tokens,
            kv_usage: l.kv_usage,
            queue_depth: l.queue_depth,
        });
    }
    let in_flight = unplaced.len() as u64 + workers.iter().map(|w| u64::from(w.in_flight)).sum::<u64>();
    // The frontend knows when each request arrived: the oldest without a first token.
    let oldest_waiting = progress
        .iter()
        .zip(trace)
        .filter(|(p, r)| p.first.is_none() && r.arrival <= now)
        .map(|(_, r)| now - r.arrival)
        .max();
    Observation {
        window: period,
        arrivals: window.arrivals,
        prompt_tokens: window.prompt_tokens,
        peak_prompt_tokens_per_s: window.peak_second,
        completions: window.completions,
        output_tokens: window.output_tokens,
        ttft: percentile(&window.ttfts, 0.9),
        oldest_waiting,
        itl: percentile(&window.itls, 0.9),
        in_flight,
        pools: BTreeMap::from([(PoolKind::Aggregated, PoolObservation { workers })]),
    }
}

/// Carries a decision out as the virtual connector does: starts replicas (ready after the
/// start-up time), drains those named, stops stuck starts. True if anything changed.
fn apply<W: SimWorker>(
    decision: &Decision,
    fleet: &mut Vec<Replica<W>>,
    spawn: &mut impl FnMut(&mut Vec<Replica<W>>, Duration, bool),
    now: Duration,
    config: &SimConfig,
    report: &mut SimReport,
) -> bool {
    let mut changed = false;
    for &(_, id) in &decision.cancel {
        if let Some(r) = fleet.iter_mut().find(|r| r.id == id) {
            r.state = State::Stopped;
            changed = true;
        }
    }
    for target in decision.targets.values() {
        if target.replicas > target.current {
            for _ in target.current..target.replicas {
                spawn(fleet, now, false);
            }
            report.scale_ups += 1;
            changed = true;
        }
        for &id in &target.drain {
            if let Some(r) = fleet.iter_mut().find(|r| r.id == id) {
                r.state = State::Draining {
                    since: now,
                    deadline: now + config.drain_deadline,
                };
                changed = true;
            }
        }
        if !target.drain.is_empty() {
            report.scale_downs += 1;
        }
    }
    changed
}

fn summarize(report: &mut SimReport, trace: &[SimRequest], progress: &[Progress], config: &SimConfig) {
    let mut ttfts = Vec::with_capacity(trace.len());
    let mut good = 0usize;
    let mut windows: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
    let w = config.window.as_secs_f64().max(1e-9);
    for (r, p) in trace.iter().zip(progress) {
        let ok = match p.first {
            Some(first) if p.done => {
                report.truncated += usize::from(p.tokens < r.osl.max(1));
                let ttft = first - r.arrival;
                ttfts.push(ttft);
                let itl = if p.tokens > 1 {
                    (p.last - first) / (p.tokens - 1)
                } else {
                    Duration::ZERO
                };
                ttft <= config.ttft_target && itl <= config.itl_target
            }
            _ => {
                report.unfinished += 1;
                false
            }
        };
        good += usize::from(ok);
        let slot = windows.entry((r.arrival.as_secs_f64() / w) as u64).or_default();
        slot.0 += 1;
        slot.1 += usize::from(ok);
    }
    report.requests = trace.len();
    report.attainment = if trace.is_empty() {
        1.0
    } else {
        good as f64 / trace.len() as f64
    };
    ttfts.sort_unstable();
    report.ttft_p50 = percentile_sorted(&ttfts, 0.5);
    report.ttft_p90 = percentile_sorted(&ttfts, 0.9);
    report.ttft_p99 = percentile_sorted(&ttfts, 0.99);
    report.windows = windows
        .into_iter()
        .map(|(k, (n, ok))| (Duration::from_secs_f64(k as f64 * w), ok as f64 / n as f64))
        .collect();
}

fn percentile(values: &[Duration], q: f64) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    Some(percentile_sorted(&v, q))
}

fn percentile_sorted(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}
