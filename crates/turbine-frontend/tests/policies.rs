//! The `least-loaded` and `session` routing policies, end to end in one process.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::Cluster;
use futures::StreamExt;
use serde_json::{json, Value};
use turbine_engine::{EchoConfig, EchoEngine};
use turbine_protocols::{ModelCard, TokenizerKind};
use turbine_router::RouterMode;

/// Three echo workers (5 ms a token) behind a frontend in `mode`.
async fn cluster(mode: RouterMode) -> Result<Cluster> {
    replicas(mode, 1).await
}

async fn replicas(mode: RouterMode, frontends: usize) -> Result<Cluster> {
    let card = ModelCard {
        name: "echo".into(),
        context_length: 4096,
        tokenizer: TokenizerKind::Bytes,
        kv_block_size: None,
        timing: None,
    };
    let engines = (0..3)
        .map(|_| {
            EchoEngine::new(EchoConfig {
                delay_per_token: Duration::from_millis(5),
            })
        })
        .collect();
    Cluster::start_frontends(card, engines, mode, frontends).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_frontends_agree_on_load() -> Result<()> {
    let c = replicas(RouterMode::LeastLoaded, 2).await?;
    let http = reqwest::Client::new();
    let long = json!({"model": "echo", "prompt": "x".repeat(1000), "stream": true});
    // Each round, frontend A starts one long request, then B two. B spreads its two over the
    // other workers only if it counts A's request: alone, it would pick A's worker with
    // probability 2/3 per round.
    for round in 0..4 {
        let before = c.served();
        let mut held = Vec::new();
        for url in [&c.urls[0], &c.urls[1], &c.urls[1]] {
            let mut stream = http.post(url).json(&long).send().await?.bytes_stream();
            stream.next().await.ok_or_else(|| anyhow::anyhow!("no first chunk"))??;
            held.push(stream);
            // Sync is asynchronous (microseconds in one process): leave it ample time.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let added: Vec<usize> = c.served().iter().zip(&before).map(|(a, b)| a - b).collect();
        assert_eq!(added, [1, 1, 1], "round {round}");
        drop(held);
        // Cancellations reach both routers before the next round.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_loaded_avoids_the_busy_worker() -> Result<()> {
    let c = cluster(RouterMode::LeastLoaded).await?;
    let url = c.url.as_str();
    let http = reqwest::Client::new();
    // One long request, held open: its worker is busy until it is dropped.
    let long = json!({"model": "echo", "prompt": "x".repeat(1000), "stream": true});
    let mut busy = http.post(url).json(&long).send().await?.bytes_stream();
    busy.next().await.ok_or_else(|| anyhow::anyhow!("no first chunk"))??;
    let busy_worker = c
        .served()
        .iter()
        .position(|&n| n == 1)
        .ok_or_else(|| anyhow::anyhow!("not routed"))?;

    for _ in 0..12 {
        let r: Value = http
            .post(url)
            .json(&json!({"model": "echo", "prompt": "hi"}))
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(r["choices"][0]["text"], "hi");
    }
    let n = c.served();
    assert_eq!(n[busy_worker], 1, "the busy worker got nothing more: {n:?}");
    assert_eq!(n.iter().sum::<usize>(), 13);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_requests_stay_on_one_worker() -> Result<()> {
    let c = cluster(RouterMode::Session).await?;
    let url = c.url.as_str();
    let http = reqwest::Client::new();
    let mut before = c.served();
    for session in ["alice", "bob", "carol"] {
        for _ in 0..8 {
            let r = http
                .post(url)
                .header("x-session-id", session)
                .json(&json!({"model": "echo", "prompt": "hi"}))
                .send()
                .await?;
            assert_eq!(r.status(), 200);
        }
        let after = c.served();
        let moved: Vec<usize> = after
            .iter()
            .zip(&before)
            .map(|(a, b)| a - b)
            .filter(|&d| d > 0)
            .collect();
        assert_eq!(moved, [8], "session {session}: all its requests on one worker");
        before = after;
    }
    // A bad extension value is refused before routing.
    let r = http
        .post(url)
        .json(&json!({"model": "echo", "prompt": "hi", "turbine": {"kv_temperature": -1.0}}))
        .send()
        .await?;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await?;
    assert_eq!(body["error"]["param"], "turbine.kv_temperature");
    let r = http
        .post(url)
        .json(&json!({"model": "echo", "prompt": "hi", "turbine": {"kv_host_hit_weight": 1.5}}))
        .send()
        .await?;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await?;
    assert_eq!(body["error"]["param"], "turbine.kv_host_hit_weight");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_mode_without_kv_events_routes_on_its_own_predictions() -> Result<()> {
    // Echo workers publish no KV events: the router predicts their caches from where it
    // sent each prompt.
    let c = cluster(RouterMode::Kv).await?;
    let url = c.url.as_str();
    let http = reqwest::Client::new();
    for prompt in ["a", "b", "c"] {
        let before = c.served();
        let body = json!({"model": "echo", "prompt": prompt.repeat(64), "max_tokens": 2});
        for _ in 0..6 {
            let r = http.post(url).json(&body).send().await?;
            assert_eq!(r.status(), 200);
        }
        let moved: Vec<usize> = c
            .served()
            .iter()
            .zip(&before)
            .map(|(a, b)| a - b)
            .filter(|&d| d > 0)
            .collect();
        assert_eq!(
            moved,
            [6],
            "prompt {prompt:?}: every repeat went where the first was sent"
        );
    }
    Ok(())
}
