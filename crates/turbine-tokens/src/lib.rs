//! Token blocks and block hashing shared by the router, the engines and the block manager.
//!
//! The hashes are compatible with Dynamo's so that traces and tools interoperate:
//! a full block's *local hash* is `xxh3_64_with_seed` over the little-endian bytes of
//! its `u32` token ids, and a block's *sequence hash* chains the previous block's
//! sequence hash with its own local hash. A partial trailing block is never hashed,
//! because its contents may still change as the sequence grows.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Seed shared with Dynamo; changing it breaks compatibility with its KV events.
pub const HASH_SEED: u64 = 1337;

/// Hash of one full block's tokens, independent of what precedes it.
pub type LocalHash = u64;
/// Hash of a block together with every block before it: equal sequence hashes mean equal prefixes.
pub type SequenceHash = u64;

/// Hashes block hashes as themselves: they are already uniformly distributed, and hashing
/// them again costs more than the lookup. For maps keyed by [`SequenceHash`] or
/// [`LocalHash`] ([`HashMapOfHashes`]); other keys are folded in byte by byte.
#[derive(Debug, Default, Clone, Copy)]
pub struct PassThrough(u64);

impl std::hash::Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A map keyed by block hashes.
pub type HashMapOfHashes<V> = std::collections::HashMap<u64, V, std::hash::BuildHasherDefault<PassThrough>>;

/// The local hash of one block of token ids.
pub fn local_hash(tokens: &[u32]) -> LocalHash {
    // Blocks are small (16 to 64 tokens): hash from the stack, as engines do this for every
    // block they fill.
    const STACK_TOKENS: usize = 128;
    if tokens.len() <= STACK_TOKENS {
        let mut buf = [0u8; STACK_TOKENS * 4];
        for (chunk, t) in buf.chunks_exact_mut(4).zip(tokens) {
            chunk.copy_from_slice(&t.to_le_bytes());
        }
        return xxh3_64_with_seed(&buf[..tokens.len() * 4], HASH_SEED);
    }
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    xxh3_64_with_seed(&bytes, HASH_SEED)
}

/// Chains a block's local hash onto its parent's sequence hash.
pub fn chain_hash(parent: SequenceHash, local: LocalHash) -> SequenceHash {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&parent.to_le_bytes());
    bytes[8..].copy_from_slice(&local.to_le_bytes());
    xxh3_64_with_seed(&bytes, HASH_SEED)
}

/// Local hashes of every full block of `tokens`; the trailing partial block is skipped.
///
/// # Panics
/// If `block_size` is zero: a block size is validated once when config is parsed.
pub fn local_hashes(tokens: &[u32], block_size: usize) -> Vec<LocalHash> {
    assert!(block_size > 0, "block_size must be positive");
    tokens.chunks_exact(block_size).map(local_hash).collect()
}

/// Sequence hashes for a list of local hashes: `seq[0] = local[0]`, then chained.
pub fn sequence_hashes(locals: &[LocalHash]) -> Vec<SequenceHash> {
    let mut out = Vec::with_capacity(locals.len());
    for (i, &local) in locals.iter().enumerate() {
        out.push(if i == 0 { local } else { chain_hash(out[i - 1], local) });
    }
    out
}

/// One full block of a sequence, with both of its hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockHash {
    pub local: LocalHash,
    pub sequence: SequenceHash,
}

/// Both hashes of every full block of `tokens`.
///
/// # Panics
/// If `block_size` is zero.
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    let locals = local_hashes(tokens, block_size);
    let seqs = sequence_hashes(&locals);
    locals
        .into_iter()
        .zip(seqs)
        .map(|(local, sequence)| BlockHash { local, sequence })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::expect;
    use proptest::prelude::*;

    #[test]
    fn check_vectors_from_design() {
        assert_eq!(local_hash(&[1, 2, 3, 4]), 14643705804678351452);
        assert_eq!(local_hash(&[5, 6, 7, 8]), 16777012769546811212);
    }

    #[test]
    fn sequence_hash_chains_locals() {
        let tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        let blocks = block_hashes(&tokens, 4);
        expect![[r#"
            [
                BlockHash {
                    local: 14643705804678351452,
                    sequence: 14643705804678351452,
                },
                BlockHash {
                    local: 16777012769546811212,
                    sequence: 4945711292740353085,
                },
            ]
        "#]]
        .assert_debug_eq(&blocks);
        assert_eq!(blocks[1].sequence, chain_hash(blocks[0].sequence, blocks[1].local));
    }

    #[test]
    fn long_blocks_hash_like_short_ones() {
        let long: Vec<u32> = (0..300).collect();
        let mut bytes = Vec::new();
        for t in &long {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        assert_eq!(local_hash(&long), xxh3_64_with_seed(&bytes, HASH_SEED));
        assert_eq!(local_hash(&long[..128]), xxh3_64_with_seed(&bytes[..512], HASH_SEED));
    }

    #[test]
    fn partial_blocks_are_not_hashed() {
        assert!(block_hashes(&[1, 2, 3], 4).is_empty());
        assert_eq!(block_hashes(&[1, 2, 3, 4, 5], 4).len(), 1);
    }

    proptest! {
        /// Equal prefixes give equal sequence hashes, whatever follows them.
        #[test]
        fn shared_prefix_shares_hashes(
            prefix in proptest::collection::vec(any::<u32>(), 0..64),
            a in proptest::collection::vec(any::<u32>(), 0..64),
            b in proptest::collection::vec(any::<u32>(), 0..64),
        ) {
            let bs = 4;
            let full = prefix.len() / bs;
            let ha = block_hashes(&[prefix.clone(), a].concat(), bs);
            let hb = block_hashes(&[prefix, b].concat(), bs);
            prop_assert_eq!(&ha[..full], &hb[..full]);
        }
    }
}
