//! `turbine serve --engine vllm` in front of two stand-in vLLM servers whose KV event
//! publishers (turbine-external's fixture, which encodes events with msgspec and publishes
//! them with pyzmq as vLLM does) announce what each server caches: the `kv` router sends each
//! prompt to the server whose own events say it holds the prompt's prefix.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/sdk-venv/bin/python");
const PUBLISHER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../turbine-external/tests/fixtures/kv_publisher.py"
);

type Received = Arc<Mutex<Vec<Vec<u32>>>>;

/// A vLLM stand-in: lists one model, and answers every completion with two tokens,
/// remembering the prompt's token ids.
async fn fake_vllm() -> Result<(SocketAddr, Received)> {
    async fn completions(
        State(r): State<Received>,
        Json(b): Json<Value>,
    ) -> ([(&'static str, &'static str); 1], String) {
        let prompt = b["prompt"]
            .as_array()
            .map(|a| a.iter().filter_map(|t| t.as_u64().map(|t| t as u32)).collect())
            .unwrap_or_default();
        r.lock().expect("lock").push(prompt);
        let chunks = [
            json!({"choices": [{"index": 0, "text": "a", "token_ids": [1000], "finish_reason": null}]}),
            json!({"choices": [{"index": 0, "text": "b", "token_ids": [1001], "finish_reason": "length"}]}),
        ];
        let body: String = chunks.iter().map(|c| format!("data: {c}\n\n")).collect::<String>() + "data: [DONE]\n\n";
        ([("content-type", "text/event-stream")], body)
    }
    let received = Received::default();
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route(
            "/v1/models",
            get(|| async { Json(json!({"data": [{"id": "fake/model", "root": "/nonexistent"}]})) }),
        )
        .route("/metrics", get(|| async { "vllm:num_requests_running 0\n" }))
        .route("/v1/completions", post(completions))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((addr, received))
}

/// The fixture publisher, driven one batch per line.
struct Publisher {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    endpoint: String,
    replay: String,
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Publisher {
    fn start() -> Result<Self> {
        anyhow::ensure!(
            std::path::Path::new(PYTHON).exists(),
            "{PYTHON} is missing: run scripts/install-test-tools"
        );
        let mut child = Command::new(PYTHON)
            .args([PUBLISHER, "--format", "map", "--hashes", "bytes"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let first: Value = serde_json::from_str(&line).with_context(|| format!("publisher said {line:?}"))?;
        Ok(Self {
            endpoint: first["endpoint"].as_str().context("endpoint")?.to_owned(),
            replay: first["replay_endpoint"].as_str().context("replay endpoint")?.to_owned(),
            child,
            stdin,
            stdout,
        })
    }

    /// Publishes that the server caches every full block of `prompt`.
    fn store(&mut self, prompt: &[u32]) -> Result<()> {
        let blocks = prompt.len() / 16;
        let batch = json!({"events": [{"op": "store", "prompt": prompt, "blocks": [0, blocks], "block_size": 16}], "live": true});
        writeln!(self.stdin, "{batch}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        anyhow::ensure!(line.contains("seq"), "publisher said {line:?}");
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_routing_follows_the_servers_own_events() -> Result<()> {
    let tokenizer = common::smollm2()?;
    let mut servers = Vec::new();
    let mut publishers = Vec::new();
    for _ in 0..2 {
        servers.push(fake_vllm().await?);
        publishers.push(Publisher::start()?);
    }
    let (url_a, url_b) = (format!("http://{}", servers[0].0), format!("http://{}", servers[1].0));
    let args = [
        "serve",
        "--port",
        "0",
        "--engine",
        "vllm",
        "--engine-url",
        &url_a,
        "--engine-url",
        &url_b,
        "--kv-events-endpoint",
        &publishers[0].endpoint,
        "--kv-events-endpoint",
        &publishers[1].endpoint,
        "--kv-events-replay-endpoint",
        &publishers[0].replay,
        "--kv-events-replay-endpoint",
        &publishers[1].replay,
        "--tokenizer",
        tokenizer,
        "--router-mode",
        "kv",
    ];
    let (_serve, url) = common::start(&args, "turbine: listening on ")?;
    let http = reqwest::Client::new();
    common::wait_for_instances(&http, &url, "fake/model", 2, Duration::from_secs(10)).await?;

    // Each prefix is announced by one server's publisher only; nothing else tells them apart.
    let holders = [1usize, 0, 1, 0, 0, 1];
    let prompts: Vec<Vec<u32>> = (0..holders.len()).map(|i| common::token_ids(i as u32, 256)).collect();
    for (prompt, &holder) in prompts.iter().zip(&holders) {
        publishers[holder].store(prompt)?;
    }
    // The events travel publisher -> worker -> router within milliseconds; a second is ample.
    tokio::time::sleep(Duration::from_secs(1)).await;

    for (i, (prompt, &holder)) in prompts.iter().zip(&holders).enumerate() {
        let mut ids = prompt.clone();
        ids.extend(common::token_ids(100 + i as u32, 7));
        let r = http
            .post(format!("{url}/v1/completions"))
            .json(&json!({"model": "fake/model", "prompt": ids, "max_tokens": 2}))
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "request {i}: {}", r.status());
        let body: Value = r.json().await?;
        anyhow::ensure!(body["usage"]["completion_tokens"] == 2, "request {i}: {body}");
        let got = servers[holder].1.lock().expect("lock").contains(&ids);
        anyhow::ensure!(
            got,
            "request {i} should have gone to server {holder}, which caches its prefix"
        );
    }
    Ok(())
}
