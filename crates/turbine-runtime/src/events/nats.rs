//! The event plane over a NATS server (core publish/subscribe, no JetStream): what processes on
//! several machines share.
//!
//! Subjects map one to one onto NATS subjects. After the first connection the client
//! reconnects by itself and subscribes again, so a [`Subscription`] outlives a server restart
//! (missing what was published while it was cut off: core NATS keeps nothing). Publishes and
//! subscribes wait at most `request_timeout`, so an outage surfaces as
//! [`EventPlaneError::Unavailable`] instead of a caller that hangs.

use std::future::Future;
use std::time::Duration;

use async_nats::client::{FlushError, PublishErrorKind};
use async_nats::{Client, ConnectOptions};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;

use super::{check_subject, Event, EventPlane, EventPlaneError, Subscription};

/// Where the probes of [`NatsEventPlane::confirm`] go: a subject of their own, so that they can
/// be told apart from events (and from NATS' usual `_INBOX.` replies) and left out.
const PROBE_PREFIX: &str = "_TURBINE_PROBE.";

/// How a [`NatsEventPlane`] talks to NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsOptions {
    /// How long [`NatsEventPlane::connect`] waits for the server.
    pub connect_timeout: Duration,
    /// How long one publish or subscribe may wait for the server, reconnects included.
    pub request_timeout: Duration,
    /// The longest pause between attempts to reconnect; the pause doubles from 2 ms up to it.
    pub reconnect_delay_max: Duration,
    /// Events a subscription buffers for a slow reader; past that the client drops them (and
    /// logs it), as the NATS server itself does to a slow client.
    pub subscription_capacity: usize,
}

impl Default for NatsOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            reconnect_delay_max: Duration::from_secs(4),
            subscription_capacity: 64 * 1024,
        }
    }
}

/// The event plane on a NATS server. Cloning shares the connection.
#[derive(Clone)]
pub struct NatsEventPlane {
    client: Client,
    options: NatsOptions,
}

impl std::fmt::Debug for NatsEventPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsEventPlane")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl NatsEventPlane {
    /// Connects to the NATS server at `url` (`nats://host:port`), failing within
    /// `options.connect_timeout` when it cannot be reached.
    pub async fn connect(url: &str, options: NatsOptions) -> Result<Self, EventPlaneError> {
        let unreachable = |source| {
            EventPlaneError::Unavailable(Box::new(NatsError::Unreachable {
                url: url.to_owned(),
                source,
            }))
        };
        let reconnect_delay_max = options.reconnect_delay_max;
        let connect = ConnectOptions::new()
            .connection_timeout(options.connect_timeout)
            .custom_inbox_prefix(PROBE_PREFIX.trim_end_matches('.'))
            .subscription_capacity(options.subscription_capacity)
            .reconnect_delay_callback(move |attempts| reconnect_delay(attempts, reconnect_delay_max))
            .event_callback(|event| async move { log_event(event) })
            .connect(url);
        // The client's own timeout covers one TCP connect; this one covers the handshake too.
        match tokio::time::timeout(options.connect_timeout, connect).await {
            Ok(Ok(client)) => Ok(Self { client, options }),
            Ok(Err(e)) => Err(unreachable(e)),
            Err(_) => Err(EventPlaneError::Unavailable(Box::new(NatsError::ConnectTimeout {
                url: url.to_owned(),
                timeout: options.connect_timeout,
            }))),
        }
    }
}

#[async_trait]
impl EventPlane for NatsEventPlane {
    fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Returns once the event is written to the server's connection. After a timeout the event
    /// may still go out when the client reconnects.
    async fn publish(&self, subject: &str, payload: Bytes) -> Result<(), EventPlaneError> {
        check_subject(subject, false)?;
        let size = payload.len();
        self.bounded(async {
            self.client
                .publish(subject.to_owned(), payload)
                .await
                .map_err(|e| match e.kind() {
                    PublishErrorKind::MaxPayloadExceeded => EventPlaneError::PayloadTooLarge {
                        size,
                        max: self.client.server_info().max_payload,
                    },
                    _ => unavailable(NatsError::Publish(e)),
                })?;
            // Publishing only queues the event inside the client; the flush tells whether it
            // reached the connection, which it does not while the client is cut off.
            self.client.flush().await.map_err(|e| unavailable(NatsError::Flush(e)))
        })
        .await
    }

    async fn subscribe(&self, pattern: &str) -> Result<Subscription, EventPlaneError> {
        check_subject(pattern, true)?;
        let subscriber = self
            .bounded(async {
                let subscriber = self
                    .client
                    .subscribe(pattern.to_owned())
                    .await
                    .map_err(|e| unavailable(NatsError::Subscribe(e)))?;
                self.confirm().await?;
                Ok(subscriber)
            })
            .await?;
        Ok(subscriber
            // A pattern whose first token is a wildcard also matches the probes of `confirm`.
            .filter(|message| std::future::ready(!message.subject.starts_with(PROBE_PREFIX)))
            .map(|message| Event {
                subject: message.subject.to_string(),
                payload: message.payload,
            })
            .boxed())
    }
}

impl NatsEventPlane {
    /// Waits at most `request_timeout` for `call`: while the client reconnects it holds
    /// commands back, and would make the caller wait for as long as the outage lasts.
    async fn bounded<T>(&self, call: impl Future<Output = Result<T, EventPlaneError>>) -> Result<T, EventPlaneError> {
        tokio::time::timeout(self.options.request_timeout, call)
            .await
            .unwrap_or_else(|_| {
                Err(EventPlaneError::Unavailable(Box::new(NatsError::Timeout(
                    self.options.request_timeout,
                ))))
            })
    }

    /// Returns once the server has taken in every command this client sent before, so that a
    /// new subscription sees everything published after `subscribe` returns, from any client.
    /// The round trip is a probe the client sends itself: the server handles one connection's
    /// commands in order, so the probe comes back only after the subscriptions ahead of it.
    async fn confirm(&self) -> Result<(), EventPlaneError> {
        let probe = self.client.new_inbox();
        let mut echo = self
            .client
            .subscribe(probe.clone())
            .await
            .map_err(|e| unavailable(NatsError::Subscribe(e)))?;
        self.client
            .publish(probe, Bytes::new())
            .await
            .map_err(|e| unavailable(NatsError::Publish(e)))?;
        match echo.next().await {
            Some(_) => Ok(()),
            None => Err(unavailable(NatsError::Closed)),
        }
    }
}

fn unavailable(e: NatsError) -> EventPlaneError {
    EventPlaneError::Unavailable(Box::new(e))
}

/// No pause before the first retry, then 2 ms doubling up to `max`: a server that restarts
/// is found again at once, one that stays away is not hammered.
fn reconnect_delay(attempts: usize, max: Duration) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exponent = u32::try_from(attempts - 1).unwrap_or(u32::MAX).min(32);
    Duration::from_millis(1u64 << exponent).min(max)
}

fn log_event(event: async_nats::Event) {
    match event {
        async_nats::Event::Connected => tracing::info!("NATS connection restored"),
        async_nats::Event::Disconnected => tracing::warn!("NATS connection lost; reconnecting"),
        async_nats::Event::SlowConsumer(sid) => {
            tracing::warn!(subscription = sid, "NATS subscription fell behind; events dropped")
        }
        event => tracing::debug!(%event, "NATS client event"),
    }
}

#[derive(Debug, thiserror::Error)]
enum NatsError {
    #[error("cannot reach NATS at {url}")]
    Unreachable {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("NATS at {url} did not answer within {timeout:?}")]
    ConnectTimeout { url: String, timeout: Duration },
    #[error("NATS did not answer within {0:?}")]
    Timeout(Duration),
    #[error("publishing to NATS failed")]
    Publish(#[source] async_nats::PublishError),
    #[error("flushing to NATS failed")]
    Flush(#[source] FlushError),
    #[error("subscribing on NATS failed")]
    Subscribe(#[source] async_nats::SubscribeError),
    #[error("the NATS connection is closed")]
    Closed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delay_doubles_up_to_its_max() {
        let max = Duration::from_millis(100);
        let delays: Vec<u128> = [0, 1, 2, 3, 7, 8, 1000, usize::MAX]
            .into_iter()
            .map(|attempts| reconnect_delay(attempts, max).as_millis())
            .collect();
        assert_eq!(delays, [0, 0, 2, 4, 64, 100, 100, 100]);
    }
}
