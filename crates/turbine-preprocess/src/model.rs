//! Loading what preprocessing needs from a model's files: a Hugging Face directory or a GGUF file.

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use crate::gguf::Gguf;
use crate::tokenizer::bos_processor;
use crate::{ChatTemplate, Error, IncrementalDecoder, Tokenizer};

/// A model's tokenizer, chat template and context length.
#[derive(Debug)]
pub struct Preprocessor {
    tokenizer: Tokenizer,
    chat_template: Option<ChatTemplate>,
    context_length: Option<u64>,
}

impl Preprocessor {
    /// Loads a Hugging Face model directory, or a GGUF file (a path ending in `.gguf`).
    pub fn load(path: &Path) -> Result<Self, Error> {
        if path.is_dir() {
            Self::from_hf_dir(path)
        } else if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            Self::from_gguf(path)
        } else if !path.exists() {
            Err(Error::MissingFile {
                path: path.to_owned(),
                what: "model directory or .gguf file",
            })
        } else {
            Err(Error::UnsupportedPath { path: path.to_owned() })
        }
    }

    /// The byte-level stand-in, with a plain `role: content` chat format.
    pub fn bytes() -> Self {
        Self {
            tokenizer: Tokenizer::bytes(),
            chat_template: None,
            context_length: None,
        }
    }

    /// Loads `tokenizer.json` (required), `tokenizer_config.json` (chat template, BOS/EOS
    /// tokens, `add_bos_token`), `chat_template.jinja` (preferred over the config's template,
    /// as transformers does), `config.json` (context length, EOS ids) and
    /// `generation_config.json` (more EOS ids) from `dir`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, Error> {
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(Error::MissingFile {
                path: tokenizer_path,
                what: "Hugging Face tokenizer",
            });
        }
        let mut hf = tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|source| Error::TokenizerLoad {
            path: tokenizer_path.clone(),
            source,
        })?;

        let config_path = dir.join("tokenizer_config.json");
        let tok_config = read_json_if_present(&config_path)?.unwrap_or(Json::Null);
        let bos_token = special_token(&tok_config, "bos_token", &config_path)?;
        let eos_token = special_token(&tok_config, "eos_token", &config_path)?;
        let mut template = chat_template(&tok_config, &config_path)?;
        let jinja_path = dir.join("chat_template.jinja");
        if jinja_path.is_file() {
            template = Some(std::fs::read_to_string(&jinja_path).map_err(|source| Error::Io {
                path: jinja_path,
                source,
            })?);
        }
        // Like transformers' Llama tokenizers: an explicit add_bos_token decides whether
        // encoding with special tokens puts the BOS token first.
        match (tok_config.get("add_bos_token").and_then(Json::as_bool), &bos_token) {
            (Some(true), Some(bos)) => {
                if let Some(id) = hf.token_to_id(bos) {
                    hf.with_post_processor(Some(bos_processor(bos, id, &config_path)?));
                }
            }
            (Some(false), _) => {
                hf.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
            }
            _ => {}
        }

        let model_config_path = dir.join("config.json");
        let model_config = read_json_if_present(&model_config_path)?.unwrap_or(Json::Null);
        let context_length = ["max_position_embeddings", "n_positions", "max_seq_len"]
            .iter()
            .find_map(|k| model_config.get(*k).and_then(Json::as_u64));

        let mut eos_ids = Vec::new();
        if let Some(id) = eos_token.as_deref().and_then(|t| hf.token_to_id(t)) {
            eos_ids.push(id);
        }
        collect_ids(&model_config, "eos_token_id", &model_config_path, &mut eos_ids)?;
        let gen_path = dir.join("generation_config.json");
        if let Some(gen) = read_json_if_present(&gen_path)? {
            collect_ids(&gen, "eos_token_id", &gen_path, &mut eos_ids)?;
        }

        let tokenizer = Tokenizer::from_hf(hf, bos_token.clone(), eos_token.clone(), eos_ids);
        let chat_template = template
            .map(|source| ChatTemplate::new(source, bos_token, eos_token))
            .transpose()?;
        Ok(Self {
            tokenizer,
            chat_template,
            context_length,
        })
    }

    /// Loads the tokenizer, chat template (`tokenizer.chat_template`) and context length
    /// (`{general.architecture}.context_length`) from a GGUF file's metadata.
    pub fn from_gguf(path: &Path) -> Result<Self, Error> {
        if !path.is_file() {
            return Err(Error::MissingFile {
                path: path.to_owned(),
                what: "GGUF model",
            });
        }
        let gguf = Gguf::open(path).map_err(|source| Error::Gguf {
            path: path.to_owned(),
            source,
        })?;
        let tokenizer = Tokenizer::from_gguf(&gguf, path)?;
        let context_length = gguf
            .architecture()
            .and_then(|arch| gguf.get_u64(&format!("{arch}.context_length")));
        let chat_template = gguf
            .get_str("tokenizer.chat_template")
            .map(|source| {
                ChatTemplate::new(
                    source.to_owned(),
                    tokenizer.bos_token().map(str::to_owned),
                    tokenizer.eos_token().map(str::to_owned),
                )
            })
            .transpose()?;
        Ok(Self {
            tokenizer,
            chat_template,
            context_length,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Most tokens, prompt and completion together, the model was trained to attend to.
    pub fn context_length(&self) -> Option<u64> {
        self.context_length
    }

    /// The prompt for a chat, ending where the assistant's reply begins when
    /// `add_generation_prompt`. The byte tokenizer uses `role: content` lines and `assistant: `.
    pub fn render_chat(
        &self,
        messages: &[Json],
        tools: Option<&[Json]>,
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        if let Some(t) = &self.chat_template {
            return t.render(messages, tools, add_generation_prompt);
        }
        if !self.tokenizer.is_bytes() {
            return Err(Error::NoChatTemplate);
        }
        let mut prompt = String::new();
        for m in messages {
            prompt.push_str(m.get("role").and_then(Json::as_str).unwrap_or_default());
            prompt.push_str(": ");
            match m.get("content") {
                Some(Json::String(s)) => prompt.push_str(s),
                Some(Json::Array(parts)) => {
                    let texts: Vec<&str> = parts
                        .iter()
                        .filter_map(|p| p.get("text").and_then(Json::as_str))
                        .collect();
                    prompt.push_str(&texts.join("\n"));
                }
                _ => {}
            }
            prompt.push('\n');
        }
        if add_generation_prompt {
            prompt.push_str("assistant: ");
        }
        Ok(prompt)
    }

    /// Renders the chat and tokenizes it. The template places any BOS token itself, so the
    /// prompt is encoded without adding special tokens, as transformers does.
    pub fn encode_chat(&self, messages: &[Json], tools: Option<&[Json]>) -> Result<(String, Vec<u32>), Error> {
        let prompt = self.render_chat(messages, tools, true)?;
        let ids = self.tokenizer.encode(&prompt, false)?;
        Ok((prompt, ids))
    }

    /// A decoder for one generated sequence.
    pub fn detokenizer(&self, skip_special_tokens: bool) -> IncrementalDecoder {
        IncrementalDecoder::new(self.tokenizer.clone(), skip_special_tokens)
    }
}

fn read_json_if_present(path: &Path) -> Result<Option<Json>, Error> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    serde_json::from_str(&text).map(Some).map_err(|source| Error::Json {
        path: path.to_owned(),
        source,
    })
}

fn bad(path: &Path, field: &'static str, reason: impl Into<String>) -> Error {
    Error::BadConfig {
        path: PathBuf::from(path),
        field,
        reason: reason.into(),
    }
}

/// `bos_token`/`eos_token`: a string, an `{"content": ...}` object, or null.
fn special_token(config: &Json, field: &'static str, path: &Path) -> Result<Option<String>, Error> {
    match config.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Object(o)) => match o.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(bad(path, field, "object without a string \"content\"")),
        },
        Some(_) => Err(bad(path, field, "neither a string nor an object")),
    }
}

/// `chat_template`: a string, or a list of `{"name", "template"}` of which "default" is used.
fn chat_template(config: &Json, path: &Path) -> Result<Option<String>, Error> {
    match config.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Array(list)) => {
            for t in list {
                let name = t.get("name").and_then(Json::as_str);
                let template = t.get("template").and_then(Json::as_str);
                match (name, template) {
                    (Some("default"), Some(template)) => return Ok(Some(template.to_owned())),
                    (Some(_), Some(_)) => {}
                    _ => return Err(bad(path, "chat_template", "list entry without a name and a template")),
                }
            }
            Ok(None)
        }
        Some(_) => Err(bad(path, "chat_template", "neither a string nor a list")),
    }
}

/// Adds the id or ids of `field` (an integer or a list of integers) to `ids`.
fn collect_ids(config: &Json, field: &'static str, path: &Path, ids: &mut Vec<u32>) -> Result<(), Error> {
    let one = |v: &Json| {
        v.as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| bad(path, field, format!("{v} is not a token id")))
    };
    let found = match config.get(field) {
        None | Some(Json::Null) => Vec::new(),
        Some(Json::Array(list)) => list.iter().map(one).collect::<Result<_, _>>()?,
        Some(v) => vec![one(v)?],
    };
    for id in found {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    Ok(())
}
