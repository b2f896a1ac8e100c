//! Request traces: Mooncake JSONL (with the hash ids of each prompt's 512-token blocks) and
//! Azure LLM inference CSV (lengths only), parsed into one shape with arrival offsets.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Tokens per hash id in Mooncake traces.
pub const MOONCAKE_BLOCK_TOKENS: u32 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceFormat {
    Mooncake,
    Azure,
}

impl TraceFormat {
    /// `.csv` files are Azure traces; anything else is read as Mooncake JSONL.
    pub fn from_path(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("csv") => TraceFormat::Azure,
            _ => TraceFormat::Mooncake,
        }
    }
}

/// One request of a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceRequest {
    /// Arrival, relative to the trace's first request.
    pub at: Duration,
    pub input_length: u32,
    pub output_length: u32,
    /// Ids of the prompt's consecutive blocks of [`Trace::block_tokens`] tokens; equal ids mean
    /// equal token blocks. Empty for traces that carry lengths only.
    pub hash_ids: Vec<u64>,
}

#[derive(Debug, Clone)]
pub struct Trace {
    pub format: TraceFormat,
    /// Tokens per hash id.
    pub block_tokens: u32,
    /// In arrival order.
    pub requests: Vec<TraceRequest>,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("line {line}: {message}")]
    Line { line: usize, message: String },
    #[error("the trace has no requests")]
    Empty,
}

impl TraceError {
    fn line(line: usize, message: impl Into<String>) -> Self {
        TraceError::Line {
            line,
            message: message.into(),
        }
    }
}

impl Trace {
    /// Reads a trace, choosing the format by extension (see [`TraceFormat::from_path`]).
    pub fn load(path: &Path) -> Result<Trace, TraceError> {
        let io = |source| TraceError::Io {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let reader = std::io::BufReader::new(file);
        match TraceFormat::from_path(path) {
            TraceFormat::Mooncake => Self::parse_mooncake(reader),
            TraceFormat::Azure => Self::parse_azure(reader),
        }
    }

    /// Mooncake JSONL: one `{"timestamp": ms, "input_length", "output_length", "hash_ids"}`
    /// object per line; blank lines are skipped.
    pub fn parse_mooncake(reader: impl BufRead) -> Result<Trace, TraceError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Line {
            timestamp: f64,
            input_length: u32,
            output_length: u32,
            hash_ids: Vec<u64>,
        }
        let mut requests = Vec::new();
        for (i, line) in reader.lines().enumerate() {
            let n = i + 1;
            let line = line.map_err(|e| TraceError::line(n, e.to_string()))?;
            if line.trim().is_empty() {
                continue;
            }
            let l: Line = serde_json::from_str(&line).map_err(|e| TraceError::line(n, e.to_string()))?;
            if !(l.timestamp.is_finite() && l.timestamp >= 0.0) {
                return Err(TraceError::line(
                    n,
                    format!("timestamp {} is not a time in ms", l.timestamp),
                ));
            }
            if l.input_length == 0 {
                return Err(TraceError::line(n, "input_length is 0"));
            }
            let blocks = l.input_length.div_ceil(MOONCAKE_BLOCK_TOKENS) as usize;
            if l.hash_ids.len() != blocks {
                return Err(TraceError::line(
                    n,
                    format!(
                        "{} hash ids for input_length {} (blocks of {MOONCAKE_BLOCK_TOKENS} tokens need {blocks})",
                        l.hash_ids.len(),
                        l.input_length
                    ),
                ));
            }
            requests.push(TraceRequest {
                at: Duration::from_secs_f64(l.timestamp / 1000.0),
                input_length: l.input_length,
                output_length: l.output_length,
                hash_ids: l.hash_ids,
            });
        }
        Self::finish(TraceFormat::Mooncake, MOONCAKE_BLOCK_TOKENS, requests)
    }

    /// Azure LLM inference CSV: `TIMESTAMP,ContextTokens,GeneratedTokens` with timestamps like
    /// `2023-11-16 18:15:46.6805900`.
    pub fn parse_azure(reader: impl BufRead) -> Result<Trace, TraceError> {
        let mut lines = reader.lines().enumerate();
        match lines.next() {
            Some((_, Ok(h))) if h.trim().eq_ignore_ascii_case("TIMESTAMP,ContextTokens,GeneratedTokens") => {}
            Some((_, Ok(h))) => {
                return Err(TraceError::line(
                    1,
                    format!("expected the header TIMESTAMP,ContextTokens,GeneratedTokens, got {h:?}"),
                ))
            }
            Some((_, Err(e))) => return Err(TraceError::line(1, e.to_string())),
            None => return Err(TraceError::Empty),
        }
        let mut stamped = Vec::new();
        for (i, line) in lines {
            let n = i + 1;
            let line = line.map_err(|e| TraceError::line(n, e.to_string()))?;
            if line.trim().is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.trim().split(',').collect();
            let [ts, input, output] = fields[..] else {
                return Err(TraceError::line(
                    n,
                    format!("expected 3 fields, got {}: {line:?}", fields.len()),
                ));
            };
            let micros =
                parse_datetime_micros(ts).ok_or_else(|| TraceError::line(n, format!("bad timestamp {ts:?}")))?;
            let count = |what: &str, v: &str| {
                v.trim()
                    .parse::<u32>()
                    .map_err(|_| TraceError::line(n, format!("{what} {v:?} is not a token count")))
            };
            let input_length = count("ContextTokens", input)?;
            if input_length == 0 {
                return Err(TraceError::line(n, "ContextTokens is 0"));
            }
            stamped.push((micros, input_length, count("GeneratedTokens", output)?));
        }
        let first = stamped.iter().map(|s| s.0).min().unwrap_or(0);
        let requests = stamped
            .into_iter()
            .map(|(micros, input_length, output_length)| TraceRequest {
                at: Duration::from_micros((micros - first) as u64),
                input_length,
                output_length,
                hash_ids: Vec::new(),
            })
            .collect();
        Self::finish(TraceFormat::Azure, 0, requests)
    }

    fn finish(format: TraceFormat, block_tokens: u32, mut requests: Vec<TraceRequest>) -> Result<Trace, TraceError> {
        if requests.is_empty() {
            return Err(TraceError::Empty);
        }
        // Stable, so requests with equal timestamps keep the file's order.
        requests.sort_by_key(|r| r.at);
        let first = requests[0].at;
        for r in &mut requests {
            r.at -= first;
        }
        Ok(Trace {
            format,
            block_tokens,
            requests,
        })
    }

    /// Time from the first arrival to the last.
    pub fn span(&self) -> Duration {
        self.requests.last().map_or(Duration::ZERO, |r| r.at)
    }
}

/// Microseconds since the Unix epoch of `YYYY-MM-DD HH:MM:SS[.fraction]` (UTC, any number of
/// fraction digits).
fn parse_datetime_micros(s: &str) -> Option<i64> {
    let (date, time) = s.trim().split_once([' ', 'T'])?;
    let mut d = date.split('-');
    let (y, m, day): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    if d.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':');
    let (hh, mm, ss): (i64, i64, i64) = (
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
    );
    if t.next().is_some() || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let micros_frac: i64 = format!("{frac:0<6}")[..6].parse().ok()?;
    let days = days_from_civil(y, m, day);
    Some(((days * 86_400 + hh * 3_600 + mm * 60 + ss) * 1_000_000) + micros_frac)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mooncake(text: &str) -> Result<Trace, TraceError> {
        Trace::parse_mooncake(text.as_bytes())
    }

    fn azure(text: &str) -> Result<Trace, TraceError> {
        Trace::parse_azure(text.as_bytes())
    }

    #[test]
    fn mooncake_lines_become_requests_in_arrival_order() {
        let t = mooncake(concat!(
            r#"{"timestamp": 40, "input_length": 600, "output_length": 3, "hash_ids": [0, 2]}"#,
            "\n\n",
            r#"{"timestamp": 10, "input_length": 512, "output_length": 6, "hash_ids": [0]}"#,
            "\n",
        ))
        .unwrap();
        assert_eq!(t.block_tokens, 512);
        assert_eq!(t.requests.len(), 2);
        assert_eq!(t.requests[0].hash_ids, vec![0]);
        assert_eq!(t.requests[0].at, Duration::ZERO);
        assert_eq!(t.requests[1].at, Duration::from_millis(30));
        assert_eq!(t.span(), Duration::from_millis(30));
    }

    #[test]
    fn malformed_mooncake_lines_are_named() {
        let good = r#"{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}"#;
        let cases = [
            ("{not json", "line 2: key must be a string"),
            (
                r#"{"timestamp": 0, "input_length": 10, "output_length": 1}"#,
                "line 2: missing field `hash_ids`",
            ),
            (
                r#"{"timestamp": 0, "input_length": 1025, "output_length": 1, "hash_ids": [1, 2]}"#,
                "line 2: 2 hash ids for input_length 1025 (blocks of 512 tokens need 3)",
            ),
            (
                r#"{"timestamp": -5, "input_length": 10, "output_length": 1, "hash_ids": [1]}"#,
                "line 2: timestamp -5 is not a time in ms",
            ),
            (
                r#"{"timestamp": 0, "input_length": 0, "output_length": 1, "hash_ids": []}"#,
                "line 2: input_length is 0",
            ),
            (
                r#"{"timestamp": 0, "input_length": 10, "output_length": -1, "hash_ids": [1]}"#,
                "line 2: invalid value: integer `-1`",
            ),
            (
                r#"{"timestamp": 0, "input_length": 10, "output_len": 1, "hash_ids": [1]}"#,
                "line 2: unknown field `output_len`",
            ),
        ];
        for (bad, expected) in cases {
            let err = mooncake(&format!("{good}\n{bad}\n")).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{bad}: {err}");
        }
        assert!(matches!(mooncake("\n\n"), Err(TraceError::Empty)));
    }

    #[test]
    fn azure_rows_become_offsets_from_the_first() {
        let t = azure(concat!(
            "TIMESTAMP,ContextTokens,GeneratedTokens\n",
            "2023-11-16 23:59:59.5000000,374,44\n",
            "2023-11-17 00:00:01.2500,396,109\n",
        ))
        .unwrap();
        assert_eq!(t.format, TraceFormat::Azure);
        assert_eq!(t.requests[1].at, Duration::from_millis(1750));
        assert_eq!((t.requests[1].input_length, t.requests[1].output_length), (396, 109));
        assert!(t.requests[0].hash_ids.is_empty());
    }

    #[test]
    fn malformed_azure_rows_are_named() {
        let header = "TIMESTAMP,ContextTokens,GeneratedTokens\n";
        let cases = [
            ("2023-11-16 18:15:46.6805900,374\n", "line 2: expected 3 fields, got 2"),
            (
                "2023-13-16 18:15:46,374,44\n",
                "line 2: bad timestamp \"2023-13-16 18:15:46\"",
            ),
            (
                "2023-11-16 18:15:46,many,44\n",
                "line 2: ContextTokens \"many\" is not a token count",
            ),
            ("2023-11-16 18:15:46,0,44\n", "line 2: ContextTokens is 0"),
        ];
        for (bad, expected) in cases {
            let err = azure(&format!("{header}{bad}")).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{bad}: {err}");
        }
        let err = azure("time,in,out\n").unwrap_err().to_string();
        assert!(err.starts_with("line 1: expected the header"), "{err}");
    }

    #[test]
    fn the_shared_traces_parse() {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
        let mooncake = Trace::load(&data.join("synthetic_trace.jsonl")).unwrap();
        assert_eq!(mooncake.requests.len(), 3993);
        let azure = Trace::load(&data.join("AzureLLMInferenceTrace_conv.csv")).unwrap();
        assert_eq!(azure.requests.len(), 19366);
    }

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(parse_datetime_micros("1970-01-02 00:00:01.5"), Some(86_401_500_000));
    }
}
