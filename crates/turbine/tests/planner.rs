//! The planner as a process with the local connector: real `turbine worker` processes behind
//! a real frontend, scaled up by waves of streamed requests and down in the lulls while the
//! streams still run on the replicas it drains. No client sees an error or a cut stream:
//! what a drained replica has not finished by its deadline migrates.
//!
//! `TURBINE_PLANNER_WAVES` sets the number of waves (default 3; each drains two replicas).
//! Then `turbine serve --planner`, whose pool is workers in the serving process.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::{metric, start, start_frontend, write_profile, Etcd, Load, Proc};

/// The planner, stopped with SIGTERM (so that it drains its workers) however the test ends.
struct Planner(Proc);

impl Drop for Planner {
    fn drop(&mut self) {
        if self.0.signal("TERM").is_ok() {
            let _ = self.0.wait_exit(Duration::from_secs(20));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_down_under_streaming_load_drops_no_request() -> Result<()> {
    let waves: usize = match std::env::var("TURBINE_PLANNER_WAVES") {
        Ok(v) => v.parse().context("TURBINE_PLANNER_WAVES")?,
        Err(_) => 3,
    };
    let etcd = Etcd::start()?;
    let (_frontend, url) = start_frontend(&["--discovery", &etcd.url])?;
    let dir = tempfile::tempdir()?;
    // The capacity model of a replica a thousand times slower than the workers: any stream
    // of arrivals asks for the maximum, none for the minimum.
    let profile = write_profile(dir.path(), "0.001")?;
    let profile = profile.as_str();
    let worker_args = format!("--discovery {} --engine mocker --lease-ttl-secs 2", etcd.url);
    #[rustfmt::skip]
    let (planner, metrics_line) = start(
        &[
            "planner", "run", "--frontend", &url, "--worker-args", &worker_args, "--profile", profile,
            "--min", "1", "--max", "3", "--fast-interval-s", "0.5", "--slow-interval-s", "1",
            "--stabilization-s", "1", "--idle-s", "60", "--itl-ms", "100000", "--drain-deadline-s", "1",
            "--metrics-port", "0",
        ],
        "turbine: metrics on ",
    )?;
    let _planner = Planner(planner);
    let planner_url = metrics_line.trim().trim_end_matches("/metrics").to_owned();
    let http = reqwest::Client::new();
    let ready = |http: reqwest::Client, u: String| async move {
        metric(
            &http,
            &u,
            "turbine_planner_replicas{pool=\"aggregated\",state=\"ready\"}",
        )
        .await
    };
    let drains = |http: reqwest::Client, u: String| async move {
        metric(&http, &u, "turbine_planner_drains_total{pool=\"aggregated\"}").await
    };
    wait_until(
        "the first worker",
        Duration::from_secs(30),
        || ready(http.clone(), planner_url.clone()),
        |n| n >= 1.0,
    )
    .await?;
    let mut streams = Vec::new();
    let mut requests = 0;
    for wave in 0..waves {
        // Requests keep arriving until three replicas serve them, so that each has streams.
        let started = Instant::now();
        loop {
            streams.push(Load::start(&http, &url, "mocker", 2, 1500));
            requests += 2;
            tokio::time::sleep(Duration::from_millis(250)).await;
            let n = ready(http.clone(), planner_url.clone()).await?;
            if n >= 3.0 && started.elapsed() > Duration::from_secs(2) {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "wave {wave}: never reached 3 replicas"
            );
        }
        streams.push(Load::start(&http, &url, "mocker", 6, 1500));
        requests += 6;
        // Then nothing more arrives: the pool shrinks while those streams run.
        let before = drains(http.clone(), planner_url.clone()).await?;
        wait_until(
            "two drains",
            Duration::from_secs(30),
            || drains(http.clone(), planner_url.clone()),
            |n| n >= before + 2.0,
        )
        .await?;
        for load in streams.drain(..) {
            load.finish().await?;
        }
    }
    let drained = drains(http.clone(), planner_url.clone()).await?;
    assert!(drained >= 2.0 * waves as f64, "{drained} drains in {waves} waves");
    let migrated = metric(&http, &url, "turbine_frontend_migrations_total{model=\"mocker\"}").await?;
    assert!(
        migrated >= 1.0,
        "no stream was still running at a drain deadline: the test tested nothing"
    );
    eprintln!("{waves} waves: {drained} drains, {requests} streams of 1,500 tokens all complete, {migrated} migrated at a drain deadline");
    Ok(())
}

/// Disaggregated pools with the local connector: prefill and decode workers, each pool
/// grown by load and drained back to its minimum when it ends, every stream complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_and_decode_pools_scale_on_their_own() -> Result<()> {
    let etcd = Etcd::start()?;
    let (_frontend, url) = start_frontend(&["--discovery", &etcd.url])?;
    let dir = tempfile::tempdir()?;
    let profile = write_profile(dir.path(), "0.001")?;
    let worker = |role: &str| {
        format!(
            "--discovery {} --engine mocker --lease-ttl-secs 2 --kv-lease-ms 1000 --staging-blocks 256 --role {role}",
            etcd.url
        )
    };
    let (prefill_args, decode_args) = (worker("prefill"), worker("decode"));
    #[rustfmt::skip]
    let (planner, metrics_line) = start(
        &[
            "planner", "run", "--frontend", &url, "--profile", &profile,
            "--prefill-worker-args", &prefill_args, "--decode-worker-args", &decode_args,
            "--prefill-min", "1", "--prefill-max", "2", "--decode-min", "1", "--decode-max", "2",
            "--fast-interval-s", "0.5", "--slow-interval-s", "1", "--stabilization-s", "1",
            "--idle-s", "2", "--itl-ms", "100000", "--drain-deadline-s", "1", "--metrics-port", "0",
        ],
        "turbine: metrics on ",
    )?;
    let _planner = Planner(planner);
    let planner_url = metrics_line.trim().trim_end_matches("/metrics").to_owned();
    let http = reqwest::Client::new();
    let ready = |pool: &'static str| {
        let (http, u) = (http.clone(), planner_url.clone());
        async move {
            let series = format!("turbine_planner_replicas{{pool=\"{pool}\",state=\"ready\"}}");
            metric(&http, &u, &series).await
        }
    };
    for pool in ["prefill", "decode"] {
        wait_until(
            &format!("a {pool} worker"),
            Duration::from_secs(30),
            || ready(pool),
            |n| n >= 1.0,
        )
        .await?;
    }
    let mut streams = stream_until(&http, &url, 300, "the pools grown to 2 each", || async {
        Ok(ready("prefill").await? >= 2.0 && ready("decode").await? >= 2.0)
    })
    .await?;
    let requests = 2 * streams.len();
    for load in streams.drain(..) {
        load.finish().await?;
    }
    for pool in ["prefill", "decode"] {
        wait_until(
            &format!("the {pool} pool back at 1"),
            Duration::from_secs(30),
            || ready(pool),
            |n| n == 1.0,
        )
        .await?;
        let drains = metric(
            &http,
            &planner_url,
            &format!("turbine_planner_drains_total{{pool=\"{pool}\"}}"),
        )
        .await?;
        anyhow::ensure!(drains >= 1.0, "{pool}: {drains} drains");
    }
    eprintln!("{requests} streams complete over prefill and decode pools grown to 2 and drained back to 1");
    Ok(())
}

/// `turbine serve --planner`: the same planner sizing a pool of workers in the serving
/// process. Load grows it to the maximum; when the load ends it drains back to the minimum,
/// and every stream completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_the_planner_grows_and_shrinks_its_own_pool() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let profile = write_profile(dir.path(), "0.001")?;
    #[rustfmt::skip]
    let (serve, url) = start(
        &[
            "serve", "--port", "0", "--engine", "mocker", "--planner", "--profile", &profile,
            "--min", "1", "--max", "3", "--fast-interval-s", "0.5", "--slow-interval-s", "1",
            "--stabilization-s", "1", "--idle-s", "2", "--itl-ms", "100000", "--grace-period-secs", "2",
        ],
        "turbine: listening on ",
    )?;
    let serve = Planner(serve);
    let url = url.trim().to_owned();
    let http = reqwest::Client::new();
    let series = |state: &str| format!("turbine_planner_replicas{{pool=\"aggregated\",state=\"{state}\"}}");
    let instances = |http: reqwest::Client, u: String| async move {
        Ok(common::instances(&http, &u, "mocker").await?.len() as f64)
    };
    wait_until(
        "the minimum's worker",
        Duration::from_secs(30),
        || instances(http.clone(), url.clone()),
        |n| n >= 1.0,
    )
    .await?;
    let mut streams = stream_until(&http, &url, 400, "3 workers", || async {
        Ok(instances(http.clone(), url.clone()).await? >= 3.0)
    })
    .await?;
    anyhow::ensure!(metric(&http, &url, &series("target")).await? == 3.0);
    let requests = 2 * streams.len();
    for load in streams.drain(..) {
        load.finish().await?;
    }
    // Idle: back to the minimum, the drained workers gone from routing and from /metrics.
    wait_until(
        "the pool back at its minimum",
        Duration::from_secs(30),
        || instances(http.clone(), url.clone()),
        |n| n == 1.0,
    )
    .await?;
    let drains = metric(&http, &url, "turbine_planner_drains_total{pool=\"aggregated\"}").await?;
    anyhow::ensure!(drains >= 2.0, "{drains} drains");
    wait_until(
        "one worker's series",
        Duration::from_secs(10),
        || async {
            let text = http.get(format!("{url}/metrics")).send().await?.text().await?;
            Ok(text
                .lines()
                .filter(|l| l.starts_with("turbine_worker_sequences{") && l.contains("state=\"running\""))
                .count() as f64)
        },
        |n| n == 1.0,
    )
    .await?;
    drop(serve);
    eprintln!("{requests} streams complete over a pool grown to 3 and drained back to 1");
    Ok(())
}

/// Starts two streams of `max_tokens` every 250 ms until `grown` says the pools are big
/// enough (within 60 s), and returns them, still running.
async fn stream_until<F, Fut>(
    http: &reqwest::Client,
    url: &str,
    max_tokens: u64,
    what: &str,
    mut grown: F,
) -> Result<Vec<Load>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let mut streams = Vec::new();
    let started = Instant::now();
    loop {
        streams.push(Load::start(http, url, "mocker", 2, max_tokens));
        tokio::time::sleep(Duration::from_millis(250)).await;
        if grown().await? {
            return Ok(streams);
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(60), "never reached {what}");
    }
}

async fn wait_until<F, Fut>(what: &str, within: Duration, mut read: F, done: impl Fn(f64) -> bool) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<f64>>,
{
    let start = Instant::now();
    loop {
        let v = read().await?;
        if done(v) {
            return Ok(());
        }
        anyhow::ensure!(start.elapsed() < within, "waited {within:?} for {what}: still {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
