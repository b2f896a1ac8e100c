//! The KV block manager: tiers of KV blocks below an engine's own pool (G1), in host memory
//! (G2) and on local disk (G3), with a remote tier (G4) as a trait; the eviction policies
//! that choose what each tier keeps; and the bookkeeping of offload (G1 to G2 to G3) and
//! onboard (back to G1). Blocks are named by the sequence hash the pool and the router use.
//! No HTTP and no routing here; bytes move only through `turbine-transfer` regions.

mod bucket;
mod config;
mod copier;
mod error;
mod manager;
pub mod policy;
mod remote;
mod stats;
mod store;
mod tier;

pub use bucket::TokenBucket;
pub use config::{KvbmConfig, OffloadMode, PoolShape, PrefetchPolicy, Sizes, TierSize};
pub use copier::Waker;
pub use error::KvbmError;
pub use manager::{BlockBytes, Kvbm, Loading, NoBytes, TierEvent};
pub use remote::RemoteTier;
pub use stats::{KvbmStats, Path, Skip, TierKind};
pub use store::BlockMeta;
