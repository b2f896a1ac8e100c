//! `turbine trace analyze`: what a trace asks of a server, the prefix-cache hit rate that
//! no router can beat, and how eviction policies fare against Belady's optimum on it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

use serde::Serialize;
use turbine_kvbm::policy::{belady, build, replay, ReplayStats, Request, UnknownPolicy};
pub use turbine_kvbm::policy::{PolicyConfig, PolicyKind};

use crate::stats::Distribution;
use crate::trace::Trace;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceAnalysis {
    pub requests: usize,
    pub span_s: f64,
    pub request_rate: f64,
    pub input_tokens: Distribution,
    pub output_tokens: Distribution,
    pub total_input_tokens: u64,
    pub total_output_tokens: u64,
    /// Only for traces with hash ids.
    pub prefix: Option<PrefixAnalysis>,
    /// Only when asked for (see [`compare_policies`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policies: Option<PolicyComparison>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PrefixAnalysis {
    pub block_tokens: u32,
    pub distinct_blocks: usize,
    pub total_blocks: u64,
    /// Share of prompt tokens in leading blocks seen before, with a cache that never evicts:
    /// the ceiling of any router's hit rate on this trace.
    pub unbounded_hit_rate: f64,
    /// The same with one LRU cache of `lru_blocks` blocks, when asked for.
    pub lru: Option<(usize, f64)>,
}

/// Analyses `trace`; `lru_blocks` also simulates a single LRU cache of that many blocks.
pub fn analyze(trace: &Trace, lru_blocks: Option<usize>) -> TraceAnalysis {
    let rs = &trace.requests;
    let span_s = trace.span().as_secs_f64();
    let lengths = |f: fn(&crate::TraceRequest) -> u32| Distribution::of(rs.iter().map(|r| f64::from(f(r))).collect());
    let empty = Distribution::of(vec![0.0]).expect("one value");
    let has_hashes = rs.iter().any(|r| !r.hash_ids.is_empty());
    TraceAnalysis {
        requests: rs.len(),
        span_s,
        request_rate: if span_s > 0.0 { rs.len() as f64 / span_s } else { 0.0 },
        input_tokens: lengths(|r| r.input_length).unwrap_or(empty),
        output_tokens: lengths(|r| r.output_length).unwrap_or(empty),
        total_input_tokens: rs.iter().map(|r| u64::from(r.input_length)).sum(),
        total_output_tokens: rs.iter().map(|r| u64::from(r.output_length)).sum(),
        prefix: has_hashes.then(|| PrefixAnalysis {
            block_tokens: trace.block_tokens,
            distinct_blocks: rs.iter().flat_map(|r| &r.hash_ids).collect::<HashSet<_>>().len(),
            total_blocks: rs.iter().map(|r| r.hash_ids.len() as u64).sum(),
            unbounded_hit_rate: hit_rate(trace, &mut Unbounded::default()),
            lru: lru_blocks.map(|n| (n, hit_rate(trace, &mut Lru::new(n)))),
        }),
        policies: None,
    }
}

/// Eviction policies replayed over one prefix cache per capacity, beside Belady's optimum.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyComparison {
    pub block_tokens: u32,
    pub distinct_blocks: usize,
    /// Cache sizes, in the trace's blocks.
    pub capacities: Vec<usize>,
    /// The policies asked for, in order, then `belady`.
    pub rows: Vec<PolicyRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyRow {
    pub policy: String,
    /// Share of prompt blocks hit, one per capacity.
    pub hit_rates: Vec<f64>,
    /// What each replay counted, one per capacity.
    pub replays: Vec<ReplayStats>,
}

/// Policies named on a command line: `all` is every [`PolicyKind`]; repeats are dropped.
pub fn policies_named<S: AsRef<str>>(names: &[S]) -> Result<Vec<PolicyKind>, UnknownPolicy> {
    let mut kinds = Vec::new();
    for name in names {
        let expanded = match name.as_ref().trim() {
            "all" => PolicyKind::ALL.to_vec(),
            one => vec![one.parse()?],
        };
        for k in expanded {
            if !kinds.contains(&k) {
                kinds.push(k);
            }
        }
    }
    Ok(kinds)
}

/// Replays `trace` through each of `policies` (configured by `config`) over a prefix cache
/// of each of `capacities` blocks, and through Belady's optimum; `None` without hash ids.
/// Hit rates count blocks (see [`turbine_kvbm::policy::replay`]), not tokens as
/// [`PrefixAnalysis`] does: the last, cut block of a prompt weighs as much as the others.
pub fn compare_policies(
    trace: &Trace,
    policies: &[PolicyKind],
    capacities: &[usize],
    config: &PolicyConfig,
) -> Option<PolicyComparison> {
    if trace.requests.iter().all(|r| r.hash_ids.is_empty()) {
        return None;
    }
    let requests: Vec<Request> = trace
        .requests
        .iter()
        .map(|r| Request {
            at: u64::try_from(r.at.as_millis()).unwrap_or(u64::MAX),
            blocks: r.hash_ids.clone(),
        })
        .collect();
    let row = |policy: String, replays: Vec<ReplayStats>| PolicyRow {
        policy,
        hit_rates: replays.iter().map(ReplayStats::hit_rate).collect(),
        replays,
    };
    let mut rows: Vec<PolicyRow> = policies
        .iter()
        .map(|&kind| {
            let replays = capacities
                .iter()
                .map(|&c| replay(&requests, &mut build(kind, c, config), c))
                .collect();
            row(kind.to_string(), replays)
        })
        .collect();
    rows.push(row(
        "belady".to_owned(),
        capacities.iter().map(|&c| belady(&requests, c)).collect(),
    ));
    Some(PolicyComparison {
        block_tokens: trace.block_tokens,
        distinct_blocks: requests.iter().flat_map(|r| &r.blocks).collect::<HashSet<_>>().len(),
        capacities: capacities.to_vec(),
        rows,
    })
}

impl PolicyComparison {
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "eviction policies: share of prompt blocks hit in one prefix cache, and of Belady's optimum"
        );
        let _ = write!(o, "{:<12}", "capacity");
        for &c in &self.capacities {
            let share = c as f64 / self.distinct_blocks.max(1) as f64 * 100.0;
            let _ = write!(o, "{:>18}", format!("{c} ({share:.0}%)"));
        }
        let _ = writeln!(
            o,
            "\n{:<12}{}",
            "",
            format!("{:>10}{:>8}", "hit", "of opt").repeat(self.capacities.len())
        );
        let best = self.rows.last().map(|r| r.hit_rates.clone()).unwrap_or_default();
        for r in &self.rows {
            let _ = write!(o, "{:<12}", r.policy);
            for (rate, opt) in r.hit_rates.iter().zip(&best) {
                let of = if *opt > 0.0 { rate / opt * 100.0 } else { 100.0 };
                let _ = write!(o, "{:>9.2}%{:>7.1}%", rate * 100.0, of);
            }
            let _ = writeln!(o);
        }
        let _ = writeln!(
            o,
            "capacity in blocks of {} tokens (and as a share of the {} distinct blocks)",
            self.block_tokens, self.distinct_blocks
        );
        o
    }
}

/// A block cache as seen by the hit-rate simulation.
trait Cache {
    fn contains(&mut self, id: u64) -> bool;
    /// Marks `id` as used now, inserting it if absent.
    fn touch(&mut self, id: u64);
}

#[derive(Default)]
struct Unbounded(HashSet<u64>);

impl Cache for Unbounded {
    fn contains(&mut self, id: u64) -> bool {
        self.0.contains(&id)
    }
    fn touch(&mut self, id: u64) {
        self.0.insert(id);
    }
}

struct Lru {
    capacity: usize,
    clock: u64,
    last_use: HashMap<u64, u64>,
    by_age: BTreeMap<u64, u64>,
}

impl Lru {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            clock: 0,
            last_use: HashMap::new(),
            by_age: BTreeMap::new(),
        }
    }
}

impl Cache for Lru {
    fn contains(&mut self, id: u64) -> bool {
        self.last_use.contains_key(&id)
    }
    fn touch(&mut self, id: u64) {
        self.clock += 1;
        if let Some(old) = self.last_use.insert(id, self.clock) {
            self.by_age.remove(&old);
        }
        self.by_age.insert(self.clock, id);
        while self.last_use.len() > self.capacity {
            let Some((_, victim)) = self.by_age.pop_first() else {
                break;
            };
            self.last_use.remove(&victim);
        }
    }
}

/// Token-weighted share of prompts found in `cache`: a prompt's leading blocks count while they
/// are all cached (a prefix cache cannot use a block after a missing one).
fn hit_rate(trace: &Trace, cache: &mut dyn Cache) -> f64 {
    let (mut hit, mut total) = (0u64, 0u64);
    for r in &trace.requests {
        let mut left = r.input_length;
        let mut prefix = true;
        for &h in &r.hash_ids {
            let len = left.min(trace.block_tokens);
            left -= len;
            prefix = prefix && cache.contains(h);
            if prefix {
                hit += u64::from(len);
            }
        }
        for &h in &r.hash_ids {
            cache.touch(h);
        }
        total += u64::from(r.input_length);
    }
    if total == 0 {
        0.0
    } else {
        hit as f64 / total as f64
    }
}

impl TraceAnalysis {
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "requests           {}", self.requests);
        let _ = writeln!(
            o,
            "span               {:.1} s ({:.2} req/s)",
            self.span_s, self.request_rate
        );
        let _ = writeln!(
            o,
            "{:<19}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "tokens", "mean", "min", "p50", "p90", "p99", "max"
        );
        for (name, d) in [("input", &self.input_tokens), ("output", &self.output_tokens)] {
            let _ = writeln!(
                o,
                "{name:<19}{:>10.1}{:>10.0}{:>10.0}{:>10.0}{:>10.0}{:>10.0}",
                d.mean, d.min, d.p50, d.p90, d.p99, d.max
            );
        }
        let _ = writeln!(o, "total input        {} tokens", self.total_input_tokens);
        let _ = writeln!(o, "total output       {} tokens", self.total_output_tokens);
        match &self.prefix {
            None => {
                let _ = writeln!(o, "prefix structure   none in this trace (no hash ids)");
            }
            Some(p) => {
                let _ = writeln!(
                    o,
                    "blocks             {} distinct of {} ({} tokens each)",
                    p.distinct_blocks, p.total_blocks, p.block_tokens
                );
                let _ = writeln!(
                    o,
                    "hit rate ceiling   {:.1}% of prompt tokens (unbounded cache)",
                    p.unbounded_hit_rate * 100.0
                );
                if let Some((n, rate)) = p.lru {
                    let _ = writeln!(
                        o,
                        "with an LRU cache  {:.1}% ({n} blocks, {} tokens)",
                        rate * 100.0,
                        n as u64 * u64::from(p.block_tokens)
                    );
                }
            }
        }
        if let Some(c) = &self.policies {
            o.push('\n');
            o.push_str(&c.render());
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::Trace;

    fn trace(lines: &[(u64, u32, &[u64])]) -> Trace {
        let text: String = lines
            .iter()
            .map(|(ts, len, ids)| {
                format!(
                    "{{\"timestamp\": {ts}, \"input_length\": {len}, \"output_length\": 2, \"hash_ids\": {ids:?}}}\n"
                )
            })
            .collect();
        Trace::parse_mooncake(text.as_bytes()).unwrap()
    }

    #[test]
    fn the_ceiling_counts_leading_blocks_seen_before() {
        let t = trace(&[
            (0, 1024, &[1, 2]),
            // Both blocks seen: 1024 of 1100 tokens (the third block is new).
            (1000, 1100, &[1, 2, 3]),
            // Block 1 seen, 4 new; 3 was seen but follows a miss, so it does not count.
            (2000, 1100, &[1, 4, 3]),
            // A cut last block counts its own length.
            (3000, 600, &[1, 2]),
        ]);
        let a = analyze(&t, Some(2));
        let p = a.prefix.unwrap();
        let expected = (1024 + 512 + 600) as f64 / (1024 + 1100 + 1100 + 600) as f64;
        assert!(
            (p.unbounded_hit_rate - expected).abs() < 1e-12,
            "{}",
            p.unbounded_hit_rate
        );
        assert_eq!((p.distinct_blocks, p.total_blocks), (4, 10));
        // With room for two blocks, only the second request's prefix survives.
        let (_, lru) = p.lru.unwrap();
        let expected_lru = 1024.0 / (1024 + 1100 + 1100 + 600) as f64;
        assert!((lru - expected_lru).abs() < 1e-12, "{lru}");
        assert_eq!(a.requests, 4);
        assert!((a.span_s - 3.0).abs() < 1e-12);
        assert_eq!(a.input_tokens.max, 1100.0);
    }

    #[test]
    fn policies_replay_blocks_against_belady() {
        let t = trace(&[
            (0, 1024, &[1, 2]),
            (1000, 1100, &[1, 2, 3]),
            (2000, 1100, &[1, 4, 3]),
            (3000, 600, &[1, 2]),
        ]);
        let kinds = policies_named(&["lru", "lru"]).unwrap();
        let c = compare_policies(&t, &kinds, &[2, 4], &PolicyConfig::default()).unwrap();
        // Two blocks of room: LRU keeps request two's prefix only; the optimum also keeps 1
        // for the last two requests (and declines 4, never used again).
        assert_eq!(c.rows[0].replays[0].hit_blocks, 2);
        assert_eq!(c.rows[1].replays[0].hit_blocks, 4);
        expect_test::expect![[r#"
            eviction policies: share of prompt blocks hit in one prefix cache, and of Belady's optimum
            capacity               2 (50%)          4 (100%)
                               hit  of opt       hit  of opt
            lru             20.00%   50.0%    50.00%  100.0%
            belady          40.00%  100.0%    50.00%  100.0%
            capacity in blocks of 512 tokens (and as a share of the 4 distinct blocks)
        "#]]
        .assert_eq(&c.render());
        assert_eq!(policies_named(&["all"]).unwrap(), PolicyKind::ALL);
        assert_eq!(policies_named(&["fifo", "nope"]).unwrap_err().name, "nope");
    }

    #[test]
    fn length_only_traces_have_no_prefix_figures() {
        let t = Trace::parse_azure("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.0,10,5\n".as_bytes())
            .unwrap();
        let a = analyze(&t, None);
        assert!(a.prefix.is_none());
        assert!(compare_policies(&t, &[PolicyKind::Lru], &[4], &PolicyConfig::default()).is_none());
        assert!(a.render().contains("no hash ids"));
    }
}
