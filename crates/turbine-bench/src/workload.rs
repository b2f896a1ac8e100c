//! What the bench sends: synthetic requests with length distributions and shared prefixes,
//! multi-turn sessions, or a trace's requests at the trace's times.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::tokens::{splitmix64, BlockTokens};
use crate::trace::Trace;

/// A prompt as sent: token ids go to `/v1/completions` as they are, text to either endpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Tokens(Vec<u32>),
    Text(String),
}

/// One request to send.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    pub prompt: Prompt,
    pub max_tokens: u32,
}

/// Work for one client slot: a request, or a conversation whose turns go one after another,
/// each carrying the conversation so far.
#[derive(Debug, Clone)]
pub enum Job {
    Request(RequestSpec),
    Session {
        /// Each turn's new user message (text) and its output bound.
        turns: Vec<RequestSpec>,
        /// Pause between an answer and the next turn, as a user reading and typing.
        think_time: Duration,
    },
}

/// A job and, for trace replay, when the trace sent it (before time scaling).
#[derive(Debug, Clone)]
pub struct Scheduled {
    pub at: Option<Duration>,
    pub job: Job,
}

/// Turns token ids into text for chat prompts of a given length in tokens.
pub trait TextCodec: Send + Sync {
    fn encode(&self, text: &str) -> Vec<u32>;
    fn decode(&self, ids: &[u32]) -> String;
}

/// One token per byte: exact for servers with a byte-level tokenizer (Turbine's echo and mocker
/// engines without `--tokenizer`), and about four times too many tokens per word elsewhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteCodec;

impl TextCodec for ByteCodec {
    fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    fn decode(&self, ids: &[u32]) -> String {
        ids.iter().filter_map(|&i| char::from_u32(i)).collect()
    }
}

/// A length distribution: normal around `mean` with `stddev`, at least 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lengths {
    pub mean: u32,
    pub stddev: u32,
}

impl Lengths {
    pub fn fixed(n: u32) -> Self {
        Self { mean: n, stddev: 0 }
    }

    fn sample(&self, rng: &mut StdRng) -> u32 {
        if self.stddev == 0 {
            return self.mean.max(1);
        }
        // Box–Muller: the rand version we use has no normal distribution without rand_distr.
        let (u1, u2): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.gen());
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        (f64::from(self.mean) + z * f64::from(self.stddev)).round().max(1.0) as u32
    }
}

/// Synthetic requests (and sessions when `turns > 1`).
#[derive(Debug, Clone)]
pub struct Synthetic {
    pub input: Lengths,
    pub output: Lengths,
    /// Share of each prompt taken from its prefix group's common prefix.
    pub prefix_ratio: f64,
    pub prefix_groups: u32,
    pub turns: u32,
    pub think_time: Duration,
    pub seed: u64,
}

/// Where prompts come from.
pub enum Workload {
    Synthetic {
        spec: Synthetic,
        /// `Some` for text prompts (chat), `None` for token ids.
        text: Option<Arc<dyn TextCodec>>,
        token_ids: Range<u32>,
    },
    Trace {
        trace: Arc<Trace>,
        tokens: BlockTokens,
    },
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Keys of the token streams of prefix groups and of unique tails, far apart from each other
/// and from trace hash ids.
const GROUP_KEY: u64 = 1 << 62;
const UNIQUE_KEY: u64 = 1 << 63;

impl Workload {
    /// One line saying what this workload is, for reports.
    pub fn describe(&self) -> String {
        match self {
            Workload::Synthetic { spec: s, text, .. } => {
                let mut d = format!(
                    "synthetic {} prompts: input {}±{}, output {}±{} tokens",
                    if text.is_some() { "text" } else { "token-id" },
                    s.input.mean,
                    s.input.stddev,
                    s.output.mean,
                    s.output.stddev
                );
                if s.prefix_ratio > 0.0 {
                    d += &format!(
                        ", {:.0}% shared by {} prefix groups",
                        s.prefix_ratio * 100.0,
                        s.prefix_groups
                    );
                }
                if s.turns > 1 {
                    d += &format!(
                        ", sessions of {} turns, {} ms think time",
                        s.turns,
                        s.think_time.as_millis()
                    );
                }
                d
            }
            Workload::Trace { trace, .. } => format!(
                "{:?} trace of {} requests over {:.1} s",
                trace.format,
                trace.requests.len(),
                trace.span().as_secs_f64()
            ),
        }
    }

    /// Whether requests need a completions endpoint because they are token ids.
    pub fn sends_token_ids(&self) -> bool {
        match self {
            Workload::Synthetic { text, .. } => text.is_none(),
            Workload::Trace { .. } => true,
        }
    }

    /// Jobs in order; synthetic workloads never end, the runner's bounds stop them.
    pub fn jobs(&self) -> Box<dyn Iterator<Item = Scheduled> + Send> {
        match self {
            Workload::Trace { trace, tokens } => {
                let (trace, tokens) = (trace.clone(), tokens.clone());
                Box::new((0..trace.requests.len()).map(move |i| {
                    let r = &trace.requests[i];
                    let ids = if r.hash_ids.is_empty() {
                        // Length-only traces: every prompt its own tokens, nothing shared.
                        let mut out = Vec::with_capacity(r.input_length as usize);
                        let mut state = UNIQUE_KEY | i as u64;
                        let mut left = r.input_length;
                        while left > 0 {
                            let take = left.min(tokens.block_tokens());
                            tokens.block(splitmix64(&mut state), take, &mut out);
                            left -= take;
                        }
                        out
                    } else {
                        tokens.prompt(&r.hash_ids, r.input_length)
                    };
                    Scheduled {
                        at: Some(r.at),
                        job: Job::Request(RequestSpec {
                            prompt: Prompt::Tokens(ids),
                            max_tokens: r.output_length.max(1),
                        }),
                    }
                }))
            }
            Workload::Synthetic { spec, text, token_ids } => {
                let spec = spec.clone();
                let stream = BlockTokens::new(u32::MAX, token_ids.clone(), spec.seed);
                let text = text.clone();
                let mut rng = StdRng::seed_from_u64(spec.seed);
                let mut n: u64 = 0;
                Box::new(std::iter::from_fn(move || {
                    let mut turn = |rng: &mut StdRng, first: bool| {
                        n += 1;
                        let input = spec.input.sample(rng);
                        let shared = if first && spec.prefix_ratio > 0.0 {
                            ((f64::from(input) * spec.prefix_ratio).round() as u32).min(input)
                        } else {
                            0
                        };
                        let group = rng.gen_range(0..spec.prefix_groups.max(1));
                        let prompt = synthetic_prompt(&stream, text.as_deref(), group, shared, n, input - shared);
                        RequestSpec {
                            prompt,
                            max_tokens: spec.output.sample(rng),
                        }
                    };
                    let job = if spec.turns > 1 {
                        let turns = (0..spec.turns).map(|t| turn(&mut rng, t == 0)).collect();
                        Job::Session {
                            turns,
                            think_time: spec.think_time,
                        }
                    } else {
                        Job::Request(turn(&mut rng, true))
                    };
                    Some(Scheduled { at: None, job })
                }))
            }
        }
    }
}

/// `shared` tokens of the group's common stream, then `tail` tokens of a stream of this
/// request's own.
fn synthetic_prompt(
    stream: &BlockTokens,
    text: Option<&dyn TextCodec>,
    group: u32,
    shared: u32,
    n: u64,
    tail: u32,
) -> Prompt {
    let mut ids = Vec::with_capacity((shared + tail) as usize);
    stream.block(GROUP_KEY | u64::from(group), shared, &mut ids);
    stream.block(UNIQUE_KEY | n, tail, &mut ids);
    match text {
        None => Prompt::Tokens(ids),
        Some(codec) => {
            Prompt::Text(words(codec, &ids[..shared as usize], shared) + &words(codec, &ids[shared as usize..], tail))
        }
    }
}

/// Text of `len` tokens under `codec` (give or take a token where the text is cut), made of
/// words spelled from `ids` so that it is as deterministic, and as shared between prompts, as
/// the ids.
fn words(codec: &dyn TextCodec, ids: &[u32], len: u32) -> String {
    const LETTERS: &[u8] = b"etaoinshrdlucmfwyp";
    if len == 0 || ids.is_empty() {
        return String::new();
    }
    let len = len as usize;
    let mut text = String::with_capacity(ids.len());
    let mut next = 0usize;
    let mut encoded = codec.encode(&text);
    // One character per id first: exactly `len` tokens for a byte-level tokenizer. A real
    // one packs several characters into a token, so the text grows (the ids read again,
    // shifted each pass) until it encodes to at least `len` tokens.
    loop {
        let target = text.len() + ids.len().max(len.saturating_sub(encoded.len()) * 2);
        while text.len() < target {
            // Every fifth character a space: word-like text that tokenizers split as usual.
            if next % 5 == 4 {
                text.push(' ');
            } else {
                let id = ids[next % ids.len()] as usize + next / ids.len();
                text.push(char::from(LETTERS[id % LETTERS.len()]));
            }
            next += 1;
        }
        encoded = codec.encode(&text);
        if encoded.len() >= len {
            return if encoded.len() == len {
                text
            } else {
                codec.decode(&encoded[..len])
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::TraceRequest;

    fn synthetic(prefix_ratio: f64, turns: u32) -> Synthetic {
        Synthetic {
            input: Lengths::fixed(100),
            output: Lengths { mean: 20, stddev: 5 },
            prefix_ratio,
            prefix_groups: 2,
            turns,
            think_time: Duration::from_millis(10),
            seed: 3,
        }
    }

    fn tokens(job: &Job) -> &[u32] {
        match job {
            Job::Request(RequestSpec {
                prompt: Prompt::Tokens(t),
                ..
            }) => t,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn synthetic_prompts_share_their_groups_prefix_only() {
        let w = Workload::Synthetic {
            spec: synthetic(0.5, 1),
            text: None,
            token_ids: 32..256,
        };
        let jobs: Vec<_> = w.jobs().take(40).map(|s| s.job).collect();
        let prompts: Vec<&[u32]> = jobs.iter().map(tokens).collect();
        assert!(prompts.iter().all(|p| p.len() == 100));
        let mut prefixes: Vec<&[u32]> = prompts.iter().map(|p| &p[..50]).collect();
        prefixes.sort();
        prefixes.dedup();
        assert_eq!(prefixes.len(), 2, "two groups, two prefixes");
        let mut tails: Vec<&[u32]> = prompts.iter().map(|p| &p[50..]).collect();
        tails.sort();
        tails.dedup();
        assert_eq!(tails.len(), 40, "every tail its own");
        // Same seed, same workload.
        let again: Vec<_> = w.jobs().take(40).map(|s| s.job).collect();
        assert_eq!(tokens(&again[7]), prompts[7]);
    }

    #[test]
    fn output_lengths_follow_the_distribution() {
        let w = Workload::Synthetic {
            spec: synthetic(0.0, 1),
            text: None,
            token_ids: 0..256,
        };
        let outs: Vec<f64> = w
            .jobs()
            .take(2000)
            .map(|s| match s.job {
                Job::Request(r) => f64::from(r.max_tokens),
                Job::Session { .. } => unreachable!(),
            })
            .collect();
        let mean = outs.iter().sum::<f64>() / outs.len() as f64;
        let sd = (outs.iter().map(|o| (o - mean).powi(2)).sum::<f64>() / outs.len() as f64).sqrt();
        assert!((mean - 20.0).abs() < 0.5, "{mean}");
        assert!((sd - 5.0).abs() < 0.5, "{sd}");
    }

    #[test]
    fn sessions_have_their_turns_and_text_prompts_their_length() {
        let w = Workload::Synthetic {
            spec: synthetic(0.0, 3),
            text: Some(Arc::new(ByteCodec)),
            token_ids: 32..256,
        };
        let Some(Scheduled {
            job: Job::Session { turns, think_time },
            at: None,
        }) = w.jobs().next()
        else {
            panic!("a session")
        };
        assert_eq!(think_time, Duration::from_millis(10));
        assert_eq!(turns.len(), 3);
        for t in &turns {
            let Prompt::Text(text) = &t.prompt else { panic!() };
            assert_eq!(text.len(), 100, "{text}");
        }
    }

    /// Three characters to a token, as a real tokenizer packs several.
    struct Packing;

    impl TextCodec for Packing {
        fn encode(&self, text: &str) -> Vec<u32> {
            text.as_bytes()
                .chunks(3)
                .map(|c| c.iter().fold(0u32, |a, &b| a * 256 + u32::from(b)))
                .collect()
        }

        fn decode(&self, ids: &[u32]) -> String {
            ids.iter()
                .flat_map(|&id| {
                    let b = id.to_be_bytes();
                    b.into_iter().skip_while(|&x| x == 0).collect::<Vec<_>>()
                })
                .map(char::from)
                .collect()
        }
    }

    #[test]
    fn text_prompts_have_their_length_under_a_packing_tokenizer() {
        let w = Workload::Synthetic {
            spec: synthetic(0.5, 1),
            text: Some(Arc::new(Packing)),
            token_ids: 32..256,
        };
        let prompts: Vec<String> = w
            .jobs()
            .take(5)
            .map(|s| match s.job {
                Job::Request(RequestSpec {
                    prompt: Prompt::Text(t),
                    ..
                }) => t,
                other => panic!("{other:?}"),
            })
            .collect();
        for p in &prompts {
            assert_eq!(Packing.encode(p).len(), 100, "{p:?}");
        }
        // Two groups: some pair of the five shares its first 50 tokens' text.
        let shared = prompts
            .iter()
            .enumerate()
            .any(|(i, a)| prompts[i + 1..].iter().any(|b| a[..150] == b[..150]));
        assert!(shared, "{prompts:?}");
    }

    #[test]
    fn trace_requests_keep_times_and_lengths() {
        let trace = Trace {
            format: crate::TraceFormat::Mooncake,
            block_tokens: 4,
            requests: vec![
                TraceRequest {
                    at: Duration::ZERO,
                    input_length: 6,
                    output_length: 0,
                    hash_ids: vec![1, 2],
                },
                TraceRequest {
                    at: Duration::from_millis(5),
                    input_length: 7,
                    output_length: 9,
                    hash_ids: vec![1, 3],
                },
            ],
        };
        let w = Workload::Trace {
            trace: Arc::new(trace),
            tokens: BlockTokens::new(4, 0..1000, 0),
        };
        let jobs: Vec<_> = w.jobs().collect();
        assert_eq!(jobs[1].at, Some(Duration::from_millis(5)));
        let (a, b) = (tokens(&jobs[0].job), tokens(&jobs[1].job));
        assert_eq!((a.len(), b.len()), (6, 7));
        assert_eq!(a[..4], b[..4]);
        assert_ne!(a[4..6], b[4..6]);
        let Job::Request(r) = &jobs[0].job else { panic!() };
        assert_eq!(r.max_tokens, 1, "at least one token is asked for");
    }
}
