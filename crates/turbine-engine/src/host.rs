//! What every engine built on the shared scheduler does the same way around its loop: the
//! handle that admits requests (an output slot per sequence, a watcher that turns the
//! request's cancellation into a message) and answers for the KV cache, and the loop's side
//! of those messages. Each engine keeps only its loop and its own messages (`X`).
//!
//! `K` is how a sequence's readers learn token values (see [`output`](crate::output)), `A`
//! what else an engine keeps per sequence (the native engine's sampler).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use turbine_protocols::kv::{KvEvent, KvSnapshot, WorkerLoad};

use crate::output::{output_slot, OutputReader, OutputWriter, TokenValues};
use crate::scheduler::{Scheduler, SeqId, SeqSpec, SeqTokens};
use crate::{EngineError, EngineStream, KvCacheSource};

/// A message to an engine's loop.
pub enum Command<K: TokenValues, A, X> {
    /// A new sequence, whose tokens go to `sink`.
    Add {
        id: SeqId,
        spec: SeqSpec,
        sink: Sink<K, A>,
    },
    /// The request was cancelled: free its blocks at once.
    Cancel(SeqId),
    Subscribe(mpsc::UnboundedSender<Vec<KvEvent>>),
    Snapshot(oneshot::Sender<KvSnapshot>),
    /// The engine's own messages.
    Other(X),
}

/// Where a sequence's tokens go, what the engine keeps beside (`extra`), and what ends the
/// sequence's cancellation watcher when dropped.
pub struct Sink<K: TokenValues, A> {
    pub out: OutputWriter<K>,
    pub extra: A,
    _done: oneshot::Sender<()>,
}

/// The engine's side of its handle: admits requests and answers for the KV cache. Cloning
/// shares the engine, whose loop ends when every clone (and every watcher) is gone.
pub struct EngineHandle<K: TokenValues, A, X> {
    tx: mpsc::UnboundedSender<Command<K, A, X>>,
    load: watch::Receiver<WorkerLoad>,
    next_id: Arc<AtomicU64>,
}

impl<K: TokenValues, A, X> Clone for EngineHandle<K, A, X> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            load: self.load.clone(),
            next_id: self.next_id.clone(),
        }
    }
}

impl<K: TokenValues, A, X> std::fmt::Debug for EngineHandle<K, A, X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle").finish_non_exhaustive()
    }
}

/// What the loop owns: the messages to serve, and where to publish its load.
pub struct LoopEnds<K: TokenValues, A, X> {
    pub commands: mpsc::UnboundedReceiver<Command<K, A, X>>,
    pub load: watch::Sender<WorkerLoad>,
}

impl<K, A, X> EngineHandle<K, A, X>
where
    K: TokenValues,
    A: Send + 'static,
    X: Send + 'static,
    OutputReader<K>: Into<EngineStream>,
{
    /// A handle, and the ends its loop serves; `load` is the load before any request.
    pub fn new(load: WorkerLoad) -> (Self, LoopEnds<K, A, X>) {
        let (tx, commands) = mpsc::unbounded_channel();
        let (load_tx, load) = watch::channel(load);
        let handle = Self {
            tx,
            load,
            next_id: Arc::default(),
        };
        (
            handle,
            LoopEnds {
                commands,
                load: load_tx,
            },
        )
    }

    /// Wakes the loop with `Command::Other(make())`, from any thread, without keeping it
    /// alive: the loop still ends when every handle is gone.
    pub fn waker(&self, make: impl Fn() -> X + Send + Sync + 'static) -> Arc<dyn Fn() + Send + Sync>
    where
        Command<K, A, X>: Send,
    {
        let weak = self.tx.downgrade();
        Arc::new(move || {
            if let Some(tx) = weak.upgrade() {
                let _ = tx.send(Command::Other(make()));
            }
        })
    }

    /// The id the next sequence will have, for engines whose tokens depend on it.
    pub fn next_id(&self) -> SeqId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Admits sequence `id` (from [`Self::next_id`]): its readers learn token values through
    /// `values`, and `cancel` firing frees it.
    pub fn submit(
        &self,
        id: SeqId,
        spec: SeqSpec,
        values: K,
        extra: A,
        cancel: CancellationToken,
    ) -> Result<EngineStream, EngineError> {
        let (out, reader) = output_slot(values);
        let (done, done_rx) = oneshot::channel();
        let sink = Sink {
            out,
            extra,
            _done: done,
        };
        self.tx
            .send(Command::Add { id, spec, sink })
            .map_err(|_| EngineError::Stopped)?;
        // Forwards the cancellation to the loop; ends with the sequence.
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => { let _ = tx.send(Command::Cancel(id)); }
                _ = done_rx => {}
            }
        });
        Ok(reader.into())
    }

    /// Sends the loop one of the engine's own messages.
    pub fn send(&self, message: X) -> Result<(), EngineError> {
        self.tx.send(Command::Other(message)).map_err(|_| EngineError::Stopped)
    }

    /// Sends the loop a message made around a reply channel, and waits for the reply.
    pub async fn ask<R>(&self, message: impl FnOnce(tokio::sync::oneshot::Sender<R>) -> X) -> Result<R, EngineError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(message(reply))?;
        rx.await.map_err(|_| EngineError::Stopped)
    }
}

impl<K, A, X> KvCacheSource for EngineHandle<K, A, X>
where
    K: TokenValues,
    A: Send + 'static,
    X: Send + 'static,
{
    fn subscribe(&self) -> mpsc::UnboundedReceiver<Vec<KvEvent>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = self.tx.send(Command::Subscribe(tx));
        rx
    }

    fn load(&self) -> watch::Receiver<WorkerLoad> {
        self.load.clone()
    }

    fn snapshot(&self) -> BoxFuture<'static, Result<KvSnapshot, EngineError>> {
        let (tx, rx) = oneshot::channel();
        let sent = self.tx.send(Command::Snapshot(tx));
        Box::pin(async move {
            sent.map_err(|_| EngineError::Stopped)?;
            rx.await.map_err(|_| EngineError::Stopped)
        })
    }
}

/// Applies the messages every engine answers alike to its scheduler, KV event subscribers
/// and the tiers below its pool, if it has them; hands back the engine's own.
pub fn apply<K, A, X, S>(
    command: Command<K, A, X>,
    scheduler: &mut Scheduler<Sink<K, A>, S>,
    subscribers: &mut Vec<mpsc::UnboundedSender<Vec<KvEvent>>>,
    tiers: Option<&crate::tiers::Tiers>,
) -> Option<X>
where
    K: TokenValues,
    S: SeqTokens,
{
    match command {
        Command::Add { id, spec, sink } => scheduler.add(id, spec, sink),
        Command::Cancel(id) => {
            scheduler.cancel(id);
        }
        Command::Subscribe(tx) => subscribers.push(tx),
        Command::Snapshot(reply) => {
            // Events are flushed after every change, so the snapshot and the events already
            // sent agree on `last_event_id`; the tiers' changes are numbered in the same stream.
            let mut snapshot = scheduler.snapshot();
            if let Some(tiers) = tiers {
                tiers.extend_snapshot(&mut snapshot);
            }
            let _ = reply.send(snapshot);
        }
        Command::Other(x) => return Some(x),
    }
    None
}
