//! The planner on simulated mocker replicas: the step, boundary and idle scenarios the
//! issue's figures measure, in shorter versions.

use std::time::Duration;

use turbine_engine::MockerConfig;
use turbine_planner::profile::Sweep;
use turbine_planner::sim::{simulate, Controller, SimConfig, SimReport, SimRequest};
use turbine_planner::{need_for, PlannerConfig, PlannerState, PoolConfig, PoolKind, Sla};

use super::profile_mocker;
use super::replica::MockerReplica;

/// A replica ten times slower than the mocker's GPU: about 4,800 prompt tokens a second.
fn mocker() -> MockerConfig {
    MockerConfig {
        speedup: 0.1,
        num_blocks: 4096,
        ..MockerConfig::default()
    }
}

fn sweep() -> Sweep {
    Sweep {
        isls: vec![256, 1024, 4096],
        saturation: 8,
        contexts: vec![512, 4096],
        concurrencies: vec![1, 16, 64],
        decode_tokens: 8,
    }
}

fn planner() -> PlannerState {
    let config = PlannerConfig {
        pools: [(
            PoolKind::Aggregated,
            PoolConfig {
                min: 1,
                max: 12,
                cost: 1.0,
            },
        )]
        .into(),
        // Prefill steps of a replica this slow stall its decodes for hundreds of
        // milliseconds: the ITL target is set where aggregated serving can meet it.
        sla: Sla {
            ttft: Duration::from_secs(2),
            itl: Duration::from_secs(1),
        },
        ..PlannerConfig::default()
    };
    config.validate().unwrap();
    PlannerState::new(config, profile_mocker(&mocker(), &sweep()).validated().unwrap())
}

fn evenly(from: f64, to: f64, rate: f64, isl: u32, osl: u32) -> Vec<SimRequest> {
    let mut out = Vec::new();
    let mut t = from;
    while t < to {
        out.push(SimRequest {
            arrival: Duration::from_secs_f64(t),
            isl,
            osl,
        });
        t += 1.0 / rate;
    }
    out
}

fn run(trace: &[SimRequest], startup: u64, until: u64) -> SimReport {
    let config = SimConfig {
        startup: Duration::from_secs(startup),
        drain_deadline: Duration::from_secs(30),
        ttft_target: Duration::from_secs(2),
        itl_target: Duration::from_secs(1),
        initial: 1,
        window: Duration::from_secs(2),
        run_until: Duration::from_secs(until),
    };
    let m = mocker();
    simulate(trace, &config, Controller::Planner(Box::new(planner())), || {
        MockerReplica::new(&m)
    })
}

#[test]
fn a_step_to_four_times_the_load_is_met_within_start_up_and_two_ticks() {
    // One replica's worth of 1,024-token prompts for 3 minutes, then four times that.
    let mut trace = evenly(0.0, 180.0, 2.0, 1024, 16);
    trace.extend(evenly(180.0, 420.0, 8.0, 1024, 16));
    let startup = 20;
    let r = run(&trace, startup, 0);
    assert_eq!((r.unfinished, r.truncated), (0, 0));
    let first_up = r
        .decisions
        .iter()
        .filter(|d| d.now >= Duration::from_secs(180))
        .find(|d| d.targets.values().any(|t| t.replicas > t.current))
        .map(|d| d.now);
    assert!(first_up.is_some_and(|t| t <= Duration::from_secs(190)), "{first_up:?}");
    // Back above 95% of requests within SLO from start-up plus two 2 s ticks after the step.
    let recovered = Duration::from_secs(180 + startup + 4);
    let after: Vec<_> = r.windows.iter().filter(|(t, _)| *t >= recovered).collect();
    assert!(!after.is_empty());
    for (t, attainment) in after {
        assert!(*attainment >= 0.95, "{attainment} at {t:?}: {:?}", r.sizes);
    }
}

#[test]
fn constant_load_on_a_size_boundary_scales_at_most_once_in_ten_minutes() {
    let state = planner();
    // The rate at which the capacity model needs exactly three replicas.
    let per_replica = 1.0 / need_for(state.config(), state.model(), PoolKind::Aggregated, 1.0, 1024.0, 16.0);
    let trace = evenly(0.0, 900.0, 3.0 * per_replica, 1024, 16);
    let r = run(&trace, 20, 0);
    assert_eq!((r.unfinished, r.truncated), (0, 0));
    // After the first two minutes' climb, at most one change in the ten that follow.
    let changes = r
        .sizes
        .iter()
        .filter(|(t, _)| *t > Duration::from_secs(120) && *t <= Duration::from_secs(720))
        .count();
    assert!(changes <= 1, "{:?}", r.sizes);
}

#[test]
fn an_idle_fleet_is_at_its_minimum_within_two_minutes() {
    let trace = evenly(0.0, 120.0, 10.0, 1024, 16);
    let r = run(&trace, 10, 600);
    assert!(r.peak_replicas >= 3, "{:?}", r.sizes);
    let last_arrival = trace.last().unwrap().arrival;
    let (at, size) = *r.sizes.last().unwrap();
    assert_eq!(size, 1, "{:?}", r.sizes);
    assert!(
        at <= last_arrival + Duration::from_secs(120),
        "at the minimum {:?} after the last request",
        at - last_arrival
    );
}
