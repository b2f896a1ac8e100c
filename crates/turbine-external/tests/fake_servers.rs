//! `ExternalEngine` against stand-ins for vLLM and SGLang that speak their documented HTTP
//! APIs (vLLM's `/v1/completions` with `return_token_ids`, its `/metrics` names and
//! `cache_config_info`; SGLang's `/generate` with `output_ids` and `/abort_request`), on
//! loopback ports the OS picks. llama.cpp's real server is tested end to end in tests/sdk.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use turbine_engine::{Engine, EngineError};
use turbine_external::{ExternalConfig, ExternalEngine, ExternalError, ServerKind};
use turbine_protocols::{FinishReason, PreprocessedRequest, SamplingOptions, StopConditions};

#[derive(Default)]
struct Fake {
    healthy: AtomicBool,
    /// Close the stream after this many chunks without finishing (0: never).
    break_after: AtomicUsize,
    block_size: AtomicUsize,
    aborted: parking_lot::Mutex<Vec<String>>,
    bodies: parking_lot::Mutex<Vec<Value>>,
}

type Shared = Arc<Fake>;

async fn health(State(f): State<Shared>) -> StatusCode {
    if f.healthy.load(Ordering::SeqCst) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn models() -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": "fake/model", "object": "model", "root": "/nonexistent/fake", "max_model_len": 2048}]}),
    )
}

async fn metrics(State(f): State<Shared>) -> String {
    format!(
        "vllm:num_requests_running{{model_name=\"fake\"}} 2\nvllm:num_requests_waiting{{model_name=\"fake\"}} 1\n\
         vllm:kv_cache_usage_perc{{model_name=\"fake\"}} 0.5\n\
         vllm:cache_config_info{{block_size=\"{}\",num_gpu_blocks=\"400\"}} 1\n\
         sglang:num_running_reqs 3\nsglang:num_queue_reqs 0\n",
        f.block_size.load(Ordering::SeqCst)
    )
}

/// Streams the prompt's tokens back plus 100, one per chunk, as the server would stream
/// generated tokens, ending with the requested limit.
fn sse(chunks: Vec<Value>, break_after: usize) -> Response {
    let mut body = String::new();
    for (i, c) in chunks.iter().enumerate() {
        if break_after > 0 && i == break_after {
            // Cut off mid-stream, as a killed server would be.
            return ([("content-type", "text/event-stream")], body).into_response();
        }
        body.push_str(&format!("data: {c}\n\n"));
    }
    body.push_str("data: [DONE]\n\n");
    ([("content-type", "text/event-stream")], body).into_response()
}

async fn vllm_completions(State(f): State<Shared>, Json(b): Json<Value>) -> Response {
    f.bodies.lock().push(b.clone());
    if b["model"] != "fake/model" {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": {"message": "The model does not exist."}})),
        )
            .into_response();
    }
    if b["temperature"].as_f64().is_some_and(|t| t > 2.0) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"message": "temperature must be <= 2"}})),
        )
            .into_response();
    }
    let n = b["max_tokens"].as_u64().unwrap_or(8) as usize;
    let prompt: Vec<u64> = b["prompt"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .collect();
    let mut chunks: Vec<Value> = (0..n)
        .map(|i| json!({"choices": [{"index": 0, "text": "x", "token_ids": [prompt[i % prompt.len()] + 100], "finish_reason": null}]}))
        .collect();
    chunks.push(json!({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}));
    // What include_usage asks for: the prompt tokens served from the cache come last.
    chunks.push(json!({"choices": [], "usage": {"prompt_tokens": 3, "prompt_tokens_details": {"cached_tokens": 2}}}));
    sse(chunks, f.break_after.load(Ordering::SeqCst))
}

async fn sglang_generate(State(f): State<Shared>, Json(b): Json<Value>) -> Response {
    f.bodies.lock().push(b.clone());
    let n = b["sampling_params"]["max_new_tokens"].as_u64().unwrap_or(8) as usize;
    // Cumulative output_ids, SGLang's default.
    let chunks: Vec<Value> = (1..=n)
        .map(|k| {
            let finish = if k == n {
                json!({"type": "length", "length": n})
            } else {
                Value::Null
            };
            json!({"text": "", "output_ids": (0..k as u64).map(|i| 500 + i).collect::<Vec<_>>(),
                   "meta_info": {"id": b["rid"], "finish_reason": finish, "completion_tokens": k, "cached_tokens": 0}})
        })
        .collect();
    sse(chunks, f.break_after.load(Ordering::SeqCst))
}

async fn sglang_abort(State(f): State<Shared>, Json(b): Json<Value>) -> StatusCode {
    f.aborted.lock().push(b["rid"].as_str().unwrap_or_default().to_owned());
    StatusCode::OK
}

async fn start_fake() -> (SocketAddr, Shared) {
    let fake = Arc::new(Fake::default());
    fake.healthy.store(true, Ordering::SeqCst);
    fake.block_size.store(16, Ordering::SeqCst);
    let app = Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/v1/completions", post(vllm_completions))
        .route("/generate", post(sglang_generate))
        .route("/abort_request", post(sglang_abort))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, fake)
}

fn config(kind: ServerKind, addr: SocketAddr) -> ExternalConfig {
    ExternalConfig {
        kind,
        url: format!("http://{addr}"),
        poll_interval: Duration::from_millis(20),
        startup_timeout: Duration::from_secs(5),
        block_size: 16,
        kv_events: None,
    }
}

fn request(max_tokens: u32, stop_token_ids: Vec<u32>) -> PreprocessedRequest {
    PreprocessedRequest {
        request_id: "req-1".into(),
        model: "fake".into(),
        token_ids: vec![1, 2, 3],
        stop: StopConditions {
            max_tokens: Some(max_tokens),
            stop_token_ids,
        },
        sampling: SamplingOptions::default(),
        disagg: None,
    }
}

/// A stream's tokens, finish and the error that ended it, if any.
async fn collect(
    engine: &ExternalEngine,
    req: PreprocessedRequest,
) -> (Vec<u32>, Option<FinishReason>, Option<EngineError>) {
    let (tokens, finish, error, _) = collect_all(engine, req).await;
    (tokens, finish, error)
}

/// ... and the cached prompt tokens reported.
async fn collect_all(
    engine: &ExternalEngine,
    req: PreprocessedRequest,
) -> (Vec<u32>, Option<FinishReason>, Option<EngineError>, Option<u32>) {
    let mut stream = engine.generate(req, CancellationToken::new()).expect("generate");
    let (mut tokens, mut finish, mut error, mut cached) = (Vec::new(), None, None, None);
    while let Some(o) = stream.next().await {
        match o {
            Ok(o) => {
                assert!(finish.is_none(), "nothing follows the finish");
                tokens.extend_from_slice(&o.token_ids);
                finish = o.finish_reason;
                cached = cached.or(o.cached_tokens);
            }
            Err(e) => error = Some(e),
        }
    }
    (tokens, finish, error, cached)
}

#[tokio::test]
async fn vllm_streams_token_ids_and_reports_load() {
    let (addr, fake) = start_fake().await;
    let engine = ExternalEngine::connect(config(ServerKind::Vllm, addr))
        .await
        .expect("connect");
    assert_eq!(engine.info().model, "fake/model");
    assert_eq!(engine.info().context_length, Some(2048));
    // The root path does not exist on this machine, so no tokenizer is taken from it.
    assert_eq!(engine.info().model_path, None);

    let (tokens, finish, error, cached) = collect_all(&engine, request(4, vec![])).await;
    assert_eq!(
        (tokens, finish, error.map(|e| e.to_string()), cached),
        (vec![101, 102, 103, 101], Some(FinishReason::Length), None, Some(2))
    );
    let body = fake.bodies.lock().last().cloned().expect("a body");
    assert_eq!(body["prompt"], json!([1, 2, 3]));
    assert_eq!(body["return_token_ids"], json!(true));

    // The worker stops at a stop token even where the server would go on.
    let (tokens, finish, _) = collect(&engine, request(8, vec![103])).await;
    assert_eq!((tokens, finish), (vec![101, 102, 103], Some(FinishReason::Stop)));

    let load = engine.load().expect("load");
    let l = *load.borrow();
    assert_eq!(
        (l.active_seqs, l.waiting_seqs, l.blocks_in_use, l.blocks_total),
        (2, 1, 200, 400)
    );
}

#[tokio::test]
async fn server_errors_keep_their_kind() {
    let (addr, fake) = start_fake().await;
    let engine = ExternalEngine::connect(config(ServerKind::Vllm, addr))
        .await
        .expect("connect");
    let mut hot = request(4, vec![]);
    hot.sampling.temperature = Some(2.5);
    let (_, _, error) = collect(&engine, hot).await;
    assert!(
        matches!(&error, Some(EngineError::InvalidRequest(m)) if m.contains("temperature must be <= 2")),
        "{error:?}"
    );

    // A stream cut off before its finish is the server lost: retried or migrated elsewhere.
    fake.break_after.store(2, Ordering::SeqCst);
    let (tokens, finish, error) = collect(&engine, request(6, vec![])).await;
    assert_eq!((tokens.len(), finish), (2, None));
    assert!(matches!(error, Some(EngineError::Unavailable(_))), "{error:?}");
}

#[tokio::test]
async fn health_gates_requests() {
    let (addr, fake) = start_fake().await;
    let engine = ExternalEngine::connect(config(ServerKind::Vllm, addr))
        .await
        .expect("connect");
    let mut health = engine.health();
    fake.healthy.store(false, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(5), health.wait_for(|up| !*up))
        .await
        .expect("noticed down")
        .expect("watch");
    let refused = engine.generate(request(2, vec![]), CancellationToken::new());
    assert!(matches!(refused, Err(EngineError::Unavailable(_))), "{refused:?}");
    fake.healthy.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(5), health.wait_for(|up| *up))
        .await
        .expect("noticed up")
        .expect("watch");
    assert!(collect(&engine, request(2, vec![])).await.2.is_none());
}

#[tokio::test]
async fn a_block_size_mismatch_is_refused_at_connect() {
    let (addr, fake) = start_fake().await;
    fake.block_size.store(32, Ordering::SeqCst);
    let e = ExternalEngine::connect(config(ServerKind::Vllm, addr))
        .await
        .expect_err("refused");
    assert!(
        matches!(
            e,
            ExternalError::BlockSize {
                engine: 32,
                router: 16,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("--block-size"), "{e}");
}

#[tokio::test]
async fn sglang_cumulative_ids_and_abort_on_cancel() {
    let (addr, fake) = start_fake().await;
    let engine = ExternalEngine::connect(config(ServerKind::Sglang, addr))
        .await
        .expect("connect");
    let (tokens, finish, error) = collect(&engine, request(3, vec![])).await;
    assert_eq!(
        (tokens, finish, error.is_none()),
        (vec![500, 501, 502], Some(FinishReason::Length), true)
    );
    assert_eq!(fake.bodies.lock().last().expect("body")["input_ids"], json!([1, 2, 3]));

    // A stream that breaks is aborted on the server by its request id.
    fake.break_after.store(1, Ordering::SeqCst);
    let (_, _, error) = collect(&engine, request(5, vec![])).await;
    assert!(matches!(error, Some(EngineError::Unavailable(_))), "{error:?}");
    assert_eq!(fake.aborted.lock().as_slice(), ["req-1"]);
}

#[tokio::test]
async fn an_unreachable_server_fails_connect_with_its_url() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let mut c = config(ServerKind::LlamaCpp, addr);
    c.startup_timeout = Duration::from_millis(300);
    let e = ExternalEngine::connect(c).await.expect_err("refused");
    assert!(e.to_string().contains(&addr.to_string()), "{e}");
}
