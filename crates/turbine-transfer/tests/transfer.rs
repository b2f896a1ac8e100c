//! Agents moving bytes over each backend, and every way a transfer can fail, in one process
//! (peers reached as if remote where a backend needs it).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use turbine_transfer::{
    Agent, AgentOptions, Backend, Compat, Desc, DescList, MemKind, Notification, Peer, Post, RegionId, TransferError,
};

const BLOCK: u64 = 4096;

fn compat() -> Compat {
    Compat::new([("model", "m"), ("dtype", "f32"), ("block_size", "16")])
}

/// Agent options for reaching a peer through `backend`.
fn options(name: &str, backend: Backend, shared_dir: &std::path::Path) -> AgentOptions {
    let mut options = AgentOptions::new(name, compat());
    options.listen = Some("127.0.0.1:0".parse().expect("addr"));
    options.shared_dir = shared_dir.to_owned();
    options.in_process = backend == Backend::InProcess;
    options.shared_memory = backend == Backend::SharedMemory;
    options
}

fn pattern(len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

struct Pair {
    here: Agent,
    there: Agent,
    peer: Peer,
    local: RegionId,
    remote: RegionId,
    _dir: tempfile::TempDir,
}

async fn pair(backend: Backend, blocks: u64) -> Result<Pair> {
    let dir = tempfile::tempdir()?;
    let here = Agent::new(options("here", backend, dir.path()))?;
    let there = Agent::new(options("there", backend, dir.path()))?;
    let local = here.register_host(blocks * BLOCK)?;
    let remote = match backend {
        Backend::SharedMemory => there.register_shared(blocks * BLOCK)?,
        _ => there.register_host(blocks * BLOCK)?,
    };
    let peer = here.connect(there.metadata()).await?;
    Ok(Pair {
        here,
        there,
        peer,
        local,
        remote,
        _dir: dir,
    })
}

async fn next_notification(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Notification>) -> Result<Notification> {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .context("no notification")?
        .context("notifications closed")
}

async fn read_and_write_move_exactly_the_named_blocks(backend: Backend) -> Result<()> {
    let p = pair(backend, 64).await?;
    let mut notes = p.there.notifications().context("notifications")?;
    let source = pattern(64 * BLOCK, 7);
    p.there.write_local(
        Desc {
            region: p.remote,
            offset: 0,
            len: 64 * BLOCK,
        },
        &source,
    )?;

    // READ their blocks 10..14 and 40 into our blocks 0..4 and 63.
    let remote = DescList::blocks(p.remote, BLOCK, [10, 11, 12, 13, 40]);
    let local = DescList::blocks(p.local, BLOCK, [0, 1, 2, 3, 63]);
    ensure!(p.peer.backend_for(&remote) == backend, "wrong backend chosen");
    let done = p.here.post(Post::read(41), &local, &p.peer, &remote)?.wait().await?;
    assert_eq!((done.tag, done.bytes, done.backend), (41, 5 * BLOCK, backend));
    let mut got = vec![0u8; (4 * BLOCK) as usize];
    p.here.read_local(
        Desc {
            region: p.local,
            offset: 0,
            len: 4 * BLOCK,
        },
        &mut got,
    )?;
    assert_eq!(got, source[(10 * BLOCK) as usize..(14 * BLOCK) as usize]);
    p.here.read_local(
        Desc {
            region: p.local,
            offset: 63 * BLOCK,
            len: BLOCK,
        },
        &mut got[..BLOCK as usize],
    )?;
    assert_eq!(
        &got[..BLOCK as usize],
        &source[(40 * BLOCK) as usize..(41 * BLOCK) as usize]
    );
    let note = next_notification(&mut notes).await?;
    assert_eq!((note.peer.as_str(), note.tag), ("here", 41));

    // WRITE our blocks back, shifted, and see them there.
    let ours = pattern(3 * BLOCK, 99);
    p.here.write_local(
        Desc {
            region: p.local,
            offset: 20 * BLOCK,
            len: 3 * BLOCK,
        },
        &ours,
    )?;
    let local = DescList::blocks(p.local, BLOCK, [20, 21, 22]);
    let remote = DescList::blocks(p.remote, BLOCK, [50, 2, 3]);
    p.here.post(Post::write(42), &local, &p.peer, &remote)?.wait().await?;
    let mut theirs = vec![0u8; (2 * BLOCK) as usize];
    p.there.read_local(
        Desc {
            region: p.remote,
            offset: 2 * BLOCK,
            len: 2 * BLOCK,
        },
        &mut theirs,
    )?;
    assert_eq!(theirs, ours[BLOCK as usize..]);
    assert_eq!(next_notification(&mut notes).await?.tag, 42);

    let stats = p.here.stats();
    let b = &stats.backends[&backend];
    assert_eq!(
        (b.bytes_read, b.bytes_written, b.completed, b.in_flight),
        (5 * BLOCK, 3 * BLOCK, 2, 0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_peers_copy() -> Result<()> {
    read_and_write_move_exactly_the_named_blocks(Backend::InProcess).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_on_one_host_share_memory() -> Result<()> {
    read_and_write_move_exactly_the_named_blocks(Backend::SharedMemory).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_peers_use_tcp() -> Result<()> {
    read_and_write_move_exactly_the_named_blocks(Backend::Tcp).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_transfer_splits_over_connections_and_arrives_whole() -> Result<()> {
    let p = pair(Backend::Tcp, 16 << 10).await?; // 64 MiB
    let len = (16 << 10) * BLOCK;
    let source = pattern(len, 3);
    p.there.write_local(
        Desc {
            region: p.remote,
            offset: 0,
            len,
        },
        &source,
    )?;
    let all = |region| DescList::blocks(region, BLOCK, 0..(16 << 10) as u32);
    p.here
        .post(Post::read(1), &all(p.local), &p.peer, &all(p.remote))?
        .wait()
        .await?;
    let mut got = vec![0u8; len as usize];
    p.here.read_local(
        Desc {
            region: p.local,
            offset: 0,
            len,
        },
        &mut got,
    )?;
    ensure!(got == source, "64 MiB arrived changed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_peer_is_refused_before_any_transfer() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let here = Agent::new(options("here", Backend::Tcp, dir.path()))?;
    let mut other = options("there", Backend::Tcp, dir.path());
    other.compat = Compat::new([("model", "m"), ("dtype", "bf16"), ("block_size", "16")]);
    let there = Agent::new(other)?;
    let Err(err) = here.connect(there.metadata()).await else {
        anyhow::bail!("an incompatible peer was accepted");
    };
    assert!(
        matches!(&err, TransferError::Mismatch(m) if m.contains("dtype: f32 here, bf16 there")),
        "{err}"
    );

    // A peer whose metadata claims our layout but whose agent differs is refused by the
    // agent itself at the handshake.
    let mut forged = there.metadata();
    forged.compat = compat();
    forged.compat_hash = compat().hash();
    let Err(err) = here.connect(forged).await else {
        anyhow::bail!("the handshake accepted an incompatible agent");
    };
    assert!(
        matches!(&err, TransferError::Mismatch(m) if m.contains("refused the handshake")),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_descriptors_fail_at_post() -> Result<()> {
    let p = pair(Backend::Tcp, 4).await?;
    let one = |region, block| DescList::blocks(region, BLOCK, [block]);
    let two = DescList::blocks(p.local, BLOCK, [0, 1]);
    let cases = [
        (
            p.here.post(Post::read(1), &two, &p.peer, &one(p.remote, 0)).err(),
            "mismatch",
        ),
        (
            p.here
                .post(Post::read(1), &one(p.local, 0), &p.peer, &one(RegionId(99), 0))
                .err(),
            "not_found",
        ),
        (
            p.here
                .post(Post::read(1), &one(RegionId(99), 0), &p.peer, &one(p.remote, 0))
                .err(),
            "not_found",
        ),
        (
            p.here
                .post(Post::read(1), &one(p.local, 0), &p.peer, &one(p.remote, 4))
                .err(),
            "out_of_bounds",
        ),
        (
            p.here
                .post(Post::read(1), &one(p.local, 9), &p.peer, &one(p.remote, 0))
                .err(),
            "out_of_bounds",
        ),
    ];
    for (err, kind) in cases {
        assert_eq!(err.map(|e| e.kind()), Some(kind));
    }
    assert!(matches!(
        p.here.register_device(BLOCK),
        Err(TransferError::Unsupported(_))
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_deregistered_under_a_transfer_fails_it_loudly() -> Result<()> {
    let p = pair(Backend::Tcp, 4).await?;
    assert!(p.there.deregister(p.remote));
    let list = |r| DescList::blocks(r, BLOCK, [0]);
    let err = p
        .here
        .post(Post::read(5), &list(p.local), &p.peer, &list(p.remote))?
        .wait()
        .await;
    assert_eq!(err.map_err(|e| e.kind()).err(), Some("not_found"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_transfer() -> Result<()> {
    let p = pair(Backend::Tcp, 16 << 10).await?;
    let all = |region| DescList::blocks(region, BLOCK, 0..(16 << 10) as u32);
    let transfer = p.here.post(Post::read(9), &all(p.local), &p.peer, &all(p.remote))?;
    transfer.cancel();
    let err = transfer.wait().await.err().context("a cancelled transfer succeeded")?;
    assert_eq!(err.kind(), "cancelled");
    assert_eq!(p.here.stats().backends[&Backend::Tcp].in_flight, 0);
    Ok(())
}

/// A listener that completes the handshake and then never answers.
fn silent_peer() -> Result<std::net::SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut hello = [0u8; 4 + 4 + 8 + 8 + 4 + 4];
            if stream.read_exact(&mut hello).is_ok() && stream.write_all(&[0]).is_ok() {
                held.push(stream);
            }
        }
    });
    Ok(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_times_out_at_the_deadline() -> Result<()> {
    let p = pair(Backend::Tcp, 4).await?;
    let mut meta = p.there.metadata();
    meta.name = "here".into(); // four bytes, as the silent peer's handshake expects
    meta.addr = Some(silent_peer()?);
    let stuck = p.here.connect(meta).await?;
    let list = |r| DescList::blocks(r, BLOCK, [0, 1]);
    let started = Instant::now();
    let err = p
        .here
        .post(
            Post::read(3).deadline(Duration::from_millis(300)),
            &list(p.local),
            &stuck,
            &list(p.remote),
        )?
        .wait()
        .await
        .err()
        .context("a silent peer answered")?;
    assert_eq!(err.kind(), "timed_out");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_goes_away_is_reported_disconnected() -> Result<()> {
    for backend in [Backend::InProcess, Backend::Tcp] {
        let p = pair(backend, 4).await?;
        let list = |r| DescList::blocks(r, BLOCK, [0]);
        p.here
            .post(Post::read(1), &list(p.local), &p.peer, &list(p.remote))?
            .wait()
            .await?;
        drop(p.there);
        let err = p
            .here
            .post(Post::read(2), &list(p.local), &p.peer, &list(p.remote))?
            .wait()
            .await;
        assert_eq!(
            err.map_err(|e| e.kind()).err(),
            Some("remote_disconnected"),
            "{backend:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_moves_blocks_between_its_own_memory_and_a_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let agent = Agent::new(AgentOptions::new("tiers", compat()))?;
    let host = agent.register_host(8 * BLOCK)?;
    let path = dir.path().join("disk.bin");
    let disk = agent.register_file(&path, 8 * BLOCK)?;
    assert_eq!(agent.metadata().region(disk).map(|r| r.kind), Some(MemKind::File));
    let bytes = pattern(2 * BLOCK, 5);
    agent.write_local(
        Desc {
            region: host,
            offset: 0,
            len: 2 * BLOCK,
        },
        &bytes,
    )?;
    let me = agent.local_peer();
    let post = Post::write(1).without_notification();
    agent
        .post(
            post,
            &DescList::blocks(host, BLOCK, [0, 1]),
            &me,
            &DescList::blocks(disk, BLOCK, [6, 7]),
        )?
        .wait()
        .await?;
    drop(agent);
    // The file keeps the blocks for the next agent: a disk tier survives a restart.
    let agent = Agent::new(AgentOptions::new("tiers", compat()))?;
    let disk = agent.register_file(&path, 8 * BLOCK)?;
    let mut got = vec![0u8; (2 * BLOCK) as usize];
    agent.read_local(
        Desc {
            region: disk,
            offset: 6 * BLOCK,
            len: 2 * BLOCK,
        },
        &mut got,
    )?;
    assert_eq!(got, bytes);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_region_larger_than_its_file_system_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let agent = Agent::new(options("big", Backend::SharedMemory, dir.path()))?;
    let err = agent
        .register_shared(u64::MAX / 2)
        .err()
        .context("an impossible region was registered")?;
    assert_eq!(err.kind(), "out_of_bounds", "{err}");
    assert!(err.to_string().contains("does not fit"), "{err}");
    Ok(())
}
