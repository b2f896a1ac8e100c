//! A small etcd v3 client over gRPC: key ranges, puts, deletes, leases, watches, compaction.
//!
//! It exists so that building Turbine needs no `protoc`: the messages are declared by hand in
//! [`proto`] and sent with tonic's generic gRPC client, so nothing is generated at build
//! time and nothing on the machine's `PATH` can change what is built. It knows nothing of
//! Turbine; `turbine-runtime`'s etcd discovery is written on top of it.
//!
//! Every call is a single attempt with no timeout of its own: callers decide how long to
//! wait and whether to retry.

pub mod proto;

use std::time::Duration;

use http::uri::PathAndQuery;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::client::Grpc;
use tonic::transport::{Channel, Endpoint};
use tonic::{Status, Streaming};
use tonic_prost::ProstCodec;

use proto::*;

/// gRPC status codes, as [`Error::code`] reports them.
pub use tonic::Code;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid etcd endpoint {endpoint:?}")]
    InvalidEndpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("no etcd endpoint given")]
    NoEndpoints,
    /// The connection could not be made or was lost before the call was sent.
    #[error("cannot connect to etcd")]
    Connect(#[source] tonic::transport::Error),
    /// etcd, or the connection under the call, answered with a gRPC error.
    #[error("etcd answered {}: {}", .0.code(), .0.message())]
    Status(#[source] Status),
    #[error("etcd closed the {0} stream without answering")]
    StreamClosed(&'static str),
}

impl Error {
    /// The gRPC code etcd answered with, if it answered.
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Status(status) => Some(status.code()),
            _ => None,
        }
    }
}

/// How the client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectOptions {
    /// How long opening a TCP connection to one endpoint may take.
    pub connect_timeout: Duration,
    /// How often HTTP/2 pings an open connection, which is how a dead connection under a
    /// long-lived watch is noticed. etcd refuses pings more often than every 5 s by default.
    pub keep_alive_interval: Duration,
    /// How long a ping may go unanswered before the connection is dropped.
    pub keep_alive_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            keep_alive_interval: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(5),
        }
    }
}

/// A client of one etcd cluster; cloning shares the connections.
#[derive(Clone, Debug)]
pub struct Client {
    channel: Channel,
}

/// The end of a key range holding every key that starts with `prefix`, as etcd expects in
/// `range_end`: the prefix with its last byte below 0xff incremented and the rest dropped.
/// A prefix of only 0xff bytes (or none) has no such end; `[0]` then means "to the last key".
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Client {
    /// A client of the cluster at `endpoints` (`http://host:port`, or `host:port`), spreading
    /// calls over them. Connections are made lazily: only a call tells whether etcd is there.
    /// Must be called within a Tokio runtime.
    pub fn new(endpoints: &[String], options: &ConnectOptions) -> Result<Self, Error> {
        let endpoints = endpoints
            .iter()
            .map(|endpoint| {
                let url = if endpoint.contains("://") {
                    endpoint.clone()
                } else {
                    format!("http://{endpoint}")
                };
                Endpoint::from_shared(url)
                    .map(|e| {
                        e.connect_timeout(options.connect_timeout)
                            .http2_keep_alive_interval(options.keep_alive_interval)
                            .keep_alive_timeout(options.keep_alive_timeout)
                    })
                    .map_err(|source| Error::InvalidEndpoint {
                        endpoint: endpoint.clone(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(Error::NoEndpoints);
        }
        Ok(Self {
            channel: Channel::balance_list(endpoints.into_iter()),
        })
    }

    async fn grpc(&self) -> Result<Grpc<Channel>, Error> {
        let mut grpc = Grpc::new(self.channel.clone());
        grpc.ready().await.map_err(Error::Connect)?;
        Ok(grpc)
    }

    async fn unary<Req, Resp>(&self, path: &'static str, request: Req) -> Result<Resp, Error>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let response = self
            .grpc()
            .await?
            .unary(
                tonic::Request::new(request),
                PathAndQuery::from_static(path),
                ProstCodec::<Req, Resp>::default(),
            )
            .await
            .map_err(Error::Status)?;
        Ok(response.into_inner())
    }

    /// Opens a bidirectional stream whose requests come from the returned sender.
    async fn bidi<Req, Resp>(
        &self,
        path: &'static str,
        first: Req,
    ) -> Result<(mpsc::Sender<Req>, Streaming<Resp>), Error>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        let (tx, rx) = mpsc::channel(4);
        // The channel is empty and its receiver alive: this cannot fail.
        let _ = tx.try_send(first);
        let response = self
            .grpc()
            .await?
            .streaming(
                tonic::Request::new(ReceiverStream::new(rx)),
                PathAndQuery::from_static(path),
                ProstCodec::<Req, Resp>::default(),
            )
            .await
            .map_err(Error::Status)?;
        Ok((tx, response.into_inner()))
    }

    pub async fn range(&self, request: RangeRequest) -> Result<RangeResponse, Error> {
        self.unary("/etcdserverpb.KV/Range", request).await
    }

    pub async fn put(&self, request: PutRequest) -> Result<PutResponse, Error> {
        self.unary("/etcdserverpb.KV/Put", request).await
    }

    pub async fn delete_range(&self, request: DeleteRangeRequest) -> Result<DeleteRangeResponse, Error> {
        self.unary("/etcdserverpb.KV/DeleteRange", request).await
    }

    pub async fn compact(&self, request: CompactionRequest) -> Result<CompactionResponse, Error> {
        self.unary("/etcdserverpb.KV/Compact", request).await
    }

    pub async fn lease_grant(&self, request: LeaseGrantRequest) -> Result<LeaseGrantResponse, Error> {
        self.unary("/etcdserverpb.Lease/LeaseGrant", request).await
    }

    /// Revokes a lease, deleting every key attached to it. etcd answers `NotFound` for a
    /// lease it does not have.
    pub async fn lease_revoke(&self, request: LeaseRevokeRequest) -> Result<LeaseRevokeResponse, Error> {
        self.unary("/etcdserverpb.Lease/LeaseRevoke", request).await
    }

    pub async fn lease_time_to_live(&self, request: LeaseTimeToLiveRequest) -> Result<LeaseTimeToLiveResponse, Error> {
        self.unary("/etcdserverpb.Lease/LeaseTimeToLive", request).await
    }

    /// Refreshes a lease once and returns etcd's answer, whose `ttl` is 0 when etcd has no
    /// such lease. etcd offers keep-alive only as a stream; this opens one for the single
    /// exchange, which suits a caller that refreshes every few seconds.
    pub async fn lease_keep_alive(&self, id: i64) -> Result<LeaseKeepAliveResponse, Error> {
        let (_requests, mut responses) = self
            .bidi::<_, LeaseKeepAliveResponse>("/etcdserverpb.Lease/LeaseKeepAlive", LeaseKeepAliveRequest { id })
            .await?;
        responses
            .message()
            .await
            .map_err(Error::Status)?
            .ok_or(Error::StreamClosed("lease keep-alive"))
    }

    /// Starts a watch. Its first response confirms the creation (`created`), or says the
    /// start revision is compacted (`compact_revision`); events follow in revision order.
    pub async fn watch(&self, request: WatchCreateRequest) -> Result<WatchStream, Error> {
        let (requests, responses) = self
            .bidi(
                "/etcdserverpb.Watch/Watch",
                WatchRequest {
                    create_request: Some(request),
                },
            )
            .await?;
        Ok(WatchStream {
            _requests: requests,
            responses,
        })
    }
}

/// An open watch; dropping it closes the stream, which ends the watch on etcd.
#[derive(Debug)]
pub struct WatchStream {
    // Held so the request side stays open: the watch lives as long as the stream does.
    _requests: mpsc::Sender<WatchRequest>,
    responses: Streaming<WatchResponse>,
}

impl WatchStream {
    /// The next response; `None` when etcd ended the stream.
    pub async fn message(&mut self) -> Result<Option<WatchResponse>, Error> {
        self.responses.message().await.map_err(Error::Status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_covers_exactly_the_prefix() {
        assert_eq!(prefix_end(b"turbine/"), b"turbine0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), [0]);
        assert_eq!(prefix_end(b""), [0]);
    }

    #[tokio::test]
    async fn endpoints_are_checked_before_any_connection() {
        let err = Client::new(&["http://bad host:1".to_owned()], &ConnectOptions::default()).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidEndpoint { endpoint, .. } if endpoint == "http://bad host:1"),
            "{err:?}"
        );
        assert!(matches!(
            Client::new(&[], &ConnectOptions::default()),
            Err(Error::NoEndpoints)
        ));
        // A bare host:port is taken as plain HTTP, as etcdctl does.
        assert!(Client::new(&["127.0.0.1:2379".to_owned()], &ConnectOptions::default()).is_ok());
    }
}
