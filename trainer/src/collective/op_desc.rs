//! What a rank says it is about to do: every collective announces an [`OpDesc`] before any data
//! moves, and a rank refuses to go on when a peer announced another one. Without it, ranks that
//! disagree (a skipped call, another size, Sum against Avg, another root) would mix unrelated
//! memory and return wrong numbers with `Ok`.

use std::fmt;

use tch::Kind;

use super::ReduceOp;

/// What kind of collective an [`OpDesc`] announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum OpKind {
    AllReduce = 1,
    Broadcast = 2,
    AllGather = 3,
    Barrier = 4,
    /// [`super::Collective::shared_zeros`]: every rank maps every rank's buffer.
    SharedZeros = 5,
}

impl OpKind {
    fn name(code: u64) -> &'static str {
        match code {
            1 => "all_reduce",
            2 => "broadcast",
            3 => "all_gather",
            4 => "barrier",
            5 => "shared_zeros",
            _ => "an unknown operation",
        }
    }
}

/// Element type of an operation: raw bytes, or a tensor kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DType {
    /// The `*_bytes` calls, and operations without data.
    Bytes,
    Tensor(Kind),
}

/// Tensor kinds by code; codes travel between ranks, so the order must never change (append only).
const KINDS: [Kind; 20] = [
    Kind::Uint8,
    Kind::Int8,
    Kind::Int16,
    Kind::Int,
    Kind::Int64,
    Kind::Half,
    Kind::Float,
    Kind::Double,
    Kind::ComplexHalf,
    Kind::ComplexFloat,
    Kind::ComplexDouble,
    Kind::Bool,
    Kind::QInt8,
    Kind::QUInt8,
    Kind::QInt32,
    Kind::BFloat16,
    Kind::Float8e5m2,
    Kind::Float8e4m3fn,
    Kind::Float8e5m2fnuz,
    Kind::Float8e4m3fnuz,
];

impl DType {
    /// 0 for bytes, 1 + the kind's index in [`KINDS`] for a tensor kind.
    fn code(self) -> u64 {
        match self {
            DType::Bytes => 0,
            DType::Tensor(kind) => KINDS.iter().position(|k| *k == kind).map_or(0xffff, |i| i as u64 + 1),
        }
    }

    fn describe(code: u64) -> String {
        match code {
            0 => "bytes".into(),
            c => match KINDS.get(c as usize - 1) {
                Some(kind) => format!("{kind:?}"),
                None => format!("dtype #{c}"),
            },
        }
    }
}

/// One announced operation. `count` is in elements of `dtype` (bytes for [`DType::Bytes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OpDesc {
    /// Number of the operation on this communicator: every rank counts the same calls.
    pub seq: u64,
    pub kind: OpKind,
    pub dtype: DType,
    pub reduce: Option<ReduceOp>,
    /// Broadcast root; 0 for other operations.
    pub root: usize,
    pub count: u64,
}

/// An [`OpDesc`] as three words: how it travels (TCP header, shm control line) and is compared.
pub(crate) type OpWords = [u64; 3];

impl OpDesc {
    pub(crate) fn new(kind: OpKind, dtype: DType, count: usize) -> Self {
        OpDesc { seq: 0, kind, dtype, reduce: None, root: 0, count: count as u64 }
    }

    pub(crate) fn reducing(mut self, op: ReduceOp) -> Self {
        self.reduce = Some(op);
        self
    }

    pub(crate) fn rooted(mut self, root: usize) -> Self {
        self.root = root;
        self
    }

    pub(crate) fn numbered(mut self, seq: u64) -> Self {
        self.seq = seq;
        self
    }

    /// `[seq, kind | dtype << 8 | reduce << 24 | root << 32, count]`.
    pub(crate) fn words(&self) -> OpWords {
        let reduce = match self.reduce {
            None => 0,
            Some(ReduceOp::Sum) => 1,
            Some(ReduceOp::Avg) => 2,
        };
        let detail = self.kind as u64 | (self.dtype.code() & 0xffff) << 8 | reduce << 24 | (self.root as u64) << 32;
        [self.seq, detail, self.count]
    }

    /// Ok when `theirs` (rank `peer`'s announcement) is this one; otherwise a message naming
    /// both, for the error every rank returns.
    pub(crate) fn check(&self, theirs: OpWords, peer: usize, me: usize) -> Result<(), String> {
        let mine = self.words();
        if theirs == mine {
            return Ok(());
        }
        Err(format!(
            "ranks disagree: rank {peer} is in {} while rank {me} is in {}; every rank must make the \
             same collective calls in the same order",
            Described(theirs),
            Described(mine)
        ))
    }
}

/// Human form of announced words, e.g. `all_reduce #3 (Float, Sum, 1000 elements)`.
struct Described(OpWords);

impl fmt::Display for Described {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [seq, detail, count] = self.0;
        let kind = detail & 0xff;
        write!(f, "{} #{seq} ({}", OpKind::name(kind), DType::describe((detail >> 8) & 0xffff))?;
        match (detail >> 24) & 0xff {
            0 => {}
            1 => write!(f, ", Sum")?,
            2 => write!(f, ", Avg")?,
            other => write!(f, ", reduce op #{other}")?,
        }
        if kind == OpKind::Broadcast as u64 {
            write!(f, ", root {}", detail >> 32)?;
        }
        write!(f, ", {count} elements)")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn every_field_takes_part_in_the_comparison() {
        let base = OpDesc::new(OpKind::AllReduce, DType::Tensor(Kind::Float), 8).reducing(ReduceOp::Sum).numbered(3);
        let variants = [
            base.reducing(ReduceOp::Avg),
            OpDesc { dtype: DType::Tensor(Kind::Double), ..base },
            OpDesc { count: 9, ..base },
            base.numbered(4),
            OpDesc { kind: OpKind::Broadcast, ..base },
            base.rooted(1),
            OpDesc { dtype: DType::Bytes, ..base },
        ];
        assert!(base.check(base.words(), 1, 0).is_ok());
        for v in variants {
            let err = base.check(v.words(), 1, 0).unwrap_err();
            assert!(err.contains("rank 1 is in") && err.contains("rank 0 is in"), "{err}");
        }
    }

    #[test]
    fn the_message_names_op_dtype_reduction_root_and_size() {
        let sum = OpDesc::new(OpKind::AllReduce, DType::Tensor(Kind::Float), 8).reducing(ReduceOp::Sum).numbered(1);
        let err = sum.check(sum.reducing(ReduceOp::Avg).words(), 1, 0).unwrap_err();
        assert!(err.contains("all_reduce #1 (Float, Avg, 8 elements)"), "{err}");
        assert!(err.contains("all_reduce #1 (Float, Sum, 8 elements)"), "{err}");
        let bcast = OpDesc::new(OpKind::Broadcast, DType::Bytes, 5).rooted(2).numbered(7);
        assert_eq!(Described(bcast.words()).to_string(), "broadcast #7 (bytes, root 2, 5 elements)");
    }
}
