//! `turbine frontend` and `turbine worker`: one part of a deployment per process, finding
//! each other through etcd and talking over the TCP request plane.
//!
//! Events (KV cache changes, load reports, router sync) travel over NATS when `--events` names
//! a server; without one they stay inside each process, and a frontend routes `kv` on its
//! own predictions (approximate mode).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use tokio_util::sync::CancellationToken;
use turbine_frontend::Frontend;
use turbine_runtime::{
    Discovery, EndpointId, EtcdDiscovery, EtcdOptions, EventPlane, MemoryEventPlane, NatsEventPlane, NatsOptions,
    Runtime, ServeOptions, TransportOptions,
};
use turbine_worker::{Worker, WorkerConfig};

use crate::args::{signal_to, EngineArgs, EngineSetup, FrontendArgs, TransferArgs};

/// Where the processes of one deployment meet.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// Discovery backend: `etcd://HOST:PORT`, several etcd members separated by commas.
    #[arg(long)]
    discovery: String,
    /// Event plane for KV events, load reports and router sync: `nats://HOST:PORT`
    /// [default: none; events stay in the process and `kv` routing predicts caches].
    #[arg(long)]
    events: Option<String>,
    /// Deployments sharing one etcd are kept apart by namespace.
    #[arg(long, default_value = "turbine")]
    namespace: String,
    /// Seconds in-flight requests may run on after SIGINT or SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30)]
    grace_period_secs: u64,
}

/// Validated [`ClusterArgs`].
#[derive(Debug)]
struct Cluster {
    etcd: Vec<String>,
    nats: Option<String>,
    namespace: String,
    grace_period: Duration,
}

impl TryFrom<ClusterArgs> for Cluster {
    type Error = anyhow::Error;

    fn try_from(a: ClusterArgs) -> anyhow::Result<Self> {
        let Some(members) = a.discovery.strip_prefix("etcd://") else {
            bail!(
                "--discovery must be etcd://HOST:PORT[,HOST:PORT...], got {:?}",
                a.discovery
            );
        };
        let etcd: Vec<String> = members.split(',').map(|m| format!("http://{m}")).collect();
        if members.split(',').any(|m| {
            m.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        }) {
            bail!("--discovery members must be HOST:PORT, got {:?}", a.discovery);
        }
        if let Some(events) = &a.events {
            let valid = events
                .strip_prefix("nats://")
                .and_then(|m| m.rsplit_once(':'))
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !valid {
                bail!("--events must be nats://HOST:PORT, got {events:?}");
            }
        }
        if a.namespace.is_empty() || a.namespace.contains(['/', '.', ' ']) {
            bail!(
                "--namespace must be non-empty without '/', '.' or spaces, got {:?}",
                a.namespace
            );
        }
        Ok(Self {
            etcd,
            nats: a.events,
            namespace: a.namespace,
            grace_period: Duration::from_secs(a.grace_period_secs),
        })
    }
}

impl Cluster {
    async fn runtime(&self) -> anyhow::Result<Runtime> {
        let discovery = EtcdDiscovery::connect(&self.etcd, EtcdOptions::default())
            .await
            .with_context(|| format!("--discovery {}", self.etcd.join(",")))?;
        let events: Arc<dyn EventPlane> = match &self.nats {
            Some(url) => Arc::new(
                NatsEventPlane::connect(url, NatsOptions::default())
                    .await
                    .with_context(|| format!("--events {url}"))?,
            ),
            None => Arc::new(MemoryEventPlane::new()),
        };
        Ok(Runtime::new(Arc::new(discovery) as Arc<dyn Discovery>, events))
    }
}

#[derive(Debug, Args)]
pub struct FrontendCmdArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(flatten)]
    frontend: FrontendArgs,
}

pub async fn frontend(args: FrontendCmdArgs) -> anyhow::Result<()> {
    let cluster = Cluster::try_from(args.cluster)?;
    let (listen, mut config) = args.frontend.parse()?;
    config.namespace = cluster.namespace.clone();
    config.kv_events = cluster.nats.is_some();
    let runtime = cluster.runtime().await?;
    let frontend = Frontend::start(&runtime, config)
        .await
        .context("starting the frontend")?;
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_to(shutdown.clone()));
    crate::serve::serve_http(frontend, listen, shutdown, cluster.grace_period, Vec::new()).await
}

#[derive(Debug, Args)]
pub struct WorkerCmdArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    #[command(flatten)]
    engine: EngineArgs,
    /// Address the worker's request plane listens on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Address frontends reach the worker at [default: the listening address].
    #[arg(long)]
    advertise: Option<SocketAddr>,
    /// Seconds after the worker stops renewing its registration (a crash) before it disappears.
    #[arg(long, default_value_t = 10)]
    lease_ttl_secs: u64,
    /// What the worker does: prefill and decode its own requests, or one phase of
    /// disaggregated serving.
    #[arg(long, value_enum, default_value_t = RoleArg::Aggregated)]
    role: RoleArg,
    /// Serve the worker's Prometheus metrics (KV blocks, sequences, transfers) on this port
    /// of the `--listen` address, at `/metrics` (0 picks a free port) [default: not served].
    #[arg(long)]
    metrics_port: Option<u16>,
    #[command(flatten)]
    transfer: TransferArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    Aggregated,
    Prefill,
    Decode,
}

pub async fn worker(args: WorkerCmdArgs) -> anyhow::Result<()> {
    let cluster = Cluster::try_from(args.cluster)?;
    let mut engine = EngineSetup::try_from(args.engine)?;
    if args.lease_ttl_secs == 0 {
        bail!("--lease-ttl-secs must be at least 1, got 0");
    }
    if args.listen.ip().is_unspecified() && args.advertise.is_none() {
        bail!(
            "--listen {} needs --advertise: frontends cannot reach an unspecified address",
            args.listen
        );
    }
    let role = match args.role {
        RoleArg::Aggregated => turbine_protocols::WorkerRole::Aggregated,
        RoleArg::Prefill => turbine_protocols::WorkerRole::Prefill,
        RoleArg::Decode => turbine_protocols::WorkerRole::Decode,
    };
    let disagg = match role {
        turbine_protocols::WorkerRole::Aggregated => None,
        _ => Some(args.transfer.parse(role)?),
    };
    if engine.external_count().is_some_and(|n| n != 1) {
        bail!("turbine worker fronts one server: give --engine-url once");
    }
    if engine.external_count().is_some() && disagg.is_some() {
        bail!("--role: external engines serve aggregated only");
    }
    if engine.external_count().is_some() && args.metrics_port.is_some() {
        bail!("--metrics-port: an external server exports its own metrics; scrape it instead");
    }
    let runtime = cluster.runtime().await?;
    engine.connect().await?;
    let config = WorkerConfig {
        endpoint: EndpointId::new(cluster.namespace.clone(), "worker", "generate"),
        model: engine.model.clone(),
        serve: ServeOptions {
            transport: TransportOptions::Tcp {
                bind: args.listen,
                advertise: args.advertise,
            },
            lease_ttl: Duration::from_secs(args.lease_ttl_secs),
            grace_period: cluster.grace_period,
            ..ServeOptions::default()
        },
        load_report_interval: Duration::from_millis(100),
        disagg,
    };
    let shutdown = CancellationToken::new();
    if let Some(external) = engine.external_engines().first() {
        tokio::spawn(signal_to(shutdown.clone()));
        let model = engine.model.name.clone();
        crate::external::supervise(runtime, external.clone(), config, shutdown, move |w| {
            tracing::info!(model = %model, instance = %w.instance().id, "worker serving");
            println!("turbine: worker {} serving {model}", w.instance().id);
        })
        .await?;
        tracing::info!("stopped");
        return Ok(());
    }
    let worker = Worker::start(&runtime, engine.engine(0)?, config)
        .await
        .context("starting the worker")?;
    tracing::info!(model = %engine.model.name, instance = %worker.instance().id, "worker serving");
    if let Some(port) = args.metrics_port {
        let registry = prometheus::Registry::new();
        let collector = turbine_worker::WorkerMetrics::new(vec![worker.metrics_source()]).context("worker metrics")?;
        registry
            .register(Box::new(collector))
            .context("registering worker metrics")?;
        let stop = shutdown.clone();
        let addr = crate::metrics_http::serve(SocketAddr::new(args.listen.ip(), port), registry, async move {
            stop.cancelled().await
        })
        .await?;
        println!("turbine: metrics on http://{addr}/metrics");
    }
    // A machine-readable line for scripts and tests.
    println!("turbine: worker {} serving {}", worker.instance().id, engine.model.name);
    tokio::spawn(signal_to(shutdown.clone()));
    worker.run(async move { shutdown.cancelled().await }).await;
    tracing::info!("stopped");
    Ok(())
}
