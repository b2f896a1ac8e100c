//! Writes a small Llama model with random weights as a Hugging Face directory (config,
//! safetensors, a byte-level tokenizer and a chat template), so that tests and demos run the
//! whole native path, tokenizer to sampling, in milliseconds and without downloading anything.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::NativeError;

/// The shape of the generated model: 259 tokens (256 bytes, then BOS, EOS and a chat
/// marker), 2 layers, grouped-query attention with 4 query and 2 key/value heads.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub max_positions: usize,
    pub seed: u64,
    /// Write a Qwen2 model (biases on q, k and v) instead of a Llama.
    pub qwen2: bool,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            hidden: 64,
            intermediate: 128,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            max_positions: 1024,
            seed: 7,
            qwen2: false,
        }
    }
}

pub const TINY_VOCAB: usize = 259;
pub const TINY_BOS: u32 = 256;
pub const TINY_EOS: u32 = 257;

/// Deterministic weights from `seed`: a splitmix stream mapped to a uniform range, so the
/// same spec writes the same model on any machine.
fn random(n: usize, scale: f32, state: &mut u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = *state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

pub fn write_tiny_model(dir: &Path, spec: &TinySpec) -> Result<(), NativeError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| NativeError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let head_dim = spec.hidden / spec.heads;
    let (architecture, model_type) = if spec.qwen2 {
        ("Qwen2ForCausalLM", "qwen2")
    } else {
        ("LlamaForCausalLM", "llama")
    };
    let config = json!({
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_act": "silu",
        "sliding_window": spec.max_positions,
        "max_window_layers": spec.layers,
        "use_sliding_window": false,
        "vocab_size": TINY_VOCAB,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": spec.max_positions,
        "tie_word_embeddings": false,
        "bos_token_id": TINY_BOS,
        "eos_token_id": TINY_EOS,
    });
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(io(&p))
    };
    write("config.json", format!("{config:#}"))?;

    let dev = Device::Cpu;
    let mut state = spec.seed;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut add = |name: String, shape: &[usize], scale: f32, tensors: &mut HashMap<String, Tensor>| {
        let n = shape.iter().product();
        let t = Tensor::from_vec(random(n, scale, &mut state), shape, &dev)?;
        tensors.insert(name, t);
        Ok::<_, NativeError>(())
    };
    let (h, i, kv) = (spec.hidden, spec.intermediate, spec.kv_heads * head_dim);
    // Large enough weights that logits spread out: near-ties would make greedy comparisons
    // between implementations hinge on rounding.
    add("model.embed_tokens.weight".into(), &[TINY_VOCAB, h], 1.0, &mut tensors)?;
    add("lm_head.weight".into(), &[TINY_VOCAB, h], 0.5, &mut tensors)?;
    tensors.insert("model.norm.weight".into(), Tensor::ones(h, DType::F32, &dev)?);
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        add(format!("{p}.self_attn.q_proj.weight"), &[h, h], 0.3, &mut tensors)?;
        add(format!("{p}.self_attn.k_proj.weight"), &[kv, h], 0.3, &mut tensors)?;
        add(format!("{p}.self_attn.v_proj.weight"), &[kv, h], 0.3, &mut tensors)?;
        add(format!("{p}.self_attn.o_proj.weight"), &[h, h], 0.2, &mut tensors)?;
        if spec.qwen2 {
            add(format!("{p}.self_attn.q_proj.bias"), &[h], 0.5, &mut tensors)?;
            add(format!("{p}.self_attn.k_proj.bias"), &[kv], 0.5, &mut tensors)?;
            add(format!("{p}.self_attn.v_proj.bias"), &[kv], 0.5, &mut tensors)?;
        }
        add(format!("{p}.mlp.gate_proj.weight"), &[i, h], 0.2, &mut tensors)?;
        add(format!("{p}.mlp.up_proj.weight"), &[i, h], 0.2, &mut tensors)?;
        add(format!("{p}.mlp.down_proj.weight"), &[h, i], 0.2, &mut tensors)?;
        tensors.insert(
            format!("{p}.input_layernorm.weight"),
            Tensor::ones(h, DType::F32, &dev)?,
        );
        tensors.insert(
            format!("{p}.post_attention_layernorm.weight"),
            Tensor::ones(h, DType::F32, &dev)?,
        );
    }
    let weights = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights).map_err(|source| NativeError::Gguf { path: weights, source })?;

    write("tokenizer.json", format!("{:#}", byte_tokenizer()))?;
    let tokenizer_config = json!({
        "bos_token": "<s>",
        "eos_token": "</s>",
        "add_bos_token": true,
        "chat_template": "{% for m in messages %}<|im|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|im|>assistant\n{% endif %}",
    });
    write("tokenizer_config.json", format!("{tokenizer_config:#}"))
}

/// A byte-level BPE without merges: every byte is one token, so any text round-trips.
fn byte_tokenizer() -> serde_json::Value {
    // GPT-2's byte-to-character map: printable bytes stand for themselves, the rest are
    // shifted past 255 so that every token is a visible character.
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut extra = 0;
    for b in 0..=255u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let mut vocab = serde_json::Map::new();
    for (b, c) in printable.iter().zip(&chars) {
        let ch = char::from_u32(*c).unwrap_or('?').to_string();
        vocab.insert(ch, json!(b));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": TINY_BOS, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": TINY_EOS, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": TINY_EOS + 1, "content": "<|im|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []}
    })
}
