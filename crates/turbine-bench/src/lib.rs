//! `turbine bench`'s engine: drives an OpenAI-compatible endpoint with a workload (synthetic,
//! multi-turn sessions or a replayed trace) at a chosen arrival pattern, measures every
//! request's latencies and cache hits, and turns them into summaries, comparisons and plots.
//!
//! It speaks only HTTP to the server, so it measures Turbine, vLLM or SGLang alike; nothing here
//! knows how the server is built.

pub mod analyze;
pub mod client;
pub mod conversations;
pub mod plot;
pub mod report;
pub mod runner;
pub mod stats;
pub mod tokens;
pub mod trace;
pub mod workload;

pub use client::{Client, Endpoint, ErrorKind, RequestRecord};
pub use report::{compare_table, BenchResult, Summary};
pub use runner::{run, Arrival, RunConfig};
pub use trace::{Trace, TraceError, TraceFormat, TraceRequest};
pub use workload::{Job, Workload};
