//! `NatsEventPlane` against a real nats-server on loopback: the behaviour it shares with
//! `MemoryEventPlane` (checked on both), and what only a remote server can do to a client
//! (be absent, restart, refuse a payload).

use std::collections::HashMap;
use std::net::TcpListener as StdTcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use futures::StreamExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use turbine_runtime::{
    error_chain, Event, EventPlane, EventPlaneError, MemoryEventPlane, NatsEventPlane, NatsOptions, Subscription,
};

const NATS_SERVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/tools/nats-server");

/// How long any one expected event may take to arrive.
const DEADLINE: Duration = Duration::from_secs(5);

#[tokio::test]
async fn memory_backend_shared_behaviour() -> anyhow::Result<()> {
    check_shared_behaviour(&MemoryEventPlane::new()).await
}

#[tokio::test]
async fn nats_backend_shared_behaviour() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    check_shared_behaviour(&server.connect().await?).await
}

#[tokio::test]
async fn subscription_sees_what_another_client_publishes_right_after_it() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let subscriber = server.connect().await?;
    let publisher = server.connect().await?;
    // Core NATS drops what arrives before the server knows of the subscription, so this
    // fails unless `subscribe` returns only once the server has it.
    for i in 0..20 {
        let subject = format!("race.{i}");
        let mut sub = subscriber.subscribe(&subject).await?;
        publisher.publish(&subject, Bytes::from(i.to_string())).await?;
        assert_eq!(next(&mut sub).await?, event(&subject, &i.to_string()));
    }
    Ok(())
}

#[tokio::test]
async fn connect_names_the_unreachable_url() -> anyhow::Result<()> {
    let url = format!("nats://127.0.0.1:{}", free_port()?);
    let options = NatsOptions {
        connect_timeout: Duration::from_secs(1),
        ..NatsOptions::default()
    };
    let started = Instant::now();
    let Err(err) = NatsEventPlane::connect(&url, options).await else {
        bail!("connected to {url}, where nothing listens");
    };
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(err, EventPlaneError::Unavailable(_)), "{err:?}");
    let chain = error_chain(&err);
    assert!(chain.contains(&url), "{chain}");
    Ok(())
}

#[tokio::test]
async fn subscription_survives_a_server_restart() -> anyhow::Result<()> {
    let mut server = NatsServer::start().await?;
    let plane = server.connect().await?;
    let mut sub = plane.subscribe("restart.>").await?;
    plane.publish("restart.before", Bytes::from("0")).await?;
    assert_eq!(next(&mut sub).await?, event("restart.before", "0"));
    assert!(plane.is_connected());

    server.stop();
    let deadline = Instant::now() + DEADLINE;
    while plane.is_connected() {
        ensure!(Instant::now() < deadline, "still connected to a stopped server");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.restart().await?;
    // A separate client, so that what reaches the subscriber cannot be a publish `plane` held
    // back while it was cut off. Until `plane` has reconnected and subscribed again, the server
    // drops these, so they are repeated until one gets through.
    let other = server.connect().await?;
    let deadline = Instant::now() + DEADLINE;
    let received = loop {
        other.publish("restart.after", Bytes::from("1")).await?;
        if let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(100), sub.next()).await {
            break e;
        }
        ensure!(
            Instant::now() < deadline,
            "no event after the restart within {DEADLINE:?}"
        );
    };
    assert_eq!(received, event("restart.after", "1"));
    assert!(plane.is_connected(), "connected again once events flow");

    // The reconnected client publishes too, and its own subscription hears it.
    plane.publish("restart.again", Bytes::from("2")).await?;
    next_on(&mut sub, "restart.again").await?;
    Ok(())
}

#[tokio::test]
async fn publish_while_the_server_is_down_is_bounded_then_recovers() -> anyhow::Result<()> {
    let mut server = NatsServer::start().await?;
    let plane = server.connect().await?;
    let mut sub = plane.subscribe("down.>").await?;
    server.stop();

    // The first publishes may still be written to a socket whose peer is gone; once the client
    // sees the loss it holds commands back, and publish must give up after `request_timeout`.
    let slack = test_options().request_timeout + Duration::from_secs(1);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let Ok(result) = tokio::time::timeout(slack, plane.publish("down.lost", Bytes::from("lost"))).await else {
            bail!("publish with the server down took more than {slack:?}");
        };
        match result {
            Err(EventPlaneError::Unavailable(_)) => break,
            Err(e) => bail!("publish failed with {e:?}, not Unavailable"),
            Ok(()) => ensure!(
                Instant::now() < deadline,
                "publish kept succeeding with the server down"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    server.restart().await?;
    let deadline = Instant::now() + DEADLINE;
    while let Err(e) = plane.publish("down.back", Bytes::from("back")).await {
        ensure!(
            Instant::now() < deadline,
            "publish still fails after the restart: {}",
            error_chain(&e)
        );
    }
    next_on(&mut sub, "down.back").await?;
    Ok(())
}

#[tokio::test]
async fn payload_over_the_server_limit_is_refused() -> anyhow::Result<()> {
    let server = NatsServer::start().await?;
    let plane = server.connect().await?;
    let size = 2 * 1024 * 1024;
    match plane.publish("big.one", Bytes::from(vec![0u8; size])).await {
        Err(EventPlaneError::PayloadTooLarge { size: s, max }) => {
            assert_eq!(s, size);
            assert_eq!(max, 1024 * 1024, "nats-server's default max_payload");
        }
        other => bail!("expected PayloadTooLarge, got {other:?}"),
    }
    // The connection is still good.
    let mut sub = plane.subscribe("big.>").await?;
    plane.publish("big.small", Bytes::from("ok")).await?;
    assert_eq!(next(&mut sub).await?, event("big.small", "ok"));
    Ok(())
}

async fn check_shared_behaviour(plane: &dyn EventPlane) -> anyhow::Result<()> {
    check_matching(plane).await?;
    check_fan_out(plane).await?;
    check_order_per_publisher(plane).await?;
    check_invalid_subjects(plane).await?;
    Ok(())
}

/// Each pattern sees exactly its matching subjects. The last subject published always matches
/// and order is kept, so a wrongly delivered event would arrive before it and show up here.
async fn check_matching(plane: &dyn EventPlane) -> anyhow::Result<()> {
    let cases: [(&str, &[&str], &[&str]); 5] = [
        (
            "m1.exact",
            &["m1.exact.more", "m1.other", "m1", "m1.exact"],
            &["m1.exact"],
        ),
        (
            "m2.*.load",
            &["m2.a.load", "m2.a.b.load", "m2.load", "m2.b.kv", "m2.b.load"],
            &["m2.a.load", "m2.b.load"],
        ),
        (
            "m3.>",
            &["m3", "m30.a", "x.m3.a", "m3.a", "m3.a.b.c"],
            &["m3.a", "m3.a.b.c"],
        ),
        ("*.m4", &["a.m4", "a.b.m4", "m4", "m4.a", "b.m4"], &["a.m4", "b.m4"]),
        (
            "m5.*.>",
            &["m5.a", "m5", "m5.a.b", "m6.a.b", "m5.c.d.e"],
            &["m5.a.b", "m5.c.d.e"],
        ),
    ];
    for (pattern, published, expected) in cases {
        let mut sub = plane.subscribe(pattern).await?;
        for subject in published {
            plane.publish(subject, Bytes::from(format!("to {subject}"))).await?;
        }
        let want: Vec<Event> = expected.iter().map(|s| event(s, &format!("to {s}"))).collect();
        let got = take(&mut sub, want.len())
            .await
            .with_context(|| format!("pattern {pattern}"))?;
        assert_eq!(got, want, "pattern {pattern}");
    }
    Ok(())
}

/// Every subscription with a matching pattern gets every event, however many there are.
async fn check_fan_out(plane: &dyn EventPlane) -> anyhow::Result<()> {
    let mut subs = Vec::new();
    for pattern in ["fan.x", "fan.x", "fan.*", "fan.>", ">"] {
        subs.push((pattern, plane.subscribe(pattern).await?));
    }
    let want: Vec<Event> = (0..10).map(|i| event("fan.x", &i.to_string())).collect();
    for e in &want {
        plane.publish(&e.subject, e.payload.clone()).await?;
    }
    for (pattern, sub) in &mut subs {
        let got = take(sub, want.len())
            .await
            .with_context(|| format!("pattern {pattern}"))?;
        assert_eq!(got, want, "pattern {pattern}");
    }
    Ok(())
}

/// Two publishers interleaved: each one's events arrive in the order it published them.
async fn check_order_per_publisher(plane: &dyn EventPlane) -> anyhow::Result<()> {
    const N: usize = 200;
    let mut sub = plane.subscribe("order.*").await?;
    let publish_all = |subject: &'static str| async move {
        for i in 0..N {
            plane.publish(subject, Bytes::from(i.to_string())).await?;
            // Lets the other publisher in between, so that their events interleave.
            tokio::task::yield_now().await;
        }
        Ok::<_, EventPlaneError>(())
    };
    let (a, b) = tokio::join!(publish_all("order.a"), publish_all("order.b"));
    a?;
    b?;
    let mut seen: HashMap<String, Vec<usize>> = HashMap::new();
    for e in take(&mut sub, 2 * N).await? {
        seen.entry(e.subject)
            .or_default()
            .push(std::str::from_utf8(&e.payload)?.parse()?);
    }
    let in_order: Vec<usize> = (0..N).collect();
    assert_eq!(seen.get("order.a"), Some(&in_order));
    assert_eq!(seen.get("order.b"), Some(&in_order));
    Ok(())
}

async fn check_invalid_subjects(plane: &dyn EventPlane) -> anyhow::Result<()> {
    for subject in ["", "a..b", ".a", "a.", "a b", "a.*", "a.>", "*", ">", "a.b*", "a.>b"] {
        match plane.publish(subject, Bytes::new()).await {
            Err(EventPlaneError::InvalidSubject(s)) => assert_eq!(s, subject),
            other => bail!("publish to {subject:?}: expected InvalidSubject, got {other:?}"),
        }
    }
    for pattern in ["", "a..b", ".a", "a.", "a b", "a.>.b", ">.a", "a.b*", "a.>b"] {
        match plane.subscribe(pattern).await {
            Err(EventPlaneError::InvalidSubject(s)) => assert_eq!(s, pattern),
            Err(e) => bail!("subscribe to {pattern:?}: expected InvalidSubject, got {e:?}"),
            Ok(_) => bail!("subscribe to {pattern:?}: expected InvalidSubject, got a subscription"),
        }
    }
    Ok(())
}

/// A nats-server on a loopback port, killed on drop.
struct NatsServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl NatsServer {
    async fn start() -> anyhow::Result<Self> {
        if !Path::new(NATS_SERVER).exists() {
            bail!("no nats-server binary at {NATS_SERVER}: run scripts/install-nats first");
        }
        let mut server = Self {
            port: free_port()?,
            dir: tempfile::tempdir()?,
            child: None,
        };
        server.restart().await?;
        Ok(server)
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn connect(&self) -> Result<NatsEventPlane, EventPlaneError> {
        NatsEventPlane::connect(&self.url(), test_options()).await
    }

    /// Starts nats-server (again) on the same port, and waits until it takes clients.
    async fn restart(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("nats.log"))?;
        let child = Command::new(NATS_SERVER)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {NATS_SERVER}"))?;
        self.child = Some(child);

        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().transpose()) {
                bail!("nats-server exited with {:?}; log:\n{}", status?, self.log());
            }
            // A refused connection answers at once, where the client would wait its timeout.
            if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                match self.connect().await {
                    Ok(_) => return Ok(()),
                    Err(e) if Instant::now() > deadline => {
                        bail!(
                            "nats-server did not answer within {DEADLINE:?}: {}; log:\n{}",
                            error_chain(&e),
                            self.log()
                        )
                    }
                    Err(_) => {}
                }
            } else if Instant::now() > deadline {
                bail!("nats-server did not listen within {DEADLINE:?}; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Already exited is fine: all that matters is that it is gone.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Short timeouts and reconnect pauses, so that a test waits on the server, not on backoff.
fn test_options() -> NatsOptions {
    NatsOptions {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(1),
        reconnect_delay_max: Duration::from_millis(100),
        ..NatsOptions::default()
    }
}

async fn next(sub: &mut Subscription) -> anyhow::Result<Event> {
    match tokio::time::timeout(DEADLINE, sub.next()).await {
        Ok(Some(e)) => Ok(e),
        Ok(None) => bail!("subscription ended"),
        Err(_) => bail!("no event within {DEADLINE:?}"),
    }
}

/// The next `n` events, each within the deadline.
async fn take(sub: &mut Subscription, n: usize) -> anyhow::Result<Vec<Event>> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let e = next(sub)
            .await
            .with_context(|| format!("after {} of {n} events: {got:?}", got.len()))?;
        got.push(e);
    }
    Ok(got)
}

/// Skips events until one on `subject`: those before it may be publishes the client held back
/// during an outage and sent after it.
async fn next_on(sub: &mut Subscription, subject: &str) -> anyhow::Result<Event> {
    loop {
        let e = next(sub).await.with_context(|| format!("waiting for {subject}"))?;
        if e.subject == subject {
            return Ok(e);
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(StdTcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn event(subject: &str, payload: &str) -> Event {
    Event {
        subject: subject.to_owned(),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
    }
}
