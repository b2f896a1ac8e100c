//! The model manager: follows discovery to know which models are served, and by which
//! instances, as workers come and go.
//!
//! A task owns the raw state and applies watch events in order; request handlers read an
//! immutable snapshot that the task replaces after every change.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::watch;
use turbine_protocols::discovery::{models_prefix, parse_model_key, ModelEntry};
use turbine_protocols::{ModelCard, TokenizerKind};
use turbine_runtime::{DiscoveryError, Instance, Runtime, WatchEvent};

use crate::preprocess::ModelText;

/// A model's tokenizer and chat template, or why they could not be loaded.
pub(crate) type LoadedText = Result<Arc<ModelText>, Arc<str>>;

/// The models served right now and the instances serving each.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub(crate) models: BTreeMap<String, ServedModel>,
    /// Every instance of every endpoint in the namespace, by endpoint and id: how to reach a
    /// worker's other endpoints (its KV state) from its generate instance.
    pub(crate) instances: HashMap<(String, u64), Instance>,
}

#[derive(Debug, Clone)]
pub(crate) struct ServedModel {
    pub(crate) card: ModelCard,
    pub(crate) text: LoadedText,
    /// Where its workers answer KV state requests, if they publish KV events.
    pub(crate) kv_state_endpoint: Option<String>,
    /// The workers that generate (aggregated and decode), sorted by id, so that routers see
    /// a stable order.
    pub(crate) instances: Vec<Instance>,
    /// Prefill workers of disaggregated serving, sorted by id: they only take prefills.
    pub(crate) prefill: Vec<Instance>,
}

#[derive(Debug, Clone)]
pub(crate) struct ModelManager {
    rx: watch::Receiver<Arc<Snapshot>>,
}

impl ModelManager {
    /// Loads what discovery holds now and follows it from there.
    pub(crate) async fn start(runtime: &Runtime, namespace: &str) -> Result<Self, DiscoveryError> {
        let models = runtime.discovery().watch(&models_prefix(namespace)).await?;
        let instances = runtime
            .discovery()
            .watch(&format!("turbine/{namespace}/instances/"))
            .await?;
        let mut state = State {
            namespace: namespace.to_owned(),
            ..Default::default()
        };
        for kv in models.initial {
            state.apply(Change::Model(WatchEvent::Put(kv)));
        }
        for kv in instances.initial {
            state.apply(Change::Instance(WatchEvent::Put(kv)));
        }
        let (tx, rx) = watch::channel(Arc::new(state.snapshot()));
        let mut changes =
            futures::stream::select(models.events.map(Change::Model), instances.events.map(Change::Instance));
        tokio::spawn(async move {
            // Forgets departed models even when discovery is quiet.
            let mut expiry = tokio::time::interval(DEPARTED_MODEL_TTL / 10);
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = expiry.tick() => {
                        if state.recent.len() > tx.borrow().models.values().filter(|m| !m.instances.is_empty()).count() {
                            tx.send_replace(Arc::new(state.snapshot()));
                        }
                    }
                    change = changes.next() => match change {
                        Some(change) => {
                            state.apply(change);
                            tx.send_replace(Arc::new(state.snapshot()));
                        }
                        None => {
                            tracing::error!("discovery watch ended; model list is frozen");
                            return;
                        }
                    },
                }
            }
        });
        Ok(Self { rx })
    }

    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.rx.borrow().clone()
    }

    /// Wakes on every change of the snapshot.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.rx.clone()
    }
}

enum Change {
    Model(WatchEvent),
    Instance(WatchEvent),
}

#[derive(Debug, Default)]
struct State {
    namespace: String,
    /// Model key → (model name, instance id, entry).
    entries: HashMap<String, (String, u64, ModelEntry)>,
    /// Instance key → instance.
    instances: HashMap<String, Instance>,
    /// Loaded once per tokenizer, not per snapshot: loading a real one takes a while.
    texts: HashMap<TokenizerKind, LoadedText>,
    /// Every model served recently, and when it last had an entry: a model whose workers are
    /// all gone (a restart, a crash) answers 503, which clients retry, rather than 404.
    recent: HashMap<String, (ServedModel, std::time::Instant)>,
}

/// How long a model with no workers left is still known.
const DEPARTED_MODEL_TTL: std::time::Duration = std::time::Duration::from_secs(10 * 60);

impl State {
    fn apply(&mut self, change: Change) {
        match change {
            Change::Model(WatchEvent::Put(kv)) => {
                let Some((model, id)) = parse_model_key(&self.namespace, &kv.key) else {
                    tracing::warn!(key = %kv.key, "ignoring malformed model key");
                    return;
                };
                match serde_json::from_slice::<ModelEntry>(&kv.value) {
                    Ok(entry) => {
                        self.entries.insert(kv.key, (model, id, entry));
                    }
                    Err(e) => {
                        tracing::warn!(key = %kv.key, error = %e, "ignoring undecodable model entry")
                    }
                }
            }
            Change::Model(WatchEvent::Delete { key }) => {
                self.entries.remove(&key);
            }
            Change::Instance(WatchEvent::Put(kv)) => match serde_json::from_slice::<Instance>(&kv.value) {
                Ok(instance) => {
                    self.instances.insert(kv.key, instance);
                }
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "ignoring undecodable instance")
                }
            },
            Change::Instance(WatchEvent::Delete { key }) => {
                self.instances.remove(&key);
            }
        }
    }

    fn text(&mut self, kind: &TokenizerKind) -> LoadedText {
        self.texts
            .entry(kind.clone())
            .or_insert_with(|| {
                // Blocks this task while a tokenizer file is read: it happens once per model,
                // and request handlers keep using the previous snapshot meanwhile.
                ModelText::load(kind).map(Arc::new).map_err(|e| {
                    tracing::error!(tokenizer = ?kind, error = %e, "cannot load the model's tokenizer");
                    Arc::from(e.to_string())
                })
            })
            .clone()
    }

    fn snapshot(&mut self) -> Snapshot {
        let kinds: Vec<TokenizerKind> = self
            .entries
            .values()
            .map(|(_, _, e)| e.card.tokenizer.clone())
            .collect();
        self.texts.retain(|k, _| kinds.contains(k));
        let texts: HashMap<TokenizerKind, LoadedText> = kinds.iter().map(|k| (k.clone(), self.text(k))).collect();
        let by_id: HashMap<(String, u64), &Instance> = self
            .instances
            .values()
            .map(|i| ((i.endpoint.to_string(), i.id.0), i))
            .collect();
        let mut models: BTreeMap<String, ServedModel> = BTreeMap::new();
        for (model, id, entry) in self.entries.values() {
            let served = models.entry(model.clone()).or_insert_with(|| ServedModel {
                card: entry.card.clone(),
                text: texts
                    .get(&entry.card.tokenizer)
                    .cloned()
                    .unwrap_or_else(|| Err(Arc::from("tokenizer not loaded"))),
                kv_state_endpoint: entry.kv_state_endpoint.clone(),
                instances: Vec::new(),
                prefill: Vec::new(),
            });
            // A model entry whose instance is not (yet) visible is listed but not routable.
            if let Some(instance) = by_id.get(&(entry.endpoint.clone(), *id)) {
                let pool = if entry.role.generates() {
                    &mut served.instances
                } else {
                    &mut served.prefill
                };
                pool.push((*instance).clone());
            }
        }
        for served in models.values_mut() {
            served.instances.sort_by_key(|i| i.id);
            served.prefill.sort_by_key(|i| i.id);
        }
        let now = std::time::Instant::now();
        self.recent
            .retain(|_, (_, seen)| now.duration_since(*seen) < DEPARTED_MODEL_TTL);
        for (name, served) in &models {
            let mut departed = served.clone();
            departed.instances.clear();
            departed.prefill.clear();
            self.recent.insert(name.clone(), (departed, now));
        }
        for (name, (departed, _)) in &self.recent {
            models.entry(name.clone()).or_insert_with(|| departed.clone());
        }
        let instances = self
            .instances
            .values()
            .map(|i| ((i.endpoint.to_string(), i.id.0), i.clone()))
            .collect();
        Snapshot { models, instances }
    }
}
