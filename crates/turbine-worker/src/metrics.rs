//! Prometheus metrics of workers: their KV cache's blocks and sequences, and their KV
//! transfers and block manager tiers, read from the engines' load and the agents' counters at
//! each scrape. `turbine
//! serve` adds them to the frontend's `/metrics`; `turbine worker --metrics-port` serves them.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounterVec, IntGaugeVec, Opts};

use tokio::sync::watch;
use turbine_protocols::kv::WorkerLoad;

use crate::Disagg;

/// What one worker's metrics are read from; see [`crate::Worker::metrics_source`].
#[derive(Debug, Clone)]
pub struct MetricsSource {
    /// The `worker` label: its instance id.
    pub label: String,
    pub load: Option<watch::Receiver<WorkerLoad>>,
    pub disagg: Option<Arc<Disagg>>,
    /// The block manager below the engine's KV cache, if it has tiers.
    pub kvbm: Option<Arc<turbine_kvbm::KvbmStats>>,
}

/// The workers a [`WorkerMetrics`] reads, which may come and go after it is registered (a
/// pool that a planner resizes in one process).
#[derive(Debug, Clone, Default)]
pub struct MetricsSources(Arc<parking_lot::Mutex<Vec<MetricsSource>>>);

impl MetricsSources {
    pub fn add(&self, source: MetricsSource) {
        self.0.lock().push(source);
    }

    /// Stops reading the worker labelled `label`; its series go at the next scrape.
    pub fn remove(&self, label: &str) {
        self.0.lock().retain(|s| s.label != label);
    }
}

/// The KV cache, transfer and staging metrics of some workers, labelled by worker.
pub struct WorkerMetrics {
    workers: MetricsSources,
    kv_blocks: IntGaugeVec,
    sequences: IntGaugeVec,
    prefill_tokens: IntGaugeVec,
    bytes: IntCounterVec,
    seconds: prometheus::CounterVec,
    completed: IntCounterVec,
    failures: IntCounterVec,
    in_flight: IntGaugeVec,
    disagg: IntCounterVec,
    free_slots: IntGaugeVec,
    refused: IntCounterVec,
    notifications_lost: IntCounterVec,
    kvbm: crate::kvbm_metrics::KvbmMetrics,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, prometheus::Error> {
    IntCounterVec::new(Opts::new(name, help), labels)
}

impl WorkerMetrics {
    /// The workers read, to add to or remove from after registration. The block manager's
    /// metrics stay those of the workers given here.
    pub fn sources(&self) -> MetricsSources {
        self.workers.clone()
    }

    pub fn new(workers: Vec<MetricsSource>) -> Result<Self, prometheus::Error> {
        let kvbm = workers
            .iter()
            .filter_map(|w| Some((w.label.clone(), w.kvbm.clone()?)))
            .collect();
        Ok(WorkerMetrics {
            kvbm: crate::kvbm_metrics::KvbmMetrics::new(kvbm)?,
            workers: MetricsSources(Arc::new(parking_lot::Mutex::new(workers))),
            kv_blocks: IntGaugeVec::new(
                Opts::new(
                    "turbine_worker_kv_blocks",
                    "KV cache blocks of the engine's pool: in_use by sequences, or free (empty or holding evictable cached prefixes).",
                ),
                &["worker", "state"],
            )?,
            sequences: IntGaugeVec::new(
                Opts::new("turbine_worker_sequences", "Sequences on the engine: running, or waiting for admission."),
                &["worker", "state"],
            )?,
            prefill_tokens: IntGaugeVec::new(
                Opts::new(
                    "turbine_worker_queued_prefill_tokens",
                    "Prompt tokens admitted or waiting but not yet computed: the prefill queued on the engine.",
                ),
                &["worker"],
            )?,
            bytes: counter(
                "turbine_transfer_bytes_total",
                "Bytes moved by KV transfers that completed, by direction (read: into this worker).",
                &["worker", "backend", "op"],
            )?,
            seconds: prometheus::CounterVec::new(
                Opts::new(
                    "turbine_transfer_seconds_total",
                    "Wall time of completed KV transfers; bytes over seconds is their bandwidth.",
                ),
                &["worker", "backend"],
            )?,
            completed: counter(
                "turbine_transfer_completed_total",
                "KV transfers that completed.",
                &["worker", "backend"],
            )?,
            failures: counter(
                "turbine_transfer_failures_total",
                "KV transfers that failed, by error kind.",
                &["worker", "backend", "kind"],
            )?,
            in_flight: IntGaugeVec::new(
                Opts::new("turbine_transfer_in_flight", "KV transfers under way."),
                &["worker", "backend"],
            )?,
            disagg: counter(
                "turbine_worker_disagg_total",
                "Disaggregation events on a worker: prefills, blocks_staged, leases_expired, fetches, blocks_fetched, fetch_failures.",
                &["worker", "event"],
            )?,
            free_slots: IntGaugeVec::new(
                Opts::new("turbine_worker_staging_free_slots", "Free KV staging slots."),
                &["worker"],
            )?,
            refused: counter(
                "turbine_transfer_peers_refused_total",
                "Transfer peers refused at connect or handshake: another protocol, model or KV layout.",
                &["worker"],
            )?,
            notifications_lost: counter(
                "turbine_transfer_notifications_lost_total",
                "Notifications of finished KV transfers that never reached their peer; the prefill worker's lease then ends by expiry.",
                &["worker"],
            )?,
        })
    }

    fn refresh(&self) {
        for vec in [
            &self.bytes,
            &self.completed,
            &self.failures,
            &self.disagg,
            &self.refused,
            &self.notifications_lost,
        ] {
            vec.reset();
        }
        // Gauges too: a worker gone since the last scrape leaves no series behind.
        for vec in [
            &self.kv_blocks,
            &self.sequences,
            &self.prefill_tokens,
            &self.in_flight,
            &self.free_slots,
        ] {
            vec.reset();
        }
        self.seconds.reset();
        for source in self.workers.0.lock().iter() {
            let worker = source.label.as_str();
            if let Some(load) = &source.load {
                let l = *load.borrow();
                let in_use = i64::from(l.blocks_in_use);
                self.kv_blocks.with_label_values(&[worker, "in_use"]).set(in_use);
                self.kv_blocks
                    .with_label_values(&[worker, "free"])
                    .set(i64::from(l.blocks_total) - in_use);
                self.sequences
                    .with_label_values(&[worker, "running"])
                    .set(i64::from(l.active_seqs));
                self.sequences
                    .with_label_values(&[worker, "waiting"])
                    .set(i64::from(l.waiting_seqs));
                self.prefill_tokens
                    .with_label_values(&[worker])
                    .set(i64::try_from(l.active_prefill_tokens).unwrap_or(i64::MAX));
            }
            let Some(d) = &source.disagg else {
                continue;
            };
            let stats = d.agent().stats();
            for (backend, b) in &stats.backends {
                let backend = backend.label();
                self.bytes
                    .with_label_values(&[worker, backend, "read"])
                    .inc_by(b.bytes_read);
                self.bytes
                    .with_label_values(&[worker, backend, "write"])
                    .inc_by(b.bytes_written);
                self.seconds
                    .with_label_values(&[worker, backend])
                    .inc_by(b.busy_nanos as f64 / 1e9);
                self.completed.with_label_values(&[worker, backend]).inc_by(b.completed);
                self.in_flight
                    .with_label_values(&[worker, backend])
                    .set(b.in_flight as i64);
            }
            for ((backend, kind), n) in &stats.failures {
                self.failures
                    .with_label_values(&[worker, backend.label(), kind])
                    .inc_by(*n);
            }
            self.refused.with_label_values(&[worker]).inc_by(stats.peers_refused);
            self.notifications_lost
                .with_label_values(&[worker])
                .inc_by(stats.notifications_lost);
            let s = &d.stats;
            for (event, n) in [
                ("prefills", &s.prefills),
                ("blocks_staged", &s.blocks_staged),
                ("leases_expired", &s.leases_expired),
                ("fetches", &s.fetches),
                ("blocks_fetched", &s.blocks_fetched),
                ("fetch_failures", &s.fetch_failures),
            ] {
                self.disagg
                    .with_label_values(&[worker, event])
                    .inc_by(n.load(Ordering::Relaxed));
            }
            self.free_slots.with_label_values(&[worker]).set(d.free_slots() as i64);
        }
    }
}

impl WorkerMetrics {
    fn parts(&self) -> [&dyn Collector; 13] {
        [
            &self.kvbm,
            &self.kv_blocks,
            &self.sequences,
            &self.prefill_tokens,
            &self.bytes,
            &self.seconds,
            &self.completed,
            &self.failures,
            &self.in_flight,
            &self.disagg,
            &self.free_slots,
            &self.refused,
            &self.notifications_lost,
        ]
    }
}

impl Collector for WorkerMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.parts().into_iter().flat_map(|c| c.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.refresh();
        self.parts().into_iter().flat_map(|c| c.collect()).collect()
    }
}
