//! How long a simulated engine step takes, from a timing model fitted to a real GPU.

use std::time::Duration;

/// Milliseconds to prefill `t` new tokens in one step.
pub fn prefill_ms(t: usize) -> f64 {
    let t = t as f64;
    4.209989e-7 * t * t + 1.518344e-2 * t + 16.50142
}

/// Milliseconds for one decode step with a fraction `u` of the KV blocks in use.
pub fn decode_ms(u: f64) -> f64 {
    (-25.74 * u * u + 54.01 * u + 5.74).max(1.0)
}

/// Share of the cheaper part that a mixed step adds on top of the dearer one.
///
/// A step that batches prefill chunks with decodes is one forward pass: the weights are
/// read once for both, so the pass costs about what its larger part costs alone. The
/// smaller part still adds its own attention and activation work, which we take as a
/// tenth of its standalone time.
pub const MIXED_STEP_SHARE: f64 = 0.1;

/// Duration of a step computing `prefill_tokens` prompt tokens and `decodes` decode tokens,
/// with `usage` of the blocks in use, divided by `speedup`.
pub fn step_duration(prefill_tokens: usize, decodes: usize, usage: f64, speedup: f64) -> Duration {
    let p = (prefill_tokens > 0).then(|| prefill_ms(prefill_tokens));
    let d = (decodes > 0).then(|| decode_ms(usage));
    let ms = match (p, d) {
        (Some(p), Some(d)) => p.max(d) + MIXED_STEP_SHARE * p.min(d),
        (Some(x), None) | (None, Some(x)) => x,
        (None, None) => 0.0,
    };
    Duration::from_secs_f64(ms / speedup / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_values() {
        assert!((prefill_ms(2000) - 48.553).abs() < 1e-3, "{}", prefill_ms(2000));
        assert!((decode_ms(0.0) - 5.74).abs() < 1e-9);
        assert!((decode_ms(1.0) - 34.01).abs() < 1e-9);
        assert_eq!(step_duration(0, 0, 0.5, 1.0), Duration::ZERO);
        let mixed = step_duration(2000, 4, 0.0, 1.0).as_secs_f64() * 1000.0;
        assert!((mixed - (48.553 + 0.574)).abs() < 1e-2, "{mixed}");
        let fast = step_duration(2000, 0, 0.0, 10.0).as_secs_f64() * 1000.0;
        assert!((fast - 4.8553).abs() < 1e-3, "{fast}");
    }
}
