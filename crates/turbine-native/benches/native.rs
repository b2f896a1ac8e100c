//! The native engine's speed against candle-transformers' reference quantized Llama on the
//! same GGUF, in one run: single-sequence decode, aggregate decode with 16 sequences, and
//! time to first token for a 512-token prompt, cold and with its prefix cached.
//!
//! `cargo bench -p turbine-native --bench native [-- GGUF]` (default: SmolLM2-135M from
//! `scripts/fetch-test-models`, converted to Q8_0 as `turbine serve` does).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use turbine_engine::Engine;
use turbine_native::sampling::argmax;
use turbine_native::{write_converted_gguf, NativeConfig, NativeEngine};
use turbine_protocols::llm::{SamplingOptions, StopConditions};
use turbine_protocols::PreprocessedRequest;

const DECODE: usize = 64;
const REPEATS: usize = 3;

fn prompt(seed: usize, len: usize) -> Vec<u32> {
    (0..len)
        .map(|j| ((seed * 7919 + j * 31 + 11) % 30_000) as u32 + 100)
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Reference: candle-transformers' quantized Llama, one sequence, greedy.
fn reference_decode(path: &PathBuf) -> Result<f64> {
    let mut file = std::fs::File::open(path)?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
    let mut model = quantized_llama::ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?;
    let p = prompt(0, 32);
    let logits = model.forward(&Tensor::new(p.as_slice(), &Device::Cpu)?.unsqueeze(0)?, 0)?;
    let mut token = argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
    let start = Instant::now();
    for i in 0..DECODE {
        let x = Tensor::new(&[token], &Device::Cpu)?.unsqueeze(0)?;
        let logits = model.forward(&x, p.len() + i)?;
        token = argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
    }
    Ok(DECODE as f64 / start.elapsed().as_secs_f64())
}

fn request(tokens: Vec<u32>, max_tokens: u32) -> PreprocessedRequest {
    PreprocessedRequest {
        request_id: "bench".into(),
        model: "bench".into(),
        token_ids: tokens,
        stop: StopConditions {
            max_tokens: Some(max_tokens),
            ..Default::default()
        },
        sampling: SamplingOptions {
            temperature: Some(0.0),
            ..Default::default()
        },
        disagg: None,
    }
}

/// Time to the first token and the times of the tokens after it.
async fn timed(engine: &NativeEngine, tokens: Vec<u32>, max_tokens: u32) -> Result<(Duration, Vec<Instant>)> {
    let start = Instant::now();
    let mut stream = engine.generate(request(tokens, max_tokens), CancellationToken::new())?;
    let mut ttft = None;
    let mut times = Vec::new();
    while let Some(out) = stream.next().await {
        let out = out?;
        let now = Instant::now();
        ttft.get_or_insert(now - start);
        times.extend(out.token_ids.iter().map(|_| now));
    }
    Ok((ttft.context("no token")?, times))
}

/// Decode tokens per second over `n` concurrent sequences, counting from the moment all had
/// their first token.
async fn native_decode(engine: &NativeEngine, n: usize, seed: usize) -> Result<f64> {
    let runs =
        futures::future::try_join_all((0..n).map(|i| timed(engine, prompt(seed * 100 + i, 32), DECODE as u32 + 1)))
            .await?;
    let from = runs.iter().map(|(_, t)| t[0]).max().context("runs")?;
    let to = runs
        .iter()
        .map(|(_, t)| *t.last().unwrap_or(&from))
        .max()
        .context("runs")?;
    let tokens: usize = runs.iter().map(|(_, t)| t.iter().filter(|&&x| x > from).count()).sum();
    Ok(tokens as f64 / (to - from).as_secs_f64())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<()> {
    let default = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../target/test-models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    );
    let src = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_else(|| default.to_string());
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("model.gguf");
    write_converted_gguf(src.as_ref(), &path).with_context(|| format!("converting {src}"))?;
    let (engine, _) = NativeEngine::load(&path, &Device::Cpu, NativeConfig::default())?;
    // Warm up both: first touches of the weights page them in.
    reference_decode(&path)?;
    native_decode(&engine, 1, 0).await?;

    let (mut reference, mut single, mut batch16) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cold, mut cached) = (Vec::new(), Vec::new());
    for r in 0..REPEATS {
        reference.push(reference_decode(&path)?);
        single.push(native_decode(&engine, 1, r + 1).await?);
        batch16.push(native_decode(&engine, 16, r + 10).await?);
        let long = prompt(1000 + r, 512);
        cold.push(timed(&engine, long.clone(), 1).await?.0.as_secs_f64() * 1e3);
        cached.push(timed(&engine, long, 1).await?.0.as_secs_f64() * 1e3);
    }
    let (reference, single, batch16) = (median(reference), median(single), median(batch16));
    println!("model: {src} (as Q8_0)");
    println!(
        "single-sequence decode: native {single:.1} tok/s, reference {reference:.1} tok/s, ratio {:.2}",
        single / reference
    );
    println!(
        "16 sequences: {batch16:.1} tok/s aggregate, {:.2}x single",
        batch16 / single
    );
    println!(
        "TTFT, 512-token prompt: cold {:.0} ms, prefix cached {:.0} ms",
        median(cold),
        median(cached)
    );
    Ok(())
}
