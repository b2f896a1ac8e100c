//! What each KV cache dtype costs and changes on a real model: KV bytes per token (and so
//! tokens per 512 MiB), the time to gather a 1024-token sequence's KV for one layer, decode
//! time, and greedy agreement with f32 on fixed chat prompts: the share of prompts whose
//! greedy text is identical, and the share of steps whose greedy token matches when every
//! dtype is fed f32's tokens (so one early difference does not count for all that follow).
//!
//! `cargo run --release -p turbine-native --example kv_dtype_agreement -- [MODEL.gguf] [TOKENS]`
//! [default: target/test-models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, as
//! `scripts/fetch-test-models` puts it, and 32 tokens].
//!
//! With quantized weights candle quantizes each matmul's activations too, so any change to
//! the KV, even of one bit, may flip an activation's rounding and move the logits far more
//! than the KV's own error; `CANDLE_DEQUANTIZE_ALL=1` runs the weights in f32 and shows the
//! dtype's own effect.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::Device;
use turbine_native::sampling::argmax;
use turbine_native::{KvDtype, Model, PagedKv, SeqInput};
use turbine_preprocess::Preprocessor;

const BLOCK: usize = 16;

const PROMPTS: [&str; 8] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three primary colors.",
    "How do plants make food?",
    "Give me a tip for learning a new language.",
    "What is 12 times 7?",
    "Describe a cat to someone who has never seen one.",
];

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(args.next().unwrap_or_else(|| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../target/test-models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
        .to_owned()
    }));
    let tokens: usize = args.next().map_or(Ok(32), |t| t.parse()).context("TOKENS")?;
    let (model, _) = Model::from_gguf(&path, &Device::Cpu, true).with_context(|| path.display().to_string())?;
    let pre = Preprocessor::load(&path).with_context(|| path.display().to_string())?;
    let c = model.config().clone();
    println!(
        "{}: {} layers, {} KV heads of {}; {} prompts, {tokens} tokens each",
        path.display(),
        c.num_layers,
        c.num_kv_heads,
        c.head_dim,
        PROMPTS.len()
    );

    let prompts = PROMPTS
        .iter()
        .map(|p| {
            Ok(pre
                .encode_chat(&[serde_json::json!({"role": "user", "content": p})], None)?
                .1)
        })
        .collect::<Result<Vec<_>>>()?;
    let eos = pre.tokenizer().eos_token_ids().to_vec();
    let reference = prompts
        .iter()
        .map(|p| decode(&model, KvDtype::F32, p, tokens, None))
        .collect::<Result<Vec<_>>>()?;

    println!("dtype  bytes/token  tokens/512MiB  gather 1024 (us)  decode (ms/token)  same text  tokens agree  worst logit err");
    for dtype in KvDtype::ALL {
        let per_token = PagedKv::bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim, dtype);
        let (mut same, mut agree, mut steps, mut worst) = (0, 0, 0, 0.0f32);
        let mut time = Duration::ZERO;
        for (p, want) in prompts.iter().zip(&reference) {
            if dtype == KvDtype::F32 {
                // The reference itself: no need to decode it twice more.
                (same, agree, steps, time) = (same + 1, agree + tokens, steps + tokens, time + want.time);
                continue;
            }
            let free = decode(&model, dtype, p, tokens, None)?;
            time += free.time;
            let text = |t: &[u32]| pre.tokenizer().decode(until_eos(t, &eos), true);
            same += usize::from(text(&free.tokens)? == text(&want.tokens)?);
            let forced = decode(&model, dtype, p, tokens, Some(&want.tokens))?;
            for (g, w) in forced.logits.iter().zip(&want.logits) {
                agree += usize::from(argmax(g) == argmax(w));
                worst = worst.max(relative_error(g, w));
                steps += 1;
            }
        }
        println!(
            "{:<5}  {per_token:>11}  {:>13}  {:>16.1}  {:>17.2}  {:>6}/{}  {:>11.1}%  {:>15.2e}",
            dtype.name(),
            (512usize << 20) / per_token,
            gather_micros(c.num_kv_heads, c.head_dim, dtype),
            time.as_secs_f64() * 1e3 / (PROMPTS.len() * tokens) as f64,
            same,
            PROMPTS.len(),
            100.0 * agree as f64 / steps.max(1) as f64,
            worst,
        );
    }
    Ok(())
}

struct Decoded {
    tokens: Vec<u32>,
    /// The last token's logits at each step.
    logits: Vec<Vec<f32>>,
    time: Duration,
}

/// `n` greedy steps after `prompt` over a cache of `dtype`, or fed `forced` tokens instead
/// of its own picks.
fn decode(model: &Model, dtype: KvDtype, prompt: &[u32], n: usize, forced: Option<&[u32]>) -> Result<Decoded> {
    let c = model.config();
    let table: Vec<u32> = (0..(prompt.len() + n).div_ceil(BLOCK) as u32).collect();
    let mut kv = PagedKv::new(c.num_layers, table.len(), BLOCK, c.num_kv_heads, c.head_dim, dtype);
    let (mut tokens, mut logits) = (Vec::new(), Vec::new());
    let (mut input, mut start) = (prompt.to_vec(), 0);
    let started = Instant::now();
    for step in 0..n {
        let seq = SeqInput {
            tokens: &input,
            start,
            table: &table,
        };
        let row = model.forward(&[seq], &mut kv)?.to_vec2::<f32>()?.remove(0);
        let next = forced.map_or_else(|| argmax(&row), |f| f[step]);
        logits.push(row);
        tokens.push(next);
        start += input.len();
        input = vec![next];
    }
    Ok(Decoded {
        tokens,
        logits,
        time: started.elapsed(),
    })
}

/// The tokens up to the first end-of-sequence token: what a client would have been sent.
fn until_eos<'a>(tokens: &'a [u32], eos: &[u32]) -> &'a [u32] {
    let end = tokens.iter().position(|t| eos.contains(t)).unwrap_or(tokens.len());
    &tokens[..end]
}

/// The largest difference between two logit rows, relative to the largest logit.
fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    got.iter().zip(want).fold(0.0f32, |m, (g, w)| m.max((g - w).abs())) / scale
}

/// Microseconds to gather one layer's keys and values of a 1024-token sequence.
fn gather_micros(kv_heads: usize, head_dim: usize, dtype: KvDtype) -> f64 {
    const LEN: usize = 1024;
    let mut kv = PagedKv::new(1, LEN / BLOCK, BLOCK, kv_heads, head_dim, dtype);
    let table: Vec<u32> = (0..(LEN / BLOCK) as u32).rev().collect();
    let row: Vec<f32> = (0..kv_heads * head_dim).map(|i| (i as f32 * 0.37).sin()).collect();
    for pos in 0..LEN {
        kv.write(0, &table, pos, &row, &row);
    }
    let (mut k, mut v) = (Vec::new(), Vec::new());
    kv.gather(0, &table, LEN, &mut k, &mut v);
    let rounds = 2000;
    let started = Instant::now();
    for _ in 0..rounds {
        kv.gather(0, &table, LEN, &mut k, &mut v);
        std::hint::black_box((&k, &v));
    }
    started.elapsed().as_secs_f64() * 1e6 / rounds as f64
}
