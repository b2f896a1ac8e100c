//! Data movement between processes in the shape of NVIDIA's NIXL: an agent per process,
//! memory regions registered with it, descriptor lists addressing them, and one-sided READ
//! and WRITE with completion, cancel, deadlines and a notification to the peer. Knows nothing
//! of tokens, models or engines; callers lay their blocks out in regions and name them by
//! descriptor.
//!
//! Backends: a copy when the peer is in this process, direct reads and writes of a peer's
//! shared-memory or file regions on the same host, and TCP otherwise. A GPU build adds device
//! memory and an RDMA backend (NIXL over UCX) behind the same `Agent::post`.

mod agent;
mod error;
mod memory;
mod metadata;
mod metrics;
mod tcp;
mod transfer;

pub use agent::{Agent, AgentOptions, Notification, Peer};
pub use error::TransferError;
pub use memory::{Desc, DescList, MemKind, RegionId};
pub use metadata::{AgentMetadata, Compat, RegionInfo, PROTOCOL_VERSION};
pub use metrics::{Backend, BackendStats, Op, StatsSnapshot};
pub use transfer::{Completion, Post, Transfer, TransferStatus};
