//! KV events published by vLLM and SGLang over ZeroMQ, translated into Turbine's.
//!
//! The wire, as `vllm/distributed/kv_events.py` (vLLM) and
//! `python/sglang/srt/disaggregation/kv_events.py` (SGLang) publish it:
//!
//! - A PUB socket that the engine binds sends `[topic, seq, payload]` messages, `seq` an
//!   8-byte big-endian counter from 0 per publisher, one per batch of events.
//! - An optional ROUTER socket replays its last batches (10,000 by default): asked
//!   `[b"", start_seq]`, it answers `[b"", seq, payload]` for every batch it holds from
//!   `start_seq` on, then `[b"", -1, b""]`.
//! - A payload is a msgpack batch (msgspec): array-like `[ts, events, dp_rank]` with array
//!   events tagged by their first element (SGLang, vLLM up to about 0.10), or a map with
//!   `"events"` whose events carry their tag under `"type"` (current vLLM). Events are
//!   `BlockStored`, `BlockRemoved` and `AllBlocksCleared`; block hashes are integers or
//!   bytes.
//!
//! `zmtp` speaks just enough ZeroMQ for that over Tokio, `decode` reads the batches,
//! [`Translator`] turns them into Turbine events (rehashing blocks from their token ids, so
//! the engine's hashes never have to match the router's) and [`KvEventFeed`] is the task
//! that ties them together for a worker.

mod decode;
mod feed;
mod translate;
mod zmtp;

pub use decode::{DecodeError, EventProblem};
pub use feed::{KvEventFeed, KvEventsConfig};
pub use translate::{Applied, BlockSizeMismatch, KvEventStats, TranslateError, Translator};
