//! The frontend end to end in one process: real HTTP on port 0, real workers running the
//! echo engine, over both request-plane transports.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::counting;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use turbine_engine::{EchoConfig, EchoEngine};
use turbine_frontend::{Frontend, FrontendConfig};
use turbine_protocols::{ModelCard, TokenizerKind};
use turbine_runtime::{EndpointId, MemoryDiscovery, MemoryEventPlane, Runtime, ServeOptions, TransportOptions};
use turbine_worker::{Worker, WorkerConfig};

struct Cluster {
    url: String,
    http: reqwest::Client,
    runtime: Runtime,
    workers: Vec<(Worker, Arc<AtomicUsize>)>,
    _stop: tokio_util::sync::DropGuard,
}

#[derive(Clone, Copy, Debug)]
enum Plane {
    Local,
    Tcp,
}

fn card() -> ModelCard {
    ModelCard {
        name: "echo".into(),
        context_length: 256,
        tokenizer: TokenizerKind::Bytes,
        kv_block_size: None,
    }
}

async fn start_worker(runtime: &Runtime, plane: Plane, delay: Duration) -> Result<(Worker, Arc<AtomicUsize>)> {
    let (engine, served) = counting(EchoEngine::new(EchoConfig { delay_per_token: delay }));
    let transport = match plane {
        Plane::Local => TransportOptions::Local,
        Plane::Tcp => TransportOptions::Tcp {
            bind: "127.0.0.1:0".parse()?,
            advertise: None,
        },
    };
    let config = WorkerConfig {
        endpoint: EndpointId::new("turbine", "worker", "generate"),
        model: card(),
        serve: ServeOptions {
            transport,
            ..Default::default()
        },
        load_report_interval: Duration::from_millis(100),
    };
    Ok((Worker::start(runtime, Arc::new(engine), config).await?, served))
}

async fn cluster(plane: Plane, workers: usize, delay: Duration) -> Result<Cluster> {
    let runtime = Runtime::new(Arc::new(MemoryDiscovery::new()), Arc::new(MemoryEventPlane::new()));
    let mut ws = Vec::new();
    for _ in 0..workers {
        ws.push(start_worker(&runtime, plane, delay).await?);
    }
    let config = FrontendConfig {
        max_body_bytes: 64 * 1024,
        ..Default::default()
    };
    let frontend = Frontend::start(&runtime, config).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(frontend.run(listener, async move { s.cancelled().await }));
    Ok(Cluster {
        url,
        http: reqwest::Client::new(),
        runtime,
        workers: ws,
        _stop: stop.drop_guard(),
    })
}

impl Cluster {
    async fn post(&self, path: &str, body: Value) -> Result<(u16, Value)> {
        let r = self.http.post(format!("{}{path}", self.url)).json(&body).send().await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await?))
    }

    async fn get(&self, path: &str) -> Result<(u16, Value)> {
        let r = self.http.get(format!("{}{path}", self.url)).send().await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await?))
    }

    /// Waits until `/health` reports `want` instances of the echo model (`None`: no such model).
    async fn wait_for_instances(&self, want: Option<usize>) -> Result<()> {
        let start = Instant::now();
        loop {
            let (_, health) = self.get("/health").await?;
            let got = health["models"]["echo"]["instances"].as_array().map(Vec::len);
            if got == want {
                return Ok(());
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(5),
                "health still reports {got:?} instances: {health}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The `data:` payloads of an SSE response, in order.
    async fn sse(&self, path: &str, body: Value) -> Result<Vec<String>> {
        let r = self.http.post(format!("{}{path}", self.url)).json(&body).send().await?;
        anyhow::ensure!(r.status() == 200, "status {}", r.status());
        let ct = r
            .headers()
            .get("content-type")
            .context("content-type")?
            .to_str()?
            .to_owned();
        anyhow::ensure!(ct.starts_with("text/event-stream"), "content-type {ct}");
        let text = r.text().await?;
        Ok(text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_owned)
            .collect())
    }
}

fn chat(content: &str) -> Value {
    json!({"model": "echo", "messages": [{"role": "user", "content": content}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_chat_and_completions() -> Result<()> {
    for plane in [Plane::Local, Plane::Tcp] {
        let c = cluster(plane, 2, Duration::ZERO).await?;
        let (status, models) = c.get("/v1/models").await?;
        assert_eq!(
            (status, &models["object"], &models["data"][0]["id"]),
            (200, &json!("list"), &json!("echo")),
            "{plane:?}"
        );
        let (status, health) = c.get("/health").await?;
        assert_eq!(status, 200);
        assert_eq!(health["models"]["echo"]["instances"].as_array().map(Vec::len), Some(2));

        let (status, r) = c.post("/v1/chat/completions", chat("héllo 🦀")).await?;
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["object"], "chat.completion");
        assert_eq!(r["choices"][0]["message"]["role"], "assistant");
        assert_eq!(r["choices"][0]["message"]["content"], "user: héllo 🦀\nassistant: ");
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
        let prompt_tokens = "user: héllo 🦀\nassistant: ".len();
        assert_eq!(
            r["usage"],
            json!({"prompt_tokens": prompt_tokens, "completion_tokens": prompt_tokens, "total_tokens": 2 * prompt_tokens, "prompt_tokens_details": {"cached_tokens": 0}})
        );

        let (status, r) = c
            .post(
                "/v1/completions",
                json!({"model": "echo", "prompt": "abcdef", "max_tokens": 4}),
            )
            .await?;
        assert_eq!(status, 200, "{r}");
        assert_eq!(
            (
                &r["object"],
                &r["choices"][0]["text"],
                &r["choices"][0]["finish_reason"]
            ),
            (&json!("text_completion"), &json!("abcd"), &json!("length"))
        );

        let (status, r) = c
            .post("/v1/completions", json!({"model": "echo", "prompt": [104, 105]}))
            .await?;
        assert_eq!((status, &r["choices"][0]["text"]), (200, &json!("hi")));
        let (status, r) = c
            .post("/v1/completions", json!({"model": "echo", "prompt": ["one"]}))
            .await?;
        assert_eq!((status, &r["choices"][0]["text"]), (200, &json!("one")));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_chat_and_completions() -> Result<()> {
    for plane in [Plane::Local, Plane::Tcp] {
        let c = cluster(plane, 1, Duration::from_millis(1)).await?;
        let mut body = chat("日本");
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let data = c.sse("/v1/chat/completions", body).await?;
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{plane:?}");
        let chunks: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d))
            .collect::<Result<_, _>>()?;
        assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "user: 日本\nassistant: ");
        // Every piece is whole characters: a 3-byte character never arrives split.
        assert!(chunks.iter().any(|c| c["choices"][0]["delta"]["content"] == "日"));
        let finish = &chunks[chunks.len() - 2];
        assert_eq!(finish["choices"][0]["finish_reason"], "stop");
        let usage = &chunks[chunks.len() - 1];
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["completion_tokens"], text.len());

        let data = c
            .sse(
                "/v1/completions",
                json!({"model": "echo", "prompt": "xyz", "stream": true, "max_tokens": 2}),
            )
            .await?;
        let chunks: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d))
            .collect::<Result<_, _>>()?;
        let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
        assert_eq!(text, "xy");
        assert_eq!(
            chunks.last().map(|c| &c["choices"][0]["finish_reason"]),
            Some(&json!("length"))
        );
        assert!(
            chunks.iter().all(|c| c.get("usage").is_none()),
            "no usage unless asked for"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors() -> Result<()> {
    let c = cluster(Plane::Local, 1, Duration::ZERO).await?;
    let cases: Vec<(&str, &str, Value, u16, Option<&str>)> = vec![
        ("chat", "/v1/chat/completions", json!("not an object"), 400, None),
        (
            "missing model",
            "/v1/chat/completions",
            json!({"messages": []}),
            400,
            None,
        ),
        (
            "wrong type",
            "/v1/chat/completions",
            json!({"model": "echo", "messages": "hi"}),
            400,
            None,
        ),
        (
            "no messages",
            "/v1/chat/completions",
            json!({"model": "echo", "messages": []}),
            400,
            Some("messages"),
        ),
        (
            "unknown model",
            "/v1/chat/completions",
            json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
            404,
            Some("model"),
        ),
        (
            "n>1",
            "/v1/chat/completions",
            json!({"model": "echo", "n": 2, "messages": [{"role": "user", "content": "x"}]}),
            400,
            Some("n"),
        ),
        (
            "max_tokens 0",
            "/v1/completions",
            json!({"model": "echo", "prompt": "x", "max_tokens": 0}),
            400,
            Some("max_tokens"),
        ),
        (
            "over context",
            "/v1/completions",
            json!({"model": "echo", "prompt": "x", "max_tokens": 256}),
            400,
            Some("max_tokens"),
        ),
        (
            "prompt too long",
            "/v1/completions",
            json!({"model": "echo", "prompt": "x".repeat(300)}),
            400,
            Some("messages"),
        ),
        (
            "empty prompt",
            "/v1/completions",
            json!({"model": "echo", "prompt": ""}),
            400,
            Some("prompt"),
        ),
        (
            "token out of vocab",
            "/v1/completions",
            json!({"model": "echo", "prompt": [1, 70000]}),
            400,
            Some("prompt"),
        ),
        (
            "batched prompts",
            "/v1/completions",
            json!({"model": "echo", "prompt": ["a", "b"]}),
            400,
            Some("prompt"),
        ),
        (
            "negative token",
            "/v1/completions",
            json!({"model": "echo", "prompt": [-1]}),
            400,
            None,
        ),
        (
            "too large",
            "/v1/completions",
            json!({"model": "echo", "prompt": "x".repeat(100_000)}),
            413,
            None,
        ),
        ("no route", "/v1/embeddings", json!({}), 404, None),
    ];
    for (name, path, body, status, param) in cases {
        let (got, r) = c.post(path, body).await?;
        assert_eq!(got, status, "{name}: {r}");
        let e = &r["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{name}: {r}");
        assert!(e["type"].is_string(), "{name}: {r}");
        assert_eq!(e["param"].as_str(), param, "{name}: {r}");
    }
    // Malformed JSON text, not just the wrong shape.
    let r = c
        .http
        .post(format!("{}/v1/chat/completions", c.url))
        .body("{\"model\":")
        .send()
        .await?;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await?;
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not valid JSON")),
        "{v}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_requests_and_follows_workers_leaving() -> Result<()> {
    let mut c = cluster(Plane::Tcp, 3, Duration::ZERO).await?;
    for i in 0..30 {
        let (status, _) = c
            .post("/v1/completions", json!({"model": "echo", "prompt": format!("p{i}")}))
            .await?;
        assert_eq!(status, 200);
    }
    let counts: Vec<usize> = c.workers.iter().map(|(_, n)| n.load(Ordering::SeqCst)).collect();
    assert_eq!(counts, [10, 10, 10]);

    let (leaving, served) = c.workers.remove(0);
    leaving.run(async {}).await;
    let before = served.load(Ordering::SeqCst);
    for i in 0..10 {
        let (status, r) = c
            .post("/v1/completions", json!({"model": "echo", "prompt": format!("q{i}")}))
            .await?;
        assert_eq!(status, 200, "{r}");
    }
    assert_eq!(
        served.load(Ordering::SeqCst),
        before,
        "a stopped worker gets no requests"
    );
    c.wait_for_instances(Some(2)).await?;

    for (w, _) in c.workers.drain(..) {
        w.run(async {}).await;
    }
    // Discovery changes reach the frontend asynchronously.
    c.wait_for_instances(None).await?;
    let (status, health) = c.get("/health").await?;
    assert_eq!(status, 503, "{health}");
    let (status, r) = c
        .post("/v1/completions", json!({"model": "echo", "prompt": "x"}))
        .await?;
    assert_eq!(status, 404, "the model left with its last worker: {r}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_on_the_worker() -> Result<()> {
    for plane in [Plane::Local, Plane::Tcp] {
        let c = cluster(plane, 1, Duration::from_millis(20)).await?;
        let mut body = chat(&"z".repeat(100));
        body["stream"] = json!(true);
        let r = c
            .http
            .post(format!("{}/v1/chat/completions", c.url))
            .json(&body)
            .send()
            .await?;
        let mut bytes = r.bytes_stream();
        let first = bytes.next().await.context("first chunk")??;
        assert!(first.starts_with(b"data: "));
        assert_eq!(c.workers[0].0.in_flight(), 1);
        drop(bytes);
        let start = Instant::now();
        while c.workers[0].0.in_flight() != 0 {
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "{plane:?}: request still in flight on the worker"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_added_later_becomes_routable() -> Result<()> {
    let mut c = cluster(Plane::Local, 0, Duration::ZERO).await?;
    let (status, _) = c.get("/health").await?;
    assert_eq!(status, 503);
    let (status, _) = c.post("/v1/chat/completions", chat("x")).await?;
    assert_eq!(status, 404);
    let w = start_worker(&c.runtime, Plane::Local, Duration::ZERO).await?;
    c.workers.push(w);
    let start = Instant::now();
    loop {
        let (status, r) = c.post("/v1/chat/completions", chat("x")).await?;
        if status == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(2), "still {status}: {r}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}
