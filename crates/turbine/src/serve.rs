//! `turbine serve`: a frontend and N workers in one process, sharing in-memory discovery
//! and events; workers are reached in-process or over loopback TCP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use tokio_util::sync::CancellationToken;
use turbine_frontend::{Frontend, FrontendConfig};
use turbine_runtime::{EndpointId, MemoryDiscovery, MemoryEventPlane, Runtime, ServeOptions, TransportOptions};
use turbine_worker::{Worker, WorkerConfig};

use turbine_protocols::WorkerRole;

use turbine_planner::{PlannerState, PoolKind};

use crate::args::{EngineArgs, EngineSetup, FrontendArgs, TransferArgs};
use crate::planner::in_process::InProcessConnector;
use crate::planner::run as planner_run;

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    frontend: FrontendArgs,
    /// Number of workers [default: 1 for the native engine, whose one worker batches all
    /// requests on all cores; 2 for the others].
    #[arg(long, conflicts_with_all = ["prefill_workers", "decode_workers"])]
    workers: Option<usize>,
    /// Size the pool of workers with the planner, between --min and --max, instead of a
    /// fixed --workers: it starts and drains workers in this process on the load the
    /// frontend sees. The planner flags below apply only with it.
    #[arg(long, conflicts_with_all = ["workers", "prefill_workers", "decode_workers"])]
    planner: bool,
    #[command(flatten, next_help_heading = "Planner (with --planner)")]
    planner_args: crate::planner::PlannerArgs,
    /// Disaggregated serving: workers that only prefill prompts (needs --decode-workers).
    #[arg(long, requires = "decode_workers")]
    prefill_workers: Option<usize>,
    /// Disaggregated serving: workers that decode, fetching prompts' KV from prefill workers.
    #[arg(long, requires = "prefill_workers")]
    decode_workers: Option<usize>,
    #[command(flatten)]
    transfer: TransferArgs,
    #[command(flatten)]
    engine: EngineArgs,
    /// How the frontend reaches the workers: in-process calls, or TCP on loopback as separate processes would.
    #[arg(long, value_enum, default_value_t = RequestPlane::Local)]
    request_plane: RequestPlane,
    /// Seconds in-flight requests may run on after SIGINT or SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30)]
    grace_period_secs: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RequestPlane {
    Local,
    Tcp,
}

/// Validated configuration for `serve`.
#[derive(Debug)]
pub struct ServeConfig {
    listen: SocketAddr,
    /// Each worker's role, in start order.
    roles: Vec<WorkerRole>,
    transfer: Option<turbine_worker::DisaggConfig>,
    engine: EngineSetup,
    worker_transport: TransportOptions,
    frontend: FrontendConfig,
    grace_period: Duration,
    /// Set with `--planner`: the pool is sized by the planner, starting at its minimum.
    planner: Option<(turbine_planner::PlannerConfig, turbine_planner::CapacityModel)>,
}

impl TryFrom<ServeArgs> for ServeConfig {
    type Error = anyhow::Error;

    fn try_from(a: ServeArgs) -> anyhow::Result<Self> {
        if a.workers == Some(0) {
            bail!("--workers must be at least 1, got 0");
        }
        let (listen, frontend) = a.frontend.parse()?;
        let engine: EngineSetup = a.engine.try_into()?;
        let planner = if a.planner {
            if engine.external_count().is_some() {
                bail!("--planner: external engines run one worker per server, which the planner cannot start");
            }
            let config = a.planner_args.config()?;
            if !config.pools.contains_key(&PoolKind::Aggregated) {
                bail!("--planner in turbine serve plans one aggregated pool (--min, --max), not --prefill-* or --decode-*");
            }
            let model = match engine.mocker_config() {
                Some(mocker) => a.planner_args.model(mocker)?,
                None => a.planner_args.model_file()?.context(
                    "--planner with this engine needs --profile FILE (write one with turbine profile --url)",
                )?,
            };
            Some((config, model))
        } else {
            None
        };
        let (roles, transfer) = match (a.prefill_workers, a.decode_workers) {
            (Some(_), Some(_)) if engine.external_count().is_some() => {
                bail!("--prefill-workers and --decode-workers: external engines serve aggregated only")
            }
            (Some(p), Some(d)) => {
                if p == 0 || d == 0 {
                    bail!("--prefill-workers and --decode-workers must each be at least 1, got {p} and {d}");
                }
                let mut roles = vec![WorkerRole::Prefill; p];
                roles.extend(std::iter::repeat_n(WorkerRole::Decode, d));
                (roles, Some(a.transfer.parse(WorkerRole::Prefill)?))
            }
            _ => {
                let n = match (engine.external_count(), a.workers) {
                    (Some(urls), Some(n)) if n != urls => {
                        bail!("--workers {n} with {urls} --engine-url: external engines run one worker per server")
                    }
                    (Some(urls), _) => urls,
                    (None, n) => n.unwrap_or(if engine.is_native() { 1 } else { 2 }),
                };
                let n = match &planner {
                    Some((config, _)) => config.pools[&PoolKind::Aggregated].min as usize,
                    None => n,
                };
                (vec![WorkerRole::Aggregated; n], None)
            }
        };
        let worker_transport = match a.request_plane {
            RequestPlane::Local => TransportOptions::Local,
            RequestPlane::Tcp => TransportOptions::Tcp {
                bind: SocketAddr::from(([127, 0, 0, 1], 0)),
                advertise: None,
            },
        };
        Ok(Self {
            listen,
            engine,
            roles,
            transfer,
            worker_transport,
            frontend,
            grace_period: Duration::from_secs(a.grace_period_secs),
            planner,
        })
    }
}

pub async fn run(config: ServeConfig) -> anyhow::Result<()> {
    let ServeConfig {
        listen,
        roles,
        transfer,
        mut engine,
        worker_transport,
        frontend: frontend_config,
        grace_period,
        planner,
    } = config;
    engine.connect().await?;
    let engine = Arc::new(engine);
    let runtime = Runtime::new(Arc::new(MemoryDiscovery::new()), Arc::new(MemoryEventPlane::new()));
    let shutdown = CancellationToken::new();
    tokio::spawn(crate::args::signal_to(shutdown.clone()));

    let endpoint = EndpointId::new(frontend_config.namespace.clone(), "worker", "generate");
    let worker_config = |role: WorkerRole| WorkerConfig {
        endpoint: endpoint.clone(),
        model: engine.model.clone(),
        serve: ServeOptions {
            transport: worker_transport.clone(),
            grace_period,
            ..ServeOptions::default()
        },
        load_report_interval: Duration::from_millis(100),
        disagg: transfer.clone().map(|t| turbine_worker::DisaggConfig { role, ..t }),
    };
    let mut workers = Vec::new();
    let mut sources = Vec::new();
    // With the planner its connector owns the pool, the minimum included.
    let fixed = if planner.is_some() { 0 } else { roles.len() };
    for (i, &role) in roles.iter().enumerate().take(fixed) {
        let worker_config = worker_config(role);
        if let Some(external) = engine.external_engines().get(i) {
            // No worker metrics here: an external server exports its own.
            let supervised = crate::external::supervise(
                runtime.clone(),
                external.clone(),
                worker_config,
                shutdown.clone(),
                |_| {},
            );
            workers.push(tokio::spawn(async move {
                if let Err(e) = supervised.await {
                    tracing::error!(error = %format!("{e:#}"), "worker stopped");
                }
            }));
            continue;
        }
        let worker = Worker::start(&runtime, engine.engine(i)?, worker_config)
            .await
            .context("starting a worker")?;
        sources.push(worker.metrics_source());
        let shutdown = shutdown.clone();
        workers.push(tokio::spawn(worker.run(async move { shutdown.cancelled().await })));
    }

    let frontend = Frontend::start(&runtime, frontend_config)
        .await
        .context("starting the frontend")?;
    let collector = turbine_worker::WorkerMetrics::new(sources).context("worker metrics")?;
    let metric_sources = collector.sources();
    frontend
        .register_metrics(Box::new(collector))
        .context("registering worker metrics")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    if let Some((planner, model)) = planner {
        let port = listener.local_addr().context("reading the listening address")?.port();
        let metrics = planner_run::Metrics::new()?;
        for c in metrics.collectors() {
            frontend
                .register_metrics(c)
                .context("registering the planner's metrics")?;
        }
        let epoch = std::time::Instant::now();
        let mut connector = InProcessConnector::new(
            runtime.clone(),
            Arc::clone(&engine),
            worker_config(WorkerRole::Aggregated),
            metric_sources,
            epoch,
        );
        for _ in 0..planner.pools[&PoolKind::Aggregated].min {
            connector.start();
        }
        let state = PlannerState::new(planner, model);
        let stop = shutdown.clone();
        workers.push(tokio::spawn(async move {
            let url = format!("http://127.0.0.1:{port}");
            let connectors = [(PoolKind::Aggregated, planner_run::Connector::InProcess(Box::new(connector)))].into();
            match planner_run::plan(connectors, state, &metrics, &url, epoch, stop).await {
                Ok(mut connectors) => {
                    let Some(planner_run::Connector::InProcess(mut c)) = connectors.remove(&PoolKind::Aggregated) else {
                        return;
                    };
                    c.shutdown(grace_period).await;
                    let s = c.stats();
                    println!(
                        "turbine: planner stopped {}",
                        serde_json::json!({"started": s.started, "drained": s.drained, "restarted": s.restarted, "cancelled": s.cancelled})
                    );
                }
                Err(e) => tracing::error!(error = %format!("{e:#}"), "the planner stopped"),
            }
        }));
    }
    tracing::info!(workers = roles.len(), ?roles, model = %engine.model.name, "starting");
    serve_on(frontend, listener, shutdown, grace_period, workers).await
}

/// Serves `frontend` on `listen` until `shutdown`, then drains it and `workers` together
/// within `grace_period`.
pub async fn serve_http(
    frontend: Frontend,
    listen: SocketAddr,
    shutdown: CancellationToken,
    grace_period: Duration,
    workers: Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    serve_on(frontend, listener, shutdown, grace_period, workers).await
}

/// [`serve_http`] on a listener already bound.
async fn serve_on(
    frontend: Frontend,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
    grace_period: Duration,
    workers: Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("reading the listening address")?;
    tracing::info!(%addr, "serving");
    // A machine-readable line for scripts and tests that start us on port 0.
    println!("turbine: listening on http://{addr}");

    let stop = shutdown.clone();
    let http = tokio::spawn(frontend.run(listener, async move { stop.cancelled().await }));
    shutdown.cancelled().await;
    tracing::info!(?grace_period, "shutting down: draining in-flight requests");

    // Workers and the frontend drain together; the frontend waits for its open responses,
    // which the workers finish within their own grace period.
    let drained = tokio::time::timeout(grace_period + Duration::from_secs(2), async {
        for w in workers {
            w.await.context("a worker task failed")?;
        }
        http.await.context("the HTTP task failed")?.context("HTTP server")
    })
    .await;
    match drained {
        Ok(result) => result?,
        Err(_) => tracing::warn!("grace period over with requests still open; exiting anyway"),
    }
    tracing::info!("stopped");
    Ok(())
}
