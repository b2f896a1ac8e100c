//! A minimal ZeroMQ client (ZMTP 3.0, NULL security) over Tokio: the SUB and DEALER sides
//! that reading an engine's KV event stream and asking for its replay need, without libzmq.
//!
//! The wire format is <https://rfc.zeromq.org/spec/23/>: a 64-byte greeting each way, a
//! READY command each way naming the socket types, then frames (a flags byte, a 1- or 8-byte
//! size, the body) grouped into messages by their MORE flag.

use std::io;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The largest frame, and message, accepted: an engine's batch is far smaller, and a peer
/// must not make us buffer without bound.
pub(crate) const MAX_MESSAGE: u64 = 256 << 20;

/// Which end of a ZeroMQ pattern this client plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SocketType {
    Sub,
    Dealer,
}

impl SocketType {
    fn name(self) -> &'static str {
        match self {
            SocketType::Sub => "SUB",
            SocketType::Dealer => "DEALER",
        }
    }

    /// The peers this socket may talk to; only those the engines bind are accepted.
    fn accepts(self, peer: &[u8]) -> bool {
        match self {
            SocketType::Sub => peer == b"PUB" || peer == b"XPUB",
            SocketType::Dealer => peer == b"ROUTER",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ZmtpError {
    #[error("ZeroMQ endpoint must be tcp://HOST:PORT, got {0:?}")]
    Endpoint(String),
    #[error("cannot connect to {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: io::Error,
    },
    #[error("ZeroMQ connection failed")]
    Io(#[from] io::Error),
    #[error("the peer does not speak ZMTP 3 (greeting starts {0:02x?})")]
    NotZmtp([u8; 12]),
    #[error("the peer uses security mechanism {0:?}, only NULL is supported")]
    Mechanism(String),
    #[error("a {ours} socket cannot talk to a {peer:?} socket")]
    SocketType { ours: &'static str, peer: String },
    #[error("the peer sent a message of {size} bytes or more, the limit is {MAX_MESSAGE}")]
    TooLarge { size: u64 },
    #[error("the peer sent a malformed {0}")]
    Malformed(&'static str),
    #[error("the peer refused the connection: {0}")]
    Refused(String),
}

/// One ZMTP connection, after its handshake.
pub(crate) struct Socket<S> {
    io: BufReader<S>,
}

impl Socket<TcpStream> {
    /// Connects to `tcp://HOST:PORT` and does the handshake.
    pub(crate) async fn connect(endpoint: &str, socket_type: SocketType) -> Result<Self, ZmtpError> {
        let address = tcp_address(endpoint)?;
        let stream = TcpStream::connect(address.as_str())
            .await
            .map_err(|source| ZmtpError::Connect {
                endpoint: endpoint.to_owned(),
                source,
            })?;
        // Batches are sent as they come: no point in holding small writes back.
        stream.set_nodelay(true)?;
        Self::handshake(stream, socket_type).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Socket<S> {
    /// Greets the peer over `io` and exchanges READY commands with it.
    pub(crate) async fn handshake(io: S, socket_type: SocketType) -> Result<Self, ZmtpError> {
        let mut io = BufReader::new(io);
        // The whole greeting at once: libzmq sends its first 10 bytes, then waits for ours.
        io.get_mut().write_all(&greeting()).await?;
        let mut peer = [0u8; GREETING_LEN];
        io.read_exact(&mut peer).await?;
        check_greeting(&peer)?;

        let mut ready = Vec::new();
        encode_frame(&mut ready, COMMAND, &ready_command(socket_type));
        io.get_mut().write_all(&ready).await?;
        io.get_mut().flush().await?;

        let mut socket = Self { io };
        let frame = socket.read_frame().await?;
        if !frame.command {
            return Err(ZmtpError::Malformed("handshake: a message before READY"));
        }
        match parse_command(&frame.body)? {
            (b"READY", data) => {
                let peer_type = property(data, b"Socket-Type")?.ok_or(ZmtpError::Malformed("READY: no Socket-Type"))?;
                if !socket_type.accepts(peer_type) {
                    return Err(ZmtpError::SocketType {
                        ours: socket_type.name(),
                        peer: String::from_utf8_lossy(peer_type).into_owned(),
                    });
                }
            }
            (b"ERROR", data) => return Err(ZmtpError::Refused(error_reason(data))),
            _ => return Err(ZmtpError::Malformed("handshake: a command other than READY")),
        }
        Ok(socket)
    }

    /// Subscribes to messages whose first frame starts with `topic` (ZMTP 3.0 spells a
    /// subscription as a message, `0x01` and the topic).
    pub(crate) async fn subscribe(&mut self, topic: &[u8]) -> Result<(), ZmtpError> {
        let mut body = Vec::with_capacity(1 + topic.len());
        body.push(1);
        body.extend_from_slice(topic);
        self.send(&[&body]).await
    }

    /// Sends one message of `frames`.
    pub(crate) async fn send(&mut self, frames: &[&[u8]]) -> Result<(), ZmtpError> {
        let mut buf = Vec::new();
        for (i, frame) in frames.iter().enumerate() {
            let flags = if i + 1 < frames.len() { MORE } else { 0 };
            encode_frame(&mut buf, flags, frame);
        }
        let io = self.io.get_mut();
        io.write_all(&buf).await?;
        io.flush().await?;
        Ok(())
    }

    /// The next message, its frames in order. Commands in between are answered (PING) or
    /// skipped.
    pub(crate) async fn recv(&mut self) -> Result<Vec<Bytes>, ZmtpError> {
        let mut frames = Vec::new();
        // Empty frames cost something too: a peer cannot send endless ones for free.
        let mut size = 0u64;
        loop {
            let frame = self.read_frame().await?;
            if frame.command {
                if !frames.is_empty() {
                    return Err(ZmtpError::Malformed("message: a command between its frames"));
                }
                self.command(&frame.body).await?;
                continue;
            }
            size += frame.body.len() as u64 + FRAME_COST;
            if size > MAX_MESSAGE {
                return Err(ZmtpError::TooLarge { size });
            }
            frames.push(frame.body);
            if !frame.more {
                return Ok(frames);
            }
        }
    }

    async fn command(&mut self, body: &[u8]) -> Result<(), ZmtpError> {
        match parse_command(body)? {
            (b"PING", data) => {
                // PING is a 2-byte TTL then a context the PONG echoes.
                let context = data.get(2..).ok_or(ZmtpError::Malformed("PING"))?;
                let mut pong = Vec::with_capacity(5 + context.len());
                pong.push(4);
                pong.extend_from_slice(b"PONG");
                pong.extend_from_slice(context);
                let mut buf = Vec::new();
                encode_frame(&mut buf, COMMAND, &pong);
                let io = self.io.get_mut();
                io.write_all(&buf).await?;
                io.flush().await?;
                Ok(())
            }
            (b"ERROR", data) => Err(ZmtpError::Refused(error_reason(data))),
            _ => Ok(()),
        }
    }

    async fn read_frame(&mut self) -> Result<Frame, ZmtpError> {
        let flags = self.io.read_u8().await?;
        if flags & !(MORE | LONG | COMMAND) != 0 {
            return Err(ZmtpError::Malformed("frame: reserved flags set"));
        }
        let size = if flags & LONG != 0 {
            self.io.read_u64().await?
        } else {
            u64::from(self.io.read_u8().await?)
        };
        if size > MAX_MESSAGE {
            return Err(ZmtpError::TooLarge { size });
        }
        // Read as it arrives rather than allocate what the peer claims up front.
        let mut body = Vec::new();
        (&mut self.io).take(size).read_to_end(&mut body).await?;
        if body.len() as u64 != size {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        Ok(Frame {
            more: flags & MORE != 0,
            command: flags & COMMAND != 0,
            body: Bytes::from(body),
        })
    }
}

const MORE: u8 = 0x01;
const LONG: u8 = 0x02;
const COMMAND: u8 = 0x04;
const GREETING_LEN: usize = 64;
/// What a frame is charged against [`MAX_MESSAGE`] beyond its body.
const FRAME_COST: u64 = 64;

struct Frame {
    more: bool,
    command: bool,
    body: Bytes,
}

/// `tcp://HOST:PORT` as `HOST:PORT`. A `*` host, as engines write the endpoint they bind,
/// means this machine.
fn tcp_address(endpoint: &str) -> Result<String, ZmtpError> {
    let bad = || ZmtpError::Endpoint(endpoint.to_owned());
    let rest = endpoint.strip_prefix("tcp://").ok_or_else(bad)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    let host = if host == "*" { "127.0.0.1" } else { host };
    Ok(format!("{host}:{port}"))
}

fn greeting() -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3;
    g[11] = 0;
    g[12..16].copy_from_slice(b"NULL");
    // as-server (byte 32) and the filler stay zero.
    g
}

fn check_greeting(peer: &[u8; GREETING_LEN]) -> Result<(), ZmtpError> {
    if peer[0] != 0xff || peer[9] & 1 != 1 || peer[10] < 3 {
        let mut start = [0u8; 12];
        start.copy_from_slice(&peer[..12]);
        return Err(ZmtpError::NotZmtp(start));
    }
    let mechanism = &peer[12..32];
    let end = mechanism.iter().position(|&b| b == 0).unwrap_or(mechanism.len());
    if &mechanism[..end] != b"NULL" {
        return Err(ZmtpError::Mechanism(
            String::from_utf8_lossy(&mechanism[..end]).into_owned(),
        ));
    }
    Ok(())
}

fn ready_command(socket_type: SocketType) -> Vec<u8> {
    let name = b"Socket-Type";
    let value = socket_type.name().as_bytes();
    let mut body = Vec::new();
    body.push(5);
    body.extend_from_slice(b"READY");
    body.push(name.len() as u8);
    body.extend_from_slice(name);
    body.extend_from_slice(&(value.len() as u32).to_be_bytes());
    body.extend_from_slice(value);
    body
}

fn encode_frame(buf: &mut Vec<u8>, flags: u8, body: &[u8]) {
    match u8::try_from(body.len()) {
        Ok(short) => buf.extend_from_slice(&[flags, short]),
        Err(_) => {
            buf.push(flags | LONG);
            buf.extend_from_slice(&(body.len() as u64).to_be_bytes());
        }
    }
    buf.extend_from_slice(body);
}

/// A command's name and data.
fn parse_command(body: &[u8]) -> Result<(&[u8], &[u8]), ZmtpError> {
    let (&len, rest) = body.split_first().ok_or(ZmtpError::Malformed("command: empty"))?;
    let len = usize::from(len);
    if rest.len() < len {
        return Err(ZmtpError::Malformed("command: name longer than the frame"));
    }
    Ok(rest.split_at(len))
}

/// The value of property `name` (matched case-insensitively, as the spec says) in a READY
/// command's data.
fn property<'d>(mut data: &'d [u8], name: &[u8]) -> Result<Option<&'d [u8]>, ZmtpError> {
    const MALFORMED: ZmtpError = ZmtpError::Malformed("READY: properties");
    while let Some((&len, rest)) = data.split_first() {
        let len = usize::from(len);
        if rest.len() < len + 4 {
            return Err(MALFORMED);
        }
        let (key, rest) = rest.split_at(len);
        let (value_len, rest) = rest.split_at(4);
        let value_len = u32::from_be_bytes([value_len[0], value_len[1], value_len[2], value_len[3]]) as usize;
        if rest.len() < value_len {
            return Err(MALFORMED);
        }
        let (value, rest) = rest.split_at(value_len);
        if key.eq_ignore_ascii_case(name) {
            return Ok(Some(value));
        }
        data = rest;
    }
    Ok(None)
}

fn error_reason(data: &[u8]) -> String {
    let reason = data
        .split_first()
        .and_then(|(&len, rest)| rest.get(..usize::from(len)))
        .unwrap_or_default();
    String::from_utf8_lossy(reason).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;

    /// A peer's greeting as libzmq 4.3 sends it: ZMTP 3.1, NULL.
    fn libzmq_greeting() -> Vec<u8> {
        let mut g = vec![0xff, 0, 0, 0, 0, 0, 0, 0, 1, 0x7f, 3, 1];
        g.extend_from_slice(b"NULL");
        g.resize(GREETING_LEN, 0);
        g
    }

    fn ready_of(socket_type: &[u8]) -> Vec<u8> {
        let mut body = vec![5];
        body.extend_from_slice(b"READY");
        // A property before the one looked for, in another case.
        body.push(8);
        body.extend_from_slice(b"Identity");
        body.extend_from_slice(&0u32.to_be_bytes());
        body.push(11);
        body.extend_from_slice(b"socket-type");
        body.extend_from_slice(&(socket_type.len() as u32).to_be_bytes());
        body.extend_from_slice(socket_type);
        let mut frame = Vec::new();
        encode_frame(&mut frame, COMMAND, &body);
        frame
    }

    async fn peer_says(bytes: &[u8]) -> DuplexStream {
        let (ours, mut theirs) = tokio::io::duplex(1 << 20);
        theirs.write_all(bytes).await.expect("the duplex has room");
        // Keep the peer's end open, with what we write readable, for as long as the test
        // holds ours: tests read it back through `written`.
        tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = theirs.read_to_end(&mut sink).await;
        });
        ours
    }

    #[tokio::test]
    async fn handshake_and_subscription_bytes() {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let mut script = libzmq_greeting();
        script.extend(ready_of(b"PUB"));
        theirs.write_all(&script).await.expect("the duplex has room");
        let mut socket = Socket::handshake(ours, SocketType::Sub).await.expect("handshake");
        socket.subscribe(b"kv").await.expect("subscribe");
        drop(socket);
        let mut written = Vec::new();
        theirs.read_to_end(&mut written).await.expect("our bytes");
        let mut expected = vec![0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0x7f, 3, 0];
        expected.extend_from_slice(b"NULL");
        expected.resize(GREETING_LEN, 0);
        expected.extend_from_slice(&[0x04, 25, 5]);
        expected.extend_from_slice(b"READY");
        expected.push(11);
        expected.extend_from_slice(b"Socket-Type");
        expected.extend_from_slice(&[0, 0, 0, 3]);
        expected.extend_from_slice(b"SUB");
        expected.extend_from_slice(&[0x00, 3, 0x01, b'k', b'v']);
        assert_eq!(written, expected);
    }

    #[tokio::test]
    async fn messages_are_read_across_short_and_long_frames() {
        let mut script = libzmq_greeting();
        script.extend(ready_of(b"ROUTER"));
        let long = vec![7u8; 300];
        encode_frame(&mut script, MORE, b"");
        // A PING between messages, then a long frame with its 8-byte size.
        let mut second = Vec::new();
        encode_frame(&mut second, COMMAND, b"\x04PING\x00\x10ctx");
        encode_frame(&mut script, MORE, &42u64.to_be_bytes());
        encode_frame(&mut script, 0, &long);
        script.extend_from_slice(&second);
        encode_frame(&mut script, 0, b"last");
        let mut long_frame = Vec::new();
        encode_frame(&mut long_frame, 0, &long);
        assert_eq!(long_frame[..9], [0x02, 0, 0, 0, 0, 0, 0, 1, 44]);

        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        theirs.write_all(&script).await.expect("the duplex has room");
        let mut socket = Socket::handshake(ours, SocketType::Dealer).await.expect("handshake");
        let first = socket.recv().await.expect("a message");
        assert_eq!(
            first,
            vec![
                Bytes::new(),
                Bytes::copy_from_slice(&42u64.to_be_bytes()),
                Bytes::from(long)
            ]
        );
        assert_eq!(
            socket.recv().await.expect("a message"),
            vec![Bytes::from_static(b"last")]
        );
        drop(socket);
        let mut written = Vec::new();
        theirs.read_to_end(&mut written).await.expect("our bytes");
        assert!(written.ends_with(b"\x04\x08\x04PONGctx"), "the PING is answered");
        assert!(written[GREETING_LEN..].windows(6).any(|w| w == b"DEALER"));
    }

    #[tokio::test]
    async fn frames_over_the_limit_fail_the_connection() {
        let mut script = libzmq_greeting();
        script.extend(ready_of(b"PUB"));
        script.push(LONG);
        script.extend_from_slice(&(MAX_MESSAGE + 1).to_be_bytes());
        let mut socket = Socket::handshake(peer_says(&script).await, SocketType::Sub)
            .await
            .expect("handshake");
        let err = socket.recv().await.err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("the peer sent a message of 268435457 bytes or more, the limit is 268435456")
        );
    }

    #[tokio::test]
    async fn a_truncated_frame_is_an_error() {
        let mut script = libzmq_greeting();
        script.extend(ready_of(b"PUB"));
        script.extend_from_slice(&[0x00, 10, 1, 2, 3]);
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        theirs.write_all(&script).await.expect("the duplex has room");
        let mut socket = Socket::handshake(ours, SocketType::Sub).await.expect("handshake");
        drop(theirs);
        assert!(matches!(socket.recv().await, Err(ZmtpError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof));
    }

    async fn handshake_error(script: Vec<u8>, socket_type: SocketType) -> String {
        match Socket::handshake(peer_says(&script).await, socket_type).await {
            Ok(_) => panic!("the handshake succeeded"),
            Err(e) => e.to_string(),
        }
    }

    #[tokio::test]
    async fn handshakes_with_the_wrong_peer_fail() {
        let mut router = libzmq_greeting();
        router.extend(ready_of(b"ROUTER"));
        assert_eq!(
            handshake_error(router, SocketType::Sub).await,
            "a SUB socket cannot talk to a \"ROUTER\" socket"
        );
        let mut publisher = libzmq_greeting();
        publisher.extend(ready_of(b"PUB"));
        assert_eq!(
            handshake_error(publisher, SocketType::Dealer).await,
            "a DEALER socket cannot talk to a \"PUB\" socket"
        );
        let mut http = b"HTTP/1.1 400 Bad Request\r\n".to_vec();
        http.resize(GREETING_LEN, b' ');
        assert!(handshake_error(http, SocketType::Sub)
            .await
            .starts_with("the peer does not speak ZMTP 3"));
        let mut curve = libzmq_greeting();
        curve[12..17].copy_from_slice(b"CURVE");
        assert_eq!(
            handshake_error(curve, SocketType::Sub).await,
            "the peer uses security mechanism \"CURVE\", only NULL is supported"
        );
        let mut refused = libzmq_greeting();
        encode_frame(&mut refused, COMMAND, b"\x05ERROR\x0bbad account");
        assert_eq!(
            handshake_error(refused, SocketType::Sub).await,
            "the peer refused the connection: bad account"
        );
    }

    #[test]
    fn endpoints_must_be_tcp() {
        assert_eq!(
            tcp_address("tcp://127.0.0.1:5557").ok().as_deref(),
            Some("127.0.0.1:5557")
        );
        assert_eq!(tcp_address("tcp://*:5557").ok().as_deref(), Some("127.0.0.1:5557"));
        assert_eq!(tcp_address("tcp://[::1]:5557").ok().as_deref(), Some("[::1]:5557"));
        assert_eq!(tcp_address("tcp://engine:5557").ok().as_deref(), Some("engine:5557"));
        for bad in [
            "ipc:///tmp/kv",
            "tcp://host",
            "tcp://:5557",
            "tcp://host:port",
            "host:5557",
        ] {
            assert_eq!(
                tcp_address(bad).err().map(|e| e.to_string()),
                Some(format!("ZeroMQ endpoint must be tcp://HOST:PORT, got {bad:?}"))
            );
        }
    }
}
