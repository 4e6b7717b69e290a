//! What can go wrong while publishing or loading weights, with the path, peer or tensor involved.

use std::path::PathBuf;
use std::time::Duration;

/// Errors of the weight transports. [`WeightSyncError::is_retryable`] tells a rollout actor
/// whether to keep its current weights and try again later.
#[derive(Debug, thiserror::Error)]
pub enum WeightSyncError {
    /// A job or channel name that cannot be part of a `/dev/shm` file name.
    #[error("invalid {what} {value:?}: use letters, digits, '-', '_' or '.' (at most 64)")]
    InvalidName { what: &'static str, value: String },

    /// A file operation on a shared-memory segment failed.
    #[error("{op} {path}: {source}")]
    Shm { op: &'static str, path: PathBuf, source: std::io::Error },

    /// `/dev/shm` cannot hold the segment (checked up front, so no SIGBUS later).
    #[error(
        "cannot reserve {bytes} bytes for {path}: {source} (/dev/shm may be too small: `df -h /dev/shm`; \
         in Docker, raise --shm-size)"
    )]
    ShmTooSmall { path: PathBuf, bytes: u64, source: std::io::Error },

    /// The publisher's segment disappeared (it exited and unlinked it); the weights already
    /// loaded stay valid.
    #[error("weight segment {path} is gone (publisher exited); last loaded version: {last_version:?}")]
    SegmentGone { path: PathBuf, last_version: Option<u64> },

    /// A file or stream that does not hold weights in this format.
    #[error("{source_name}: not a weight image: {reason}")]
    Corrupt { source_name: String, reason: String },

    /// The publisher writes another revision of the format.
    #[error("{source_name}: weight format {found}, this build reads format {expected}")]
    FormatVersion { source_name: String, found: u32, expected: u32 },

    /// The published tensors do not match the ones being loaded into, or a publish does not
    /// match the set the segment was created for.
    #[error("tensor {name:?}: {reason}")]
    TensorSetMismatch { name: String, reason: String },

    /// A tensor this transport cannot carry (sparse, unsupported dtype, ...).
    #[error("tensor {name:?} cannot be synced: {reason}")]
    UnsupportedTensor { name: String, reason: String },

    /// Versions must grow within one publisher generation.
    #[error("version {version} is not newer than the last published version {last}")]
    VersionNotNewer { version: u64, last: u64 },

    /// The publisher kept overwriting the slot being read; the tensors being loaded into hold a
    /// mix of versions until the next successful load.
    #[error("{path}: no complete version could be read within {waited:?} (publisher writing continuously)")]
    Contended { path: PathBuf, waited: Duration },

    /// A network operation with a weight server failed or timed out.
    #[error("{op} {peer}: {source}")]
    Net { op: &'static str, peer: String, source: std::io::Error },

    /// The other side did not prove knowledge of the shared token.
    #[error("{peer}: authentication failed ({detail})")]
    AuthFailed { peer: String, detail: &'static str },

    /// The weight server has as many connections as it allows.
    #[error("{peer}: weight server busy, try again")]
    Busy { peer: String },

    /// libtorch refused an operation on a tensor.
    #[error("tensor {name:?}: {source}")]
    Torch { name: String, source: tch::TchError },
}

impl WeightSyncError {
    /// Whether trying again later may succeed with no change on this side: the publisher may
    /// come back, stop writing, or accept the connection.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::SegmentGone { .. } | Self::Contended { .. } | Self::Net { .. } | Self::Busy { .. })
    }

    pub(crate) fn corrupt(source_name: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        Self::Corrupt { source_name: source_name.to_string(), reason: reason.into() }
    }

    pub(crate) fn mismatch(name: &str, reason: impl Into<String>) -> Self {
        Self::TensorSetMismatch { name: name.to_string(), reason: reason.into() }
    }
}

/// Result alias for the weight transports.
pub type SyncResult<T> = std::result::Result<T, WeightSyncError>;
