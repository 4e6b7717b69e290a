//! Checkpoints as the worker writes and reads them: the directory format, manifest, listing and
//! verification come from [`rtrain_launcher::checkpoint`] (the launcher verifies and picks the
//! checkpoint to resume without a tensor library); this module adds the tensors.

use std::path::{Path, PathBuf};

use tch::Tensor;

pub use rtrain_launcher::checkpoint::*;

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

/// Writes `snapshot` as a checkpoint of `run` (see [`write`]); returns its directory.
pub fn save(run: &Path, snapshot: &Snapshot, config_text: &str) -> Result<PathBuf, CheckpointError> {
    write(run, snapshot, &snapshot.state, config_text)
}

/// Loads a checkpoint's tensors and state (on the CPU).
pub fn load(path: &Path) -> Result<Snapshot, CheckpointError> {
    let state = read_state(path)?;
    let load = |file: &str| -> Result<Vec<(String, Tensor)>, CheckpointError> {
        let p = path.join(file);
        if !p.exists() && file == OPTIMIZER_FILE {
            return Ok(Vec::new());
        }
        Tensor::read_safetensors(&p).map_err(|e| torch_error(&p, e))
    };
    Ok(Snapshot { model: load(MODEL_FILE)?, optimizer: load(OPTIMIZER_FILE)?, state })
}

fn torch_error(path: &Path, e: tch::TchError) -> CheckpointError {
    CheckpointError::Tensors { path: path.to_path_buf(), message: format!("libtorch: {e}") }
}
