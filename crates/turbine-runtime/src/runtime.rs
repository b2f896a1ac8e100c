//! [`Runtime`]: the handle a process holds to discovery, the event plane and the request
//! plane, and [`Client`], which calls endpoint instances through it.

use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::discovery::Discovery;
use crate::events::EventPlane;
use crate::ids::{Instance, InstanceAddress};
use crate::transport::local::LocalRegistry;
use crate::transport::tcp_client::TcpPool;
use crate::transport::{RequestError, ResponseStream, DEFAULT_MAX_FRAME_LEN};

/// One per process (or per simulated process in tests). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) id: u64,
    pub(crate) discovery: Arc<dyn Discovery>,
    pub(crate) events: Arc<dyn EventPlane>,
    pub(crate) local: LocalRegistry,
    pub(crate) tcp: TcpPool,
    pub(crate) max_frame_len: usize,
}

impl Runtime {
    pub fn new(discovery: Arc<dyn Discovery>, events: Arc<dyn EventPlane>) -> Self {
        Self::with_max_frame_len(discovery, events, DEFAULT_MAX_FRAME_LEN)
    }

    /// `max_frame_len` bounds every TCP frame this runtime sends or accepts.
    pub fn with_max_frame_len(
        discovery: Arc<dyn Discovery>,
        events: Arc<dyn EventPlane>,
        max_frame_len: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                id: rand::random(),
                discovery,
                events,
                local: LocalRegistry::default(),
                tcp: TcpPool::new(max_frame_len),
                max_frame_len,
            }),
        }
    }

    pub fn discovery(&self) -> &Arc<dyn Discovery> {
        &self.inner.discovery
    }

    pub fn events(&self) -> &Arc<dyn EventPlane> {
        &self.inner.events
    }

    /// A client for endpoints that take `Req` and stream `Resp`.
    pub fn client<Req, Resp>(&self) -> Client<Req, Resp> {
        Client {
            runtime: self.clone(),
            _types: PhantomData,
        }
    }
}

/// Calls endpoint instances, choosing the transport from each instance's address.
pub struct Client<Req, Resp> {
    runtime: Runtime,
    _types: PhantomData<fn(Req) -> Resp>,
}

impl<Req, Resp> Clone for Client<Req, Resp> {
    fn clone(&self) -> Self {
        Self {
            runtime: self.runtime.clone(),
            _types: PhantomData,
        }
    }
}

impl<Req, Resp> std::fmt::Debug for Client<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("runtime", &self.runtime.inner.id)
            .finish()
    }
}

impl<Req, Resp> Client<Req, Resp>
where
    Req: Serialize + Send + 'static,
    Resp: DeserializeOwned + Send + 'static,
{
    /// Sends `request` to `instance`. Fails if the instance rejects it; otherwise returns
    /// its responses. Dropping the returned stream early cancels the request.
    pub async fn call(&self, instance: &Instance, request: Req) -> Result<ResponseStream<Resp>, RequestError> {
        match instance.address {
            InstanceAddress::Local { runtime_id } if runtime_id == self.runtime.inner.id => {
                self.runtime
                    .inner
                    .local
                    .call(&instance.endpoint, instance.id, request)
                    .await
            }
            InstanceAddress::Local { .. } => Err(RequestError::Unreachable { instance: instance.id }),
            InstanceAddress::Tcp { addr } => self.runtime.inner.tcp.call(addr, instance.id.0, &request).await,
        }
    }
}
