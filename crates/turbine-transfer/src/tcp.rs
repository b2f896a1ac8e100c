//! The TCP backend: a listener per agent, and per peer a pool of connections whose threads
//! take a transfer's parts from one queue, so a large transfer is split across connections
//! and each part is one request frame followed by its bytes, with no per-block round trip.
//!
//! Frames (little-endian): a connection opens with `HELLO` (magic, protocol version,
//! compatibility hash, the sender's uid and name), answered by an accept or a refusal with a
//! reason. Then requests: op (READ, WRITE, NOTIFY), tag, descriptor count and descriptors;
//! a WRITE's bytes follow its header; the reply is a status, and for a READ the bytes. A
//! NOTIFY has no reply.

use std::collections::VecDeque;
use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::agent::{AgentInner, Notification};
use crate::error::TransferError;
use crate::memory::{Region, RegionId};
use crate::metadata::PROTOCOL_VERSION;
use crate::metrics::{Op, Stats};
use crate::transfer::XferState;

const MAGIC: [u8; 4] = *b"TBXF";
const OP_READ: u8 = 1;
const OP_WRITE: u8 = 2;
const OP_NOTIFY: u8 = 3;
const STATUS_OK: u8 = 0;
const STATUS_ERR: u8 = 1;
/// A peer that lists more descriptors in one frame is not one of ours.
const MAX_DESCS: u32 = 1 << 20;
const MAX_NAME: u32 = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the notifier gathers notifications before it sends them.
const NOTIFY_BATCH: Duration = Duration::from_micros(200);

/// Who is calling, sent in `HELLO`.
#[derive(Clone)]
pub(crate) struct Hello {
    pub uid: u64,
    pub name: String,
    pub compat_hash: u64,
}

/// A run of bytes: `len` at `local_off` in a local region, paired with `len` at `remote_off`
/// in the peer's region `remote`.
#[derive(Clone)]
pub(crate) struct Seg {
    pub local: Arc<Region>,
    pub local_off: u64,
    pub remote: RegionId,
    pub remote_off: u64,
    pub len: u64,
}

pub(crate) struct Job {
    pub state: Arc<XferState>,
    pub op: Op,
    pub segs: Vec<Seg>,
}

struct PoolShared {
    addr: SocketAddr,
    hello: Hello,
    peer_name: String,
    queue: Mutex<VecDeque<Job>>,
    ready: Condvar,
    closed: AtomicBool,
    /// Handshaken connections not yet taken by a thread.
    spare: Mutex<Vec<TcpStream>>,
    /// Notifications to send, by tag, in the order their transfers finished.
    notes: Mutex<VecDeque<u64>>,
    notes_ready: Condvar,
    stats: Arc<Stats>,
}

/// The connections to one peer. Dropping it ends its threads after their current part and
/// fails what is still queued.
pub(crate) struct TcpPeer {
    shared: Arc<PoolShared>,
}

/// Submits jobs to a peer's pool without keeping it open: the notification step of a
/// transfer holds one.
pub(crate) struct TcpSubmit {
    shared: Arc<PoolShared>,
}

impl TcpSubmit {
    /// Reports `state`'s transfer done and queues its notification for the peer's
    /// notifier thread. The bytes have moved: the waiter need not also wait for a loopback
    /// send (20-30 µs here, as long as copying a megabyte), and a notification the peer
    /// never gets is counted, not turned into a failed transfer of good bytes (as NIXL's
    /// completion does not wait for its notification either).
    pub fn notify(&self, state: &XferState) {
        let shared = &self.shared;
        if shared.closed.load(Ordering::Acquire) {
            return state.finish(Err(closed_error(shared)));
        }
        shared.notes.lock().push_back(state.tag);
        shared.notes_ready.notify_one();
        state.finish(Ok(()));
    }
}

/// Sends queued notifications on a connection of its own, so none waits behind a part's
/// bytes; ends when the peer is dropped here.
fn notifier_loop(shared: &Arc<PoolShared>) {
    let mut control: Option<TcpStream> = None;
    loop {
        {
            let mut notes = shared.notes.lock();
            while notes.is_empty() {
                if shared.closed.load(Ordering::Acquire) {
                    return;
                }
                shared.notes_ready.wait_for(&mut notes, Duration::from_secs(1));
            }
        }
        // Gathers what finishes meanwhile into the same send: back-to-back transfers then
        // cost a wake-up each rather than a loopback send each, and a lease is released a
        // fraction of a millisecond later.
        std::thread::sleep(NOTIFY_BATCH);
        let tags: Vec<u64> = shared.notes.lock().drain(..).collect();
        let mut frames = Vec::with_capacity(tags.len() * 13);
        for tag in &tags {
            frames.push(OP_NOTIFY);
            frames.extend_from_slice(&tag.to_le_bytes());
            frames.extend_from_slice(&0u32.to_le_bytes());
        }
        let result = (|| {
            if control.is_none() {
                let stream = dial(shared.addr, &shared.hello, &shared.peer_name)?;
                stream
                    .set_write_timeout(Some(CONNECT_TIMEOUT))
                    .map_err(|e| TransferError::io("setting a timeout", e))?;
                control = Some(stream);
            }
            let Some(stream) = control.as_mut() else {
                return Err(closed_error(shared));
            };
            stream
                .write_all(&frames)
                .map_err(|e| TransferError::RemoteDisconnected {
                    peer: shared.peer_name.clone(),
                    reason: e.to_string(),
                })
        })();
        if let Err(e) = result {
            control = None;
            shared.stats.notifications_lost(tags.len() as u64);
            tracing::warn!(peer = %shared.peer_name, error = %e, lost = tags.len(), "transfer notifications not delivered");
        }
    }
}

fn submit(shared: &PoolShared, jobs: impl IntoIterator<Item = Job>) {
    let mut queue = shared.queue.lock();
    queue.extend(jobs);
    let closed = shared.closed.load(Ordering::Acquire);
    let orphans: Vec<Job> = if closed { queue.drain(..).collect() } else { Vec::new() };
    drop(queue);
    for job in orphans {
        finish_job(&job, Err(closed_error(shared)));
    }
    shared.ready.notify_all();
}

fn closed_error(shared: &PoolShared) -> TransferError {
    TransferError::RemoteDisconnected {
        peer: shared.peer_name.clone(),
        reason: "the connection to the peer was closed here".into(),
    }
}

impl Drop for TcpPeer {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.ready.notify_all();
        self.shared.notes_ready.notify_all();
    }
}

impl TcpPeer {
    /// Connects once to check the handshake (a refused peer fails here, before any
    /// transfer), then starts `connections` threads.
    pub fn connect(
        addr: SocketAddr,
        hello: Hello,
        peer_name: String,
        connections: usize,
        stats: Arc<Stats>,
    ) -> Result<Self, TransferError> {
        let first = dial(addr, &hello, &peer_name)?;
        let shared = Arc::new(PoolShared {
            addr,
            hello,
            peer_name,
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            closed: AtomicBool::new(false),
            spare: Mutex::new(vec![first]),
            notes: Mutex::new(VecDeque::new()),
            notes_ready: Condvar::new(),
            stats,
        });
        {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("xfer-notify".into())
                .spawn(move || notifier_loop(&shared))
                .map_err(|e| TransferError::io("starting a transfer thread", e))?;
        }
        for i in 0..connections.max(1) {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("xfer-tcp-{i}"))
                .spawn(move || connection_loop(&shared))
                .map_err(|e| TransferError::io("starting a transfer thread", e))?;
        }
        Ok(TcpPeer { shared })
    }

    pub fn submit(&self, jobs: impl IntoIterator<Item = Job>) {
        submit(&self.shared, jobs);
    }

    pub fn handle(&self) -> TcpSubmit {
        TcpSubmit {
            shared: Arc::clone(&self.shared),
        }
    }
}

fn dial(addr: SocketAddr, hello: &Hello, peer_name: &str) -> Result<TcpStream, TransferError> {
    let disconnected = |e: io::Error| TransferError::RemoteDisconnected {
        peer: peer_name.to_owned(),
        reason: format!("connecting to {addr}: {e}"),
    };
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(disconnected)?;
    tune(&stream);
    stream.set_read_timeout(Some(CONNECT_TIMEOUT)).map_err(disconnected)?;
    let mut frame = MAGIC.to_vec();
    frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    frame.extend_from_slice(&hello.compat_hash.to_le_bytes());
    frame.extend_from_slice(&hello.uid.to_le_bytes());
    put_str(&mut frame, &hello.name);
    stream.write_all(&frame).map_err(disconnected)?;
    match read_u8(&mut stream).map_err(disconnected)? {
        STATUS_OK => {
            stream.set_read_timeout(None).map_err(disconnected)?;
            Ok(stream)
        }
        _ => {
            let reason = read_str(&mut stream).map_err(disconnected)?;
            Err(TransferError::Mismatch(format!(
                "{peer_name} refused the handshake: {reason}"
            )))
        }
    }
}

fn tune(stream: &TcpStream) {
    // Headers are small and each is followed by a read: Nagle would hold them back.
    let _ = stream.set_nodelay(true);
}

fn connection_loop(shared: &Arc<PoolShared>) {
    let mut conn: Option<TcpStream> = None;
    let mut scratch = Vec::new();
    loop {
        let job = {
            let mut queue = shared.queue.lock();
            loop {
                if shared.closed.load(Ordering::Acquire) {
                    let orphans: Vec<Job> = queue.drain(..).collect();
                    drop(queue);
                    for job in orphans {
                        finish_job(&job, Err(closed_error(shared)));
                    }
                    return;
                }
                if let Some(job) = queue.pop_front() {
                    break job;
                }
                shared.ready.wait(&mut queue);
            }
        };
        if let Some(reason) = job.state.should_stop() {
            finish_job(&job, Err(reason));
            continue;
        }
        let result = run_job(shared, &mut conn, &job, &mut scratch);
        if result.is_err() {
            // The stream may be mid-frame: start the next job on a fresh connection.
            conn = None;
        }
        finish_job(&job, result);
    }
}

fn finish_job(job: &Job, result: Result<(), TransferError>) {
    job.state.step_done(result);
}

fn run_job(
    shared: &PoolShared,
    conn: &mut Option<TcpStream>,
    job: &Job,
    scratch: &mut Vec<u8>,
) -> Result<(), TransferError> {
    if conn.is_none() {
        let spare = shared.spare.lock().pop();
        *conn = Some(match spare {
            Some(stream) => stream,
            None => dial(shared.addr, &shared.hello, &shared.peer_name)?,
        });
    }
    let Some(stream) = conn.as_mut() else {
        return Err(TransferError::NotFound("a connection".into()));
    };
    let deadline = job.state.deadline();
    let timeout = match deadline {
        Some(deadline) => {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(job.state.should_stop().unwrap_or(TransferError::Cancelled));
            }
            Some(left)
        }
        None => None,
    };
    let io_err = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => TransferError::TimedOut {
            after_ms: timeout.map_or(0, |t| t.as_millis() as u64),
        },
        _ => TransferError::RemoteDisconnected {
            peer: shared.peer_name.clone(),
            reason: e.to_string(),
        },
    };
    stream.set_read_timeout(timeout).map_err(io_err)?;
    stream.set_write_timeout(timeout).map_err(io_err)?;
    let mut header = Vec::with_capacity(64);
    let (op, segs) = (job.op, &job.segs);
    header.push(match op {
        Op::Read => OP_READ,
        Op::Write => OP_WRITE,
    });
    header.extend_from_slice(&job.state.tag.to_le_bytes());
    header.extend_from_slice(&(segs.len() as u32).to_le_bytes());
    for seg in segs {
        header.extend_from_slice(&seg.remote.0.to_le_bytes());
        header.extend_from_slice(&seg.remote_off.to_le_bytes());
        header.extend_from_slice(&seg.len.to_le_bytes());
    }
    stream.write_all(&header).map_err(io_err)?;
    match op {
        Op::Write => {
            for seg in segs {
                seg.local
                    .each_piece(seg.local_off, seg.len, scratch, |bytes| stream.write_all(bytes))?
                    .map_err(io_err)?;
            }
            read_status(stream, &shared.peer_name).map_err(io_err)?
        }
        Op::Read => {
            read_status(stream, &shared.peer_name).map_err(io_err)??;
            for seg in segs {
                seg.local
                    .fill_pieces(seg.local_off, seg.len, scratch, |buf| stream.read_exact(buf))?
                    .map_err(io_err)?;
            }
            Ok(())
        }
    }
}

/// Reads a reply's status: the outer error is the connection's, the inner the peer's answer.
fn read_status(stream: &mut TcpStream, peer: &str) -> io::Result<Result<(), TransferError>> {
    match read_u8(stream)? {
        STATUS_OK => Ok(Ok(())),
        _ => {
            let code = read_u8(stream)?;
            let message = format!("{peer}: {}", read_str(stream)?);
            Ok(Err(match code {
                1 => TransferError::NotFound(message),
                2 => TransferError::OutOfBounds(message),
                _ => TransferError::Io {
                    context: message,
                    source: Arc::new(io::Error::other("the peer failed to move the bytes")),
                },
            }))
        }
    }
}

/// Accepts peers until the agent is gone.
pub(crate) fn serve(listener: TcpListener, agent: Weak<AgentInner>) {
    for stream in listener.incoming() {
        let Some(inner) = agent.upgrade() else { return };
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        let Ok(stream) = stream else { continue };
        tune(&stream);
        if let Ok(clone) = stream.try_clone() {
            inner.accepted.lock().push(clone);
        }
        let agent = agent.clone();
        drop(inner);
        let _ = std::thread::Builder::new().name("xfer-serve".into()).spawn(move || {
            if let Err(e) = serve_connection(stream, &agent) {
                tracing::debug!(error = %e, "transfer connection ended");
            }
        });
    }
}

fn serve_connection(stream: TcpStream, agent: &Weak<AgentInner>) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(64 << 10, stream);
    let mut magic = [0u8; 4];
    reader.read_exact(&mut magic)?;
    let protocol = read_u32(&mut reader)?;
    let compat_hash = read_u64(&mut reader)?;
    let peer_uid = read_u64(&mut reader)?;
    let peer_name = read_str(&mut reader)?;
    let refusal = {
        let inner = agent.upgrade().ok_or_else(|| io::Error::other("agent gone"))?;
        if magic != MAGIC {
            Some("not a transfer agent".to_owned())
        } else if protocol != PROTOCOL_VERSION {
            Some(format!("protocol {protocol} there, {PROTOCOL_VERSION} here"))
        } else if compat_hash != inner.compat_hash {
            Some(format!(
                "compatibility hash {compat_hash:016x} there, {:016x} here ({})",
                inner.compat_hash,
                inner.compat_summary()
            ))
        } else {
            None
        }
    };
    if let Some(reason) = refusal {
        let mut frame = vec![STATUS_ERR];
        put_str(&mut frame, &reason);
        writer.write_all(&frame)?;
        return Ok(());
    }
    writer.write_all(&[STATUS_OK])?;
    let mut scratch = Vec::new();
    loop {
        let op = match read_u8(&mut reader) {
            Ok(op) => op,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let tag = read_u64(&mut reader)?;
        let count = read_u32(&mut reader)?;
        if count > MAX_DESCS {
            return Err(io::Error::other(format!("{count} descriptors in one frame")));
        }
        let mut descs = Vec::with_capacity(count as usize);
        for _ in 0..count {
            descs.push((
                RegionId(read_u32(&mut reader)?),
                read_u64(&mut reader)?,
                read_u64(&mut reader)?,
            ));
        }
        let inner = agent.upgrade().ok_or_else(|| io::Error::other("agent gone"))?;
        let resolved: Result<Vec<(Arc<Region>, u64, u64)>, TransferError> = descs
            .iter()
            .map(|&(id, off, len)| {
                let region = inner.region(id)?;
                region.check(off, len)?;
                Ok((region, off, len))
            })
            .collect();
        match op {
            OP_NOTIFY => {
                inner.deliver(Notification {
                    peer: peer_name.clone(),
                    peer_uid,
                    tag,
                });
            }
            OP_READ => match resolved {
                Err(e) => write_error(&mut writer, &e)?,
                Ok(regions) => {
                    writer.write_all(&[STATUS_OK])?;
                    for (region, off, len) in regions {
                        to_io(region.each_piece(off, len, &mut scratch, |b| writer.write_all(b)))??;
                    }
                }
            },
            OP_WRITE => match resolved {
                Err(e) => {
                    let total: u64 = descs.iter().map(|d| d.2).sum();
                    io::copy(&mut (&mut reader).take(total), &mut io::sink())?;
                    write_error(&mut writer, &e)?;
                }
                Ok(regions) => {
                    for (region, off, len) in regions {
                        to_io(region.fill_pieces(off, len, &mut scratch, |buf| reader.read_exact(buf)))??;
                    }
                    writer.write_all(&[STATUS_OK])?;
                }
            },
            other => return Err(io::Error::other(format!("unknown op {other}"))),
        }
    }
}

fn to_io<T>(result: Result<T, TransferError>) -> io::Result<T> {
    result.map_err(io::Error::other)
}

fn write_error(writer: &mut TcpStream, error: &TransferError) -> io::Result<()> {
    let code = match error {
        TransferError::NotFound(_) => 1,
        TransferError::OutOfBounds(_) => 2,
        _ => 3,
    };
    let mut frame = vec![STATUS_ERR, code];
    put_str(&mut frame, &error.to_string());
    writer.write_all(&frame)
}

fn put_str(frame: &mut Vec<u8>, s: &str) {
    frame.extend_from_slice(&(s.len() as u32).to_le_bytes());
    frame.extend_from_slice(s.as_bytes());
}

fn read_u8(r: &mut impl Read) -> io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_str(r: &mut impl Read) -> io::Result<String> {
    let len = read_u32(r)?;
    if len > MAX_NAME {
        return Err(io::Error::other(format!("a {len}-byte string in a handshake")));
    }
    let mut b = vec![0u8; len as usize];
    r.read_exact(&mut b)?;
    String::from_utf8(b).map_err(io::Error::other)
}
