//! The fleet simulator with a toy replica: requests all finish, whole, under a static size
//! and under the planner, and a drain deadline migrates instead of cutting streams.

mod common;

use std::collections::VecDeque;
use std::time::Duration;

use common::{planner, secs};
use turbine_planner::sim::{simulate, Controller, SimConfig, SimLoad, SimRequest, SimWorker};
use turbine_planner::{PlannerConfig, PoolConfig, PoolKind, Sla};

/// Prefills one prompt a step at 20,000 tokens a second (as the test capacity model
/// says), else decodes every running request one token in 10 ms plus 0.5 ms each.
#[derive(Default)]
struct Toy {
    prefill: VecDeque<(u64, u32, u32)>,
    decoding: Vec<(u64, u32)>,
    planned: Option<Planned>,
}

enum Planned {
    Prefill(u64, u32),
    Decode,
}

impl SimWorker for Toy {
    fn add(&mut self, id: u64, isl: u32, osl: u32, generated: u32) {
        self.prefill.push_back((id, isl + generated, osl - generated));
    }

    fn step(&mut self) -> Option<Duration> {
        if let Some((id, isl, left)) = self.prefill.pop_front() {
            self.planned = Some(Planned::Prefill(id, left));
            return Some(Duration::from_secs_f64(0.010 + f64::from(isl) / 20_000.0));
        }
        if self.decoding.is_empty() {
            return None;
        }
        self.planned = Some(Planned::Decode);
        Some(Duration::from_secs_f64(0.010 + 0.0005 * self.decoding.len() as f64))
    }

    fn complete(&mut self, token: &mut dyn FnMut(u64, bool)) {
        match self.planned.take() {
            Some(Planned::Prefill(id, left)) => {
                token(id, left == 1);
                if left > 1 {
                    self.decoding.push((id, left - 1));
                }
            }
            Some(Planned::Decode) => {
                for (id, left) in self.decoding.iter_mut() {
                    *left -= 1;
                    token(*id, *left == 0);
                }
                self.decoding.retain(|&(_, left)| left > 0);
            }
            None => {}
        }
    }

    fn load(&self) -> SimLoad {
        SimLoad {
            in_flight: (self.prefill.len() + self.decoding.len() + usize::from(self.planned.is_some())) as u32,
            queued_prefill_tokens: self.prefill.iter().map(|&(_, isl, _)| u64::from(isl)).sum(),
            kv_usage: 0.1,
            queue_depth: self.prefill.len() as u32,
        }
    }

    fn take_all(&mut self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.prefill.drain(..).map(|(id, _, _)| id).collect();
        ids.extend(self.decoding.drain(..).map(|(id, _)| id));
        if let Some(Planned::Prefill(id, _)) = self.planned.take() {
            ids.push(id);
        }
        ids
    }
}

/// `rate(t)` requests a second of 1,000 prompt and 20 output tokens, evenly spaced.
fn trace(seconds: u64, rate: impl Fn(u64) -> u64) -> Vec<SimRequest> {
    let mut out = Vec::new();
    for s in 0..seconds {
        let n = rate(s);
        for i in 0..n {
            out.push(SimRequest {
                arrival: Duration::from_secs_f64(s as f64 + i as f64 / n as f64),
                isl: 1000,
                osl: 20,
            });
        }
    }
    out
}

fn sim_config(startup: u64) -> SimConfig {
    SimConfig {
        startup: secs(startup),
        drain_deadline: secs(30),
        ttft_target: Duration::from_secs(2),
        // The toy runs queued prefills before decodes: its ITL is not what is tested.
        itl_target: Duration::from_secs(1),
        initial: 1,
        window: secs(10),
        run_until: Duration::ZERO,
    }
}

fn aggregated(min: u32, max: u32) -> PlannerConfig {
    PlannerConfig {
        pools: [(PoolKind::Aggregated, PoolConfig { min, max, cost: 1.0 })].into(),
        sla: Sla {
            ttft: Duration::from_secs(2),
            itl: Duration::from_secs(1),
        },
        ..PlannerConfig::default()
    }
}

#[test]
fn a_static_fleet_with_room_serves_every_request_within_slo() {
    let t = trace(60, |_| 10);
    let r = simulate(&t, &sim_config(0), Controller::Static(2), Toy::default);
    assert_eq!(r.requests, 600);
    assert_eq!((r.unfinished, r.truncated), (0, 0));
    assert_eq!(r.attainment, 1.0, "{r:?}");
    assert!((r.mean_replicas() - 2.0).abs() < 0.05);
}

#[test]
fn the_planner_follows_a_step_to_four_times_the_load_and_back() {
    // 10 requests a second for 2 minutes, 40 for 2, then 10 again for 5.
    let t = trace(540, |s| if (120..240).contains(&s) { 40 } else { 10 });
    let config = sim_config(10);
    let p = Controller::Planner(Box::new(planner(aggregated(1, 8))));
    let r = simulate(&t, &config, p, Toy::default);
    assert_eq!((r.unfinished, r.truncated), (0, 0), "{r:?}");
    assert!(r.scale_ups >= 1 && r.scale_downs >= 1, "{:?}", r.sizes);
    // The first scale-up within 10 s of the step.
    let first_up = r
        .decisions
        .iter()
        .find(|d| {
            d.targets[&PoolKind::Aggregated].replicas > d.targets[&PoolKind::Aggregated].current && d.now >= secs(120)
        })
        .map(|d| d.now);
    assert!(first_up.is_some_and(|t| t <= secs(130)), "{first_up:?}");
    // Back at a small size by the end.
    let last = r.sizes.last().unwrap().1;
    assert!(last <= 2, "{:?}", r.sizes);
    let fixed = simulate(&t, &config, Controller::Static(r.peak_replicas), Toy::default);
    assert!(
        r.worker_seconds < fixed.worker_seconds,
        "{} against {}",
        r.worker_seconds,
        fixed.worker_seconds
    );
    // Requests arriving once the new replicas are up (start-up plus two 2 s ticks after
    // the step) are served within SLO; those queued before wait on the old replica.
    for &(t, attainment) in &r.windows {
        if t >= secs(120 + 10 + 4) {
            assert!(attainment >= 0.95, "{attainment} at {t:?}: {:?}", r.sizes);
        }
    }
}

#[test]
fn a_drain_deadline_migrates_what_is_left_and_every_stream_completes() {
    // Long outputs and a deadline shorter than them: drained replicas still hold requests
    // when their deadline comes.
    let mut t = trace(300, |s| if s < 60 { 30 } else { 2 });
    for r in &mut t {
        r.osl = 400;
    }
    let config = SimConfig {
        drain_deadline: secs(1),
        ..sim_config(5)
    };
    let p = Controller::Planner(Box::new(planner(PlannerConfig {
        stabilization: secs(20),
        ..aggregated(1, 8)
    })));
    let r = simulate(&t, &config, p, Toy::default);
    assert!(r.scale_downs >= 1, "{:?}", r.sizes);
    assert!(r.migrated > 0, "{r:?}");
    assert_eq!((r.unfinished, r.truncated), (0, 0));
}
