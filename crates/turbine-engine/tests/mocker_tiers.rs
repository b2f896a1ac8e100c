//! The mocker over a block manager of metadata: a prompt evicted from its small pool comes
//! back from the host tier (reported as cached, and loaded in simulated time at the host
//! path's bandwidth), and the KV events name the tier of every copy.

use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use turbine_engine::pool::EventReplica;
use turbine_engine::{Engine, MockerConfig, MockerEngine};
use turbine_kvbm::{KvbmConfig, Path, TierSize};
use turbine_protocols::kv::StorageTier;
use turbine_protocols::{PreprocessedRequest, StopConditions};

fn request(prompt: Vec<u32>) -> PreprocessedRequest {
    PreprocessedRequest {
        request_id: "t".into(),
        model: "m".into(),
        token_ids: prompt,
        stop: StopConditions {
            max_tokens: Some(2),
            ..Default::default()
        },
        sampling: Default::default(),
        disagg: None,
    }
}

/// Runs one request to its end: its cached tokens, and how long it took.
async fn run(engine: &MockerEngine, prompt: Vec<u32>) -> Result<(u32, Duration)> {
    let started = tokio::time::Instant::now();
    let mut stream = engine.generate(request(prompt), CancellationToken::new())?;
    let mut cached = None;
    while let Some(o) = stream.next().await {
        cached = cached.or(o?.cached_tokens);
    }
    Ok((cached.context("no cached-token count")?, started.elapsed()))
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| seed * 7919 + i).collect()
}

#[tokio::test(start_paused = true)]
async fn an_evicted_prompt_comes_back_from_host_memory() -> Result<()> {
    let config = |kvbm: KvbmConfig| MockerConfig {
        block_size: 16,
        num_blocks: 64,
        kvbm,
        // 1 GB/s from host memory, so that a load's simulated time shows.
        onboard_host_bytes_per_sec: 1e9,
        ..MockerConfig::default()
    };
    let host = KvbmConfig {
        host: TierSize {
            bytes: None,
            blocks: Some(256),
        },
        ..KvbmConfig::default()
    };
    let tiered = MockerEngine::start(config(host))?;
    let plain = MockerEngine::start(config(KvbmConfig::default()))?;
    let kv = tiered.kv_cache().context("has a KV cache")?;
    let mut events = kv.subscribe();
    let p = prompt(1, 512);
    for engine in [&tiered, &plain] {
        run(engine, p.clone()).await?;
        // Four other prompts of the pool's whole size push it out of the pool.
        for s in 2..6 {
            run(engine, prompt(s, 900)).await?;
        }
    }
    let (from_host, took) = run(&tiered, p.clone()).await?;
    let (recomputed, _) = run(&plain, p.clone()).await?;
    let block_bytes = 16.0 * MockerConfig::default().kv_bytes_per_token as f64;
    assert!(
        took >= Duration::from_secs_f64(31.0 * block_bytes / 1e9),
        "the load's simulated time is waited for: {took:?}"
    );
    assert_eq!(recomputed, 0, "without tiers the prompt is gone");
    assert_eq!(from_host, 496, "31 full blocks, the last token computed");
    let stats = tiered.kvbm_stats().context("tiers configured")?;
    assert_eq!(stats.blocks(Path::OnboardH2d), 31);
    assert!(stats.blocks(Path::OffloadD2h) >= 31 + 4 * 56);

    let snapshot = kv.snapshot().await?;
    let mut replica = EventReplica::default();
    while let Ok(batch) = events.try_recv() {
        for e in &batch {
            replica.apply(e)?;
        }
    }
    assert_eq!(replica.below, EventReplica::below_of(&snapshot));
    assert!(replica.below.iter().all(|(_, t)| *t == StorageTier::Host));
    assert!(replica.below.len() >= 200);
    Ok(())
}
