//! The [`Engine`] trait, through which a worker drives any inference engine, and the engines
//! themselves: [`EchoEngine`] and [`MockerEngine`], with the native engine to come, and
//! the paged KV block [`pool`] that engines with a KV cache share.
//!
//! An engine knows nothing of HTTP or discovery: it takes a tokenized request and streams
//! tokens back until it finishes or its cancellation token fires.

mod echo;
pub mod host;
pub mod kv_transfer;
pub mod mocker;
pub mod pool;
pub mod tiers;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use turbine_protocols::kv::{KvEvent, KvSnapshot, WorkerLoad};
use turbine_protocols::{EngineOutput, PreprocessedRequest};

pub use echo::{EchoConfig, EchoEngine};
pub use kv_transfer::{KvBlocks, KvLayout, KvTransfer};
pub use mocker::{output, scheduler, MockerConfig, MockerConfigError, MockerEngine};

/// What an engine streams: outputs, the last of which carries a `finish_reason`.
///
/// The shared scheduler's output slots are held inline, any other stream boxed: every
/// token an engine produces passes through here, and a box is one more pointer to chase
/// and one more call that cannot be inlined, per token, for the engines that produce
/// the most.
pub struct EngineStream(Outputs);

enum Outputs {
    Counted(output::OutputReader<scheduler::TokenSource>),
    Buffered(output::OutputReader<output::Buffered>),
    Boxed(BoxStream<'static, Result<EngineOutput, EngineError>>),
}

impl EngineStream {
    /// Any stream of outputs, for engines that do not use the shared scheduler's slots.
    pub fn new(stream: impl Stream<Item = Result<EngineOutput, EngineError>> + Send + 'static) -> Self {
        Self(Outputs::Boxed(Box::pin(stream)))
    }
}

impl From<output::OutputReader<scheduler::TokenSource>> for EngineStream {
    fn from(reader: output::OutputReader<scheduler::TokenSource>) -> Self {
        Self(Outputs::Counted(reader))
    }
}

impl From<output::OutputReader<output::Buffered>> for EngineStream {
    fn from(reader: output::OutputReader<output::Buffered>) -> Self {
        Self(Outputs::Buffered(reader))
    }
}

impl Stream for EngineStream {
    type Item = Result<EngineOutput, EngineError>;

    #[inline]
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match &mut self.0 {
            Outputs::Counted(r) => Pin::new(r).poll_next(cx),
            Outputs::Buffered(r) => Pin::new(r).poll_next(cx),
            Outputs::Boxed(s) => s.as_mut().poll_next(cx),
        }
    }
}

impl std::fmt::Debug for EngineStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineStream").finish_non_exhaustive()
    }
}

/// An inference engine.
///
/// Contract: a stream that ends without error ends with exactly one output whose
/// `finish_reason` is set. When `cancel` fires, the engine stops work for the request and
/// frees what it holds; the stream may then end early.
pub trait Engine: Send + Sync + 'static {
    /// Starts generating for `request`. Fails at once if the request can never be served.
    fn generate(&self, request: PreprocessedRequest, cancel: CancellationToken) -> Result<EngineStream, EngineError>;

    /// The engine's KV cache, for engines that have one: its events, load and contents.
    fn kv_cache(&self) -> Option<KvCache> {
        None
    }

    /// The engine's load, updated as it changes: its KV cache's where it has one; engines
    /// that report load without KV events (an external server's metrics) override this.
    fn load(&self) -> Option<watch::Receiver<WorkerLoad>> {
        self.kv_cache().map(|c| c.load())
    }

    /// The counters of the block manager below the engine's KV cache, if it has tiers.
    fn kvbm_stats(&self) -> Option<std::sync::Arc<turbine_kvbm::KvbmStats>> {
        None
    }

    /// Moving the engine's KV blocks to and from other engines (disaggregated serving).
    fn kv_transfer(&self) -> Option<std::sync::Arc<dyn KvTransfer>> {
        None
    }
}

/// What an engine with a KV cache exposes about it.
pub trait KvCacheSource: Send + Sync + 'static {
    /// Every KV event from now on, in order, in batches of those produced together.
    fn subscribe(&self) -> mpsc::UnboundedReceiver<Vec<KvEvent>>;
    /// The latest load, updated every step.
    fn load(&self) -> watch::Receiver<WorkerLoad>;
    /// Every cached block, consistent with the events sent so far.
    fn snapshot(&self) -> BoxFuture<'static, Result<KvSnapshot, EngineError>>;
}

/// Sends one batch of KV events to every subscriber of an engine, forgetting those that
/// are gone. The last gets the batch itself, not a copy: there is usually one subscriber,
/// and a busy engine sends a batch every step.
pub fn broadcast_events(subscribers: &mut Vec<mpsc::UnboundedSender<Vec<KvEvent>>>, events: Vec<KvEvent>) {
    if events.is_empty() {
        return;
    }
    let last = subscribers.len().saturating_sub(1);
    let mut events = Some(events);
    let mut i = 0;
    subscribers.retain(|s| {
        let batch = if i == last { events.take() } else { events.clone() };
        i += 1;
        s.send(batch.unwrap_or_default()).is_ok()
    });
}

/// A shareable handle on an engine's KV cache.
#[derive(Clone)]
pub struct KvCache(Arc<dyn KvCacheSource>);

impl KvCache {
    pub fn new(source: impl KvCacheSource) -> Self {
        Self(Arc::new(source))
    }
}

impl std::ops::Deref for KvCache {
    type Target = dyn KvCacheSource;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KvCache")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request can never be served by this engine (too long, bad token ids, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The engine stopped while the request was running.
    #[error("engine stopped")]
    Stopped,
    /// The engine cannot be reached, or stopped answering mid-request (an external server
    /// that is down or restarting): another worker may serve the request.
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    /// The engine failed the request for a reason of its own.
    #[error("engine failed: {0}")]
    Failed(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use turbine_protocols::kv::KvEventData;

    #[test]
    fn every_live_subscriber_gets_the_batch_and_the_gone_are_forgotten() {
        let (a, mut a_rx) = mpsc::unbounded_channel();
        let (gone, gone_rx) = mpsc::unbounded_channel();
        let (b, mut b_rx) = mpsc::unbounded_channel();
        drop(gone_rx);
        let mut subscribers = vec![a, gone, b];
        let batch = vec![KvEvent {
            event_id: 0,
            data: KvEventData::Cleared,
        }];
        broadcast_events(&mut subscribers, batch.clone());
        assert_eq!(subscribers.len(), 2);
        assert_eq!(a_rx.try_recv().ok(), Some(batch.clone()));
        assert_eq!(b_rx.try_recv().ok(), Some(batch));
        broadcast_events(&mut subscribers, Vec::new());
        assert!(a_rx.try_recv().is_err(), "an empty batch is not sent");
    }
}
