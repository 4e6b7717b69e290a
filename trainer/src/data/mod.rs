//! Training data: byte corpora and the deterministic global-batch plan.

pub mod batch;
pub mod corpus;
pub mod splitmix;

use std::path::PathBuf;

pub use batch::{BatchPlan, rank_samples};
pub use corpus::ByteCorpus;

/// Why a corpus cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The corpus file could not be read.
    #[error("cannot read corpus {}: {source}", path.display())]
    Read {
        /// The file that failed.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The corpus has fewer bytes than one training window needs.
    #[error("corpus {source_name} has {len} bytes, needs at least {needed}")]
    TooShort {
        /// A file path or `synthetic(seed=..)`.
        source_name: String,
        /// Bytes in the corpus.
        len: usize,
        /// Bytes required.
        needed: usize,
    },
}
