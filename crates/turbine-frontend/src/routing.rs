//! Sends a preprocessed request to a worker for its model, moving on to the next worker
//! when one cannot take it (draining, unreachable). In `kv` mode the worker is chosen by
//! cache overlap and load, and the request is tracked until it ends.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use turbine_protocols::{EngineOutput, PreprocessedRequest};
use turbine_router::{Router, RouterMode};
use turbine_runtime::{Client, Instance, RequestError, ResponseStream, Runtime};

use crate::error::ApiError;
use crate::kv_routing::KvRouter;
use crate::models::{ModelManager, ServedModel};

pub(crate) type Outputs = BoxStream<'static, Result<EngineOutput, RequestError>>;

#[derive(Debug)]
pub(crate) struct Dispatcher {
    pub(crate) models: ModelManager,
    client: Client<PreprocessedRequest, EngineOutput>,
    mode: RouterMode,
    kv: Option<Arc<KvRouter>>,
    /// One router per model, so that round-robin takes turns among that model's workers.
    routers: Mutex<HashMap<String, Arc<Router>>>,
}

impl Dispatcher {
    pub(crate) fn new(runtime: &Runtime, models: ModelManager, mode: RouterMode, kv: Option<Arc<KvRouter>>) -> Self {
        Self {
            models,
            client: runtime.client(),
            mode,
            kv,
            routers: Mutex::default(),
        }
    }

    /// The model's card and workers, or the error a client should see for it.
    pub(crate) fn model(&self, name: &str) -> Result<ServedModel, ApiError> {
        self.models
            .snapshot()
            .models
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::model_not_found(name))
    }

    fn router(&self, model: &str) -> Arc<Router> {
        let mut routers = self.routers.lock().unwrap_or_else(|e| e.into_inner());
        routers
            .entry(model.to_owned())
            .or_insert_with(|| Arc::new(Router::new(self.mode)))
            .clone()
    }

    /// Picks a worker among `candidates`; in `kv` mode, also records the request as routed.
    fn pick(
        &self,
        served: &ServedModel,
        candidates: &[&Instance],
        request: &PreprocessedRequest,
    ) -> Option<(usize, bool)> {
        if let (Some(kv), Some(block_size)) = (&self.kv, served.card.kv_block_size) {
            let decision = kv.choose(served, candidates, &request.token_ids)?;
            let chosen = decision.candidates.iter().find(|c| c.worker == decision.worker)?;
            tracing::debug!(
                request_id = %request.request_id,
                worker = decision.worker,
                candidates = ?decision.candidates.iter().map(|c| (c.worker, c.overlap_blocks, c.cost)).collect::<Vec<_>>(),
                "kv routing decision (worker, overlap blocks, cost)"
            );
            let isl = request.token_ids.len() as u64;
            let cached = (u64::from(chosen.overlap_blocks) * u64::from(block_size)).min(isl);
            kv.routed(
                &request.request_id,
                decision.worker,
                isl - cached,
                isl.div_ceil(u64::from(block_size)),
            );
            let pos = candidates.iter().position(|i| i.id.0 == decision.worker)?;
            return Some((pos, true));
        }
        let ids: Vec<u64> = candidates.iter().map(|i| i.id.0).collect();
        let chosen = self.router(&served.card.name).select(&ids)?;
        Some((candidates.iter().position(|i| i.id.0 == chosen)?, false))
    }

    /// Starts `request` on one of `served`'s workers.
    pub(crate) async fn dispatch(
        &self,
        served: &ServedModel,
        request: PreprocessedRequest,
    ) -> Result<Outputs, ApiError> {
        let mut candidates: Vec<&Instance> = served.instances.iter().collect();
        let mut last_error = None;
        while !candidates.is_empty() {
            let Some((pos, tracked)) = self.pick(served, &candidates, &request) else {
                break;
            };
            let instance = candidates.swap_remove(pos);
            let untrack = |kv: &Option<Arc<KvRouter>>| {
                if let (true, Some(kv)) = (tracked, kv) {
                    kv.ended(&request.request_id);
                }
            };
            match self.client.call(instance, request.clone()).await {
                Ok(stream) => {
                    tracing::debug!(request_id = %request.request_id, worker = %instance.id, "routed");
                    return Ok(match (&self.kv, tracked) {
                        (Some(kv), true) => Tracked {
                            inner: stream,
                            kv: kv.clone(),
                            request_id: request.request_id,
                            first: true,
                        }
                        .boxed(),
                        _ => stream.boxed(),
                    });
                }
                Err(e) if e.is_retryable_elsewhere() => {
                    untrack(&self.kv);
                    tracing::warn!(request_id = %request.request_id, worker = %instance.id, error = %e, "worker cannot take the request; trying another");
                    last_error = Some(e);
                }
                Err(e) => {
                    untrack(&self.kv);
                    return Err(e.into());
                }
            }
        }
        Err(match last_error {
            Some(e) => e.into(),
            None => ApiError::unavailable(format!("no worker is serving model `{}`", served.card.name)),
        })
    }
}

/// A routed request's outputs, telling the KV router when its prefill is done (the first
/// output) and when it ends (the stream dropped, finished or not).
struct Tracked {
    inner: ResponseStream<EngineOutput>,
    kv: Arc<KvRouter>,
    request_id: String,
    first: bool,
}

impl Stream for Tracked {
    type Item = Result<EngineOutput, RequestError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = futures::ready!(self.inner.poll_next_unpin(cx));
        if self.first && matches!(item, Some(Ok(_))) {
            self.first = false;
            self.kv.first_token(&self.request_id);
        }
        Poll::Ready(item)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.kv.ended(&self.request_id);
    }
}
