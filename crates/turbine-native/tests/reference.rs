//! The forward pass against candle-transformers' own Llama implementations, token for token:
//! SmolLM2-135M (GGUF, against `quantized_llama`) and a generated random-weight model
//! (safetensors, against `llama`), alone, batched with others of different lengths, and with
//! the prompt's prefix served from cached blocks.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::{llama, quantized_llama, qwen2};
use turbine_native::tiny::{write_tiny_model, TinySpec};
use turbine_native::{sampling::argmax, write_converted_gguf, KvDtype, Model, PagedKv, SeqInput};

const SMOLLM2: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../target/test-models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
);
const BLOCK: usize = 16;
const STEPS: usize = 64;

/// Drives the model directly over a paged cache whose blocks are handed out in order.
struct Direct {
    model: Model,
    kv: PagedKv,
    next_block: u32,
}

impl Direct {
    fn new(model: Model) -> Self {
        let c = model.config().clone();
        Self {
            kv: PagedKv::new(c.num_layers, 512, BLOCK, c.num_kv_heads, c.head_dim, KvDtype::F32),
            model,
            next_block: 0,
        }
    }

    fn blocks(&mut self, n: usize) -> Vec<u32> {
        let t = (self.next_block..self.next_block + n as u32).collect();
        self.next_block += n as u32;
        t
    }

    /// Greedy continuations of all `prompts`, prefilled together and decoded together.
    /// `cached` optionally gives, per prompt, blocks already holding its first tokens.
    fn greedy(&mut self, prompts: &[Vec<u32>], cached: &[(Vec<u32>, usize)]) -> Result<Vec<Vec<u32>>> {
        let mut tables = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let (mut table, _) = cached.get(i).cloned().unwrap_or_default();
            let need = (p.len() + STEPS).div_ceil(BLOCK) - table.len();
            table.extend(self.blocks(need));
            tables.push(table);
        }
        let starts: Vec<usize> = (0..prompts.len()).map(|i| cached.get(i).map_or(0, |c| c.1)).collect();
        let inputs: Vec<SeqInput> = prompts
            .iter()
            .zip(&tables)
            .zip(&starts)
            .map(|((p, t), &s)| SeqInput {
                tokens: &p[s..],
                start: s,
                table: t,
            })
            .collect();
        let mut out: Vec<Vec<u32>> = pick(&self.model.forward(&inputs, &mut self.kv)?)?
            .into_iter()
            .map(|t| vec![t])
            .collect();
        for step in 1..STEPS {
            let last: Vec<[u32; 1]> = out.iter().map(|o| [o[o.len() - 1]]).collect();
            let inputs: Vec<SeqInput> = (0..prompts.len())
                .map(|i| SeqInput {
                    tokens: &last[i],
                    start: prompts[i].len() + step - 1,
                    table: &tables[i],
                })
                .collect();
            for (o, t) in out.iter_mut().zip(pick(&self.model.forward(&inputs, &mut self.kv)?)?) {
                o.push(t);
            }
        }
        Ok(out)
    }

    /// Prefills `prompt` alone and returns its blocks, for another prompt to reuse.
    fn prefill(&mut self, prompt: &[u32]) -> Result<Vec<u32>> {
        let table = self.blocks(prompt.len().div_ceil(BLOCK));
        self.model.forward(
            &[SeqInput {
                tokens: prompt,
                start: 0,
                table: &table,
            }],
            &mut self.kv,
        )?;
        Ok(table)
    }
}

fn pick(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.to_vec2::<f32>()?.iter().map(|row| argmax(row)).collect())
}

/// Greedy continuation of `prompt` by a reference model whose `step` takes the new
/// tokens `[1, n]` at position `pos` and returns the last token's logits.
fn greedy_reference(
    prompt: &[u32],
    mut step: impl FnMut(&Tensor, usize) -> candle_core::Result<Tensor>,
) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    let mut pos = 0;
    for _ in 0..STEPS {
        let x = Tensor::new(input.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let t = argmax(&step(&x, pos)?.to_vec1::<f32>()?);
        pos += input.len();
        out.push(t);
        input = vec![t];
    }
    Ok(out)
}

fn reference_quantized(path: &Path, prompt: &[u32]) -> Result<Vec<u32>> {
    let mut file = std::fs::File::open(path)?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
    let mut model = quantized_llama::ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?;
    greedy_reference(prompt, |x, pos| model.forward(x, pos)?.squeeze(0))
}

fn reference_safetensors(dir: &Path, prompt: &[u32]) -> Result<Vec<u32>> {
    let cfg: llama::LlamaConfig = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let cfg = cfg.into_config(false);
    let weights = dir.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&weights, &Device::Cpu)?;
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let model = llama::Llama::load(vb, &cfg)?;
    let mut cache = llama::Cache::new(true, DType::F32, &cfg, &Device::Cpu)?;
    greedy_reference(prompt, |x, pos| model.forward(x, pos, &mut cache)?.squeeze(0))
}

fn reference_qwen2(dir: &Path, prompt: &[u32]) -> Result<Vec<u32>> {
    let cfg: qwen2::Config = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
    let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let mut model = qwen2::ModelForCausalLM::new(&cfg, vb)?;
    greedy_reference(prompt, |x, pos| model.forward(x, pos)?.flatten_all())
}

/// Prompts of different lengths, from real text where a tokenizer is at hand.
fn prompts(vocab: u32) -> Vec<Vec<u32>> {
    let lens = [7, 19, 33, 48, 5, 70, 16, 101];
    lens.iter()
        .enumerate()
        .map(|(i, &n)| {
            (0..n)
                .map(|j| ((i * 131 + j * 17 + 3) as u32).wrapping_mul(2_654_435_761) % vocab)
                .collect()
        })
        .collect()
}

fn smollm2_q8(dir: &Path) -> Result<PathBuf> {
    anyhow::ensure!(
        Path::new(SMOLLM2).exists(),
        "no SmolLM2 at {SMOLLM2}: run scripts/fetch-test-models"
    );
    let q8 = dir.join("smollm2-q8_0.gguf");
    let report = write_converted_gguf(Path::new(SMOLLM2), &q8)?;
    assert!(report.converted.iter().any(|(from, _, _)| from == "Q4_1"), "{report:?}");
    Ok(q8)
}

/// Everything against one converted SmolLM2, which is costly to load twice: single requests,
/// eight batched together, and a prefix served from the cache.
#[test]
fn smollm2_matches_candle_quantized_llama() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let q8 = smollm2_q8(dir.path())?;
    let (model, report) = Model::from_gguf(&q8, &Device::Cpu, true)?;
    assert!(report.converted.is_empty(), "already Q8_0: {report:?}");
    let vocab = model.config().vocab_size as u32;
    let mut direct = Direct::new(model);
    let prompts = prompts(vocab);

    let reference: Vec<Vec<u32>> = [0, 5]
        .iter()
        .map(|&i| reference_quantized(&q8, &prompts[i]).context("reference"))
        .collect::<Result<_>>()?;
    let alone = direct.greedy(&prompts[..1], &[])?;
    assert_eq!(alone[0], reference[0], "single request");

    let batched = direct.greedy(&prompts, &[])?;
    assert_eq!(batched[0], reference[0], "first of eight batched");
    assert_eq!(batched[5], reference[1], "sixth of eight batched");
    for i in [1, 3, 7] {
        let p = &prompts[i];
        let single = direct.greedy(std::slice::from_ref(p), &[])?;
        assert_eq!(batched[i], single[0], "prompt {i} batched and alone");
    }

    // Prompt 5 (70 tokens) with its first 64 tokens already in four cached blocks.
    let cached = direct.prefill(&prompts[5][..64])?;
    let with_prefix = direct.greedy(&prompts[5..6], &[(cached, 64)])?;
    assert_eq!(with_prefix[0], reference[1], "prefix from cache");
    Ok(())
}

#[test]
fn tiny_safetensors_model_matches_candle_llama() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_tiny_model(dir.path(), &TinySpec::default())?;
    let model = Model::from_safetensors_dir(dir.path(), &Device::Cpu)?;
    let vocab = model.config().vocab_size as u32;
    let mut direct = Direct::new(model);
    let prompts = prompts(vocab);
    let batched = direct.greedy(&prompts, &[])?;
    for i in [0, 3, 7] {
        assert_eq!(
            batched[i],
            reference_safetensors(dir.path(), &prompts[i])?,
            "prompt {i}"
        );
    }
    let distinct: std::collections::HashSet<u32> = batched.iter().flatten().copied().collect();
    assert!(
        distinct.len() > 10,
        "a degenerate model would prove little: {distinct:?}"
    );
    let cached = direct.prefill(&prompts[7][..96])?;
    assert_eq!(
        direct.greedy(&prompts[7..8], &[(cached, 96)])?[0],
        batched[7],
        "prefix from cache"
    );
    Ok(())
}

#[test]
fn tiny_qwen2_model_with_biases_matches_candle_qwen2() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = TinySpec {
        qwen2: true,
        ..TinySpec::default()
    };
    write_tiny_model(dir.path(), &spec)?;
    let model = Model::from_safetensors_dir(dir.path(), &Device::Cpu)?;
    assert_eq!(model.config().architecture, "qwen2");
    let vocab = model.config().vocab_size as u32;
    let mut direct = Direct::new(model);
    let prompts = prompts(vocab);
    let batched = direct.greedy(&prompts, &[])?;
    for i in [1, 5] {
        assert_eq!(batched[i], reference_qwen2(dir.path(), &prompts[i])?, "prompt {i}");
    }
    Ok(())
}
