//! Onboard bandwidth against its baselines, on blocks shaped like SmolLM2-135M's at f32
//! (30 layers of keys and values, 16 tokens of 3 heads of 64: 60 pieces of 12 KiB, 720 KiB a
//! block): host tier to pool against a plain copy of the same bytes into the same pieces, and
//! disk tier to pool against reading the same bytes from a file directly, one read per block
//! (both through the page cache, the file freshly written). Medians of seven runs. A disk
//! load runs on the copier's thread: the engine's thread only scatters the chunks it hands
//! back, and the last row says how much of the load's time that takes.
//!
//!   cargo run --release -p turbine-kvbm --example onboard_bandwidth [BLOCKS]

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use turbine_kvbm::{BlockBytes, BlockMeta, Kvbm, KvbmConfig, Loading, PoolShape, TierSize};
use turbine_tokens::block_hashes;

const PIECES: usize = 60;
const PIECE: usize = 16 * 3 * 64 * 4;

struct Pool(Vec<Vec<Vec<u8>>>);

impl BlockBytes for Pool {
    fn pieces(&self, block: u32) -> Option<Vec<&[u8]>> {
        Some(self.0.get(block as usize)?.iter().map(|p| p.as_slice()).collect())
    }

    fn pieces_mut(&mut self, block: u32) -> Option<Vec<&mut [u8]>> {
        Some(
            self.0
                .get_mut(block as usize)?
                .iter_mut()
                .map(|p| p.as_mut_slice())
                .collect(),
        )
    }
}

fn pool(blocks: usize, fill: u8) -> Pool {
    Pool(
        (0..blocks)
            .map(|b| (0..PIECES).map(|p| vec![fill ^ (b as u8) ^ (p as u8); PIECE]).collect())
            .collect(),
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn gbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn main() -> anyhow::Result<()> {
    let blocks: usize = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let block_bytes = PIECES * PIECE;
    let total = blocks * block_bytes;
    let tokens: Vec<u32> = (0..(blocks * 16) as u32).collect();
    let hashes = block_hashes(&tokens, 16);
    let metas: Vec<(u32, BlockMeta)> = hashes
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let parent = i.checked_sub(1).map(|p| hashes[p].sequence);
            (i as u32, BlockMeta { hash: *h, parent })
        })
        .collect();
    let source = pool(blocks, 0x5a);
    let ids: Vec<u32> = (0..blocks as u32).collect();
    let shape = PoolShape {
        block_bytes,
        blocks,
        compat: 1,
        simulated: false,
    };
    let dir = tempfile::tempdir()?;
    let tiers = |host: bool| KvbmConfig {
        host: TierSize {
            bytes: None,
            blocks: host.then_some(blocks),
        },
        disk: TierSize {
            bytes: None,
            blocks: (!host).then_some(blocks),
        },
        disk_dir: (!host).then(|| dir.path().to_owned()),
        disk_after_sightings: 1,
        queue_blocks: blocks,
        max_in_flight: blocks,
        ..KvbmConfig::default()
    };

    let mut host = Kvbm::new(tiers(true), shape, 16)?;
    host.registered(metas.clone());
    host.drain(&source, &|_, _| true);
    let mut disk = Kvbm::new(tiers(false), shape, 16)?;
    disk.registered(metas.clone());
    disk.drain(&source, &|_, _| true);
    anyhow::ensure!(host.held(&hashes, None) == blocks && disk.held(&hashes, None) == blocks);

    // The baselines' sources: the same bytes contiguous in memory, and in a plain file.
    let flat: Vec<u8> = (0..blocks)
        .flat_map(|b| source.pieces(b as u32).unwrap_or_default().concat())
        .collect();
    let file_path = dir.path().join("plain.bin");
    std::fs::write(&file_path, &flat)?;
    let file = std::fs::File::open(&file_path)?;

    let mut dest = pool(blocks, 0);
    let mut flat_dest = vec![1u8; total];
    let (mut memcpy, mut h2d, mut pread, mut d2d) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut busy = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        for (b, block) in dest.0.iter_mut().enumerate() {
            for (p, piece) in block.iter_mut().enumerate() {
                let at = b * block_bytes + p * PIECE;
                piece.copy_from_slice(&flat[at..at + PIECE]);
            }
        }
        memcpy.push(t.elapsed().as_secs_f64());

        let t = Instant::now();
        anyhow::ensure!(host.load(&hashes, &ids, &mut dest) == blocks);
        h2d.push(t.elapsed().as_secs_f64());

        // One read per block into memory as large as the pool: the file's bytes at their
        // fastest, without even the scatter into pieces that the tier does.
        let t = Instant::now();
        for (b, chunk) in flat_dest.chunks_exact_mut(block_bytes).enumerate() {
            file.read_exact_at(chunk, (b * block_bytes) as u64)?;
        }
        pread.push(t.elapsed().as_secs_f64());

        // As an engine's loop drives it: started, then collected between (here idle)
        // steps; the time inside the calls is what the engine's thread spends.
        let t = Instant::now();
        let mut inside = start_timed(&mut disk, &hashes, &ids, &mut dest)?;
        let loaded = loop {
            let c = Instant::now();
            let done = disk.finish(&mut dest, Duration::ZERO);
            inside += c.elapsed();
            if let Some(&(_, n)) = done.first() {
                break n;
            }
            std::thread::sleep(Duration::from_micros(50));
        };
        anyhow::ensure!(loaded == blocks);
        d2d.push(t.elapsed().as_secs_f64());
        busy.push(inside.as_secs_f64());
    }
    anyhow::ensure!(dest.0 == source.0, "loaded bytes differ from the source");
    let (memcpy, h2d, pread, d2d, busy) = (median(memcpy), median(h2d), median(pread), median(d2d), median(busy));
    println!("{blocks} blocks of {} KiB ({} MiB)", block_bytes >> 10, total >> 20);
    println!("| path | GB/s | baseline | baseline GB/s | ratio |");
    println!("|---|---|---|---|---|");
    println!(
        "| host to pool (G2 to G1) | {:.2} | memcpy | {:.2} | {:.2} |",
        gbps(total, h2d),
        gbps(total, memcpy),
        memcpy / h2d
    );
    println!(
        "| disk to pool (G3 to G1) | {:.2} | pread of a plain file | {:.2} | {:.2} |",
        gbps(total, d2d),
        gbps(total, pread),
        pread / d2d
    );
    println!(
        "| disk to pool: the engine's thread | {:.0}% of the load's time ({:.1} of {:.1} ms) | | | |",
        100.0 * busy / d2d,
        busy * 1e3,
        d2d * 1e3
    );
    Ok(())
}

/// Starts a load, returning the time the call took.
fn start_timed(
    kvbm: &mut Kvbm,
    hashes: &[turbine_tokens::BlockHash],
    ids: &[u32],
    pool: &mut Pool,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let started = kvbm.start_load(1, hashes, ids, pool, Duration::ZERO);
    anyhow::ensure!(started == Loading::Pending, "a disk load runs on the copier");
    Ok(t.elapsed())
}
