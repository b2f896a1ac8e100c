//! Publishing an engine's KV events and load on the event plane, and answering routers
//! that ask for what they missed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use turbine_engine::KvCache;
use turbine_protocols::discovery::{kv_events_subject, load_subject};
use turbine_protocols::kv::{KvEvent, KvEventMessage, KvStateRequest, KvStateResponse, LoadMessage};
use turbine_runtime::{Handler, HandlerError, RequestContext, Runtime};

use crate::{handler_error, KV_EVENT_HISTORY};

pub(crate) struct Publish {
    pub(crate) namespace: String,
    pub(crate) model: String,
    pub(crate) worker: u64,
    pub(crate) load_interval: Duration,
}

pub(crate) type History = Arc<Mutex<VecDeque<KvEvent>>>;

/// Starts the task that publishes `cache`'s events until `stop` fires; returns the history of
/// recent events that it keeps.
pub(crate) fn start_publishing(runtime: &Runtime, cache: &KvCache, p: &Publish, stop: CancellationToken) -> History {
    let history: History = Arc::default();
    let events = runtime.events().clone();
    let subject = kv_events_subject(&p.namespace, &p.model);
    let mut rx = cache.subscribe();
    let kept = history.clone();
    let worker = p.worker;
    tokio::spawn(async move {
        loop {
            let batch = tokio::select! {
                _ = stop.cancelled() => return,
                e = rx.recv() => match e { Some(e) => e, None => return },
            };
            let message = KvEventMessage { worker, events: batch };
            let payload = Bytes::from(message.to_bytes());
            {
                // In the history before they are published, so that a router that sees a
                // gap when they arrive finds everything up to them there; moved, not
                // copied, once serialized.
                let mut h = kept.lock().unwrap_or_else(|e| e.into_inner());
                for event in message.events {
                    if h.len() == KV_EVENT_HISTORY {
                        h.pop_front();
                    }
                    h.push_back(event);
                }
            }
            if let Err(e) = events.publish(&subject, payload).await {
                // Routers notice the gap in event ids and resynchronise.
                tracing::warn!(error = %e, "publishing KV events failed");
            }
        }
    });

    history
}

/// Starts the task that publishes an engine's load, at most once per interval, until `stop`
/// fires. Engines without KV events report load too (an external server's metrics).
pub(crate) fn publish_load(
    runtime: &Runtime,
    mut load: tokio::sync::watch::Receiver<turbine_protocols::kv::WorkerLoad>,
    p: &Publish,
    stop: CancellationToken,
) {
    let events = runtime.events().clone();
    let subject = load_subject(&p.namespace, &p.model);
    let worker = p.worker;
    let interval = p.load_interval;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = load.changed() => if changed.is_err() { return },
            }
            let message = LoadMessage {
                worker,
                load: *load.borrow_and_update(),
            };
            let payload = Bytes::from(serde_json::to_vec(&message).unwrap_or_default());
            if let Err(e) = events.publish(&subject, payload).await {
                tracing::warn!(error = %e, "publishing a load report failed");
            }
            // Coalesce the changes of the next interval into one report.
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    });
}

pub(crate) struct KvStateHandler {
    pub(crate) cache: KvCache,
    pub(crate) history: History,
}

#[async_trait]
impl Handler<KvStateRequest, KvStateResponse> for KvStateHandler {
    async fn handle(
        &self,
        request: KvStateRequest,
        _ctx: RequestContext,
    ) -> Result<BoxStream<'static, Result<KvStateResponse, HandlerError>>, HandlerError> {
        let recent = request.after_event_id.and_then(|after| {
            let h = self.history.lock().unwrap_or_else(|e| e.into_inner());
            // The history serves the request only if it still holds the event right after.
            let first = h.front()?.event_id;
            (first <= after.saturating_add(1)).then(|| h.iter().filter(|e| e.event_id > after).cloned().collect())
        });
        let response = match recent {
            Some(events) => KvStateResponse::Events { events },
            None => KvStateResponse::Snapshot {
                snapshot: self.cache.snapshot().await.map_err(handler_error)?,
            },
        };
        Ok(futures::stream::once(async move { Ok(response) }).boxed())
    }
}
