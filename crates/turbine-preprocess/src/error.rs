//! The error type of this crate: loading model files, tokenizing and rendering templates.

use std::path::PathBuf;

use crate::gguf::GgufError;

/// What can go wrong while loading a model's files or turning text into tokens and back.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: file not found ({what})")]
    MissingFile { path: PathBuf, what: &'static str },
    #[error("{path}: expected a model directory or a .gguf file")]
    UnsupportedPath { path: PathBuf },
    #[error("reading {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {field} has an unexpected shape: {reason}")]
    BadConfig {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
    #[error("reading GGUF file {path}")]
    Gguf {
        path: PathBuf,
        #[source]
        source: GgufError,
    },
    #[error("{path}: GGUF metadata {key} is missing or of the wrong type (expected {expected})")]
    GgufMetadata {
        path: PathBuf,
        key: String,
        expected: &'static str,
    },
    #[error("{path}: GGUF tokenizer model {model:?} is not supported (only \"gpt2\", byte-level BPE)")]
    UnsupportedGgufTokenizer { path: PathBuf, model: String },
    #[error(
        "{path}: GGUF pre-tokenizer {pre:?} is not supported (supported: {})",
        crate::tokenizer::SUPPORTED_GGUF_PRE.join(", ")
    )]
    UnsupportedPreTokenizer { path: PathBuf, pre: String },
    #[error("loading tokenizer from {path}")]
    TokenizerLoad {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    #[error("building the tokenizer from {path}")]
    TokenizerBuild {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    #[error("tokenizing")]
    Encode(#[source] tokenizers::Error),
    #[error("detokenizing")]
    Decode(#[source] tokenizers::Error),
    #[error("the model has no chat template")]
    NoChatTemplate,
    #[error("invalid chat template")]
    TemplateSyntax(#[source] minijinja::Error),
    #[error("rendering the chat template")]
    TemplateRender(#[source] minijinja::Error),
    #[error("{count} stop strings given; at most {max} are allowed", max = crate::stop::MAX_STOP_STRINGS)]
    TooManyStopStrings { count: usize },
}
