//! A model's shape, read from GGUF metadata or a Hugging Face `config.json`, in one form
//! the forward pass uses whichever file it came from.

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use crate::NativeError;

/// How rotary embeddings pair a head's dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (0,1), (2,3)...: llama.cpp permutes Llama's q and k weights into this
    /// order when it writes a GGUF.
    Interleaved,
    /// First half against second half, as Hugging Face checkpoints (and Qwen2 GGUFs) expect.
    Halves,
}

/// Llama 3's frequency-dependent rope scaling, from `rope_scaling` in `config.json`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `llama` or `qwen2`: the families whose layers this engine implements.
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub rope_scaling: Option<Llama3Scaling>,
    pub max_position_embeddings: usize,
}

impl ModelConfig {
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Inverse frequencies of the rotary embedding, one per pair of head dimensions.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f32> = (0..d)
            .step_by(2)
            .map(|i| 1.0 / self.rope_theta.powf(i as f32 / d as f32))
            .collect();
        let Some(s) = self.rope_scaling else { return base };
        let low_wavelen = s.original_max_position_embeddings as f32 / s.low_freq_factor;
        let high_wavelen = s.original_max_position_embeddings as f32 / s.high_freq_factor;
        base.into_iter()
            .map(|freq| {
                let wavelen = 2.0 * std::f32::consts::PI / freq;
                if wavelen < high_wavelen {
                    freq
                } else if wavelen > low_wavelen {
                    freq / s.factor
                } else {
                    let smooth = (s.original_max_position_embeddings as f32 / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * freq / s.factor + smooth * freq
                }
            })
            .collect()
    }

    fn validate(self) -> Result<Self, NativeError> {
        let bad = |what: String| Err(NativeError::Config(what));
        if !matches!(self.architecture.as_str(), "llama" | "qwen2") {
            return Err(NativeError::UnsupportedArchitecture(self.architecture));
        }
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.num_heads % self.num_kv_heads != 0 {
            return bad(format!(
                "{} attention heads cannot be shared by {} key/value heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return bad(format!("head dimension {} must be even and positive", self.head_dim));
        }
        if self.num_layers == 0 || self.vocab_size == 0 || self.hidden_size == 0 {
            return bad("the model has no layers, vocabulary or hidden size".to_string());
        }
        Ok(self)
    }

    /// From a GGUF header. `vocab_size` comes from the embedding tensor's shape, which every
    /// GGUF has, unlike the optional `vocab_size` key.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self, NativeError> {
        let arch = match content.metadata.get("general.architecture") {
            Some(v) => v.to_string().map_err(NativeError::Candle)?.clone(),
            None => return Err(NativeError::Config("no general.architecture in the GGUF".into())),
        };
        let key = |k: &str| format!("{arch}.{k}");
        let get = |k: &str| content.metadata.get(&key(k));
        let int = |k: &str| -> Result<usize, NativeError> {
            let v = get(k).ok_or_else(|| NativeError::Config(format!("no {} in the GGUF", key(k))))?;
            let n = v.to_u32().or_else(|_| v.to_u64().map(|n| n as u32))?;
            Ok(n as usize)
        };
        let float = |k: &str, default: f32| -> Result<f32, NativeError> {
            match get(k) {
                Some(v) => Ok(v.to_f32()?),
                None => Ok(default),
            }
        };
        let vocab_size = content
            .tensor_infos
            .get("token_embd.weight")
            .map(|t| t.shape.dims()[0])
            .ok_or_else(|| NativeError::MissingTensor("token_embd.weight".into()))?;
        let hidden_size = int("embedding_length")?;
        let num_heads = int("attention.head_count")?;
        let num_kv_heads = if get("attention.head_count_kv").is_some() {
            int("attention.head_count_kv")?
        } else {
            num_heads
        };
        let head_dim = if get("attention.key_length").is_some() {
            int("attention.key_length")?
        } else {
            hidden_size / num_heads.max(1)
        };
        let rope_style = if arch == "qwen2" {
            RopeStyle::Halves
        } else {
            RopeStyle::Interleaved
        };
        Self {
            vocab_size,
            hidden_size,
            intermediate_size: int("feed_forward_length")?,
            num_layers: int("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f64::from(float("attention.layer_norm_rms_epsilon", 1e-5)?),
            rope_theta: float("rope.freq_base", 10_000.0)?,
            rope_style,
            // llama.cpp bakes Llama 3 scaling into a `rope_freqs` tensor, read with the weights.
            rope_scaling: None,
            max_position_embeddings: int("context_length").unwrap_or(4096),
            architecture: arch,
        }
        .validate()
    }

    /// From a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self, NativeError> {
        let hf: HfConfig = serde_json::from_str(text).map_err(|e| NativeError::Config(format!("config.json: {e}")))?;
        let arch = match hf.model_type.as_deref() {
            Some("llama") | None => "llama",
            Some("qwen2") => "qwen2",
            Some(other) => return Err(NativeError::UnsupportedArchitecture(other.to_string())),
        };
        let rope_scaling = match hf.rope_scaling {
            None => None,
            Some(s) if s.rope_type.as_deref() == Some("llama3") => Some(Llama3Scaling {
                factor: s.factor.unwrap_or(1.0),
                low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                original_max_position_embeddings: s.original_max_position_embeddings.unwrap_or(8192),
            }),
            Some(s) if matches!(s.rope_type.as_deref(), Some("default") | None) => None,
            Some(s) => {
                return Err(NativeError::Config(format!(
                    "rope_scaling type {:?} is not supported",
                    s.rope_type.unwrap_or_default()
                )))
            }
        };
        Self {
            architecture: arch.to_string(),
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            rope_style: RopeStyle::Halves,
            rope_scaling,
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(4096),
        }
        .validate()
    }
}

/// The fields of a Hugging Face `config.json` that a Llama or Qwen2 forward pass needs.
#[derive(Debug, Deserialize)]
pub(crate) struct HfConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f32>,
    rope_scaling: Option<HfRopeScaling>,
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub(crate) tie_word_embeddings: bool,
}

#[derive(Debug, Deserialize)]
struct HfRopeScaling {
    rope_type: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

pub(crate) fn hf_config(text: &str) -> Result<HfConfig, NativeError> {
    serde_json::from_str(text).map_err(|e| NativeError::Config(format!("config.json: {e}")))
}
