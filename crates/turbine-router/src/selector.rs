//! Choosing a worker for a request by cost: prefill work left after the worker's cached
//! prefix (its overlap), weighed against the decode load the worker already carries.
//!
//! For a request of `isl` tokens and a worker holding `overlap` of its leading blocks:
//! `prefill = (isl - overlap * block_size) / block_size + active_prefill_tokens / block_size`,
//! `decode = active_blocks + (request blocks not cached there)`,
//! `cost = overlap_weight * prefill + decode`. At temperature 0 the cheapest wins, ties go
//! to the least loaded (fewest active blocks), then to chance; above 0, a worker is drawn
//! with probability proportional to `exp(-cost / max_cost / temperature)`.

use rand::Rng;

use crate::indexer::Overlaps;
use crate::WorkerId;

/// What the router believes a worker is busy with.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    /// Prompt tokens routed to the worker and not yet prefilled.
    pub active_prefill_tokens: u64,
    /// KV blocks the worker's running requests hold.
    pub active_blocks: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SelectorConfig {
    pub block_size: u32,
    /// How much prefill work counts against decode load; higher favours cache hits.
    pub overlap_weight: f64,
    /// 0 picks the cheapest; higher spreads choices over near-cheapest workers.
    pub temperature: f64,
}

impl Default for SelectorConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            overlap_weight: 1.0,
            temperature: 0.0,
        }
    }
}

/// One worker as the selector scored it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub worker: WorkerId,
    pub overlap_blocks: u32,
    pub prefill_blocks: f64,
    pub decode_blocks: f64,
    pub cost: f64,
}

/// The chosen worker and every candidate's score, for logs and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub worker: WorkerId,
    pub candidates: Vec<Candidate>,
}

/// Scores every worker in `loads` and picks one; `None` when there is none.
pub fn select(
    config: &SelectorConfig,
    isl_tokens: usize,
    overlaps: &Overlaps,
    loads: &[(WorkerId, Load)],
    rng: &mut impl Rng,
) -> Option<Decision> {
    let bs = f64::from(config.block_size.max(1));
    let request_blocks = isl_tokens.div_ceil(config.block_size.max(1) as usize) as f64;
    let candidates: Vec<Candidate> = loads
        .iter()
        .map(|&(worker, load)| {
            let overlap = overlaps.get(worker);
            let cached_tokens = (f64::from(overlap) * bs).min(isl_tokens as f64);
            let prefill_blocks = (isl_tokens as f64 - cached_tokens) / bs + load.active_prefill_tokens as f64 / bs;
            let decode_blocks = load.active_blocks as f64 + (request_blocks - f64::from(overlap)).max(0.0);
            let cost = config.overlap_weight * prefill_blocks + decode_blocks;
            Candidate {
                worker,
                overlap_blocks: overlap,
                prefill_blocks,
                decode_blocks,
                cost,
            }
        })
        .collect();
    let worker = if config.temperature > 0.0 {
        sample_softmax(&candidates, config.temperature, rng)?
    } else {
        cheapest(&candidates, loads, rng)?
    };
    Some(Decision { worker, candidates })
}

fn cheapest(candidates: &[Candidate], loads: &[(WorkerId, Load)], rng: &mut impl Rng) -> Option<WorkerId> {
    const EPS: f64 = 1e-9;
    let min = candidates.iter().map(|c| c.cost).fold(f64::INFINITY, f64::min);
    let load = |w: WorkerId| {
        loads
            .iter()
            .find(|(id, _)| *id == w)
            .map_or(0, |(_, l)| l.active_blocks)
    };
    let tied: Vec<WorkerId> = candidates
        .iter()
        .filter(|c| c.cost <= min + EPS)
        .map(|c| c.worker)
        .collect();
    let least = tied.iter().map(|&w| load(w)).min()?;
    let tied: Vec<WorkerId> = tied.into_iter().filter(|&w| load(w) == least).collect();
    Some(tied[rng.gen_range(0..tied.len())])
}

fn sample_softmax(candidates: &[Candidate], temperature: f64, rng: &mut impl Rng) -> Option<WorkerId> {
    let max = candidates.iter().map(|c| c.cost).fold(0.0, f64::max);
    let scale = if max > 0.0 { max } else { 1.0 };
    let weights: Vec<f64> = candidates
        .iter()
        .map(|c| (-(c.cost / scale) / temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut pick = rng.gen::<f64>() * total;
    for (c, w) in candidates.iter().zip(&weights) {
        if pick < *w {
            return Some(c.worker);
        }
        pick -= w;
    }
    candidates.last().map(|c| c.worker)
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{expect, Expect};
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn check(
        config: SelectorConfig,
        isl: usize,
        overlaps: &[(WorkerId, u32)],
        loads: &[(WorkerId, u64, u64)],
        expect: Expect,
    ) {
        let overlaps = Overlaps {
            scores: overlaps.to_vec(),
        };
        let loads: Vec<(WorkerId, Load)> = loads
            .iter()
            .map(|&(w, prefill, blocks)| {
                (
                    w,
                    Load {
                        active_prefill_tokens: prefill,
                        active_blocks: blocks,
                    },
                )
            })
            .collect();
        let d = select(&config, isl, &overlaps, &loads, &mut StdRng::seed_from_u64(1)).expect("workers");
        let mut out = String::new();
        for c in &d.candidates {
            let mark = if c.worker == d.worker { "  <- chosen" } else { "" };
            out += &format!(
                "worker {}: overlap {} prefill {:.1} decode {:.1} cost {:.1}{mark}\n",
                c.worker, c.overlap_blocks, c.prefill_blocks, c.decode_blocks, c.cost
            );
        }
        expect.assert_eq(&out);
    }

    #[test]
    fn the_longest_cached_prefix_wins_when_load_is_equal() {
        check(
            SelectorConfig::default(),
            160,
            &[(1, 2), (2, 8)],
            &[(1, 0, 10), (2, 0, 10), (3, 0, 10)],
            expect![[r#"
                worker 1: overlap 2 prefill 8.0 decode 18.0 cost 26.0
                worker 2: overlap 8 prefill 2.0 decode 12.0 cost 14.0  <- chosen
                worker 3: overlap 0 prefill 10.0 decode 20.0 cost 30.0
            "#]],
        );
    }

    #[test]
    fn load_outweighs_a_small_cache_hit() {
        // Worker 2 holds 2 of 10 blocks but is busy prefilling 320 tokens already.
        check(
            SelectorConfig::default(),
            160,
            &[(2, 2)],
            &[(1, 0, 4), (2, 320, 4)],
            expect![[r#"
                worker 1: overlap 0 prefill 10.0 decode 14.0 cost 24.0  <- chosen
                worker 2: overlap 2 prefill 28.0 decode 12.0 cost 40.0
            "#]],
        );
    }

    #[test]
    fn overlap_weight_tilts_towards_the_cache() {
        // With prefill counting 3x, worker 2's cache hit beats worker 1's lighter load.
        let load = [(1, 0, 0), (2, 0, 30)];
        check(
            SelectorConfig {
                overlap_weight: 0.5,
                ..Default::default()
            },
            320,
            &[(2, 16)],
            &load,
            expect![[r#"
                worker 1: overlap 0 prefill 20.0 decode 20.0 cost 30.0  <- chosen
                worker 2: overlap 16 prefill 4.0 decode 34.0 cost 36.0
            "#]],
        );
        check(
            SelectorConfig {
                overlap_weight: 3.0,
                ..Default::default()
            },
            320,
            &[(2, 16)],
            &load,
            expect![[r#"
                worker 1: overlap 0 prefill 20.0 decode 20.0 cost 80.0
                worker 2: overlap 16 prefill 4.0 decode 34.0 cost 46.0  <- chosen
            "#]],
        );
    }

    #[test]
    fn ties_go_to_the_least_loaded_then_to_chance() {
        // Same cost (one has more prefill queued, the other more blocks): fewer blocks wins.
        check(
            SelectorConfig::default(),
            64,
            &[],
            &[(1, 32, 6), (2, 0, 8)],
            expect![[r#"
                worker 1: overlap 0 prefill 6.0 decode 10.0 cost 16.0  <- chosen
                worker 2: overlap 0 prefill 4.0 decode 12.0 cost 16.0
            "#]],
        );
        // Fully tied: chance decides, and over many draws each wins.
        let loads = [(1, Load::default()), (2, Load::default()), (3, Load::default())];
        let mut rng = StdRng::seed_from_u64(3);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..100 {
            let d = select(&SelectorConfig::default(), 64, &Overlaps::default(), &loads, &mut rng).unwrap();
            seen.insert(d.worker);
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), [1, 2, 3]);
    }

    #[test]
    fn temperature_spreads_choices_by_cost() {
        let loads = [
            (1, Load::default()),
            (
                2,
                Load {
                    active_prefill_tokens: 0,
                    active_blocks: 10,
                },
            ),
        ];
        let count = |temperature: f64| {
            let config = SelectorConfig {
                temperature,
                ..Default::default()
            };
            let mut rng = StdRng::seed_from_u64(7);
            (0..2000)
                .filter(|_| {
                    select(&config, 160, &Overlaps::default(), &loads, &mut rng)
                        .unwrap()
                        .worker
                        == 1
                })
                .count()
        };
        // Costs 20 and 30: at temperature 0 the cheaper always wins; at 0.5 it wins about
        // e^(-0.667/0.5) / (e^(-0.667/0.5) + e^(-1/0.5)) = 66% of the time; at 100, about half.
        assert_eq!(count(0.0), 2000);
        let warm = count(0.5);
        assert!((1220..1420).contains(&warm), "{warm}");
        let hot = count(100.0);
        assert!((900..1100).contains(&hot), "{hot}");
    }
}
