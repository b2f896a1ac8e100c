//! The mocker: a simulated engine with everything real but the matrix math. Requests go
//! through a real block pool and a vLLM-like scheduler; each step sleeps for as long as
//! the timing model says a GPU would take, and produces random tokens from a seeded RNG,
//! counted rather than stored (their values are a function of seed and position).
//!
//! One task per engine owns the scheduler and loops: take new requests and cancellations,
//! plan a step, wait out its duration (still taking cancellations, which free blocks at
//! once), apply it, deliver tokens, publish KV events and load.

pub mod output;
pub mod scheduler;
pub mod timing;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use turbine_protocols::kv::KvEvent;
use turbine_protocols::PreprocessedRequest;

use crate::host::{self, Command, EngineHandle, LoopEnds};
use crate::{Engine, EngineError, EngineStream, KvBlocks, KvCache, KvLayout, KvTransfer};
use scheduler::{token_source, Counted, Scheduler, SeqSpec, TokenSource};

/// The mocker's settings; the defaults are those of a vLLM worker on one large GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct MockerConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the pool.
    pub num_blocks: usize,
    /// Token budget of one step (prefill chunks plus decodes).
    pub max_num_batched_tokens: usize,
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Divides every step's duration.
    pub speedup: f64,
    /// Seeds the generated tokens.
    pub seed: u64,
    /// Generated token ids are drawn uniformly from this range.
    pub vocab: std::ops::Range<u32>,
    pub enable_prefix_caching: bool,
    /// Disaggregated serving: KV bytes per token of the simulated model, and the bandwidth
    /// that moves them between workers, which together give an import's simulated time.
    pub kv_bytes_per_token: u64,
    pub transfer_bytes_per_sec: f64,
    /// Tiers below the pool (metadata only: blocks are sized by `kv_bytes_per_token`), and
    /// how fast loads from them run, host memory over PCIe and disk over NVMe.
    pub kvbm: turbine_kvbm::KvbmConfig,
    pub onboard_host_bytes_per_sec: f64,
    pub onboard_disk_bytes_per_sec: f64,
}

impl Default for MockerConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_blocks: 16384,
            max_num_batched_tokens: 8192,
            max_num_seqs: 256,
            speedup: 1.0,
            seed: 0,
            vocab: 0..32000,
            enable_prefix_caching: true,
            // Llama-3-8B in bf16 (32 layers, 8 KV heads of 128), over a 200 Gb/s RDMA link.
            kv_bytes_per_token: 2 * 32 * 8 * 128 * 2,
            transfer_bytes_per_sec: 25e9,
            kvbm: turbine_kvbm::KvbmConfig::default(),
            // PCIe 5 x16 in practice, and one NVMe drive.
            onboard_host_bytes_per_sec: 50e9,
            onboard_disk_bytes_per_sec: 6e9,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MockerConfigError {
    #[error("{name} must be at least 1, got {value}")]
    Zero { name: &'static str, value: usize },
    #[error("speedup must be a positive number, got {0}")]
    Speedup(f64),
    #[error("transfer bandwidth must be a positive number of bytes per second, got {0}")]
    Bandwidth(f64),
    #[error("KV block manager: {0}")]
    Kvbm(String),
}

impl MockerConfig {
    /// Checks the settings once, before an engine is built from them.
    pub fn validate(&self) -> Result<(), MockerConfigError> {
        for (name, value) in [
            ("block_size", self.block_size),
            ("num_blocks", self.num_blocks),
            ("max_num_batched_tokens", self.max_num_batched_tokens),
            ("max_num_seqs", self.max_num_seqs),
            ("vocab", self.vocab.len()),
        ] {
            if value == 0 {
                return Err(MockerConfigError::Zero { name, value });
            }
        }
        for rate in [
            self.transfer_bytes_per_sec,
            self.onboard_host_bytes_per_sec,
            self.onboard_disk_bytes_per_sec,
        ] {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(MockerConfigError::Bandwidth(rate));
            }
        }
        if !(self.speedup.is_finite() && self.speedup > 0.0) {
            return Err(MockerConfigError::Speedup(self.speedup));
        }
        if self.kvbm.enabled() {
            self.kvbm
                .sizes(&self.pool_shape())
                .map_err(|e| MockerConfigError::Kvbm(e.to_string()))?;
        }
        Ok(())
    }

    /// The pool as the tiers below it see it: blocks of simulated bytes.
    fn pool_shape(&self) -> turbine_kvbm::PoolShape {
        turbine_kvbm::PoolShape {
            block_bytes: (self.kv_bytes_per_token as usize).saturating_mul(self.block_size),
            blocks: self.num_blocks,
            compat: 0,
            simulated: true,
        }
    }

    /// The most tokens one sequence can hold: the whole pool.
    fn capacity_tokens(&self) -> usize {
        self.num_blocks * self.block_size
    }
}

/// The mocker's own messages: its side of disaggregated serving.
enum Own {
    CachedPrefix {
        tokens: Vec<u32>,
        reply: oneshot::Sender<usize>,
    },
    Export {
        tokens: Vec<u32>,
        reply: oneshot::Sender<usize>,
    },
    Import {
        tokens: Vec<u32>,
        first: usize,
        hashes: Vec<u64>,
        reply: oneshot::Sender<Result<usize, String>>,
    },
}

type Handle = EngineHandle<TokenSource, (), Own>;
type Sink = host::Sink<TokenSource, ()>;

/// A running mocker. Cloning shares the engine.
#[derive(Debug, Clone)]
pub struct MockerEngine {
    handle: Handle,
    /// Nanoseconds the engine's loop has spent working (not waiting).
    busy_ns: Arc<AtomicU64>,
    /// Nanoseconds of simulated steps, by the timing model.
    simulated_ns: Arc<AtomicU64>,
    config: Arc<MockerConfig>,
    kvbm_stats: Option<Arc<turbine_kvbm::KvbmStats>>,
}

impl MockerEngine {
    /// Starts the engine's task on the current tokio runtime; it ends when every handle is
    /// dropped.
    pub fn start(config: MockerConfig) -> Result<Self, MockerConfigError> {
        config.validate()?;
        let mut scheduler = Scheduler::new(config.clone());
        let mut tiers = crate::tiers::Tiers::new(&config.kvbm, config.pool_shape(), scheduler.pool_mut())
            .map_err(|e| MockerConfigError::Kvbm(e.to_string()))?;
        if let Some(t) = &mut tiers {
            // The copies keep the engine's time: at a speedup, they run as much faster.
            t.simulate_loads(
                config.onboard_host_bytes_per_sec * config.speedup,
                config.onboard_disk_bytes_per_sec * config.speedup,
            );
        }
        let kvbm_stats = tiers.as_ref().map(|t| t.stats());
        let (handle, ends) = Handle::new(scheduler.load());
        let busy_ns = Arc::new(AtomicU64::new(0));
        let simulated_ns = Arc::new(AtomicU64::new(0));
        tokio::spawn(run(
            scheduler,
            tiers,
            ends,
            config.block_size,
            busy_ns.clone(),
            simulated_ns.clone(),
        ));
        Ok(Self {
            handle,
            busy_ns,
            simulated_ns,
            config: Arc::new(config),
            kvbm_stats,
        })
    }
}

impl MockerEngine {
    /// Time the engine has spent computing its schedule, as opposed to waiting out the
    /// simulated step times: the mocker's own cost.
    pub fn busy_time(&self) -> Duration {
        Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed))
    }

    /// The summed durations of the steps run, by the timing model. Over a busy interval it
    /// grows as fast as the clock if the engine keeps to its schedule, slower if it lags.
    pub fn simulated_time(&self) -> Duration {
        Duration::from_nanos(self.simulated_ns.load(Ordering::Relaxed))
    }
}

impl Engine for MockerEngine {
    fn generate(&self, request: PreprocessedRequest, cancel: CancellationToken) -> Result<EngineStream, EngineError> {
        let prompt_len = request.token_ids.len();
        if prompt_len == 0 {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        let capacity_tokens = self.config.capacity_tokens();
        if prompt_len >= capacity_tokens {
            return Err(EngineError::InvalidRequest(format!(
                "a prompt of {prompt_len} tokens does not fit this engine's KV cache of {capacity_tokens} tokens"
            )));
        }
        let max_tokens = request.stop.max_tokens.unwrap_or(u32::MAX);
        let spec = SeqSpec {
            prompt: request.token_ids,
            max_tokens,
            stop_token_ids: request.stop.stop_token_ids,
        };
        let id = self.handle.next_id();
        // The same tokens as the scheduler's for this sequence, which it only counts.
        self.handle.submit(id, spec, token_source(&self.config, id), (), cancel)
    }

    fn kvbm_stats(&self) -> Option<Arc<turbine_kvbm::KvbmStats>> {
        self.kvbm_stats.clone()
    }

    fn kv_cache(&self) -> Option<KvCache> {
        Some(KvCache::new(self.handle.clone()))
    }

    fn kv_transfer(&self) -> Option<Arc<dyn KvTransfer>> {
        Some(Arc::new(MockerKv {
            handle: self.handle.clone(),
            config: self.config.clone(),
        }))
    }
}

/// A mocker block's bytes start with the block's sequence hash, which the importer checks,
/// so a block landing in the wrong place or a stale one shows; the rest of its (small)
/// layout is zeros. The time a real block would take to move is simulated on import.
const HASH_BYTES: usize = 8;

/// The mocker's side of disaggregated serving: block identities move, and importing them
/// takes the time the configured bytes per token and bandwidth give.
struct MockerKv {
    handle: Handle,
    config: Arc<MockerConfig>,
}

fn mock_layout(block_size: usize) -> KvLayout {
    KvLayout {
        num_layers: 1,
        num_kv_heads: 1,
        head_dim: 1,
        block_size,
        dtype: "mock".into(),
        order: "sequence_hash".into(),
    }
}

impl KvTransfer for MockerKv {
    fn layout(&self) -> KvLayout {
        mock_layout(self.config.block_size)
    }

    fn cached_prefix(&self, tokens: Vec<u32>) -> BoxFuture<'static, Result<usize, EngineError>> {
        let handle = self.handle.clone();
        Box::pin(async move { handle.ask(|reply| Own::CachedPrefix { tokens, reply }).await })
    }

    fn export_prefix(&self, tokens: Vec<u32>) -> BoxFuture<'static, Result<KvBlocks, EngineError>> {
        let handle = self.handle.clone();
        let block_size = self.config.block_size;
        Box::pin(async move {
            let hashes = turbine_tokens::block_hashes(&tokens, block_size);
            let n = handle.ask(|reply| Own::Export { tokens, reply }).await?;
            let per_block = mock_layout(block_size).block_bytes();
            let mut data = vec![0u8; n * per_block];
            for (h, block) in hashes[..n].iter().zip(data.chunks_exact_mut(per_block)) {
                block[..HASH_BYTES].copy_from_slice(&h.sequence.to_le_bytes());
            }
            Ok(KvBlocks {
                layout: mock_layout(block_size),
                data,
                num_blocks: n,
                first_block: 0,
            })
        })
    }

    fn import_blocks(&self, tokens: Vec<u32>, kv: KvBlocks) -> BoxFuture<'static, Result<usize, EngineError>> {
        let handle = self.handle.clone();
        let config = self.config.clone();
        Box::pin(async move {
            let layout = mock_layout(config.block_size);
            let per_block = layout.block_bytes();
            if kv.layout != layout || kv.data.len() != kv.num_blocks * per_block {
                return Err(EngineError::InvalidRequest(format!(
                    "not the mocker's KV: {:?}",
                    kv.layout
                )));
            }
            let bytes = (kv.num_blocks * config.block_size) as f64 * config.kv_bytes_per_token as f64;
            let simulated = Duration::from_secs_f64(bytes / config.transfer_bytes_per_sec / config.speedup);
            tokio::time::sleep(simulated).await;
            let hashes = kv
                .data
                .chunks_exact(per_block)
                .map(|c| u64::from_le_bytes(c[..HASH_BYTES].try_into().unwrap_or_default()))
                .collect();
            let first = kv.first_block;
            handle
                .ask(|reply| Own::Import {
                    tokens,
                    first,
                    hashes,
                    reply,
                })
                .await?
                .map_err(EngineError::InvalidRequest)
        })
    }
}

struct Loop {
    scheduler: Scheduler<Sink, Counted>,
    subscribers: Vec<mpsc::UnboundedSender<Vec<KvEvent>>>,
    block_size: usize,
    tiers: Option<crate::tiers::Tiers>,
}

impl Loop {
    fn handle(&mut self, command: Command<TokenSource, (), Own>) {
        let Some(own) = host::apply(command, &mut self.scheduler, &mut self.subscribers, self.tiers.as_ref()) else {
            return;
        };
        let block_size = self.block_size;
        match own {
            Own::CachedPrefix { tokens, reply } | Own::Export { tokens, reply } => {
                let hashes = turbine_tokens::block_hashes(&tokens, block_size);
                let _ = reply.send(self.scheduler.pool_mut().match_prefix(&hashes));
            }
            Own::Import {
                tokens,
                first,
                hashes: sent,
                reply,
            } => {
                let _ = reply.send(self.import(&tokens, first, &sent));
            }
        }
    }

    /// Registers blocks `first..` of `tokens`, whose sequence hashes the prefill worker
    /// sent, as cached: what an imported block's KV would make them.
    fn import(&mut self, tokens: &[u32], first: usize, sent: &[u64]) -> Result<usize, String> {
        let hashes = turbine_tokens::block_hashes(tokens, self.block_size);
        let end = first + sent.len();
        if end > hashes.len() {
            return Err(format!(
                "blocks {first}..{end} for {} full blocks of tokens",
                hashes.len()
            ));
        }
        if let Some(i) = (first..end).find(|&i| hashes[i].sequence != sent[i - first]) {
            return Err(format!("block {i} is another prompt's"));
        }
        let pool = self.scheduler.pool_mut();
        let have = pool.match_prefix(&hashes[..end]);
        if have < first {
            return Err(format!(
                "the {first} blocks before the imported ones are no longer cached ({have} are)"
            ));
        }
        if have == end {
            return Ok(0);
        }
        let blocks = pool
            .allocate(end - have)
            .ok_or_else(|| format!("no room for {} blocks", end - have))?;
        let parent = have.checked_sub(1).map(|i| hashes[i].sequence);
        pool.register(&blocks, &hashes[have..end], parent);
        pool.release(blocks.iter().rev().copied());
        self.flush_events();
        Ok(end - have)
    }

    fn flush_events(&mut self) {
        crate::broadcast_events(&mut self.subscribers, self.scheduler.take_events());
    }
}

/// The most lateness the engine makes up by running its next steps early.
const CATCH_UP: Duration = Duration::from_millis(10);

/// Shortest interval between two load updates while busy: computing the load visits
/// every sequence, which at every step would cost as much as the step itself.
const LOAD_UPDATE_INTERVAL: Duration = Duration::from_millis(5);

async fn run(
    scheduler: Scheduler<Sink, Counted>,
    tiers: Option<crate::tiers::Tiers>,
    ends: LoopEnds<TokenSource, (), Own>,
    block_size: usize,
    busy_ns: Arc<AtomicU64>,
    simulated_ns: Arc<AtomicU64>,
) {
    let LoopEnds { commands: mut rx, load } = ends;
    use tokio::time::Instant;
    let mut l = Loop {
        scheduler,
        subscribers: Vec::new(),
        block_size,
        tiers,
    };
    // When the last step ended by the timing model. Steps are chained from it rather than
    // from the moment the timer fired: tokio timers round up to the millisecond, which at
    // high speedups is the length of a whole step, and a busy runtime runs the engine's
    // task after the readers queued ahead of it. Chaining lets the next steps make that
    // lateness up, so the engine keeps its modelled throughput (32 engines of 128
    // sequences at speedup 10 kept 81-93% of it when only 2 ms were made up, all of it
    // with 10 ms). A lag beyond `CATCH_UP` (a stalled process) is dropped, not made up in
    // a burst.
    let mut clock: Option<Instant> = None;
    let mut load_published = Instant::now();
    loop {
        let work = std::time::Instant::now();
        while let Ok(msg) = rx.try_recv() {
            l.handle(msg);
        }
        let step = match &mut l.tiers {
            Some(tiers) => {
                let step = l.scheduler.schedule_with(&mut tiers.lower(&mut turbine_kvbm::NoBytes));
                tiers.after_schedule(l.scheduler.pool_mut(), &turbine_kvbm::NoBytes);
                step
            }
            None => l.scheduler.schedule(),
        };
        l.flush_events();
        let now = Instant::now();
        if step.is_empty() || now >= load_published + LOAD_UPDATE_INTERVAL {
            load.send_replace(l.scheduler.load());
            load_published = now;
        }
        busy_ns.fetch_add(work.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if step.is_empty() {
            // Idle (a prompt that fits the pool can always be admitted once nothing runs),
            // or waiting for a copy from the tiers below.
            clock = None;
            let copy = l.tiers.as_ref().and_then(|t| t.next_ready());
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(msg) => l.handle(msg),
                    None => return,
                },
                _ = sleep_until_some(copy) => {}
            }
            continue;
        }
        let start = match clock {
            Some(c) if now.saturating_duration_since(c) < CATCH_UP => c,
            _ => now,
        };
        let duration = l.scheduler.duration(&step);
        simulated_ns.fetch_add(duration.as_nanos() as u64, Ordering::Relaxed);
        let deadline = start + duration;
        clock = Some(deadline);
        loop {
            tokio::select! {
                biased;
                msg = rx.recv() => match msg {
                    Some(msg) => {
                        // Cancellations free blocks at once, and the load says so.
                        l.handle(msg);
                        l.flush_events();
                        load.send_replace(l.scheduler.load());
                    }
                    None => return,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let work = std::time::Instant::now();
        l.scheduler.touch_sinks(&step, |sink| sink.out.warm());
        // A sink that refuses a token has lost its reader: the sequence is dropped.
        l.scheduler
            .complete(&step, |sink, p| sink.out.push(p.token, p.cached_tokens, p.finish));
        if let Some(tiers) = &mut l.tiers {
            tiers.after_step(l.scheduler.pool_mut(), &turbine_kvbm::NoBytes);
        }
        busy_ns.fetch_add(work.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
