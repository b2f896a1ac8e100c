//! Deterministic token ids for trace prompts: each hash id stands for one fixed block of token
//! ids, so prompts that share hash ids share exactly those tokens and a server's prefix cache
//! sees the trace's prefix structure.

use std::ops::Range;

/// Maps hash ids to token blocks.
#[derive(Debug, Clone)]
pub struct BlockTokens {
    block_tokens: u32,
    ids: Range<u32>,
    salt: u64,
}

impl BlockTokens {
    /// Blocks of `block_tokens` ids drawn from `ids` (ids every tokenizer accepts as ordinary
    /// tokens: the default `32..256` suits byte-level and BPE vocabularies alike). `salt`
    /// changes every block, to get a cold server cache between runs.
    pub fn new(block_tokens: u32, ids: Range<u32>, salt: u64) -> Self {
        assert!(block_tokens > 0 && !ids.is_empty(), "validated by the caller");
        Self {
            block_tokens,
            ids,
            salt,
        }
    }

    /// The first `len` tokens of the block of `hash_id` (at most `block_tokens`).
    pub fn block(&self, hash_id: u64, len: u32, out: &mut Vec<u32>) {
        let mut state = hash_id ^ self.salt.rotate_left(32) ^ 0x5EED_B10C_u64;
        let width = u64::from(self.ids.end - self.ids.start);
        for _ in 0..len.min(self.block_tokens) {
            let r = splitmix64(&mut state);
            // Multiply-shift keeps the draw unbiased enough for a 16-bit range without a loop.
            out.push(self.ids.start + ((u128::from(r) * u128::from(width)) >> 64) as u32);
        }
    }

    /// A prompt of `input_length` tokens: the blocks of `hash_ids` in order, the last one cut.
    pub fn prompt(&self, hash_ids: &[u64], input_length: u32) -> Vec<u32> {
        let mut out = Vec::with_capacity(input_length as usize);
        let mut left = input_length;
        for &h in hash_ids {
            if left == 0 {
                break;
            }
            let take = left.min(self.block_tokens);
            self.block(h, take, &mut out);
            left -= take;
        }
        out
    }

    pub fn block_tokens(&self) -> u32 {
        self.block_tokens
    }
}

pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn equal_hash_ids_give_equal_tokens_and_different_ones_differ() {
        let t = BlockTokens::new(512, 32..256, 0);
        let a = t.prompt(&[1, 2, 3], 1300);
        let b = t.prompt(&[1, 2, 4], 1300);
        assert_eq!(a.len(), 1300);
        assert_eq!(a[..1024], b[..1024]);
        assert_ne!(a[1024..], b[1024..]);
        assert_ne!(t.prompt(&[5], 512), t.prompt(&[6], 512));
        assert!(a.iter().all(|id| (32..256).contains(id)));
        // A cut block is the start of the whole one.
        assert_eq!(t.prompt(&[9], 100)[..], t.prompt(&[9], 512)[..100]);
        // Another salt, other tokens.
        assert_ne!(BlockTokens::new(512, 32..256, 1).prompt(&[1], 512), t.prompt(&[1], 512));
    }

    proptest! {
        #[test]
        fn prompts_share_exactly_their_common_hash_prefix(
            a in proptest::collection::vec(0u64..6, 1..6),
            b in proptest::collection::vec(0u64..6, 1..6),
        ) {
            let t = BlockTokens::new(16, 0..256, 7);
            let (pa, pb) = (t.prompt(&a, a.len() as u32 * 16), t.prompt(&b, b.len() as u32 * 16));
            let common_ids = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
            let common_tokens = pa.iter().zip(&pb).take_while(|(x, y)| x == y).count();
            prop_assert!(common_tokens >= common_ids * 16);
            // Two different 16-token blocks agree on all 16 with odds of 256^-16.
            prop_assert!(common_tokens < (common_ids + 1) * 16 || common_ids == a.len().min(b.len()));
        }
    }
}
