//! Discovery backed by an etcd v3 cluster: the store that processes on several machines share.
//!
//! Leases, puts and ranges map one to one onto etcd requests. A watch is a prefix range read
//! at revision R, then an etcd watch from R + 1, driven by a task that re-establishes it
//! after connection loss and resynchronises when the revision it needs has been compacted.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use turbine_etcd::proto::{
    DeleteRangeRequest, EventType, LeaseGrantRequest, LeaseRevokeRequest, PutRequest, RangeRequest, SortOrder,
    SortTarget, WatchCreateRequest, WatchResponse,
};
use turbine_etcd::{prefix_end, Client, Code, ConnectOptions};

use super::{Discovery, DiscoveryError, KeyValue, LeaseId, Watch, WatchEvent};
use crate::error_chain;

/// How an [`EtcdDiscovery`] talks to etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdOptions {
    /// How long [`EtcdDiscovery::connect`] waits for etcd to answer.
    pub connect_timeout: Duration,
    /// How long one request may wait for etcd's answer.
    pub request_timeout: Duration,
    /// The first pause before re-establishing a broken watch; it doubles on every failure.
    pub watch_retry_min: Duration,
    /// The longest pause between attempts to re-establish a watch.
    pub watch_retry_max: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            watch_retry_min: Duration::from_millis(100),
            watch_retry_max: Duration::from_secs(5),
        }
    }
}

/// Discovery in etcd. Cloning shares the connection.
#[derive(Clone)]
pub struct EtcdDiscovery {
    client: Client,
    options: EtcdOptions,
}

impl std::fmt::Debug for EtcdDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdDiscovery")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl EtcdDiscovery {
    /// Connects to the etcd cluster at `endpoints` (`http://host:port`) and checks that it
    /// answers within `options.connect_timeout`.
    pub async fn connect(endpoints: &[String], options: EtcdOptions) -> Result<Self, DiscoveryError> {
        let unreachable = |source| {
            DiscoveryError::Unavailable(Box::new(EtcdError::Unreachable {
                endpoints: endpoints.join(","),
                source,
            }))
        };
        let connect_options = ConnectOptions {
            connect_timeout: options.connect_timeout,
            // Pings find a dead connection under an open watch; etcd refuses pings more often
            // than every 5 s by default.
            keep_alive_interval: Duration::from_secs(10),
            keep_alive_timeout: options.request_timeout,
        };
        let client = Client::new(endpoints, &connect_options).map_err(unreachable)?;
        let this = Self { client, options };
        // The client connects lazily, so only a request tells whether etcd is there. Any key
        // will do (etcd rejects an empty one); reading it needs a leader, so an answer means
        // etcd can serve requests.
        let probe = this.client.range(RangeRequest {
            key: b"turbine".to_vec(),
            count_only: true,
            ..RangeRequest::default()
        });
        match tokio::time::timeout(this.options.connect_timeout, probe).await {
            Ok(Ok(_)) => Ok(this),
            Ok(Err(e)) => Err(unreachable(e)),
            Err(_) => Err(DiscoveryError::Unavailable(Box::new(EtcdError::ConnectTimeout {
                endpoints: endpoints.join(","),
                timeout: this.options.connect_timeout,
            }))),
        }
    }

    /// Waits at most `request_timeout` for `call`: while no connection to etcd can be made,
    /// the client would otherwise wait for one indefinitely.
    async fn request<T>(
        &self,
        lease: Option<LeaseId>,
        call: impl Future<Output = Result<T, turbine_etcd::Error>>,
    ) -> Result<T, DiscoveryError> {
        match tokio::time::timeout(self.options.request_timeout, call).await {
            Ok(result) => result.map_err(|e| classify(lease, e)),
            Err(_) => Err(self.timed_out()),
        }
    }

    fn timed_out(&self) -> DiscoveryError {
        DiscoveryError::Unavailable(Box::new(EtcdError::Timeout(self.options.request_timeout)))
    }

    /// The keys under `prefix`, sorted, and the store revision they were read at.
    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), DiscoveryError> {
        let request = RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
            sort_order: SortOrder::Ascend as i32,
            sort_target: SortTarget::Key as i32,
            ..RangeRequest::default()
        };
        let response = self.request(None, self.client.range(request)).await?;
        let revision = response.header.map_or(0, |h| h.revision);
        let kvs = response
            .kvs
            .into_iter()
            .filter_map(|kv| {
                Some(KeyValue {
                    key: utf8_key(&kv.key)?.to_owned(),
                    value: kv.value,
                })
            })
            .collect();
        Ok((kvs, revision))
    }
}

#[async_trait]
impl Discovery for EtcdDiscovery {
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, DiscoveryError> {
        if ttl < Duration::from_secs(1) {
            return Err(DiscoveryError::InvalidTtl(ttl));
        }
        // etcd counts whole seconds; rounding up never expires a lease earlier than asked.
        let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let seconds = i64::try_from(seconds).map_err(|_| DiscoveryError::InvalidTtl(ttl))?;
        let request = LeaseGrantRequest { ttl: seconds, id: 0 };
        let response = self.request(None, self.client.lease_grant(request)).await?;
        if !response.error.is_empty() {
            return Err(unavailable(EtcdError::Refused(response.error)));
        }
        Ok(LeaseId(response.id))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), DiscoveryError> {
        let response = self.request(Some(lease), self.client.lease_keep_alive(lease.0)).await?;
        // etcd answers a keep-alive for a lease it does not have (expired or revoked) with
        // TTL 0 rather than an error.
        if response.ttl <= 0 {
            return Err(DiscoveryError::LeaseNotFound(lease));
        }
        Ok(())
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), DiscoveryError> {
        let request = LeaseRevokeRequest { id: lease.0 };
        self.request(Some(lease), self.client.lease_revoke(request)).await?;
        Ok(())
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<(), DiscoveryError> {
        let request = PutRequest {
            key: key.as_bytes().to_vec(),
            value,
            lease: lease.map_or(0, |l| l.0),
        };
        self.request(lease, self.client.put(request)).await?;
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<(), DiscoveryError> {
        let request = DeleteRangeRequest {
            key: key.as_bytes().to_vec(),
            range_end: Vec::new(),
        };
        self.request(None, self.client.delete_range(request)).await?;
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<KeyValue>, DiscoveryError> {
        Ok(self.range(prefix).await?.0)
    }

    async fn watch(&self, prefix: &str) -> Result<Watch, DiscoveryError> {
        let (initial, revision) = self.range(prefix).await?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let watcher = Watcher {
            discovery: self.clone(),
            prefix: prefix.to_owned(),
            known: initial.iter().map(|kv| (kv.key.clone(), kv.value.clone())).collect(),
            next_revision: revision + 1,
            tx,
            retry: self.options.watch_retry_min,
        };
        tokio::spawn(watcher.run());
        Ok(Watch {
            initial,
            events: ReceiverStream::new(rx).boxed(),
        })
    }
}

/// Why etcd could not be used; carried as the source of [`DiscoveryError::Unavailable`].
#[derive(Debug, thiserror::Error)]
enum EtcdError {
    #[error("cannot reach etcd at {endpoints}")]
    Unreachable {
        endpoints: String,
        #[source]
        source: turbine_etcd::Error,
    },
    #[error("etcd at {endpoints} did not answer within {timeout:?}")]
    ConnectTimeout { endpoints: String, timeout: Duration },
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("etcd refused: {0}")]
    Refused(String),
}

/// Events a watcher may hold before it stops reading etcd; etcd then holds the backlog (or
/// compacts past it, which the watcher survives by resynchronising).
const WATCH_BUFFER: usize = 1024;

/// Drives one watch: owns what its receiver has been told, so that it can resume after any
/// break without a gap or a repeat.
struct Watcher {
    discovery: EtcdDiscovery,
    prefix: String,
    /// The state under the prefix as the receiver knows it.
    known: BTreeMap<String, Vec<u8>>,
    /// The first revision the receiver has not seen.
    next_revision: i64,
    tx: mpsc::Sender<WatchEvent>,
    retry: Duration,
}

/// Why a watch stream stopped.
enum Break {
    /// The receiver is gone: nothing more to do.
    Closed,
    /// The revision to resume from is compacted away: read the prefix afresh.
    Compacted,
    /// etcd or the connection failed or ended the stream: resume where we left off.
    Lost(String),
}

impl Watcher {
    async fn run(mut self) {
        loop {
            let reason = match self.follow().await {
                Break::Closed => return,
                Break::Compacted => match self.resync().await {
                    Ok(()) => continue,
                    Err(Break::Closed) => return,
                    Err(Break::Lost(reason)) => reason,
                    Err(Break::Compacted) => "compacted while resynchronising".to_owned(),
                },
                Break::Lost(reason) => reason,
            };
            let pause = rand::thread_rng().gen_range(self.retry / 2..=self.retry);
            tracing::warn!(
                prefix = %self.prefix,
                revision = self.next_revision,
                reason = %reason,
                retry_in = ?pause,
                "etcd watch broken; re-establishing"
            );
            tokio::select! {
                () = self.tx.closed() => return,
                () = tokio::time::sleep(pause) => {}
            }
            self.retry = self.retry.saturating_mul(2).min(self.discovery.options.watch_retry_max);
        }
    }

    /// Watches from `next_revision` and forwards events until the stream breaks.
    async fn follow(&mut self) -> Break {
        let request = WatchCreateRequest {
            key: self.prefix.as_bytes().to_vec(),
            range_end: prefix_end(self.prefix.as_bytes()),
            start_revision: self.next_revision,
        };
        let mut stream = tokio::select! {
            () = self.tx.closed() => return Break::Closed,
            stream = self.discovery.request(None, self.discovery.client.watch(request)) => {
                match stream {
                    Ok(stream) => stream,
                    Err(e) => return Break::Lost(error_chain(&e)),
                }
            }
        };
        loop {
            let message = tokio::select! {
                () = self.tx.closed() => return Break::Closed,
                message = stream.message() => message,
            };
            let response = match message {
                Ok(Some(response)) => response,
                Ok(None) => return Break::Lost("etcd ended the watch stream".to_owned()),
                Err(e) => return Break::Lost(error_chain(&e)),
            };
            if response.compact_revision > 0 {
                tracing::info!(
                    prefix = %self.prefix,
                    revision = self.next_revision,
                    compacted = response.compact_revision,
                    "etcd watch revision compacted; resynchronising"
                );
                return Break::Compacted;
            }
            if response.canceled {
                return Break::Lost(format!("etcd cancelled the watch: {}", response.cancel_reason));
            }
            if response.created && self.retry > self.discovery.options.watch_retry_min {
                tracing::info!(prefix = %self.prefix, revision = self.next_revision, "etcd watch re-established");
            }
            self.retry = self.discovery.options.watch_retry_min;
            if let Err(closed) = self.forward(&response).await {
                return closed;
            }
        }
    }

    /// Passes one response's events on, in order.
    async fn forward(&mut self, response: &WatchResponse) -> Result<(), Break> {
        for event in &response.events {
            let Some(kv) = &event.kv else { continue };
            // Every event of a revision arrives in one response, so resuming after the last
            // one seen never splits a transaction.
            self.next_revision = self.next_revision.max(kv.mod_revision + 1);
            let Some(key) = utf8_key(&kv.key) else { continue };
            let event = match event.r#type() {
                EventType::Put => {
                    self.known.insert(key.to_owned(), kv.value.clone());
                    WatchEvent::Put(KeyValue {
                        key: key.to_owned(),
                        value: kv.value.clone(),
                    })
                }
                EventType::Delete => {
                    self.known.remove(key);
                    WatchEvent::Delete { key: key.to_owned() }
                }
            };
            self.tx.send(event).await.map_err(|_| Break::Closed)?;
        }
        Ok(())
    }

    /// Reads the prefix afresh and tells the receiver how it differs from what it knows.
    async fn resync(&mut self) -> Result<(), Break> {
        let (kvs, revision) = tokio::select! {
            () = self.tx.closed() => return Err(Break::Closed),
            range = self.discovery.range(&self.prefix) => range.map_err(|e| Break::Lost(error_chain(&e)))?,
        };
        let now: BTreeMap<String, Vec<u8>> = kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
        let mut events = Vec::new();
        for (key, value) in &now {
            if self.known.get(key) != Some(value) {
                events.push(WatchEvent::Put(KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                }));
            }
        }
        for key in self.known.keys() {
            if !now.contains_key(key) {
                events.push(WatchEvent::Delete { key: key.clone() });
            }
        }
        self.known = now;
        self.next_revision = revision + 1;
        for event in events {
            self.tx.send(event).await.map_err(|_| Break::Closed)?;
        }
        Ok(())
    }
}

/// The key as text; keys that are not UTF-8 were not written through [`Discovery`] and are
/// skipped rather than failing every reader of the prefix.
fn utf8_key(key: &[u8]) -> Option<&str> {
    match std::str::from_utf8(key) {
        Ok(key) => Some(key),
        Err(_) => {
            tracing::warn!(key = ?String::from_utf8_lossy(key), "skipping etcd key that is not UTF-8");
            None
        }
    }
}

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> DiscoveryError {
    DiscoveryError::Unavailable(Box::new(e))
}

/// etcd answers NOT_FOUND for a request naming a lease it does not have, and for nothing
/// else that [`Discovery`] sends.
fn classify(lease: Option<LeaseId>, e: turbine_etcd::Error) -> DiscoveryError {
    match (e.code(), lease) {
        (Some(Code::NotFound), Some(lease)) => DiscoveryError::LeaseNotFound(lease),
        _ => unavailable(e),
    }
}
