//! Tests of the mocker: the scheduler stepped by hand, and the engine on paused time.

use std::time::Duration;

use futures::StreamExt;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;
use turbine_protocols::{FinishReason, PreprocessedRequest, StopConditions};

use super::scheduler::{token_source, Counted, Produced, Scheduler, SeqSpec, Step, Stored, TokenSource};
use super::{timing, MockerConfig, MockerEngine};
use crate::pool::EventReplica;
use crate::Engine;

fn config(num_blocks: usize, budget: usize, max_seqs: usize) -> MockerConfig {
    MockerConfig {
        block_size: 4,
        num_blocks,
        max_num_batched_tokens: budget,
        max_num_seqs: max_seqs,
        ..Default::default()
    }
}

fn spec(prompt_len: usize, max_tokens: u32, fill: u32) -> SeqSpec {
    SeqSpec {
        prompt: vec![fill; prompt_len],
        max_tokens,
        stop_token_ids: vec![],
    }
}

/// Steps until idle, checking limits and invariants every step; returns every step and
/// every token produced.
fn drive(s: &mut Scheduler<(), Counted>, replica: &mut EventReplica, max_steps: usize) -> (Vec<Step>, Vec<Produced>) {
    let (mut steps, mut produced) = (Vec::new(), Vec::new());
    while !s.is_idle() {
        assert!(steps.len() < max_steps, "not done after {max_steps} steps");
        let step = s.schedule();
        check_step(s, &step);
        s.complete(&step, |_, p| {
            produced.push(p);
            true
        });
        for e in s.take_events() {
            replica.apply(&e).expect("consistent events");
        }
        s.pool().check_invariants();
        steps.push(step);
    }
    (steps, produced)
}

fn check_step(s: &Scheduler<(), Counted>, step: &Step) {
    assert!(
        step.tokens() <= s.config_budget(),
        "token budget exceeded: {} tokens",
        step.tokens()
    );
    assert!(
        s.running() <= s.config_max_seqs(),
        "sequence cap exceeded: {}",
        s.running()
    );
    assert!(
        !step.is_empty() || s.is_idle() || !step.preempted.is_empty(),
        "a step with nothing to do while work remains"
    );
}

impl Scheduler<(), Counted> {
    fn config_budget(&self) -> usize {
        self.config().max_num_batched_tokens
    }
    fn config_max_seqs(&self) -> usize {
        self.config().max_num_seqs
    }
}

#[test]
fn long_prompt_is_chunked_by_the_token_budget() {
    let mut s = Scheduler::new(config(64, 64, 8));
    s.add(0, spec(150, 2, 1), ());
    let (steps, produced) = drive(&mut s, &mut EventReplica::default(), 100);
    let sizes: Vec<usize> = steps.iter().map(|s| s.tokens()).collect();
    assert_eq!(sizes, [64, 64, 22, 1], "three prefill chunks, then one decode");
    assert_eq!(steps[2].prefill_tokens, 22);
    assert_eq!(steps[3].decodes, 1);
    assert_eq!(produced.len(), 2);
    assert_eq!(produced[1].finish, Some(FinishReason::Length));
}

#[test]
fn sequence_cap_and_budget_hold_with_many_requests() {
    let mut s = Scheduler::new(config(512, 32, 3));
    for i in 0..20 {
        s.add(i, spec(10 + i as usize, 5, i as u32), ());
    }
    let (steps, produced) = drive(&mut s, &mut EventReplica::default(), 1000);
    assert!(
        steps.iter().any(|st| st.tokens() == 32),
        "the budget is used fully when work allows"
    );
    assert_eq!(produced.iter().filter(|p| p.finish.is_some()).count(), 20);
}

#[test]
fn preemption_under_memory_pressure_and_everyone_finishes() {
    // 12 blocks of 4 tokens; four sequences that each grow to 4 + 16 = 20 tokens (5 blocks).
    let mut s = Scheduler::new(config(12, 64, 8));
    for i in 0..4 {
        s.add(i, spec(4, 16, i as u32 + 1), ());
    }
    let (steps, produced) = drive(&mut s, &mut EventReplica::default(), 1000);
    assert!(
        steps.iter().any(|st| !st.preempted.is_empty()),
        "memory pressure forces preemption"
    );
    for i in 0..4 {
        let tokens = produced.iter().filter(|p| p.seq == i).count();
        assert_eq!(tokens, 16, "sequence {i} completes all its tokens despite preemption");
    }
    assert_eq!(s.pool().num_free(), 12);
}

#[test]
fn shared_prefix_is_served_from_cache() {
    let mut s = Scheduler::new(config(64, 64, 8));
    let mut replica = EventReplica::default();
    s.add(
        0,
        SeqSpec {
            prompt: (0..20).collect(),
            max_tokens: 1,
            stop_token_ids: vec![],
        },
        (),
    );
    let (_, first) = drive(&mut s, &mut replica, 10);
    assert_eq!(first[0].cached_tokens, Some(0));
    // Same 20-token prompt: 5 full blocks cached, but one token must be computed, so 4.
    s.add(
        1,
        SeqSpec {
            prompt: (0..20).collect(),
            max_tokens: 1,
            stop_token_ids: vec![],
        },
        (),
    );
    let (steps, second) = drive(&mut s, &mut replica, 10);
    assert_eq!(second[0].cached_tokens, Some(16));
    assert_eq!(steps[0].prefill_tokens, 4);
    assert_eq!(replica.registered, EventReplica::of(&s.snapshot()));
}

#[test]
fn blocks_of_generated_tokens_are_hashed_from_the_tokens_the_reader_sees() {
    // A 10-token prompt with 4-token blocks: generated tokens fill the block the prompt
    // left partial, then blocks of their own.
    let mut s = Scheduler::new(config(64, 64, 8));
    let mut replica = EventReplica::default();
    let prompt: Vec<u32> = (100..110).collect();
    s.add(
        0,
        SeqSpec {
            prompt: prompt.clone(),
            max_tokens: 15,
            stop_token_ids: vec![],
        },
        (),
    );
    let (_, produced) = drive(&mut s, &mut replica, 40);
    let mut tokens = prompt;
    tokens.extend(produced.iter().map(|p| p.token));
    // The last token is produced but never computed, so its block is not registered.
    let expected = turbine_tokens::block_hashes(&tokens[..tokens.len() - 1], 4);
    assert_eq!(expected.len(), 6);
    assert_eq!(
        replica.registered,
        expected.iter().map(|h| h.sequence).collect(),
        "every full block, prompt and generated, registered under its hash"
    );
}

#[test]
fn stored_and_counted_tokens_schedule_alike() {
    // An engine that computes the mocker's tokens and has them stored must see the same
    // steps, tokens and KV events as the mocker, whose tokens are only counted; and what
    // it is asked to compute after a preemption includes the tokens it generated.
    let cfg = config(12, 64, 8);
    let mut counted: Scheduler<(), Counted> = Scheduler::new(cfg.clone());
    let mut stored: Scheduler<u64, Stored> = Scheduler::new(cfg.clone());
    for i in 0..4 {
        counted.add(i, spec(5, 16, i as u32 + 1), ());
        stored.add(i, spec(5, 16, i as u32 + 1), 0);
    }
    let (mut a, mut b) = (EventReplica::default(), EventReplica::default());
    let mut preempted = 0;
    while !counted.is_idle() {
        let step = counted.schedule();
        assert_eq!(stored.schedule(), step);
        preempted += step.preempted.len();
        for entry in &step.entries {
            let input = stored.input(entry).expect("a live sequence");
            assert_eq!(input.tokens.len(), entry.2);
            assert!(input.blocks.len() * 4 >= input.start + entry.2);
        }
        let (mut from_counted, mut from_stored) = (Vec::new(), Vec::new());
        counted.complete(&step, |_, p| {
            from_counted.push(p);
            true
        });
        stored.complete_with(
            &step,
            |i, generated| {
                let token = token_source(&cfg, step.entries[i].1).token(*generated as u32);
                *generated += 1;
                token
            },
            |_, p| {
                from_stored.push(p);
                true
            },
        );
        assert_eq!(from_counted, from_stored);
        for e in counted.take_events() {
            a.apply(&e).expect("consistent events");
        }
        for e in stored.take_events() {
            b.apply(&e).expect("consistent events");
        }
        assert_eq!(a.registered, b.registered);
    }
    assert!(preempted > 0, "memory pressure forces preemption, and recomputation");
    assert!(stored.is_idle());
}

#[test]
fn tokens_are_those_of_a_sequential_splitmix64() {
    // A sequential SplitMix64, each output scaled into the vocabulary by multiply-high.
    let mut state: u64 = 42;
    let s = TokenSource::new(42, &(5..1005));
    for i in 0..100 {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        assert_eq!(s.token(i), 5 + ((u128::from(z) * 1000) >> 64) as u32);
    }
}

#[test]
fn tokens_cover_the_vocabulary_evenly() {
    let s = TokenSource::new(7, &(100..110));
    let mut counts = [0u32; 10];
    for i in 0..100_000 {
        let t = s.token(i);
        assert!((100..110).contains(&t), "token {t} outside the vocabulary");
        counts[(t - 100) as usize] += 1;
    }
    // 10,000 expected each; a binomial standard deviation is 95.
    assert!(counts.iter().all(|&c| (9_500..10_500).contains(&c)), "{counts:?}");
}

#[test]
fn stop_token_ends_a_sequence() {
    let mut s = Scheduler::new(MockerConfig {
        vocab: 0..1,
        ..config(64, 64, 8)
    });
    s.add(
        0,
        SeqSpec {
            prompt: vec![5; 3],
            max_tokens: 10,
            stop_token_ids: vec![0],
        },
        (),
    );
    let (_, produced) = drive(&mut s, &mut EventReplica::default(), 10);
    assert_eq!(produced.len(), 1);
    assert_eq!(produced[0].finish, Some(FinishReason::Stop));
}

#[test]
fn ten_thousand_requests_half_cancelled_leak_nothing() {
    let mut rng = StdRng::seed_from_u64(7);
    let mut s = Scheduler::new(config(256, 256, 32));
    let mut replica = EventReplica::default();
    let mut next = 0u64;
    let mut live: Vec<u64> = Vec::new();
    let mut steps = 0;
    while next < 10_000 || !s.is_idle() {
        // Arrivals, drawn from a few shared prefixes so the cache is exercised.
        for _ in 0..rng.gen_range(0..4) {
            if next < 10_000 {
                let prefix = rng.gen_range(0..8u32);
                let mut prompt = vec![prefix; rng.gen_range(1..40)];
                prompt.extend((0..rng.gen_range(0..8)).map(|_| rng.gen_range(0..100u32)));
                s.add(
                    next,
                    SeqSpec {
                        prompt,
                        max_tokens: rng.gen_range(1..24),
                        stop_token_ids: vec![],
                    },
                    (),
                );
                live.push(next);
                next += 1;
            }
        }
        // Half of all requests are cancelled at a random point of their life.
        if !live.is_empty() && rng.gen_bool(0.5) {
            let victim = live.swap_remove(rng.gen_range(0..live.len()));
            if victim % 2 == 0 {
                s.cancel(victim);
            }
        }
        let step = s.schedule();
        check_step(&s, &step);
        s.complete(&step, |_, p| {
            if p.finish.is_some() {
                live.retain(|&l| l != p.seq);
            }
            true
        });
        for e in s.take_events() {
            replica.apply(&e).expect("consistent events");
        }
        steps += 1;
        if steps % 100 == 0 {
            s.pool().check_invariants();
        }
    }
    s.pool().check_invariants();
    assert_eq!(s.pool().num_free(), 256, "every block is back in the pool");
    assert_eq!(replica.registered, EventReplica::of(&s.snapshot()));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any interleaving of arrivals, cancellations and steps keeps the limits, leaks no
    /// block, and the event stream replays to exactly the registered set.
    #[test]
    fn random_interleavings_keep_every_invariant(
        ops in proptest::collection::vec((0u8..4, 1usize..30, 1u32..12, 0u32..3), 1..200),
        num_blocks in 8usize..40,
    ) {
        let mut s = Scheduler::new(config(num_blocks, 16, 4));
        let mut replica = EventReplica::default();
        let mut next = 0u64;
        for (kind, len, max_tokens, fill) in ops {
            match kind {
                0 => {
                    s.add(next, spec(len, max_tokens, fill), ());
                    next += 1;
                }
                1 if next > 0 => {
                    s.cancel(len as u64 % next);
                }
                _ => {
                    let step = s.schedule();
                    check_step(&s, &step);
                    s.complete(&step, |_, _| true);
                }
            }
            for e in s.take_events() {
                prop_assert_eq!(replica.apply(&e), Ok(()));
            }
            s.pool().check_invariants();
        }
        drive(&mut s, &mut replica, 100_000);
        prop_assert_eq!(s.pool().num_free(), num_blocks);
        prop_assert_eq!(&replica.registered, &EventReplica::of(&s.snapshot()));
    }
}

fn request(len: usize, max_tokens: u32) -> PreprocessedRequest {
    PreprocessedRequest {
        request_id: "r".into(),
        model: "mock".into(),
        token_ids: (0..len as u32).collect(),
        stop: StopConditions {
            max_tokens: Some(max_tokens),
            stop_token_ids: vec![],
        },
        sampling: Default::default(),
        disagg: None,
    }
}

#[tokio::test(start_paused = true)]
async fn ttft_of_a_2000_token_prompt_follows_the_timing_model() {
    let engine = MockerEngine::start(MockerConfig::default()).expect("valid config");
    let start = tokio::time::Instant::now();
    let mut stream = engine
        .generate(request(2000, 3), CancellationToken::new())
        .expect("accepted");
    let first = stream.next().await.expect("a token").expect("no error");
    let ttft = start.elapsed().as_secs_f64() * 1000.0;
    let model = timing::prefill_ms(2000);
    assert!(
        (ttft - model).abs() / model < 0.05,
        "TTFT {ttft:.3} ms vs model {model:.3} ms"
    );
    assert_eq!(first.cached_tokens, Some(0));
    let rest: Vec<_> = stream.collect().await;
    assert_eq!(rest.len(), 2);
}

/// A runtime too busy to run the engine on time, here a clock that jumps 5 ms at a time
/// past steps of about a millisecond: the engine makes the lateness up with early steps,
/// so its simulated time keeps up with the clock.
#[tokio::test(start_paused = true)]
async fn an_engine_woken_late_makes_the_lateness_up() {
    let engine = MockerEngine::start(MockerConfig {
        speedup: 5.0,
        ..Default::default()
    })
    .expect("valid");
    let mut stream = engine
        .generate(request(16, 100_000), CancellationToken::new())
        .expect("accepted");
    stream.next().await.expect("first token").expect("no error");
    let reader = tokio::spawn(async move { while stream.next().await.is_some() {} });
    let (simulated, start) = (engine.simulated_time(), tokio::time::Instant::now());
    for _ in 0..40 {
        tokio::time::advance(Duration::from_millis(5)).await;
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }
    let kept = (engine.simulated_time() - simulated).as_secs_f64() / start.elapsed().as_secs_f64();
    assert!(kept > 0.95, "the engine kept {:.0}% of its schedule", kept * 100.0);
    // A stall longer than it makes up is dropped, not replayed as a burst of steps.
    let simulated = engine.simulated_time();
    tokio::time::advance(Duration::from_millis(50)).await;
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    let burst = engine.simulated_time() - simulated;
    assert!(
        burst < Duration::from_millis(5),
        "{burst:?} of steps ran at once after a stall"
    );
    reader.abort();
}

#[tokio::test(start_paused = true)]
async fn speedup_divides_time_and_seed_fixes_tokens() {
    let run = |speedup: f64| async move {
        let engine = MockerEngine::start(MockerConfig {
            speedup,
            seed: 42,
            ..Default::default()
        })
        .expect("valid");
        let start = tokio::time::Instant::now();
        let outputs: Vec<_> = engine
            .generate(request(100, 200), CancellationToken::new())
            .expect("ok")
            .collect()
            .await;
        let tokens: Vec<u32> = outputs.into_iter().flat_map(|o| o.expect("ok").token_ids).collect();
        (start.elapsed(), tokens)
    };
    let (slow, a) = run(1.0).await;
    let (fast, b) = run(10.0).await;
    assert_eq!(a, b, "same seed, same tokens");
    let ratio = slow.as_secs_f64() / fast.as_secs_f64();
    assert!((ratio - 10.0).abs() < 0.2, "speedup 10 runs {ratio:.2}x faster");
}

#[tokio::test(start_paused = true)]
async fn cancellation_frees_blocks_at_once_and_events_match_snapshot() {
    let engine = MockerEngine::start(MockerConfig {
        block_size: 16,
        ..Default::default()
    })
    .expect("valid");
    let kv = engine.kv_cache().expect("the mocker has a KV cache");
    let mut events = kv.subscribe();
    let mut load = kv.load();
    let cancel = CancellationToken::new();
    let mut stream = engine.generate(request(320, 10_000), cancel.clone()).expect("accepted");
    stream.next().await.expect("first token").expect("ok");
    assert!(load.borrow_and_update().blocks_in_use >= 20);

    cancel.cancel();
    let freed = tokio::time::timeout(Duration::from_millis(1), async {
        while load.borrow_and_update().blocks_in_use != 0 {
            load.changed().await.expect("engine alive");
        }
    })
    .await;
    assert!(
        freed.is_ok(),
        "blocks freed within the step, not after the request's end"
    );

    let snapshot = kv.snapshot().await.expect("snapshot");
    let mut replica = EventReplica::default();
    while let Ok(batch) = events.try_recv() {
        for e in &batch {
            replica.apply(e).expect("consistent");
        }
    }
    assert_eq!(replica.registered, EventReplica::of(&snapshot));
    assert_eq!(
        replica.registered.len(),
        20,
        "the 320-token prompt's 20 blocks stay cached"
    );
    assert_eq!(snapshot.last_event_id, Some(0), "one Stored event for the prompt");
}

#[test]
fn bad_settings_are_rejected_naming_the_value() {
    let bad = MockerConfig {
        max_num_seqs: 0,
        ..Default::default()
    };
    assert_eq!(
        bad.validate().map_err(|e| e.to_string()),
        Err("max_num_seqs must be at least 1, got 0".into())
    );
    let bad = MockerConfig {
        speedup: -1.0,
        ..Default::default()
    };
    assert!(bad.validate().is_err());
}

/// Tiers below the pool holding some blocks, recording what admission loads.
#[derive(Default)]
struct FakeTiers {
    held: std::collections::HashSet<u64>,
    loads: Vec<usize>,
    /// Loads fail after this many blocks, as a bad disk read would.
    fail_after: Option<usize>,
    /// Loads stay pending until `finish` lets them go, as a disk read would.
    pending: bool,
    started: Vec<(u64, usize)>,
    finish: Vec<(u64, usize)>,
    /// Sequences whose prefetch admission waits for.
    waiting_prefetch: std::collections::HashSet<u64>,
    arrivals: Vec<u64>,
}

impl super::scheduler::LowerTiers for FakeTiers {
    fn held(&mut self, hashes: &[turbine_tokens::BlockHash]) -> usize {
        hashes.iter().take_while(|h| self.held.contains(&h.sequence)).count()
    }

    fn load(
        &mut self,
        seq: u64,
        hashes: &[turbine_tokens::BlockHash],
        blocks: &[crate::pool::BlockId],
    ) -> turbine_kvbm::Loading {
        assert_eq!(hashes.len(), blocks.len());
        let n = self.fail_after.map_or(blocks.len(), |f| f.min(blocks.len()));
        self.loads.push(n);
        if self.pending {
            self.started.push((seq, n));
            turbine_kvbm::Loading::Pending
        } else {
            turbine_kvbm::Loading::Done(n)
        }
    }

    fn finished(&mut self) -> Vec<(u64, usize)> {
        std::mem::take(&mut self.finish)
    }

    fn prefetches(&self) -> bool {
        true
    }

    fn arrived(&mut self, seq: u64, _: &[turbine_tokens::BlockHash]) {
        self.arrivals.push(seq);
    }

    fn admissible(&mut self, seq: u64, _: &[turbine_tokens::BlockHash]) -> bool {
        !self.waiting_prefetch.contains(&seq)
    }
}

fn prompt_spec(prompt: &[u32]) -> SeqSpec {
    SeqSpec {
        prompt: prompt.to_vec(),
        max_tokens: 2,
        stop_token_ids: vec![],
    }
}

/// A scheduler of 64 blocks of 4 tokens, a 40-token prompt of `token`s, and tiers that hold
/// all of its blocks and load them only when told to.
fn loading_from_tiers(token: u32) -> (Scheduler<(), Counted>, Vec<u32>, FakeTiers) {
    let s = Scheduler::new(config(64, 256, 8));
    let prompt = vec![token; 40];
    let mut tiers = FakeTiers {
        pending: true,
        ..FakeTiers::default()
    };
    tiers
        .held
        .extend(turbine_tokens::block_hashes(&prompt, 4).iter().map(|h| h.sequence));
    (s, prompt, tiers)
}

#[test]
fn a_pending_load_holds_its_sequence_out_of_steps_until_it_finishes() {
    let (mut s, prompt, mut tiers) = loading_from_tiers(7);
    s.add(0, prompt_spec(&prompt), ());
    s.add(1, prompt_spec(&[1, 2, 3]), ());
    let step = s.schedule_with(&mut tiers);
    assert_eq!(tiers.started, [(0, 9)]);
    // Only the other request runs while the copy does; the loading one holds its blocks.
    assert_eq!(step.entries.iter().map(|e| e.1).collect::<Vec<_>>(), [1]);
    assert_eq!(s.pool().num_in_use(), 10 + 1);
    assert_eq!(s.pool().num_cached(), 0, "nothing is readable before the copy ends");
    assert_eq!(s.loads_in_flight(), 1);
    s.complete(&step, |_, _| true);
    tiers.finish.push((0, 9));
    let step = s.schedule_with(&mut tiers);
    assert_eq!(step.onboarded, 9);
    assert!(step.entries.contains(&(0, 0, 4)), "{:?}", step.entries);
    assert_eq!(s.pool().num_cached(), 9);
    assert_eq!(s.loads_in_flight(), 0);
    s.pool().check_invariants();
}

#[test]
fn a_request_sharing_blocks_being_loaded_waits_for_that_load_and_others_go_ahead() {
    let (mut s, prompt, mut tiers) = loading_from_tiers(7);
    s.add(0, prompt_spec(&prompt), ());
    s.add(1, prompt_spec(&prompt), ());
    s.add(2, prompt_spec(&[5; 6]), ());
    let step = s.schedule_with(&mut tiers);
    assert_eq!(tiers.loads, [9], "one load for both");
    assert_eq!(step.entries.iter().map(|e| e.1).collect::<Vec<_>>(), [2]);
    s.complete(&step, |_, _| true);
    let step = s.schedule_with(&mut tiers);
    assert!(
        step.entries.iter().all(|e| e.1 == 2),
        "the copy has not ended: {:?}",
        step.entries
    );
    s.complete(&step, |_, _| true);
    tiers.finish.push((0, 9));
    let step = s.schedule_with(&mut tiers);
    // The first runs with its loaded blocks; the second finds them in the pool.
    let ids: Vec<u64> = step.entries.iter().map(|e| e.1).collect();
    assert!(ids.contains(&0) && ids.contains(&1), "{ids:?}");
    assert_eq!(tiers.loads, [9]);
    assert!(step.entries.iter().filter(|e| e.1 < 2).all(|e| e.2 == 4));
    s.pool().check_invariants();
}

#[test]
fn a_request_cancelled_while_loading_frees_its_blocks_when_the_copy_ends_and_keeps_them_cached() {
    let (mut s, prompt, mut tiers) = loading_from_tiers(9);
    s.add(0, prompt_spec(&prompt), ());
    let _ = s.schedule_with(&mut tiers);
    assert!(s.cancel(0));
    assert_eq!(s.pool().num_in_use(), 10, "the copy still writes them");
    let _ = s.schedule_with(&mut tiers);
    assert_eq!(s.pool().num_in_use(), 10);
    tiers.finish.push((0, 6));
    let step = s.schedule_with(&mut tiers);
    assert!(step.is_empty());
    assert_eq!(s.pool().num_in_use(), 0);
    assert_eq!(s.pool().num_cached(), 6, "what was loaded stays cached");
    assert!(s.is_idle() && s.loads_in_flight() == 0);
    s.pool().check_invariants();
}

#[test]
fn a_request_waiting_for_its_prefetch_lets_those_behind_it_in() {
    let mut s: Scheduler<(), Counted> = Scheduler::new(config(64, 256, 8));
    let mut tiers = FakeTiers::default();
    tiers.waiting_prefetch.insert(0);
    s.add(0, prompt_spec(&[4; 20]), ());
    s.add(1, prompt_spec(&[6; 20]), ());
    let step = s.schedule_with(&mut tiers);
    assert_eq!(tiers.arrivals, [0, 1], "the tiers hear of every arrival once");
    assert_eq!(step.entries.iter().map(|e| e.1).collect::<Vec<_>>(), [1]);
    s.complete(&step, |_, _| true);
    tiers.waiting_prefetch.clear();
    let step = s.schedule_with(&mut tiers);
    assert!(step.entries.iter().any(|e| e.1 == 0));
    assert_eq!(tiers.arrivals, [0, 1]);
}

#[test]
fn a_prefix_held_below_is_loaded_once_and_shared_by_requests_admitted_with_it() {
    let mut s: Scheduler<(), Counted> = Scheduler::new(config(64, 256, 8));
    let prompt = vec![7; 40];
    let mut tiers = FakeTiers::default();
    tiers
        .held
        .extend(turbine_tokens::block_hashes(&prompt, 4).iter().map(|h| h.sequence));
    for id in 0..2 {
        s.add(
            id,
            SeqSpec {
                prompt: prompt.clone(),
                max_tokens: 2,
                stop_token_ids: vec![],
            },
            (),
        );
    }
    let step = s.schedule_with(&mut tiers);
    // Nine of the ten blocks load (the last token is always computed): the first request
    // loads them, and the second finds them in the pool.
    assert_eq!(tiers.loads, [9]);
    assert_eq!(step.onboarded, 9);
    assert_eq!(step.entries.iter().map(|e| e.2).collect::<Vec<_>>(), [4, 4]);
    assert_eq!(s.pool().num_cached(), 9);
    s.pool().check_invariants();
}

#[test]
fn a_failed_load_leaves_the_rest_to_compute() {
    let mut s: Scheduler<(), Counted> = Scheduler::new(config(64, 256, 8));
    let prompt = vec![3; 40];
    let mut tiers = FakeTiers {
        fail_after: Some(5),
        ..FakeTiers::default()
    };
    tiers
        .held
        .extend(turbine_tokens::block_hashes(&prompt, 4).iter().map(|h| h.sequence));
    s.add(
        0,
        SeqSpec {
            prompt,
            max_tokens: 2,
            stop_token_ids: vec![],
        },
        (),
    );
    let step = s.schedule_with(&mut tiers);
    assert_eq!(step.onboarded, 5);
    assert_eq!(step.entries[0].2, 20, "blocks 5 to 9 computed");
    assert_eq!(s.pool().num_cached(), 5);
    let mut produced = Vec::new();
    while !s.is_idle() {
        let step = s.schedule_with(&mut tiers);
        s.complete(&step, |_, p| {
            produced.push(p);
            true
        });
    }
    assert_eq!(produced.len(), 2);
    assert_eq!(produced[0].cached_tokens, Some(20));
    s.pool().check_invariants();
}
