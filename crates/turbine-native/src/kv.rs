//! The KV tensors behind the block pool's block ids: one key and one value buffer per layer,
//! addressed by block. The pool decides which blocks a sequence owns; this only stores them.
//!
//! Layout per layer: `[block][kv head][slot in block][head dim]`, so that gathering one head's
//! keys for a sequence copies `block_size × head_dim` contiguous floats per block. On a GPU the
//! same block ids would index device buffers read by a paged-attention kernel instead of
//! being gathered.

pub use turbine_engine::{KvBlocks, KvLayout};

use crate::NativeError;

#[derive(Debug)]
pub struct PagedKv {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    num_blocks: usize,
    block_size: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl PagedKv {
    pub fn new(num_layers: usize, num_blocks: usize, block_size: usize, num_kv_heads: usize, head_dim: usize) -> Self {
        let per_layer = num_blocks * block_size * num_kv_heads * head_dim;
        Self {
            keys: (0..num_layers).map(|_| vec![0.0; per_layer]).collect(),
            values: (0..num_layers).map(|_| vec![0.0; per_layer]).collect(),
            num_blocks,
            block_size,
            num_kv_heads,
            head_dim,
        }
    }

    /// Bytes of KV per token, all layers: what sizes the pool for a memory budget.
    pub fn bytes_per_token(num_layers: usize, num_kv_heads: usize, head_dim: usize) -> usize {
        2 * num_layers * num_kv_heads * head_dim * std::mem::size_of::<f32>()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    fn block_len(&self) -> usize {
        self.block_size * self.num_kv_heads * self.head_dim
    }

    fn offset(&self, block: u32, head: usize, slot: usize) -> usize {
        ((block as usize * self.num_kv_heads + head) * self.block_size + slot) * self.head_dim
    }

    /// Stores one token's keys and values (`[kv head][head dim]` each) at `position` of the
    /// sequence whose blocks are `table`.
    pub fn write(&mut self, layer: usize, table: &[u32], position: usize, k: &[f32], v: &[f32]) {
        let (block, slot) = (table[position / self.block_size], position % self.block_size);
        let hd = self.head_dim;
        for head in 0..self.num_kv_heads {
            let at = self.offset(block, head, slot);
            self.keys[layer][at..at + hd].copy_from_slice(&k[head * hd..(head + 1) * hd]);
            self.values[layer][at..at + hd].copy_from_slice(&v[head * hd..(head + 1) * hd]);
        }
    }

    /// The first `len` positions' keys and values as `[kv head][position][head dim]`.
    pub fn gather(&self, layer: usize, table: &[u32], len: usize, keys: &mut Vec<f32>, values: &mut Vec<f32>) {
        let (bs, hd) = (self.block_size, self.head_dim);
        keys.clear();
        values.clear();
        keys.reserve(self.num_kv_heads * len * hd);
        values.reserve(self.num_kv_heads * len * hd);
        for head in 0..self.num_kv_heads {
            let mut left = len;
            for &block in table {
                if left == 0 {
                    break;
                }
                let n = left.min(bs);
                let at = self.offset(block, head, 0);
                keys.extend_from_slice(&self.keys[layer][at..at + n * hd]);
                values.extend_from_slice(&self.values[layer][at..at + n * hd]);
                left -= n;
            }
        }
    }

    pub fn layout(&self) -> KvLayout {
        KvLayout {
            num_layers: self.keys.len(),
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            block_size: self.block_size,
            dtype: "f32".to_string(),
            order: "kv_head,slot,head_dim".to_string(),
        }
    }

    /// Copies `blocks` out, in order.
    pub fn export(&self, blocks: &[u32]) -> Result<KvBlocks, NativeError> {
        let len = self.block_len();
        let mut data = Vec::with_capacity(blocks.len() * self.keys.len() * 2 * len * 4);
        for &block in blocks {
            self.check_block(block)?;
            let at = block as usize * len;
            for layer in 0..self.keys.len() {
                for x in self.keys[layer][at..at + len]
                    .iter()
                    .chain(&self.values[layer][at..at + len])
                {
                    data.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
        Ok(KvBlocks {
            layout: self.layout(),
            data,
            num_blocks: blocks.len(),
            first_block: 0,
        })
    }

    /// Writes exported blocks into `blocks` of this cache, which must have the same layout.
    pub fn import(&mut self, kv: &KvBlocks, blocks: &[u32]) -> Result<(), NativeError> {
        if kv.layout != self.layout() {
            return Err(NativeError::KvLayout(format!(
                "{:?} into {:?}",
                kv.layout,
                self.layout()
            )));
        }
        let len = self.block_len();
        let per_block = self.keys.len() * 2 * len * 4;
        if blocks.len() != kv.num_blocks || kv.data.len() != kv.num_blocks * per_block {
            return Err(NativeError::KvLayout(format!(
                "{} bytes for {} blocks into {} blocks of {per_block} bytes",
                kv.data.len(),
                kv.num_blocks,
                blocks.len()
            )));
        }
        for (i, &block) in blocks.iter().enumerate() {
            self.check_block(block)?;
            let at = block as usize * len;
            let mut floats = kv.data[i * per_block..(i + 1) * per_block]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            for layer in 0..self.keys.len() {
                for x in self.keys[layer][at..at + len].iter_mut() {
                    *x = floats.next().unwrap_or_default();
                }
                for x in self.values[layer][at..at + len].iter_mut() {
                    *x = floats.next().unwrap_or_default();
                }
            }
        }
        Ok(())
    }

    fn check_block(&self, block: u32) -> Result<(), NativeError> {
        if block as usize >= self.num_blocks {
            return Err(NativeError::KvLayout(format!("block {block} of {}", self.num_blocks)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_returns_what_was_written_across_blocks() {
        let mut kv = PagedKv::new(2, 8, 4, 2, 3);
        let table = [5, 2, 7];
        for pos in 0..10 {
            let k: Vec<f32> = (0..6).map(|i| (pos * 100 + i) as f32).collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            kv.write(1, &table, pos, &k, &v);
        }
        let (mut k, mut v) = (Vec::new(), Vec::new());
        kv.gather(1, &table, 10, &mut k, &mut v);
        // head 1, position 9, dim 2 = 9*100 + 1*3 + 2
        assert_eq!(k[(10 + 9) * 3 + 2], 905.0);
        assert_eq!(v[(10 + 9) * 3 + 2], -905.0);
        assert_eq!(k[4 * 3], 400.0);
        kv.gather(0, &table, 10, &mut k, &mut v);
        assert!(k.iter().all(|&x| x == 0.0), "layers are separate");
    }

    #[test]
    fn export_then_import_elsewhere_round_trips() -> Result<(), NativeError> {
        let mut a = PagedKv::new(2, 4, 2, 1, 2);
        for pos in 0..4 {
            a.write(0, &[3, 1], pos, &[pos as f32, 1.0], &[2.0, pos as f32]);
            a.write(1, &[3, 1], pos, &[7.0, pos as f32], &[pos as f32, 9.0]);
        }
        let exported = a.export(&[3, 1])?;
        let mut b = PagedKv::new(2, 4, 2, 1, 2);
        b.import(&exported, &[0, 2])?;
        let (mut ka, mut va, mut kb, mut vb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for layer in 0..2 {
            a.gather(layer, &[3, 1], 4, &mut ka, &mut va);
            b.gather(layer, &[0, 2], 4, &mut kb, &mut vb);
            assert_eq!((&ka, &va), (&kb, &vb));
        }
        assert!(matches!(
            PagedKv::new(2, 4, 4, 1, 2).import(&exported, &[0, 1]),
            Err(NativeError::KvLayout(_))
        ));
        Ok(())
    }
}
