//! The distributed runtime: how Turbine processes find each other and talk.
//!
//! - [`EndpointId`] names a served endpoint (`namespace/component/endpoint`); each process
//!   serving it is an [`Instance`] with a random [`InstanceId`].
//! - [`Discovery`] is a key-value store with leases and watches (etcd-shaped) where
//!   instances and model cards are registered; [`MemoryDiscovery`] serves one process,
//!   [`EtcdDiscovery`] a cluster.
//! - [`EventPlane`] is publish/subscribe by subject (NATS-shaped); [`MemoryEventPlane`]
//!   serves one process, [`NatsEventPlane`] a cluster.
//! - The request plane carries a request to an instance and streams responses back, either
//!   in-process (no serialization) or over TCP (length-delimited frames, one multiplexed
//!   connection per peer). Dropping a [`ResponseStream`] cancels the request where it runs.
//! - [`EndpointServer`] ties these together: it registers an instance, serves it, and on
//!   shutdown deregisters, stops accepting, drains within a grace period, then returns.
//!
//! Nothing here knows HTTP or LLMs.

mod discovery;
mod events;
mod ids;
mod registration;
mod runtime;
mod server;
mod transport;

pub use discovery::{
    instance_key, instance_prefix, Discovery, DiscoveryError, EtcdDiscovery, EtcdOptions, KeyValue, LeaseId,
    MemoryDiscovery, Watch, WatchEvent,
};
pub use events::{Event, EventPlane, EventPlaneError, MemoryEventPlane, NatsEventPlane, NatsOptions, Subscription};
pub use ids::{EndpointId, Instance, InstanceAddress, InstanceId, ParseEndpointError};
pub use registration::Registration;
pub use runtime::{Client, Runtime};

/// `outer: inner: root`: an error with every source it keeps, for messages a person reads.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
pub use server::{EndpointServer, ServeError, ServeOptions, TransportOptions};
pub use transport::{
    ErrorKind, Handler, HandlerError, RequestContext, RequestError, ResponseStream, DEFAULT_MAX_FRAME_LEN,
};
