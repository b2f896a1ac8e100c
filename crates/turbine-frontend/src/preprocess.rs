//! Turning requests into token ids and token ids back into text, for each kind of tokenizer
//! a model card can name.
//!
//! [`TokenizerKind::Bytes`] is one token per UTF-8 byte with a plain `role: content` chat
//! format, for engines that model no vocabulary.

use std::sync::Arc;

use turbine_protocols::openai::ChatMessage;
use turbine_protocols::TokenizerKind;

/// Why a model's tokenizer could not be loaded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LoadError {
    #[error("tokenizer files at {path} are not supported by this build")]
    Unsupported { path: String },
}

/// A model's tokenizer and chat format.
#[derive(Debug)]
pub(crate) enum ModelText {
    Bytes,
}

impl ModelText {
    pub(crate) fn load(kind: &TokenizerKind) -> Result<Self, LoadError> {
        match kind {
            TokenizerKind::Bytes => Ok(ModelText::Bytes),
            TokenizerKind::Files { path } => Err(LoadError::Unsupported { path: path.clone() }),
        }
    }

    /// Token ids of `text`, as a prompt (with the model's start token, if it wants one).
    pub(crate) fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        match self {
            ModelText::Bytes => Ok(text.bytes().map(u32::from).collect()),
        }
    }

    /// Checks that every id is in the vocabulary; returns the first one that is not.
    pub(crate) fn check_token_ids(&self, ids: &[u32]) -> Result<(), u32> {
        match self {
            ModelText::Bytes => ids.iter().find(|&&t| t > 255).map_or(Ok(()), |&t| Err(t)),
        }
    }

    /// The prompt for a chat, ending where the assistant's reply begins.
    pub(crate) fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, String> {
        match self {
            ModelText::Bytes => {
                let mut prompt = String::new();
                for m in messages {
                    prompt.push_str(&m.role);
                    prompt.push_str(": ");
                    prompt.push_str(&m.content.as_ref().map(|c| c.text()).unwrap_or_default());
                    prompt.push('\n');
                }
                prompt.push_str("assistant: ");
                Ok(prompt)
            }
        }
    }

    /// The tokens that end the model's turn: generation stops on them unless asked not to.
    pub(crate) fn eos_token_ids(&self) -> &[u32] {
        match self {
            ModelText::Bytes => &[],
        }
    }

    pub(crate) fn decoder(self: &Arc<Self>) -> IncrementalDecoder {
        IncrementalDecoder::new(self.clone())
    }
}

/// Decodes a stream of token ids into text without ever splitting a UTF-8 character: bytes
/// of an incomplete character wait for the tokens that complete it.
#[derive(Debug)]
pub(crate) struct IncrementalDecoder {
    text: Arc<ModelText>,
    pending: Vec<u8>,
}

impl IncrementalDecoder {
    fn new(text: Arc<ModelText>) -> Self {
        Self {
            text,
            pending: Vec::new(),
        }
    }

    /// The text that `tokens` complete; may be empty.
    pub(crate) fn push(&mut self, tokens: &[u32]) -> String {
        match *self.text {
            ModelText::Bytes => {
                for &t in tokens {
                    match u8::try_from(t) {
                        Ok(b) => self.pending.push(b),
                        // Out of vocabulary: show it as a replacement character, as
                        // lossy UTF-8 decoding would.
                        Err(_) => self.pending.extend_from_slice("\u{FFFD}".as_bytes()),
                    }
                }
            }
        }
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // Valid by construction: from_utf8 just said so.
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // Incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is still pending when the stream ends.
    pub(crate) fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_splits_a_character() {
        let text = "héllo, 世界 🦀!";
        let bytes = Arc::new(ModelText::Bytes);
        let mut d = bytes.decoder();
        let mut pieces = Vec::new();
        for t in bytes.encode(text).unwrap() {
            let piece = d.push(&[t]);
            if !piece.is_empty() {
                pieces.push(piece);
            }
        }
        assert_eq!(d.finish(), "");
        assert_eq!(pieces.concat(), text);
        assert!(
            pieces.contains(&"🦀".to_owned()),
            "the crab comes out whole: {pieces:?}"
        );
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut d = Arc::new(ModelText::Bytes).decoder();
        assert_eq!(d.push(&[0x61, 0xff, 0x62, 300]), "a\u{FFFD}b\u{FFFD}");
        assert_eq!(d.push(&[0xe4, 0xb8]), "");
        assert_eq!(d.finish(), "\u{FFFD}");
    }

    #[test]
    fn chat_prompt_format() {
        let messages: Vec<ChatMessage> =
            serde_json::from_str(r#"[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]"#).unwrap();
        let bytes = ModelText::Bytes;
        assert_eq!(
            bytes.render_chat(&messages).unwrap(),
            "system: be brief\nuser: hi\nassistant: "
        );
        assert_eq!(bytes.check_token_ids(&[0, 255]), Ok(()));
        assert_eq!(bytes.check_token_ids(&[1, 256, 999]), Err(256));
    }
}
