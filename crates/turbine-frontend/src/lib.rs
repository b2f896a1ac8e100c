//! The OpenAI-compatible HTTP frontend: the only crate that knows HTTP.
//!
//! A request is validated, preprocessed into token ids, routed to a worker that serves its
//! model (as discovery reports them), and the worker's token stream is decoded back into
//! text, sent whole or as server-sent events.

mod error;
mod http;
mod kv_routing;
mod metrics;
mod models;
mod preprocess;
mod replica;
mod routing;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use turbine_router::RouterMode;
use turbine_runtime::{DiscoveryError, Runtime};

/// Everything the frontend needs to know, parsed once by the binary.
#[derive(Debug, Clone)]
pub struct FrontendConfig {
    /// The discovery namespace whose models are served.
    pub namespace: String,
    pub router_mode: RouterMode,
    /// Request bodies larger than this are refused with 413.
    pub max_body_bytes: usize,
    /// `kv` mode: weight of prefill work against decode load, and sampling temperature.
    pub kv_overlap_weight: f64,
    pub kv_temperature: f64,
    /// `kv` mode: what a cached block in a worker's host memory, and on its disk, counts for
    /// (0 to 1) against one on its device.
    pub kv_host_hit_weight: f64,
    pub kv_disk_hit_weight: f64,
    /// `kv` mode: what costs are counted in, and for [`KvCost::Time`] how much a request's own
    /// prefill counts against waiting and how many of its decode steps the cost looks ahead.
    pub kv_cost: KvCost,
    pub kv_compute_weight: f64,
    pub kv_decode_horizon: f64,
    /// Whether the runtime's event plane carries the workers' KV events to this frontend. When
    /// it does not (separate processes without a shared event bus), `kv` routing predicts
    /// what each worker caches from its own decisions.
    pub kv_events: bool,
    /// How many times a request may move to another worker when its worker is lost
    /// mid-stream (0: never; the client sees the error).
    pub migration_limit: u32,
    /// Disaggregated models: when a prompt is prefilled by its decode worker instead.
    pub disagg: DisaggPolicy,
}

/// The units of the `kv` router's cost function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvCost {
    /// Predicted milliseconds, for models whose workers publish a timing profile; blocks
    /// for the others.
    Time,
    /// Blocks of prefill and decode load, whatever the workers publish.
    Blocks,
}

/// When a request of a model with prefill workers is prefilled on its decode worker after
/// all: its uncached part is too small for the move to pay, or the prefill pool is backed up.
#[derive(Debug, Clone, PartialEq)]
pub struct DisaggPolicy {
    /// Fewer uncached prompt tokens than this (on the chosen decode worker): local.
    pub min_uncached_tokens: usize,
    /// A smaller uncached share of the prompt than this (0 to 1): local, since the decode
    /// worker already holds most of it.
    pub min_uncached_ratio: f64,
    /// Every prefill worker has more prompt tokens queued than this: local, rather than
    /// wait behind them. `None`: no limit.
    pub max_prefill_queue_tokens: Option<u64>,
}

impl Default for DisaggPolicy {
    fn default() -> Self {
        Self {
            min_uncached_tokens: 0,
            min_uncached_ratio: 0.0,
            max_prefill_queue_tokens: None,
        }
    }
}

/// The time cost's weights by default: a millisecond of a request's own prefill against
/// one of waiting, and the decode steps looked ahead.
pub const DEFAULT_COMPUTE_WEIGHT: f64 = 4.0;
pub const DEFAULT_DECODE_HORIZON: f64 = 64.0;

impl Default for FrontendConfig {
    fn default() -> Self {
        Self {
            namespace: "turbine".into(),
            router_mode: RouterMode::RoundRobin,
            max_body_bytes: 32 * 1024 * 1024,
            kv_overlap_weight: 1.0,
            kv_temperature: 0.0,
            kv_host_hit_weight: turbine_router::selector::DEFAULT_HOST_HIT_WEIGHT,
            kv_disk_hit_weight: turbine_router::selector::DEFAULT_DISK_HIT_WEIGHT,
            kv_cost: KvCost::Time,
            kv_compute_weight: DEFAULT_COMPUTE_WEIGHT,
            kv_decode_horizon: DEFAULT_DECODE_HORIZON,
            kv_events: true,
            migration_limit: 3,
            disagg: DisaggPolicy::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("cannot follow models in discovery")]
    Discovery(#[from] DiscoveryError),
    #[error("cannot follow KV events")]
    Events(#[from] turbine_runtime::EventPlaneError),
    #[error("HTTP server failed")]
    Serve(#[source] std::io::Error),
}

/// A frontend ready to serve; [`Frontend::run`] serves it on a listener.
#[derive(Debug)]
pub struct Frontend {
    app: axum::Router,
    metrics: Arc<metrics::Metrics>,
}

impl Frontend {
    /// Starts following discovery; models already registered are routable on return.
    pub async fn start(runtime: &Runtime, config: FrontendConfig) -> Result<Self, FrontendError> {
        let models = models::ModelManager::start(runtime, &config.namespace).await?;
        let metrics = Arc::new(metrics::Metrics::new());
        let kv = match config.router_mode {
            RouterMode::Kv | RouterMode::Session => {
                let selector = turbine_router::selector::SelectorConfig {
                    overlap_weight: config.kv_overlap_weight,
                    temperature: config.kv_temperature,
                    host_hit_weight: config.kv_host_hit_weight,
                    disk_hit_weight: config.kv_disk_hit_weight,
                    ..Default::default()
                };
                Some(
                    kv_routing::KvRouter::start(
                        runtime,
                        &config.namespace,
                        models.clone(),
                        selector,
                        (config.kv_cost == KvCost::Time).then_some(kv_routing::TimeCost {
                            compute_weight: config.kv_compute_weight,
                            decode_horizon: config.kv_decode_horizon,
                        }),
                        config.kv_events,
                        metrics.kv_fallback.clone(),
                    )
                    .await?,
                )
            }
            _ => None,
        };
        let active = replica::Replicated::start(runtime, &config.namespace).await?;
        let dispatcher = routing::Dispatcher::new(runtime, models, &config, kv, active, &metrics);
        let app = http::App {
            dispatcher: Arc::new(dispatcher),
            metrics: metrics.clone(),
            max_body_bytes: config.max_body_bytes,
        };
        Ok(Self {
            app: http::app(Arc::new(app)),
            metrics,
        })
    }

    /// Adds metrics of parts running beside the frontend in one process (the workers of
    /// `turbine serve`) to its `/metrics`.
    pub fn register_metrics(&self, collector: Box<dyn prometheus::core::Collector>) -> Result<(), prometheus::Error> {
        self.metrics.register(collector)
    }

    /// Serves HTTP on `listener` until `shutdown` completes; then stops accepting and waits
    /// for open requests to finish (the caller bounds how long).
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), FrontendError> {
        use axum::serve::ListenerExt;
        // SSE writes many small frames: without NODELAY, Nagle's algorithm holds each one
        // back until the client's delayed ACK, about 40 ms per chunk.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        axum::serve(listener, self.app)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(FrontendError::Serve)
    }
}
