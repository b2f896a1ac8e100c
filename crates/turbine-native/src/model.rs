//! A Llama-family transformer (Llama, SmolLM2, Qwen2 with its attention biases) whose forward
//! pass takes a whole step at once: the tokens of every scheduled sequence are flattened into
//! one batch for the linear layers, so weights are read once per step, while attention runs
//! per sequence over its paged KV blocks.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::config::{hf_config, ModelConfig, RopeStyle};
use crate::kv::PagedKv;
use crate::NativeError;

/// One sequence's part of a step: `tokens` at positions `start..`, its KV in `table`'s blocks.
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    pub table: &'a [u32],
}

/// A weight matrix, quantized or not, with an optional bias.
#[derive(Debug)]
struct Linear {
    weight: QMatMul,
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.weight.forward(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

#[derive(Debug)]
struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
    attn_norm: Tensor,
    ffn_norm: Tensor,
}

/// What loading did that an operator should know about.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// Weight types converted at load because this CPU has no fast kernel for them, with
    /// the number of tensors of each and the type they became.
    pub converted: Vec<(String, usize, String)>,
}

#[derive(Debug)]
pub struct Model {
    config: ModelConfig,
    device: Device,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
}

/// Quantized types that candle multiplies without SIMD on x86: slower than converting them
/// once to Q8_0 at load, which costs a little precision and some memory.
fn lacks_fast_kernel(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1)
}

struct GgufReader {
    content: gguf_file::Content,
    file: File,
    path: PathBuf,
    device: Device,
    convert: bool,
    converted: HashMap<(GgmlDType, GgmlDType), usize>,
}

impl GgufReader {
    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn qtensor(&mut self, name: &str) -> Result<QTensor, NativeError> {
        if !self.has(name) {
            return Err(NativeError::MissingTensor(format!("{name} in {}", self.path.display())));
        }
        let t = self.content.tensor(&mut self.file, name, &self.device)?;
        if self.convert && lacks_fast_kernel(t.dtype()) {
            *self.converted.entry((t.dtype(), GgmlDType::Q8_0)).or_default() += 1;
            return Ok(QTensor::quantize(&t.dequantize(&self.device)?, GgmlDType::Q8_0)?);
        }
        Ok(t)
    }

    fn dense(&mut self, name: &str) -> Result<Tensor, NativeError> {
        let t = self.content.tensor(&mut self.file, name, &self.device)?;
        Ok(t.dequantize(&self.device)?)
    }

    fn linear(&mut self, name: &str) -> Result<Linear, NativeError> {
        let weight = QMatMul::from_qtensor(self.qtensor(&format!("{name}.weight"))?)?;
        let bias_name = format!("{name}.bias");
        let bias = if self.has(&bias_name) {
            Some(self.dense(&bias_name)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }
}

impl Model {
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// A hash of the architecture and of some weights, telling checkpoints apart where their
    /// KV would differ: what a disk tier written by another model is refused on.
    pub fn fingerprint(&self) -> Result<u64, NativeError> {
        let rows = self.embed.dim(0)?.min(8);
        let sample: Vec<f32> = self
            .embed
            .narrow(0, 0, rows)?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1()?;
        let norm: Vec<f32> = self.norm.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        let mut bytes = format!("{:?}", self.config).into_bytes();
        for x in sample.iter().chain(&norm) {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        Ok(xxhash_rust::xxh3::xxh3_64(&bytes))
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Loads a GGUF file. With `convert`, weights of a type without a fast kernel become Q8_0.
    pub fn from_gguf(path: &Path, device: &Device, convert: bool) -> Result<(Self, LoadReport), NativeError> {
        let io = |source| NativeError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| NativeError::Gguf {
            path: path.to_path_buf(),
            source: e,
        })?;
        let config = ModelConfig::from_gguf(&content)?;
        let mut r = GgufReader {
            content,
            file,
            path: path.to_path_buf(),
            device: device.clone(),
            convert,
            converted: HashMap::new(),
        };
        let embed = r.dense("token_embd.weight")?;
        let norm = r.dense("output_norm.weight")?;
        let output = if r.has("output.weight") {
            r.linear("output")?
        } else {
            Linear {
                weight: QMatMul::from_qtensor(r.qtensor("token_embd.weight")?)?,
                bias: None,
            }
        };
        let rope_factors = if r.has("rope_freqs.weight") {
            Some(r.dense("rope_freqs.weight")?.to_vec1::<f32>()?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("blk.{i}");
            layers.push(Layer {
                q: r.linear(&format!("{p}.attn_q"))?,
                k: r.linear(&format!("{p}.attn_k"))?,
                v: r.linear(&format!("{p}.attn_v"))?,
                o: r.linear(&format!("{p}.attn_output"))?,
                gate: r.linear(&format!("{p}.ffn_gate"))?,
                up: r.linear(&format!("{p}.ffn_up"))?,
                down: r.linear(&format!("{p}.ffn_down"))?,
                attn_norm: r.dense(&format!("{p}.attn_norm.weight"))?,
                ffn_norm: r.dense(&format!("{p}.ffn_norm.weight"))?,
            });
        }
        let mut converted: Vec<_> = r
            .converted
            .iter()
            .map(|((from, to), n)| (format!("{from:?}"), *n, format!("{to:?}")))
            .collect();
        converted.sort();
        let mut inv_freq = config.inv_freq();
        if let Some(factors) = rope_factors {
            for (f, s) in inv_freq.iter_mut().zip(factors) {
                *f /= s;
            }
        }
        let model = Self::assemble(config, device, embed, layers, norm, output, &inv_freq)?;
        Ok((model, LoadReport { converted }))
    }

    /// Loads a Hugging Face directory: `config.json` and `*.safetensors` (f32, f16 or bf16,
    /// computed in f32).
    pub fn from_safetensors_dir(dir: &Path, device: &Device) -> Result<Self, NativeError> {
        let read = |p: PathBuf| std::fs::read_to_string(&p).map_err(|source| NativeError::Io { path: p, source });
        let text = read(dir.join("config.json"))?;
        let config = ModelConfig::from_hf_json(&text)?;
        let tied = hf_config(&text)?.tie_word_embeddings;
        let entries = std::fs::read_dir(dir).map_err(|source| NativeError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(NativeError::Config(format!(
                "no .safetensors file in {}",
                dir.display()
            )));
        }
        let mut tensors = HashMap::new();
        for f in &files {
            let loaded = candle_core::safetensors::load(f, device).map_err(|e| NativeError::Gguf {
                path: f.clone(),
                source: e,
            })?;
            tensors.extend(loaded);
        }
        let mut t = Safetensors { tensors, dir };
        let embed = t.take("model.embed_tokens.weight")?;
        let qkv_bias = config.architecture == "qwen2";
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                q: t.linear(&format!("{p}.self_attn.q_proj"), qkv_bias)?,
                k: t.linear(&format!("{p}.self_attn.k_proj"), qkv_bias)?,
                v: t.linear(&format!("{p}.self_attn.v_proj"), qkv_bias)?,
                o: t.linear(&format!("{p}.self_attn.o_proj"), false)?,
                gate: t.linear(&format!("{p}.mlp.gate_proj"), false)?,
                up: t.linear(&format!("{p}.mlp.up_proj"), false)?,
                down: t.linear(&format!("{p}.mlp.down_proj"), false)?,
                attn_norm: t.take(&format!("{p}.input_layernorm.weight"))?,
                ffn_norm: t.take(&format!("{p}.post_attention_layernorm.weight"))?,
            });
        }
        let norm = t.take("model.norm.weight")?;
        let output = if tied && !t.tensors.contains_key("lm_head.weight") {
            Linear {
                weight: QMatMul::Tensor(embed.clone()),
                bias: None,
            }
        } else {
            t.linear("lm_head", false)?
        };
        let inv_freq = config.inv_freq();
        Self::assemble(config, device, embed, layers, norm, output, &inv_freq)
    }

    /// The model from its weights, whichever file they came from, with its rope tables.
    fn assemble(
        config: ModelConfig,
        device: &Device,
        embed: Tensor,
        layers: Vec<Layer>,
        norm: Tensor,
        output: Linear,
        inv_freq: &[f32],
    ) -> Result<Self, NativeError> {
        let (cos, sin) = rope_tables(inv_freq, config.max_position_embeddings, device)?;
        Ok(Self {
            config,
            device: device.clone(),
            embed,
            layers,
            norm,
            output,
            cos,
            sin,
        })
    }

    /// Runs one step: every sequence's new tokens through all layers, their keys and values
    /// written to `kv`, and returns the logits after each sequence's last token,
    /// `[sequences, vocab]`.
    pub fn forward(&self, seqs: &[SeqInput<'_>], kv: &mut PagedKv) -> Result<Tensor, NativeError> {
        let c = &self.config;
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let group = nh / nkv;
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut last = Vec::with_capacity(seqs.len());
        for s in seqs {
            let end = s.start + s.tokens.len();
            if s.tokens.is_empty() || end > c.max_position_embeddings || end > s.table.len() * kv.block_size() {
                return Err(NativeError::Batch(format!(
                    "{} tokens at position {} with {} blocks (context {})",
                    s.tokens.len(),
                    s.start,
                    s.table.len(),
                    c.max_position_embeddings
                )));
            }
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(NativeError::Batch(format!(
                    "token id {bad} outside the vocabulary of {}",
                    c.vocab_size
                )));
            }
            tokens.extend_from_slice(s.tokens);
            positions.extend((s.start..end).map(|p| p as u32));
            last.push((tokens.len() - 1) as u32);
        }
        let total = tokens.len();
        let dev = &self.device;
        let mut x = self.embed.index_select(&Tensor::new(tokens.as_slice(), dev)?, 0)?;
        let pos = Tensor::new(positions.as_slice(), dev)?;
        let (cos, sin) = (self.cos.index_select(&pos, 0)?, self.sin.index_select(&pos, 0)?);
        let rope = |t: Tensor, heads: usize| -> candle_core::Result<Tensor> {
            let t = t.reshape((1, total, heads, hd))?.transpose(1, 2)?.contiguous()?;
            match c.rope_style {
                RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&t, &cos, &sin),
                RopeStyle::Halves => candle_nn::rotary_emb::rope(&t, &cos, &sin),
            }
        };
        let eps = c.rms_norm_eps as f32;
        let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
        for (l, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            // [1, heads, tokens, head_dim]
            let q = rope(layer.q.forward(&h)?, nh)?;
            let k = rope(layer.k.forward(&h)?, nkv)?;
            let v = layer.v.forward(&h)?;
            let k_rows = k.transpose(1, 2)?.flatten_all()?.to_vec1::<f32>()?;
            let v_rows = v.flatten_all()?.to_vec1::<f32>()?;
            let kvd = nkv * hd;
            let mut at = 0;
            for s in seqs {
                for j in 0..s.tokens.len() {
                    let row = (at + j) * kvd..(at + j + 1) * kvd;
                    kv.write(l, s.table, s.start + j, &k_rows[row.clone()], &v_rows[row]);
                }
                at += s.tokens.len();
            }
            let mut ys = Vec::with_capacity(seqs.len());
            let mut at = 0;
            for s in seqs {
                let n = s.tokens.len();
                let kv_len = s.start + n;
                kv.gather(l, s.table, kv_len, &mut kbuf, &mut vbuf);
                let keys = Tensor::from_slice(&kbuf, (nkv, kv_len, hd), dev)?;
                let values = Tensor::from_slice(&vbuf, (nkv, kv_len, hd), dev)?;
                // The query heads sharing a key/value head become rows of one matrix, so
                // grouped-query attention needs no copies of the keys.
                let qs = q.narrow(2, at, n)?.contiguous()?.reshape((nkv, group * n, hd))?;
                let att = (qs.matmul(&keys.t()?)? / (hd as f64).sqrt())?;
                let att = if n > 1 {
                    let mask: Vec<u8> = (0..n)
                        .flat_map(|i| (0..kv_len).map(move |j| u8::from(j > s.start + i)))
                        .collect();
                    let mask = Tensor::from_slice(&mask, (n, kv_len), dev)?.broadcast_as((nkv, group, n, kv_len))?;
                    let neg_inf = Tensor::new(f32::NEG_INFINITY, dev)?.broadcast_as((nkv, group, n, kv_len))?;
                    mask.where_cond(&neg_inf, &att.reshape((nkv, group, n, kv_len))?)?
                        .reshape((nkv, group * n, kv_len))?
                } else {
                    att
                };
                let att = candle_nn::ops::softmax_last_dim(&att)?;
                let y = att
                    .matmul(&values)?
                    .reshape((nh, n, hd))?
                    .transpose(0, 1)?
                    .reshape((n, nh * hd))?;
                ys.push(y);
                at += n;
            }
            let y = Tensor::cat(&ys, 0)?;
            x = (x + layer.o.forward(&y)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let mlp = layer
                .down
                .forward(&(candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?)?;
            x = (x + mlp)?;
        }
        let x = x.index_select(&Tensor::new(last.as_slice(), dev)?, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        Ok(self.output.forward(&x)?)
    }
}

struct Safetensors<'a> {
    tensors: HashMap<String, Tensor>,
    dir: &'a Path,
}

impl Safetensors<'_> {
    fn take(&mut self, name: &str) -> Result<Tensor, NativeError> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| NativeError::MissingTensor(format!("{name} in {}", self.dir.display())))?;
        Ok(t.to_dtype(DType::F32)?)
    }

    fn linear(&mut self, name: &str, bias: bool) -> Result<Linear, NativeError> {
        let weight = QMatMul::Tensor(self.take(&format!("{name}.weight"))?);
        let bias = if bias {
            Some(self.take(&format!("{name}.bias"))?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }
}

fn rope_tables(inv_freq: &[f32], max_positions: usize, device: &Device) -> Result<(Tensor, Tensor), NativeError> {
    let inv = Tensor::new(inv_freq, device)?;
    let positions = Tensor::arange(0, max_positions as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((max_positions, 1))?;
    let angles = positions.matmul(&inv.reshape((1, inv_freq.len()))?)?;
    Ok((angles.cos()?, angles.sin()?))
}

/// Copies a GGUF file with its slow-kernel weights converted to Q8_0 (see [`Model::from_gguf`]),
/// so that the conversion is paid once, not at every start. Returns what was converted.
pub fn write_converted_gguf(src: &Path, dst: &Path) -> Result<LoadReport, NativeError> {
    let gguf_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| NativeError::Gguf { path, source }
    };
    let mut file = File::open(src).map_err(|source| NativeError::Io {
        path: src.to_path_buf(),
        source,
    })?;
    let content = gguf_file::Content::read(&mut file).map_err(gguf_err(src))?;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut converted: HashMap<String, usize> = HashMap::new();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let t = content.tensor(&mut file, name, &Device::Cpu).map_err(gguf_err(src))?;
        let t = if lacks_fast_kernel(t.dtype()) {
            *converted.entry(format!("{:?}", t.dtype())).or_default() += 1;
            QTensor::quantize(&t.dequantize(&Device::Cpu)?, GgmlDType::Q8_0)?
        } else {
            t
        };
        tensors.push((name.as_str(), t));
    }
    let mut metadata: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    metadata.sort_by_key(|(k, _)| *k);
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    // Written next to the destination and renamed, so a reader never sees half a file.
    let partial = dst.with_extension("gguf.partial");
    let written = (|| {
        let mut out = std::io::BufWriter::new(File::create(&partial).map_err(|source| NativeError::Io {
            path: partial.clone(),
            source,
        })?);
        gguf_file::write(&mut out, &metadata, &refs).map_err(gguf_err(&partial))?;
        std::io::Write::flush(&mut out).map_err(|source| NativeError::Io {
            path: partial.clone(),
            source,
        })?;
        drop(out);
        std::fs::rename(&partial, dst).map_err(|source| NativeError::Io {
            path: dst.to_path_buf(),
            source,
        })
    })();
    if let Err(e) = written {
        // A write that failed (a full disk, most often) leaves nothing behind to fill it further.
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    let mut converted: Vec<_> = converted
        .into_iter()
        .map(|(from, n)| (from, n, "Q8_0".to_string()))
        .collect();
    converted.sort();
    Ok(LoadReport { converted })
}
