//! A mocker replica for the planner's simulator: the mocker's own scheduler and GPU timing
//! model, stepped in simulated time instead of on a clock.

use std::collections::HashMap;
use std::time::Duration;

use turbine_engine::scheduler::{Counted, Scheduler, SeqId, SeqSpec, Step};
use turbine_engine::MockerConfig;
use turbine_planner::sim::{SimLoad, SimWorker};

pub struct MockerReplica {
    scheduler: Scheduler<u64, Counted>,
    step: Option<Step>,
    next_seq: SeqId,
    /// Live sequences, by the request they serve.
    live: HashMap<SeqId, u64>,
}

impl MockerReplica {
    pub fn new(config: &MockerConfig) -> Self {
        Self {
            scheduler: Scheduler::new(config.clone()),
            step: None,
            next_seq: 0,
            live: HashMap::new(),
        }
    }
}

impl SimWorker for MockerReplica {
    fn add(&mut self, id: u64, isl: u32, osl: u32, generated: u32) {
        let prompt = super::own_prompt(id, isl + generated);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.live.insert(seq, id);
        let spec = SeqSpec {
            prompt,
            max_tokens: osl.saturating_sub(generated).max(1),
            stop_token_ids: Vec::new(),
        };
        self.scheduler.add(seq, spec, id);
    }

    fn step(&mut self) -> Option<Duration> {
        let step = self.scheduler.schedule();
        if step.is_empty() {
            return None;
        }
        let d = self.scheduler.duration(&step);
        self.step = Some(step);
        Some(d)
    }

    fn complete(&mut self, token: &mut dyn FnMut(u64, bool)) {
        let Some(step) = self.step.take() else {
            return;
        };
        let live = &mut self.live;
        self.scheduler.complete(&step, |&id, produced| {
            let last = produced.finish.is_some();
            if last {
                live.remove(&produced.seq);
            }
            token(id, last);
            true
        });
    }

    fn load(&self) -> SimLoad {
        let l = self.scheduler.load();
        SimLoad {
            in_flight: self.live.len() as u32,
            queued_prefill_tokens: l.active_prefill_tokens,
            kv_usage: f64::from(l.blocks_in_use) / f64::from(l.blocks_total.max(1)),
            queue_depth: l.waiting_seqs,
        }
    }

    fn take_all(&mut self) -> Vec<u64> {
        self.step = None;
        let mut taken: Vec<(SeqId, u64)> = self.live.drain().collect();
        taken.sort_unstable();
        for &(seq, _) in &taken {
            self.scheduler.cancel(seq);
        }
        taken.into_iter().map(|(_, id)| id).collect()
    }
}
