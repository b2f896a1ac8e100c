//! `turbine profile --url`: measures the capacity model of a replica that is running, over
//! its OpenAI API (a native-engine worker behind `turbine serve`, llama.cpp, vLLM), as the
//! mocker's is measured in simulated time: a lone prompt's TTFT and saturated prefill
//! throughput per prompt length, then steady ITL per context and concurrency.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use turbine_bench::workload::Prompt;
use turbine_bench::{Client, Endpoint, RequestRecord};
use turbine_planner::capacity::{DecodePoint, PrefillPoint};
use turbine_planner::profile::Sweep;
use turbine_planner::CapacityModel;

/// Sends `n` requests at once; their records, all successful.
async fn burst(
    client: &Client,
    seed: &mut u64,
    n: u32,
    isl: u32,
    max_tokens: u32,
) -> anyhow::Result<Vec<RequestRecord>> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..n {
        *seed += 1;
        let (client, p) = (client.clone(), Prompt::Tokens(super::own_prompt(*seed, isl)));
        tasks.push(tokio::spawn(async move { client.send(&p, max_tokens, start).await }));
    }
    let mut out = Vec::new();
    for t in tasks {
        let reply = t.await.context("a profiling request panicked")?;
        if let Some(e) = reply.record.error {
            bail!("a request of {isl} prompt tokens failed: {e:?}");
        }
        out.push(reply.record);
    }
    Ok(out)
}

/// Profiles the server at `url` over `sweep`; it is taken to run `max_concurrency`
/// sequences and hold `kv_tokens` tokens of KV cache.
pub async fn profile(url: &str, sweep: &Sweep, max_concurrency: u32, kv_tokens: u64) -> anyhow::Result<CapacityModel> {
    let model = Client::first_model(url).await?;
    let client = Client::new(
        url,
        model.clone(),
        Endpoint::Completions,
        Duration::from_secs(600),
        true,
    )?;
    let mut seed = 0u64;
    let mut prefill = Vec::new();
    for &isl in &sweep.isls {
        let lone = burst(&client, &mut seed, 1, isl, 1).await?;
        let ttft = lone[0].ttft.context("no first token")?;
        let saturated = burst(&client, &mut seed, sweep.saturation, isl, 1).await?;
        let span = saturated.iter().map(|r| r.start + r.e2e).fold(0.0, f64::max);
        prefill.push(PrefillPoint {
            isl,
            ttft_ms: ttft * 1000.0,
            tokens_per_s: f64::from(isl) * f64::from(sweep.saturation) / span.max(1e-9),
        });
        eprintln!("turbine profile: prefill of {isl} tokens measured");
    }
    let mut decode = Vec::new();
    for &context in &sweep.contexts {
        for &concurrency in &sweep.concurrencies {
            let runs = burst(&client, &mut seed, concurrency, context, sweep.decode_tokens).await?;
            // Steady decode: the gaps between tokens once every request has its first.
            let all_in = runs.iter().filter_map(|r| Some(r.start + r.ttft?)).fold(0.0, f64::max);
            let mut gaps = Vec::new();
            for r in &runs {
                let Some(ttft) = r.ttft else { continue };
                let mut t = r.start + ttft;
                for &g in &r.itl {
                    if t >= all_in {
                        gaps.push(g);
                    }
                    t += g;
                }
            }
            let itl = gaps.iter().sum::<f64>() / gaps.len().max(1) as f64;
            decode.push(DecodePoint {
                context,
                concurrency,
                itl_ms: (itl * 1000.0).max(1e-3),
            });
        }
        eprintln!("turbine profile: decode at {context} tokens of context measured");
    }
    Ok(CapacityModel {
        engine: format!("{model} at {url}"),
        prefill,
        decode,
        max_concurrency,
        kv_tokens,
    })
}
