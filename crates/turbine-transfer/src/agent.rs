//! The agent: one per process (or per worker), owning registered regions, a listener, its
//! peers, and the notifications peers send when they finish reading or writing its memory.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::error::TransferError;
use crate::memory::{copy, Desc, DescList, MemKind, Region, RegionId};
use crate::metadata::{AgentMetadata, Compat, RegionInfo, PROTOCOL_VERSION};
use crate::metrics::{Backend, Op, Stats, StatsSnapshot};
use crate::tcp::{self, Hello, Job, Seg, TcpPeer};
use crate::transfer::{Post, Transfer, XferState};

/// A part of a transfer: what one connection moves in one request, and how often an
/// in-process copy checks for cancellation. Large enough to amortise a frame header, small
/// enough that cancel and deadlines act within milliseconds.
const PART_BYTES: u64 = 4 << 20;

/// In-process and shared-memory copies up to this size run on the posting thread: about
/// 40-50 µs at memory bandwidth here, less than a hand-off to a copy thread and back costs.
const INLINE_BYTES: u64 = 1 << 20;
/// Larger ones up to this size are copied half on the posting thread (at most a few
/// hundred microseconds), half on a copy thread; beyond it, all on copy threads.
const SHARED_BYTES: u64 = 16 << 20;
/// Threads per agent that copy larger in-process and shared-memory transfers, each taking
/// an equal part of one.
const COPY_THREADS: usize = 2;

/// How an agent is set up.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub name: String,
    pub compat: Compat,
    /// Where to listen for peers (port 0 for any); `None` for an agent only reached in
    /// its own process.
    pub listen: Option<SocketAddr>,
    /// Connections to each TCP peer, over which a transfer's parts are spread.
    pub tcp_connections: usize,
    /// Where shared regions are created: a memory file system, so that they are RAM.
    pub shared_dir: PathBuf,
    /// Read and write peers' shared regions directly when they are on this host.
    pub shared_memory: bool,
    /// Reach peers in this process by a copy. Off, they are reached as if remote (how tests
    /// and benchmarks exercise the other backends in one process).
    pub in_process: bool,
}

impl AgentOptions {
    pub fn new(name: impl Into<String>, compat: Compat) -> Self {
        AgentOptions {
            name: name.into(),
            compat,
            listen: None,
            tcp_connections: 2,
            shared_dir: PathBuf::from("/dev/shm"),
            shared_memory: true,
            in_process: true,
        }
    }
}

/// A peer finished reading or writing this agent's memory for the transfer tagged `tag`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    pub peer: String,
    pub peer_uid: u64,
    pub tag: u64,
}

pub(crate) struct AgentInner {
    name: String,
    uid: u64,
    compat: Compat,
    pub(crate) compat_hash: u64,
    addr: Option<SocketAddr>,
    host: String,
    options: AgentOptions,
    regions: Mutex<HashMap<RegionId, Arc<Region>>>,
    next_region: AtomicU32,
    notify_tx: mpsc::UnboundedSender<Notification>,
    notify_rx: Mutex<Option<mpsc::UnboundedReceiver<Notification>>>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) closed: AtomicBool,
    /// Connections peers opened to us, shut down with the agent so they see it go.
    pub(crate) accepted: Mutex<Vec<TcpStream>>,
    copiers: Copiers,
}

type Work = Box<dyn FnOnce() + Send>;

/// Threads that run in-process and shared-memory copies, started once per agent: a thread
/// per transfer would cost more than a small transfer's copy.
struct Copiers {
    queue: Arc<(Mutex<Option<std::collections::VecDeque<Work>>>, parking_lot::Condvar)>,
}

impl Copiers {
    fn start(threads: usize) -> Result<Self, TransferError> {
        let queue = Arc::new((
            Mutex::new(Some(std::collections::VecDeque::<Work>::new())),
            parking_lot::Condvar::new(),
        ));
        for i in 0..threads.max(1) {
            let queue = Arc::clone(&queue);
            std::thread::Builder::new()
                .name(format!("xfer-copy-{i}"))
                .spawn(move || loop {
                    let work = {
                        let mut q = queue.0.lock();
                        loop {
                            match q.as_mut() {
                                None => return,
                                Some(q) if !q.is_empty() => break q.pop_front(),
                                Some(_) => {}
                            }
                            queue.1.wait(&mut q);
                        }
                    };
                    if let Some(work) = work {
                        work();
                    }
                })
                .map_err(|e| TransferError::io("starting a copy thread", e))?;
        }
        Ok(Copiers { queue })
    }

    fn run(&self, work: Work) {
        let mut q = self.queue.0.lock();
        match q.as_mut() {
            Some(q) => q.push_back(work),
            // Only while the agent is being dropped; the work still runs, on this thread.
            None => {
                drop(q);
                work();
                return;
            }
        }
        drop(q);
        self.queue.1.notify_one();
    }
}

impl Drop for Copiers {
    fn drop(&mut self) {
        // Queued copies finish before the threads end: their transfers must report.
        let left = self.queue.0.lock().take();
        self.queue.1.notify_all();
        for work in left.into_iter().flatten() {
            work();
        }
    }
}

impl AgentInner {
    pub(crate) fn region(&self, id: RegionId) -> Result<Arc<Region>, TransferError> {
        self.regions
            .lock()
            .get(&id)
            .cloned()
            .ok_or_else(|| TransferError::NotFound(format!("region {} of agent {}", id.0, self.name)))
    }

    pub(crate) fn deliver(&self, notification: Notification) {
        // Nobody listening for notifications is the owner's choice, not an error.
        let _ = self.notify_tx.send(notification);
    }

    pub(crate) fn compat_summary(&self) -> String {
        self.compat.summary()
    }
}

impl Drop for AgentInner {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
        for stream in self.accepted.lock().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        if let Some(addr) = self.addr {
            // Wakes the accept loop so that it sees the agent gone and returns.
            let _ = TcpStream::connect_timeout(&addr, Duration::from_millis(100));
        }
        registry().lock().remove(&self.uid);
    }
}

fn process_nonce() -> u64 {
    static NONCE: OnceLock<u64> = OnceLock::new();
    *NONCE.get_or_init(rand::random)
}

/// This process's agents, so that a peer in the same process is reached by a copy.
fn registry() -> &'static Mutex<HashMap<u64, Weak<AgentInner>>> {
    static AGENTS: OnceLock<Mutex<HashMap<u64, Weak<AgentInner>>>> = OnceLock::new();
    AGENTS.get_or_init(Default::default)
}

/// The host's boot id, which processes sharing `/dev/shm` share; a random one where it cannot
/// be read, which only disables direct shared-memory access.
fn host_id() -> String {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| match std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        Ok(id) => id.trim().to_owned(),
        Err(_) => format!("unknown-{:016x}", process_nonce()),
    })
    .clone()
}

/// A transfer agent. Cloning shares it; it closes when the last clone is dropped.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<AgentInner>,
}

/// A connected peer, after a handshake that checked compatibility.
pub struct Peer {
    meta: AgentMetadata,
    in_process: Option<Weak<AgentInner>>,
    /// The peer's shared and file regions, opened for direct access (same host).
    direct: HashMap<RegionId, Arc<Region>>,
    tcp: Option<TcpPeer>,
}

impl Peer {
    pub fn metadata(&self) -> &AgentMetadata {
        &self.meta
    }

    pub fn name(&self) -> &str {
        &self.meta.name
    }

    /// The backend a transfer touching these remote descriptors would use.
    pub fn backend_for(&self, remote: &DescList) -> Backend {
        if self.in_process.is_some() {
            Backend::InProcess
        } else if remote.as_slice().iter().all(|d| self.direct.contains_key(&d.region)) {
            Backend::SharedMemory
        } else {
            Backend::Tcp
        }
    }
}

impl Agent {
    pub fn new(options: AgentOptions) -> Result<Agent, TransferError> {
        let listener = match options.listen {
            Some(addr) => {
                Some(TcpListener::bind(addr).map_err(|e| TransferError::io(format!("listening on {addr}"), e))?)
            }
            None => None,
        };
        let addr = match &listener {
            Some(l) => Some(
                l.local_addr()
                    .map_err(|e| TransferError::io("reading the listener's address", e))?,
            ),
            None => None,
        };
        let (notify_tx, notify_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(AgentInner {
            name: options.name.clone(),
            uid: rand::random(),
            compat_hash: options.compat.hash(),
            compat: options.compat.clone(),
            addr,
            host: host_id(),
            options,
            regions: Mutex::new(HashMap::new()),
            next_region: AtomicU32::new(0),
            notify_tx,
            notify_rx: Mutex::new(Some(notify_rx)),
            stats: Arc::new(Stats::default()),
            closed: AtomicBool::new(false),
            accepted: Mutex::new(Vec::new()),
            copiers: Copiers::start(COPY_THREADS)?,
        });
        registry().lock().insert(inner.uid, Arc::downgrade(&inner));
        if let Some(listener) = listener {
            let weak = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name(format!("xfer-listen-{}", inner.name))
                .spawn(move || tcp::serve(listener, weak))
                .map_err(|e| TransferError::io("starting the transfer listener", e))?;
        }
        Ok(Agent { inner })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn addr(&self) -> Option<SocketAddr> {
        self.inner.addr
    }

    fn next_id(&self) -> RegionId {
        RegionId(self.inner.next_region.fetch_add(1, Ordering::Relaxed))
    }

    fn insert(&self, region: Region) -> RegionId {
        let id = region.id;
        self.inner.regions.lock().insert(id, Arc::new(region));
        id
    }

    /// Registers `len` zeroed bytes of this process's memory.
    pub fn register_host(&self, len: u64) -> Result<RegionId, TransferError> {
        Ok(self.insert(Region::host(self.next_id(), len)?))
    }

    /// Registers `len` bytes of shared memory that processes on this host reach directly.
    /// Refused when the memory file system lacks the room: touching a mapped page it cannot
    /// back would kill the process (SIGBUS) instead of failing a transfer.
    pub fn register_shared(&self, len: u64) -> Result<RegionId, TransferError> {
        let dir = &self.inner.options.shared_dir;
        let swept = crate::memory::sweep_orphans(dir);
        if swept > 0 {
            tracing::info!(dir = %dir.display(), regions = swept, "removed shared regions left by processes that were killed");
        }
        let stat = rustix::fs::statvfs(dir)
            .map_err(|e| TransferError::io(format!("reading free space in {}", dir.display()), e.into()))?;
        let free = stat.f_bavail.saturating_mul(stat.f_frsize);
        if free < len {
            return Err(TransferError::OutOfBounds(format!(
                "a shared region of {} MiB does not fit the {} MiB free in {}",
                len >> 20,
                free >> 20,
                dir.display()
            )));
        }
        let id = self.next_id();
        let path = self.inner.options.shared_dir.join(format!(
            "{}{}-{:016x}-{}",
            crate::memory::SHARED_PREFIX,
            std::process::id(),
            self.inner.uid,
            id.0
        ));
        Ok(self.insert(Region::shared(id, path, len)?))
    }

    /// Registers `len` bytes of the file at `path` (created if absent; existing bytes kept).
    pub fn register_file(&self, path: &Path, len: u64) -> Result<RegionId, TransferError> {
        Ok(self.insert(Region::file(self.next_id(), path, len)?))
    }

    /// Device memory needs a GPU build's backend (NIXL/UCX or GPUDirect); see ARCHITECTURE.md.
    pub fn register_device(&self, _len: u64) -> Result<RegionId, TransferError> {
        Err(TransferError::Unsupported("device memory"))
    }

    /// Removes a region; transfers already holding it finish, new ones fail with `NotFound`.
    pub fn deregister(&self, id: RegionId) -> bool {
        self.inner.regions.lock().remove(&id).is_some()
    }

    /// Reads this agent's own bytes, for the owner that fills and consumes its regions.
    pub fn read_local(&self, desc: Desc, buf: &mut [u8]) -> Result<(), TransferError> {
        self.local_region(desc, buf.len())?.read(desc.offset, buf)
    }

    pub fn write_local(&self, desc: Desc, bytes: &[u8]) -> Result<(), TransferError> {
        self.local_region(desc, bytes.len())?.write(desc.offset, bytes)
    }

    /// Reads this agent's bytes from `offset` of `region` into `pieces`, in order: a tier's
    /// block scattered into an engine's buffers, one system call for a file region.
    pub fn read_local_pieces(
        &self,
        region: RegionId,
        offset: u64,
        pieces: &mut [&mut [u8]],
    ) -> Result<(), TransferError> {
        self.inner.region(region)?.read_pieces(offset, pieces)
    }

    /// Writes `pieces`, in order, from `offset` of `region`.
    pub fn write_local_pieces(&self, region: RegionId, offset: u64, pieces: &[&[u8]]) -> Result<(), TransferError> {
        self.inner.region(region)?.write_pieces(offset, pieces)
    }

    /// The region of `desc`, checked to be `len` bytes long.
    fn local_region(&self, desc: Desc, len: usize) -> Result<Arc<Region>, TransferError> {
        if len as u64 != desc.len {
            return Err(TransferError::Mismatch(format!(
                "{len} bytes for a {}-byte descriptor",
                desc.len
            )));
        }
        self.inner.region(desc.region)
    }

    pub fn metadata(&self) -> AgentMetadata {
        let mut regions: Vec<RegionInfo> = self
            .inner
            .regions
            .lock()
            .values()
            .map(|r| RegionInfo {
                id: r.id,
                kind: r.kind,
                len: r.len,
                path: r.path.clone(),
            })
            .collect();
        regions.sort_by_key(|r| r.id);
        AgentMetadata {
            name: self.inner.name.clone(),
            uid: self.inner.uid,
            process: process_nonce(),
            host: self.inner.host.clone(),
            protocol: PROTOCOL_VERSION,
            compat: self.inner.compat.clone(),
            compat_hash: self.inner.compat_hash,
            addr: self.inner.addr,
            regions,
        }
    }

    /// Takes the stream of notifications peers send; only the first call gets it.
    pub fn notifications(&self) -> Option<mpsc::UnboundedReceiver<Notification>> {
        self.inner.notify_rx.lock().take()
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// Checks a peer's metadata and connects to it: by reference in this process, else over
    /// TCP (one handshake now, which a peer of another compatibility refuses), opening its
    /// shared regions directly when it is on this host.
    pub async fn connect(&self, meta: AgentMetadata) -> Result<Peer, TransferError> {
        let connected = self.connect_checked(meta).await;
        if matches!(connected, Err(TransferError::Mismatch(_))) {
            self.inner.stats.refused();
        }
        connected
    }

    async fn connect_checked(&self, meta: AgentMetadata) -> Result<Peer, TransferError> {
        if meta.protocol != PROTOCOL_VERSION {
            return Err(TransferError::Mismatch(format!(
                "peer {} speaks protocol {}, this agent {PROTOCOL_VERSION}",
                meta.name, meta.protocol
            )));
        }
        if meta.compat_hash != self.inner.compat_hash || meta.compat != self.inner.compat {
            return Err(TransferError::Mismatch(format!(
                "peer {} is incompatible: {}",
                meta.name,
                self.inner.compat.differences(&meta.compat)
            )));
        }
        if self.inner.options.in_process && meta.process == process_nonce() {
            if let Some(weak) = registry().lock().get(&meta.uid) {
                return Ok(Peer {
                    meta,
                    in_process: Some(weak.clone()),
                    direct: HashMap::new(),
                    tcp: None,
                });
            }
        }
        let addr = meta.addr.ok_or_else(|| {
            TransferError::NotFound(format!("peer {} is in another process and has no listener", meta.name))
        })?;
        let hello = Hello {
            uid: self.inner.uid,
            name: self.inner.name.clone(),
            compat_hash: self.inner.compat_hash,
        };
        let connections = self.inner.options.tcp_connections;
        let same_host = self.inner.options.shared_memory && meta.host == self.inner.host;
        let peer_name = meta.name.clone();
        let regions = meta.regions.clone();
        let stats = Arc::clone(&self.inner.stats);
        let joined = tokio::task::spawn_blocking(move || {
            let tcp = TcpPeer::connect(addr, hello, peer_name, connections, stats)?;
            let mut direct = HashMap::new();
            if same_host {
                for info in regions
                    .iter()
                    .filter(|r| matches!(r.kind, MemKind::Shared | MemKind::File))
                {
                    if let Some(path) = &info.path {
                        // A region we cannot open (another mount namespace) goes over TCP.
                        if let Ok(region) = Region::open_peer(info.id, info.kind, path, info.len) {
                            direct.insert(info.id, Arc::new(region));
                        }
                    }
                }
            }
            Ok::<_, TransferError>((tcp, direct))
        })
        .await
        .map_err(|e| TransferError::io("connecting", std::io::Error::other(e)))?;
        let (tcp, direct) = joined?;
        Ok(Peer {
            meta,
            in_process: None,
            direct,
            tcp: Some(tcp),
        })
    }

    /// A peer that is this agent: transfers between its own regions (host and disk tiers).
    pub fn local_peer(&self) -> Peer {
        Peer {
            meta: self.metadata(),
            in_process: Some(Arc::downgrade(&self.inner)),
            direct: HashMap::new(),
            tcp: None,
        }
    }

    /// Posts a READ (the peer's `remote` bytes into our `local`) or a WRITE (the other way).
    /// Descriptors are checked now against our regions and the peer's metadata; the bytes
    /// move in the background and the returned handle reports the outcome.
    pub fn post(
        &self,
        post: Post,
        local: &DescList,
        peer: &Peer,
        remote: &DescList,
    ) -> Result<Transfer, TransferError> {
        if local.total_len() != remote.total_len() {
            return Err(TransferError::Mismatch(format!(
                "{} local bytes against {} remote bytes",
                local.total_len(),
                remote.total_len()
            )));
        }
        for desc in remote.as_slice() {
            let info = peer.meta.region(desc.region).ok_or_else(|| {
                TransferError::NotFound(format!("region {} of peer {}", desc.region.0, peer.meta.name))
            })?;
            if info.kind == MemKind::Device {
                return Err(TransferError::Unsupported("device memory"));
            }
            if desc.offset.checked_add(desc.len).is_none_or(|end| end > info.len) {
                return Err(TransferError::OutOfBounds(format!(
                    "{} bytes at {} in region {} of peer {} ({} bytes)",
                    desc.len, desc.offset, desc.region.0, peer.meta.name, info.len
                )));
            }
        }
        let mut locals = Vec::with_capacity(local.len());
        for desc in local.as_slice() {
            let region = self.inner.region(desc.region)?;
            region.check(desc.offset, desc.len)?;
            locals.push((region, desc.offset, desc.len));
        }
        let segs = pair(&locals, remote.as_slice());
        let backend = peer.backend_for(remote);
        let bytes = local.total_len();
        let stats = Arc::clone(&self.inner.stats);
        match backend {
            Backend::InProcess | Backend::SharedMemory => {
                let then = self.notification_step(&post, peer);
                // One core's copy falls well short of what the memory system moves for
                // two, so larger copies are split. Up to `SHARED_BYTES` this thread copies
                // one half while a copy thread takes the other: a single wake-up on the
                // way, measured faster here than handing both halves over.
                let parts = if bytes <= INLINE_BYTES {
                    vec![segs]
                } else {
                    split_parts(segs, bytes.div_ceil(COPY_THREADS as u64))
                };
                let here = if bytes <= SHARED_BYTES { parts.len() } else { 0 };
                let state = XferState::new(&post, backend, bytes, parts.len(), then, stats);
                let target = Arc::new(match (&peer.in_process, backend) {
                    (Some(weak), _) => Remote::InProcess(weak.clone()),
                    _ => Remote::Direct(peer.direct.clone()),
                });
                let op = post.op;
                let mut parts = parts.into_iter().enumerate();
                for (i, segs) in parts.by_ref() {
                    if i + 1 == here {
                        // The last part, kept for this thread once the others are handed over.
                        let result = copy_segments(&state, op, &segs, &target);
                        state.step_done(result);
                        break;
                    }
                    let (worker, target) = (Arc::clone(&state), Arc::clone(&target));
                    self.inner.copiers.run(Box::new(move || {
                        let result = copy_segments(&worker, op, &segs, &target);
                        worker.step_done(result);
                    }));
                }
                Ok(Transfer { state })
            }
            Backend::Tcp => {
                let tcp = peer
                    .tcp
                    .as_ref()
                    .ok_or_else(|| TransferError::NotFound(format!("a TCP connection to {}", peer.meta.name)))?;
                let parts = split_parts(segs, PART_BYTES);
                let then = self.notification_step(&post, peer);
                let state = XferState::new(&post, backend, bytes, parts.len().max(1), then, stats);
                if parts.is_empty() {
                    state.step_done(Ok(()));
                } else {
                    tcp.submit(parts.into_iter().map(|segs| Job {
                        state: Arc::clone(&state),
                        op: post.op,
                        segs,
                    }));
                }
                Ok(Transfer { state })
            }
        }
    }

    /// What runs once the bytes have moved: telling the peer, if asked to.
    fn notification_step(&self, post: &Post, peer: &Peer) -> Option<Box<dyn FnOnce(Arc<XferState>) + Send>> {
        if !post.notify {
            return None;
        }
        if let Some(weak) = &peer.in_process {
            let weak = weak.clone();
            let from = Notification {
                peer: self.inner.name.clone(),
                peer_uid: self.inner.uid,
                tag: post.tag,
            };
            let name = peer.meta.name.clone();
            return Some(Box::new(move |state: Arc<XferState>| match weak.upgrade() {
                Some(target) => {
                    target.deliver(from);
                    state.finish(Ok(()));
                }
                None => state.finish(Err(TransferError::RemoteDisconnected {
                    peer: name,
                    reason: "the agent was dropped".into(),
                })),
            }));
        }
        let tcp = peer.tcp.as_ref()?.handle();
        Some(Box::new(move |state: Arc<XferState>| tcp.notify(&state)))
    }
}

enum Remote {
    InProcess(Weak<AgentInner>),
    Direct(HashMap<RegionId, Arc<Region>>),
}

fn copy_segments(state: &XferState, op: Op, segs: &[Seg], target: &Remote) -> Result<(), TransferError> {
    let in_process = match target {
        Remote::InProcess(weak) => Some(weak.upgrade().ok_or_else(|| TransferError::RemoteDisconnected {
            peer: "in-process agent".into(),
            reason: "the agent was dropped".into(),
        })?),
        Remote::Direct(_) => None,
    };
    let mut scratch = Vec::new();
    for seg in segs {
        let remote = match (&in_process, target) {
            (Some(agent), _) => agent.region(seg.remote)?,
            (None, Remote::Direct(regions)) => regions
                .get(&seg.remote)
                .cloned()
                .ok_or_else(|| TransferError::NotFound(format!("peer region {}", seg.remote.0)))?,
            (None, Remote::InProcess(_)) => return Err(TransferError::NotFound("the in-process peer".into())),
        };
        let mut done = 0;
        while done < seg.len {
            if let Some(reason) = state.should_stop() {
                return Err(reason);
            }
            let n = (seg.len - done).min(PART_BYTES);
            let (l, r) = (seg.local_off + done, seg.remote_off + done);
            match op {
                Op::Read => copy(&remote, r, &seg.local, l, n, &mut scratch)?,
                Op::Write => copy(&seg.local, l, &remote, r, n, &mut scratch)?,
            }
            done += n;
        }
    }
    Ok(())
}

/// Walks the local and remote lists together (equal total lengths), cutting where either
/// list's descriptor ends.
fn pair(locals: &[(Arc<Region>, u64, u64)], remotes: &[Desc]) -> Vec<Seg> {
    let mut segs = Vec::new();
    let (mut li, mut ri) = (0, 0);
    let (mut lo, mut ro) = (0u64, 0u64);
    while li < locals.len() && ri < remotes.len() {
        let (region, loff, llen) = &locals[li];
        let r = remotes[ri];
        let len = (llen - lo).min(r.len - ro);
        segs.push(Seg {
            local: Arc::clone(region),
            local_off: loff + lo,
            remote: r.region,
            remote_off: r.offset + ro,
            len,
        });
        lo += len;
        ro += len;
        if lo == *llen {
            li += 1;
            lo = 0;
        }
        if ro == r.len {
            ri += 1;
            ro = 0;
        }
    }
    segs
}

/// Groups segments into parts of `part_bytes` (the last may be shorter), splitting longer
/// segments, so that a transfer's parts spread over connections or copy threads.
fn split_parts(segs: Vec<Seg>, part_bytes: u64) -> Vec<Vec<Seg>> {
    let mut parts = Vec::new();
    let mut current: Vec<Seg> = Vec::new();
    let mut size = 0;
    for seg in segs {
        let mut done = 0;
        while done < seg.len {
            let n = (seg.len - done).min(part_bytes - size);
            current.push(Seg {
                local: Arc::clone(&seg.local),
                local_off: seg.local_off + done,
                remote: seg.remote,
                remote_off: seg.remote_off + done,
                len: n,
            });
            done += n;
            size += n;
            if size == part_bytes {
                parts.push(std::mem::take(&mut current));
                size = 0;
            }
        }
    }
    if !current.is_empty() {
        parts.push(current);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(len: u64) -> Arc<Region> {
        Arc::new(Region::host(RegionId(0), len).expect("region"))
    }

    #[test]
    fn pairing_cuts_where_either_list_ends() {
        let a = host(100);
        let locals = vec![(Arc::clone(&a), 0, 30), (Arc::clone(&a), 50, 20)];
        let remotes = [
            Desc {
                region: RegionId(7),
                offset: 0,
                len: 10,
            },
            Desc {
                region: RegionId(8),
                offset: 5,
                len: 40,
            },
        ];
        let cuts: Vec<(u64, u32, u64, u64)> = pair(&locals, &remotes)
            .iter()
            .map(|s| (s.local_off, s.remote.0, s.remote_off, s.len))
            .collect();
        assert_eq!(cuts, vec![(0, 7, 0, 10), (10, 8, 5, 20), (50, 8, 25, 20)]);
    }

    #[test]
    fn parts_are_cut_at_the_part_size() {
        let a = host(1);
        let seg = |off, len| Seg {
            local: Arc::clone(&a),
            local_off: off,
            remote: RegionId(0),
            remote_off: off,
            len,
        };
        let parts = split_parts(
            vec![
                seg(0, PART_BYTES + 10),
                seg(PART_BYTES * 2, PART_BYTES - 10),
                seg(0, 30),
            ],
            PART_BYTES,
        );
        let sizes: Vec<u64> = parts.iter().map(|p| p.iter().map(|s| s.len).sum()).collect();
        assert_eq!(sizes, vec![PART_BYTES, PART_BYTES, 30]);
        assert_eq!(parts[1].len(), 2, "the second part joins two segments");
        let halves = split_parts(vec![seg(0, 7), seg(7, 6)], 13u64.div_ceil(2));
        let sizes: Vec<u64> = halves.iter().map(|p| p.iter().map(|s| s.len).sum()).collect();
        assert_eq!(sizes, vec![7, 6], "an even split for the copy threads");
    }
}
