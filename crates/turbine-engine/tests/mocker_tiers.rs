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
    let host = host_blocks(256);
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

/// A slow load runs beside the steps: a request decoding meanwhile keeps its pace, and
/// only the request that waits for the load pays for it.
#[tokio::test(start_paused = true)]
async fn a_load_overlaps_the_steps_of_other_requests() -> Result<()> {
    let block_bytes = 16.0 * MockerConfig::default().kv_bytes_per_token as f64;
    // 31 blocks in about a second.
    let rate = 31.0 * block_bytes;
    let engine = MockerEngine::start(MockerConfig {
        block_size: 16,
        num_blocks: 64,
        kvbm: host_blocks(512),
        onboard_host_bytes_per_sec: rate,
        ..MockerConfig::default()
    })?;
    let p = prompt(1, 512);
    run(&engine, p.clone()).await?;
    for s in 2..6 {
        run(&engine, prompt(s, 900)).await?;
    }
    // A long decode, then the evicted prompt again while it runs.
    let mut decode = engine.generate(
        PreprocessedRequest {
            stop: StopConditions {
                max_tokens: Some(400),
                ..Default::default()
            },
            ..request(prompt(9, 32))
        },
        CancellationToken::new(),
    )?;
    let mut gaps = Vec::new();
    let mut last = None;
    for _ in 0..5 {
        decode.next().await.context("decode ended")??;
    }
    let reload = tokio::spawn({
        let engine = engine.clone();
        async move { run(&engine, p).await }
    });
    while !reload.is_finished() {
        let Some(o) = decode.next().await else { break };
        o?;
        let now = tokio::time::Instant::now();
        if let Some(l) = last {
            gaps.push(now - l);
        }
        last = Some(now);
    }
    let (cached, took) = reload.await??;
    let stats = engine.kvbm_stats().context("tiers configured")?;
    assert_eq!(cached, 496);
    assert_eq!(stats.blocks(Path::OnboardH2d), 31);
    assert!(
        took >= Duration::from_millis(900),
        "the load's time is waited for: {took:?}"
    );
    let longest = gaps.iter().max().copied().unwrap_or_default();
    assert!(
        gaps.len() > 20,
        "the decode went on during the load: {} tokens",
        gaps.len()
    );
    assert!(
        longest < Duration::from_millis(100),
        "no step waited for the load: longest gap {longest:?}"
    );
    Ok(())
}

/// An operator's pinned system prompt outlives traffic that churns the host tier many
/// times over; unpinned, the same prompt is gone.
#[tokio::test(start_paused = true)]
async fn a_pinned_system_prompt_survives_churn_in_the_host_tier() -> Result<()> {
    let system = prompt(40, 256);
    let with = |seed: u32| [system.clone(), prompt(seed, 48)].concat();
    let mut cached = Vec::new();
    for pinned in [vec![system.clone()], Vec::new()] {
        let engine = MockerEngine::start(MockerConfig {
            block_size: 16,
            num_blocks: 64,
            kvbm: KvbmConfig {
                pinned,
                ..host_blocks(96)
            },
            ..MockerConfig::default()
        })?;
        run(&engine, with(1)).await?;
        for s in 2..12 {
            run(&engine, prompt(s, 900)).await?;
        }
        cached.push(run(&engine, with(99)).await?.0);
    }
    assert_eq!(cached, [256, 0], "pinned, then not");
    Ok(())
}

#[test]
fn pins_filling_more_than_half_a_tier_are_refused() {
    let err = MockerEngine::start(MockerConfig {
        block_size: 16,
        num_blocks: 64,
        kvbm: KvbmConfig {
            pinned: vec![prompt(3, 16 * 40)],
            ..host_blocks(64)
        },
        ..MockerConfig::default()
    })
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(err.contains("40 pinned blocks are more than half"), "{err}");
}

/// Block manager settings with a host tier of `blocks` blocks and nothing else.
fn host_blocks(blocks: usize) -> KvbmConfig {
    KvbmConfig {
        host: TierSize {
            bytes: None,
            blocks: Some(blocks),
        },
        ..KvbmConfig::default()
    }
}
