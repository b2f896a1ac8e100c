//! Prometheus metrics of workers' KV transfers, read from their agents' counters at each
//! scrape: what `turbine serve` adds to the frontend's `/metrics`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounterVec, IntGaugeVec, Opts};

use crate::Disagg;

/// The transfer and staging metrics of some workers, labelled by worker.
pub struct TransferMetrics {
    workers: Vec<(String, Arc<Disagg>)>,
    bytes: IntCounterVec,
    seconds: prometheus::CounterVec,
    completed: IntCounterVec,
    failures: IntCounterVec,
    in_flight: IntGaugeVec,
    disagg: IntCounterVec,
    free_slots: IntGaugeVec,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, prometheus::Error> {
    IntCounterVec::new(Opts::new(name, help), labels)
}

impl TransferMetrics {
    /// `workers`: each worker's label (its instance id) and its part in disaggregation.
    pub fn new(workers: Vec<(String, Arc<Disagg>)>) -> Result<Self, prometheus::Error> {
        Ok(TransferMetrics {
            workers,
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
        })
    }

    fn refresh(&self) {
        for vec in [&self.bytes, &self.completed, &self.failures, &self.disagg] {
            vec.reset();
        }
        self.seconds.reset();
        for (worker, d) in &self.workers {
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

impl TransferMetrics {
    fn parts(&self) -> [&dyn Collector; 7] {
        [
            &self.bytes,
            &self.seconds,
            &self.completed,
            &self.failures,
            &self.in_flight,
            &self.disagg,
            &self.free_slots,
        ]
    }
}

impl Collector for TransferMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.parts().into_iter().flat_map(|c| c.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.refresh();
        self.parts().into_iter().flat_map(|c| c.collect()).collect()
    }
}
