//! [`EndpointServer`]: one registered, served instance of an endpoint, from registration
//! through graceful shutdown.
//!
//! Shutdown runs in three phases: deregister (so that no caller picks this instance again),
//! stop accepting (new requests on open connections are refused as `Unavailable`, which
//! callers may retry elsewhere), then drain (in-flight requests run to their end within the
//! grace period; whatever is left after it is cancelled).

use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::discovery::{instance_key, DiscoveryError};
use crate::ids::{EndpointId, Instance, InstanceAddress, InstanceId};
use crate::registration::Registration;
use crate::runtime::Runtime;
use crate::transport::local::LocalEndpoint;
use crate::transport::tcp_server::TcpServer;
use crate::transport::{Handler, ServerState};

/// How an instance is reached.
#[derive(Debug, Clone)]
pub enum TransportOptions {
    /// Only from this process, with no serialization.
    Local,
    /// Over TCP. `bind` may use port 0; `advertise` is the address others dial, when it
    /// differs from the bound one (a wildcard bind, NAT).
    Tcp {
        bind: SocketAddr,
        advertise: Option<SocketAddr>,
    },
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub transport: TransportOptions,
    /// Registrations vanish this long after the process stops keeping them alive.
    pub lease_ttl: Duration,
    /// How long in-flight requests may run on after shutdown begins.
    pub grace_period: Duration,
    /// Stored with the instance for callers to read.
    pub metadata: serde_json::Value,
    /// The instance id to serve under; random when `None`. A process serving several
    /// endpoints gives them one id, so that callers can go from one to the others.
    pub instance_id: Option<InstanceId>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            transport: TransportOptions::Local,
            lease_ttl: Duration::from_secs(10),
            grace_period: Duration::from_secs(30),
            metadata: serde_json::Value::Null,
            instance_id: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot register with discovery")]
    Discovery(#[from] DiscoveryError),
}

/// A registered instance that serves requests until its shutdown future completes.
pub struct EndpointServer<Req, Resp> {
    runtime: Runtime,
    instance: Instance,
    state: Arc<ServerState>,
    registration: Option<Registration>,
    grace_period: Duration,
    stop_accepting: CancellationToken,
    close: CancellationToken,
    _types: PhantomData<fn(Req) -> Resp>,
}

impl<Req, Resp> std::fmt::Debug for EndpointServer<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointServer")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl<Req, Resp> EndpointServer<Req, Resp>
where
    Req: Serialize + DeserializeOwned + Send + 'static,
    Resp: Serialize + DeserializeOwned + Send + 'static,
{
    /// Starts serving `handler` and registers the instance; callers can reach it on return.
    pub async fn start(
        runtime: &Runtime,
        endpoint: EndpointId,
        handler: Arc<dyn Handler<Req, Resp>>,
        options: ServeOptions,
    ) -> Result<Self, ServeError> {
        let id = options.instance_id.unwrap_or_else(InstanceId::random);
        let state = Arc::new(ServerState::default());
        let stop_accepting = CancellationToken::new();
        let close = CancellationToken::new();

        let address = match options.transport {
            TransportOptions::Local => {
                runtime.inner.local.insert(
                    (endpoint.clone(), id),
                    LocalEndpoint {
                        handler,
                        state: state.clone(),
                    },
                );
                InstanceAddress::Local {
                    runtime_id: runtime.inner.id,
                }
            }
            TransportOptions::Tcp { bind, advertise } => {
                let listener = TcpListener::bind(bind)
                    .await
                    .map_err(|source| ServeError::Bind { addr: bind, source })?;
                let local = listener
                    .local_addr()
                    .map_err(|source| ServeError::Bind { addr: bind, source })?;
                let server = TcpServer {
                    instance: id.0,
                    handler,
                    state: state.clone(),
                    max_frame_len: runtime.inner.max_frame_len,
                    _types: PhantomData,
                };
                tokio::spawn(server.run(listener, stop_accepting.clone(), close.clone()));
                InstanceAddress::Tcp {
                    addr: advertise.unwrap_or(local),
                }
            }
        };
        let instance = Instance {
            endpoint,
            id,
            address,
            metadata: options.metadata,
        };

        let registration = Registration::start(runtime, options.lease_ttl).await?;
        let server = Self {
            runtime: runtime.clone(),
            instance,
            state,
            registration: Some(registration),
            grace_period: options.grace_period,
            stop_accepting,
            close,
            _types: PhantomData,
        };
        let value = serde_json::to_vec(&server.instance).unwrap_or_default();
        server
            .register(instance_key(&server.instance.endpoint, id), value)
            .await?;
        tracing::info!(endpoint = %server.instance.endpoint, instance = %id, address = ?server.instance.address, "serving");
        Ok(server)
    }
}

impl<Req, Resp> EndpointServer<Req, Resp> {
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// Requests admitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight()
    }

    /// Writes `key` bound to this instance's lease: it disappears when the instance does.
    pub async fn register(&self, key: String, value: Vec<u8>) -> Result<(), ServeError> {
        match &self.registration {
            Some(r) => Ok(r.put(key, value).await?),
            // Only after shutdown began, which takes `self`.
            None => Ok(()),
        }
    }

    /// Serves until `shutdown` completes, then deregisters, drains and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        shutdown.await;
        self.shutdown().await
    }

    async fn shutdown(mut self) {
        let id = self.instance.id;
        tracing::info!(instance = %id, in_flight = self.in_flight(), "shutting down: deregistering");
        if let Some(registration) = self.registration.take() {
            if let Err(e) = registration.revoke().await {
                // The lease will expire on its own within its TTL.
                tracing::warn!(instance = %id, error = %e, "revoking lease failed");
            }
        }
        self.state.start_draining();
        self.stop_accepting.cancel();
        if tokio::time::timeout(self.grace_period, self.state.idle())
            .await
            .is_err()
        {
            tracing::warn!(instance = %id, in_flight = self.in_flight(), "grace period over: cancelling the rest");
            self.state.cancel_all();
            // Cancelled handlers end at their next await; give them a moment to say so.
            let _ = tokio::time::timeout(Duration::from_secs(1), self.state.idle()).await;
        }
        self.close.cancel();
        self.runtime.inner.local.remove(&(self.instance.endpoint.clone(), id));
        tracing::info!(instance = %id, "stopped");
    }
}

impl<Req, Resp> Drop for EndpointServer<Req, Resp> {
    /// A server dropped without [`EndpointServer::run`] stops serving at once; its
    /// registrations expire with the lease, which is no longer kept alive.
    fn drop(&mut self) {
        self.stop_accepting.cancel();
        self.close.cancel();
        self.state.cancel_all();
        self.runtime
            .inner
            .local
            .remove(&(self.instance.endpoint.clone(), self.instance.id));
    }
}
