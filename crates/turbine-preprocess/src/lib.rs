//! Turning chat messages into prompts and token ids, and token ids back into text.
//!
//! [`Preprocessor::load`] reads what a model ships (a Hugging Face directory or a GGUF file)
//! into a [`Tokenizer`], an optional [`ChatTemplate`] and a context length. Generated ids go
//! back to text through an [`IncrementalDecoder`], and a [`StopMatcher`] cuts the text at the
//! request's stop strings. No I/O happens after loading, and nothing here is async.

mod detokenize;
mod error;
pub mod gguf;
mod model;
mod stop;
mod template;
mod tokenizer;

pub use detokenize::IncrementalDecoder;
pub use error::Error;
pub use model::Preprocessor;
pub use stop::{StopMatcher, StopOutcome, MAX_STOP_STRINGS};
pub use template::ChatTemplate;
pub use tokenizer::{Tokenizer, SUPPORTED_GGUF_PRE};
