//! Checkpoints: one directory per saved step, published by an atomic rename.
//!
//! ```text
//! <run>/checkpoints/step-000200/model.safetensors      parameters, Hugging Face tensor names
//!                              /optimizer.safetensors  AdamW moments (`exp_avg.<name>`, `exp_avg_sq.<name>`)
//!                              /trainer_state.json     step, world size, batch layout, data cursor, ...
//!                              /MANIFEST.json          every file's size and SHA-256, and the config
//! <run>/checkpoints/latest                             "step-000200", replaced after the rename
//! ```
//!
//! A directory is written as `.tmp-step-000200-<pid>` and renamed into place only once every file
//! is written and synced, so a crash at any point leaves the previous checkpoints untouched. A
//! checkpoint is trusted only if its manifest verifies; resume takes the newest one that does.

mod retention;
mod store;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use retention::{MetricOrder, to_delete};
pub use store::{Checkpoint, Scan, Verified, dir_name, list, newest_valid, read_state, retain, verify, write};

/// The folder of a run that holds its checkpoints.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";
pub const MANIFEST_FILE: &str = "MANIFEST.json";
pub const LATEST_FILE: &str = "latest";

/// What the runtime records beside the tensors: enough to continue exactly where the run was.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed; the resumed run starts with this step number.
    pub step: u64,
    /// Ranks of the gang that saved it, and its batch layout. The global batch is kept on resume;
    /// a different world size recomputes gradient accumulation.
    pub world_size: usize,
    pub global_batch: usize,
    pub grad_accum: usize,
    pub micro_batch: usize,
    /// The data order is a pure function of (seed, batch index): this pair is the data loader's
    /// whole state. The built-in trainer draws no other random numbers after initialisation.
    pub seed: u64,
    pub data_cursor: u64,
    /// Learning rate of the last step taken (the schedule is a pure function of the step).
    pub lr: f64,
    /// The checkpoint metric's value at this step (the step's loss), for `keep_best`.
    pub metric: Option<f64>,
    /// SHA-256 of the effective config that produced the run.
    pub config_digest: String,
    /// The training loop's fingerprint of its model (the built-in GPT: its `[model]` sizes; fine-tuning:
    /// the Hugging Face architecture), which a resumed loop must match.
    pub model: serde_json::Map<String, serde_json::Value>,
    /// State the training loop adds (the built-in trainer: its optimizer step count).
    pub extra: serde_json::Value,
}

/// One file of a checkpoint as the manifest lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ManifestFile {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// `MANIFEST.json`: what a complete, undamaged checkpoint holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: u32,
    pub step: u64,
    pub created_unix: f64,
    pub files: Vec<ManifestFile>,
    pub config_digest: String,
    /// The effective config (TOML) of the run that wrote it.
    pub config: String,
}

pub const MANIFEST_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Tensors { path: PathBuf, message: String },
}

impl CheckpointError {
    pub fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        CheckpointError::Invalid { path: path.into(), message: message.into() }
    }
}

pub fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> CheckpointError {
    let path = path.into();
    move |source| CheckpointError::Io { path, source }
}

/// The tensor files of a checkpoint ([`MODEL_FILE`], and [`OPTIMIZER_FILE`] when there is
/// optimizer state), written by the worker's tensor library.
pub trait TensorFiles {
    /// Writes the files into `dir`; returns their names.
    fn write_into(&self, dir: &Path) -> Result<Vec<&'static str>, CheckpointError>;
}

/// Hex SHA-256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
