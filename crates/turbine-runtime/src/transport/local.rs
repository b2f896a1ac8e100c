//! The in-process transport: the caller polls the handler's stream directly, with no
//! serialization, and dropping it cancels the handler's context.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use tokio_util::sync::DropGuard;

use super::{unavailable_draining, Handler, InFlightGuard, RequestContext, RequestError, ResponseStream, ServerState};
use crate::{EndpointId, InstanceId};

/// Handlers served in this process, by endpoint and instance (one instance id may serve
/// several endpoints). Type-erased because one process serves
/// endpoints of many request types; a caller recovers the type it asks for.
#[derive(Debug, Default)]
pub(crate) struct LocalRegistry {
    handlers: Mutex<HashMap<Key, Arc<dyn Any + Send + Sync>>>,
}

pub(crate) struct LocalEndpoint<Req, Resp> {
    pub(crate) handler: Arc<dyn Handler<Req, Resp>>,
    pub(crate) state: Arc<ServerState>,
}

type Key = (EndpointId, InstanceId);

impl LocalRegistry {
    pub(crate) fn insert<Req: 'static, Resp: 'static>(&self, key: Key, endpoint: LocalEndpoint<Req, Resp>) {
        self.lock().insert(key, Arc::new(endpoint));
    }

    pub(crate) fn remove(&self, key: &Key) {
        self.lock().remove(key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Arc<dyn Any + Send + Sync>>> {
        self.handlers.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) async fn call<Req, Resp>(
        &self,
        endpoint: &EndpointId,
        id: InstanceId,
        request: Req,
    ) -> Result<ResponseStream<Resp>, RequestError>
    where
        Req: Send + 'static,
        Resp: Send + 'static,
    {
        let any = self
            .lock()
            .get(&(endpoint.clone(), id))
            .cloned()
            .ok_or(RequestError::NoLocalHandler { instance: id })?;
        let endpoint = any
            .downcast::<LocalEndpoint<Req, Resp>>()
            .map_err(|_| RequestError::NoLocalHandler { instance: id })?;
        let in_flight = endpoint.state.begin().ok_or_else(unavailable_draining)?;
        let token = endpoint.state.request_token();
        let stream = endpoint
            .handler
            .handle(request, RequestContext::new(token.clone()))
            .await?;
        let guards = Guards {
            _in_flight: in_flight,
            cancel_on_drop: token.drop_guard(),
        };
        // The guards live as long as the stream is polled and end with it: when it ends by
        // itself the request is complete and nothing is cancelled.
        let stream = futures::stream::unfold(Some((stream, guards)), |state| async move {
            let (mut stream, guards) = state?;
            match stream.next().await {
                Some(item) => Some((item.map_err(RequestError::Handler), Some((stream, guards)))),
                None => {
                    guards.cancel_on_drop.disarm();
                    None
                }
            }
        });
        Ok(ResponseStream::new(stream.boxed()))
    }
}

struct Guards {
    _in_flight: InFlightGuard,
    cancel_on_drop: DropGuard,
}
