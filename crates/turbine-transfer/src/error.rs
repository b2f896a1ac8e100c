//! What can go wrong moving bytes, as one enum every backend reports through.

use std::sync::Arc;

/// A failed registration, handshake or transfer. Cloneable, because one failure is seen by
/// every waiter on a transfer and counted once in the metrics.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransferError {
    #[error("peer {peer} disconnected: {reason}")]
    RemoteDisconnected { peer: String, reason: String },
    #[error("transfer cancelled")]
    Cancelled,
    #[error("transfer timed out after {after_ms} ms")]
    TimedOut { after_ms: u64 },
    /// The two sides disagree: lengths of the descriptor lists, or the peers' compatibility
    /// attributes or protocol versions at the handshake.
    #[error("mismatch: {0}")]
    Mismatch(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("descriptor out of bounds: {0}")]
    OutOfBounds(String),
    #[error("{0} is not implemented in this build")]
    Unsupported(&'static str),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: Arc<std::io::Error>,
    },
}

impl TransferError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        TransferError::Io {
            context: context.into(),
            source: Arc::new(source),
        }
    }

    /// A short stable name for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            TransferError::RemoteDisconnected { .. } => "remote_disconnected",
            TransferError::Cancelled => "cancelled",
            TransferError::TimedOut { .. } => "timed_out",
            TransferError::Mismatch(_) => "mismatch",
            TransferError::NotFound(_) => "not_found",
            TransferError::OutOfBounds(_) => "out_of_bounds",
            TransferError::Unsupported(_) => "unsupported",
            TransferError::Io { .. } => "io",
        }
    }
}
