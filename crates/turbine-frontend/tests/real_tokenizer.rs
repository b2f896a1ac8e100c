//! The frontend with a real model's tokenizer and chat template (SmolLM2-135M-Instruct's,
//! from its GGUF; `scripts/fetch-test-models` downloads it), in front of echo workers: what
//! comes back is the prompt the template rendered, decoded again.

mod common;

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use turbine_engine::{EchoConfig, EchoEngine};
use turbine_preprocess::Preprocessor;
use turbine_protocols::{ModelCard, TokenizerKind};

const GGUF: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../target/test-models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
);

fn smollm2() -> Result<Preprocessor> {
    anyhow::ensure!(
        Path::new(GGUF).exists(),
        "{GGUF} is missing: run scripts/fetch-test-models"
    );
    Ok(Preprocessor::load(Path::new(GGUF))?)
}

async fn cluster() -> Result<(common::Cluster, reqwest::Client)> {
    smollm2()?;
    let card = ModelCard {
        name: "smol".into(),
        context_length: 8192,
        tokenizer: TokenizerKind::Files { path: GGUF.into() },
        kv_block_size: None,
        timing: None,
    };
    let engines = vec![EchoEngine::new(EchoConfig::default())];
    let c = common::Cluster::start(card, engines, turbine_router::RouterMode::RoundRobin).await?;
    Ok((c, reqwest::Client::new()))
}

async fn post(http: &reqwest::Client, url: &str, body: Value) -> Result<(u16, Value)> {
    let r = http.post(url).json(&body).send().await?;
    Ok((r.status().as_u16(), r.json().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_renders_the_models_template_and_stops_at_its_end_token() -> Result<()> {
    let (c, http) = cluster().await?;
    let chat_url = c.url.replace("/v1/completions", "/v1/chat/completions");
    let messages = json!([{"role": "user", "content": "Hello there 🦀"}]);
    let model = smollm2()?;
    let (_, ids) = model.encode_chat(messages.as_array().context("array")?, None)?;
    let rendered = model.tokenizer().decode(&ids, true)?;
    assert!(rendered.contains("user\nHello there 🦀\nassistant\n"), "{rendered:?}");

    let (status, r) = post(
        &http,
        &chat_url,
        json!({"model": "smol", "messages": messages, "ignore_eos": true}),
    )
    .await?;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["message"]["content"], rendered.as_str());
    assert_eq!(r["usage"]["prompt_tokens"], ids.len());

    // Without ignore_eos the echoed prompt ends at the template's first <|im_end|>, which is
    // one of the model's end tokens.
    let (_, r) = post(&http, &chat_url, json!({"model": "smol", "messages": messages})).await?;
    let content = r["choices"][0]["message"]["content"].as_str().context("content")?;
    assert!(
        rendered.starts_with(content) && content.len() < rendered.len(),
        "{content:?}"
    );
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_stop_strings_and_vocabulary_with_multibyte_tokens() -> Result<()> {
    let (c, http) = cluster().await?;
    let prompt = "Grüße, 世界! 🦀🦀 end";
    let (status, r) = post(
        &http,
        &c.url,
        json!({"model": "smol", "prompt": prompt, "stop": ["🦀"]}),
    )
    .await?;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["text"], "Grüße, 世界! ");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");

    let ids = smollm2()?.tokenizer().encode(prompt, true)?;
    let (_, r) = post(&http, &c.url, json!({"model": "smol", "prompt": ids, "stream": false})).await?;
    assert_eq!(r["choices"][0]["text"], prompt);

    let (status, r) = post(&http, &c.url, json!({"model": "smol", "prompt": [1, 49152]})).await?;
    assert_eq!((status, r["error"]["param"].as_str()), (400, Some("prompt")), "{r}");
    Ok(())
}
