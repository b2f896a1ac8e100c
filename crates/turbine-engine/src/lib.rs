//! The [`Engine`] trait, through which a worker drives any inference engine, and the engines
//! themselves: [`EchoEngine`] for now, the mocker and the native engine later.
//!
//! An engine knows nothing of HTTP or discovery: it takes a tokenized request and streams
//! tokens back until it finishes or its cancellation token fires.

mod echo;
pub mod pool;

use futures::stream::BoxStream;
use tokio_util::sync::CancellationToken;
use turbine_protocols::{EngineOutput, PreprocessedRequest};

pub use echo::{EchoConfig, EchoEngine};

/// What an engine streams: outputs, the last of which carries a `finish_reason`.
pub type EngineStream = BoxStream<'static, Result<EngineOutput, EngineError>>;

/// An inference engine.
///
/// Contract: a stream that ends without error ends with exactly one output whose
/// `finish_reason` is set. When `cancel` fires, the engine stops work for the request and
/// frees what it holds; the stream may then end early.
pub trait Engine: Send + Sync + 'static {
    /// Starts generating for `request`. Fails at once if the request can never be served.
    fn generate(
        &self,
        request: PreprocessedRequest,
        cancel: CancellationToken,
    ) -> Result<EngineStream, EngineError>;
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request can never be served by this engine (too long, bad token ids, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The engine stopped while the request was running.
    #[error("engine stopped")]
    Stopped,
}
