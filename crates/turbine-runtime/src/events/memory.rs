//! The event plane within one process: the reference for what every backend delivers.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::{check_subject, subject_matches, Event, EventPlane, EventPlaneError, Subscription};

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
        check_subject(subject, false)?;
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
        check_subject(pattern, true)?;
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((pattern.to_owned(), tx));
        Ok(UnboundedReceiverStream::new(rx).boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
