//! What an engine offers for disaggregated serving: its KV blocks as bytes with their layout,
//! exported by a prefill engine and imported by a decode engine of the same layout.

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::EngineError;

/// How exported KV bytes are laid out, so that an importer can check it matches its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayout {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Element type of the bytes: `f32`, little-endian.
    pub dtype: String,
    /// Axis order within one block of one layer, keys then values.
    pub order: String,
}

impl KvLayout {
    /// Bytes of one block, all layers, keys and values.
    pub fn block_bytes(&self) -> usize {
        let elem = match self.dtype.as_str() {
            "f16" | "bf16" => 2,
            _ => 4,
        };
        2 * self.num_layers * self.num_kv_heads * self.head_dim * self.block_size * elem
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
