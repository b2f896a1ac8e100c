//! Reading the header of a GGUF file: its metadata key/values and where each tensor lies.
//!
//! Only the header is read; tensor data stays on disk for whoever maps it. Every count in the
//! header is checked against the bytes left in the file before anything is allocated, so a
//! corrupted count fails with an error instead of asking for gigabytes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

/// What can go wrong while reading a GGUF header.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("I/O error")]
    Io(#[source] io::Error),
    #[error("not a GGUF file: the first bytes are {found:02x?}, not \"GGUF\"")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported GGUF version {0}: only versions 2 and 3 are read")]
    UnsupportedVersion(u32),
    #[error("file truncated: {what} at byte {offset} needs {needed} bytes, {remaining} are left")]
    Truncated {
        what: &'static str,
        offset: u64,
        needed: u64,
        remaining: u64,
    },
    #[error("corrupt file: {count} {what} at byte {offset} cannot fit in the {remaining} bytes left")]
    CountTooLarge {
        what: &'static str,
        count: u64,
        offset: u64,
        remaining: u64,
    },
    #[error("unknown value type {ty} at byte {offset}")]
    UnknownValueType { ty: u32, offset: u64 },
    #[error("string at byte {offset} is not UTF-8")]
    NotUtf8 {
        offset: u64,
        #[source]
        source: std::string::FromUtf8Error,
    },
    #[error("arrays nested more than {MAX_ARRAY_DEPTH} deep at byte {offset}")]
    TooDeep { offset: u64 },
    #[error("metadata key {0:?} appears twice")]
    DuplicateKey(String),
    #[error("tensor {name:?} has {dims} dimensions; GGUF allows at most {MAX_DIMS}")]
    TooManyDims { name: String, dims: u32 },
    #[error("general.alignment is {0}; it must be a non-zero power of two")]
    BadAlignment(u64),
    #[error("tensor {name:?} starts at data offset {offset}, past the end of the file")]
    TensorOutOfBounds { name: String, offset: u64 },
}

/// Deepest nesting of arrays accepted; real files nest at most one level.
pub const MAX_ARRAY_DEPTH: u32 = 4;
/// GGML tensors have at most four dimensions.
pub const MAX_DIMS: u32 = 4;
/// Alignment of the data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<MetadataValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetadataValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer of any width that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetadataValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor's data lies and how it is laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in GGML order: the first one varies fastest.
    pub shape: Vec<u64>,
    /// The `ggml_type` id (0 = F32, 1 = F16, 2 = Q4_0, 3 = Q4_1, 8 = Q8_0, ...).
    pub ggml_type: u32,
    /// Offset of the data from [`Gguf::data_offset`], not from the start of the file.
    pub offset: u64,
}

/// The parsed header of a GGUF file.
#[derive(Debug, Clone, PartialEq)]
pub struct Gguf {
    pub version: u32,
    /// Key/values in file order.
    pub metadata: Vec<(String, MetadataValue)>,
    pub tensors: Vec<TensorInfo>,
    /// Alignment of the data section and of every tensor in it.
    pub alignment: u64,
    /// Absolute file offset at which tensor data starts.
    pub data_offset: u64,
    index: HashMap<String, usize>,
}

impl Gguf {
    /// Reads the header of the GGUF file at `path`.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let file = File::open(path).map_err(GgufError::Io)?;
        let len = file.metadata().map_err(GgufError::Io)?.len();
        Self::read(BufReader::new(file), len)
    }

    /// Reads a GGUF header from `bytes`, the whole file or at least its header.
    pub fn parse(bytes: &[u8]) -> Result<Self, GgufError> {
        Self::read(bytes, bytes.len() as u64)
    }

    /// Reads a GGUF header from `reader`, whose total length is `len` bytes.
    pub fn read(reader: impl Read, len: u64) -> Result<Self, GgufError> {
        let mut r = Reader {
            inner: reader,
            pos: 0,
            len,
        };
        let mut magic = [0u8; 4];
        r.bytes(&mut magic, "magic")?;
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let tensor_count = r.u64("tensor count")?;
        let kv_count = r.u64("metadata count")?;
        // A key/value takes at least a key length, a type and one byte of value.
        r.check_count(kv_count, 8 + 4 + 1, "metadata key/values")?;
        let mut metadata = Vec::with_capacity(usize_from(kv_count));
        let mut index = HashMap::with_capacity(usize_from(kv_count));
        for _ in 0..kv_count {
            let key = r.string("metadata key")?;
            let ty = r.u32("value type")?;
            let value = r.value(ty, 0)?;
            if index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::DuplicateKey(key));
            }
            metadata.push((key, value));
        }

        // A tensor info takes at least a name length, a dimension count, a type and an offset.
        r.check_count(tensor_count, 8 + 4 + 4 + 8, "tensor infos")?;
        let mut tensors = Vec::with_capacity(usize_from(tensor_count));
        for _ in 0..tensor_count {
            let name = r.string("tensor name")?;
            let dims = r.u32("tensor dimension count")?;
            if dims > MAX_DIMS {
                return Err(GgufError::TooManyDims { name, dims });
            }
            let mut shape = Vec::with_capacity(dims as usize);
            for _ in 0..dims {
                shape.push(r.u64("tensor dimension")?);
            }
            let ggml_type = r.u32("tensor type")?;
            let offset = r.u64("tensor offset")?;
            tensors.push(TensorInfo {
                name,
                shape,
                ggml_type,
                offset,
            });
        }

        let alignment = match index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => a,
                _ => return Err(GgufError::BadAlignment(v.as_u64().unwrap_or(0))),
            },
        };
        let data_offset = r.pos.div_ceil(alignment).saturating_mul(alignment);
        for t in &tensors {
            if data_offset.checked_add(t.offset).is_none_or(|end| end > len) {
                return Err(GgufError::TensorOutOfBounds {
                    name: t.name.clone(),
                    offset: t.offset,
                });
            }
        }
        Ok(Self {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
            index,
        })
    }

    /// The value of metadata key `key`.
    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// The value of `key` if it is a string.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(MetadataValue::as_str)
    }

    /// The value of `key` if it is a non-negative integer.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(MetadataValue::as_u64)
    }

    /// Sets metadata key `key`, replacing its value if it has one (like llama.cpp's
    /// `--override-kv`: a fixed chat template, a different pre-tokenizer).
    pub fn set(&mut self, key: &str, value: MetadataValue) {
        match self.index.get(key) {
            Some(&i) => self.metadata[i].1 = value,
            None => {
                self.index.insert(key.to_owned(), self.metadata.len());
                self.metadata.push((key.to_owned(), value));
            }
        }
    }

    /// `general.architecture`, which prefixes the model's own keys (`llama.context_length`).
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }
}

fn usize_from(n: u64) -> usize {
    // Counts are checked against the file length first, so they fit in memory, hence in usize.
    usize::try_from(n).unwrap_or(usize::MAX)
}

struct Reader<R> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Reader<R> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn bytes(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), GgufError> {
        let needed = buf.len() as u64;
        if needed > self.remaining() {
            return Err(self.truncated(what, needed));
        }
        self.inner.read_exact(buf).map_err(|e| match e.kind() {
            // The length we were told was wrong: the file is shorter than it said.
            io::ErrorKind::UnexpectedEof => self.truncated(what, needed),
            _ => GgufError::Io(e),
        })?;
        self.pos += needed;
        Ok(())
    }

    fn truncated(&self, what: &'static str, needed: u64) -> GgufError {
        GgufError::Truncated {
            what,
            offset: self.pos,
            needed,
            remaining: self.remaining(),
        }
    }

    fn check_count(&self, count: u64, min_size: u64, what: &'static str) -> Result<(), GgufError> {
        if count.checked_mul(min_size).is_none_or(|n| n > self.remaining()) {
            return Err(GgufError::CountTooLarge {
                what,
                count,
                offset: self.pos,
                remaining: self.remaining(),
            });
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.bytes(&mut b, what)?;
        Ok(b)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        self.check_count(len, 1, what)?;
        let offset = self.pos;
        let mut buf = vec![0u8; usize_from(len)];
        self.bytes(&mut buf, what)?;
        String::from_utf8(buf).map_err(|source| GgufError::NotUtf8 { offset, source })
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<MetadataValue, GgufError> {
        const W: &str = "metadata value";
        Ok(match ty {
            0 => MetadataValue::U8(u8::from_le_bytes(self.array(W)?)),
            1 => MetadataValue::I8(i8::from_le_bytes(self.array(W)?)),
            2 => MetadataValue::U16(u16::from_le_bytes(self.array(W)?)),
            3 => MetadataValue::I16(i16::from_le_bytes(self.array(W)?)),
            4 => MetadataValue::U32(u32::from_le_bytes(self.array(W)?)),
            5 => MetadataValue::I32(i32::from_le_bytes(self.array(W)?)),
            6 => MetadataValue::F32(f32::from_le_bytes(self.array(W)?)),
            7 => MetadataValue::Bool(self.array::<1>(W)?[0] != 0),
            8 => MetadataValue::String(self.string("string value")?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::TooDeep { offset: self.pos });
                }
                let elem_ty = self.u32("array element type")?;
                let count = self.u64("array length")?;
                let min_size = min_value_size(elem_ty).ok_or(GgufError::UnknownValueType {
                    ty: elem_ty,
                    offset: self.pos,
                })?;
                self.check_count(count, min_size, "array elements")?;
                let mut values = Vec::with_capacity(usize_from(count));
                for _ in 0..count {
                    values.push(self.value(elem_ty, depth + 1)?);
                }
                MetadataValue::Array(values)
            }
            10 => MetadataValue::U64(u64::from_le_bytes(self.array(W)?)),
            11 => MetadataValue::I64(i64::from_le_bytes(self.array(W)?)),
            12 => MetadataValue::F64(f64::from_le_bytes(self.array(W)?)),
            _ => return Err(GgufError::UnknownValueType { ty, offset: self.pos }),
        })
    }
}

/// Fewest bytes a value of type `ty` takes in the file; `None` for unknown types.
fn min_value_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        8 | 10..=12 => Some(8),
        // Element type and length of an inner array.
        9 => Some(12),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds GGUF headers byte by byte.
    #[derive(Default)]
    struct Builder(Vec<u8>);

    impl Builder {
        fn header(version: u32, tensors: u64, kvs: u64) -> Self {
            let mut b = Self::default();
            b.0.extend_from_slice(b"GGUF");
            b.u32(version).u64(tensors).u64(kvs);
            b
        }
        fn u32(&mut self, v: u32) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn u64(&mut self, v: u64) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }
        fn str(&mut self, s: &str) -> &mut Self {
            self.u64(s.len() as u64);
            self.0.extend_from_slice(s.as_bytes());
            self
        }
        fn raw(&mut self, b: &[u8]) -> &mut Self {
            self.0.extend_from_slice(b);
            self
        }
    }

    fn sample() -> Vec<u8> {
        let mut b = Builder::header(3, 1, 5);
        b.str("general.architecture").u32(8).str("llama");
        b.str("llama.context_length").u32(4).u32(2048);
        b.str("tokens").u32(9).u32(8).u64(2).str("a").str("é");
        b.str("flags").u32(9).u32(7).u64(3).raw(&[1, 0, 1]);
        b.str("scale").u32(6).raw(&1.5f32.to_le_bytes());
        b.str("tok_embd.weight").u32(2).u64(8).u64(4).u32(1).u64(0);
        let mut bytes = b.0;
        // Data section: pad to the alignment, then 8 * 4 F16 values.
        bytes.resize(bytes.len().div_ceil(32) * 32 + 64, 0);
        bytes
    }

    #[test]
    fn reads_metadata_and_tensors() {
        let g = Gguf::parse(&sample()).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.architecture(), Some("llama"));
        assert_eq!(g.get_u64("llama.context_length"), Some(2048));
        assert_eq!(
            g.get("tokens"),
            Some(&MetadataValue::Array(vec![
                MetadataValue::String("a".into()),
                MetadataValue::String("é".into())
            ]))
        );
        assert_eq!(g.get("flags").and_then(|v| v.as_array()).map(|a| a.len()), Some(3));
        assert_eq!(g.get("scale"), Some(&MetadataValue::F32(1.5)));
        assert_eq!(
            g.tensors,
            vec![TensorInfo {
                name: "tok_embd.weight".into(),
                shape: vec![8, 4],
                ggml_type: 1,
                offset: 0
            }]
        );
        assert_eq!(g.data_offset % 32, 0);
        assert_eq!(g.data_offset, sample().len() as u64 - 64);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample();
        let header_end = Gguf::parse(&bytes).unwrap().data_offset as usize;
        for cut in 0..header_end {
            let e = Gguf::parse(&bytes[..cut]).unwrap_err();
            assert!(
                matches!(
                    e,
                    GgufError::Truncated { .. } | GgufError::CountTooLarge { .. } | GgufError::TensorOutOfBounds { .. }
                ),
                "cut at {cut}: {e}"
            );
        }
    }

    #[test]
    fn bad_magic_and_version() {
        let mut bytes = sample();
        bytes[0] = b'X';
        assert!(matches!(Gguf::parse(&bytes), Err(GgufError::BadMagic { .. })));
        let mut bytes = sample();
        bytes[4] = 1;
        assert!(matches!(Gguf::parse(&bytes), Err(GgufError::UnsupportedVersion(1))));
    }

    #[test]
    fn huge_counts_fail_without_allocating() {
        let mut b = Builder::header(3, 0, u64::MAX);
        assert!(matches!(Gguf::parse(&b.0), Err(GgufError::CountTooLarge { .. })));
        b = Builder::header(3, u64::MAX / 2, 0);
        assert!(matches!(Gguf::parse(&b.0), Err(GgufError::CountTooLarge { .. })));
        b = Builder::header(3, 0, 1);
        b.str("k").u32(9).u32(8).u64(1 << 40);
        assert!(matches!(Gguf::parse(&b.0), Err(GgufError::CountTooLarge { .. })));
        b = Builder::header(3, 0, 1);
        b.u64(1 << 50);
        assert!(matches!(Gguf::parse(&b.0), Err(GgufError::CountTooLarge { .. })));
    }

    #[test]
    fn corrupt_values_are_errors() {
        let mut b = Builder::header(3, 0, 1);
        b.str("k").u32(13).u32(0);
        assert!(matches!(
            Gguf::parse(&b.0),
            Err(GgufError::UnknownValueType { ty: 13, .. })
        ));

        let mut b = Builder::header(3, 0, 1);
        b.str("k").u32(8).u64(2).raw(&[0xff, 0xfe]);
        assert!(matches!(Gguf::parse(&b.0), Err(GgufError::NotUtf8 { .. })));

        let mut b = Builder::header(3, 0, 2);
        b.str("k").u32(4).u32(1).str("k").u32(4).u32(2);
        assert!(matches!(Gguf::parse(&b.0), Err(GgufError::DuplicateKey(k)) if k == "k"));

        let mut b = Builder::header(3, 0, 1);
        b.str("k").u32(9);
        for _ in 0..=MAX_ARRAY_DEPTH {
            b.u32(9).u64(1);
        }
        b.raw(&[0; 64]);
        assert!(matches!(Gguf::parse(&b.0), Err(GgufError::TooDeep { .. })));

        let mut b = Builder::header(3, 1, 0);
        b.str("t").u32(5);
        b.raw(&[0; 64]);
        assert!(matches!(Gguf::parse(&b.0), Err(GgufError::TooManyDims { dims: 5, .. })));

        let mut b = Builder::header(3, 1, 0);
        b.str("t").u32(1).u64(4).u32(0).u64(1 << 20);
        assert!(matches!(Gguf::parse(&b.0), Err(GgufError::TensorOutOfBounds { .. })));

        let mut b = Builder::header(3, 0, 1);
        b.str("general.alignment").u32(4).u32(24);
        assert!(matches!(Gguf::parse(&b.0), Err(GgufError::BadAlignment(24))));
    }

    #[test]
    fn set_overrides_and_adds_keys() {
        let mut g = Gguf::parse(&sample()).unwrap();
        g.set("general.architecture", MetadataValue::String("qwen2".into()));
        g.set("new.key", MetadataValue::U32(7));
        assert_eq!(g.architecture(), Some("qwen2"));
        assert_eq!(g.get_u64("new.key"), Some(7));
        assert_eq!(g.metadata.len(), 6);
    }

    #[test]
    fn version_2_and_custom_alignment() {
        let mut b = Builder::header(2, 0, 1);
        b.str("general.alignment").u32(4).u32(64);
        let g = Gguf::parse(&b.0).unwrap();
        assert_eq!((g.version, g.alignment, g.data_offset), (2, 64, 64));
    }
}
