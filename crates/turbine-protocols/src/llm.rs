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
    /// Prompt tokens the engine served from its cache; reported once, on the first output.
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
        };
        expect![[r#"{"name":"echo","context_length":4096,"tokenizer":{"kind":"bytes"}}"#]]
            .assert_eq(&serde_json::to_string(&card).unwrap());
    }
}
