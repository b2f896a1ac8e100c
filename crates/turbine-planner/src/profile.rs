//! Measures a capacity model by running a simulated replica over prompt lengths and
//! concurrencies: what `turbine profile` does for the mocker, in simulated time.

use std::time::Duration;

use crate::capacity::{CapacityModel, DecodePoint, PrefillPoint};
use crate::sim::SimWorker;

/// The sweep's points.
#[derive(Debug, Clone, PartialEq)]
pub struct Sweep {
    /// Prompt lengths for the prefill table.
    pub isls: Vec<u32>,
    /// Prompts queued at once to measure saturated prefill throughput.
    pub saturation: u32,
    /// Contexts and concurrencies for the decode grid.
    pub contexts: Vec<u32>,
    pub concurrencies: Vec<u32>,
    /// Tokens each decode request generates while ITL is measured.
    pub decode_tokens: u32,
}

impl Default for Sweep {
    fn default() -> Self {
        Self {
            isls: vec![128, 256, 512, 1024, 2048, 4096, 8192],
            saturation: 32,
            contexts: vec![512, 2048, 8192],
            concurrencies: vec![1, 8, 32, 64, 128, 256],
            decode_tokens: 32,
        }
    }
}

/// Runs every request on one fresh replica until all are done; the times of each
/// request's tokens.
fn run<W: SimWorker>(worker: &mut W, requests: &[(u32, u32)]) -> Vec<Vec<Duration>> {
    for (id, &(isl, osl)) in requests.iter().enumerate() {
        worker.add(id as u64, isl, osl, 0);
    }
    let mut out = vec![Vec::new(); requests.len()];
    let mut now = Duration::ZERO;
    let mut done = 0;
    // A replica that cannot finish them stops the sweep there rather than spinning.
    let mut steps = 0u64;
    while done < requests.len() && steps < 10_000_000 {
        let Some(d) = worker.step() else {
            break;
        };
        steps += 1;
        now += d;
        worker.complete(&mut |id, last| {
            out[id as usize].push(now);
            done += usize::from(last);
        });
    }
    out
}

/// Sweeps `sweep` on replicas made by `make`, `max_concurrency` sequences and `kv_tokens`
/// tokens of KV cache each.
pub fn profile<W: SimWorker>(
    engine: &str,
    sweep: &Sweep,
    max_concurrency: u32,
    kv_tokens: u64,
    mut make: impl FnMut() -> W,
) -> CapacityModel {
    let mut prefill = Vec::new();
    for &isl in &sweep.isls {
        let lone = run(&mut make(), &[(isl, 1)]);
        let queued = vec![(isl, 1); sweep.saturation as usize];
        let saturated = run(&mut make(), &queued);
        let span = saturated
            .iter()
            .filter_map(|t| t.last().copied())
            .max()
            .unwrap_or_default();
        prefill.push(PrefillPoint {
            isl,
            ttft_ms: lone[0].first().copied().unwrap_or_default().as_secs_f64() * 1000.0,
            tokens_per_s: f64::from(isl) * f64::from(sweep.saturation) / span.as_secs_f64().max(1e-9),
        });
    }
    let mut decode = Vec::new();
    for &context in &sweep.contexts {
        for &concurrency in &sweep.concurrencies {
            let runs = run(&mut make(), &vec![(context, sweep.decode_tokens); concurrency as usize]);
            // Steady decode: the gaps between tokens once every prompt has been computed
            // (before that, others' prefills share the steps).
            let all_in = runs.iter().filter_map(|t| t.first().copied()).max().unwrap_or_default();
            let gaps: Vec<f64> = runs
                .iter()
                .flat_map(|t| {
                    t.windows(2)
                        .filter(|w| w[0] >= all_in)
                        .map(|w| (w[1] - w[0]).as_secs_f64())
                })
                .collect();
            let itl = gaps.iter().sum::<f64>() / gaps.len().max(1) as f64;
            decode.push(DecodePoint {
                context,
                concurrency,
                itl_ms: (itl * 1000.0).max(1e-3),
            });
        }
    }
    CapacityModel {
        engine: engine.to_owned(),
        prefill,
        decode,
        max_concurrency,
        kv_tokens,
    }
}
