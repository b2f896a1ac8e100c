//! Helpers for the tests and benches that run `turbine` processes around real etcd and
//! nats-server processes (`scripts/install-etcd`, `scripts/install-nats` put them in
//! target/tools), all on loopback ports the OS chose.

// Each test or bench target uses only some of these.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

pub const BIN: &str = env!("CARGO_BIN_EXE_turbine");
const ETCD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/tools/etcd");
const NATS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/tools/nats-server");

/// A child process, killed when the test ends however it ends.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Sends `signal` (`TERM`, `STOP`, ...) to the process.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.0.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -{signal} failed");
        Ok(())
    }

    /// Kills the process at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        self.0.kill()?;
        self.0.wait()?;
        Ok(())
    }

    /// Waits for the process to exit on its own; its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Result<Option<i32>> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.0.try_wait()? {
                return Ok(s.code());
            }
            anyhow::ensure!(start.elapsed() < within, "still running after {within:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

const SMOLLM2: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../target/test-models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
);
/// The name SmolLM2 is served under.
pub const SMOLLM2_NAME: &str = "SmolLM2-135M-Instruct.Q4_1";

/// The path of the test model, or an error saying how to fetch it.
pub fn smollm2() -> Result<&'static str> {
    anyhow::ensure!(
        Path::new(SMOLLM2).exists(),
        "no model at {SMOLLM2}: run scripts/fetch-test-models"
    );
    Ok(SMOLLM2)
}

/// Token ids of a prompt of `len` tokens, starting from `seed`; any ids in SmolLM2's
/// vocabulary do.
pub fn token_ids(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| 200 + (seed * 977 + i * 31) % 20_000).collect()
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_for_port(port: u16, what: &str) -> Result<()> {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "{what} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A single-member etcd cluster with its data in a temporary directory; it can be killed
/// and restarted on the same ports and data.
pub struct Etcd {
    proc: Option<Proc>,
    dir: tempfile::TempDir,
    client: u16,
    peer: u16,
    /// `etcd://127.0.0.1:PORT`, for `--discovery`.
    pub url: String,
}

impl Etcd {
    pub fn start() -> Result<Self> {
        anyhow::ensure!(Path::new(ETCD).exists(), "no etcd at {ETCD}: run scripts/install-etcd");
        let (client, peer) = (free_port()?, free_port()?);
        let mut etcd = Self {
            proc: None,
            dir: tempfile::tempdir()?,
            client,
            peer,
            url: format!("etcd://127.0.0.1:{client}"),
        };
        etcd.restart()?;
        Ok(etcd)
    }

    /// Kills etcd without warning (SIGKILL).
    pub fn kill(&mut self) -> Result<()> {
        match self.proc.take() {
            Some(mut p) => p.kill(),
            None => Ok(()),
        }
    }

    /// Starts etcd (again) on its ports and data directory and waits until it listens.
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        let peer_url = format!("http://127.0.0.1:{}", self.peer);
        let client_url = format!("http://127.0.0.1:{}", self.client);
        let child = Command::new(ETCD)
            .args(["--name", "default", "--data-dir"])
            .arg(self.dir.path())
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
        self.proc = Some(Proc(child));
        wait_for_port(self.client, "etcd")
    }
}

/// A nats-server; `url` is `nats://127.0.0.1:PORT`, for `--events`.
pub fn start_nats() -> Result<(Proc, String)> {
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
    wait_for_port(port, "nats-server")?;
    Ok((nats, format!("nats://127.0.0.1:{port}")))
}

/// Starts `turbine ARGS` and waits for the stdout line starting with `ready`; returns the
/// rest of that line.
pub fn start(args: &[&str], ready: &str) -> Result<(Proc, String)> {
    let (proc, mut rest) = start_until(args, &[ready])?;
    Ok((proc, rest.remove(0)))
}

/// Starts `turbine ARGS` and waits for a line starting with each of `ready`, in any order;
/// returns the rest of each line, in `ready`'s order.
pub fn start_until(args: &[&str], ready: &[&str]) -> Result<(Proc, Vec<String>)> {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let proc = Proc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    let ready: Vec<String> = ready.iter().map(|r| (*r).to_owned()).collect();
    let n = ready.len();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            for (i, r) in ready.iter().enumerate() {
                if let Some(rest) = line.strip_prefix(r.as_str()) {
                    let _ = tx.send((i, rest.to_owned()));
                }
            }
        }
    });
    let mut found = vec![None; n];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while found.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let (i, rest) = rx
            .recv_timeout(left)
            .with_context(|| format!("turbine {args:?} did not start"))?;
        found[i] = Some(rest);
    }
    Ok((proc, found.into_iter().flatten().collect()))
}

/// Starts `turbine worker ARGS`; returns it and its instance id (hex, as `/health` lists it).
pub fn start_worker(args: &[&str]) -> Result<(Proc, String)> {
    let mut all = vec!["worker"];
    all.extend_from_slice(args);
    let (proc, rest) = start(&all, "turbine: worker ")?;
    let id = rest.split(' ').next().context("no instance id")?.to_owned();
    Ok((proc, id))
}

/// Starts `turbine worker ARGS --metrics-port 0`; returns it, its instance id and the URL
/// of its metrics.
pub fn start_worker_with_metrics(args: &[&str]) -> Result<(Proc, String, String)> {
    let mut all = vec!["worker"];
    all.extend_from_slice(args);
    all.extend(["--metrics-port", "0"]);
    let (proc, rest) = start_until(&all, &["turbine: worker ", "turbine: metrics on "])?;
    let id = rest[0].split(' ').next().context("no instance id")?.to_owned();
    Ok((proc, id, rest[1].clone()))
}

/// The arguments of an echo worker that answers at once, registered in etcd at
/// `discovery` under a lease of `lease_ttl_secs`.
pub fn echo_worker_args<'a>(discovery: &'a str, lease_ttl_secs: &'a str) -> [&'a str; 8] {
    [
        "--engine",
        "echo",
        "--discovery",
        discovery,
        "--echo-delay-ms",
        "0",
        "--lease-ttl-secs",
        lease_ttl_secs,
    ]
}

/// The arguments of a mocker worker at speedup 2, registered in etcd at `discovery` under
/// a lease of `lease_ttl_secs`.
pub fn mocker_worker_args<'a>(discovery: &'a str, lease_ttl_secs: &'a str) -> [&'a str; 8] {
    [
        "--discovery",
        discovery,
        "--engine",
        "mocker",
        "--speedup",
        "2",
        "--lease-ttl-secs",
        lease_ttl_secs,
    ]
}

/// Starts `turbine frontend ARGS` on a free port; returns it and its base URL.
pub fn start_frontend(args: &[&str]) -> Result<(Proc, String)> {
    let mut all = vec!["frontend", "--port", "0"];
    all.extend_from_slice(args);
    start(&all, "turbine: listening on ")
}

/// The instances of `model` that the frontend at `url` routes to, by id.
pub async fn instances(http: &reqwest::Client, url: &str, model: &str) -> Result<BTreeSet<String>> {
    let health: Value = http.get(format!("{url}/health")).send().await?.json().await?;
    Ok(health["models"][model]["instances"]
        .as_array()
        .map(|ids| ids.iter().filter_map(|i| i.as_str().map(str::to_owned)).collect())
        .unwrap_or_default())
}

/// Waits until the frontend at `url` routes `model` to `want` instances; how long it took.
pub async fn wait_for_instances(
    http: &reqwest::Client,
    url: &str,
    model: &str,
    want: usize,
    within: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let got = instances(http, url, model).await?;
        if got.len() == want {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            bail!("{model}: still {got:?} after {within:?}, want {want} instances");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn complete(http: &reqwest::Client, url: &str, prompt: &str) -> Result<(u16, Value)> {
    let r = http
        .post(format!("{url}/v1/completions"))
        .json(&json!({"model": "echo", "prompt": prompt}))
        .send()
        .await?;
    Ok((r.status().as_u16(), r.json().await?))
}

/// The value of the sample whose line starts with `series ` in the frontend's `/metrics`
/// (0 when it has none yet).
pub async fn metric(http: &reqwest::Client, url: &str, series: &str) -> Result<f64> {
    let metrics = http.get(format!("{url}/metrics")).send().await?.text().await?;
    let value = metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(Ok(0.0), str::parse)?;
    Ok(value)
}

/// Streamed completions under way, each asked for the same number of tokens.
pub struct Load {
    clients: Vec<tokio::task::JoinHandle<Result<String>>>,
    max_tokens: u64,
}

impl Load {
    /// Starts `requests` concurrent streamed completions of `model`, `max_tokens` each.
    pub fn start(http: &reqwest::Client, url: &str, model: &str, requests: usize, max_tokens: u64) -> Self {
        let clients = (0..requests)
            .map(|i| {
                let (http, url) = (http.clone(), url.to_owned());
                let body = json!({
                    "model": model, "prompt": format!("request {i}"), "max_tokens": max_tokens,
                    "stream": true, "stream_options": {"include_usage": true},
                });
                tokio::spawn(async move {
                    let r = http.post(format!("{url}/v1/completions")).json(&body).send().await?;
                    anyhow::ensure!(r.status() == 200, "status {}", r.status());
                    Ok(r.text().await?)
                })
            })
            .collect();
        Self { clients, max_tokens }
    }

    /// Waits for every request and checks that each streamed all its tokens and finished
    /// normally, with no error on the way: what a client sees when nothing went wrong.
    pub async fn finish(self) -> Result<()> {
        for (i, client) in self.clients.into_iter().enumerate() {
            let text = tokio::time::timeout(Duration::from_secs(30), client)
                .await
                .with_context(|| format!("request {i} still running"))???;
            let chunks: Vec<Value> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter(|d| *d != "[DONE]")
                .map(serde_json::from_str)
                .collect::<Result<_, _>>()?;
            anyhow::ensure!(chunks.iter().all(|c| c.get("error").is_none()), "request {i}: {text}");
            let finish: Vec<&Value> = chunks
                .iter()
                .map(|c| &c["choices"][0]["finish_reason"])
                .filter(|f| !f.is_null())
                .collect();
            anyhow::ensure!(finish == [&json!("length")], "request {i}: {text}");
            let usage = chunks.last().and_then(|c| c["usage"]["completion_tokens"].as_u64());
            anyhow::ensure!(usage == Some(self.max_tokens), "request {i}: {text}");
            anyhow::ensure!(text.ends_with("data: [DONE]\n\n"), "request {i}: {text}");
        }
        Ok(())
    }
}

/// Writes a mocker's capacity model at `engine_speedup` (`turbine profile`) into `dir`;
/// returns its path.
pub fn write_profile(dir: &Path, engine_speedup: &str) -> Result<String> {
    let path = dir.join("mocker.json");
    let path = path.to_str().context("a UTF-8 path")?.to_owned();
    let status = Command::new(BIN)
        .args(["profile", "--engine-speedup", engine_speedup, "--output", &path])
        .status()?;
    anyhow::ensure!(status.success(), "turbine profile failed");
    Ok(path)
}
