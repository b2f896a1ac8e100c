//! Rendering real chat templates must give exactly what transformers gives.
//!
//! `fixtures/templates.json` holds, for the SmolLM2, Llama-3.1-Instruct and Qwen2.5-Instruct
//! templates, conversations and the prompts that transformers' `render_jinja_template` (Python
//! jinja2 with `trim_blocks`, `lstrip_blocks` and `raise_exception`) rendered from them;
//! `fixtures/generate.py` wrote it and `fixtures/README.md` says where the templates come from.

use std::path::Path;

use serde_json::Value;
use turbine_preprocess::{ChatTemplate, Error};

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[derive(serde::Deserialize)]
struct Case {
    template: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    messages: Vec<Value>,
    tools: Option<Vec<Value>>,
    add_generation_prompt: bool,
    expected: String,
}

#[test]
fn renders_like_transformers() {
    let cases: Vec<Case> = serde_json::from_str(&fixture("templates.json")).unwrap();
    assert_eq!(cases.len(), 20);
    for c in cases {
        let source = fixture(&format!("{}.jinja", c.template));
        let t = ChatTemplate::new(source, c.bos_token, c.eos_token).unwrap();
        let got = t
            .render(&c.messages, c.tools.as_deref(), c.add_generation_prompt)
            .unwrap_or_else(|e| panic!("{}: {:#}", c.template, anyhow::Error::from(e)));
        assert_eq!(
            got,
            c.expected,
            "{} with {} messages, add_generation_prompt={}",
            c.template,
            c.messages.len(),
            c.add_generation_prompt
        );
    }
}

#[test]
fn template_exceptions_carry_their_message() {
    let t = ChatTemplate::new(fixture("llama-3.1-8b-instruct.jinja"), None, None).unwrap();
    let tools = [serde_json::json!({"type": "function", "function": {"name": "f"}})];
    // Tools go into the first user message, and there is none.
    let messages = [serde_json::json!({"role": "system", "content": "Be brief."})];
    let err = t.render(&messages, Some(&tools), true).unwrap_err();
    assert!(matches!(err, Error::TemplateRender(_)));
    let chain = format!("{:#}", anyhow::Error::from(err));
    assert!(chain.contains("Cannot put tools in the first user message"), "{chain}");
}
