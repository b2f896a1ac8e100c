//! Command-line settings shared by the subcommands, each group parsed once into the typed
//! configuration that the crates below take.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use tokio_util::sync::CancellationToken;
use turbine_engine::{EchoConfig, EchoEngine, Engine, MockerConfig, MockerEngine};
use turbine_frontend::FrontendConfig;
use turbine_native::{KvDtype, NativeConfig, NativeEngine};
use turbine_protocols::{ModelCard, TokenizerKind};

/// Which engine a worker runs and the model it presents.
#[derive(Debug, Args)]
pub struct EngineArgs {
    /// Inference engine every worker runs.
    #[arg(long, value_enum, default_value_t = EngineKind::Native)]
    engine: EngineKind,
    /// Native engine: the model, a GGUF file or a Hugging Face directory (config.json,
    /// *.safetensors, tokenizer.json) [default: SmolLM2-135M-Instruct, fetched on first use].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where the default model is cached [default: $XDG_CACHE_HOME/turbine or ~/.cache/turbine].
    #[arg(long)]
    model_cache_dir: Option<PathBuf>,
    /// Name clients put in the request's `model` field [default: the model's, or the engine's name].
    #[arg(long)]
    model_name: Option<String>,
    /// Tokenizer and chat template: a GGUF file or a Hugging Face model directory [default:
    /// the native engine's model; for echo and mocker, one token per byte and `role: content`
    /// chat lines].
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
    /// Native engine: memory for KV tensors per worker, in MiB.
    #[arg(long, default_value_t = 512)]
    kv_cache_mib: usize,
    #[command(flatten)]
    external: crate::external::ExternalArgs,
    #[command(flatten)]
    kvbm: crate::kvbm_args::KvbmArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum EngineKind {
    /// Runs the model on this machine's CPU: paged KV cache, continuous batching, prefix reuse.
    Native,
    /// Streams the prompt back, token by token.
    Echo,
    /// Simulates a vLLM-like engine: real KV block pool, scheduler and KV events, timed by a model of a GPU.
    Mocker,
    /// A vLLM server at --engine-url, sent prompts as token ids.
    Vllm,
    /// An SGLang server at --engine-url, sent prompts as token ids.
    Sglang,
    /// llama.cpp's llama-server at --engine-url, sent prompts as token ids.
    Llamacpp,
}

impl EngineKind {
    fn external(self) -> Option<turbine_external::ServerKind> {
        match self {
            EngineKind::Vllm => Some(turbine_external::ServerKind::Vllm),
            EngineKind::Sglang => Some(turbine_external::ServerKind::Sglang),
            EngineKind::Llamacpp => Some(turbine_external::ServerKind::LlamaCpp),
            EngineKind::Native | EngineKind::Echo | EngineKind::Mocker => None,
        }
    }
}

/// Settings of the engines with a KV cache (`--engine native` and `--engine mocker`).
#[derive(Debug, Args)]
#[command(next_help_heading = "KV cache and scheduling (native and mocker engines)")]
struct MockerArgs {
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Mocker: KV blocks per worker (the native engine sizes its pool by --kv-cache-mib).
    #[arg(long, default_value_t = 16384)]
    num_blocks: usize,
    /// Token budget of one scheduler step [default: 8192 mocker, 512 native].
    #[arg(long)]
    max_num_batched_tokens: Option<usize>,
    /// Most sequences running at once per worker [default: 256 mocker, 64 native].
    #[arg(long)]
    max_num_seqs: Option<usize>,
    /// Mocker: divides every simulated step's duration.
    #[arg(long, default_value_t = 1.0)]
    speedup: f64,
    /// Seeds the generated tokens (worker i uses seed + i); native requests with a `seed`
    /// of their own use theirs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Reuse cached KV blocks of shared prompt prefixes.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    prefix_caching: bool,
    /// How KV values are stored: f32, f16 (half the bytes) or q8 (int8 with a scale per row,
    /// about a quarter) [default: f32 native; the mocker keeps --kv-bytes-per-token, a 16-bit
    /// cache, and scales it to the dtype given].
    #[arg(long)]
    kv_cache_dtype: Option<KvDtype>,
    /// Mocker, disaggregated: KV bytes per token of the simulated model [default: Llama-3-8B
    /// in bf16, 131072].
    #[arg(long, default_value_t = 131_072)]
    kv_bytes_per_token: u64,
    /// Mocker, disaggregated: GB/s between prefill and decode workers, which with
    /// --kv-bytes-per-token gives each KV import's simulated time.
    #[arg(long, default_value_t = 25.0)]
    transfer_gbps: f64,
}

/// A validated engine choice: builds engines and describes their model.
#[derive(Debug, Clone)]
pub struct EngineSetup {
    kind: EngineKind,
    pub model: ModelCard,
    echo: EchoConfig,
    mocker: MockerConfig,
    native: NativeConfig,
    /// The native engine's weights.
    model_path: Option<PathBuf>,
    /// External servers, once connected ([`EngineSetup::connect`]).
    external: Option<crate::external::ExternalSetup>,
    external_engines: Vec<turbine_external::ExternalEngine>,
    /// What the model card is built from, kept for external servers whose model is known
    /// only once they answer.
    given: GivenModel,
}

/// The model flags as given, before a server fills in what they leave out.
#[derive(Debug, Clone)]
struct GivenModel {
    name: Option<String>,
    tokenizer: Option<PathBuf>,
    context_length: Option<u32>,
}

impl TryFrom<EngineArgs> for EngineSetup {
    type Error = anyhow::Error;

    fn try_from(a: EngineArgs) -> anyhow::Result<Self> {
        // Flags first, before a model is fetched for them.
        let mut kvbm = a.kvbm.config()?;
        let onboard = a.kvbm.onboard_rates()?;
        let native = matches!(a.engine, EngineKind::Native);
        if a.model.is_some() && !native {
            bail!("--model is for --engine native; the other engines take --tokenizer");
        }
        let external = match a.engine.external() {
            Some(kind) => Some(a.external.parse(kind, a.mocker.block_size as u32)?),
            None if a.external.any_given() => {
                bail!("--engine-url and the --kv-events-* flags are for --engine vllm, sglang or llamacpp")
            }
            None => None,
        };
        if a.mocker.block_size == 0 {
            bail!("--block-size must be at least 1, got 0");
        }
        let given = GivenModel {
            name: a.model_name.clone(),
            tokenizer: a.tokenizer.clone(),
            context_length: a.context_length,
        };
        let (model_path, default_name) = match (native, &a.model) {
            (false, _) => (None, None),
            (true, Some(path)) => {
                if !path.exists() {
                    bail!("--model {}: no such file or directory", path.display());
                }
                let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
                (Some(path.clone()), stem)
            }
            (true, None) => {
                let cache = a
                    .model_cache_dir
                    .clone()
                    .unwrap_or_else(crate::fetch::default_cache_dir);
                let path = crate::fetch::default_model(&cache).context("fetching the default model")?;
                (Some(path), Some(crate::fetch::DEFAULT_MODEL_NAME.to_owned()))
            }
        };
        let model_name = a.model_name.or(default_name).unwrap_or_else(|| {
            match a.engine {
                EngineKind::Native => "native",
                EngineKind::Echo => "echo",
                EngineKind::Mocker => "mocker",
                EngineKind::Vllm => "vllm",
                EngineKind::Sglang => "sglang",
                EngineKind::Llamacpp => "llamacpp",
            }
            .to_owned()
        });
        if model_name.trim().is_empty() || model_name.contains(char::is_whitespace) {
            bail!("--model-name must be non-empty without whitespace, got {model_name:?}");
        }
        // Loaded here once to fail fast on a bad path; the frontend loads it again from the
        // model card, as a frontend in another process would.
        let (tokenizer, loaded) = match a.tokenizer.as_ref().or(model_path.as_ref()) {
            None => (TokenizerKind::Bytes, None),
            Some(path) => {
                let flag = if a.tokenizer.is_some() {
                    "--tokenizer"
                } else {
                    "--model"
                };
                load_tokenizer(path, flag)?
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
        kvbm.pinned = match &loaded {
            Some(pre) => a.kvbm.pinned(pre, a.mocker.block_size)?,
            None => a
                .kvbm
                .pinned(&turbine_preprocess::Preprocessor::bytes(), a.mocker.block_size)?,
        };
        let vocab = match &loaded {
            Some(l) => 0..u32::try_from(l.tokenizer().vocab_size()).unwrap_or(u32::MAX),
            // The byte-level stand-in tokenizer decodes these as printable ASCII.
            None => 32..127,
        };
        let m = &a.mocker;
        let mocker = MockerConfig {
            block_size: m.block_size,
            num_blocks: m.num_blocks,
            max_num_batched_tokens: m.max_num_batched_tokens.unwrap_or(8192),
            max_num_seqs: m.max_num_seqs.unwrap_or(256),
            speedup: m.speedup,
            seed: m.seed,
            enable_prefix_caching: m.prefix_caching,
            vocab,
            kv_bytes_per_token: match m.kv_cache_dtype {
                // q8 scales priced for rows of 128 values, the heads of the default (Llama-3-8B).
                Some(dtype) => {
                    m.kv_bytes_per_token.saturating_mul(dtype.row_bytes(128) as u64)
                        / KvDtype::F16.row_bytes(128) as u64
                }
                None => m.kv_bytes_per_token,
            },
            transfer_bytes_per_sec: m.transfer_gbps * 1e9,
            kvbm: kvbm.clone(),
            onboard_host_bytes_per_sec: onboard.0,
            onboard_disk_bytes_per_sec: onboard.1,
        };
        // The tiers are sized against the mocker's pool only when it is the engine; the
        // native engine checks them against its own once the model says how large it is.
        let checked = match a.engine {
            EngineKind::Mocker => mocker.clone(),
            _ => MockerConfig {
                kvbm: turbine_kvbm::KvbmConfig::default(),
                ..mocker.clone()
            },
        };
        checked.validate().map_err(|e| match e {
            // Already in the flags' words.
            turbine_engine::MockerConfigError::Kvbm(m) => anyhow::anyhow!("{m}"),
            e => anyhow::anyhow!("--{}", e.to_string().replace('_', "-")),
        })?;
        let defaults = NativeConfig::default();
        let native_config = NativeConfig {
            block_size: m.block_size,
            kv_cache_bytes: a.kv_cache_mib.saturating_mul(1 << 20),
            max_num_batched_tokens: m.max_num_batched_tokens.unwrap_or(defaults.max_num_batched_tokens),
            max_num_seqs: m.max_num_seqs.unwrap_or(defaults.max_num_seqs),
            enable_prefix_caching: m.prefix_caching,
            seed: m.seed,
            convert_slow_weights: true,
            kv_cache_dtype: m.kv_cache_dtype.unwrap_or(defaults.kv_cache_dtype),
            kvbm,
        };
        if native && a.kv_cache_mib == 0 {
            bail!("--kv-cache-mib must be at least 1, got 0");
        }
        Ok(Self {
            kind: a.engine,
            model: ModelCard {
                name: model_name,
                context_length,
                tokenizer,
                kv_block_size: (!matches!(a.engine, EngineKind::Echo)).then_some(m.block_size as u32),
                timing: matches!(a.engine, EngineKind::Mocker)
                    .then(|| turbine_engine::mocker::timing::profile(&mocker)),
            },
            echo: EchoConfig {
                delay_per_token: Duration::from_millis(a.echo_delay_ms),
            },
            mocker,
            native: native_config,
            model_path,
            external,
            external_engines: Vec::new(),
            given,
        })
    }
}

/// Loads a tokenizer once to fail fast on a bad path; the frontend loads it again from the
/// model card, as a frontend in another process would.
fn load_tokenizer(
    path: &std::path::Path,
    flag: &str,
) -> anyhow::Result<(TokenizerKind, Option<turbine_preprocess::Preprocessor>)> {
    let loaded = turbine_preprocess::Preprocessor::load(path).with_context(|| format!("{flag} {}", path.display()))?;
    let absolute = std::path::absolute(path).with_context(|| format!("{flag} {}", path.display()))?;
    let absolute = absolute
        .to_str()
        .with_context(|| format!("{flag} path is not UTF-8: {}", path.display()))?;
    Ok((
        TokenizerKind::Files {
            path: absolute.to_owned(),
        },
        Some(loaded),
    ))
}

impl EngineSetup {
    /// The mocker's configuration, when the engine is the mocker.
    pub fn mocker_config(&self) -> Option<&MockerConfig> {
        matches!(self.kind, EngineKind::Mocker).then_some(&self.mocker)
    }

    pub fn is_native(&self) -> bool {
        matches!(self.kind, EngineKind::Native)
    }

    /// How many external servers were given, for engines that front them.
    pub fn external_count(&self) -> Option<usize> {
        self.external.as_ref().map(|e| e.count())
    }

    /// Connects to the external servers, if this engine fronts them, and completes the model
    /// card from what they serve: its name, tokenizer and context length where the flags
    /// leave them out.
    pub async fn connect(&mut self) -> anyhow::Result<()> {
        let Some(external) = &self.external else {
            return Ok(());
        };
        let connected = external.connect().await?;
        let given = self.given.clone();
        let name = given.name.clone().unwrap_or_else(|| connected.model.clone());
        if name.trim().is_empty() || name.contains(char::is_whitespace) {
            bail!("--model-name must be non-empty without whitespace, got {name:?} (the server's model name)");
        }
        let (tokenizer, loaded) = match (&given.tokenizer, &connected.tokenizer) {
            (Some(path), _) => load_tokenizer(path, "--tokenizer")?,
            (None, Some(path)) => load_tokenizer(path, "the server's model (pass --tokenizer to use another)")?,
            (None, None) => bail!(
                "{} serves {:?} from a path this machine cannot read: pass --tokenizer with its tokenizer \
                 (a Hugging Face directory or the GGUF file)",
                external.kind.name(),
                connected.model
            ),
        };
        let context_length = given
            .context_length
            .or(connected.context_length)
            .or_else(|| {
                loaded
                    .as_ref()
                    .and_then(|l| l.context_length())
                    .map(|c| c.min(u64::from(u32::MAX)) as u32)
            })
            .unwrap_or(8192);
        self.model = ModelCard {
            name,
            context_length,
            tokenizer,
            ..self.model.clone()
        };
        self.external_engines = connected.engines;
        Ok(())
    }

    /// The connected external servers, one per worker.
    pub fn external_engines(&self) -> &[turbine_external::ExternalEngine] {
        &self.external_engines
    }

    pub fn engine(&self, i: usize) -> anyhow::Result<Arc<dyn Engine>> {
        Ok(match self.kind {
            EngineKind::Vllm | EngineKind::Sglang | EngineKind::Llamacpp => {
                let engine = self
                    .external_engines
                    .get(i)
                    .context("no external server for this worker: connect first, one --engine-url per worker")?;
                Arc::new(engine.clone())
            }
            EngineKind::Echo => Arc::new(EchoEngine::new(self.echo.clone())),
            EngineKind::Mocker => {
                let mocker = MockerConfig {
                    seed: self.mocker.seed.wrapping_add(i as u64),
                    kvbm: crate::kvbm_args::for_worker(&self.mocker.kvbm, i),
                    ..self.mocker.clone()
                };
                Arc::new(MockerEngine::start(mocker).context("starting a mocker")?)
            }
            EngineKind::Native => {
                let path = self.model_path.as_deref().context("the native engine has no model")?;
                let config = NativeConfig {
                    seed: self.native.seed.wrapping_add(i as u64),
                    kvbm: crate::kvbm_args::for_worker(&self.native.kvbm, i),
                    ..self.native.clone()
                };
                let started = std::time::Instant::now();
                let (engine, report) = NativeEngine::load(path, &candle_core::Device::Cpu, config)
                    .with_context(|| format!("loading {}", path.display()))?;
                for (from, n, to) in &report.converted {
                    tracing::warn!(
                        "converted {n} {from} tensors to {to} at load: candle has no fast {from} kernel on this CPU"
                    );
                }
                tracing::info!(model = %path.display(), secs = started.elapsed().as_secs_f64(), "model loaded");
                Arc::new(engine)
            }
        })
    }
}

/// The HTTP frontend's settings.
#[derive(Debug, Args)]
pub struct FrontendArgs {
    /// Address the HTTP server listens on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// HTTP port; 0 picks a free one (the chosen address is printed on stdout).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// How the frontend picks a worker for each request.
    #[arg(long, value_enum, default_value_t = RouterModeArg::RoundRobin)]
    router_mode: RouterModeArg,
    /// `kv` router: how much prefill work counts against decode load (higher favours cache hits).
    #[arg(long, default_value_t = 1.0)]
    kv_overlap_weight: f64,
    /// `kv` router: 0 always picks the cheapest worker; higher spreads requests over near-cheapest ones.
    #[arg(long, default_value_t = 0.0)]
    kv_temperature: f64,
    /// `kv` router: what a cached block in a worker's host memory (KV block manager tier G2)
    /// counts for, 0 to 1, against one on its device.
    #[arg(long, default_value_t = turbine_router::selector::DEFAULT_HOST_HIT_WEIGHT)]
    kv_host_hit_weight: f64,
    /// `kv` router: what a cached block on a worker's disk (tier G3) counts for, 0 to 1,
    /// against one on its device.
    #[arg(long, default_value_t = turbine_router::selector::DEFAULT_DISK_HIT_WEIGHT)]
    kv_disk_hit_weight: f64,
    /// `kv` router: count costs in predicted time where workers publish their step times (the
    /// mocker does), or in KV blocks.
    #[arg(long, value_enum, default_value_t = KvCostArg::Time)]
    kv_cost: KvCostArg,
    /// `kv` router, time cost: how many times a millisecond of a request's own prefill counts
    /// against a millisecond of waiting (above 1, cache misses pay for the queue they cause).
    #[arg(long, default_value_t = turbine_frontend::DEFAULT_COMPUTE_WEIGHT)]
    kv_compute_weight: f64,
    /// `kv` router, time cost: how many decode steps of a request its cost looks ahead, which
    /// weighs a worker's decode load against its prefill queue and cache.
    #[arg(long, default_value_t = turbine_frontend::DEFAULT_DECODE_HORIZON)]
    kv_decode_horizon: f64,
    /// Request bodies above this many bytes are refused with 413.
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    max_body_bytes: usize,
    /// How many times a request may move to another worker when its worker is lost
    /// mid-stream (the prompt and the tokens so far are sent again); 0 turns migration off.
    #[arg(long, default_value_t = 3)]
    migration_limit: u32,
    /// Disaggregated models: prompts with fewer tokens than this missing from their decode
    /// worker's cache are prefilled there instead of on a prefill worker (prompts under one
    /// KV block always are).
    #[arg(long, default_value_t = 0)]
    disagg_min_tokens: usize,
    /// Disaggregated models: prompts whose uncached share on their decode worker is below
    /// this (0 to 1) are prefilled there.
    #[arg(long, default_value_t = 0.0)]
    disagg_min_uncached_ratio: f64,
    /// Disaggregated models: when every prefill worker has more prompt tokens queued than
    /// this, prompts are prefilled on their decode worker instead of waiting.
    #[arg(long)]
    disagg_max_prefill_queue: Option<u64>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KvCostArg {
    Time,
    Blocks,
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

impl FrontendArgs {
    /// Where to listen, and the frontend's configuration.
    pub fn parse(self) -> anyhow::Result<(SocketAddr, FrontendConfig)> {
        if !(self.kv_overlap_weight.is_finite() && self.kv_overlap_weight >= 0.0) {
            bail!(
                "--kv-overlap-weight must be a number >= 0, got {}",
                self.kv_overlap_weight
            );
        }
        if !(self.kv_temperature.is_finite() && self.kv_temperature >= 0.0) {
            bail!("--kv-temperature must be a number >= 0, got {}", self.kv_temperature);
        }
        for (flag, weight) in [
            ("--kv-host-hit-weight", self.kv_host_hit_weight),
            ("--kv-disk-hit-weight", self.kv_disk_hit_weight),
        ] {
            if !(0.0..=1.0).contains(&weight) {
                bail!("{flag} must be a number from 0 to 1, got {weight}");
            }
        }
        if !(self.kv_compute_weight.is_finite() && self.kv_compute_weight >= 0.0) {
            bail!(
                "--kv-compute-weight must be a number >= 0, got {}",
                self.kv_compute_weight
            );
        }
        if !(self.kv_decode_horizon.is_finite() && self.kv_decode_horizon >= 0.0) {
            bail!(
                "--kv-decode-horizon must be a number >= 0, got {}",
                self.kv_decode_horizon
            );
        }
        if !(0.0..=1.0).contains(&self.disagg_min_uncached_ratio) {
            bail!(
                "--disagg-min-uncached-ratio must be between 0 and 1, got {}",
                self.disagg_min_uncached_ratio
            );
        }
        let config = FrontendConfig {
            router_mode: match self.router_mode {
                RouterModeArg::RoundRobin => turbine_router::RouterMode::RoundRobin,
                RouterModeArg::Random => turbine_router::RouterMode::Random,
                RouterModeArg::Kv => turbine_router::RouterMode::Kv,
                RouterModeArg::LeastLoaded => turbine_router::RouterMode::LeastLoaded,
                RouterModeArg::Session => turbine_router::RouterMode::Session,
            },
            max_body_bytes: self.max_body_bytes,
            kv_overlap_weight: self.kv_overlap_weight,
            kv_temperature: self.kv_temperature,
            kv_host_hit_weight: self.kv_host_hit_weight,
            kv_disk_hit_weight: self.kv_disk_hit_weight,
            kv_cost: match self.kv_cost {
                KvCostArg::Time => turbine_frontend::KvCost::Time,
                KvCostArg::Blocks => turbine_frontend::KvCost::Blocks,
            },
            kv_compute_weight: self.kv_compute_weight,
            kv_decode_horizon: self.kv_decode_horizon,
            migration_limit: self.migration_limit,
            disagg: turbine_frontend::DisaggPolicy {
                min_uncached_tokens: self.disagg_min_tokens,
                min_uncached_ratio: self.disagg_min_uncached_ratio,
                max_prefill_queue_tokens: self.disagg_max_prefill_queue,
            },
            ..FrontendConfig::default()
        };
        Ok((SocketAddr::new(self.host, self.port), config))
    }
}

/// Cancels `token` on the first SIGINT or SIGTERM.
pub async fn signal_to(token: CancellationToken) {
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

/// How prefill and decode workers move KV blocks (disaggregated serving).
#[derive(Debug, Args)]
pub struct TransferArgs {
    /// Address the KV transfer agent listens on, for peers in other processes.
    #[arg(long, default_value = "127.0.0.1:0")]
    transfer_listen: SocketAddr,
    /// MiB of KV a worker can stage at once: a prefill worker's held for decode workers, a
    /// decode worker's being received (as many blocks as fit).
    #[arg(long, default_value_t = 256, conflicts_with = "staging_blocks")]
    staging_mib: u64,
    /// Stage this many KV blocks instead of --staging-mib.
    #[arg(long)]
    staging_blocks: Option<usize>,
    /// Milliseconds a prefill worker holds staged KV that no decode worker reads.
    #[arg(long, default_value_t = 30_000)]
    kv_lease_ms: u64,
    /// Milliseconds a decode worker waits for a prompt's KV before prefilling it itself.
    #[arg(long, default_value_t = 5_000)]
    kv_transfer_timeout_ms: u64,
    /// Stage in host memory only: decode workers on the same host then read over TCP too.
    #[arg(long)]
    no_shared_memory: bool,
}

impl TransferArgs {
    pub fn parse(&self, role: turbine_protocols::WorkerRole) -> anyhow::Result<turbine_worker::DisaggConfig> {
        let staging = match self.staging_blocks {
            Some(0) => bail!("--staging-blocks must be at least 1, got 0"),
            Some(n) => turbine_worker::StagingSize::Blocks(n),
            None if self.staging_mib == 0 => bail!("--staging-mib must be at least 1, got 0"),
            None => turbine_worker::StagingSize::Bytes(self.staging_mib << 20),
        };
        if self.kv_lease_ms == 0 {
            bail!("--kv-lease-ms must be at least 1, got 0");
        }
        if self.kv_transfer_timeout_ms == 0 {
            bail!("--kv-transfer-timeout-ms must be at least 1, got 0");
        }
        Ok(turbine_worker::DisaggConfig {
            role,
            listen: self.transfer_listen,
            staging,
            lease: Duration::from_millis(self.kv_lease_ms),
            transfer_timeout: Duration::from_millis(self.kv_transfer_timeout_ms),
            shared_memory: !self.no_shared_memory,
        })
    }
}
