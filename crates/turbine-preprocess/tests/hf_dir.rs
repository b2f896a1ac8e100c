//! Loading a Hugging Face model directory written into a temporary directory.

use std::path::Path;

use serde_json::json;
use turbine_preprocess::{Error, Preprocessor};

/// A word-level tokenizer.json: small enough to write by hand, real enough to load.
fn tokenizer_json() -> serde_json::Value {
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "<eot>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {
            "type": "WordLevel",
            "vocab": {"<s>": 0, "</s>": 1, "<eot>": 2, "<unk>": 3, "hello": 4, "world": 5, "user": 6, ":": 7},
            "unk_token": "<unk>"
        }
    })
}

fn write(dir: &Path, name: &str, value: &serde_json::Value) {
    std::fs::write(dir.join(name), value.to_string()).expect("writing a fixture");
}

#[test]
fn loads_tokenizer_config_and_model_config() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "tokenizer.json", &tokenizer_json());
    write(
        dir.path(),
        "tokenizer_config.json",
        &json!({
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "add_bos_token": true,
            "chat_template": [
                {"name": "tool_use", "template": "unused"},
                {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.role }} : {{ m.content }} {{ eos_token }} {% endfor %}"}
            ]
        }),
    );
    write(
        dir.path(),
        "config.json",
        &json!({"max_position_embeddings": 2048, "eos_token_id": [1, 2]}),
    );
    write(dir.path(), "generation_config.json", &json!({"eos_token_id": 2}));

    let p = Preprocessor::load(dir.path()).unwrap();
    let t = p.tokenizer();
    assert_eq!(p.context_length(), Some(2048));
    assert_eq!((t.bos_token(), t.eos_token()), (Some("<s>"), Some("</s>")));
    assert_eq!(t.eos_token_ids(), [1, 2]);
    assert_eq!(t.vocab_size(), 8);
    assert_eq!(t.encode("hello world", false).unwrap(), [4, 5]);
    assert_eq!(t.encode("hello world", true).unwrap(), [0, 4, 5], "add_bos_token");
    assert_eq!(t.decode(&[0, 4, 5, 1], true).unwrap(), "hello world");

    let messages = json!([{"role": "user", "content": "hello"}]);
    let (prompt, ids) = p.encode_chat(messages.as_array().unwrap(), None).unwrap();
    assert_eq!(prompt, "<s>user : hello </s> ");
    assert_eq!(ids, [0, 6, 7, 4, 1]);
}

#[test]
fn chat_template_jinja_file_wins_and_config_files_are_optional() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "tokenizer.json", &tokenizer_json());
    write(
        dir.path(),
        "tokenizer_config.json",
        &json!({"chat_template": "from config"}),
    );
    std::fs::write(dir.path().join("chat_template.jinja"), "from file").unwrap();
    let p = Preprocessor::from_hf_dir(dir.path()).unwrap();
    assert_eq!(p.render_chat(&[], None, true).unwrap(), "from file");
    assert_eq!(p.context_length(), None);
    assert!(p.tokenizer().eos_token_ids().is_empty());
}

#[test]
fn missing_and_malformed_files_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let err = Preprocessor::load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, Error::MissingFile { path, .. } if path.ends_with("tokenizer.json")),
        "{err}"
    );
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    let err = Preprocessor::load(&dir.path().join("nope.gguf")).unwrap_err();
    assert!(err.to_string().contains("nope.gguf"), "{err}");

    write(dir.path(), "tokenizer.json", &tokenizer_json());
    std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
    let err = Preprocessor::load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, Error::Json { path, .. } if path.ends_with("config.json")),
        "{err}"
    );

    write(dir.path(), "config.json", &json!({"eos_token_id": "two"}));
    let err = Preprocessor::load(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::BadConfig {
                field: "eos_token_id",
                ..
            }
        ),
        "{err}"
    );

    let not_gguf = dir.path().join("model.gguf");
    std::fs::write(&not_gguf, b"GGML0000").unwrap();
    let err = Preprocessor::load(&not_gguf).unwrap_err();
    assert!(matches!(err, Error::Gguf { .. }), "{err}");

    let other = dir.path().join("model.bin");
    std::fs::write(&other, b"").unwrap();
    assert!(matches!(Preprocessor::load(&other), Err(Error::UnsupportedPath { .. })));
}

#[test]
fn models_without_templates_cannot_render_chats() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "tokenizer.json", &tokenizer_json());
    let p = Preprocessor::load(dir.path()).unwrap();
    assert!(matches!(p.render_chat(&[], None, true), Err(Error::NoChatTemplate)));
}
