//! A streaming OpenAI client that times each request: time to first token, every gap between
//! tokens, end-to-end latency, token counts and cached prompt tokens. It never retries: a failed
//! request is recorded with the kind of failure.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::workload::Prompt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
        }
    }
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    /// The server answered with this status instead of a stream.
    Http(u16),
    /// No complete answer within the request timeout.
    Timeout,
    /// The connection could not be made or was refused.
    Connect,
    /// The stream ended or broke before `[DONE]`, or carried something unreadable.
    BrokenStream,
    /// The stream carried an error event.
    ServerError,
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorKind::Http(s) => write!(f, "http_{s}"),
            ErrorKind::Timeout => f.write_str("timeout"),
            ErrorKind::Connect => f.write_str("connect"),
            ErrorKind::BrokenStream => f.write_str("broken_stream"),
            ErrorKind::ServerError => f.write_str("server_error"),
        }
    }
}

impl std::str::FromStr for ErrorKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "timeout" => ErrorKind::Timeout,
            "connect" => ErrorKind::Connect,
            "broken_stream" => ErrorKind::BrokenStream,
            "server_error" => ErrorKind::ServerError,
            other => ErrorKind::Http(
                other
                    .strip_prefix("http_")
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| format!("unknown error kind {other:?}"))?,
            ),
        })
    }
}

impl Serialize for ErrorKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ErrorKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// One request's measurements; times in seconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RequestRecord {
    /// When it was sent, from the start of the run.
    pub start: f64,
    /// Time to the first chunk carrying output text.
    pub ttft: Option<f64>,
    /// Time to the end of the stream (or to the failure).
    pub e2e: f64,
    /// Gaps between consecutive chunks carrying output text.
    #[serde(skip)]
    pub itl: Vec<f64>,
    /// Prompt tokens as the server counted them (`usage`), else as the bench sent them.
    pub input_tokens: u32,
    /// Output tokens as the server counted them, else the text chunks received.
    pub output_tokens: u32,
    /// `usage.prompt_tokens_details.cached_tokens`, when the server reports it.
    pub cached_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorKind>,
}

impl RequestRecord {
    /// Mean gap between output tokens after the first (TPOT), when there were at least two.
    pub fn tpot(&self) -> Option<f64> {
        let ttft = self.ttft?;
        (self.output_tokens > 1).then(|| (self.e2e - ttft) / f64::from(self.output_tokens - 1))
    }
}

/// What one request produced.
#[derive(Debug, Clone)]
pub struct Reply {
    pub record: RequestRecord,
    /// The output text, for the next turn of a conversation.
    pub text: String,
}

/// The messages of a conversation so far, for chat sessions.
pub type Messages = Vec<(&'static str, String)>;

#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    model: String,
    endpoint: Endpoint,
    timeout: Duration,
    ignore_eos: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot build the HTTP client: {0}")]
    Build(#[source] reqwest::Error),
    #[error("GET {url}: {source}")]
    Models {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("GET {url}: the server lists no model")]
    NoModel { url: String },
}

impl Client {
    /// `base` is the server's root, e.g. `http://127.0.0.1:8000`.
    pub fn new(
        base: &str,
        model: String,
        endpoint: Endpoint,
        timeout: Duration,
        ignore_eos: bool,
    ) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            // Every slot keeps its connection: without this the pool caps what a high
            // concurrency can open at once and adds connection setup to TTFT.
            .pool_max_idle_per_host(usize::MAX)
            .tcp_nodelay(true)
            .build()
            .map_err(ClientError::Build)?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            model,
            endpoint,
            timeout,
            ignore_eos,
        })
    }

    /// The first model `GET /v1/models` lists.
    pub async fn first_model(base: &str) -> Result<String, ClientError> {
        let url = format!("{}/v1/models", base.trim_end_matches('/'));
        let err = |source| ClientError::Models {
            url: url.clone(),
            source,
        };
        let body: Value = reqwest::get(&url)
            .await
            .and_then(|r| r.error_for_status())
            .map_err(err)?
            .json()
            .await
            .map_err(err)?;
        body["data"][0]["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or(ClientError::NoModel { url })
    }

    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// Sends a prompt (completions, or chat with one user message).
    pub async fn send(&self, prompt: &Prompt, max_tokens: u32, run_start: Instant) -> Reply {
        let body = match (self.endpoint, prompt) {
            (Endpoint::Completions, Prompt::Tokens(ids)) => json!({ "prompt": ids }),
            (Endpoint::Completions, Prompt::Text(t)) => json!({ "prompt": t }),
            (Endpoint::Chat, Prompt::Text(t)) => json!({ "messages": [{"role": "user", "content": t}] }),
            // Checked when the run is set up; a token prompt has no chat form.
            (Endpoint::Chat, Prompt::Tokens(ids)) => {
                json!({ "messages": [{"role": "user", "content": format!("{ids:?}")}] })
            }
        };
        let sent = match prompt {
            Prompt::Tokens(ids) => ids.len() as u32,
            Prompt::Text(t) => t.len() as u32,
        };
        self.post(body, sent, max_tokens, run_start).await
    }

    /// Sends a conversation to the chat endpoint.
    pub async fn chat(&self, messages: &Messages, max_tokens: u32, run_start: Instant) -> Reply {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|(role, content)| json!({"role": role, "content": content}))
            .collect();
        let sent = messages.iter().map(|(_, c)| c.len() as u32).sum();
        self.post(json!({ "messages": msgs }), sent, max_tokens, run_start)
            .await
    }

    async fn post(&self, mut body: Value, sent_tokens: u32, max_tokens: u32, run_start: Instant) -> Reply {
        body["model"] = json!(self.model);
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        body["max_tokens"] = json!(max_tokens);
        if self.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        let start = Instant::now();
        let mut record = RequestRecord {
            start: start.duration_since(run_start).as_secs_f64(),
            input_tokens: sent_tokens,
            ..RequestRecord::default()
        };
        let mut text = String::new();
        let outcome = tokio::time::timeout(self.timeout, self.stream(&body, start, &mut record, &mut text)).await;
        record.error = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(kind)) => Some(kind),
            Err(_) => Some(ErrorKind::Timeout),
        };
        record.e2e = start.elapsed().as_secs_f64();
        Reply { record, text }
    }

    async fn stream(
        &self,
        body: &Value,
        start: Instant,
        record: &mut RequestRecord,
        text: &mut String,
    ) -> Result<(), ErrorKind> {
        let url = format!("{}{}", self.base, self.endpoint.path());
        let response = self.http.post(url).json(body).send().await.map_err(|e| {
            if e.is_connect() {
                ErrorKind::Connect
            } else {
                ErrorKind::BrokenStream
            }
        })?;
        if !response.status().is_success() {
            return Err(ErrorKind::Http(response.status().as_u16()));
        }
        let mut events = SseSplitter::default();
        let mut body = response.bytes_stream();
        let mut last_token: Option<Instant> = None;
        let mut chunks = 0u32;
        let mut usage_tokens = None;
        while let Some(piece) = body.next().await {
            let piece = piece.map_err(|_| ErrorKind::BrokenStream)?;
            let now = Instant::now();
            events.push(&piece);
            while let Some(data) = events.next_data() {
                if data == "[DONE]" {
                    record.output_tokens = usage_tokens.unwrap_or(chunks);
                    return Ok(());
                }
                let event: Value = serde_json::from_str(&data).map_err(|_| ErrorKind::BrokenStream)?;
                if event.get("error").is_some() {
                    return Err(ErrorKind::ServerError);
                }
                if let Some(usage) = event.get("usage").filter(|u| !u.is_null()) {
                    if let Some(p) = usage["prompt_tokens"].as_u64() {
                        record.input_tokens = p as u32;
                    }
                    usage_tokens = usage["completion_tokens"].as_u64().map(|c| c as u32);
                    record.cached_tokens = usage["prompt_tokens_details"]["cached_tokens"]
                        .as_u64()
                        .map(|c| c as u32);
                }
                let choice = &event["choices"][0];
                let delta = match self.endpoint {
                    Endpoint::Chat => choice["delta"]["content"].as_str(),
                    Endpoint::Completions => choice["text"].as_str(),
                };
                let Some(delta) = delta.filter(|d| !d.is_empty()) else {
                    continue;
                };
                text.push_str(delta);
                chunks += 1;
                match last_token {
                    None => record.ttft = Some(now.duration_since(start).as_secs_f64()),
                    Some(prev) => record.itl.push(now.duration_since(prev).as_secs_f64()),
                }
                last_token = Some(now);
            }
        }
        record.output_tokens = usage_tokens.unwrap_or(chunks);
        Err(ErrorKind::BrokenStream)
    }
}

/// Splits a byte stream into server-sent events' `data` payloads.
#[derive(Debug, Default)]
struct SseSplitter {
    buf: Vec<u8>,
}

impl SseSplitter {
    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete event's data (its `data:` lines joined), skipping comments and events
    /// without data.
    fn next_data(&mut self) -> Option<String> {
        loop {
            let (end, sep) = find_event_end(&self.buf)?;
            let event: Vec<u8> = self.buf.drain(..end + sep).take(end).collect();
            let event = String::from_utf8_lossy(&event);
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                return Some(data.join("\n"));
            }
        }
    }
}

/// Where the first event ends and how long its blank-line separator is.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| (p, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_split_across_reads() {
        let mut s = SseSplitter::default();
        s.push(b": keep-alive\n\ndata: {\"a\"");
        assert_eq!(s.next_data(), None);
        s.push(b":1}\n\ndata: [DONE]\r\n\r\n");
        assert_eq!(s.next_data().as_deref(), Some("{\"a\":1}"));
        assert_eq!(s.next_data().as_deref(), Some("[DONE]"));
        assert_eq!(s.next_data(), None);
    }

    #[test]
    fn error_kinds_round_trip_as_strings() {
        for k in [
            ErrorKind::Http(503),
            ErrorKind::Timeout,
            ErrorKind::Connect,
            ErrorKind::BrokenStream,
            ErrorKind::ServerError,
        ] {
            let s = serde_json::to_string(&k).unwrap();
            assert_eq!(serde_json::from_str::<ErrorKind>(&s).unwrap(), k, "{s}");
        }
        assert_eq!(ErrorKind::Http(429).to_string(), "http_429");
    }

    #[test]
    fn tpot_spreads_decode_time_over_the_tokens_after_the_first() {
        let r = RequestRecord {
            ttft: Some(0.1),
            e2e: 1.1,
            output_tokens: 11,
            ..Default::default()
        };
        assert!((r.tpot().unwrap() - 0.1).abs() < 1e-9);
        assert_eq!(RequestRecord { output_tokens: 1, ..r }.tpot(), None);
    }
}
