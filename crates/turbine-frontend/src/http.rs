//! The HTTP surface: routes, request validation, and rendering of responses and SSE chunks.
//!
//! Chat and completions share one generation path ([`generate`]) and differ only in how
//! they build the prompt and render text.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
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
    PromptTokensDetails, TurbineExt, Usage,
};
use turbine_protocols::{FinishReason, PreprocessedRequest, StopConditions};

use crate::error::ApiError;
use crate::kv_routing::SelectorOverrides;
use crate::models::ServedModel;
use crate::preprocess::{check_token_ids, encode, render_chat, IncrementalDecoder};
use crate::routing::{Dispatcher, RouteOptions};
use crate::FrontendConfig;

type AppState = Arc<Dispatcher>;

#[derive(Clone)]
struct Limits {
    max_body_bytes: usize,
}

pub(crate) fn app(dispatcher: AppState, config: &FrontendConfig) -> axum::Router {
    let limits = Limits {
        max_body_bytes: config.max_body_bytes,
    };
    axum::Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/health", get(health))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(axum::Extension(limits))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .with_state(dispatcher)
}

fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>, limits: &Limits) -> Result<T, ApiError> {
    let body = body.map_err(|r| match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::payload_too_large(limits.max_body_bytes),
        _ => ApiError::invalid_request(format!("cannot read request body: {r}")),
    })?;
    serde_json::from_slice(&body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::invalid_request(format!("invalid request: {e}")),
        _ => ApiError::invalid_request(format!("request body is not valid JSON: {e}")),
    })
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

async fn chat_completions(
    State(d): State<AppState>,
    axum::Extension(limits): axum::Extension<Limits>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ChatCompletionRequest = parse_body(body, &limits)?;
    let route = route_options(&headers, req.turbine.as_ref())?;
    check_n(req.n)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "`messages` must contain at least one message",
        ));
    }
    let served = d.model(&req.model)?;
    let prompt = render_chat(&served.card.tokenizer, &req.messages);
    let tokens = encode(&served.card.tokenizer, &prompt);
    let max_tokens = req.max_completion_tokens.or(req.max_tokens);
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let text = generate(&d, &served, tokens, max_tokens, &route).await?;
    let (id, created, model) = (new_id("chatcmpl"), now_secs(), req.model);
    if !req.stream {
        let (content, finish, usage) = collect(text).await?;
        let response = ChatCompletionResponse {
            id,
            object: "chat.completion".into(),
            created,
            model,
            choices: vec![ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant".into(),
                    content,
                },
                finish_reason: Some(finish.into()),
            }],
            usage,
        };
        return Ok(Json(response).into_response());
    }
    let chunk = move |delta: ChatDelta, finish: Option<&str>, usage: Option<Usage>| ChatCompletionChunk {
        id: id.clone(),
        object: "chat.completion.chunk".into(),
        created,
        model: model.clone(),
        choices: if usage.is_some() {
            vec![]
        } else {
            vec![ChatChunkChoice {
                index: 0,
                delta,
                finish_reason: finish.map(str::to_owned),
            }]
        },
        usage,
    };
    let first = chunk(
        ChatDelta {
            role: Some("assistant".into()),
            content: Some(String::new()),
        },
        None,
        None,
    );
    let events =
        futures::stream::once(async move { sse_json(&first) }).chain(piece_events(text, include_usage, move |part| {
            match part {
                Part::Text(t) => chunk(
                    ChatDelta {
                        content: Some(t),
                        role: None,
                    },
                    None,
                    None,
                ),
                Part::Finish(finish) => chunk(ChatDelta::default(), Some(finish), None),
                Part::Usage(usage) => chunk(ChatDelta::default(), None, Some(usage)),
            }
        }));
    Ok(sse(events))
}

async fn completions(
    State(d): State<AppState>,
    axum::Extension(limits): axum::Extension<Limits>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(body, &limits)?;
    let route = route_options(&headers, req.turbine.as_ref())?;
    check_n(req.n)?;
    let served = d.model(&req.model)?;
    let tokenizer = &served.card.tokenizer;
    let tokens = match req.prompt {
        Prompt::Text(t) => encode(tokenizer, &t),
        Prompt::Tokens(ids) => ids,
        Prompt::Texts(v) if v.len() == 1 => encode(tokenizer, &v[0]),
        Prompt::TokenBatches(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Texts(_) | Prompt::TokenBatches(_) => {
            return Err(ApiError::invalid_param(
                "prompt",
                "batched prompts are not supported yet; send one prompt per request",
            ))
        }
    };
    if tokens.is_empty() {
        return Err(ApiError::invalid_param("prompt", "`prompt` must not be empty"));
    }
    check_token_ids(tokenizer, &tokens)
        .map_err(|t| ApiError::invalid_param("prompt", format!("token id {t} is not in the model's vocabulary")))?;
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let text = generate(&d, &served, tokens, req.max_tokens, &route).await?;
    let (id, created, model) = (new_id("cmpl"), now_secs(), req.model);
    let response = move |text: String, finish: Option<&str>, usage: Option<Usage>| CompletionResponse {
        id: id.clone(),
        object: "text_completion".into(),
        created,
        model: model.clone(),
        choices: if usage.is_some() && finish.is_none() {
            vec![]
        } else {
            vec![CompletionChoice {
                index: 0,
                text,
                finish_reason: finish.map(str::to_owned),
            }]
        },
        usage,
    };
    if !req.stream {
        let (text, finish, usage) = collect(text).await?;
        return Ok(Json(response(text, Some(finish), Some(usage))).into_response());
    }
    let events = piece_events(text, include_usage, move |part| match part {
        Part::Text(t) => response(t, None, None),
        Part::Finish(finish) => response(String::new(), Some(finish), None),
        Part::Usage(usage) => response(String::new(), None, Some(usage)),
    });
    Ok(sse(events))
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
            name,
            format!("turbine.{name} must be a number >= 0, got {x}"),
        )),
        _ => Ok(v),
    };
    let ext = ext.cloned().unwrap_or_default();
    let overrides = SelectorOverrides {
        overlap_weight: check("kv_overlap_weight", ext.kv_overlap_weight)?,
        temperature: check("kv_temperature", ext.kv_temperature)?,
    };
    Ok(RouteOptions { session, overrides })
}

fn check_n(n: Option<u32>) -> Result<(), ApiError> {
    match n {
        None | Some(1) => Ok(()),
        Some(n) => Err(ApiError::invalid_param(
            "n",
            format!("n={n} is not supported; only n=1 is"),
        )),
    }
}

/// What generation yields, in the order it happens.
enum Piece {
    Text(String),
    Done { finish: &'static str, usage: Usage },
}

/// Validates lengths, routes the request, and decodes the worker's tokens into text pieces.
async fn generate(
    d: &Arc<Dispatcher>,
    served: &ServedModel,
    tokens: Vec<u32>,
    max_tokens: Option<u32>,
    route: &RouteOptions,
) -> Result<BoxStream<'static, Result<Piece, ApiError>>, ApiError> {
    let context = served.card.context_length;
    let prompt_len = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
    if max_tokens == Some(0) {
        return Err(ApiError::invalid_param("max_tokens", "max_tokens must be at least 1"));
    }
    if prompt_len >= context {
        return Err(ApiError::invalid_param(
            "messages",
            format!("the prompt is {prompt_len} tokens; this model's context length is {context}"),
        ));
    }
    let max_tokens = match max_tokens {
        Some(m) if m > context - prompt_len => {
            return Err(ApiError::invalid_param(
                "max_tokens",
                format!("prompt ({prompt_len} tokens) plus max_tokens ({m}) exceeds the context length of {context}"),
            ))
        }
        Some(m) => m,
        None => context - prompt_len,
    };
    let request = PreprocessedRequest {
        request_id: new_id("req"),
        model: served.card.name.clone(),
        token_ids: tokens,
        stop: StopConditions {
            max_tokens: Some(max_tokens),
            stop_token_ids: vec![],
        },
    };
    let span = tracing::info_span!("request", request_id = %request.request_id, model = %served.card.name);
    let mut outputs = d.dispatch(served, request, route).instrument(span.clone()).await?;
    let mut decoder = IncrementalDecoder::new(served.card.tokenizer.clone());
    let stream = async_stream::stream! {
        let mut completion_tokens = 0u32;
        let mut cached = None;
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
            completion_tokens += output.token_ids.len() as u32;
            cached = cached.or(output.cached_tokens);
            let text = decoder.push(&output.token_ids);
            if !text.is_empty() {
                yield Ok(Piece::Text(text));
            }
            if output.finish_reason.is_some() {
                finish = output.finish_reason;
                break;
            }
        }
        let rest = decoder.finish();
        if !rest.is_empty() {
            yield Ok(Piece::Text(rest));
        }
        let Some(finish) = finish else {
            yield Err(ApiError::internal("the worker ended the stream without a finish reason"));
            return;
        };
        let usage = Usage {
            prompt_tokens: prompt_len,
            completion_tokens,
            total_tokens: prompt_len + completion_tokens,
            prompt_tokens_details: cached.map(|cached_tokens| PromptTokensDetails { cached_tokens }),
        };
        tracing::debug!(parent: &span, completion_tokens, ?finish, "finished");
        let finish = if finish == FinishReason::Cancelled { "stop" } else { finish.as_openai() };
        yield Ok(Piece::Done { finish, usage });
    };
    Ok(stream.boxed())
}

/// The whole text, finish reason and usage of a non-streamed request.
async fn collect(
    mut pieces: BoxStream<'static, Result<Piece, ApiError>>,
) -> Result<(String, &'static str, Usage), ApiError> {
    let mut text = String::new();
    while let Some(piece) = pieces.next().await {
        match piece? {
            Piece::Text(t) => text.push_str(&t),
            Piece::Done { finish, usage } => return Ok((text, finish, usage)),
        }
    }
    Err(ApiError::internal("generation ended without finishing"))
}

/// What one SSE chunk carries; chat and completions render it each in their own shape.
enum Part {
    Text(String),
    Finish(&'static str),
    Usage(Usage),
}

/// The SSE events of a generation: a chunk per text piece, a finishing chunk, the usage
/// chunk when asked for, and OpenAI's error body if generation fails midway.
fn piece_events<T: serde::Serialize>(
    pieces: BoxStream<'static, Result<Piece, ApiError>>,
    include_usage: bool,
    render: impl Fn(Part) -> T + Send + 'static,
) -> impl Stream<Item = Event> + Send {
    pieces.flat_map(move |piece| {
        let events: Vec<Event> = match piece {
            Ok(Piece::Text(t)) => vec![sse_json(&render(Part::Text(t)))],
            Ok(Piece::Done { finish, usage }) => {
                let mut v = vec![sse_json(&render(Part::Finish(finish)))];
                if include_usage {
                    v.push(sse_json(&render(Part::Usage(usage))));
                }
                v
            }
            Err(e) => vec![sse_json(&e.body())],
        };
        futures::stream::iter(events)
    })
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

async fn list_models(State(d): State<AppState>) -> Json<ModelList> {
    let created = now_secs();
    let data = d
        .models
        .snapshot()
        .models
        .keys()
        .map(|name| ModelObject {
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
async fn health(State(d): State<AppState>) -> Response {
    let snapshot = d.models.snapshot();
    let models: serde_json::Map<String, serde_json::Value> = snapshot
        .models
        .iter()
        .map(|(name, m)| {
            let ids: Vec<String> = m.instances.iter().map(|i| i.id.to_string()).collect();
            (name.clone(), serde_json::json!({ "instances": ids }))
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
