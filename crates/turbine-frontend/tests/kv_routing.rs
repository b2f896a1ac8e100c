//! KV-aware routing end to end in one process: four mocker workers publishing KV events,
//! a frontend in `kv` mode, and requests that share a few long prefixes.

mod common;

use anyhow::Result;
use common::Cluster;
use serde_json::{json, Value};
use turbine_engine::{MockerConfig, MockerEngine};
use turbine_protocols::{ModelCard, TokenizerKind};
use turbine_router::RouterMode;

const PREFIX: usize = 512;
const FAMILIES: usize = 4;
const PER_FAMILY: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_mode_keeps_prefix_families_together_and_load_spread() -> Result<()> {
    let card = ModelCard {
        name: "mock".into(),
        context_length: 4096,
        tokenizer: TokenizerKind::Bytes,
        kv_block_size: Some(16),
        timing: None,
    };
    let engines = (0..4)
        .map(|seed| {
            MockerEngine::start(MockerConfig {
                speedup: 50.0,
                seed,
                vocab: 32..127,
                ..Default::default()
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let cluster = Cluster::start(card, engines, RouterMode::Kv).await?;
    let url = cluster.url.clone();

    // Each family: a 512-token prefix of its own, then a distinct 16-token tail.
    let prompt = |family: usize, i: usize| -> Vec<u32> {
        let prefix = (0..PREFIX).map(|t| ((t * 7 + family * 31) % 200) as u32 + 1);
        let tail = (0..16).map(|t| ((t + i * 16 + family) % 50) as u32 + 201);
        prefix.chain(tail).collect()
    };
    let http = reqwest::Client::new();
    let send = |family: usize, i: usize| {
        let http = http.clone();
        let url = url.clone();
        let body = json!({"model": "mock", "prompt": prompt(family, i), "max_tokens": 4});
        async move {
            let r: Value = http.post(&url).json(&body).send().await?.json().await?;
            let cached = r["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64();
            anyhow::ensure!(cached.is_some(), "no cached_tokens in {r}");
            Ok::<_, anyhow::Error>(cached.unwrap_or_default())
        }
    };

    // The families' first requests: nothing is cached anywhere, so the router spreads them
    // by load. Each is held open (streaming) until its first chunk arrives, so all four are
    // in flight while the others are routed; dropping them cancels them, and their prompts'
    // blocks stay cached.
    let mut held = Vec::new();
    for f in 0..FAMILIES {
        let body = json!({"model": "mock", "prompt": prompt(f, 0), "max_tokens": 3000, "stream": true});
        let mut stream = http.post(&url).json(&body).send().await?.bytes_stream();
        futures::StreamExt::next(&mut stream)
            .await
            .ok_or_else(|| anyhow::anyhow!("no first chunk"))??;
        held.push(stream);
    }
    let after_first = cluster.served();
    assert_eq!(after_first, [1, 1, 1, 1], "first requests spread over the workers");
    drop(held);

    // Then each family's later requests, the families side by side: every one is routed to
    // where its prefix is cached, and the mocker really finds it there.
    let families = (0..FAMILIES).map(|f| async move {
        let mut cached = Vec::new();
        for i in 1..PER_FAMILY {
            cached.push(send(f, i).await?);
        }
        Ok::<_, anyhow::Error>(cached)
    });
    for (f, cached) in futures::future::join_all(families).await.into_iter().enumerate() {
        let cached = cached?;
        assert!(
            cached.iter().all(|&c| c == PREFIX as u64),
            "family {f}: cached tokens {cached:?}"
        );
    }
    let served = cluster.served();
    assert_eq!(
        served, [PER_FAMILY; 4],
        "each family stayed on one worker, and the load with it"
    );
    Ok(())
}
