//! The TCP request plane on loopback: round-trip latency of a small request, and streamed
//! messages per second over 64 concurrent streams.
//!
//! `cargo bench -p turbine-runtime --bench request_plane`

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use turbine_runtime::{
    EndpointId, EndpointServer, Handler, HandlerError, Instance, MemoryDiscovery, MemoryEventPlane, RequestContext,
    Runtime, ServeOptions, TransportOptions,
};

#[derive(Serialize, Deserialize)]
struct Req {
    n: u32,
}

/// A token-sized message, like one step of an engine's output.
#[derive(Serialize, Deserialize)]
struct Msg {
    token_ids: Vec<u32>,
}

struct Streamer;

#[async_trait]
impl Handler<Req, Msg> for Streamer {
    async fn handle(
        &self,
        req: Req,
        _ctx: RequestContext,
    ) -> Result<BoxStream<'static, Result<Msg, HandlerError>>, HandlerError> {
        Ok(futures::stream::iter((0..req.n).map(|i| Ok(Msg { token_ids: vec![i] }))).boxed())
    }
}

fn bench(c: &mut Criterion) {
    // Server and client each get a runtime and a thread of their own, as two processes on
    // this 2-core machine would; sharing one runtime would measure its cross-thread wake-ups.
    let discovery = Arc::new(MemoryDiscovery::new());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_discovery = discovery.clone();
    let server_thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("server runtime");
        rt.block_on(async move {
            let server_rt = Runtime::new(server_discovery, Arc::new(MemoryEventPlane::new()));
            let options = ServeOptions {
                transport: TransportOptions::Tcp {
                    bind: "127.0.0.1:0".parse().expect("addr"),
                    advertise: None,
                },
                ..Default::default()
            };
            let server = EndpointServer::<Req, Msg>::start(
                &server_rt,
                EndpointId::new("bench", "s", "e"),
                Arc::new(Streamer),
                options,
            )
            .await
            .expect("server");
            ready_tx.send(server.instance().clone()).expect("ready");
            server
                .run(async move {
                    let _ = stop_rx.await;
                })
                .await;
        });
    });
    let instance: Instance = ready_rx.recv().expect("server started");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let client = Runtime::new(discovery, Arc::new(MemoryEventPlane::new())).client::<Req, Msg>();

    let mut g = c.benchmark_group("tcp_request_plane");
    g.measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(1));
    g.bench_function("round_trip_1_message", |b| {
        b.to_async(&rt).iter(|| async {
            let msgs: Vec<Msg> = client
                .call(&instance, Req { n: 1 })
                .await
                .expect("call")
                .try_collect()
                .await
                .expect("stream");
            assert_eq!(msgs.len(), 1);
        })
    });

    const STREAMS: usize = 64;
    const PER_STREAM: u32 = 1000;
    g.throughput(Throughput::Elements(STREAMS as u64 * PER_STREAM as u64));
    g.sample_size(20);
    g.bench_with_input(
        BenchmarkId::new("streamed_messages", format!("{STREAMS}x{PER_STREAM}")),
        &(),
        |b, _| {
            b.to_async(&rt).iter(|| async {
                let calls = (0..STREAMS).map(|_| {
                    let client = client.clone();
                    let instance = instance.clone();
                    tokio::spawn(async move {
                        let s = client.call(&instance, Req { n: PER_STREAM }).await.expect("call");
                        s.try_fold(0u32, |n, _| async move { Ok(n + 1) }).await.expect("stream")
                    })
                });
                for n in futures::future::join_all(calls).await {
                    assert_eq!(n.expect("task"), PER_STREAM);
                }
            })
        },
    );
    g.finish();

    // The floor: the same topology exchanging 16-byte messages over a bare socket, with no
    // framing, multiplexing or serialization.
    let mut g = c.benchmark_group("raw_tcp");
    g.measurement_time(Duration::from_secs(5));
    let (echo_addr_tx, echo_addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("echo runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            echo_addr_tx.send(listener.local_addr().expect("addr")).expect("send");
            let (mut sock, _) = listener.accept().await.expect("accept");
            sock.set_nodelay(true).expect("nodelay");
            let mut buf = [0u8; 16];
            while sock.read_exact(&mut buf).await.is_ok() {
                if sock.write_all(&buf).await.is_err() {
                    break;
                }
            }
        });
    });
    let echo_addr = echo_addr_rx.recv().expect("echo server");
    let sock = rt.block_on(async {
        let s = tokio::net::TcpStream::connect(echo_addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        tokio::sync::Mutex::new(s)
    });
    g.bench_function("ping_pong_16_bytes", |b| {
        b.to_async(&rt).iter(|| async {
            let mut s = sock.lock().await;
            let mut buf = [7u8; 16];
            s.write_all(&buf).await.expect("write");
            s.read_exact(&mut buf).await.expect("read");
        })
    });
    g.finish();
    let _ = stop_tx.send(());
    let _ = server_thread.join();
}

criterion_group!(benches, bench);
criterion_main!(benches);
