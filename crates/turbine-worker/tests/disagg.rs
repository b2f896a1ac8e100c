//! A prefill worker's staged KV and a decode worker's fetch, against an engine that keeps
//! its blocks in a map: blocks arrive byte for byte, leases free their slots when read or
//! expired, and a fetch that finds its slots reused by another lease fails without importing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use turbine_engine::{Engine, EngineError, EngineStream, KvBlocks, KvLayout, KvTransfer};
use turbine_protocols::discovery::{transfer_agent_key, transfer_agents_prefix, ModelEntry};
use turbine_protocols::{EngineOutput, FinishReason, ModelCard, PreprocessedRequest, TokenizerKind, WorkerRole};
use turbine_runtime::{Discovery, MemoryDiscovery};
use turbine_worker::{Directory, Disagg, DisaggConfig};

const BLOCK: usize = 4;

fn layout() -> KvLayout {
    KvLayout {
        num_layers: 1,
        num_kv_heads: 1,
        head_dim: 2,
        block_size: BLOCK,
        dtype: "f32".into(),
        order: "test".into(),
    }
}

/// Cached blocks by the prompt prefix they end: a block's bytes are a function of it, so a
/// block in the wrong place shows.
#[derive(Default)]
struct MapEngine {
    blocks: Arc<Mutex<HashMap<Vec<u32>, Vec<u8>>>>,
}

fn bytes_of(prefix: &[u32]) -> Vec<u8> {
    let seed: u32 = prefix.iter().fold(7, |a, &t| a.wrapping_mul(31).wrapping_add(t));
    (0..layout().block_bytes()).map(|i| (seed as usize + i) as u8).collect()
}

fn cached(blocks: &HashMap<Vec<u32>, Vec<u8>>, tokens: &[u32]) -> usize {
    (1..=tokens.len() / BLOCK)
        .take_while(|&b| blocks.contains_key(&tokens[..b * BLOCK]))
        .count()
}

impl Engine for MapEngine {
    fn generate(&self, request: PreprocessedRequest, _cancel: CancellationToken) -> Result<EngineStream, EngineError> {
        let mut blocks = self.blocks.lock();
        for b in 1..=request.token_ids.len() / BLOCK {
            let prefix = request.token_ids[..b * BLOCK].to_vec();
            blocks.entry(prefix.clone()).or_insert_with(|| bytes_of(&prefix));
        }
        let done = EngineOutput {
            token_ids: [1].into_iter().collect(),
            finish_reason: Some(FinishReason::Length),
            ..EngineOutput::default()
        };
        Ok(EngineStream::new(futures::stream::once(async move { Ok(done) })))
    }

    fn kv_transfer(&self) -> Option<Arc<dyn KvTransfer>> {
        Some(Arc::new(MapKv(self.blocks.clone())))
    }
}

struct MapKv(Arc<Mutex<HashMap<Vec<u32>, Vec<u8>>>>);

impl KvTransfer for MapKv {
    fn layout(&self) -> KvLayout {
        layout()
    }

    fn cached_prefix(&self, tokens: Vec<u32>) -> BoxFuture<'static, Result<usize, EngineError>> {
        let n = cached(&self.0.lock(), &tokens);
        Box::pin(async move { Ok(n) })
    }

    fn export_prefix(&self, tokens: Vec<u32>) -> BoxFuture<'static, Result<KvBlocks, EngineError>> {
        let blocks = self.0.lock();
        let n = cached(&blocks, &tokens);
        let data = (1..=n).flat_map(|b| blocks[&tokens[..b * BLOCK]].clone()).collect();
        Box::pin(async move {
            Ok(KvBlocks {
                layout: layout(),
                data,
                num_blocks: n,
                first_block: 0,
            })
        })
    }

    fn import_blocks(&self, tokens: Vec<u32>, kv: KvBlocks) -> BoxFuture<'static, Result<usize, EngineError>> {
        let mut blocks = self.0.lock();
        let result = if cached(&blocks, &tokens) < kv.first_block {
            Err(EngineError::InvalidRequest("the blocks before are gone".into()))
        } else {
            let per = layout().block_bytes();
            for i in 0..kv.num_blocks {
                let b = kv.first_block + i + 1;
                blocks.insert(tokens[..b * BLOCK].to_vec(), kv.data[i * per..(i + 1) * per].to_vec());
            }
            Ok(kv.num_blocks)
        };
        Box::pin(async move { result })
    }
}

fn config(role: WorkerRole, lease: Duration) -> Result<DisaggConfig> {
    Ok(DisaggConfig {
        role,
        listen: "127.0.0.1:0".parse()?,
        staging: turbine_worker::StagingSize::Blocks(4),
        lease,
        transfer_timeout: Duration::from_secs(5),
        shared_memory: false,
    })
}

fn request(tokens: Vec<u32>) -> PreprocessedRequest {
    PreprocessedRequest {
        request_id: "r".into(),
        model: "m".into(),
        token_ids: tokens,
        stop: Default::default(),
        sampling: Default::default(),
        disagg: None,
    }
}

async fn eventually(what: &str, f: impl Fn() -> bool) -> Result<()> {
    for _ in 0..500 {
        if f() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    anyhow::bail!("{what} never happened")
}

/// A prefill agent (model `m`, leases of `lease`) over `prefill` and a decode agent (model
/// `decode_model`) over `decode`, stopped together by the returned token.
async fn agents(
    prefill: &dyn Engine,
    decode: &dyn Engine,
    lease: Duration,
    decode_model: &str,
) -> Result<(Arc<Disagg>, Arc<Disagg>, CancellationToken)> {
    let stop = CancellationToken::new();
    let discovery = MemoryDiscovery::new();
    let directory = Directory::new(Arc::new(discovery.clone()), "ns");
    let p = Disagg::start(
        prefill,
        "p",
        "m",
        config(WorkerRole::Prefill, lease)?,
        directory.clone(),
        stop.clone(),
    )?;
    publish(&discovery, &p).await?;
    let d = Disagg::start(
        decode,
        "d",
        decode_model,
        config(WorkerRole::Decode, lease)?,
        directory,
        stop.clone(),
    )?;
    Ok((p, d, stop))
}

/// Publishes `agent`'s metadata where peers look for it, as a worker does.
async fn publish(discovery: &MemoryDiscovery, agent: &Disagg) -> Result<()> {
    let key = transfer_agent_key("ns", agent.agent().metadata().uid);
    discovery.put(&key, agent.agent_json(), None).await?;
    Ok(())
}

/// The transfer parameters of a prefill of `tokens`.
async fn staged(prefill: &Disagg, engine: &dyn Engine, tokens: &[u32]) -> Result<turbine_protocols::KvTransferParams> {
    let out = prefill
        .prefill(engine, request(tokens.to_vec()), CancellationToken::new())
        .await?;
    Ok(*out.kv_transfer.context("no transfer params")?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_blocks_arrive_whole_and_stale_ones_are_refused() -> Result<()> {
    let (prefill_engine, decode_engine) = (MapEngine::default(), MapEngine::default());
    let (prefill, decode, stop) = agents(&prefill_engine, &decode_engine, Duration::from_millis(100), "m").await?;

    // Ten tokens: two full blocks move, the tail stays for the decode worker to compute.
    let a: Vec<u32> = (100..110).collect();
    let params = staged(&prefill, &prefill_engine, &a).await?;
    ensure!(params.slots.len() == 2 && prefill.free_slots() == 2, "{params:?}");
    ensure!(decode.fetch(&a, &params).await.map_err(anyhow::Error::msg)? == 2);
    for b in 1..=2 {
        ensure!(
            decode_engine.blocks.lock()[&a[..b * BLOCK]] == bytes_of(&a[..b * BLOCK]),
            "block {b} changed"
        );
    }
    // The read's notification releases the lease.
    eventually("the lease release", || {
        prefill.free_slots() == 4 && prefill.leases() == 0
    })
    .await?;

    // A second fetch of the same prompt moves nothing: the decode worker holds both blocks.
    let again = staged(&prefill, &prefill_engine, &a).await?;
    ensure!(decode.fetch(&a, &again).await.map_err(anyhow::Error::msg)? == 0);
    eventually("the release of a lease nobody needed", || prefill.leases() == 0).await?;

    // A lease that expires unread frees its slots; the next prompt reuses them, and a late
    // reader of the first finds another lease in their headers.
    let b: Vec<u32> = (200..208).collect();
    let late = staged(&prefill, &prefill_engine, &b).await?;
    eventually("the lease's expiry", || prefill.leases() == 0).await?;
    let c: Vec<u32> = (300..308).collect();
    let fresh = staged(&prefill, &prefill_engine, &c).await?;
    ensure!(
        fresh.slots == late.slots,
        "the slots were not reused: {:?} then {:?}",
        late.slots,
        fresh.slots
    );
    let err = decode.fetch(&b, &late).await.err().context("a stale fetch succeeded")?;
    ensure!(err.contains("released and reused"), "{err}");
    ensure!(
        cached(&decode_engine.blocks.lock(), &b) == 0,
        "stale blocks were imported"
    );
    ensure!(decode.fetch(&c, &fresh).await.map_err(anyhow::Error::msg)? == 2);

    // Nothing leaks: every slot is free again on both sides.
    eventually("every slot free", || {
        prefill.free_slots() == 4 && decode.free_slots() == 4
    })
    .await?;
    let s = &decode.stats;
    ensure!(s.fetch_failures.load(std::sync::atomic::Ordering::Relaxed) == 1);
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_of_another_model_is_refused() -> Result<()> {
    let (prefill_engine, decode_engine) = (MapEngine::default(), MapEngine::default());
    let (prefill, decode, stop) = agents(&prefill_engine, &decode_engine, Duration::from_secs(1), "other").await?;
    let a: Vec<u32> = (100..108).collect();
    let params = staged(&prefill, &prefill_engine, &a).await?;
    let err = decode
        .fetch(&a, &params)
        .await
        .err()
        .context("an incompatible peer was used")?;
    ensure!(err.contains("model: other here, m there"), "{err}");
    ensure!(cached(&decode_engine.blocks.lock(), &a) == 0);
    stop.cancel();
    Ok(())
}

/// The mocker moves block identities, and an import takes the time its bytes per token and
/// bandwidth give: here 2 blocks of 16 tokens at 1 MB a token over 160 MB/s, 200 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mocker_moves_block_ids_in_simulated_time() -> Result<()> {
    use turbine_engine::{MockerConfig, MockerEngine};
    let mocker = || {
        MockerEngine::start(MockerConfig {
            kv_bytes_per_token: 1_000_000,
            transfer_bytes_per_sec: 160e6,
            speedup: 100.0,
            ..MockerConfig::default()
        })
    };
    let (prefill_engine, decode_engine) = (mocker()?, mocker()?);
    let decode_kv = decode_engine.kv_transfer().context("kv transfer")?;
    let (prefill, decode, stop) = agents(&prefill_engine, &decode_engine, Duration::from_secs(1), "m").await?;
    let prompt: Vec<u32> = (1000..1040).collect();
    let params = staged(&prefill, &prefill_engine, &prompt).await?;
    ensure!(params.slots.len() == 2, "{params:?}");
    let started = std::time::Instant::now();
    ensure!(decode.fetch(&prompt, &params).await.map_err(anyhow::Error::msg)? == 2);
    let took = started.elapsed();
    // 200 ms over a speedup of 100.
    ensure!(took >= Duration::from_millis(2), "the import took {took:?}");
    ensure!(decode_kv.cached_prefix(prompt.clone()).await? == 2);
    // Another prompt's blocks in these slots are refused by their hashes, not imported.
    let mut forged = params.clone();
    forged.lease = 1;
    let other: Vec<u32> = (5000..5040).collect();
    ensure!(decode.fetch(&other, &forged).await.is_err());
    ensure!(decode_kv.cached_prefix(other).await? == 0);
    stop.cancel();
    Ok(())
}

/// A prefill worker told to stop keeps the KV it staged readable until a decode worker has
/// read it (or its lease expires), and registers its role for frontends to see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_prefill_worker_waits_for_its_blocks_to_be_read() -> Result<()> {
    use turbine_protocols::discovery::models_prefix;
    use turbine_protocols::Disagg as Phase;
    use turbine_runtime::{EndpointId, MemoryEventPlane, Runtime, ServeOptions};
    use turbine_worker::{Worker, WorkerConfig};

    let discovery = MemoryDiscovery::new();
    let runtime = Runtime::new(Arc::new(discovery.clone()), Arc::new(MemoryEventPlane::new()));
    let engine = Arc::new(MapEngine::default());
    let worker = Worker::start(
        &runtime,
        engine.clone(),
        WorkerConfig {
            endpoint: EndpointId::new("ns", "prefill", "generate"),
            model: ModelCard {
                name: "m".into(),
                context_length: 4096,
                tokenizer: TokenizerKind::Bytes,
                kv_block_size: Some(BLOCK as u32),
                timing: None,
            },
            serve: ServeOptions::default(),
            load_report_interval: Duration::from_millis(10),
            disagg: Some(config(WorkerRole::Prefill, Duration::from_secs(20))?),
        },
    )
    .await?;
    let entries = discovery.list(&models_prefix("ns")).await?;
    let entry: ModelEntry = serde_json::from_slice(&entries[0].value)?;
    ensure!(entry.role == WorkerRole::Prefill, "{entry:?}");

    ensure!(discovery.list(&transfer_agents_prefix("ns")).await?.len() == 1);

    let prefill_leg = |tokens: Vec<u32>| {
        let mut leg = request(tokens);
        leg.disagg = Some(Phase::Prefill);
        let (runtime, instance) = (runtime.clone(), worker.instance().clone());
        async move {
            let outputs: Vec<EngineOutput> =
                futures::TryStreamExt::try_collect(runtime.client().call(&instance, leg).await?).await?;
            anyhow::Ok(*outputs[0].kv_transfer.clone().context("no transfer params")?)
        }
    };
    // A decode worker that has fetched from the prefill worker before, so knows its agent.
    let decode_engine = MapEngine::default();
    let decode = Disagg::start(
        &decode_engine,
        "d",
        "m",
        config(WorkerRole::Decode, Duration::from_secs(1))?,
        Directory::new(Arc::new(discovery.clone()), "ns"),
        CancellationToken::new(),
    )?;
    let first = prefill_leg((100..108).collect()).await?;
    ensure!(
        decode
            .fetch(&(100..108).collect::<Vec<u32>>(), &first)
            .await
            .map_err(anyhow::Error::msg)?
            == 2
    );
    let prefill = worker.disagg().context("no disagg")?.clone();
    // The first lease ends when the read's notification arrives.
    eventually("the first lease released", || prefill.leases() == 0).await?;
    let params = prefill_leg((0..12).collect()).await?;
    ensure!(prefill.leases() == 1);

    let stop = CancellationToken::new();
    let stopped = tokio::spawn(worker.run({
        let stop = stop.clone();
        async move { stop.cancelled().await }
    }));
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    ensure!(!stopped.is_finished(), "the worker stopped with staged KV unread");

    // Deregistered, the prefill worker is out of routing, and its staged KV still readable,
    // even by a decode worker that never read from it before the drain began: its agent
    // stays in discovery until it has stopped.
    ensure!(discovery.list(&models_prefix("ns")).await?.is_empty());
    let newcomer_engine = MapEngine::default();
    let newcomer = Disagg::start(
        &newcomer_engine,
        "d2",
        "m",
        config(WorkerRole::Decode, Duration::from_secs(1))?,
        Directory::new(Arc::new(discovery.clone()), "ns"),
        CancellationToken::new(),
    )?;
    ensure!(
        newcomer
            .fetch(&(0..12).collect::<Vec<u32>>(), &params)
            .await
            .map_err(anyhow::Error::msg)?
            == 3
    );
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .context("still running after the read")??;
    ensure!(prefill.leases() == 0);
    ensure!(
        discovery.list(&transfer_agents_prefix("ns")).await?.is_empty(),
        "the stopped worker's agent is still published"
    );
    Ok(())
}
