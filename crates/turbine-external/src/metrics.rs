//! A server's Prometheus metrics read into the load report routers already use: running and
//! waiting requests, and KV cache usage where the server exports it.

use turbine_protocols::kv::WorkerLoad;

use crate::protocol::ServerKind;

/// One sample of the text exposition format: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    pub labels: Vec<(&'a str, String)>,
    pub value: f64,
}

/// Every sample in `text`; comments and lines that do not parse are skipped (a scrape is
/// read for a few gauges, and one odd line should not hide the rest).
pub fn samples(text: &str) -> Vec<Sample<'_>> {
    text.lines().filter_map(sample).collect()
}

fn sample(line: &str) -> Option<Sample<'_>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = open + line[open..].find('}')?;
            (&line[..open], parse_labels(&line[open + 1..close])?, &line[close + 1..])
        }
        None => {
            let space = line.find(char::is_whitespace)?;
            (&line[..space], Vec::new(), &line[space..])
        }
    };
    // A timestamp may follow the value.
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample { name, labels, value })
}

fn parse_labels(s: &str) -> Option<Vec<(&str, String)>> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let key = rest[..eq].trim();
        let after = rest[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        out.push((key, value));
        rest = after[end + 1..].trim_start().trim_start_matches(',').trim_start();
    }
    Some(out)
}

/// The names each server exports its load under (several where versions renamed them).
struct Names {
    running: &'static [&'static str],
    waiting: &'static [&'static str],
    /// KV cache in use, as a fraction of the whole.
    usage: &'static [&'static str],
}

fn names(kind: ServerKind) -> Names {
    match kind {
        ServerKind::Vllm => Names {
            running: &["vllm:num_requests_running"],
            waiting: &["vllm:num_requests_waiting"],
            usage: &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
        },
        ServerKind::Sglang => Names {
            running: &["sglang:num_running_reqs"],
            waiting: &["sglang:num_queue_reqs"],
            usage: &["sglang:token_usage"],
        },
        ServerKind::LlamaCpp => Names {
            running: &["llamacpp:requests_processing"],
            waiting: &["llamacpp:requests_deferred"],
            usage: &[],
        },
    }
}

/// What a scrape says of the server's KV cache size, where it says it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheInfo {
    pub block_size: Option<u32>,
    pub num_blocks: Option<u32>,
}

/// vLLM's `cache_config_info` carries its cache settings as labels.
pub fn cache_info(kind: ServerKind, text: &str) -> CacheInfo {
    if kind != ServerKind::Vllm {
        return CacheInfo::default();
    }
    let Some(s) = samples(text).into_iter().find(|s| s.name == "vllm:cache_config_info") else {
        return CacheInfo::default();
    };
    let label = |k: &str| s.labels.iter().find(|(n, _)| *n == k).and_then(|(_, v)| v.parse().ok());
    CacheInfo {
        block_size: label("block_size"),
        num_blocks: label("num_gpu_blocks"),
    }
}

/// The load a scrape reports. Gauges are summed over their label sets (a vLLM with data
/// parallel ranks reports each). `num_blocks` is the cache's size in the router's blocks,
/// which turns a usage fraction into blocks in use.
pub fn load(kind: ServerKind, text: &str, num_blocks: u32) -> WorkerLoad {
    let names = names(kind);
    let all = samples(text);
    let first_present = |wanted: &[&str]| -> Option<f64> {
        wanted.iter().find_map(|name| {
            let mut found = false;
            let sum = all
                .iter()
                .filter(|s| s.name == *name)
                .inspect(|_| found = true)
                .map(|s| s.value)
                .sum::<f64>();
            found.then_some(sum)
        })
    };
    let count = |v: Option<f64>| v.map_or(0, |v| v.clamp(0.0, f64::from(u32::MAX)) as u32);
    let usage = first_present(names.usage).map_or(0.0, |u| u.clamp(0.0, 1.0));
    WorkerLoad {
        active_seqs: count(first_present(names.running)),
        waiting_seqs: count(first_present(names.waiting)),
        blocks_in_use: (usage * f64::from(num_blocks)).round() as u32,
        blocks_total: num_blocks,
        active_prefill_tokens: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen"} 3.0
vllm:num_requests_running{engine="1",model_name="qwen"} 2.0
vllm:num_requests_waiting{engine="0",model_name="qwen"} 4.0
vllm:kv_cache_usage_perc{engine="0",model_name="qwen"} 0.25
vllm:cache_config_info{block_size="16",cache_dtype="auto",num_gpu_blocks="1000",prefix_caching_hash_algo="sha256"} 1.0
vllm:prompt_tokens_total{model_name="qwen"} 1234.0 1700000000000
"#;

    #[test]
    fn vllm_load_sums_ranks_and_scales_usage_to_blocks() {
        let load = load(ServerKind::Vllm, VLLM, 1000);
        assert_eq!(
            load,
            WorkerLoad {
                active_seqs: 5,
                waiting_seqs: 4,
                blocks_in_use: 250,
                blocks_total: 1000,
                active_prefill_tokens: 0,
            }
        );
        assert_eq!(
            cache_info(ServerKind::Vllm, VLLM),
            CacheInfo {
                block_size: Some(16),
                num_blocks: Some(1000)
            }
        );
    }

    #[test]
    fn older_names_and_other_servers() {
        let old = "vllm:gpu_cache_usage_perc 0.5\nvllm:num_requests_running 1\n";
        assert_eq!(load(ServerKind::Vllm, old, 10).blocks_in_use, 5);
        let sglang = "sglang:num_running_reqs{model_name=\"m\"} 7\nsglang:num_queue_reqs{model_name=\"m\"} 1\nsglang:token_usage{model_name=\"m\"} 0.1\n";
        let l = load(ServerKind::Sglang, sglang, 100);
        assert_eq!((l.active_seqs, l.waiting_seqs, l.blocks_in_use), (7, 1, 10));
        let llama =
            "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 2\nllamacpp:requests_deferred 3\n";
        let l = load(ServerKind::LlamaCpp, llama, 0);
        assert_eq!((l.active_seqs, l.waiting_seqs, l.blocks_in_use), (2, 3, 0));
    }

    #[test]
    fn labels_with_escapes_and_junk_lines() {
        let text = "m{a=\"x\\\"y\",b=\"1\"} 2\nnot a sample\nm 3 17\nn{} NaN\n";
        let s = samples(text);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].labels, vec![("a", "x\"y".to_owned()), ("b", "1".to_owned())]);
        assert_eq!(s[1].value, 3.0);
        assert!(s[2].value.is_nan());
    }
}
