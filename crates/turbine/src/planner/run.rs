//! `turbine planner run`: the planner as a process. Every fast tick it reads the frontend's
//! and the workers' `/metrics`, decides, and has the connector carry the decision out;
//! every decision that changes something is printed as one JSON line and counted on its own
//! `/metrics`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use prometheus::{CounterVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio_util::sync::CancellationToken;
use turbine_planner::{decide, Decision, PlannerState, PoolKind, PoolObservation, WorkerObservation};

use super::in_process::InProcessConnector;
use super::kubernetes::{self, KubeConnector};
use super::local::LocalConnector;
use super::scrape::{worker_load, FrontendCounters};
use super::{decision_json, PlannerArgs};
use crate::args::signal_to;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The frontend whose `/metrics` show the load where requests arrive.
    #[arg(long)]
    frontend: String,
    /// Who starts and stops replicas: `local` runs `turbine worker` processes here;
    /// `kubernetes` scales a Deployment through the API server (behind `kubectl proxy`).
    #[arg(long, default_value = "local")]
    connector: String,
    /// Local: the `turbine worker` arguments of every replica, as one string split at
    /// spaces (each gets `--metrics-port 0` and `--grace-period-secs` added).
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    worker_args: String,
    /// Local, with disaggregated pools (--prefill-max, --decode-max): the arguments of the
    /// prefill pool's workers and of the decode pool's (each with its `--role`).
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    prefill_worker_args: String,
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    decode_worker_args: String,
    /// Kubernetes: the API server's URL, and the Deployment that is the pool.
    #[arg(long, default_value = "http://127.0.0.1:8001")]
    kube_api: String,
    #[arg(long, default_value = "default")]
    kube_namespace: String,
    #[arg(long, default_value = "")]
    kube_deployment: String,
    /// How long a replica drains before what it still runs is sent elsewhere, in seconds.
    #[arg(long, default_value_t = 30)]
    drain_deadline_s: u64,
    /// Serve the planner's own `/metrics` on this port (0 picks one).
    #[arg(long)]
    metrics_port: Option<u16>,
    #[command(flatten)]
    planner: PlannerArgs,
}

pub(crate) struct Metrics {
    registry: Registry,
    worker_seconds: CounterVec,
    replicas: IntGaugeVec,
    decisions: IntCounterVec,
    drains: IntCounterVec,
}

impl Metrics {
    /// The planner's metrics, for another registry (the frontend's, in `turbine serve`).
    pub(crate) fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.worker_seconds.clone()),
            Box::new(self.replicas.clone()),
            Box::new(self.decisions.clone()),
            Box::new(self.drains.clone()),
        ]
    }

    pub(crate) fn new() -> anyhow::Result<Self> {
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
    if !matches!(args.connector.as_str(), "local" | "kubernetes") {
        bail!("--connector must be local or kubernetes, got {:?}", args.connector);
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
    let drain_deadline = Duration::from_secs(args.drain_deadline_s.max(1));
    let epoch = Instant::now();
    let mut connectors = BTreeMap::new();
    for (&kind, pool) in &config.pools {
        let connector = match args.connector.as_str() {
            "local" => {
                let (flag, given) = match kind {
                    PoolKind::Aggregated => ("--worker-args", &args.worker_args),
                    PoolKind::Prefill => ("--prefill-worker-args", &args.prefill_worker_args),
                    PoolKind::Decode => ("--decode-worker-args", &args.decode_worker_args),
                };
                let worker_args: Vec<String> = given.split_whitespace().map(str::to_owned).collect();
                if worker_args.is_empty() {
                    bail!("--connector local needs {flag} (how to start a worker of the {kind} pool)");
                }
                let exe = std::env::current_exe().context("finding the turbine binary to start workers with")?;
                let mut local = LocalConnector::new(exe, worker_args, drain_deadline, epoch);
                for _ in 0..pool.min {
                    local.start()?;
                }
                Connector::Local(local)
            }
            "kubernetes" if kind == PoolKind::Aggregated => Connector::Kube(KubeConnector::new(
                &args.kube_api,
                &args.kube_namespace,
                &args.kube_deployment,
            )?),
            "kubernetes" => {
                bail!("--connector kubernetes scales one Deployment: plan one aggregated pool (--min, --max)")
            }
            other => bail!("--connector must be local or kubernetes, got {other:?}"),
        };
        connectors.insert(kind, connector);
    }
    let state = PlannerState::new(config, model);
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
    println!("turbine: planner running");
    let connectors = plan(connectors, state, &metrics, &frontend, epoch, shutdown).await?;
    tracing::info!("stopping");
    for (kind, connector) in connectors {
        if let Connector::Local(mut local) = connector {
            local.shutdown().await;
            let s = local.stats();
            println!(
                "turbine: planner stopped {}",
                serde_json::json!({"pool": kind.as_str(), "started": s.started, "drained": s.drained, "restarted": s.restarted, "cancelled": s.cancelled})
            );
        }
    }
    Ok(())
}

/// The planner's loop: every fast tick, reads the frontend's `/metrics` at `frontend` and
/// the pools' loads, decides, has each pool's connector carry its part out, and prints and
/// counts what changed. Ends at `shutdown`, giving the connectors back to be shut down.
pub(crate) async fn plan(
    mut connectors: BTreeMap<PoolKind, Connector>,
    mut state: PlannerState,
    metrics: &Metrics,
    frontend: &str,
    epoch: Instant,
    shutdown: CancellationToken,
) -> anyhow::Result<BTreeMap<PoolKind, Connector>> {
    let fast = state.config().fast_interval;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .context("building the HTTP client")?;
    let mut last = scrape(&http, frontend).await.unwrap_or_default();
    let mut last_at = Instant::now();
    let mut ticks = tokio::time::interval(fast);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let mut observed = BTreeMap::new();
        let mut failed = None;
        for (&kind, connector) in connectors.iter_mut() {
            match connector.observe(epoch.elapsed()).await {
                Ok(w) => {
                    observed.insert(kind, w);
                }
                Err(e) => failed = Some((kind, e)),
            }
        }
        if let Some((kind, e)) = failed {
            tracing::warn!(pool = %kind, error = %e, "cannot observe the pool: no decision this tick");
            continue;
        }
        let counters = match scrape(&http, frontend).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the frontend's metrics: no decision this tick");
                continue;
            }
        };
        let window = last_at.elapsed();
        let mut obs = counters.since(&last, window);
        (last, last_at) = (counters, Instant::now());
        for (kind, mut workers) in observed {
            for (w, url) in workers.iter_mut() {
                if let (Some(url), true) = (url.as_deref(), w.is_ready()) {
                    match http.get(url).send().await {
                        Ok(r) => match r.text().await {
                            Ok(text) => worker_load(&text, w),
                            Err(e) => tracing::debug!(worker = w.id, error = %e, "cannot read a worker's metrics"),
                        },
                        Err(e) => tracing::debug!(worker = w.id, error = %e, "cannot read a worker's metrics"),
                    }
                }
            }
            let workers = workers.into_iter().map(|(w, _)| w).collect();
            let pool = PoolObservation { workers };
            let label = kind.as_str();
            metrics
                .worker_seconds
                .with_label_values(&[label])
                .inc_by(pool.workers.len() as f64 * window.as_secs_f64());
            for (state_name, n) in [
                ("starting", pool.starting()),
                ("ready", pool.ready()),
                ("draining", pool.draining()),
            ] {
                metrics
                    .replicas
                    .with_label_values(&[label, state_name])
                    .set(i64::from(n));
            }
            obs.pools.insert(kind, pool);
        }
        let decision = decide(&mut state, &obs, epoch.elapsed());
        for (kind, connector) in connectors.iter_mut() {
            connector.apply(*kind, &decision).await?;
        }
        for (pool, t) in &decision.targets {
            metrics
                .replicas
                .with_label_values(&[pool.as_str(), "target"])
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
    Ok(connectors)
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

/// Where replicas come from.
pub(crate) enum Connector {
    Local(LocalConnector),
    Kube(KubeConnector),
    InProcess(Box<InProcessConnector>),
}

impl Connector {
    /// The pool now, with where each replica's metrics are (when known).
    async fn observe(&mut self, now: Duration) -> anyhow::Result<Vec<(WorkerObservation, Option<String>)>> {
        match self {
            Connector::Local(c) => {
                c.poll()?;
                Ok(c.observe()
                    .into_iter()
                    .map(|(w, url)| (w, url.map(str::to_owned)))
                    .collect())
            }
            Connector::Kube(c) => Ok(kubernetes::observe(c.replicas().await?, now)
                .into_iter()
                .map(|w| (w, None))
                .collect()),
            Connector::InProcess(c) => {
                c.poll();
                Ok(c.observe().into_iter().map(|w| (w, None)).collect())
            }
        }
    }

    /// Starts what pool `kind` lacks, drains what it has too many of, kills its stuck
    /// starts. A Deployment is only given its new size: Kubernetes picks and stops the pods.
    async fn apply(&mut self, kind: PoolKind, decision: &Decision) -> anyhow::Result<()> {
        let Some(target) = decision.targets.get(&kind) else {
            return Ok(());
        };
        let cancel = decision.cancel.iter().filter(|(k, _)| *k == kind).map(|&(_, id)| id);
        match self {
            Connector::Local(c) => {
                for id in cancel {
                    c.cancel(id);
                }
                for _ in target.current..target.replicas {
                    c.start()?;
                }
                for &id in &target.drain {
                    c.drain(id);
                }
            }
            Connector::Kube(c) => {
                if target.replicas != target.current {
                    c.scale(target.replicas).await?;
                }
            }
            Connector::InProcess(c) => {
                for id in cancel {
                    c.cancel(id);
                }
                for _ in target.current..target.replicas {
                    c.start();
                }
                for &id in &target.drain {
                    c.drain(id);
                }
            }
        }
        Ok(())
    }
}
