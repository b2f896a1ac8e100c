//! The block manager through its public API, over a pool of plain byte blocks: offload and
//! onboard copy the bytes exactly, tiers evict and announce it, the disk tier survives a
//! restart and refuses a file of another model, and each skip rule is counted.

use anyhow::{Context, Result};
use turbine_kvbm::{
    BlockBytes, BlockMeta, Kvbm, KvbmConfig, OffloadMode, Path, PoolShape, Skip, TierEvent, TierKind, TierSize,
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
