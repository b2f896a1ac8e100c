//! The client and runner against a scripted OpenAI-style server on a loopback port: what they
//! measure, how they name failures, and when arrivals happen.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use turbine_bench::tokens::BlockTokens;
use turbine_bench::trace::Trace;
use turbine_bench::workload::{Lengths, Prompt, Synthetic};
use turbine_bench::{Arrival, Client, Endpoint, ErrorKind, RunConfig, Workload};

/// Arrival times of requests at the server, and their prompts.
#[derive(Default, Clone)]
struct Seen(Arc<Mutex<Vec<(Instant, Value)>>>);

const FIRST_MS: u64 = 60;
const GAP_MS: u64 = 25;

/// The model name picks the behaviour: `ok` streams 5 tokens (first after 60 ms, then every
/// 25 ms) with usage; `http500`, `broken` (ends without [DONE]), `error` (an error event) and
/// `slow` (10 s before anything) fail.
async fn completions(State(seen): State<Seen>, Json(body): Json<Value>) -> Response {
    seen.0.lock().expect("lock").push((Instant::now(), body.clone()));
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    if model == "http500" {
        return (StatusCode::INTERNAL_SERVER_ERROR, "no").into_response();
    }
    let max_tokens = body["max_tokens"].as_u64().unwrap_or(5);
    let stream = async_stream(model, max_tokens);
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .expect("a valid response")
}

fn async_stream(model: String, max_tokens: u64) -> impl futures::Stream<Item = Result<String, std::io::Error>> {
    futures::stream::unfold(0u64, move |i| {
        let model = model.clone();
        async move {
            let event = |v: Value| format!("data: {v}\n\n");
            let chunk = |t: &str| event(json!({"choices": [{"index": 0, "text": t}]}));
            match (model.as_str(), i) {
                ("slow", 0) => {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    Some((Ok(chunk("x")), 1))
                }
                (_, 0) => {
                    tokio::time::sleep(Duration::from_millis(FIRST_MS)).await;
                    // A keep-alive comment and an empty chunk do not count as the first token.
                    Some((Ok(format!(": keep-alive\n\n{}{}", chunk(""), chunk("a"))), 1))
                }
                ("broken", 2) => None,
                ("error", 2) => Some((Ok(event(json!({"error": {"message": "engine died"}}))), 99)),
                (_, n) if n < max_tokens => {
                    tokio::time::sleep(Duration::from_millis(GAP_MS)).await;
                    Some((Ok(chunk("b")), n + 1))
                }
                (_, n) if n == max_tokens => Some((
                    Ok(event(json!({"choices": [], "usage": {
                        "prompt_tokens": 40, "completion_tokens": max_tokens, "total_tokens": 40 + max_tokens,
                        "prompt_tokens_details": {"cached_tokens": 16}}}))
                        + "data: [DONE]\n\n"),
                    n + 1,
                )),
                _ => None,
            }
        }
    })
}

async fn server() -> (String, Seen) {
    let seen = Seen::default();
    let app = Router::new()
        .route("/v1/completions", post(completions))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    (format!("http://{addr}"), seen)
}

fn client(url: &str, model: &str) -> Client {
    Client::new(
        url,
        model.into(),
        Endpoint::Completions,
        Duration::from_millis(800),
        true,
    )
    .expect("client")
}

#[tokio::test]
async fn a_stream_is_timed_and_counted() {
    let (url, seen) = server().await;
    let start = Instant::now();
    let reply = client(&url, "ok").send(&Prompt::Tokens(vec![1, 2, 3]), 5, start).await;
    let r = reply.record;
    assert_eq!(r.error, None);
    assert_eq!(reply.text, "abbbb");
    let ttft = r.ttft.unwrap();
    assert!((FIRST_MS as f64 / 1000.0..0.5).contains(&ttft), "{ttft}");
    assert_eq!(r.itl.len(), 4);
    assert!(r.itl.iter().all(|&g| g >= GAP_MS as f64 / 1000.0 * 0.9), "{:?}", r.itl);
    assert!(r.e2e >= ttft + r.itl.iter().sum::<f64>() - 1e-3);
    assert_eq!((r.input_tokens, r.output_tokens, r.cached_tokens), (40, 5, Some(16)));
    let body = &seen.0.lock().unwrap()[0].1;
    assert_eq!(body["prompt"], json!([1, 2, 3]));
    assert_eq!(body["stream"], json!(true));
    assert_eq!(body["ignore_eos"], json!(true));
    assert_eq!(body["stream_options"]["include_usage"], json!(true));
}

#[tokio::test]
async fn failures_are_named_by_kind() {
    let (url, _) = server().await;
    let start = Instant::now();
    for (model, kind) in [
        ("http500", ErrorKind::Http(500)),
        ("broken", ErrorKind::BrokenStream),
        ("error", ErrorKind::ServerError),
        ("slow", ErrorKind::Timeout),
    ] {
        let r = client(&url, model)
            .send(&Prompt::Text("hi".into()), 5, start)
            .await
            .record;
        assert_eq!(r.error, Some(kind), "{model}");
    }
    // Nothing listens on port 1.
    let r = client("http://127.0.0.1:1", "ok")
        .send(&Prompt::Text("hi".into()), 5, start)
        .await
        .record;
    assert_eq!(r.error, Some(ErrorKind::Connect));
}

fn synthetic() -> Workload {
    Workload::Synthetic {
        spec: Synthetic {
            input: Lengths::fixed(8),
            output: Lengths::fixed(2),
            prefix_ratio: 0.0,
            prefix_groups: 1,
            turns: 1,
            think_time: Duration::ZERO,
            seed: 1,
        },
        text: None,
        token_ids: 32..127,
    }
}

#[tokio::test]
async fn concurrency_keeps_that_many_in_flight() {
    let (url, seen) = server().await;
    let cfg = RunConfig {
        arrival: Arrival::Concurrency(3),
        max_jobs: Some(9),
        duration: None,
        progress: false,
    };
    let out = turbine_bench::run(Arc::new(client(&url, "ok")), &synthetic(), &cfg)
        .await
        .unwrap();
    assert_eq!(out.records.len(), 9);
    assert!(out.records.iter().all(|r| r.error.is_none()));
    // Three waves of three requests, each about 85 ms long.
    let mut starts: Vec<f64> = out.records.iter().map(|r| r.start).collect();
    starts.sort_by(f64::total_cmp);
    // The second wave cannot start before a first request ends (60 + 25 ms).
    assert!(starts[2] < 0.06 && starts[3] > 0.08, "{starts:?}");
    assert_eq!(seen.0.lock().unwrap().len(), 9);
}

#[tokio::test]
async fn trace_arrivals_follow_the_scaled_timestamps() {
    let (url, seen) = server().await;
    let text = (0..4)
        .map(|i| {
            format!(
                "{{\"timestamp\": {}, \"input_length\": 20, \"output_length\": 2, \"hash_ids\": [7]}}\n",
                i * 200
            )
        })
        .collect::<String>();
    let trace = Trace::parse_mooncake(text.as_bytes()).unwrap();
    let workload = Workload::Trace {
        trace: Arc::new(trace),
        tokens: BlockTokens::new(512, 32..127, 0),
    };
    let cfg = RunConfig {
        arrival: Arrival::Trace { time_scale: 0.5 },
        max_jobs: None,
        duration: None,
        progress: false,
    };
    let out = turbine_bench::run(Arc::new(client(&url, "ok")), &workload, &cfg)
        .await
        .unwrap();
    let mut starts: Vec<f64> = out.records.iter().map(|r| r.start).collect();
    starts.sort_by(f64::total_cmp);
    for (i, s) in starts.iter().enumerate() {
        let want = i as f64 * 0.1;
        // Never early; late by scheduling delay only (unscaled, they would be 0.2 s apart).
        assert!(
            *s > want - 0.005 && *s < want + 0.06,
            "request {i} at {s}, wanted {want}"
        );
    }
    // Equal hash ids, equal prompts.
    let seen = seen.0.lock().unwrap();
    assert!(seen.iter().all(|(_, b)| b["prompt"] == seen[0].1["prompt"]));
    assert_eq!(seen[0].1["prompt"].as_array().unwrap().len(), 20);
}

#[tokio::test]
async fn poisson_arrivals_average_the_rate_and_stop_at_the_duration() {
    let (url, _) = server().await;
    let cfg = RunConfig {
        arrival: Arrival::Poisson { rate: 100.0, seed: 5 },
        max_jobs: None,
        duration: Some(Duration::from_millis(600)),
        progress: false,
    };
    let out = turbine_bench::run(Arc::new(client(&url, "ok")), &synthetic(), &cfg)
        .await
        .unwrap();
    // 60 expected; a Poisson count's standard deviation is about 8.
    assert!((30..=90).contains(&out.records.len()), "{}", out.records.len());
    // Nothing is dispatched after 0.6 s; a task dispatched just before may start a little
    // later on a busy machine.
    let last = out.records.iter().map(|r| r.start).fold(0.0, f64::max);
    assert!(last < 0.75, "a request started at {last} s");
}
