//! Rank 0's checkpoint writer: saves in a background thread (one write in flight at a time),
//! then applies the retention policy.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use crate::checkpoint::{self, CheckpointError};
use crate::config::CheckpointSpec;
use crate::snapshot::Snapshot;

/// Writes rank 0's snapshots into the run's checkpoints folder and prunes old ones.
pub struct CheckpointWriter {
    run: PathBuf,
    config_text: String,
    spec: CheckpointSpec,
    pending: Option<JoinHandle<Result<PathBuf, CheckpointError>>>,
    /// The error of a background write that failed, until the step loop reports it.
    failed: Option<String>,
}

impl CheckpointWriter {
    pub fn new(run: &Path, config_text: String, spec: CheckpointSpec) -> Self {
        Self { run: run.to_path_buf(), config_text, spec, pending: None, failed: None }
    }

    /// The error of a background write that failed since the last call, to report upward.
    pub fn take_failure(&mut self) -> Option<String> {
        self.failed.take()
    }

    /// Saves `snapshot`: in the background when the config says `async`, else before
    /// returning. A write still in flight is waited for first (its failure is logged: the
    /// previous checkpoints are intact and training goes on).
    pub fn save(&mut self, snapshot: Snapshot) -> Result<(), CheckpointError> {
        self.wait_pending();
        let (run, config_text, spec) = (self.run.clone(), self.config_text.clone(), self.spec);
        let write = move || {
            let path = snapshot.save(&run, &config_text)?;
            let deleted = checkpoint::retain(&run, spec.keep_last, spec.keep_best, spec.order)?;
            tracing::info!(checkpoint = %path.display(), deleted = ?deleted, "checkpoint saved");
            Ok(path)
        };
        if self.spec.async_save {
            let handle = std::thread::Builder::new()
                .name("rtrain-checkpoint".into())
                .spawn(write)
                .map_err(|e| CheckpointError::Io { path: self.run.clone(), source: e })?;
            self.pending = Some(handle);
            Ok(())
        } else {
            write().map(|_| ())
        }
    }

    /// Waits for the write in flight, if any, and returns its outcome (the final checkpoint of
    /// a run must not fail silently).
    pub fn finish(&mut self) -> Result<(), CheckpointError> {
        match self.pending.take() {
            None => Ok(()),
            Some(handle) => handle
                .join()
                .unwrap_or_else(|_| Err(CheckpointError::invalid(&self.run, "the checkpoint writer thread panicked")))
                .map(|_| ()),
        }
    }

    fn wait_pending(&mut self) {
        if let Err(e) = self.finish() {
            tracing::warn!(error = %e, "checkpoint not saved; the previous checkpoints are intact, training goes on");
            self.failed = Some(e.to_string());
        }
    }
}
