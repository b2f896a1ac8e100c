//! The KV event feed against a real ZeroMQ publisher: pyzmq and msgspec laying batches out as
//! vLLM and SGLang do (`tests/fixtures/kv_publisher.py`), over TCP on free ports.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use turbine_external::kv_events::{BlockSizeMismatch, KvEventFeed, KvEventsConfig};
use turbine_protocols::kv::{CachedBlock, KvEvent, KvEventData, StorageTier, StoredBlock};
use turbine_tokens::block_hashes;

const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/sdk-venv/bin/python");
const PUBLISHER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kv_publisher.py");
const BS: usize = 16;
/// Generous: the machine may be busy building.
const DEADLINE: Duration = Duration::from_secs(30);

struct Publisher {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    endpoint: String,
    replay_endpoint: String,
}

impl Publisher {
    async fn start(args: &[&str]) -> anyhow::Result<Self> {
        ensure!(
            Path::new(PYTHON).exists(),
            "{PYTHON} is missing: run scripts/install-test-tools (the test needs its venv with pyzmq and msgspec)"
        );
        let mut child = Command::new(PYTHON)
            .arg(PUBLISHER)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {PUBLISHER}"))?;
        let stdin = child.stdin.take().context("the publisher's stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("the publisher's stdout")?).lines();
        let first = tokio::time::timeout(DEADLINE, stdout.next_line())
            .await
            .context("the publisher did not print its endpoints")??
            .context(
                "the publisher exited before printing its endpoints (its error is above; \
                 run scripts/install-test-tools if pyzmq or msgspec is missing)",
            )?;
        let endpoints: Value = serde_json::from_str(&first).with_context(|| format!("endpoints line {first:?}"))?;
        let endpoint = |key: &str| {
            endpoints[key]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("no {key} in {first:?}"))
        };
        Ok(Self {
            endpoint: endpoint("endpoint")?,
            replay_endpoint: endpoint("replay_endpoint")?,
            child,
            stdin,
            stdout,
        })
    }

    /// Publishes one batch (or, not `live`, only buffers it for replay); returns its seq.
    async fn batch(&mut self, events: Vec<Value>, live: bool) -> anyhow::Result<u64> {
        let mut line = json!({ "events": events, "live": live }).to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.flush().await?;
        let answer = tokio::time::timeout(DEADLINE, self.stdout.next_line())
            .await
            .context("the publisher did not answer")??
            .context("the publisher exited")?;
        let answer: Value = serde_json::from_str(&answer)?;
        answer["seq"].as_u64().with_context(|| format!("no seq in {answer}"))
    }

    fn port(endpoint: &str) -> anyhow::Result<&str> {
        endpoint
            .rsplit_once(':')
            .map(|(_, p)| p)
            .context("an endpoint with a port")
    }

    fn config(&self, replay: bool) -> KvEventsConfig {
        KvEventsConfig {
            endpoint: self.endpoint.clone(),
            replay_endpoint: replay.then(|| self.replay_endpoint.clone()),
            topic: String::new(),
            block_size: BS,
        }
    }
}

fn prompt(blocks: usize, salt: u32) -> Vec<u32> {
    (0..(blocks * BS + 3) as u32).map(|i| i * 31 + salt).collect()
}

fn store(prompt: &[u32], from: usize, to: usize) -> Value {
    json!({ "op": "store", "prompt": prompt, "blocks": [from, to] })
}

fn remove(prompt: &[u32], blocks: &[usize]) -> Value {
    json!({ "op": "remove", "prompt": prompt, "blocks": blocks })
}

/// The router's view of the engine's device tier, from the feed's events.
#[derive(Default)]
struct Replica {
    next_id: u64,
    blocks: HashMap<u64, CachedBlock>,
    events: Vec<KvEvent>,
}

impl Replica {
    fn apply(&mut self, batch: Vec<KvEvent>) {
        for event in batch {
            assert_eq!(event.event_id, self.next_id, "event ids have no gaps");
            self.next_id += 1;
            match &event.data {
                KvEventData::Stored {
                    parent_hash,
                    blocks,
                    tier,
                } if tier.is_device() => {
                    let mut parent = *parent_hash;
                    for &block in blocks {
                        self.blocks.insert(
                            block.sequence_hash,
                            CachedBlock {
                                parent_hash: parent,
                                block,
                                tier: *tier,
                            },
                        );
                        parent = Some(block.sequence_hash);
                    }
                }
                KvEventData::Stored { .. } => {}
                KvEventData::Removed { tier, .. } if !tier.is_device() => {}
                KvEventData::Removed { sequence_hashes, .. } => {
                    for h in sequence_hashes {
                        self.blocks.remove(h);
                    }
                }
                KvEventData::Cleared => self.blocks.clear(),
            }
            self.events.push(event);
        }
    }

    /// Applies the feed's batches until the replica holds exactly `expected`.
    async fn until_holds(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Vec<KvEvent>>,
        expected: &[StoredBlock],
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !self.holds(expected) {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(batch)) => self.apply(batch),
                Ok(None) => bail!("the feed stopped"),
                Err(_) => bail!(
                    "the replica holds {:?}, not {expected:?}, after {:?}",
                    self.blocks.values().collect::<Vec<_>>(),
                    self.events
                ),
            }
        }
        Ok(())
    }

    fn holds(&self, expected: &[StoredBlock]) -> bool {
        self.blocks.len() == expected.len()
            && expected
                .iter()
                .all(|b| self.blocks.get(&b.sequence_hash).is_some_and(|c| c.block == *b))
    }
}

/// The router's hashes of blocks `from..to` of `prompt`.
fn turbine(prompt: &[u32], from: usize, to: usize) -> Vec<StoredBlock> {
    block_hashes(prompt, BS)[from..to]
        .iter()
        .map(|b| StoredBlock {
            sequence_hash: b.sequence,
            local_hash: b.local,
        })
        .collect()
}

/// The blocks of the feed's snapshot in `tier`.
fn snapshot_tier(feed: &KvEventFeed, tier: StorageTier) -> Vec<StoredBlock> {
    feed.snapshot()
        .blocks
        .into_iter()
        .filter(|b| b.tier == tier)
        .map(|b| b.block)
        .collect()
}

fn snapshot_blocks(feed: &KvEventFeed) -> Vec<StoredBlock> {
    snapshot_tier(feed, StorageTier::Device)
}

async fn until(what: &str, mut condition: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        ensure!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Publishes empty batches until the feed applies one: a PUB drops what it sends before
/// a subscription reaches it. Returns the feed's applied batch count then.
async fn until_subscribed(publisher: &mut Publisher, feed: &KvEventFeed) -> anyhow::Result<u64> {
    let start = feed.stats().batches;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the feed never received a batch"
        );
        publisher.batch(vec![], true).await?;
        let wait = tokio::time::Instant::now() + Duration::from_millis(200);
        while tokio::time::Instant::now() < wait {
            if feed.stats().batches > start {
                return Ok(feed.stats().batches);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test]
async fn a_late_joiner_learns_earlier_blocks_through_replay() -> anyhow::Result<()> {
    let mut publisher = Publisher::start(&["--format", "map", "--hashes", "bytes"]).await?;
    let a = prompt(4, 1);
    let b = prompt(2, 2);
    publisher.batch(vec![store(&a, 0, 2)], true).await?;
    publisher
        .batch(
            vec![
                store(&a, 2, 4),
                json!({ "op": "store", "prompt": b, "blocks": [0, 2], "medium": "CPU" }),
            ],
            true,
        )
        .await?;

    let cancel = CancellationToken::new();
    let feed = KvEventFeed::start(publisher.config(true), cancel.clone());
    let mut rx = feed.subscribe();
    let mut replica = Replica::default();
    replica.until_holds(&mut rx, &turbine(&a, 0, 4)).await?;
    assert!(feed.connected());
    assert_eq!(snapshot_blocks(&feed), turbine(&a, 0, 4), "parents first, as stored");

    until_subscribed(&mut publisher, &feed).await?;
    publisher.batch(vec![remove(&a, &[3])], true).await?;
    replica.until_holds(&mut rx, &turbine(&a, 0, 3)).await?;
    let removal = replica.events.last().map(|e| e.data.clone());
    assert_eq!(
        removal,
        Some(KvEventData::Removed {
            sequence_hashes: vec![turbine(&a, 3, 4)[0].sequence_hash],
            tier: StorageTier::Device,
        })
    );
    assert_eq!(snapshot_blocks(&feed), turbine(&a, 0, 3));
    // The blocks vLLM reported in its CPU offloading tier are the router's host tier.
    assert_eq!(snapshot_tier(&feed, StorageTier::Host), turbine(&b, 0, 2));
    let stats = feed.stats();
    assert_eq!((stats.skipped_medium, stats.decode_errors, stats.resets), (0, 0, 0));
    assert_eq!(stats.block_size_mismatch, None);
    cancel.cancel();
    until("the feed to stop", || !feed.connected()).await
}

#[tokio::test]
async fn a_gap_is_filled_by_replay() -> anyhow::Result<()> {
    let mut publisher = Publisher::start(&["--format", "array", "--hashes", "int", "--dp-rank", "0"]).await?;
    let cancel = CancellationToken::new();
    let feed = KvEventFeed::start(publisher.config(true), cancel.clone());
    let mut rx = feed.subscribe();
    until_subscribed(&mut publisher, &feed).await?;

    let a = prompt(3, 1);
    publisher.batch(vec![store(&a, 0, 1)], true).await?;
    publisher.batch(vec![store(&a, 1, 2)], false).await?;
    publisher.batch(vec![store(&a, 2, 3)], true).await?;
    let mut replica = Replica::default();
    replica.until_holds(&mut rx, &turbine(&a, 0, 3)).await?;
    let stats = feed.stats();
    assert!(stats.gaps >= 1, "{stats:?}");
    assert_eq!((stats.resets, stats.unknown_parent), (0, 0));
    assert_eq!(snapshot_blocks(&feed), turbine(&a, 0, 3));
    cancel.cancel();
    Ok(())
}

#[tokio::test]
async fn sglang_events_store_remove_and_fill_a_gap() -> anyhow::Result<()> {
    let mut publisher = Publisher::start(&["--format", "sglang", "--hashes", "int"]).await?;
    let cancel = CancellationToken::new();
    let feed = KvEventFeed::start(publisher.config(true), cancel.clone());
    let mut rx = feed.subscribe();
    until_subscribed(&mut publisher, &feed).await?;

    let a = prompt(4, 7);
    publisher.batch(vec![store(&a, 0, 2)], true).await?;
    publisher.batch(vec![store(&a, 2, 4)], false).await?;
    publisher.batch(vec![remove(&a, &[3])], true).await?;
    let mut replica = Replica::default();
    replica.until_holds(&mut rx, &turbine(&a, 0, 3)).await?;
    assert_eq!(snapshot_blocks(&feed), turbine(&a, 0, 3));
    let stats = feed.stats();
    assert!(stats.gaps >= 1, "{stats:?}");
    assert_eq!((stats.resets, stats.unknown_parent, stats.unknown_removed), (0, 0, 0));
    cancel.cancel();
    Ok(())
}

#[tokio::test]
async fn a_clear_all_and_a_wrong_block_size() -> anyhow::Result<()> {
    let mut publisher = Publisher::start(&["--format", "map", "--hashes", "int"]).await?;
    let cancel = CancellationToken::new();
    let feed = KvEventFeed::start(publisher.config(true), cancel.clone());
    let mut rx = feed.subscribe();
    until_subscribed(&mut publisher, &feed).await?;

    let a = prompt(4, 1);
    let mut replica = Replica::default();
    publisher.batch(vec![store(&a, 0, 2)], true).await?;
    replica.until_holds(&mut rx, &turbine(&a, 0, 2)).await?;
    publisher.batch(vec![json!({ "op": "clear" })], true).await?;
    replica.until_holds(&mut rx, &[]).await?;
    assert_eq!(replica.events.last().map(|e| &e.data), Some(&KvEventData::Cleared));
    assert_eq!(feed.snapshot().blocks, vec![]);

    let doubled = json!({ "op": "store", "prompt": a, "blocks": [0, 2], "block_size": 32 });
    publisher.batch(vec![doubled], true).await?;
    until("the wrong block size to be seen", || feed.stats().wrong_block_size == 1).await?;
    let mismatch = feed.stats().block_size_mismatch;
    assert_eq!(mismatch, Some(BlockSizeMismatch { engine: 32, router: BS }));
    let message = mismatch.map(|m| m.to_string()).unwrap_or_default();
    assert!(message.contains("start the engine with --block-size 16"), "{message}");
    assert_eq!(feed.snapshot().blocks, vec![]);
    cancel.cancel();
    Ok(())
}

#[tokio::test]
async fn without_replay_a_gap_starts_over() -> anyhow::Result<()> {
    let mut publisher = Publisher::start(&["--format", "array", "--hashes", "bytes"]).await?;
    let cancel = CancellationToken::new();
    let feed = KvEventFeed::start(publisher.config(false), cancel.clone());
    let mut rx = feed.subscribe();
    until_subscribed(&mut publisher, &feed).await?;

    let a = prompt(2, 1);
    let b = prompt(1, 2);
    let mut replica = Replica::default();
    publisher.batch(vec![store(&a, 0, 1)], true).await?;
    replica.until_holds(&mut rx, &turbine(&a, 0, 1)).await?;
    publisher.batch(vec![store(&a, 1, 2)], false).await?;
    publisher.batch(vec![store(&b, 0, 1)], true).await?;
    replica.until_holds(&mut rx, &turbine(&b, 0, 1)).await?;
    let kinds: Vec<&str> = replica
        .events
        .iter()
        .map(|e| match e.data {
            KvEventData::Stored { .. } => "stored",
            KvEventData::Removed { .. } => "removed",
            KvEventData::Cleared => "cleared",
        })
        .collect();
    assert_eq!(kinds, ["stored", "cleared", "stored"]);
    assert_eq!(feed.stats().resets, 1);
    assert_eq!(snapshot_blocks(&feed), turbine(&b, 0, 1));
    cancel.cancel();
    Ok(())
}

#[tokio::test]
async fn a_restarted_engine_is_followed_from_its_new_start() -> anyhow::Result<()> {
    let mut first = Publisher::start(&["--format", "map", "--hashes", "bytes"]).await?;
    let cancel = CancellationToken::new();
    let feed = KvEventFeed::start(first.config(true), cancel.clone());
    let mut rx = feed.subscribe();
    until_subscribed(&mut first, &feed).await?;
    let a = prompt(2, 1);
    let mut replica = Replica::default();
    first.batch(vec![store(&a, 0, 2)], true).await?;
    replica.until_holds(&mut rx, &turbine(&a, 0, 2)).await?;
    // Far enough along that the restarted engine's seqs stay below while the feed
    // reconnects: a seq going back is how a restart shows.
    for _ in 0..50 {
        first.batch(vec![], true).await?;
    }
    until("the batches to be applied", || feed.stats().batches >= 51).await?;

    let ports = [
        Publisher::port(&first.endpoint)?.to_owned(),
        Publisher::port(&first.replay_endpoint)?.to_owned(),
    ];
    first.child.kill().await?;
    until("the feed to notice", || !feed.connected()).await?;
    let mut second = Publisher::start(&[
        "--format",
        "map",
        "--hashes",
        "bytes",
        "--pub-port",
        &ports[0],
        "--replay-port",
        &ports[1],
    ])
    .await?;
    let b = prompt(1, 2);
    // Published before the feed is back: it learns it by replay once it sees the restart.
    second.batch(vec![store(&b, 0, 1)], true).await?;
    until("the feed to reconnect", || feed.connected()).await?;
    until_subscribed(&mut second, &feed).await?;
    replica.until_holds(&mut rx, &turbine(&b, 0, 1)).await?;
    assert!(replica.events.iter().any(|e| e.data == KvEventData::Cleared));
    assert_eq!(snapshot_blocks(&feed), turbine(&b, 0, 1));
    assert_eq!(feed.stats().resets, 1);
    cancel.cancel();
    Ok(())
}
