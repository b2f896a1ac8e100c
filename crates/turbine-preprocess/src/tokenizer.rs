//! Tokenizers: the byte-level stand-in that test engines use, and real ones from Hugging Face
//! `tokenizer.json` files or GGUF metadata, behind one type.

use std::path::Path;
use std::sync::Arc;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::gguf::{Gguf, MetadataValue};
use crate::Error;

/// Values of `tokenizer.ggml.pre` that [`Tokenizer::from_gguf`] knows how to pre-tokenize.
/// Anything else is an error rather than a guess: a wrong split gives plausible but wrong ids.
pub const SUPPORTED_GGUF_PRE: &[&str] = &["smollm", "gpt-2", "gpt2", "llama-bpe", "llama3", "qwen2"];

/// Llama 3's split, as in its tokenizer.json and llama.cpp's `llama-bpe`.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: Llama 3's with single digits.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF `token_type` of control tokens (`<|im_start|>`), which are special added tokens.
const TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF `token_type` of user-defined tokens: matched whole but not special.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// A tokenizer plus the special tokens a server needs: where text starts and where it stops.
///
/// Cheap to clone: the vocabulary is shared.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: Inner,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_token_ids: Vec<u32>,
}

#[derive(Debug, Clone)]
enum Inner {
    /// One token per UTF-8 byte, ids 0..=255.
    Bytes,
    Hf(Arc<tokenizers::Tokenizer>),
}

impl Tokenizer {
    /// The byte-level tokenizer: one token per UTF-8 byte, no special tokens.
    pub fn bytes() -> Self {
        Self {
            inner: Inner::Bytes,
            bos_token: None,
            eos_token: None,
            eos_token_ids: Vec::new(),
        }
    }

    /// Wraps a Hugging Face tokenizer with the given special tokens.
    pub(crate) fn from_hf(
        tokenizer: tokenizers::Tokenizer,
        bos_token: Option<String>,
        eos_token: Option<String>,
        eos_token_ids: Vec<u32>,
    ) -> Self {
        Self {
            inner: Inner::Hf(Arc::new(tokenizer)),
            bos_token,
            eos_token,
            eos_token_ids,
        }
    }

    /// Builds a byte-level BPE tokenizer from the `tokenizer.ggml.*` metadata of a GGUF file.
    pub fn from_gguf(gguf: &Gguf, path: &Path) -> Result<Self, Error> {
        let meta = |key: &str, expected: &'static str| Error::GgufMetadata {
            path: path.to_owned(),
            key: key.to_owned(),
            expected,
        };
        let model = gguf
            .get_str("tokenizer.ggml.model")
            .ok_or_else(|| meta("tokenizer.ggml.model", "string"))?;
        if model != "gpt2" {
            return Err(Error::UnsupportedGgufTokenizer {
                path: path.to_owned(),
                model: model.to_owned(),
            });
        }
        let pre = gguf.get_str("tokenizer.ggml.pre").unwrap_or("gpt-2");
        let split = |regex: &str| -> Result<PreTokenizerWrapper, Error> {
            let split = Split::new(
                SplitPattern::Regex(regex.to_owned()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|source| Error::TokenizerBuild {
                path: path.to_owned(),
                source,
            })?;
            Ok(Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into())
        };
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            // SmolLM's tokenizer.json: single digits, then GPT-2's byte-level split.
            "smollm" => Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into(),
            "gpt-2" | "gpt2" => ByteLevel::new(false, true, true).into(),
            "llama-bpe" | "llama3" => split(LLAMA3_SPLIT)?,
            "qwen2" => split(QWEN2_SPLIT)?,
            _ => {
                return Err(Error::UnsupportedPreTokenizer {
                    path: path.to_owned(),
                    pre: pre.to_owned(),
                })
            }
        };

        let tokens = string_array(gguf, "tokenizer.ggml.tokens")
            .ok_or_else(|| meta("tokenizer.ggml.tokens", "array of strings"))?;
        let merges = string_array(gguf, "tokenizer.ggml.merges")
            .ok_or_else(|| meta("tokenizer.ggml.merges", "array of strings"))?;
        let token_types = match gguf.get("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(MetadataValue::as_i64).collect::<Option<Vec<_>>>())
                .ok_or_else(|| meta("tokenizer.ggml.token_type", "array of integers"))?,
        };

        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.to_string(), id as u32))
            .collect();
        let merges = merges
            .iter()
            .map(|m| {
                // Byte-level tokens never hold a raw space (it is `Ġ`), so the first one splits.
                m.split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| meta("tokenizer.ggml.merges", "\"left right\" pairs"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Llama 3's tokenizer.json (and llama.cpp) take a split that is a whole token as is.
        let ignore_merges = matches!(pre, "llama-bpe" | "llama3");
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|source| Error::TokenizerBuild {
                path: path.to_owned(),
                source,
            })?;

        let mut tokenizer = tokenizers::Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

        let added: Vec<AddedToken> = token_types
            .iter()
            .zip(&tokens)
            .filter_map(|(&ty, &t)| match ty {
                TOKEN_TYPE_CONTROL => Some(AddedToken::from(t.to_owned(), true)),
                TOKEN_TYPE_USER_DEFINED => Some(AddedToken::from(t.to_owned(), false)),
                _ => None,
            })
            .collect();
        tokenizer.add_special_tokens(&added);

        let token_at = |key: &str| -> Result<Option<(u32, String)>, Error> {
            let Some(v) = gguf.get(key) else { return Ok(None) };
            let id = v
                .as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| meta(key, "token id"))?;
            let token = tokens
                .get(id as usize)
                .ok_or_else(|| meta(key, "id inside the vocabulary"))?;
            Ok(Some((id, (*token).to_owned())))
        };
        let bos = token_at("tokenizer.ggml.bos_token_id")?;
        let eos = token_at("tokenizer.ggml.eos_token_id")?;
        // End of turn and end of message also end generation (Llama 3's <|eot_id|>, <|eom_id|>).
        let mut eos_token_ids: Vec<u32> = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some((id, _)) = token_at(key)? {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }

        let add_bos = gguf
            .get("tokenizer.ggml.add_bos_token")
            .and_then(MetadataValue::as_bool)
            .unwrap_or(false);
        if let (true, Some((id, token))) = (add_bos, &bos) {
            tokenizer.with_post_processor(Some(bos_processor(token, *id, path)?));
        }

        Ok(Self::from_hf(
            tokenizer,
            bos.map(|(_, t)| t),
            eos.map(|(_, t)| t),
            eos_token_ids,
        ))
    }

    /// Token ids of `text`. With `add_special_tokens`, the tokenizer adds what its
    /// post-processor adds (a BOS token for models that want one); a prompt rendered by a chat
    /// template usually holds its special tokens already and is encoded without.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, Error> {
        match &self.inner {
            Inner::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Inner::Hf(t) => Ok(t
                .encode_fast(text, add_special_tokens)
                .map_err(Error::Encode)?
                .get_ids()
                .to_vec()),
        }
    }

    /// The text of `ids`. Ids outside the vocabulary are dropped by Hugging Face tokenizers and
    /// become U+FFFD in the byte tokenizer; bytes that are not UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, Error> {
        match &self.inner {
            Inner::Bytes => {
                let mut bytes = Vec::with_capacity(ids.len());
                for &id in ids {
                    match u8::try_from(id) {
                        Ok(b) => bytes.push(b),
                        Err(_) => bytes.extend_from_slice("\u{FFFD}".as_bytes()),
                    }
                }
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Inner::Hf(t) => t.decode(ids, skip_special_tokens).map_err(Error::Decode),
        }
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        match &self.inner {
            Inner::Bytes => 256,
            Inner::Hf(t) => t.get_vocab_size(true),
        }
    }

    /// The id of a token given as its vocabulary string (`<|im_end|>`, `Ġthe`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.inner {
            Inner::Bytes => match token.as_bytes() {
                &[b] => Some(b.into()),
                _ => None,
            },
            Inner::Hf(t) => t.token_to_id(token),
        }
    }

    /// Whether this is the byte-level stand-in.
    pub fn is_bytes(&self) -> bool {
        matches!(self.inner, Inner::Bytes)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Every id that ends generation: the EOS token and any end-of-turn tokens the model uses.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }
}

/// A post-processor that puts `token` (id `id`) before every sequence.
pub(crate) fn bos_processor(token: &str, id: u32, path: &Path) -> Result<TemplateProcessing, Error> {
    let build = || -> Result<TemplateProcessing, tokenizers::Error> {
        Ok(TemplateProcessing::builder()
            .try_single(format!("{token} $A"))?
            .try_pair(format!("{token} $A {token} $B"))?
            .special_tokens(vec![(token.to_owned(), id)])
            .build()?)
    };
    build().map_err(|source| Error::TokenizerBuild {
        path: path.to_owned(),
        source,
    })
}

/// The strings of array `key`, if it is an array of strings.
fn string_array<'a>(gguf: &'a Gguf, key: &str) -> Option<Vec<&'a str>> {
    gguf.get(key)?.as_array()?.iter().map(MetadataValue::as_str).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip() {
        let t = Tokenizer::bytes();
        let ids = t.encode("héllo 🦀", true).unwrap();
        assert_eq!(ids.len(), "héllo 🦀".len());
        assert_eq!(t.decode(&ids, true).unwrap(), "héllo 🦀");
        assert_eq!(t.decode(&[0x61, 0xff, 300], false).unwrap(), "a\u{FFFD}\u{FFFD}");
        assert_eq!(t.vocab_size(), 256);
        assert_eq!(t.token_to_id("a"), Some(97));
        assert_eq!(t.token_to_id("ab"), None);
        assert!(t.eos_token_ids().is_empty());
    }
}
