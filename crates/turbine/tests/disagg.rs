//! Disaggregated serving end to end on SmolLM2: greedy output through a prefill and a decode
//! worker is token for token what one aggregated worker produces, in one process
//! (`turbine serve --prefill-workers 1 --decode-workers 1`) and across processes (a frontend
//! and two workers meeting in etcd, KV moving over TCP or shared memory).

mod common;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::{
    smollm2 as model, start, start_frontend, start_worker, token_ids as tokens, wait_for_instances, Etcd, Proc,
    SMOLLM2_NAME as MODEL,
};
use serde_json::{json, Value};

/// The native engine's default block size.
const BLOCK: usize = 16;

/// The cases the issue names: shorter than a block, an exact multiple of it, a prompt whose
/// whole prefix and one whose part of it the decode worker holds from an earlier request,
/// and a single token of output.
fn cases() -> Vec<(String, Value)> {
    let long = tokens(3, 3 * BLOCK + 7);
    let mut partial = long[..2 * BLOCK].to_vec();
    partial.extend(tokens(9, BLOCK + 5));
    let body = |prompt: &[u32], max_tokens: u32| json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0});
    vec![
        ("shorter than a block".into(), body(&tokens(1, 5), 12)),
        (
            "an exact multiple of the block size".into(),
            body(&tokens(2, 2 * BLOCK), 12),
        ),
        ("three blocks and a tail".into(), body(&long, 12)),
        (
            "the same again: its whole prefix cached on the decode worker".into(),
            body(&long, 12),
        ),
        (
            "a partial prefix cached on the decode worker".into(),
            body(&partial, 12),
        ),
        ("max_tokens 1".into(), body(&tokens(4, 2 * BLOCK + 3), 1)),
    ]
}

/// A prompt after which SmolLM2's greedy choice is its end-of-turn token: an assistant turn
/// that has already answered.
fn eos_first() -> Value {
    json!({"model": MODEL, "max_tokens": 8, "temperature": 0, "prompt":
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nSay the word yes and nothing else.<|im_end|>\n<|im_start|>assistant\nYes."})
}

async fn complete(http: &reqwest::Client, url: &str, body: &Value) -> Result<Value> {
    let r = http.post(format!("{url}/v1/completions")).json(body).send().await?;
    let status = r.status();
    let v: Value = r.json().await?;
    ensure!(status.is_success(), "{status}: {v}");
    Ok(v)
}

fn answer(v: &Value) -> (String, String) {
    let choice = &v["choices"][0];
    (
        choice["text"].as_str().unwrap_or_default().to_owned(),
        choice["finish_reason"].as_str().unwrap_or_default().to_owned(),
    )
}

async fn metric(http: &reqwest::Client, url: &str, series: &str) -> Result<f64> {
    common::metric(http, url, series).await
}

/// Runs every case on `aggregated` and then on `disaggregated`, comparing answers.
/// `kv_routed`: the disaggregated frontend routes by KV, so it knows what the decode worker
/// holds, and prefills a prompt cached there but for its tail on the decode worker.
async fn same_answers(http: &reqwest::Client, aggregated: &str, disaggregated: &str, kv_routed: bool) -> Result<()> {
    let mut all = cases();
    all.push(("EOS as the first token".into(), eos_first()));
    for (name, body) in &all {
        let want = answer(&complete(http, aggregated, body).await?);
        let got = complete(http, disaggregated, body).await?;
        ensure!(
            answer(&got) == want,
            "{name}: disaggregated {:?}, aggregated {want:?}",
            answer(&got)
        );
        if name.starts_with("EOS") {
            ensure!(
                want == (String::new(), "stop".to_owned()),
                "the EOS case does not start with EOS: {want:?}"
            );
        }
        if name.contains("whole prefix cached") {
            let cached = got["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0);
            ensure!(cached as usize >= 3 * BLOCK, "{name}: {cached} cached tokens: {got}");
        }
    }
    let remote = metric(
        http,
        disaggregated,
        &format!("turbine_frontend_disagg_decisions_total{{decision=\"remote\",model=\"{MODEL}\"}}"),
    )
    .await?;
    let short = metric(
        http,
        disaggregated,
        &format!("turbine_frontend_disagg_decisions_total{{decision=\"local_short\",model=\"{MODEL}\"}}"),
    )
    .await?;
    let cached = metric(
        http,
        disaggregated,
        &format!("turbine_frontend_disagg_decisions_total{{decision=\"local_cached\",model=\"{MODEL}\"}}"),
    )
    .await?;
    let want_cached = if kv_routed { 1.0 } else { 0.0 };
    ensure!(
        (remote, short, cached) == (all.len() as f64 - 1.0 - want_cached, 1.0, want_cached),
        "remote {remote}, local_short {short}, local_cached {cached}"
    );
    Ok(())
}

fn serve(extra: &[&str]) -> Result<(Proc, String)> {
    let mut args = vec!["serve", "--port", "0", "--model", model()?, "--kv-cache-mib", "64"];
    args.extend_from_slice(extra);
    start(&args, "turbine: listening on ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_disaggregated_matches_aggregated() -> Result<()> {
    let (_agg, aggregated) = serve(&["--workers", "1"])?;
    let (_dis, disaggregated) = serve(&["--prefill-workers", "1", "--decode-workers", "1", "--router-mode", "kv"])?;
    let http = reqwest::Client::new();
    same_answers(&http, &aggregated, &disaggregated, true).await?;
    // The decode worker's reads show on the frontend's /metrics, one block per staged slot.
    let metrics = http
        .get(format!("{disaggregated}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let sum = |prefix: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let read = sum("turbine_transfer_bytes_total{backend=\"in_process\",op=\"read\"");
    let fetched = sum("turbine_worker_disagg_total{event=\"blocks_fetched\"");
    ensure!(read > 0.0 && fetched > 0.0, "no transfer in the metrics:\n{metrics}");
    let staged = sum("turbine_worker_disagg_total{event=\"blocks_staged\"");
    ensure!(staged >= fetched, "{staged} blocks staged, {fetched} fetched");
    Ok(())
}

/// Frontend and workers as separate processes meeting in etcd. `shared_memory` false stages
/// in host memory, so the decode worker reads over TCP.
async fn across_processes(shared_memory: bool) -> Result<()> {
    let etcd = Etcd::start()?;
    let http = reqwest::Client::new();
    let (_agg, aggregated) = serve(&["--workers", "1"])?;
    let mut worker = vec![
        "--discovery",
        etcd.url.as_str(),
        "--model",
        model()?,
        "--kv-cache-mib",
        "64",
    ];
    if !shared_memory {
        worker.push("--no-shared-memory");
    }
    let role = |r: &'static str| {
        let mut args = worker.clone();
        args.extend(["--role", r]);
        args
    };
    let (mut prefill, _) = start_worker(&role("prefill"))?;
    let (_decode, decode_id) = start_worker(&role("decode"))?;
    let (_frontend, url) = start_frontend(&["--discovery", etcd.url.as_str()])?;
    wait_for_instances(&http, &url, MODEL, 1, Duration::from_secs(30))
        .await
        .context("the decode worker never became routable")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let health: Value = http.get(format!("{url}/health")).send().await?.json().await?;
        let model = &health["models"][MODEL];
        if model["prefill_instances"].as_array().is_some_and(|p| p.len() == 1) {
            ensure!(model["instances"][0] == decode_id.as_str(), "{health}");
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the prefill worker never appeared: {health}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    same_answers(&http, &aggregated, &url, false).await?;

    // With the prefill worker killed (still listed until its lease expires), requests are
    // prefilled on the decode worker, with the same answer and no error.
    prefill.kill()?;
    let body = json!({"model": MODEL, "prompt": tokens(7, 3 * BLOCK), "max_tokens": 6, "temperature": 0});
    let want = answer(&complete(&http, &aggregated, &body).await?);
    let started = std::time::Instant::now();
    let got = answer(&complete(&http, &url, &body).await?);
    ensure!(
        got == want,
        "after the prefill worker died: {got:?}, aggregated {want:?}"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let failed = metric(
        &http,
        &url,
        &format!("turbine_frontend_disagg_decisions_total{{decision=\"local_prefill_failed\",model=\"{MODEL}\"}}"),
    )
    .await?;
    ensure!(failed == 1.0, "local_prefill_failed = {failed}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_processes_over_tcp_matches_aggregated() -> Result<()> {
    across_processes(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_processes_over_shared_memory_matches_aggregated() -> Result<()> {
    across_processes(true).await
}

/// Clients that go away at every phase (during the prefill, the fetch, the decode) leave no
/// staging slot held: once the leases they left expire, every worker's free slots are back
/// where they started, and the server still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_requests_leak_no_staging_slots() -> Result<()> {
    let (_dis, url) = serve(&[
        "--prefill-workers",
        "1",
        "--decode-workers",
        "1",
        "--kv-lease-ms",
        "300",
    ])?;
    let http = reqwest::Client::new();
    let free = || async {
        let metrics = http.get(format!("{url}/metrics")).send().await?.text().await?;
        let slots: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("turbine_worker_staging_free_slots{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        anyhow::Ok(slots)
    };
    let before = free().await?;
    ensure!(before > 0.0, "no staging slots in the metrics");
    for i in 0..12u64 {
        let body = json!({"model": MODEL, "prompt": tokens(40 + i as u32, 3 * BLOCK + 5), "max_tokens": 8,
                          "temperature": 0, "stream": true});
        let cut = Duration::from_millis(20 + 40 * (i % 8));
        let sent = http
            .post(format!("{url}/v1/completions"))
            .json(&body)
            .timeout(cut)
            .send()
            .await;
        if let Ok(r) = sent {
            // Read until the timeout cuts the stream mid-answer, or it ends.
            let _ = r.bytes().await;
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = free().await?;
        if now == before {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "{now} free staging slots, {before} before"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = json!({"model": MODEL, "prompt": tokens(99, 2 * BLOCK + 1), "max_tokens": 4, "temperature": 0});
    complete(&http, &url, &body).await?;
    Ok(())
}
