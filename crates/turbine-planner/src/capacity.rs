//! What one replica sustains: TTFT and throughput by prompt length, ITL by concurrency and
//! context, as `turbine profile` measured them, interpolated between the points measured.

use std::time::Duration;

/// Prefill of one prompt length on one replica.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PrefillPoint {
    pub isl: u32,
    /// TTFT of a request alone on the replica.
    pub ttft_ms: f64,
    /// Prompt tokens a second the replica computes with its queue never empty.
    pub tokens_per_s: f64,
}

/// Decode at one context length and concurrency on one replica.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DecodePoint {
    pub context: u32,
    pub concurrency: u32,
    pub itl_ms: f64,
}

/// A replica's measured performance, as `turbine profile` writes it (JSON).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CapacityModel {
    /// What was profiled, for people reading the file.
    pub engine: String,
    pub prefill: Vec<PrefillPoint>,
    /// A full grid: every context with every concurrency.
    pub decode: Vec<DecodePoint>,
    /// Most sequences a replica runs at once.
    pub max_concurrency: u32,
    /// Tokens of KV cache a replica holds.
    pub kv_tokens: u64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CapacityError {
    #[error("the capacity model has no {0} points")]
    Empty(&'static str),
    #[error("the capacity model's {table} point {index} is not a positive finite measurement")]
    Invalid { table: &'static str, index: usize },
    #[error(
        "the capacity model's decode points are not a full grid: context {context} lacks concurrency {concurrency}"
    )]
    NotAGrid { context: u32, concurrency: u32 },
    #[error("the capacity model's max concurrency and KV tokens must be above zero")]
    NoRoom,
}

impl CapacityModel {
    /// Checks the tables and sorts them for interpolation.
    pub fn validated(mut self) -> Result<Self, CapacityError> {
        if self.prefill.is_empty() {
            return Err(CapacityError::Empty("prefill"));
        }
        if self.decode.is_empty() {
            return Err(CapacityError::Empty("decode"));
        }
        if self.max_concurrency == 0 || self.kv_tokens == 0 {
            return Err(CapacityError::NoRoom);
        }
        let good = |x: f64| x.is_finite() && x > 0.0;
        for (index, p) in self.prefill.iter().enumerate() {
            if p.isl == 0 || !good(p.ttft_ms) || !good(p.tokens_per_s) {
                return Err(CapacityError::Invalid {
                    table: "prefill",
                    index,
                });
            }
        }
        for (index, p) in self.decode.iter().enumerate() {
            if p.concurrency == 0 || !good(p.itl_ms) {
                return Err(CapacityError::Invalid { table: "decode", index });
            }
        }
        self.prefill.sort_by_key(|p| p.isl);
        self.prefill.dedup_by_key(|p| p.isl);
        self.decode.sort_by_key(|p| (p.context, p.concurrency));
        self.decode.dedup_by_key(|p| (p.context, p.concurrency));
        let (contexts, concurrencies) = self.axes();
        for &context in &contexts {
            for &concurrency in &concurrencies {
                if !self
                    .decode
                    .iter()
                    .any(|p| p.context == context && p.concurrency == concurrency)
                {
                    return Err(CapacityError::NotAGrid { context, concurrency });
                }
            }
        }
        Ok(self)
    }

    fn axes(&self) -> (Vec<u32>, Vec<u32>) {
        let mut contexts: Vec<u32> = self.decode.iter().map(|p| p.context).collect();
        let mut concurrencies: Vec<u32> = self.decode.iter().map(|p| p.concurrency).collect();
        contexts.sort_unstable();
        contexts.dedup();
        concurrencies.sort_unstable();
        concurrencies.dedup();
        (contexts, concurrencies)
    }

    /// TTFT of a lone prompt of `isl` tokens.
    pub fn lone_ttft(&self, isl: f64) -> Duration {
        let ms = interpolate(self.prefill.iter().map(|p| (f64::from(p.isl), p.ttft_ms)), isl);
        Duration::from_secs_f64(ms.max(0.0) / 1000.0)
    }

    /// Prompt tokens a second a saturated replica computes at prompts of `isl` tokens.
    pub fn prefill_rate(&self, isl: f64) -> f64 {
        interpolate(self.prefill.iter().map(|p| (f64::from(p.isl), p.tokens_per_s)), isl).max(1.0)
    }

    /// ITL with `concurrency` sequences of `context` tokens on one replica.
    pub fn itl(&self, context: f64, concurrency: f64) -> Duration {
        let (contexts, _) = self.axes();
        let at = |c: u32| {
            interpolate(
                self.decode
                    .iter()
                    .filter(|p| p.context == c)
                    .map(|p| (f64::from(p.concurrency), p.itl_ms)),
                concurrency,
            )
        };
        let ms = interpolate(contexts.iter().map(|&c| (f64::from(c), at(c))), context);
        Duration::from_secs_f64(ms.max(0.0) / 1000.0)
    }

    /// Most sequences of `context` tokens one replica decodes within `itl`: bounded by its
    /// sequence cap and its KV cache. At least 1.
    pub fn decode_concurrency(&self, context: f64, itl: Duration) -> f64 {
        let kv_bound = (self.kv_tokens as f64 / context.max(1.0)).floor();
        let bound = kv_bound.min(f64::from(self.max_concurrency)).max(1.0);
        if self.itl(context, bound) <= itl {
            return bound;
        }
        // ITL rises with concurrency: bisect for the largest within the target.
        let (mut lo, mut hi) = (1.0_f64, bound);
        if self.itl(context, lo) > itl {
            return 1.0;
        }
        for _ in 0..40 {
            let mid = 0.5 * (lo + hi);
            if self.itl(context, mid) <= itl {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        // The bisection ends a hair either side of an exact fit.
        let above = hi.floor();
        if self.itl(context, above) <= itl {
            above
        } else {
            lo.floor().max(1.0)
        }
    }

    /// The utilisation at which queueing keeps prefills of `isl` tokens within `ttft`:
    /// M/D/1's mean wait `ρS / 2(1-ρ)` on top of the lone TTFT `S`, capped at `cap`.
    pub fn prefill_utilization(&self, isl: f64, ttft: Duration, cap: f64) -> f64 {
        let s = self.lone_ttft(isl).as_secs_f64();
        let t = ttft.as_secs_f64();
        if s >= t {
            // Out of reach whatever the size: run replicas lightly loaded.
            return 0.1_f64.min(cap);
        }
        (2.0 * (t - s) / (2.0 * t - s)).min(cap)
    }
}

/// Piecewise-linear through `points` (x ascending), extrapolated linearly from the last two
/// at either end.
fn interpolate(points: impl Iterator<Item = (f64, f64)>, x: f64) -> f64 {
    let points: Vec<(f64, f64)> = points.collect();
    match points.len() {
        0 => return 0.0,
        1 => return points[0].1,
        _ => {}
    }
    let i = points.partition_point(|&(px, _)| px < x).clamp(1, points.len() - 1);
    let ((x0, y0), (x1, y1)) = (points[i - 1], points[i]);
    if x1 == x0 {
        return y1;
    }
    y0 + (y1 - y0) * (x - x0) / (x1 - x0)
}
