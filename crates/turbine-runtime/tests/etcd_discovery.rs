//! `EtcdDiscovery` against a real etcd process on loopback: the behaviour it shares with
//! `MemoryDiscovery` (checked on both), and what only a remote store can do to a watch
//! (restarts, compaction).

use std::net::TcpListener as StdTcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use futures::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use turbine_etcd::proto::{CompactionRequest, RangeRequest};
use turbine_runtime::{
    error_chain, Discovery, DiscoveryError, EtcdDiscovery, EtcdOptions, KeyValue, MemoryDiscovery, Watch, WatchEvent,
};

const ETCD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/tools/etcd");

/// How long any one expected change may take to show up.
const DEADLINE: Duration = Duration::from_secs(10);

#[tokio::test]
async fn memory_backend_shared_behaviour() -> anyhow::Result<()> {
    let d = MemoryDiscovery::new();
    check_put_list_delete(&d).await?;
    check_watch_and_revoke(&d).await?;
    check_keep_alive_and_expiry(&d).await?;
    Ok(())
}

#[tokio::test]
async fn etcd_backend_shared_behaviour() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let d = etcd.connect().await?;
    check_put_list_delete(&d).await?;
    check_watch_and_revoke(&d).await?;
    check_keep_alive_and_expiry(&d).await?;
    Ok(())
}

#[tokio::test]
async fn connect_names_the_unreachable_endpoint() -> anyhow::Result<()> {
    let endpoint = format!("http://127.0.0.1:{}", free_port()?);
    let options = EtcdOptions {
        connect_timeout: Duration::from_secs(1),
        ..EtcdOptions::default()
    };
    let started = Instant::now();
    let err = EtcdDiscovery::connect(std::slice::from_ref(&endpoint), options)
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(err, DiscoveryError::Unavailable(_)), "{err:?}");
    let chain = error_chain(&err);
    assert!(chain.contains(&endpoint), "{chain}");
    Ok(())
}

#[tokio::test]
async fn watch_resumes_after_etcd_restart_without_gap_or_repeat() -> anyhow::Result<()> {
    let mut etcd = Etcd::start().await?;
    let d = etcd.connect().await?;
    d.put("w/1", b"one".to_vec(), None).await?;
    let mut w = d.watch("w/").await?;
    assert_eq!(w.initial, [kv("w/1", "one")]);
    d.put("w/2", b"two".to_vec(), None).await?;
    assert_eq!(next(&mut w).await, put("w/2", "two"));

    etcd.stop();
    etcd.restart().await?;
    // A separate client, so that the put is sent exactly once whatever state `d`'s
    // connection is in.
    let other = etcd.connect().await?;
    other.put("w/3", b"three".to_vec(), None).await?;
    assert_eq!(next(&mut w).await, put("w/3", "three"));

    d.delete("w/1").await?;
    assert_eq!(next(&mut w).await, WatchEvent::Delete { key: "w/1".into() });
    assert_eq!(d.list("w/").await?, [kv("w/2", "two"), kv("w/3", "three")]);
    Ok(())
}

#[tokio::test]
async fn watch_resynchronises_when_its_revision_is_compacted() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let mut proxy = Proxy::start(etcd.client_port).await?;
    let direct = etcd.connect().await?;
    let through_proxy = EtcdDiscovery::connect(&[proxy.endpoint()], test_options()).await?;
    for key in ["c/changed", "c/gone", "c/same"] {
        direct.put(key, b"1".to_vec(), None).await?;
    }
    let mut w = through_proxy.watch("c/").await?;
    assert_eq!(w.initial.len(), 3);
    direct.put("c/same", b"2".to_vec(), None).await?;
    assert_eq!(next(&mut w).await, put("c/same", "2"));

    // While the watcher is cut off, history it has not seen is compacted away, so it can
    // only catch up by reading the prefix again.
    proxy.cut();
    direct.put("c/new", b"1".to_vec(), None).await?;
    direct.put("c/new", b"2".to_vec(), None).await?;
    direct.put("c/changed", b"2".to_vec(), None).await?;
    direct.delete("c/gone").await?;
    direct.put("d/elsewhere", b"1".to_vec(), None).await?;
    let client = turbine_etcd::Client::new(&[etcd.endpoint()], &turbine_etcd::ConnectOptions::default())?;
    let revision = client
        .range(RangeRequest {
            key: b"c/".to_vec(),
            count_only: true,
            ..RangeRequest::default()
        })
        .await?
        .header
        .context("no response header")?
        .revision;
    client
        .compact(CompactionRequest {
            revision,
            physical: true,
        })
        .await?;
    proxy.restore().await?;

    assert_eq!(next(&mut w).await, put("c/changed", "2"));
    assert_eq!(next(&mut w).await, put("c/new", "2"));
    assert_eq!(next(&mut w).await, WatchEvent::Delete { key: "c/gone".into() });
    // The watch goes on from the revision it resynchronised at.
    direct.put("c/after", b"1".to_vec(), None).await?;
    assert_eq!(next(&mut w).await, put("c/after", "1"));
    Ok(())
}

async fn check_put_list_delete(d: &dyn Discovery) -> anyhow::Result<()> {
    d.put("kv/b", b"2".to_vec(), None).await?;
    d.put("kv/a", b"1".to_vec(), None).await?;
    d.put("kv/c", b"old".to_vec(), None).await?;
    d.put("kv/c", b"3".to_vec(), None).await?;
    d.put("kvx", b"outside".to_vec(), None).await?;
    assert_eq!(
        d.list("kv/").await?,
        [kv("kv/a", "1"), kv("kv/b", "2"), kv("kv/c", "3")]
    );
    d.delete("kv/b").await?;
    d.delete("kv/absent").await?;
    assert_eq!(d.list("kv/").await?, [kv("kv/a", "1"), kv("kv/c", "3")]);
    assert!(d.list("nothing/").await?.is_empty());
    Ok(())
}

async fn check_watch_and_revoke(d: &dyn Discovery) -> anyhow::Result<()> {
    d.put("p/0", b"before".to_vec(), None).await?;
    let mut w = d.watch("p/").await?;
    assert_eq!(w.initial, [kv("p/0", "before")]);

    d.put("q/1", b"other prefix".to_vec(), None).await?;
    d.put("p/1", b"a".to_vec(), None).await?;
    d.put("p/1", b"b".to_vec(), None).await?;
    d.delete("p/1").await?;
    d.delete("p/absent").await?;
    let lease = d.grant_lease(Duration::from_secs(30)).await?;
    d.put("p/leased", b"l".to_vec(), Some(lease)).await?;
    d.revoke_lease(lease).await?;
    d.put("p/2", b"last".to_vec(), None).await?;

    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(next(&mut w).await);
    }
    assert_eq!(
        seen,
        [
            put("p/1", "a"),
            put("p/1", "b"),
            WatchEvent::Delete { key: "p/1".into() },
            put("p/leased", "l"),
            WatchEvent::Delete { key: "p/leased".into() },
            put("p/2", "last"),
        ]
    );
    assert_eq!(d.list("p/").await?, [kv("p/0", "before"), kv("p/2", "last")]);

    assert!(matches!(d.keep_alive(lease).await, Err(DiscoveryError::LeaseNotFound(l)) if l == lease));
    assert!(matches!(d.revoke_lease(lease).await, Err(DiscoveryError::LeaseNotFound(l)) if l == lease));
    assert!(matches!(
        d.put("p/3", vec![], Some(lease)).await,
        Err(DiscoveryError::LeaseNotFound(l)) if l == lease
    ));
    assert!(matches!(
        d.grant_lease(Duration::from_millis(10)).await,
        Err(DiscoveryError::InvalidTtl(_))
    ));
    Ok(())
}

/// Real time: a lease of 1 s outlives 2.5 s of keep-alives, then expires within the deadline.
async fn check_keep_alive_and_expiry(d: &dyn Discovery) -> anyhow::Result<()> {
    let lease = d.grant_lease(Duration::from_secs(1)).await?;
    d.put("ttl/k", b"v".to_vec(), Some(lease)).await?;
    let mut w = d.watch("ttl/").await?;
    assert_eq!(w.initial, [kv("ttl/k", "v")]);

    let kept_until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < kept_until {
        d.keep_alive(lease).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(d.list("ttl/").await?, [kv("ttl/k", "v")], "kept alive past its TTL");

    assert_eq!(next(&mut w).await, WatchEvent::Delete { key: "ttl/k".into() });
    assert!(d.list("ttl/").await?.is_empty());
    assert!(matches!(d.keep_alive(lease).await, Err(DiscoveryError::LeaseNotFound(l)) if l == lease));
    Ok(())
}

/// A single-member etcd on loopback ports, with its data in a temporary directory; killed on
/// drop.
struct Etcd {
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Etcd {
    async fn start() -> anyhow::Result<Self> {
        if !Path::new(ETCD).exists() {
            bail!("no etcd binary at {ETCD}: run scripts/install-etcd first");
        }
        // Both listeners are held at once so that the two ports differ.
        let client = StdTcpListener::bind("127.0.0.1:0")?;
        let peer = StdTcpListener::bind("127.0.0.1:0")?;
        let mut etcd = Self {
            client_port: client.local_addr()?.port(),
            peer_port: peer.local_addr()?.port(),
            dir: tempfile::tempdir()?,
            child: None,
        };
        drop((client, peer));
        etcd.restart().await?;
        Ok(etcd)
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    async fn connect(&self) -> Result<EtcdDiscovery, DiscoveryError> {
        EtcdDiscovery::connect(&[self.endpoint()], test_options()).await
    }

    /// Starts etcd (again) on the same ports and data, and waits until it serves requests.
    async fn restart(&mut self) -> anyhow::Result<()> {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))?;
        let child = Command::new(ETCD)
            .arg("--name=default")
            .arg(format!("--data-dir={}", self.dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={}", self.endpoint()))
            .arg(format!("--advertise-client-urls={}", self.endpoint()))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=default={peer}"))
            // A lone member elects itself sooner, and short leases stay short (etcd's
            // shortest lease is 1.5 election timeouts).
            .args(["--heartbeat-interval=20", "--election-timeout=200"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {ETCD}"))?;
        self.child = Some(child);

        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().transpose()) {
                bail!("etcd exited with {:?}; log:\n{}", status?, self.log());
            }
            // A refused connection answers at once, where the client would wait its timeout.
            if TcpStream::connect(("127.0.0.1", self.client_port)).await.is_err() {
                if Instant::now() > deadline {
                    bail!("etcd did not listen within {DEADLINE:?}; log:\n{}", self.log());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            match self.connect().await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    bail!(
                        "etcd did not answer within {DEADLINE:?}: {}; log:\n{}",
                        error_chain(&e),
                        self.log()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
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
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP relay in front of etcd that can drop every connection and refuse new ones, to cut a
/// client off while etcd itself carries on.
struct Proxy {
    port: u16,
    target: u16,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    async fn start(target: u16) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        Ok(Self {
            port,
            target,
            accept: Some(tokio::spawn(relay(listener, target))),
        })
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Closes the listener and every relayed connection (they live in the accept task's set).
    fn cut(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
    }

    async fn restore(&mut self) -> anyhow::Result<()> {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await?;
        self.accept = Some(tokio::spawn(relay(listener, self.target)));
        Ok(())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

async fn relay(listener: TcpListener, target: u16) {
    let mut connections = JoinSet::new();
    while let Ok((mut inbound, _)) = listener.accept().await {
        connections.spawn(async move {
            if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

/// Short timeouts and retries, so that a test waits on etcd, not on backoff.
fn test_options() -> EtcdOptions {
    EtcdOptions {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(2),
        watch_retry_min: Duration::from_millis(50),
        watch_retry_max: Duration::from_millis(500),
    }
}

async fn next(w: &mut Watch) -> WatchEvent {
    match tokio::time::timeout(DEADLINE, w.events.next()).await {
        Ok(Some(event)) => event,
        Ok(None) => panic!("watch stream ended"),
        Err(_) => panic!("no watch event within {DEADLINE:?}"),
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(StdTcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: value.into(),
    }
}

fn put(key: &str, value: &str) -> WatchEvent {
    WatchEvent::Put(kv(key, value))
}
