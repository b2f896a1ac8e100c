//! Transfers with a peer in another process: shared memory and TCP, and a peer killed in the
//! middle of a transfer. The test binary starts itself again with `--peer` to be that peer.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use turbine_transfer::{Agent, AgentMetadata, AgentOptions, Backend, Compat, Desc, DescList, Post, RegionId};

const LEN: u64 = 64 << 20;
const BLOCK: u64 = 1 << 20;

fn compat() -> Compat {
    Compat::new([("test", "processes")])
}

fn byte(i: u64) -> u8 {
    (i % 251) as u8
}

fn peer() -> Result<()> {
    let mut options = AgentOptions::new("child", compat());
    options.listen = Some("127.0.0.1:0".parse()?);
    let agent = Agent::new(options)?;
    let shared = agent.register_shared(LEN)?;
    let host = agent.register_host(LEN)?;
    let fill: Vec<u8> = (0..LEN).map(byte).collect();
    for region in [shared, host] {
        agent.write_local(
            Desc {
                region,
                offset: 0,
                len: LEN,
            },
            &fill,
        )?;
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&(agent.metadata(), shared, host))?)?;
    out.flush()?;
    let mut sink = Vec::new();
    std::io::stdin().read_to_end(&mut sink)?;
    Ok(())
}

struct Peer {
    child: Child,
    meta: AgentMetadata,
    shared: RegionId,
    host: RegionId,
}

fn start_peer() -> Result<Peer> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--peer")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let (meta, shared, host) = serde_json::from_str(&line).with_context(|| format!("peer said {line:?}"))?;
    Ok(Peer {
        child,
        meta,
        shared,
        host,
    })
}

fn agent(shared_memory: bool) -> Result<Agent> {
    let mut options = AgentOptions::new("parent", compat());
    options.shared_memory = shared_memory;
    Ok(Agent::new(options)?)
}

async fn reads_from_another_process(backend: Backend) -> Result<()> {
    let mut peer = start_peer()?;
    let agent = agent(backend == Backend::SharedMemory)?;
    let local = agent.register_host(LEN)?;
    let connected = agent.connect(peer.meta.clone()).await?;
    let region = if backend == Backend::SharedMemory {
        peer.shared
    } else {
        peer.host
    };
    let ids: Vec<u32> = (0..64).rev().collect();
    let done = agent
        .post(
            Post::read(1).without_notification(),
            &DescList::blocks(local, BLOCK, 0..64),
            &connected,
            &DescList::blocks(region, BLOCK, ids.iter().copied()),
        )?
        .wait()
        .await?;
    ensure!(done.backend == backend, "went over {:?}", done.backend);
    let mut got = vec![0u8; BLOCK as usize];
    for (slot, &id) in ids.iter().enumerate() {
        agent.read_local(
            Desc {
                region: local,
                offset: slot as u64 * BLOCK,
                len: BLOCK,
            },
            &mut got,
        )?;
        let start = u64::from(id) * BLOCK;
        ensure!(
            got.iter().enumerate().all(|(i, &b)| b == byte(start + i as u64)),
            "block {id} arrived changed over {backend:?}"
        );
    }
    drop(peer.child.stdin.take());
    peer.child.wait()?;
    Ok(())
}

async fn a_peer_killed_mid_transfer_fails_it_without_hanging() -> Result<()> {
    let mut peer = start_peer()?;
    let agent = agent(false)?;
    let local = agent.register_host(LEN)?;
    let connected = agent.connect(peer.meta.clone()).await?;
    let all = |region| DescList::blocks(region, BLOCK, 0..64);
    let post = || agent.post(Post::read(7), &all(local), &connected, &all(peer.host));
    // A transfer in flight when the peer dies.
    let transfer = post()?;
    peer.child.kill()?;
    peer.child.wait()?;
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(10), transfer.wait())
        .await
        .context("hung")?;
    if let Err(e) = outcome {
        ensure!(e.kind() == "remote_disconnected", "{e}");
    }
    // Whatever the first one managed, the next cannot reach the peer.
    let err = tokio::time::timeout(Duration::from_secs(10), post()?.wait())
        .await
        .context("hung")?
        .err()
        .context("a transfer from a killed peer succeeded")?;
    ensure!(err.kind() == "remote_disconnected", "{err}");
    ensure!(started.elapsed() < Duration::from_secs(10));
    Ok(())
}

/// Over shared memory the bytes of a peer that died are still mapped here: the READ stands,
/// and the notification it can no longer take is counted, not turned into a failure.
async fn a_notification_a_killed_peer_cannot_take_is_counted() -> Result<()> {
    let mut peer = start_peer()?;
    let agent = agent(true)?;
    let local = agent.register_host(LEN)?;
    let connected = agent.connect(peer.meta.clone()).await?;
    peer.child.kill()?;
    peer.child.wait()?;
    let done = agent
        .post(
            Post::read(9),
            &DescList::blocks(local, BLOCK, [0]),
            &connected,
            &DescList::blocks(peer.shared, BLOCK, [3]),
        )?
        .wait()
        .await?;
    ensure!(done.backend == Backend::SharedMemory, "went over {:?}", done.backend);
    let mut got = vec![0u8; BLOCK as usize];
    agent.read_local(
        Desc {
            region: local,
            offset: 0,
            len: BLOCK,
        },
        &mut got,
    )?;
    ensure!(got.iter().enumerate().all(|(i, &b)| b == byte(3 * BLOCK + i as u64)));
    let started = Instant::now();
    while agent.stats().notifications_lost != 1 {
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "lost notifications: {}",
            agent.stats().notifications_lost
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

type Case = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>>>>;
type CaseFn = fn() -> Case;

fn main() -> Result<()> {
    if std::env::args().nth(1).as_deref() == Some("--peer") {
        return peer();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut failed = 0;
    let cases: [(&str, CaseFn); 4] = [
        ("reads_from_another_process_over_shared_memory", || {
            Box::pin(reads_from_another_process(Backend::SharedMemory))
        }),
        ("reads_from_another_process_over_tcp", || {
            Box::pin(reads_from_another_process(Backend::Tcp))
        }),
        ("a_peer_killed_mid_transfer_fails_it_without_hanging", || {
            Box::pin(a_peer_killed_mid_transfer_fails_it_without_hanging())
        }),
        ("a_notification_a_killed_peer_cannot_take_is_counted", || {
            Box::pin(a_notification_a_killed_peer_cannot_take_is_counted())
        }),
    ];
    for (name, case) in cases {
        match runtime.block_on(case()) {
            Ok(()) => println!("test {name} ... ok"),
            Err(e) => {
                println!("test {name} ... FAILED: {e:#}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} failed");
    }
    Ok(())
}
