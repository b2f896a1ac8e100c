//! Counters every transfer updates, read by whoever exports metrics (the frontend's
//! `/metrics` in `turbine serve`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// How a transfer's bytes moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Backend {
    /// Both sides in this process: a copy under the regions' locks.
    InProcess,
    /// A peer process on this host: its shared or file regions read and written directly.
    SharedMemory,
    /// A peer's listener, over several connections.
    Tcp,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::InProcess, Backend::SharedMemory, Backend::Tcp];

    pub fn label(self) -> &'static str {
        match self {
            Backend::InProcess => "in_process",
            Backend::SharedMemory => "shared_memory",
            Backend::Tcp => "tcp",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// READ brings a peer's bytes here; WRITE sends ours there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Read,
    Write,
}

impl Op {
    pub fn label(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
        }
    }
}

#[derive(Default)]
struct PerBackend {
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    completed: AtomicU64,
    busy_nanos: AtomicU64,
    in_flight: AtomicU64,
}

/// An agent's transfer counters.
#[derive(Default)]
pub struct Stats {
    backends: [PerBackend; 3],
    failures: Mutex<BTreeMap<(Backend, &'static str), u64>>,
    peers_refused: AtomicU64,
    notifications_lost: AtomicU64,
}

/// The counters at one moment, for one backend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub completed: u64,
    /// Summed wall time of completed transfers; bytes over this is the mean bandwidth.
    pub busy_nanos: u64,
    pub in_flight: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub backends: BTreeMap<Backend, BackendStats>,
    /// Failed transfers by backend and error kind (`TransferError::kind`).
    pub failures: BTreeMap<(Backend, &'static str), u64>,
    /// Peers refused at connect or at the handshake for an incompatible protocol or layout.
    pub peers_refused: u64,
    /// Notifications of finished transfers that could not be sent to their peer.
    pub notifications_lost: u64,
}

impl Stats {
    pub(crate) fn refused(&self) {
        self.peers_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn notifications_lost(&self, n: u64) {
        self.notifications_lost.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn started(&self, backend: Backend) {
        self.backends[backend.index()].in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn finished(&self, backend: Backend, op: Op, bytes: u64, nanos: u64, failure: Option<&'static str>) {
        let b = &self.backends[backend.index()];
        b.in_flight.fetch_sub(1, Ordering::Relaxed);
        match failure {
            Some(kind) => *self.failures.lock().entry((backend, kind)).or_default() += 1,
            None => {
                let counter = match op {
                    Op::Read => &b.bytes_read,
                    Op::Write => &b.bytes_written,
                };
                counter.fetch_add(bytes, Ordering::Relaxed);
                b.completed.fetch_add(1, Ordering::Relaxed);
                b.busy_nanos.fetch_add(nanos, Ordering::Relaxed);
            }
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let backends = Backend::ALL
            .iter()
            .map(|&backend| {
                let b = &self.backends[backend.index()];
                let stats = BackendStats {
                    bytes_read: b.bytes_read.load(Ordering::Relaxed),
                    bytes_written: b.bytes_written.load(Ordering::Relaxed),
                    completed: b.completed.load(Ordering::Relaxed),
                    busy_nanos: b.busy_nanos.load(Ordering::Relaxed),
                    in_flight: b.in_flight.load(Ordering::Relaxed),
                };
                (backend, stats)
            })
            .collect();
        StatsSnapshot {
            backends,
            failures: self.failures.lock().clone(),
            peers_refused: self.peers_refused.load(Ordering::Relaxed),
            notifications_lost: self.notifications_lost.load(Ordering::Relaxed),
        }
    }
}
