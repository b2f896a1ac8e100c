//! What each worker is busy with, by the router's own account: the requests it sent there,
//! with their prompt tokens until prefill is done and their blocks until they end.
//!
//! Fed by the router's decisions and the requests' lifecycle (routed, first token, ended),
//! so it is current between the workers' load reports. Routers in other frontends feed it
//! the same changes of theirs, so that all agree on load; the workers' own load reports set
//! a floor under it, for what no router told (a frontend that died, work begun elsewhere).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::selector::Load;
use crate::WorkerId;

#[derive(Debug, Clone, Copy)]
struct Active {
    worker: WorkerId,
    /// Prompt tokens not served from cache, outstanding until the first token.
    prefill_tokens: u64,
    blocks: u64,
}

#[derive(Debug, Default)]
pub struct ActiveSequences {
    requests: HashMap<String, Active>,
    loads: HashMap<WorkerId, Load>,
    counts: HashMap<WorkerId, usize>,
    /// The latest load each worker reported, and when it arrived.
    reported: HashMap<WorkerId, (Reported, Instant)>,
}

/// What a worker says it is busy with.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reported {
    pub load: Load,
    /// Sequences running or waiting.
    pub sequences: usize,
}

/// A report older than this no longer counts: reports come every fraction of a second, so
/// an old one means the worker or the event plane is gone.
pub const REPORT_TTL: Duration = Duration::from_secs(2);

impl ActiveSequences {
    pub fn new() -> Self {
        Self::default()
    }

    /// `request` was sent to `worker`: `prefill_tokens` to compute, `blocks` to hold.
    pub fn routed(&mut self, request: &str, worker: WorkerId, prefill_tokens: u64, blocks: u64) {
        self.ended(request);
        let load = self.loads.entry(worker).or_default();
        load.active_prefill_tokens += prefill_tokens;
        load.active_blocks += blocks;
        *self.counts.entry(worker).or_default() += 1;
        self.requests.insert(
            request.to_owned(),
            Active {
                worker,
                prefill_tokens,
                blocks,
            },
        );
    }

    /// The first token of `request` arrived: its prefill is done.
    pub fn first_token(&mut self, request: &str) {
        if let Some(a) = self.requests.get_mut(request) {
            if let Some(load) = self.loads.get_mut(&a.worker) {
                load.active_prefill_tokens -= a.prefill_tokens;
            }
            a.prefill_tokens = 0;
        }
    }

    /// `request` finished, failed or was cancelled.
    pub fn ended(&mut self, request: &str) {
        if let Some(a) = self.requests.remove(request) {
            if let Some(load) = self.loads.get_mut(&a.worker) {
                load.active_prefill_tokens -= a.prefill_tokens;
                load.active_blocks -= a.blocks;
            }
            if let Some(c) = self.counts.get_mut(&a.worker) {
                *c -= 1;
            }
        }
    }

    /// `worker` reported its own load at `now`.
    pub fn report(&mut self, worker: WorkerId, reported: Reported, now: Instant) {
        self.reported.insert(worker, (reported, now));
    }

    fn fresh_report(&self, worker: WorkerId, now: Instant) -> Reported {
        match self.reported.get(&worker) {
            Some((r, at)) if now.saturating_duration_since(*at) < REPORT_TTL => *r,
            _ => Reported::default(),
        }
    }

    /// Forgets a worker that left; its requests end with it.
    pub fn remove_worker(&mut self, worker: WorkerId) {
        self.requests.retain(|_, a| a.worker != worker);
        self.loads.remove(&worker);
        self.counts.remove(&worker);
        self.reported.remove(&worker);
    }

    /// The worker's load as routed, but never below what it reported itself lately.
    pub fn load(&self, worker: WorkerId, now: Instant) -> Load {
        let own = self.loads.get(&worker).copied().unwrap_or_default();
        let reported = self.fresh_report(worker, now).load;
        Load {
            active_prefill_tokens: own.active_prefill_tokens.max(reported.active_prefill_tokens),
            active_blocks: own.active_blocks.max(reported.active_blocks),
        }
    }

    /// Requests in flight on `worker`, with the same floor.
    pub fn active(&self, worker: WorkerId, now: Instant) -> usize {
        let own = self.counts.get(&worker).copied().unwrap_or(0);
        own.max(self.fresh_report(worker, now).sequences)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_reports_set_a_floor_and_stale_ones_do_not() {
        let mut a = ActiveSequences::new();
        let t0 = Instant::now();
        a.routed("r1", 1, 100, 8);
        let heavy = Reported {
            load: Load {
                active_prefill_tokens: 10,
                active_blocks: 50,
            },
            sequences: 4,
        };
        a.report(1, heavy, t0);
        assert_eq!(
            a.load(1, t0),
            Load {
                active_prefill_tokens: 100,
                active_blocks: 50
            }
        );
        assert_eq!(a.active(1, t0), 4);
        let later = t0 + REPORT_TTL;
        assert_eq!(
            a.load(1, later),
            Load {
                active_prefill_tokens: 100,
                active_blocks: 8
            }
        );
        assert_eq!(a.active(1, later), 1);
        a.remove_worker(1);
        assert_eq!(a.active(1, t0), 0, "a departed worker's report goes with it");
    }

    #[test]
    fn load_follows_each_request_through_its_life() {
        let now = Instant::now();
        let mut a = ActiveSequences::new();
        a.routed("r1", 1, 100, 8);
        a.routed("r2", 1, 50, 4);
        a.routed("r3", 2, 10, 1);
        assert_eq!(
            a.load(1, now),
            Load {
                active_prefill_tokens: 150,
                active_blocks: 12
            }
        );
        a.first_token("r1");
        a.first_token("r1");
        assert_eq!(
            a.load(1, now),
            Load {
                active_prefill_tokens: 50,
                active_blocks: 12
            }
        );
        a.ended("r1");
        a.ended("r1");
        a.ended("unknown");
        assert_eq!(
            a.load(1, now),
            Load {
                active_prefill_tokens: 50,
                active_blocks: 4
            }
        );
        assert_eq!((a.active(1, now), a.active(2, now)), (1, 1));
        a.remove_worker(2);
        assert_eq!((a.load(2, now), a.active(2, now)), (Load::default(), 0));
        a.ended("r2");
        assert_eq!(a.load(1, now), Load::default());
    }
}
