//! How long a simulated engine step takes, from a timing model fitted to a real GPU.

use std::time::Duration;

use turbine_protocols::TimingProfile;

use super::MockerConfig;

/// Prefill step: `a t² + b t + c` milliseconds for `t` new tokens.
const PREFILL: [f64; 3] = [4.209989e-7, 1.518344e-2, 16.50142];
/// Decode step: `a u² + b u + c` milliseconds with a share `u` of the KV blocks in use.
const DECODE: [f64; 3] = [-25.74, 54.01, 5.74];

/// Milliseconds to prefill `t` new tokens in one step.
pub fn prefill_ms(t: usize) -> f64 {
    let t = t as f64;
    let [a, b, c] = PREFILL;
    a * t * t + b * t + c
}

/// Milliseconds for one decode step with a fraction `u` of the KV blocks in use.
pub fn decode_ms(u: f64) -> f64 {
    let [a, b, c] = DECODE;
    (a * u * u + b * u + c).max(1.0)
}

/// The model above as a mocker with `config` runs it, for routers to predict with.
pub fn profile(config: &MockerConfig) -> TimingProfile {
    let scaled = |k: [f64; 3]| k.map(|x| x / config.speedup);
    TimingProfile {
        prefill_ms: scaled(PREFILL),
        max_batched_tokens: u32::try_from(config.max_num_batched_tokens).unwrap_or(u32::MAX),
        decode_ms: scaled(DECODE),
        num_blocks: config.num_blocks as u64,
    }
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

    #[test]
    fn the_published_profile_predicts_the_simulated_steps() {
        let config = MockerConfig {
            speedup: 4.0,
            max_num_batched_tokens: 512,
            ..MockerConfig::default()
        };
        let p = profile(&config);
        let step = |t| step_duration(t, 0, 0.0, config.speedup).as_secs_f64() * 1000.0;
        assert!((p.prefill_time(300) - step(300)).abs() < 1e-6);
        assert!((p.prefill_time(1100) - (2.0 * step(512) + step(76))).abs() < 1e-6);
        let half = config.num_blocks as u64 / 2;
        assert!((p.decode_step(half) - decode_ms(0.5) / 4.0).abs() < 1e-9);
    }
}
