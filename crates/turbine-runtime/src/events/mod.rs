//! The event plane: publish/subscribe by subject, shaped like NATS (dot-separated tokens,
//! `*` matches one token, `>` matches the rest) so the NATS backend drops in behind it.

mod memory;
mod nats;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

pub use memory::MemoryEventPlane;
pub use nats::{NatsEventPlane, NatsOptions};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub subject: String,
    pub payload: Bytes,
}

/// Every event published on a matching subject after the subscription was made.
pub type Subscription = BoxStream<'static, Event>;

#[derive(Debug, thiserror::Error)]
pub enum EventPlaneError {
    #[error("invalid subject {0:?}")]
    InvalidSubject(String),
    #[error("payload of {size} bytes exceeds the event plane's limit of {max}")]
    PayloadTooLarge { size: usize, max: usize },
    #[error("event plane unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

#[async_trait]
pub trait EventPlane: Send + Sync + std::fmt::Debug + 'static {
    /// `subject` must be concrete (no wildcards).
    async fn publish(&self, subject: &str, payload: Bytes) -> Result<(), EventPlaneError>;
    /// `pattern` may use `*` and a trailing `>`.
    async fn subscribe(&self, pattern: &str) -> Result<Subscription, EventPlaneError>;
    /// False while events cannot flow (a lost connection being re-established): what
    /// subscribers see meanwhile may have gaps.
    fn is_connected(&self) -> bool {
        true
    }
}

/// `Ok` when `subject` is a concrete subject, or with `wildcards` a pattern; every backend
/// checks the same way so that a subject one accepts is never refused by another.
fn check_subject(subject: &str, wildcards: bool) -> Result<(), EventPlaneError> {
    if valid_subject(subject, wildcards) {
        Ok(())
    } else {
        Err(EventPlaneError::InvalidSubject(subject.to_owned()))
    }
}

fn valid_subject(s: &str, wildcards: bool) -> bool {
    let tokens: Vec<&str> = s.split('.').collect();
    tokens.iter().enumerate().all(|(i, t)| {
        !t.is_empty()
            && !t.contains(char::is_whitespace)
            && match *t {
                "*" => wildcards,
                ">" => wildcards && i == tokens.len() - 1,
                t => !t.contains(['*', '>']),
            }
    })
}

fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_style_matching() {
        for (pattern, subject, want) in [
            ("a.b", "a.b", true),
            ("a.b", "a.c", false),
            ("a.*", "a.b", true),
            ("a.*", "a.b.c", false),
            ("a.>", "a.b.c", true),
            ("a.>", "a", false),
            ("*.b", "x.b", true),
        ] {
            assert_eq!(subject_matches(pattern, subject), want, "{pattern} vs {subject}");
        }
        assert!(!valid_subject("a.>.b", true));
        assert!(!valid_subject("a.*", false));
        assert!(!valid_subject("a..b", true));
    }
}
