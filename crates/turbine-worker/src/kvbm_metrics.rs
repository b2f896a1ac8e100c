//! Prometheus metrics of the block manager below a worker's KV cache, under the names
//! Dynamo's KVBM uses (`kvbm_matched_tokens`, `kvbm_offload_blocks_d2h`, ...), read from its
//! counters at each scrape: counters stay counters, and rates are the reader's to derive.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{CounterVec, IntCounterVec, IntGaugeVec, Opts};
use turbine_kvbm::{KvbmStats, Path, Skip, TierKind};

pub(crate) struct KvbmMetrics {
    workers: Vec<(String, Arc<KvbmStats>)>,
    matched: IntCounterVec,
    /// One counter per path, named as Dynamo names them.
    blocks: Vec<(Path, IntCounterVec)>,
    bytes: IntCounterVec,
    seconds: CounterVec,
    hits: IntCounterVec,
    evictions: IntCounterVec,
    skipped: IntCounterVec,
    onboard_skipped: IntCounterVec,
    queue: IntGaugeVec,
    in_flight: IntGaugeVec,
    prefetch_abandoned: IntCounterVec,
    tier_blocks: IntGaugeVec,
}

impl KvbmMetrics {
    pub(crate) fn new(workers: Vec<(String, Arc<KvbmStats>)>) -> Result<Self, prometheus::Error> {
        let counter = |name: &str, help: &str, labels: &[&str]| IntCounterVec::new(Opts::new(name, help), labels);
        let mut blocks = Vec::new();
        for path in Path::ALL {
            let (direction, p) = path.labels();
            blocks.push((
                path,
                counter(
                    &format!("kvbm_{direction}_blocks_{p}"),
                    &format!(
                        "KV blocks copied by {direction} on path {p} (d: device, h: host, d2d: device and disk; \
                         disk2host: a prefetch)."
                    ),
                    &["worker"],
                )?,
            ));
        }
        Ok(Self {
            workers,
            matched: counter(
                "kvbm_matched_tokens",
                "Prompt tokens found in host memory or on disk and loaded instead of computed.",
                &["worker"],
            )?,
            blocks,
            bytes: counter(
                "kvbm_bytes_total",
                "Bytes copied between tiers.",
                &["worker", "direction", "path"],
            )?,
            seconds: CounterVec::new(
                Opts::new(
                    "kvbm_copy_seconds_total",
                    "Time spent copying between tiers; bytes over seconds is the bandwidth.",
                ),
                &["worker", "direction", "path"],
            )?,
            hits: counter(
                "kvbm_hits_total",
                "Blocks loaded from each tier below the KV cache.",
                &["worker", "tier"],
            )?,
            evictions: counter(
                "kvbm_evictions_total",
                "Blocks evicted from each tier, with the tier's policy.",
                &["worker", "tier", "policy"],
            )?,
            skipped: counter(
                "kvbm_offload_skipped_total",
                "Offloads not done, by reason (not_admitted counts admission rejections).",
                &["worker", "reason"],
            )?,
            onboard_skipped: counter(
                "kvbm_onboard_skipped_total",
                "Loads not done: slower than recomputing, or failed (the blocks were recomputed).",
                &["worker", "reason"],
            )?,
            queue: IntGaugeVec::new(
                Opts::new("kvbm_offload_queue_blocks", "Offloads waiting for their copy."),
                &["worker"],
            )?,
            in_flight: IntGaugeVec::new(
                Opts::new(
                    "kvbm_copies_in_flight",
                    "Loads and prefetches running beside the engine's steps.",
                ),
                &["worker"],
            )?,
            prefetch_abandoned: counter(
                "kvbm_prefetch_abandoned_total",
                "Requests admitted before their prefetch finished (best effort, or its timeout).",
                &["worker"],
            )?,
            tier_blocks: IntGaugeVec::new(
                Opts::new(
                    "kvbm_tier_blocks",
                    "Blocks each tier holds (used) and its slots (capacity).",
                ),
                &["worker", "tier", "state"],
            )?,
        })
    }

    fn parts(&self) -> Vec<&dyn Collector> {
        let mut parts: Vec<&dyn Collector> = vec![
            &self.matched,
            &self.bytes,
            &self.seconds,
            &self.hits,
            &self.evictions,
            &self.skipped,
            &self.onboard_skipped,
            &self.queue,
            &self.in_flight,
            &self.prefetch_abandoned,
            &self.tier_blocks,
        ];
        parts.extend(self.blocks.iter().map(|(_, c)| c as &dyn Collector));
        parts
    }

    fn refresh(&self) {
        for c in [
            &self.matched,
            &self.bytes,
            &self.hits,
            &self.evictions,
            &self.skipped,
            &self.onboard_skipped,
            &self.prefetch_abandoned,
        ] {
            c.reset();
        }
        for (_, c) in &self.blocks {
            c.reset();
        }
        self.seconds.reset();
        for (worker, s) in &self.workers {
            let w = worker.as_str();
            self.matched
                .with_label_values(&[w])
                .inc_by(s.matched_tokens.load(Ordering::Relaxed));
            for (path, c) in &self.blocks {
                let (direction, p) = path.labels();
                c.with_label_values(&[w]).inc_by(s.blocks(*path));
                self.bytes.with_label_values(&[w, direction, p]).inc_by(s.bytes(*path));
                self.seconds
                    .with_label_values(&[w, direction, p])
                    .inc_by(s.seconds(*path));
            }
            for (tier, policy, held, capacity) in [
                (TierKind::Host, &s.host_policy, &s.host_blocks, &s.host_capacity),
                (TierKind::Disk, &s.disk_policy, &s.disk_blocks, &s.disk_capacity),
            ] {
                let capacity = capacity.load(Ordering::Relaxed);
                if capacity == 0 {
                    continue;
                }
                let t = tier.label();
                self.hits.with_label_values(&[w, t]).inc_by(s.hits(tier));
                self.evictions
                    .with_label_values(&[w, t, *policy.lock()])
                    .inc_by(s.evictions(tier));
                self.tier_blocks
                    .with_label_values(&[w, t, "used"])
                    .set(held.load(Ordering::Relaxed) as i64);
                self.tier_blocks
                    .with_label_values(&[w, t, "capacity"])
                    .set(capacity as i64);
            }
            for why in Skip::ALL {
                self.skipped.with_label_values(&[w, why.label()]).inc_by(s.skips(why));
            }
            self.onboard_skipped
                .with_label_values(&[w, "slower_than_recompute"])
                .inc_by(s.onboard_skipped_slower.load(Ordering::Relaxed));
            self.onboard_skipped
                .with_label_values(&[w, "failed"])
                .inc_by(s.onboard_failed.load(Ordering::Relaxed));
            self.queue
                .with_label_values(&[w])
                .set(s.queue_depth.load(Ordering::Relaxed) as i64);
            self.in_flight
                .with_label_values(&[w])
                .set(s.in_flight.load(Ordering::Relaxed) as i64);
            self.prefetch_abandoned
                .with_label_values(&[w])
                .inc_by(s.prefetch_abandoned.load(Ordering::Relaxed));
        }
    }
}

impl Collector for KvbmMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.parts().into_iter().flat_map(|c| c.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if self.workers.is_empty() {
            return Vec::new();
        }
        self.refresh();
        self.parts().into_iter().flat_map(|c| c.collect()).collect()
    }
}
