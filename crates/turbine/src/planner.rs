//! `turbine planner simulate` (the planner against static fleets of mocker replicas, in
//! simulated time, on a trace or a synthetic load) and `turbine profile` (the capacity
//! tables the planner sizes replicas by).

mod http_profile;
pub(crate) mod in_process;
mod kubernetes;
mod local;
mod replica;
pub(crate) mod run;
mod scrape;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use turbine_engine::MockerConfig;
use turbine_planner::profile::{profile, Sweep};
use turbine_planner::sim::{simulate, Controller, SimConfig, SimReport, SimRequest};
use turbine_planner::{need_for, CapacityModel, PlannerConfig, PlannerState, PoolConfig, PoolKind, PredictorKind, Sla};

use replica::MockerReplica;

#[derive(Debug, Args)]
pub struct PlannerCmd {
    #[command(subcommand)]
    command: PlannerSub,
}

#[derive(Debug, Subcommand)]
enum PlannerSub {
    /// Replay a trace (or a synthetic load) on simulated mocker replicas sized by the planner,
    /// and by static fleets in the same run; print SLO attainment and worker-seconds.
    Simulate(SimulateArgs),
    /// Scale a pool of real workers: read the frontend's and the workers' metrics, decide,
    /// start and drain `turbine worker` processes on this machine.
    Run(run::RunArgs),
}

/// The simulated replicas: mocker engines.
#[derive(Debug, Args)]
struct MockerArgs {
    /// Divides every simulated step's duration (below 1: a slower model or GPU).
    #[arg(long, default_value_t = 1.0)]
    engine_speedup: f64,
    /// KV blocks of 16 tokens per replica.
    #[arg(long, default_value_t = 16384)]
    num_blocks: usize,
}

impl MockerArgs {
    fn config(&self) -> anyhow::Result<MockerConfig> {
        let config = MockerConfig {
            speedup: self.engine_speedup,
            num_blocks: self.num_blocks,
            ..MockerConfig::default()
        };
        config.validate().context("mocker")?;
        Ok(config)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Load {
    /// The trace given with --trace.
    Trace,
    /// --rate requests a second, times --factor from --step-at-s on.
    Step,
    /// --rate requests a second throughout.
    Constant,
    /// --rate for --busy-s, then nothing until --duration-s.
    Idle,
}

#[derive(Debug, Args)]
struct SimulateArgs {
    #[arg(long, value_enum, default_value = "trace")]
    load: Load,
    /// Azure CSV or Mooncake JSONL trace (with --load trace).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Scales trace timestamps (0.5 replays twice as fast).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Only the trace's first this many seconds (after scaling).
    #[arg(long)]
    limit_s: Option<f64>,
    /// Synthetic loads: requests a second, prompt and output tokens, length in seconds.
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
    /// Instead of --rate: the rate at which the capacity model needs exactly this many
    /// replicas (a load on a size boundary).
    #[arg(long, conflicts_with = "rate")]
    rate_for_replicas: Option<u32>,
    #[arg(long, default_value_t = 2048)]
    isl: u32,
    #[arg(long, default_value_t = 32)]
    osl: u32,
    #[arg(long, default_value_t = 1200.0)]
    duration_s: f64,
    #[arg(long, default_value_t = 4.0)]
    factor: f64,
    #[arg(long, default_value_t = 300.0)]
    step_at_s: f64,
    #[arg(long, default_value_t = 300.0)]
    busy_s: f64,
    #[command(flatten)]
    mocker: MockerArgs,
    /// Seconds from a replica's start to its first request; several values sweep it.
    #[arg(long, value_delimiter = ',', default_value = "30")]
    startup_s: Vec<f64>,
    #[arg(long, default_value_t = 30.0)]
    drain_deadline_s: f64,
    #[command(flatten)]
    planner: PlannerArgs,
    /// Also run static fleets of these sizes [default: the planner's mean size, rounded
    /// (static-average), and its peak size (static-peak), from its first run].
    #[arg(long, value_delimiter = ',')]
    static_sizes: Option<Vec<u32>>,
    /// Attainment is also reported per window of this many seconds (for recovery times).
    #[arg(long, default_value_t = 10.0)]
    window_s: f64,
    /// Write every run's report here as JSON lines.
    #[arg(long)]
    output: Option<PathBuf>,
}

/// The planner's settings, as `turbine planner` and `turbine serve --planner` take them.
#[derive(Debug, Args)]
pub struct PlannerArgs {
    /// Replicas of the aggregated pool.
    #[arg(long, default_value_t = 1)]
    min: u32,
    #[arg(long, default_value_t = 16)]
    max: u32,
    /// Disaggregated serving instead: replicas of the prefill pool and of the decode pool
    /// (both pools are needed; a bound left out is 1 for a minimum and --max for a maximum).
    #[arg(long)]
    prefill_min: Option<u32>,
    #[arg(long)]
    prefill_max: Option<u32>,
    #[arg(long)]
    decode_min: Option<u32>,
    #[arg(long)]
    decode_max: Option<u32>,
    /// Most total replicas at once, starting and draining ones included.
    #[arg(long)]
    budget: Option<f64>,
    #[arg(long, default_value_t = 2000)]
    ttft_ms: u64,
    #[arg(long, default_value_t = 100)]
    itl_ms: u64,
    #[arg(long, default_value_t = 1.0)]
    fast_interval_s: f64,
    #[arg(long, default_value_t = 30.0)]
    slow_interval_s: f64,
    #[arg(long, default_value_t = 20.0)]
    stabilization_s: f64,
    #[arg(long, default_value_t = 60.0)]
    idle_s: f64,
    #[arg(long, default_value_t = 600.0)]
    start_timeout_s: f64,
    /// constant, ewma, holt or kalman.
    #[arg(long, default_value = "holt")]
    predictor: String,
    /// The share of a replica's capacity the planner sizes pools to use (0 to 1): lower
    /// keeps more room for a burst's first seconds, at the price of more replicas.
    #[arg(long, default_value_t = 0.8)]
    target_utilization: f64,
    /// A capacity model written by `turbine profile` [default: profile the simulated replica].
    #[arg(long)]
    profile: Option<PathBuf>,
}

fn seconds(name: &str, value: f64) -> anyhow::Result<Duration> {
    if !value.is_finite() || value < 0.0 {
        bail!("--{name} must be a number of seconds >= 0, got {value}");
    }
    Ok(Duration::from_secs_f64(value))
}

impl PlannerArgs {
    pub fn config(&self) -> anyhow::Result<PlannerConfig> {
        let Some(predictor) = PredictorKind::parse(&self.predictor) else {
            bail!(
                "--predictor must be constant, ewma, holt or kalman, got {:?}",
                self.predictor
            );
        };
        let pool = |min: Option<u32>, max: Option<u32>| {
            (min.is_some() || max.is_some()).then(|| PoolConfig {
                min: min.unwrap_or(1),
                max: max.unwrap_or(self.max),
                cost: 1.0,
            })
        };
        let disaggregated = [
            (PoolKind::Prefill, pool(self.prefill_min, self.prefill_max)),
            (PoolKind::Decode, pool(self.decode_min, self.decode_max)),
        ];
        let pools: std::collections::BTreeMap<PoolKind, PoolConfig> = if disaggregated.iter().any(|(_, p)| p.is_some())
        {
            disaggregated.into_iter().filter_map(|(k, p)| Some((k, p?))).collect()
        } else {
            pool(Some(self.min), Some(self.max))
                .map(|p| (PoolKind::Aggregated, p))
                .into_iter()
                .collect()
        };
        let config = PlannerConfig {
            pools,
            budget: self.budget,
            sla: Sla {
                ttft: Duration::from_millis(self.ttft_ms),
                itl: Duration::from_millis(self.itl_ms),
            },
            fast_interval: seconds("fast-interval-s", self.fast_interval_s)?,
            slow_interval: seconds("slow-interval-s", self.slow_interval_s)?,
            stabilization: seconds("stabilization-s", self.stabilization_s)?,
            idle_after: seconds("idle-s", self.idle_s)?,
            start_timeout: seconds("start-timeout-s", self.start_timeout_s)?,
            predictor,
            target_utilization: self.target_utilization,
            ..PlannerConfig::default()
        };
        config.validate()?;
        Ok(config)
    }

    /// The capacity model: `--profile`'s, else one profiled from the mocker `mocker`.
    pub(crate) fn model(&self, mocker: &MockerConfig) -> anyhow::Result<CapacityModel> {
        match self.model_file()? {
            Some(model) => Ok(model),
            None => Ok(profile_mocker(mocker, &Sweep::default()).validated()?),
        }
    }

    /// The capacity model `--profile` names, if it names one.
    pub(crate) fn model_file(&self) -> anyhow::Result<Option<CapacityModel>> {
        let Some(path) = &self.profile else { return Ok(None) };
        let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        let model: CapacityModel =
            serde_json::from_str(&text).with_context(|| format!("{}: not a capacity model", path.display()))?;
        Ok(Some(model.validated().with_context(|| format!("{}", path.display()))?))
    }
}

#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// What to profile: the mocker in simulated time, or (with --url) a running server.
    #[arg(long, default_value = "mocker")]
    engine: String,
    /// Profile the replica serving this OpenAI-compatible endpoint, over HTTP, in real time.
    #[arg(long)]
    url: Option<String>,
    /// With --url: prompts queued at once to measure saturated prefill, and tokens each
    /// decode request generates.
    #[arg(long)]
    saturation: Option<u32>,
    #[arg(long)]
    decode_tokens: Option<u32>,
    /// With --url: the server's sequence cap and KV tokens [default: the largest
    /// concurrency swept, and that times the largest context].
    #[arg(long)]
    max_concurrency: Option<u32>,
    #[arg(long)]
    kv_tokens: Option<u64>,
    #[command(flatten)]
    mocker: MockerArgs,
    /// Prompt lengths of the prefill table.
    #[arg(long, value_delimiter = ',')]
    isl: Option<Vec<u32>>,
    /// Contexts and concurrencies of the decode grid.
    #[arg(long, value_delimiter = ',')]
    context: Option<Vec<u32>>,
    #[arg(long, value_delimiter = ',')]
    concurrency: Option<Vec<u32>>,
    /// Where to write the capacity model (JSON) [default: stdout].
    #[arg(long)]
    output: Option<PathBuf>,
}

pub async fn profile_cmd(args: ProfileArgs) -> anyhow::Result<()> {
    if args.engine != "mocker" && args.url.is_none() {
        bail!(
            "--engine {:?}: only the mocker is profiled in simulated time; give --url to profile a running server",
            args.engine
        );
    }
    let mut sweep = Sweep::default();
    for (name, given, into) in [
        ("isl", &args.isl, &mut sweep.isls),
        ("context", &args.context, &mut sweep.contexts),
        ("concurrency", &args.concurrency, &mut sweep.concurrencies),
    ] {
        if let Some(values) = given {
            if values.is_empty() || values.contains(&0) {
                bail!("--{name} must list numbers above zero, got {values:?}");
            }
            *into = values.clone();
        }
    }
    for (name, given, into) in [
        ("saturation", args.saturation, &mut sweep.saturation),
        ("decode-tokens", args.decode_tokens, &mut sweep.decode_tokens),
    ] {
        match given {
            Some(0) => bail!("--{name} must be at least 1, got 0"),
            Some(n) => *into = n,
            None => {}
        }
    }
    let model = match &args.url {
        Some(url) => {
            let widest = sweep.concurrencies.iter().copied().max().unwrap_or(1);
            let longest = sweep.contexts.iter().copied().max().unwrap_or(1);
            let max_concurrency = args.max_concurrency.unwrap_or(widest);
            let kv_tokens = args
                .kv_tokens
                .unwrap_or(u64::from(widest) * (u64::from(longest) + u64::from(sweep.decode_tokens)));
            http_profile::profile(url, &sweep, max_concurrency, kv_tokens).await?
        }
        None => profile_mocker(&args.mocker.config()?, &sweep),
    };
    let model = model.validated()?;
    let json = serde_json::to_string_pretty(&model)?;
    match &args.output {
        Some(path) => std::fs::write(path, json + "\n").with_context(|| format!("{}", path.display()))?,
        None => println!("{json}"),
    }
    Ok(())
}

fn profile_mocker(config: &MockerConfig, sweep: &Sweep) -> CapacityModel {
    let name = format!(
        "mocker (speedup {}, {} blocks of {})",
        config.speedup, config.num_blocks, config.block_size
    );
    let kv_tokens = (config.num_blocks * config.block_size) as u64;
    profile(&name, sweep, config.max_num_seqs as u32, kv_tokens, || {
        MockerReplica::new(config)
    })
}

pub async fn run(cmd: PlannerCmd) -> anyhow::Result<()> {
    match cmd.command {
        PlannerSub::Simulate(args) => simulate_cmd(args),
        PlannerSub::Run(args) => run::run(args).await,
    }
}

fn synthetic(args: &SimulateArgs, config: &PlannerConfig, model: &CapacityModel) -> anyhow::Result<Vec<SimRequest>> {
    let rate = match args.rate_for_replicas {
        Some(0) => bail!("--rate-for-replicas must be at least 1, got 0"),
        Some(n) => {
            let (isl, osl) = (f64::from(args.isl), f64::from(args.osl));
            f64::from(n) / need_for(config, model, PoolKind::Aggregated, 1.0, isl, osl)
        }
        None => args.rate,
    };
    if !(rate.is_finite() && rate > 0.0) {
        bail!("--rate must be a positive number of requests a second, got {rate}");
    }
    let rate_at = |t: f64| match args.load {
        Load::Step if t >= args.step_at_s => rate * args.factor,
        Load::Idle if t >= args.busy_s => 0.0,
        _ => rate,
    };
    // Evenly spaced: a load the planner can be judged on without arrival noise.
    let mut out = Vec::new();
    let mut t = 0.0;
    while t < args.duration_s {
        let rate = rate_at(t);
        if rate <= 0.0 {
            break;
        }
        out.push(SimRequest {
            arrival: Duration::from_secs_f64(t),
            isl: args.isl.max(1),
            osl: args.osl.max(1),
        });
        t += 1.0 / rate;
    }
    Ok(out)
}

fn load_trace(args: &SimulateArgs) -> anyhow::Result<Vec<SimRequest>> {
    let Some(path) = &args.trace else {
        bail!("--load trace needs --trace FILE");
    };
    if !(args.time_scale.is_finite() && args.time_scale > 0.0) {
        bail!("--time-scale must be a positive number, got {}", args.time_scale);
    }
    let trace = turbine_bench::Trace::load(path).with_context(|| format!("{}", path.display()))?;
    let limit = args.limit_s.map(Duration::from_secs_f64);
    Ok(trace
        .requests
        .iter()
        .map(|r| SimRequest {
            arrival: r.at.mul_f64(args.time_scale),
            isl: r.input_length.max(1),
            osl: r.output_length.max(1),
        })
        .filter(|r| limit.is_none_or(|l| r.arrival <= l))
        .collect())
}

struct Row {
    name: String,
    startup: Duration,
    report: SimReport,
}

fn simulate_cmd(args: SimulateArgs) -> anyhow::Result<()> {
    let mocker = args.mocker.config()?;
    let config = args.planner.config()?;
    let model = args.planner.model(&mocker)?;
    let trace = match args.load {
        Load::Trace => load_trace(&args)?,
        _ => synthetic(&args, &config, &model)?,
    };
    if trace.is_empty() {
        bail!("the load has no requests");
    }
    let mut startups = Vec::new();
    for &s in &args.startup_s {
        startups.push(seconds("startup-s", s)?);
    }
    let sim = |startup: Duration| SimConfig {
        startup,
        drain_deadline: Duration::from_secs_f64(args.drain_deadline_s.max(0.0)),
        ttft_target: config.sla.ttft,
        itl_target: config.sla.itl,
        initial: config.pools[&PoolKind::Aggregated].min.max(1),
        window: Duration::from_secs_f64(args.window_s.max(1.0)),
        run_until: match args.load {
            Load::Trace => Duration::ZERO,
            _ => Duration::from_secs_f64(args.duration_s.max(0.0)),
        },
    };
    let make = || MockerReplica::new(&mocker);
    let mut rows = Vec::new();
    for &startup in &startups {
        let state = PlannerState::new(config.clone(), model.clone());
        let report = simulate(&trace, &sim(startup), Controller::Planner(Box::new(state)), make);
        rows.push(Row {
            name: "planner".into(),
            startup,
            report,
        });
    }
    let sizes = match &args.static_sizes {
        Some(sizes) => sizes.iter().map(|&n| (format!("static-{n}"), n)).collect(),
        None => {
            // Static fleets sized from the planner's own run: its mean size, and its peak.
            let mean = rows[0].report.mean_replicas().round().max(1.0) as u32;
            let peak = rows[0].report.peak_replicas.max(1);
            vec![
                (format!("static-average ({mean})"), mean),
                (format!("static-peak ({peak})"), peak),
            ]
        }
    };
    for (name, n) in sizes {
        let report = simulate(&trace, &sim(startups[0]), Controller::Static(n), make);
        rows.push(Row {
            name,
            startup: startups[0],
            report,
        });
    }
    print_rows(&rows, &trace, &config);
    if let Some(path) = &args.output {
        let mut out = String::new();
        for row in &rows {
            out += &serde_json::to_string(&report_json(row))?;
            out.push('\n');
        }
        std::fs::write(path, out).with_context(|| format!("{}", path.display()))?;
    }
    Ok(())
}

fn print_rows(rows: &[Row], trace: &[SimRequest], config: &PlannerConfig) {
    let span = trace.last().map_or(0.0, |r| r.arrival.as_secs_f64());
    println!(
        "{} requests over {:.0} s; SLO: TTFT <= {} ms and ITL <= {} ms",
        trace.len(),
        span,
        config.sla.ttft.as_millis(),
        config.sla.itl.as_millis()
    );
    println!(
        "{:<22} {:>9} {:>11} {:>11} {:>11} {:>11} {:>15} {:>10} {:>6} {:>5} {:>6} {:>9}",
        "fleet",
        "start-up",
        "attainment",
        "TTFT p50",
        "TTFT p90",
        "TTFT p99",
        "worker-seconds",
        "mean size",
        "peak",
        "ups",
        "downs",
        "migrated"
    );
    for row in rows {
        let r = &row.report;
        println!(
            "{:<22} {:>8.0}s {:>10.2}% {:>9.0}ms {:>9.0}ms {:>9.0}ms {:>15.0} {:>10.2} {:>6} {:>5} {:>6} {:>9}",
            row.name,
            row.startup.as_secs_f64(),
            r.attainment * 100.0,
            r.ttft_p50.as_secs_f64() * 1000.0,
            r.ttft_p90.as_secs_f64() * 1000.0,
            r.ttft_p99.as_secs_f64() * 1000.0,
            r.worker_seconds,
            r.mean_replicas(),
            r.peak_replicas,
            r.scale_ups,
            r.scale_downs,
            r.migrated
        );
        if r.unfinished > 0 || r.truncated > 0 {
            println!("  {} requests unfinished, {} cut short", r.unfinished, r.truncated);
        }
    }
}

fn report_json(row: &Row) -> serde_json::Value {
    let r = &row.report;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    serde_json::json!({
        "fleet": row.name,
        "startup_s": row.startup.as_secs_f64(),
        "requests": r.requests,
        "attainment": r.attainment,
        "ttft_p50_ms": ms(r.ttft_p50),
        "ttft_p90_ms": ms(r.ttft_p90),
        "ttft_p99_ms": ms(r.ttft_p99),
        "worker_seconds": r.worker_seconds,
        "mean_replicas": r.mean_replicas(),
        "peak_replicas": r.peak_replicas,
        "scale_ups": r.scale_ups,
        "scale_downs": r.scale_downs,
        "migrated": r.migrated,
        "unfinished": r.unfinished,
        "truncated": r.truncated,
        "sizes": r.sizes.iter().map(|(t, n)| (t.as_secs_f64(), n)).collect::<Vec<_>>(),
        "windows": r.windows.iter().map(|(t, a)| (t.as_secs_f64(), a)).collect::<Vec<_>>(),
        "decisions": r.decisions.iter().map(decision_json).collect::<Vec<_>>(),
    })
}

/// One decision as JSON: what `planner run` prints and `planner simulate --output` keeps.
fn decision_json(d: &turbine_planner::Decision) -> serde_json::Value {
    let ms = |t: Duration| t.as_secs_f64() * 1000.0;
    serde_json::json!({
        "t": d.now.as_secs_f64(),
        "predicted_rate": d.predicted_rate,
        "predicted_isl": d.predicted_isl,
        "predicted_osl": d.predicted_osl,
        "cancel": d.cancel.iter().map(|(_, id)| id).collect::<Vec<_>>(),
        "targets": d.targets.iter().map(|(k, t)| serde_json::json!({
            "pool": k.as_str(),
            "current": t.current,
            "target": t.replicas,
            "reason": t.reason.to_string(),
            "need_now": t.need_now,
            "need_forecast": t.need_forecast,
            "est_ttft_ms": ms(t.est_ttft),
            "est_itl_ms": ms(t.est_itl),
            "drain": t.drain,
        })).collect::<Vec<_>>(),
    })
}

/// A prompt of `len` tokens that no other request shares (the Azure traces carry lengths
/// only, and a profile must not be served from a cache): request `id`'s own blocks of
/// `turbine-bench`'s deterministic tokens, ids every vocabulary takes as ordinary tokens.
fn own_prompt(id: u64, len: u32) -> Vec<u32> {
    const BLOCK: u32 = 64;
    let tokens = turbine_bench::tokens::BlockTokens::new(BLOCK, 32..256, 0);
    let ids: Vec<u64> = (0..u64::from(len.max(1).div_ceil(BLOCK)))
        .map(|b| (id << 24) | b)
        .collect();
    tokens.prompt(&ids, len.max(1))
}
