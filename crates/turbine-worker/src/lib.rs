//! A worker: serves an [`Engine`] on a runtime endpoint and registers the model it serves,
//! so that frontends find it through discovery.
//!
//! The worker owns the seam between the request plane and the engine: it turns the
//! handler's cancellation into the engine's, and engine errors into handler errors.

use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use turbine_engine::{Engine, EngineError};
use turbine_protocols::discovery::{model_key, ModelEntry};
use turbine_protocols::{EngineOutput, ModelCard, PreprocessedRequest};
use turbine_runtime::{
    EndpointId, EndpointServer, ErrorKind, Handler, HandlerError, Instance, RequestContext,
    Runtime, ServeError, ServeOptions,
};

/// Everything a worker needs to know, parsed once by the binary.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Where generate requests are served.
    pub endpoint: EndpointId,
    pub model: ModelCard,
    pub serve: ServeOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot serve the generate endpoint")]
    Serve(#[from] ServeError),
}

/// A running worker; [`Worker::run`] serves it until shutdown.
#[derive(Debug)]
pub struct Worker {
    server: EndpointServer<PreprocessedRequest, EngineOutput>,
}

impl Worker {
    /// Serves `engine` and registers the model; frontends can route to it on return.
    pub async fn start(
        runtime: &Runtime,
        engine: Arc<dyn Engine>,
        config: WorkerConfig,
    ) -> Result<Self, WorkerError> {
        let handler = Arc::new(EngineHandler { engine });
        let server =
            EndpointServer::start(runtime, config.endpoint.clone(), handler, config.serve).await?;
        let entry = ModelEntry {
            card: config.model.clone(),
            endpoint: config.endpoint.to_string(),
        };
        let key = model_key(
            &config.endpoint.namespace,
            &config.model.name,
            server.instance().id.0,
        );
        // A struct of strings and numbers always serializes.
        server
            .register(key, serde_json::to_vec(&entry).unwrap_or_default())
            .await?;
        tracing::info!(model = %config.model.name, instance = %server.instance().id, "model registered");
        Ok(Self { server })
    }

    pub fn instance(&self) -> &Instance {
        self.server.instance()
    }

    /// Requests being served now.
    pub fn in_flight(&self) -> usize {
        self.server.in_flight()
    }

    /// Serves until `shutdown` completes, then deregisters and drains (see [`EndpointServer::run`]).
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        self.server.run(shutdown).await
    }
}

struct EngineHandler {
    engine: Arc<dyn Engine>,
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
        let stream = self
            .engine
            .generate(request, ctx.token())
            .map_err(handler_error)?;
        Ok(stream.map(|r| r.map_err(handler_error)).boxed())
    }
}

fn handler_error(e: EngineError) -> HandlerError {
    let kind = match e {
        EngineError::InvalidRequest(_) => ErrorKind::InvalidRequest,
        EngineError::Stopped => ErrorKind::Unavailable,
    };
    HandlerError::new(kind, e.to_string())
}
