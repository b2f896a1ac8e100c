//! The calling side of the TCP transport: one multiplexed connection per peer address,
//! opened on first use and replaced when it breaks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use super::tcp_server::write_frames;
use super::wire::Frame;
use super::{HandlerError, RequestError, ResponseStream};

/// Connections to every peer this process calls.
#[derive(Debug)]
pub(crate) struct TcpPool {
    /// One slot per peer. The map's lock is held only to find a slot; a slot's own lock is
    /// held while connecting, so a slow peer delays only the callers of that peer.
    conns: Mutex<HashMap<SocketAddr, Arc<Slot>>>,
    max_frame_len: usize,
}

/// The connection to one peer, if one is open; locked while (re)connecting.
type Slot = tokio::sync::Mutex<Option<Arc<Connection>>>;

/// A peer that accepts no connection within this time is reported unreachable.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug)]
enum Incoming {
    Data(Bytes),
    End,
    Error(HandlerError),
}

#[derive(Debug)]
struct Connection {
    addr: SocketAddr,
    tx: mpsc::Sender<Bytes>,
    streams: Mutex<HashMap<u64, mpsc::UnboundedSender<Incoming>>>,
    next_stream: AtomicU64,
    closed: AtomicBool,
}

impl TcpPool {
    pub(crate) fn new(max_frame_len: usize) -> Self {
        Self {
            conns: Default::default(),
            max_frame_len,
        }
    }

    async fn connection(&self, addr: SocketAddr) -> Result<Arc<Connection>, RequestError> {
        let slot = lock(&self.conns).entry(addr).or_default().clone();
        let mut slot = slot.lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.closed.load(Ordering::Acquire) {
                return Ok(c.clone());
            }
        }
        let connect = |source| RequestError::Connect { addr, source };
        let socket = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| connect(std::io::ErrorKind::TimedOut.into()))?
            .map_err(connect)?;
        socket.set_nodelay(true).map_err(connect)?;
        let (read, write) = socket.into_split();
        let codec = || {
            LengthDelimitedCodec::builder()
                .max_frame_length(self.max_frame_len)
                .new_codec()
        };
        // Requests and cancels are small; this bound only stops a runaway caller.
        let (tx, rx) = mpsc::channel(4096);
        let conn = Arc::new(Connection {
            addr,
            tx,
            streams: Mutex::default(),
            next_stream: AtomicU64::new(1),
            closed: AtomicBool::new(false),
        });
        tokio::spawn(write_frames(FramedWrite::new(write, codec()), rx));
        tokio::spawn(read_frames(
            conn.clone(),
            FramedRead::with_capacity(read, codec(), 64 * 1024),
        ));
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Sends `request` to `instance` at `addr`; returns once the first response, the end or
    /// an error arrives, so that a rejected request fails here as it does in-process.
    pub(crate) async fn call<Req, Resp>(
        &self,
        addr: SocketAddr,
        instance: u64,
        request: &Req,
    ) -> Result<ResponseStream<Resp>, RequestError>
    where
        Req: Serialize,
        Resp: DeserializeOwned + Send + 'static,
    {
        let payload = serde_json::to_vec(request).map_err(RequestError::Encode)?;
        if payload.len() + 17 > self.max_frame_len {
            return Err(RequestError::TooLarge {
                len: payload.len() + 17,
                max: self.max_frame_len,
            });
        }
        let conn = self.connection(addr).await?;
        let stream = conn.next_stream.fetch_add(1, Ordering::Relaxed);
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        lock(&conn.streams).insert(stream, in_tx);
        // From here on, dropping the call (or the stream it returns) cancels the request.
        let mut rx = TcpResponses::<Resp> {
            conn: conn.clone(),
            stream,
            rx: in_rx,
            done: false,
            _t: Default::default(),
        };
        let frame = Frame::Request {
            stream,
            instance,
            payload: payload.into(),
        }
        .encode();
        if conn.tx.send(frame).await.is_err() {
            rx.done = true;
            return Err(RequestError::ConnectionLost { addr });
        }
        let first = match rx.next().await {
            Some(Err(e)) => return Err(e),
            other => other,
        };
        Ok(ResponseStream::new(futures::stream::iter(first).chain(rx).boxed()))
    }
}

async fn read_frames(
    conn: Arc<Connection>,
    mut frames: FramedRead<tokio::net::tcp::OwnedReadHalf, LengthDelimitedCodec>,
) {
    while let Some(frame) = frames.next().await {
        let frame = match frame
            .map_err(|e| e.to_string())
            .and_then(|b| Frame::decode(b.freeze()).map_err(|e| e.to_string()))
        {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(addr = %conn.addr, error = %e, "bad frame from server, closing connection");
                break;
            }
        };
        let (stream, incoming) = match frame {
            Frame::Data {
                stream,
                payload,
                last: true,
            } => {
                if let Some(tx) = lock(&conn.streams).remove(&stream) {
                    let _ = tx.send(Incoming::Data(payload));
                    let _ = tx.send(Incoming::End);
                }
                continue;
            }
            Frame::Data {
                stream,
                payload,
                last: false,
            } => (stream, Incoming::Data(payload)),
            Frame::End { stream } => (stream, Incoming::End),
            Frame::Error { stream, payload } => {
                let e = serde_json::from_slice(&payload).unwrap_or_else(|e| {
                    HandlerError::new(
                        super::ErrorKind::Internal,
                        format!("undecodable error from server: {e}"),
                    )
                });
                (stream, Incoming::Error(e))
            }
            other => {
                tracing::error!(addr = %conn.addr, frame = ?other, "server sent a client frame, closing connection");
                break;
            }
        };
        let mut streams = lock(&conn.streams);
        let last = !matches!(incoming, Incoming::Data(_));
        // A missing stream was cancelled by its caller; what is still in flight is dropped.
        if let Some(tx) = streams.get(&stream) {
            let _ = tx.send(incoming);
        }
        if last {
            streams.remove(&stream);
        }
    }
    conn.closed.store(true, Ordering::Release);
    // Dropping the senders tells every open stream that the connection is gone.
    lock(&conn.streams).clear();
}

struct TcpResponses<Resp> {
    conn: Arc<Connection>,
    stream: u64,
    rx: mpsc::UnboundedReceiver<Incoming>,
    done: bool,
    _t: std::marker::PhantomData<fn() -> Resp>,
}

impl<Resp: DeserializeOwned> Stream for TcpResponses<Resp> {
    type Item = Result<Resp, RequestError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let item = match futures::ready!(self.rx.poll_recv(cx)) {
            Some(Incoming::Data(bytes)) => {
                return Poll::Ready(Some(serde_json::from_slice(&bytes).map_err(RequestError::Decode)))
            }
            Some(Incoming::End) => None,
            Some(Incoming::Error(e)) => Some(Err(RequestError::Handler(e))),
            None => Some(Err(RequestError::ConnectionLost { addr: self.conn.addr })),
        };
        self.done = true;
        Poll::Ready(item)
    }
}

impl<Resp> Drop for TcpResponses<Resp> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        lock(&self.conn.streams).remove(&self.stream);
        let frame = Frame::Cancel { stream: self.stream }.encode();
        match self.conn.tx.try_send(frame) {
            Err(mpsc::error::TrySendError::Full(frame)) => {
                // Never lose a cancel: queue it behind the backlog. Outside a runtime there
                // is no writer left to queue on, and the closing connection cancels instead.
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    let tx = self.conn.tx.clone();
                    rt.spawn(async move { tx.send(frame).await });
                }
            }
            // Closed: the server cancels everything of a connection that goes away.
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
