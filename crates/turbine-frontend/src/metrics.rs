//! The frontend's Prometheus metrics, all under `turbine_frontend_`, in a registry of its own
//! so that several frontends in one process (tests) never share counts.
//!
//! Labels are bounded: `model` is only ever a served model's name (a request for an unknown
//! model is counted under `model=""`), so a client cannot grow the label space.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Seconds, for whole requests and time to first token: from a cache hit on a tiny prompt
/// (milliseconds) to long generations on a loaded fleet (minutes).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// Seconds between tokens: sub-millisecond (mocker at high speedup) to seconds (a stalled batch).
const ITL_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Seconds for one routing decision: microseconds normally.
const DECISION_BUCKETS: &[f64] = &[
    0.000_005, 0.00001, 0.000_025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05,
];

#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    inflight: IntGaugeVec,
    duration: HistogramVec,
    ttft: HistogramVec,
    itl: HistogramVec,
    input_tokens: IntCounterVec,
    output_tokens: IntCounterVec,
    cached_tokens: IntCounterVec,
    disconnects: IntCounterVec,
    pub(crate) decision: Histogram,
    pub(crate) migrations: IntCounterVec,
    /// Where each request of a disaggregated model was prefilled, and why.
    pub(crate) disagg: IntCounterVec,
    pub(crate) kv_fallback: prometheus::IntCounter,
    /// Prompt blocks cached on the worker each `kv` decision chose, by tier.
    pub(crate) kv_matched_blocks: IntCounterVec,
}

/// Only fails on a duplicate or malformed name, which is a programming error caught by the
/// tests that render the metrics.
fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    if let Err(e) = registry.register(Box::new(metric.clone())) {
        tracing::error!(error = %e, "metric not registered");
    }
    metric
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let opts = Opts::new(format!("turbine_frontend_{name}"), help);
    register(
        registry,
        IntCounterVec::new(opts, labels).unwrap_or_else(|e| invalid(name, e)),
    )
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    let opts = HistogramOpts::new(format!("turbine_frontend_{name}"), help).buckets(buckets.to_vec());
    register(
        registry,
        HistogramVec::new(opts, labels).unwrap_or_else(|e| invalid(name, e)),
    )
}

fn invalid(name: &str, e: prometheus::Error) -> ! {
    // Names and labels are constants of this module: reaching this is a bug, not bad input.
    panic!("invalid metric definition {name}: {e}")
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let r = Registry::new();
        let inflight_opts = Opts::new(
            "turbine_frontend_inflight_requests",
            "Requests being served, from arrival until their last byte.",
        );
        let decision_opts = HistogramOpts::new(
            "turbine_frontend_router_decision_seconds",
            "Time to choose a worker for a request (indexer lookup and cost function).",
        )
        .buckets(DECISION_BUCKETS.to_vec());
        Self {
            requests: counter(
                &r,
                "requests_total",
                "Requests by model, endpoint and HTTP status.",
                &["model", "endpoint", "status"],
            ),
            inflight: register(
                &r,
                IntGaugeVec::new(inflight_opts, &["model"]).unwrap_or_else(|e| invalid("inflight", e)),
            ),
            duration: histogram(
                &r,
                "request_duration_seconds",
                "Time from a request's arrival to its last byte.",
                &["model", "endpoint"],
                LATENCY_BUCKETS,
            ),
            ttft: histogram(
                &r,
                "time_to_first_token_seconds",
                "Time from a request's arrival to its first generated token.",
                &["model"],
                LATENCY_BUCKETS,
            ),
            itl: histogram(
                &r,
                "inter_token_latency_seconds",
                "Time between consecutive outputs of a request, per generated token.",
                &["model"],
                ITL_BUCKETS,
            ),
            input_tokens: counter(&r, "input_tokens_total", "Prompt tokens received.", &["model"]),
            output_tokens: counter(&r, "output_tokens_total", "Tokens generated.", &["model"]),
            cached_tokens: counter(
                &r,
                "cached_tokens_total",
                "Prompt tokens that workers served from their KV cache.",
                &["model"],
            ),
            disconnects: counter(
                &r,
                "client_disconnects_total",
                "Requests whose client went away before the response was complete.",
                &["model", "endpoint"],
            ),
            kv_fallback: register(
                &r,
                prometheus::IntCounter::new(
                    "turbine_frontend_kv_fallback_decisions_total",
                    "kv routing decisions made on predictions because the event plane was disconnected.",
                )
                .unwrap_or_else(|e| invalid("kv_fallback", e)),
            ),
            kv_matched_blocks: counter(
                &r,
                "kv_matched_blocks_total",
                "Leading prompt blocks cached on the worker each kv routing decision chose, by the fastest tier holding each (device, host, disk).",
                &["model", "tier"],
            ),
            migrations: counter(
                &r,
                "migrations_total",
                "Requests moved to another worker after theirs was lost mid-stream.",
                &["model"],
            ),
            disagg: counter(
                &r,
                "disagg_decisions_total",
                "Requests of models with prefill workers, by where their prompt was prefilled: remote, or local because it was short or no prefill worker answered.",
                &["model", "decision"],
            ),
            decision: register(
                &r,
                Histogram::with_opts(decision_opts).unwrap_or_else(|e| invalid("decision", e)),
            ),
            registry: r,
        }
    }

    pub(crate) fn register(&self, collector: Box<dyn prometheus::core::Collector>) -> Result<(), prometheus::Error> {
        self.registry.register(collector)
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    fn per_output(&self, model: &str) -> PerOutput {
        let model = [model];
        PerOutput {
            ttft: self.ttft.with_label_values(&model),
            itl: self.itl.with_label_values(&model),
            output_tokens: self.output_tokens.with_label_values(&model),
            cached_tokens: self.cached_tokens.with_label_values(&model),
        }
    }

    /// Starts accounting for one request; whatever happens to it is recorded once.
    pub(crate) fn request(self: &Arc<Self>, endpoint: &'static str) -> RequestMetrics {
        RequestMetrics {
            metrics: self.clone(),
            per_output: None,
            endpoint,
            model: String::new(),
            start: Instant::now(),
            first_output: false,
            last_output: Vec::new(),
            inflight: false,
            done: false,
        }
    }
}

/// One request's accounting, carried from the handler into its response stream.
///
/// Dropped without [`RequestMetrics::finish`] means the client went away mid-response.
#[derive(Debug)]
pub(crate) struct RequestMetrics {
    metrics: Arc<Metrics>,
    /// The model's series that every output updates, looked up once by label.
    per_output: Option<PerOutput>,
    endpoint: &'static str,
    model: String,
    start: Instant,
    first_output: bool,
    /// When each choice's previous output arrived: gaps are measured within a choice.
    last_output: Vec<Option<Instant>>,
    inflight: bool,
    done: bool,
}

#[derive(Debug)]
struct PerOutput {
    ttft: Histogram,
    itl: Histogram,
    output_tokens: prometheus::IntCounter,
    cached_tokens: prometheus::IntCounter,
}

impl RequestMetrics {
    /// The request is for a served model: from here on it is counted under its name.
    pub(crate) fn set_model(&mut self, model: &str) {
        self.model = model.to_owned();
        self.per_output = Some(self.metrics.per_output(model));
        self.metrics.inflight.with_label_values(&[model]).inc();
        self.inflight = true;
    }

    pub(crate) fn prompt(&self, tokens: usize) {
        self.metrics
            .input_tokens
            .with_label_values(&[&self.model])
            .inc_by(tokens as u64);
    }

    /// An output of `tokens` generated tokens arrived for choice `choice`.
    pub(crate) fn output(&mut self, choice: usize, tokens: usize, cached: Option<u32>) {
        let now = Instant::now();
        let m = self
            .per_output
            .get_or_insert_with(|| self.metrics.per_output(&self.model));
        if !self.first_output {
            self.first_output = true;
            m.ttft.observe(secs(now - self.start));
        }
        if self.last_output.len() <= choice {
            self.last_output.resize(choice + 1, None);
        }
        if let (Some(last), true) = (self.last_output[choice], tokens > 0) {
            let gap = secs(now - last) / tokens as f64;
            for _ in 0..tokens {
                m.itl.observe(gap);
            }
        }
        self.last_output[choice] = Some(now);
        m.output_tokens.inc_by(tokens as u64);
        if let Some(c) = cached {
            m.cached_tokens.inc_by(u64::from(c));
        }
    }

    /// The response is complete (or failed) with `status`.
    pub(crate) fn finish(mut self, status: u16) {
        self.record(status);
    }

    fn record(&mut self, status: u16) {
        if self.done {
            return;
        }
        self.done = true;
        let labels = [self.model.as_str(), self.endpoint];
        self.metrics
            .requests
            .with_label_values(&[self.model.as_str(), self.endpoint, &status.to_string()])
            .inc();
        self.metrics
            .duration
            .with_label_values(&labels)
            .observe(secs(self.start.elapsed()));
        if self.inflight {
            self.metrics.inflight.with_label_values(&[self.model.as_str()]).dec();
        }
    }
}

impl Drop for RequestMetrics {
    fn drop(&mut self) {
        if !self.done {
            self.metrics
                .disconnects
                .with_label_values(&[self.model.as_str(), self.endpoint])
                .inc();
            // nginx's code for a client that closed the connection: the status the client
            // never saw, kept apart from the server's own errors.
            self.record(499);
        }
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_counted_once_with_its_outcome() {
        let m = Arc::new(Metrics::new());
        let mut r = m.request("chat");
        r.set_model("m");
        r.prompt(5);
        r.output(0, 1, Some(3));
        r.output(0, 2, None);
        r.output(1, 1, None);
        r.finish(200);
        let dropped = {
            let mut r = m.request("completions");
            r.set_model("m");
            r
        };
        drop(dropped);
        let text = m.render();
        for line in [
            r#"turbine_frontend_requests_total{endpoint="chat",model="m",status="200"} 1"#,
            r#"turbine_frontend_requests_total{endpoint="completions",model="m",status="499"} 1"#,
            r#"turbine_frontend_client_disconnects_total{endpoint="completions",model="m"} 1"#,
            r#"turbine_frontend_inflight_requests{model="m"} 0"#,
            r#"turbine_frontend_input_tokens_total{model="m"} 5"#,
            r#"turbine_frontend_output_tokens_total{model="m"} 4"#,
            r#"turbine_frontend_cached_tokens_total{model="m"} 3"#,
            r#"turbine_frontend_time_to_first_token_seconds_count{model="m"} 1"#,
            r#"turbine_frontend_inter_token_latency_seconds_count{model="m"} 2"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
