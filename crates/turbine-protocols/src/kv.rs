//! What workers tell routers about their KV caches: block events, load reports, and the
//! state a router asks for to resynchronise.

use serde::{Deserialize, Serialize};

mod wire;

pub use wire::{KvWireError, KV_WIRE_VERSION};

/// One change to a worker's set of cached blocks. `event_id` increases by one per event on
/// each worker, so that a gap shows a lost event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEvent {
    pub event_id: u64,
    pub data: KvEventData,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KvEventData {
    /// Blocks registered under their hashes, each the child of the one before; the first is
    /// the child of `parent_hash` (none for a sequence's first block).
    Stored {
        parent_hash: Option<u64>,
        blocks: Vec<StoredBlock>,
    },
    /// Blocks evicted: their hashes no longer name cached blocks.
    Removed { sequence_hashes: Vec<u64> },
    /// Every cached block is gone.
    Cleared,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StoredBlock {
    pub sequence_hash: u64,
    pub local_hash: u64,
}

/// A worker's load, as it reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerLoad {
    /// Sequences scheduled to run (prefilling or decoding).
    pub active_seqs: u32,
    /// Sequences waiting for admission.
    pub waiting_seqs: u32,
    pub blocks_in_use: u32,
    pub blocks_total: u32,
    /// Prompt tokens admitted but not yet computed.
    pub active_prefill_tokens: u64,
}

/// A cached block as a snapshot lists it: with its parent, so the tree can be rebuilt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CachedBlock {
    pub parent_hash: Option<u64>,
    pub block: StoredBlock,
}

/// Every block a worker has cached, as of `last_event_id` (`None`: no event yet).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvSnapshot {
    pub last_event_id: Option<u64>,
    pub blocks: Vec<CachedBlock>,
}

/// Published on the event plane: a worker's KV events, in order, as many as one engine
/// step produced (one message per step instead of one per block), in the binary
/// encoding of [`KvEventMessage::encode`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEventMessage {
    /// The instance id of the worker's generate endpoint.
    pub worker: u64,
    pub events: Vec<KvEvent>,
}

/// Published on the event plane with every load report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadMessage {
    pub worker: u64,
    pub load: WorkerLoad,
}

/// One change to a router's account of what it sent where, shared with the routers of the
/// other frontends so that they all see the same load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum ActiveChange {
    Routed {
        request: String,
        worker: u64,
        prefill_tokens: u64,
        blocks: u64,
    },
    FirstToken {
        request: String,
    },
    Ended {
        request: String,
    },
}

/// Published by each frontend's router on the namespace's router-sync subject, batched;
/// an empty batch says the router is alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveSyncMessage {
    /// A random id per router, fixed for its life.
    pub router: u64,
    pub changes: Vec<ActiveChange>,
}

/// A router's question to a worker's KV state endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvStateRequest {
    /// The last event the router applied; `None` asks for a full snapshot.
    pub after_event_id: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KvStateResponse {
    /// Every event after the one asked about, in order: the worker still had them all.
    Events { events: Vec<KvEvent> },
    /// The events asked for are gone (or none were asked for): the whole state instead.
    Snapshot { snapshot: KvSnapshot },
}
