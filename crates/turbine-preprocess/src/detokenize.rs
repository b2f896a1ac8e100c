//! Turning a stream of token ids into a stream of text deltas without splitting characters.
//!
//! Byte-level BPE splits characters across tokens, and some decoders change a token's text
//! depending on what precedes it (SentencePiece drops the space of a sequence's first word).
//! So each step decodes a small window twice, with and without the new tokens, and emits the
//! difference, as vLLM and TGI do: `prefix_offset..read_offset` is text already emitted and
//! kept only as context, `read_offset..` is not emitted yet. A window whose decoded text ends
//! in U+FFFD ends mid-character and waits for more tokens.

use crate::{Error, Tokenizer};

/// Decodes token ids incrementally; the concatenated deltas equal one `decode` of all the ids.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    tokenizer: Tokenizer,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new(tokenizer: Tokenizer, skip_special_tokens: bool) -> Self {
        Self {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// The text that `ids` complete; empty while a character is still incomplete.
    pub fn push(&mut self, ids: &[u32]) -> Result<String, Error> {
        self.ids.extend_from_slice(ids);
        let (prefix, text) = self.window()?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        // A decoder whose output for the longer window does not extend the shorter one has
        // rewritten emitted text; wait, and let finish() settle it.
        match text.strip_prefix(prefix.as_str()) {
            Some(delta) if !delta.is_empty() => {
                let delta = delta.to_owned();
                self.prefix_offset = self.read_offset;
                self.read_offset = self.ids.len();
                Ok(delta)
            }
            _ => Ok(String::new()),
        }
    }

    /// Whatever is still held back when the stream ends (an incomplete character shows as
    /// U+FFFD, as in a one-shot decode).
    pub fn finish(&mut self) -> Result<String, Error> {
        let (prefix, text) = self.window()?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        // Bytes past the emitted prefix, cut back to a character boundary if the decoder
        // rewrote the prefix (it never does for byte-level BPE).
        let mut start = prefix.len().min(text.len());
        while !text.is_char_boundary(start) {
            start -= 1;
        }
        Ok(text[start..].to_owned())
    }

    /// Every id pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Decoded text of the emitted context window and of the window with the pending ids.
    fn window(&self) -> Result<(String, String), Error> {
        let prefix = self.tokenizer.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special_tokens,
        )?;
        let text = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..], self.skip_special_tokens)?;
        Ok((prefix, text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_wait_for_whole_characters() {
        let t = Tokenizer::bytes();
        let text = "héllo, 世界 🦀!";
        let mut d = IncrementalDecoder::new(t.clone(), false);
        let mut pieces = Vec::new();
        for id in t.encode(text, false).unwrap() {
            let piece = d.push(&[id]).unwrap();
            if !piece.is_empty() {
                pieces.push(piece);
            }
        }
        assert_eq!(d.finish().unwrap(), "");
        assert_eq!(pieces.concat(), text);
        assert!(pieces.contains(&"🦀".to_owned()), "{pieces:?}");
    }

    #[test]
    fn an_unfinished_character_comes_out_at_finish() {
        let mut d = IncrementalDecoder::new(Tokenizer::bytes(), false);
        assert_eq!(d.push(&[0x61, 0xe4, 0xb8]).unwrap(), "");
        assert_eq!(d.finish().unwrap(), "a\u{FFFD}");
        let mut d = IncrementalDecoder::new(Tokenizer::bytes(), false);
        assert_eq!(d.push(&[0x61]).unwrap(), "a");
        assert_eq!(d.push(&[0xff, 0x62]).unwrap(), "\u{FFFD}b");
        assert_eq!(d.finish().unwrap(), "");
    }
}
