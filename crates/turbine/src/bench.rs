//! `turbine bench` (load runs against any OpenAI-compatible endpoint, and comparisons of their
//! results) and `turbine trace analyze`: command-line settings parsed into turbine-bench's types.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use turbine_bench::report::{Meta, Sla};
use turbine_bench::tokens::BlockTokens;
use turbine_bench::workload::{ByteCodec, Lengths, Synthetic, TextCodec};
use turbine_bench::{Arrival, BenchResult, Client, Endpoint, RunConfig, Trace, Workload};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchCmd {
    #[command(subcommand)]
    command: Option<BenchSub>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum BenchSub {
    /// Print result files side by side, and optionally plot them on shared charts.
    Compare(CompareArgs),
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// Result files written by `turbine bench --output`.
    #[arg(required = true)]
    results: Vec<PathBuf>,
    /// Write ttft.svg and throughput.svg with one line per result here.
    #[arg(long)]
    plot_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum EndpointArg {
    Chat,
    Completions,
}

/// One load run.
#[derive(Debug, Args)]
struct RunArgs {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Model name to request [default: the first one the server lists].
    #[arg(long)]
    model: Option<String>,
    /// API to call [default: chat for multi-turn sessions, completions otherwise; token-id
    /// prompts (traces) need completions].
    #[arg(long, value_enum)]
    endpoint: Option<EndpointArg>,

    /// Replay this trace: Mooncake JSONL (hash ids of 512-token blocks) or Azure CSV (by
    /// extension). Prompts are sent as token ids so that shared hash ids share tokens exactly.
    #[arg(long, help_heading = "Workload")]
    trace: Option<PathBuf>,
    /// Synthetic prompt length in tokens (mean).
    #[arg(long, default_value_t = 512, help_heading = "Workload")]
    input_len: u32,
    #[arg(long, default_value_t = 0, help_heading = "Workload")]
    input_len_stddev: u32,
    /// Synthetic output length in tokens (mean); sent as max_tokens.
    #[arg(long, default_value_t = 128, help_heading = "Workload")]
    output_len: u32,
    #[arg(long, default_value_t = 0, help_heading = "Workload")]
    output_len_stddev: u32,
    /// Share of each synthetic prompt that is its prefix group's common prefix (0 to 1).
    #[arg(long, default_value_t = 0.0, help_heading = "Workload")]
    prefix_ratio: f64,
    /// Number of prefix groups sharing prefixes.
    #[arg(long, default_value_t = 1, help_heading = "Workload")]
    prefix_groups: u32,
    /// Turns per conversation; above 1, each turn sends the conversation so far plus a new
    /// user message of --input-len tokens (chat endpoint).
    #[arg(long, default_value_t = 1, help_heading = "Workload")]
    turns: u32,
    /// Pause between an answer and the conversation's next turn.
    #[arg(long, default_value_t = 0, help_heading = "Workload")]
    think_time_ms: u64,
    /// Token ids that prompts sent as ids are drawn from, `LO..HI`.
    #[arg(long, default_value = "32..256", value_parser = parse_range, help_heading = "Workload")]
    token_ids: Range<u32>,
    /// Tokenizer (GGUF file or Hugging Face directory) that sizes text prompts in tokens
    /// [default: one token per byte, exact for Turbine's echo and mocker engines].
    #[arg(long, help_heading = "Workload")]
    tokenizer: Option<PathBuf>,
    /// Seeds synthetic lengths, prompts and Poisson arrivals; another seed, another cache-cold
    /// workload.
    #[arg(long, default_value_t = 0, help_heading = "Workload")]
    seed: u64,

    /// Scales trace timestamps (0.5 replays twice as fast).
    #[arg(long, default_value_t = 1.0, help_heading = "Arrivals")]
    time_scale: f64,
    /// Poisson arrivals at this many requests (or sessions) per second.
    #[arg(long, conflicts_with = "concurrency", help_heading = "Arrivals")]
    rate: Option<f64>,
    /// Keep this many requests (or sessions) in flight [default: 1 without a trace or --rate].
    #[arg(long, help_heading = "Arrivals")]
    concurrency: Option<usize>,
    /// Stop after this many requests (sessions count once) [default: the whole trace].
    #[arg(long, help_heading = "Arrivals")]
    num_requests: Option<usize>,
    /// Stop starting requests after this many seconds; those in flight finish.
    #[arg(long, help_heading = "Arrivals")]
    duration: Option<f64>,

    /// Ask the server to generate max_tokens whatever tokens come (vLLM's ignore_eos).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    ignore_eos: bool,
    /// A request with no complete answer after this many seconds counts as a timeout.
    #[arg(long, default_value_t = 600.0)]
    request_timeout: f64,
    /// Goodput: a request counts when its TTFT is at most this (needs --itl-sla-ms).
    #[arg(long, requires = "itl_sla_ms", help_heading = "Results")]
    ttft_sla_ms: Option<f64>,
    /// Goodput: ... and its mean gap between output tokens at most this.
    #[arg(long, requires = "ttft_sla_ms", help_heading = "Results")]
    itl_sla_ms: Option<f64>,
    /// Name of this run in tables and plots [default: the arrival pattern].
    #[arg(long, help_heading = "Results")]
    label: Option<String>,
    /// Write the result (summary, timeline, per-request records) to this JSON file.
    #[arg(long, help_heading = "Results")]
    output: Option<PathBuf>,
    /// Write ttft.svg and throughput.svg here.
    #[arg(long, help_heading = "Results")]
    plot_dir: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, help_heading = "Results")]
    no_progress: bool,
    /// Trace runs: the fleet's workers, with --fleet-blocks-per-worker, so that the hit rate
    /// is also given as a share of the fleet's pooled-LRU bound (one LRU cache as large as
    /// all their KV caches together, over the requests replayed).
    #[arg(long, requires_all = ["fleet_blocks_per_worker", "trace"], help_heading = "Results")]
    fleet_workers: Option<usize>,
    /// KV blocks of --fleet-block-size tokens in each worker's cache.
    #[arg(long, requires = "fleet_workers", help_heading = "Results")]
    fleet_blocks_per_worker: Option<usize>,
    #[arg(long, default_value_t = 16, help_heading = "Results")]
    fleet_block_size: usize,
}

fn parse_range(s: &str) -> Result<Range<u32>, String> {
    let (lo, hi) = s
        .split_once("..")
        .ok_or_else(|| format!("expected LO..HI, got {s:?}"))?;
    let lo: u32 = lo.trim().parse().map_err(|_| format!("bad start {lo:?}"))?;
    let hi: u32 = hi.trim().parse().map_err(|_| format!("bad end {hi:?}"))?;
    if lo >= hi {
        return Err(format!("empty range {s:?}"));
    }
    Ok(lo..hi)
}

#[derive(Debug, Args)]
pub struct TraceCmd {
    #[command(subcommand)]
    command: TraceSub,
}

#[derive(Debug, Subcommand)]
enum TraceSub {
    /// Request count, length statistics, and the prefix-cache hit rate no router can beat.
    Analyze {
        /// Mooncake JSONL or Azure CSV trace.
        file: PathBuf,
        /// Also simulate one LRU cache of this many trace blocks.
        #[arg(long, conflicts_with_all = ["workers", "blocks_per_worker"])]
        lru_blocks: Option<usize>,
        /// With --blocks-per-worker: simulate one LRU cache as large as this many workers'
        /// KV caches together, the pooled bound of a fleet's hit rate.
        #[arg(long, requires = "blocks_per_worker")]
        workers: Option<usize>,
        /// KV blocks of --block-size tokens in each worker's cache.
        #[arg(long, requires = "workers")]
        blocks_per_worker: Option<usize>,
        /// Tokens per KV block of the workers.
        #[arg(long, default_value_t = 16)]
        block_size: usize,
        /// Replay the trace through these eviction policies (lru, lfu, fifo, ttl, lineage,
        /// arc, adaptive, or all; repeat or comma-separate), one prefix cache per --capacity,
        /// beside Belady's offline optimum. All of them if only --capacity is given.
        #[arg(long, value_name = "POLICY", value_delimiter = ',')]
        policy: Vec<String>,
        /// Cache sizes for --policy, in the trace's blocks (repeat or comma-separate).
        #[arg(long, value_name = "BLOCKS", value_delimiter = ',')]
        capacity: Vec<String>,
        /// `ttl`: idle milliseconds before a block expires.
        #[arg(long, default_value_t = turbine_bench::analyze::PolicyConfig::default().ttl_ms)]
        ttl_ms: u64,
        /// `lfu`: milliseconds over which counts halve, 0 for never.
        #[arg(long, default_value_t = turbine_bench::analyze::PolicyConfig::default().lfu_half_life_ms)]
        lfu_half_life_ms: u64,
        /// `adaptive`: block lookups its shadows' hit rates average over.
        #[arg(long, default_value_t = turbine_bench::analyze::PolicyConfig::default().adaptive_window)]
        adaptive_window: u32,
        /// `adaptive`: hit-rate points another candidate must lead by before it is followed.
        #[arg(long, default_value_t = turbine_bench::analyze::PolicyConfig::default().adaptive_margin * 100.0)]
        adaptive_margin_points: f64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write a synthetic multi-turn conversation trace (Mooncake JSONL): shared system
    /// prompts, histories that grow turn by turn, think times, Poisson session arrivals.
    Conversations(ConversationsArgs),
}

#[derive(Debug, Args)]
struct ConversationsArgs {
    /// Where to write the trace.
    #[arg(long)]
    output: PathBuf,
    #[arg(long, default_value_t = 3000)]
    sessions: usize,
    /// Sessions starting per second, on average.
    #[arg(long, default_value_t = 3.0)]
    session_rate: f64,
    /// Distinct shared system prompts.
    #[arg(long, default_value_t = 4)]
    system_prompts: usize,
    #[arg(long, default_value_t = 1536)]
    system_prompt_tokens: u32,
    /// Mean turns per session (geometric).
    #[arg(long, default_value_t = 3.0)]
    mean_turns: f64,
    /// Median tokens of a user message (log-normal): pasted documents and code as well
    /// as questions.
    #[arg(long, default_value_t = 2000)]
    user_tokens: u32,
    /// Median tokens of an answer (log-normal).
    #[arg(long, default_value_t = 250)]
    output_tokens: u32,
    /// Log-normal shape of lengths (standard deviation of their logarithm).
    #[arg(long, default_value_t = 0.8)]
    length_sigma: f64,
    /// Mean seconds between an answer and the next message (exponential).
    #[arg(long, default_value_t = 20.0)]
    think_time_s: f64,
    /// Milliseconds an answer takes to stream per token, before the user reads it.
    #[arg(long, default_value_t = 20.0)]
    answer_ms_per_token: f64,
    /// A session ends before a turn whose prompt and answer would pass this many tokens.
    #[arg(long, default_value_t = 32_768)]
    max_context: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl ConversationsArgs {
    fn spec(&self) -> anyhow::Result<turbine_bench::conversations::ConversationSpec> {
        let duration = |flag: &str, secs: f64, shown: f64| {
            std::time::Duration::try_from_secs_f64(secs)
                .map_err(|_| anyhow::anyhow!("{flag} must be a number >= 0, got {shown}"))
        };
        Ok(turbine_bench::conversations::ConversationSpec {
            sessions: self.sessions,
            session_rate: self.session_rate,
            system_prompts: self.system_prompts,
            system_prompt_tokens: self.system_prompt_tokens,
            mean_turns: self.mean_turns,
            user_tokens: self.user_tokens,
            output_tokens: self.output_tokens,
            length_sigma: self.length_sigma,
            think_time: duration("--think-time-s", self.think_time_s, self.think_time_s)?,
            answer_time_per_token: duration(
                "--answer-ms-per-token",
                self.answer_ms_per_token / 1000.0,
                self.answer_ms_per_token,
            )?,
            max_context: self.max_context,
        })
    }
}

pub async fn trace(cmd: TraceCmd) -> anyhow::Result<()> {
    match cmd.command {
        TraceSub::Analyze {
            file,
            lru_blocks,
            workers,
            blocks_per_worker,
            block_size,
            policy,
            capacity,
            ttl_ms,
            lfu_half_life_ms,
            adaptive_window,
            adaptive_margin_points,
            json,
        } => {
            use turbine_bench::analyze::{PolicyConfig, PolicyKind};
            let mut kinds = turbine_bench::analyze::policies_named(&policy)
                .map_err(|e| anyhow::anyhow!("--policy: {e}, or all"))?;
            let capacities = capacity
                .iter()
                .map(|c| match c.trim().parse::<usize>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(anyhow::anyhow!(
                        "--capacity {c:?}: expected a number of blocks, at least 1"
                    )),
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            if !kinds.is_empty() && capacities.is_empty() {
                bail!("--policy needs --capacity: the cache sizes to replay, in the trace's blocks");
            }
            if kinds.is_empty() {
                kinds = PolicyKind::ALL.to_vec();
            }
            if !(adaptive_margin_points.is_finite() && adaptive_margin_points >= 0.0) {
                bail!("--adaptive-margin-points {adaptive_margin_points}: expected a number of points >= 0");
            }
            if adaptive_window == 0 {
                bail!("--adaptive-window 0: expected at least 1 lookup");
            }
            let config = PolicyConfig {
                ttl_ms,
                lfu_half_life_ms,
                adaptive_window,
                adaptive_margin: adaptive_margin_points / 100.0,
            };
            let trace = Trace::load(&file).with_context(|| format!("trace {}", file.display()))?;
            let lru_blocks = match (workers, blocks_per_worker) {
                (Some(w), Some(b)) => {
                    if w == 0 || b == 0 || block_size == 0 {
                        bail!("--workers, --blocks-per-worker and --block-size must be at least 1");
                    }
                    // The fleet's tokens, in the trace's blocks.
                    Some(w * b * block_size / trace.block_tokens.max(1) as usize)
                }
                _ => lru_blocks,
            };
            let mut a = turbine_bench::analyze::analyze(&trace, lru_blocks);
            if !capacities.is_empty() {
                let comparison = turbine_bench::analyze::compare_policies(&trace, &kinds, &capacities, &config);
                let no_hashes = || anyhow::anyhow!("--policy: {} has no hash ids to replay", file.display());
                a.policies = Some(comparison.ok_or_else(no_hashes)?);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&a)?);
            } else {
                print!("{}", a.render());
            }
            Ok(())
        }
        TraceSub::Conversations(c) => {
            let (output, sessions) = (&c.output, c.sessions);
            let spec = c.spec()?;
            let trace = turbine_bench::conversations::generate(&spec, c.seed)?;
            std::fs::write(output, turbine_bench::conversations::to_mooncake_jsonl(&trace))
                .with_context(|| format!("writing {}", output.display()))?;
            println!(
                "wrote {} requests of {sessions} sessions over {:.0} s to {}",
                trace.requests.len(),
                trace.span().as_secs_f64(),
                output.display()
            );
            Ok(())
        }
    }
}

pub async fn bench(cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd.command {
        Some(BenchSub::Compare(c)) => compare(c),
        None => run(cmd.run).await,
    }
}

fn compare(c: CompareArgs) -> anyhow::Result<()> {
    let results = c
        .results
        .iter()
        .map(|p| BenchResult::load(p))
        .collect::<Result<Vec<_>, _>>()?;
    print!("{}", turbine_bench::compare_table(&results));
    if let Some(dir) = &c.plot_dir {
        write_plots(dir, &results)?;
    }
    Ok(())
}

fn write_plots(dir: &Path, results: &[BenchResult]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("--plot-dir {}", dir.display()))?;
    for (name, svg) in [
        ("ttft.svg", turbine_bench::plot::ttft_cdf(results)),
        ("throughput.svg", turbine_bench::plot::throughput(results)),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Sizes text prompts with a real tokenizer.
struct PreprocessorCodec(turbine_preprocess::Preprocessor);

impl TextCodec for PreprocessorCodec {
    fn encode(&self, text: &str) -> Vec<u32> {
        self.0.tokenizer().encode(text, false).unwrap_or_default()
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.0.tokenizer().decode(ids, false).unwrap_or_default()
    }
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    let positive = |name: &str, v: f64| {
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(anyhow::anyhow!("--{name} must be a positive number, got {v}"))
        }
    };
    if !(0.0..=1.0).contains(&a.prefix_ratio) {
        bail!("--prefix-ratio must be between 0 and 1, got {}", a.prefix_ratio);
    }
    if a.prefix_groups == 0 || a.turns == 0 {
        bail!("--prefix-groups and --turns must be at least 1");
    }
    let timeout = Duration::from_secs_f64(positive("request-timeout", a.request_timeout)?);
    let duration = a
        .duration
        .map(|d| positive("duration", d).map(Duration::from_secs_f64))
        .transpose()?;
    let sessions = a.turns > 1;
    let endpoint = match (a.endpoint, sessions) {
        (Some(EndpointArg::Chat), _) | (None, true) => Endpoint::Chat,
        (Some(EndpointArg::Completions), _) | (None, false) => Endpoint::Completions,
    };
    let workload = match &a.trace {
        Some(path) => {
            let trace = Trace::load(path).with_context(|| format!("--trace {}", path.display()))?;
            let block = if trace.block_tokens > 0 {
                trace.block_tokens
            } else {
                512
            };
            Workload::Trace {
                trace: Arc::new(trace),
                tokens: BlockTokens::new(block, a.token_ids.clone(), a.seed),
            }
        }
        None => {
            let text: Option<Arc<dyn TextCodec>> = match (endpoint, &a.tokenizer) {
                (Endpoint::Completions, None) => None,
                (_, Some(path)) => Some(Arc::new(PreprocessorCodec(
                    turbine_preprocess::Preprocessor::load(path)
                        .with_context(|| format!("--tokenizer {}", path.display()))?,
                ))),
                (Endpoint::Chat, None) => Some(Arc::new(ByteCodec)),
            };
            Workload::Synthetic {
                spec: Synthetic {
                    input: Lengths {
                        mean: a.input_len,
                        stddev: a.input_len_stddev,
                    },
                    output: Lengths {
                        mean: a.output_len,
                        stddev: a.output_len_stddev,
                    },
                    prefix_ratio: a.prefix_ratio,
                    prefix_groups: a.prefix_groups,
                    turns: a.turns,
                    think_time: Duration::from_millis(a.think_time_ms),
                    seed: a.seed,
                },
                text,
                token_ids: a.token_ids.clone(),
            }
        }
    };
    let arrival = match (a.rate, a.concurrency, a.trace.is_some()) {
        (Some(rate), _, _) => Arrival::Poisson {
            rate: positive("rate", rate)?,
            seed: a.seed,
        },
        (None, Some(n), _) => Arrival::Concurrency(n),
        (None, None, true) => Arrival::Trace {
            time_scale: positive("time-scale", a.time_scale)?,
        },
        (None, None, false) => Arrival::Concurrency(1),
    };
    let model = match a.model {
        Some(m) => m,
        None => Client::first_model(&a.url).await?,
    };
    let client = Arc::new(Client::new(&a.url, model.clone(), endpoint, timeout, a.ignore_eos)?);
    let config = RunConfig {
        arrival,
        max_jobs: a.num_requests,
        duration,
        progress: !a.no_progress,
    };
    let sla = match (a.ttft_sla_ms, a.itl_sla_ms) {
        (Some(t), Some(i)) => Some(Sla {
            ttft_ms: positive("ttft-sla-ms", t)?,
            itl_ms: positive("itl-sla-ms", i)?,
        }),
        _ => None,
    };
    let started_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    eprintln!("{} against {} ({arrival})", workload.describe(), a.url);
    let outcome = turbine_bench::run(client, &workload, &config).await?;
    let meta = Meta {
        label: a.label.unwrap_or_else(|| arrival.to_string()),
        url: a.url,
        model,
        endpoint: format!("{endpoint:?}").to_lowercase(),
        workload: workload.describe(),
        arrival: arrival.to_string(),
        started_at,
    };
    let result = BenchResult::new(meta, outcome.records, outcome.duration.as_secs_f64(), sla);
    print!("{}", result.render());
    if let (Some(workers), Some(blocks), Workload::Trace { trace, .. }) =
        (a.fleet_workers, a.fleet_blocks_per_worker, &workload)
    {
        if workers == 0 || blocks == 0 || a.fleet_block_size == 0 {
            bail!("--fleet-workers, --fleet-blocks-per-worker and --fleet-block-size must be at least 1");
        }
        let replayed = Trace {
            requests: trace.requests.iter().take(result.records.len()).cloned().collect(),
            ..(**trace).clone()
        };
        let lru = workers * blocks * a.fleet_block_size / trace.block_tokens.max(1) as usize;
        let bound = turbine_bench::analyze::analyze(&replayed, Some(lru))
            .prefix
            .and_then(|p| p.lru)
            .map(|(_, rate)| rate);
        match (result.summary.cache_hit_rate, bound) {
            (Some(hit), Some(bound)) if bound > 0.0 => println!(
                "cache hit rate {:.1}% = {:.0}% of the fleet's pooled-LRU bound {:.1}% ({workers} workers x {blocks} blocks of {} tokens)",
                hit * 100.0,
                hit / bound * 100.0,
                bound * 100.0,
                a.fleet_block_size
            ),
            _ => println!("no pooled-LRU bound: the server reported no cached tokens, or the trace has no hash ids"),
        }
    }
    if let Some(path) = &a.output {
        result.save(path)?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(dir) = &a.plot_dir {
        write_plots(dir, std::slice::from_ref(&result))?;
    }
    Ok(())
}
