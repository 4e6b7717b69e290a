//! Training data: byte corpora and the deterministic global-batch plan.

pub mod batch;
pub mod corpus;
pub mod epochs;
pub mod splitmix;

use std::path::PathBuf;

pub use batch::{BatchPlan, rank_samples};
pub use corpus::ByteCorpus;
pub use epochs::Epochs;

/// Why training data cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The data file could not be read.
    #[error("cannot read {}: {source}", path.display())]
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
    /// A line of a JSONL file is not an example.
    #[error(
        "{}:{line}: {source}; expected {{\"prompt\", \"response\"}} or {{\"messages\": [{{\"role\", \"content\"}}]}}",
        path.display()
    )]
    Json {
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        source: serde_json::Error,
    },
    /// An example that cannot be tokenized or rendered.
    #[error("{}:{line}: {reason}", path.display())]
    Example { path: PathBuf, line: usize, reason: String },
    /// A fine-tuning file with no example that has tokens to train.
    #[error("{} holds no example with response tokens", path.display())]
    NoExamples { path: PathBuf },
    /// A loop that reads examples from a file was given synthetic data.
    #[error("this trainer needs a data file (JSONL), not synthetic data")]
    NeedsFile,
}
