//! The task that follows an engine's KV event stream: subscribes, replays what it missed,
//! translates, and hands Turbine events to its subscribers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use turbine_engine::broadcast_events;
use turbine_protocols::kv::{KvEvent, KvSnapshot};

use super::translate::{Applied, KvEventStats, Translator};
use super::zmtp::{Socket, SocketType, ZmtpError};

/// Where an engine publishes its KV events, and how the router hashes blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEventsConfig {
    /// The engine's PUB socket, `tcp://HOST:PORT` (vLLM's `--kv-events-config` `endpoint`,
    /// with the host to connect to in place of `*`).
    pub endpoint: String,
    /// The engine's replay ROUTER socket, if it has one (vLLM's `replay_endpoint`).
    pub replay_endpoint: Option<String>,
    /// The topic prefix subscribed to; empty for every message.
    pub topic: String,
    /// The router's block size (the model card's `kv_block_size`): the engine must cache
    /// blocks of this many tokens.
    pub block_size: usize,
}

/// Follows one engine's KV events until cancelled. Clones share the task.
#[derive(Clone)]
pub struct KvEventFeed {
    shared: Arc<Shared>,
}

impl KvEventFeed {
    /// Spawns the task that follows the engine at `config`'s endpoints; it reconnects
    /// whenever the engine goes away, and stops when `cancel` fires.
    ///
    /// # Panics
    /// Outside a Tokio runtime, or if `config.block_size` is zero.
    pub fn start(config: KvEventsConfig, cancel: CancellationToken) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                translator: Translator::new(config.block_size),
                subscribers: Vec::new(),
                mismatch_reported: false,
            }),
            connected: AtomicBool::new(false),
        });
        tokio::spawn(follow(Arc::clone(&shared), config, cancel));
        Self { shared }
    }

    /// Every translated batch from now on, in order.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<Vec<KvEvent>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.shared.state.lock().subscribers.push(tx);
        rx
    }

    /// Every block the engine caches, as far as its events told, consistent with the events
    /// sent to subscribers so far.
    pub fn snapshot(&self) -> KvSnapshot {
        self.shared.state.lock().translator.snapshot()
    }

    pub fn stats(&self) -> KvEventStats {
        self.shared.state.lock().translator.stats()
    }

    /// Whether the feed is subscribed to the engine's stream now.
    pub fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for KvEventFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvEventFeed")
            .field("connected", &self.connected())
            .finish_non_exhaustive()
    }
}

/// Why the stream or its replay failed; logged, then retried.
#[derive(Debug, thiserror::Error)]
enum FeedError {
    #[error(transparent)]
    Zmtp(#[from] ZmtpError),
    #[error("no answer from {endpoint} within {waited:?}")]
    Timeout { endpoint: String, waited: Duration },
    #[error("{endpoint} sent a message that is not [topic, seq, payload]")]
    Message { endpoint: String },
}

struct Shared {
    /// One lock for the translator and the subscribers, so that a batch is applied and sent
    /// at once: a subscriber's first batch follows the snapshot it could have taken.
    state: Mutex<State>,
    connected: AtomicBool,
}

struct State {
    translator: Translator,
    subscribers: Vec<mpsc::UnboundedSender<Vec<KvEvent>>>,
    mismatch_reported: bool,
}

impl State {
    /// Applies one batch and sends its events. On a gap, returns the seq to replay from,
    /// or (`replay` false, nothing to replay from) starts over from this batch.
    fn apply(&mut self, seq: u64, payload: &[u8], replay: bool) -> Option<u64> {
        match self.translator.apply(seq, payload) {
            Ok(Applied::Events(events)) => {
                self.report_mismatch();
                broadcast_events(&mut self.subscribers, events);
            }
            Ok(Applied::Duplicate) => debug!(seq, "KV event batch already applied"),
            Ok(Applied::Gap { expected, got }) if replay => {
                debug!(expected, got, "KV event batches missed");
                return Some(expected);
            }
            Ok(Applied::Gap { expected, got }) => {
                warn!(
                    expected,
                    got, "KV event batches missed and not replayable: the router forgets this engine's cache"
                );
                self.reset();
                // Accepted whatever its seq after a reset: no gap again.
                return self.apply(seq, payload, false);
            }
            Err(e) => {
                // At powers of two: an engine publishing something unreadable does it every
                // step.
                let count = self.translator.stats().decode_errors;
                if count.is_power_of_two() {
                    warn!(error = %Chain(&e), count, "KV event batch skipped");
                }
            }
        }
        None
    }

    fn reset(&mut self) {
        let cleared = self.translator.reset();
        broadcast_events(&mut self.subscribers, cleared);
    }

    fn report_mismatch(&mut self) {
        if self.mismatch_reported {
            return;
        }
        if let Some(mismatch) = self.translator.stats().block_size_mismatch {
            self.mismatch_reported = true;
            error!("{mismatch}");
        }
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A connect to a host that is down can take minutes to fail on its own.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a replay may go without a message before it is given up.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(1);
/// vLLM's end of replay: seq -1 as a signed 8-byte integer.
const END_OF_REPLAY: u64 = u64::MAX;

async fn follow(shared: Arc<Shared>, config: KvEventsConfig, cancel: CancellationToken) {
    let mut backoff = BACKOFF_MIN;
    let mut failures = 0u32;
    loop {
        let connect = tokio::select! {
            () = cancel.cancelled() => return,
            r = subscribe(&config) => r,
        };
        let mut socket = match connect {
            Ok(socket) => socket,
            Err(e) => {
                // The engine is often still starting: say so once, then quietly retry.
                if failures == 0 {
                    warn!(endpoint = %config.endpoint, error = %Chain(&e), "cannot subscribe to KV events; retrying");
                } else {
                    debug!(endpoint = %config.endpoint, error = %Chain(&e), "cannot subscribe to KV events");
                }
                failures += 1;
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        failures = 0;
        shared.connected.store(true, Ordering::Relaxed);
        info!(endpoint = %config.endpoint, "subscribed to KV events");

        let knows_nothing = shared.state.lock().translator.next_seq().is_none();
        if knows_nothing {
            // What the engine cached before we came, within its replay buffer.
            catch_up(&shared, &config, 0, &cancel).await;
        }
        // After a replay, the first live batches may well be older ones, queued meanwhile:
        // only a seq going back on a new connection, without one, shows a restart.
        let mut fresh = !knows_nothing;
        let lost = loop {
            let message = tokio::select! {
                () = cancel.cancelled() => break None,
                m = socket.recv() => m,
            };
            let frames = match message {
                Ok(frames) => frames,
                Err(e) => break Some(FeedError::from(e)),
            };
            let Some((seq, payload)) = batch_of(&frames) else {
                let e = FeedError::Message {
                    endpoint: config.endpoint.clone(),
                };
                warn!(error = %e, "KV event message skipped");
                continue;
            };
            if std::mem::take(&mut fresh) {
                restart_check(&shared, &config, seq, &cancel).await;
            }
            live(&shared, &config, seq, payload, &cancel).await;
        };
        shared.connected.store(false, Ordering::Relaxed);
        match lost {
            None => return,
            Some(e) => warn!(endpoint = %config.endpoint, error = %Chain(&e), "KV event stream lost; reconnecting"),
        }
    }
}

async fn subscribe(config: &KvEventsConfig) -> Result<Socket<tokio::net::TcpStream>, FeedError> {
    let connect = async {
        let mut socket = Socket::connect(&config.endpoint, SocketType::Sub).await?;
        socket.subscribe(config.topic.as_bytes()).await?;
        Ok::<_, FeedError>(socket)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| FeedError::Timeout {
            endpoint: config.endpoint.clone(),
            waited: CONNECT_TIMEOUT,
        })?
}

/// A running publisher never goes back: a first seq lower than expected after connecting
/// again is a restarted engine, whose cache starts empty.
async fn restart_check(shared: &Shared, config: &KvEventsConfig, seq: u64, cancel: &CancellationToken) {
    let restarted = {
        let mut state = shared.state.lock();
        let restarted = state.translator.next_seq().is_some_and(|expected| seq < expected);
        if restarted {
            info!(seq, "the engine restarted: its KV cache starts empty");
            state.reset();
        }
        restarted
    };
    if restarted {
        catch_up(shared, config, 0, cancel).await;
    }
}

async fn live(shared: &Shared, config: &KvEventsConfig, seq: u64, payload: &[u8], cancel: &CancellationToken) {
    let replay = config.replay_endpoint.is_some();
    let Some(from) = shared.state.lock().apply(seq, payload, replay) else {
        return;
    };
    catch_up(shared, config, from, cancel).await;
    // Covered by the replay now, unless it fell short: then there is nothing more to ask.
    shared.state.lock().apply(seq, payload, false);
}

/// Replays the engine's buffered batches from `from` on, if it has a replay endpoint. Where
/// the replay cannot fill a gap the translator starts over, so the router never holds a
/// cache state with holes.
async fn catch_up(shared: &Shared, config: &KvEventsConfig, from: u64, cancel: &CancellationToken) {
    let Some(endpoint) = &config.replay_endpoint else {
        return;
    };
    let replayed = tokio::select! {
        () = cancel.cancelled() => return,
        r = replay(endpoint, from) => r,
    };
    match replayed {
        Ok(batches) => {
            debug!(from, batches = batches.len(), "KV event batches replayed");
            let mut state = shared.state.lock();
            for (seq, payload) in batches {
                state.apply(seq, &payload, false);
            }
        }
        // The live batch that follows finds the gap still there and starts over.
        Err(e) => warn!(endpoint = %endpoint, from, error = %Chain(&e), "KV event replay failed"),
    }
}

/// Asks the engine's ROUTER for every batch it still has from `from` on.
async fn replay(endpoint: &str, from: u64) -> Result<Vec<(u64, Bytes)>, FeedError> {
    let timeout = || FeedError::Timeout {
        endpoint: endpoint.to_owned(),
        waited: REPLAY_TIMEOUT,
    };
    let mut socket = tokio::time::timeout(REPLAY_TIMEOUT, Socket::connect(endpoint, SocketType::Dealer))
        .await
        .map_err(|_| timeout())??;
    socket.send(&[b"", &from.to_be_bytes()]).await?;
    let mut batches = Vec::new();
    loop {
        let frames = tokio::time::timeout(REPLAY_TIMEOUT, socket.recv())
            .await
            .map_err(|_| timeout())??;
        // The DEALER sees what the ROUTER sent after the client's identity: an empty
        // delimiter, the seq, the payload.
        let Some((seq, payload)) = batch_of(&frames).filter(|_| frames.first().is_some_and(Bytes::is_empty)) else {
            return Err(FeedError::Message {
                endpoint: endpoint.to_owned(),
            });
        };
        if seq == END_OF_REPLAY {
            return Ok(batches);
        }
        batches.push((seq, payload.clone()));
    }
}

/// `[topic or delimiter, seq as 8 bytes big-endian, payload]`.
fn batch_of(frames: &[Bytes]) -> Option<(u64, &Bytes)> {
    let [_, seq, payload] = frames else {
        return None;
    };
    let seq: [u8; 8] = seq.as_ref().try_into().ok()?;
    Some((u64::from_be_bytes(seq), payload))
}

/// An error with its sources, for logs.
struct Chain<'e>(&'e (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}
