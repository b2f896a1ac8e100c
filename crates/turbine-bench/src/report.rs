//! A run's result file (summary, throughput timeline, per-request records), the summary printed
//! after a run, and the side-by-side table of several results.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::client::RequestRecord;
use crate::stats::Distribution;

/// Service-level objective for goodput: a request counts when both hold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sla {
    pub ttft_ms: f64,
    /// Bound on the request's mean gap between tokens (its TPOT).
    pub itl_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Goodput {
    pub sla: Sla,
    pub requests_per_s: f64,
    /// Share of all sent requests that met the SLA.
    pub fraction: f64,
}

/// What was run, for the reader of a result file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub label: String,
    pub url: String,
    pub model: String,
    pub endpoint: String,
    pub workload: String,
    pub arrival: String,
    /// Seconds since the Unix epoch when the run started.
    pub started_at: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub requests: usize,
    pub completed: usize,
    pub errors: BTreeMap<String, usize>,
    /// From the first request sent to the last one ended.
    pub duration_s: f64,
    pub request_throughput: f64,
    pub input_token_throughput: f64,
    pub output_token_throughput: f64,
    pub ttft_ms: Option<Distribution>,
    /// Every gap between consecutive output chunks of every request.
    pub itl_ms: Option<Distribution>,
    /// Per request: (end-to-end − TTFT) / (output tokens − 1).
    pub tpot_ms: Option<Distribution>,
    pub e2e_ms: Option<Distribution>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Prompt tokens served from the server's cache, where it reports them.
    pub cached_tokens: u64,
    /// `cached_tokens / input_tokens` over the requests whose server reported a cached count.
    pub cache_hit_rate: Option<f64>,
    pub goodput: Option<Goodput>,
}

impl Summary {
    pub fn of(records: &[RequestRecord], duration_s: f64, sla: Option<Sla>) -> Self {
        let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.error.is_none()).collect();
        let mut errors = BTreeMap::new();
        for e in records.iter().filter_map(|r| r.error) {
            *errors.entry(e.to_string()).or_insert(0) += 1;
        }
        let ms = |v: Vec<f64>| Distribution::of(v).map(|d| d.scaled(1000.0));
        let input_tokens: u64 = ok.iter().map(|r| u64::from(r.input_tokens)).sum();
        let output_tokens: u64 = ok.iter().map(|r| u64::from(r.output_tokens)).sum();
        let reported: Vec<&&RequestRecord> = ok.iter().filter(|r| r.cached_tokens.is_some()).collect();
        let cached_tokens: u64 = reported.iter().filter_map(|r| r.cached_tokens).map(u64::from).sum();
        let reported_input: u64 = reported.iter().map(|r| u64::from(r.input_tokens)).sum();
        let per_s = |n: f64| if duration_s > 0.0 { n / duration_s } else { 0.0 };
        let goodput = sla.map(|sla| {
            let good = ok
                .iter()
                .filter(|r| {
                    r.ttft.is_some_and(|t| t * 1000.0 <= sla.ttft_ms)
                        && r.tpot().is_none_or(|t| t * 1000.0 <= sla.itl_ms)
                })
                .count();
            Goodput {
                sla,
                requests_per_s: per_s(good as f64),
                fraction: if records.is_empty() {
                    0.0
                } else {
                    good as f64 / records.len() as f64
                },
            }
        });
        Summary {
            requests: records.len(),
            completed: ok.len(),
            errors,
            duration_s,
            request_throughput: per_s(ok.len() as f64),
            input_token_throughput: per_s(input_tokens as f64),
            output_token_throughput: per_s(output_tokens as f64),
            ttft_ms: ms(ok.iter().filter_map(|r| r.ttft).collect()),
            itl_ms: ms(ok.iter().flat_map(|r| r.itl.iter().copied()).collect()),
            tpot_ms: ms(ok.iter().filter_map(|r| r.tpot()).collect()),
            e2e_ms: ms(ok.iter().map(|r| r.e2e).collect()),
            input_tokens,
            output_tokens,
            cached_tokens,
            cache_hit_rate: (reported_input > 0).then(|| cached_tokens as f64 / reported_input as f64),
            goodput,
        }
    }
}

/// Everything a run produced; written as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchResult {
    pub meta: Meta,
    pub summary: Summary,
    /// Width of a timeline bin, seconds.
    pub timeline_bin_s: f64,
    /// Output tokens received per second, bin by bin from the start of the run.
    pub output_tokens_per_s: Vec<f64>,
    pub records: Vec<RequestRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a bench result: {source}", path.display())]
    Parse {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl BenchResult {
    pub fn new(meta: Meta, records: Vec<RequestRecord>, duration_s: f64, sla: Option<Sla>) -> Self {
        let summary = Summary::of(&records, duration_s, sla);
        let bin = timeline_bin(duration_s);
        Self {
            meta,
            summary,
            timeline_bin_s: bin,
            output_tokens_per_s: timeline(&records, duration_s, bin),
            records,
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), ReportError> {
        let io = |source| ReportError::Io {
            path: path.to_owned(),
            source,
        };
        let json = serde_json::to_vec_pretty(self).map_err(|e| io(std::io::Error::other(e)))?;
        std::fs::write(path, json).map_err(io)
    }

    pub fn load(path: &Path) -> Result<Self, ReportError> {
        let bytes = std::fs::read(path).map_err(|source| ReportError::Io {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| ReportError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// The summary as printed at the end of a run.
    pub fn render(&self) -> String {
        let s = &self.summary;
        let mut o = String::new();
        let _ = writeln!(o, "{}: {}", self.meta.label, self.meta.workload);
        let _ = writeln!(
            o,
            "  {} {} at {} ({})",
            self.meta.model, self.meta.endpoint, self.meta.url, self.meta.arrival
        );
        let _ = writeln!(
            o,
            "  requests {} completed {} failed {}{} in {:.1} s",
            s.requests,
            s.completed,
            s.requests - s.completed,
            if s.errors.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    s.errors
                        .iter()
                        .map(|(k, v)| format!("{k}: {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
            s.duration_s
        );
        let _ = writeln!(
            o,
            "  throughput {:.2} req/s, {:.1} output tok/s, {:.1} input tok/s",
            s.request_throughput, s.output_token_throughput, s.input_token_throughput
        );
        let _ = writeln!(
            o,
            "  {:<10}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "ms", "mean", "p50", "p90", "p99", "max"
        );
        for (name, d) in [
            ("TTFT", s.ttft_ms),
            ("ITL", s.itl_ms),
            ("TPOT", s.tpot_ms),
            ("E2E", s.e2e_ms),
        ] {
            match d {
                Some(d) => {
                    let _ = writeln!(
                        o,
                        "  {name:<10}{:>10.1}{:>10.1}{:>10.1}{:>10.1}{:>10.1}",
                        d.mean, d.p50, d.p90, d.p99, d.max
                    );
                }
                None => {
                    let _ = writeln!(o, "  {name:<10}{:>10}", "-");
                }
            }
        }
        match s.cache_hit_rate {
            Some(h) => {
                let _ = writeln!(
                    o,
                    "  prompt cache hit rate {:.1}% ({} of {} tokens)",
                    h * 100.0,
                    s.cached_tokens,
                    s.input_tokens
                );
            }
            None => {
                let _ = writeln!(o, "  prompt cache hit rate: not reported by the server");
            }
        }
        if let Some(g) = &s.goodput {
            let _ = writeln!(
                o,
                "  goodput {:.2} req/s ({:.1}% of requests within TTFT {} ms and ITL {} ms)",
                g.requests_per_s,
                g.fraction * 100.0,
                g.sla.ttft_ms,
                g.sla.itl_ms
            );
        }
        o
    }
}

/// About 100 bins over the run, at least 100 ms each.
fn timeline_bin(duration_s: f64) -> f64 {
    (duration_s / 100.0).max(0.1)
}

/// Output tokens per second in each bin, spreading a request's tokens over its chunks' times.
fn timeline(records: &[RequestRecord], duration_s: f64, bin: f64) -> Vec<f64> {
    let bins = ((duration_s / bin).ceil() as usize).max(1);
    let mut counts = vec![0.0; bins];
    for r in records {
        let Some(ttft) = r.ttft else { continue };
        // The server may pack several tokens into a chunk: each chunk gets an equal share.
        let chunks = r.itl.len() + 1;
        let per_chunk = f64::from(r.output_tokens.max(1)) / chunks as f64;
        let mut t = r.start + ttft;
        for gap in std::iter::once(0.0).chain(r.itl.iter().copied()) {
            t += gap;
            let i = ((t / bin) as usize).min(bins - 1);
            counts[i] += per_chunk;
        }
    }
    counts.iter().map(|c| c / bin).collect()
}

/// Several results side by side: one column per result, one row per figure.
pub fn compare_table(results: &[BenchResult]) -> String {
    type Row = (&'static str, fn(&Summary) -> Option<f64>, &'static str);
    let rows: &[Row] = &[
        ("requests completed", |s| Some(s.completed as f64), "{:.0}"),
        ("failed", |s| Some((s.requests - s.completed) as f64), "{:.0}"),
        ("duration s", |s| Some(s.duration_s), "{:.1}"),
        ("requests/s", |s| Some(s.request_throughput), "{:.2}"),
        ("output tok/s", |s| Some(s.output_token_throughput), "{:.1}"),
        ("TTFT p50 ms", |s| s.ttft_ms.map(|d| d.p50), "{:.1}"),
        ("TTFT p90 ms", |s| s.ttft_ms.map(|d| d.p90), "{:.1}"),
        ("TTFT p99 ms", |s| s.ttft_ms.map(|d| d.p99), "{:.1}"),
        ("ITL p50 ms", |s| s.itl_ms.map(|d| d.p50), "{:.2}"),
        ("ITL p99 ms", |s| s.itl_ms.map(|d| d.p99), "{:.2}"),
        ("TPOT p50 ms", |s| s.tpot_ms.map(|d| d.p50), "{:.2}"),
        ("E2E p50 ms", |s| s.e2e_ms.map(|d| d.p50), "{:.1}"),
        ("cache hit rate %", |s| s.cache_hit_rate.map(|h| h * 100.0), "{:.1}"),
        (
            "goodput req/s",
            |s| s.goodput.as_ref().map(|g| g.requests_per_s),
            "{:.2}",
        ),
    ];
    let labels: Vec<&str> = results.iter().map(|r| r.meta.label.as_str()).collect();
    let width = labels.iter().map(|l| l.len()).max().unwrap_or(0).max(10) + 2;
    let mut o = format!("{:<20}", "");
    for l in &labels {
        let _ = write!(o, "{l:>width$}");
    }
    o.push('\n');
    for (name, get, fmt) in rows {
        let _ = write!(o, "{name:<20}");
        for r in results {
            let cell = match get(&r.summary) {
                None => "-".to_owned(),
                Some(v) => match *fmt {
                    "{:.0}" => format!("{v:.0}"),
                    "{:.1}" => format!("{v:.1}"),
                    _ => format!("{v:.2}"),
                },
            };
            let _ = write!(o, "{cell:>width$}");
        }
        o.push('\n');
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ErrorKind;

    fn record(start: f64, ttft: f64, itl: &[f64], input: u32, cached: Option<u32>) -> RequestRecord {
        RequestRecord {
            start,
            ttft: Some(ttft),
            e2e: ttft + itl.iter().sum::<f64>(),
            itl: itl.to_vec(),
            input_tokens: input,
            output_tokens: itl.len() as u32 + 1,
            cached_tokens: cached,
            error: None,
        }
    }

    #[test]
    fn summary_counts_latencies_hits_and_goodput() {
        let records = vec![
            record(0.0, 0.1, &[0.01, 0.01, 0.01], 100, Some(50)),
            record(0.5, 0.3, &[0.02, 0.04], 100, Some(0)),
            RequestRecord {
                start: 1.0,
                e2e: 0.2,
                error: Some(ErrorKind::Http(503)),
                ..Default::default()
            },
        ];
        let s = Summary::of(
            &records,
            2.0,
            Some(Sla {
                ttft_ms: 200.0,
                itl_ms: 20.0,
            }),
        );
        assert_eq!((s.requests, s.completed), (3, 2));
        assert_eq!(s.errors.get("http_503"), Some(&1));
        assert_eq!(s.output_tokens, 7);
        assert!((s.output_token_throughput - 3.5).abs() < 1e-9);
        assert!((s.cache_hit_rate.unwrap() - 0.25).abs() < 1e-9);
        let ttft = s.ttft_ms.unwrap();
        assert!((ttft.p50 - 200.0).abs() < 1e-9);
        assert_eq!(s.itl_ms.unwrap().count, 5);
        // Only the first request is within 200 ms TTFT and 20 ms per token.
        let g = s.goodput.unwrap();
        assert!((g.fraction - 1.0 / 3.0).abs() < 1e-9);
        assert!((g.requests_per_s - 0.5).abs() < 1e-9);
    }

    #[test]
    fn timeline_puts_tokens_where_they_arrived() {
        let records = vec![record(0.0, 0.05, &[0.1, 0.1], 1, None), record(0.9, 0.05, &[], 1, None)];
        let t = timeline(&records, 1.0, 0.1);
        assert_eq!(t.len(), 10);
        let tokens: f64 = t.iter().map(|x| x * 0.1).sum();
        assert!((tokens - 4.0).abs() < 1e-9);
        assert!((t[0] - 10.0).abs() < 1e-9, "{t:?}");
        assert!((t[9] - 10.0).abs() < 1e-9, "late tokens land in the last bin: {t:?}");
    }

    #[test]
    fn results_round_trip_and_compare() {
        let meta = |label: &str| Meta {
            label: label.into(),
            url: "http://x".into(),
            model: "m".into(),
            endpoint: "completions".into(),
            workload: "w".into(),
            arrival: "a".into(),
            started_at: 0,
        };
        let a = BenchResult::new(meta("kv"), vec![record(0.0, 0.1, &[0.01], 10, Some(5))], 1.0, None);
        let b = BenchResult::new(
            meta("round-robin"),
            vec![record(0.0, 0.4, &[0.01], 10, Some(0))],
            1.0,
            None,
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        a.save(&path).unwrap();
        let back = BenchResult::load(&path).unwrap();
        // JSON keeps floats to their shortest round-trip form, which may differ in the last bit.
        assert_eq!(
            compare_table(std::slice::from_ref(&back)),
            compare_table(std::slice::from_ref(&a))
        );
        assert_eq!(back.records.len(), 1);
        let table = compare_table(&[back, b]);
        expect_test::expect![[r#"
                                           kv  round-robin
            requests completed              1            1
            failed                          0            0
            duration s                    1.0          1.0
            requests/s                   1.00         1.00
            output tok/s                  2.0          2.0
            TTFT p50 ms                 100.0        400.0
            TTFT p90 ms                 100.0        400.0
            TTFT p99 ms                 100.0        400.0
            ITL p50 ms                  10.00        10.00
            ITL p99 ms                  10.00        10.00
            TPOT p50 ms                 10.00        10.00
            E2E p50 ms                  110.0        410.0
            cache hit rate %             50.0          0.0
            goodput req/s                   -            -
        "#]]
        .assert_eq(&table);
        let err = BenchResult::load(&dir.path().join("missing.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.json"), "{err}");
    }
}
