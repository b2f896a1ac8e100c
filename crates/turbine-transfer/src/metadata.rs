//! What an agent tells its peers once, through discovery: its regions, where to reach it, and
//! the compatibility attributes a peer must share before any transfer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::memory::{MemKind, RegionId};

/// The wire protocol's version; part of every compatibility hash, so agents of different
/// versions refuse each other at the handshake.
pub const PROTOCOL_VERSION: u32 = 1;

/// Attributes two agents must agree on to exchange bytes (for KV blocks: model, dtype, block
/// size, layout). Opaque to this crate: it only compares them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compat(BTreeMap<String, String>);

impl Compat {
    pub fn new<K: Into<String>, V: Into<String>>(attrs: impl IntoIterator<Item = (K, V)>) -> Self {
        Compat(attrs.into_iter().map(|(k, v)| (k.into(), v.into())).collect())
    }

    /// A hash of the attributes and the protocol version, in a canonical order.
    pub fn hash(&self) -> u64 {
        let mut bytes = PROTOCOL_VERSION.to_le_bytes().to_vec();
        for (key, value) in &self.0 {
            for part in [key, value] {
                bytes.extend_from_slice(&(part.len() as u64).to_le_bytes());
                bytes.extend_from_slice(part.as_bytes());
            }
        }
        xxhash_rust::xxh3::xxh3_64(&bytes)
    }

    /// `key=value, ...`, for messages.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        parts.join(", ")
    }

    /// The attributes on which `self` and `other` differ, as `key: ours vs theirs`.
    pub fn differences(&self, other: &Compat) -> String {
        let mut diffs = Vec::new();
        let keys: std::collections::BTreeSet<&String> = self.0.keys().chain(other.0.keys()).collect();
        for key in keys {
            let (ours, theirs) = (self.0.get(key), other.0.get(key));
            if ours != theirs {
                let show = |v: Option<&String>| v.map_or("(unset)".to_owned(), Clone::clone);
                diffs.push(format!("{key}: {} here, {} there", show(ours), show(theirs)));
            }
        }
        diffs.join(", ")
    }
}

/// One registered region as peers see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionInfo {
    pub id: RegionId,
    pub kind: MemKind,
    pub len: u64,
    /// For shared and file regions: where a process on the same host opens them.
    pub path: Option<PathBuf>,
}

/// Everything a peer needs to transfer with an agent, exchanged once per peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentMetadata {
    pub name: String,
    /// Random per agent: two agents of one name (a restarted worker) are different peers.
    pub uid: u64,
    /// Random per process: equal means the peer lives in this process.
    pub process: u64,
    /// The host's boot id: equal means shared and file regions can be opened directly.
    pub host: String,
    pub protocol: u32,
    pub compat: Compat,
    pub compat_hash: u64,
    /// The TCP listener, if the agent has one.
    pub addr: Option<SocketAddr>,
    pub regions: Vec<RegionInfo>,
}

impl AgentMetadata {
    pub fn region(&self, id: RegionId) -> Option<&RegionInfo> {
        self.regions.iter().find(|r| r.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_depends_on_every_attribute_and_not_on_their_order() {
        let a = Compat::new([("model", "m"), ("dtype", "f32"), ("block_size", "16")]);
        let b = Compat::new([("block_size", "16"), ("model", "m"), ("dtype", "f32")]);
        assert_eq!(a.hash(), b.hash());
        let c = Compat::new([("model", "m"), ("dtype", "bf16"), ("block_size", "16")]);
        assert_ne!(a.hash(), c.hash());
        assert_eq!(a.differences(&c), "dtype: f32 here, bf16 there");
        // Moving a byte between key and value must change the hash.
        assert_ne!(Compat::new([("ab", "c")]).hash(), Compat::new([("a", "bc")]).hash());
    }
}
