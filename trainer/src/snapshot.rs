//! One checkpoint's tensors and trainer state in memory, and their safetensors files. The
//! directory format, manifest, listing and verification are [`crate::checkpoint`]'s (shared with
//! the launcher, which verifies and picks the checkpoint to resume without a tensor library).

use std::path::{Path, PathBuf};

use tch::Tensor;

use crate::checkpoint::{self, CheckpointError, MODEL_FILE, OPTIMIZER_FILE, TensorFiles, TrainerState};

/// The tensors and state of one checkpoint, in memory (detached copies on the CPU).
#[derive(Debug)]
pub struct Snapshot {
    pub model: Vec<(String, Tensor)>,
    pub optimizer: Vec<(String, Tensor)>,
    pub state: TrainerState,
}

impl TensorFiles for Snapshot {
    fn write_into(&self, dir: &Path) -> Result<Vec<&'static str>, CheckpointError> {
        let mut files = Vec::new();
        for (file, tensors) in [(MODEL_FILE, &self.model), (OPTIMIZER_FILE, &self.optimizer)] {
            if tensors.is_empty() && file == OPTIMIZER_FILE {
                continue;
            }
            let path = dir.join(file);
            Tensor::write_safetensors(tensors, &path).map_err(|e| torch_error(&path, e))?;
            files.push(file);
        }
        Ok(files)
    }
}

impl Snapshot {
    /// Writes this snapshot as a checkpoint of `run` (see [`checkpoint::write`]); returns its
    /// directory.
    pub fn save(&self, run: &Path, config_text: &str) -> Result<PathBuf, CheckpointError> {
        checkpoint::write(run, self, &self.state, config_text)
    }

    /// Loads a checkpoint's tensors and state (on the CPU).
    pub fn load(path: &Path) -> Result<Self, CheckpointError> {
        let state = checkpoint::read_state(path)?;
        let load = |file: &str| -> Result<Vec<(String, Tensor)>, CheckpointError> {
            let p = path.join(file);
            if !p.exists() && file == OPTIMIZER_FILE {
                return Ok(Vec::new());
            }
            Tensor::read_safetensors(&p).map_err(|e| torch_error(&p, e))
        };
        Ok(Snapshot { model: load(MODEL_FILE)?, optimizer: load(OPTIMIZER_FILE)?, state })
    }
}

fn torch_error(path: &Path, e: tch::TchError) -> CheckpointError {
    CheckpointError::Tensors { path: path.to_path_buf(), message: format!("libtorch: {e}") }
}
