//! What an engine offers for disaggregated serving: its KV blocks as bytes with their layout,
//! exported by a prefill engine and imported by a decode engine of the same layout.

use std::fmt;
use std::str::FromStr;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::EngineError;

/// How a KV cache stores each key and value. Narrower types hold more tokens in the same
/// bytes at some precision: `f16` half of `f32`'s bytes, `q8` about a quarter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum KvDtype {
    #[default]
    F32,
    F16,
    /// Symmetric int8 per row (one token's `head_dim` keys or values of one KV head), with
    /// one f32 scale per row, `max |x| / 127`.
    Q8,
}

impl KvDtype {
    pub const ALL: [KvDtype; 3] = [KvDtype::F32, KvDtype::F16, KvDtype::Q8];

    /// The name in flags and in [`KvLayout::dtype`].
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Q8 => "q8",
        }
    }

    /// Bytes of one row of `head_dim` values, with its scale for `q8`.
    pub fn row_bytes(self, head_dim: usize) -> usize {
        match self {
            KvDtype::F32 => 4 * head_dim,
            KvDtype::F16 => 2 * head_dim,
            KvDtype::Q8 => head_dim + 4,
        }
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown KV cache dtype {0:?}: expected f32, f16 or q8")]
pub struct UnknownKvDtype(pub String);

impl FromStr for KvDtype {
    type Err = UnknownKvDtype;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KvDtype::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| UnknownKvDtype(s.to_owned()))
    }
}

/// How exported KV bytes are laid out, so that an importer can check it matches its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayout {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Element type of the bytes, a [`KvDtype`] name: `f32` or `f16` little-endian, or `q8`:
    /// int8 values, then their rows' little-endian f32 scales.
    pub dtype: String,
    /// Axis order within one block of one layer, keys then values.
    pub order: String,
}

impl KvLayout {
    /// Bytes of one block, all layers, keys and values.
    pub fn block_bytes(&self) -> usize {
        let row = match self.dtype.parse::<KvDtype>() {
            Ok(dtype) => dtype.row_bytes(self.head_dim),
            Err(_) if self.dtype == "bf16" => 2 * self.head_dim,
            // Layouts that are not an engine's cache (the mocker's) count 4 bytes a value.
            Err(_) => 4 * self.head_dim,
        };
        2 * self.num_layers * self.num_kv_heads * self.block_size * row
    }
}

/// Consecutive full blocks of a prompt's KV, from block `first_block`, leaving one engine for
/// another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvBlocks {
    pub layout: KvLayout,
    /// Per block: for each layer, its keys then its values.
    pub data: Vec<u8>,
    pub num_blocks: usize,
    /// The prompt block the data starts at: an importer that holds the blocks before it
    /// receives only the rest.
    #[serde(default)]
    pub first_block: usize,
}

/// An engine whose KV blocks can move to another engine.
pub trait KvTransfer: Send + Sync + 'static {
    fn layout(&self) -> KvLayout;

    /// How many full blocks at the start of `tokens` this engine holds in its cache now.
    fn cached_prefix(&self, tokens: Vec<u32>) -> BoxFuture<'static, Result<usize, EngineError>>;

    /// The KV of the longest cached run of full blocks at the start of `tokens`.
    fn export_prefix(&self, tokens: Vec<u32>) -> BoxFuture<'static, Result<KvBlocks, EngineError>>;

    /// Stores `kv` as the cached KV of blocks `kv.first_block..` of `tokens`, which requires
    /// the blocks before it to be cached here still; returns how many blocks were added.
    /// Requests with that prefix then skip its prefill.
    fn import_blocks(&self, tokens: Vec<u32>, kv: KvBlocks) -> BoxFuture<'static, Result<usize, EngineError>>;
}
