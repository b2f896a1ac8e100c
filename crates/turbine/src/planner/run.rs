//! `turbine planner run`: the planner as a process. Every fast tick it reads the frontend's
//! and the workers' `/metrics`, decides, and has the connector carry the decision out;
//! every decision that changes something is printed as one JSON line and counted on its own
//! `/metrics`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use prometheus::{CounterVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio_util::sync::CancellationToken;
use turbine_planner::{decide, Decision, PlannerState, PoolKind, PoolObservation};

use super::local::LocalConnector;
use super::scrape::{worker_load, FrontendCounters};
use super::{decision_json, PlannerArgs};
use crate::args::signal_to;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The frontend whose `/metrics` show the load where requests arrive.
    #[arg(long)]
    frontend: String,
    /// Who starts and stops replicas: `local` runs `turbine worker` processes here.
    #[arg(long, default_value = "local")]
    connector: String,
    /// The `turbine worker` arguments of every replica, as one string split at spaces
    /// (each gets `--metrics-port 0` and `--grace-period-secs` added).
    #[arg(long, allow_hyphen_values = true)]
    worker_args: String,
    /// How long a replica drains before what it still runs is sent elsewhere, in seconds.
    #[arg(long, default_value_t = 30)]
    drain_deadline_s: u64,
    /// Serve the planner's own `/metrics` on this port (0 picks one).
    #[arg(long)]
    metrics_port: Option<u16>,
    #[command(flatten)]
    planner: PlannerArgs,
}

struct Metrics {
    registry: Registry,
    worker_seconds: CounterVec,
    replicas: IntGaugeVec,
    decisions: IntCounterVec,
    drains: IntCounterVec,
}

impl Metrics {
    fn new() -> anyhow::Result<Self> {
        let registry = Registry::new();
        let worker_seconds = CounterVec::new(
            Opts::new(
                "turbine_planner_worker_seconds_total",
                "Replica-seconds paid for, starting and draining replicas included.",
            ),
            &["pool"],
        )?;
        let replicas = IntGaugeVec::new(
            Opts::new(
                "turbine_planner_replicas",
                "Replicas by phase (starting, ready, draining) and the target.",
            ),
            &["pool", "state"],
        )?;
        let decisions = IntCounterVec::new(
            Opts::new(
                "turbine_planner_decisions_total",
                "Decisions that changed a pool, by reason.",
            ),
            &["pool", "reason"],
        )?;
        let drains = IntCounterVec::new(
            Opts::new("turbine_planner_drains_total", "Replicas drained to shrink a pool."),
            &["pool"],
        )?;
        registry.register(Box::new(drains.clone()))?;
        registry.register(Box::new(worker_seconds.clone()))?;
        registry.register(Box::new(replicas.clone()))?;
        registry.register(Box::new(decisions.clone()))?;
        Ok(Self {
            registry,
            worker_seconds,
            replicas,
            decisions,
            drains,
        })
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.connector != "local" {
        bail!("--connector {:?}: only local is built", args.connector);
    }
    let Some(profile) = &args.planner.profile else {
        bail!("turbine planner run needs --profile FILE (write one with turbine profile)");
    };
    let profile: PathBuf = profile.clone();
    let config = args.planner.config()?;
    let text = std::fs::read_to_string(&profile).with_context(|| format!("{}", profile.display()))?;
    let model: turbine_planner::CapacityModel =
        serde_json::from_str(&text).with_context(|| format!("{}: not a capacity model", profile.display()))?;
    let model = model.validated().with_context(|| format!("{}", profile.display()))?;
    let frontend = args.frontend.trim_end_matches('/').to_owned();
    if !frontend.starts_with("http://") {
        bail!("--frontend must be an http:// URL, got {:?}", args.frontend);
    }
    let worker_args: Vec<String> = args.worker_args.split_whitespace().map(str::to_owned).collect();
    let exe = std::env::current_exe().context("finding the turbine binary to start workers with")?;
    let drain_deadline = Duration::from_secs(args.drain_deadline_s.max(1));
    let epoch = Instant::now();
    let mut connector = LocalConnector::new(exe, worker_args, drain_deadline, epoch);
    let min = config.pools[&PoolKind::Aggregated].min;
    let fast = config.fast_interval;
    let mut state = PlannerState::new(config, model);
    let metrics = Metrics::new()?;

    let shutdown = CancellationToken::new();
    tokio::spawn(signal_to(shutdown.clone()));
    if let Some(port) = args.metrics_port {
        let stop = shutdown.clone();
        let addr = crate::metrics_http::serve(
            SocketAddr::from(([0, 0, 0, 0], port)),
            metrics.registry.clone(),
            async move { stop.cancelled().await },
        )
        .await?;
        println!("turbine: metrics on http://{addr}/metrics");
    }
    for _ in 0..min {
        connector.start()?;
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .context("building the HTTP client")?;
    let mut last = scrape(&http, &frontend).await.unwrap_or_default();
    let mut last_at = Instant::now();
    let mut ticks = tokio::time::interval(fast);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    println!("turbine: planner running");
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        connector.poll()?;
        let counters = match scrape(&http, &frontend).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the frontend's metrics: no decision this tick");
                continue;
            }
        };
        let window = last_at.elapsed();
        let mut obs = counters.since(&last, window);
        (last, last_at) = (counters, Instant::now());
        let mut workers = Vec::new();
        for (mut w, url) in connector.observe() {
            if let (Some(url), true) = (url, w.is_ready()) {
                match http.get(url).send().await {
                    Ok(r) => match r.text().await {
                        Ok(text) => worker_load(&text, &mut w),
                        Err(e) => tracing::debug!(worker = w.id, error = %e, "cannot read a worker's metrics"),
                    },
                    Err(e) => tracing::debug!(worker = w.id, error = %e, "cannot read a worker's metrics"),
                }
            }
            workers.push(w);
        }
        let pool = PoolObservation { workers };
        let alive = pool.workers.len() as f64;
        metrics
            .worker_seconds
            .with_label_values(&["aggregated"])
            .inc_by(alive * window.as_secs_f64());
        for (state_name, n) in [
            ("starting", pool.starting()),
            ("ready", pool.ready()),
            ("draining", pool.draining()),
        ] {
            metrics
                .replicas
                .with_label_values(&["aggregated", state_name])
                .set(i64::from(n));
        }
        obs.pools.insert(PoolKind::Aggregated, pool);
        let decision = decide(&mut state, &obs, epoch.elapsed());
        apply(&decision, &mut connector)?;
        if let Some(t) = decision.targets.get(&PoolKind::Aggregated) {
            metrics
                .replicas
                .with_label_values(&["aggregated", "target"])
                .set(i64::from(t.replicas));
        }
        if decision.changes() {
            for (pool, t) in &decision.targets {
                metrics
                    .drains
                    .with_label_values(&[pool.as_str()])
                    .inc_by(t.drain.len() as u64);
                if t.replicas != t.current {
                    metrics
                        .decisions
                        .with_label_values(&[pool.as_str(), &t.reason.to_string()])
                        .inc();
                }
            }
            println!("turbine: planner decision {}", decision_json(&decision));
        }
    }
    tracing::info!("stopping: draining every worker");
    connector.shutdown().await;
    let s = connector.stats();
    println!(
        "turbine: planner stopped {}",
        serde_json::json!({"started": s.started, "drained": s.drained, "restarted": s.restarted, "cancelled": s.cancelled})
    );
    Ok(())
}

async fn scrape(http: &reqwest::Client, frontend: &str) -> anyhow::Result<FrontendCounters> {
    let text = http
        .get(format!("{frontend}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    Ok(FrontendCounters::read(&text))
}

/// Starts what a pool lacks, drains what it has too many of, kills stuck starts.
fn apply(decision: &Decision, connector: &mut LocalConnector) -> anyhow::Result<()> {
    for &(_, id) in &decision.cancel {
        connector.cancel(id);
    }
    for target in decision.targets.values() {
        for _ in target.current..target.replicas {
            connector.start()?;
        }
        for &id in &target.drain {
            connector.drain(id);
        }
    }
    Ok(())
}
