//! KV-aware routing end to end in one process: mocker workers publishing KV events, a
//! frontend in `kv` mode, and requests that share a few long prefixes; and workers whose KV
//! events the test writes, holding a prompt in different storage tiers.

mod common;

use std::sync::{Arc, Mutex};

use anyhow::Result;
use common::Cluster;
use futures::future::BoxFuture;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use turbine_engine::{
    EchoEngine, Engine, EngineError, EngineStream, KvCache, KvCacheSource, MockerConfig, MockerEngine,
};
use turbine_protocols::kv::{KvEvent, KvEventData, KvSnapshot, StorageTier, StoredBlock, WorkerLoad};
use turbine_protocols::{ModelCard, PreprocessedRequest, TokenizerKind};
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

    // The router counts the prefix blocks it found on the workers it chose, all on their
    // devices (the mocker has no other tier): 32 for each later request, though a family's
    // second request may be routed before the last of its first one's events arrives.
    let metrics = http
        .get(url.replace("/v1/completions", "/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let matched = |tier: &str| {
        let series = format!("turbine_frontend_kv_matched_blocks_total{{model=\"mock\",tier=\"{tier}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.parse::<usize>().ok())
    };
    let blocks = PREFIX / 16;
    let device = matched("device").unwrap_or_default();
    assert!(
        (FAMILIES * (PER_FAMILY - 2) * blocks..=FAMILIES * (PER_FAMILY - 1) * blocks).contains(&device),
        "device blocks matched: {device}"
    );
    assert_eq!((matched("host"), matched("disk")), (None, None));
    Ok(())
}

/// An echo engine whose KV events are whatever the test sends through it.
#[derive(Clone, Default)]
struct Scripted {
    events: Arc<Mutex<Vec<mpsc::UnboundedSender<Vec<KvEvent>>>>>,
    next_id: Arc<Mutex<u64>>,
}

impl Scripted {
    fn send(&self, data: KvEventData) {
        let mut id = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
        let batch = vec![KvEvent { event_id: *id, data }];
        *id += 1;
        turbine_engine::broadcast_events(&mut self.events.lock().unwrap_or_else(|e| e.into_inner()), batch);
    }
}

impl KvCacheSource for Scripted {
    fn subscribe(&self) -> mpsc::UnboundedReceiver<Vec<KvEvent>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.events.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
        rx
    }

    fn load(&self) -> watch::Receiver<WorkerLoad> {
        watch::channel(WorkerLoad::default()).1
    }

    fn snapshot(&self) -> BoxFuture<'static, Result<KvSnapshot, EngineError>> {
        Box::pin(async { Err(EngineError::Failed("a scripted cache has no snapshot".into())) })
    }
}

impl Engine for Scripted {
    fn generate(&self, request: PreprocessedRequest, cancel: CancellationToken) -> Result<EngineStream, EngineError> {
        EchoEngine::default().generate(request, cancel)
    }

    fn kv_cache(&self) -> Option<KvCache> {
        Some(KvCache::new(self.clone()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_on_the_device_beats_one_in_host_memory_which_beats_none() -> Result<()> {
    let card = ModelCard {
        name: "tiers".into(),
        context_length: 4096,
        tokenizer: TokenizerKind::Bytes,
        kv_block_size: Some(4),
        timing: None,
    };
    let engines = vec![Scripted::default(), Scripted::default(), Scripted::default()];
    let cluster = Cluster::start(card, engines.clone(), RouterMode::Kv).await?;
    let prompt: Vec<u32> = (1..=32).collect();
    let blocks: Vec<StoredBlock> = turbine_tokens::block_hashes(&prompt, 4)
        .iter()
        .map(|b| StoredBlock {
            sequence_hash: b.sequence,
            local_hash: b.local,
        })
        .collect();
    let stored = |tier| KvEventData::Stored {
        parent_hash: None,
        blocks: blocks.clone(),
        tier,
    };
    // Worker 0 holds the prompt on its device, worker 1 in host memory, worker 2 nothing.
    engines[0].send(stored(StorageTier::Device));
    engines[1].send(stored(StorageTier::Host));

    let http = reqwest::Client::new();
    let body = json!({"model": "tiers", "prompt": prompt, "max_tokens": 1});
    // Sends the prompt until it goes to `worker` (the events may still be on their way),
    // then five times more, which must all go there too.
    let routed_to = |worker: usize| {
        let (http, body, url) = (http.clone(), body.clone(), cluster.url.clone());
        let cluster = &cluster;
        async move {
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let before = cluster.served();
                anyhow::ensure!(http.post(&url).json(&body).send().await?.status() == 200);
                if cluster.served()[worker] > before[worker] {
                    break;
                }
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "never routed to worker {worker}"
                );
            }
            let before = cluster.served();
            for _ in 0..5 {
                anyhow::ensure!(http.post(&url).json(&body).send().await?.status() == 200);
            }
            let after = cluster.served();
            let moved: Vec<usize> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
            let mut want = vec![0; after.len()];
            want[worker] = 5;
            anyhow::ensure!(moved == want, "routed {moved:?}, not all to worker {worker}");
            Ok::<_, anyhow::Error>(())
        }
    };
    routed_to(0).await?;
    // Evicted from worker 0: the copy in worker 1's host memory beats recomputing it.
    engines[0].send(KvEventData::Removed {
        sequence_hashes: blocks.iter().map(|b| b.sequence_hash).collect(),
        tier: StorageTier::Device,
    });
    routed_to(1).await?;

    let metrics = http
        .get(cluster.url.replace("/v1/completions", "/metrics"))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains(r#"turbine_frontend_kv_matched_blocks_total{model="tiers",tier="host"}"#),
        "{metrics}"
    );
    Ok(())
}
