//! A worker registers its instance and model card under one lease, serves generate
//! requests, and takes both registrations away when it stops.

use std::sync::Arc;

use anyhow::Result;
use futures::TryStreamExt;
use turbine_engine::EchoEngine;
use turbine_protocols::discovery::{model_key, models_prefix, ModelEntry};
use turbine_protocols::{
    EngineOutput, FinishReason, ModelCard, PreprocessedRequest, StopConditions, TokenizerKind,
};
use turbine_runtime::{
    instance_key, Discovery, EndpointId, MemoryDiscovery, MemoryEventPlane, Runtime, ServeOptions,
    TransportOptions,
};
use turbine_worker::{Worker, WorkerConfig};

#[tokio::test]
async fn registers_serves_and_deregisters() -> Result<()> {
    let discovery = MemoryDiscovery::new();
    let runtime = Runtime::new(
        Arc::new(discovery.clone()),
        Arc::new(MemoryEventPlane::new()),
    );
    let endpoint = EndpointId::new("ns", "worker", "generate");
    let card = ModelCard {
        name: "m".into(),
        context_length: 64,
        tokenizer: TokenizerKind::Bytes,
    };
    let config = WorkerConfig {
        endpoint: endpoint.clone(),
        model: card.clone(),
        serve: ServeOptions {
            transport: TransportOptions::Tcp {
                bind: "127.0.0.1:0".parse()?,
                advertise: None,
            },
            ..Default::default()
        },
    };
    let worker = Worker::start(&runtime, Arc::new(EchoEngine::default()), config).await?;
    let id = worker.instance().id;

    let models = discovery.list(&models_prefix("ns")).await?;
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].key, model_key("ns", "m", id.0));
    let entry: ModelEntry = serde_json::from_slice(&models[0].value)?;
    assert_eq!(
        entry,
        ModelEntry {
            card,
            endpoint: "ns/worker/generate".into()
        }
    );
    assert_eq!(discovery.list(&instance_key(&endpoint, id)).await?.len(), 1);

    let request = PreprocessedRequest {
        request_id: "r1".into(),
        model: "m".into(),
        token_ids: vec![1, 2, 3],
        stop: StopConditions {
            max_tokens: Some(2),
            stop_token_ids: vec![],
        },
    };
    let outputs: Vec<EngineOutput> = runtime
        .client()
        .call(worker.instance(), request)
        .await?
        .try_collect()
        .await?;
    let tokens: Vec<u32> = outputs.iter().flat_map(|o| o.token_ids.clone()).collect();
    assert_eq!(tokens, [1, 2]);
    assert_eq!(
        outputs.last().and_then(|o| o.finish_reason),
        Some(FinishReason::Length)
    );

    worker.run(async {}).await;
    assert!(
        discovery.list("turbine/").await?.is_empty(),
        "nothing of the worker is left in discovery"
    );
    Ok(())
}
