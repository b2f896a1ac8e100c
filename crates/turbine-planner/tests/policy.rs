//! The policy stepped by hand: each test feeds observations tick by tick and checks the
//! targets and their reasons.

mod common;

use std::time::Duration;

use common::{model, obs, planner, secs, worker};
use turbine_planner::{decide, Phase, PlannerConfig, PoolConfig, PoolKind, Reason};

use PoolKind::Aggregated;

#[test]
fn load_four_times_what_the_fleet_serves_scales_up_on_the_first_tick_that_sees_it() {
    let mut p = planner(PlannerConfig::default());
    // Two replicas, each computing 20,000 prompt tokens a second (the test model):
    // 8,000 tokens a second is within them, 32,000 is not.
    let calm = obs(
        5,
        40,
        1000,
        &[worker(1, Phase::Ready, 2, 0), worker(2, Phase::Ready, 2, 0)],
    );
    for t in 1..=20 {
        let d = decide(&mut p, &calm, secs(5 * t));
        assert_eq!(
            d.targets[&Aggregated].replicas, 2,
            "tick {t}: {:?}",
            d.targets[&Aggregated]
        );
    }
    let burst = obs(
        5,
        160,
        1000,
        &[worker(1, Phase::Ready, 8, 20_000), worker(2, Phase::Ready, 8, 20_000)],
    );
    let d = decide(&mut p, &burst, secs(105));
    let t = &d.targets[&Aggregated];
    assert_eq!(t.reason, Reason::Load);
    // 32,000 tokens a second at the 0.8 utilisation the 2 s TTFT allows: 2 replicas is
    // short, the step goes straight to what is needed.
    assert!(t.replicas >= 3, "{t:?}");
    assert!(t.need_now > 2.0, "{t:?}");
}

#[test]
fn a_smaller_size_waits_for_the_whole_stabilization_window() {
    let config = PlannerConfig {
        stabilization: secs(60),
        ..PlannerConfig::default()
    };
    let mut p = planner(config);
    let four: Vec<_> = (1..=4).map(|id| worker(id, Phase::Ready, 1, 0)).collect();
    // A load one replica serves, on four.
    let light = obs(5, 10, 1000, &four);
    let mut shrunk_at = None;
    for t in 1..=30 {
        let d = decide(&mut p, &light, secs(5 * t));
        let target = &d.targets[&Aggregated];
        if target.replicas < 4 {
            assert_eq!(target.reason, Reason::Stabilized);
            assert_eq!(target.drain.len(), (4 - target.replicas) as usize);
            shrunk_at = Some(5 * t);
            break;
        }
        assert_eq!(target.reason, Reason::Hold, "tick {t}");
    }
    let at = shrunk_at.expect("the pool shrinks");
    assert!(at >= 65, "shrank after {at} s, inside the 60 s window");
}

#[test]
fn a_burst_inside_the_window_holds_the_size() {
    let mut p = planner(PlannerConfig {
        stabilization: secs(60),
        ..PlannerConfig::default()
    });
    let four: Vec<_> = (1..=4).map(|id| worker(id, Phase::Ready, 1, 0)).collect();
    let light = obs(5, 10, 1000, &four);
    let heavy = obs(5, 250, 1000, &four);
    for t in 1..=40 {
        // Every 50 s, a tick of load that needs the four.
        let o = if t % 10 == 0 { &heavy } else { &light };
        let d = decide(&mut p, o, secs(5 * t));
        assert_eq!(d.targets[&Aggregated].replicas, 4, "tick {t}");
    }
}

#[test]
fn idle_returns_every_pool_to_its_minimum() {
    let config = PlannerConfig {
        pools: [
            (
                PoolKind::Prefill,
                PoolConfig {
                    min: 1,
                    max: 8,
                    cost: 1.0,
                },
            ),
            (
                PoolKind::Decode,
                PoolConfig {
                    min: 2,
                    max: 8,
                    cost: 1.0,
                },
            ),
        ]
        .into(),
        idle_after: secs(60),
        // Longer than the idle time: the pools reach their minimum as idle, not as shrunk.
        stabilization: secs(120),
        ..PlannerConfig::default()
    };
    let mut p = planner(config);
    let mut o = obs(5, 0, 0, &[]);
    o.pools.insert(
        PoolKind::Prefill,
        common::pool(&(1..=5).map(|i| worker(i, Phase::Ready, 0, 0)).collect::<Vec<_>>()),
    );
    o.pools.insert(
        PoolKind::Decode,
        common::pool(&(6..=9).map(|i| worker(i, Phase::Ready, 0, 0)).collect::<Vec<_>>()),
    );
    let mut at_min = None;
    for t in 1..=40 {
        let d = decide(&mut p, &o, secs(5 * t));
        let (prefill, decode) = (&d.targets[&PoolKind::Prefill], &d.targets[&PoolKind::Decode]);
        if prefill.replicas == 1 && decode.replicas == 2 {
            assert_eq!(prefill.reason, Reason::Idle);
            assert_eq!(decode.reason, Reason::Idle);
            at_min = Some(5 * t);
            break;
        }
    }
    let at = at_min.expect("idle pools reach their minimum");
    assert!((60..=70).contains(&at), "at the minimum after {at} s");
}

#[test]
fn nothing_new_is_decided_while_a_replica_starts_or_drains() {
    let mut p = planner(PlannerConfig::default());
    let burst = |phase| {
        obs(
            5,
            400,
            1000,
            &[worker(1, Phase::Ready, 8, 50_000), worker(2, phase, 0, 0)],
        )
    };
    for phase in [Phase::Starting { since: secs(0) }, Phase::Draining { since: secs(0) }] {
        let d = decide(&mut p, &burst(phase), secs(10));
        let t = &d.targets[&Aggregated];
        assert_eq!(t.reason, Reason::Pending, "{phase:?}");
        assert_eq!(t.replicas, t.current);
        assert!(!d.changes());
    }
}

#[test]
fn a_replica_stuck_starting_is_cancelled_after_the_timeout() {
    let config = PlannerConfig {
        start_timeout: secs(120),
        ..PlannerConfig::default()
    };
    let mut p = planner(config);
    let o = obs(
        5,
        10,
        1000,
        &[
            worker(1, Phase::Ready, 1, 0),
            worker(7, Phase::Starting { since: secs(0) }, 0, 0),
        ],
    );
    let d = decide(&mut p, &o, secs(119));
    assert!(d.cancel.is_empty());
    assert_eq!(d.targets[&Aggregated].reason, Reason::Pending);
    let d = decide(&mut p, &o, secs(120));
    assert_eq!(d.cancel, vec![(Aggregated, 7)]);
    // The stuck start no longer counts: the pool is its one ready replica.
    assert_eq!(d.targets[&Aggregated].current, 1);
}

#[test]
fn a_manual_scale_up_is_kept_until_a_full_window_shows_it_is_not_needed() {
    let mut p = planner(PlannerConfig::default());
    let two: Vec<_> = (1..=2).map(|id| worker(id, Phase::Ready, 2, 0)).collect();
    let load = obs(5, 40, 1000, &two);
    for t in 1..=20 {
        decide(&mut p, &load, secs(5 * t));
    }
    // An operator scales to five: the planner starts from what it sees, not from its own
    // last target, and does not undo the edit on the next tick.
    let five: Vec<_> = (1..=5).map(|id| worker(id, Phase::Ready, 1, 0)).collect();
    let edited = obs(5, 40, 1000, &five);
    let d = decide(&mut p, &edited, secs(105));
    assert_eq!(d.targets[&Aggregated].current, 5);
    assert_eq!(d.targets[&Aggregated].replicas, 5);
}

#[test]
fn the_budget_caps_growth_counting_replicas_still_draining() {
    let config = PlannerConfig {
        pools: [
            (
                PoolKind::Prefill,
                PoolConfig {
                    min: 1,
                    max: 10,
                    cost: 1.0,
                },
            ),
            (
                PoolKind::Decode,
                PoolConfig {
                    min: 1,
                    max: 10,
                    cost: 2.0,
                },
            ),
        ]
        .into(),
        budget: Some(8.0),
        ..PlannerConfig::default()
    };
    let mut p = planner(config);
    let mut o = obs(5, 800, 2000, &[]);
    // Prefill: two ready and swamped. Decode: one ready and one draining (still paid for).
    o.pools.insert(
        PoolKind::Prefill,
        common::pool(&[
            worker(1, Phase::Ready, 30, 200_000),
            worker(2, Phase::Ready, 30, 200_000),
        ]),
    );
    o.pools.insert(
        PoolKind::Decode,
        common::pool(&[
            worker(3, Phase::Ready, 10, 0),
            worker(4, Phase::Draining { since: secs(0) }, 2, 0),
        ]),
    );
    let d = decide(&mut p, &o, secs(5));
    let prefill = &d.targets[&PoolKind::Prefill];
    // Spent: 2 x 1 + 2 x 2 = 6 of 8: two more prefill replicas at most.
    assert_eq!(prefill.replicas, 4, "{prefill:?}");
    assert!(
        matches!(prefill.reason, Reason::Budget { wanted } if wanted > 4),
        "{prefill:?}"
    );
}

#[test]
fn shrinking_drains_the_replicas_with_the_least_in_flight() {
    let mut p = planner(PlannerConfig {
        stabilization: secs(10),
        ..PlannerConfig::default()
    });
    let workers = [
        worker(1, Phase::Ready, 3, 0),
        worker(2, Phase::Ready, 0, 0),
        worker(3, Phase::Ready, 5, 0),
        worker(4, Phase::Ready, 1, 0),
    ];
    let o = obs(5, 1, 100, &workers);
    let mut drained = Vec::new();
    for t in 1..=10 {
        let d = decide(&mut p, &o, secs(5 * t));
        if !d.targets[&Aggregated].drain.is_empty() {
            drained = d.targets[&Aggregated].drain.clone();
            break;
        }
    }
    assert_eq!(&drained[..2], &[2, 4], "{drained:?}");
}

#[test]
fn latency_above_target_with_work_queued_adds_a_replica_the_model_did_not_ask_for() {
    let mut p = planner(PlannerConfig::default());
    let mut o = obs(
        5,
        10,
        1000,
        &[worker(1, Phase::Ready, 3, 100), worker(2, Phase::Ready, 3, 100)],
    );
    o.ttft = Some(Duration::from_secs(5));
    let d = decide(&mut p, &o, secs(5));
    assert_eq!(d.targets[&Aggregated].replicas, 3);
    assert_eq!(d.targets[&Aggregated].reason, Reason::Latency);
    // The same latency with nothing queued is history, not load.
    let mut o = obs(
        5,
        10,
        1000,
        &[worker(1, Phase::Ready, 0, 0), worker(2, Phase::Ready, 0, 0)],
    );
    o.ttft = Some(Duration::from_secs(5));
    let d = decide(&mut p, &o, secs(10));
    assert_eq!(d.targets[&Aggregated].replicas, 2);
}

#[test]
fn the_capacity_model_sizes_the_forecast() {
    let m = model();
    let mut p = planner(PlannerConfig::default());
    // 10 requests a second of 1,000 tokens: 10,000 tokens a second against 20,000 at 0.8.
    let o = obs(30, 300, 1000, &[worker(1, Phase::Ready, 0, 0)]);
    let d = decide(&mut p, &o, secs(30));
    let need = d.targets[&Aggregated].need_forecast;
    let prefill = 10_000.0 / (m.prefill_rate(1000.0) * 0.8);
    assert!(need >= prefill && need < prefill + 0.5, "{need} against {prefill}");
    assert!((d.predicted_rate - 10.0).abs() < 1e-9);
}

#[test]
fn a_step_while_starts_take_time_sizes_the_new_replicas_to_carry_the_arrivals_alone() {
    // 60,000 prompt tokens a second on two replicas of 20,000: 3.75 replicas' worth at the
    // utilisation the target allows.
    let step = |p: &mut turbine_planner::PlannerState, at| {
        let burst = obs(
            1,
            60,
            1000,
            &[worker(1, Phase::Ready, 4, 0), worker(2, Phase::Ready, 4, 0)],
        );
        decide(p, &burst, secs(at)).targets[&Aggregated].clone()
    };
    let calm = |second| obs(1, 10, 1000, &[worker(1, Phase::Ready, 1, 0), second]);
    let mut unseen = planner(PlannerConfig::default());
    decide(&mut unseen, &calm(worker(2, Phase::Ready, 0, 0)), secs(100));
    decide(&mut unseen, &calm(worker(2, Phase::Ready, 0, 0)), secs(130));
    assert_eq!(unseen.startup(), None);
    let t = step(&mut unseen, 131);
    assert_eq!((t.replicas, t.reason), (4, Reason::Load), "{t:?}");

    // Once a start has been seen to take 30 s, the two replicas there now will hold 15 s of
    // backlog each by the time new ones are up: the new ones get the whole load.
    let mut p = planner(PlannerConfig::default());
    decide(
        &mut p,
        &calm(worker(2, Phase::Starting { since: secs(100) }, 0, 0)),
        secs(100),
    );
    decide(&mut p, &calm(worker(2, Phase::Ready, 0, 0)), secs(130));
    assert_eq!(p.startup(), Some(secs(30)));
    let t = step(&mut p, 131);
    assert_eq!((t.replicas, t.reason), (6, Reason::Load), "{t:?}");
}
