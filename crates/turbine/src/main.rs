//! The `turbine` command line: parses configuration once, builds the pieces, and runs them
//! until a signal asks it to stop.

mod args;
mod bench;
mod distributed;
mod external;
mod fetch;
mod kvbm_args;
mod metrics_http;
mod planner;
mod serve;

use clap::{Parser, Subcommand};

// The serving path allocates per request and per token (JSON, frames, strings); glibc's
// allocator was a sixth of the frontend's CPU time under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "turbine",
    version,
    about = "Distributed LLM inference serving: an OpenAI-compatible endpoint over a fleet of workers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a frontend and workers in one process, with in-memory discovery and no external services.
    Serve(serve::ServeArgs),
    /// Run an HTTP frontend that finds its workers through etcd.
    Frontend(distributed::FrontendCmdArgs),
    /// Run one worker that registers in etcd and serves frontends over TCP.
    Worker(distributed::WorkerCmdArgs),
    /// Load an OpenAI-compatible endpoint (Turbine, vLLM, SGLang) with a synthetic workload or a
    /// replayed trace and report TTFT, ITL, throughput, goodput and cache hits; or compare results.
    Bench(bench::BenchCmd),
    /// Inspect request traces.
    Trace(bench::TraceCmd),
    /// Autoscaling: simulate the planner against static fleets on a trace.
    Planner(planner::PlannerCmd),
    /// Measure an engine's TTFT and ITL tables (the planner's capacity model).
    Profile(planner::ProfileArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("turbine: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(args.try_into()?).await,
            Command::Frontend(args) => distributed::frontend(args).await,
            Command::Worker(args) => distributed::worker(args).await,
            Command::Bench(args) => bench::bench(args).await,
            Command::Trace(args) => bench::trace(args).await,
            Command::Planner(args) => planner::run(args).await,
            Command::Profile(args) => planner::profile_cmd(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("turbine: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr; `RUST_LOG` picks what is shown (default: info).
fn init_tracing() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
