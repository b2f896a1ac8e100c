//! Sends a preprocessed request to a worker for its model, moving on to the next worker
//! when one cannot take it (draining, unreachable). Every routed request is tracked until
//! it ends, so that `least-loaded`, `kv` and `session` see each worker's load as routed.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use turbine_protocols::kv::StorageTier;
use turbine_protocols::{Disagg, EngineOutput, KvTransferParams, PreprocessedRequest};
use turbine_router::{Router, RouterMode, WorkerId};
use turbine_runtime::{Client, ErrorKind, HandlerError, Instance, InstanceId, RequestError, ResponseStream, Runtime};

use crate::error::ApiError;
use crate::kv_routing::{KvRouter, SelectorOverrides};
use crate::models::{ModelManager, ServedModel};
use crate::replica::Replicated;

pub(crate) type Outputs = BoxStream<'static, Result<EngineOutput, RequestError>>;

/// How one request asks to be routed.
#[derive(Debug, Clone, Default)]
pub(crate) struct RouteOptions {
    /// `session` mode: requests with the same id go to the same worker.
    pub(crate) session: Option<String>,
    pub(crate) overrides: SelectorOverrides,
}

/// Sessions idle longer than this are forgotten, and at most this many are kept.
const SESSION_TTL: Duration = Duration::from_secs(30 * 60);
const MAX_SESSIONS: usize = 100_000;

/// How long a request waits on a worker that has left discovery without sending anything
/// before it counts as lost. A worker that stops gracefully leaves first and goes on
/// streaming while it drains; a frozen or cut-off one leaves only when its lease expires,
/// keeps its connection open, and says nothing more.
const DEPARTED_SILENCE: Duration = Duration::from_secs(1);

/// What a request on a worker that left and went silent fails with: retryable elsewhere.
fn departed(worker: InstanceId) -> RequestError {
    RequestError::Handler(HandlerError::new(
        ErrorKind::Unavailable,
        format!("worker {worker} left discovery and sent nothing for {DEPARTED_SILENCE:?}"),
    ))
}

#[derive(Debug)]
pub(crate) struct Dispatcher {
    pub(crate) models: ModelManager,
    client: Client<PreprocessedRequest, EngineOutput>,
    mode: RouterMode,
    kv: Option<Arc<KvRouter>>,
    active: Replicated,
    sessions: Mutex<HashMap<String, (WorkerId, Instant)>>,
    /// One router per model, so that round-robin takes turns among that model's workers.
    routers: Mutex<HashMap<String, Arc<Router>>>,
    /// Time spent choosing a worker, per decision.
    decision_latency: prometheus::Histogram,
    /// How many times one request may move to another worker when its worker is lost.
    migration_limit: u32,
    migrations: prometheus::IntCounterVec,
    disagg: prometheus::IntCounterVec,
    /// Prompt blocks cached on each `kv` decision's worker, by tier.
    kv_matched_blocks: prometheus::IntCounterVec,
    disagg_policy: crate::DisaggPolicy,
}

/// A worker chosen for a request: its place among the candidates, and the prompt tokens it
/// has to compute (those its cache lacks, as far as the router knows).
#[derive(Debug, Clone, Copy)]
struct Picked {
    pos: usize,
    uncached: u64,
}

/// Where a disaggregated model's request is prefilled, and why: a label of
/// `turbine_frontend_disagg_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Remote,
    /// Less than a block, or fewer uncached tokens than the policy's minimum.
    LocalShort,
    /// The decode worker holds most of the prompt already.
    LocalCached,
    /// Every prefill worker has more queued than the policy allows.
    LocalPrefillBusy,
    /// No prefill worker could do it.
    LocalPrefillFailed,
}

impl Decision {
    fn label(self) -> &'static str {
        match self {
            Self::Remote => "remote",
            Self::LocalShort => "local_short",
            Self::LocalCached => "local_cached",
            Self::LocalPrefillBusy => "local_prefill_busy",
            Self::LocalPrefillFailed => "local_prefill_failed",
        }
    }
}

/// Whether a prompt of `isl` tokens, `uncached` of them missing on its decode worker, is
/// worth a prefill worker; `queued` is the least any prefill worker has queued. `None`: it is.
fn stays_local(
    policy: &crate::DisaggPolicy,
    block_size: usize,
    isl: usize,
    uncached: usize,
    queued: u64,
) -> Option<Decision> {
    let block_size = block_size.max(1);
    if isl < block_size || uncached < policy.min_uncached_tokens {
        return Some(Decision::LocalShort);
    }
    // Less than a block missing: nothing whole to move, and the decode worker computes the
    // tail as fast as it would import it.
    if uncached < block_size || (uncached as f64) < policy.min_uncached_ratio * isl as f64 {
        return Some(Decision::LocalCached);
    }
    if policy.max_prefill_queue_tokens.is_some_and(|max| queued > max) {
        return Some(Decision::LocalPrefillBusy);
    }
    None
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Dispatcher {
    pub(crate) fn new(
        runtime: &Runtime,
        models: ModelManager,
        config: &crate::FrontendConfig,
        kv: Option<Arc<KvRouter>>,
        active: Replicated,
        metrics: &crate::metrics::Metrics,
    ) -> Self {
        Self {
            decision_latency: metrics.decision.clone(),
            migration_limit: config.migration_limit,
            migrations: metrics.migrations.clone(),
            disagg: metrics.disagg.clone(),
            kv_matched_blocks: metrics.kv_matched_blocks.clone(),
            disagg_policy: config.disagg.clone(),
            models,
            client: runtime.client(),
            mode: config.router_mode,
            kv,
            active,
            sessions: Mutex::default(),
            routers: Mutex::default(),
        }
    }

    /// The model's card and workers, or the error a client should see for it.
    pub(crate) fn model(&self, name: &str) -> Result<ServedModel, ApiError> {
        let served = self
            .models
            .snapshot()
            .models
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError::model_not_found(name))?;
        if let Err(e) = &served.text {
            return Err(ApiError::unavailable(format!(
                "model `{name}` cannot be served: its tokenizer did not load: {e}"
            )));
        }
        Ok(served)
    }

    fn router(&self, model: &str) -> Arc<Router> {
        lock(&self.routers)
            .entry(model.to_owned())
            .or_insert_with(|| Arc::new(Router::new(self.mode)))
            .clone()
    }

    /// Picks a worker among `candidates` and records the request as routed to it.
    fn pick(
        &self,
        served: &ServedModel,
        candidates: &[&Instance],
        request: &PreprocessedRequest,
        options: &RouteOptions,
    ) -> Option<Picked> {
        let isl = request.token_ids.len() as u64;
        let block_size = served.card.kv_block_size.map(u64::from);
        let blocks = block_size.map_or(0, |bs| isl.div_ceil(bs));
        let mut prefill = isl;
        let ids: Vec<WorkerId> = candidates.iter().map(|i| i.id.0).collect();

        let pinned = match (self.mode, &options.session) {
            (RouterMode::Session, Some(session)) => self.session_worker(session, &ids),
            _ => None,
        };
        let chosen = match (pinned, self.mode) {
            (Some(w), _) => Some(w),
            (None, RouterMode::LeastLoaded) => {
                let active = self.active.lock();
                let now = Instant::now();
                let least = ids.iter().map(|&w| active.active(w, now)).min()?;
                let tied: Vec<WorkerId> = ids
                    .iter()
                    .copied()
                    .filter(|&w| active.active(w, now) == least)
                    .collect();
                Some(tied[rand::random::<usize>() % tied.len()])
            }
            (None, RouterMode::Kv | RouterMode::Session) if self.kv.is_some() => {
                let loads: Vec<_> = {
                    let active = self.active.lock();
                    let now = Instant::now();
                    ids.iter().map(|&w| (w, active.load(w, now))).collect()
                };
                let (decision, bs) =
                    self.kv
                        .as_ref()?
                        .choose(served, &loads, &request.token_ids, &options.overrides)?;
                tracing::debug!(
                    request_id = %request.request_id,
                    worker = decision.worker,
                    units = decision.units,
                    candidates = ?decision
                        .candidates
                        .iter()
                        .map(|c| (
                            c.worker,
                            c.overlap_blocks,
                            round1(c.credit),
                            round1(c.prefill),
                            round1(c.decode),
                            round1(c.cost)
                        ))
                        .collect::<Vec<_>>(),
                    "kv routing decision (worker, overlap blocks, their credit by tier, prefill, decode, cost)"
                );
                let chosen = decision.candidates.iter().find(|c| c.worker == decision.worker)?;
                prefill -= (u64::from(chosen.overlap_blocks) * u64::from(bs)).min(isl);
                for tier in StorageTier::ALL {
                    let n = chosen.tiers.get(tier);
                    if n > 0 {
                        self.kv_matched_blocks
                            .with_label_values(&[&served.card.name, tier.as_str()])
                            .inc_by(u64::from(n));
                    }
                }
                Some(decision.worker)
            }
            (None, _) => self.router(&served.card.name).select(&ids),
        }?;
        if let (RouterMode::Session, Some(session)) = (self.mode, &options.session) {
            self.pin_session(session, chosen);
        }
        self.active.routed(&request.request_id, chosen, prefill, blocks);
        let pos = ids.iter().position(|&w| w == chosen)?;
        Some(Picked { pos, uncached: prefill })
    }

    /// Completes once `worker` has been out of `model`'s instances for [`DEPARTED_SILENCE`];
    /// never while it is listed.
    async fn gone_silent(&self, model: &str, worker: InstanceId) {
        let mut snapshots = self.models.subscribe();
        loop {
            let listed = snapshots
                .borrow_and_update()
                .models
                .get(model)
                .is_some_and(|m| m.instances.iter().chain(&m.prefill).any(|i| i.id == worker));
            let changed = if listed {
                snapshots.changed().await
            } else {
                tokio::select! {
                    () = tokio::time::sleep(DEPARTED_SILENCE) => return,
                    changed = snapshots.changed() => changed,
                }
            };
            if changed.is_err() {
                // The model manager is gone with the frontend: nothing will change.
                return std::future::pending().await;
            }
        }
    }

    /// The worker `session` is pinned to, if it is still among `ids`.
    fn session_worker(&self, session: &str, ids: &[WorkerId]) -> Option<WorkerId> {
        let mut sessions = lock(&self.sessions);
        match sessions.get_mut(session) {
            Some((w, used)) if ids.contains(w) && used.elapsed() < SESSION_TTL => {
                *used = Instant::now();
                Some(*w)
            }
            _ => None,
        }
    }

    fn pin_session(&self, session: &str, worker: WorkerId) {
        let mut sessions = lock(&self.sessions);
        if sessions.len() >= MAX_SESSIONS && !sessions.contains_key(session) {
            sessions.retain(|_, (_, used)| used.elapsed() < SESSION_TTL);
            if sessions.len() >= MAX_SESSIONS {
                // Still full of live sessions: drop the least recently used.
                if let Some(oldest) = sessions
                    .iter()
                    .min_by_key(|(_, (_, used))| *used)
                    .map(|(k, _)| k.clone())
                {
                    sessions.remove(&oldest);
                }
            }
        }
        sessions.insert(session.to_owned(), (worker, Instant::now()));
    }

    /// Starts `request` and keeps its outputs coming across worker failures: when a worker's
    /// connection is lost mid-stream, or it leaves discovery and goes silent (frozen, cut
    /// off), the prompt plus the tokens generated so far go to another worker, at most
    /// `migration_limit` times, and the caller sees one stream.
    /// Also returns the worker that took the request first.
    pub(crate) async fn generate(
        self: &Arc<Self>,
        served: &ServedModel,
        request: PreprocessedRequest,
        options: &RouteOptions,
    ) -> Result<(Outputs, InstanceId), ApiError> {
        // Watched even with migration off: a request on a worker that left and went silent
        // then fails, instead of waiting on its open connection for ever.
        let (mut outputs, first) = if served.prefill.is_empty() {
            self.dispatch(served, request.clone(), options, None).await?
        } else {
            self.disaggregated(served, &request, options).await?
        };
        let (d, options, model) = (self.clone(), options.clone(), served.card.name.clone());
        let stale = served.clone();
        let stream = async_stream::stream! {
            let mut request = request;
            let mut migrations = 0;
            let mut reported_cached = false;
            let mut worker = first;
            loop {
                let next = tokio::select! {
                    biased;
                    next = outputs.next() => next,
                    () = d.gone_silent(&model, worker) => Some(Err(departed(worker))),
                };
                match next {
                    Some(Ok(mut output)) => {
                        // Reported once, by the first worker: a migrated request's prompt is
                        // the new worker's cache business. Some engines know the figure only
                        // at the end (llama.cpp), so it is the first output that carries one.
                        if reported_cached || migrations > 0 {
                            output.cached_tokens = None;
                        } else if output.cached_tokens.is_some() {
                            reported_cached = true;
                        }
                        request.token_ids.extend_from_slice(&output.token_ids);
                        if let Some(m) = request.stop.max_tokens.as_mut() {
                            *m = m.saturating_sub(output.token_ids.len() as u32);
                        }
                        let done = output.finish_reason.is_some();
                        yield Ok(output);
                        if done {
                            return;
                        }
                    }
                    Some(Err(e)) if e.is_retryable_elsewhere() && migrations < d.migration_limit => {
                        migrations += 1;
                        d.migrations.with_label_values(&[model.as_str()]).inc();
                        tracing::warn!(request_id = %request.request_id, error = %e, migrations, "worker lost mid-stream; migrating the request");
                        request.request_id = format!("{}-m{migrations}", request.request_id);
                        let served = d.model(&model).unwrap_or_else(|_| stale.clone());
                        match d.dispatch(&served, request.clone(), &options, None).await {
                            Ok((next, to)) => (outputs, worker) = (next, to),
                            Err(api) => {
                                tracing::warn!(error = ?api, "migration found no worker");
                                yield Err(e);
                                return;
                            }
                        }
                    }
                    Some(Err(e)) => {
                        yield Err(e);
                        return;
                    }
                    None => return,
                }
            }
        };
        Ok((stream.boxed(), first))
    }

    /// Disaggregated serving, decode worker first: picks it (KV-aware over the decode pool),
    /// so that its cached prefix is known; decides by that and by the prefill pool's queue
    /// whether a prefill worker should compute the prompt; if so has one do it and hold the
    /// KV, and sends the decode worker where to fetch the blocks it lacks. Each decision is
    /// counted.
    async fn disaggregated(
        self: &Arc<Self>,
        served: &ServedModel,
        request: &PreprocessedRequest,
        options: &RouteOptions,
    ) -> Result<(Outputs, InstanceId), ApiError> {
        let decode: Vec<&Instance> = served.instances.iter().collect();
        let started = Instant::now();
        let picked = self.pick(served, &decode, request, options);
        self.decision_latency.observe(started.elapsed().as_secs_f64());
        let Some(picked) = picked else {
            return self.dispatch(served, request.clone(), options, None).await;
        };
        let target = decode[picked.pos].id;
        let block = served.card.kv_block_size.unwrap_or(1).max(1) as usize;
        let isl = request.token_ids.len();
        let queued = {
            let active = self.active.lock();
            let now = Instant::now();
            served
                .prefill
                .iter()
                .map(|i| active.load(i.id.0, now).active_prefill_tokens)
                .min()
                .unwrap_or(0)
        };
        let mut leg = request.clone();
        let decision = match stays_local(&self.disagg_policy, block, isl, picked.uncached as usize, queued) {
            Some(local) => local,
            None => match self.remote_prefill(served, request, options).await {
                Some(kv) => {
                    leg.disagg = Some(Disagg::Decode { kv });
                    // The decode worker imports the prompt instead of computing it.
                    self.active
                        .routed(&request.request_id, target.0, 0, isl.div_ceil(block) as u64);
                    Decision::Remote
                }
                None => Decision::LocalPrefillFailed,
            },
        };
        self.disagg
            .with_label_values(&[served.card.name.as_str(), decision.label()])
            .inc();
        self.dispatch(served, leg, options, Some(target)).await
    }

    /// Has a prefill worker (KV-aware over the prefill pool, the next one when one fails)
    /// compute the prompt and hold its KV; returns where, for the decode worker.
    async fn remote_prefill(
        self: &Arc<Self>,
        served: &ServedModel,
        request: &PreprocessedRequest,
        options: &RouteOptions,
    ) -> Option<KvTransferParams> {
        let mut leg = request.clone();
        leg.request_id = format!("{}-prefill", request.request_id);
        leg.disagg = Some(Disagg::Prefill);
        let mut candidates: Vec<&Instance> = served.prefill.iter().collect();
        while !candidates.is_empty() {
            let picked = self.pick(served, &candidates, &leg, options)?;
            let instance = candidates.swap_remove(picked.pos);
            let prefilled = async {
                let mut stream = match self.client.call(instance, leg.clone()).await {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::warn!(request_id = %leg.request_id, worker = %instance.id, error = %e, "prefill worker cannot take the request");
                        return None;
                    }
                };
                let mut params = None;
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(output) if output.kv_transfer.is_some() => params = output.kv_transfer,
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(request_id = %leg.request_id, worker = %instance.id, error = %e, "prefill failed");
                            return None;
                        }
                    }
                }
                params
            };
            // A frozen or cut-off prefill worker keeps its connection open and says nothing:
            // it counts as failed once it has left discovery and stayed silent.
            let params = tokio::select! {
                params = prefilled => params,
                () = self.gone_silent(&served.card.name, instance.id) => {
                    tracing::warn!(request_id = %leg.request_id, worker = %instance.id, "prefill worker left discovery mid-prefill");
                    None
                }
            };
            self.active.ended(&leg.request_id);
            if let Some(params) = params {
                return Some(*params);
            }
        }
        None
    }

    /// Starts `request` on one of `served`'s workers, `chosen` first when given (already
    /// picked and recorded); returns its outputs and that worker.
    pub(crate) async fn dispatch(
        self: &Arc<Self>,
        served: &ServedModel,
        request: PreprocessedRequest,
        options: &RouteOptions,
        mut chosen: Option<InstanceId>,
    ) -> Result<(Outputs, InstanceId), ApiError> {
        let mut candidates: Vec<&Instance> = served.instances.iter().collect();
        let mut last_error = None;
        while !candidates.is_empty() {
            let preset = chosen.take().and_then(|id| candidates.iter().position(|i| i.id == id));
            let pos = match preset {
                Some(pos) => pos,
                None => {
                    let started = Instant::now();
                    let picked = self.pick(served, &candidates, &request, options);
                    self.decision_latency.observe(started.elapsed().as_secs_f64());
                    let Some(picked) = picked else {
                        break;
                    };
                    picked.pos
                }
            };
            let instance = candidates.swap_remove(pos);
            let called = tokio::select! {
                called = self.client.call(instance, request.clone()) => called,
                () = self.gone_silent(&served.card.name, instance.id) => Err(departed(instance.id)),
            };
            match called {
                Ok(stream) => {
                    tracing::debug!(request_id = %request.request_id, worker = %instance.id, "routed");
                    let tracked = Tracked {
                        inner: stream,
                        dispatcher: self.clone(),
                        request_id: request.request_id,
                        first: true,
                    };
                    return Ok((tracked.boxed(), instance.id));
                }
                Err(e) => {
                    self.active.ended(&request.request_id);
                    if !e.is_retryable_elsewhere() {
                        return Err(e.into());
                    }
                    tracing::warn!(request_id = %request.request_id, worker = %instance.id, error = %e, "worker cannot take the request; trying another");
                    last_error = Some(e);
                }
            }
        }
        Err(match last_error {
            Some(e) => e.into(),
            None => ApiError::unavailable(format!("no worker is serving model `{}`", served.card.name)),
        })
    }
}

/// A routed request's outputs, telling the dispatcher when its prefill is done (the first
/// output) and when it ends (the stream dropped, finished or not).
struct Tracked {
    inner: ResponseStream<EngineOutput>,
    dispatcher: Arc<Dispatcher>,
    request_id: String,
    first: bool,
}

impl Stream for Tracked {
    type Item = Result<EngineOutput, RequestError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = futures::ready!(self.inner.poll_next_unpin(cx));
        if self.first && matches!(item, Some(Ok(_))) {
            self.first = false;
            self.dispatcher.active.first_token(&self.request_id);
        }
        Poll::Ready(item)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.dispatcher.active.ended(&self.request_id);
    }
}

/// One decimal is all a routing log needs.
fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DisaggPolicy;

    #[test]
    fn each_rule_keeps_its_prompts_local_and_lets_the_rest_go_remote() {
        let policy = DisaggPolicy {
            min_uncached_tokens: 100,
            min_uncached_ratio: 0.5,
            max_prefill_queue_tokens: Some(4096),
        };
        // (isl, uncached, queued on the least busy prefill worker) -> decision
        let cases = [
            ((10, 10, 0), Some(Decision::LocalShort)),
            ((99, 99, 0), Some(Decision::LocalShort)),
            ((1000, 90, 0), Some(Decision::LocalShort)),
            ((1000, 400, 0), Some(Decision::LocalCached)),
            ((1000, 500, 0), None),
            ((1000, 1000, 4096), None),
            ((1000, 1000, 4097), Some(Decision::LocalPrefillBusy)),
        ];
        for ((isl, uncached, queued), want) in cases {
            assert_eq!(
                stays_local(&policy, 16, isl, uncached, queued),
                want,
                "isl {isl}, uncached {uncached}, queued {queued}"
            );
        }
    }

    #[test]
    fn the_default_policy_moves_every_prompt_with_a_whole_block_missing() {
        let policy = DisaggPolicy::default();
        assert_eq!(stays_local(&policy, 16, 15, 15, 0), Some(Decision::LocalShort));
        assert_eq!(stays_local(&policy, 16, 16, 16, u64::MAX), None);
        // All but a tail cached on the decode worker: it computes the tail itself.
        assert_eq!(stays_local(&policy, 16, 55, 7, 0), Some(Decision::LocalCached));
        assert_eq!(stays_local(&policy, 16, 55, 23, 0), None);
    }
}
