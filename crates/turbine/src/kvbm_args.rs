//! The KV block manager's flags: tiers below each worker's KV cache, their sizes and
//! policies, parsed once into `turbine_kvbm::KvbmConfig`.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use turbine_kvbm::policy::{PolicyConfig, PolicyKind};
use turbine_kvbm::{KvbmConfig, OffloadMode, PrefetchPolicy, TierSize};
use turbine_preprocess::Preprocessor;

#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "KV block manager: host and disk tiers (native and mocker engines)")]
pub struct KvbmArgs {
    /// Host memory for KV blocks evicted from each worker's cache, in GiB (G2). At least the
    /// size of the KV cache: a smaller tier would only churn.
    #[arg(long)]
    kvbm_host_gib: Option<f64>,
    /// The host tier in blocks instead (wins over --kvbm-host-gib).
    #[arg(long)]
    kvbm_host_blocks: Option<usize>,
    /// Local disk for KV blocks, in GiB (G3): a preallocated file per worker in
    /// --kvbm-disk-dir, reopened with its blocks after a restart.
    #[arg(long)]
    kvbm_disk_gib: Option<f64>,
    /// The disk tier in blocks instead (wins over --kvbm-disk-gib).
    #[arg(long)]
    kvbm_disk_blocks: Option<usize>,
    /// Directory of the disk tier's files: worker i's in worker-i/ below it.
    #[arg(long)]
    kvbm_disk_dir: Option<PathBuf>,
    /// Eviction policy of each tier: lru, lfu, fifo, ttl, lineage, arc or adaptive.
    #[arg(long, default_value = "lru")]
    kvbm_policy: PolicyKind,
    /// The disk tier's policy, if not --kvbm-policy.
    #[arg(long)]
    kvbm_disk_policy: Option<PolicyKind>,
    /// When blocks are copied to host memory: write-through (as soon as they are cached)
    /// or write-back (when the KV cache evicts them).
    #[arg(long, default_value = "write-through")]
    kvbm_offload: OffloadMode,
    /// Sightings (offers and hits) before a block is written to disk.
    #[arg(long, default_value_t = 2)]
    kvbm_disk_after: u32,
    /// Bandwidth limit of copies from the KV cache to host memory, GB/s [default: none].
    #[arg(long)]
    kvbm_host_gbps: Option<f64>,
    /// Bandwidth limit of copies to disk, GB/s [default: none].
    #[arg(long)]
    kvbm_disk_gbps: Option<f64>,
    /// ttl policy: seconds a block may sit unused before it expires.
    #[arg(long, default_value_t = 600.0)]
    kvbm_ttl_secs: f64,
    /// lfu policy: seconds over which use counts halve.
    #[arg(long, default_value_t = 300.0)]
    kvbm_lfu_half_life_secs: f64,
    /// Offloads waiting at most; more are dropped and counted.
    #[arg(long, default_value_t = 4096)]
    kvbm_queue_blocks: usize,
    /// Copies run per step at most.
    #[arg(long, default_value_t = 64)]
    kvbm_max_in_flight: usize,
    /// Bring a request's blocks from disk up to host memory as it arrives: off,
    /// best-effort (admit it as soon as there is room, with what has arrived),
    /// wait-complete, or timeout (wait at most --kvbm-prefetch-timeout-ms). With
    /// prefetching on, disk blocks reach the KV cache only through host memory; off, they
    /// are read straight into it, beside the engine's steps.
    #[arg(long, default_value = "off")]
    kvbm_prefetch: String,
    #[arg(long, default_value_t = 200)]
    kvbm_prefetch_timeout_ms: u64,
    /// Prompts whose blocks no tier evicts (system prompts), as JSON lines: {"system":
    /// "..."} for a chat's system message as the model's chat template renders it, or
    /// {"prompt": "..."} for the start of a completion prompt.
    #[arg(long)]
    kvbm_pin_prompts: Option<PathBuf>,
    /// Mocker: simulated GB/s of loads from host memory and from disk.
    #[arg(long, default_value_t = 50.0)]
    kvbm_onboard_host_gbps: f64,
    #[arg(long, default_value_t = 6.0)]
    kvbm_onboard_disk_gbps: f64,
}

fn gib(flag: &str, v: Option<f64>) -> anyhow::Result<Option<u64>> {
    match v {
        None => Ok(None),
        Some(g) if g.is_finite() && g > 0.0 => Ok(Some((g * (1u64 << 30) as f64) as u64)),
        Some(g) => bail!("{flag} must be a positive number of GiB, got {g}"),
    }
}

fn rate(flag: &str, v: Option<f64>) -> anyhow::Result<Option<f64>> {
    match v {
        None => Ok(None),
        Some(g) if g.is_finite() && g > 0.0 => Ok(Some(g * 1e9)),
        Some(g) => bail!("{flag} must be a positive number of GB/s, got {g}"),
    }
}

fn secs(flag: &str, v: f64) -> anyhow::Result<u64> {
    if !(v.is_finite() && v >= 0.0) {
        bail!("{flag} must be a non-negative number of seconds, got {v}");
    }
    Ok((v * 1000.0) as u64)
}

impl KvbmArgs {
    pub fn config(&self) -> anyhow::Result<KvbmConfig> {
        for (flag, blocks) in [
            ("--kvbm-host-blocks", self.kvbm_host_blocks),
            ("--kvbm-disk-blocks", self.kvbm_disk_blocks),
        ] {
            if blocks == Some(0) {
                bail!("{flag} must be at least 1, got 0");
            }
        }
        let disk_sized = self.kvbm_disk_gib.is_some() || self.kvbm_disk_blocks.is_some();
        if disk_sized && self.kvbm_disk_dir.is_none() {
            bail!("--kvbm-disk-gib and --kvbm-disk-blocks need --kvbm-disk-dir, the directory of the disk tier's file");
        }
        if self.kvbm_disk_dir.is_some() && !disk_sized {
            bail!("--kvbm-disk-dir needs a size: --kvbm-disk-gib or --kvbm-disk-blocks");
        }
        if self.kvbm_disk_after == 0 {
            bail!("--kvbm-disk-after must be at least 1, got 0");
        }
        if self.kvbm_queue_blocks == 0 || self.kvbm_max_in_flight == 0 {
            bail!("--kvbm-queue-blocks and --kvbm-max-in-flight must be at least 1");
        }
        let prefetch = PrefetchPolicy::parse(
            &self.kvbm_prefetch,
            std::time::Duration::from_millis(self.kvbm_prefetch_timeout_ms),
        )
        .map_err(|e| anyhow::anyhow!("--kvbm-prefetch: {e}"))?;
        let host_sized = self.kvbm_host_gib.is_some() || self.kvbm_host_blocks.is_some();
        if prefetch != PrefetchPolicy::Off && !(host_sized && disk_sized) {
            bail!(
                "--kvbm-prefetch {} brings disk blocks up to host memory: it needs both a host and a disk tier",
                self.kvbm_prefetch
            );
        }
        if self.kvbm_pin_prompts.is_some() && !(host_sized || disk_sized) {
            bail!("--kvbm-pin-prompts pins blocks in the tiers below the KV cache: give a host or a disk tier");
        }
        Ok(KvbmConfig {
            host: TierSize {
                bytes: gib("--kvbm-host-gib", self.kvbm_host_gib)?,
                blocks: self.kvbm_host_blocks,
            },
            disk: TierSize {
                bytes: gib("--kvbm-disk-gib", self.kvbm_disk_gib)?,
                blocks: self.kvbm_disk_blocks,
            },
            disk_dir: self.kvbm_disk_dir.clone(),
            host_policy: self.kvbm_policy,
            disk_policy: self.kvbm_disk_policy.unwrap_or(self.kvbm_policy),
            policy: PolicyConfig {
                ttl_ms: secs("--kvbm-ttl-secs", self.kvbm_ttl_secs)?,
                lfu_half_life_ms: secs("--kvbm-lfu-half-life-secs", self.kvbm_lfu_half_life_secs)?,
                ..PolicyConfig::default()
            },
            offload: self.kvbm_offload,
            disk_after_sightings: self.kvbm_disk_after,
            host_bytes_per_sec: rate("--kvbm-host-gbps", self.kvbm_host_gbps)?,
            disk_bytes_per_sec: rate("--kvbm-disk-gbps", self.kvbm_disk_gbps)?,
            queue_blocks: self.kvbm_queue_blocks,
            max_in_flight: self.kvbm_max_in_flight,
            prefetch,
            pinned: Vec::new(),
        })
    }

    /// The token prefixes of --kvbm-pin-prompts, as `pre` tokenizes requests; each must
    /// fill at least one block of `block_size` tokens.
    pub fn pinned(&self, pre: &Preprocessor, block_size: usize) -> anyhow::Result<Vec<Vec<u32>>> {
        let Some(path) = &self.kvbm_pin_prompts else {
            return Ok(Vec::new());
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("--kvbm-pin-prompts {}: {e}", path.display()))?;
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = || format!("--kvbm-pin-prompts {} line {}", path.display(), i + 1);
            let tokens = pin_tokens(pre, line).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
            if tokens.len() < block_size {
                bail!(
                    "{}: fewer tokens ({}) than one block ({block_size}): nothing to pin",
                    at(),
                    tokens.len()
                );
            }
            out.push(tokens);
        }
        if out.is_empty() {
            bail!("--kvbm-pin-prompts {}: no prompt in the file", path.display());
        }
        Ok(out)
    }

    /// The mocker's simulated load bandwidths, bytes per second.
    pub fn onboard_rates(&self) -> anyhow::Result<(f64, f64)> {
        let host = rate("--kvbm-onboard-host-gbps", Some(self.kvbm_onboard_host_gbps))?.unwrap_or_default();
        let disk = rate("--kvbm-onboard-disk-gbps", Some(self.kvbm_onboard_disk_gbps))?.unwrap_or_default();
        Ok((host, disk))
    }
}

/// The tokens a request that starts with the pinned prompt `line` starts with.
fn pin_tokens(pre: &Preprocessor, line: &str) -> anyhow::Result<Vec<u32>> {
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| anyhow::anyhow!("not a JSON object: {e}"))?;
    let field = |name: &str| value.get(name).and_then(serde_json::Value::as_str);
    match (field("system"), field("prompt")) {
        (Some(system), None) => {
            // What every conversation with this system message starts with: the common
            // prefix of two that differ from their first user message on.
            let render = |user: &str| -> anyhow::Result<Vec<u32>> {
                let messages = [
                    serde_json::json!({"role": "system", "content": system}),
                    serde_json::json!({"role": "user", "content": user}),
                ];
                Ok(pre.encode_chat(&messages, None)?.1)
            };
            let (a, b) = (render("a")?, render("b")?);
            Ok(a.iter().zip(&b).take_while(|(x, y)| x == y).map(|(x, _)| *x).collect())
        }
        (None, Some(prompt)) => {
            let mut tokens = pre.tokenizer().encode(prompt, true)?;
            // The text that follows in a request may merge with the last token.
            tokens.pop();
            Ok(tokens)
        }
        _ => bail!("expected {{\"system\": \"...\"}} or {{\"prompt\": \"...\"}}"),
    }
}

/// Worker `i`'s settings: its disk file in `worker-{i}/` below the directory given, so that
/// the workers of one `turbine serve` never share one (workers of separate processes given
/// the same directory are refused by the file's lock).
pub fn for_worker(config: &KvbmConfig, i: usize) -> KvbmConfig {
    let mut c = config.clone();
    c.disk_dir = c.disk_dir.map(|d| d.join(format!("worker-{i}")));
    c
}
