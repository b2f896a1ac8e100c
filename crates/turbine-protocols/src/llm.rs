//! Internal LLM types: what the frontend sends a worker and what an engine streams back.

use serde::{Deserialize, Serialize};

/// A request after the frontend has applied the chat template and tokenized it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessedRequest {
    /// Unique per request; carried into the worker's logs.
    pub request_id: String,
    pub model: String,
    pub token_ids: Vec<u32>,
    #[serde(default)]
    pub stop: StopConditions,
    #[serde(default)]
    pub sampling: SamplingOptions,
    /// Set when serving is disaggregated: which phase this worker is asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disagg: Option<crate::Disagg>,
}

/// How an engine picks each token. Unset fields take OpenAI's defaults (temperature 1,
/// top_p 1, no top_k, no penalties); engines that model no distribution (echo, mocker)
/// ignore it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplingOptions {
    /// 0 means greedy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Same seed, same prompt, same output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
}

/// When an engine must stop generating, whatever the model wants.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StopConditions {
    /// Upper bound on generated tokens; `None` lets the engine run to its own limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Generation ends, with `FinishReason::Stop`, when one of these is produced. The
    /// frontend puts the model's end-of-sequence tokens here (unless the client asked to
    /// ignore them), so engines need no tokenizer knowledge of their own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop_token_ids: Vec<u32>,
}

/// The tokens of one output. A few are held inline: a busy engine streams one token per
/// output a million times a second, and a heap allocation each would cost as much as the
/// rest of delivering it. Serialized as a plain list.
pub type OutputTokens = smallvec::SmallVec<[u32; 4]>;

/// One step of an engine's output stream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineOutput {
    /// Tokens produced since the previous output (usually one).
    pub token_ids: OutputTokens,
    /// Set on the last output of a stream, and only there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<FinishReason>,
    /// Prompt tokens the engine served from its cache; reported once, on the first output
    /// (an external server that says only at the end: on the last).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u32>,
    /// A prefill worker's answer: where the prompt's KV waits. Boxed, since every decode
    /// output carries this field empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_transfer: Option<Box<crate::KvTransferParams>>,
}

/// Why a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or the model's natural end.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The caller went away.
    Cancelled,
}

impl FinishReason {
    /// The string OpenAI clients expect in `finish_reason`.
    pub fn as_openai(self) -> &'static str {
        match self {
            FinishReason::Stop | FinishReason::Cancelled => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What a worker tells the world about the model it serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// The name clients put in `"model"`.
    pub name: String,
    /// Prompt plus generated tokens may not exceed this.
    pub context_length: u32,
    pub tokenizer: TokenizerKind,
    /// Tokens per KV block, for engines that publish KV events: routers hash prompts with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_block_size: Option<u32>,
    /// How long the engine's steps take, for engines that can say: routers then score
    /// workers in predicted time rather than in blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timing: Option<TimingProfile>,
}

/// An engine's step times as functions of its work, in milliseconds of wall time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TimingProfile {
    /// `[a, b, c]`: a step computing `t` prompt tokens takes `a t² + b t + c`.
    pub prefill_ms: [f64; 3],
    /// Most prompt tokens one step computes: a longer queue takes several steps.
    pub max_batched_tokens: u32,
    /// `[a, b, c]`: a decode step with a share `u` of the KV pool in use takes `a u² + b u + c`.
    pub decode_ms: [f64; 3],
    /// KV blocks in the pool, the denominator of `u`.
    pub num_blocks: u64,
}

impl TimingProfile {
    /// Milliseconds to prefill `tokens` queued prompt tokens, in steps of at most
    /// `max_batched_tokens`.
    pub fn prefill_time(&self, tokens: u64) -> f64 {
        let chunk = u64::from(self.max_batched_tokens.max(1));
        let step = |t: u64| {
            let t = t as f64;
            let [a, b, c] = self.prefill_ms;
            a * t * t + b * t + c
        };
        let (full, rest) = (tokens / chunk, tokens % chunk);
        let mut ms = full as f64 * step(chunk);
        if rest > 0 {
            ms += step(rest);
        }
        ms
    }

    /// Milliseconds of one decode step while `blocks` of the pool are in use.
    pub fn decode_step(&self, blocks: u64) -> f64 {
        let u = (blocks as f64 / self.num_blocks.max(1) as f64).min(1.0);
        let [a, b, c] = self.decode_ms;
        (a * u * u + b * u + c).max(0.0)
    }
}

/// How the frontend turns text into the model's token ids.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TokenizerKind {
    /// One token per UTF-8 byte: for engines that model no vocabulary (echo, tests).
    Bytes,
    /// A Hugging Face model directory (`tokenizer.json`, `tokenizer_config.json`) or a GGUF
    /// file, at a path the frontend can read.
    Files { path: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;

    #[test]
    fn wire_format_is_stable() {
        let out = EngineOutput {
            token_ids: OutputTokens::from_slice(&[7]),
            finish_reason: Some(FinishReason::Length),
            cached_tokens: None,
            kv_transfer: None,
        };
        expect![[r#"{"token_ids":[7],"finish_reason":"length"}"#]].assert_eq(&serde_json::to_string(&out).unwrap());
        let card = ModelCard {
            name: "echo".into(),
            context_length: 4096,
            tokenizer: TokenizerKind::Bytes,
            kv_block_size: None,
            timing: None,
        };
        expect![[r#"{"name":"echo","context_length":4096,"tokenizer":{"kind":"bytes"}}"#]]
            .assert_eq(&serde_json::to_string(&card).unwrap());
    }

    #[test]
    fn a_long_queue_is_prefilled_in_chunks() {
        let p = TimingProfile {
            prefill_ms: [0.0, 1.0, 10.0],
            max_batched_tokens: 100,
            decode_ms: [0.0, 20.0, 5.0],
            num_blocks: 1000,
        };
        assert_eq!(p.prefill_time(0), 0.0);
        assert_eq!(p.prefill_time(50), 60.0);
        // Two full steps of 100 and one of 50: the per-step cost is paid three times.
        assert_eq!(p.prefill_time(250), 110.0 + 110.0 + 60.0);
        assert_eq!(p.decode_step(0), 5.0);
        assert_eq!(p.decode_step(500), 15.0);
        // Past a full pool the step costs what a full one does.
        assert_eq!(p.decode_step(5000), 25.0);
    }
}
