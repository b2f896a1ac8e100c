//! The in-process transport: the caller polls the handler's stream directly, with no
//! serialization, and dropping it cancels the handler's context.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use tokio_util::sync::DropGuard;

use super::{
    cut_by_drain, unavailable_draining, ErrorKind, Handler, InFlightGuard, RequestContext, RequestError,
    ResponseStream, ServerState,
};
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
        let stream = Guarded {
            inner: stream,
            guards: Some(Guards {
                _in_flight: in_flight,
                cancel_on_drop: token.drop_guard(),
                state: endpoint.state.clone(),
            }),
        };
        Ok(ResponseStream::local(stream))
    }
}

/// The handler's stream with what must end with it: the in-flight count, and the token
/// that cancels the request if the stream is dropped before its end.
pub(crate) struct Guarded<S> {
    // Declared, so dropped, before `inner`: a dropped stream cancels its request before the
    // handler's receiver goes, so a handler that watches its context sees the cancellation
    // rather than only a closed channel.
    guards: Option<Guards>,
    inner: S,
}

struct Guards {
    _in_flight: InFlightGuard,
    cancel_on_drop: DropGuard,
    /// Whether the end of a drain cut the request, as the TCP server tells its clients.
    state: Arc<ServerState>,
}

impl<S, T> Stream for Guarded<S>
where
    S: Stream<Item = Result<T, super::HandlerError>> + Unpin,
{
    type Item = Result<T, RequestError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.guards.is_none() {
            return Poll::Ready(None);
        }
        let cut = self.guards.as_ref().is_some_and(|g| g.state.cut_short());
        match self.inner.poll_next_unpin(cx) {
            // A handler cut by the end of a drain, however it says so, ends as the TCP
            // server ends it: `Unavailable`, so that the caller carries the request on.
            Poll::Ready(Some(Err(e))) if cut && e.kind == ErrorKind::Cancelled => {
                self.guards = None;
                Poll::Ready(Some(Err(RequestError::Handler(cut_by_drain()))))
            }
            Poll::Ready(None) if cut => {
                self.guards = None;
                Poll::Ready(Some(Err(RequestError::Handler(cut_by_drain()))))
            }
            Poll::Ready(Some(item)) => Poll::Ready(Some(item.map_err(RequestError::Handler))),
            Poll::Ready(None) => {
                // Ended by itself: complete, so nothing is cancelled.
                if let Some(g) = self.guards.take() {
                    g.cancel_on_drop.disarm();
                }
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
