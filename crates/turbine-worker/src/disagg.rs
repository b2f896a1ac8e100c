//! A worker's side of disaggregated serving. A prefill worker computes a prompt, copies its
//! KV blocks into staging slots of its transfer agent and holds them under a lease; a decode
//! worker reads the blocks it lacks, checks each slot's header against the lease, and
//! imports them into its engine's cache before generating, so its prefill is only the
//! prompt's tail.
//!
//! Staging copies blocks out of the engine's pool, so the pool's blocks are free again as
//! soon as the prefill ends; a GPU build would register the pool itself with the agent and
//! lease its blocks in place.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use turbine_engine::{Engine, EngineError, KvBlocks, KvLayout, KvTransfer};
use turbine_protocols::discovery::transfer_agents_prefix;
use turbine_protocols::{EngineOutput, FinishReason, KvTransferParams, PreprocessedRequest, WorkerRole};
use turbine_runtime::Discovery;
use turbine_transfer::{
    Agent, AgentMetadata, AgentOptions, Compat, Desc, DescList, Peer, Post, RegionId, TransferError,
};

/// Each staging slot starts with the lease it was written for and the block's index in the
/// prompt, so a reader can tell a slot released and reused since from the block it wanted.
const HEADER: u64 = 16;

/// How a worker takes part in disaggregated serving.
#[derive(Debug, Clone)]
pub struct DisaggConfig {
    pub role: WorkerRole,
    /// Where the transfer agent listens for peers in other processes.
    pub listen: SocketAddr,
    /// Staging: blocks a prefill worker can hold for decode workers at once, or a decode
    /// worker can receive at once.
    pub staging: StagingSize,
    /// How long a prefill worker holds staged blocks that nobody reads.
    pub lease: Duration,
    /// How long a decode worker waits for its blocks before prefilling them itself.
    pub transfer_timeout: Duration,
    /// Stage in shared memory, which decode workers on the same host read directly.
    pub shared_memory: bool,
}

/// How much a worker stages, in blocks or in bytes (as many blocks as fit, at least one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StagingSize {
    Blocks(usize),
    Bytes(u64),
}

impl StagingSize {
    fn slots(self, slot_bytes: u64) -> usize {
        match self {
            StagingSize::Blocks(n) => n.max(1),
            StagingSize::Bytes(b) => usize::try_from(b / slot_bytes.max(1)).unwrap_or(usize::MAX).max(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DisaggError {
    #[error("the engine cannot export or import KV blocks, so it cannot serve as a {0:?} worker")]
    NoKvTransfer(WorkerRole),
    #[error("cannot set up the transfer agent")]
    Transfer(#[from] TransferError),
}

/// Where a worker finds its peers' transfer agents: the keys under
/// [`transfer_agents_prefix`], where each disaggregated worker publishes its agent's
/// metadata once and keeps it until it has stopped, draining included.
#[derive(Clone)]
pub struct Directory {
    discovery: Arc<dyn Discovery>,
    prefix: String,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory").field("prefix", &self.prefix).finish()
    }
}

impl Directory {
    pub fn new(discovery: Arc<dyn Discovery>, namespace: &str) -> Self {
        Self {
            discovery,
            prefix: transfer_agents_prefix(namespace),
        }
    }

    /// The metadata of the agent `uid`, as its worker published it.
    async fn find(&self, uid: u64) -> Result<AgentMetadata, String> {
        let entries = self
            .discovery
            .list(&self.prefix)
            .await
            .map_err(|e| format!("looking up transfer agent {uid:016x}: {e}"))?;
        entries
            .iter()
            .filter_map(|kv| serde_json::from_slice::<AgentMetadata>(&kv.value).ok())
            .find(|meta| meta.uid == uid)
            .ok_or_else(|| format!("no worker in discovery publishes transfer agent {uid:016x}"))
    }
}

/// Counts of what happened to disaggregated requests on this worker.
#[derive(Debug, Default)]
pub struct DisaggStats {
    pub prefills: AtomicU64,
    pub blocks_staged: AtomicU64,
    pub leases_expired: AtomicU64,
    pub fetches: AtomicU64,
    pub blocks_fetched: AtomicU64,
    /// Decode requests that prefilled locally because the fetch failed.
    pub fetch_failures: AtomicU64,
}

struct Lease {
    slots: Vec<u32>,
    expires: Instant,
}

/// Fixed-size slots in one region of the agent.
struct Staging {
    region: RegionId,
    slot_bytes: u64,
    free: Mutex<Vec<u32>>,
}

impl Staging {
    fn take(&self, n: usize) -> Vec<u32> {
        let mut free = self.free.lock();
        let k = n.min(free.len());
        let at = free.len() - k;
        free.split_off(at)
    }

    fn put(&self, slots: impl IntoIterator<Item = u32>) {
        self.free.lock().extend(slots);
    }

    fn desc(&self, slot: u32) -> Desc {
        Desc {
            region: self.region,
            offset: u64::from(slot) * self.slot_bytes,
            len: self.slot_bytes,
        }
    }
}

/// The worker's transfer agent and what it holds.
pub struct Disagg {
    role: WorkerRole,
    kv: Arc<dyn KvTransfer>,
    layout: KvLayout,
    agent: Agent,
    staging: Staging,
    leases: Mutex<HashMap<u64, Lease>>,
    peers: tokio::sync::Mutex<HashMap<u64, Arc<Peer>>>,
    /// Where peers' agents are found by id.
    directory: Directory,
    config: DisaggConfig,
    pub stats: DisaggStats,
}

impl std::fmt::Debug for Disagg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disagg")
            .field("role", &self.role)
            .field("agent", &self.agent.name())
            .finish()
    }
}

impl Disagg {
    /// Sets up the agent and its staging region; a prefill worker also starts releasing
    /// leases as decode workers finish reading (their notifications) or as they expire.
    pub fn start(
        engine: &dyn Engine,
        name: &str,
        model: &str,
        config: DisaggConfig,
        directory: Directory,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, DisaggError> {
        let kv = engine.kv_transfer().ok_or(DisaggError::NoKvTransfer(config.role))?;
        let layout = kv.layout();
        let mut options = AgentOptions::new(name, compat(model, &layout));
        options.listen = Some(config.listen);
        options.shared_memory = config.shared_memory;
        let agent = Agent::new(options)?;
        let slot_bytes = HEADER + layout.block_bytes() as u64;
        let slots = config.staging.slots(slot_bytes);
        let len = slot_bytes * slots as u64;
        let shared = if config.shared_memory && config.role == WorkerRole::Prefill {
            agent
                .register_shared(len)
                .inspect_err(|e| tracing::warn!(error = %e, "staging in host memory: decode workers on this host read it over TCP"))
                .ok()
        } else {
            None
        };
        let region = match shared {
            Some(region) => region,
            None => agent.register_host(len)?,
        };
        let staging = Staging {
            region,
            slot_bytes,
            free: Mutex::new((0..slots as u32).rev().collect()),
        };
        let notifications = agent.notifications();
        let this = Arc::new(Disagg {
            role: config.role,
            kv,
            layout,
            agent,
            staging,
            leases: Mutex::new(HashMap::new()),
            peers: tokio::sync::Mutex::new(HashMap::new()),
            directory,
            config,
            stats: DisaggStats::default(),
        });
        if this.role == WorkerRole::Prefill {
            let weak = Arc::downgrade(&this);
            let lease = this.config.lease;
            tokio::spawn(async move {
                let Some(mut notifications) = notifications else { return };
                let mut sweep = tokio::time::interval((lease / 4).max(Duration::from_millis(10)));
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        note = notifications.recv() => {
                            let (Some(note), Some(this)) = (note, weak.upgrade()) else { return };
                            this.release(note.tag);
                        }
                        _ = sweep.tick() => {
                            let Some(this) = weak.upgrade() else { return };
                            this.expire(Instant::now());
                        }
                    }
                }
            });
        }
        Ok(this)
    }

    pub fn role(&self) -> WorkerRole {
        self.role
    }

    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// The agent's metadata as the worker publishes it (JSON): its regions never change
    /// after start, so peers read it once.
    pub fn agent_json(&self) -> Vec<u8> {
        // Plain structs of strings and numbers always serialize.
        serde_json::to_vec(&self.agent.metadata()).unwrap_or_default()
    }

    /// Staging slots free now (all of them once every lease is released).
    pub fn free_slots(&self) -> usize {
        self.staging.free.lock().len()
    }

    pub fn lease_duration(&self) -> Duration {
        self.config.lease
    }

    /// Leases held now.
    pub fn leases(&self) -> usize {
        self.leases.lock().len()
    }

    fn release(&self, lease: u64) {
        if let Some(held) = self.leases.lock().remove(&lease) {
            self.staging.put(held.slots);
        }
    }

    fn expire(&self, now: Instant) {
        let expired: Vec<Lease> = {
            let mut leases = self.leases.lock();
            let ids: Vec<u64> = leases
                .iter()
                .filter(|(_, l)| l.expires <= now)
                .map(|(&id, _)| id)
                .collect();
            ids.iter().filter_map(|id| leases.remove(id)).collect()
        };
        for lease in expired {
            self.stats.leases_expired.fetch_add(1, Ordering::Relaxed);
            self.staging.put(lease.slots);
        }
    }

    /// Computes `request`'s prompt on `engine` and stages its full blocks; the one output
    /// says where they are. Blocks that find no free slot are left to the decode worker.
    pub async fn prefill(
        &self,
        engine: &dyn Engine,
        mut request: PreprocessedRequest,
        cancel: CancellationToken,
    ) -> Result<EngineOutput, EngineError> {
        request.disagg = None;
        request.stop.max_tokens = Some(1);
        let tokens = request.token_ids.clone();
        let mut outputs = engine.generate(request, cancel.clone())?;
        while let Some(output) = outputs.next().await {
            output?;
        }
        if cancel.is_cancelled() {
            return Err(EngineError::Stopped);
        }
        let exported = self.kv.export_prefix(tokens).await?;
        let per_block = self.layout.block_bytes();
        if exported.data.len() != exported.num_blocks * per_block {
            return Err(EngineError::InvalidRequest(format!(
                "the engine exported {} bytes for {} blocks of {per_block}",
                exported.data.len(),
                exported.num_blocks
            )));
        }
        let slots = self.staging.take(exported.num_blocks);
        let lease: u64 = rand::random();
        let mut slot = vec![0u8; self.staging.slot_bytes as usize];
        for (i, &s) in slots.iter().enumerate() {
            slot[..8].copy_from_slice(&lease.to_le_bytes());
            slot[8..16].copy_from_slice(&(i as u64).to_le_bytes());
            slot[HEADER as usize..].copy_from_slice(&exported.data[i * per_block..(i + 1) * per_block]);
            if let Err(e) = self.agent.write_local(self.staging.desc(s), &slot) {
                self.staging.put(slots.iter().copied());
                return Err(EngineError::InvalidRequest(format!("staging KV: {e}")));
            }
        }
        self.stats.prefills.fetch_add(1, Ordering::Relaxed);
        self.stats
            .blocks_staged
            .fetch_add(slots.len() as u64, Ordering::Relaxed);
        let params = KvTransferParams {
            agent: self.agent.metadata().uid,
            lease,
            region: self.staging.region.0,
            slot_bytes: self.staging.slot_bytes,
            slots: slots.clone(),
            lease_ms: self.config.lease.as_millis() as u64,
        };
        self.leases.lock().insert(
            lease,
            Lease {
                slots,
                expires: Instant::now() + self.config.lease,
            },
        );
        Ok(EngineOutput {
            finish_reason: Some(FinishReason::Length),
            kv_transfer: Some(Box::new(params)),
            ..EngineOutput::default()
        })
    }

    /// Brings the blocks of `tokens` that this engine lacks from where `params` says, into
    /// its cache. On failure nothing is imported and the caller prefills as usual.
    pub async fn fetch(&self, tokens: &[u32], params: &KvTransferParams) -> Result<usize, String> {
        self.stats.fetches.fetch_add(1, Ordering::Relaxed);
        let result = tokio::time::timeout(self.config.transfer_timeout, self.fetch_inner(tokens, params))
            .await
            .unwrap_or_else(|_| Err(format!("no blocks within {:?}", self.config.transfer_timeout)));
        match &result {
            Ok(n) => {
                self.stats.blocks_fetched.fetch_add(*n as u64, Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.fetch_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    async fn fetch_inner(&self, tokens: &[u32], params: &KvTransferParams) -> Result<usize, String> {
        // The agents' handshake refuses a peer of another model or KV layout (their
        // compatibility), before any byte moves.
        let uid = params.agent;
        let peer = self.peer(uid).await?;
        if params.slot_bytes != self.staging.slot_bytes {
            return Err(format!(
                "slots of {} bytes, not {}",
                params.slot_bytes, self.staging.slot_bytes
            ));
        }
        let have = self
            .kv
            .cached_prefix(tokens.to_vec())
            .await
            .map_err(|e| e.to_string())?;
        let wanted = params.slots.len().saturating_sub(have);
        let local = self.staging.take(wanted);
        let result = self.read(&peer, params, have, &local).await;
        let blocks = match result {
            Ok(blocks) => blocks,
            Err(e) => {
                self.staging.put(local);
                if matches!(e, FetchError::Transfer(TransferError::RemoteDisconnected { .. })) {
                    self.peers.lock().await.remove(&uid);
                }
                return Err(e.to_string());
            }
        };
        self.staging.put(local);
        let Some(blocks) = blocks else { return Ok(0) };
        self.kv
            .import_blocks(tokens.to_vec(), blocks)
            .await
            .map_err(|e| e.to_string())
    }

    /// Reads `params.slots[have..]` (as many as `local` holds) and checks their headers.
    /// With nothing to read it still tells the prefill worker, which releases the lease.
    async fn read(
        &self,
        peer: &Peer,
        params: &KvTransferParams,
        have: usize,
        local: &[u32],
    ) -> Result<Option<KvBlocks>, FetchError> {
        let region = RegionId(params.region);
        let remote: DescList = params.slots[have..have + local.len()]
            .iter()
            .map(|&s| Desc {
                region,
                offset: u64::from(s) * params.slot_bytes,
                len: params.slot_bytes,
            })
            .collect();
        let ours: DescList = local.iter().map(|&s| self.staging.desc(s)).collect();
        let post = Post::read(params.lease).deadline(self.config.transfer_timeout);
        self.agent.post(post, &ours, peer, &remote)?.wait().await?;
        if local.is_empty() {
            return Ok(None);
        }
        let per_block = self.layout.block_bytes();
        let mut data = Vec::with_capacity(local.len() * per_block);
        let mut slot = vec![0u8; self.staging.slot_bytes as usize];
        for (i, &s) in local.iter().enumerate() {
            self.agent.read_local(self.staging.desc(s), &mut slot)?;
            let lease = u64::from_le_bytes(slot[..8].try_into().unwrap_or_default());
            let index = u64::from_le_bytes(slot[8..16].try_into().unwrap_or_default());
            if lease != params.lease || index != (have + i) as u64 {
                return Err(FetchError::Stale {
                    block: have + i,
                    lease: params.lease,
                    found: lease,
                });
            }
            data.extend_from_slice(&slot[HEADER as usize..]);
        }
        Ok(Some(KvBlocks {
            layout: self.layout.clone(),
            data,
            num_blocks: local.len(),
            first_block: have,
        }))
    }

    /// The connected peer `uid`, looked up in discovery and connected on first use.
    async fn peer(&self, uid: u64) -> Result<Arc<Peer>, String> {
        let mut peers = self.peers.lock().await;
        if let Some(peer) = peers.get(&uid) {
            return Ok(Arc::clone(peer));
        }
        let meta = self.directory.find(uid).await?;
        let peer = Arc::new(self.agent.connect(meta).await.map_err(|e| e.to_string())?);
        peers.insert(uid, Arc::clone(&peer));
        Ok(peer)
    }
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error(transparent)]
    Transfer(#[from] TransferError),
    #[error("block {block} was released and reused since (lease {lease:016x}, slot now holds {found:016x})")]
    Stale { block: usize, lease: u64, found: u64 },
}

/// What two workers must share to exchange KV: the model and its KV layout (shape, dtype,
/// block size, axis order).
fn compat(model: &str, layout: &KvLayout) -> Compat {
    Compat::new([
        ("model", model.to_owned()),
        ("layers", layout.num_layers.to_string()),
        ("kv_heads", layout.num_kv_heads.to_string()),
        ("head_dim", layout.head_dim.to_string()),
        ("block_size", layout.block_size.to_string()),
        ("dtype", layout.dtype.clone()),
        ("order", layout.order.clone()),
    ])
}
