//! The native engine: Llama-family transformers (Llama, SmolLM2, Qwen2) run with candle on
//! CPU, over a paged KV cache whose blocks come from the same [`turbine_engine::pool`] as the
//! mocker's, so prefix reuse and KV events behave identically.
//!
//! The device is a parameter throughout (`candle_core::Device`); only the attention, which
//! gathers a sequence's blocks into one tensor, is written for memory the CPU can index. A
//! GPU build would swap that for a paged-attention kernel over the same block tables.

pub mod config;
pub mod engine;
pub mod kv;
pub mod model;
pub mod sampling;
pub mod tiny;

use std::path::PathBuf;

pub use config::ModelConfig;
pub use engine::{NativeConfig, NativeEngine};
pub use kv::{KvBlocks, KvDtype, KvLayout, PagedKv, UnknownKvDtype};
pub use model::{write_converted_gguf, LoadReport, Model, SeqInput};
pub use sampling::Sampler;

#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Gguf {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    #[error("model config: {0}")]
    Config(String),
    #[error("architecture {0:?} is not supported (llama and qwen2 are)")]
    UnsupportedArchitecture(String),
    #[error("missing tensor {0}")]
    MissingTensor(String),
    #[error("batch: {0}")]
    Batch(String),
    #[error("KV layout mismatch: {0}")]
    KvLayout(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
