//! A worker: serves an [`Engine`] on a runtime endpoint and registers the model it serves,
//! so that frontends find it through discovery.
//!
//! The worker owns the seam between the request plane and the engine: it turns the
//! handler's cancellation into the engine's, and engine errors into handler errors. For
//! engines with a KV cache it also publishes their KV events and load on the event plane,
//! keeps the most recent events, and answers routers that need to resynchronise.

pub mod disagg;
mod kv;
mod kvbm_metrics;
pub mod metrics;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio_util::sync::{CancellationToken, DropGuard};
use turbine_engine::{Engine, EngineError};
use turbine_protocols::discovery::{model_key, transfer_agent_key, ModelEntry};
use turbine_protocols::kv::{KvStateRequest, KvStateResponse};
use turbine_protocols::{Disagg as Disagg_, EngineOutput, ModelCard, PreprocessedRequest, WorkerRole};

pub use disagg::{Directory, Disagg, DisaggConfig, DisaggError, DisaggStats, StagingSize};
pub use metrics::{MetricsSource, MetricsSources, WorkerMetrics};
use turbine_runtime::{
    DiscoveryError, EndpointId, EndpointServer, ErrorKind, Handler, HandlerError, Instance, InstanceId, Registration,
    RequestContext, Runtime, ServeError, ServeOptions,
};

/// Everything a worker needs to know, parsed once by the binary.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Where generate requests are served. KV state is served beside it, as
    /// `{namespace}/{component}/kv_state`.
    pub endpoint: EndpointId,
    pub model: ModelCard,
    pub serve: ServeOptions,
    /// Shortest interval between two load reports.
    pub load_report_interval: Duration,
    /// Set for a worker with a role in disaggregated serving (prefill or decode).
    pub disagg: Option<DisaggConfig>,
}

/// Recent KV events a worker keeps, so that a router that missed a few can catch up
/// without a full snapshot.
pub const KV_EVENT_HISTORY: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot serve the worker's endpoints")]
    Serve(#[from] ServeError),
    #[error("cannot take part in disaggregated serving")]
    Disagg(#[from] DisaggError),
    #[error("cannot publish the transfer agent")]
    PublishAgent(#[source] DiscoveryError),
}

/// A running worker; [`Worker::run`] serves it until shutdown.
#[derive(Debug)]
pub struct Worker {
    generate: EndpointServer<PreprocessedRequest, EngineOutput>,
    kv_state: Option<EndpointServer<KvStateRequest, KvStateResponse>>,
    disagg: Option<Arc<Disagg>>,
    /// The transfer agent's key in discovery: kept through the drain, while decode workers
    /// may still read what this worker staged, and revoked once it has stopped.
    agent_key: Option<Registration>,
    load: Option<tokio::sync::watch::Receiver<turbine_protocols::kv::WorkerLoad>>,
    kvbm: Option<Arc<turbine_kvbm::KvbmStats>>,
    _publishers: DropGuard,
}

impl Worker {
    /// Serves `engine` and registers the model; frontends can route to it on return.
    pub async fn start(runtime: &Runtime, engine: Arc<dyn Engine>, config: WorkerConfig) -> Result<Self, WorkerError> {
        let id = config.serve.instance_id.unwrap_or_else(InstanceId::random);
        let serve = ServeOptions {
            instance_id: Some(id),
            ..config.serve.clone()
        };
        let stop_publishers = CancellationToken::new();

        let load = engine.load();
        let kvbm = engine.kvbm_stats();
        let publish = kv::Publish {
            namespace: config.endpoint.namespace.clone(),
            model: config.model.name.clone(),
            worker: id.0,
            load_interval: config.load_report_interval,
        };
        if let Some(load) = &load {
            kv::publish_load(runtime, load.clone(), &publish, stop_publishers.clone());
        }
        let kv_state = match engine.kv_cache() {
            Some(cache) => {
                let history = kv::start_publishing(runtime, &cache, &publish, stop_publishers.clone());
                let endpoint = EndpointId::new(&config.endpoint.namespace, &config.endpoint.component, "kv_state");
                let handler = Arc::new(kv::KvStateHandler { cache, history });
                Some(EndpointServer::start(runtime, endpoint, handler, serve.clone()).await?)
            }
            None => None,
        };

        let disagg = match &config.disagg {
            Some(d) if !d.role.is_aggregated() => Some(Disagg::start(
                engine.as_ref(),
                &format!("{}-{id}", config.endpoint.component),
                &config.model.name,
                d.clone(),
                disagg::Directory::new(runtime.discovery().clone(), &config.endpoint.namespace),
                stop_publishers.clone(),
            )?),
            _ => None,
        };
        let agent_key = match &disagg {
            Some(d) => {
                let key = Registration::start(runtime, config.serve.lease_ttl)
                    .await
                    .map_err(WorkerError::PublishAgent)?;
                let name = transfer_agent_key(&config.endpoint.namespace, d.agent().metadata().uid);
                key.put(name, d.agent_json()).await.map_err(WorkerError::PublishAgent)?;
                Some(key)
            }
            None => None,
        };
        let role = disagg.as_ref().map(|d| d.role()).unwrap_or_default();
        let handler = Arc::new(EngineHandler {
            engine,
            disagg: disagg.clone(),
        });
        let generate = EndpointServer::start(runtime, config.endpoint.clone(), handler, serve).await?;
        let entry = ModelEntry {
            card: config.model.clone(),
            endpoint: config.endpoint.to_string(),
            kv_state_endpoint: kv_state.as_ref().map(|s| s.instance().endpoint.to_string()),
            role,
        };
        let key = model_key(&config.endpoint.namespace, &config.model.name, id.0);
        // A struct of strings and numbers always serializes.
        generate
            .register(key, serde_json::to_vec(&entry).unwrap_or_default())
            .await?;
        tracing::info!(model = %config.model.name, instance = %id, kv_events = kv_state.is_some(), ?role, "model registered");
        Ok(Self {
            generate,
            kv_state,
            disagg,
            agent_key,
            load,
            kvbm,
            _publishers: stop_publishers.drop_guard(),
        })
    }

    pub fn instance(&self) -> &Instance {
        self.generate.instance()
    }

    /// Requests being served now.
    pub fn in_flight(&self) -> usize {
        self.generate.in_flight()
    }

    /// Its part in disaggregated serving, if it has one.
    pub fn disagg(&self) -> Option<&Arc<Disagg>> {
        self.disagg.as_ref()
    }

    /// What its metrics are read from, for a [`WorkerMetrics`].
    pub fn metrics_source(&self) -> MetricsSource {
        MetricsSource {
            label: self.instance().id.to_string(),
            load: self.load.clone(),
            disagg: self.disagg.clone(),
            kvbm: self.kvbm.clone(),
        }
    }

    /// Serves until `shutdown` completes, then deregisters and drains (see [`EndpointServer::run`]).
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        shutdown.await;
        let Self {
            generate,
            kv_state,
            disagg,
            agent_key,
            _publishers,
            ..
        } = self;
        let kv = async {
            if let Some(s) = kv_state {
                s.run(async {}).await
            }
        };
        futures::join!(generate.run(async {}), kv);
        // Blocks staged for decode workers stay readable until they are read or their
        // leases expire: a prefill worker that stopped taking requests waits for both.
        if let Some(d) = disagg {
            let deadline = tokio::time::Instant::now() + d.lease_duration();
            while d.leases() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        if let Some(key) = agent_key {
            if let Err(e) = key.revoke().await {
                tracing::warn!(error = %e, "removing the transfer agent from discovery failed: it expires with its lease");
            }
        }
    }
}

struct EngineHandler {
    engine: Arc<dyn Engine>,
    disagg: Option<Arc<Disagg>>,
}

#[async_trait]
impl Handler<PreprocessedRequest, EngineOutput> for EngineHandler {
    async fn handle(
        &self,
        request: PreprocessedRequest,
        ctx: RequestContext,
    ) -> Result<BoxStream<'static, Result<EngineOutput, HandlerError>>, HandlerError> {
        let request_id = request.request_id.clone();
        tracing::debug!(%request_id, prompt_tokens = request.token_ids.len(), "generate");
        let mut request = request;
        let cancel = ctx.token();
        match (request.disagg.take(), &self.disagg) {
            (None, _) => {}
            (Some(Disagg_::Prefill), Some(d)) if d.role() == WorkerRole::Prefill => {
                let output = tokio::select! {
                    out = d.prefill(self.engine.as_ref(), request, ctx.token()) => out.map_err(handler_error)?,
                    () = cancel.cancelled() => return Err(HandlerError::new(ErrorKind::Cancelled, "cancelled during prefill")),
                };
                return Ok(futures::stream::once(async move { Ok(output) }).boxed());
            }
            (Some(Disagg_::Prefill), _) => {
                return Err(HandlerError::new(
                    ErrorKind::InvalidRequest,
                    "this worker is not a prefill worker",
                ));
            }
            (Some(Disagg_::Decode { kv }), Some(d)) => {
                let fetched = tokio::select! {
                    f = d.fetch(&request.token_ids, &kv) => f,
                    () = cancel.cancelled() => return Err(HandlerError::new(ErrorKind::Cancelled, "cancelled while fetching KV")),
                };
                match fetched {
                    Ok(blocks) => tracing::debug!(%request_id, blocks, "fetched KV from the prefill worker"),
                    Err(e) => tracing::warn!(%request_id, error = %e, "fetching KV failed; prefilling here"),
                }
            }
            // A decode request to a worker without a transfer agent: it prefills itself.
            (Some(Disagg_::Decode { .. }), None) => {}
        }
        let stream = self.engine.generate(request, ctx.token()).map_err(handler_error)?;
        Ok(stream.map(|r| r.map_err(handler_error)).boxed())
    }
}

pub(crate) fn handler_error(e: EngineError) -> HandlerError {
    let kind = match e {
        EngineError::InvalidRequest(_) => ErrorKind::InvalidRequest,
        EngineError::Stopped | EngineError::Unavailable(_) => ErrorKind::Unavailable,
        EngineError::Failed(_) => ErrorKind::Internal,
    };
    HandlerError::new(kind, e.to_string())
}
