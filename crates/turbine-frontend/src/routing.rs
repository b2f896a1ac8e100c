//! Sends a preprocessed request to a worker for its model, moving on to the next worker
//! when one cannot take it (draining, unreachable).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use turbine_protocols::{EngineOutput, PreprocessedRequest};
use turbine_router::{Router, RouterMode};
use turbine_runtime::{Client, Instance, ResponseStream, Runtime};

use crate::error::ApiError;
use crate::models::{ModelManager, ServedModel};

#[derive(Debug)]
pub(crate) struct Dispatcher {
    pub(crate) models: ModelManager,
    client: Client<PreprocessedRequest, EngineOutput>,
    mode: RouterMode,
    /// One router per model, so that round-robin takes turns among that model's workers.
    routers: Mutex<HashMap<String, Arc<Router>>>,
}

impl Dispatcher {
    pub(crate) fn new(runtime: &Runtime, models: ModelManager, mode: RouterMode) -> Self {
        Self {
            models,
            client: runtime.client(),
            mode,
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

    /// Starts `request` on one of `served`'s workers.
    pub(crate) async fn dispatch(
        &self,
        served: &ServedModel,
        request: PreprocessedRequest,
    ) -> Result<ResponseStream<EngineOutput>, ApiError> {
        let router = self.router(&served.card.name);
        let mut candidates: Vec<&Instance> = served.instances.iter().collect();
        let mut last_error = None;
        while !candidates.is_empty() {
            let ids: Vec<u64> = candidates.iter().map(|i| i.id.0).collect();
            let Some(chosen) = router.select(&ids) else {
                break;
            };
            let Some(pos) = candidates.iter().position(|i| i.id.0 == chosen) else {
                break;
            };
            let instance = candidates.swap_remove(pos);
            match self.client.call(instance, request.clone()).await {
                Ok(stream) => {
                    tracing::debug!(request_id = %request.request_id, worker = %instance.id, "routed");
                    return Ok(stream);
                }
                Err(e) if e.is_retryable_elsewhere() => {
                    tracing::warn!(request_id = %request.request_id, worker = %instance.id, error = %e, "worker cannot take the request; trying another");
                    last_error = Some(e);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(match last_error {
            Some(e) => e.into(),
            None => ApiError::unavailable(format!("no worker is serving model `{}`", served.card.name)),
        })
    }
}
