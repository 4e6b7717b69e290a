//! The library surface for training loops: the runtime owns processes, rendezvous, the
//! collective, the step counter and metrics; a [`TrainLoop`] owns the model and one step.

use tch::{Device, Tensor};

use crate::collective::Collective;
use crate::config::JobSpec;
pub use crate::error::TrainError;

/// A model architecture as `key → value`, for the resume check (see [`TrainLoop::fingerprint`]).
pub type Fingerprint = serde_json::Map<String, serde_json::Value>;

/// What a training loop is handed: who it is, the job, and how to talk to its peers.
pub struct TrainContext {
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    /// Numbered from 0; grows with each restart of the gang.
    pub attempt: u32,
    pub device: Device,
    pub spec: JobSpec,
    /// The run directory (`<job.run_dir>/<job.name>`), for outputs of the loop's own.
    pub run_dir: std::path::PathBuf,
    pub collective: Box<dyn Collective>,
}

impl TrainContext {
    pub fn is_rank_zero(&self) -> bool {
        self.rank == 0
    }
}

/// The file of the run directory where a built-in trainer leaves a few things its final model
/// generates; the launch prints them at the end.
pub const SAMPLES_FILE: &str = "samples.json";

/// One generated sample: the prompt, what the model answered and, when the data says, the
/// answer it was taught.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    pub prompt: String,
    pub response: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
}

/// Writes `samples` as `<run>/samples.json`.
pub fn write_samples(run_dir: &std::path::Path, samples: &[Sample]) -> Result<(), TrainError> {
    let path = run_dir.join(SAMPLES_FILE);
    let text = serde_json::to_vec_pretty(samples).map_err(|e| TrainError::other(e.to_string()))?;
    std::fs::write(&path, text).map_err(|source| TrainError::Io { path, source })
}

/// The result of one optimizer step, as the whole gang saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutput {
    /// Loss averaged over the global batch (identical on every rank).
    pub loss: f64,
    pub lr: f64,
    /// Tokens processed by the whole gang in this step.
    pub tokens: usize,
    /// Global gradient norm before clipping, if the loop computes it.
    pub grad_norm: Option<f64>,
    /// The held-out loss after this step, when the step was followed by an evaluation
    /// (`[eval]`); identical on every rank.
    pub eval_loss: Option<f64>,
}

/// What a training loop checkpoints: named tensors (detached copies on the CPU, so the step loop
/// may go on while they are written) and any state of its own as JSON.
#[derive(Debug, Default)]
pub struct LoopState {
    /// Model parameters, under the names the model's weights use (Hugging Face names where an
    /// architecture has them); saved as `model.safetensors`.
    pub model: Vec<(String, Tensor)>,
    /// Optimizer state; saved as `optimizer.safetensors`.
    pub optimizer: Vec<(String, Tensor)>,
    pub extra: serde_json::Value,
}

/// A data-parallel training loop. Every rank runs one instance; `step` is called for
/// `step = first .. spec.steps` (`first` is 0, or the step a checkpoint was taken at) and must
/// take part in the same collectives on every rank.
///
/// The data a step uses should depend only on the step number (and the seed), as the built-in
/// trainer's does: that makes a resumed run, even with a different number of ranks, see the
/// same batches as an uninterrupted one.
///
/// A loop that only supplies a model and its loss implements [`crate::engine::TrainStep`]
/// instead and runs as a [`crate::engine::StepLoop`]; implement this trait for full control.
pub trait TrainLoop {
    /// Runs one optimizer step (including gradient accumulation and synchronisation).
    fn step(&mut self, ctx: &mut TrainContext, step: u64) -> Result<StepOutput, TrainError>;

    /// What a checkpoint of this loop must match to be resumed: the model architecture as
    /// `key → value` (the GPT's dimensions, a Hugging Face config's), recorded in each
    /// checkpoint's `trainer_state.json` and compared key by key before [`TrainLoop::restore`].
    /// Empty (the default): no check.
    fn fingerprint(&self) -> Fingerprint {
        Fingerprint::new()
    }

    /// The state to checkpoint, or `None` if this loop does not checkpoint (the default).
    /// Called on rank 0 between steps; the time it takes is the step loop's stall per save.
    fn state(&self) -> Result<Option<LoopState>, TrainError> {
        Ok(None)
    }

    /// Called on every rank after the last step (before the final barrier): a place to write
    /// outputs such as an exported model. Does nothing by default.
    fn finish(&mut self, ctx: &mut TrainContext) -> Result<(), TrainError> {
        let _ = ctx;
        Ok(())
    }

    /// Restores a state returned by [`TrainLoop::state`] (on every rank, before the first step).
    fn restore(&mut self, state: LoopState) -> Result<(), TrainError> {
        let _ = state;
        Err(TrainError::other(
            "this training loop cannot resume from a checkpoint (it does not implement TrainLoop::restore)",
        ))
    }
}
