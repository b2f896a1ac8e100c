//! A model's tokenizer and chat template as the HTTP layer uses them: loaded from what the
//! model card names, with failures turned into API errors by the caller.

use std::path::Path;

use turbine_preprocess::{IncrementalDecoder, Preprocessor};
use turbine_protocols::openai::ChatMessage;
use turbine_protocols::TokenizerKind;

pub(crate) use turbine_preprocess::Error as TextError;

/// A model's tokenizer and chat format.
#[derive(Debug)]
pub(crate) struct ModelText(Preprocessor);

impl ModelText {
    pub(crate) fn load(kind: &TokenizerKind) -> Result<Self, TextError> {
        match kind {
            TokenizerKind::Bytes => Ok(Self(Preprocessor::bytes())),
            TokenizerKind::Files { path } => Preprocessor::load(Path::new(path)).map(Self),
        }
    }

    /// Token ids of a completion prompt, with the start token if the model wants one.
    pub(crate) fn encode(&self, text: &str) -> Result<Vec<u32>, TextError> {
        self.0.tokenizer().encode(text, true)
    }

    /// Checks that every id is in the vocabulary; returns the first one that is not.
    pub(crate) fn check_token_ids(&self, ids: &[u32]) -> Result<(), u32> {
        let vocab = self.0.tokenizer().vocab_size();
        ids.iter().find(|&&t| t as usize >= vocab).map_or(Ok(()), |&t| Err(t))
    }

    /// The chat rendered by the model's template up to where the assistant's reply begins,
    /// and its token ids.
    pub(crate) fn encode_chat(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[serde_json::Value]>,
    ) -> Result<Vec<u32>, TextError> {
        let messages: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| serde_json::to_value(m).unwrap_or_default())
            .collect();
        self.0.encode_chat(&messages, tools).map(|(_, ids)| ids)
    }

    /// The tokens that end the model's turn: generation stops on them unless asked not to.
    pub(crate) fn eos_token_ids(&self) -> &[u32] {
        self.0.tokenizer().eos_token_ids()
    }

    /// A decoder for one generated sequence; special tokens are not shown, as in vLLM.
    pub(crate) fn decoder(&self) -> IncrementalDecoder {
        self.0.detokenizer(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_chat_format_and_vocabulary() {
        let messages: Vec<ChatMessage> =
            serde_json::from_str(r#"[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}]"#).unwrap();
        let bytes = ModelText::load(&TokenizerKind::Bytes).unwrap();
        let ids = bytes.encode_chat(&messages, None).unwrap();
        assert_eq!(
            String::from_utf8(ids.iter().map(|&t| t as u8).collect()).unwrap(),
            "system: be brief\nuser: hi\nassistant: "
        );
        assert_eq!(bytes.check_token_ids(&[0, 255]), Ok(()));
        assert_eq!(bytes.check_token_ids(&[1, 256, 999]), Err(256));
    }

    #[test]
    fn a_missing_tokenizer_file_is_an_error_naming_it() {
        let e = ModelText::load(&TokenizerKind::Files {
            path: "/nonexistent/model.gguf".into(),
        })
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/model.gguf"), "{e}");
    }
}
