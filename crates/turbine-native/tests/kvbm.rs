//! The block manager under the native engine, on a generated tiny model whose KV cache holds
//! a few blocks, so that every turn of a conversation finds its history evicted from the
//! cache and loads it from host memory or disk: output stays token-identical to the engine
//! without tiers, over several workload seeds, with host memory, with disk only, and with a
//! disk tier reopened after a restart; and after random cancels no block is leaked in any
//! tier and the KV events replay into exactly what every tier holds.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use candle_core::Device;
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;
use turbine_engine::pool::EventReplica;
use turbine_engine::Engine;
use turbine_kvbm::{KvbmConfig, Path, PrefetchPolicy, TierSize};
use turbine_native::tiny::{write_tiny_model, TinySpec};
use turbine_native::{NativeConfig, NativeEngine, PagedKv};
use turbine_protocols::llm::{SamplingOptions, StopConditions};
use turbine_protocols::PreprocessedRequest;

const USERS: usize = 16;
const TURNS: usize = 4;
const OUTPUT: u32 = 8;
/// The KV cache: twelve blocks of 16 tokens, about one conversation's history.
const G1_BLOCKS: usize = 12;

fn blocks(n: usize) -> TierSize {
    TierSize {
        bytes: None,
        blocks: Some(n),
    }
}

fn config(kvbm: KvbmConfig) -> NativeConfig {
    let spec = TinySpec::default();
    let per_token = PagedKv::bytes_per_token(
        spec.layers,
        spec.kv_heads,
        spec.hidden / spec.heads,
        NativeConfig::default().kv_cache_dtype,
    );
    NativeConfig {
        kv_cache_bytes: per_token * 16 * G1_BLOCKS,
        kvbm,
        ..NativeConfig::default()
    }
}

fn host_tier() -> KvbmConfig {
    KvbmConfig {
        host: blocks(512),
        ..KvbmConfig::default()
    }
}

fn disk_tier(dir: &std::path::Path) -> KvbmConfig {
    KvbmConfig {
        disk: blocks(512),
        disk_dir: Some(dir.to_owned()),
        disk_after_sightings: 1,
        ..KvbmConfig::default()
    }
}

struct Model {
    dir: tempfile::TempDir,
}

impl Model {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        write_tiny_model(dir.path(), &TinySpec::default())?;
        Ok(Self { dir })
    }

    /// An engine on the model; a disk tier whose previous engine is still shutting down
    /// (its thread ends once its last request is gone) is waited for.
    async fn engine(&self, config: NativeConfig) -> Result<NativeEngine> {
        let mut tries = 0;
        loop {
            match NativeEngine::load(self.dir.path(), &Device::Cpu, config.clone()) {
                Ok((engine, _)) => return Ok(engine),
                Err(e) if e.to_string().contains("in use by another worker") && tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

fn request(prompt: Vec<u32>) -> PreprocessedRequest {
    PreprocessedRequest {
        request_id: "t".into(),
        model: "tiny".into(),
        token_ids: prompt,
        stop: StopConditions {
            max_tokens: Some(OUTPUT),
            ..Default::default()
        },
        sampling: SamplingOptions {
            temperature: Some(0.0),
            ..Default::default()
        },
        disagg: None,
    }
}

/// The tokens a user types: a shared system prompt opens every conversation.
fn typed(seed: u64, user: usize, turn: usize) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ ((user as u64) << 20) ^ ((turn as u64) << 40));
    let len = if turn == 0 { 10 } else { rng.gen_range(8..20) };
    let mut t: Vec<u32> = Vec::new();
    if turn == 0 {
        let mut system = rand::rngs::StdRng::seed_from_u64(seed);
        t.extend((0..40).map(|_| system.gen_range(0..256)));
    }
    t.extend((0..len).map(|_| rng.gen_range(0..256)));
    t
}

/// Generates up to the request's end, or until `cancel_after` tokens, then cancels.
async fn generate(engine: &NativeEngine, prompt: Vec<u32>, cancel_after: Option<usize>) -> Result<Vec<u32>> {
    let cancel = CancellationToken::new();
    let mut stream = engine.generate(request(prompt), cancel.clone())?;
    let mut tokens = Vec::new();
    while let Some(o) = tokio::time::timeout(Duration::from_secs(120), stream.next()).await? {
        tokens.extend(o?.token_ids);
        if cancel_after.is_some_and(|n| tokens.len() >= n) {
            cancel.cancel();
            break;
        }
    }
    Ok(tokens)
}

/// One user's conversation: each turn's prompt is the whole history so far.
async fn converse(engine: &NativeEngine, seed: u64, user: usize, cancels: bool) -> Result<Vec<Vec<u32>>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(31) ^ user as u64);
    let mut history = typed(seed, user, 0);
    let mut outputs = Vec::new();
    for turn in 0..TURNS {
        let cancel_after = (cancels && rng.gen_bool(0.5)).then(|| rng.gen_range(0..OUTPUT as usize));
        let out = generate(engine, history.clone(), cancel_after).await?;
        history.extend(&out);
        history.extend(typed(seed, user, turn + 1));
        outputs.push(out);
    }
    Ok(outputs)
}

/// Every user at once.
async fn fleet(engine: &NativeEngine, seed: u64, cancels: bool) -> Result<Vec<Vec<Vec<u32>>>> {
    futures::future::try_join_all((0..USERS).map(|u| converse(engine, seed, u, cancels))).await
}

fn loaded(engine: &NativeEngine, path: Path) -> u64 {
    engine.kvbm_stats().map_or(0, |s| s.blocks(path))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_loaded_from_host_memory_match_recomputed_ones() -> Result<()> {
    let model = Model::new()?;
    for seed in [1, 2, 3] {
        let plain = model.engine(config(KvbmConfig::default())).await?;
        let expected = fleet(&plain, seed, false).await?;
        let tiered = model.engine(config(host_tier())).await?;
        let got = fleet(&tiered, seed, false).await?;
        assert_eq!(got, expected, "seed {seed}");
        let stats = tiered.kvbm_stats().context("tiers configured")?;
        assert!(stats.blocks(Path::OnboardH2d) > 0, "seed {seed}: nothing loaded");
        assert!(stats.matched_tokens.load(Ordering::Relaxed) > 0);
        tiered.audit_tiers().await?;
    }
    Ok(())
}

/// Write-back copies a block out when the cache evicts it, in the same step that may load
/// other blocks into it: the copy must take the old bytes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_back_copies_evicted_blocks_before_loads_reuse_them() -> Result<()> {
    let model = Model::new()?;
    let seed = 5;
    let plain = model.engine(config(KvbmConfig::default())).await?;
    let expected = fleet(&plain, seed, false).await?;
    let tiered = model
        .engine(config(KvbmConfig {
            offload: turbine_kvbm::OffloadMode::WriteBack,
            ..host_tier()
        }))
        .await?;
    assert_eq!(fleet(&tiered, seed, false).await?, expected);
    assert!(loaded(&tiered, Path::OnboardH2d) > 0, "nothing loaded");
    tiered.audit_tiers().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_loaded_from_disk_match_and_survive_a_restart() -> Result<()> {
    let model = Model::new()?;
    let disk = tempfile::tempdir()?;
    let seed = 7;
    let plain = model.engine(config(KvbmConfig::default())).await?;
    let expected = fleet(&plain, seed, false).await?;

    let first = model.engine(config(disk_tier(disk.path()))).await?;
    assert_eq!(fleet(&first, seed, false).await?, expected, "disk only");
    assert!(loaded(&first, Path::OnboardD2d) > 0, "nothing loaded from disk");
    assert_eq!(loaded(&first, Path::OnboardH2d), 0, "there is no host tier");
    drop(first);

    // The same conversations again after a restart: their histories are on disk already.
    let second = model.engine(config(disk_tier(disk.path()))).await?;
    assert_eq!(fleet(&second, seed, false).await?, expected, "after a restart");
    let stats = second.kvbm_stats().context("tiers configured")?;
    assert!(
        stats.blocks(Path::OnboardD2d) > 0 && stats.blocks(Path::OffloadD2d) < stats.blocks(Path::OnboardD2d) * 4,
        "the reopened tier served the first turns: loaded {}, written {}",
        stats.blocks(Path::OnboardD2d),
        stats.blocks(Path::OffloadD2d)
    );
    second.audit_tiers().await?;
    Ok(())
}

/// A host tier too small for the conversations sends most of them to disk: run twice, the
/// second run's requests arrive with their histories on disk. With prefetching, those come
/// back through host memory while the requests wait, and with none, straight from disk on
/// the copier's thread; every way gives the same tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_blocks_prefetched_or_loaded_beside_steps_match_recomputed_ones() -> Result<()> {
    let model = Model::new()?;
    let seed = 9;
    let plain = model.engine(config(KvbmConfig::default())).await?;
    let expected = fleet(&plain, seed, false).await?;
    for prefetch in [
        PrefetchPolicy::Off,
        PrefetchPolicy::WaitComplete,
        PrefetchPolicy::BestEffort,
        PrefetchPolicy::Timeout(Duration::from_millis(2)),
    ] {
        let disk = tempfile::tempdir()?;
        let kvbm = KvbmConfig {
            host: blocks(24),
            disk: blocks(512),
            disk_dir: Some(disk.path().to_owned()),
            disk_after_sightings: 1,
            prefetch,
            ..KvbmConfig::default()
        };
        let engine = model.engine(config(kvbm)).await?;
        assert_eq!(fleet(&engine, seed, false).await?, expected, "{prefetch:?}");
        assert_eq!(fleet(&engine, seed, false).await?, expected, "{prefetch:?}, again");
        let stats = engine.kvbm_stats().context("tiers configured")?;
        if prefetch == PrefetchPolicy::Off {
            assert!(stats.blocks(Path::OnboardD2d) > 0, "nothing loaded from disk");
            assert_eq!(stats.blocks(Path::Prefetch), 0);
        } else {
            assert!(stats.blocks(Path::Prefetch) > 0, "{prefetch:?}: nothing prefetched");
            assert_eq!(
                stats.blocks(Path::OnboardD2d),
                0,
                "disk blocks come up through host memory"
            );
        }
        if prefetch == PrefetchPolicy::WaitComplete {
            assert_eq!(stats.prefetch_abandoned.load(Ordering::Relaxed), 0);
        }
        engine.audit_tiers().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_cancels_leak_no_block_in_any_tier_and_events_replay() -> Result<()> {
    let model = Model::new()?;
    let disk = tempfile::tempdir()?;
    let kvbm = KvbmConfig {
        host: blocks(64),
        disk: blocks(512),
        disk_dir: Some(disk.path().to_owned()),
        ..KvbmConfig::default()
    };
    let engine = model.engine(config(kvbm)).await?;
    let kv = engine.kv_cache().context("has a KV cache")?;
    let mut events = kv.subscribe();
    for seed in [11, 12] {
        fleet(&engine, seed, true).await?;
    }
    let mut load = kv.load();
    tokio::time::timeout(
        Duration::from_secs(30),
        load.wait_for(|l| l.blocks_in_use == 0 && l.active_seqs == 0 && l.waiting_seqs == 0),
    )
    .await??;
    engine.audit_tiers().await?;
    let stats = engine.kvbm_stats().context("tiers configured")?;
    assert!(stats.blocks(Path::OnboardH2d) > 0);
    assert!(stats.blocks(Path::OffloadH2d) > 0, "blocks seen twice reach disk");

    let snapshot = kv.snapshot().await?;
    let mut replica = EventReplica::default();
    while let Ok(batch) = events.try_recv() {
        for e in &batch {
            replica.apply(e)?;
        }
    }
    assert_eq!(replica.registered, EventReplica::of(&snapshot));
    assert_eq!(replica.below, EventReplica::below_of(&snapshot));
    assert!(!replica.below.is_empty());
    Ok(())
}
