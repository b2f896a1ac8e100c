//! Discovery: a key-value store with leases and prefix watches, shaped like etcd so that the
//! etcd backend drops in behind the same trait.
//!
//! Instances register under [`instance_key`] bound to a lease; when the lease is revoked or
//! expires, every key bound to it disappears and watchers see the deletions.

mod etcd;
mod memory;

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::ids::{EndpointId, InstanceId};

pub use etcd::{EtcdDiscovery, EtcdOptions};
pub use memory::MemoryDiscovery;

/// A lease: keys bound to it live as long as it is kept alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    Delete { key: String },
}

/// The state under a prefix when the watch started, then every change after it, in order.
pub struct Watch {
    pub initial: Vec<KeyValue>,
    pub events: BoxStream<'static, WatchEvent>,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("initial", &self.initial)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("lease {0:?} does not exist or has expired")]
    LeaseNotFound(LeaseId),
    #[error("lease TTL must be at least one second, got {0:?}")]
    InvalidTtl(Duration),
    #[error("discovery backend unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

#[async_trait]
pub trait Discovery: Send + Sync + std::fmt::Debug + 'static {
    /// A new lease that expires `ttl` after its last keep-alive.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, DiscoveryError>;
    /// Restarts the lease's TTL.
    async fn keep_alive(&self, lease: LeaseId) -> Result<(), DiscoveryError>;
    /// Ends the lease now, deleting every key bound to it.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), DiscoveryError>;
    /// Creates or replaces `key`, bound to `lease` when one is given.
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<(), DiscoveryError>;
    async fn delete(&self, key: &str) -> Result<(), DiscoveryError>;
    /// Every key under `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>, DiscoveryError>;
    /// The keys under `prefix` now, and a stream of the changes after that, with no gap.
    async fn watch(&self, prefix: &str) -> Result<Watch, DiscoveryError>;
}

/// `turbine/{namespace}/instances/{component}/{endpoint}/`: where an endpoint's instances live.
pub fn instance_prefix(endpoint: &EndpointId) -> String {
    format!(
        "turbine/{}/instances/{}/{}/",
        endpoint.namespace, endpoint.component, endpoint.name
    )
}

/// The key of one instance; the id is in hex, as in Dynamo's layout.
pub fn instance_key(endpoint: &EndpointId, id: InstanceId) -> String {
    format!("{}{:x}", instance_prefix(endpoint), id.0)
}
