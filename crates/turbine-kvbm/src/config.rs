//! The block manager's settings, parsed once by the binary and checked against the engine's
//! pool before anything is allocated.

use std::path::PathBuf;

use crate::policy::{PolicyConfig, PolicyKind};
use crate::KvbmError;

/// A tier's size: in bytes, in blocks, or both (blocks win).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierSize {
    pub bytes: Option<u64>,
    pub blocks: Option<usize>,
}

impl TierSize {
    pub fn is_set(&self) -> bool {
        self.bytes.is_some() || self.blocks.is_some()
    }

    /// Blocks of `block_bytes` the size gives; `block_bytes` 0 (a tier of metadata) counts
    /// bytes as if each block were one byte, so that only `blocks` should be given then.
    pub fn blocks(&self, block_bytes: usize) -> usize {
        match (self.blocks, self.bytes) {
            (Some(b), _) => b,
            (None, Some(bytes)) => (bytes / block_bytes.max(1) as u64) as usize,
            (None, None) => 0,
        }
    }
}

/// When a block the engine's pool holds is copied to host memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OffloadMode {
    /// As soon as the pool registers it (copies happen off the critical path of an
    /// eviction, and a block already in host memory is not copied again).
    #[default]
    WriteThrough,
    /// When the pool evicts it: fewer copies, but each on the path of the allocation that
    /// evicted it.
    WriteBack,
}

impl std::str::FromStr for OffloadMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "write-through" => Ok(OffloadMode::WriteThrough),
            "write-back" => Ok(OffloadMode::WriteBack),
            other => Err(format!("unknown offload mode {other:?}: write-through or write-back")),
        }
    }
}

/// Whether a request's blocks on disk are brought up to host memory while it waits to be
/// admitted, and whether admission waits for them; HiCache's names. With prefetching on,
/// disk blocks reach the pool only through host memory: whatever is still on disk when the
/// request is admitted is recomputed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PrefetchPolicy {
    /// No prefetch: admission loads disk blocks straight into the pool, off the engine's
    /// thread.
    #[default]
    Off,
    /// Prefetch, and admit as soon as there is room, with what has arrived.
    BestEffort,
    /// Admit only once the request's prefetch has finished.
    WaitComplete,
    /// Wait for the prefetch at most this long after the request arrived.
    Timeout(std::time::Duration),
}

impl PrefetchPolicy {
    /// `off`, `best-effort`, `wait-complete` or `timeout` (with `timeout`, the wait to use).
    pub fn parse(name: &str, timeout: std::time::Duration) -> Result<Self, String> {
        match name {
            "off" => Ok(PrefetchPolicy::Off),
            "best-effort" => Ok(PrefetchPolicy::BestEffort),
            "wait-complete" => Ok(PrefetchPolicy::WaitComplete),
            "timeout" => Ok(PrefetchPolicy::Timeout(timeout)),
            other => Err(format!(
                "unknown prefetch policy {other:?}: off, best-effort, wait-complete or timeout"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct KvbmConfig {
    /// G2: host memory. Unset, blocks offload straight to disk, if there is one.
    pub host: TierSize,
    /// G3: a preallocated file in `disk_dir`.
    pub disk: TierSize,
    pub disk_dir: Option<PathBuf>,
    pub host_policy: PolicyKind,
    pub disk_policy: PolicyKind,
    pub policy: PolicyConfig,
    pub offload: OffloadMode,
    /// Sightings (offers and matches) a block needs before it is written to disk: 2 spares
    /// the disk blocks that are never seen again.
    pub disk_after_sightings: u32,
    /// Bandwidth limits per path, bytes per second: device to host, and to disk.
    pub host_bytes_per_sec: Option<f64>,
    pub disk_bytes_per_sec: Option<f64>,
    /// Offloads waiting at most; more are dropped and counted.
    pub queue_blocks: usize,
    /// Copies run per drain, at most: the cap on transfers in flight.
    pub max_in_flight: usize,
    pub prefetch: PrefetchPolicy,
    /// Token prefixes (an operator's system prompts) whose full blocks no tier evicts.
    pub pinned: Vec<Vec<u32>>,
}

impl Default for KvbmConfig {
    fn default() -> Self {
        Self {
            host: TierSize::default(),
            disk: TierSize::default(),
            disk_dir: None,
            host_policy: PolicyKind::Lru,
            disk_policy: PolicyKind::Lru,
            policy: PolicyConfig::default(),
            offload: OffloadMode::WriteThrough,
            disk_after_sightings: 2,
            host_bytes_per_sec: None,
            disk_bytes_per_sec: None,
            queue_blocks: 4096,
            max_in_flight: 64,
            prefetch: PrefetchPolicy::Off,
            pinned: Vec::new(),
        }
    }
}

/// What the engine's pool is, for sizing the tiers below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolShape {
    /// Bytes per block; 0 for an engine that simulates its KV (the mocker).
    pub block_bytes: usize,
    pub blocks: usize,
    /// Hash of the model, dtype and layout: a disk file written for another is not read.
    pub compat: u64,
    /// The engine simulates its KV (the mocker): tiers keep metadata only, sized as if
    /// each block held `block_bytes`.
    pub simulated: bool,
}

/// Tier sizes in blocks, resolved and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    pub host: usize,
    pub disk: usize,
}

impl KvbmConfig {
    /// Whether any tier below the pool is configured.
    pub fn enabled(&self) -> bool {
        self.host.is_set() || self.disk.is_set()
    }

    pub fn sizes(&self, pool: &PoolShape) -> Result<Sizes, KvbmError> {
        let host = self.host.blocks(pool.block_bytes);
        let disk = self.disk.blocks(pool.block_bytes);
        if self.host.is_set() && host < pool.blocks {
            return Err(KvbmError::Config(format!(
                "a host tier of {host} blocks is smaller than the engine's pool of {} blocks: every block it \
                 holds would be evicted before the pool's own copy is, so it would churn without serving a hit; \
                 give it at least {} bytes",
                pool.blocks,
                pool.blocks as u64 * pool.block_bytes as u64
            )));
        }
        if self.disk.is_set() {
            if disk == 0 {
                return Err(KvbmError::Config(format!(
                    "a disk tier of {:?} bytes holds no block of {} bytes",
                    self.disk.bytes, pool.block_bytes
                )));
            }
            if self.disk_dir.is_none() {
                return Err(KvbmError::Config(
                    "a disk tier needs a directory (--kvbm-disk-dir)".into(),
                ));
            }
        }
        if self.prefetch != PrefetchPolicy::Off && !(self.host.is_set() && self.disk.is_set()) {
            return Err(KvbmError::Config(
                "prefetching brings disk blocks up to host memory: it needs both a host and a disk tier".into(),
            ));
        }
        if self.disk_after_sightings == 0 {
            return Err(KvbmError::Config("--kvbm-disk-after must be at least 1".into()));
        }
        if self.queue_blocks == 0 || self.max_in_flight == 0 {
            return Err(KvbmError::Config(
                "the offload queue and the copies in flight need room for one block".into(),
            ));
        }
        for (what, rate) in [("host", self.host_bytes_per_sec), ("disk", self.disk_bytes_per_sec)] {
            if let Some(r) = rate {
                if !(r.is_finite() && r > 0.0) {
                    return Err(KvbmError::Config(format!(
                        "the {what} bandwidth limit {r} is not a positive rate"
                    )));
                }
            }
        }
        Ok(Sizes { host, disk })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_win_over_bytes_and_a_small_host_tier_is_refused_with_why() {
        let pool = PoolShape {
            block_bytes: 1000,
            blocks: 8,
            compat: 1,
            simulated: false,
        };
        let sized = |host: TierSize| KvbmConfig {
            host,
            ..KvbmConfig::default()
        };
        let both = TierSize {
            bytes: Some(100_000),
            blocks: Some(9),
        };
        assert_eq!(sized(both).sizes(&pool).map(|s| s.host).ok(), Some(9));
        let bytes = TierSize {
            bytes: Some(20_500),
            blocks: None,
        };
        assert_eq!(sized(bytes).sizes(&pool).map(|s| s.host).ok(), Some(20));
        let small = TierSize {
            bytes: Some(7_999),
            blocks: None,
        };
        let err = sized(small)
            .sizes(&pool)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("smaller than the engine's pool") && err.contains("churn"),
            "{err}"
        );
        let no_dir = KvbmConfig {
            disk: TierSize {
                bytes: None,
                blocks: Some(4),
            },
            ..KvbmConfig::default()
        };
        assert!(no_dir.sizes(&pool).is_err());
    }
}
