//! Sends a workload's jobs at the chosen arrival pattern until a bound is reached, shows
//! progress, and collects every request's record.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::client::{Client, Endpoint, Messages, RequestRecord};
use crate::workload::{Job, Prompt, Workload};

/// When jobs start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrival {
    /// At the trace's timestamps multiplied by `time_scale` (0.5 replays twice as fast).
    Trace { time_scale: f64 },
    /// A Poisson process of `rate` jobs per second.
    Poisson { rate: f64, seed: u64 },
    /// `n` jobs in flight at all times.
    Concurrency(usize),
}

impl std::fmt::Display for Arrival {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Arrival::Trace { time_scale } => write!(f, "trace timestamps × {time_scale}"),
            Arrival::Poisson { rate, .. } => write!(f, "Poisson {rate} req/s"),
            Arrival::Concurrency(n) => write!(f, "concurrency {n}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub arrival: Arrival,
    /// Stop starting jobs after this many (sessions count once).
    pub max_jobs: Option<usize>,
    /// Stop starting jobs after this long; jobs in flight finish.
    pub duration: Option<Duration>,
    /// Print progress to stderr.
    pub progress: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("token-id prompts need the completions endpoint (--endpoint completions)")]
    TokensOverChat,
    #[error("multi-turn sessions need the chat endpoint (--endpoint chat)")]
    SessionsOverCompletions,
    #[error("trace arrival needs a trace workload")]
    TraceArrivalWithoutTrace,
    #[error("a synthetic workload needs a bound: a number of requests or a duration")]
    Unbounded,
    #[error("{what} must be positive, got {value}")]
    NotPositive { what: &'static str, value: f64 },
}

/// What a run produced.
#[derive(Debug)]
pub struct RunOutcome {
    pub records: Vec<RequestRecord>,
    /// From the start to the end of the last job.
    pub duration: Duration,
}

/// Runs `workload` against `client`.
pub async fn run(client: Arc<Client>, workload: &Workload, config: &RunConfig) -> Result<RunOutcome, RunError> {
    check(&client, workload, config)?;
    let start = Instant::now();
    let deadline = config.duration.map(|d| start + d);
    let shared = Arc::new(Shared::default());
    let progress = config
        .progress
        .then(|| spawn_progress(shared.clone(), config.max_jobs, workload, start));
    let jobs = workload.jobs().take(config.max_jobs.unwrap_or(usize::MAX));
    let past_deadline = || deadline.is_some_and(|d| Instant::now() >= d);
    let mut tasks = tokio::task::JoinSet::new();
    match config.arrival {
        Arrival::Concurrency(n) => {
            let queue = Arc::new(Mutex::new(jobs));
            for _ in 0..n {
                let (queue, client, shared) = (queue.clone(), client.clone(), shared.clone());
                tasks.spawn(async move {
                    loop {
                        if deadline.is_some_and(|d| Instant::now() >= d) {
                            break;
                        }
                        let next = queue.lock().map(|mut q| q.next()).unwrap_or(None);
                        let Some(s) = next else { break };
                        run_job(&client, s.job, start, &shared).await;
                    }
                });
            }
        }
        Arrival::Poisson { rate, seed } => {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut at = Duration::ZERO;
            for s in jobs {
                tokio::time::sleep_until((start + at).into()).await;
                if past_deadline() {
                    break;
                }
                let (client, shared) = (client.clone(), shared.clone());
                tasks.spawn(async move { run_job(&client, s.job, start, &shared).await });
                let u: f64 = rng.gen_range(f64::EPSILON..1.0);
                at += Duration::from_secs_f64(-u.ln() / rate);
            }
        }
        Arrival::Trace { time_scale } => {
            for s in jobs {
                let at = s.at.unwrap_or_default().mul_f64(time_scale);
                tokio::time::sleep_until((start + at).into()).await;
                if past_deadline() {
                    break;
                }
                let (client, shared) = (client.clone(), shared.clone());
                tasks.spawn(async move { run_job(&client, s.job, start, &shared).await });
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    let duration = start.elapsed();
    shared.done.store(true, Ordering::Relaxed);
    shared.wake.notify_one();
    if let Some(p) = progress {
        let _ = p.await;
    }
    let records = std::mem::take(&mut *shared.records.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(RunOutcome { records, duration })
}

fn check(client: &Client, workload: &Workload, config: &RunConfig) -> Result<(), RunError> {
    let is_trace = matches!(workload, Workload::Trace { .. });
    if workload.sends_token_ids() && client.endpoint() == Endpoint::Chat {
        return Err(RunError::TokensOverChat);
    }
    if let Workload::Synthetic { spec, .. } = workload {
        if spec.turns > 1 && client.endpoint() == Endpoint::Completions {
            return Err(RunError::SessionsOverCompletions);
        }
    }
    match config.arrival {
        Arrival::Trace { .. } if !is_trace => return Err(RunError::TraceArrivalWithoutTrace),
        Arrival::Trace { time_scale } if time_scale.is_nan() || time_scale <= 0.0 => {
            return Err(RunError::NotPositive {
                what: "time scale",
                value: time_scale,
            })
        }
        Arrival::Poisson { rate, .. } if !(rate > 0.0 && rate.is_finite()) => {
            return Err(RunError::NotPositive {
                what: "request rate",
                value: rate,
            })
        }
        Arrival::Concurrency(0) => {
            return Err(RunError::NotPositive {
                what: "concurrency",
                value: 0.0,
            })
        }
        _ => {}
    }
    if !is_trace && config.max_jobs.is_none() && config.duration.is_none() {
        return Err(RunError::Unbounded);
    }
    Ok(())
}

#[derive(Default)]
struct Shared {
    records: Mutex<Vec<RequestRecord>>,
    started: AtomicUsize,
    finished: AtomicUsize,
    failed: AtomicUsize,
    done: AtomicBool,
    /// Ends the progress display's wait at the end of the run.
    wake: tokio::sync::Notify,
}

impl Shared {
    fn record(&self, r: RequestRecord) {
        if r.error.is_some() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.finished.fetch_add(1, Ordering::Relaxed);
        self.records.lock().unwrap_or_else(|p| p.into_inner()).push(r);
    }
}

async fn run_job(client: &Client, job: Job, start: Instant, shared: &Shared) {
    shared.started.fetch_add(1, Ordering::Relaxed);
    match job {
        Job::Request(r) => {
            let reply = client.send(&r.prompt, r.max_tokens, start).await;
            shared.record(reply.record);
        }
        Job::Session { turns, think_time } => {
            let mut messages: Messages = Vec::new();
            let last = turns.len().saturating_sub(1);
            for (i, turn) in turns.into_iter().enumerate() {
                let Prompt::Text(text) = turn.prompt else {
                    // Sessions are built from text; `check` refuses token sessions.
                    return;
                };
                messages.push(("user", text));
                let reply = client.chat(&messages, turn.max_tokens, start).await;
                let failed = reply.record.error.is_some();
                shared.record(reply.record);
                if failed {
                    // The conversation cannot go on without its answer.
                    return;
                }
                messages.push(("assistant", reply.text));
                if i < last {
                    tokio::time::sleep(think_time).await;
                }
            }
        }
    }
}

fn spawn_progress(
    shared: Arc<Shared>,
    max_jobs: Option<usize>,
    workload: &Workload,
    start: Instant,
) -> tokio::task::JoinHandle<()> {
    let total = match workload {
        Workload::Trace { trace, .. } => Some(trace.requests.len().min(max_jobs.unwrap_or(usize::MAX))),
        Workload::Synthetic { .. } => max_jobs,
    };
    let terminal = std::io::stderr().is_terminal();
    // A log file gets a line every 10 s instead of a redrawn bar.
    let every = if terminal {
        Duration::from_millis(250)
    } else {
        Duration::from_secs(10)
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shared.wake.notified() => {}
            }
            let done = shared.done.load(Ordering::Relaxed);
            let finished = shared.finished.load(Ordering::Relaxed);
            let started = shared.started.load(Ordering::Relaxed);
            let failed = shared.failed.load(Ordering::Relaxed);
            let elapsed = start.elapsed().as_secs_f64();
            let bar = match total {
                Some(t) if t > 0 => {
                    let filled = (started.min(t) * 30) / t;
                    format!(
                        "[{}{}] {started}/{t} started",
                        "#".repeat(filled),
                        ".".repeat(30 - filled)
                    )
                }
                _ => format!("{started} started"),
            };
            let line = format!("{bar}, {finished} answered, {failed} failed, {elapsed:.0} s");
            if terminal {
                eprint!("\r{line}\x1b[K");
                if done {
                    eprintln!();
                }
            } else {
                eprintln!("{line}");
            }
            if done {
                break;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{Lengths, Synthetic};

    fn synthetic(turns: u32) -> Workload {
        Workload::Synthetic {
            spec: Synthetic {
                input: Lengths::fixed(10),
                output: Lengths::fixed(2),
                prefix_ratio: 0.0,
                prefix_groups: 1,
                turns,
                think_time: Duration::ZERO,
                seed: 0,
            },
            text: None,
            token_ids: 32..127,
        }
    }

    #[test]
    fn bad_combinations_are_refused() {
        let chat = Client::new(
            "http://127.0.0.1:1",
            "m".into(),
            Endpoint::Chat,
            Duration::from_secs(1),
            true,
        )
        .unwrap();
        let completions = Client::new(
            "http://127.0.0.1:1",
            "m".into(),
            Endpoint::Completions,
            Duration::from_secs(1),
            true,
        )
        .unwrap();
        let cfg = |arrival, max_jobs| RunConfig {
            arrival,
            max_jobs,
            duration: None,
            progress: false,
        };
        let err = |c: &Client, w: &Workload, cfg: RunConfig| check(c, w, &cfg).unwrap_err().to_string();
        assert!(err(&chat, &synthetic(1), cfg(Arrival::Concurrency(1), Some(1))).contains("completions endpoint"));
        let mut sessions = synthetic(2);
        if let Workload::Synthetic { text, .. } = &mut sessions {
            *text = Some(Arc::new(crate::workload::ByteCodec));
        }
        assert!(err(&completions, &sessions, cfg(Arrival::Concurrency(1), Some(1))).contains("chat endpoint"));
        assert!(err(&completions, &synthetic(1), cfg(Arrival::Concurrency(2), None)).contains("needs a bound"));
        assert!(err(
            &completions,
            &synthetic(1),
            cfg(Arrival::Trace { time_scale: 1.0 }, Some(1))
        )
        .contains("trace workload"));
        assert_eq!(
            err(
                &completions,
                &synthetic(1),
                cfg(Arrival::Poisson { rate: 0.0, seed: 0 }, Some(1))
            ),
            "request rate must be positive, got 0"
        );
        assert!(check(
            &completions,
            &synthetic(1),
            &cfg(Arrival::Poisson { rate: 5.0, seed: 0 }, Some(3))
        )
        .is_ok());
    }
}
