//! The native engine: the scheduler the mocker uses, driving a real forward pass.
//!
//! One OS thread owns the model, the KV tensors and the scheduler, and loops: take new
//! requests and cancellations, plan a step (continuous batching: new sequences join between
//! steps, prefills are chunked to the token budget, decodes of every running sequence share
//! the step), run it through the model, sample each sequence that caught up, deliver tokens,
//! publish KV events and load. Compute blocks that thread, never the async runtime.

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use turbine_engine::host::{self, Command, EngineHandle};
use turbine_engine::output::Buffered;
use turbine_engine::scheduler::{Scheduler, SeqSpec, Step, Stored};
use turbine_engine::tiers::Tiers;
use turbine_engine::{Engine, EngineError, EngineStream, KvCache, KvLayout, KvTransfer, MockerConfig};
use turbine_kvbm::{BlockBytes, KvbmConfig, PoolShape};
use turbine_protocols::kv::{KvEvent, WorkerLoad};
use turbine_protocols::PreprocessedRequest;

use crate::model::{LoadReport, Model, SeqInput};
use crate::{KvBlocks, KvDtype, NativeError, PagedKv, Sampler};

/// The engine's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct NativeConfig {
    /// Tokens per KV block: the same setting, and the same hashes, as the mocker's.
    pub block_size: usize,
    /// Memory for KV tensors; the pool gets as many blocks as fit.
    pub kv_cache_bytes: usize,
    /// Tokens per step, prefill chunks and decodes together. On a CPU a step of this many
    /// prompt tokens takes about a second, which bounds how long decodes wait behind a prefill.
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub enable_prefix_caching: bool,
    /// Seeds requests that name no seed of their own (each request draws a different one).
    pub seed: u64,
    /// Convert weights with no fast CPU kernel (Q4_1, Q5_0, Q5_1) to Q8_0 at load.
    pub convert_slow_weights: bool,
    /// How KV values are stored: `f16` and `q8` fit 2x and about 4x the blocks of `f32` in
    /// `kv_cache_bytes`, at some precision.
    pub kv_cache_dtype: KvDtype,
    /// Tiers below the KV cache (host memory, disk); none by default.
    pub kvbm: KvbmConfig,
}

impl Default for NativeConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            kv_cache_bytes: 512 << 20,
            max_num_batched_tokens: 512,
            max_num_seqs: 64,
            enable_prefix_caching: true,
            seed: 0,
            convert_slow_weights: true,
            kv_cache_dtype: KvDtype::F32,
            kvbm: KvbmConfig::default(),
        }
    }
}

/// The native engine's own messages, beside those every engine on the shared scheduler takes.
enum Own {
    Export {
        tokens: Vec<u32>,
        reply: oneshot::Sender<KvBlocks>,
    },
    Import {
        tokens: Vec<u32>,
        kv: KvBlocks,
        reply: oneshot::Sender<Result<usize, NativeError>>,
    },
    CachedPrefix {
        tokens: Vec<u32>,
        reply: oneshot::Sender<usize>,
    },
    /// Checks the tiers below the cache: no slot leaked or left leased.
    AuditTiers { reply: oneshot::Sender<Result<(), String>> },
    /// A copy from the tiers below has finished: the loop collects it when it schedules.
    CopyDone,
}

type Handle = EngineHandle<Buffered, Sampler, Own>;
/// Where a sequence's tokens go, with the sampler that picks them.
type Sink = host::Sink<Buffered, Sampler>;

/// A running native engine. Cloning shares it; the thread ends when every clone is gone.
#[derive(Debug, Clone)]
pub struct NativeEngine {
    handle: Handle,
    /// The longest sequence, prompt and output: the model's context or the pool, if smaller.
    max_len: usize,
    vocab_size: usize,
    /// Seeds requests that name no seed of their own.
    seed: u64,
    layout: KvLayout,
    kvbm_stats: Option<Arc<turbine_kvbm::KvbmStats>>,
}

impl NativeEngine {
    /// Loads a model (a `.gguf` file or a Hugging Face directory) on `device` and starts it.
    pub fn load(path: &Path, device: &Device, config: NativeConfig) -> Result<(Self, LoadReport), NativeError> {
        let (model, report) = if path.is_dir() {
            (Model::from_safetensors_dir(path, device)?, LoadReport::default())
        } else {
            Model::from_gguf(path, device, config.convert_slow_weights)?
        };
        Ok((Self::start(model, config)?, report))
    }

    pub fn start(model: Model, config: NativeConfig) -> Result<Self, NativeError> {
        let c = model.config().clone();
        let per_block = PagedKv::bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, config.kv_cache_dtype)
            * config.block_size;
        let num_blocks = config.kv_cache_bytes / per_block.max(1);
        if num_blocks == 0 || config.block_size == 0 || config.max_num_batched_tokens == 0 || config.max_num_seqs == 0 {
            return Err(NativeError::Config(format!(
                "{} bytes of KV cache hold no block of {} tokens ({per_block} bytes), or a limit is zero",
                config.kv_cache_bytes, config.block_size
            )));
        }
        let scheduling = MockerConfig {
            block_size: config.block_size,
            num_blocks,
            max_num_batched_tokens: config.max_num_batched_tokens,
            max_num_seqs: config.max_num_seqs,
            enable_prefix_caching: config.enable_prefix_caching,
            ..MockerConfig::default()
        };
        scheduling.validate().map_err(|e| NativeError::Config(e.to_string()))?;
        let kv = PagedKv::new(
            c.num_layers,
            num_blocks,
            config.block_size,
            c.num_kv_heads,
            c.head_dim,
            config.kv_cache_dtype,
        );
        let layout = kv.layout();
        let mut scheduler = Scheduler::new(scheduling);
        let shape = PoolShape {
            block_bytes: kv.block_bytes(),
            blocks: num_blocks,
            compat: model.fingerprint()? ^ xxhash_rust::xxh3::xxh3_64(format!("{layout:?}").as_bytes()),
            simulated: false,
        };
        let mut tiers =
            Tiers::new(&config.kvbm, shape, scheduler.pool_mut()).map_err(|e| NativeError::Config(e.to_string()))?;
        let (handle, ends) = Handle::new(scheduler.load());
        if let Some(t) = &mut tiers {
            for (tier, blocks, capacity) in t.kvbm().usage() {
                tracing::info!(tier = tier.label(), blocks, capacity, "KV block manager tier");
            }
            t.set_waker(handle.waker(|| Own::CopyDone));
        }
        tracing::info!(
            blocks = num_blocks,
            block_size = config.block_size,
            dtype = %config.kv_cache_dtype,
            kv_mib = (num_blocks * per_block) >> 20,
            "native engine KV cache"
        );
        let max_len = c.max_position_embeddings.min(num_blocks * config.block_size);
        let vocab_size = c.vocab_size;
        let kvbm_stats = tiers.as_ref().map(|t| t.stats());
        let looper = Loop {
            model,
            kv,
            scheduler,
            subscribers: Vec::new(),
            load: ends.load,
            tiers,
        };
        let rx = ends.commands;
        std::thread::Builder::new()
            .name("turbine-native".into())
            .spawn(move || looper.run(rx))
            .map_err(|source| NativeError::Io {
                path: "thread".into(),
                source,
            })?;
        Ok(Self {
            handle,
            max_len,
            vocab_size,
            seed: config.seed,
            layout,
            kvbm_stats,
        })
    }
}

impl NativeEngine {
    /// The KV of the longest cached run of full blocks at the start of `tokens`, as bytes
    /// with their layout: what a prefill worker hands a decode worker.
    pub async fn export_prefix(&self, tokens: Vec<u32>) -> Result<KvBlocks, EngineError> {
        self.handle.ask(|reply| Own::Export { tokens, reply }).await
    }

    /// The block manager's counters, when tiers are configured below the cache.
    pub fn kvbm_stats(&self) -> Option<Arc<turbine_kvbm::KvbmStats>> {
        self.kvbm_stats.clone()
    }

    /// Checks that the tiers below the cache hold no leaked or leased slot; an error names
    /// the first broken invariant.
    pub async fn audit_tiers(&self) -> Result<(), EngineError> {
        self.handle
            .ask(|reply| Own::AuditTiers { reply })
            .await?
            .map_err(EngineError::Failed)
    }

    /// Stores `kv`, exported by an engine with the same layout, as the cached KV of the first
    /// `kv.num_blocks` blocks of `tokens`, so that requests with that prefix skip its
    /// prefill. Blocks already cached are kept; returns how many were added.
    pub async fn import_prefix(&self, tokens: Vec<u32>, kv: KvBlocks) -> Result<usize, EngineError> {
        import(self.handle.clone(), tokens, kv).await
    }
}

async fn import(handle: Handle, tokens: Vec<u32>, kv: KvBlocks) -> Result<usize, EngineError> {
    handle
        .ask(|reply| Own::Import { tokens, kv, reply })
        .await?
        .map_err(|e| EngineError::InvalidRequest(e.to_string()))
}

/// The native engine's side of disaggregated serving.
struct NativeKv {
    handle: Handle,
    layout: KvLayout,
}

impl KvTransfer for NativeKv {
    fn layout(&self) -> KvLayout {
        self.layout.clone()
    }

    fn cached_prefix(&self, tokens: Vec<u32>) -> BoxFuture<'static, Result<usize, EngineError>> {
        let handle = self.handle.clone();
        Box::pin(async move { handle.ask(|reply| Own::CachedPrefix { tokens, reply }).await })
    }

    fn export_prefix(&self, tokens: Vec<u32>) -> BoxFuture<'static, Result<KvBlocks, EngineError>> {
        let handle = self.handle.clone();
        Box::pin(async move { handle.ask(|reply| Own::Export { tokens, reply }).await })
    }

    fn import_blocks(&self, tokens: Vec<u32>, kv: KvBlocks) -> BoxFuture<'static, Result<usize, EngineError>> {
        Box::pin(import(self.handle.clone(), tokens, kv))
    }
}

impl Engine for NativeEngine {
    fn generate(&self, request: PreprocessedRequest, cancel: CancellationToken) -> Result<EngineStream, EngineError> {
        let n = request.token_ids.len();
        if n == 0 {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if n >= self.max_len {
            return Err(EngineError::InvalidRequest(format!(
                "a prompt of {n} tokens leaves no room in this engine's {} tokens of context",
                self.max_len
            )));
        }
        if let Some(bad) = request.token_ids.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the model's vocabulary of {}",
                self.vocab_size
            )));
        }
        let room = (self.max_len - n) as u32;
        let spec = SeqSpec {
            prompt: request.token_ids,
            max_tokens: request.stop.max_tokens.unwrap_or(room).min(room),
            stop_token_ids: request.stop.stop_token_ids,
        };
        let id = self.handle.next_id();
        let sampler = Sampler::new(&request.sampling, self.seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        self.handle.submit(id, spec, Buffered, sampler, cancel)
    }

    fn kv_cache(&self) -> Option<KvCache> {
        Some(KvCache::new(self.handle.clone()))
    }

    fn kvbm_stats(&self) -> Option<Arc<turbine_kvbm::KvbmStats>> {
        self.kvbm_stats.clone()
    }

    fn kv_transfer(&self) -> Option<Arc<dyn KvTransfer>> {
        Some(Arc::new(NativeKv {
            handle: self.handle.clone(),
            layout: self.layout.clone(),
        }))
    }
}

struct Loop {
    model: Model,
    kv: PagedKv,
    scheduler: Scheduler<Sink, Stored>,
    subscribers: Vec<mpsc::UnboundedSender<Vec<KvEvent>>>,
    load: watch::Sender<WorkerLoad>,
    tiers: Option<Tiers>,
}

impl Loop {
    fn handle(&mut self, command: Command<Buffered, Sampler, Own>) {
        let Some(own) = host::apply(command, &mut self.scheduler, &mut self.subscribers, self.tiers.as_ref()) else {
            return;
        };
        match own {
            Own::Export { tokens, reply } => {
                let hashes = turbine_tokens::block_hashes(&tokens, self.kv.block_size());
                let pool = self.scheduler.pool_mut();
                // Held while copied, so that nothing evicts them meanwhile.
                let blocks = pool.acquire_prefix(&hashes);
                let exported = self.kv.export(&blocks);
                self.scheduler.pool_mut().release(blocks.iter().rev().copied());
                match exported {
                    Ok(kv) => {
                        let _ = reply.send(kv);
                    }
                    Err(e) => tracing::error!(error = %e, "exporting cached blocks"),
                }
            }
            Own::Import { tokens, kv, reply } => {
                let _ = reply.send(self.import(&tokens, &kv));
            }
            Own::CachedPrefix { tokens, reply } => {
                let hashes = turbine_tokens::block_hashes(&tokens, self.kv.block_size());
                let _ = reply.send(self.scheduler.pool_mut().match_prefix(&hashes));
            }
            Own::AuditTiers { reply } => {
                let _ = reply.send(self.tiers.as_ref().map_or(Ok(()), |t| t.kvbm().audit()));
            }
            Own::CopyDone => {}
        }
    }

    fn import(&mut self, tokens: &[u32], kv: &KvBlocks) -> Result<usize, NativeError> {
        if kv.layout != self.kv.layout() {
            return Err(NativeError::KvLayout(format!(
                "{:?} into {:?}",
                kv.layout,
                self.kv.layout()
            )));
        }
        let hashes = turbine_tokens::block_hashes(tokens, self.kv.block_size());
        let (first, n) = (kv.first_block, kv.num_blocks);
        let end = first + n;
        if end > hashes.len() || n == 0 || kv.data.len() % n != 0 {
            return Err(NativeError::KvLayout(format!(
                "blocks {first}..{end} of KV for {} full blocks of tokens",
                hashes.len()
            )));
        }
        let pool = self.scheduler.pool_mut();
        let have = pool.match_prefix(&hashes[..end]);
        if have < first {
            // The blocks these continue were evicted since the caller looked: importing them
            // would register KV with no prefix to attach to.
            return Err(NativeError::KvLayout(format!(
                "the {first} blocks before the imported ones are no longer cached here ({have} are)"
            )));
        }
        if have == end {
            return Ok(0);
        }
        let per_block = kv.data.len() / n;
        let fresh = KvBlocks {
            layout: kv.layout.clone(),
            data: kv.data[(have - first) * per_block..].to_vec(),
            num_blocks: end - have,
            first_block: have,
        };
        let Some(blocks) = pool.allocate(end - have) else {
            return Err(NativeError::KvLayout(format!("no room for {} blocks", end - have)));
        };
        let written = self.kv.import(&fresh, &blocks);
        let pool = self.scheduler.pool_mut();
        if written.is_ok() {
            let parent = have.checked_sub(1).map(|i| hashes[i].sequence);
            pool.register(&blocks, &hashes[have..end], parent);
        }
        // Unreferenced, the blocks stay cached until evicted, like any finished request's.
        pool.release(blocks.iter().rev().copied());
        written.map(|()| end - have)
    }

    fn flush(&mut self) {
        turbine_engine::broadcast_events(&mut self.subscribers, self.scheduler.take_events());
        self.load.send_replace(self.scheduler.load());
    }

    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command<Buffered, Sampler, Own>>) {
        loop {
            loop {
                match rx.try_recv() {
                    Ok(msg) => self.handle(msg),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                }
            }
            let step = match &mut self.tiers {
                Some(tiers) => {
                    let step = self.scheduler.schedule_with(&mut tiers.lower(&mut self.kv));
                    tiers.after_schedule(self.scheduler.pool_mut(), &self.kv);
                    step
                }
                None => self.scheduler.schedule(),
            };
            self.flush();
            if step.is_empty() {
                match rx.blocking_recv() {
                    Some(msg) => self.handle(msg),
                    None => return,
                }
                continue;
            }
            let started = std::time::Instant::now();
            let stepped = self.step(&step);
            if let Some(tiers) = &mut self.tiers {
                tiers.observe_prefill(step.prefill_tokens, started.elapsed());
                tiers.after_step(self.scheduler.pool_mut(), &self.kv);
            }
            if let Err(e) = stepped {
                // Nothing a request did should get here (inputs are checked on arrival), so
                // this is a bug or a resource failure: end the step's requests, keep serving.
                tracing::error!(error = %e, "native engine step failed; its requests end");
                for &(_, id, _) in &step.entries {
                    self.scheduler.cancel(id);
                }
            }
            self.flush();
        }
    }

    fn step(&mut self, step: &Step) -> Result<(), NativeError> {
        // Row of the logits for each entry that is still live.
        let mut rows = vec![usize::MAX; step.entries.len()];
        let mut inputs = Vec::with_capacity(step.entries.len());
        for (i, entry) in step.entries.iter().enumerate() {
            if let Some(input) = self.scheduler.input(entry) {
                rows[i] = inputs.len();
                inputs.push(SeqInput {
                    tokens: input.tokens,
                    start: input.start,
                    table: input.blocks,
                });
            }
        }
        if inputs.is_empty() {
            return Ok(());
        }
        let logits = self.model.forward(&inputs, &mut self.kv)?.to_vec2::<f32>()?;
        let mut logits = logits;
        self.scheduler.complete_with(
            step,
            |i, sink| sink.extra.sample(&mut logits[rows[i]]),
            |sink, p| sink.out.push(p.token, p.cached_tokens, p.finish),
        );
        Ok(())
    }
}

/// The KV tensors as the block manager copies them: a block's pieces in place.
impl BlockBytes for PagedKv {
    fn pieces(&self, block: u32) -> Option<Vec<&[u8]>> {
        self.block_pieces(block).ok()
    }

    fn pieces_mut(&mut self, block: u32) -> Option<Vec<&mut [u8]>> {
        self.block_pieces_mut(block).ok()
    }
}
