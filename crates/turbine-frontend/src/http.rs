//! The HTTP surface: routes, request validation, and rendering of responses and SSE chunks.
//!
//! Chat and completions share one generation path ([`generate`]): they differ in how they
//! build prompts and in the shape of what they send back. A request becomes one or more
//! *choices* (`n` per prompt, one prompt per entry of a batched completion), each routed
//! on its own, whose outputs are merged into one response.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use tracing::Instrument;
use turbine_protocols::openai::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
    ChatDelta, CompletionChoice, CompletionRequest, CompletionResponse, ModelList, ModelObject, Prompt,
    PromptTokensDetails, SamplingFields, StreamOptions, TurbineExt, Usage,
};
use turbine_protocols::{FinishReason, PreprocessedRequest, SamplingOptions, StopConditions};
use turbine_runtime::InstanceId;

use crate::error::ApiError;
use crate::kv_routing::SelectorOverrides;
use crate::metrics::{Metrics, RequestMetrics};
use crate::models::ServedModel;
use crate::preprocess::ModelText;
use crate::routing::{Dispatcher, RouteOptions};
use turbine_preprocess::{StopMatcher, StopOutcome, MAX_STOP_STRINGS};

/// What every handler shares.
#[derive(Debug)]
pub(crate) struct App {
    pub(crate) dispatcher: Arc<Dispatcher>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) max_body_bytes: usize,
}

type AppState = Arc<App>;

pub(crate) fn app(state: AppState) -> axum::Router {
    let limit = state.max_body_bytes;
    axum::Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/health", get(health))
        .route("/live", get(|| async { Json(serde_json::json!({ "status": "live" })) }))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Most choices one request may ask for (`n` times the number of prompts).
const MAX_CHOICES: usize = 128;

fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<T, ApiError> {
    let body = body.map_err(|r| match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::payload_too_large(limit),
        _ => ApiError::invalid_request(format!("cannot read request body: {r}")),
    })?;
    let mut de = serde_json::Deserializer::from_slice(&body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let message = inner.to_string();
                // serde reports a missing field at its parent: name the field itself.
                let missing = message
                    .strip_prefix("missing field `")
                    .and_then(|rest| rest.split('`').next())
                    .map(|field| {
                        if path == "." {
                            field.to_owned()
                        } else {
                            format!("{path}.{field}")
                        }
                    });
                // serde names an untagged enum, not what it accepts: say it in the API's terms.
                let expected = [
                    (
                        "enum Prompt",
                        "a string, a list of strings, a list of token ids or a list of such lists",
                    ),
                    ("enum Stop", "a string or a list of strings"),
                    ("enum MessageContent", "a string or a list of content parts"),
                ]
                .into_iter()
                .find(|(name, _)| message.contains(name))
                .map(|(_, what)| what);
                match (missing, expected) {
                    (Some(param), _) => ApiError::invalid_param(param.clone(), format!("`{param}` is required")),
                    (None, Some(what)) => ApiError::invalid_param(path.clone(), format!("`{path}` must be {what}")),
                    (None, None) if path == "." => ApiError::invalid_request(format!("invalid request: {message}")),
                    (None, None) => ApiError::invalid_param(path.clone(), format!("invalid `{path}`: {message}")),
                }
            }
            _ => ApiError::invalid_request(format!("request body is not valid JSON: {inner}")),
        }
    })?;
    de.end()
        .map_err(|e| ApiError::invalid_request(format!("request body is not valid JSON: {e}")))?;
    Ok(value)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

/// Runs a handler body with the request's metrics, recording its outcome whichever way it ends.
async fn measured<F>(
    state: &AppState,
    endpoint: &'static str,
    handler: impl FnOnce(Option<RequestMetrics>) -> F,
) -> Response
where
    F: std::future::Future<Output = Result<Response, Failed>>,
{
    let metrics = state.metrics.request(endpoint);
    match handler(Some(metrics)).await {
        Ok(response) => response,
        Err(failed) => {
            let (e, metrics) = *failed;
            if let Some(m) = metrics {
                m.finish(e.status.as_u16());
            }
            e.into_response()
        }
    }
}

/// A handler's error, with the request's metrics if the handler still holds them. Boxed:
/// the pair is large and errors are the uncommon path.
type Failed = Box<(ApiError, Option<RequestMetrics>)>;

/// Attaches the metrics still held to an error.
fn with<T>(metrics: &mut Option<RequestMetrics>, r: Result<T, ApiError>) -> Result<T, Failed> {
    r.map_err(|e| Box::new((e, metrics.take())))
}

/// A generation under way: the parsed request and its merged pieces.
struct Started<R> {
    req: R,
    pieces: BoxStream<'static, Result<Piece, ApiError>>,
    choices: usize,
    usage_wanted: bool,
    /// The worker that took each choice, in choice order.
    workers: Vec<InstanceId>,
}

/// What chat and completions share up to the first token: parse, find the model, prepare
/// the choices, route them.
async fn start<R: DeserializeOwned>(
    s: &App,
    m: &mut Option<RequestMetrics>,
    body: Result<Bytes, BytesRejection>,
    headers: &HeaderMap,
    model: impl Fn(&R) -> &String,
    prepare: impl Fn(&R, &HeaderMap, &ServedModel) -> Result<Prepared, ApiError>,
) -> Result<Started<R>, Failed> {
    let req: R = with(m, parse_body(body, s.max_body_bytes))?;
    let served = with(m, s.dispatcher.model(model(&req)))?;
    if let Some(metrics) = m.as_mut() {
        metrics.set_model(model(&req));
    }
    let prepared = with(m, prepare(&req, headers, &served))?;
    let (choices, usage_wanted) = (prepared.choices.len(), prepared.include_usage);
    let generated = generate(&s.dispatcher, &served, prepared, m).await;
    let (pieces, workers) = with(m, generated)?;
    Ok(Started {
        req,
        pieces,
        choices,
        usage_wanted,
        workers,
    })
}

async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let s = state.clone();
    measured(&state, "chat", move |mut m| async move {
        let Started {
            req,
            pieces,
            choices,
            usage_wanted,
            workers,
        } = start::<ChatCompletionRequest>(&s, &mut m, body, &headers, |r| &r.model, prepare_chat).await?;
        let (id, created, model) = (new_id("chatcmpl"), now_secs(), req.model);
        if !req.stream {
            let (texts, usage) = collect(pieces, choices).await.map_err(|e| Box::new((e, None)))?;
            let response = ChatCompletionResponse {
                id,
                object: "chat.completion".into(),
                created,
                model,
                choices: texts
                    .into_iter()
                    .enumerate()
                    .map(|(i, (content, finish))| ChatChoice {
                        index: i as u32,
                        message: AssistantMessage {
                            role: "assistant".into(),
                            content,
                        },
                        finish_reason: Some(finish.into()),
                    })
                    .collect(),
                usage,
            };
            return Ok(routed_to(&workers, Json(response).into_response()));
        }
        let chunk = move |choices: Vec<ChatChunkChoice>, usage: Option<Usage>| ChatCompletionChunk {
            id: id.clone(),
            object: "chat.completion.chunk".into(),
            created,
            model: model.clone(),
            choices,
            usage,
        };
        let choice = |index: u32, delta: ChatDelta, finish: Option<&str>| ChatChunkChoice {
            index,
            delta,
            finish_reason: finish.map(str::to_owned),
        };
        // OpenAI opens each choice with the assistant's role.
        let roles: Vec<Event> = (0..choices as u32)
            .map(|i| {
                let delta = ChatDelta {
                    role: Some("assistant".into()),
                    content: Some(String::new()),
                };
                sse_json(&chunk(vec![choice(i, delta, None)], None))
            })
            .collect();
        let body = pieces.filter_map(move |piece| {
            futures::future::ready(match piece {
                Ok(Piece::Text(i, t)) => {
                    let delta = ChatDelta {
                        content: Some(t),
                        role: None,
                    };
                    Some(sse_json(&chunk(vec![choice(i, delta, None)], None)))
                }
                Ok(Piece::Finish(i, f)) => Some(sse_json(&chunk(vec![choice(i, ChatDelta::default(), Some(f))], None))),
                Ok(Piece::Usage(usage)) => usage_wanted.then(|| sse_json(&chunk(vec![], Some(usage)))),
                Err(e) => Some(sse_json(&e.body())),
            })
        });
        let events = futures::stream::iter(roles).chain(body);
        Ok(routed_to(&workers, sse(events)))
    })
    .await
}

async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let s = state.clone();
    measured(&state, "completions", move |mut m| async move {
        let Started {
            req,
            pieces,
            choices,
            usage_wanted,
            workers,
        } = start::<CompletionRequest>(&s, &mut m, body, &headers, |r| &r.model, prepare_completion).await?;
        let (id, created, model) = (new_id("cmpl"), now_secs(), req.model);
        let response = move |choices: Vec<CompletionChoice>, usage: Option<Usage>| CompletionResponse {
            id: id.clone(),
            object: "text_completion".into(),
            created,
            model: model.clone(),
            choices,
            usage,
        };
        let choice = |index: u32, text: String, finish: Option<&str>| CompletionChoice {
            index,
            text,
            finish_reason: finish.map(str::to_owned),
        };
        if !req.stream {
            let (texts, usage) = collect(pieces, choices).await.map_err(|e| Box::new((e, None)))?;
            let choices = texts
                .into_iter()
                .enumerate()
                .map(|(i, (text, finish))| choice(i as u32, text, Some(finish)))
                .collect();
            return Ok(routed_to(
                &workers,
                Json(response(choices, Some(usage))).into_response(),
            ));
        }
        let body = pieces.filter_map(move |piece| {
            futures::future::ready(match piece {
                Ok(Piece::Text(i, t)) => Some(sse_json(&response(vec![choice(i, t, None)], None))),
                Ok(Piece::Finish(i, f)) => Some(sse_json(&response(vec![choice(i, String::new(), Some(f))], None))),
                Ok(Piece::Usage(usage)) => usage_wanted.then(|| sse_json(&response(vec![], Some(usage)))),
                Err(e) => Some(sse_json(&e.body())),
            })
        });
        Ok(routed_to(&workers, sse(body)))
    })
    .await
}

/// The response header naming the worker instance (hex id, as in `/health`) that took each
/// choice, comma-separated in choice order: the worker a request started on, for tracing a
/// routing decision. A request migrated mid-stream keeps the first worker's id here.
const WORKER_HEADER: &str = "x-turbine-worker";

fn routed_to(workers: &[InstanceId], mut response: Response) -> Response {
    let ids: Vec<String> = workers.iter().map(ToString::to_string).collect();
    // Hex digits and commas are always a valid header value.
    if let Ok(value) = HeaderValue::from_str(&ids.join(",")) {
        response.headers_mut().insert(WORKER_HEADER, value);
    }
    response
}

/// A request reduced to what generation needs: one token prompt per choice, and how to
/// sample and stop.
struct Prepared {
    /// Prompt tokens per choice, in choice order; choices of one prompt share its tokens.
    choices: Vec<Arc<Vec<u32>>>,
    /// Which choices start a new prompt, for counting prompt tokens once per prompt.
    first_of_prompt: Vec<bool>,
    max_tokens: Option<(u32, &'static str)>,
    sampling: SamplingOptions,
    stops: Vec<String>,
    stop_token_ids: Vec<u32>,
    include_usage: bool,
    route: RouteOptions,
    /// The request field that holds the prompt, for errors about its length.
    prompt_param: &'static str,
}

fn prepare_chat(req: &ChatCompletionRequest, headers: &HeaderMap, served: &ServedModel) -> Result<Prepared, ApiError> {
    let text = model_text(served)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "`messages` must contain at least one message",
        ));
    }
    let tokens = text
        .encode_chat(&req.messages, req.tools.as_deref())
        .map_err(|e| ApiError::invalid_param("messages", format!("cannot build the prompt: {e}")))?;
    let max_tokens = match (req.max_completion_tokens, req.max_tokens) {
        (Some(m), _) => Some((m, "max_completion_tokens")),
        (None, Some(m)) => Some((m, "max_tokens")),
        (None, None) => None,
    };
    let prompts = vec![tokens];
    prepare(
        prompts,
        req.n,
        max_tokens,
        req.sampling(),
        req.stream,
        req.stream_options.as_ref(),
        headers,
        req.turbine.as_ref(),
        &text,
        "messages",
    )
}

fn prepare_completion(
    req: &CompletionRequest,
    headers: &HeaderMap,
    served: &ServedModel,
) -> Result<Prepared, ApiError> {
    let text = model_text(served)?;
    let encode = |t: &str| {
        text.encode(t)
            .map_err(|e| ApiError::invalid_param("prompt", format!("cannot tokenize the prompt: {e}")))
    };
    let prompts: Vec<Vec<u32>> = match &req.prompt {
        Prompt::Text(t) => vec![encode(t)?],
        Prompt::Texts(v) => v.iter().map(|t| encode(t)).collect::<Result<_, _>>()?,
        Prompt::Tokens(ids) => vec![ids.clone()],
        Prompt::TokenBatches(v) => v.clone(),
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid_param("prompt", "`prompt` must not be an empty list"));
    }
    for p in &prompts {
        if p.is_empty() {
            return Err(ApiError::invalid_param("prompt", "a prompt must not be empty"));
        }
        text.check_token_ids(p)
            .map_err(|t| ApiError::invalid_param("prompt", format!("token id {t} is not in the model's vocabulary")))?;
    }
    prepare(
        prompts,
        req.n,
        req.max_tokens.map(|m| (m, "max_tokens")),
        req.sampling(),
        req.stream,
        req.stream_options.as_ref(),
        headers,
        req.turbine.as_ref(),
        &text,
        "prompt",
    )
}

fn model_text(served: &ServedModel) -> Result<Arc<ModelText>, ApiError> {
    served
        .text
        .clone()
        .map_err(|e| ApiError::unavailable(format!("the model's tokenizer is not loaded: {e}")))
}

#[allow(clippy::too_many_arguments)] // One call site per endpoint, each naming every field.
fn prepare(
    prompts: Vec<Vec<u32>>,
    n: Option<u32>,
    max_tokens: Option<(u32, &'static str)>,
    fields: SamplingFields<'_>,
    stream: bool,
    stream_options: Option<&StreamOptions>,
    headers: &HeaderMap,
    ext: Option<&TurbineExt>,
    text: &ModelText,
    prompt_param: &'static str,
) -> Result<Prepared, ApiError> {
    let n = n.unwrap_or(1);
    if n == 0 {
        return Err(ApiError::invalid_param("n", "n must be at least 1"));
    }
    if prompts.len().saturating_mul(n as usize) > MAX_CHOICES {
        return Err(ApiError::invalid_param(
            "n",
            format!(
                "{} prompts times n={n} asks for more than {MAX_CHOICES} choices",
                prompts.len()
            ),
        ));
    }
    if stream_options.is_some() && !stream {
        return Err(ApiError::invalid_param(
            "stream_options",
            "stream_options is only allowed when stream is true",
        ));
    }
    if let Some((0, param)) = max_tokens {
        return Err(ApiError::invalid_param(param, format!("{param} must be at least 1")));
    }
    let (sampling, stops, mut stop_token_ids, ignore_eos) = sampling(fields)?;
    if !ignore_eos {
        stop_token_ids.extend(text.eos_token_ids());
    }
    let mut choices = Vec::new();
    let mut first_of_prompt = Vec::new();
    for p in prompts {
        let p = Arc::new(p);
        for j in 0..n {
            choices.push(p.clone());
            first_of_prompt.push(j == 0);
        }
    }
    Ok(Prepared {
        choices,
        first_of_prompt,
        max_tokens,
        sampling,
        stops,
        stop_token_ids,
        include_usage: stream_options.is_some_and(|o| o.include_usage),
        route: route_options(headers, ext)?,
        prompt_param,
    })
}

/// Checks the sampling fields against OpenAI's ranges.
fn sampling(f: SamplingFields<'_>) -> Result<(SamplingOptions, Vec<String>, Vec<u32>, bool), ApiError> {
    fn range(name: &'static str, v: Option<f64>, lo: f64, hi: f64) -> Result<Option<f32>, ApiError> {
        match v {
            Some(x) if !(lo..=hi).contains(&x) => Err(ApiError::invalid_param(
                name,
                format!("{name} must be between {lo} and {hi}, got {x}"),
            )),
            _ => Ok(v.map(|x| x as f32)),
        }
    }
    let top_k = match f.top_k {
        None | Some(-1) | Some(0) => None,
        Some(k) if k > 0 => Some(u32::try_from(k).unwrap_or(u32::MAX)),
        Some(k) => {
            return Err(ApiError::invalid_param(
                "top_k",
                format!("top_k must be -1 (off) or at least 1, got {k}"),
            ))
        }
    };
    match f.logprobs {
        None | Some(serde_json::Value::Null) | Some(serde_json::Value::Bool(false)) => {}
        Some(_) => {
            return Err(ApiError::invalid_param(
                "logprobs",
                "logprobs are not supported by this server",
            ))
        }
    }
    let stops = f.stop.cloned().map(|s| s.into_vec()).unwrap_or_default();
    if stops.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid_param(
            "stop",
            format!(
                "at most {MAX_STOP_STRINGS} stop strings are allowed, got {}",
                stops.len()
            ),
        ));
    }
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid_param("stop", "stop strings must not be empty"));
    }
    let sampling = SamplingOptions {
        temperature: range("temperature", f.temperature, 0.0, 2.0)?,
        top_p: range("top_p", f.top_p, 0.0, 1.0)?,
        top_k,
        // OpenAI's seed is a signed 64-bit integer; its bits are the engine's seed.
        seed: f.seed.map(|s| s as u64),
        frequency_penalty: range("frequency_penalty", f.frequency_penalty, -2.0, 2.0)?,
        presence_penalty: range("presence_penalty", f.presence_penalty, -2.0, 2.0)?,
    };
    let stop_token_ids = f.stop_token_ids.map(<[u32]>::to_vec).unwrap_or_default();
    Ok((sampling, stops, stop_token_ids, f.ignore_eos.unwrap_or(false)))
}

/// The header naming a request's session, for `session` routing.
const SESSION_HEADER: &str = "x-session-id";

/// How the request asks to be routed: its session header and its `turbine` extension.
fn route_options(headers: &HeaderMap, ext: Option<&TurbineExt>) -> Result<RouteOptions, ApiError> {
    let session = match headers.get(SESSION_HEADER) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::invalid_request(format!("header {SESSION_HEADER} must be visible ASCII")))?
                .to_owned(),
        ),
    };
    let check = |name: &'static str, v: Option<f64>| match v {
        Some(x) if !(x.is_finite() && x >= 0.0) => Err(ApiError::invalid_param(
            format!("turbine.{name}"),
            format!("turbine.{name} must be a number >= 0, got {x}"),
        )),
        _ => Ok(v),
    };
    let weight = |name: &'static str, v: Option<f64>| match v {
        Some(x) if !(0.0..=1.0).contains(&x) => Err(ApiError::invalid_param(
            format!("turbine.{name}"),
            format!("turbine.{name} must be a number from 0 to 1, got {x}"),
        )),
        _ => Ok(v),
    };
    let ext = ext.cloned().unwrap_or_default();
    let overrides = SelectorOverrides {
        overlap_weight: check("kv_overlap_weight", ext.kv_overlap_weight)?,
        temperature: check("kv_temperature", ext.kv_temperature)?,
        host_hit_weight: weight("kv_host_hit_weight", ext.kv_host_hit_weight)?,
        disk_hit_weight: weight("kv_disk_hit_weight", ext.kv_disk_hit_weight)?,
    };
    Ok(RouteOptions { session, overrides })
}

/// What generation yields, in the order it happens, for choice `.0`.
enum Piece {
    Text(u32, String),
    Finish(u32, &'static str),
    /// Once every choice has finished; always the last piece of a successful generation.
    Usage(Usage),
}

/// What one choice's stream yields before the choices are merged.
enum ChoiceItem {
    /// An engine output arrived with this many tokens (for metrics and usage).
    Tokens {
        count: u32,
        cached: Option<u32>,
    },
    Text(String),
    Finish(&'static str),
}

/// Validates lengths, routes every choice, and merges their decoded text into one stream;
/// also returns the worker each choice went to.
async fn generate(
    d: &Arc<Dispatcher>,
    served: &ServedModel,
    prepared: Prepared,
    metrics: &mut Option<RequestMetrics>,
) -> Result<(BoxStream<'static, Result<Piece, ApiError>>, Vec<InstanceId>), ApiError> {
    let text = model_text(served)?;
    let context = served.card.context_length;
    let mut streams = Vec::new();
    let mut workers = Vec::new();
    let mut prompt_tokens = 0u32;
    for (index, tokens) in prepared.choices.iter().enumerate() {
        let prompt_len = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
        if prompt_len >= context {
            return Err(ApiError::invalid_param(
                prepared.prompt_param,
                format!("the prompt is {prompt_len} tokens; this model's context length is {context}"),
            ));
        }
        let max_tokens = match prepared.max_tokens {
            Some((m, param)) if m > context - prompt_len => {
                return Err(ApiError::invalid_param(
                    param,
                    format!("prompt ({prompt_len} tokens) plus {param} ({m}) exceeds the context length of {context}"),
                ))
            }
            Some((m, _)) => m,
            None => context - prompt_len,
        };
        if prepared.first_of_prompt[index] {
            prompt_tokens = prompt_tokens.saturating_add(prompt_len);
        }
        let mut sampling = prepared.sampling.clone();
        // Choices of one request with a seed differ from each other, yet repeat across requests.
        sampling.seed = sampling.seed.map(|s| s.wrapping_add(index as u64));
        let request = PreprocessedRequest {
            request_id: new_id("req"),
            model: served.card.name.clone(),
            token_ids: tokens.as_ref().clone(),
            stop: StopConditions {
                max_tokens: Some(max_tokens),
                stop_token_ids: prepared.stop_token_ids.clone(),
            },
            sampling,
            disagg: None,
        };
        let span = tracing::info_span!("request", request_id = %request.request_id, model = %served.card.name);
        let (outputs, worker) = d
            .generate(served, request, &prepared.route)
            .instrument(span.clone())
            .await?;
        workers.push(worker);
        // Validation already bounded the count, so this cannot fail.
        let stops =
            StopMatcher::new(prepared.stops.clone()).map_err(|e| ApiError::invalid_param("stop", e.to_string()))?;
        let choice = decode_choice(outputs, text.decoder(), stops, span).map(move |item| (index as u32, item));
        streams.push(choice.boxed());
    }
    // Taken only now: on an error above, the caller still holds the metrics to record it.
    let metrics = metrics.take();
    if let Some(m) = &metrics {
        m.prompt(prompt_tokens as usize);
    }
    let choices = streams.len();
    let mut merged = futures::stream::select_all(streams);
    let stream = async_stream::stream! {
        let mut metrics = metrics;
        let (mut completion_tokens, mut cached, mut finished) = (0u32, None::<u32>, 0usize);
        while let Some((index, item)) = merged.next().await {
            match item {
                Ok(ChoiceItem::Tokens { count, cached: c }) => {
                    completion_tokens = completion_tokens.saturating_add(count);
                    if c.is_some() && prepared.first_of_prompt[index as usize] {
                        cached = Some(cached.unwrap_or(0).saturating_add(c.unwrap_or(0)));
                    }
                    if let Some(m) = metrics.as_mut() {
                        m.output(index as usize, count as usize, c);
                    }
                }
                Ok(ChoiceItem::Text(t)) => yield Ok(Piece::Text(index, t)),
                Ok(ChoiceItem::Finish(f)) => {
                    finished += 1;
                    yield Ok(Piece::Finish(index, f));
                }
                Err(e) => {
                    if let Some(m) = metrics.take() {
                        m.finish(e.status.as_u16());
                    }
                    yield Err(e);
                    return;
                }
            }
        }
        if finished < choices {
            if let Some(m) = metrics.take() {
                m.finish(500);
            }
            yield Err(ApiError::internal("generation ended without finishing"));
            return;
        }
        if let Some(m) = metrics.take() {
            m.finish(200);
        }
        yield Ok(Piece::Usage(Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            prompt_tokens_details: cached.map(|cached_tokens| PromptTokensDetails { cached_tokens }),
        }));
    };
    Ok((stream.boxed(), workers))
}

/// One choice: the worker's tokens decoded into text, held back at possible stop strings,
/// ending at the worker's finish or at a stop string (which drops the worker's stream and so
/// cancels the rest of its generation).
fn decode_choice(
    mut outputs: crate::routing::Outputs,
    mut decoder: turbine_preprocess::IncrementalDecoder,
    mut stops: StopMatcher,
    span: tracing::Span,
) -> impl Stream<Item = Result<ChoiceItem, ApiError>> + Send {
    async_stream::stream! {
        let mut finish = None;
        while let Some(output) = outputs.next().await {
            let output = match output {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(parent: &span, error = %e, "generation failed");
                    yield Err(ApiError::from(e));
                    return;
                }
            };
            yield Ok(ChoiceItem::Tokens { count: output.token_ids.len() as u32, cached: output.cached_tokens });
            let text = match decoder.push(&output.token_ids) {
                Ok(t) => t,
                Err(e) => {
                    yield Err(ApiError::internal(format!("cannot decode the model's output: {e}")));
                    return;
                }
            };
            match stops.push(&text) {
                StopOutcome::Continue { emit } => {
                    if !emit.is_empty() {
                        yield Ok(ChoiceItem::Text(emit));
                    }
                }
                StopOutcome::Stopped { emit, .. } => {
                    if !emit.is_empty() {
                        yield Ok(ChoiceItem::Text(emit));
                    }
                    tracing::debug!(parent: &span, "stop string reached");
                    yield Ok(ChoiceItem::Finish("stop"));
                    return;
                }
            }
            if output.finish_reason.is_some() {
                finish = output.finish_reason;
                break;
            }
        }
        let rest = match decoder.finish() {
            Ok(t) => t,
            Err(e) => {
                yield Err(ApiError::internal(format!("cannot decode the model's output: {e}")));
                return;
            }
        };
        let (rest, stopped) = match stops.push(&rest) {
            StopOutcome::Continue { emit } => (emit + &stops.finish(), false),
            StopOutcome::Stopped { emit, .. } => (emit, true),
        };
        if !rest.is_empty() {
            yield Ok(ChoiceItem::Text(rest));
        }
        if stopped {
            yield Ok(ChoiceItem::Finish("stop"));
            return;
        }
        match finish {
            Some(FinishReason::Length) => yield Ok(ChoiceItem::Finish("length")),
            Some(f) => yield Ok(ChoiceItem::Finish(f.as_openai())),
            None => yield Err(ApiError::internal("the worker ended the stream without a finish reason")),
        }
    }
}

/// Every choice's whole text and finish reason, and the usage, of a non-streamed request.
async fn collect(
    mut pieces: BoxStream<'static, Result<Piece, ApiError>>,
    choices: usize,
) -> Result<(Vec<(String, &'static str)>, Usage), ApiError> {
    let mut texts = vec![(String::new(), "stop"); choices];
    while let Some(piece) = pieces.next().await {
        match piece? {
            Piece::Text(i, t) => texts[i as usize].0.push_str(&t),
            Piece::Finish(i, f) => texts[i as usize].1 = f,
            Piece::Usage(usage) => return Ok((texts, usage)),
        }
    }
    Err(ApiError::internal("generation ended without finishing"))
}

fn sse_json<T: serde::Serialize>(value: &T) -> Event {
    // Our response types always serialize.
    Event::default().data(serde_json::to_string(value).unwrap_or_default())
}

fn sse(events: impl Stream<Item = Event> + Send + 'static) -> Response {
    let done = futures::stream::once(async { Event::default().data("[DONE]") });
    // Keep-alive comments also reveal a client that went away while nothing else is sent.
    Sse::new(events.chain(done).map(Ok::<_, Infallible>))
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    let created = now_secs();
    let data = state
        .dispatcher
        .models
        .snapshot()
        .models
        .iter()
        .filter(|(_, m)| !m.instances.is_empty())
        .map(|(name, _)| ModelObject {
            id: name.clone(),
            object: "model".into(),
            created,
            owned_by: "turbine".into(),
        })
        .collect();
    Json(ModelList {
        object: "list".into(),
        data,
    })
}

/// 200 when at least one model is served and every known model has an instance; 503 otherwise.
async fn health(State(state): State<AppState>) -> Response {
    let snapshot = state.dispatcher.models.snapshot();
    let models: serde_json::Map<String, serde_json::Value> = snapshot
        .models
        .iter()
        .map(|(name, m)| {
            let ids: Vec<String> = m.instances.iter().map(|i| i.id.to_string()).collect();
            let mut entry = serde_json::json!({ "instances": ids });
            if !m.prefill.is_empty() {
                let prefill: Vec<String> = m.prefill.iter().map(|i| i.id.to_string()).collect();
                entry["prefill_instances"] = serde_json::json!(prefill);
            }
            (name.clone(), entry)
        })
        .collect();
    let healthy = !snapshot.models.is_empty() && snapshot.models.values().all(|m| !m.instances.is_empty());
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({ "status": if healthy { "healthy" } else { "unhealthy" }, "models": models });
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}

/// The OpenAPI description of every route, written by hand and checked against [`ROUTES`].
pub(crate) const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every route, as `/openapi.json` must describe it.
    const ROUTES: &[(&str, &str)] = &[
        ("post", "/v1/chat/completions"),
        ("post", "/v1/completions"),
        ("get", "/v1/models"),
        ("get", "/health"),
        ("get", "/live"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
    ];

    #[test]
    fn openapi_describes_every_route() {
        let spec: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
        let paths = spec["paths"].as_object().unwrap();
        for (method, path) in ROUTES {
            assert!(
                paths.get(*path).and_then(|p| p.get(*method)).is_some(),
                "{method} {path} undocumented"
            );
        }
        assert_eq!(paths.len(), ROUTES.len(), "documented routes that do not exist");
    }

    #[test]
    fn body_errors_name_the_field() {
        let parse = |s: &'static str| {
            parse_body::<ChatCompletionRequest>(Ok(Bytes::from(s)), 1024)
                .unwrap_err()
                .body()
        };
        let e = parse(r#"{"messages": []}"#).error;
        assert_eq!(
            (e.param.as_deref(), e.message.as_str()),
            (Some("model"), "`model` is required")
        );
        let e = parse(r#"{"model": "m", "messages": [], "temperature": "hot"}"#).error;
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e = parse(r#"{"model": "m", "messages": [{"content": "x"}]}"#).error;
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = parse(r#"{"model": "m", "messages": []} trailing"#).error;
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse(r#"{"model": "m""#).error;
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
    }
}
