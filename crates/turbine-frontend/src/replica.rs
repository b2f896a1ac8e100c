//! Keeps the routers of several frontends in agreement on load: each publishes its changes
//! to what it sent where, applies everyone else's, and takes the workers' own load reports
//! as a floor under the result.
//!
//! A frontend that dies leaves its requests behind in the others' accounts; they are ended
//! when it has been silent for [`ROUTER_SILENCE`] (a live router says so every
//! [`HEARTBEAT`], even when idle).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::mpsc;
use turbine_protocols::discovery::{load_pattern, router_sync_subject};
use turbine_protocols::kv::{ActiveChange, ActiveSyncMessage, LoadMessage};
use turbine_router::active::{ActiveSequences, Reported};
use turbine_router::selector::Load;
use turbine_runtime::{EventPlaneError, Runtime};

const HEARTBEAT: Duration = Duration::from_secs(2);
const ROUTER_SILENCE: Duration = Duration::from_secs(10);

pub(crate) type SharedActive = Arc<Mutex<ActiveSequences>>;

pub(crate) fn lock(active: &Mutex<ActiveSequences>) -> MutexGuard<'_, ActiveSequences> {
    active.lock().unwrap_or_else(|e| e.into_inner())
}

/// This router's account, shared: every change is applied here and sent to the others.
#[derive(Debug, Clone)]
pub(crate) struct Replicated {
    active: SharedActive,
    outbox: Option<mpsc::UnboundedSender<ActiveChange>>,
}

impl Replicated {
    /// Publishes this router's changes and applies the other routers' and the workers' load
    /// reports, in `namespace`, until the returned value and its clones are dropped.
    pub(crate) async fn start(runtime: &Runtime, namespace: &str) -> Result<Self, EventPlaneError> {
        let router = rand::random::<u64>();
        let active = SharedActive::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let subject = router_sync_subject(namespace);
        let peers = runtime.events().subscribe(&subject).await?;
        let loads = runtime.events().subscribe(&load_pattern(namespace)).await?;
        tokio::spawn(publish(runtime.clone(), subject, router, rx));
        tokio::spawn(follow(Arc::downgrade(&active), router, peers, loads));
        Ok(Self {
            active,
            outbox: Some(tx),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, ActiveSequences> {
        lock(&self.active)
    }

    pub(crate) fn routed(&self, request: &str, worker: u64, prefill_tokens: u64, blocks: u64) {
        self.lock().routed(request, worker, prefill_tokens, blocks);
        self.send(ActiveChange::Routed {
            request: request.to_owned(),
            worker,
            prefill_tokens,
            blocks,
        });
    }

    pub(crate) fn first_token(&self, request: &str) {
        self.lock().first_token(request);
        self.send(ActiveChange::FirstToken {
            request: request.to_owned(),
        });
    }

    pub(crate) fn ended(&self, request: &str) {
        self.lock().ended(request);
        self.send(ActiveChange::Ended {
            request: request.to_owned(),
        });
    }

    fn send(&self, change: ActiveChange) {
        if let Some(outbox) = &self.outbox {
            // Fails only once the publisher is gone, at shutdown.
            let _ = outbox.send(change);
        }
    }
}

/// Sends this router's changes in batches (whatever queued while the last batch was being
/// published), and a heartbeat when there are none.
async fn publish(runtime: Runtime, subject: String, router: u64, mut rx: mpsc::UnboundedReceiver<ActiveChange>) {
    loop {
        let first = match tokio::time::timeout(HEARTBEAT, rx.recv()).await {
            Ok(Some(change)) => Some(change),
            Ok(None) => return,
            Err(_) => None,
        };
        let mut changes: Vec<ActiveChange> = first.into_iter().collect();
        while let Ok(change) = rx.try_recv() {
            changes.push(change);
        }
        let message = ActiveSyncMessage { router, changes };
        let payload = match serde_json::to_vec(&message) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode router sync message");
                continue;
            }
        };
        if let Err(e) = runtime.events().publish(&subject, payload.into()).await {
            tracing::warn!(error = %e, "cannot publish router sync message");
        }
    }
}

/// What this router knows of each other router: when it last spoke, and its open requests.
#[derive(Debug, Default)]
struct Peers {
    peers: HashMap<u64, (Instant, HashSet<String>)>,
}

impl Peers {
    fn apply(&mut self, active: &mut ActiveSequences, message: ActiveSyncMessage, now: Instant) {
        let (seen, open) = self
            .peers
            .entry(message.router)
            .or_insert_with(|| (now, HashSet::new()));
        *seen = now;
        for change in message.changes {
            match change {
                ActiveChange::Routed {
                    request,
                    worker,
                    prefill_tokens,
                    blocks,
                } => {
                    active.routed(&request, worker, prefill_tokens, blocks);
                    open.insert(request);
                }
                ActiveChange::FirstToken { request } => active.first_token(&request),
                ActiveChange::Ended { request } => {
                    active.ended(&request);
                    open.remove(&request);
                }
            }
        }
    }

    /// Ends the requests of routers silent for too long: their frontend is gone.
    fn expire(&mut self, active: &mut ActiveSequences, now: Instant) {
        self.peers.retain(|router, (seen, open)| {
            let alive = now.saturating_duration_since(*seen) < ROUTER_SILENCE;
            if !alive {
                tracing::info!(router, requests = open.len(), "router silent: forgetting its requests");
                for request in open.iter() {
                    active.ended(request);
                }
            }
            alive
        });
    }
}

async fn follow(
    active: std::sync::Weak<Mutex<ActiveSequences>>,
    me: u64,
    mut peers_events: turbine_runtime::Subscription,
    mut loads: turbine_runtime::Subscription,
) {
    let mut peers = Peers::default();
    let mut sweep = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            event = peers_events.next() => {
                let Some(event) = event else { return };
                let Some(active) = active.upgrade() else { return };
                match serde_json::from_slice::<ActiveSyncMessage>(&event.payload) {
                    Ok(m) if m.router == me => {}
                    Ok(m) => peers.apply(&mut lock(&active), m, Instant::now()),
                    Err(e) => tracing::warn!(error = %e, "undecodable router sync message"),
                }
            }
            event = loads.next() => {
                let Some(event) = event else { return };
                let Some(active) = active.upgrade() else { return };
                match serde_json::from_slice::<LoadMessage>(&event.payload) {
                    Ok(m) => {
                        let reported = Reported {
                            load: Load {
                                active_prefill_tokens: m.load.active_prefill_tokens,
                                active_blocks: u64::from(m.load.blocks_in_use),
                            },
                            sequences: (m.load.active_seqs + m.load.waiting_seqs) as usize,
                        };
                        lock(&active).report(m.worker, reported, Instant::now());
                    }
                    Err(e) => tracing::warn!(error = %e, "undecodable load report"),
                }
            }
            _ = sweep.tick() => {
                let Some(active) = active.upgrade() else { return };
                peers.expire(&mut lock(&active), Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_requests_count_until_they_end_or_it_falls_silent() {
        let mut active = ActiveSequences::new();
        let mut peers = Peers::default();
        let t0 = Instant::now();
        let routed = |request: &str, worker| ActiveChange::Routed {
            request: request.into(),
            worker,
            prefill_tokens: 10,
            blocks: 2,
        };
        let message = |router, changes| ActiveSyncMessage { router, changes };
        peers.apply(&mut active, message(7, vec![routed("a", 1), routed("b", 1)]), t0);
        peers.apply(&mut active, message(8, vec![routed("c", 2)]), t0);
        peers.apply(
            &mut active,
            message(7, vec![ActiveChange::Ended { request: "a".into() }]),
            t0,
        );
        assert_eq!((active.active(1, t0), active.active(2, t0)), (1, 1));
        // Router 8 keeps talking (heartbeats); router 7 falls silent.
        let later = t0 + ROUTER_SILENCE;
        peers.apply(&mut active, message(8, vec![]), later);
        peers.expire(&mut active, later);
        assert_eq!((active.active(1, later), active.active(2, later)), (0, 1));
    }
}
