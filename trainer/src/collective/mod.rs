//! Collective communication between the ranks of a trainer gang.
//!
//! Every operation has a timeout; a peer that stops answering turns into a
//! [`CollectiveError::Timeout`] that the worker reports, never an endless wait. Every operation
//! is announced before its data moves (kind, dtype, reduce op, element count, root): when the
//! ranks disagree, every one of them returns an error, never a wrong result with `Ok`.

use std::time::Duration;

use tch::{Kind, Tensor};

pub mod bench;
pub mod hierarchical;
#[cfg(feature = "nccl")]
pub mod nccl;
#[cfg(not(feature = "nccl"))]
#[path = "nccl_stub.rs"]
pub mod nccl;
pub mod nccl_bootstrap;
#[cfg(feature = "nccl")]
mod nccl_lib;
mod op_desc;
mod ring_schedule;
mod ring_transfer;
pub mod shm;
mod shm_reduce;
mod shm_segment;
mod shm_setup;
pub mod tcp;
mod tcp_handshake;
mod tcp_rendezvous;

pub use hierarchical::{HierarchicalCollective, Topology};
pub use nccl::NcclCollective;
pub use shm::ShmCollective;
pub use tcp::TcpCollective;
pub use tcp_rendezvous::TcpRendezvousPoint;

/// How `all_reduce` combines the ranks' tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Sum divided by the world size.
    Avg,
}

/// Errors of a collective operation.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("{op} timed out after {after:?} waiting for rank {peer}")]
    Timeout { op: &'static str, peer: usize, after: Duration },
    #[error("{op}: connection to rank {peer} failed: {source}")]
    Io {
        op: &'static str,
        peer: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}: unsupported tensor: {reason}")]
    Unsupported { op: &'static str, reason: String },
    #[error("backend {backend} is not available: {reason}")]
    Unavailable { backend: &'static str, reason: String },
    #[error("connect: {reason} (rank {peer}); every rank of a gang must hold the same job token (RTRAIN_JOB_TOKEN)")]
    Unauthenticated { peer: usize, reason: String },
}

impl CollectiveError {
    /// Whether a peer stopped answering or its connection broke (timeouts, I/O errors), as
    /// opposed to a request the backend cannot serve.
    pub fn is_lost_peer(&self) -> bool {
        matches!(self, CollectiveError::Timeout { .. } | CollectiveError::Io { .. })
    }
}

/// A communicator over a fixed group of ranks. It has one owner (the training thread).
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Reduces `tensor` across all ranks in place; every rank ends with the result.
    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<(), CollectiveError>;
    /// Copies `root`'s `tensor` into every other rank's `tensor`.
    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError>;
    /// Returns every rank's `input`, indexed by rank.
    fn all_gather(&mut self, input: &Tensor) -> Result<Vec<Tensor>, CollectiveError>;
    /// Returns once every rank has entered the barrier.
    fn barrier(&mut self) -> Result<(), CollectiveError>;
    /// A zero-filled 1-D CPU tensor that this backend all-reduces (whole or any slice of it)
    /// without staging copies, or `None` where the backend has no such memory. Every rank calls
    /// it together with the same arguments. The DDP gradient buffer is made this way.
    fn shared_zeros(&mut self, numel: i64, kind: Kind) -> Result<Option<Tensor>, CollectiveError> {
        let _ = (numel, kind);
        Ok(None)
    }
}
