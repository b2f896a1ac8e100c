//! What each server's generate API looks like: the request body a `PreprocessedRequest`
//! becomes, and the streamed chunks that come back, as pure functions.
//!
//! - llama.cpp's `llama-server`: `POST /completion` with the prompt as token ids and
//!   `return_tokens`, which puts each chunk's token ids beside its text.
//! - vLLM: `POST /v1/completions` with the prompt as token ids and `return_token_ids`.
//! - SGLang: `POST /generate` with `input_ids`; chunks carry `output_ids`.
//!
//! Every sampling field is set explicitly, to OpenAI's default where the request leaves it
//! unset: the servers' own defaults differ (llama.cpp samples at temperature 0.8 with top-k
//! 40 unless told otherwise), and a worker must answer the same request the same way
//! whichever engine it fronts.

use serde_json::{json, Value};
use turbine_protocols::{FinishReason, PreprocessedRequest};

/// Which server a worker fronts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    Vllm,
    Sglang,
    LlamaCpp,
}

impl ServerKind {
    pub fn name(self) -> &'static str {
        match self {
            ServerKind::Vllm => "vllm",
            ServerKind::Sglang => "sglang",
            ServerKind::LlamaCpp => "llama.cpp",
        }
    }

    /// Where requests are posted.
    pub fn generate_path(self) -> &'static str {
        match self {
            ServerKind::Vllm => "/v1/completions",
            ServerKind::Sglang => "/generate",
            ServerKind::LlamaCpp => "/completion",
        }
    }
}

/// A request the server cannot take as asked: refused before it is sent, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{server} cannot take {field} = {value}: {why}")]
pub struct Unsupported {
    pub server: &'static str,
    pub field: &'static str,
    pub value: String,
    pub why: &'static str,
}

/// The body to post for `request`. `model` is the server's own name for its model (vLLM
/// checks it).
pub fn request_body(kind: ServerKind, request: &PreprocessedRequest, model: &str) -> Result<Value, Unsupported> {
    let s = &request.sampling;
    let temperature = s.temperature.unwrap_or(1.0);
    let top_p = s.top_p.unwrap_or(1.0);
    let frequency_penalty = s.frequency_penalty.unwrap_or(0.0);
    let presence_penalty = s.presence_penalty.unwrap_or(0.0);
    // The frontend lists the model's end-of-sequence ids here unless the client asked to
    // ignore them: an empty list is that request.
    let ignore_eos = request.stop.stop_token_ids.is_empty();
    let max_tokens = request.stop.max_tokens;
    Ok(match kind {
        ServerKind::LlamaCpp => {
            let seed = match s.seed {
                // llama.cpp's seed is 32 bits, and its largest value means "random".
                Some(seed) if seed >= u64::from(u32::MAX) => {
                    return Err(Unsupported {
                        server: kind.name(),
                        field: "seed",
                        value: seed.to_string(),
                        why: "llama.cpp takes seeds below 4294967295",
                    })
                }
                Some(seed) => json!(seed),
                None => json!(u32::MAX),
            };
            json!({
                "prompt": request.token_ids,
                "stream": true,
                "return_tokens": true,
                "cache_prompt": true,
                // -1 lets the server run to the end of its context.
                "n_predict": max_tokens.map_or(-1, i64::from),
                "temperature": temperature,
                "top_p": top_p,
                // 0 turns each of these samplers off.
                "top_k": s.top_k.unwrap_or(0),
                "min_p": 0.0,
                "typical_p": 1.0,
                "repeat_penalty": 1.0,
                "frequency_penalty": frequency_penalty,
                "presence_penalty": presence_penalty,
                "seed": seed,
                "ignore_eos": ignore_eos,
                "timings_per_token": false,
            })
        }
        ServerKind::Vllm => {
            let mut body = json!({
                "model": model,
                "prompt": request.token_ids,
                "stream": true,
                "return_token_ids": true,
                // A last chunk with usage, where vLLM says what it served from its cache.
                "stream_options": {"include_usage": true},
                // null, not vLLM's default of 16: as many as the context allows.
                "max_tokens": max_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "top_k": s.top_k.map_or(-1, i64::from),
                "frequency_penalty": frequency_penalty,
                "presence_penalty": presence_penalty,
                "stop_token_ids": request.stop.stop_token_ids,
                "ignore_eos": ignore_eos,
                "skip_special_tokens": false,
                "request_id": request.request_id,
            });
            if let Some(seed) = s.seed {
                body["seed"] = seed_i64(kind, seed)?;
            }
            body
        }
        ServerKind::Sglang => {
            let mut params = json!({
                "max_new_tokens": max_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "top_k": s.top_k.map_or(-1, i64::from),
                "frequency_penalty": frequency_penalty,
                "presence_penalty": presence_penalty,
                "stop_token_ids": request.stop.stop_token_ids,
                "ignore_eos": ignore_eos,
                "skip_special_tokens": false,
            });
            if let Some(seed) = s.seed {
                params["sampling_seed"] = seed_i64(kind, seed)?;
            }
            json!({
                "input_ids": request.token_ids,
                "sampling_params": params,
                "stream": true,
                "rid": request.request_id,
            })
        }
    })
}

/// Python servers parse seeds into signed 64-bit integers.
fn seed_i64(kind: ServerKind, seed: u64) -> Result<Value, Unsupported> {
    i64::try_from(seed).map(|s| json!(s)).map_err(|_| Unsupported {
        server: kind.name(),
        field: "seed",
        value: seed.to_string(),
        why: "seeds must fit a signed 64-bit integer",
    })
}

/// One streamed chunk, decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chunk {
    pub token_ids: Vec<u32>,
    pub finish_reason: Option<FinishReason>,
    /// Prompt tokens the server served from its cache, where it says.
    pub cached_tokens: Option<u32>,
}

/// A chunk that is not what the server's API documents, or an error the server streamed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("{server} sent a chunk that is not JSON: {source}")]
    NotJson {
        server: &'static str,
        #[source]
        source: JsonError,
    },
    #[error("{server} sent a chunk without {field}: {chunk}")]
    Missing {
        server: &'static str,
        field: &'static str,
        chunk: String,
    },
    #[error("{server} reported an error: {message}")]
    Server { server: &'static str, message: String },
}

/// `serde_json::Error` is neither `Clone` nor `Eq`; its text is what matters here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct JsonError(String);

/// What a stream has delivered so far, for servers that resend everything in each chunk.
#[derive(Debug, Default)]
pub struct StreamState {
    tokens_seen: usize,
}

/// Decodes one `data:` payload of the server's event stream (`[DONE]` excluded).
pub fn parse_chunk(kind: ServerKind, state: &mut StreamState, data: &str) -> Result<Chunk, ChunkError> {
    let server = kind.name();
    let v: Value = serde_json::from_str(data).map_err(|e| ChunkError::NotJson {
        server,
        source: JsonError(e.to_string()),
    })?;
    if let Some(error) = v.get("error") {
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| error.to_string(), str::to_owned);
        return Err(ChunkError::Server { server, message });
    }
    let missing = |field| ChunkError::Missing {
        server,
        field,
        chunk: truncate(data),
    };
    let chunk = match kind {
        ServerKind::LlamaCpp => {
            let token_ids = token_list(v.get("tokens")).ok_or_else(|| missing("tokens"))?;
            let finish_reason = if v.get("stop").and_then(Value::as_bool) == Some(true) {
                Some(match v.get("stop_type").and_then(Value::as_str) {
                    Some("limit") => FinishReason::Length,
                    _ => FinishReason::Stop,
                })
            } else {
                None
            };
            let cached_tokens = count(v.pointer("/timings/cache_n"));
            Chunk {
                token_ids,
                finish_reason,
                cached_tokens,
            }
        }
        ServerKind::Vllm if v.get("choices").and_then(Value::as_array).is_some_and(Vec::is_empty) => Chunk {
            // The usage chunk that ends a stream asked for with include_usage.
            cached_tokens: count(v.pointer("/usage/prompt_tokens_details/cached_tokens")),
            ..Chunk::default()
        },
        ServerKind::Vllm => {
            let choice = v.pointer("/choices/0").ok_or_else(|| missing("choices"))?;
            let token_ids = match choice.get("token_ids") {
                Some(Value::Null) | None if choice.get("finish_reason").is_some_and(|f| !f.is_null()) => Vec::new(),
                ids => token_list(ids).ok_or_else(|| missing("choices[0].token_ids (is vLLM older than 0.10.2?)"))?,
            };
            let finish_reason = finish(choice.get("finish_reason"));
            let cached_tokens = count(v.pointer("/usage/prompt_tokens_details/cached_tokens"));
            Chunk {
                token_ids,
                finish_reason,
                cached_tokens,
            }
        }
        ServerKind::Sglang => {
            let ids = token_list(v.get("output_ids")).ok_or_else(|| missing("output_ids"))?;
            let meta = v.get("meta_info").ok_or_else(|| missing("meta_info"))?;
            // Each chunk holds every token so far unless the server runs with
            // --incremental-streaming-output; the completion count tells which.
            let completed = meta.get("completion_tokens").and_then(Value::as_u64);
            let token_ids = match completed {
                Some(n) if n as usize == ids.len() && ids.len() >= state.tokens_seen => {
                    ids[state.tokens_seen..].to_vec()
                }
                _ => ids,
            };
            let finish_reason = finish(meta.pointer("/finish_reason/type"));
            let cached_tokens = count(meta.get("cached_tokens"));
            Chunk {
                token_ids,
                finish_reason,
                cached_tokens,
            }
        }
    };
    state.tokens_seen += chunk.token_ids.len();
    Ok(chunk)
}

/// vLLM's and SGLang's finish reasons: anything but a limit or an abort is a stop (a stop
/// token, string or the model's end).
fn finish(reason: Option<&Value>) -> Option<FinishReason> {
    Some(match reason?.as_str()? {
        "length" => FinishReason::Length,
        "abort" => FinishReason::Cancelled,
        _ => FinishReason::Stop,
    })
}

fn count(v: Option<&Value>) -> Option<u32> {
    v?.as_u64().map(|n| n.min(u64::from(u32::MAX)) as u32)
}

fn token_list(v: Option<&Value>) -> Option<Vec<u32>> {
    v?.as_array()?
        .iter()
        .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
        .collect()
}

fn truncate(s: &str) -> String {
    const MAX: usize = 200;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

/// The model a server serves, from its `/v1/models` answer: the first listed, with the
/// path it was loaded from where the server says (vLLM's `root`).
pub fn served_model(models: &Value) -> Option<(String, Option<String>)> {
    let first = models.get("data")?.as_array()?.first()?;
    let id = first.get("id")?.as_str()?.to_owned();
    let root = first.get("root").and_then(Value::as_str).map(str::to_owned);
    Some((id, root))
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{expect, Expect};
    use turbine_protocols::{SamplingOptions, StopConditions};

    fn request(sampling: SamplingOptions, stop: StopConditions) -> PreprocessedRequest {
        PreprocessedRequest {
            request_id: "r1".into(),
            model: "m".into(),
            token_ids: vec![1, 2, 3],
            stop,
            sampling,
            disagg: None,
        }
    }

    fn check_body(kind: ServerKind, req: &PreprocessedRequest, expect: Expect) {
        let body = request_body(kind, req, "served").map_or_else(|e| e.to_string(), |b| b.to_string());
        expect.assert_eq(&body);
    }

    #[test]
    fn unset_sampling_fields_become_openai_defaults_on_every_server() {
        let req = request(
            SamplingOptions::default(),
            StopConditions {
                max_tokens: Some(8),
                stop_token_ids: vec![2],
            },
        );
        check_body(
            ServerKind::LlamaCpp,
            &req,
            expect![[
                r#"{"cache_prompt":true,"frequency_penalty":0.0,"ignore_eos":false,"min_p":0.0,"n_predict":8,"presence_penalty":0.0,"prompt":[1,2,3],"repeat_penalty":1.0,"return_tokens":true,"seed":4294967295,"stream":true,"temperature":1.0,"timings_per_token":false,"top_k":0,"top_p":1.0,"typical_p":1.0}"#
            ]],
        );
        check_body(
            ServerKind::Vllm,
            &req,
            expect![[
                r#"{"frequency_penalty":0.0,"ignore_eos":false,"max_tokens":8,"model":"served","presence_penalty":0.0,"prompt":[1,2,3],"request_id":"r1","return_token_ids":true,"skip_special_tokens":false,"stop_token_ids":[2],"stream":true,"stream_options":{"include_usage":true},"temperature":1.0,"top_k":-1,"top_p":1.0}"#
            ]],
        );
        check_body(
            ServerKind::Sglang,
            &req,
            expect![[
                r#"{"input_ids":[1,2,3],"rid":"r1","sampling_params":{"frequency_penalty":0.0,"ignore_eos":false,"max_new_tokens":8,"presence_penalty":0.0,"skip_special_tokens":false,"stop_token_ids":[2],"temperature":1.0,"top_k":-1,"top_p":1.0},"stream":true}"#
            ]],
        );
    }

    #[test]
    fn set_fields_map_one_to_one_and_no_stop_ids_means_ignore_eos() {
        let req = request(
            SamplingOptions {
                temperature: Some(0.0),
                top_p: Some(0.5),
                top_k: Some(7),
                seed: Some(42),
                frequency_penalty: Some(0.25),
                presence_penalty: Some(-0.5),
            },
            StopConditions::default(),
        );
        check_body(
            ServerKind::LlamaCpp,
            &req,
            expect![[
                r#"{"cache_prompt":true,"frequency_penalty":0.25,"ignore_eos":true,"min_p":0.0,"n_predict":-1,"presence_penalty":-0.5,"prompt":[1,2,3],"repeat_penalty":1.0,"return_tokens":true,"seed":42,"stream":true,"temperature":0.0,"timings_per_token":false,"top_k":7,"top_p":0.5,"typical_p":1.0}"#
            ]],
        );
        check_body(
            ServerKind::Vllm,
            &req,
            expect![[
                r#"{"frequency_penalty":0.25,"ignore_eos":true,"max_tokens":null,"model":"served","presence_penalty":-0.5,"prompt":[1,2,3],"request_id":"r1","return_token_ids":true,"seed":42,"skip_special_tokens":false,"stop_token_ids":[],"stream":true,"stream_options":{"include_usage":true},"temperature":0.0,"top_k":7,"top_p":0.5}"#
            ]],
        );
        check_body(
            ServerKind::Sglang,
            &req,
            expect![[
                r#"{"input_ids":[1,2,3],"rid":"r1","sampling_params":{"frequency_penalty":0.25,"ignore_eos":true,"max_new_tokens":null,"presence_penalty":-0.5,"sampling_seed":42,"skip_special_tokens":false,"stop_token_ids":[],"temperature":0.0,"top_k":7,"top_p":0.5},"stream":true}"#
            ]],
        );
    }

    #[test]
    fn a_seed_the_server_cannot_hold_is_refused_by_name() {
        let big = |seed| {
            request(
                SamplingOptions {
                    seed: Some(seed),
                    ..Default::default()
                },
                StopConditions::default(),
            )
        };
        check_body(
            ServerKind::LlamaCpp,
            &big(u64::from(u32::MAX)),
            expect!["llama.cpp cannot take seed = 4294967295: llama.cpp takes seeds below 4294967295"],
        );
        check_body(
            ServerKind::Vllm,
            &big(u64::MAX),
            expect!["vllm cannot take seed = 18446744073709551615: seeds must fit a signed 64-bit integer"],
        );
        check_body(
            ServerKind::Sglang,
            &big(u64::MAX),
            expect!["sglang cannot take seed = 18446744073709551615: seeds must fit a signed 64-bit integer"],
        );
    }

    /// Feeds a stream's chunks through `parse_chunk` and prints what each became.
    fn check_stream(kind: ServerKind, chunks: &[&str], expect: Expect) {
        let mut state = StreamState::default();
        let out: Vec<String> = chunks
            .iter()
            .map(|c| match parse_chunk(kind, &mut state, c) {
                Ok(c) => format!("{:?} {:?} {:?}", c.token_ids, c.finish_reason, c.cached_tokens),
                Err(e) => format!("error: {e}"),
            })
            .collect();
        expect.assert_eq(&out.join("\n"));
    }

    #[test]
    fn llama_cpp_chunks() {
        check_stream(
            ServerKind::LlamaCpp,
            &[
                r#"{"index":0,"content":"Hi","tokens":[13],"stop":false,"id_slot":0,"tokens_predicted":1,"tokens_evaluated":3}"#,
                r#"{"index":0,"content":"","tokens":[],"stop":true,"stop_type":"limit","timings":{"cache_n":2,"prompt_n":1}}"#,
                r#"{"index":0,"content":"","tokens":[],"stop":true,"stop_type":"eos"}"#,
                r#"{"error":{"code":400,"message":"the request exceeds the available context size","type":"exceed_context_size_error"}}"#,
                r#"{"content":"no tokens: started without return_tokens"}"#,
                r#"not json"#,
            ],
            expect![[r#"
                [13] None None
                [] Some(Length) Some(2)
                [] Some(Stop) None
                error: llama.cpp reported an error: the request exceeds the available context size
                error: llama.cpp sent a chunk without tokens: {"content":"no tokens: started without return_tokens"}
                error: llama.cpp sent a chunk that is not JSON: expected ident at line 1 column 2"#]],
        );
    }

    #[test]
    fn vllm_chunks() {
        check_stream(
            ServerKind::Vllm,
            &[
                r#"{"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":"Hi","token_ids":[13,14],"finish_reason":null}]}"#,
                r#"{"id":"cmpl-1","choices":[{"index":0,"text":"","token_ids":[15],"finish_reason":"length"}]}"#,
                r#"{"id":"cmpl-1","choices":[{"index":0,"text":"","finish_reason":"stop"}]}"#,
                r#"{"id":"cmpl-1","choices":[{"index":0,"text":"x","finish_reason":null}]}"#,
                r#"{"id":"cmpl-1","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":8}}}"#,
            ],
            expect![[r#"
                [13, 14] None None
                [15] Some(Length) None
                [] Some(Stop) None
                error: vllm sent a chunk without choices[0].token_ids (is vLLM older than 0.10.2?): {"id":"cmpl-1","choices":[{"index":0,"text":"x","finish_reason":null}]}
                [] None Some(8)"#]],
        );
    }

    #[test]
    fn sglang_chunks_cumulative_or_incremental() {
        check_stream(
            ServerKind::Sglang,
            &[
                r#"{"text":"a","output_ids":[5],"meta_info":{"id":"r1","finish_reason":null,"prompt_tokens":3,"completion_tokens":1,"cached_tokens":2}}"#,
                r#"{"text":"ab","output_ids":[5,6],"meta_info":{"id":"r1","finish_reason":null,"completion_tokens":2}}"#,
                r#"{"text":"abc","output_ids":[5,6,7],"meta_info":{"id":"r1","finish_reason":{"type":"stop","matched":7},"completion_tokens":3}}"#,
            ],
            expect![[r#"
                [5] None Some(2)
                [6] None None
                [7] Some(Stop) None"#]],
        );
        check_stream(
            ServerKind::Sglang,
            &[
                r#"{"output_ids":[5,6],"meta_info":{"finish_reason":null,"completion_tokens":2}}"#,
                r#"{"output_ids":[7],"meta_info":{"finish_reason":{"type":"length","length":3},"completion_tokens":3}}"#,
                r#"{"output_ids":[],"meta_info":{"finish_reason":{"type":"abort","message":"aborted"},"completion_tokens":3}}"#,
            ],
            expect![[r#"
                [5, 6] None None
                [7] Some(Length) None
                [] Some(Cancelled) None"#]],
        );
    }

    #[test]
    fn served_model_reads_the_first_listed() {
        let vllm = json!({"object":"list","data":[{"id":"Qwen/Qwen3-0.6B","object":"model","root":"/models/qwen3","max_model_len":4096}]});
        assert_eq!(
            served_model(&vllm),
            Some(("Qwen/Qwen3-0.6B".to_owned(), Some("/models/qwen3".to_owned())))
        );
        let llama = json!({"object":"list","data":[{"id":"smol.gguf","object":"model","owned_by":"llamacpp","meta":{"n_ctx_train":8192}}]});
        assert_eq!(served_model(&llama), Some(("smol.gguf".to_owned(), None)));
        assert_eq!(served_model(&json!({"data":[]})), None);
    }
}
