//! [`ExternalEngine`]: a server reached over HTTP, driven through the [`Engine`] trait.
//!
//! Each request is one streaming POST; dropping it (the caller went away, a stop token)
//! closes the connection, which vLLM and llama.cpp take as an abort, and SGLang is also sent
//! its `/abort_request`. A server that cannot be reached, or whose stream breaks before the
//! request finished, fails the request as unavailable, which the frontend retries on another
//! worker or migrates mid-stream. A poller reads the server's health and metrics.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use turbine_engine::{Engine, EngineError, EngineStream, KvCache, KvCacheSource};
use turbine_protocols::kv::{KvEvent, KvSnapshot, WorkerLoad};
use turbine_protocols::{EngineOutput, FinishReason, PreprocessedRequest};

use crate::kv_events::{KvEventFeed, KvEventsConfig};
use crate::protocol::{self, ServerKind, StreamState};
use crate::sse::SseDecoder;
use crate::{metrics, ExternalError};

/// How to reach a server and what to expect of it.
#[derive(Debug, Clone)]
pub struct ExternalConfig {
    pub kind: ServerKind,
    /// `http://host:port`, without a trailing path.
    pub url: String,
    /// How often health and metrics are read.
    pub poll_interval: Duration,
    /// How long `connect` waits for a server that is still starting (loading its model).
    pub startup_timeout: Duration,
    /// The router's tokens per KV block; a server that reports another block size is refused.
    pub block_size: u32,
    /// The server's KV event stream, where it publishes one.
    pub kv_events: Option<KvEventsConfig>,
}

/// What the server says it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// The first model `/v1/models` lists: the name the server answers to.
    pub model: String,
    /// Where the server loaded it from, where it says and that path exists here (a
    /// tokenizer can be read from it).
    pub model_path: Option<String>,
    /// Tokens of context per sequence, where the server says.
    pub context_length: Option<u32>,
}

/// An external server as an engine.
#[derive(Clone)]
pub struct ExternalEngine {
    inner: Arc<Inner>,
}

struct Inner {
    kind: ServerKind,
    url: String,
    http: reqwest::Client,
    info: ServerInfo,
    healthy: watch::Receiver<bool>,
    load: watch::Receiver<WorkerLoad>,
    kv: Option<KvEventFeed>,
    /// Stops the poller and the event feed when the last handle goes.
    _stop: tokio_util::sync::DropGuard,
}

impl std::fmt::Debug for ExternalEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalEngine")
            .field("kind", &self.inner.kind)
            .field("url", &self.inner.url)
            .field("model", &self.inner.info.model)
            .finish_non_exhaustive()
    }
}

impl ExternalEngine {
    /// Waits for the server to be healthy (up to the startup timeout), asks what it serves,
    /// checks its KV block size where it reports one, and starts watching it.
    pub async fn connect(config: ExternalConfig) -> Result<Self, ExternalError> {
        let url = config.url.trim_end_matches('/').to_owned();
        // No TLS client is built in: servers sit beside their worker, on loopback or a
        // private network.
        if !url.starts_with("http://") {
            return Err(ExternalError::Url(url));
        }
        // Streams can be long; only connecting is bounded here, the poller bounds its own calls.
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|source| ExternalError::Http {
                url: url.clone(),
                source,
            })?;
        let kind = config.kind;
        let deadline = tokio::time::Instant::now() + config.startup_timeout;
        loop {
            match health(&http, &url).await {
                Ok(()) => break,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(ExternalError::NotHealthy {
                        server: kind.name(),
                        url,
                        why: e,
                        waited: config.startup_timeout,
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        let info = server_info(kind, &http, &url).await?;
        let scrape = get_text(&http, &format!("{url}/metrics")).await.ok();
        let cache = scrape
            .as_deref()
            .map(|t| metrics::cache_info(kind, t))
            .unwrap_or_default();
        if let Some(engine) = cache.block_size {
            if engine != config.block_size {
                return Err(ExternalError::BlockSize {
                    server: kind.name(),
                    engine,
                    router: config.block_size,
                });
            }
        }
        let num_blocks = match cache.num_blocks {
            Some(n) => n,
            None => props_blocks(kind, &http, &url, config.block_size).await.unwrap_or(0),
        };

        let stop = CancellationToken::new();
        let (healthy_tx, healthy) = watch::channel(true);
        let (load_tx, load) = watch::channel(
            scrape
                .as_deref()
                .map(|t| metrics::load(kind, t, num_blocks))
                .unwrap_or_default(),
        );
        tokio::spawn(poll(
            Poller {
                kind,
                http: http.clone(),
                url: url.clone(),
                interval: config.poll_interval,
                num_blocks,
                healthy: healthy_tx,
                load: load_tx,
            },
            stop.clone(),
        ));
        let kv = config.kv_events.map(|c| KvEventFeed::start(c, stop.child_token()));
        Ok(Self {
            inner: Arc::new(Inner {
                kind,
                url,
                http,
                info,
                healthy,
                load,
                kv,
                _stop: stop.drop_guard(),
            }),
        })
    }

    pub fn info(&self) -> &ServerInfo {
        &self.inner.info
    }

    /// True while the server answers its health check; changes as it goes down and back.
    pub fn health(&self) -> watch::Receiver<bool> {
        self.inner.healthy.clone()
    }

    /// The KV event feed's counters, where the server publishes events.
    pub fn kv_event_stats(&self) -> Option<crate::kv_events::KvEventStats> {
        self.inner.kv.as_ref().map(KvEventFeed::stats)
    }
}

impl Engine for ExternalEngine {
    fn generate(&self, request: PreprocessedRequest, cancel: CancellationToken) -> Result<EngineStream, EngineError> {
        let inner = &self.inner;
        if !*inner.healthy.borrow() {
            return Err(EngineError::Unavailable(format!(
                "{} at {} is not healthy",
                inner.kind.name(),
                inner.url
            )));
        }
        let body = protocol::request_body(inner.kind, &request, &inner.info.model)
            .map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
        let (tx, rx) = mpsc::channel(64);
        let call = Call {
            kind: inner.kind,
            http: inner.http.clone(),
            url: inner.url.clone(),
            request_id: request.request_id,
            stop_token_ids: request.stop.stop_token_ids,
            max_tokens: request.stop.max_tokens,
        };
        tokio::spawn(async move {
            let outcome = tokio::select! {
                outcome = call.run(body, &tx) => outcome,
                _ = cancel.cancelled() => Err(EngineError::Stopped),
            };
            match outcome {
                Ok(()) => {}
                // The caller is gone: nobody reads an error, but the server is told.
                Err(_) if cancel.is_cancelled() => call.abort().await,
                Err(e) => {
                    // Dropping the response closed the connection; SGLang also wants its abort.
                    call.abort().await;
                    let _ = tx.send(Err(e)).await;
                }
            }
        });
        Ok(EngineStream::new(tokio_stream_from(rx)))
    }

    fn kv_cache(&self) -> Option<KvCache> {
        let feed = self.inner.kv.clone()?;
        Some(KvCache::new(Source {
            feed,
            load: self.inner.load.clone(),
        }))
    }

    fn load(&self) -> Option<watch::Receiver<WorkerLoad>> {
        Some(self.inner.load.clone())
    }
}

fn tokio_stream_from<T: Send + 'static>(mut rx: mpsc::Receiver<T>) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// One request's streaming call.
struct Call {
    kind: ServerKind,
    http: reqwest::Client,
    url: String,
    request_id: String,
    stop_token_ids: Vec<u32>,
    max_tokens: Option<u32>,
}

type Tx = mpsc::Sender<Result<EngineOutput, EngineError>>;

impl Call {
    /// Streams the server's answer into `tx` until it finishes.
    async fn run(&self, body: Value, tx: &Tx) -> Result<(), EngineError> {
        let server = self.kind.name();
        let url = format!("{}{}", self.url, self.kind.generate_path());
        let unavailable = |e: &dyn std::fmt::Display| EngineError::Unavailable(format!("{server} at {url}: {e}"));
        let response = self
            .http
            .post(&url)
            .json(&body)
            .send()
            .await
            .map_err(|e| unavailable(&e))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| {
                    v.pointer("/error/message")
                        .or_else(|| v.get("message"))
                        .or_else(|| v.get("detail"))
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .unwrap_or(text);
            let message = format!("{server} answered {status}: {message}");
            return Err(if status.is_client_error() {
                EngineError::InvalidRequest(message)
            } else if status == reqwest::StatusCode::SERVICE_UNAVAILABLE {
                EngineError::Unavailable(message)
            } else {
                EngineError::Failed(message)
            });
        }
        let mut bytes = response.bytes_stream();
        let mut sse = SseDecoder::default();
        let mut state = StreamState::default();
        let mut generated: u32 = 0;
        // Decided when the server finishes or the worker cuts the stream; sent once the stream
        // has nothing more to say, since servers report what they cached after their last
        // token (llama.cpp in its final chunk, vLLM in a usage chunk after the finish).
        let mut finish: Option<FinishReason> = None;
        let mut cut = false;
        let mut cached = None;
        'stream: loop {
            let (events, ended) = match bytes.next().await {
                Some(Ok(b)) => (
                    sse.push(&b)
                        .map_err(|e| EngineError::Failed(format!("{server}: {e}")))?,
                    false,
                ),
                Some(Err(e)) if finish.is_none() => return Err(unavailable(&format!("stream broke: {e}"))),
                Some(Err(_)) => break,
                None => (sse.finish().into_iter().collect(), true),
            };
            for data in events {
                if data.trim() == "[DONE]" {
                    break 'stream;
                }
                let chunk = protocol::parse_chunk(self.kind, &mut state, &data)
                    .map_err(|e| EngineError::Failed(e.to_string()))?;
                cached = cached.or(chunk.cached_tokens);
                if finish.is_some() {
                    if !chunk.token_ids.is_empty() {
                        // The server goes on past the worker's cut: nothing more to learn.
                        break 'stream;
                    }
                    continue;
                }
                let mut output = EngineOutput::default();
                // The worker enforces its own stop conditions too: a server's end-of-sequence
                // set may not hold every id the frontend asked for, and the contract is that
                // nothing follows a stop token or the token limit.
                for &t in &chunk.token_ids {
                    output.token_ids.push(t);
                    generated += 1;
                    if self.stop_token_ids.contains(&t) {
                        finish = Some(FinishReason::Stop);
                    } else if self.max_tokens.is_some_and(|m| generated >= m) {
                        finish = Some(FinishReason::Length);
                    }
                    if finish.is_some() {
                        cut = chunk.finish_reason.is_none();
                        break;
                    }
                }
                if finish.is_none() {
                    finish = chunk.finish_reason;
                } else if !cut {
                    // The server finished on the same token: its reason stands.
                    finish = chunk.finish_reason.or(finish);
                }
                if !output.token_ids.is_empty() && tx.send(Ok(output)).await.is_err() {
                    return Ok(());
                }
            }
            if ended {
                break;
            }
        }
        let Some(finish_reason) = finish else {
            return Err(unavailable(&"the stream ended before the request finished"));
        };
        if cut {
            self.abort().await;
        }
        let last = EngineOutput {
            finish_reason: Some(finish_reason),
            cached_tokens: cached,
            ..EngineOutput::default()
        };
        let _ = tx.send(Ok(last)).await;
        Ok(())
    }

    /// Tells the server to stop, where closing the connection is not enough.
    async fn abort(&self) {
        if self.kind != ServerKind::Sglang {
            return;
        }
        let url = format!("{}/abort_request", self.url);
        let sent = self
            .http
            .post(&url)
            .timeout(Duration::from_secs(2))
            .json(&serde_json::json!({ "rid": self.request_id }))
            .send()
            .await;
        if let Err(e) = sent {
            tracing::debug!(request_id = %self.request_id, error = %e, "sglang abort failed");
        }
    }
}

async fn health(http: &reqwest::Client, url: &str) -> Result<(), String> {
    let r = http
        .get(format!("{url}/health"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status().is_success() {
        Ok(())
    } else {
        Err(format!("/health answered {}", r.status()))
    }
}

async fn get_text(http: &reqwest::Client, url: &str) -> Result<String, reqwest::Error> {
    http.get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await
}

async fn get_json(http: &reqwest::Client, url: &str) -> Result<Value, ExternalError> {
    let err = |source| ExternalError::Http {
        url: url.to_owned(),
        source,
    };
    let text = get_text(http, url).await.map_err(err)?;
    serde_json::from_str(&text).map_err(|e| ExternalError::Answer {
        url: url.to_owned(),
        why: e.to_string(),
    })
}

async fn server_info(kind: ServerKind, http: &reqwest::Client, url: &str) -> Result<ServerInfo, ExternalError> {
    let models_url = format!("{url}/v1/models");
    let models = get_json(http, &models_url).await?;
    let (model, root) = protocol::served_model(&models).ok_or_else(|| ExternalError::Answer {
        url: models_url.clone(),
        why: "it lists no model".into(),
    })?;
    let mut path = root;
    let mut context_length = models
        .pointer("/data/0/max_model_len")
        .and_then(Value::as_u64)
        .map(|n| n.min(u64::from(u32::MAX)) as u32);
    if kind == ServerKind::LlamaCpp {
        if let Ok(props) = get_json(http, &format!("{url}/props")).await {
            path = props.get("model_path").and_then(Value::as_str).map(str::to_owned);
            context_length = props
                .pointer("/default_generation_settings/n_ctx")
                .and_then(Value::as_u64)
                .map(|n| n.min(u64::from(u32::MAX)) as u32);
        }
    }
    if kind == ServerKind::Sglang {
        if let Ok(info) = get_json(http, &format!("{url}/get_model_info")).await {
            path = info.get("model_path").and_then(Value::as_str).map(str::to_owned);
        }
    }
    // A path on the server's machine is only useful if this machine has it too.
    let model_path = path.filter(|p| std::path::Path::new(p).exists());
    Ok(ServerInfo {
        model,
        model_path,
        context_length,
    })
}

/// llama.cpp's KV cache size in blocks: every slot's context.
async fn props_blocks(kind: ServerKind, http: &reqwest::Client, url: &str, block_size: u32) -> Option<u32> {
    if kind != ServerKind::LlamaCpp || block_size == 0 {
        return None;
    }
    let props = get_json(http, &format!("{url}/props")).await.ok()?;
    let n_ctx = props.pointer("/default_generation_settings/n_ctx")?.as_u64()?;
    let slots = props.get("total_slots").and_then(Value::as_u64).unwrap_or(1);
    u32::try_from(n_ctx.saturating_mul(slots) / u64::from(block_size)).ok()
}

struct Poller {
    kind: ServerKind,
    http: reqwest::Client,
    url: String,
    interval: Duration,
    num_blocks: u32,
    healthy: watch::Sender<bool>,
    load: watch::Sender<WorkerLoad>,
}

async fn poll(p: Poller, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(p.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let up = health(&p.http, &p.url).await;
        let now = up.is_ok();
        if now != *p.healthy.borrow() {
            match &up {
                Ok(()) => tracing::info!(server = p.kind.name(), url = %p.url, "server healthy again"),
                Err(e) => tracing::warn!(server = p.kind.name(), url = %p.url, error = %e, "server unhealthy"),
            }
            p.healthy.send_replace(now);
        }
        if !now {
            continue;
        }
        match get_text(&p.http, &format!("{}/metrics", p.url)).await {
            Ok(text) => {
                let load = metrics::load(p.kind, &text, p.num_blocks);
                p.load.send_if_modified(|l| std::mem::replace(l, load) != load);
            }
            Err(e) => tracing::debug!(server = p.kind.name(), error = %e, "reading metrics failed"),
        }
    }
}

/// The KV cache as the worker sees it: the server's events, translated.
struct Source {
    feed: KvEventFeed,
    load: watch::Receiver<WorkerLoad>,
}

impl KvCacheSource for Source {
    fn subscribe(&self) -> mpsc::UnboundedReceiver<Vec<KvEvent>> {
        self.feed.subscribe()
    }

    fn load(&self) -> watch::Receiver<WorkerLoad> {
        self.load.clone()
    }

    fn snapshot(&self) -> futures::future::BoxFuture<'static, Result<KvSnapshot, EngineError>> {
        let snapshot = self.feed.snapshot();
        Box::pin(async move { Ok(snapshot) })
    }
}
