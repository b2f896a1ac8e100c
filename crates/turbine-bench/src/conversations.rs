//! Synthetic multi-turn conversation traces, written in the Mooncake format so that `turbine
//! bench --trace` replays them and `turbine trace analyze` gives their hit-rate ceilings.
//!
//! Sessions arrive as a Poisson process. Each opens with one of a few shared system prompts
//! (the apps of a deployment) and a user message; every later turn sends the whole history
//! (prompt and answer so far) plus a new message, after the previous answer has streamed and
//! the user has thought. A turn's hash ids repeat the previous turn's full blocks, so prefix
//! sharing is exact: what a real chat history does, at the trace's 512-token granularity.
//! Lengths are log-normal, think times exponential, and the number of turns geometric, the
//! shapes published studies of chat traffic report; every parameter is a flag.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::trace::{Trace, TraceFormat, TraceRequest, MOONCAKE_BLOCK_TOKENS};

/// What a generated conversation workload looks like.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationSpec {
    pub sessions: usize,
    /// Sessions starting per second, on average.
    pub session_rate: f64,
    /// Distinct system prompts, each shared by the sessions that draw it.
    pub system_prompts: usize,
    pub system_prompt_tokens: u32,
    /// Mean turns per session (geometric: each turn is the last with probability 1/mean).
    pub mean_turns: f64,
    /// Median tokens of a user message and of an answer (log-normal, with `length_sigma`).
    pub user_tokens: u32,
    pub output_tokens: u32,
    /// Log-normal shape of lengths: the standard deviation of their logarithm.
    pub length_sigma: f64,
    /// Mean pause between an answer and the next message (exponential).
    pub think_time: Duration,
    /// How long an answer takes to stream, per output token, before the user reads it.
    pub answer_time_per_token: Duration,
    /// A session ends before a turn whose prompt and answer would pass this.
    pub max_context: u32,
}

impl Default for ConversationSpec {
    fn default() -> Self {
        Self {
            sessions: 3000,
            session_rate: 3.0,
            system_prompts: 4,
            system_prompt_tokens: 1536,
            mean_turns: 3.0,
            user_tokens: 2000,
            output_tokens: 250,
            length_sigma: 0.8,
            think_time: Duration::from_secs(20),
            answer_time_per_token: Duration::from_millis(20),
            max_context: 32_768,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("{0} must be a positive number, got {1}")]
    NotPositive(&'static str, f64),
    #[error("--max-context {max} leaves no room after a system prompt of {system} tokens")]
    NoRoom { max: u32, system: u32 },
}

impl ConversationSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        for (name, v) in [
            ("--sessions", self.sessions as f64),
            ("--session-rate", self.session_rate),
            ("--system-prompts", self.system_prompts as f64),
            ("--user-tokens", f64::from(self.user_tokens)),
            ("--output-tokens", f64::from(self.output_tokens)),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(SpecError::NotPositive(name, v));
            }
        }
        if !(self.mean_turns.is_finite() && self.mean_turns >= 1.0) {
            return Err(SpecError::NotPositive("--mean-turns (at least 1)", self.mean_turns));
        }
        if !(self.length_sigma.is_finite() && self.length_sigma >= 0.0) {
            return Err(SpecError::NotPositive("--length-sigma (or 0)", self.length_sigma));
        }
        if self.max_context <= self.system_prompt_tokens + 2 {
            return Err(SpecError::NoRoom {
                max: self.max_context,
                system: self.system_prompt_tokens,
            });
        }
        Ok(())
    }
}

/// A log-normal length with median `median`, at least 1 token.
fn length(rng: &mut StdRng, median: u32, sigma: f64) -> u32 {
    // Box-Muller: one standard normal from two uniforms.
    let (u1, u2): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.gen());
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    let v = f64::from(median) * (sigma * z).exp();
    v.round().clamp(1.0, f64::from(u32::MAX / 4)) as u32
}

fn exponential(rng: &mut StdRng, mean_s: f64) -> f64 {
    -mean_s * rng.gen_range(f64::EPSILON..1.0).ln()
}

/// The trace `spec` describes, the same for the same `seed`.
pub fn generate(spec: &ConversationSpec, seed: u64) -> Result<Trace, SpecError> {
    spec.validate()?;
    let mut rng = StdRng::seed_from_u64(seed);
    let block = MOONCAKE_BLOCK_TOKENS;
    let shared_blocks = (spec.system_prompt_tokens / block) as u64;
    // Ids 0.. are the system prompts' full blocks; everything else is fresh.
    let mut next_id = shared_blocks * spec.system_prompts as u64;
    let mut fresh = move || {
        next_id += 1;
        next_id - 1
    };
    let mut requests = Vec::new();
    let mut start = 0.0f64;
    for _ in 0..spec.sessions {
        start += exponential(&mut rng, 1.0 / spec.session_rate);
        let app = rng.gen_range(0..spec.system_prompts) as u64;
        let mut at = start;
        let mut prompt_len = spec.system_prompt_tokens;
        let mut ids: Vec<u64> = (0..shared_blocks).map(|b| app * shared_blocks + b).collect();
        // Full blocks of the prompt so far that the next turn repeats.
        let mut kept = shared_blocks as usize;
        let mut first = true;
        loop {
            let user = length(&mut rng, spec.user_tokens, spec.length_sigma);
            let output = length(&mut rng, spec.output_tokens, spec.length_sigma);
            let input = prompt_len.saturating_add(user);
            if input.saturating_add(output) > spec.max_context {
                break;
            }
            ids.truncate(kept);
            while (ids.len() as u64) < u64::from(input.div_ceil(block)) {
                ids.push(fresh());
            }
            requests.push(TraceRequest {
                at: Duration::from_secs_f64(at),
                input_length: input,
                output_length: output,
                hash_ids: ids.clone(),
            });
            if !first && rng.gen_bool(1.0 / spec.mean_turns) {
                break;
            }
            first = false;
            // The next prompt is this one, its answer, and a new message: its full blocks
            // within this prompt are this prompt's full blocks.
            kept = (input / block) as usize;
            prompt_len = input.saturating_add(output);
            at += spec.answer_time_per_token.as_secs_f64() * f64::from(output)
                + exponential(&mut rng, spec.think_time.as_secs_f64());
        }
    }
    requests.sort_by_key(|r| r.at);
    let origin = requests.first().map_or(Duration::ZERO, |r| r.at);
    for r in &mut requests {
        r.at -= origin;
    }
    Ok(Trace {
        format: TraceFormat::Mooncake,
        block_tokens: block,
        requests,
    })
}

/// `trace` as Mooncake JSONL: one request per line, timestamps in milliseconds.
pub fn to_mooncake_jsonl(trace: &Trace) -> String {
    let mut out = String::new();
    for r in &trace.requests {
        let line = serde_json::json!({
            "timestamp": r.at.as_millis() as u64,
            "input_length": r.input_length,
            "output_length": r.output_length,
            "hash_ids": r.hash_ids,
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn small() -> ConversationSpec {
        ConversationSpec {
            sessions: 200,
            session_rate: 1.0,
            mean_turns: 6.0,
            user_tokens: 300,
            ..ConversationSpec::default()
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_trace_and_another_seed_another() {
        let a = generate(&small(), 1).unwrap();
        let b = generate(&small(), 1).unwrap();
        let c = generate(&small(), 2).unwrap();
        assert_eq!(a.requests, b.requests);
        assert_ne!(a.requests, c.requests);
    }

    #[test]
    fn every_turn_repeats_the_full_blocks_of_the_turn_before() {
        let t = generate(&small(), 3).unwrap();
        assert!(t.requests.windows(2).all(|w| w[0].at <= w[1].at));
        assert_eq!(t.requests[0].at, Duration::ZERO);
        let shared = u64::from(small().system_prompt_tokens / 512) * small().system_prompts as u64;
        // Each request by its full blocks, in arrival order: a later turn starts with exactly
        // those of the turn before it.
        let mut by_full_blocks: HashMap<&[u64], &TraceRequest> = HashMap::new();
        let mut multi_turn = 0;
        for r in &t.requests {
            assert_eq!(r.hash_ids.len() as u32, r.input_length.div_ceil(512), "{r:?}");
            assert!(r.input_length + r.output_length <= small().max_context);
            // The system prompt's full blocks come first, all from one app; then its own.
            let app = r.hash_ids[0] / 3;
            assert_eq!(r.hash_ids[..3], [app * 3, app * 3 + 1, app * 3 + 2]);
            assert!(r.hash_ids[3..].iter().all(|&id| id >= shared));
            let earlier = (4..=r.hash_ids.len())
                .rev()
                .find_map(|n| by_full_blocks.get(&r.hash_ids[..n]));
            if let Some(prev) = earlier {
                assert!(
                    r.input_length >= prev.input_length + prev.output_length,
                    "{prev:?} then {r:?}"
                );
                assert!(r.at > prev.at);
                multi_turn += 1;
            }
            let full = (r.input_length / 512) as usize;
            if full > 3 {
                by_full_blocks.insert(&r.hash_ids[..full], r);
            }
        }
        assert!(multi_turn > 200, "only {multi_turn} follow-up turns");
    }

    #[test]
    fn histories_make_prefix_reuse_and_sessions_arrive_at_their_rate() {
        let spec = small();
        let t = generate(&spec, 4).unwrap();
        let a = crate::analyze::analyze(&t, None);
        let reuse = a.prefix.unwrap().unbounded_hit_rate;
        assert!(reuse > 0.5 && reuse < 0.99, "{reuse}");
        // 200 sessions at 1 per second start over about 200 s (plus the last ones' turns).
        let first_turns = t
            .requests
            .iter()
            .filter(|r| r.input_length < spec.system_prompt_tokens + 3000)
            .count();
        assert!(first_turns >= spec.sessions);
        let span = t.span().as_secs_f64();
        assert!(span > 150.0 && span < 2000.0, "{span}");
    }

    #[test]
    fn written_jsonl_parses_back_to_the_same_trace() {
        let t = generate(&small(), 5).unwrap();
        let back = Trace::parse_mooncake(to_mooncake_jsonl(&t).as_bytes()).unwrap();
        assert_eq!(back.requests.len(), t.requests.len());
        for (a, b) in t.requests.iter().zip(&back.requests) {
            assert_eq!(
                (a.input_length, a.output_length, &a.hash_ids),
                (b.input_length, b.output_length, &b.hash_ids)
            );
            assert_eq!(a.at.as_millis(), b.at.as_millis());
        }
    }

    #[test]
    fn bad_specs_are_refused_naming_the_flag() {
        let bad = ConversationSpec {
            session_rate: 0.0,
            ..small()
        };
        assert_eq!(
            generate(&bad, 0).unwrap_err(),
            SpecError::NotPositive("--session-rate", 0.0)
        );
        let bad = ConversationSpec {
            max_context: 1000,
            ..small()
        };
        assert!(matches!(generate(&bad, 0), Err(SpecError::NoRoom { .. })));
    }
}
