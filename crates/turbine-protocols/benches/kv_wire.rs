//! What a KV event message costs to encode and decode, binary against JSON: a busy
//! worker's step (eight sequences each filling a block) and a long prompt's prefill (one
//! event storing 512 blocks).
//!
//! `cargo bench -p turbine-protocols --bench kv_wire`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use turbine_protocols::kv::{KvEvent, KvEventData, KvEventMessage, StorageTier, StoredBlock};

fn message(events: usize, blocks: usize) -> KvEventMessage {
    let mut h = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        h = h.rotate_left(17).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h
    };
    KvEventMessage {
        worker: next(),
        events: (0..events as u64)
            .map(|event_id| KvEvent {
                event_id,
                data: KvEventData::Stored {
                    parent_hash: Some(next()),
                    blocks: (0..blocks)
                        .map(|_| StoredBlock {
                            sequence_hash: next(),
                            local_hash: next(),
                        })
                        .collect(),
                    tier: StorageTier::Device,
                },
            })
            .collect(),
    }
}

fn codecs(c: &mut Criterion) {
    let mut g = c.benchmark_group("kv_wire");
    for (name, events, blocks) in [("step_8x1", 8, 1), ("prefill_1x512", 1, 512)] {
        let m = message(events, blocks);
        let binary = m.to_bytes();
        let json = serde_json::to_vec(&m).expect("serializable");
        g.throughput(Throughput::Elements((events * blocks) as u64));
        println!("{name}: {} bytes binary, {} bytes JSON", binary.len(), json.len());
        g.bench_with_input(BenchmarkId::new("encode_binary", name), &m, |b, m| {
            b.iter(|| m.to_bytes())
        });
        g.bench_with_input(BenchmarkId::new("encode_json", name), &m, |b, m| {
            b.iter(|| serde_json::to_vec(m).expect("serializable"))
        });
        g.bench_with_input(BenchmarkId::new("decode_binary", name), &binary, |b, bytes| {
            b.iter(|| KvEventMessage::decode(bytes).expect("valid"))
        });
        g.bench_with_input(BenchmarkId::new("decode_json", name), &json, |b, bytes| {
            b.iter(|| serde_json::from_slice::<KvEventMessage>(bytes).expect("valid"))
        });
    }
    g.finish();
}

criterion_group!(benches, codecs);
criterion_main!(benches);
