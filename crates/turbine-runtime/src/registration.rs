//! [`Registration`]: keys held in discovery under one lease that this process keeps alive,
//! written again under a new lease if discovery ever forgets the old one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::{CancellationToken, DropGuard};

use crate::discovery::{DiscoveryError, LeaseId};
use crate::runtime::Runtime;

/// Keys that live while this value does: dropping it stops the keep-alive, so they expire
/// within the lease's TTL; [`Registration::revoke`] removes them at once.
#[derive(Debug)]
pub struct Registration {
    runtime: Runtime,
    keys: Arc<Keys>,
    keep_alive: DropGuard,
}

#[derive(Debug)]
struct Keys {
    lease: Mutex<LeaseId>,
    written: Mutex<Vec<(String, Vec<u8>)>>,
}

impl Keys {
    fn lease(&self) -> LeaseId {
        *self.lease.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Registration {
    /// Grants a lease of `ttl` and keeps it alive.
    pub async fn start(runtime: &Runtime, ttl: Duration) -> Result<Self, DiscoveryError> {
        let lease = runtime.discovery().grant_lease(ttl).await?;
        let keys = Arc::new(Keys {
            lease: Mutex::new(lease),
            written: Mutex::default(),
        });
        let stop = CancellationToken::new();
        tokio::spawn(keep_alive_loop(runtime.clone(), Arc::clone(&keys), ttl, stop.clone()));
        Ok(Self {
            runtime: runtime.clone(),
            keys,
            keep_alive: stop.drop_guard(),
        })
    }

    /// Writes `key` under this registration's lease.
    pub async fn put(&self, key: String, value: Vec<u8>) -> Result<(), DiscoveryError> {
        self.runtime
            .discovery()
            .put(&key, value.clone(), Some(self.keys.lease()))
            .await?;
        self.keys
            .written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((key, value));
        Ok(())
    }

    /// Removes every key now. On failure they still expire within the lease's TTL.
    pub async fn revoke(self) -> Result<(), DiscoveryError> {
        let lease = self.keys.lease();
        drop(self.keep_alive);
        self.runtime.discovery().revoke_lease(lease).await
    }
}

async fn keep_alive_loop(runtime: Runtime, keys: Arc<Keys>, ttl: Duration, stop: CancellationToken) {
    let discovery = runtime.discovery();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(ttl / 3) => {}
        }
        match discovery.keep_alive(keys.lease()).await {
            Ok(()) => {}
            Err(DiscoveryError::LeaseNotFound(old)) => {
                tracing::warn!(lease = old.0, "lease lost: registering again");
                if let Err(e) = reregister(&runtime, &keys, ttl).await {
                    tracing::warn!(error = %e, "registering again failed; will retry");
                }
            }
            Err(e) => tracing::warn!(error = %e, "lease keep-alive failed; will retry"),
        }
    }
}

async fn reregister(runtime: &Runtime, keys: &Keys, ttl: Duration) -> Result<(), DiscoveryError> {
    let lease = runtime.discovery().grant_lease(ttl).await?;
    *keys.lease.lock().unwrap_or_else(|e| e.into_inner()) = lease;
    let written = keys.written.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for (key, value) in written {
        runtime.discovery().put(&key, value, Some(lease)).await?;
    }
    Ok(())
}
