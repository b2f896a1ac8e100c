//! Every type that crosses a process boundary: the OpenAI API, the preprocessed request
//! a worker receives, the outputs an engine streams back, and model cards.
//!
//! This crate does no I/O; it is the vocabulary the other crates share.

pub mod disagg;
pub mod discovery;
pub mod kv;
pub mod llm;
pub mod openai;

pub use disagg::{Disagg, KvTransferParams, WorkerRole};
pub use llm::{
    EngineOutput, FinishReason, ModelCard, OutputTokens, PreprocessedRequest, SamplingOptions, StopConditions,
    TimingProfile, TokenizerKind,
};
