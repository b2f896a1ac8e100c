//! `--engine vllm|sglang|llamacpp`: workers in front of external inference servers. The
//! servers are asked what they serve, their tokenizer is found, and each worker registers
//! only while its server is healthy.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use tokio_util::sync::CancellationToken;
use turbine_external::kv_events::KvEventsConfig;
use turbine_external::{ExternalConfig, ExternalEngine, ServerKind};
use turbine_runtime::Runtime;
use turbine_worker::{Worker, WorkerConfig};

/// Settings of the external engines.
#[derive(Debug, Args)]
#[command(next_help_heading = "External engines (vllm, sglang, llamacpp)")]
pub struct ExternalArgs {
    /// The server a worker fronts, `http://HOST:PORT`; `serve` takes one per worker.
    #[arg(long)]
    engine_url: Vec<String>,
    /// The server's KV event publisher (vLLM's and SGLang's `--kv-events-config` endpoint,
    /// as `tcp://HOST:PORT`), one per --engine-url; without it the router predicts caches.
    #[arg(long)]
    kv_events_endpoint: Vec<String>,
    /// The publisher's replay endpoint (`replay_endpoint`), one per --kv-events-endpoint:
    /// lets the worker catch up on events it missed.
    #[arg(long)]
    kv_events_replay_endpoint: Vec<String>,
    /// The publisher's topic.
    #[arg(long, default_value = "")]
    kv_events_topic: String,
    /// Seconds to wait for a server that is still starting.
    #[arg(long, default_value_t = 600)]
    engine_startup_timeout_secs: u64,
    /// Milliseconds between reads of a server's health and metrics.
    #[arg(long, default_value_t = 500)]
    engine_poll_ms: u64,
}

/// Validated [`ExternalArgs`] for one kind of server, not yet connected.
#[derive(Debug, Clone)]
pub struct ExternalSetup {
    pub kind: ServerKind,
    configs: Vec<ExternalConfig>,
}

impl ExternalArgs {
    /// Whether any external-engine flag was given, to refuse them for the other engines.
    pub fn any_given(&self) -> bool {
        !self.engine_url.is_empty() || !self.kv_events_endpoint.is_empty() || !self.kv_events_replay_endpoint.is_empty()
    }

    pub fn parse(&self, kind: ServerKind, block_size: u32) -> anyhow::Result<ExternalSetup> {
        if self.engine_url.is_empty() {
            bail!("--engine {} needs --engine-url http://HOST:PORT", flag_name(kind));
        }
        for url in &self.engine_url {
            let valid = url
                .strip_prefix("http://")
                .and_then(|rest| rest.trim_end_matches('/').rsplit_once(':'))
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !valid {
                bail!("--engine-url must be http://HOST:PORT, got {url:?}");
            }
        }
        if !self.kv_events_endpoint.is_empty() {
            if kind == ServerKind::LlamaCpp {
                bail!("--kv-events-endpoint: llama.cpp publishes no KV events; its workers are routed on predictions");
            }
            if self.kv_events_endpoint.len() != self.engine_url.len() {
                bail!(
                    "--kv-events-endpoint must be given once per --engine-url: {} endpoints for {} URLs",
                    self.kv_events_endpoint.len(),
                    self.engine_url.len()
                );
            }
        }
        if !self.kv_events_replay_endpoint.is_empty()
            && self.kv_events_replay_endpoint.len() != self.kv_events_endpoint.len()
        {
            bail!(
                "--kv-events-replay-endpoint must be given once per --kv-events-endpoint: {} for {}",
                self.kv_events_replay_endpoint.len(),
                self.kv_events_endpoint.len()
            );
        }
        for e in self.kv_events_endpoint.iter().chain(&self.kv_events_replay_endpoint) {
            let valid = e
                .strip_prefix("tcp://")
                .and_then(|rest| rest.rsplit_once(':'))
                .is_some_and(|(h, p)| !h.is_empty() && h != "*" && p.parse::<u16>().is_ok());
            if !valid {
                bail!("KV event endpoints must be tcp://HOST:PORT of the server's publisher, got {e:?}");
            }
        }
        if self.engine_poll_ms == 0 {
            bail!("--engine-poll-ms must be at least 1, got 0");
        }
        let configs = self
            .engine_url
            .iter()
            .enumerate()
            .map(|(i, url)| ExternalConfig {
                kind,
                url: url.clone(),
                poll_interval: Duration::from_millis(self.engine_poll_ms),
                startup_timeout: Duration::from_secs(self.engine_startup_timeout_secs),
                block_size,
                kv_events: self.kv_events_endpoint.get(i).map(|endpoint| KvEventsConfig {
                    endpoint: endpoint.clone(),
                    replay_endpoint: self.kv_events_replay_endpoint.get(i).cloned(),
                    topic: self.kv_events_topic.clone(),
                    block_size: block_size as usize,
                }),
            })
            .collect();
        Ok(ExternalSetup { kind, configs })
    }
}

fn flag_name(kind: ServerKind) -> &'static str {
    match kind {
        ServerKind::Vllm => "vllm",
        ServerKind::Sglang => "sglang",
        ServerKind::LlamaCpp => "llamacpp",
    }
}

/// Connected servers and what they serve.
pub struct Connected {
    pub engines: Vec<ExternalEngine>,
    /// The model every server serves.
    pub model: String,
    /// A tokenizer the servers loaded, where this machine can read it.
    pub tokenizer: Option<PathBuf>,
    pub context_length: Option<u32>,
}

impl ExternalSetup {
    pub fn count(&self) -> usize {
        self.configs.len()
    }

    /// Connects to every server; they must serve the same model.
    pub async fn connect(&self) -> anyhow::Result<Connected> {
        let mut engines = Vec::with_capacity(self.configs.len());
        for c in &self.configs {
            let engine = ExternalEngine::connect(c.clone())
                .await
                .with_context(|| format!("--engine-url {}", c.url))?;
            tracing::info!(server = self.kind.name(), url = %c.url, model = %engine.info().model, "external engine connected");
            engines.push(engine);
        }
        let first = engines[0].info().clone();
        for (e, c) in engines.iter().zip(&self.configs).skip(1) {
            if e.info().model != first.model {
                bail!(
                    "--engine-url {} serves {:?} but {} serves {:?}: one worker group serves one model",
                    c.url,
                    e.info().model,
                    self.configs[0].url,
                    first.model
                );
            }
        }
        Ok(Connected {
            engines,
            model: first.model,
            tokenizer: first.model_path.map(PathBuf::from),
            context_length: first.context_length,
        })
    }
}

/// Runs a worker for `engine` until `shutdown`, registered only while the server is healthy:
/// when it goes down the worker leaves discovery (frontends stop choosing it, and requests
/// cut off mid-stream migrate), and when it is back a new worker registers. `started` is
/// told each worker that registers.
pub async fn supervise(
    runtime: Runtime,
    engine: ExternalEngine,
    config: WorkerConfig,
    shutdown: CancellationToken,
    started: impl Fn(&Worker),
) -> anyhow::Result<()> {
    let mut health = engine.health();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            up = health.wait_for(|up| *up) => if up.is_err() { return Ok(()) },
        }
        let worker = Worker::start(&runtime, std::sync::Arc::new(engine.clone()), config.clone())
            .await
            .context("starting the worker")?;
        started(&worker);
        let mut down = health.clone();
        let stop = shutdown.clone();
        let unhealthy = async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = down.wait_for(|up| !*up) => {}
            }
        };
        worker.run(unhealthy).await;
        if shutdown.is_cancelled() {
            return Ok(());
        }
        tracing::warn!(model = %config.model.name, "engine unhealthy: worker deregistered until it is back");
    }
}
