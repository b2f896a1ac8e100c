//! G4, a tier shared by many workers over the network (LMCache's remote backends, Dynamo's
//! object storage): the contract a backend would meet. No backend exists yet; the manager
//! does not call this.

use turbine_tokens::BlockHash;

use crate::KvbmError;

/// A store of KV blocks outside this host, addressed by sequence hash. Calls may block on
/// the network: a manager would run them off the engine's thread.
pub trait RemoteTier: Send + Sync {
    /// Which leading blocks of `hashes` the store holds.
    fn contains(&self, hashes: &[BlockHash]) -> Result<usize, KvbmError>;
    /// Stores one block's bytes under its hash; storing a present block is not an error.
    fn put(&self, hash: BlockHash, parent: Option<u64>, bytes: &[u8]) -> Result<(), KvbmError>;
    /// Reads one block's bytes into `out`; `Ok(false)` if absent.
    fn get(&self, hash: BlockHash, out: &mut [u8]) -> Result<bool, KvbmError>;
}
