//! The `turbine` binary as a user runs it: real processes on OS-chosen ports.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_turbine");

/// A `turbine serve` process, killed if the test ends early.
struct Server {
    child: Child,
    url: String,
    log: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(args: &[&str]) -> Result<Self> {
        let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("serve-{}.log", rand_suffix()));
        let mut child = Command::new(BIN)
            .args(["serve", "--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("turbine: listening on ") {
                    let _ = tx.send(url.to_owned());
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(url) => url,
            Err(_) => bail!(
                "server did not report its address; log:\n{}",
                std::fs::read_to_string(&log)?
            ),
        };
        Ok(Self { child, url, log })
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit and returns its exit code.
    fn wait_exit(&mut self, deadline: Duration) -> Result<Option<i32>> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code());
            }
            if start.elapsed() > deadline {
                bail!("process still running after {deadline:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id())
}

#[test]
fn help_is_accurate() -> Result<()> {
    let out = Command::new(BIN).arg("--help").output()?;
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout)?;
    assert!(text.contains("serve"), "{text}");
    let out = Command::new(BIN).args(["serve", "--help"]).output()?;
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout)?;
    for flag in [
        "--host",
        "--port",
        "--workers",
        "--engine",
        "--request-plane",
        "--router-mode",
        "--grace-period-secs",
    ] {
        assert!(text.contains(flag), "serve --help lacks {flag}:\n{text}");
    }
    Ok(())
}

/// Runs the binary with `args` and checks that it fails with `needle` on stderr's first line.
fn fails_with_first_line_naming(args: &[&str], needle: &str) -> Result<()> {
    let out = Command::new(BIN).args(args).output()?;
    assert!(!out.status.success(), "{args:?} succeeded");
    let err = String::from_utf8(out.stderr)?;
    let first = err.lines().next().unwrap_or_default();
    assert!(
        first.contains(needle),
        "{args:?}: first line {first:?} should name {needle:?}"
    );
    Ok(())
}

#[test]
fn a_bad_pin_file_fails_with_one_line_naming_the_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("pins.jsonl");
    let base = [
        "serve",
        "--engine",
        "mocker",
        "--kvbm-host-blocks",
        "8192",
        "--kvbm-pin-prompts",
    ];
    let path = file.to_str().context("a UTF-8 path")?;
    let args: Vec<&str> = base.iter().copied().chain([path]).collect();
    std::fs::write(
        &file,
        "{\"system\": \"You are a helpful assistant who answers briefly.\"}\n\n{\"sys\": 1}\n",
    )?;
    fails_with_first_line_naming(&args, "line 3: expected {\"system\"")?;
    std::fs::write(&file, "{\"prompt\": \"Hi\"}\n")?;
    fails_with_first_line_naming(&args, "line 1: fewer tokens (1) than one block (16)")?;
    std::fs::write(&file, "")?;
    fails_with_first_line_naming(&args, "no prompt in the file")?;
    let missing = dir.path().join("none.jsonl");
    let args: Vec<&str> = base
        .iter()
        .copied()
        .chain([missing.to_str().context("a UTF-8 path")?])
        .collect();
    fails_with_first_line_naming(&args, "none.jsonl")?;
    fails_with_first_line_naming(
        &["serve", "--engine", "mocker", "--kvbm-pin-prompts", path],
        "give a host or a disk tier",
    )?;
    Ok(())
}

#[test]
fn bad_arguments_fail_with_one_line_naming_the_value() -> Result<()> {
    for (args, needle) in [
        (&["serve", "--workers", "0"][..], "0"),
        (&["serve", "--port", "eighty"], "eighty"),
        (&["serve", "--engine", "gpt"], "gpt"),
        (&["serve", "--kvbm-policy", "mru"], "mru"),
        (
            &["serve", "--kvbm-host-gib", "0"],
            "--kvbm-host-gib must be a positive number",
        ),
        (&["serve", "--kvbm-disk-gib", "1"], "--kvbm-disk-dir"),
        (
            &[
                "serve",
                "--engine",
                "mocker",
                "--num-blocks",
                "64",
                "--kvbm-host-blocks",
                "10",
            ],
            "smaller than the engine's pool of 64 blocks",
        ),
        (
            &["serve", "--engine", "mocker", "--kvbm-prefetch", "sometimes"],
            "--kvbm-prefetch: unknown prefetch policy \"sometimes\"",
        ),
        (
            &[
                "serve",
                "--engine",
                "mocker",
                "--kvbm-host-blocks",
                "8192",
                "--kvbm-prefetch",
                "wait-complete",
            ],
            "needs both a host and a disk tier",
        ),
        (&["serve", "--host", "not-an-ip"], "not-an-ip"),
        (
            &["serve", "--kv-host-hit-weight", "1.5"],
            "--kv-host-hit-weight must be a number from 0 to 1, got 1.5",
        ),
        (
            &["serve", "--kv-disk-hit-weight=-0.25"],
            "--kv-disk-hit-weight must be a number from 0 to 1, got -0.25",
        ),
        (&["serve", "--engine", "vllm"], "--engine-url"),
        (
            &["serve", "--engine", "llamacpp", "--engine-url", "localhost:8080"],
            "localhost:8080",
        ),
        (
            &["serve", "--engine", "mocker", "--engine-url", "http://127.0.0.1:1"],
            "--engine-url",
        ),
        (
            &[
                "serve",
                "--engine",
                "llamacpp",
                "--engine-url",
                "http://127.0.0.1:1",
                "--kv-events-endpoint",
                "tcp://127.0.0.1:2",
            ],
            "llama.cpp publishes no KV events",
        ),
        (
            &[
                "serve",
                "--engine",
                "vllm",
                "--engine-url",
                "http://127.0.0.1:1",
                "--kv-events-endpoint",
                "127.0.0.1:5557",
            ],
            "127.0.0.1:5557",
        ),
        (
            &[
                "serve",
                "--engine",
                "sglang",
                "--engine-url",
                "http://127.0.0.1:1",
                "--engine-startup-timeout-secs",
                "0",
            ],
            "http://127.0.0.1:1",
        ),
    ] {
        fails_with_first_line_naming(args, needle)?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_models_and_chat_over_both_request_planes() -> Result<()> {
    for plane in ["local", "tcp"] {
        let server = Server::start(&["--engine", "echo", "--request-plane", plane, "--echo-delay-ms", "0"])?;
        let http = reqwest::Client::new();
        let models: Value = http
            .get(format!("{}/v1/models", server.url))
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(models["data"][0]["id"], "echo", "{plane}");
        let r: Value = http
            .post(format!("{}/v1/chat/completions", server.url))
            .json(&json!({"model": "echo", "messages": [{"role": "user", "content": "ping"}]}))
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(
            r["choices"][0]["message"]["content"], "user: ping\nassistant: ",
            "{plane}: {r}"
        );
        let health = http.get(format!("{}/health", server.url)).send().await?;
        assert_eq!(health.status(), 200);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_exits_zero() -> Result<()> {
    for plane in ["local", "tcp"] {
        let mut server = Server::start(&[
            "--engine",
            "echo",
            "--request-plane",
            plane,
            "--echo-delay-ms",
            "20",
            "--workers",
            "2",
        ])?;
        let http = reqwest::Client::new();
        let content = "q".repeat(30);
        let expected = format!("user: {content}\nassistant: ");
        // Each stream takes about 50 tokens × 20 ms = 1 s.
        let mut streams = Vec::new();
        for _ in 0..20 {
            let r = http
                .post(format!("{}/v1/chat/completions", server.url))
                .json(&json!({"model": "echo", "stream": true, "messages": [{"role": "user", "content": content}]}))
                .send()
                .await?;
            assert_eq!(r.status(), 200);
            let mut body = r.bytes_stream();
            // The request is running on a worker once its first chunk arrived.
            let first = body.next().await.context("first chunk")??;
            streams.push((first, body));
        }
        let status = Command::new("kill").args(["-TERM", &server.pid()]).status()?;
        assert!(status.success());
        let sent_at = Instant::now();

        let results = futures::future::join_all(streams.into_iter().map(|(first, mut body)| async move {
            let mut text = String::from_utf8_lossy(&first).into_owned();
            while let Some(chunk) = body.next().await {
                text.push_str(&String::from_utf8_lossy(&chunk?));
            }
            Ok::<_, anyhow::Error>(text)
        }))
        .await;
        for r in results {
            let sse = r?;
            let content: String = sse
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter(|d| *d != "[DONE]")
                .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
                .collect();
            assert_eq!(content, expected, "{plane}: a stream was cut short");
            assert!(
                sse.trim_end().ends_with("data: [DONE]"),
                "{plane}: stream did not finish"
            );
        }
        let code = server.wait_exit(Duration::from_secs(20))?;
        assert_eq!(code, Some(0), "{plane}: log:\n{}", server.log());
        assert!(sent_at.elapsed() < Duration::from_secs(15));
        let log = server.log();
        assert!(log.contains("SIGTERM received"), "{log}");
        assert!(log.contains("shutting down: deregistering"), "{log}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mocker_serves_and_reports_cached_prompt_tokens() -> Result<()> {
    let server = Server::start(&["--engine", "mocker", "--workers", "1", "--speedup", "100"])?;
    let http = reqwest::Client::new();
    let body = json!({"model": "mocker", "max_tokens": 8, "messages": [{"role": "user", "content": "a".repeat(200)}]});
    let mut cached = Vec::new();
    for _ in 0..2 {
        let r: Value = http
            .post(format!("{}/v1/chat/completions", server.url))
            .json(&body)
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(r["choices"][0]["finish_reason"], "length", "{r}");
        assert_eq!(r["usage"]["completion_tokens"], 8, "{r}");
        assert_eq!(
            r["choices"][0]["message"]["content"].as_str().map(str::len),
            Some(8),
            "{r}"
        );
        cached.push(r["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64());
    }
    // The 221-token prompt's 13 full blocks of 16 are cached after the first request.
    assert_eq!(cached, [Some(0), Some(208)]);
    Ok(())
}

/// A prompt evicted from a small mocker's KV cache comes back from the host tier below it:
/// reported as cached, and counted on `/metrics` under the block manager's names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mocker_serves_an_evicted_prompt_from_host_memory() -> Result<()> {
    let server = Server::start(&small_mocker_over_host_tier("256", &[]))?;
    let http = reqwest::Client::new();
    let ask = |content: String| cached_tokens(&http, &server.url, json!([{"role": "user", "content": content}]));
    let returning = "a".repeat(200);
    assert_eq!(ask(returning.clone()).await?, Some(0));
    // Four prompts of most of the cache's 512 tokens push it out of the cache.
    for c in ["b", "c", "d", "e"] {
        ask(c.repeat(450)).await?;
    }
    assert_eq!(ask(returning).await?, Some(208), "13 blocks loaded from host memory");
    let metrics = http.get(format!("{}/metrics", server.url)).send().await?.text().await?;
    let sum = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(sum("kvbm_onboard_blocks_h2d"), 13.0, "{metrics}");
    assert_eq!(sum("kvbm_matched_tokens"), 208.0);
    assert!(sum("kvbm_offload_blocks_d2h") >= 13.0 + 4.0 * 28.0);
    Ok(())
}

/// A system prompt pinned with --kvbm-pin-prompts stays in the host tier through traffic
/// that churns it: a new conversation with it finds it cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_system_prompt_is_served_from_host_memory_after_churn() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pins = dir.path().join("pins.jsonl");
    let system = "You are the support assistant of a small bakery. ".repeat(6);
    std::fs::write(&pins, format!("{}\n", json!({ "system": system })))?;
    let server = Server::start(&small_mocker_over_host_tier(
        "64",
        &["--kvbm-pin-prompts", pins.to_str().context("a UTF-8 path")?],
    ))?;
    let http = reqwest::Client::new();
    let ask = |messages: Value| cached_tokens(&http, &server.url, messages);
    let with_system = |user: &str| json!([{"role": "system", "content": system}, {"role": "user", "content": user}]);
    assert_eq!(ask(with_system("Are you open on Sunday?")).await?, Some(0));
    // Six prompts of 28 blocks each go through the host tier's 64 slots.
    for c in ["b", "c", "d", "e", "f", "g"] {
        ask(json!([{"role": "user", "content": c.repeat(450)}])).await?;
    }
    // "system: " and the prompt, 308 bytes: 19 full blocks of 16.
    assert_eq!(ask(with_system("Do you sell rye bread?")).await?, Some(19 * 16));
    Ok(())
}

/// A fast mocker worker with a 32-block KV cache over a host tier of `host_blocks`, then `extra`.
fn small_mocker_over_host_tier<'a>(host_blocks: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--engine",
        "mocker",
        "--workers",
        "1",
        "--speedup",
        "100",
        "--num-blocks",
        "32",
        "--kvbm-host-blocks",
        host_blocks,
    ];
    args.extend_from_slice(extra);
    args
}

/// Asks the mocker for 4 tokens after `messages`; the prompt tokens it reports cached.
async fn cached_tokens(http: &reqwest::Client, url: &str, messages: Value) -> Result<Option<u64>> {
    let body = json!({"model": "mocker", "max_tokens": 4, "messages": messages});
    let r: Value = http
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await?
        .json()
        .await?;
    Ok(r["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64())
}

const SMOLLM2: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../target/test-models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
);

async fn chat(http: &reqwest::Client, url: &str, body: Value) -> Result<Value> {
    let r = http
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await?;
    let status = r.status();
    let v: Value = r.json().await?;
    anyhow::ensure!(status.is_success(), "{status}: {v}");
    Ok(v)
}

/// The default engine on a real model: SmolLM2's Q4_1 weights are converted at load (and the
/// log says so), and greedy decoding answers a question the model knows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_engine_answers_with_smollm2() -> Result<()> {
    anyhow::ensure!(
        std::path::Path::new(SMOLLM2).exists(),
        "no model at {SMOLLM2}: run scripts/fetch-test-models"
    );
    let server = Server::start(&["--model", SMOLLM2, "--workers", "1"])?;
    let http = reqwest::Client::new();
    let question = json!({
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "temperature": 0,
        "max_tokens": 24,
        "messages": [{"role": "user", "content": "What is the capital of Germany?"}],
    });
    let first = chat(&http, &server.url, question.clone()).await?;
    let answer = first["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    assert!(answer.contains("Berlin"), "{first}");
    let again = chat(&http, &server.url, question).await?;
    assert_eq!(
        again["choices"][0]["message"]["content"],
        first["choices"][0]["message"]["content"]
    );
    let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_default();
    assert!(
        cached >= 16,
        "the repeated prompt's full blocks come from the cache: {again}"
    );
    let log = server.log();
    assert!(log.contains("Q4_1 tensors to Q8_0"), "{log}");
    Ok(())
}

/// A generated model through the whole stack: streaming, seeds, and concurrent requests
/// batched together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_engine_serves_a_safetensors_model() -> Result<()> {
    let dir = tempfile::tempdir()?;
    turbine_native::tiny::write_tiny_model(dir.path(), &turbine_native::tiny::TinySpec::default())?;
    let path = dir.path().to_str().context("utf-8")?;
    let server = Server::start(&["--model", path, "--model-name", "tiny"])?;
    let http = reqwest::Client::new();
    let body = |seed: u64| {
        json!({"model": "tiny", "seed": seed, "max_tokens": 12, "ignore_eos": true,
               "messages": [{"role": "user", "content": "hello there"}]})
    };
    let runs = futures::future::try_join_all((0..6).map(|i| chat(&http, &server.url, body(i % 2)))).await?;
    let text = |v: &Value| {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    for (i, r) in runs.iter().enumerate() {
        assert_eq!(r["usage"]["completion_tokens"], 12, "{r}");
        assert_eq!(text(r), text(&runs[i % 2]), "same seed, same text");
    }
    assert_ne!(text(&runs[0]), text(&runs[1]), "another seed, another text");

    let sse = http
        .post(format!("{}/v1/chat/completions", server.url))
        .json(
            &json!({"model": "tiny", "stream": true, "seed": 0, "max_tokens": 12, "ignore_eos": true,
                      "messages": [{"role": "user", "content": "hello there"}]}),
        )
        .send()
        .await?
        .text()
        .await?;
    let streamed: String = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(streamed, text(&runs[0]));
    Ok(())
}

#[test]
fn a_missing_model_fails_with_one_line_naming_it() -> Result<()> {
    let out = Command::new(BIN)
        .args(["serve", "--model", "/nonexistent/model.gguf"])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr)?;
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    Ok(())
}

/// A Mooncake trace of four prefix families, three requests each, a family's requests 200 ms
/// apart: every request's two leading 512-token blocks are its family's, the third its own.
fn family_trace(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    let mut text = String::new();
    for round in 0..3u64 {
        for family in 0..4u64 {
            let ts = (round * 4 + family) * 50;
            let ids = [family * 10, family * 10 + 1, 1000 + round * 4 + family];
            text += &format!(
                "{{\"timestamp\": {ts}, \"input_length\": 1100, \"output_length\": 4, \"hash_ids\": {ids:?}}}\n"
            );
        }
    }
    let path = dir.join("families.jsonl");
    std::fs::write(&path, text)?;
    Ok(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_replays_a_trace_reports_cache_hits_and_compares() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let trace = family_trace(dir.path())?;
    let server = Server::start(&[
        "--engine",
        "mocker",
        "--workers",
        "2",
        "--speedup",
        "100",
        "--router-mode",
        "kv",
    ])?;
    let result = dir.path().join("kv.json");
    let out = Command::new(BIN)
        .args([
            "bench",
            "--no-progress",
            "--label",
            "kv",
            "--url",
            &server.url,
            "--trace",
        ])
        .arg(&trace)
        .arg("--output")
        .arg(&result)
        .args(["--fleet-workers", "2", "--fleet-blocks-per-worker", "1024"])
        .output()?;
    let stdout = String::from_utf8(out.stdout)?;
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("prompt cache hit rate"), "{stdout}");
    // Two workers of 1,024 16-token blocks hold the whole trace: the bound is the ceiling.
    assert!(
        stdout.contains(
            "cache hit rate 62.1% = 100% of the fleet's pooled-LRU bound 62.1% (2 workers x 1024 blocks of 16 tokens)"
        ),
        "{stdout}"
    );
    let r: Value = serde_json::from_slice(&std::fs::read(&result)?)?;
    let s = &r["summary"];
    assert_eq!(
        (s["requests"].as_u64(), s["completed"].as_u64()),
        (Some(12), Some(12)),
        "{s}"
    );
    assert_eq!(s["output_tokens"], 48, "{s}");
    assert_eq!(s["input_tokens"], 12 * 1100, "{s}");
    // The second and third request of a family find its two shared blocks (1024 tokens) on the
    // worker that `kv` sent the family to; only the engine's own count gets here.
    assert_eq!(s["cached_tokens"], 8 * 1024, "{s}\n{}", server.log());
    assert_eq!(r["records"].as_array().map(Vec::len), Some(12));

    // The ceiling of the same trace: 8192 of 13,200 prompt tokens.
    let out = Command::new(BIN).args(["trace", "analyze"]).arg(&trace).output()?;
    let text = String::from_utf8(out.stdout)?;
    assert!(text.contains("hit rate ceiling   62.1%"), "{text}");

    let plots = dir.path().join("plots");
    let out = Command::new(BIN)
        .args(["bench", "compare"])
        .arg(&result)
        .arg(&result)
        .arg("--plot-dir")
        .arg(&plots)
        .output()?;
    let table = String::from_utf8(out.stdout)?;
    assert!(out.status.success(), "{table}");
    let hit_row = table
        .lines()
        .find(|l| l.starts_with("cache hit rate %"))
        .context("hit row")?;
    assert_eq!(
        hit_row.split_whitespace().skip(4).collect::<Vec<_>>(),
        ["62.1", "62.1"],
        "{table}"
    );
    for svg in ["ttft.svg", "throughput.svg"] {
        let text = std::fs::read_to_string(plots.join(svg))?;
        assert!(text.starts_with("<svg") && text.contains(">kv</text>"), "{svg}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_chat_sessions() -> Result<()> {
    let server = Server::start(&["--engine", "mocker", "--workers", "1", "--speedup", "100"])?;
    let dir = tempfile::tempdir()?;
    let result = dir.path().join("s.json");
    let out = Command::new(BIN)
        .args([
            "bench",
            "--no-progress",
            "--url",
            &server.url,
            "--turns",
            "3",
            "--concurrency",
            "2",
        ])
        .args([
            "--num-requests",
            "4",
            "--input-len",
            "100",
            "--output-len",
            "5",
            "--think-time-ms",
            "10",
        ])
        .arg("--output")
        .arg(&result)
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&std::fs::read(&result)?)?;
    let s = &r["summary"];
    assert_eq!(s["completed"], 12, "{s}");
    assert_eq!(r["meta"]["endpoint"], "chat");
    // Later turns carry the conversation so far, which the server finds cached.
    assert!(s["cached_tokens"].as_u64() > Some(0), "{s}");
    Ok(())
}

#[test]
fn bench_and_trace_refuse_bad_input_with_one_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"timestamp\": 0, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [1]}\n{\"timestamp\": 5}\n",
    )?;
    let bad = bad.to_str().context("utf-8 path")?;
    for (args, needle) in [
        (vec!["trace", "analyze", bad], "line 2: missing field"),
        (vec!["bench", "--trace", bad, "--model", "m"], "line 2: missing field"),
        (
            vec!["bench", "--model", "m", "--prefix-ratio", "1.5"],
            "--prefix-ratio must be between 0 and 1, got 1.5",
        ),
        (vec!["bench", "--model", "m", "--token-ids", "9..3"], "9..3"),
        (
            vec!["bench", "--model", "m", "--rate", "0"],
            "--rate must be a positive number, got 0",
        ),
        (vec!["bench", "compare", "/nonexistent.json"], "/nonexistent.json"),
    ] {
        fails_with_first_line_naming(&args, needle)?;
    }
    Ok(())
}

/// `trace conversations` writes a multi-turn trace that `trace analyze` reads, with its
/// ceiling and a fleet's pooled-LRU bound (8 workers of 4 blocks of 16 tokens: one 512-token
/// trace block, so far below the ceiling); a bad value is refused in one line naming it.
#[test]
fn a_generated_conversation_trace_is_analysed_for_a_fleet() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("conversations.jsonl");
    let out = Command::new(BIN)
        .args(["trace", "conversations", "--sessions", "50", "--seed", "3", "--output"])
        .arg(&path)
        .output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8(out.stdout)?.contains("of 50 sessions"));
    let analyze = |fleet: &[&str]| -> Result<String> {
        let out = Command::new(BIN)
            .args(["trace", "analyze"])
            .arg(&path)
            .args(fleet)
            .output()?;
        anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?)
    };
    let text = analyze(&["--workers", "8", "--blocks-per-worker", "4"])?;
    let percent = |prefix: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with(prefix))?;
        line[prefix.len()..].trim().split('%').next()?.trim().parse().ok()
    };
    let (ceiling, pooled) = (
        percent("hit rate ceiling").context("no ceiling")?,
        percent("with an LRU cache").context("no pooled bound")?,
    );
    assert!(ceiling > 30.0 && pooled < ceiling, "{text}");
    assert!(text.contains("(1 blocks, 512 tokens)"), "{text}");

    let out = Command::new(BIN)
        .args(["trace", "conversations", "--session-rate", "0", "--output"])
        .arg(dir.path().join("bad.jsonl"))
        .output()?;
    let err = String::from_utf8(out.stderr)?;
    assert!(
        !out.status.success() && err.contains("--session-rate must be a positive number, got 0"),
        "{err}"
    );
    Ok(())
}

/// The planner refuses an impossible configuration at start, in one line naming the values.
#[test]
fn impossible_planner_settings_fail_with_one_line_naming_them() -> Result<()> {
    let sim = ["planner", "simulate", "--load", "constant", "--duration-s", "10"];
    for (extra, needle) in [
        (&["--min", "3", "--max", "2"][..], "min 3 is above max 2"),
        (
            &["--budget", "0.5"],
            "budget 0.5 is below the pools' minimums, which cost 1",
        ),
        (&["--predictor", "arima"], "\"arima\""),
        (
            &["--target-utilization", "1.5"],
            "target utilization must be in (0, 1], got 1.5",
        ),
        (
            &["--fast-interval-s", "60"],
            "fast interval (60s) must not be longer than the slow one (30s)",
        ),
        (
            &["--rate=-1"],
            "--rate must be a positive number of requests a second, got -1",
        ),
    ] {
        fails_with_first_line_naming(&[&sim[..], extra].concat(), needle)?;
    }
    let dir = tempfile::tempdir()?;
    let profile = dir.path().join("mocker.json");
    let profile = profile.to_str().context("a UTF-8 path")?;
    let status = Command::new(BIN).args(["profile", "--output", profile]).status()?;
    anyhow::ensure!(status.success(), "turbine profile failed");
    let run = ["planner", "run", "--worker-args", "--engine mocker"];
    for (extra, needle) in [
        (
            &["--frontend", "http://127.0.0.1:1", "--connector", "k8s"][..],
            "\"k8s\"",
        ),
        (&["--frontend", "http://127.0.0.1:1"], "needs --profile"),
        (
            &[
                "--frontend",
                "http://127.0.0.1:1",
                "--profile",
                profile,
                "--prefill-max",
                "2",
                "--decode-max",
                "2",
            ],
            "needs --prefill-worker-args",
        ),
        (
            &["--frontend", "ftp://x", "--profile", "/nonexistent.json"],
            "/nonexistent.json",
        ),
    ] {
        fails_with_first_line_naming(&[&run[..], extra].concat(), needle)?;
    }
    let serve = ["serve", "--port", "0", "--planner"];
    for (extra, needle) in [
        (
            &["--engine", "mocker", "--min", "3", "--max", "2"][..],
            "min 3 is above max 2",
        ),
        (&["--engine", "echo"], "needs --profile"),
        (&["--engine", "mocker", "--workers", "2"], "--workers"),
        (
            &["--engine", "mocker", "--prefill-max", "2", "--decode-max", "2"],
            "plans one aggregated pool",
        ),
    ] {
        fails_with_first_line_naming(&[&serve[..], extra].concat(), needle)?;
    }
    Ok(())
}

/// `turbine profile --url` measures a running server's capacity model over HTTP: a longer
/// prompt takes longer alone, and more sequences decode slower.
#[test]
fn profile_measures_a_running_server_over_http() -> Result<()> {
    // The mocker at its GPU's speed: long enough steps that HTTP's own time is noise.
    let server = Server::start(&["--engine", "mocker", "--workers", "1"])?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("served.json");
    #[rustfmt::skip]
    let out = Command::new(BIN)
        .args([
            "profile", "--url", &server.url, "--isl", "64,2048", "--context", "2048",
            "--concurrency", "1,64", "--saturation", "4", "--decode-tokens", "8",
            "--output", path.to_str().context("a UTF-8 path")?,
        ])
        .output()?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let model: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let column = |table: &str, field: &str| -> Vec<f64> {
        let rows = model[table].as_array().map(Vec::as_slice).unwrap_or_default();
        rows.iter().filter_map(|p| p[field].as_f64()).collect()
    };
    let (ttft, itl) = (column("prefill", "ttft_ms"), column("decode", "itl_ms"));
    assert_eq!((ttft.len(), itl.len()), (2, 2), "{model}");
    assert!(ttft[1] > ttft[0], "{model}");
    assert!(itl[1] > itl[0], "{model}");
    assert_eq!(model["max_concurrency"], 64);
    Ok(())
}
