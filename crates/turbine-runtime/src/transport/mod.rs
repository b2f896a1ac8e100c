//! The request plane: the contract between a caller and a handler, and its two transports.
//!
//! One contract, two transports: a [`Handler`] never knows whether its caller is in the
//! same process ([`local`], values passed as they are) or behind a TCP connection ([`tcp`],
//! JSON payloads in length-delimited frames). In both, a handler that rejects a request
//! makes the call fail with [`RequestError::Handler`], and dropping the
//! [`ResponseStream`] cancels the handler's [`RequestContext`].

pub(crate) mod local;
pub(crate) mod tcp_client;
pub(crate) mod tcp_server;
pub(crate) mod wire;

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Largest frame either side accepts; a peer that sends more loses its connection.
pub const DEFAULT_MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// Serves one endpoint: takes a request and returns the stream of its responses.
#[async_trait]
pub trait Handler<Req, Resp>: Send + Sync + 'static {
    async fn handle(
        &self,
        request: Req,
        ctx: RequestContext,
    ) -> Result<BoxStream<'static, Result<Resp, HandlerError>>, HandlerError>;
}

/// What a handler knows about the request it serves.
#[derive(Debug, Clone)]
pub struct RequestContext {
    cancel: CancellationToken,
}

impl RequestContext {
    pub(crate) fn new(cancel: CancellationToken) -> Self {
        Self { cancel }
    }

    /// Completes when the caller has gone away or the server gave up draining.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// A token to hand to work that outlives this context's borrow.
    pub fn token(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

/// How a request failed, decided where it failed; travels over the wire unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request itself is wrong; retrying elsewhere will not help.
    InvalidRequest,
    /// This instance cannot take it now (draining, overloaded); another instance may.
    Unavailable,
    /// The request was cancelled before it completed.
    Cancelled,
    /// The handler failed.
    Internal,
}

/// An error a handler returns, which its caller receives as it was sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct HandlerError {
    pub kind: ErrorKind,
    pub message: String,
}

impl HandlerError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// Why a call failed, as the caller sees it.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Handler(#[from] HandlerError),
    #[error("instance {instance} lives in another process and has no network address")]
    Unreachable { instance: crate::InstanceId },
    #[error("no local handler for instance {instance} with these request and response types")]
    NoLocalHandler { instance: crate::InstanceId },
    #[error("cannot connect to {addr}")]
    Connect {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to {addr} lost before the response ended")]
    ConnectionLost { addr: std::net::SocketAddr },
    #[error("request is {len} bytes encoded, over the {max}-byte frame limit")]
    TooLarge { len: usize, max: usize },
    #[error("cannot encode request")]
    Encode(#[source] serde_json::Error),
    #[error("cannot decode response")]
    Decode(#[source] serde_json::Error),
}

impl RequestError {
    /// True when sending the same request to another instance may succeed.
    pub fn is_retryable_elsewhere(&self) -> bool {
        match self {
            RequestError::Handler(e) => e.kind == ErrorKind::Unavailable,
            RequestError::Connect { .. } | RequestError::ConnectionLost { .. } => true,
            _ => false,
        }
    }
}

/// The responses of one call. Dropping it before it ends cancels the request.
pub struct ResponseStream<T> {
    inner: Responses<T>,
}

/// The local transport's stream is held inline rather than boxed once more: every output
/// of an in-process call goes through it, and each box is one more pointer to chase.
enum Responses<T> {
    Remote(BoxStream<'static, Result<T, RequestError>>),
    Local(local::Guarded<BoxStream<'static, Result<T, HandlerError>>>),
}

impl<T> ResponseStream<T> {
    pub(crate) fn new(inner: BoxStream<'static, Result<T, RequestError>>) -> Self {
        Self {
            inner: Responses::Remote(inner),
        }
    }

    pub(crate) fn local(inner: local::Guarded<BoxStream<'static, Result<T, HandlerError>>>) -> Self {
        Self {
            inner: Responses::Local(inner),
        }
    }
}

impl<T> std::fmt::Debug for ResponseStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseStream").finish_non_exhaustive()
    }
}

impl<T> Stream for ResponseStream<T> {
    type Item = Result<T, RequestError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match &mut self.inner {
            Responses::Remote(s) => s.as_mut().poll_next(cx),
            Responses::Local(s) => Pin::new(s).poll_next(cx),
        }
    }
}

/// What a server knows of its requests, shared by both transports: how many are in flight,
/// whether it still takes new ones, and the token that cancels them all.
#[derive(Debug, Default)]
pub(crate) struct ServerState {
    in_flight: AtomicUsize,
    idle: Notify,
    draining: AtomicBool,
    cancel_all: CancellationToken,
}

impl ServerState {
    /// Admits a request, or refuses it once draining has begun.
    pub(crate) fn begin(self: &Arc<Self>) -> Option<InFlightGuard> {
        // Count first, then check, so that drain() never sees zero while a request is
        // between its admission check and its count.
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlightGuard { state: self.clone() };
        if self.draining.load(Ordering::SeqCst) {
            return None;
        }
        Some(guard)
    }

    pub(crate) fn request_token(&self) -> CancellationToken {
        self.cancel_all.child_token()
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Waits until no request is in flight.
    pub(crate) async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    pub(crate) fn cancel_all(&self) {
        self.cancel_all.cancel();
    }

    /// Whether the end of a drain cut the requests short (rather than their callers
    /// cancelling them).
    pub(crate) fn cut_short(&self) -> bool {
        self.cancel_all.is_cancelled()
    }
}

/// Counts a request as in flight until dropped.
#[derive(Debug)]
pub(crate) struct InFlightGuard {
    state: Arc<ServerState>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.state.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.state.idle.notify_waiters();
        }
    }
}

/// What a request cut by the end of a drain's grace period ends with: `Unavailable`, so that
/// its caller carries it on elsewhere (a frontend migrates it with the tokens it has) and a
/// scale-down aborts nothing.
pub(crate) fn cut_by_drain() -> HandlerError {
    HandlerError::new(
        ErrorKind::Unavailable,
        "the instance drained and its grace period ended: continue elsewhere",
    )
}

pub(crate) fn unavailable_draining() -> HandlerError {
    HandlerError::new(ErrorKind::Unavailable, "instance is shutting down")
}
