//! Tests against the real SmolLM2-135M-Instruct GGUF: header, tokenizer and detokenizer.
//!
//! The model comes from `scripts/fetch-test-models`. `fixtures/smollm2-tokens.json` holds the
//! ids that transformers' own GGUF tokenizer conversion (Python `tokenizers` + `gguf`) gives
//! for varied strings; `fixtures/generate.py` wrote it and says how to run it again.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use turbine_preprocess::gguf::{Gguf, MetadataValue};
use turbine_preprocess::{IncrementalDecoder, Preprocessor, Tokenizer};

const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../target/test-models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
);

fn model_path() -> PathBuf {
    let path = PathBuf::from(MODEL);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-test-models from the workspace root",
        path.display()
    );
    path
}

fn preprocessor() -> &'static Preprocessor {
    static P: std::sync::OnceLock<Preprocessor> = std::sync::OnceLock::new();
    P.get_or_init(|| Preprocessor::load(&model_path()).expect("loading SmolLM2"))
}

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn gguf_header() {
    let g = Gguf::open(&model_path()).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.architecture(), Some("llama"));
    assert_eq!(g.get_u64("llama.context_length"), Some(8192));
    let tokens = g.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(g.get_u64("llama.vocab_size"), Some(tokens.len() as u64));
    assert_eq!(g.tensors.len(), 272);
    let embd = g.tensors.iter().find(|t| t.name == "token_embd.weight").unwrap();
    assert_eq!(embd.shape, [576, 49152]);
    assert_eq!(embd.ggml_type, 8, "Q8_0");
    // gguf-py reports this tensor's data at absolute offset 1785664.
    assert_eq!(g.data_offset + embd.offset, 1785664);
    let len = std::fs::metadata(model_path()).unwrap().len();
    assert!(g.tensors.iter().all(|t| g.data_offset + t.offset < len));
}

#[test]
fn loads_tokenizer_template_and_limits() {
    let p = preprocessor();
    let t = p.tokenizer();
    assert_eq!(p.context_length(), Some(8192));
    assert_eq!(t.vocab_size(), 49152);
    assert_eq!(t.bos_token(), Some("<|im_start|>"));
    assert_eq!(t.eos_token(), Some("<|im_end|>"));
    assert_eq!(t.eos_token_ids(), [2]);
    assert_eq!(t.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(t.token_to_id("<|endoftext|>"), Some(0));
    assert!(p.chat_template().is_some());
    let g = Gguf::open(&model_path()).unwrap();
    assert_eq!(
        g.get_str("tokenizer.chat_template"),
        Some(fixture("smollm2.jinja").as_str())
    );
}

#[derive(serde::Deserialize)]
struct TokenCase {
    text: String,
    ids: Vec<u32>,
    decoded: String,
    decoded_skip_special: String,
}

#[test]
fn encode_matches_transformers() {
    let t = preprocessor().tokenizer();
    let cases: Vec<TokenCase> = serde_json::from_str(&fixture("smollm2-tokens.json")).unwrap();
    assert!(cases.len() >= 15);
    for c in cases {
        assert_eq!(t.encode(&c.text, false).unwrap(), c.ids, "encoding {:?}", c.text);
        // add_bos_token is false in this GGUF: special tokens change nothing.
        assert_eq!(t.encode(&c.text, true).unwrap(), c.ids, "encoding {:?}", c.text);
        assert_eq!(t.decode(&c.ids, false).unwrap(), c.decoded, "decoding {:?}", c.text);
        assert_eq!(c.decoded, c.text);
        assert_eq!(t.decode(&c.ids, true).unwrap(), c.decoded_skip_special);
    }
}

#[test]
fn chat_prompt_tokens() {
    let messages = serde_json::json!([{"role": "user", "content": "Hi"}]);
    let (prompt, ids) = preprocessor().encode_chat(messages.as_array().unwrap(), None).unwrap();
    assert!(
        prompt.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
        "{prompt:?}"
    );
    assert_eq!(ids[0], 1, "<|im_start|> is one token");
    // "<|im_end|>\n<|im_start|>assistant\n", as in the tokens fixture.
    assert!(ids.ends_with(&[2, 198, 1, 520, 9531, 198]), "{ids:?}");
}

#[derive(serde::Deserialize)]
struct SplitCase {
    pre: String,
    text: String,
    ids: Vec<u32>,
}

/// The Llama 3 and Qwen2 pre-tokenizers, checked on SmolLM2's vocabulary: transformers
/// (`fixtures/smollm2-vocab-other-splits.json`) splits the same strings the same way.
#[test]
fn other_pre_tokenizers_match_transformers() {
    let path = model_path();
    let mut g = Gguf::open(&path).unwrap();
    let cases: Vec<SplitCase> = serde_json::from_str(&fixture("smollm2-vocab-other-splits.json")).unwrap();
    for pre in ["llama-bpe", "qwen2"] {
        g.set("tokenizer.ggml.pre", MetadataValue::String(pre.into()));
        let t = Tokenizer::from_gguf(&g, &path).unwrap();
        let mut checked = 0;
        for c in cases.iter().filter(|c| c.pre == pre) {
            assert_eq!(t.encode(&c.text, false).unwrap(), c.ids, "{pre} encoding {:?}", c.text);
            checked += 1;
        }
        assert!(checked >= 15, "{pre}: {checked} cases");
    }
    g.set("tokenizer.ggml.pre", MetadataValue::String("made-up".into()));
    let err = Tokenizer::from_gguf(&g, &path).unwrap_err();
    assert!(err.to_string().contains("\"made-up\" is not supported"), "{err}");
}

fn stream(decoder: &mut IncrementalDecoder, ids: &[u32], chunk: usize) -> Vec<String> {
    let mut pieces: Vec<String> = ids
        .chunks(chunk.max(1))
        .map(|c| decoder.push(c).expect("decoding"))
        .collect();
    pieces.push(decoder.finish().expect("decoding"));
    pieces
}

#[test]
fn streamed_emoji_comes_out_whole() {
    let p = preprocessor();
    let text = "a 🦀 and 👨‍👩‍👧!";
    let ids = p.tokenizer().encode(text, false).unwrap();
    let pieces = stream(&mut p.detokenizer(false), &ids, 1);
    assert_eq!(pieces.concat(), text);
    assert!(
        pieces.iter().all(|s| !s.contains(char::REPLACEMENT_CHARACTER)),
        "{pieces:?}"
    );
    assert!(pieces.iter().any(|s| s.contains('🦀')), "{pieces:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn stream_equals_one_shot_decode(
        ids in prop::collection::vec(prop_oneof![0u32..49152, 0u32..20, 100u32..400], 0..40),
        chunk in 1usize..4,
        skip_special in any::<bool>(),
    ) {
        let p = preprocessor();
        let whole = p.tokenizer().decode(&ids, skip_special).unwrap();
        let pieces = stream(&mut p.detokenizer(skip_special), &ids, chunk);
        prop_assert_eq!(pieces.concat(), whole.clone());
        let inserted = pieces.iter().map(|s| s.matches(char::REPLACEMENT_CHARACTER).count()).sum::<usize>();
        prop_assert_eq!(inserted, whole.matches(char::REPLACEMENT_CHARACTER).count());
    }

    #[test]
    fn stream_of_real_text_never_splits_characters(
        text in "[a-zé日本🦀👍🏽 \\n0-9<|>]{0,40}",
    ) {
        let p = preprocessor();
        let ids = p.tokenizer().encode(&text, false).unwrap();
        let pieces = stream(&mut p.detokenizer(false), &ids, 1);
        prop_assert_eq!(pieces.concat(), text);
        prop_assert!(pieces.iter().all(|s| !s.contains(char::REPLACEMENT_CHARACTER)));
    }
}
