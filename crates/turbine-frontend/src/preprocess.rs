//! Turning requests into token ids and token ids back into text.
//!
//! For now one tokenizer, [`TokenizerKind::Bytes`]: one token per UTF-8 byte, with a plain
//! `role: content` chat format. Real tokenizers and chat templates replace it behind the same
//! functions.

use turbine_protocols::openai::ChatMessage;
use turbine_protocols::TokenizerKind;

/// Token ids of `text` under `tokenizer`.
pub(crate) fn encode(tokenizer: &TokenizerKind, text: &str) -> Vec<u32> {
    match tokenizer {
        TokenizerKind::Bytes => text.bytes().map(u32::from).collect(),
    }
}

/// Checks that every id is in the vocabulary; returns the first one that is not.
pub(crate) fn check_token_ids(tokenizer: &TokenizerKind, ids: &[u32]) -> Result<(), u32> {
    match tokenizer {
        TokenizerKind::Bytes => ids.iter().find(|&&t| t > 255).map_or(Ok(()), |&t| Err(t)),
    }
}

/// The prompt for a chat, ending where the assistant's reply begins.
pub(crate) fn render_chat(tokenizer: &TokenizerKind, messages: &[ChatMessage]) -> String {
    match tokenizer {
        TokenizerKind::Bytes => {
            let mut prompt = String::new();
            for m in messages {
                prompt.push_str(&m.role);
                prompt.push_str(": ");
                prompt.push_str(&m.content.as_ref().map(|c| c.text()).unwrap_or_default());
                prompt.push('\n');
            }
            prompt.push_str("assistant: ");
            prompt
        }
    }
}

/// Decodes a stream of token ids into text without ever splitting a UTF-8 character: bytes
/// of an incomplete character wait for the tokens that complete it.
#[derive(Debug)]
pub(crate) struct IncrementalDecoder {
    tokenizer: TokenizerKind,
    pending: Vec<u8>,
}

impl IncrementalDecoder {
    pub(crate) fn new(tokenizer: TokenizerKind) -> Self {
        Self {
            tokenizer,
            pending: Vec::new(),
        }
    }

    /// The text that `tokens` complete; may be empty.
    pub(crate) fn push(&mut self, tokens: &[u32]) -> String {
        match self.tokenizer {
            TokenizerKind::Bytes => {
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
        let mut d = IncrementalDecoder::new(TokenizerKind::Bytes);
        let mut pieces = Vec::new();
        for t in encode(&TokenizerKind::Bytes, text) {
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
        let mut d = IncrementalDecoder::new(TokenizerKind::Bytes);
        assert_eq!(d.push(&[0x61, 0xff, 0x62, 300]), "a\u{FFFD}b\u{FFFD}");
        assert_eq!(d.push(&[0xe4, 0xb8]), "");
        assert_eq!(d.finish(), "\u{FFFD}");
    }

    #[test]
    fn chat_prompt_format() {
        let messages: Vec<ChatMessage> =
            serde_json::from_str(r#"[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]"#).unwrap();
        assert_eq!(
            render_chat(&TokenizerKind::Bytes, &messages),
            "system: be brief\nuser: hi\nassistant: "
        );
        assert_eq!(check_token_ids(&TokenizerKind::Bytes, &[0, 255]), Ok(()));
        assert_eq!(check_token_ids(&TokenizerKind::Bytes, &[1, 256, 999]), Err(256));
    }
}
