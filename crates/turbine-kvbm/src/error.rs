//! The block manager's errors.

use std::path::PathBuf;

use turbine_transfer::TransferError;

#[derive(Debug, thiserror::Error)]
pub enum KvbmError {
    /// Settings that cannot work, refused before anything is allocated.
    #[error("{0}")]
    Config(String),
    /// Moving bytes in or out of a tier's region failed.
    #[error("moving KV bytes: {0}")]
    Transfer(#[from] TransferError),
    #[error("disk tier {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    /// A copy was given pieces that do not add up to one block.
    #[error("{got} bytes of pieces for blocks of {expected} bytes")]
    PieceSizes { got: usize, expected: usize },
}
