//! Disaggregated serving when things go wrong, across real processes meeting in etcd: workers
//! killed or frozen mid-run, transfers that time out, a decode worker whose KV layout does
//! not match. Each request still gets one whole answer, nothing waits past a bounded time,
//! and every surviving worker ends with the KV blocks and staging slots it started with.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::{smollm2, start_frontend, start_worker_with_metrics, token_ids as tokens, Etcd, Proc, SMOLLM2_NAME};
use serde_json::{json, Value};

/// Sum of the samples of `name` in a Prometheus text whose labels include each of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{')))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn scrape(http: &reqwest::Client, url: &str) -> Result<String> {
    Ok(http.get(url).send().await?.error_for_status()?.text().await?)
}

/// A worker process with its metrics URL.
struct Worker {
    proc: Proc,
    metrics: String,
}

impl Worker {
    fn start(args: &[&str]) -> Result<Self> {
        let (proc, _, metrics) = start_worker_with_metrics(args)?;
        Ok(Self { proc, metrics })
    }

    /// Free KV blocks and free staging slots.
    async fn free(&self, http: &reqwest::Client) -> Result<(f64, f64)> {
        let text = scrape(http, &self.metrics).await?;
        Ok((
            sample(&text, "turbine_worker_kv_blocks", &["state=\"free\""]),
            sample(&text, "turbine_worker_staging_free_slots", &[]),
        ))
    }

    async fn metric(&self, http: &reqwest::Client, name: &str, labels: &[&str]) -> Result<f64> {
        Ok(sample(&scrape(http, &self.metrics).await?, name, labels))
    }
}

/// Waits until the frontend at `url` lists `decode` decode and `prefill` prefill workers of `model`.
async fn wait_for_pools(http: &reqwest::Client, url: &str, model: &str, decode: usize, prefill: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health: Value = http.get(format!("{url}/health")).send().await?.json().await?;
        let m = &health["models"][model];
        let len = |k: &str| m[k].as_array().map_or(0, Vec::len);
        if (len("instances"), len("prefill_instances")) == (decode, prefill) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "pools never reached {decode}+{prefill}: {health}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every worker's free blocks and slots are back to `before`.
async fn back_to(http: &reqwest::Client, workers: &[&Worker], before: &[(f64, f64)], within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let mut now = Vec::new();
        for w in workers {
            now.push(w.free(http).await?);
        }
        if now == before {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "free (blocks, staging slots) per worker: {now:?}, at the start {before:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A small deterministic generator, so that a failing run can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// 2,000 requests against two prefill and two decode mocker workers, a tenth of them cut
/// off by their client at a random moment, with one prefill worker killed a third of the
/// way in and one decode worker killed at two thirds. Every request not cut off gets its
/// whole answer; afterwards the surviving workers hold exactly the free KV blocks and
/// staging slots they started with, and a new prefill worker clears the shared memory the
/// killed one left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_requests_with_cancels_and_kills_leak_nothing() -> Result<()> {
    let etcd = Etcd::start()?;
    let http = reqwest::Client::new();
    let common = [
        "--discovery",
        etcd.url.as_str(),
        "--engine",
        "mocker",
        "--speedup",
        "5",
        "--num-blocks",
        "4096",
        "--lease-ttl-secs",
        "2",
        "--kv-lease-ms",
        "1000",
        "--staging-blocks",
        "1024",
    ];
    let role = |r: &'static str| {
        let mut a = common.to_vec();
        a.extend(["--role", r]);
        a
    };
    let mut p1 = Worker::start(&role("prefill"))?;
    let p2 = Worker::start(&role("prefill"))?;
    let mut d1 = Some(Worker::start(&role("decode"))?);
    let d2 = Worker::start(&role("decode"))?;
    let (_frontend, url) = start_frontend(&["--discovery", etcd.url.as_str()])?;
    wait_for_pools(&http, &url, "mocker", 2, 2).await?;
    let survivors = [&p2, &d2];
    let mut before = Vec::new();
    for w in survivors {
        before.push(w.free(&http).await?);
    }
    ensure!(
        before.iter().all(|&(b, s)| b > 0.0 && s > 0.0),
        "no free blocks or slots: {before:?}"
    );
    let p1_pid = p1.proc.0.id();

    const REQUESTS: usize = 2000;
    let started = Arc::new(AtomicUsize::new(0));
    let semaphore = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = tokio::task::JoinSet::new();
    let mut rng = Lcg(7);
    let mut killer = None;
    for i in 0..REQUESTS {
        // Prompts share a few prefixes, so that cached blocks come and go as well.
        let prefix = format!("conversation {} ", rng.next() % 16).repeat(1 + (rng.next() % 20) as usize);
        let prompt = format!("{prefix}turn {i}");
        // The requests sent just before the decode worker is killed run long and are never
        // cut, so that it is killed with sequences that must move (short ones may all have
        // ended between the sample that saw one running and the kill).
        let long = (2 * REQUESTS / 3 - 64..2 * REQUESTS / 3).contains(&i);
        let max_tokens = if long { 200 } else { 0 } + 1 + rng.next() % 40;
        let cut = (!long && rng.next() % 10 == 0).then(|| Duration::from_millis(1 + rng.next() % 200));
        let body = json!({"model": "mocker", "prompt": prompt, "max_tokens": max_tokens});
        let (client, url, started) = (http.clone(), url.clone(), started.clone());
        let permit = semaphore.clone().acquire_owned().await?;
        tasks.spawn(async move {
            let _permit = permit;
            started.fetch_add(1, Ordering::Relaxed);
            let mut request = client.post(format!("{url}/v1/completions")).json(&body);
            if let Some(cut) = cut {
                request = request.timeout(cut);
            }
            let answer = async {
                let r = request.send().await?;
                let status = r.status();
                let v: Value = r.json().await?;
                anyhow::Ok((status, v))
            }
            .await;
            match (cut, answer) {
                (Some(_), _) => Ok(false),
                (None, Ok((status, v))) => {
                    ensure!(status.is_success(), "request {i}: {status}: {v}");
                    let tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                    ensure!(
                        tokens == max_tokens,
                        "request {i}: {tokens} of {max_tokens} tokens: {v}"
                    );
                    Ok(true)
                }
                (None, Err(e)) => Err(e.context(format!("request {i}"))),
            }
        });
        if i == REQUESTS / 3 {
            p1.proc.kill()?;
        }
        if i == 2 * REQUESTS / 3 {
            // Killed while it has a sequence running, so that some must move; watched beside
            // the load, which goes on meanwhile. One is enough: on a loaded two-core machine
            // the worker may never hold two at the instant it is sampled.
            let (mut d1, http) = (d1.take().context("killed twice")?, http.clone());
            killer = Some(tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(30);
                while d1
                    .metric(&http, "turbine_worker_sequences", &["state=\"running\""])
                    .await?
                    < 1.0
                {
                    ensure!(
                        Instant::now() < deadline,
                        "the decode worker never had a sequence running"
                    );
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                d1.proc.kill()
            }));
        }
    }
    killer.context("no decode worker was killed")?.await??;
    let mut answered = 0;
    let mut failures = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done? {
            Ok(whole) => answered += usize::from(whole),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    ensure!(
        failures.is_empty(),
        "{} of {REQUESTS} requests failed, first: {}",
        failures.len(),
        failures[0]
    );
    ensure!(answered > REQUESTS * 8 / 10, "only {answered} whole answers");
    let migrated = common::metric(&http, &url, "turbine_frontend_migrations_total{model=\"mocker\"}").await?;
    ensure!(migrated >= 1.0, "no request moved off the killed decode worker");

    back_to(&http, &survivors, &before, Duration::from_secs(15)).await?;

    // The killed prefill worker could not unlink its staging memory; the next one to start
    // on the host removes it.
    let leftover = |dir: &std::path::Path| -> Result<Vec<String>> {
        Ok(std::fs::read_dir(dir)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!("turbine-xfer-{p1_pid}-")))
            .collect())
    };
    let shm = std::path::Path::new("/dev/shm");
    ensure!(
        !leftover(shm)?.is_empty(),
        "the killed prefill worker left no staging file"
    );
    let _p3 = Worker::start(&role("prefill"))?;
    ensure!(leftover(shm)?.is_empty(), "left behind: {:?}", leftover(shm)?);
    Ok(())
}

async fn complete(http: &reqwest::Client, url: &str, body: &Value) -> Result<(String, Duration)> {
    let started = Instant::now();
    let r = http.post(format!("{url}/v1/completions")).json(body).send().await?;
    let status = r.status();
    let v: Value = r.json().await?;
    ensure!(status.is_success(), "{status}: {v}");
    Ok((
        v["choices"][0]["text"].as_str().unwrap_or_default().to_owned(),
        started.elapsed(),
    ))
}

/// A native prefill and decode worker in etcd, staging in host memory (so KV moves over
/// TCP), each with `extra` arguments of its own; with a frontend and an aggregated
/// reference server, the answer of each to a long prompt.
struct Native {
    _etcd: Etcd,
    prefill: Worker,
    decode: Worker,
    _frontend: Proc,
    url: String,
    _reference: Proc,
    reference: String,
}

impl Native {
    async fn start(http: &reqwest::Client, prefill: &[&str], decode: &[&str]) -> Result<Self> {
        let etcd = Etcd::start()?;
        let base = [
            "--discovery",
            etcd.url.as_str(),
            "--model",
            smollm2()?,
            "--kv-cache-mib",
            "128",
            "--no-shared-memory",
            "--lease-ttl-secs",
            "2",
        ];
        let worker = |role: &'static str, extra: &[&str]| {
            let mut a = base.to_vec();
            a.extend(["--role", role]);
            a.extend_from_slice(extra);
            Worker::start(&a)
        };
        let prefill = worker("prefill", prefill)?;
        let decode = worker("decode", decode)?;
        let (frontend, url) = start_frontend(&["--discovery", etcd.url.as_str()])?;
        wait_for_pools(http, &url, SMOLLM2_NAME, 1, 1).await?;
        let (reference_proc, reference) = common::start(
            &[
                "serve",
                "--port",
                "0",
                "--model",
                smollm2()?,
                "--kv-cache-mib",
                "128",
                "--workers",
                "1",
            ],
            "turbine: listening on ",
        )?;
        Ok(Self {
            _etcd: etcd,
            prefill,
            decode,
            _frontend: frontend,
            url,
            _reference: reference_proc,
            reference,
        })
    }

    /// The disaggregated answer to `body`, checked against the aggregated one; how long it took.
    async fn same_answer(&self, http: &reqwest::Client, body: &Value) -> Result<Duration> {
        let (want, _) = complete(http, &self.reference, body).await?;
        let (got, took) = complete(http, &self.url, body).await?;
        ensure!(got == want, "disaggregated {got:?}, aggregated {want:?}");
        Ok(took)
    }
}

/// A prompt of `len` tokens, answered greedily with 4.
fn prompt(seed: u32, len: usize) -> Value {
    json!({"model": SMOLLM2_NAME, "prompt": tokens(seed, len), "max_tokens": 4, "temperature": 0})
}

/// A decode worker that cannot get a prompt's 15 MB of KV within its transfer timeout
/// prefills the prompt itself: the client sees the same answer, the timeout is counted, and
/// the prefill worker's staging slots come back when the lease it left expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_that_times_out_falls_back_to_local_prefill() -> Result<()> {
    let http = reqwest::Client::new();
    let n = Native::start(&http, &["--kv-lease-ms", "500"], &["--kv-transfer-timeout-ms", "1"]).await?;
    let slots = n.prefill.free(&http).await?.1;
    n.same_answer(&http, &prompt(1, 320)).await?;
    // The deadline may pass while the decode worker still connects (then no transfer was
    // posted) or during the READ (then the transfer itself times out): either way nothing
    // is imported and the fallback is counted.
    let fallbacks = n
        .decode
        .metric(&http, "turbine_worker_disagg_total", &["event=\"fetch_failures\""])
        .await?;
    let fetched = n
        .decode
        .metric(&http, "turbine_worker_disagg_total", &["event=\"blocks_fetched\""])
        .await?;
    ensure!(
        (fallbacks, fetched) == (1.0, 0.0),
        "fallbacks {fallbacks}, blocks fetched {fetched}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while n.prefill.free(&http).await?.1 != slots {
        ensure!(Instant::now() < deadline, "the expired lease's slots never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A decode worker whose KV blocks are another size than the prefill worker's is refused
/// at the transfer handshake, before any byte moves, and prefills the prompt itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_another_kv_layout_is_refused_at_the_handshake() -> Result<()> {
    let http = reqwest::Client::new();
    let n = Native::start(&http, &[], &["--block-size", "32"]).await?;
    n.same_answer(&http, &prompt(2, 100)).await?;
    let refused = n
        .decode
        .metric(&http, "turbine_transfer_peers_refused_total", &[])
        .await?;
    let fallbacks = n
        .decode
        .metric(&http, "turbine_worker_disagg_total", &["event=\"fetch_failures\""])
        .await?;
    let read = n
        .decode
        .metric(&http, "turbine_transfer_bytes_total", &["op=\"read\""])
        .await?;
    ensure!(
        (refused, fallbacks, read) == (1.0, 1.0, 0.0),
        "peers refused {refused}, fallbacks {fallbacks}, bytes read {read}"
    );
    Ok(())
}

/// A prefill worker that freezes (SIGSTOP) holds the request's prefill leg on an open
/// connection; once it has left discovery and stayed silent the frontend has the decode
/// worker prefill, so the client gets its answer within the worker's lease TTL and a few
/// seconds, not never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_prefill_worker_delays_a_request_boundedly() -> Result<()> {
    let http = reqwest::Client::new();
    let n = Native::start(&http, &[], &[]).await?;
    n.same_answer(&http, &prompt(3, 100)).await?;
    let body = prompt(4, 100);
    let (want, _) = complete(&http, &n.reference, &body).await?;
    n.prefill.proc.signal("STOP")?;
    let (got, took) = complete(&http, &n.url, &body).await?;
    ensure!(got == want, "disaggregated {got:?}, aggregated {want:?}");
    ensure!(took < Duration::from_secs(15), "took {took:?}");
    let failed = common::metric(
        &http,
        &n.url,
        &format!(
            "turbine_frontend_disagg_decisions_total{{decision=\"local_prefill_failed\",model=\"{SMOLLM2_NAME}\"}}"
        ),
    )
    .await?;
    ensure!(failed == 1.0, "local_prefill_failed = {failed}");
    n.prefill.proc.signal("CONT")?;
    Ok(())
}
