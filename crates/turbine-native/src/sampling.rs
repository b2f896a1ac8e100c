//! Picking the next token from a row of logits, per request: penalties, temperature, top-k,
//! top-p, and a seeded generator so that the same seed gives the same output.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use turbine_protocols::llm::SamplingOptions;

#[derive(Debug)]
pub struct Sampler {
    temperature: f32,
    top_p: f32,
    top_k: usize,
    frequency_penalty: f32,
    presence_penalty: f32,
    /// How often each token was generated so far: what the penalties count.
    counts: HashMap<u32, u32>,
    rng: StdRng,
    /// Reused between steps: a vocabulary-sized buffer per token is the sampler's only cost.
    scratch: Vec<(u32, f32)>,
}

impl Sampler {
    /// `fallback_seed` seeds requests that name no seed; the engine draws it at random.
    pub fn new(options: &SamplingOptions, fallback_seed: u64) -> Self {
        Self {
            temperature: options.temperature.unwrap_or(1.0),
            top_p: options.top_p.unwrap_or(1.0),
            top_k: options.top_k.map_or(0, |k| k as usize),
            frequency_penalty: options.frequency_penalty.unwrap_or(0.0),
            presence_penalty: options.presence_penalty.unwrap_or(0.0),
            counts: HashMap::new(),
            rng: StdRng::seed_from_u64(options.seed.unwrap_or(fallback_seed)),
            scratch: Vec::new(),
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }

    /// Chooses a token and remembers it for the penalties.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        if self.frequency_penalty != 0.0 || self.presence_penalty != 0.0 {
            for (&token, &n) in &self.counts {
                if let Some(l) = logits.get_mut(token as usize) {
                    *l -= self.frequency_penalty * n as f32 + self.presence_penalty;
                }
            }
        }
        let token = if self.is_greedy() {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        *self.counts.entry(token).or_default() += 1;
        token
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let t = self.temperature;
        let c = &mut self.scratch;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l / t)));
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
        if self.top_k > 0 && self.top_k < c.len() {
            c.select_nth_unstable_by(self.top_k - 1, by_logit);
            c.truncate(self.top_k);
        }
        c.sort_unstable_by(by_logit);
        let max = c.first().map_or(0.0, |x| x.1);
        let mut sum = 0.0;
        for x in c.iter_mut() {
            x.1 = (x.1 - max).exp();
            sum += x.1;
        }
        // Nucleus: the smallest head of the sorted distribution whose mass reaches top_p.
        let mut keep = c.len();
        if self.top_p < 1.0 {
            let mut mass = 0.0;
            for (i, x) in c.iter().enumerate() {
                mass += x.1 / sum;
                if mass >= self.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        let total: f32 = c[..keep].iter().map(|x| x.1).sum();
        let mut r = self.rng.gen::<f32>() * total;
        for x in &c[..keep] {
            r -= x.1;
            if r <= 0.0 {
                return x.0;
            }
        }
        c[keep.saturating_sub(1)].0
    }
}

/// The first index of the largest logit, as `argmax` in candle and torch picks on ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(f: impl FnOnce(&mut SamplingOptions)) -> SamplingOptions {
        let mut o = SamplingOptions::default();
        f(&mut o);
        o
    }

    #[test]
    fn temperature_zero_is_argmax() {
        let mut s = Sampler::new(&options(|o| o.temperature = Some(0.0)), 1);
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0, 3.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(&options(|o| o.seed = Some(seed)), 0);
            (0..40).map(|_| s.sample(&mut logits.clone())).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let logits = [5.0, 4.9, 4.8, 0.0, -1.0];
        let mut k = Sampler::new(&options(|o| o.top_k = Some(2)), 3);
        let mut p = Sampler::new(&options(|o| o.top_p = Some(0.5)), 3);
        for _ in 0..200 {
            assert!(k.sample(&mut logits.clone()) < 2);
            assert!(
                p.sample(&mut logits.clone()) < 2,
                "0.5 of the mass is within the first two"
            );
        }
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let mut s = Sampler::new(
            &options(|o| {
                o.temperature = Some(0.0);
                o.frequency_penalty = Some(1.5);
            }),
            0,
        );
        let logits = [2.0, 1.0, 0.0];
        let picked: Vec<u32> = (0..4).map(|_| s.sample(&mut logits.clone())).collect();
        // 2.0 -> 0.5 after one use, so 1 wins next; then 2.0-1.5=0.5 vs 1.0-1.5=-0.5 ...
        assert_eq!(picked, vec![0, 1, 0, 2]);
        let mut s = Sampler::new(
            &options(|o| {
                o.temperature = Some(0.0);
                o.presence_penalty = Some(1.5);
            }),
            0,
        );
        let picked: Vec<u32> = (0..4).map(|_| s.sample(&mut logits.clone())).collect();
        assert_eq!(picked, vec![0, 1, 0, 0], "presence is charged once, however often");
    }
}
