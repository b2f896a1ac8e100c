//! The in-process connector of `turbine serve --planner`: the pool is workers in this
//! process, started and drained as `turbine serve` runs its fixed ones. A drain is the
//! worker's own shutdown (it leaves discovery, finishes what it has within its grace period,
//! and the frontend migrates what is cut at the end); a worker that fails to start is
//! counted and left for the planner to ask for again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use turbine_planner::{Phase, WorkerObservation};
use turbine_protocols::kv::WorkerLoad;
use turbine_runtime::Runtime;
use turbine_worker::{MetricsSources, Worker, WorkerConfig};

use super::local::LocalStats;
use crate::args::EngineSetup;

enum State {
    Starting(JoinHandle<()>),
    Ready {
        label: String,
        load: Option<watch::Receiver<WorkerLoad>>,
        stop: CancellationToken,
        done: JoinHandle<()>,
    },
    Draining {
        since: Instant,
        label: String,
        done: JoinHandle<()>,
    },
}

struct Member {
    asked: Instant,
    state: State,
}

/// How a start ended, sent back by its task.
type Started = (u64, anyhow::Result<Worker>);

pub struct InProcessConnector {
    runtime: Runtime,
    setup: Arc<EngineSetup>,
    config: WorkerConfig,
    sources: MetricsSources,
    members: BTreeMap<u64, Member>,
    /// Engine seeds and KV tier files are per worker index: a new worker never reuses one.
    next_id: u64,
    epoch: Instant,
    started_tx: mpsc::UnboundedSender<Started>,
    started_rx: mpsc::UnboundedReceiver<Started>,
    stats: LocalStats,
}

impl InProcessConnector {
    /// Workers get engines from `setup` and serve as `config` says; their metrics join
    /// `sources`. `epoch` is the planner's time zero.
    pub fn new(
        runtime: Runtime,
        setup: Arc<EngineSetup>,
        config: WorkerConfig,
        sources: MetricsSources,
        epoch: Instant,
    ) -> Self {
        let (started_tx, started_rx) = mpsc::unbounded_channel();
        Self {
            runtime,
            setup,
            config,
            sources,
            members: BTreeMap::new(),
            next_id: 0,
            epoch,
            started_tx,
            started_rx,
            stats: LocalStats::default(),
        }
    }

    pub fn stats(&self) -> LocalStats {
        self.stats
    }

    /// Starts one more worker; its id in the pool. It is ready once [`Self::poll`] sees it
    /// registered.
    pub fn start(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let (runtime, setup, config, tx) = (
            self.runtime.clone(),
            Arc::clone(&self.setup),
            self.config.clone(),
            self.started_tx.clone(),
        );
        let task = tokio::spawn(async move {
            let index = usize::try_from(id).unwrap_or(usize::MAX);
            let started = async {
                // Loading weights blocks for seconds: not on the runtime's threads.
                let engine = tokio::task::spawn_blocking(move || setup.engine(index)).await??;
                anyhow::Ok(Worker::start(&runtime, engine, config).await?)
            }
            .await;
            let _ = tx.send((id, started));
        });
        self.members.insert(
            id,
            Member {
                asked: Instant::now(),
                state: State::Starting(task),
            },
        );
        self.stats.started += 1;
        id
    }

    /// Marks worker `id` draining and begins its shutdown; false if it is not ready.
    pub fn drain(&mut self, id: u64) -> bool {
        let Some(member) = self.members.remove(&id) else {
            return false;
        };
        let (state, drained) = match member.state {
            State::Ready { label, stop, done, .. } => {
                stop.cancel();
                let since = Instant::now();
                (State::Draining { since, label, done }, true)
            }
            other => (other, false),
        };
        self.members.insert(
            id,
            Member {
                asked: member.asked,
                state,
            },
        );
        self.stats.drained += u64::from(drained);
        drained
    }

    /// Abandons a start that takes too long.
    pub fn cancel(&mut self, id: u64) {
        if let Some(Member {
            state: State::Starting(task),
            ..
        }) = self.members.get(&id)
        {
            task.abort();
            self.members.remove(&id);
            self.stats.cancelled += 1;
        }
    }

    /// Takes in finished starts and finished drains; a worker whose task ended without
    /// being drained is dropped from the pool for the planner to replace.
    pub fn poll(&mut self) {
        while let Ok((id, started)) = self.started_rx.try_recv() {
            let Some(member) = self.members.get_mut(&id) else {
                // Cancelled meanwhile: the worker it made stops here.
                continue;
            };
            match started {
                Ok(worker) => {
                    let source = worker.metrics_source();
                    let label = source.label.clone();
                    let load = source.load.clone();
                    self.sources.add(source);
                    let stop = CancellationToken::new();
                    let done = tokio::spawn(worker.run(stop.clone().cancelled_owned()));
                    member.state = State::Ready {
                        label,
                        load,
                        stop,
                        done,
                    };
                }
                Err(e) => {
                    tracing::warn!(worker = id, error = %format!("{e:#}"), "a worker failed to start");
                    self.members.remove(&id);
                }
            }
        }
        let ended: Vec<u64> = self
            .members
            .iter()
            .filter(|(_, m)| match &m.state {
                State::Ready { done, .. } | State::Draining { done, .. } => done.is_finished(),
                State::Starting(_) => false,
            })
            .map(|(&id, _)| id)
            .collect();
        for id in ended {
            if let Some(member) = self.members.remove(&id) {
                match member.state {
                    State::Draining { label, .. } => self.sources.remove(&label),
                    State::Ready { label, .. } => {
                        tracing::warn!(worker = id, "a worker stopped without being drained");
                        self.sources.remove(&label);
                        self.stats.restarted += 1;
                    }
                    State::Starting(_) => {}
                }
            }
        }
    }

    /// The pool as the planner sees it, each worker's load from its own reports.
    pub fn observe(&self) -> Vec<WorkerObservation> {
        let since = |t: Instant| t.saturating_duration_since(self.epoch);
        self.members
            .iter()
            .map(|(&id, m)| match &m.state {
                State::Starting(_) => WorkerObservation::unloaded(id, Phase::Starting { since: since(m.asked) }),
                State::Draining { since: t, .. } => {
                    WorkerObservation::unloaded(id, Phase::Draining { since: since(*t) })
                }
                State::Ready { load, .. } => {
                    let mut w = WorkerObservation::unloaded(id, Phase::Ready);
                    if let Some(load) = load {
                        let l = *load.borrow();
                        w.in_flight = l.active_seqs + l.waiting_seqs;
                        w.queue_depth = l.waiting_seqs;
                        w.queued_prefill_tokens = l.active_prefill_tokens;
                        w.kv_usage = f64::from(l.blocks_in_use) / f64::from(l.blocks_total.max(1));
                    }
                    w
                }
            })
            .collect()
    }

    /// Drains every worker and waits for them, as `turbine serve` does at its shutdown.
    pub async fn shutdown(&mut self, grace: Duration) {
        let mut done = Vec::new();
        for (_, member) in std::mem::take(&mut self.members) {
            match member.state {
                State::Starting(task) => task.abort(),
                State::Ready { stop, done: d, .. } => {
                    stop.cancel();
                    done.push(d);
                }
                State::Draining { done: d, .. } => done.push(d),
            }
        }
        let all = futures::future::join_all(done);
        if tokio::time::timeout(grace + Duration::from_secs(2), all).await.is_err() {
            tracing::warn!("workers still draining at the end of the grace period");
        }
    }
}
