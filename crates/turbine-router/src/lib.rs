//! Routing decisions: which worker serves a request. Pure logic with no I/O: the caller
//! keeps the set of workers current and asks for a choice.
//!
//! - [`indexer::KvIndexer`]: which worker holds which cached blocks, from their KV events.
//! - [`selector::select`]: the cost function that weighs a worker's cached prefix against
//!   its load.
//! - [`approx::ApproxIndexer`]: the same, predicted from the router's own decisions, for
//!   engines that publish no KV events.
//! - [`active::ActiveSequences`]: each worker's load by the router's own decisions.
//! - [`Router`]: the baseline policies, round-robin and random.

pub mod active;
pub mod approx;
pub mod indexer;
pub mod selector;

use std::sync::atomic::{AtomicU64, Ordering};

/// How the router picks a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouterMode {
    /// Each worker in turn.
    #[default]
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// By KV cache overlap and load (the cost function of [`selector`]).
    Kv,
    /// To the worker with the fewest requests in flight.
    LeastLoaded,
    /// Requests with the same session id to the same worker; a new session by `Kv`.
    Session,
}

/// A worker as the router knows it: an opaque id the caller maps back to an address.
pub type WorkerId = u64;

/// Picks workers under one [`RouterMode`]. Shared across requests; `select` takes `&self`.
#[derive(Debug)]
pub struct Router {
    mode: RouterMode,
    next: AtomicU64,
}

impl Router {
    pub fn new(mode: RouterMode) -> Self {
        Self {
            mode,
            next: AtomicU64::new(0),
        }
    }

    pub fn mode(&self) -> RouterMode {
        self.mode
    }

    /// The worker to serve the next request, or `None` when there is none. `workers` must be
    /// in a stable order (sorted) for round-robin to visit each in turn.
    pub fn select(&self, workers: &[WorkerId]) -> Option<WorkerId> {
        if workers.is_empty() {
            return None;
        }
        let n = workers.len() as u64;
        let i = match self.mode {
            RouterMode::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
            // The other modes need more than ids (loads, caches, sessions): the frontend
            // decides them, and asks here only when it lacks what they need.
            RouterMode::Random | RouterMode::Kv | RouterMode::LeastLoaded | RouterMode::Session => {
                rand::random::<u64>() % n
            }
        };
        Some(workers[i as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;

    #[test]
    fn round_robin_visits_each_in_turn_and_follows_membership() {
        let r = Router::new(RouterMode::RoundRobin);
        let picks: Vec<_> = (0..5).map(|_| r.select(&[10, 20, 30]).unwrap()).collect();
        expect!["[10, 20, 30, 10, 20]"].assert_eq(&format!("{picks:?}"));
        let picks: Vec<_> = (0..4).map(|_| r.select(&[10, 30]).unwrap()).collect();
        expect!["[30, 10, 30, 10]"].assert_eq(&format!("{picks:?}"));
        assert_eq!(r.select(&[]), None);
    }

    #[test]
    fn random_covers_every_worker() {
        let r = Router::new(RouterMode::Random);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..1000 {
            seen.insert(r.select(&[1, 2, 3, 4]).unwrap());
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), [1, 2, 3, 4]);
    }
}
