//! What the planner process observes: the frontend's `/metrics` (arrivals, tokens, TTFT and
//! ITL where clients see them) as the change since the last scrape, and each worker's own
//! `/metrics` (its queued prefill, sequences and KV blocks).

use std::collections::BTreeMap;
use std::time::Duration;

use turbine_planner::{Observation, WorkerObservation};

/// One sample: its labels and value.
type Samples = Vec<(BTreeMap<String, String>, f64)>;

/// Prometheus text, by metric name. Lines it cannot read are skipped: a scrape is advice.
pub fn parse(text: &str) -> BTreeMap<String, Samples> {
    let mut out: BTreeMap<String, Samples> = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some((s, v)) => (s, v),
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, labels(rest.trim_end_matches('}'))),
            None => (series, BTreeMap::new()),
        };
        out.entry(name.to_owned()).or_default().push((labels, value));
    }
    out
}

fn labels(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let Some(end) = after.find('"') else {
            break;
        };
        out.insert(key.trim_start_matches(',').trim().to_owned(), after[..end].to_owned());
        rest = &after[end + 1..];
    }
    out
}

fn sum(metrics: &BTreeMap<String, Samples>, name: &str) -> f64 {
    metrics.get(name).map_or(0.0, |s| s.iter().map(|(_, v)| v).sum())
}

/// A histogram's cumulative counts by upper bound, summed over its other labels.
fn buckets(metrics: &BTreeMap<String, Samples>, name: &str) -> Vec<(f64, f64)> {
    let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for (labels, value) in metrics.get(&format!("{name}_bucket")).into_iter().flatten() {
        let le = match labels.get("le").map(String::as_str) {
            Some("+Inf") => f64::INFINITY,
            Some(x) => match x.parse() {
                Ok(v) => v,
                Err(_) => continue,
            },
            None => continue,
        };
        let slot = by_le.entry(le.to_bits()).or_insert((le, 0.0));
        slot.1 += value;
    }
    let mut v: Vec<(f64, f64)> = by_le.into_values().collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// The frontend's counters at one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FrontendCounters {
    completed: f64,
    in_flight: f64,
    prompt_tokens: f64,
    output_tokens: f64,
    ttft: Vec<(f64, f64)>,
    itl: Vec<(f64, f64)>,
}

impl FrontendCounters {
    pub fn read(text: &str) -> Self {
        let m = parse(text);
        Self {
            completed: sum(&m, "turbine_frontend_requests_total"),
            in_flight: sum(&m, "turbine_frontend_inflight_requests"),
            prompt_tokens: sum(&m, "turbine_frontend_input_tokens_total"),
            output_tokens: sum(&m, "turbine_frontend_output_tokens_total"),
            ttft: buckets(&m, "turbine_frontend_time_to_first_token_seconds"),
            itl: buckets(&m, "turbine_frontend_inter_token_latency_seconds"),
        }
    }

    /// What changed from `before` over `window`: arrivals are requests completed plus the
    /// growth of those in flight, so that load is counted when it arrives, not when it ends.
    pub fn since(&self, before: &FrontendCounters, window: Duration) -> Observation {
        let completed = (self.completed - before.completed).max(0.0);
        let arrivals = (completed + self.in_flight - before.in_flight).max(0.0);
        let prompt_tokens = (self.prompt_tokens - before.prompt_tokens).max(0.0) as u64;
        Observation {
            window,
            arrivals: arrivals as u64,
            prompt_tokens,
            // A scrape cannot see inside the window: its mean stands for its busiest second.
            peak_prompt_tokens_per_s: 0,
            completions: completed as u64,
            output_tokens: (self.output_tokens - before.output_tokens).max(0.0) as u64,
            ttft: quantile(&self.ttft, &before.ttft, 0.9),
            oldest_waiting: None,
            itl: quantile(&self.itl, &before.itl, 0.9),
            in_flight: self.in_flight.max(0.0) as u64,
            pools: BTreeMap::new(),
        }
    }
}

/// The `q` quantile of what a histogram counted between two scrapes: the upper bound of the
/// first bucket that reaches it (an overestimate by at most one bucket).
fn quantile(now: &[(f64, f64)], before: &[(f64, f64)], q: f64) -> Option<Duration> {
    let earlier = |le: f64| before.iter().find(|(b, _)| *b == le).map_or(0.0, |(_, c)| *c);
    let delta: Vec<(f64, f64)> = now.iter().map(|&(le, c)| (le, (c - earlier(le)).max(0.0))).collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let (le, _) = delta.iter().find(|(_, c)| *c >= q * total)?;
    // Past the last finite bucket: say the last finite bound, the most the histogram knows.
    let le = if le.is_finite() {
        *le
    } else {
        delta.iter().rev().find(|(b, _)| b.is_finite()).map_or(0.0, |(b, _)| *b)
    };
    Some(Duration::from_secs_f64(le.max(0.0)))
}

/// Fills `w`'s load from its worker's `/metrics`.
pub fn worker_load(text: &str, w: &mut WorkerObservation) {
    let m = parse(text);
    let state = |name: &str, state: &str| -> f64 {
        m.get(name)
            .into_iter()
            .flatten()
            .filter(|(l, _)| l.get("state").map(String::as_str) == Some(state))
            .map(|(_, v)| v)
            .sum()
    };
    let running = state("turbine_worker_sequences", "running");
    let waiting = state("turbine_worker_sequences", "waiting");
    let in_use = state("turbine_worker_kv_blocks", "in_use");
    let free = state("turbine_worker_kv_blocks", "free");
    w.in_flight = (running + waiting) as u32;
    w.queue_depth = waiting as u32;
    w.queued_prefill_tokens = sum(&m, "turbine_worker_queued_prefill_tokens") as u64;
    w.kv_usage = if in_use + free > 0.0 {
        in_use / (in_use + free)
    } else {
        0.0
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRONTEND: &str = r#"# HELP turbine_frontend_requests_total Requests.
# TYPE turbine_frontend_requests_total counter
turbine_frontend_requests_total{endpoint="chat",model="m",status="200"} 10
turbine_frontend_requests_total{endpoint="completions",model="m",status="200"} 5
turbine_frontend_inflight_requests{model="m"} 3
turbine_frontend_input_tokens_total{model="m"} 15000
turbine_frontend_output_tokens_total{model="m"} 640
turbine_frontend_time_to_first_token_seconds_bucket{model="m",le="0.1"} 2
turbine_frontend_time_to_first_token_seconds_bucket{model="m",le="1"} 12
turbine_frontend_time_to_first_token_seconds_bucket{model="m",le="+Inf"} 15
"#;

    #[test]
    fn the_change_between_two_scrapes_is_the_window_s_load() {
        let before = FrontendCounters::read("");
        let now = FrontendCounters::read(FRONTEND);
        let o = now.since(&before, Duration::from_secs(5));
        // 15 completed and 3 more in flight than before: 18 arrived.
        assert_eq!((o.arrivals, o.completions, o.in_flight), (18, 15, 3));
        assert_eq!((o.prompt_tokens, o.output_tokens), (15000, 640));
        // 90% of 15 is 13.5: past the 1 s bucket, reported as the last finite bound.
        assert_eq!(o.ttft, Some(Duration::from_secs(1)));
        assert_eq!(now.since(&now, Duration::from_secs(5)).ttft, None);
    }

    #[test]
    fn a_worker_s_load_comes_from_its_gauges() {
        let text = r#"turbine_worker_sequences{worker="a",state="running"} 6
turbine_worker_sequences{worker="a",state="waiting"} 2
turbine_worker_kv_blocks{worker="a",state="in_use"} 300
turbine_worker_kv_blocks{worker="a",state="free"} 100
turbine_worker_queued_prefill_tokens{worker="a"} 4096
garbage line
"#;
        let mut w = WorkerObservation {
            id: 1,
            phase: turbine_planner::Phase::Ready,
            in_flight: 0,
            queued_prefill_tokens: 0,
            kv_usage: 0.0,
            queue_depth: 0,
        };
        worker_load(text, &mut w);
        assert_eq!((w.in_flight, w.queue_depth, w.queued_prefill_tokens), (8, 2, 4096));
        assert_eq!(w.kv_usage, 0.75);
    }
}
