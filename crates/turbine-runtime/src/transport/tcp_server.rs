//! The serving side of the TCP transport: one task reads each connection's frames, one task
//! per request drives its handler, and one task per connection writes, batching frames
//! into as few writes as the load allows.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{FutureExt, SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use super::wire::Frame;
use super::{cut_by_drain, unavailable_draining, ErrorKind, Handler, HandlerError, RequestContext, ServerState};

/// Frames waiting for a connection's writer; full means the peer reads slower than we
/// produce, and request tasks wait rather than buffer without bound.
const WRITE_QUEUE: usize = 1024;

pub(crate) struct TcpServer<Req, Resp> {
    pub(crate) instance: u64,
    pub(crate) handler: Arc<dyn Handler<Req, Resp>>,
    pub(crate) state: Arc<ServerState>,
    pub(crate) max_frame_len: usize,
    pub(crate) _types: PhantomData<fn(Req) -> Resp>,
}

impl<Req, Resp> TcpServer<Req, Resp>
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
{
    /// Accepts connections until `stop_accepting` fires; every connection then stays open
    /// until `close` fires, so that in-flight streams finish on the connection they began on.
    pub(crate) async fn run(self, listener: TcpListener, stop_accepting: CancellationToken, close: CancellationToken) {
        let this = Arc::new(self);
        loop {
            tokio::select! {
                _ = stop_accepting.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((socket, peer)) => {
                        let this = this.clone();
                        let close = close.clone();
                        tokio::spawn(async move { this.serve_connection(socket, peer, close).await });
                    }
                    Err(e) => {
                        // Running out of file descriptors is the usual cause; back off
                        // briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                },
            }
        }
    }

    async fn serve_connection(self: Arc<Self>, socket: TcpStream, peer: SocketAddr, close: CancellationToken) {
        if let Err(e) = socket.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "set_nodelay failed");
        }
        let (read, write) = socket.into_split();
        let codec = || {
            LengthDelimitedCodec::builder()
                .max_frame_length(self.max_frame_len)
                .new_codec()
        };
        let mut frames = FramedRead::with_capacity(read, codec(), 64 * 1024);
        let (tx, rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
        tokio::spawn(write_frames(FramedWrite::new(write, codec()), rx));

        let streams: Arc<Mutex<HashMap<u64, CancellationToken>>> = Arc::default();
        loop {
            let frame = tokio::select! {
                _ = close.cancelled() => break,
                frame = frames.next() => frame,
            };
            let body = match frame {
                None => break,
                Some(Ok(body)) => body,
                Some(Err(e)) => {
                    tracing::error!(%peer, error = %e, "bad frame, closing connection");
                    break;
                }
            };
            match Frame::decode(body.freeze()) {
                Ok(Frame::Request { stream, .. }) if lock(&streams).contains_key(&stream) => {
                    tracing::error!(%peer, stream, "stream id reused while in flight, closing connection");
                    break;
                }
                Ok(Frame::Request {
                    stream,
                    instance,
                    payload,
                }) => {
                    self.start_stream(stream, instance, payload, &streams, &tx);
                }
                Ok(Frame::Cancel { stream }) => {
                    if let Some(token) = lock(&streams).remove(&stream) {
                        token.cancel();
                    }
                }
                Ok(other) => {
                    tracing::error!(%peer, frame = ?other, "client sent a server frame, closing connection");
                    break;
                }
                Err(e) => {
                    tracing::error!(%peer, error = %e, "malformed frame, closing connection");
                    break;
                }
            }
        }
        // The peer is gone or misbehaved: nobody will read what its requests produce.
        for (_, token) in lock(&streams).drain() {
            token.cancel();
        }
    }

    fn start_stream(
        self: &Arc<Self>,
        stream: u64,
        instance: u64,
        payload: Bytes,
        streams: &Arc<Mutex<HashMap<u64, CancellationToken>>>,
        tx: &mpsc::Sender<Bytes>,
    ) {
        let tx = tx.clone();
        let Some(in_flight) = self.state.begin() else {
            tokio::spawn(async move { tx.send(error_frame(stream, &unavailable_draining())).await });
            return;
        };
        let token = self.state.request_token();
        lock(streams).insert(stream, token.clone());
        let this = self.clone();
        let streams = streams.clone();
        tokio::spawn(async move {
            let _in_flight = in_flight;
            let end = this.drive(stream, instance, payload, token, &tx).await;
            lock(&streams).remove(&stream);
            let _ = tx.send(end).await;
        });
    }

    /// Runs one request to its end and returns the frame that ends its stream.
    async fn drive(
        &self,
        stream: u64,
        instance: u64,
        payload: Bytes,
        token: CancellationToken,
        tx: &mpsc::Sender<Bytes>,
    ) -> Bytes {
        if instance != self.instance {
            let e = HandlerError::new(
                ErrorKind::Unavailable,
                format!("instance {instance:x} is not served here"),
            );
            return error_frame(stream, &e);
        }
        let request: Req = match serde_json::from_slice(&payload) {
            Ok(r) => r,
            Err(e) => return error_frame(stream, &HandlerError::new(ErrorKind::InvalidRequest, e.to_string())),
        };
        let ctx = RequestContext::new(token.clone());
        let mut responses = tokio::select! {
            biased;
            _ = token.cancelled() => return error_frame(stream, &self.cancelled()),
            r = self.handler.handle(request, ctx) => match r {
                Ok(s) => s,
                Err(e) => return error_frame(stream, &e),
            },
        };
        let mut item = tokio::select! {
            biased;
            _ = token.cancelled() => return error_frame(stream, &self.cancelled()),
            item = responses.next() => item,
        };
        loop {
            let resp = match item {
                None => return Frame::End { stream }.encode(),
                Some(Err(e)) => return error_frame(stream, &e),
                Some(Ok(resp)) => resp,
            };
            let payload: Bytes = match serde_json::to_vec(&resp) {
                Ok(body) if body.len() + 9 <= self.max_frame_len => body.into(),
                Ok(body) => {
                    let e = HandlerError::new(
                        ErrorKind::Internal,
                        format!("response of {} bytes exceeds the frame limit", body.len()),
                    );
                    return error_frame(stream, &e);
                }
                Err(e) => return error_frame(stream, &HandlerError::new(ErrorKind::Internal, e.to_string())),
            };
            // If the stream has already ended, say so on this frame instead of in an End
            // frame of its own.
            let next = responses.next().now_or_never();
            // A handler that ended because it was cancelled, not because it was done: this
            // output is not the last, and the stream ends as cancelled.
            let cut = matches!(next, Some(None)) && token.is_cancelled();
            if matches!(next, Some(None)) && !cut {
                return Frame::Data {
                    stream,
                    payload,
                    last: true,
                }
                .encode();
            }
            let sent = tx
                .send(
                    Frame::Data {
                        stream,
                        payload,
                        last: false,
                    }
                    .encode(),
                )
                .await
                .is_ok();
            if cut {
                return error_frame(stream, &self.cancelled());
            }
            if !sent {
                // The connection's writer is gone, so the client is too.
                token.cancel();
                return Frame::End { stream }.encode();
            }
            item = match next {
                Some(ready) => ready,
                None => tokio::select! {
                    biased;
                    _ = token.cancelled() => return error_frame(stream, &self.cancelled()),
                    item = responses.next() => item,
                },
            };
        }
    }
}

fn cancelled() -> HandlerError {
    HandlerError::new(ErrorKind::Cancelled, "request cancelled")
}

impl<Req, Resp> TcpServer<Req, Resp> {
    /// What a cancelled request's stream ends with: one cut by the end of a drain goes on
    /// elsewhere; one its caller cancelled ends.
    fn cancelled(&self) -> HandlerError {
        if self.state.cut_short() {
            cut_by_drain()
        } else {
            cancelled()
        }
    }
}

fn error_frame(stream: u64, e: &HandlerError) -> Bytes {
    // Serializing a struct of an enum and a String cannot fail.
    let payload = serde_json::to_vec(e).unwrap_or_default();
    Frame::Error {
        stream,
        payload: payload.into(),
    }
    .encode()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes queued frames, flushing only when the queue is momentarily empty so that a busy
/// connection sends many frames per system call.
pub(crate) async fn write_frames<W>(mut sink: FramedWrite<W, LengthDelimitedCodec>, mut rx: mpsc::Receiver<Bytes>)
where
    W: tokio::io::AsyncWrite + Unpin,
{
    while let Some(frame) = rx.recv().await {
        if sink.feed(frame).await.is_err() {
            return;
        }
        while let Ok(frame) = rx.try_recv() {
            if sink.feed(frame).await.is_err() {
                return;
            }
        }
        if SinkExt::<Bytes>::flush(&mut sink).await.is_err() {
            return;
        }
    }
}
