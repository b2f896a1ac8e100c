//! What workers tell routers about their KV caches: block events, load reports, and the
//! state a router asks for to resynchronise.

use serde::{Deserialize, Serialize};

mod wire;

pub use wire::{KvWireError, KV_WIRE_VERSION};

/// One change to a worker's set of cached blocks. `event_id` increases by one per event on
/// each worker, so that a gap shows a lost event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEvent {
    pub event_id: u64,
    pub data: KvEventData,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KvEventData {
    /// Blocks registered under their hashes in `tier`, each the child of the one before; the
    /// first is the child of `parent_hash` (none for a sequence's first block). A block copied
    /// to another tier is stored again there: it is then held in both.
    Stored {
        parent_hash: Option<u64>,
        blocks: Vec<StoredBlock>,
        #[serde(default, skip_serializing_if = "StorageTier::is_device")]
        tier: StorageTier,
    },
    /// Blocks evicted from `tier`: their hashes no longer name cached blocks there (a copy
    /// in another tier stays).
    Removed {
        sequence_hashes: Vec<u64>,
        #[serde(default, skip_serializing_if = "StorageTier::is_device")]
        tier: StorageTier,
    },
    /// Every block of the device tier is gone; copies in host memory or on disk stay.
    Cleared,
}

/// Where a worker holds a cached block: the tiers of a KV block manager, fastest first
/// (the order of `Ord`). Engines without one hold every block on the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageTier {
    /// The engine's own pool (G1): a hit is used where it is.
    #[default]
    Device,
    /// Host memory (G2): a hit is copied back to the device first.
    Host,
    /// Local disk (G3): a hit is read back, slower still.
    Disk,
}

impl StorageTier {
    /// Every tier, fastest first; a tier's place here is its [`Self::index`].
    pub const ALL: [StorageTier; 3] = [StorageTier::Device, StorageTier::Host, StorageTier::Disk];

    pub fn index(self) -> usize {
        self as usize
    }

    /// Its name, as serde spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            StorageTier::Device => "device",
            StorageTier::Host => "host",
            StorageTier::Disk => "disk",
        }
    }

    /// Takes a reference for serde's `skip_serializing_if`.
    pub fn is_device(&self) -> bool {
        *self == StorageTier::Device
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StoredBlock {
    pub sequence_hash: u64,
    pub local_hash: u64,
}

/// A worker's load, as it reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerLoad {
    /// Sequences scheduled to run (prefilling or decoding).
    pub active_seqs: u32,
    /// Sequences waiting for admission.
    pub waiting_seqs: u32,
    pub blocks_in_use: u32,
    pub blocks_total: u32,
    /// Prompt tokens admitted but not yet computed.
    pub active_prefill_tokens: u64,
}

/// A cached block as a snapshot lists it: with its parent, so the tree can be rebuilt, and
/// the tier it is held in (a block held in two tiers is listed once for each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CachedBlock {
    pub parent_hash: Option<u64>,
    pub block: StoredBlock,
    #[serde(default, skip_serializing_if = "StorageTier::is_device")]
    pub tier: StorageTier,
}

/// Every block a worker has cached, as of `last_event_id` (`None`: no event yet).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvSnapshot {
    pub last_event_id: Option<u64>,
    pub blocks: Vec<CachedBlock>,
}

/// Published on the event plane: a worker's KV events, in order, as many as one engine
/// step produced (one message per step instead of one per block), in the binary
/// encoding of [`KvEventMessage::encode`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEventMessage {
    /// The instance id of the worker's generate endpoint.
    pub worker: u64,
    pub events: Vec<KvEvent>,
}

/// Published on the event plane with every load report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadMessage {
    pub worker: u64,
    pub load: WorkerLoad,
}

/// One change to a router's account of what it sent where, shared with the routers of the
/// other frontends so that they all see the same load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum ActiveChange {
    Routed {
        request: String,
        worker: u64,
        prefill_tokens: u64,
        blocks: u64,
    },
    FirstToken {
        request: String,
    },
    Ended {
        request: String,
    },
}

/// Published by each frontend's router on the namespace's router-sync subject, batched;
/// an empty batch says the router is alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveSyncMessage {
    /// A random id per router, fixed for its life.
    pub router: u64,
    pub changes: Vec<ActiveChange>,
}

/// A router's question to a worker's KV state endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvStateRequest {
    /// The last event the router applied; `None` asks for a full snapshot.
    pub after_event_id: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KvStateResponse {
    /// Every event after the one asked about, in order: the worker still had them all.
    Events { events: Vec<KvEvent> },
    /// The events asked for are gone (or none were asked for): the whole state instead.
    Snapshot { snapshot: KvSnapshot },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// JSON written before tiers existed reads as the device tier, and device events and
    /// blocks are written as they were then: only another tier adds a field.
    #[test]
    fn tiers_in_json_default_to_the_device() {
        let old = r#"{"event_id":3,"data":{"type":"removed","sequence_hashes":[7]}}"#;
        let event: KvEvent = serde_json::from_str(old).expect("an event");
        assert_eq!(
            event.data,
            KvEventData::Removed {
                sequence_hashes: vec![7],
                tier: StorageTier::Device
            }
        );
        assert_eq!(serde_json::to_string(&event).expect("serializable"), old);

        let host = KvEventData::Stored {
            parent_hash: None,
            blocks: vec![StoredBlock {
                sequence_hash: 1,
                local_hash: 2,
            }],
            tier: StorageTier::Host,
        };
        let json = serde_json::to_string(&host).expect("serializable");
        expect_test::expect![[
            r#"{"type":"stored","parent_hash":null,"blocks":[{"sequence_hash":1,"local_hash":2}],"tier":"host"}"#
        ]]
        .assert_eq(&json);
        assert_eq!(serde_json::from_str::<KvEventData>(&json).expect("an event"), host);

        let block: CachedBlock =
            serde_json::from_str(r#"{"parent_hash":null,"block":{"sequence_hash":1,"local_hash":2}}"#)
                .expect("a block");
        assert_eq!(block.tier, StorageTier::Device);
        let disk = CachedBlock {
            tier: StorageTier::Disk,
            ..block
        };
        expect_test::expect![[r#"{"parent_hash":null,"block":{"sequence_hash":1,"local_hash":2},"tier":"disk"}"#]]
            .assert_eq(&serde_json::to_string(&disk).expect("serializable"));
    }

    #[test]
    fn tiers_are_ordered_fastest_first() {
        let mut tiers = [StorageTier::Disk, StorageTier::Device, StorageTier::Host];
        tiers.sort();
        assert_eq!(tiers, StorageTier::ALL);
        for (i, t) in StorageTier::ALL.iter().enumerate() {
            assert_eq!(t.index(), i);
            assert_eq!(
                serde_json::to_string(t).expect("serializable"),
                format!("\"{}\"", t.as_str())
            );
        }
    }
}
