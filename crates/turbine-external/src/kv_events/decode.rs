//! Decoding of the msgpack batches vLLM and SGLang publish, in both of the encodings msgspec
//! gives their structs: array-like (SGLang, vLLM up to about 0.10) and map (current vLLM).

use rmpv::decode::read_value_ref_with_max_depth;
use rmpv::ValueRef;
use turbine_protocols::kv::StorageTier;
use xxhash_rust::xxh3::xxh3_64;

/// What an engine said about its cache in one event, before translation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EngineEvent {
    Stored(Stored),
    Removed(Removed),
    Cleared(Scope),
}

/// Where an event applies: only the engine's own cache, unadapted, first KV cache group is
/// routed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scope {
    pub medium: Medium,
    /// A LoRA adapter's blocks (`lora_id` or `lora_name` set).
    pub lora: bool,
    pub group_idx: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Medium {
    /// A tier the router knows: `"GPU"`, or no medium at all, is the engine's own cache;
    /// `"CPU"` vLLM's CPU offloading (host memory); `"STORAGE"` (vLLM) or `"DISK"` its
    /// offloading to storage. Case is ignored.
    Tier(StorageTier),
    /// Anything else.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    pub block_hashes: Vec<u64>,
    pub parent: Option<u64>,
    pub token_ids: Vec<u32>,
    pub block_size: u64,
    pub scope: Scope,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Removed {
    pub block_hashes: Vec<u64>,
    pub scope: Scope,
}

/// Why a batch's payload could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not msgpack")]
    Msgpack(#[source] rmpv::decode::Error),
    #[error("{0} bytes left over after the batch")]
    Trailing(usize),
    #[error("not a batch: neither [ts, events, ...] nor a map with \"events\"")]
    Batch,
    #[error("the batch's events are not a list")]
    Events,
    #[error("event {index}: {problem}")]
    Event { index: usize, problem: EventProblem },
}

/// What is wrong with one event of a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventProblem {
    #[error("neither an array nor a map")]
    Shape,
    #[error("no type tag")]
    NoTag,
    #[error("unknown type {0:?}")]
    UnknownTag(String),
    #[error("{tag} has no {field}")]
    Missing { tag: &'static str, field: &'static str },
    #[error("{tag} {field} is not {expected}")]
    Invalid {
        tag: &'static str,
        field: &'static str,
        expected: &'static str,
    },
}

/// Reads one batch's events; its timestamp and data parallel rank are not needed (each rank
/// publishes on its own endpoint).
pub(crate) fn decode_batch(payload: &[u8]) -> Result<Vec<EngineEvent>, DecodeError> {
    let mut rd = payload;
    let batch = read_value_ref_with_max_depth(&mut rd, MAX_DEPTH).map_err(DecodeError::Msgpack)?;
    if !rd.is_empty() {
        return Err(DecodeError::Trailing(rd.len()));
    }
    let events = match &batch {
        ValueRef::Array(items) => items.get(1),
        ValueRef::Map(entries) => lookup(entries, "events"),
        _ => None,
    }
    .ok_or(DecodeError::Batch)?;
    let ValueRef::Array(events) = events else {
        return Err(DecodeError::Events);
    };
    events
        .iter()
        .enumerate()
        .map(|(index, event)| decode_event(event).map_err(|problem| DecodeError::Event { index, problem }))
        .collect()
}

/// Deep enough for a batch of events holding lists of hashes and vLLM's `extra_keys`; a
/// peer cannot make the decoder recurse further.
const MAX_DEPTH: usize = 32;

const STORED: &str = "BlockStored";
const REMOVED: &str = "BlockRemoved";
const CLEARED: &str = "AllBlocksCleared";

/// An event's fields, by position after the tag (array-like) or by name (map). Fields with
/// defaults may be missing from either: msgspec's `omit_defaults` drops them.
enum Fields<'v, 'a> {
    Array(&'v [ValueRef<'a>]),
    Map(&'v [(ValueRef<'a>, ValueRef<'a>)]),
}

impl<'v, 'a> Fields<'v, 'a> {
    /// `position` is `None` for fields that only the map encoding is known to carry: in the
    /// array-like encoding they would be trailing fields whose order is not settled.
    fn get(&self, position: Option<usize>, name: &str) -> Option<&'v ValueRef<'a>> {
        match self {
            Fields::Array(items) => position.and_then(|p| items.get(p)),
            Fields::Map(entries) => lookup(entries, name),
        }
    }
}

fn lookup<'v, 'a>(entries: &'v [(ValueRef<'a>, ValueRef<'a>)], name: &str) -> Option<&'v ValueRef<'a>> {
    entries.iter().find(|(k, _)| text(k) == Some(name)).map(|(_, v)| v)
}

fn text<'v>(value: &'v ValueRef<'_>) -> Option<&'v str> {
    match value {
        ValueRef::String(s) => s.as_str(),
        _ => None,
    }
}

fn decode_event(event: &ValueRef<'_>) -> Result<EngineEvent, EventProblem> {
    let (tag, fields) = match event {
        ValueRef::Array(items) => (items.first(), Fields::Array(items)),
        ValueRef::Map(entries) => (lookup(entries, "type"), Fields::Map(entries)),
        _ => return Err(EventProblem::Shape),
    };
    let tag = tag.and_then(text).ok_or(EventProblem::NoTag)?;
    match tag {
        STORED => {
            let block_hashes = hash_list(STORED, "block_hashes", fields.get(Some(1), "block_hashes"))?;
            let parent = match fields.get(Some(2), "parent_block_hash") {
                None | Some(ValueRef::Nil) => None,
                Some(v) => Some(block_hash(v).ok_or(invalid(STORED, "parent_block_hash", HASH))?),
            };
            let token_ids = token_list(fields.get(Some(3), "token_ids"))?;
            let block_size = required(STORED, "block_size", fields.get(Some(4), "block_size"))?
                .as_u64()
                .ok_or(invalid(STORED, "block_size", "an unsigned integer"))?;
            let scope = scope(STORED, &fields, Some(5), Some(6))?;
            Ok(EngineEvent::Stored(Stored {
                block_hashes,
                parent,
                token_ids,
                block_size,
                scope,
            }))
        }
        REMOVED => {
            let block_hashes = hash_list(REMOVED, "block_hashes", fields.get(Some(1), "block_hashes"))?;
            let scope = scope(REMOVED, &fields, None, Some(2))?;
            Ok(EngineEvent::Removed(Removed { block_hashes, scope }))
        }
        CLEARED => Ok(EngineEvent::Cleared(scope(CLEARED, &fields, None, None)?)),
        other => Err(EventProblem::UnknownTag(other.to_owned())),
    }
}

const HASH: &str = "an integer or bytes";

fn invalid(tag: &'static str, field: &'static str, expected: &'static str) -> EventProblem {
    EventProblem::Invalid { tag, field, expected }
}

fn required<'v, 'a>(
    tag: &'static str,
    field: &'static str,
    value: Option<&'v ValueRef<'a>>,
) -> Result<&'v ValueRef<'a>, EventProblem> {
    value.ok_or(EventProblem::Missing { tag, field })
}

/// An engine's block hash as a key: integers (signed or not) by their bit pattern, digests
/// folded to 64 bits. The key only has to tell the engine's blocks apart; Turbine's own
/// hashes come from the tokens.
fn block_hash(value: &ValueRef<'_>) -> Option<u64> {
    match value {
        ValueRef::Integer(i) => i.as_u64().or_else(|| i.as_i64().map(|v| v as u64)),
        ValueRef::Binary(bytes) => Some(xxh3_64(bytes)),
        _ => None,
    }
}

fn hash_list(tag: &'static str, field: &'static str, value: Option<&ValueRef<'_>>) -> Result<Vec<u64>, EventProblem> {
    let ValueRef::Array(items) = required(tag, field, value)? else {
        return Err(invalid(tag, field, "a list of hashes"));
    };
    items
        .iter()
        .map(|v| block_hash(v).ok_or(invalid(tag, field, "a list of hashes")))
        .collect()
}

fn token_list(value: Option<&ValueRef<'_>>) -> Result<Vec<u32>, EventProblem> {
    const EXPECTED: &str = "a list of integers";
    let ValueRef::Array(items) = required(STORED, "token_ids", value)? else {
        return Err(invalid(STORED, "token_ids", EXPECTED));
    };
    items
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .ok_or(invalid(STORED, "token_ids", EXPECTED))
        })
        .collect()
}

fn scope(
    tag: &'static str,
    fields: &Fields<'_, '_>,
    lora_id: Option<usize>,
    medium: Option<usize>,
) -> Result<Scope, EventProblem> {
    let medium = match fields.get(medium, "medium") {
        None | Some(ValueRef::Nil) => Medium::Tier(StorageTier::Device),
        Some(v) => match text(v) {
            Some(m) if m.eq_ignore_ascii_case("GPU") => Medium::Tier(StorageTier::Device),
            Some(m) if m.eq_ignore_ascii_case("CPU") => Medium::Tier(StorageTier::Host),
            Some(m) if m.eq_ignore_ascii_case("STORAGE") || m.eq_ignore_ascii_case("DISK") => {
                Medium::Tier(StorageTier::Disk)
            }
            Some(_) => Medium::Other,
            None => return Err(invalid(tag, "medium", "a string")),
        },
    };
    let lora_id = match fields.get(lora_id, "lora_id") {
        None | Some(ValueRef::Nil) => false,
        Some(ValueRef::Integer(_)) => true,
        Some(_) => return Err(invalid(tag, "lora_id", "an integer")),
    };
    let lora_name = match fields.get(None, "lora_name") {
        None | Some(ValueRef::Nil) => false,
        Some(ValueRef::String(_)) => true,
        Some(_) => return Err(invalid(tag, "lora_name", "a string")),
    };
    let group_idx = match fields.get(None, "group_idx") {
        None | Some(ValueRef::Nil) => 0,
        Some(v) => v.as_u64().ok_or(invalid(tag, "group_idx", "an unsigned integer"))?,
    };
    Ok(Scope {
        medium,
        lora: lora_id || lora_name,
        group_idx,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rmpv::Value;

    /// Builds msgpack payloads the way msgspec lays out the engines' structs.
    pub(crate) fn encode(value: &Value) -> Vec<u8> {
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, value).expect("writing to a Vec cannot fail");
        buf
    }

    pub(crate) fn s(text: &str) -> Value {
        Value::from(text)
    }

    pub(crate) fn ints<T: Into<Value> + Copy>(values: &[T]) -> Value {
        Value::Array(values.iter().map(|&v| v.into()).collect())
    }

    pub(crate) fn map(entries: Vec<(&str, Value)>) -> Value {
        Value::Map(entries.into_iter().map(|(k, v)| (s(k), v)).collect())
    }

    const GPU: Scope = Scope {
        medium: Medium::Tier(StorageTier::Device),
        lora: false,
        group_idx: 0,
    };

    #[test]
    fn array_like_batch_as_sglang_sends_it() {
        // SGLang: no dp_rank when it is the default, BlockStored up to lora_id, BlockRemoved
        // with its hashes only.
        let batch = Value::Array(vec![
            Value::F64(1.5),
            Value::Array(vec![
                Value::Array(vec![
                    s("BlockStored"),
                    ints(&[7i64, -3]),
                    Value::Nil,
                    ints(&[1u32, 2, 3, 4]),
                    Value::from(2),
                    Value::Nil,
                ]),
                Value::Array(vec![s("BlockRemoved"), ints(&[7i64])]),
                Value::Array(vec![s("AllBlocksCleared")]),
            ]),
        ]);
        let events = decode_batch(&encode(&batch)).expect("a valid batch");
        assert_eq!(
            events,
            vec![
                EngineEvent::Stored(Stored {
                    block_hashes: vec![7, (-3i64) as u64],
                    parent: None,
                    token_ids: vec![1, 2, 3, 4],
                    block_size: 2,
                    scope: GPU,
                }),
                EngineEvent::Removed(Removed {
                    block_hashes: vec![7],
                    scope: GPU,
                }),
                EngineEvent::Cleared(GPU),
            ]
        );
    }

    #[test]
    fn array_like_batch_as_older_vllm_sends_it() {
        let batch = Value::Array(vec![
            Value::F64(1.5),
            Value::Array(vec![
                Value::Array(vec![
                    s("BlockStored"),
                    ints(&[u64::MAX]),
                    Value::from(5),
                    ints(&[1u32, 2]),
                    Value::from(2),
                    Value::from(3),
                    s("CPU"),
                    s("a trailing field from a later version"),
                ]),
                Value::Array(vec![s("BlockRemoved"), ints(&[9u64]), s("GPU")]),
            ]),
            Value::from(1),
        ]);
        let events = decode_batch(&encode(&batch)).expect("a valid batch");
        assert_eq!(
            events,
            vec![
                EngineEvent::Stored(Stored {
                    block_hashes: vec![u64::MAX],
                    parent: Some(5),
                    token_ids: vec![1, 2],
                    block_size: 2,
                    scope: Scope {
                        medium: Medium::Tier(StorageTier::Host),
                        lora: true,
                        group_idx: 0,
                    },
                }),
                EngineEvent::Removed(Removed {
                    block_hashes: vec![9],
                    scope: GPU,
                }),
            ]
        );
    }

    #[test]
    fn map_batch_as_current_vllm_sends_it() {
        let digest = [0xabu8; 32];
        let batch = map(vec![
            ("ts", Value::F64(1.5)),
            (
                "events",
                Value::Array(vec![
                    map(vec![
                        ("type", s("BlockStored")),
                        ("block_hashes", Value::Array(vec![Value::Binary(digest.to_vec())])),
                        ("parent_block_hash", Value::Binary(vec![1, 2, 3])),
                        ("token_ids", ints(&[1u32, 2])),
                        ("block_size", Value::from(2)),
                        ("lora_id", Value::Nil),
                        ("medium", s("GPU")),
                        ("lora_name", s("adapter")),
                        ("extra_keys", Value::Array(vec![Value::Nil])),
                        ("group_idx", Value::from(1)),
                        ("a_key_from_a_later_version", Value::from(true)),
                    ]),
                    // Keys with their default values left out.
                    map(vec![
                        ("type", s("BlockStored")),
                        ("block_hashes", ints(&[4u64])),
                        ("token_ids", ints(&[1u32, 2])),
                        ("block_size", Value::from(2)),
                    ]),
                    map(vec![("block_hashes", ints(&[4u64])), ("type", s("BlockRemoved"))]),
                    map(vec![("type", s("AllBlocksCleared"))]),
                ]),
            ),
            ("data_parallel_rank", Value::from(0)),
        ]);
        let events = decode_batch(&encode(&batch)).expect("a valid batch");
        assert_eq!(
            events,
            vec![
                EngineEvent::Stored(Stored {
                    block_hashes: vec![xxh3_64(&digest)],
                    parent: Some(xxh3_64(&[1, 2, 3])),
                    token_ids: vec![1, 2],
                    block_size: 2,
                    scope: Scope {
                        medium: Medium::Tier(StorageTier::Device),
                        lora: true,
                        group_idx: 1,
                    },
                }),
                EngineEvent::Stored(Stored {
                    block_hashes: vec![4],
                    parent: None,
                    token_ids: vec![1, 2],
                    block_size: 2,
                    scope: GPU,
                }),
                EngineEvent::Removed(Removed {
                    block_hashes: vec![4],
                    scope: GPU,
                }),
                EngineEvent::Cleared(GPU),
            ]
        );
    }

    fn error_of(value: &Value) -> String {
        match decode_batch(&encode(value)) {
            Ok(events) => panic!("decoded {events:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn batch_of(event: Value) -> Value {
        Value::Array(vec![
            Value::F64(0.0),
            Value::Array(vec![Value::Array(vec![s("AllBlocksCleared")]), event]),
        ])
    }

    #[test]
    fn malformed_payloads_say_what_is_wrong() {
        assert_eq!(
            decode_batch(b"\x92\xcb").map_err(|e| e.to_string()).err().as_deref(),
            Some("not msgpack")
        );
        let mut trailing = encode(&batch_of(Value::Array(vec![s("AllBlocksCleared")])));
        trailing.push(0xc0);
        assert_eq!(
            decode_batch(&trailing).map_err(|e| e.to_string()).err().as_deref(),
            Some("1 bytes left over after the batch")
        );
        assert_eq!(
            error_of(&Value::from(3)),
            "not a batch: neither [ts, events, ...] nor a map with \"events\""
        );
        assert_eq!(
            error_of(&map(vec![("ts", Value::F64(0.0))])),
            "not a batch: neither [ts, events, ...] nor a map with \"events\""
        );
        assert_eq!(
            error_of(&Value::Array(vec![Value::F64(0.0), Value::from(1)])),
            "the batch's events are not a list"
        );
        assert_eq!(
            error_of(&batch_of(Value::from(1))),
            "event 1: neither an array nor a map"
        );
        assert_eq!(error_of(&batch_of(Value::Array(vec![]))), "event 1: no type tag");
        assert_eq!(
            error_of(&batch_of(map(vec![("type", Value::from(1))]))),
            "event 1: no type tag"
        );
        assert_eq!(
            error_of(&batch_of(Value::Array(vec![s("BlockMoved")]))),
            "event 1: unknown type \"BlockMoved\""
        );
        assert_eq!(
            error_of(&batch_of(map(vec![("type", s("BlockRemoved"))]))),
            "event 1: BlockRemoved has no block_hashes"
        );
        assert_eq!(
            error_of(&batch_of(Value::Array(vec![
                s("BlockStored"),
                ints(&[1u64]),
                Value::Nil,
                s("1 2")
            ]))),
            "event 1: BlockStored token_ids is not a list of integers"
        );
        assert_eq!(
            error_of(&batch_of(Value::Array(vec![
                s("BlockStored"),
                ints(&[1u64]),
                Value::Nil,
                ints(&[-1i64])
            ]))),
            "event 1: BlockStored token_ids is not a list of integers"
        );
        assert_eq!(
            error_of(&batch_of(Value::Array(vec![
                s("BlockStored"),
                ints(&[1u64]),
                Value::Nil,
                ints(&[1u64 << 32])
            ]))),
            "event 1: BlockStored token_ids is not a list of integers"
        );
        assert_eq!(
            error_of(&batch_of(Value::Array(vec![
                s("BlockStored"),
                Value::Array(vec![s("h")])
            ]))),
            "event 1: BlockStored block_hashes is not a list of hashes"
        );
        assert_eq!(
            error_of(&batch_of(Value::Array(vec![
                s("BlockStored"),
                ints(&[1u64]),
                Value::F64(1.0)
            ]))),
            "event 1: BlockStored parent_block_hash is not an integer or bytes"
        );
        assert_eq!(
            error_of(&batch_of(Value::Array(vec![
                s("BlockStored"),
                ints(&[1u64]),
                Value::Nil,
                ints(&[1u32])
            ]))),
            "event 1: BlockStored has no block_size"
        );
        assert_eq!(
            error_of(&batch_of(Value::Array(vec![
                s("BlockRemoved"),
                ints(&[1u64]),
                Value::from(1)
            ]))),
            "event 1: BlockRemoved medium is not a string"
        );
        assert_eq!(
            error_of(&batch_of(map(vec![
                ("type", s("AllBlocksCleared")),
                ("group_idx", Value::from(-1))
            ]))),
            "event 1: AllBlocksCleared group_idx is not an unsigned integer"
        );
    }

    #[test]
    fn nesting_is_bounded() {
        let mut value = Value::Nil;
        for _ in 0..100 {
            value = Value::Array(vec![value]);
        }
        assert_eq!(error_of(&value), "not msgpack");
    }

    #[test]
    fn media_name_tiers_whatever_their_case() {
        let medium_of = |medium: Value| {
            let batch = Value::Array(vec![
                Value::F64(0.0),
                Value::Array(vec![Value::Array(vec![s("BlockRemoved"), ints(&[1u64]), medium])]),
            ]);
            match decode_batch(&encode(&batch)).expect("a valid batch").as_slice() {
                [EngineEvent::Removed(r)] => r.scope.medium,
                other => panic!("{other:?}"),
            }
        };
        let tier = Medium::Tier;
        assert_eq!(medium_of(Value::Nil), tier(StorageTier::Device));
        assert_eq!(medium_of(s("gpu")), tier(StorageTier::Device));
        assert_eq!(medium_of(s("CPU")), tier(StorageTier::Host));
        assert_eq!(medium_of(s("STORAGE")), tier(StorageTier::Disk));
        assert_eq!(medium_of(s("disk")), tier(StorageTier::Disk));
        assert_eq!(medium_of(s("REMOTE")), Medium::Other);
    }
}
