//! In-process discovery for a single machine: no external service, same semantics as etcd
//! (leases with TTLs, prefix watches that see a snapshot then every change).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::{Discovery, DiscoveryError, KeyValue, LeaseId, Watch, WatchEvent};

/// Discovery held in this process's memory. Cloning shares the store.
///
/// Lease expiry runs on tokio's clock, so tests can pause time to check TTLs.
#[derive(Debug, Clone, Default)]
pub struct MemoryDiscovery {
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    kvs: BTreeMap<String, (Vec<u8>, Option<LeaseId>)>,
    leases: HashMap<LeaseId, LeaseState>,
    next_lease: i64,
    watchers: Vec<(String, mpsc::UnboundedSender<WatchEvent>)>,
}

#[derive(Debug)]
struct LeaseState {
    ttl: Duration,
    deadline: Instant,
}

impl MemoryDiscovery {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the maps consistent (every mutation is a
        // single insert or remove), so a poisoned lock is safe to keep using.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Expires a lease when its deadline passes without a keep-alive.
    fn spawn_reaper(&self, lease: LeaseId) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let deadline = match this.lock().leases.get(&lease) {
                    Some(l) => l.deadline,
                    None => return,
                };
                tokio::time::sleep_until(deadline).await;
                let mut state = this.lock();
                match state.leases.get(&lease) {
                    Some(l) if l.deadline <= Instant::now() => {
                        tracing::info!(lease = lease.0, "lease expired");
                        state.remove_lease(lease);
                        return;
                    }
                    Some(_) => continue,
                    None => return,
                }
            }
        });
    }
}

impl State {
    fn notify(&mut self, event: WatchEvent) {
        let key = match &event {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key } => key,
        };
        self.watchers
            .retain(|(prefix, tx)| !key.starts_with(prefix.as_str()) || tx.send(event.clone()).is_ok());
    }

    fn remove_lease(&mut self, lease: LeaseId) {
        self.leases.remove(&lease);
        let keys: Vec<String> = self
            .kvs
            .iter()
            .filter(|(_, (_, l))| *l == Some(lease))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.kvs.remove(&key);
            self.notify(WatchEvent::Delete { key });
        }
    }
}

#[async_trait]
impl Discovery for MemoryDiscovery {
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, DiscoveryError> {
        if ttl < Duration::from_secs(1) {
            return Err(DiscoveryError::InvalidTtl(ttl));
        }
        let lease = {
            let mut state = self.lock();
            state.next_lease += 1;
            let lease = LeaseId(state.next_lease);
            state.leases.insert(
                lease,
                LeaseState {
                    ttl,
                    deadline: Instant::now() + ttl,
                },
            );
            lease
        };
        self.spawn_reaper(lease);
        Ok(lease)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), DiscoveryError> {
        let mut state = self.lock();
        let l = state
            .leases
            .get_mut(&lease)
            .ok_or(DiscoveryError::LeaseNotFound(lease))?;
        l.deadline = Instant::now() + l.ttl;
        Ok(())
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), DiscoveryError> {
        let mut state = self.lock();
        if !state.leases.contains_key(&lease) {
            return Err(DiscoveryError::LeaseNotFound(lease));
        }
        state.remove_lease(lease);
        Ok(())
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<(), DiscoveryError> {
        let mut state = self.lock();
        if let Some(l) = lease {
            if !state.leases.contains_key(&l) {
                return Err(DiscoveryError::LeaseNotFound(l));
            }
        }
        state.kvs.insert(key.to_owned(), (value.clone(), lease));
        state.notify(WatchEvent::Put(KeyValue {
            key: key.to_owned(),
            value,
        }));
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), DiscoveryError> {
        let mut state = self.lock();
        if state.kvs.remove(key).is_some() {
            state.notify(WatchEvent::Delete { key: key.to_owned() });
        }
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>, DiscoveryError> {
        let state = self.lock();
        Ok(list_prefix(&state, prefix))
    }

    async fn watch(&self, prefix: &str) -> Result<Watch, DiscoveryError> {
        let (tx, rx) = mpsc::unbounded_channel();
        // Snapshot and subscription under one lock, so no change falls between them.
        let mut state = self.lock();
        let initial = list_prefix(&state, prefix);
        state.watchers.push((prefix.to_owned(), tx));
        Ok(Watch {
            initial,
            events: UnboundedReceiverStream::new(rx).boxed(),
        })
    }
}

fn list_prefix(state: &State, prefix: &str) -> Vec<KeyValue> {
    state
        .kvs
        .range(prefix.to_owned()..)
        .take_while(|(k, _)| k.starts_with(prefix))
        .map(|(k, (v, _))| KeyValue {
            key: k.clone(),
            value: v.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn lease_expires_without_keep_alive_and_watchers_see_it() {
        let d = MemoryDiscovery::new();
        let lease = d.grant_lease(Duration::from_secs(10)).await.unwrap();
        d.put("a/1", b"x".to_vec(), Some(lease)).await.unwrap();
        d.put("a/2", b"y".to_vec(), None).await.unwrap();
        d.put("b/1", b"z".to_vec(), Some(lease)).await.unwrap();
        let mut w = d.watch("a/").await.unwrap();
        assert_eq!(w.initial.len(), 2);

        tokio::time::sleep(Duration::from_secs(6)).await;
        d.keep_alive(lease).await.unwrap();
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(d.list("").await.unwrap().len(), 3, "kept alive at 6s, so alive at 12s");

        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(w.events.next().await, Some(WatchEvent::Delete { key: "a/1".into() }));
        let keys: Vec<_> = d.list("").await.unwrap().into_iter().map(|kv| kv.key).collect();
        assert_eq!(keys, ["a/2"]);
        assert!(matches!(
            d.keep_alive(lease).await,
            Err(DiscoveryError::LeaseNotFound(_))
        ));
    }

    #[tokio::test]
    async fn watch_sees_changes_under_prefix_only() {
        let d = MemoryDiscovery::new();
        let mut w = d.watch("p/").await.unwrap();
        d.put("q/1", vec![1], None).await.unwrap();
        d.put("p/1", vec![2], None).await.unwrap();
        d.delete("p/1").await.unwrap();
        d.delete("p/absent").await.unwrap();
        assert_eq!(
            w.events.next().await,
            Some(WatchEvent::Put(KeyValue {
                key: "p/1".into(),
                value: vec![2]
            }))
        );
        assert_eq!(w.events.next().await, Some(WatchEvent::Delete { key: "p/1".into() }));
    }

    #[tokio::test]
    async fn put_with_unknown_lease_is_rejected() {
        let d = MemoryDiscovery::new();
        assert!(d.put("k", vec![], Some(LeaseId(42))).await.is_err());
        assert!(d.list("").await.unwrap().is_empty());
        assert!(d.grant_lease(Duration::from_millis(10)).await.is_err());
    }
}
