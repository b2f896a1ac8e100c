//! The block manager's counters, shared with whoever exports them: counters only (rates
//! are derived by the reader), named as Dynamo's KVBM names its metrics.

use std::sync::atomic::{AtomicU64, Ordering};

/// A copy path between tiers, as Dynamo labels them: offloads device to host (`d2h`), host
/// to disk (`h2d`) and device to disk (`d2d`); onboards host to device (`h2d`) and disk to
/// device (`d2d`); prefetches disk to host (`disk2host`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    OffloadD2h,
    OffloadH2d,
    OffloadD2d,
    OnboardH2d,
    OnboardD2d,
    Prefetch,
}

impl Path {
    pub const ALL: [Path; 6] = [
        Path::OffloadD2h,
        Path::OffloadH2d,
        Path::OffloadD2d,
        Path::OnboardH2d,
        Path::OnboardD2d,
        Path::Prefetch,
    ];

    /// (direction, path) as metric names and labels spell them.
    pub fn labels(self) -> (&'static str, &'static str) {
        match self {
            Path::OffloadD2h => ("offload", "d2h"),
            Path::OffloadH2d => ("offload", "h2d"),
            Path::OffloadD2d => ("offload", "d2d"),
            Path::OnboardH2d => ("onboard", "h2d"),
            Path::OnboardD2d => ("onboard", "d2d"),
            Path::Prefetch => ("prefetch", "disk2host"),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why an offload did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// The pool reused the block before its copy ran.
    SourceGone,
    /// The tier had it already.
    Present,
    /// Full, and everything in it leased or pinned.
    TargetFull,
    /// The policy's admission control turned it away.
    NotAdmitted,
    /// The offload queue was full.
    QueueFull,
    /// A write-back copy found its path's bandwidth spent.
    Bandwidth,
    /// Not yet seen often enough to be written to disk.
    Unseen,
}

impl Skip {
    pub const ALL: [Skip; 7] = [
        Skip::SourceGone,
        Skip::Present,
        Skip::TargetFull,
        Skip::NotAdmitted,
        Skip::QueueFull,
        Skip::Bandwidth,
        Skip::Unseen,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Skip::SourceGone => "source_gone",
            Skip::Present => "already_present",
            Skip::TargetFull => "target_full",
            Skip::NotAdmitted => "not_admitted",
            Skip::QueueFull => "queue_full",
            Skip::Bandwidth => "bandwidth",
            Skip::Unseen => "unseen",
        }
    }
}

/// A tier below the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TierKind {
    Host,
    Disk,
}

impl TierKind {
    pub fn label(self) -> &'static str {
        match self {
            TierKind::Host => "host",
            TierKind::Disk => "disk",
        }
    }
}

#[derive(Debug, Default)]
pub struct KvbmStats {
    /// Prompt tokens found in a tier below the pool and loaded instead of computed.
    pub matched_tokens: AtomicU64,
    /// Blocks looked up below the pool (after a pool miss), and those found per tier.
    pub lookups: AtomicU64,
    pub host_hits: AtomicU64,
    pub disk_hits: AtomicU64,
    /// Onboards skipped because recomputing was estimated faster than the copy.
    pub onboard_skipped_slower: AtomicU64,
    pub onboard_failed: AtomicU64,
    /// Loads and prefetches running now.
    pub in_flight: AtomicU64,
    /// Requests admitted before their prefetch finished (best effort, or a timeout).
    pub prefetch_abandoned: AtomicU64,
    pub host_evictions: AtomicU64,
    pub disk_evictions: AtomicU64,
    pub queue_depth: AtomicU64,
    /// Blocks each tier holds now, and its slots.
    pub host_blocks: AtomicU64,
    pub disk_blocks: AtomicU64,
    pub host_capacity: AtomicU64,
    pub disk_capacity: AtomicU64,
    /// The policy each tier runs, for the label of its evictions.
    pub host_policy: parking_lot::Mutex<&'static str>,
    pub disk_policy: parking_lot::Mutex<&'static str>,
    blocks: [AtomicU64; Path::ALL.len()],
    bytes: [AtomicU64; Path::ALL.len()],
    nanos: [AtomicU64; Path::ALL.len()],
    /// By `Skip`, in declaration order (`Skip::ALL`).
    skips: [AtomicU64; Skip::ALL.len()],
}

impl KvbmStats {
    pub(crate) fn copied(&self, path: Path, blocks: u64, bytes: u64, elapsed: std::time::Duration) {
        let i = path.index();
        self.blocks[i].fetch_add(blocks, Ordering::Relaxed);
        self.bytes[i].fetch_add(bytes, Ordering::Relaxed);
        self.nanos[i].fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    pub(crate) fn skipped(&self, why: Skip) {
        self.skips[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn blocks(&self, path: Path) -> u64 {
        self.blocks[path.index()].load(Ordering::Relaxed)
    }

    pub fn bytes(&self, path: Path) -> u64 {
        self.bytes[path.index()].load(Ordering::Relaxed)
    }

    /// Time spent copying on `path`, in seconds.
    pub fn seconds(&self, path: Path) -> f64 {
        self.nanos[path.index()].load(Ordering::Relaxed) as f64 / 1e9
    }

    pub fn skips(&self, why: Skip) -> u64 {
        self.skips[why as usize].load(Ordering::Relaxed)
    }

    pub fn evictions(&self, tier: TierKind) -> u64 {
        match tier {
            TierKind::Host => self.host_evictions.load(Ordering::Relaxed),
            TierKind::Disk => self.disk_evictions.load(Ordering::Relaxed),
        }
    }

    pub fn hits(&self, tier: TierKind) -> u64 {
        match tier {
            TierKind::Host => self.host_hits.load(Ordering::Relaxed),
            TierKind::Disk => self.disk_hits.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
