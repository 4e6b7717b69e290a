//! The tensor table both transports put before the data: each tensor's name, dtype, shape and
//! byte offset in one flat image of the weights, and the checks that a tensor set matches it.
//!
//! Wire form (little-endian): `count: u32`, then per tensor `name_len: u16, dtype: u8, ndim: u8,
//! offset: u64, dims: [i64; ndim], name: [u8; name_len]`. Byte counts follow from dtype and shape.

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use super::error::{SyncResult, WeightSyncError};

/// Every tensor starts on a cache line of the image (and of a shared-memory slot).
pub(crate) const TENSOR_ALIGN: u64 = 64;
const MAX_NAME: usize = 1024;
const MAX_DIMS: usize = 16;
const MAX_TENSORS: u32 = 1 << 20;

/// Element types the transports carry, by their code in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightDtype {
    F32,
    Bf16,
    F16,
    F64,
    I64,
    I32,
    U8,
    I8,
    Bool,
}

impl WeightDtype {
    const ALL: [WeightDtype; 9] =
        [Self::F32, Self::Bf16, Self::F16, Self::F64, Self::I64, Self::I32, Self::U8, Self::I8, Self::Bool];

    fn code(self) -> u8 {
        Self::ALL.iter().position(|d| *d == self).map_or(0, |i| i as u8 + 1)
    }

    fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code).checked_sub(1)?).copied()
    }

    /// The dtype of a libtorch kind, if the transports carry it.
    pub fn from_kind(kind: Kind) -> Option<Self> {
        Some(match kind {
            Kind::Float => Self::F32,
            Kind::BFloat16 => Self::Bf16,
            Kind::Half => Self::F16,
            Kind::Double => Self::F64,
            Kind::Int64 => Self::I64,
            Kind::Int => Self::I32,
            Kind::Uint8 => Self::U8,
            Kind::Int8 => Self::I8,
            Kind::Bool => Self::Bool,
            _ => return None,
        })
    }

    pub fn kind(self) -> Kind {
        match self {
            Self::F32 => Kind::Float,
            Self::Bf16 => Kind::BFloat16,
            Self::F16 => Kind::Half,
            Self::F64 => Kind::Double,
            Self::I64 => Kind::Int64,
            Self::I32 => Kind::Int,
            Self::U8 => Kind::Uint8,
            Self::I8 => Kind::Int8,
            Self::Bool => Kind::Bool,
        }
    }

    pub fn size_bytes(self) -> u64 {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::Bf16 | Self::F16 => 2,
            Self::U8 | Self::I8 | Self::Bool => 1,
        }
    }
}

/// One tensor of the image: `bytes` bytes at `offset`, dense, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: WeightDtype,
    pub shape: Vec<i64>,
    pub offset: u64,
    pub bytes: u64,
}

/// The tensors of a weight image in publication order, and the image's size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightTable {
    entries: Vec<TensorEntry>,
    index: HashMap<String, usize>,
    data_bytes: u64,
}

impl WeightTable {
    /// Lays out `tensors` in order, each on a [`TENSOR_ALIGN`] boundary. Names must be unique.
    pub fn from_tensors(tensors: &[(String, Tensor)]) -> SyncResult<Self> {
        let mut entries = Vec::with_capacity(tensors.len());
        let mut offset = 0u64;
        for (name, t) in tensors {
            let unsupported = |reason: String| WeightSyncError::UnsupportedTensor { name: name.clone(), reason };
            if name.is_empty() || name.len() > MAX_NAME {
                return Err(unsupported(format!("names must have 1 to {MAX_NAME} bytes")));
            }
            if !t.defined() || t.is_sparse() || t.is_mkldnn() {
                return Err(unsupported("only defined, dense tensors are synced".into()));
            }
            let kind = t.f_kind().map_err(|source| WeightSyncError::Torch { name: name.clone(), source })?;
            let dtype = WeightDtype::from_kind(kind).ok_or_else(|| unsupported(format!("dtype {kind:?}")))?;
            let shape = t.size();
            if shape.len() > MAX_DIMS {
                return Err(unsupported(format!("{} dimensions, at most {MAX_DIMS}", shape.len())));
            }
            let bytes = byte_count(dtype, &shape).ok_or_else(|| unsupported(format!("shape {shape:?}")))?;
            entries.push(TensorEntry { name: name.clone(), dtype, shape, offset, bytes });
            offset = align(offset + bytes);
        }
        Self::new(entries, offset, "tensor set")
    }

    fn new(entries: Vec<TensorEntry>, data_bytes: u64, source_name: &str) -> SyncResult<Self> {
        let mut index = HashMap::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            if index.insert(e.name.clone(), i).is_some() {
                return Err(WeightSyncError::corrupt(source_name, format!("tensor {:?} appears twice", e.name)));
            }
        }
        Ok(WeightTable { entries, index, data_bytes })
    }

    pub fn entries(&self) -> &[TensorEntry] {
        &self.entries
    }

    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.index.get(name).map(|&i| &self.entries[i])
    }

    /// Bytes of the image: every tensor and the padding between them.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// For each of `tensors`, its entry; fails naming the first tensor whose name, dtype or shape
    /// differs, or the first entry no tensor has.
    pub fn match_tensors(&self, tensors: &[(String, Tensor)]) -> SyncResult<Vec<&TensorEntry>> {
        let mut seen = vec![false; self.entries.len()];
        let mut matched = Vec::with_capacity(tensors.len());
        for (name, t) in tensors {
            let Some(&i) = self.index.get(name) else {
                return Err(WeightSyncError::mismatch(name, "not in the published tensor set"));
            };
            let entry = &self.entries[i];
            if std::mem::replace(&mut seen[i], true) {
                return Err(WeightSyncError::mismatch(name, "given more than once"));
            }
            let kind = t.f_kind().map_err(|source| WeightSyncError::Torch { name: name.clone(), source })?;
            if WeightDtype::from_kind(kind) != Some(entry.dtype) {
                return Err(WeightSyncError::mismatch(
                    name,
                    format!("published as {:?}, here {kind:?}", entry.dtype.kind()),
                ));
            }
            if t.size() != entry.shape {
                return Err(WeightSyncError::mismatch(
                    name,
                    format!("published with shape {:?}, here {:?}", entry.shape, t.size()),
                ));
            }
            matched.push(entry);
        }
        if let Some(missing) = seen.iter().position(|s| !s) {
            return Err(WeightSyncError::mismatch(
                &self.entries[missing].name,
                "published but not among the tensors here",
            ));
        }
        Ok(matched)
    }

    /// Zero-filled CPU tensors with this table's names, dtypes and shapes, to load into.
    pub fn zeros(&self) -> SyncResult<Vec<(String, Tensor)>> {
        self.entries
            .iter()
            .map(|e| {
                Tensor::f_zeros(&e.shape, (e.dtype.kind(), Device::Cpu))
                    .map(|t| (e.name.clone(), t))
                    .map_err(|source| WeightSyncError::Torch { name: e.name.clone(), source })
            })
            .collect()
    }

    /// The wire form (see the module comment).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.entries.len() * 64);
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            out.push(e.dtype.code());
            out.push(e.shape.len() as u8);
            out.extend_from_slice(&e.offset.to_le_bytes());
            for d in &e.shape {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(e.name.as_bytes());
        }
        out
    }

    /// Parses [`Self::encode`]'s output for an image of `data_bytes`, checking every count and
    /// range before use: the bytes come from another process or host.
    pub fn decode(bytes: &[u8], data_bytes: u64, source_name: &str) -> SyncResult<Self> {
        let bad = |reason: String| WeightSyncError::corrupt(source_name, reason);
        let mut r = Reader { bytes, at: 0 };
        let count = r.u32().ok_or_else(|| bad("truncated tensor table".into()))?;
        if count > MAX_TENSORS {
            return Err(bad(format!("{count} tensors")));
        }
        let mut entries = Vec::with_capacity(count as usize);
        let mut end = 0u64;
        for i in 0..count {
            let truncated = || bad(format!("tensor table truncated at entry {i}"));
            let name_len = r.u16().ok_or_else(truncated)?;
            let code = r.u8().ok_or_else(truncated)?;
            let ndim = r.u8().ok_or_else(truncated)?;
            let offset = r.u64().ok_or_else(truncated)?;
            if usize::from(ndim) > MAX_DIMS {
                return Err(bad(format!("entry {i} has {ndim} dimensions")));
            }
            let shape =
                (0..ndim).map(|_| r.u64().map(|d| d as i64)).collect::<Option<Vec<i64>>>().ok_or_else(truncated)?;
            let name = r.take(usize::from(name_len)).ok_or_else(truncated)?;
            let name = String::from_utf8(name.to_vec()).map_err(|_| bad(format!("entry {i}: name is not UTF-8")))?;
            let dtype =
                WeightDtype::from_code(code).ok_or_else(|| bad(format!("tensor {name:?}: dtype code {code}")))?;
            let bytes = byte_count(dtype, &shape).ok_or_else(|| bad(format!("tensor {name:?}: shape {shape:?}")))?;
            let stop = offset.checked_add(bytes).filter(|s| *s <= data_bytes);
            if name.is_empty() || offset < end || !offset.is_multiple_of(TENSOR_ALIGN) || stop.is_none() {
                return Err(bad(format!("tensor {name:?}: bad name or range {offset}+{bytes} of {data_bytes}")));
            }
            end = stop.unwrap_or(data_bytes);
            entries.push(TensorEntry { name, dtype, shape, offset, bytes });
        }
        if r.at != bytes.len() {
            return Err(bad(format!("{} bytes after the tensor table", bytes.len() - r.at)));
        }
        Self::new(entries, data_bytes, source_name)
    }
}

fn byte_count(dtype: WeightDtype, shape: &[i64]) -> Option<u64> {
    shape.iter().try_fold(dtype.size_bytes(), |acc, &d| acc.checked_mul(u64::try_from(d).ok()?))
}

pub(crate) fn align(n: u64) -> u64 {
    n.div_ceil(TENSOR_ALIGN) * TENSOR_ALIGN
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let out = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(out)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2)?.try_into().ok().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }
}

/// The address of `t`'s bytes when they can be read or written in place: a defined, dense,
/// contiguous CPU tensor. Others go through a staging copy.
pub(crate) fn direct_ptr(t: &Tensor) -> Option<*mut u8> {
    let direct = t.defined() && !t.is_sparse() && !t.is_mkldnn() && t.device() == Device::Cpu && t.is_contiguous();
    direct.then(|| t.data_ptr().cast::<u8>())
}

/// `t` as a contiguous CPU tensor (itself when it already is one), for reading its bytes.
pub(crate) fn readable(name: &str, t: &Tensor) -> SyncResult<Tensor> {
    if direct_ptr(t).is_some() {
        return Ok(t.shallow_clone());
    }
    let torch = |source| WeightSyncError::Torch { name: name.to_string(), source };
    t.f_to_device(Device::Cpu).and_then(|c| c.f_contiguous()).map_err(torch)
}
