//! `turbine frontend` and `turbine worker` as separate processes around real etcd and NATS
//! servers: discovery, routing over TCP, workers killed without warning or stopped
//! gracefully, etcd and NATS lost under load, and frontends that agree on routing.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::{
    complete, echo_worker_args, instances, metric, mocker_worker_args, start_frontend, start_nats, start_worker,
    wait_for_instances, Etcd, Load, Proc, BIN,
};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontend_and_workers_in_separate_processes() -> Result<()> {
    let etcd = Etcd::start()?;
    let worker_args = echo_worker_args(&etcd.url, "2");
    let (mut doomed, _) = start_worker(&worker_args)?;
    let (mut graceful, _) = start_worker(&worker_args)?;
    let (_frontend, url) = start_frontend(&["--discovery", &etcd.url])?;
    let http = reqwest::Client::new();
    wait_for_instances(&http, &url, "echo", 2, Duration::from_secs(10)).await?;
    for i in 0..20 {
        let (status, r) = complete(&http, &url, &format!("p{i}")).await?;
        assert_eq!(
            (status, r["choices"][0]["text"].as_str()),
            (200, Some(format!("p{i}").as_str()))
        );
    }

    // Killed without warning: its connection is refused at once, so requests go to the
    // other worker; its registration goes when its lease expires.
    doomed.kill()?;
    for i in 0..20 {
        let (status, r) = complete(&http, &url, &format!("q{i}")).await?;
        assert_eq!(status, 200, "{r}");
    }
    let gone = wait_for_instances(&http, &url, "echo", 1, Duration::from_secs(5)).await?;
    assert!(gone < Duration::from_secs(4), "lease of 2 s took {gone:?}");

    // Stopped gracefully: it deregisters at once and exits cleanly.
    graceful.signal("TERM")?;
    assert_eq!(graceful.wait_exit(Duration::from_secs(10))?, Some(0));
    wait_for_instances(&http, &url, "echo", 0, Duration::from_secs(2)).await?;
    let (status, r) = complete(&http, &url, "x").await?;
    assert_eq!(status, 503, "a known model with no workers: {r}");
    Ok(())
}

#[test]
fn bad_discovery_fails_with_one_line_naming_it() -> Result<()> {
    for (args, needle) in [
        (&["frontend", "--discovery", "consul://x:1"][..], "consul://x:1"),
        (
            &["worker", "--engine", "echo", "--discovery", "etcd://nohost"],
            "etcd://nohost",
        ),
        (
            &["worker", "--engine", "echo", "--discovery", "etcd://127.0.0.1:1"],
            "127.0.0.1:1",
        ),
    ] {
        let out = Command::new(BIN).args(args).output()?;
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8(out.stderr)?;
        let last = err.lines().last().unwrap_or_default();
        assert!(last.contains(needle), "{args:?}: {err}");
    }
    Ok(())
}

/// A prompt family: prompts that start with it share its KV blocks (about 45 of 16 tokens).
fn family(f: usize) -> String {
    format!("family {f} ").repeat(80)
}

/// Sends one completion of `prompt` to the frontend at `url`; its response and the worker
/// that took it.
async fn routed(http: &reqwest::Client, url: &str, prompt: String) -> Result<(Value, String)> {
    let body = json!({"model": "mocker", "prompt": prompt, "max_tokens": 2});
    let r = http.post(format!("{url}/v1/completions")).json(&body).send().await?;
    anyhow::ensure!(r.status() == 200, "status {}", r.status());
    let worker = r
        .headers()
        .get("x-turbine-worker")
        .context("no x-turbine-worker header")?
        .to_str()?
        .to_owned();
    let r: Value = r.json().await?;
    anyhow::ensure!(r["choices"][0]["finish_reason"] == "length", "{r}");
    Ok((r, worker))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_events_cross_processes_over_nats() -> Result<()> {
    let etcd = Etcd::start()?;
    let (mut nats, events) = start_nats()?;
    let cluster = ["--discovery", etcd.url.as_str(), "--events", events.as_str()];
    let worker = |seed: &'static str| {
        let mut args = vec!["--engine", "mocker", "--speedup", "10", "--seed", seed];
        args.extend(cluster);
        start_worker(&args)
    };
    let (_w1, _) = worker("1")?;
    let (_w2, _) = worker("2")?;
    let frontend = || {
        let mut args = vec!["--router-mode", "kv"];
        args.extend(cluster);
        start_frontend(&args)
    };
    let (_a, url_a) = frontend()?;
    let (_b, url_b) = frontend()?;
    let http = reqwest::Client::new();
    for url in [&url_a, &url_b] {
        wait_for_instances(&http, url, "mocker", 2, Duration::from_secs(10)).await?;
    }
    // Frontend A places six prompt families; frontend B has routed nothing, so only the
    // workers' KV events, over NATS, can tell it where each family's blocks are cached.
    let cached = |r: &Value| {
        r["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0)
    };
    for f in 0..6 {
        routed(&http, &url_a, family(f) + "first").await?;
    }
    // Events are asynchronous, and nothing shows when a frontend has applied them: give
    // them a moment to arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for f in 0..6 {
        let (r, _) = routed(&http, &url_b, family(f) + "second").await?;
        let prompt_len = family(f).len() as u64;
        assert!(
            cached(&r) >= prompt_len - 16,
            "family {f}: {} of {prompt_len} cached: {r}",
            cached(&r)
        );
    }

    // NATS goes away under load: routing falls back to predictions, says so, and loses no
    // request, neither those under way nor those that arrive meanwhile.
    const FALLBACK: &str = "turbine_frontend_kv_fallback_decisions_total";
    assert_eq!(metric(&http, &url_b, FALLBACK).await?, 0.0);
    let load = Load::start(&http, &url_b, "mocker", 200, 100);
    tokio::time::sleep(Duration::from_millis(200)).await;
    nats.kill()?;
    let start_wait = Instant::now();
    let mut i = 0;
    while metric(&http, &url_b, FALLBACK).await? < 1.0 {
        anyhow::ensure!(start_wait.elapsed() < Duration::from_secs(10), "no fallback counted");
        routed(&http, &url_b, format!("{}during {i}", family(i % 6))).await?;
        i += 1;
    }
    load.finish().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_migrate_when_their_worker_is_killed() -> Result<()> {
    let etcd = Etcd::start()?;
    let worker = ["--discovery", &etcd.url, "--engine", "mocker", "--speedup", "2"];
    let (mut doomed, _) = start_worker(&worker)?;
    let _survivors = [start_worker(&worker)?, start_worker(&worker)?];
    let (_frontend, url) = start_frontend(&["--discovery", &etcd.url])?;
    let http = reqwest::Client::new();
    wait_for_instances(&http, &url, "mocker", 3, Duration::from_secs(10)).await?;
    // Long enough (about a second at this speedup) that a third of the streams are on the
    // doomed worker, mid-generation, when it dies, however slow the machine.
    let load = Load::start(&http, &url, "mocker", 200, 300);
    tokio::time::sleep(Duration::from_millis(300)).await;
    doomed.kill()?;
    load.finish().await?;
    let migrated = metric(&http, &url, "turbine_frontend_migrations_total{model=\"mocker\"}").await?;
    assert!(migrated >= 1.0, "no migrations counted");
    Ok(())
}

/// A worker to freeze and one to survive, on 2 s leases, behind a frontend started with
/// `frontend_args` besides discovery, once it lists both.
struct FreezeTest {
    frozen: Proc,
    _survivor: Proc,
    _frontend: Proc,
    _etcd: Etcd,
    url: String,
    http: reqwest::Client,
}

impl FreezeTest {
    async fn start(frontend_args: &[&str]) -> Result<Self> {
        let etcd = Etcd::start()?;
        let worker = mocker_worker_args(&etcd.url, "2");
        let (frozen, _) = start_worker(&worker)?;
        let (_survivor, _) = start_worker(&worker)?;
        let (_frontend, url) = start_frontend(&[&["--discovery", etcd.url.as_str()], frontend_args].concat())?;
        let http = reqwest::Client::new();
        wait_for_instances(&http, &url, "mocker", 2, Duration::from_secs(10)).await?;
        Ok(Self {
            frozen,
            _survivor,
            _frontend,
            _etcd: etcd,
            url,
            http,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_migrate_off_a_frozen_worker_once_its_lease_expires() -> Result<()> {
    let t = FreezeTest::start(&[]).await?;
    // Long enough that its streams are mid-generation when it freezes, however slow the machine.
    let before = Load::start(&t.http, &t.url, "mocker", 200, 300);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Its connections stay open and its streams just stop: only its lease tells.
    t.frozen.signal("STOP")?;
    // Half of these go to the frozen worker while it is still listed, and wait there.
    let during = Load::start(&t.http, &t.url, "mocker", 20, 60);
    before.finish().await?;
    during.finish().await?;
    let migrated = metric(&t.http, &t.url, "turbine_frontend_migrations_total{model=\"mocker\"}").await?;
    assert!(migrated >= 1.0, "no migrations counted");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_migration_a_frozen_workers_requests_fail_instead_of_hanging() -> Result<()> {
    let t = FreezeTest::start(&["--migration-limit", "0"]).await?;
    let clients: Vec<_> = (0..40)
        .map(|i| {
            let (http, url) = (t.http.clone(), t.url.clone());
            let body = json!({"model": "mocker", "prompt": format!("request {i}"), "max_tokens": 300, "stream": true});
            tokio::spawn(async move {
                anyhow::Ok(
                    http.post(format!("{url}/v1/completions"))
                        .json(&body)
                        .send()
                        .await?
                        .text()
                        .await?,
                )
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    t.frozen.signal("STOP")?;
    // The lease (2 s) and the silence after it (1 s) end the frozen worker's streams.
    let (mut failed, mut finished) = (0, 0);
    for (i, client) in clients.into_iter().enumerate() {
        let text = tokio::time::timeout(Duration::from_secs(20), client)
            .await
            .with_context(|| format!("request {i} still waiting on the frozen worker"))???;
        if text.contains("\"error\"") {
            failed += 1;
        } else {
            anyhow::ensure!(text.contains("\"finish_reason\":\"length\""), "request {i}: {text}");
            finished += 1;
        }
    }
    anyhow::ensure!(failed > 0 && finished > 0, "{failed} failed, {finished} finished");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_etcd_during_load_loses_no_request() -> Result<()> {
    let mut etcd = Etcd::start()?;
    let discovery = etcd.url.clone();
    const TTL: Duration = Duration::from_secs(2);
    let worker = mocker_worker_args(&discovery, "2");
    let mut ids = BTreeSet::new();
    let mut workers = Vec::new();
    for _ in 0..3 {
        let (w, id) = start_worker(&worker)?;
        workers.push(w);
        ids.insert(id);
    }
    let (_frontend, url) = start_frontend(&["--discovery", &discovery])?;
    let http = reqwest::Client::new();
    wait_for_instances(&http, &url, "mocker", 3, Duration::from_secs(10)).await?;

    // Long enough (about 3 s) to stream through etcd's outage and restart.
    let before = Load::start(&http, &url, "mocker", 200, 150);
    tokio::time::sleep(Duration::from_millis(300)).await;
    etcd.kill()?;
    // Requests that arrive meanwhile are routed on the last known state.
    let during = Load::start(&http, &url, "mocker", 50, 60);
    // Down for longer than a keep-alive period, so that the workers' keep-alives and the
    // frontend's watch fail while requests stream.
    tokio::time::sleep(TTL / 2).await;
    etcd.restart()?;
    let after = Load::start(&http, &url, "mocker", 50, 60);
    for load in [before, during, after] {
        load.finish().await?;
    }

    // Discovery follows changes again: a worker started now is seen, beside the others.
    let (_late, id) = start_worker(&worker)?;
    ids.insert(id);
    wait_for_instances(&http, &url, "mocker", 4, Duration::from_secs(10)).await?;
    // And every worker keeps its registration alive: a worker whose keep-alive stopped
    // would vanish within one lease TTL, so watch for a little longer than that.
    let start = Instant::now();
    while start.elapsed() < TTL + TTL / 2 {
        assert_eq!(instances(&http, &url, "mocker").await?, ids);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_frontends_fed_the_same_traffic_route_it_alike() -> Result<()> {
    let etcd = Etcd::start()?;
    let (_nats, events) = start_nats()?;
    let cluster = ["--discovery", etcd.url.as_str(), "--events", events.as_str()];
    let mut workers = Vec::new();
    for seed in ["1", "2", "3"] {
        let mut args = vec!["--engine", "mocker", "--speedup", "10", "--seed", seed];
        args.extend(cluster);
        workers.push(start_worker(&args)?);
    }
    let frontend = || {
        let mut args = vec!["--router-mode", "kv", "--kv-temperature", "0"];
        args.extend(cluster);
        start_frontend(&args)
    };
    let (_a, url_a) = frontend()?;
    let (_b, url_b) = frontend()?;
    let http = reqwest::Client::new();
    for url in [&url_a, &url_b] {
        wait_for_instances(&http, url, "mocker", 3, Duration::from_secs(10)).await?;
    }

    // Six prompt families sent at once through A: its account of their load spreads them
    // over the workers, whose KV events then tell both frontends where each one is cached.
    let primes: Vec<_> = (0..6)
        .map(|f| {
            let (http, url) = (http.clone(), url_a.clone());
            tokio::spawn(async move { routed(&http, &url, family(f) + "first").await })
        })
        .collect();
    let mut home = Vec::new();
    for p in primes {
        home.push(p.await??.1);
    }
    let used: BTreeSet<&String> = home.iter().collect();
    assert!(used.len() >= 2, "every family went to one worker: {home:?}");
    // Nothing shows when a frontend has applied the events: give them a moment to arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The same traffic through each frontend in turn, one request at a time, so that both
    // see the same cache and load for each decision; each round, the other goes first.
    // Their prompts differ only in the last block, so that the blocks the first one caches
    // do not decide the second's choice.
    let mut choices = Vec::new();
    for round in 0..2 {
        for (f, home) in home.iter().enumerate() {
            let order = if round == 0 { [&url_a, &url_b] } else { [&url_b, &url_a] };
            let prompt = |n: usize| family(f) + &format!("round {round}, request {n}");
            let (_, first) = routed(&http, order[0], prompt(0)).await?;
            let (_, second) = routed(&http, order[1], prompt(1)).await?;
            choices.push((f, round, home.clone(), first, second));
        }
    }
    let disagree: Vec<_> = choices
        .iter()
        .filter(|(_, _, home, first, second)| first != second || first != home)
        .collect();
    assert!(
        disagree.is_empty(),
        "(family, round, cached on, first frontend's choice, second's): {disagree:?}"
    );
    Ok(())
}
