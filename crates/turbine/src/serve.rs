//! `turbine serve`: a frontend and N workers in one process, sharing in-memory discovery
//! and events; workers are reached in-process or over loopback TCP.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use tokio_util::sync::CancellationToken;
use turbine_engine::{EchoConfig, EchoEngine, Engine, MockerConfig, MockerEngine};
use turbine_frontend::{Frontend, FrontendConfig};
use turbine_protocols::{ModelCard, TokenizerKind};
use turbine_runtime::{EndpointId, MemoryDiscovery, MemoryEventPlane, Runtime, ServeOptions, TransportOptions};
use turbine_worker::{Worker, WorkerConfig};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address the HTTP server listens on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// HTTP port; 0 picks a free one (the chosen address is printed on stdout).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Number of workers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Inference engine every worker runs.
    #[arg(long, value_enum, default_value_t = EngineKind::Echo)]
    engine: EngineKind,
    /// Name clients put in the request's `model` field [default: the engine's name].
    #[arg(long)]
    model_name: Option<String>,
    /// Tokenizer and chat template for the echo and mocker engines: a GGUF file or a Hugging
    /// Face model directory [default: one token per byte, `role: content` chat lines].
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Longest prompt plus completion, in tokens [default: the tokenizer's model's, else 8192].
    #[arg(long)]
    context_length: Option<u32>,
    /// Echo engine: milliseconds before each token, standing in for decode time.
    #[arg(long, default_value_t = 5)]
    echo_delay_ms: u64,
    #[command(flatten)]
    mocker: MockerArgs,
    /// How the frontend reaches the workers: in-process calls, or TCP on loopback as separate processes would.
    #[arg(long, value_enum, default_value_t = RequestPlane::Local)]
    request_plane: RequestPlane,
    /// How the frontend picks a worker for each request.
    #[arg(long, value_enum, default_value_t = RouterModeArg::RoundRobin)]
    router_mode: RouterModeArg,
    /// `kv` router: how much prefill work counts against decode load (higher favours cache hits).
    #[arg(long, default_value_t = 1.0)]
    kv_overlap_weight: f64,
    /// `kv` router: 0 always picks the cheapest worker; higher spreads requests over near-cheapest ones.
    #[arg(long, default_value_t = 0.0)]
    kv_temperature: f64,
    /// Seconds in-flight requests may run on after SIGINT or SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30)]
    grace_period_secs: u64,
    /// Request bodies above this many bytes are refused with 413.
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    max_body_bytes: usize,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum EngineKind {
    /// Streams the prompt back, token by token.
    Echo,
    /// Simulates a vLLM-like engine: real KV block pool, scheduler and KV events, timed by a model of a GPU.
    Mocker,
}

/// Settings of the mocker engine (`--engine mocker`).
#[derive(Debug, Args)]
#[command(next_help_heading = "Mocker engine")]
struct MockerArgs {
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// KV blocks per worker.
    #[arg(long, default_value_t = 16384)]
    num_blocks: usize,
    /// Token budget of one scheduler step.
    #[arg(long, default_value_t = 8192)]
    max_num_batched_tokens: usize,
    /// Most sequences running at once per worker.
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    /// Divides every simulated step's duration.
    #[arg(long, default_value_t = 1.0)]
    speedup: f64,
    /// Seeds the generated tokens (worker i uses seed + i).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Reuse cached KV blocks of shared prompt prefixes.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    prefix_caching: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RequestPlane {
    Local,
    Tcp,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RouterModeArg {
    RoundRobin,
    Random,
    /// By KV cache overlap and load, from the workers' KV events (engines that publish them).
    Kv,
    /// To the worker with the fewest requests in flight.
    LeastLoaded,
    /// Requests with the same `x-session-id` header to the same worker; new sessions by `kv`.
    Session,
}

/// Validated configuration for `serve`.
#[derive(Debug)]
pub struct ServeConfig {
    listen: SocketAddr,
    workers: usize,
    engine: EngineKind,
    model: ModelCard,
    echo: EchoConfig,
    mocker: MockerConfig,
    worker_transport: TransportOptions,
    frontend: FrontendConfig,
    grace_period: Duration,
}

impl TryFrom<ServeArgs> for ServeConfig {
    type Error = anyhow::Error;

    fn try_from(a: ServeArgs) -> anyhow::Result<Self> {
        if a.workers == 0 {
            bail!("--workers must be at least 1, got 0");
        }
        let model_name = a.model_name.unwrap_or_else(|| {
            match a.engine {
                EngineKind::Echo => "echo",
                EngineKind::Mocker => "mocker",
            }
            .to_owned()
        });
        if model_name.trim().is_empty() || model_name.contains(char::is_whitespace) {
            bail!("--model-name must be non-empty without whitespace, got {model_name:?}");
        }
        if !(a.kv_overlap_weight.is_finite() && a.kv_overlap_weight >= 0.0) {
            bail!("--kv-overlap-weight must be a number >= 0, got {}", a.kv_overlap_weight);
        }
        if !(a.kv_temperature.is_finite() && a.kv_temperature >= 0.0) {
            bail!("--kv-temperature must be a number >= 0, got {}", a.kv_temperature);
        }
        // Loaded here once to fail fast on a bad path; the frontend loads it again from the
        // model card, as a frontend in another process would.
        let (tokenizer, loaded) = match &a.tokenizer {
            None => (TokenizerKind::Bytes, None),
            Some(path) => {
                let loaded = turbine_preprocess::Preprocessor::load(path)
                    .with_context(|| format!("--tokenizer {}", path.display()))?;
                let path = path
                    .to_str()
                    .with_context(|| format!("--tokenizer path is not UTF-8: {}", path.display()))?;
                (TokenizerKind::Files { path: path.to_owned() }, Some(loaded))
            }
        };
        let model_context = loaded
            .as_ref()
            .and_then(|l| l.context_length())
            .map(|c| c.min(u64::from(u32::MAX)) as u32);
        let context_length = a.context_length.or(model_context).unwrap_or(8192);
        if context_length < 2 {
            bail!("--context-length must be at least 2, got {context_length}");
        }
        let vocab = match &loaded {
            Some(l) => 0..u32::try_from(l.tokenizer().vocab_size()).unwrap_or(u32::MAX),
            // The byte-level stand-in tokenizer decodes these as printable ASCII.
            None => 32..127,
        };
        let mocker = MockerConfig {
            block_size: a.mocker.block_size,
            num_blocks: a.mocker.num_blocks,
            max_num_batched_tokens: a.mocker.max_num_batched_tokens,
            max_num_seqs: a.mocker.max_num_seqs,
            speedup: a.mocker.speedup,
            seed: a.mocker.seed,
            enable_prefix_caching: a.mocker.prefix_caching,
            vocab,
        };
        mocker
            .validate()
            .map_err(|e| anyhow::anyhow!("--{}", e.to_string().replace('_', "-")))?;
        let worker_transport = match a.request_plane {
            RequestPlane::Local => TransportOptions::Local,
            RequestPlane::Tcp => TransportOptions::Tcp {
                bind: SocketAddr::from(([127, 0, 0, 1], 0)),
                advertise: None,
            },
        };
        Ok(Self {
            listen: SocketAddr::new(a.host, a.port),
            workers: a.workers,
            engine: a.engine,
            model: ModelCard {
                name: model_name,
                context_length,
                tokenizer,
                kv_block_size: matches!(a.engine, EngineKind::Mocker).then_some(a.mocker.block_size as u32),
            },
            echo: EchoConfig {
                delay_per_token: Duration::from_millis(a.echo_delay_ms),
            },
            mocker,
            worker_transport,
            frontend: FrontendConfig {
                router_mode: match a.router_mode {
                    RouterModeArg::RoundRobin => turbine_router::RouterMode::RoundRobin,
                    RouterModeArg::Random => turbine_router::RouterMode::Random,
                    RouterModeArg::Kv => turbine_router::RouterMode::Kv,
                    RouterModeArg::LeastLoaded => turbine_router::RouterMode::LeastLoaded,
                    RouterModeArg::Session => turbine_router::RouterMode::Session,
                },
                max_body_bytes: a.max_body_bytes,
                kv_overlap_weight: a.kv_overlap_weight,
                kv_temperature: a.kv_temperature,
                ..FrontendConfig::default()
            },
            grace_period: Duration::from_secs(a.grace_period_secs),
        })
    }
}

pub async fn run(config: ServeConfig) -> anyhow::Result<()> {
    let runtime = Runtime::new(Arc::new(MemoryDiscovery::new()), Arc::new(MemoryEventPlane::new()));
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_to(shutdown.clone()));

    let endpoint = EndpointId::new(config.frontend.namespace.clone(), "worker", "generate");
    let mut workers = Vec::new();
    for i in 0..config.workers {
        let engine: Arc<dyn Engine> = match config.engine {
            EngineKind::Echo => Arc::new(EchoEngine::new(config.echo.clone())),
            EngineKind::Mocker => {
                let mocker = MockerConfig {
                    seed: config.mocker.seed.wrapping_add(i as u64),
                    ..config.mocker.clone()
                };
                Arc::new(MockerEngine::start(mocker).context("starting a mocker")?)
            }
        };
        let worker_config = WorkerConfig {
            endpoint: endpoint.clone(),
            model: config.model.clone(),
            serve: ServeOptions {
                transport: config.worker_transport.clone(),
                grace_period: config.grace_period,
                ..ServeOptions::default()
            },
            load_report_interval: Duration::from_millis(100),
        };
        let worker = Worker::start(&runtime, engine.clone(), worker_config)
            .await
            .context("starting a worker")?;
        let shutdown = shutdown.clone();
        workers.push(tokio::spawn(worker.run(async move { shutdown.cancelled().await })));
    }

    let frontend = Frontend::start(&runtime, config.frontend.clone())
        .await
        .context("starting the frontend")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr().context("reading the listening address")?;
    tracing::info!(%addr, workers = config.workers, model = %config.model.name, "serving");
    // A machine-readable line for scripts and tests that start us on port 0.
    println!("turbine: listening on http://{addr}");

    let stop = shutdown.clone();
    let http = tokio::spawn(frontend.run(listener, async move { stop.cancelled().await }));
    shutdown.cancelled().await;
    tracing::info!(grace_period = ?config.grace_period, "shutting down: draining in-flight requests");

    // Workers and the frontend drain together; the frontend waits for its open responses,
    // which the workers finish within their own grace period.
    let drained = tokio::time::timeout(config.grace_period + Duration::from_secs(2), async {
        for w in workers {
            w.await.context("a worker task failed")?;
        }
        http.await.context("the HTTP task failed")?.context("HTTP server")
    })
    .await;
    match drained {
        Ok(result) => result?,
        Err(_) => tracing::warn!("grace period over with requests still open; exiting anyway"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// Cancels `token` on the first SIGINT or SIGTERM.
async fn signal_to(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
    token.cancel();
}
