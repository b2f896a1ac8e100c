//! The block manager through its public API, over a pool of plain byte blocks: offload and
//! onboard copy the bytes exactly, tiers evict and announce it, the disk tier survives a
//! restart and refuses a file of another model, and each skip rule is counted.

use anyhow::{Context, Result};
use std::time::Duration;

use turbine_kvbm::{
    BlockBytes, BlockMeta, Kvbm, KvbmConfig, Loading, OffloadMode, Path, PoolShape, PrefetchPolicy, Skip, TierEvent,
    TierKind, TierSize,
};
use turbine_tokens::{block_hashes, BlockHash};

const BLOCK: usize = 4;

/// A pool of `n` blocks of `bytes` bytes each, kept as two pieces per block (as an engine
/// keeps keys and values apart).
struct Pool {
    blocks: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Pool {
    fn new(n: usize, bytes: usize) -> Self {
        Self {
            blocks: (0..n)
                .map(|_| (vec![0; bytes / 2], vec![0; bytes - bytes / 2]))
                .collect(),
        }
    }

    fn fill(&mut self, block: u32, seed: u8) {
        let (k, v) = &mut self.blocks[block as usize];
        for (i, b) in k.iter_mut().chain(v.iter_mut()).enumerate() {
            *b = seed.wrapping_mul(31).wrapping_add(i as u8);
        }
    }

    fn bytes(&self, block: u32) -> Vec<u8> {
        let (k, v) = &self.blocks[block as usize];
        [k.as_slice(), v.as_slice()].concat()
    }
}

impl BlockBytes for Pool {
    fn pieces(&self, block: u32) -> Option<Vec<&[u8]>> {
        let (k, v) = self.blocks.get(block as usize)?;
        Some(vec![k, v])
    }

    fn pieces_mut(&mut self, block: u32) -> Option<Vec<&mut [u8]>> {
        let (k, v) = self.blocks.get_mut(block as usize)?;
        Some(vec![k, v])
    }
}

const BYTES: usize = 1000;

fn shape(blocks: usize) -> PoolShape {
    PoolShape {
        block_bytes: BYTES,
        blocks,
        compat: 42,
        simulated: false,
    }
}

fn blocks(n: usize) -> TierSize {
    TierSize {
        bytes: None,
        blocks: Some(n),
    }
}

/// The hashes of a sequence of `n` blocks, distinct per `seed`.
fn sequence(seed: u32, n: usize) -> Vec<BlockHash> {
    let tokens: Vec<u32> = (0..(n * BLOCK) as u32).map(|i| seed * 100_000 + i).collect();
    block_hashes(&tokens, BLOCK)
}

fn metas(hashes: &[BlockHash]) -> Vec<BlockMeta> {
    hashes
        .iter()
        .enumerate()
        .map(|(i, h)| BlockMeta {
            hash: *h,
            parent: i.checked_sub(1).map(|p| hashes[p].sequence),
        })
        .collect()
}

/// Offers the sequence's blocks, held in pool blocks `first..`, and runs the copies.
fn offload(kvbm: &mut Kvbm, pool: &Pool, hashes: &[BlockHash], first: u32) {
    let jobs: Vec<(u32, BlockMeta)> = metas(hashes)
        .into_iter()
        .enumerate()
        .map(|(i, m)| (first + i as u32, m))
        .collect();
    kvbm.registered(jobs);
    kvbm.drain(pool, &|_, _| true);
}

#[test]
fn offloaded_blocks_load_back_byte_for_byte_and_are_announced() -> Result<()> {
    let config = KvbmConfig {
        host: blocks(8),
        ..KvbmConfig::default()
    };
    let mut kvbm = Kvbm::new(config, shape(4), BLOCK)?;
    let mut pool = Pool::new(4, BYTES);
    let seq = sequence(1, 3);
    for b in 0..3 {
        pool.fill(b, b as u8 + 1);
    }
    offload(&mut kvbm, &pool, &seq, 0);
    let stored: Vec<TierEvent> = kvbm.take_events();
    assert_eq!(stored.len(), 3);
    assert!(stored.iter().all(|e| matches!(
        e,
        TierEvent::Stored {
            tier: TierKind::Host,
            ..
        }
    )));
    assert_eq!(kvbm.stats().blocks(Path::OffloadD2h), 3);

    // Another pool (the same one after eviction) gets the exact bytes back.
    let mut other = Pool::new(4, BYTES);
    assert_eq!(kvbm.held(&seq, None), 3);
    assert_eq!(kvbm.load(&seq, &[3, 1, 0], &mut other), 3);
    for (src, dst) in [(0, 3), (1, 1), (2, 0)] {
        assert_eq!(other.bytes(dst), pool.bytes(src));
    }
    assert_eq!(kvbm.stats().blocks(Path::OnboardH2d), 3);
    assert_eq!(kvbm.stats().hits(TierKind::Host), 3);
    assert_eq!(
        kvbm.stats().matched_tokens.load(std::sync::atomic::Ordering::Relaxed),
        12
    );
    // A prefix held only in part loads that part.
    let mut longer = seq.clone();
    longer.extend(sequence(2, 1));
    assert_eq!(kvbm.held(&longer, None), 3);
    assert_eq!(kvbm.held(&sequence(3, 2), None), 0);
    kvbm.check();
    Ok(())
}

#[test]
fn a_full_tier_evicts_by_its_policy_and_says_so() -> Result<()> {
    let config = KvbmConfig {
        host: blocks(4),
        ..KvbmConfig::default()
    };
    let mut kvbm = Kvbm::new(config, shape(4), BLOCK)?;
    let pool = Pool::new(8, BYTES);
    let a = sequence(1, 2);
    let b = sequence(2, 2);
    offload(&mut kvbm, &pool, &a, 0);
    offload(&mut kvbm, &pool, &b, 2);
    // `a` used again: `b` is now the least recently used.
    let mut sink = Pool::new(8, BYTES);
    assert_eq!(kvbm.load(&a, &[0, 1], &mut sink), 2);
    kvbm.take_events();
    let c = sequence(3, 2);
    offload(&mut kvbm, &pool, &c, 4);
    let removed: Vec<u64> = kvbm
        .take_events()
        .into_iter()
        .filter_map(|e| match e {
            TierEvent::Removed {
                tier: TierKind::Host,
                key,
            } => Some(key),
            _ => None,
        })
        .collect();
    let mut expected: Vec<u64> = b.iter().map(|h| h.sequence).collect();
    let mut got = removed.clone();
    expected.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, expected);
    assert_eq!(kvbm.stats().evictions(TierKind::Host), 2);
    assert_eq!(kvbm.held(&a, None), 2);
    assert_eq!(kvbm.held(&b, None), 0);
    kvbm.check();
    Ok(())
}

#[test]
fn skips_are_counted_by_reason() -> Result<()> {
    let config = KvbmConfig {
        host: blocks(4),
        queue_blocks: 3,
        ..KvbmConfig::default()
    };
    let mut kvbm = Kvbm::new(config, shape(4), BLOCK)?;
    let pool = Pool::new(8, BYTES);
    let a = sequence(1, 2);
    kvbm.registered(metas(&a).into_iter().enumerate().map(|(i, m)| (i as u32, m)));
    // The pool reused block 1 before the copy ran.
    kvbm.drain(&pool, &|block, _| block != 1);
    assert_eq!(kvbm.stats().skips(Skip::SourceGone), 1);
    assert_eq!(kvbm.held(&a, None), 1);
    // Offered again: present, not copied twice.
    offload(&mut kvbm, &pool, &a[..1], 0);
    assert_eq!(kvbm.stats().skips(Skip::Present), 1);
    assert_eq!(kvbm.stats().blocks(Path::OffloadD2h), 1);
    // A queue of three drops the fourth offer.
    let b = sequence(2, 4);
    kvbm.registered(metas(&b).into_iter().enumerate().map(|(i, m)| (i as u32, m)));
    assert_eq!(kvbm.stats().skips(Skip::QueueFull), 1);
    assert_eq!(kvbm.pending(), 3);
    kvbm.check();
    Ok(())
}

#[test]
fn bandwidth_limits_hold_copies_back_until_credit_returns() -> Result<()> {
    // 10 blocks a second, with a burst of one block.
    let config = KvbmConfig {
        host: blocks(16),
        host_bytes_per_sec: Some(10.0 * BYTES as f64),
        ..KvbmConfig::default()
    };
    let mut kvbm = Kvbm::new(config, shape(4), BLOCK)?;
    let pool = Pool::new(8, BYTES);
    kvbm.registered(
        metas(&sequence(1, 4))
            .into_iter()
            .enumerate()
            .map(|(i, m)| (i as u32, m)),
    );
    kvbm.drain(&pool, &|_, _| true);
    assert_eq!(kvbm.stats().blocks(Path::OffloadD2h), 1, "one burst's worth");
    assert_eq!(kvbm.pending(), 3);
    std::thread::sleep(std::time::Duration::from_millis(250));
    kvbm.drain(&pool, &|_, _| true);
    assert_eq!(
        kvbm.stats().blocks(Path::OffloadD2h),
        2,
        "credit refills to one burst only"
    );
    Ok(())
}

#[test]
fn write_back_copies_on_eviction_only() -> Result<()> {
    let config = KvbmConfig {
        host: blocks(4),
        offload: OffloadMode::WriteBack,
        ..KvbmConfig::default()
    };
    let mut kvbm = Kvbm::new(config, shape(4), BLOCK)?;
    let mut pool = Pool::new(4, BYTES);
    pool.fill(2, 9);
    let a = sequence(1, 1);
    kvbm.registered(metas(&a).into_iter().map(|m| (2, m)));
    kvbm.drain(&pool, &|_, _| true);
    assert_eq!(kvbm.held(&a, None), 0, "registration copies nothing");
    kvbm.evicted(metas(&a).into_iter().map(|m| (2, m)), &pool);
    let mut other = Pool::new(4, BYTES);
    assert_eq!(kvbm.load(&a, &[0], &mut other), 1);
    assert_eq!(other.bytes(0), pool.bytes(2));
    Ok(())
}

#[test]
fn blocks_reach_disk_on_their_second_sighting_and_load_from_there() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = KvbmConfig {
        host: blocks(4),
        disk: blocks(16),
        disk_dir: Some(dir.path().to_owned()),
        ..KvbmConfig::default()
    };
    let mut kvbm = Kvbm::new(config, shape(4), BLOCK)?;
    let mut pool = Pool::new(8, BYTES);
    pool.fill(0, 7);
    let a = sequence(1, 1);
    offload(&mut kvbm, &pool, &a, 0);
    assert_eq!(kvbm.tier_of(a[0].sequence), Some(TierKind::Host));
    assert_eq!(kvbm.stats().blocks(Path::OffloadH2d), 0, "seen once: not on disk");
    // Seen again (matched by a request), it is queued for disk and written at the next drain.
    let mut sink = Pool::new(8, BYTES);
    kvbm.load(&a, &[5], &mut sink);
    kvbm.drain(&pool, &|_, _| true);
    assert_eq!(kvbm.stats().blocks(Path::OffloadH2d), 1);
    // Pushed out of host memory by four others, it loads from disk.
    for s in 2..6 {
        offload(&mut kvbm, &pool, &sequence(s, 1), 1);
    }
    assert_eq!(kvbm.tier_of(a[0].sequence), Some(TierKind::Disk));
    let mut other = Pool::new(8, BYTES);
    assert_eq!(kvbm.load(&a, &[3], &mut other), 1);
    assert_eq!(other.bytes(3), pool.bytes(0));
    assert_eq!(kvbm.stats().blocks(Path::OnboardD2d), 1);
    kvbm.check();
    Ok(())
}

#[test]
fn disk_only_counts_sightings_before_writing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = KvbmConfig {
        disk: blocks(8),
        disk_dir: Some(dir.path().to_owned()),
        ..KvbmConfig::default()
    };
    let mut kvbm = Kvbm::new(config, shape(4), BLOCK)?;
    let pool = Pool::new(4, BYTES);
    let a = sequence(1, 2);
    offload(&mut kvbm, &pool, &a, 0);
    assert_eq!(kvbm.stats().skips(Skip::Unseen), 2);
    assert_eq!(kvbm.held(&a, None), 0);
    offload(&mut kvbm, &pool, &a, 0);
    assert_eq!(kvbm.held(&a, None), 2);
    assert_eq!(kvbm.stats().blocks(Path::OffloadD2d), 2);
    Ok(())
}

#[test]
fn the_disk_tier_survives_a_restart_and_refuses_another_models_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = KvbmConfig {
        disk: blocks(8),
        disk_dir: Some(dir.path().to_owned()),
        disk_after_sightings: 1,
        ..KvbmConfig::default()
    };
    let mut pool = Pool::new(4, BYTES);
    let a = sequence(1, 3);
    for b in 0..3 {
        pool.fill(b, 40 + b as u8);
    }
    {
        let mut kvbm = Kvbm::new(config.clone(), shape(4), BLOCK)?;
        offload(&mut kvbm, &pool, &a, 0);
        assert_eq!(kvbm.held(&a, None), 3);
        // A second worker given the same directory is refused, not let in to clobber it.
        let err = Kvbm::new(config.clone(), shape(4), BLOCK).err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("in use by another worker")),
            "{err:?}"
        );
    }
    let mut reopened = Kvbm::new(config.clone(), shape(4), BLOCK)?;
    let announced: Vec<u64> = reopened
        .take_events()
        .into_iter()
        .filter_map(|e| match e {
            TierEvent::Stored {
                tier: TierKind::Disk,
                block,
            } => Some(block.hash.sequence),
            _ => None,
        })
        .collect();
    assert_eq!(announced.len(), 3);
    assert_eq!(reopened.held(&a, None), 3);
    let mut other = Pool::new(4, BYTES);
    assert_eq!(reopened.load(&a, &[2, 0, 1], &mut other), 3);
    for (src, dst) in [(0, 2), (1, 0), (2, 1)] {
        assert_eq!(other.bytes(dst), pool.bytes(src));
    }
    reopened.check();
    drop(reopened);

    // Another model's engine (another compatibility hash) sees none of it.
    let foreign = Kvbm::new(config, PoolShape { compat: 43, ..shape(4) }, BLOCK)?;
    assert_eq!(foreign.held(&a, None), 0);
    Ok(())
}

#[test]
fn an_onboard_slower_than_recomputing_is_skipped() -> Result<()> {
    let config = KvbmConfig {
        host: blocks(8),
        ..KvbmConfig::default()
    };
    let mut kvbm = Kvbm::new(config, shape(4), BLOCK)?;
    let pool = Pool::new(4, BYTES);
    let a = sequence(1, 2);
    offload(&mut kvbm, &pool, &a, 0);
    let mut other = Pool::new(4, BYTES);
    kvbm.load(&a, &[0, 1], &mut other);
    let per_block = kvbm.stats().seconds(Path::OnboardH2d) / 2.0;
    assert!(per_block > 0.0);
    assert_eq!(kvbm.held(&a, Some(per_block * 100.0)), 2, "recomputing is slower");
    assert_eq!(kvbm.held(&a, Some(per_block / 1e6)), 0, "recomputing is faster");
    assert_eq!(
        kvbm.stats()
            .onboard_skipped_slower
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    Ok(())
}

#[test]
fn a_host_tier_smaller_than_the_pool_is_refused() {
    let config = KvbmConfig {
        host: TierSize {
            bytes: Some(3 * BYTES as u64),
            blocks: None,
        },
        ..KvbmConfig::default()
    };
    let err = Kvbm::new(config, shape(4), BLOCK).err().context("accepted");
    let msg = err.map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("churn"), "{msg}");
}

/// Finishes copies until `tag`'s load is reported, or gives up after a few seconds.
fn finish_load(kvbm: &mut Kvbm, pool: &mut Pool, tag: u64) -> Option<usize> {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < until {
        if let Some(&(_, n)) = kvbm.finish(pool, Duration::ZERO).iter().find(|(t, _)| *t == tag) {
            return Some(n);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

/// Waits for every copy in flight to end.
fn settle(kvbm: &mut Kvbm, pool: &mut Pool) {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while kvbm.in_flight() > 0 && std::time::Instant::now() < until {
        let _ = kvbm.finish(pool, Duration::ZERO);
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A tier of 4 host blocks and a disk: a sequence of 8 blocks ends up on disk with only
/// its last 4 in host memory.
fn on_disk(prefetch: PrefetchPolicy) -> Result<(Kvbm, Pool, Vec<BlockHash>, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let config = KvbmConfig {
        host: blocks(4),
        disk: blocks(16),
        disk_dir: Some(dir.path().to_owned()),
        disk_after_sightings: 1,
        prefetch,
        ..KvbmConfig::default()
    };
    let mut kvbm = Kvbm::new(config, shape(4), BLOCK)?;
    let mut pool = Pool::new(8, BYTES);
    let seq = sequence(5, 8);
    for b in 0..8 {
        pool.fill(b, b as u8 + 7);
    }
    // Two at a time, as steps would register them: each reaches disk before host memory
    // evicts it.
    for i in (0..8).step_by(2) {
        offload(&mut kvbm, &pool, &seq[i..i + 2], i as u32);
    }
    Ok((kvbm, pool, seq, dir))
}

#[test]
fn a_load_from_disk_runs_on_the_copier_and_lands_byte_for_byte() -> Result<()> {
    let (mut kvbm, pool, seq, _dir) = on_disk(PrefetchPolicy::Off)?;
    assert_eq!(kvbm.tier_of(seq[0].sequence), Some(TierKind::Disk));
    let mut other = Pool::new(8, BYTES);
    assert_eq!(kvbm.held(&seq, None), 8);
    let dest: Vec<u32> = (0..8).rev().collect();
    assert_eq!(
        kvbm.start_load(1, &seq, &dest, &mut other, Duration::ZERO),
        Loading::Pending
    );
    // The source slots are leased while the copy runs, and that is no leak.
    kvbm.audit().map_err(anyhow::Error::msg)?;
    assert_eq!(finish_load(&mut kvbm, &mut other, 1), Some(8));
    for (i, &d) in dest.iter().enumerate() {
        assert_eq!(other.bytes(d), pool.bytes(i as u32), "block {i}");
    }
    // The first four from disk; the last four, still in host memory, came with them.
    assert_eq!(kvbm.stats().blocks(Path::OnboardD2d), 4);
    assert_eq!(kvbm.stats().blocks(Path::OnboardH2d), 4);
    assert_eq!(kvbm.in_flight(), 0);
    kvbm.check();
    Ok(())
}

#[test]
fn prefetch_brings_disk_blocks_up_and_admission_waits_as_its_policy_says() -> Result<()> {
    for policy in [
        PrefetchPolicy::WaitComplete,
        PrefetchPolicy::BestEffort,
        PrefetchPolicy::Timeout(Duration::from_millis(50)),
    ] {
        let (mut kvbm, mut pool, seq, _dir) = on_disk(policy)?;
        let original: Vec<Vec<u8>> = (0..2).map(|b| pool.bytes(b)).collect();
        // Only host blocks count with prefetching on: the first block is on disk.
        assert_eq!(kvbm.held(&seq, None), 0, "{policy:?}");
        // Three asked for; half the host tier (2) come up, so that a prefetch never
        // evicts its own first blocks.
        let want = &seq[..3];
        kvbm.prefetch(7, want, Duration::ZERO);
        assert!(kvbm.in_flight() > 0);
        let admissible = kvbm.admissible(7, want, Duration::from_millis(10));
        match policy {
            PrefetchPolicy::WaitComplete | PrefetchPolicy::Timeout(_) => assert!(!admissible, "{policy:?}"),
            _ => assert!(admissible, "{policy:?}"),
        }
        if let PrefetchPolicy::Timeout(t) = policy {
            assert!(kvbm.admissible(7, want, t), "the timeout lets it in");
        }
        settle(&mut kvbm, &mut pool);
        assert!(kvbm.admissible(7, want, Duration::ZERO));
        // Held for the waiting request: traffic through host memory does not evict them.
        for b in 0..4 {
            pool.fill(b, b as u8 + 50);
        }
        offload(&mut kvbm, &pool, &sequence(6, 4), 0);
        assert_eq!(kvbm.held(&seq, None), 2, "{policy:?}: held through churn");
        kvbm.check();
        kvbm.forget(7);
        assert_eq!(kvbm.stats().blocks(Path::Prefetch), 2, "{policy:?}");
        assert_eq!(kvbm.held(&seq, None), 2, "{policy:?}: now in host memory");
        let mut other = Pool::new(8, BYTES);
        assert_eq!(kvbm.load(want, &[5, 6, 7], &mut other), 2);
        for i in 0..2 {
            assert_eq!(other.bytes(5 + i), original[i as usize]);
        }
        assert_eq!(kvbm.stats().blocks(Path::OnboardD2d), 0);
        kvbm.check();
    }
    Ok(())
}

#[test]
fn a_disk_read_that_fails_loads_the_blocks_before_it_and_drops_the_bad_one() -> Result<()> {
    let (mut kvbm, pool, seq, dir) = on_disk(PrefetchPolicy::Off)?;
    // Cut the file short: slots past the cut read nothing.
    let file = std::fs::read_dir(dir.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "blocks"))
        .context("the disk tier's file")?;
    let len = std::fs::metadata(&file)?.len();
    let data_start = len - 16 * BYTES as u64;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)?
        .set_len(data_start + 2 * BYTES as u64)?;
    let mut other = Pool::new(8, BYTES);
    let dest: Vec<u32> = (0..8).collect();
    assert_eq!(
        kvbm.start_load(3, &seq[..4], &dest[..4], &mut other, Duration::ZERO),
        Loading::Pending
    );
    let loaded = finish_load(&mut kvbm, &mut other, 3).context("the load ends")?;
    assert!(loaded < 4, "a read past the end fails");
    for i in 0..loaded {
        assert_eq!(other.bytes(i as u32), pool.bytes(i as u32));
    }
    assert_eq!(
        kvbm.tier_of(seq[loaded].sequence),
        None,
        "the unreadable block is dropped"
    );
    assert_eq!(
        kvbm.stats().onboard_failed.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    kvbm.check();
    Ok(())
}
