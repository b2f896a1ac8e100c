//! What simulated load costs: one process hosting many mocker workers, each with many
//! running sequences, its outputs consumed through the request plane as a frontend would.
//! Engines, workers and consumers share one runtime, as in `turbine serve`. The engines'
//! own cost is their busy time (work done between waiting out simulated steps), printed
//! beside the whole process's CPU time, as shares of one core over the measurement window;
//! the workers' and consumers' part is what a router benchmark pays for in any case. The
//! share of the timing model's schedule kept tells a mocker that is cheap but late (its
//! steps delayed by a busy runtime) from one that keeps up.
//!
//! `cargo bench -p turbine-worker --bench mocker_cost [-- WORKERS SEQS SPEEDUP SECONDS]`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use turbine_engine::{Engine, MockerConfig, MockerEngine};
use turbine_protocols::{EngineOutput, ModelCard, PreprocessedRequest, StopConditions, TokenizerKind};
use turbine_runtime::{EndpointId, MemoryDiscovery, MemoryEventPlane, Runtime, ServeOptions};
use turbine_worker::{Worker, WorkerConfig};

// The allocator of `turbine serve`: outputs allocate their token vectors, and the
// allocator's cost is part of what a serving process pays.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// CPU seconds this process has used so far, from its `stat` file.
fn cpu_seconds(stat_path: &str) -> f64 {
    let stat = std::fs::read_to_string(stat_path).expect("stat file");
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    // Linux reports in USER_HZ, 100 on every mainstream configuration.
    ticks / 100.0
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let arg = |i: usize, default: f64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (workers, seqs) = (arg(0, 32.0) as usize, arg(1, 128.0) as usize);
    let (speedup, seconds) = (arg(2, 10.0), arg(3, 10.0));

    let threads = std::env::var("TURBINE_BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let runtime = Runtime::new(Arc::new(MemoryDiscovery::new()), Arc::new(MemoryEventPlane::new()));
        let prompt_len = 256;
        let max_tokens = 100_000;
        // Room for every sequence to grow for the whole run without preemption.
        let num_blocks = seqs * (prompt_len + 4000) / 16;
        // One counter per consumer, each with one writer: a shared counter would cost the
        // harness a locked add per token, charged to what it measures.
        let mut counters = Vec::new();
        let mut running = Vec::new();
        let mut hosted = Vec::new();
        let mut engines = Vec::new();
        for w in 0..workers {
            let config = MockerConfig { speedup, num_blocks, seed: w as u64, ..Default::default() };
            let engine = MockerEngine::start(config).expect("valid mocker");
            engines.push(engine.clone());
            let config = WorkerConfig {
                endpoint: EndpointId::new("bench", "worker", "generate"),
                model: ModelCard { name: "mocker".into(), context_length: 1 << 20, tokenizer: TokenizerKind::Bytes, kv_block_size: Some(16), timing: None },
                serve: ServeOptions::default(),
                load_report_interval: Duration::from_millis(100),
                disagg: None,
            };
            let worker = Worker::start(&runtime, Arc::new(engine) as Arc<dyn Engine>, config).await.expect("worker");
            let client = runtime.client::<PreprocessedRequest, EngineOutput>();
            for s in 0..seqs {
                let request = PreprocessedRequest {
                    request_id: format!("{w}-{s}"),
                    model: "mocker".into(),
                    // Distinct prompts: no prefix sharing, every sequence pays its prefill.
                    token_ids: (0..prompt_len as u32).map(|t| t + (w * seqs + s) as u32 * 1000).collect(),
                    stop: StopConditions { max_tokens: Some(max_tokens), stop_token_ids: vec![] }, sampling: Default::default(),
                    disagg: None,
                };
                let mut stream = client.call(worker.instance(), request).await.expect("accepted");
                let count = Arc::new(AtomicU64::new(0));
                counters.push(count.clone());
                running.push(tokio::spawn(async move {
                    while let Some(Ok(out)) = stream.next().await {
                        count.store(count.load(Ordering::Relaxed) + out.token_ids.len() as u64, Ordering::Relaxed);
                    }
                }));
            }
            hosted.push(worker);
        }

        // Let every prefill finish before measuring the steady decode state.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let busy = |engines: &[MockerEngine]| engines.iter().map(|e| e.busy_time().as_secs_f64()).sum::<f64>();
        let simulated = |engines: &[MockerEngine]| engines.iter().map(|e| e.simulated_time().as_secs_f64()).sum::<f64>();
        let (cpu0, eng0, sim0) = (cpu_seconds("/proc/self/stat"), busy(&engines), simulated(&engines));
        let tokens = || counters.iter().map(|c| c.load(Ordering::Relaxed)).sum::<u64>();
        let (tokens0, t0) = (tokens(), Instant::now());
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        let (cpu1, eng1, sim1) = (cpu_seconds("/proc/self/stat"), busy(&engines), simulated(&engines));
        let (tokens1, wall) = (tokens(), t0.elapsed().as_secs_f64());
        let (all, engine) = ((cpu1 - cpu0) / wall, (eng1 - eng0) / wall);
        let rate = (tokens1 - tokens0) as f64 / wall;
        // Every engine is busy throughout, so on schedule its steps fill the wall time.
        let on_schedule = (sim1 - sim0) / (wall * workers as f64);
        let per_token = |share: f64| share / rate.max(1.0) * 1e6;
        println!("mocker_cost: {workers} workers x {seqs} sequences, speedup {speedup}, {threads} runtime thread(s), {wall:.1} s measured");
        println!("  mocker engines (busy time): {:.1}% of one core", engine * 100.0);
        println!("  whole process, with workers and consumers: {:.1}% of one core", all * 100.0);
        println!("  tokens generated and consumed: {rate:.0}/s ({:.0}/s per worker)", rate / workers as f64);
        println!("  simulated step time per wall time: {:.0}% of the schedule", on_schedule * 100.0);
        println!("  CPU per token: {:.2} us in the engines, {:.2} us in all", per_token(engine), per_token(all));
        for r in running {
            r.abort();
        }
        drop(hosted);
    });
}
