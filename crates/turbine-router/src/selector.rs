//! Choosing a worker for a request by cost: prefill work left after the worker's cached
//! prefix (its overlap) and queued ahead of it there, weighed against the decode load the
//! worker already carries.
//!
//! For a request of `isl` tokens and a worker holding `overlap` of its leading blocks, with
//! `queued` prompt tokens routed there and not yet prefilled, `uncached = isl - credit *
//! block_size` and `cost = overlap_weight * prefill + decode`, where `credit` counts each
//! block of the overlap by the fastest tier of the worker holding it: 1 on the device,
//! `host_hit_weight` in host memory, `disk_hit_weight` on disk (a block off the device is
//! not computed again, but loading it back takes time). By [`CostModel`]:
//! - `Blocks`: `prefill = (queued + uncached) / block_size` and `decode = active_blocks +
//!   (request blocks not on the device there)`: a block loaded back from host or disk takes
//!   a device block like a computed one;
//! - `Time`, from the engine's [`TimingProfile`]: `prefill = wait + compute_weight * own`,
//!   where `wait` is the milliseconds to prefill the `queued` tokens in the engine's chunks
//!   and `own` what the `uncached` ones add (so `wait + own` is the request's predicted time
//!   to first token), and `decode` is the milliseconds of `decode_horizon` decode steps with
//!   the worker's pool as full as it will be with this request added. A `compute_weight`
//!   above 1 charges a cache miss for the delay it passes on to the requests behind it: a
//!   router minimising each request's own time to first token alone gives a turn's history
//!   away whenever another worker's queue is a little shorter.
//!
//! Blocks treat every block of decode load as dear as a block of prefill; on a GPU a
//! decode step costs little more for more blocks, so turns of a conversation were sent away
//! from the history they could reuse. Time prices both as the engine spends them.
//!
//! At temperature 0 the cheapest wins, ties go to the largest credit, then to the least
//! loaded (fewest active blocks), then to chance; above 0, a worker is drawn with
//! probability proportional to `exp(-cost / max_cost / temperature)`.

use rand::Rng;
use turbine_protocols::TimingProfile;

use crate::indexer::{Overlaps, TierBlocks};
use crate::WorkerId;

/// What a matched block held in host memory (G2) counts for against one on the device, by
/// default: it needs no prefill, but copying it back costs a fraction of computing it.
pub const DEFAULT_HOST_HIT_WEIGHT: f64 = 0.75;
/// The same for a block on disk (G3), slower to read back.
pub const DEFAULT_DISK_HIT_WEIGHT: f64 = 0.25;

/// What the router believes a worker is busy with.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    /// Prompt tokens routed to the worker and not yet prefilled.
    pub active_prefill_tokens: u64,
    /// KV blocks the worker's running requests hold.
    pub active_blocks: u64,
}

/// The units a candidate's cost is counted in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CostModel {
    /// KV blocks of prefill and of decode load.
    Blocks,
    /// Predicted milliseconds, from the engine's own step times.
    Time {
        profile: TimingProfile,
        /// How many times a millisecond of the request's own prefill counts against one of
        /// waiting: what it computes, the requests queued behind it there wait for too.
        compute_weight: f64,
        /// Decode steps of the request the cost looks ahead.
        decode_horizon: f64,
    },
}

impl CostModel {
    /// What costs are counted in, for logs.
    pub fn units(&self) -> &'static str {
        match self {
            CostModel::Blocks => "blocks",
            CostModel::Time { .. } => "ms",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SelectorConfig {
    pub block_size: u32,
    /// How much prefill work counts against decode load; higher favours cache hits.
    pub overlap_weight: f64,
    /// 0 picks the cheapest; higher spreads choices over near-cheapest workers.
    pub temperature: f64,
    pub cost: CostModel,
    /// What a matched block held at best in host memory, and on disk, counts for (0 to 1)
    /// against one on the device.
    pub host_hit_weight: f64,
    pub disk_hit_weight: f64,
}

impl Default for SelectorConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            overlap_weight: 1.0,
            temperature: 0.0,
            cost: CostModel::Blocks,
            host_hit_weight: DEFAULT_HOST_HIT_WEIGHT,
            disk_hit_weight: DEFAULT_DISK_HIT_WEIGHT,
        }
    }
}

/// One worker as the selector scored it, in the units of its [`CostModel`].
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub worker: WorkerId,
    /// Leading blocks of the request the worker holds, in any tier.
    pub overlap_blocks: u32,
    /// Those blocks by the fastest tier holding each.
    pub tiers: TierBlocks,
    /// What they save, in blocks of prefill: each counted by its tier's weight.
    pub credit: f64,
    pub prefill: f64,
    pub decode: f64,
    pub cost: f64,
}

/// The chosen worker and every candidate's score, for logs and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub worker: WorkerId,
    pub candidates: Vec<Candidate>,
    /// What the costs are counted in: `"blocks"` or `"ms"`.
    pub units: &'static str,
}

/// Scores every worker in `loads` and picks one; `None` when there is none.
pub fn select(
    config: &SelectorConfig,
    isl_tokens: usize,
    overlaps: &Overlaps,
    loads: &[(WorkerId, Load)],
    rng: &mut impl Rng,
) -> Option<Decision> {
    let bs = u64::from(config.block_size.max(1));
    let isl = isl_tokens as u64;
    let request_blocks = isl.div_ceil(bs);
    let candidates: Vec<Candidate> = loads
        .iter()
        .map(|&(worker, load)| {
            let tiers = overlaps.tiers(worker);
            let overlap = tiers.total();
            let credit = f64::from(tiers.device)
                + config.host_hit_weight * f64::from(tiers.host)
                + config.disk_hit_weight * f64::from(tiers.disk);
            // Whole tokens: exact for device blocks, as counting in blocks was.
            let saved = (credit * bs as f64) as u64;
            let uncached = isl - saved.min(isl);
            let new_blocks = request_blocks.saturating_sub(u64::from(tiers.device));
            let prefill_tokens = load.active_prefill_tokens + uncached;
            let (prefill, decode) = match &config.cost {
                CostModel::Blocks => (
                    prefill_tokens as f64 / bs as f64,
                    (load.active_blocks + new_blocks) as f64,
                ),
                CostModel::Time {
                    profile,
                    compute_weight,
                    decode_horizon,
                } => {
                    let wait = profile.prefill_time(load.active_prefill_tokens);
                    let own = profile.prefill_time(prefill_tokens) - wait;
                    (
                        wait + compute_weight * own,
                        decode_horizon * profile.decode_step(load.active_blocks + new_blocks),
                    )
                }
            };
            Candidate {
                worker,
                overlap_blocks: overlap,
                tiers,
                credit,
                prefill,
                decode,
                cost: config.overlap_weight * prefill + decode,
            }
        })
        .collect();
    let worker = if config.temperature > 0.0 {
        sample_softmax(&candidates, config.temperature, rng)?
    } else {
        cheapest(&candidates, loads, rng)?
    };
    Some(Decision {
        worker,
        candidates,
        units: config.cost.units(),
    })
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
    let tied: Vec<&Candidate> = candidates.iter().filter(|c| c.cost <= min + EPS).collect();
    // Equal costs with unequal overlaps (a queue ahead as long as the prefix saved): the
    // cache stays warmer where the prefix already is.
    let most = tied.iter().map(|c| c.credit).fold(f64::NEG_INFINITY, f64::max);
    let tied: Vec<WorkerId> = tied
        .into_iter()
        .filter(|c| c.credit >= most - EPS)
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
            tiers: vec![],
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
                c.worker, c.overlap_blocks, c.prefill, c.decode, c.cost
            );
        }
        expect.assert_eq(&out);
    }

    /// One request and fleet, scored under each config in turn.
    fn check_each(
        isl: usize,
        overlaps: &[(WorkerId, u32)],
        loads: &[(WorkerId, u64, u64)],
        cases: impl IntoIterator<Item = (SelectorConfig, Expect)>,
    ) {
        for (config, expect) in cases {
            check(config, isl, overlaps, loads, expect);
        }
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
        check_each(
            320,
            &[(2, 16)],
            &load,
            [
                (
                    SelectorConfig {
                        overlap_weight: 0.5,
                        ..Default::default()
                    },
                    expect![[r#"
                        worker 1: overlap 0 prefill 20.0 decode 20.0 cost 30.0  <- chosen
                        worker 2: overlap 16 prefill 4.0 decode 34.0 cost 36.0
                    "#]],
                ),
                (
                    SelectorConfig {
                        overlap_weight: 3.0,
                        ..Default::default()
                    },
                    expect![[r#"
                        worker 1: overlap 0 prefill 20.0 decode 20.0 cost 80.0
                        worker 2: overlap 16 prefill 4.0 decode 34.0 cost 46.0  <- chosen
                    "#]],
                ),
            ],
        );
    }

    /// The mocker's profile at speed-up 3 with 8,192-token steps and 262,144 blocks.
    fn mocker_time(compute_weight: f64, decode_horizon: f64) -> SelectorConfig {
        let k = |a: f64, b: f64, c: f64| [a / 3.0, b / 3.0, c / 3.0];
        SelectorConfig {
            cost: CostModel::Time {
                profile: TimingProfile {
                    prefill_ms: k(4.209989e-7, 1.518344e-2, 16.50142),
                    max_batched_tokens: 8192,
                    decode_ms: k(-25.74, 54.01, 5.74),
                    num_blocks: 262_144,
                },
                compute_weight,
                decode_horizon,
            },
            ..SelectorConfig::default()
        }
    }

    #[test]
    fn a_conversation_turn_stays_with_its_history_when_only_decode_load_differs() {
        // A 10,000-token turn whose first 9,000 tokens are cached on worker 2, which holds
        // three more running conversations (1,900 more blocks) than worker 1.
        let (overlaps, loads) = (&[(2, 562)], &[(1, 0, 3000), (2, 0, 4900)]);
        check_each(
            10_000,
            overlaps,
            loads,
            [
                (
                    SelectorConfig::default(),
                    expect![[r#"
                        worker 1: overlap 0 prefill 625.0 decode 3625.0 cost 4250.0  <- chosen
                        worker 2: overlap 562 prefill 63.0 decode 4963.0 cost 5026.0
                    "#]],
                ),
                (
                    mocker_time(1.0, 64.0),
                    expect![[r#"
                        worker 1: overlap 0 prefill 71.5 decode 138.3 cost 209.8
                        worker 2: overlap 562 prefill 10.7 decode 144.1 cost 154.8  <- chosen
                    "#]],
                ),
            ],
        );
    }

    #[test]
    fn in_time_a_prefill_queue_outweighs_the_cache() {
        // Worker 2 holds the prefix but has 40,000 prompt tokens queued: five full steps.
        check(
            mocker_time(1.0, 64.0),
            10_000,
            &[(2, 562)],
            &[(1, 0, 3000), (2, 40_000, 3000)],
            expect![[r#"
                worker 1: overlap 0 prefill 71.5 decode 138.3 cost 209.8  <- chosen
                worker 2: overlap 562 prefill 287.6 decode 135.8 cost 423.5
            "#]],
        );
    }

    #[test]
    fn the_compute_weight_keeps_a_turn_with_its_history_behind_a_short_queue() {
        // Worker 2 holds 448 of the turn's 625 blocks behind 6,000 queued tokens; worker 1
        // only the system prompt, idle. Counting time alone, worker 1 answers 2 ms sooner;
        // counting the 5,600 tokens it would compute as well, worker 2 wins.
        let (overlaps, loads) = (&[(1, 96), (2, 448)], &[(1, 0, 3000), (2, 6000, 3000)]);
        check_each(
            10_000,
            overlaps,
            loads,
            [
                (
                    mocker_time(1.0, 64.0),
                    expect![[r#"
                        worker 1: overlap 96 prefill 63.3 decode 137.9 cost 201.1  <- chosen
                        worker 2: overlap 448 prefill 65.2 decode 136.3 cost 201.5
                    "#]],
                ),
                (
                    mocker_time(4.0, 64.0),
                    expect![[r#"
                        worker 1: overlap 96 prefill 253.1 decode 137.9 cost 390.9
                        worker 2: overlap 448 prefill 137.9 decode 136.3 cost 274.3  <- chosen
                    "#]],
                ),
            ],
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

    /// Scores a fleet whose overlaps are given by tier (device, host, disk blocks).
    fn check_tiers(
        config: SelectorConfig,
        isl: usize,
        overlaps: &[(WorkerId, [u32; 3])],
        loads: &[(WorkerId, u64, u64)],
        expect: Expect,
    ) {
        let overlaps = Overlaps {
            scores: overlaps.iter().map(|&(w, t)| (w, t.iter().sum())).collect(),
            tiers: overlaps
                .iter()
                .map(|&(w, [device, host, disk])| (w, TierBlocks { device, host, disk }))
                .collect(),
        };
        let loads: Vec<(WorkerId, Load)> = loads
            .iter()
            .map(|&(w, prefill, blocks)| {
                let load = Load {
                    active_prefill_tokens: prefill,
                    active_blocks: blocks,
                };
                (w, load)
            })
            .collect();
        let d = select(&config, isl, &overlaps, &loads, &mut StdRng::seed_from_u64(1)).expect("workers");
        let mut out = String::new();
        for c in &d.candidates {
            let mark = if c.worker == d.worker { "  <- chosen" } else { "" };
            let t = c.tiers;
            out += &format!(
                "worker {}: overlap {} (device {} host {} disk {}) credit {:.1} prefill {:.1} decode {:.1} cost {:.1}{mark}\n",
                c.worker, c.overlap_blocks, t.device, t.host, t.disk, c.credit, c.prefill, c.decode, c.cost
            );
        }
        expect.assert_eq(&out);
    }

    #[test]
    fn a_prefix_in_host_memory_beats_none_and_loses_to_one_on_the_device() {
        // Ten blocks, eight of them cached: on worker 2 in host memory, on worker 3 on the
        // device, on worker 4 on disk; equal loads.
        let loads = [(1, 0, 10), (2, 0, 10), (3, 0, 10), (4, 0, 10)];
        check_tiers(
            SelectorConfig::default(),
            160,
            &[(2, [0, 8, 0]), (3, [8, 0, 0]), (4, [0, 0, 8])],
            &loads,
            expect![[r#"
                worker 1: overlap 0 (device 0 host 0 disk 0) credit 0.0 prefill 10.0 decode 20.0 cost 30.0
                worker 2: overlap 8 (device 0 host 8 disk 0) credit 6.0 prefill 4.0 decode 20.0 cost 24.0
                worker 3: overlap 8 (device 8 host 0 disk 0) credit 8.0 prefill 2.0 decode 12.0 cost 14.0  <- chosen
                worker 4: overlap 8 (device 0 host 0 disk 8) credit 2.0 prefill 8.0 decode 20.0 cost 28.0
            "#]],
        );
        check_tiers(
            SelectorConfig::default(),
            160,
            &[(2, [0, 8, 0]), (4, [0, 0, 8])],
            &[(1, 0, 10), (2, 0, 10), (4, 0, 10)],
            expect![[r#"
                worker 1: overlap 0 (device 0 host 0 disk 0) credit 0.0 prefill 10.0 decode 20.0 cost 30.0
                worker 2: overlap 8 (device 0 host 8 disk 0) credit 6.0 prefill 4.0 decode 20.0 cost 24.0  <- chosen
                worker 4: overlap 8 (device 0 host 0 disk 8) credit 2.0 prefill 8.0 decode 20.0 cost 28.0
            "#]],
        );
    }

    #[test]
    fn tier_weights_decide_between_a_host_hit_and_a_lighter_load() {
        // Worker 2 holds 8 of 10 blocks in host memory but runs 4 blocks of decode; worker 1
        // holds nothing and is idle. A host block worth 0.75 of a device one wins worker 2
        // the request; worth 0.25, it does not.
        let (overlaps, loads) = (&[(2, [0, 8, 0])], &[(1, 0, 0), (2, 0, 4)]);
        check_tiers(
            SelectorConfig::default(),
            160,
            overlaps,
            loads,
            expect![[r#"
                worker 1: overlap 0 (device 0 host 0 disk 0) credit 0.0 prefill 10.0 decode 10.0 cost 20.0
                worker 2: overlap 8 (device 0 host 8 disk 0) credit 6.0 prefill 4.0 decode 14.0 cost 18.0  <- chosen
            "#]],
        );
        check_tiers(
            SelectorConfig {
                host_hit_weight: 0.25,
                ..Default::default()
            },
            160,
            overlaps,
            loads,
            expect![[r#"
                worker 1: overlap 0 (device 0 host 0 disk 0) credit 0.0 prefill 10.0 decode 10.0 cost 20.0  <- chosen
                worker 2: overlap 8 (device 0 host 8 disk 0) credit 2.0 prefill 8.0 decode 14.0 cost 22.0
            "#]],
        );
        // A mixed prefix: device blocks count whole whatever the weights.
        check_tiers(
            SelectorConfig {
                host_hit_weight: 0.0,
                disk_hit_weight: 1.0,
                ..Default::default()
            },
            160,
            &[(2, [4, 2, 2])],
            loads,
            expect![[r#"
                worker 1: overlap 0 (device 0 host 0 disk 0) credit 0.0 prefill 10.0 decode 10.0 cost 20.0
                worker 2: overlap 8 (device 4 host 2 disk 2) credit 6.0 prefill 4.0 decode 10.0 cost 14.0  <- chosen
            "#]],
        );
    }
}
