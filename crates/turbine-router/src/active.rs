//! What each worker is busy with, by the router's own account: the requests it sent there,
//! with their prompt tokens until prefill is done and their blocks until they end.
//!
//! Fed by the router's decisions and the requests' lifecycle (routed, first token, ended),
//! so it is current between the workers' load reports.

use std::collections::HashMap;

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
}

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
        }
    }

    /// Forgets a worker that left; its requests end with it.
    pub fn remove_worker(&mut self, worker: WorkerId) {
        self.requests.retain(|_, a| a.worker != worker);
        self.loads.remove(&worker);
    }

    pub fn load(&self, worker: WorkerId) -> Load {
        self.loads.get(&worker).copied().unwrap_or_default()
    }

    /// Requests in flight on `worker`.
    pub fn active(&self, worker: WorkerId) -> usize {
        self.requests.values().filter(|a| a.worker == worker).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_follows_each_request_through_its_life() {
        let mut a = ActiveSequences::new();
        a.routed("r1", 1, 100, 8);
        a.routed("r2", 1, 50, 4);
        a.routed("r3", 2, 10, 1);
        assert_eq!(
            a.load(1),
            Load {
                active_prefill_tokens: 150,
                active_blocks: 12
            }
        );
        a.first_token("r1");
        a.first_token("r1");
        assert_eq!(
            a.load(1),
            Load {
                active_prefill_tokens: 50,
                active_blocks: 12
            }
        );
        a.ended("r1");
        a.ended("r1");
        a.ended("unknown");
        assert_eq!(
            a.load(1),
            Load {
                active_prefill_tokens: 50,
                active_blocks: 4
            }
        );
        assert_eq!((a.active(1), a.active(2)), (1, 1));
        a.remove_worker(2);
        assert_eq!((a.load(2), a.active(2)), (Load::default(), 0));
        a.ended("r2");
        assert_eq!(a.load(1), Load::default());
    }
}
