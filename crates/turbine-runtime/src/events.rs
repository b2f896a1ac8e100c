//! The event plane: publish/subscribe by subject, shaped like NATS (dot-separated tokens,
//! `*` matches one token, `>` matches the rest) so the NATS backend drops in behind it.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

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
    #[error("event plane unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

#[async_trait]
pub trait EventPlane: Send + Sync + std::fmt::Debug + 'static {
    /// `subject` must be concrete (no wildcards).
    async fn publish(&self, subject: &str, payload: Bytes) -> Result<(), EventPlaneError>;
    /// `pattern` may use `*` and a trailing `>`.
    async fn subscribe(&self, pattern: &str) -> Result<Subscription, EventPlaneError>;
}

/// The event plane within one process. Subscribers are never dropped events: a slow one
/// buffers, because in one process the publisher and subscriber share fate anyway.
#[derive(Debug, Clone, Default)]
pub struct MemoryEventPlane {
    subscribers: Arc<Mutex<Vec<Subscriber>>>,
}

/// A subscription's pattern and where its events go.
type Subscriber = (String, mpsc::UnboundedSender<Event>);

impl MemoryEventPlane {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl EventPlane for MemoryEventPlane {
    async fn publish(&self, subject: &str, payload: Bytes) -> Result<(), EventPlaneError> {
        if !valid_subject(subject, false) {
            return Err(EventPlaneError::InvalidSubject(subject.to_owned()));
        }
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subs.retain(|(pattern, tx)| {
            !subject_matches(pattern, subject)
                || tx
                    .send(Event {
                        subject: subject.to_owned(),
                        payload: payload.clone(),
                    })
                    .is_ok()
        });
        Ok(())
    }

    async fn subscribe(&self, pattern: &str) -> Result<Subscription, EventPlaneError> {
        if !valid_subject(pattern, true) {
            return Err(EventPlaneError::InvalidSubject(pattern.to_owned()));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((pattern.to_owned(), tx));
        Ok(UnboundedReceiverStream::new(rx).boxed())
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

    #[tokio::test]
    async fn subscribers_get_matching_events_in_order() {
        let plane = MemoryEventPlane::new();
        let mut all = plane.subscribe("kv.>").await.unwrap();
        let mut one = plane.subscribe("kv.m1").await.unwrap();
        for (subject, p) in [("kv.m1", "1"), ("kv.m2", "2"), ("load.m1", "3"), ("kv.m1", "4")] {
            plane.publish(subject, Bytes::from(p)).await.unwrap();
        }
        let got: Vec<_> = (&mut all).take(3).map(|e| e.payload).collect().await;
        assert_eq!(got, ["1", "2", "4"]);
        let got: Vec<_> = (&mut one).take(2).map(|e| e.payload).collect().await;
        assert_eq!(got, ["1", "4"]);
        assert!(plane.publish("kv.*", Bytes::new()).await.is_err());
    }
}
