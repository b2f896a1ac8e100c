//! Black-box tests of the request plane over both transports: streaming, cancellation,
//! typed errors, graceful shutdown and resilience to bad peers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use turbine_runtime::{
    instance_prefix, Discovery, EndpointId, EndpointServer, ErrorKind, Handler, HandlerError, MemoryDiscovery,
    MemoryEventPlane, RequestContext, RequestError, Runtime, ServeOptions, TransportOptions,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Count {
    tag: String,
    n: u32,
    delay_ms: u64,
    /// Reject the request outright.
    #[serde(default)]
    reject: bool,
    /// Fail after this many items.
    #[serde(default)]
    fail_at: Option<u32>,
}

impl Count {
    fn new(tag: impl Into<String>, n: u32, delay_ms: u64) -> Self {
        Self {
            tag: tag.into(),
            n,
            delay_ms,
            reject: false,
            fail_at: None,
        }
    }
}

/// Streams `tag-0 .. tag-{n-1}`, counting what is in flight and what got cancelled.
#[derive(Default)]
struct Counter {
    in_flight: Arc<AtomicUsize>,
    cancelled: Arc<AtomicUsize>,
    cancel_seen_at: Arc<std::sync::Mutex<Vec<Instant>>>,
}

struct InFlight(Arc<AtomicUsize>);
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Handler<Count, String> for Counter {
    async fn handle(
        &self,
        req: Count,
        ctx: RequestContext,
    ) -> Result<BoxStream<'static, Result<String, HandlerError>>, HandlerError> {
        if req.reject {
            return Err(HandlerError::new(
                ErrorKind::InvalidRequest,
                format!("rejected {}", req.tag),
            ));
        }
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(self.in_flight.clone());
        let cancelled = self.cancelled.clone();
        let seen = self.cancel_seen_at.clone();
        // Produce in a task of its own that watches the context, as an engine does: the
        // caller's stream is only a receiver, and dropping it is seen through the token.
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let _guard = guard;
            for i in 0..req.n {
                if req.fail_at == Some(i) {
                    let _ = tx
                        .send(Err(HandlerError::new(ErrorKind::Internal, format!("failed at {i}"))))
                        .await;
                    return;
                }
                let delay = tokio::time::sleep(Duration::from_millis(req.delay_ms));
                tokio::select! {
                    biased;
                    _ = ctx.cancelled() => {
                        cancelled.fetch_add(1, Ordering::SeqCst);
                        seen.lock().expect("lock").push(Instant::now());
                        return;
                    }
                    _ = delay => {}
                }
                if tx.send(Ok(format!("{}-{i}", req.tag))).await.is_err() {
                    // The caller dropped its stream while this send was under way (in-process,
                    // the receiver goes with it): the handler learns of the cancellation here,
                    // before the token's watcher tells it.
                    cancelled.fetch_add(1, Ordering::SeqCst);
                    seen.lock().expect("lock").push(Instant::now());
                    return;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(stream.boxed())
    }
}

fn runtime(discovery: &MemoryDiscovery) -> Runtime {
    Runtime::new(Arc::new(discovery.clone()), Arc::new(MemoryEventPlane::new()))
}

fn endpoint() -> EndpointId {
    EndpointId::new("test", "counter", "count")
}

fn tcp() -> ServeOptions {
    ServeOptions {
        transport: TransportOptions::Tcp {
            bind: "127.0.0.1:0".parse().expect("loopback address"),
            advertise: None,
        },
        ..Default::default()
    }
}

fn tcp_addr(server: &EndpointServer<Count, String>) -> SocketAddr {
    match server.instance().address {
        turbine_runtime::InstanceAddress::Tcp { addr } => addr,
        other => panic!("not tcp: {other:?}"),
    }
}

async fn start(rt: &Runtime, options: ServeOptions) -> Result<(EndpointServer<Count, String>, Arc<Counter>)> {
    let counter = Arc::new(Counter::default());
    let server = EndpointServer::start(rt, endpoint(), counter.clone(), options).await?;
    Ok((server, counter))
}

async fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn expected(tag: &str, n: u32) -> Vec<String> {
    (0..n).map(|i| format!("{tag}-{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_tcp_streams_complete_with_right_content() -> Result<()> {
    let d = MemoryDiscovery::new();
    let (server, _) = start(&runtime(&d), tcp()).await?;
    // A separate runtime plays the remote caller, so nothing short-circuits in-process.
    let client = runtime(&d).client::<Count, String>();
    let instance = server.instance().clone();
    let calls = (0..1000u32).map(|i| {
        let client = client.clone();
        let instance = instance.clone();
        tokio::spawn(async move {
            let n = 1 + i % 20;
            let got: Vec<String> = client
                .call(&instance, Count::new(format!("r{i}"), n, 1))
                .await?
                .try_collect()
                .await?;
            anyhow::ensure!(got == expected(&format!("r{i}"), n), "request {i} got {got:?}");
            Ok(())
        })
    });
    for r in futures::future::join_all(calls).await {
        r??;
    }
    assert_eq!(server.in_flight(), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_stream_cancels_handler_within_100ms() -> Result<()> {
    for options in [ServeOptions::default(), tcp()] {
        let d = MemoryDiscovery::new();
        let rt = runtime(&d);
        let (server, counter) = start(&rt, options.clone()).await?;
        let client = rt.client::<Count, String>();
        let mut streams = Vec::new();
        for i in 0..10 {
            let mut s = client
                .call(server.instance(), Count::new(format!("c{i}"), 1000, 10))
                .await?;
            assert_eq!(s.next().await.transpose()?, Some(format!("c{i}-0")));
            streams.push(s);
        }
        assert_eq!(counter.in_flight.load(Ordering::SeqCst), 10);
        let dropped_at = Instant::now();
        drop(streams);
        wait_until("in-flight to reach zero", Duration::from_secs(5), || {
            counter.in_flight.load(Ordering::SeqCst) == 0 && server.in_flight() == 0
        })
        .await;
        let seen = counter.cancel_seen_at.lock().unwrap().clone();
        assert_eq!(seen.len(), 10, "{options:?}: every handler saw its cancellation");
        for at in seen {
            let after = at.duration_since(dropped_at);
            assert!(
                after < Duration::from_millis(100),
                "{options:?}: cancellation seen after {after:?}"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_errors_reach_the_caller_typed() -> Result<()> {
    for options in [ServeOptions::default(), tcp()] {
        let d = MemoryDiscovery::new();
        let rt = runtime(&d);
        let (server, _) = start(&rt, options).await?;
        let client = rt.client::<Count, String>();

        let mut req = Count::new("x", 3, 0);
        req.reject = true;
        match client.call(server.instance(), req).await {
            Err(RequestError::Handler(e)) => assert_eq!(e, HandlerError::new(ErrorKind::InvalidRequest, "rejected x")),
            other => panic!("expected a handler error, got {other:?}"),
        }

        let mut req = Count::new("y", 5, 0);
        req.fail_at = Some(2);
        let items: Vec<_> = client.call(server.instance(), req).await?.collect().await;
        assert_eq!(items.len(), 3);
        assert!(
            matches!(&items[2], Err(RequestError::Handler(e)) if e.kind == ErrorKind::Internal && e.message == "failed at 2")
        );
        assert_eq!(server.in_flight(), 0);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_and_deregisters() -> Result<()> {
    for options in [ServeOptions::default(), tcp()] {
        let d = MemoryDiscovery::new();
        let rt = runtime(&d);
        let (server, _) = start(&rt, options.clone()).await?;
        let instance = server.instance().clone();
        assert_eq!(d.list(&instance_prefix(&endpoint())).await?.len(), 1);
        let client = rt.client::<Count, String>();

        let mut running = Vec::new();
        for i in 0..50 {
            let s = client.call(&instance, Count::new(format!("s{i}"), 20, 10)).await?;
            running.push(tokio::spawn(async move { s.try_collect::<Vec<String>>().await }));
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        stop.send(()).ok();

        let start = Instant::now();
        while !d.list(&instance_prefix(&endpoint())).await?.is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "{options:?}: still registered"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Once draining, new requests are refused with a retryable error.
        let start = Instant::now();
        loop {
            let r = tokio::time::timeout(
                Duration::from_millis(200),
                client.call(&instance, Count::new("late", 1, 0)),
            )
            .await;
            if matches!(r, Ok(Err(ref e)) if e.is_retryable_elsewhere()) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "{options:?}: late request not refused"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for (i, r) in futures::future::join_all(running).await.into_iter().enumerate() {
            assert_eq!(r??, expected(&format!("s{i}"), 20), "{options:?}");
        }
        tokio::time::timeout(Duration::from_secs(5), serving).await??;
    }
    Ok(())
}

/// What is left at the end of the grace period is cancelled on the server, and its callers
/// are told to carry on elsewhere: a frontend migrates it instead of failing the client.
/// The same over TCP and in process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_period_cancels_what_is_left_and_sends_it_elsewhere() -> Result<()> {
    for transport in [tcp(), ServeOptions::default()] {
        let d = MemoryDiscovery::new();
        let rt = runtime(&d);
        let options = ServeOptions {
            grace_period: Duration::from_millis(100),
            ..transport
        };
        let (server, counter) = start(&rt, options).await?;
        let client = rt.client::<Count, String>();
        let s = client.call(server.instance(), Count::new("slow", 1000, 10)).await?;
        let collecting = tokio::spawn(s.collect::<Vec<_>>());
        server.run(async {}).await;
        let items = collecting.await?;
        assert!(
            matches!(items.last(), Some(Err(e @ RequestError::Handler(h))) if h.kind == ErrorKind::Unavailable && e.is_retryable_elsewhere()),
            "{:?}",
            items.last()
        );
        wait_until("the handler to stop", Duration::from_secs(1), || {
            counter.in_flight.load(Ordering::SeqCst) == 0
        })
        .await;
        assert_eq!(counter.cancelled.load(Ordering::SeqCst), 1);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_frames_do_not_disturb_other_connections() -> Result<()> {
    let d = MemoryDiscovery::new();
    let max = 64 * 1024;
    let server_rt = Runtime::with_max_frame_len(Arc::new(d.clone()), Arc::new(MemoryEventPlane::new()), max);
    let (server, counter) = start(&server_rt, tcp()).await?;
    let addr = tcp_addr(&server);
    let client = runtime(&d).client::<Count, String>();

    // A long stream is running on a healthy connection while others misbehave.
    let long = client.call(server.instance(), Count::new("ok", 50, 5)).await?;
    let long = tokio::spawn(long.try_collect::<Vec<String>>());

    let bad_inputs: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        {
            let mut v = ((max as u32) + 1).to_be_bytes().to_vec();
            v.extend(std::iter::repeat_n(0u8, 1024));
            v
        },
        [&5u32.to_be_bytes()[..], b"\x7f1234"].concat(),
        [&9u32.to_be_bytes()[..], b"\x81\0\0\0\0\0\0\0\0"].concat(),
        (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect(),
        // A well-formed request, then another on the same stream id while it runs.
        {
            let request = |stream: u64| {
                let body = serde_json::to_vec(&Count::new("dup", 1000, 10)).expect("json");
                let mut frame = vec![0x01];
                frame.extend(stream.to_le_bytes());
                frame.extend(server.instance().id.0.to_le_bytes());
                frame.extend(body);
                [&(frame.len() as u32).to_be_bytes()[..], &frame].concat()
            };
            [request(7), request(7)].concat()
        },
    ];
    for bytes in bad_inputs {
        let mut sock = tokio::net::TcpStream::connect(addr).await?;
        sock.write_all(&bytes).await?;
        // The server closes a misbehaving connection: reading sees EOF or a reset.
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match tokio::io::AsyncReadExt::read(&mut sock, &mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "server kept a bad connection open after {:?}",
            &bytes[..bytes.len().min(16)]
        );
    }

    // New callers are served as before, and the long stream finished intact.
    let got: Vec<String> = client
        .call(server.instance(), Count::new("after", 3, 0))
        .await?
        .try_collect()
        .await?;
    assert_eq!(got, expected("after", 3));
    assert_eq!(long.await??, expected("ok", 50));
    // The duplicate's first request ended with its connection; nothing is left running.
    wait_until("in-flight to reach zero", Duration::from_secs(2), || {
        server.in_flight() == 0 && counter.in_flight.load(Ordering::SeqCst) == 0
    })
    .await;
    Ok(())
}

#[tokio::test]
async fn oversized_request_fails_on_the_caller_side() -> Result<()> {
    let d = MemoryDiscovery::new();
    let rt = Runtime::with_max_frame_len(Arc::new(d.clone()), Arc::new(MemoryEventPlane::new()), 1024);
    let (server, _) = start(&rt, tcp()).await?;
    let client = rt.client::<Count, String>();
    let r = client.call(server.instance(), Count::new("x".repeat(2000), 1, 0)).await;
    assert!(matches!(r, Err(RequestError::TooLarge { max: 1024, .. })), "{r:?}");
    let got: Vec<String> = client
        .call(server.instance(), Count::new("y", 1, 0))
        .await?
        .try_collect()
        .await?;
    assert_eq!(got, ["y-0"]);
    Ok(())
}

#[tokio::test]
async fn instance_in_another_process_without_address_is_unreachable() -> Result<()> {
    let d = MemoryDiscovery::new();
    let (server, _) = start(&runtime(&d), ServeOptions::default()).await?;
    let other = runtime(&d).client::<Count, String>();
    assert!(matches!(
        other.call(server.instance(), Count::new("x", 1, 0)).await,
        Err(RequestError::Unreachable { .. })
    ));
    Ok(())
}

#[tokio::test]
async fn caller_sees_connection_loss_when_server_goes_away() -> Result<()> {
    let d = MemoryDiscovery::new();
    let rt = runtime(&d);
    let options = ServeOptions {
        grace_period: Duration::from_millis(50),
        ..tcp()
    };
    let (server, _) = start(&rt, options).await?;
    let instance = server.instance().clone();
    let s = rt
        .client::<Count, String>()
        .call(&instance, Count::new("z", 1000, 10))
        .await?;
    server.run(async {}).await;
    let items: Vec<_> = s.collect().await;
    assert!(
        items.last().is_some_and(|r| r.is_err()),
        "the stream ends in an error, not silently"
    );
    let r = rt
        .client::<Count, String>()
        .call(&instance, Count::new("z", 1, 0))
        .await;
    assert!(r.as_ref().is_err_and(|e| e.is_retryable_elsewhere()), "{r:?}");
    Ok(())
}
