//! Transfer bandwidth against its floors, between two processes on this host: shared memory
//! against a plain memcpy, TCP against a raw loopback socket; and pulling (READ, what a
//! decode worker does) against pushing (WRITE, the alternative) on each. Prints Markdown tables.
//!
//! `cargo run --release -p turbine-transfer --example bandwidth [-- --iters N]`

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use turbine_transfer::{Agent, AgentMetadata, AgentOptions, Backend, Compat, Desc, DescList, Peer, Post, RegionId};

const SIZES_MIB: [u64; 4] = [1, 4, 16, 64];
const MAX: u64 = 64 << 20;
const BLOCK: u64 = 64 << 10;

fn compat() -> Compat {
    Compat::new([("bench", "bandwidth")])
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// One transfer of `blocks` blocks between the start of `local` and of the peer's `remote`,
/// which must go over `backend`; its GB/s.
async fn timed(
    agent: &Agent,
    post: Post,
    (local, peer, remote): (RegionId, &Peer, RegionId),
    blocks: u32,
    backend: Backend,
) -> Result<f64> {
    let remote = DescList::blocks(remote, BLOCK, 0..blocks);
    let local = DescList::blocks(local, BLOCK, 0..blocks);
    let t = Instant::now();
    let done = agent.post(post, &local, peer, &remote)?.wait().await?;
    let secs = t.elapsed().as_secs_f64();
    if done.backend != backend {
        bail!("a transfer meant for {backend:?} went over {:?}", done.backend);
    }
    Ok(gbps(u64::from(blocks) * BLOCK, secs))
}

/// The peer process: a shared region and a host region of `MAX` bytes, and a raw socket
/// that answers a length with that many bytes.
fn peer() -> Result<()> {
    let mut options = AgentOptions::new("peer", compat());
    options.listen = Some("127.0.0.1:0".parse()?);
    let agent = Agent::new(options)?;
    let shared = agent.register_shared(MAX)?;
    let host = agent.register_host(MAX)?;
    let fill: Vec<u8> = (0..MAX).map(|i| i as u8).collect();
    agent.write_local(
        Desc {
            region: shared,
            offset: 0,
            len: MAX,
        },
        &fill,
    )?;
    agent.write_local(
        Desc {
            region: host,
            offset: 0,
            len: MAX,
        },
        &fill,
    )?;
    let raw = TcpListener::bind("127.0.0.1:0")?;
    let raw_addr = raw.local_addr()?;
    std::thread::spawn(move || {
        for stream in raw.incoming().flatten() {
            let fill = fill.clone();
            std::thread::spawn(move || serve_raw(stream, &fill));
        }
    });
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}",
        serde_json::to_string(&(agent.metadata(), raw_addr, shared.0, host.0))?
    )?;
    out.flush()?;
    // Lives until the parent closes our stdin.
    let mut sink = Vec::new();
    std::io::stdin().read_to_end(&mut sink)?;
    Ok(())
}

fn serve_raw(mut stream: TcpStream, fill: &[u8]) {
    let _ = stream.set_nodelay(true);
    let mut len = [0u8; 8];
    while stream.read_exact(&mut len).is_ok() {
        let n = u64::from_le_bytes(len) as usize;
        if stream.write_all(&fill[..n.min(fill.len())]).is_err() {
            return;
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--peer") {
        return peer();
    }
    let iters = match args.iter().position(|a| a == "--iters") {
        Some(i) => args
            .get(i + 1)
            .context("--iters needs a number")?
            .parse::<usize>()
            .context("--iters")?,
        None => 7,
    };
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--peer")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let (meta, raw_addr, shared, host): (AgentMetadata, std::net::SocketAddr, u32, u32) =
        serde_json::from_str(&line).context("the peer's metadata")?;

    let mut shm_options = AgentOptions::new("bench-shm", compat());
    shm_options.listen = Some("127.0.0.1:0".parse()?);
    let shm_agent = Agent::new(shm_options)?;
    let mut tcp_options = AgentOptions::new("bench-tcp", compat());
    tcp_options.listen = Some("127.0.0.1:0".parse()?);
    tcp_options.shared_memory = false;
    let tcp_agent = Agent::new(tcp_options)?;
    let shm_local = shm_agent.register_host(MAX)?;
    let tcp_local = tcp_agent.register_host(MAX)?;
    let shm_peer = shm_agent.connect(meta.clone()).await?;
    let tcp_peer = tcp_agent.connect(meta).await?;
    let mut raw = TcpStream::connect(raw_addr)?;
    raw.set_nodelay(true)?;

    let src = vec![7u8; MAX as usize];
    let mut dst = vec![0u8; MAX as usize];
    let mut raw_buf = vec![0u8; MAX as usize];
    println!(
        "| size | memcpy GB/s | shared memory READ GB/s | ratio | raw loopback socket GB/s | TCP READ GB/s | ratio |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut push_pull = Vec::new();
    for mib in SIZES_MIB {
        let len = mib << 20;
        let blocks = (len / BLOCK) as u32;
        let shm_path = (shm_local, &shm_peer, RegionId(shared));
        let tcp_path = (tcp_local, &tcp_peer, RegionId(host));
        // Each path runs its transfers back to back after one warm-up, as NIXL's script
        // does, so each finds the caches as its own traffic left them.
        let mut memcpy = Vec::new();
        for _ in 0..=iters {
            let t = Instant::now();
            dst[..len as usize].copy_from_slice(&src[..len as usize]);
            std::hint::black_box(&dst);
            memcpy.push(gbps(len, t.elapsed().as_secs_f64()));
        }
        let mut sock = Vec::new();
        for _ in 0..=iters {
            let t = Instant::now();
            raw.write_all(&len.to_le_bytes())?;
            raw.read_exact(&mut raw_buf[..len as usize])?;
            sock.push(gbps(len, t.elapsed().as_secs_f64()));
        }
        let (mut shm, mut tcp, mut shm_w, mut tcp_w) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (agent, post, path, backend, out) in [
            (&shm_agent, Post::read(1), shm_path, Backend::SharedMemory, &mut shm),
            (&tcp_agent, Post::read(2), tcp_path, Backend::Tcp, &mut tcp),
            (&shm_agent, Post::write(4), shm_path, Backend::SharedMemory, &mut shm_w),
            (&tcp_agent, Post::write(5), tcp_path, Backend::Tcp, &mut tcp_w),
        ] {
            for _ in 0..=iters {
                out.push(timed(agent, post, path, blocks, backend).await?);
            }
        }
        for v in [&mut memcpy, &mut sock, &mut shm, &mut tcp, &mut shm_w, &mut tcp_w] {
            v.remove(0);
        }
        push_pull.push((
            mib,
            median(shm.clone()),
            median(shm_w),
            median(tcp.clone()),
            median(tcp_w),
        ));
        let (m, s, r, t) = (median(memcpy), median(shm), median(sock), median(tcp));
        println!(
            "| {mib} MiB | {m:.2} | {s:.2} | {:.0}% | {r:.2} | {t:.2} | {:.0}% |",
            100.0 * s / m,
            100.0 * t / r
        );
    }
    println!();
    println!(
        "| size | shared memory READ (pull) GB/s | WRITE (push) GB/s | TCP READ (pull) GB/s | WRITE (push) GB/s |"
    );
    println!("|---|---|---|---|---|");
    for (mib, sr, sw, tr, tw) in push_pull {
        println!("| {mib} MiB | {sr:.2} | {sw:.2} | {tr:.2} | {tw:.2} |");
    }
    // Fixed cost per transfer: one 4 KiB block.
    let mut lat = Vec::new();
    for (agent, peer, local, region) in [
        (&shm_agent, &shm_peer, shm_local, shared),
        (&tcp_agent, &tcp_peer, tcp_local, host),
    ] {
        let mut us = Vec::new();
        for _ in 0..iters.max(50) {
            let remote = DescList::blocks(turbine_transfer::RegionId(region), 4096, [0]);
            let local = DescList::blocks(local, 4096, [0]);
            let t = Instant::now();
            agent.post(Post::read(3), &local, peer, &remote)?.wait().await?;
            us.push(t.elapsed().as_secs_f64() * 1e6);
        }
        lat.push(median(us));
    }
    println!();
    println!(
        "4 KiB READ latency, median: shared memory {:.0} us, TCP {:.0} us",
        lat[0], lat[1]
    );
    drop(child.stdin.take());
    child.wait()?;
    Ok(())
}
