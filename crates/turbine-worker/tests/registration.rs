//! A worker registers its instance and model card under one lease, serves generate
//! requests, publishes its engine's KV events and load, answers KV state requests, and
//! takes every registration away when it stops.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};
use turbine_engine::pool::EventReplica;
use turbine_engine::{EchoEngine, Engine, MockerConfig, MockerEngine};
use turbine_protocols::discovery::{kv_events_subject, load_subject, model_key, models_prefix, ModelEntry};
use turbine_protocols::kv::{KvEventMessage, KvStateRequest, KvStateResponse, LoadMessage};
use turbine_protocols::{EngineOutput, FinishReason, ModelCard, PreprocessedRequest, StopConditions, TokenizerKind};
use turbine_runtime::{
    instance_key, Discovery, EndpointId, EventPlane, Instance, MemoryDiscovery, MemoryEventPlane, Runtime,
    ServeOptions, TransportOptions,
};
use turbine_worker::{Worker, WorkerConfig};

fn config(model: &str) -> Result<WorkerConfig> {
    Ok(WorkerConfig {
        endpoint: EndpointId::new("ns", "worker", "generate"),
        model: ModelCard {
            name: model.into(),
            context_length: 4096,
            tokenizer: TokenizerKind::Bytes,
            kv_block_size: Some(4),
            timing: None,
        },
        serve: ServeOptions {
            transport: TransportOptions::Tcp {
                bind: "127.0.0.1:0".parse()?,
                advertise: None,
            },
            ..Default::default()
        },
        load_report_interval: Duration::from_millis(10),
        disagg: None,
    })
}

fn request(tokens: Vec<u32>, max_tokens: u32) -> PreprocessedRequest {
    PreprocessedRequest {
        request_id: "r".into(),
        model: "m".into(),
        token_ids: tokens,
        stop: StopConditions {
            max_tokens: Some(max_tokens),
            stop_token_ids: vec![],
        },
        sampling: Default::default(),
        disagg: None,
    }
}

#[tokio::test]
async fn registers_serves_and_deregisters() -> Result<()> {
    let discovery = MemoryDiscovery::new();
    let runtime = Runtime::new(Arc::new(discovery.clone()), Arc::new(MemoryEventPlane::new()));
    let config = config("m")?;
    let worker = Worker::start(&runtime, Arc::new(EchoEngine::default()), config.clone()).await?;
    let id = worker.instance().id;

    let models = discovery.list(&models_prefix("ns")).await?;
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].key, model_key("ns", "m", id.0));
    let entry: ModelEntry = serde_json::from_slice(&models[0].value)?;
    let want = ModelEntry {
        card: config.model,
        endpoint: "ns/worker/generate".into(),
        kv_state_endpoint: None,
        role: Default::default(),
    };
    assert_eq!(entry, want, "the echo engine has no KV cache to report");
    assert_eq!(discovery.list(&instance_key(&config.endpoint, id)).await?.len(), 1);

    let outputs: Vec<EngineOutput> = runtime
        .client()
        .call(worker.instance(), request(vec![1, 2, 3], 2))
        .await?
        .try_collect()
        .await?;
    let tokens: Vec<u32> = outputs.iter().flat_map(|o| o.token_ids.clone()).collect();
    assert_eq!(tokens, [1, 2]);
    assert_eq!(outputs.last().and_then(|o| o.finish_reason), Some(FinishReason::Length));

    worker.run(async {}).await;
    assert!(
        discovery.list("turbine/").await?.is_empty(),
        "nothing of the worker is left in discovery"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_kv_events_and_load_and_answers_state_requests() -> Result<()> {
    let discovery = MemoryDiscovery::new();
    let events = MemoryEventPlane::new();
    let runtime = Runtime::new(Arc::new(discovery.clone()), Arc::new(events.clone()));
    let mut kv_events = events.subscribe(&kv_events_subject("ns", "m")).await?;
    let mut loads = events.subscribe(&load_subject("ns", "m")).await?;

    let engine = MockerEngine::start(MockerConfig {
        speedup: 100.0,
        block_size: 4,
        ..Default::default()
    })?;
    let worker = Worker::start(&runtime, Arc::new(engine) as Arc<dyn Engine>, config("m")?).await?;
    let id = worker.instance().id;
    let entry: ModelEntry = serde_json::from_slice(&discovery.list(&models_prefix("ns")).await?[0].value)?;
    assert_eq!(entry.kv_state_endpoint.as_deref(), Some("ns/worker/kv_state"));

    // Two requests sharing a 16-token prefix: the second is partly served from cache.
    let client = runtime.client::<PreprocessedRequest, EngineOutput>();
    let prefix: Vec<u32> = (0..16).collect();
    let first: Vec<EngineOutput> = client
        .call(worker.instance(), request(prefix.clone(), 3))
        .await?
        .try_collect()
        .await?;
    assert_eq!(first[0].cached_tokens, Some(0));
    let second_prompt = [prefix, vec![99; 5]].concat();
    let second: Vec<EngineOutput> = client
        .call(worker.instance(), request(second_prompt, 3))
        .await?
        .try_collect()
        .await?;
    assert_eq!(
        second[0].cached_tokens,
        Some(16),
        "the shared prefix came from the cache"
    );

    // Events arrive on the event plane, tagged with the worker, numbered without gaps.
    let mut replica = EventReplica::default();
    let mut last = None;
    while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(200), kv_events.next()).await {
        let m = KvEventMessage::decode(&e.payload)?;
        assert_eq!(m.worker, id.0);
        for event in &m.events {
            replica.apply(event)?;
            last = Some(event.event_id);
        }
    }
    let last = last.context("no KV event published")?;

    let load: LoadMessage = serde_json::from_slice(&loads.next().await.context("a load report")?.payload)?;
    assert_eq!(load.worker, id.0);
    assert_eq!(load.load.blocks_total, 16384);

    // The state endpoint, under the worker's instance id: recent events, or a snapshot.
    let state_endpoint: EndpointId = "ns/worker/kv_state".parse()?;
    let registered = discovery.list(&instance_key(&state_endpoint, id)).await?;
    let state_instance: Instance = serde_json::from_slice(&registered[0].value)?;
    let state = runtime.client::<KvStateRequest, KvStateResponse>();
    let ask = |after| {
        let state = state.clone();
        let instance = state_instance.clone();
        async move {
            let mut s = state.call(&instance, KvStateRequest { after_event_id: after }).await?;
            s.next().await.context("a response")?.map_err(anyhow::Error::from)
        }
    };
    match ask(Some(0)).await? {
        KvStateResponse::Events { events } => {
            assert_eq!(events.first().map(|e| e.event_id), Some(1));
            assert_eq!(events.last().map(|e| e.event_id), Some(last));
        }
        other => panic!("expected recent events, got {other:?}"),
    }
    match ask(None).await? {
        KvStateResponse::Snapshot { snapshot } => {
            assert_eq!(snapshot.last_event_id, Some(last));
            assert_eq!(
                EventReplica::of(&snapshot),
                replica.registered,
                "snapshot equals the replayed events"
            );
        }
        other => panic!("expected a snapshot, got {other:?}"),
    }

    worker.run(async {}).await;
    assert!(discovery.list("turbine/").await?.is_empty());
    Ok(())
}

/// An engine that reports load but publishes no KV events, as an external server does.
struct LoadOnly {
    echo: EchoEngine,
    load: tokio::sync::watch::Receiver<turbine_protocols::kv::WorkerLoad>,
}

impl Engine for LoadOnly {
    fn generate(
        &self,
        request: PreprocessedRequest,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Result<turbine_engine::EngineStream, turbine_engine::EngineError> {
        self.echo.generate(request, cancel)
    }

    fn load(&self) -> Option<tokio::sync::watch::Receiver<turbine_protocols::kv::WorkerLoad>> {
        Some(self.load.clone())
    }
}

#[tokio::test]
async fn load_is_published_without_kv_events() -> Result<()> {
    let discovery = MemoryDiscovery::new();
    let events = MemoryEventPlane::new();
    let runtime = Runtime::new(Arc::new(discovery.clone()), Arc::new(events.clone()));
    let mut loads = events.subscribe(&load_subject("ns", "m")).await?;
    let (tx, rx) = tokio::sync::watch::channel(turbine_protocols::kv::WorkerLoad::default());
    let engine = LoadOnly {
        echo: EchoEngine::new(Default::default()),
        load: rx,
    };
    let worker = Worker::start(&runtime, Arc::new(engine) as Arc<dyn Engine>, config("m")?).await?;
    let entry: ModelEntry = serde_json::from_slice(&discovery.list(&models_prefix("ns")).await?[0].value)?;
    assert_eq!(entry.kv_state_endpoint, None, "no KV events are promised");

    tx.send_replace(turbine_protocols::kv::WorkerLoad {
        active_seqs: 3,
        waiting_seqs: 2,
        ..Default::default()
    });
    let load: LoadMessage = serde_json::from_slice(&loads.next().await.context("a load report")?.payload)?;
    assert_eq!(load.worker, worker.instance().id.0);
    assert_eq!((load.load.active_seqs, load.load.waiting_seqs), (3, 2));
    Ok(())
}
