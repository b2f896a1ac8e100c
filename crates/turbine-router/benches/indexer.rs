//! The KV indexer on the state of a large deployment: 64 workers each holding 100,000
//! blocks, from 512-block sequences whose leading blocks come from 2,000 shared prefix
//! families (random shared length, random tail), stored as events of 16 blocks.
//!
//! `cargo bench -p turbine-router --bench indexer`
//!
//! Criterion measures ingestion and matching; p50/p99 of `find_matches`, the cost of a
//! whole routing decision for an 8,192-token prompt, memory per stored block, and ingestion
//! by the thread's CPU time (which the load of a shared machine inflates far less than wall
//! time) are printed first, from direct timings.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use turbine_protocols::kv::{KvEvent, KvEventData, StorageTier, StoredBlock};
use turbine_router::indexer::KvIndexer;
use turbine_router::selector::{select, Load, SelectorConfig};

const WORKERS: u64 = 64;
const BLOCKS_PER_WORKER: usize = 100_000;
const SEQ_BLOCKS: usize = 512;
const FAMILIES: usize = 2_000;
const EVENT_BLOCKS: usize = 16;

struct Workload {
    families: Vec<Vec<u64>>,
}

impl Workload {
    fn new(rng: &mut StdRng) -> Self {
        Self {
            families: (0..FAMILIES)
                .map(|_| (0..SEQ_BLOCKS).map(|_| rng.gen()).collect())
                .collect(),
        }
    }

    /// A 512-block sequence: a random-length prefix of a random family, then a random tail.
    fn sequence(&self, rng: &mut StdRng) -> Vec<u64> {
        let family = &self.families[rng.gen_range(0..FAMILIES)];
        let shared = rng.gen_range(0..=SEQ_BLOCKS);
        family[..shared]
            .iter()
            .copied()
            .chain((shared..SEQ_BLOCKS).map(|_| rng.gen()))
            .collect()
    }
}

/// Every worker's events, each worker storing sequences until it holds 100,000 blocks.
fn events(w: &Workload, rng: &mut StdRng) -> (Vec<(u64, KvEvent)>, usize) {
    let mut out = Vec::new();
    let mut blocks = 0;
    for worker in 0..WORKERS {
        let mut held = std::collections::HashSet::new();
        let mut id = 0;
        while held.len() < BLOCKS_PER_WORKER {
            let seq = w.sequence(rng);
            for (i, chunk) in seq.chunks(EVENT_BLOCKS).enumerate() {
                let parent_hash = (i > 0).then(|| seq[i * EVENT_BLOCKS - 1]);
                let stored = chunk
                    .iter()
                    .map(|&h| StoredBlock {
                        sequence_hash: h,
                        local_hash: h,
                    })
                    .collect();
                out.push((
                    worker,
                    KvEvent {
                        event_id: id,
                        data: KvEventData::Stored {
                            parent_hash,
                            blocks: stored,
                            tier: StorageTier::Device,
                        },
                    },
                ));
                id += 1;
                blocks += chunk.len();
                held.extend(chunk.iter().copied());
            }
        }
    }
    (out, blocks)
}

fn ingest(events: &[(u64, KvEvent)]) -> KvIndexer {
    let mut ix = KvIndexer::new();
    for (w, e) in events {
        ix.apply(*w, e).expect("64 workers fit");
    }
    ix
}

/// The CPU time this thread has run, where Linux tells it.
fn thread_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns = stat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn bench(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(42);
    let workload = Workload::new(&mut rng);
    let (events, blocks) = events(&workload, &mut rng);
    let ix = ingest(&events);
    let queries: Vec<Vec<u64>> = (0..10_000).map(|_| workload.sequence(&mut rng)).collect();

    // One pass to warm caches and page in the table, as a running router would have.
    for q in &queries {
        std::hint::black_box(ix.find_matches(q));
    }
    let mut times: Vec<Duration> = queries
        .iter()
        .map(|q| {
            let t = Instant::now();
            std::hint::black_box(ix.find_matches(q));
            t.elapsed()
        })
        .collect();
    times.sort();
    let loads: Vec<(u64, Load)> = (0..WORKERS).map(|w| (w, Load::default())).collect();
    let prompt: Vec<u32> = (0..8192).map(|_| rng.gen_range(0..32000)).collect();
    let config = SelectorConfig::default();
    let mut decision: Vec<Duration> = (0..2000)
        .map(|_| {
            let t = Instant::now();
            let hashes: Vec<u64> = turbine_tokens::block_hashes(&prompt, 16)
                .iter()
                .map(|b| b.sequence)
                .collect();
            let overlaps = ix.find_matches(&hashes);
            std::hint::black_box(select(&config, prompt.len(), &overlaps, &loads, &mut rng));
            t.elapsed()
        })
        .collect();
    decision.sort();
    let mut cpu: Vec<Duration> = (0..5)
        .filter_map(|_| {
            let start = thread_cpu()?;
            std::hint::black_box(ingest(&events));
            Some(thread_cpu()? - start)
        })
        .collect();
    cpu.sort();
    println!(
        "indexer state: {WORKERS} workers, {} stored (worker, block) pairs, {} distinct blocks",
        ix.stored_pairs(),
        ix.num_blocks()
    );
    println!(
        "memory: {:.1} MiB, {:.1} bytes per stored block, {:.1} per distinct block",
        ix.memory_bytes() as f64 / (1 << 20) as f64,
        ix.memory_bytes() as f64 / ix.stored_pairs() as f64,
        ix.memory_bytes() as f64 / ix.num_blocks() as f64
    );
    println!(
        "find_matches over 10,000 queries of 512 blocks: p50 {:?}, p99 {:?}",
        percentile(&times, 0.5),
        percentile(&times, 0.99)
    );
    println!(
        "routing decision for an 8,192-token prompt (hash 512 blocks, match, score 64 workers): p50 {:?}, p99 {:?}",
        percentile(&decision, 0.5),
        percentile(&decision, 0.99)
    );
    if let Some(median) = cpu.get(cpu.len() / 2) {
        println!(
            "ingestion by thread CPU time, median of {}: {:.2} M blocks/s ({blocks} blocks in {median:?})",
            cpu.len(),
            blocks as f64 / median.as_secs_f64() / 1e6
        );
    }

    let mut g = c.benchmark_group("indexer");
    g.sample_size(10);
    g.throughput(Throughput::Elements(blocks as u64));
    g.bench_function("ingest_64x100k_blocks", |b| b.iter(|| ingest(&events)));
    g.throughput(Throughput::Elements(1));
    g.sample_size(50);
    let mut i = 0;
    g.bench_function("find_matches_512_blocks", |b| {
        b.iter_batched(
            || {
                i = (i + 1) % queries.len();
                &queries[i]
            },
            |q| ix.find_matches(q),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
