//! The KV tensors behind the block pool's block ids: one key and one value buffer per layer,
//! addressed by block. The pool decides which blocks a sequence owns; this only stores them.
//!
//! Layout per layer: `[block][kv head][slot in block][head dim]`, so that gathering one head's
//! keys for a sequence copies `block_size × head_dim` contiguous values per block. On a GPU the
//! same block ids would index device buffers read by a paged-attention kernel instead of
//! being gathered.
//!
//! Values are stored as the cache's [`KvDtype`]; the model sees f32 either way: `write`
//! converts (or quantizes, one scale per row of `head_dim` values), `gather` converts back.

use std::ops::Range;

use half::f16;
use half::slice::HalfFloatSliceExt;
pub use turbine_engine::kv_transfer::{KvDtype, UnknownKvDtype};
pub use turbine_engine::{KvBlocks, KvLayout};

use crate::NativeError;

// Blocks are handed out in place as their bytes, which `KvLayout` defines as little-endian.
#[cfg(target_endian = "big")]
compile_error!("the KV cache's bytes are little-endian; a big-endian build would have to swap them");

#[derive(Debug)]
pub struct PagedKv {
    /// Per layer: keys, then values.
    layers: Vec<[Store; 2]>,
    dtype: KvDtype,
    num_blocks: usize,
    block_size: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl PagedKv {
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype: KvDtype,
    ) -> Self {
        let per_layer = num_blocks * block_size * num_kv_heads * head_dim;
        Self {
            layers: (0..num_layers)
                .map(|_| {
                    [
                        Store::new(dtype, per_layer, head_dim),
                        Store::new(dtype, per_layer, head_dim),
                    ]
                })
                .collect(),
            dtype,
            num_blocks,
            block_size,
            num_kv_heads,
            head_dim,
        }
    }

    /// Bytes of KV per token, all layers, stored as `dtype`: what sizes the pool for a memory
    /// budget.
    pub fn bytes_per_token(num_layers: usize, num_kv_heads: usize, head_dim: usize, dtype: KvDtype) -> usize {
        2 * num_layers * num_kv_heads * dtype.row_bytes(head_dim)
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Values of one block of one layer's keys or values.
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
            let [keys, values] = &mut self.layers[layer];
            keys.write_row(at, &k[head * hd..(head + 1) * hd]);
            values.write_row(at, &v[head * hd..(head + 1) * hd]);
        }
    }

    /// The first `len` positions' keys and values as `[kv head][position][head dim]`, as f32
    /// whatever the cache stores. `table` must hold at least `len` positions.
    pub fn gather(&self, layer: usize, table: &[u32], len: usize, keys: &mut Vec<f32>, values: &mut Vec<f32>) {
        debug_assert!(
            table.len() * self.block_size >= len,
            "{len} positions in {} blocks",
            table.len()
        );
        let [k, v] = &self.layers[layer];
        self.read(k, table, len, keys);
        self.read(v, table, len, values);
    }

    /// Bytes of one block, all layers, keys and values: what a tier below the pool stores
    /// per block.
    pub fn block_bytes(&self) -> usize {
        Self::bytes_per_token(self.layers.len(), self.num_kv_heads, self.head_dim, self.dtype) * self.block_size
    }

    /// One block's bytes in place, piece by piece in the order [`Self::export`] writes them
    /// (per layer, keys then values; for `q8` each as its codes then its scales), so that a
    /// tier copies them without a staging buffer.
    pub fn block_pieces(&self, block: u32) -> Result<Vec<&[u8]>, NativeError> {
        self.check_block(block)?;
        let values = self.block_values(block);
        let mut pieces = Vec::with_capacity(4 * self.layers.len());
        for [k, v] in &self.layers {
            k.pieces(values.clone(), self.head_dim, &mut pieces);
            v.pieces(values.clone(), self.head_dim, &mut pieces);
        }
        Ok(pieces)
    }

    /// The same pieces as [`Self::block_pieces`], to be overwritten.
    pub fn block_pieces_mut(&mut self, block: u32) -> Result<Vec<&mut [u8]>, NativeError> {
        self.check_block(block)?;
        let (values, hd) = (self.block_values(block), self.head_dim);
        let mut pieces = Vec::with_capacity(4 * self.layers.len());
        for [k, v] in &mut self.layers {
            k.pieces_mut(values.clone(), hd, &mut pieces);
            v.pieces_mut(values.clone(), hd, &mut pieces);
        }
        Ok(pieces)
    }

    pub fn layout(&self) -> KvLayout {
        KvLayout {
            num_layers: self.layers.len(),
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            block_size: self.block_size,
            dtype: self.dtype.name().to_string(),
            order: match self.dtype {
                KvDtype::F32 | KvDtype::F16 => "kv_head,slot,head_dim",
                KvDtype::Q8 => "kv_head,slot,head_dim;scale:kv_head,slot",
            }
            .to_string(),
        }
    }

    /// Copies `blocks` out, in order.
    pub fn export(&self, blocks: &[u32]) -> Result<KvBlocks, NativeError> {
        let mut data = Vec::with_capacity(blocks.len() * self.block_bytes());
        for &block in blocks {
            for piece in self.block_pieces(block)? {
                data.extend_from_slice(piece);
            }
        }
        Ok(KvBlocks {
            layout: self.layout(),
            data,
            num_blocks: blocks.len(),
            first_block: 0,
        })
    }

    /// Writes exported blocks into `blocks` of this cache, which must have the same layout;
    /// on an error nothing is written.
    pub fn import(&mut self, kv: &KvBlocks, blocks: &[u32]) -> Result<(), NativeError> {
        if kv.layout != self.layout() {
            return Err(NativeError::KvLayout(format!(
                "{:?} into {:?}",
                kv.layout,
                self.layout()
            )));
        }
        let per_block = self.block_bytes();
        if blocks.len() != kv.num_blocks || kv.data.len() != kv.num_blocks * per_block {
            return Err(NativeError::KvLayout(format!(
                "{} bytes for {} blocks into {} blocks of {per_block} bytes",
                kv.data.len(),
                kv.num_blocks,
                blocks.len()
            )));
        }
        for &block in blocks {
            self.check_block(block)?;
        }
        for (&block, bytes) in blocks.iter().zip(kv.data.chunks_exact(per_block.max(1))) {
            let mut rest = bytes;
            for piece in self.block_pieces_mut(block)? {
                let (head, tail) = rest.split_at(piece.len());
                piece.copy_from_slice(head);
                rest = tail;
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

    /// Where `block` lies in each layer's buffer, in values.
    fn block_values(&self, block: u32) -> Range<usize> {
        let len = self.block_len();
        block as usize * len..(block as usize + 1) * len
    }

    /// Converts the runs of `store` that hold the first `len` positions of `table`, head by
    /// head, into `out`. The dtype is matched once here, so each run converts as one slice.
    fn read(&self, store: &Store, table: &[u32], len: usize, out: &mut Vec<f32>) {
        let (bs, hd) = (self.block_size, self.head_dim);
        // Every value is overwritten, so a buffer reused from a longer gather is only cut.
        out.resize(self.num_kv_heads * len * hd, 0.0);
        let runs = (0..self.num_kv_heads).flat_map(move |head| {
            table
                .iter()
                .take(len.div_ceil(bs))
                .enumerate()
                .map(move |(i, &block)| (self.offset(block, head, 0), (len - i * bs).min(bs) * hd))
        });
        match store {
            Store::F32(s) => fill(out, runs, |at, dst| dst.copy_from_slice(&s[at..at + dst.len()])),
            Store::F16(s) => fill(out, runs, |at, dst| s[at..at + dst.len()].convert_to_f32_slice(dst)),
            Store::Q8 { codes, scales } => fill(out, runs, |at, dst| {
                dequantize(&codes[at..at + dst.len()], &scales[at / hd..], hd, dst)
            }),
        }
    }
}

/// One layer's keys or values, `[block][kv head][slot][head dim]`.
#[derive(Debug)]
enum Store {
    F32(Vec<f32>),
    F16(Vec<f16>),
    /// Codes in the same layout, and one scale per row, `[block][kv head][slot]`.
    Q8 {
        codes: Vec<i8>,
        scales: Vec<f32>,
    },
}

impl Store {
    fn new(dtype: KvDtype, len: usize, head_dim: usize) -> Self {
        match dtype {
            KvDtype::F32 => Store::F32(vec![0.0; len]),
            KvDtype::F16 => Store::F16(vec![f16::ZERO; len]),
            KvDtype::Q8 => Store::Q8 {
                codes: vec![0; len],
                scales: vec![0.0; len / head_dim.max(1)],
            },
        }
    }

    /// Stores one row of `head_dim` values at value offset `at`.
    fn write_row(&mut self, at: usize, x: &[f32]) {
        match self {
            Store::F32(s) => s[at..at + x.len()].copy_from_slice(x),
            Store::F16(s) => s[at..at + x.len()].convert_from_f32_slice(x),
            Store::Q8 { codes, scales } => scales[at / x.len()] = quantize(x, &mut codes[at..at + x.len()]),
        }
    }

    fn pieces<'a>(&'a self, values: Range<usize>, hd: usize, out: &mut Vec<&'a [u8]>) {
        match self {
            Store::F32(s) => out.push(bytemuck::cast_slice(&s[values])),
            Store::F16(s) => out.push(bytemuck::cast_slice(&s[values])),
            Store::Q8 { codes, scales } => {
                let rows = values.start / hd..values.end / hd;
                out.push(bytemuck::cast_slice(&codes[values]));
                out.push(bytemuck::cast_slice(&scales[rows]));
            }
        }
    }

    fn pieces_mut<'a>(&'a mut self, values: Range<usize>, hd: usize, out: &mut Vec<&'a mut [u8]>) {
        match self {
            Store::F32(s) => out.push(bytemuck::cast_slice_mut(&mut s[values])),
            Store::F16(s) => out.push(bytemuck::cast_slice_mut(&mut s[values])),
            Store::Q8 { codes, scales } => {
                let rows = values.start / hd..values.end / hd;
                out.push(bytemuck::cast_slice_mut(&mut codes[values]));
                out.push(bytemuck::cast_slice_mut(&mut scales[rows]));
            }
        }
    }
}

/// Lays `runs` (value offset, length) end to end in `out`, each copied by `copy`.
fn fill(out: &mut [f32], runs: impl Iterator<Item = (usize, usize)>, mut copy: impl FnMut(usize, &mut [f32])) {
    let mut rest = out;
    for (at, n) in runs {
        let (dst, tail) = std::mem::take(&mut rest).split_at_mut(n);
        copy(at, dst);
        rest = tail;
    }
}

/// Symmetric int8 codes of one row into `codes`; returns the row's scale, `max |x| / 127`.
fn quantize(x: &[f32], codes: &mut [i8]) -> f32 {
    let max = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let inv = if max > 0.0 { 127.0 / max } else { 0.0 };
    for (c, &v) in codes.iter_mut().zip(x) {
        // |v * inv| <= 127 up to rounding, and `as` saturates what rounding adds.
        *c = (v * inv).round() as i8;
    }
    max / 127.0
}

/// Rows of `hd` codes times their scales into `out`; plain loops that the compiler
/// vectorises.
fn dequantize(codes: &[i8], scales: &[f32], hd: usize, out: &mut [f32]) {
    for ((dst, src), &scale) in out.chunks_exact_mut(hd).zip(codes.chunks_exact(hd)).zip(scales) {
        for (d, &c) in dst.iter_mut().zip(src) {
            *d = f32::from(c) * scale;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The most a stored value may differ from what was written, in a row whose largest
    /// magnitude is `row_max`: f16 rounds to 11 significant bits, q8 to half a step of
    /// `row_max / 127`.
    fn tolerance(dtype: KvDtype, row_max: f32) -> f32 {
        match dtype {
            KvDtype::F32 => 0.0,
            KvDtype::F16 => row_max / 2048.0,
            KvDtype::Q8 => row_max / 254.0 * 1.0001,
        }
    }

    /// A deterministic value for (layer, position, index, keys or values), of mixed signs
    /// and magnitudes.
    fn value(layer: usize, pos: usize, i: usize, key: bool) -> f32 {
        let x = ((layer * 131 + pos * 31 + i * 7 + usize::from(key) * 3) % 97) as f32 - 48.0;
        x * (1.0 + (pos % 5) as f32) / 8.0
    }

    /// Writes `len` positions into every layer of `kv` along `table`.
    fn fill_cache(kv: &mut PagedKv, table: &[u32], len: usize) {
        let row = kv.num_kv_heads * kv.head_dim;
        for layer in 0..kv.layers.len() {
            for pos in 0..len {
                let k: Vec<f32> = (0..row).map(|i| value(layer, pos, i, true)).collect();
                let v: Vec<f32> = (0..row).map(|i| value(layer, pos, i, false)).collect();
                kv.write(layer, table, pos, &k, &v);
            }
        }
    }

    fn copy_pieces(from: &PagedKv, block: u32, to: &mut PagedKv, into: u32) -> Result<(), NativeError> {
        let bytes = from.block_pieces(block)?.concat();
        let mut rest = &bytes[..];
        for piece in to.block_pieces_mut(into)? {
            let (head, tail) = rest.split_at(piece.len());
            piece.copy_from_slice(head);
            rest = tail;
        }
        assert!(rest.is_empty());
        Ok(())
    }

    #[test]
    fn gather_returns_what_was_written_across_blocks() {
        for dtype in KvDtype::ALL {
            let mut kv = PagedKv::new(2, 8, 4, 2, 3, dtype);
            let table = [5, 2, 7];
            for pos in 0..10 {
                let k: Vec<f32> = (0..6).map(|i| (pos * 100 + i) as f32).collect();
                let v: Vec<f32> = k.iter().map(|x| -x).collect();
                kv.write(1, &table, pos, &k, &v);
            }
            let (mut k, mut v) = (Vec::new(), Vec::new());
            kv.gather(1, &table, 10, &mut k, &mut v);
            // head 1, position 9, dim 2 = 9*100 + 1*3 + 2, the largest of its row
            let tol = tolerance(dtype, 905.0);
            assert!((k[(10 + 9) * 3 + 2] - 905.0).abs() <= tol, "{dtype}");
            assert!((v[(10 + 9) * 3 + 2] + 905.0).abs() <= tol, "{dtype}");
            assert!((k[4 * 3] - 400.0).abs() <= tolerance(dtype, 402.0), "{dtype}");
            // A shorter gather into the same buffers is as long as it should be.
            kv.gather(1, &table, 5, &mut k, &mut v);
            assert_eq!(k.len(), 2 * 5 * 3);
            assert!(
                (k[5 * 3] - 3.0).abs() <= tolerance(dtype, 5.0),
                "{dtype}: head 1, position 0"
            );
            kv.gather(0, &table, 10, &mut k, &mut v);
            assert!(k.iter().all(|&x| x == 0.0), "{dtype}: layers are separate");
        }
    }

    #[test]
    fn every_value_round_trips_within_the_dtype_tolerance() {
        for dtype in KvDtype::ALL {
            let (heads, hd, len) = (3, 8, 37);
            let mut kv = PagedKv::new(2, 16, 4, heads, hd, dtype);
            let table: Vec<u32> = (0..10).rev().collect();
            fill_cache(&mut kv, &table, len);
            let (mut k, mut v) = (Vec::new(), Vec::new());
            for layer in 0..2 {
                kv.gather(layer, &table, len, &mut k, &mut v);
                assert_eq!((k.len(), v.len()), (heads * len * hd, heads * len * hd));
                for (got, key) in [(&k, true), (&v, false)] {
                    for head in 0..heads {
                        for pos in 0..len {
                            let want: Vec<f32> = (0..hd).map(|d| value(layer, pos, head * hd + d, key)).collect();
                            let max = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                            let at = (head * len + pos) * hd;
                            for (g, w) in got[at..at + hd].iter().zip(&want) {
                                assert!((g - w).abs() <= tolerance(dtype, max), "{dtype}: {g} for {w}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn export_then_import_elsewhere_round_trips_exactly() -> Result<(), NativeError> {
        for dtype in KvDtype::ALL {
            let mut a = PagedKv::new(2, 4, 2, 1, 2, dtype);
            fill_cache(&mut a, &[3, 1], 4);
            let exported = a.export(&[3, 1])?;
            assert_eq!(exported.layout.dtype, dtype.name());
            assert_eq!(exported.data.len(), 2 * exported.layout.block_bytes());
            let mut b = PagedKv::new(2, 4, 2, 1, 2, dtype);
            b.import(&exported, &[0, 2])?;
            let (mut ka, mut va, mut kb, mut vb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for layer in 0..2 {
                a.gather(layer, &[3, 1], 4, &mut ka, &mut va);
                b.gather(layer, &[0, 2], 4, &mut kb, &mut vb);
                assert_eq!((&ka, &va), (&kb, &vb), "{dtype}");
            }
            assert_eq!(b.export(&[0, 2])?, exported);
            assert!(matches!(
                PagedKv::new(2, 4, 4, 1, 2, dtype).import(&exported, &[0, 1]),
                Err(NativeError::KvLayout(_))
            ));
            assert!(matches!(b.import(&exported, &[0, 4]), Err(NativeError::KvLayout(_))));
            assert_eq!(b.export(&[0, 2])?, exported, "{dtype}: a refused import writes nothing");
        }
        // Another dtype's blocks are another layout.
        let f16 = PagedKv::new(2, 4, 2, 1, 2, KvDtype::F16).export(&[0])?;
        assert!(matches!(
            PagedKv::new(2, 4, 2, 1, 2, KvDtype::F32).import(&f16, &[0]),
            Err(NativeError::KvLayout(_))
        ));
        Ok(())
    }

    #[test]
    fn block_pieces_are_the_exported_bytes_and_write_back() -> Result<(), NativeError> {
        for dtype in KvDtype::ALL {
            let mut a = PagedKv::new(2, 4, 2, 3, 4, dtype);
            fill_cache(&mut a, &[3, 1], 4);
            let exported = a.export(&[1])?;
            let pieces: Vec<u8> = a.block_pieces(1)?.concat();
            assert_eq!(pieces.len(), a.block_bytes());
            assert_eq!(pieces, exported.data);
            let mut b = PagedKv::new(2, 4, 2, 3, 4, dtype);
            copy_pieces(&a, 1, &mut b, 2)?;
            assert_eq!(b.export(&[2])?.data, exported.data, "{dtype}");
            let (mut ka, mut va, mut kb, mut vb) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            a.gather(1, &[1], 2, &mut ka, &mut va);
            b.gather(1, &[2], 2, &mut kb, &mut vb);
            assert_eq!((ka, va), (kb, vb), "{dtype}");
            assert!(a.block_pieces(4).is_err());
            assert!(b.block_pieces_mut(4).is_err());
        }
        Ok(())
    }

    #[test]
    fn block_bytes_follow_the_dtype() {
        // SmolLM2-135M's shape: 30 layers, 3 KV heads of 64.
        let bytes = |dtype| PagedKv::bytes_per_token(30, 3, 64, dtype);
        assert_eq!(bytes(KvDtype::F32), 46_080);
        assert_eq!(bytes(KvDtype::F16), 23_040);
        assert_eq!(bytes(KvDtype::Q8), 12_240, "64 codes and a 4-byte scale per row");
        for dtype in KvDtype::ALL {
            let kv = PagedKv::new(3, 2, 16, 2, 8, dtype);
            let pieces: usize = kv.block_pieces(0).map(|p| p.iter().map(|p| p.len()).sum()).unwrap_or(0);
            assert_eq!(kv.block_bytes(), pieces, "{dtype}");
            assert_eq!(kv.layout().block_bytes(), pieces, "{dtype}");
            assert_eq!(PagedKv::bytes_per_token(3, 2, 8, dtype) * 16, pieces, "{dtype}");
        }
    }

    #[test]
    fn dtypes_parse_from_their_names_only() {
        for dtype in KvDtype::ALL {
            assert_eq!(dtype.name().parse::<KvDtype>(), Ok(dtype));
        }
        assert_eq!(KvDtype::default(), KvDtype::F32);
        let err = "q4".parse::<KvDtype>().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(r#"unknown KV cache dtype "q4": expected f32, f16 or q8"#)
        );
    }
}
