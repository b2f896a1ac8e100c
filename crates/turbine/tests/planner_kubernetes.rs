//! The planner's Kubernetes connector against a fake API server (no real one runs on these
//! machines): it scales the Deployment through the scale subresource as load comes and
//! goes, and an operator's manual scale is kept for a whole stabilization window rather
//! than undone on the next tick. The same fake serves the frontend's `/metrics`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use axum::extract::State;
use axum::routing::get;
use axum::Json;
use common::{start, write_profile};
use serde_json::{json, Value};

const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/serving/deployments/workers";

#[derive(Default)]
struct Fake {
    /// The Deployment's spec.replicas; its pods are ready as soon as asked for.
    replicas: u32,
    /// Every scale the planner asked for, and when.
    patches: Vec<(Instant, u32)>,
    /// The frontend's counters.
    completed: u64,
    prompt_tokens: u64,
}

type Shared = Arc<Mutex<Fake>>;

async fn deployment(State(fake): State<Shared>) -> Json<Value> {
    let n = fake.lock().map_or(0, |f| f.replicas);
    Json(json!({
        "kind": "Deployment",
        "spec": {"replicas": n},
        "status": {"replicas": n, "readyReplicas": n},
    }))
}

async fn scale(State(fake): State<Shared>, body: String) -> (axum::http::StatusCode, Json<Value>) {
    let parsed: Option<u32> = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["spec"]["replicas"].as_u64())
        .and_then(|n| u32::try_from(n).ok());
    match (parsed, fake.lock()) {
        (Some(n), Ok(mut f)) => {
            f.replicas = n;
            f.patches.push((Instant::now(), n));
            (axum::http::StatusCode::OK, Json(json!({"spec": {"replicas": n}})))
        }
        _ => (
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"message": format!("bad scale patch {body:?}")})),
        ),
    }
}

async fn metrics(State(fake): State<Shared>) -> String {
    let (completed, tokens) = fake.lock().map_or((0, 0), |f| (f.completed, f.prompt_tokens));
    format!(
        "turbine_frontend_requests_total{{endpoint=\"completions\",model=\"m\",status=\"200\"}} {completed}\n\
         turbine_frontend_inflight_requests{{model=\"m\"}} 0\n\
         turbine_frontend_input_tokens_total{{model=\"m\"}} {tokens}\n"
    )
}

fn patches(fake: &Shared) -> Vec<(Instant, u32)> {
    fake.lock().map(|f| f.patches.clone()).unwrap_or_default()
}

async fn wait_for_patch(
    fake: &Shared,
    after: usize,
    within: Duration,
    want: impl Fn(u32) -> bool,
) -> Result<(Instant, u32)> {
    let start = Instant::now();
    loop {
        if let Some(&p) = patches(fake)
            .get(after..)
            .and_then(|p| p.iter().find(|(_, n)| want(*n)))
        {
            return Ok(p);
        }
        anyhow::ensure!(
            start.elapsed() < within,
            "no such scale within {within:?}: {:?}",
            patches(fake)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deployment_follows_load_and_a_manual_scale_is_seen_not_fought() -> Result<()> {
    let fake: Shared = Arc::new(Mutex::new(Fake {
        replicas: 1,
        ..Fake::default()
    }));
    let app = axum::Router::new()
        .route(DEPLOYMENT, get(deployment))
        .route(&format!("{DEPLOYMENT}/scale"), axum::routing::patch(scale))
        .route("/metrics", get(metrics))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir()?;
    let profile = write_profile(dir.path(), "0.01")?;
    let profile = profile.as_str();
    #[rustfmt::skip]
    let (_planner, _) = start(
        &[
            "planner", "run", "--connector", "kubernetes", "--kube-api", &url, "--kube-namespace", "serving",
            "--kube-deployment", "workers", "--frontend", &url, "--profile", profile, "--min", "1", "--max", "5",
            "--fast-interval-s", "0.2", "--slow-interval-s", "0.4", "--stabilization-s", "1.5", "--idle-s", "60",
            "--itl-ms", "100000",
        ],
        "turbine: planner running",
    )?;
    // Nothing arrives: one replica is the minimum, and nothing is asked of the cluster.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(patches(&fake).is_empty(), "{:?}", patches(&fake));

    // Load arrives: 50 requests a second of 1,000 tokens, far more than one replica serves.
    let loading = {
        let fake = fake.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(mut f) = fake.lock() {
                    f.completed += 5;
                    f.prompt_tokens += 5000;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    wait_for_patch(&fake, 0, Duration::from_secs(5), |n| n == 5).await?;
    loading.abort();
    // It stops: back to the minimum once the lower need has held for the window.
    let stopped = Instant::now();
    let (at, _) = wait_for_patch(&fake, 0, Duration::from_secs(10), |n| n == 1).await?;
    assert!(
        at - stopped >= Duration::from_millis(1200),
        "shrank {:?} after the load stopped",
        at - stopped
    );

    // An operator scales to three by hand: the planner starts from three, and shrinks only
    // after a whole window of not needing them.
    let before = patches(&fake).len();
    let edited = Instant::now();
    if let Ok(mut f) = fake.lock() {
        f.replicas = 3;
    }
    let (at, n) = wait_for_patch(&fake, before, Duration::from_secs(10), |_| true).await?;
    assert_eq!(n, 1);
    assert!(
        at - edited >= Duration::from_millis(1500),
        "undid the edit after {:?}",
        at - edited
    );
    Ok(())
}
