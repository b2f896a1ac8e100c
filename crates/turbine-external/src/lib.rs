//! External inference servers (vLLM, SGLang, llama.cpp) as Turbine engines: requests go to
//! the server as token ids and its output token ids come back, so the frontend's tokenizer,
//! template, stop strings and usage stay the single source of truth; the server's health,
//! load and (where it publishes them) KV events feed the worker as a native engine's would.

mod engine;
pub mod kv_events;
pub mod metrics;
pub mod protocol;
mod sse;

use std::time::Duration;

pub use engine::{ExternalConfig, ExternalEngine, ServerInfo};
pub use protocol::ServerKind;

/// Why a server cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    #[error("engine URL must be http://HOST:PORT, got {0:?}")]
    Url(String),
    #[error("{server} at {url} is not healthy after {waited:?}: {why}")]
    NotHealthy {
        server: &'static str,
        url: String,
        why: String,
        waited: Duration,
    },
    #[error("{url}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered something unexpected: {why}")]
    Answer { url: String, why: String },
    #[error(
        "{server} caches KV in blocks of {engine} tokens but the router hashes blocks of {router}: \
         start the server with a block size of {router} (vLLM --block-size, SGLang --page-size) \
         or the worker with --block-size {engine}"
    )]
    BlockSize {
        server: &'static str,
        engine: u32,
        router: u32,
    },
}
