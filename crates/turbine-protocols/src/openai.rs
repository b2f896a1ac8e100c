//! The subset of the OpenAI HTTP API that Turbine serves, as clients send and expect it.
//!
//! Unknown request fields are ignored, as OpenAI does, so that clients written for newer
//! API versions still work.

use serde::{Deserialize, Serialize};

/// Declares a generation request: its own fields, then the sampling and stopping fields
/// that chat and completions share (flattening them into a nested struct would hide a bad
/// field's name from error messages), and a [`SamplingFields`] view of those.
macro_rules! generation_request {
    ($(#[$meta:meta])* pub struct $name:ident { $($own:tt)* }) => {
        $(#[$meta])*
        pub struct $name {
            $($own)*
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub temperature: Option<f64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub top_p: Option<f64>,
            /// Extension (vLLM, SGLang): sample only among the `top_k` likeliest tokens; -1 or 0 is off.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub top_k: Option<i64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub seed: Option<i64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub frequency_penalty: Option<f64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub presence_penalty: Option<f64>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub stop: Option<Stop>,
            /// Extension (vLLM): token ids that end generation, beside the model's own end tokens.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub stop_token_ids: Option<Vec<u32>>,
            /// Extension (vLLM): keep generating past the model's end-of-sequence tokens.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub ignore_eos: Option<bool>,
            /// Log probabilities are not computed; asking for them is refused rather than ignored.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub logprobs: Option<serde_json::Value>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub user: Option<String>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub turbine: Option<TurbineExt>,
        }

        impl $name {
            pub fn sampling(&self) -> SamplingFields<'_> {
                SamplingFields {
                    temperature: self.temperature,
                    top_p: self.top_p,
                    top_k: self.top_k,
                    seed: self.seed,
                    frequency_penalty: self.frequency_penalty,
                    presence_penalty: self.presence_penalty,
                    stop: self.stop.as_ref(),
                    stop_token_ids: self.stop_token_ids.as_deref(),
                    ignore_eos: self.ignore_eos,
                    logprobs: self.logprobs.as_ref(),
                }
            }
        }
    };
}

generation_request! {
/// `POST /v1/chat/completions` body.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    /// Tool definitions, given to the chat template (tool calls are not parsed from the output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Deprecated by OpenAI in favour of `max_completion_tokens`; both are accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
}
}

generation_request! {
/// `POST /v1/completions` body.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    #[serde(default)]
    pub stream: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
}
}

/// Turbine's extension of a request (the `turbine` field), beyond what OpenAI defines.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct TurbineExt {
    /// This request's weight of prefill work against decode load in `kv` routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_overlap_weight: Option<f64>,
    /// This request's sampling temperature over `kv` routing costs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_temperature: Option<f64>,
    /// What this request's cached blocks in a worker's host memory, and on its disk, count
    /// for (0 to 1) against blocks on its device, in `kv` routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_host_hit_weight: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_disk_hit_weight: Option<f64>,
}

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// The fields that chat and completion requests share, borrowed from either.
#[derive(Debug, Clone, Copy)]
pub struct SamplingFields<'a> {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub stop: Option<&'a Stop>,
    pub stop_token_ids: Option<&'a [u32]>,
    pub ignore_eos: Option<bool>,
    pub logprobs: Option<&'a serde_json::Value>,
}

/// The shapes OpenAI accepts for a completion prompt.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenBatches(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// Passed to the chat template, which may use them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// Message content: a plain string, or a list of typed parts of which Turbine reads the text.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl MessageContent {
    /// The text of the message, with the text parts joined in order.
    pub fn text(&self) -> String {
        match self {
            MessageContent::Text(t) => t.clone(),
            MessageContent::Parts(parts) => parts.iter().filter_map(|p| p.text.as_deref()).collect(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: u32,
}

/// Non-streaming chat response (`object: "chat.completion"`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct AssistantMessage {
    pub role: String,
    pub content: String,
}

/// One SSE chunk of a streamed chat response (`object: "chat.completion.chunk"`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// Present only on the final usage chunk when `stream_options.include_usage` is set,
    /// where `choices` is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct ChatDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// Completion response and stream chunk (`object: "text_completion"` for both, as OpenAI does).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub finish_reason: Option<String>,
}

/// `GET /v1/models` body.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelObject>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ModelObject {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
}

/// The error body OpenAI returns with every non-2xx status.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ErrorResponse {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_accepts_every_openai_shape() {
        for (json, ok) in [
            (r#""hi""#, true),
            (r#"["a","b"]"#, true),
            ("[1,2,3]", true),
            ("[[1],[2,3]]", true),
            ("[-1]", false),
            ("{}", false),
        ] {
            assert_eq!(serde_json::from_str::<Prompt>(json).is_ok(), ok, "{json}");
        }
    }

    #[test]
    fn content_parts_join_text() {
        let m: ChatMessage = serde_json::from_str(
            r#"{"role":"user","content":[{"type":"text","text":"a"},{"type":"image_url"},{"type":"text","text":"b"}]}"#,
        )
        .unwrap();
        assert_eq!(m.content.unwrap().text(), "ab");
    }
}
