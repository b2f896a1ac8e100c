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
        timing: None,
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
        disagg: None,
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

    /// Waits until `/health` reports `want` instances of the echo model (`None`: not known).
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
            Some("model"),
        ),
        (
            "wrong type",
            "/v1/chat/completions",
            json!({"model": "echo", "messages": "hi"}),
            400,
            Some("messages"),
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
            "n=0",
            "/v1/chat/completions",
            json!({"model": "echo", "n": 0, "messages": [{"role": "user", "content": "x"}]}),
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
            Some("prompt"),
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
            "negative token",
            "/v1/completions",
            json!({"model": "echo", "prompt": [-1]}),
            400,
            Some("prompt"),
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
    let chat = |extra: Value| {
        let mut body = json!({"model": "echo", "messages": [{"role": "user", "content": "x"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let mut cases = cases;
    for (name, extra, param) in [
        ("temperature high", json!({"temperature": 2.5}), "temperature"),
        ("temperature negative", json!({"temperature": -0.1}), "temperature"),
        ("top_p", json!({"top_p": 1.5}), "top_p"),
        (
            "frequency_penalty",
            json!({"frequency_penalty": -3}),
            "frequency_penalty",
        ),
        ("presence_penalty", json!({"presence_penalty": 2.1}), "presence_penalty"),
        ("top_k", json!({"top_k": -2}), "top_k"),
        ("too many stops", json!({"stop": vec!["s"; 33]}), "stop"),
        ("empty stop", json!({"stop": [""]}), "stop"),
        ("stop wrong type", json!({"stop": 7}), "stop"),
        ("logprobs", json!({"logprobs": true}), "logprobs"),
        (
            "stream_options without stream",
            json!({"stream_options": {"include_usage": true}}),
            "stream_options",
        ),
        ("n too large", json!({"n": 1000}), "n"),
        ("seed wrong type", json!({"seed": "x"}), "seed"),
        (
            "max_completion_tokens over context",
            json!({"max_completion_tokens": 100_000}),
            "max_completion_tokens",
        ),
        (
            "message without role",
            json!({"messages": [{"content": "x"}]}),
            "messages[0].role",
        ),
    ] {
        cases.push((name, "/v1/chat/completions", chat(extra), 400, Some(param)));
    }
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
    c.wait_for_instances(Some(0)).await?;
    let (status, health) = c.get("/health").await?;
    assert_eq!(status, 503, "{health}");
    let (status, r) = c
        .post("/v1/completions", json!({"model": "echo", "prompt": "x"}))
        .await?;
    assert_eq!(status, 503, "the model's workers are gone, for now: {r}");
    let (_, models) = c.get("/v1/models").await?;
    assert_eq!(models["data"], json!([]), "only served models are listed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_header_names_the_worker_of_each_choice() -> Result<()> {
    let c = cluster(Plane::Tcp, 3, Duration::ZERO).await?;
    let ids: Vec<String> = c.workers.iter().map(|(w, _)| w.instance().id.to_string()).collect();
    let header = |r: &reqwest::Response| -> Result<Vec<String>> {
        let value = r.headers().get("x-turbine-worker").context("no x-turbine-worker")?;
        Ok(value.to_str()?.split(',').map(str::to_owned).collect())
    };
    let post = |body: Value| c.http.post(format!("{}/v1/completions", c.url)).json(&body).send();
    // Round-robin gives the three choices of one request to three different workers.
    let r = post(json!({"model": "echo", "prompt": "abc", "n": 3})).await?;
    let mut workers = header(&r)?;
    assert_eq!(r.status(), 200);
    workers.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(workers, want);
    let r = post(json!({"model": "echo", "prompt": "abc", "stream": true})).await?;
    let workers = header(&r)?;
    assert!(r.text().await?.ends_with("data: [DONE]\n\n"));
    assert!(
        workers.len() == 1 && ids.contains(&workers[0]),
        "{workers:?} not one of {ids:?}"
    );
    let r = c
        .http
        .post(format!("{}/v1/chat/completions", c.url))
        .json(&chat("hi"))
        .send()
        .await?;
    let workers = header(&r)?;
    assert!(
        workers.len() == 1 && ids.contains(&workers[0]),
        "{workers:?} not one of {ids:?}"
    );
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
        let text = c.http.get(format!("{}/metrics", c.url)).send().await?.text().await?;
        assert!(
            text.contains(r#"turbine_frontend_client_disconnects_total{endpoint="chat",model="echo"} 1"#),
            "{plane:?}: the disconnect is counted:\n{text}"
        );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_end_generation_even_across_tokens() -> Result<()> {
    let c = cluster(Plane::Local, 1, Duration::ZERO).await?;
    // The echo model repeats the prompt one byte per token: "STOP" spans four tokens.
    let body = json!({"model": "echo", "prompt": "hello world STOP more", "stop": ["zzz", "STOP"]});
    let (status, r) = c.post("/v1/completions", body.clone()).await?;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["text"], "hello world ");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let data = c.sse("/v1/completions", streamed).await?;
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d))
        .collect::<Result<_, _>>()?;
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, "hello world ");
    assert!(
        chunks
            .iter()
            .all(|c| !c["choices"][0]["text"].as_str().unwrap_or("").contains('S')),
        "{chunks:?}"
    );
    assert_eq!(
        chunks.last().map(|c| &c["choices"][0]["finish_reason"]),
        Some(&json!("stop"))
    );

    // A stop string that never completes: its held-back start is released at the end.
    let (_, r) = c
        .post(
            "/v1/completions",
            json!({"model": "echo", "prompt": "abc ST", "stop": "STOP", "max_tokens": 5}),
        )
        .await?;
    assert_eq!(
        (
            r["choices"][0]["text"].as_str(),
            r["choices"][0]["finish_reason"].as_str()
        ),
        (Some("abc S"), Some("length"))
    );
    let (_, r) = c
        .post(
            "/v1/completions",
            json!({"model": "echo", "prompt": "abc ST", "stop": "STOP"}),
        )
        .await?;
    assert_eq!(
        (
            r["choices"][0]["text"].as_str(),
            r["choices"][0]["finish_reason"].as_str()
        ),
        (Some("abc ST"), Some("stop"))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_choices_from_n_and_batched_prompts() -> Result<()> {
    let c = cluster(Plane::Local, 2, Duration::ZERO).await?;
    let mut body = chat("hi");
    body["n"] = json!(3);
    let (status, r) = c.post("/v1/chat/completions", body.clone()).await?;
    assert_eq!(status, 200, "{r}");
    let prompt = "user: hi\nassistant: ";
    for i in 0..3 {
        assert_eq!(r["choices"][i]["index"], i);
        assert_eq!(r["choices"][i]["message"]["content"], prompt);
    }
    let len = prompt.len();
    assert_eq!(r["usage"]["prompt_tokens"], len, "one prompt, counted once");
    assert_eq!(r["usage"]["completion_tokens"], 3 * len);

    let batch = json!({"model": "echo", "prompt": ["ab", "cde"], "max_tokens": 2});
    let (_, r) = c.post("/v1/completions", batch.clone()).await?;
    let got: Vec<(&str, &str)> = (0..2)
        .map(|i| {
            (
                r["choices"][i]["text"].as_str().unwrap(),
                r["choices"][i]["finish_reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, [("ab", "stop"), ("cd", "length")]);
    assert_eq!(
        (
            r["usage"]["prompt_tokens"].as_u64(),
            r["usage"]["completion_tokens"].as_u64()
        ),
        (Some(5), Some(4))
    );

    let mut streamed = batch;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let data = c.sse("/v1/completions", streamed).await?;
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d))
        .collect::<Result<_, _>>()?;
    let mut texts = [String::new(), String::new()];
    for chunk in &chunks {
        for choice in chunk["choices"].as_array().unwrap() {
            texts[choice["index"].as_u64().unwrap() as usize].push_str(choice["text"].as_str().unwrap());
        }
    }
    assert_eq!(texts, ["ab", "cd"]);
    let usage = chunks.last().unwrap();
    assert_eq!(
        (usage["choices"].clone(), usage["usage"]["total_tokens"].as_u64()),
        (json!([]), Some(9))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_liveness_and_openapi() -> Result<()> {
    let c = cluster(Plane::Local, 1, Duration::ZERO).await?;
    let (status, live) = c.get("/live").await?;
    assert_eq!((status, &live["status"]), (200, &json!("live")));
    let (status, spec) = c.get("/openapi.json").await?;
    assert_eq!(status, 200);
    assert!(spec["paths"]["/v1/chat/completions"]["post"].is_object());
    c.post("/v1/completions", json!({"model": "echo", "prompt": "abc"}))
        .await?;
    c.post(
        "/v1/completions",
        json!({"model": "echo", "prompt": "abc", "temperature": 9}),
    )
    .await?;
    c.post("/v1/completions", json!({"model": "nope", "prompt": "abc"}))
        .await?;
    let r = c.http.get(format!("{}/metrics", c.url)).send().await?;
    assert!(r.headers()["content-type"].to_str()?.starts_with("text/plain"));
    let text = r.text().await?;
    for line in [
        r#"turbine_frontend_requests_total{endpoint="completions",model="echo",status="200"} 1"#,
        r#"turbine_frontend_requests_total{endpoint="completions",model="echo",status="400"} 1"#,
        // An unknown model name never becomes a label.
        r#"turbine_frontend_requests_total{endpoint="completions",model="",status="404"} 1"#,
        r#"turbine_frontend_input_tokens_total{model="echo"} 3"#,
        r#"turbine_frontend_output_tokens_total{model="echo"} 3"#,
        r#"turbine_frontend_inflight_requests{model="echo"} 0"#,
        r#"turbine_frontend_router_decision_seconds_count 1"#,
        r#"turbine_frontend_inter_token_latency_seconds_count{model="echo"} 2"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    assert!(!text.contains("nope"));
    Ok(())
}
