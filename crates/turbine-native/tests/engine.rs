//! The native engine through the `Engine` trait, on a generated tiny model: continuous
//! batching gives each request what it would get alone, cached prefixes are reported and
//! change nothing, seeds reproduce, cancellation and preemption free blocks, and the KV
//! events replay into exactly the cached blocks.

use std::time::Duration;

use anyhow::{Context, Result};
use candle_core::Device;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use turbine_engine::pool::EventReplica;
use turbine_engine::Engine;
use turbine_native::tiny::{write_tiny_model, TinySpec, TINY_VOCAB};
use turbine_native::{NativeConfig, NativeEngine};
use turbine_protocols::llm::{SamplingOptions, StopConditions};
use turbine_protocols::{FinishReason, PreprocessedRequest};

struct Tiny {
    _dir: tempfile::TempDir,
    engine: NativeEngine,
}

fn tiny(config: NativeConfig) -> Result<Tiny> {
    let dir = tempfile::tempdir()?;
    write_tiny_model(dir.path(), &TinySpec::default())?;
    let (engine, _) = NativeEngine::load(dir.path(), &Device::Cpu, config)?;
    Ok(Tiny { _dir: dir, engine })
}

fn greedy() -> SamplingOptions {
    SamplingOptions {
        temperature: Some(0.0),
        ..Default::default()
    }
}

fn request(prompt: Vec<u32>, max_tokens: u32, sampling: SamplingOptions) -> PreprocessedRequest {
    PreprocessedRequest {
        request_id: "t".into(),
        model: "tiny".into(),
        token_ids: prompt,
        stop: StopConditions {
            max_tokens: Some(max_tokens),
            ..Default::default()
        },
        sampling,
        disagg: None,
    }
}

struct Outcome {
    tokens: Vec<u32>,
    cached: Option<u32>,
    finish: Option<FinishReason>,
}

async fn run(engine: &NativeEngine, req: PreprocessedRequest) -> Result<Outcome> {
    let mut stream = engine.generate(req, CancellationToken::new())?;
    let mut out = Outcome {
        tokens: Vec::new(),
        cached: None,
        finish: None,
    };
    while let Some(o) = tokio::time::timeout(Duration::from_secs(60), stream.next()).await? {
        let o = o?;
        out.tokens.extend(o.token_ids);
        out.cached = out.cached.or(o.cached_tokens);
        out.finish = o.finish_reason;
    }
    Ok(out)
}

fn prompt(i: usize, len: usize) -> Vec<u32> {
    (0..len).map(|j| ((i * 7919 + j * 31 + 11) % 256) as u32).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_requests_get_what_they_would_alone() -> Result<()> {
    let t = tiny(NativeConfig::default())?;
    let lens = [5, 40, 17, 90, 33, 64, 8, 120];
    let mut alone = Vec::new();
    for (i, &n) in lens.iter().enumerate() {
        alone.push(run(&t.engine, request(prompt(i, n), 24, greedy())).await?.tokens);
    }
    let together = futures::future::try_join_all(
        lens.iter()
            .enumerate()
            .map(|(i, &n)| run(&t.engine, request(prompt(i, n), 24, greedy()))),
    )
    .await?;
    for (i, out) in together.iter().enumerate() {
        assert_eq!(out.tokens, alone[i], "request {i}");
        assert_eq!(out.tokens.len(), 24);
        assert_eq!(out.finish, Some(FinishReason::Length));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_prefix_is_reported_and_changes_nothing() -> Result<()> {
    let t = tiny(NativeConfig::default())?;
    let base = prompt(1, 100);
    let cold = run(&t.engine, request(base.clone(), 16, greedy())).await?;
    assert_eq!(cold.cached, Some(0));
    let warm = run(&t.engine, request(base.clone(), 16, greedy())).await?;
    // Six full blocks are cached; the last block is partial, and one token is always computed.
    assert_eq!(warm.cached, Some(96));
    assert_eq!(warm.tokens, cold.tokens);

    let mut longer = base[..64].to_vec();
    longer.extend(prompt(2, 30));
    let fresh = tiny(NativeConfig::default())?;
    let reference = run(&fresh.engine, request(longer.clone(), 16, greedy())).await?;
    let shared = run(&t.engine, request(longer, 16, greedy())).await?;
    assert_eq!(shared.cached, Some(64));
    assert_eq!(shared.tokens, reference.tokens);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_reproduce_and_stop_tokens_stop() -> Result<()> {
    let t = tiny(NativeConfig::default())?;
    let sampled = |seed| SamplingOptions {
        temperature: Some(1.0),
        top_p: Some(0.95),
        seed: Some(seed),
        ..Default::default()
    };
    let a = run(&t.engine, request(prompt(3, 20), 32, sampled(5))).await?;
    let b = run(&t.engine, request(prompt(3, 20), 32, sampled(5))).await?;
    let c = run(&t.engine, request(prompt(3, 20), 32, sampled(6))).await?;
    assert_eq!(a.tokens, b.tokens);
    assert_ne!(a.tokens, c.tokens);

    let free = run(&t.engine, request(prompt(4, 10), 20, greedy())).await?;
    let stop_at = free.tokens[5];
    let first = free.tokens.iter().position(|&t| t == stop_at).context("present")?;
    let mut req = request(prompt(4, 10), 20, greedy());
    req.stop.stop_token_ids = vec![stop_at];
    let stopped = run(&t.engine, req).await?;
    assert_eq!(stopped.tokens, free.tokens[..=first]);
    assert_eq!(stopped.finish, Some(FinishReason::Stop));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_up_front() -> Result<()> {
    let t = tiny(NativeConfig::default())?;
    let cases = [
        (vec![], "empty"),
        (vec![TINY_VOCAB as u32], "vocabulary"),
        (vec![1; 1024], "context"),
    ];
    for (tokens, what) in cases {
        let err = match t
            .engine
            .generate(request(tokens, 4, greedy()), CancellationToken::new())
        {
            Err(e) => e.to_string(),
            Ok(_) => anyhow::bail!("{what}: accepted"),
        };
        assert!(err.contains(what) || err.contains("leaves no room"), "{what}: {err}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_and_cancellation_free_blocks_and_events_replay() -> Result<()> {
    // Room for 24 blocks (384 tokens): eight 64-token prompts growing by 48 each need more,
    // so some are preempted and recomputed, and must still give their unpressured output.
    let spec = TinySpec::default();
    let per_token = turbine_native::PagedKv::bytes_per_token(
        spec.layers,
        spec.kv_heads,
        spec.hidden / spec.heads,
        turbine_native::KvDtype::F32,
    );
    let t = tiny(NativeConfig {
        kv_cache_bytes: per_token * 16 * 24,
        ..NativeConfig::default()
    })?;
    let roomy = tiny(NativeConfig::default())?;
    let kv = turbine_engine::Engine::kv_cache(&t.engine).context("has a KV cache")?;
    let mut events = kv.subscribe();
    let mut expected = Vec::new();
    for i in 0..8 {
        expected.push(
            run(&roomy.engine, request(prompt(10 + i, 64), 48, greedy()))
                .await?
                .tokens,
        );
    }
    let outs = futures::future::try_join_all((0..8).map(|i| run(&t.engine, request(prompt(10 + i, 64), 48, greedy()))))
        .await?;
    for (i, o) in outs.iter().enumerate() {
        assert_eq!(o.tokens, expected[i], "request {i} after pressure");
    }

    // A cancelled request's blocks come back at once.
    let cancel = CancellationToken::new();
    let mut stream = t
        .engine
        .generate(request(prompt(30, 64), 10_000, greedy()), cancel.clone())?;
    stream.next().await.context("first token")??;
    assert!(kv.load().borrow().blocks_in_use > 0);
    cancel.cancel();
    let mut load = kv.load();
    tokio::time::timeout(
        Duration::from_secs(10),
        load.wait_for(|l| l.blocks_in_use == 0 && l.active_seqs == 0),
    )
    .await??;

    let snapshot = kv.snapshot().await?;
    let mut replica = EventReplica::default();
    while let Ok(batch) = events.try_recv() {
        for e in &batch {
            replica.apply(e)?;
        }
    }
    assert_eq!(replica.registered, EventReplica::of(&snapshot));
    assert!(!replica.registered.is_empty());
    Ok(())
}

/// What disaggregated serving needs: one engine prefills, another imports the prompt's KV
/// and decodes exactly what the first would have, computing only the uncached tail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_kv_imported_elsewhere_serves_the_prefix() -> Result<()> {
    let prefill = tiny(NativeConfig::default())?;
    let decode = tiny(NativeConfig::default())?;
    let p = prompt(40, 100);
    let expected = run(&prefill.engine, request(p.clone(), 20, greedy())).await?;

    let kv = prefill.engine.export_prefix(p.clone()).await?;
    assert_eq!(kv.num_blocks, 6, "six full blocks of 16 are cached");
    assert_eq!(decode.engine.import_prefix(p.clone(), kv.clone()).await?, 6);
    assert_eq!(
        decode.engine.import_prefix(p.clone(), kv.clone()).await?,
        0,
        "already there"
    );
    let served = run(&decode.engine, request(p.clone(), 20, greedy())).await?;
    assert_eq!(served.cached, Some(96));
    assert_eq!(served.tokens, expected.tokens);

    // KV from a model of another shape is refused, and nothing is cached from it.
    let other_dir = tempfile::tempdir()?;
    let spec = TinySpec {
        kv_heads: 4,
        ..TinySpec::default()
    };
    write_tiny_model(other_dir.path(), &spec)?;
    let (other, _) = NativeEngine::load(other_dir.path(), &Device::Cpu, NativeConfig::default())?;
    let err = other
        .import_prefix(p.clone(), kv)
        .await
        .err()
        .context("accepted a foreign layout")?;
    assert!(err.to_string().contains("layout"), "{err}");
    let fresh = run(&other, request(p, 4, greedy())).await?;
    assert_eq!(fresh.cached, Some(0));
    Ok(())
}
