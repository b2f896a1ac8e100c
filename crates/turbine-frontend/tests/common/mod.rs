//! Helpers shared by the frontend's integration tests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use turbine_engine::{Engine, EngineError, EngineStream, KvCache};
use turbine_protocols::PreprocessedRequest;

/// An engine that counts the requests it is given, so tests can see where routing sent them.
pub struct Counting<E> {
    inner: E,
    served: Arc<AtomicUsize>,
}

/// Wraps `inner`; the counter reads how many requests it has been given.
pub fn counting<E: Engine>(inner: E) -> (Counting<E>, Arc<AtomicUsize>) {
    let served = Arc::new(AtomicUsize::new(0));
    (
        Counting {
            inner,
            served: served.clone(),
        },
        served,
    )
}

impl<E: Engine> Engine for Counting<E> {
    fn generate(&self, request: PreprocessedRequest, cancel: CancellationToken) -> Result<EngineStream, EngineError> {
        self.served.fetch_add(1, Ordering::SeqCst);
        self.inner.generate(request, cancel)
    }

    fn kv_cache(&self) -> Option<KvCache> {
        self.inner.kv_cache()
    }
}

/// Workers serving `card` with `engines` (each counted), behind a frontend in `mode` on an
/// OS-chosen port. Dropping it stops the frontend and the workers.
// Each test crate compiles this module on its own, and not every one uses the cluster.
#[allow(dead_code)]
pub struct Cluster {
    /// `/v1/completions` of the (first) frontend.
    pub url: String,
    /// `/v1/completions` of every frontend, all routing over the same workers.
    pub urls: Vec<String>,
    pub counts: Vec<Arc<AtomicUsize>>,
    _workers: Vec<turbine_worker::Worker>,
    _stop: tokio_util::sync::DropGuard,
}

#[allow(dead_code)]
impl Cluster {
    pub async fn start<E: Engine>(
        card: turbine_protocols::ModelCard,
        engines: Vec<E>,
        mode: turbine_router::RouterMode,
    ) -> anyhow::Result<Self> {
        Self::start_frontends(card, engines, mode, 1).await
    }

    /// The same with `frontends` frontends sharing discovery and events, as replicas do.
    pub async fn start_frontends<E: Engine>(
        card: turbine_protocols::ModelCard,
        engines: Vec<E>,
        mode: turbine_router::RouterMode,
        frontends: usize,
    ) -> anyhow::Result<Self> {
        use turbine_runtime::{EndpointId, MemoryDiscovery, MemoryEventPlane, Runtime, ServeOptions};
        let runtime = Runtime::new(Arc::new(MemoryDiscovery::new()), Arc::new(MemoryEventPlane::new()));
        let (mut counts, mut workers) = (Vec::new(), Vec::new());
        for inner in engines {
            let (engine, served) = counting(inner);
            let config = turbine_worker::WorkerConfig {
                endpoint: EndpointId::new("turbine", "worker", "generate"),
                model: card.clone(),
                serve: ServeOptions::default(),
                load_report_interval: std::time::Duration::from_millis(100),
                disagg: None,
            };
            workers.push(turbine_worker::Worker::start(&runtime, Arc::new(engine), config).await?);
            counts.push(served);
        }
        let stop = CancellationToken::new();
        let mut urls = Vec::new();
        for _ in 0..frontends {
            let config = turbine_frontend::FrontendConfig {
                router_mode: mode,
                ..Default::default()
            };
            let frontend = turbine_frontend::Frontend::start(&runtime, config).await?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            urls.push(format!("http://{}/v1/completions", listener.local_addr()?));
            let s = stop.clone();
            tokio::spawn(frontend.run(listener, async move { s.cancelled().await }));
        }
        Ok(Self {
            url: urls[0].clone(),
            urls,
            counts,
            _workers: workers,
            _stop: stop.drop_guard(),
        })
    }

    /// Requests each worker has been given so far.
    pub fn served(&self) -> Vec<usize> {
        self.counts.iter().map(|c| c.load(Ordering::SeqCst)).collect()
    }
}
