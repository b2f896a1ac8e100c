//! The binary encoding of [`KvEventMessage`], the event plane's busiest message.
//!
//! A busy worker stores a block every few tokens and publishes every step, so its events
//! are encoded hundreds of thousands of times a second per core. As JSON, a block was
//! about 60 bytes, most of them key names, and the encoding cost as much as the rest of
//! the worker's event handling; here it is 16 bytes written as they are.
//!
//! Layout, little-endian throughout:
//!
//! ```text
//! message   = version:u8 (= 2) worker:u64 count:u32 event{count}
//! event     = event_id:u64 kind:u8 body
//! stored    = kind 0: tier:u8 has_parent:u8 (0 or 1) [parent_hash:u64] n:u32 (sequence_hash:u64 local_hash:u64){n}
//! removed   = kind 1: tier:u8 n:u32 sequence_hash:u64{n}
//! cleared   = kind 2: nothing
//! tier      = 0 device, 1 host, 2 disk
//! ```
//!
//! Version 1, from before storage tiers, is the same without the tier bytes; it is still
//! read, as device-tier events, so that routers read workers not yet upgraded. Writers
//! write version 2 only, which a version-1 reader refuses by its first byte: routers are
//! upgraded before workers.
//!
//! A message that does not follow it exactly (short, too long, unknown version, kind or
//! tier) is refused whole; nothing is allocated for counts the bytes cannot hold.

use super::{KvEvent, KvEventData, KvEventMessage, StorageTier, StoredBlock};

/// The layout's version, its first byte; a reader refuses any other but version 1.
pub const KV_WIRE_VERSION: u8 = 2;

/// The layout before storage tiers, still read.
const UNTIERED: u8 = 1;

const STORED: u8 = 0;
const REMOVED: u8 = 1;
const CLEARED: u8 = 2;

/// Why bytes are not a [`KvEventMessage`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvWireError {
    #[error("KV event message version {0} is neither {UNTIERED} nor {KV_WIRE_VERSION}")]
    Version(u8),
    #[error("KV event message ends at byte {at}, inside {what}")]
    Truncated { at: usize, what: &'static str },
    #[error("unknown KV event kind {kind} at byte {at}")]
    Kind { kind: u8, at: usize },
    #[error("parent flag {flag} at byte {at} is neither 0 nor 1")]
    ParentFlag { flag: u8, at: usize },
    #[error("unknown storage tier {tier} at byte {at}")]
    Tier { tier: u8, at: usize },
    #[error("{extra} bytes after the last of {count} KV events")]
    Trailing { extra: usize, count: u32 },
}

impl KvEventMessage {
    /// Appends the message's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.push(KV_WIRE_VERSION);
        out.extend_from_slice(&self.worker.to_le_bytes());
        out.extend_from_slice(&len_u32(self.events.len()).to_le_bytes());
        for event in &self.events {
            out.extend_from_slice(&event.event_id.to_le_bytes());
            match &event.data {
                KvEventData::Stored {
                    parent_hash,
                    blocks,
                    tier,
                } => {
                    out.push(STORED);
                    out.push(tier_byte(*tier));
                    match parent_hash {
                        Some(p) => {
                            out.push(1);
                            out.extend_from_slice(&p.to_le_bytes());
                        }
                        None => out.push(0),
                    }
                    out.extend_from_slice(&len_u32(blocks.len()).to_le_bytes());
                    for b in blocks {
                        out.extend_from_slice(&b.sequence_hash.to_le_bytes());
                        out.extend_from_slice(&b.local_hash.to_le_bytes());
                    }
                }
                KvEventData::Removed { sequence_hashes, tier } => {
                    out.push(REMOVED);
                    out.push(tier_byte(*tier));
                    out.extend_from_slice(&len_u32(sequence_hashes.len()).to_le_bytes());
                    for h in sequence_hashes {
                        out.extend_from_slice(&h.to_le_bytes());
                    }
                }
                KvEventData::Cleared => out.push(CLEARED),
            }
        }
    }

    /// The message's encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// The length of [`Self::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        let events: usize = self
            .events
            .iter()
            .map(|e| {
                9 + match &e.data {
                    KvEventData::Stored {
                        parent_hash, blocks, ..
                    } => 2 + 8 * usize::from(parent_hash.is_some()) + 4 + 16 * blocks.len(),
                    KvEventData::Removed { sequence_hashes, .. } => 5 + 8 * sequence_hashes.len(),
                    KvEventData::Cleared => 0,
                }
            })
            .sum();
        13 + events
    }

    /// Reads a message written by [`Self::encode`], or by a writer of version 1.
    pub fn decode(bytes: &[u8]) -> Result<Self, KvWireError> {
        let mut r = Reader { bytes, at: 0 };
        let version = r.u8("the version")?;
        let tiered = match version {
            KV_WIRE_VERSION => true,
            UNTIERED => false,
            v => return Err(KvWireError::Version(v)),
        };
        let tier = |r: &mut Reader<'_>| {
            if !tiered {
                return Ok(StorageTier::Device);
            }
            let at = r.at;
            match r.u8("a storage tier")? {
                0 => Ok(StorageTier::Device),
                1 => Ok(StorageTier::Host),
                2 => Ok(StorageTier::Disk),
                tier => Err(KvWireError::Tier { tier, at }),
            }
        };
        let worker = r.u64("the worker id")?;
        let count = r.u32("the event count")?;
        // Every event takes at least 9 bytes: a count the rest cannot hold is refused
        // when the bytes run out, before anything that size is allocated.
        let mut events = Vec::with_capacity((count as usize).min(r.remaining() / 9));
        for _ in 0..count {
            let event_id = r.u64("an event id")?;
            let at = r.at;
            let data = match r.u8("an event kind")? {
                STORED => {
                    let tier = tier(&mut r)?;
                    let at = r.at;
                    let parent_hash = match r.u8("a parent flag")? {
                        0 => None,
                        1 => Some(r.u64("a parent hash")?),
                        flag => return Err(KvWireError::ParentFlag { flag, at }),
                    };
                    let n = r.u32("a block count")? as usize;
                    let mut blocks = Vec::with_capacity(n.min(r.remaining() / 16));
                    for _ in 0..n {
                        blocks.push(StoredBlock {
                            sequence_hash: r.u64("a stored block")?,
                            local_hash: r.u64("a stored block")?,
                        });
                    }
                    KvEventData::Stored {
                        parent_hash,
                        blocks,
                        tier,
                    }
                }
                REMOVED => {
                    let tier = tier(&mut r)?;
                    let n = r.u32("a hash count")? as usize;
                    let mut sequence_hashes = Vec::with_capacity(n.min(r.remaining() / 8));
                    for _ in 0..n {
                        sequence_hashes.push(r.u64("a removed hash")?);
                    }
                    KvEventData::Removed { sequence_hashes, tier }
                }
                CLEARED => KvEventData::Cleared,
                kind => return Err(KvWireError::Kind { kind, at }),
            };
            events.push(KvEvent { event_id, data });
        }
        if r.remaining() > 0 {
            return Err(KvWireError::Trailing {
                extra: r.remaining(),
                count,
            });
        }
        Ok(Self { worker, events })
    }
}

fn tier_byte(tier: StorageTier) -> u8 {
    match tier {
        StorageTier::Device => 0,
        StorageTier::Host => 1,
        StorageTier::Disk => 2,
    }
}

/// Lengths are written as `u32`: an engine step stores or evicts at most its pool, far
/// fewer than 2^32 blocks.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], KvWireError> {
        let end = self.at + N;
        let Some(b) = self.bytes.get(self.at..end) else {
            return Err(KvWireError::Truncated {
                at: self.bytes.len(),
                what,
            });
        };
        self.at = end;
        let mut out = [0; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, KvWireError> {
        Ok(self.take::<1>(what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, KvWireError> {
        Ok(u32::from_le_bytes(self.take(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, KvWireError> {
        Ok(u64::from_le_bytes(self.take(what)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn message() -> KvEventMessage {
        KvEventMessage {
            worker: 0x0102_0304_0506_0708,
            events: vec![
                KvEvent {
                    event_id: 7,
                    data: KvEventData::Stored {
                        parent_hash: Some(0xAA),
                        blocks: vec![StoredBlock {
                            sequence_hash: 0xB1,
                            local_hash: 0xC1,
                        }],
                        tier: StorageTier::Device,
                    },
                },
                KvEvent {
                    event_id: 8,
                    data: KvEventData::Stored {
                        parent_hash: None,
                        blocks: vec![],
                        tier: StorageTier::Host,
                    },
                },
                KvEvent {
                    event_id: 9,
                    data: KvEventData::Removed {
                        sequence_hashes: vec![0xB1, 0xD2],
                        tier: StorageTier::Disk,
                    },
                },
                KvEvent {
                    event_id: 10,
                    data: KvEventData::Cleared,
                },
            ],
        }
    }

    /// The layout, byte for byte: a change here breaks every reader of version 2.
    #[test]
    fn the_layout_is_as_documented() {
        let bytes = message().to_bytes();
        assert_eq!(bytes.len(), message().encoded_len());
        let hex: Vec<String> = bytes
            .chunks(16)
            .map(|c| c.iter().map(|b| format!("{b:02x}")).collect())
            .collect();
        expect_test::expect![[r#"
            [
                "02080706050403020104000000070000",
                "0000000000000001aa00000000000000",
                "01000000b100000000000000c1000000",
                "00000000080000000000000000010000",
                "00000009000000000000000102020000",
                "00b100000000000000d2000000000000",
                "000a0000000000000002",
            ]
        "#]]
        .assert_debug_eq(&hex);
    }

    /// A message as version 1 wrote it, without tiers: read as the device tier's.
    #[test]
    fn version_1_reads_as_the_device_tier() {
        let hex = concat!(
            "01080706050403020104000000070000",
            "00000000000001aa0000000000000001",
            "000000b100000000000000c100000000",
            "00000008000000000000000000000000",
            "0009000000000000000102000000b100",
            "000000000000d2000000000000000a00",
            "00000000000002",
        );
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        let mut device = message();
        for e in &mut device.events {
            if let KvEventData::Stored { tier, .. } | KvEventData::Removed { tier, .. } = &mut e.data {
                *tier = StorageTier::Device;
            }
        }
        assert_eq!(KvEventMessage::decode(&bytes), Ok(device));
    }

    #[test]
    fn every_short_or_long_message_is_refused() {
        let bytes = message().to_bytes();
        for len in 0..bytes.len() {
            let err = KvEventMessage::decode(&bytes[..len]).expect_err("a prefix is not a message");
            assert!(
                matches!(err, KvWireError::Truncated { at, .. } if at == len),
                "{len}: {err}"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            KvEventMessage::decode(&long),
            Err(KvWireError::Trailing { extra: 1, count: 4 })
        );
    }

    #[test]
    fn unknown_versions_kinds_and_flags_are_named() {
        let bytes = message().to_bytes();
        let with = |at: usize, value: u8| {
            let mut b = bytes.clone();
            b[at] = value;
            KvEventMessage::decode(&b).expect_err("refused")
        };
        assert_eq!(with(0, 3), KvWireError::Version(3));
        // The first event's kind follows the header (13 bytes) and its id (8), then its tier.
        assert_eq!(with(21, 9), KvWireError::Kind { kind: 9, at: 21 });
        assert_eq!(with(22, 3), KvWireError::Tier { tier: 3, at: 22 });
        assert_eq!(with(23, 5), KvWireError::ParentFlag { flag: 5, at: 23 });
        assert_eq!(with(0, 3).to_string(), "KV event message version 3 is neither 1 nor 2");
    }

    #[test]
    fn a_huge_count_fails_without_allocating_it() {
        let mut bytes = vec![KV_WIRE_VERSION];
        bytes.extend_from_slice(&1u64.to_le_bytes());
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            KvEventMessage::decode(&bytes),
            Err(KvWireError::Truncated {
                what: "an event id",
                ..
            })
        ));
    }

    fn event() -> impl Strategy<Value = KvEvent> {
        let tier = || proptest::sample::select(StorageTier::ALL.to_vec());
        let data = prop_oneof![
            (
                proptest::option::of(any::<u64>()),
                proptest::collection::vec((any::<u64>(), any::<u64>()), 0..5),
                tier(),
            )
                .prop_map(|(parent_hash, blocks, tier)| KvEventData::Stored {
                    parent_hash,
                    blocks: blocks
                        .into_iter()
                        .map(|(sequence_hash, local_hash)| StoredBlock {
                            sequence_hash,
                            local_hash
                        })
                        .collect(),
                    tier,
                }),
            (proptest::collection::vec(any::<u64>(), 0..5), tier())
                .prop_map(|(sequence_hashes, tier)| KvEventData::Removed { sequence_hashes, tier }),
            Just(KvEventData::Cleared),
        ];
        (any::<u64>(), data).prop_map(|(event_id, data)| KvEvent { event_id, data })
    }

    proptest! {
        #[test]
        fn messages_come_back_as_they_were_sent(worker in any::<u64>(), events in proptest::collection::vec(event(), 0..6)) {
            let message = KvEventMessage { worker, events };
            let bytes = message.to_bytes();
            prop_assert_eq!(bytes.len(), message.encoded_len());
            prop_assert_eq!(KvEventMessage::decode(&bytes), Ok(message));
        }
    }
}
