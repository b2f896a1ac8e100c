//! KV-aware routing: keeps the router's indexer fed from the workers' KV events, brings a
//! worker back in sync when its events have a gap, and scores workers for each request
//! with the cost function. Models whose workers publish no KV events are routed on
//! predictions instead (approximate mode): what the router sent where.
//!
//! State lives behind one `std::sync::Mutex`: every operation on it is short and
//! synchronous, and none crosses an `.await`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use futures::StreamExt;
use turbine_protocols::discovery::kv_events_pattern;
use turbine_protocols::kv::{KvEventMessage, KvStateRequest, KvStateResponse};
use turbine_router::approx::ApproxIndexer;
use turbine_router::indexer::{Applied, KvIndexer};
use turbine_router::selector::{self, CostModel, Decision, Load, SelectorConfig};
use turbine_router::WorkerId;
use turbine_runtime::{Client, EventPlaneError, Instance, Runtime};

use crate::models::{ModelManager, ServedModel};

/// A request's own cost-function settings, overriding the frontend's.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SelectorOverrides {
    pub(crate) overlap_weight: Option<f64>,
    pub(crate) temperature: Option<f64>,
    pub(crate) host_hit_weight: Option<f64>,
    pub(crate) disk_hit_weight: Option<f64>,
}

/// The time cost's weights (see [`CostModel::Time`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct TimeCost {
    pub(crate) compute_weight: f64,
    pub(crate) decode_horizon: f64,
}

/// Approximate mode: block size used to hash prompts when the model names none, how long a
/// prediction lasts, and how many (worker, block) predictions are kept.
const APPROX_BLOCK_SIZE: u32 = 16;
const APPROX_TTL: std::time::Duration = std::time::Duration::from_secs(120);
const APPROX_MAX_BLOCKS: usize = 1 << 20;

#[derive(Debug)]
pub(crate) struct KvRouter {
    state: Mutex<State>,
    approx: Mutex<ApproxIndexer>,
    selector: SelectorConfig,
    /// Set when costs are counted in time where a model's card has a timing profile.
    time: Option<TimeCost>,
    client: Client<KvStateRequest, KvStateResponse>,
    models: ModelManager,
    /// False when this frontend's event plane does not reach the workers (no shared event
    /// bus between processes): every model is then routed on predictions.
    events_reach_workers: bool,
    /// Asked before each decision: while it is disconnected, events are being missed, and
    /// decisions fall back to predictions until it is back (gaps then trigger resyncs).
    events: Arc<dyn turbine_runtime::EventPlane>,
    events_lost: std::sync::atomic::AtomicBool,
    fallback_decisions: prometheus::IntCounter,
}

#[derive(Debug, Default)]
struct State {
    indexer: KvIndexer,
    /// Workers whose resync is under way: their events wait for it.
    resyncing: HashSet<WorkerId>,
}

impl KvRouter {
    /// Subscribes to every model's KV events in `namespace` and starts following them.
    pub(crate) async fn start(
        runtime: &Runtime,
        namespace: &str,
        models: ModelManager,
        selector: SelectorConfig,
        time: Option<TimeCost>,
        events_reach_workers: bool,
        fallback_decisions: prometheus::IntCounter,
    ) -> Result<Arc<Self>, EventPlaneError> {
        let mut events = runtime.events().subscribe(&kv_events_pattern(namespace)).await?;
        let router = Arc::new(Self {
            state: Mutex::default(),
            approx: Mutex::new(ApproxIndexer::new(APPROX_TTL, APPROX_MAX_BLOCKS)),
            selector,
            time,
            client: runtime.client(),
            models,
            events_reach_workers,
            events: runtime.events().clone(),
            events_lost: std::sync::atomic::AtomicBool::new(false),
            fallback_decisions,
        });
        let weak = Arc::downgrade(&router);
        let mut changes = router.models.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = events.next() => {
                        let Some(event) = event else { return };
                        let Some(router) = weak.upgrade() else { return };
                        match KvEventMessage::decode(&event.payload) {
                            Ok(message) => router.apply(message),
                            Err(e) => tracing::warn!(error = %e, "undecodable KV event message"),
                        }
                    }
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let Some(router) = weak.upgrade() else { return };
                        router.forget_departed();
                    }
                }
            }
        });
        Ok(router)
    }

    /// Whether the event plane is disconnected now; says so in the log when that changes,
    /// and counts each decision made meanwhile.
    fn events_down(&self) -> bool {
        use std::sync::atomic::Ordering;
        let down = self.events_reach_workers && !self.events.is_connected();
        if self.events_lost.swap(down, Ordering::Relaxed) != down {
            if down {
                tracing::warn!("event plane disconnected: kv routing falls back to predictions");
            } else {
                tracing::info!("event plane reconnected: kv routing follows KV events again");
            }
        }
        if down {
            self.fallback_decisions.inc();
        }
        down
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn apply(self: &Arc<Self>, message: KvEventMessage) {
        let worker = message.worker;
        let mut state = self.lock();
        if state.resyncing.contains(&worker) {
            return;
        }
        for event in &message.events {
            match state.indexer.apply(worker, event) {
                Ok(Applied::Applied | Applied::Duplicate) => {}
                Ok(Applied::NeedsResync { after }) => {
                    state.resyncing.insert(worker);
                    tokio::spawn(resync(Arc::downgrade(self), worker, after));
                    return;
                }
                Err(e) => {
                    tracing::warn!(worker, error = %e, "KV events of this worker are ignored");
                    return;
                }
            }
        }
    }

    /// Drops the workers that left discovery, with what they held and ran.
    fn forget_departed(&self) {
        let snapshot = self.models.snapshot();
        let present: HashSet<WorkerId> = snapshot
            .models
            .values()
            .flat_map(|m| m.instances.iter().map(|i| i.id.0))
            .collect();
        let mut state = self.lock();
        let gone: Vec<WorkerId> = state.indexer.workers().filter(|w| !present.contains(w)).collect();
        let mut approx = self.approx.lock().unwrap_or_else(|e| e.into_inner());
        for w in gone {
            tracing::info!(worker = w, "worker left: forgetting its KV state");
            state.indexer.remove_worker(w);
        }
        let predicted: Vec<WorkerId> = approx.workers().filter(|w| !present.contains(w)).collect();
        for w in predicted {
            approx.remove_worker(w);
        }
    }

    /// Scores `candidates` (with their loads) for a prompt of `tokens` and picks one; also
    /// returns the block size the overlaps are counted in.
    pub(crate) fn choose(
        &self,
        served: &ServedModel,
        loads: &[(WorkerId, Load)],
        tokens: &[u32],
        overrides: &SelectorOverrides,
    ) -> Option<(Decision, u32)> {
        // Without KV events, predictions stand in for them, at whatever granularity.
        let approximate = !self.events_reach_workers || served.kv_state_endpoint.is_none() || self.events_down();
        let block_size = served.card.kv_block_size.unwrap_or(APPROX_BLOCK_SIZE);
        let hashes: Vec<u64> = turbine_tokens::block_hashes(tokens, block_size as usize)
            .iter()
            .map(|b| b.sequence)
            .collect();
        let now = std::time::Instant::now();
        let overlaps = if approximate {
            self.approx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .find_matches(&hashes, now)
        } else {
            self.lock().indexer.find_matches(&hashes)
        };
        let config = SelectorConfig {
            block_size,
            overlap_weight: overrides.overlap_weight.unwrap_or(self.selector.overlap_weight),
            temperature: overrides.temperature.unwrap_or(self.selector.temperature),
            host_hit_weight: overrides.host_hit_weight.unwrap_or(self.selector.host_hit_weight),
            disk_hit_weight: overrides.disk_hit_weight.unwrap_or(self.selector.disk_hit_weight),
            cost: match (self.time, served.card.timing) {
                (Some(t), Some(profile)) => CostModel::Time {
                    profile,
                    compute_weight: t.compute_weight,
                    decode_horizon: t.decode_horizon,
                },
                _ => CostModel::Blocks,
            },
        };
        let decision = selector::select(&config, tokens.len(), &overlaps, loads, &mut rand::thread_rng())?;
        if approximate {
            let mut approx = self.approx.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = approx.routed(decision.worker, &hashes, now) {
                tracing::warn!(worker = decision.worker, error = %e, "cannot predict this worker's cache");
            }
        }
        Some((decision, block_size))
    }
}

/// Brings `worker` back in sync: the events after `after` if it still has them, else its
/// whole state. On failure its events stay ignored until the next gap asks again.
async fn resync(router: Weak<KvRouter>, worker: WorkerId, after: Option<u64>) {
    let Some(r) = router.upgrade() else { return };
    let outcome = fetch_and_apply(&r, worker, after).await;
    let mut state = r.lock();
    state.resyncing.remove(&worker);
    match outcome {
        Ok(()) => tracing::debug!(worker, ?after, "KV state resynchronised"),
        Err(e) => tracing::warn!(worker, error = %e, "KV resync failed; routing without this worker's cache"),
    }
}

async fn fetch_and_apply(r: &KvRouter, worker: WorkerId, after: Option<u64>) -> Result<(), String> {
    let instance = kv_state_instance(r, worker).ok_or("the worker has no KV state endpoint")?;
    let mut ask = after;
    // At most twice: recent events, then a snapshot if they no longer line up.
    for _ in 0..2 {
        let mut responses = r
            .client
            .call(&instance, KvStateRequest { after_event_id: ask })
            .await
            .map_err(|e| e.to_string())?;
        let response = responses
            .next()
            .await
            .ok_or("no response")?
            .map_err(|e| e.to_string())?;
        let mut state = r.lock();
        match response {
            KvStateResponse::Snapshot { snapshot } => {
                return state
                    .indexer
                    .apply_snapshot(worker, &snapshot)
                    .map_err(|e| e.to_string());
            }
            KvStateResponse::Events { events } => {
                let in_order = events.iter().all(|e| {
                    matches!(
                        state.indexer.apply(worker, e),
                        Ok(Applied::Applied | Applied::Duplicate)
                    )
                });
                if in_order {
                    return Ok(());
                }
                ask = None;
            }
        }
    }
    Err("the worker's events did not line up with its snapshot".into())
}

/// The worker's KV state endpoint, which shares its instance id.
fn kv_state_instance(r: &KvRouter, worker: WorkerId) -> Option<Instance> {
    let snapshot = r.models.snapshot();
    let endpoint = snapshot
        .models
        .values()
        .find(|m| m.instances.iter().any(|i| i.id.0 == worker))
        .and_then(|m| m.kv_state_endpoint.clone())?;
    snapshot.instances.get(&(endpoint, worker)).cloned()
}
