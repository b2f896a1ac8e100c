//! `turbine frontend` and `turbine worker` as separate processes around a real etcd
//! (`scripts/install-etcd` puts one in target/tools): discovery, routing over TCP, a worker
//! killed without warning, and one stopped gracefully.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_turbine");
const ETCD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/tools/etcd");
const NATS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/tools/nats-server");

/// A child process, killed when the test ends however it ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start_etcd(dir: &Path) -> Result<(Proc, String)> {
    anyhow::ensure!(Path::new(ETCD).exists(), "no etcd at {ETCD}: run scripts/install-etcd");
    let (client, peer) = (free_port()?, free_port()?);
    let peer_url = format!("http://127.0.0.1:{peer}");
    let client_url = format!("http://127.0.0.1:{client}");
    let child = Command::new(ETCD)
        .args(["--name", "default", "--data-dir"])
        .arg(dir)
        .args([
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("default={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let etcd = Proc(child);
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", client)).is_err() {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "etcd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((etcd, format!("etcd://127.0.0.1:{client}")))
}

fn start_nats() -> Result<(Proc, String)> {
    anyhow::ensure!(
        Path::new(NATS).exists(),
        "no nats-server at {NATS}: run scripts/install-nats"
    );
    let port = free_port()?;
    let child = Command::new(NATS)
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let nats = Proc(child);
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((nats, format!("nats://127.0.0.1:{port}")))
}

/// Starts `turbine ARGS` and waits for the stdout line starting with `ready`; returns the
/// rest of that line.
fn start(args: &[&str], ready: &str) -> Result<(Proc, String)> {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let proc = Proc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    let ready = ready.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix(&ready) {
                let _ = tx.send(rest.to_owned());
            }
        }
    });
    let rest = rx
        .recv_timeout(Duration::from_secs(30))
        .with_context(|| format!("turbine {args:?} did not start"))?;
    Ok((proc, rest))
}

async fn instances(http: &reqwest::Client, url: &str) -> Result<usize> {
    let health: Value = http.get(format!("{url}/health")).send().await?.json().await?;
    Ok(health["models"]["echo"]["instances"].as_array().map_or(0, Vec::len))
}

async fn wait_for_instances(http: &reqwest::Client, url: &str, want: usize, within: Duration) -> Result<Duration> {
    let start = Instant::now();
    while instances(http, url).await? != want {
        if start.elapsed() > within {
            bail!(
                "still {} instances after {within:?}, want {want}",
                instances(http, url).await?
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(start.elapsed())
}

async fn complete(http: &reqwest::Client, url: &str, prompt: &str) -> Result<(u16, Value)> {
    let r = http
        .post(format!("{url}/v1/completions"))
        .json(&json!({"model": "echo", "prompt": prompt}))
        .send()
        .await?;
    Ok((r.status().as_u16(), r.json().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frontend_and_workers_in_separate_processes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_etcd, discovery) = start_etcd(dir.path())?;
    let worker_args = [
        "worker",
        "--engine",
        "echo",
        "--discovery",
        &discovery,
        "--echo-delay-ms",
        "0",
        "--lease-ttl-secs",
        "2",
    ];
    let (mut doomed, _) = start(&worker_args, "turbine: worker ")?;
    let (mut graceful, _) = start(&worker_args, "turbine: worker ")?;
    let (_frontend, url) = start(
        &["frontend", "--discovery", &discovery, "--port", "0"],
        "turbine: listening on ",
    )?;
    let http = reqwest::Client::new();
    wait_for_instances(&http, &url, 2, Duration::from_secs(10)).await?;
    for i in 0..20 {
        let (status, r) = complete(&http, &url, &format!("p{i}")).await?;
        assert_eq!(
            (status, r["choices"][0]["text"].as_str()),
            (200, Some(format!("p{i}").as_str()))
        );
    }

    // Killed without warning: its connection is refused at once, so requests go to the
    // other worker; its registration goes when its lease expires.
    doomed.0.kill()?;
    doomed.0.wait()?;
    for i in 0..20 {
        let (status, r) = complete(&http, &url, &format!("q{i}")).await?;
        assert_eq!(status, 200, "{r}");
    }
    let gone = wait_for_instances(&http, &url, 1, Duration::from_secs(5)).await?;
    assert!(gone < Duration::from_secs(4), "lease of 2 s took {gone:?}");

    // Stopped gracefully: it deregisters at once and exits cleanly.
    let status = Command::new("kill")
        .args(["-TERM", &graceful.0.id().to_string()])
        .status()?;
    assert!(status.success());
    let start = Instant::now();
    let code = loop {
        if let Some(s) = graceful.0.try_wait()? {
            break s.code();
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "worker still running");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(0));
    wait_for_instances(&http, &url, 0, Duration::from_secs(2)).await?;
    let (status, r) = complete(&http, &url, "x").await?;
    assert_eq!(status, 503, "a known model with no workers: {r}");
    Ok(())
}

#[test]
fn bad_discovery_fails_with_one_line_naming_it() -> Result<()> {
    for (args, needle) in [
        (&["frontend", "--discovery", "consul://x:1"][..], "consul://x:1"),
        (&["worker", "--discovery", "etcd://nohost"], "etcd://nohost"),
        (&["worker", "--discovery", "etcd://127.0.0.1:1"], "127.0.0.1:1"),
    ] {
        let out = Command::new(BIN).args(args).output()?;
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8(out.stderr)?;
        let last = err.lines().last().unwrap_or_default();
        assert!(last.contains(needle), "{args:?}: {err}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_events_cross_processes_over_nats() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_etcd, discovery) = start_etcd(dir.path())?;
    let (nats, events) = start_nats()?;
    let cluster = ["--discovery", discovery.as_str(), "--events", events.as_str()];
    let worker = |seed: &'static str| {
        let mut args = vec!["worker", "--engine", "mocker", "--speedup", "100", "--seed", seed];
        args.extend(cluster);
        start(&args, "turbine: worker ")
    };
    let (_w1, _) = worker("1")?;
    let (_w2, _) = worker("2")?;
    let frontend = || {
        let mut args = vec!["frontend", "--port", "0", "--router-mode", "kv"];
        args.extend(cluster);
        start(&args, "turbine: listening on ")
    };
    let (_a, url_a) = frontend()?;
    let (_b, url_b) = frontend()?;
    let http = reqwest::Client::new();
    for url in [&url_a, &url_b] {
        let start = Instant::now();
        loop {
            let health: Value = http.get(format!("{url}/health")).send().await?.json().await?;
            if health["models"]["mocker"]["instances"].as_array().map_or(0, Vec::len) == 2 {
                break;
            }
            anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "workers not seen: {health}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Frontend A places six prompt families; frontend B has routed nothing, so only the
    // workers' KV events, over NATS, can tell it where each family's blocks are cached.
    let family = |f: usize| format!("family {f} ").repeat(40);
    let cached = |r: &Value| {
        r["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0)
    };
    for f in 0..6 {
        let body = json!({"model": "mocker", "prompt": family(f) + "first", "max_tokens": 2});
        let r: Value = http
            .post(format!("{url_a}/v1/completions"))
            .json(&body)
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(r["choices"][0]["finish_reason"], "length", "{r}");
    }
    // Events are asynchronous: give them a moment to arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for f in 0..6 {
        let body = json!({"model": "mocker", "prompt": family(f) + "second", "max_tokens": 2});
        let r: Value = http
            .post(format!("{url_b}/v1/completions"))
            .json(&body)
            .send()
            .await?
            .json()
            .await?;
        let prompt_len = family(f).len() as u64;
        assert!(
            cached(&r) >= prompt_len - 16,
            "family {f}: {} of {prompt_len} cached: {r}",
            cached(&r)
        );
    }

    // NATS goes away: routing falls back to predictions, says so, and loses no request.
    drop(nats);
    let start_wait = Instant::now();
    loop {
        let body = json!({"model": "mocker", "prompt": family(0) + "third", "max_tokens": 2});
        let r = http.post(format!("{url_b}/v1/completions")).json(&body).send().await?;
        assert_eq!(r.status(), 200);
        let metrics = http.get(format!("{url_b}/metrics")).send().await?.text().await?;
        let fallback = metrics
            .lines()
            .find_map(|l| l.strip_prefix("turbine_frontend_kv_fallback_decisions_total "))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if fallback >= 1.0 {
            break;
        }
        anyhow::ensure!(start_wait.elapsed() < Duration::from_secs(10), "no fallback counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_migrate_when_their_worker_is_killed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_etcd, discovery) = start_etcd(dir.path())?;
    let worker = [
        "worker",
        "--discovery",
        &discovery,
        "--engine",
        "mocker",
        "--speedup",
        "2",
    ];
    let (mut doomed, _) = start(&worker, "turbine: worker ")?;
    let (_survivor, _) = start(&worker, "turbine: worker ")?;
    let (_frontend, url) = start(
        &["frontend", "--discovery", &discovery, "--port", "0"],
        "turbine: listening on ",
    )?;
    let http = reqwest::Client::new();
    let start_wait = Instant::now();
    loop {
        let health: Value = http.get(format!("{url}/health")).send().await?.json().await?;
        if health["models"]["mocker"]["instances"].as_array().map_or(0, Vec::len) == 2 {
            break;
        }
        anyhow::ensure!(start_wait.elapsed() < Duration::from_secs(10), "workers not seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    const REQUESTS: usize = 200;
    const MAX_TOKENS: u64 = 60;
    let mut clients = Vec::new();
    for i in 0..REQUESTS {
        let (http, url) = (http.clone(), url.clone());
        clients.push(tokio::spawn(async move {
            let body = json!({
                "model": "mocker", "prompt": format!("request {i}"), "max_tokens": MAX_TOKENS,
                "stream": true, "stream_options": {"include_usage": true},
            });
            let text = http
                .post(format!("{url}/v1/completions"))
                .json(&body)
                .send()
                .await?
                .text()
                .await?;
            anyhow::Ok(text)
        }));
    }
    // Half the streams are on the doomed worker, mid-generation, when it dies.
    tokio::time::sleep(Duration::from_millis(300)).await;
    doomed.0.kill()?;
    doomed.0.wait()?;
    for (i, client) in clients.into_iter().enumerate() {
        let text = client.await??;
        let chunks: Vec<Value> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        assert!(chunks.iter().all(|c| c.get("error").is_none()), "request {i}: {text}");
        let finish: Vec<&Value> = chunks
            .iter()
            .map(|c| &c["choices"][0]["finish_reason"])
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finish, [&json!("length")], "request {i}: {text}");
        let usage = chunks.last().map(|c| c["usage"]["completion_tokens"].as_u64());
        assert_eq!(usage, Some(Some(MAX_TOKENS)), "request {i}: {text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "request {i}");
    }
    let metrics = http.get(format!("{url}/metrics")).send().await?.text().await?;
    let migrated: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("turbine_frontend_migrations_total{model=\"mocker\"} "))
        .context("no migrations counted")?
        .parse()?;
    assert!(migrated >= 1.0, "{metrics}");
    Ok(())
}
